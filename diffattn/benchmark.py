"""Timing and memory helpers shared by ``diffattn bench`` and the scripts under ``scripts/``.

Benchmarks measure the methods side by side in one process and write a JSON file and a PNG plot.
Peak memory is reported as peak RSS on CPU and ``max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# the --dtype choices of the CLI and the benchmark scripts
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_samples(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    desc: str = "",
) -> dict[str, list[float]]:
    """Wall seconds of every call of each function, timed one call of each per round.

    Interleaving puts every variant under the same conditions: on a shared machine whose speed drifts
    over minutes, timing one variant's calls after another's puts the drift into their ratio.
    """
    from tqdm import tqdm

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(rounds), desc=desc, leave=False, disable=not desc):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    desc: str = "",
) -> dict[str, float]:
    """Median seconds per call of each function over the rounds of :func:`interleaved_samples`."""
    samples = interleaved_samples(fns, rounds, device, warmup, desc)
    return {k: statistics.median(v) for k, v in samples.items()}


def rounds_figures(dense: list[float], sparse: list[float], density: float) -> dict[str, float]:
    """Dense vs sparse from their :func:`interleaved_samples`: times, speedup, the ideal 1/density and
    efficiency = speedup x density from each side's best round (what each costs when nothing else
    runs: on a shared 2-core machine the same call varies by 20% between runs), medians beside them."""
    d, s = min(dense), min(sparse)
    dm, sm = statistics.median(dense), statistics.median(sparse)
    return {
        "dense_s": d,
        "sparse_s": s,
        "speedup": d / s,
        "ideal": 1 / density,
        "efficiency": d / s * density,
        "dense_median_s": dm,
        "sparse_median_s": sm,
        "efficiency_median": dm / sm * density,
        "rounds": len(sparse),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak memory of one call of ``fn`` in MiB: CUDA allocator peak on GPU, RSS high-water mark on CPU.

    On Linux the RSS high-water mark is reset before the call, so the figure belongs to this call
    (process baseline included); elsewhere it is the process peak so far.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    if _reset_rss_peak():
        fn()
        return _vm_hwm_mb()
    fn()
    return peak_rss_mb()


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file, then rename), with the umask's mode."""
    from .io import atomic_text

    atomic_text(path, json.dumps(data, indent=2, default=str))


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically as PNG, with the umask's mode."""
    from .io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def environment() -> dict[str, Any]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"torch": torch.__version__, "device": dev, "threads": torch.get_num_threads()}
    if dev == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    # allocator settings change CPU timings: glibc hands large blocks back to the OS and faults them in
    # again on the next call, which costs short (sparse) calls a visible share of their time
    alloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES")) or k == "LD_PRELOAD"}
    if alloc:
        info["allocator_env"] = alloc
    return info


# ``--backends`` choices of the engine benchmarks: the engine's backends, and ``gather-sdpa`` (gather with
# the native CPU kernel turned off, to time the two CPU kernels side by side)
ENGINE_BACKENDS: tuple[str, ...] = ("auto", "flex", "gather", "gather-sdpa", "sdpa")


def engine_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: Any, requested: str
) -> tuple[str, Callable[[], torch.Tensor], str | None]:
    """One ``--backends`` entry of an engine benchmark: (the backend that runs, the call to time, the CPU
    kernel a gather call runs, ``"native"`` or ``"sdpa"``, else ``None``). A missing native kernel is
    warned about once, here, so the benchmark's output says why."""
    from .ops import block_sparse_attention, native_cpu, resolve_backend
    from .ops.gather_attention import cpu_kernel

    if requested not in ENGINE_BACKENDS:
        raise ValueError(f"backend must be one of {list(ENGINE_BACKENDS)}, got {requested!r}")
    on_cpu = q.device.type == "cpu"
    if requested == "gather-sdpa":

        def fn() -> torch.Tensor:
            with native_cpu.disabled():
                return block_sparse_attention(q, k, v, bm, backend="gather")

        return "gather", fn, "sdpa" if on_cpu else None
    backend = resolve_backend(q, k, v, bm, requested)
    if backend == "gather" and on_cpu and q.dtype == torch.float32:
        native_cpu.kernel_or_warn()
    kernel = cpu_kernel(q) if backend == "gather" and on_cpu else None
    return backend, (lambda: block_sparse_attention(q, k, v, bm, backend=requested)), kernel



# ----- pipeline outputs and attention time inside a pipeline ------------------------------------------

PSNR_CAP_DB = 100.0  # identical outputs: PSNR is infinite; JSON has no infinity, so it is capped here


def output_array(out: Any) -> np.ndarray:
    """A pipeline's output as float64 in [0, 1]: ``(N, H, W, C)`` images or ``(N, F, H, W, C)`` videos.

    Takes ``images`` or ``frames`` as numpy, a torch tensor, or a list of arrays / PIL images; uint8 is
    scaled to [0, 1].
    """
    frames = getattr(out, "frames", None)
    arr = frames if frames is not None else getattr(out, "images", None)
    if arr is None:
        raise TypeError(f"the pipeline returned {type(out).__name__} without images or frames")
    if isinstance(arr, torch.Tensor):
        arr = arr.float().cpu().numpy()
    if isinstance(arr, list):
        arr = np.stack([np.asarray(a) for a in arr])
    arr = np.asarray(arr)
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _attention_modules(pipe_or_model: Any) -> list[nn.Module]:
    from .denoisers import denoisers
    from .processors.core import attention_modules

    return [m for _, model in denoisers(pipe_or_model) for m in attention_modules(model).values()]


@dataclass
class AttentionTime:
    """Wall time spent inside attention modules while :func:`time_attention` is active.

    Attributes:
        seconds: summed forward time of every attention module call.
        calls: the number of those calls.
        tokens: the distinct token counts of their ``hidden_states`` (sequence length, dim 1), sorted.
    """

    seconds: float = 0.0
    calls: int = 0
    tokens: list[int] = field(default_factory=list)


@contextlib.contextmanager
def time_attention(pipe_or_model: Any) -> Iterator[AttentionTime]:
    """Time every attention module's forward (CPU wall clock; on a GPU, synchronise first) while active.

    The hooks are prepended, so other forward hooks on the same modules (the output recorders of
    :func:`record_attention_outputs`) run outside the timed span.
    """
    timer = AttentionTime()
    seen: set[int] = set()
    starts: list[float] = []
    handles = []

    def pre(mod: nn.Module, args: Any, kwargs: Any) -> None:
        hs = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hs, torch.Tensor) and hs.dim() >= 2:
            seen.add(int(hs.shape[1]))
        starts.append(time.perf_counter())

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        timer.seconds += time.perf_counter() - starts.pop()
        timer.calls += 1

    for module in _attention_modules(pipe_or_model):
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(post, prepend=True))
    try:
        yield timer
    finally:
        for h in handles:
            h.remove()
        timer.tokens = sorted(seen)
