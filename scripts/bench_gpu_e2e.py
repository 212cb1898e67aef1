"""End to end at the real model sizes on a GPU (issue 26, deliverable 2): dense vs each method per denoising
step, the step amortised over the method's reference schedule, its Amdahl bound and peak memory.

Stages, in priority order (``--stage`` picks; each writes ``OUT_DIR/e2e_<stage>.json`` after every case
and ``e2e_<stage>.png`` at its end, so a run cut off by a time limit keeps what it measured):

* ``engine``: the block-sparse engine alone at 32k-128k tokens, 12 heads x 128: band masks at block
  densities 0.07-0.4, radial masks (Wan 480p frames, decay 0.2), Hilbert-local masks (text + HR + LR,
  block granularity) and a mask with 95% of its blocks kept; speedup over the card's best dense SDPA
  kernel and efficiency = speedup x block density.
* ``wan``: the Wan 2.1 T2V 1.3B transformer (30 blocks, 12 heads x 128) at 720p x 81 frames (21 x 45 x 80
  = 75,600 tokens) with ``radial`` at the reference settings (decay 0.2, first block dense, first 12 of 50
  steps dense); at 4x length (321 frames: 81 x 45 x 80 = 291,600 tokens) measured in full where the
  stage's time and memory allow, else projected from a 2-block model's measured blocks (``long.mode``).
* ``flux``: a FLUX.1-dev transformer (19 double + 38 single blocks, 24 heads x 128) at 4K and 2K with
  ``hilbert_local`` (block granularity) on the stage-2 sequence (text + HR + LR tokens of the 1K stage 1),
  amortised over the two-stage schedule (28 LR steps, then 18 HR steps).
* ``unet``: the SD 1.5 and SDXL UNets at 1024 px, CFG batch 2, with AgentSD (``agent``) under
  ``torch.compile`` regional compilation of the repeated blocks (every ``BasicTransformerBlock``), against
  compiled dense and, where tomesd imports, tomesd compiled the same way; median of >= 10 runs.

Models are built on the meta device from the real configs (written inline below), then ``to_empty`` on
the target device in ``--dtype`` (bf16) and filled with small random values there: nothing is initialised
on the CPU (the few non-persistent buffers, e.g. Wan's rotary tables, are computed by the constructor and
copied over). Timing does not depend on the values.

Per model and size the JSON has ``dense_s`` (stock processors under the fastest dense SDPA backend of the
card, chosen per shape among cuDNN / Flash / memory-efficient and named in ``sdpa``), ``method_s`` (the
method's step), ``free_s`` (the method's step with its attention product replaced by a no-op: what the
step would cost if the method's attention were free), ``schedule`` (the reference schedule's segments,
``amortized_speedup`` and ``amdahl_bound`` = dense total / free total) and peak memory
(``torch.cuda.max_memory_allocated``; on CPU the process's RSS high-water mark, which says less).

``--device cpu --tiny`` runs every stage at tiny sizes (few blocks, small grids) on a CPU in seconds: the
same code paths, figures of no meaning. What a CPU lacks (cuDNN, CUDA memory, inductor in --tiny) is
said in each JSON's ``notes``.

    python scripts/bench_gpu_e2e.py --stage engine wan flux unet --out-dir outputs/e2e     # on the GPU
    python scripts/bench_gpu_e2e.py --stage wan --wan-long full                            # 4x measured
    python scripts/bench_gpu_e2e.py --device cpu --tiny --stage engine wan flux unet       # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffattn.benchmark import (
    DTYPES,
    engine_call,
    environment,
    interleaved_samples,
    measure_peak,
    rounds_figures,
    save_figure,
    sync,
    timeit,
    write_json,
)

STAGES = ("engine", "wan", "flux", "unet")
SDPA_NAMES = ("cudnn", "flash", "efficient", "math")

# ----- reference schedules ---------------------------------------------------------------------------------
WAN_STEPS, WAN_DENSE_STEPS, WAN_DENSE_LAYERS, WAN_DECAY = 50, 12, 1, 0.2  # radial's reference for Wan 2.1
FLUX_STEPS, FLUX_HR_STEPS = 28, 18  # HighResPipeline's defaults: 28 LR steps (stage 1), then 18 HR steps
UNET_STEPS = 50  # SD's usual 50 steps; AgentSD's default schedule: phase 1 for 40% of them, phase 2 after
TOME_RATIO = 0.4  # ToMe ratio of both AgentSD phases; tomesd runs at the same ratio


# ----- the real configs, written inline ------------------------------------------------------------------


def wan_config(tiny: bool, num_layers: int | None = None) -> dict[str, Any]:
    """Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json)."""
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    if tiny:
        cfg.update(num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2)
    if num_layers is not None:
        cfg["num_layers"] = num_layers
    return cfg


def flux_config(tiny: bool) -> dict[str, Any]:
    """FLUX.1-dev (black-forest-labs/FLUX.1-dev transformer/config.json)."""
    cfg = dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    if tiny:
        cfg.update(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12))
    return cfg


def sd15_config(tiny: bool) -> dict[str, Any]:
    """Stable Diffusion 1.5 UNet (stable-diffusion-v1-5 unet/config.json)."""
    if tiny:
        return dict(
            sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
    return dict(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    )


def sdxl_config(tiny: bool) -> dict[str, Any]:
    """SDXL base 1.0 UNet (stable-diffusion-xl-base-1.0 unet/config.json)."""
    if tiny:
        return dict(
            sample_size=32, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
            transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8), cross_attention_dim=32,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8,
        )
    return dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )


# ----- building on the device --------------------------------------------------------------------------------


def build_on_device(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``cls(**config)`` with its parameters on the meta device, then ``to_empty`` on ``device`` in ``dtype``
    (``cls._keep_in_fp32_modules`` stay fp32, as ``from_pretrained(torch_dtype=...)`` keeps them) and a fast
    random init there. Buffers the constructor computes (rotary tables) are small: they are built with the
    module, kept, and copied to the device after ``to_empty``."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def target(name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point():
            return t.dtype
        return torch.float32 if any(k in name.split(".") for k in keep) else dtype

    buffers = {}
    for mod_name, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is not None:
                full = f"{mod_name}.{name}" if mod_name else name
                if b.is_meta:
                    raise RuntimeError(f"buffer {full} was built on the meta device: cannot recover its values")
                buffers[(module, name)] = b.to(target(full, b))
        for name, p in module._parameters.items():
            if p is not None:
                full = f"{mod_name}.{name}" if mod_name else name
                module._parameters[name] = nn.Parameter(p.to(target(full, p)), requires_grad=False)
    model.to_empty(device=device)
    with torch.no_grad():
        for (module, name), b in buffers.items():
            module._buffers[name] = b.to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        for name, p in model.named_parameters():
            random_init_(name, p, gen)
    return model.eval().requires_grad_(False)


def random_init_(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """Small random values that keep activations O(1) through deep stacks: weight matrices and kernels
    N(0, 0.5 / sqrt(fan_in)), biases 0, norm scales 1, other tensors (modulation tables) N(0, 0.02)."""
    if name.endswith("bias"):
        p.zero_()
    elif name.endswith("weight") and p.dim() >= 2:
        p.normal_(0.0, 0.5 / math.sqrt(max(1, p[0].numel())), generator=gen)
    elif name.endswith("weight"):
        p.fill_(1.0)
    else:
        p.normal_(0.0, 0.02, generator=gen)


def randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random data made on ``device`` (never on the CPU first)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


# ----- the dense baseline: the card's fastest SDPA kernel ------------------------------------------------------


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def pick_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Time dense SDPA on ``q, k, v`` with each backend alone; the fastest is the baseline.

    On CUDA the candidates are cuDNN, Flash and memory-efficient (math would materialise the score
    matrix); on CPU those that exist there, and math."""
    from torch.nn.attention import sdpa_kernel

    device = q.device
    names = ("cudnn", "flash", "efficient") if device.type == "cuda" else SDPA_NAMES
    backends = _sdpa_backends()
    out: dict[str, Any] = {"shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch."), "candidates": {}}
    for name in names:
        try:
            with sdpa_kernel([backends[name]]), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                t = timeit(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
            out["candidates"][name] = {"seconds": t}
        except RuntimeError as e:  # "No available kernel": not on this device / dtype / shape
            out["candidates"][name] = {"error": str(e).strip().splitlines()[0][:200]}
    timed = {n: c["seconds"] for n, c in out["candidates"].items() if "seconds" in c}
    if not timed:
        raise RuntimeError(f"no SDPA backend runs {tuple(q.shape)} {q.dtype} on {device}: {out['candidates']}")
    out["chosen"] = min(timed, key=timed.get)
    out["seconds"] = timed[out["chosen"]]
    return out


@contextlib.contextmanager
def sdpa_priority(chosen: str) -> Iterator[None]:
    """Every SDPA call inside prefers ``chosen``; the other backends stay as fallbacks for shapes it
    cannot run (cross-attention, odd head sizes), math last."""
    from torch.nn.attention import sdpa_kernel

    backends = _sdpa_backends()
    order = [backends[chosen]] + [backends[n] for n in SDPA_NAMES if n != chosen]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: the set, in torch's own order
        ctx = sdpa_kernel(order)
    with ctx:
        yield


# ----- timing ---------------------------------------------------------------------------------------------


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, stat: str = "median",
            warmup: int = 0) -> dict[str, Any]:
    """First call (compiles, builds masks), ``warmup`` more untimed calls, then ``repeats`` timed calls:
    ``seconds`` (their ``stat``, median or min), median and best, and the peak memory of the timed calls."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    samples: list[float] = []

    def timed() -> None:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync(device)
            samples.append(time.perf_counter() - t)

    peak = measure_peak(timed, device)
    finite = bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else None
    seconds = statistics.median(samples) if stat == "median" else min(samples)
    return {"seconds": seconds, "median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples,
            "first_call_s": first, "peak_mb": peak, "output_finite": finite}


def schedule_figures(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """A reference schedule as segments ``{name, steps, dense_s, method_s, free_s}``: the totals, the
    amortised speed-up (dense total / method total) and its Amdahl bound (dense total / free total: the
    method's steps with its attention free). The amortised figure lies between the segments' own
    speed-ups (1 for the dense steps); it stays under the bound as long as no step runs faster than its
    free version."""
    dense = sum(s["steps"] * s["dense_s"] for s in segments)
    method = sum(s["steps"] * s["method_s"] for s in segments)
    free = sum(s["steps"] * s["free_s"] for s in segments)
    return {
        "segments": segments,
        "segment_speedups": [s["dense_s"] / s["method_s"] for s in segments],
        "dense_total_s": dense,
        "method_total_s": method,
        "free_total_s": free,
        "amortized_speedup": dense / method,
        "amdahl_bound": dense / free,
    }


# ----- runs and their JSON ------------------------------------------------------------------------------


@dataclass
class Run:
    """One stage: arguments, device, the JSON record it rewrites after every case."""

    args: argparse.Namespace
    stage: str
    device: torch.device
    dtype: torch.dtype
    record: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    @property
    def stat(self) -> str:
        """The figure of a variant's timed calls: their median on a GPU, their best on a CPU (other load only
        adds time there, and a shared CPU has plenty)."""
        return self.args.stat or ("median" if self.device.type == "cuda" else "min")

    @property
    def path(self) -> Path:
        return Path(self.args.out_dir) / f"e2e_{self.stage}"

    def note(self, text: str) -> None:
        if text not in self.record["notes"]:
            self.record["notes"].append(text)

    def save(self, complete: bool = False) -> None:
        self.record["complete"] = complete
        self.record["elapsed_s"] = time.perf_counter() - self.t0
        write_json(self.path.with_suffix(".json"), self.record)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def repeats(self, minimum: int = 1) -> int:
        """Timed calls per variant: ``--repeats``, else 2 with --tiny, 5 for the engine, 3 for the models."""
        base = self.args.repeats or (2 if self.tiny else 5 if self.stage == "engine" else 3)
        return max(minimum, base)


def device_info(device: torch.device) -> dict[str, Any]:
    info = environment()
    info["device"] = str(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def cpu_notes(run: Run) -> None:
    if run.device.type != "cuda":
        run.note("CPU run: cuDNN and memory-efficient SDPA do not exist here (their errors are in 'sdpa'); the "
                 "baseline is the fastest CPU backend. Peak memory is the process's RSS high-water mark, not "
                 "torch.cuda.max_memory_allocated. The figures mean nothing for a GPU.")
    if run.tiny:
        run.note("--tiny: few blocks, small grids and heads: exercises the code paths only.")


# ----- method patches: the step, and the step with its attention free ---------------------------------------


def _noop_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: Any, backend: str = "auto") -> torch.Tensor:
    return q


@contextlib.contextmanager
def applied(model: nn.Module, method: str, free: bool = False, **options: Any) -> Iterator[Any]:
    """``diffattn.apply(model, method, **options)``; with ``free`` the engine call of every processor it set
    returns its query (a no-op attention product): the method's step with its attention for free, the floor
    of its Amdahl bound (projections, rotary embeddings, permutations and dense layers still run)."""
    import diffattn

    with diffattn.apply(model, method, **options) as patch:
        if free:
            for _, _, _, _, new in patch.saved:
                new.sparse_attention = _noop_sparse
        yield patch


def patch_facts(patch: Any) -> dict[str, Any]:
    """Layers patched, and backend / block density of the last engine call per layer."""
    described = {}
    for _, name, _, _, new in patch.saved:
        describe = getattr(new, "describe", None)
        described[name] = describe() if callable(describe) else ""
    seen = sorted({d for d in described.values() if d})
    return {"layers": len(patch.saved), "headline": patch.headline(), "last_calls": seen[:8]}


# ----- stage: engine -----------------------------------------------------------------------------------------


def band_bitmap(n_blocks: int, density: float) -> torch.Tensor:
    w = max(0, round((density * n_blocks - 1) / 2))
    i = torch.arange(n_blocks)
    return (i[:, None] - i[None, :]).abs() <= w


def random_bitmap(n_blocks: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_blocks, n_blocks, generator=g) < density) | torch.eye(n_blocks, dtype=torch.bool)


def engine_masks(n: int, run: Run) -> list[tuple[str, dict[str, Any], Any]]:
    """(family, facts, BlockMask) for a sequence of ``n`` tokens."""
    from diffattn.masks import local_block_mask, radial_block_mask
    from diffattn.ops import BlockMask

    a, dev, bs = run.args, run.device, run.args.block_size
    nb = -(-n // bs)
    out = []
    for d in a.densities:
        out.append(("band", {"target_density": d}, BlockMask(band_bitmap(nb, d).to(dev), n, n, bs)))
    # radial: Wan 480p frames (30 x 52 tokens), as many frames as fit in n
    tpf = 64 if run.tiny else 1560
    frames = max(2, n // tpf)
    out.append(("radial", {"frames": frames, "tokens_per_frame": tpf, "decay_factor": WAN_DECAY},
                radial_block_mask(frames, tpf, decay_factor=WAN_DECAY, block_size=bs, sink=True, device=dev)))
    # Hilbert-local: 512 text + side^2 HR + (side / 4)^2 LR tokens, about n
    text = 16 if run.tiny else 512
    side = 4 * max(2, int(math.sqrt((n - text) / (1 + 1 / 16)) // 4))
    for radius in a.radii:
        bm = local_block_mask(side, side, radius, "hilbert", bs, granularity="block", text_len=text,
                              lr_height=side // 4, lr_width=side // 4, device=dev)
        out.append(("hilbert_local", {"grid": side, "radius": radius, "text": text, "lr_grid": side // 4}, bm))
    out.append(("kept95", {"target_density": 0.95}, BlockMask(random_bitmap(nb, 0.95).to(dev), n, n, bs)))
    return out


def stage_engine(run: Run) -> None:
    a = run.args
    rows: list[dict[str, Any]] = run.record.setdefault("rows", [])
    for n_target in a.lengths:
        q, k, v = (randn((1, a.heads, n_target, a.head_dim), run.device, run.dtype, seed) for seed in range(3))
        sdpa = pick_sdpa(q, k, v, run.repeats())
        run.record.setdefault("sdpa", []).append({"tokens": n_target, **sdpa})
        run.save()
        with sdpa_priority(sdpa["chosen"]), torch.no_grad():
            dense = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            peak_dense = measure_peak(dense, run.device)
            for family, facts, bm in engine_masks(n_target, run):
                n = bm.q_len  # radial and Hilbert-local masks round to whole frames / grids: n <= n_target
                if n <= n_target:
                    qq, kk, vv = (t[:, :, :n] for t in (q, k, v))
                else:
                    qq, kk, vv = (randn((1, a.heads, n, a.head_dim), run.device, run.dtype, s) for s in range(3))
                dense_n = (lambda qq=qq, kk=kk, vv=vv: F.scaled_dot_product_attention(qq, kk, vv))  # noqa: E731
                backend, fn, _ = engine_call(qq, kk, vv, bm, a.engine_backend)
                t = time.perf_counter()
                fn()
                sync(run.device)
                first = time.perf_counter() - t
                times = interleaved_samples({"dense": dense_n, "sparse": fn}, run.repeats(), run.device, warmup=1)
                density = bm.density()
                figures = rounds_figures(times["dense"], times["sparse"], density)
                row = {"tokens": n, "family": family, **facts, "block_density": density, "backend": backend,
                       "sdpa_backend": sdpa["chosen"], **figures, "first_call_s": first,
                       "peak_mb_dense": peak_dense if n == n_target else None,
                       "peak_mb_sparse": measure_peak(fn, run.device)}
                if family == "kept95":
                    # the target: within 10% of 0.95x the dense time
                    row["kept95_ratio_to_0.95_dense"] = figures["sparse_s"] / (0.95 * figures["dense_s"])
                rows.append(row)
                run.save()
                print(f"[engine] {n:7d} tokens {family:13s} density={density:.3f} backend={backend} "
                      f"dense={figures['dense_s'] * 1e3:8.2f}ms sparse={figures['sparse_s'] * 1e3:8.2f}ms "
                      f"speedup={figures['speedup']:5.2f}x efficiency={figures['efficiency']:.2f}", flush=True)
        del q, k, v
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


# ----- stage: wan ------------------------------------------------------------------------------------------


def wan_latent(video_frames: int, height_px: int, width_px: int) -> tuple[int, int, int]:
    """Latent frames, height and width of a Wan video (VAE: 4x in time, 8x in space)."""
    return (video_frames - 1) // 4 + 1, height_px // 8, width_px // 8


class BlockTimer:
    """Per-block seconds of one forward, from hooks around ``blocks[i]`` (CUDA events on a GPU)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.device, self.marks, self.handles = device, {}, []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._mark(i, 0)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._mark(i, 1)))

    def _mark(self, i: int, end: int) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[(i, end)] = ev
        else:
            self.marks[(i, end)] = time.perf_counter()

    def seconds(self) -> list[float]:
        sync(self.device)
        n = len(self.handles) // 2
        if self.device.type == "cuda":
            return [self.marks[(i, 0)].elapsed_time(self.marks[(i, 1)]) / 1e3 for i in range(n)]
        return [self.marks[(i, 1)] - self.marks[(i, 0)] for i in range(n)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def wan_inputs(run: Run, latent: tuple[int, int, int], cfg: dict[str, Any]) -> dict[str, Any]:
    f, h, w = latent
    text = 16 if run.tiny else 512
    return dict(
        hidden_states=randn((1, cfg["in_channels"], f, h, w), run.device, run.dtype, 1),
        timestep=torch.tensor([500], device=run.device),
        encoder_hidden_states=randn((1, text, cfg["text_dim"]), run.device, run.dtype, 2),
        return_dict=False,
    )


def radial_options(run: Run) -> dict[str, Any]:
    return dict(decay_factor=WAN_DECAY, dense_layers=WAN_DENSE_LAYERS, block_size=run.args.block_size,
                backend=run.args.engine_backend)


def wan_variants(run: Run, model: nn.Module, inputs: dict[str, Any], sdpa: str, per_block: bool) -> dict[str, Any]:
    """dense / radial / radial-free forwards of ``model``: times, peak memory, per-block times."""
    out: dict[str, Any] = {}
    for name in ("dense", "method", "free"):
        out[name] = wan_variant(run, model, inputs, sdpa, name, per_block)
        print(f"[wan] {name:6s} {out[name]['seconds']:.4f}s (first call {out[name]['first_call_s']:.2f}s, "
              f"peak {out[name]['peak_mb']:.0f} MiB)", flush=True)
        run.save()
    return out


def wan_variant(run: Run, model: nn.Module, inputs: dict[str, Any], sdpa: str, name: str,
                per_block: bool) -> dict[str, Any]:
    timer = BlockTimer(model.blocks, run.device) if per_block else None
    blocks: list[list[float]] = []

    def call() -> torch.Tensor:
        res = model(**inputs)[0]
        if timer is not None:
            blocks.append(timer.seconds())
        return res

    try:
        with sdpa_priority(sdpa), torch.no_grad():
            if name == "dense":
                res = measure(call, run.device, run.repeats(), run.stat)
            else:
                with applied(model, "radial", free=name == "free", **radial_options(run)) as patch:
                    res = measure(call, run.device, run.repeats(), run.stat)
                    res["patch"] = patch_facts(patch)
    finally:
        if timer is not None:
            timer.remove()
    if blocks:
        timed = blocks[1:] or blocks  # the timed calls (the first one compiled / built masks)
        pick = statistics.median if run.stat == "median" else min
        res["block_s"] = [pick(col) for col in zip(*timed, strict=True)]
    return res


def wan_schedule(dense_s: float, method_s: float, free_s: float) -> dict[str, Any]:
    sparse = WAN_STEPS - WAN_DENSE_STEPS
    return schedule_figures([
        {"name": f"first {WAN_DENSE_STEPS} steps dense", "steps": WAN_DENSE_STEPS, "dense_s": dense_s,
         "method_s": dense_s, "free_s": dense_s},
        {"name": f"{sparse} radial steps", "steps": sparse, "dense_s": dense_s, "method_s": method_s, "free_s": free_s},
    ])


def stage_wan(run: Run) -> None:
    from diffusers import WanTransformer3DModel

    a = run.args
    if run.tiny:
        video, (hp, wp), long_video = 9, (256, 256), 33
    else:
        video, (hp, wp), long_video = 81, (720, 1280), 321
    cfg = wan_config(run.tiny)
    latent = wan_latent(video, hp, wp)
    pt, ph, pw = cfg["patch_size"]
    grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
    tokens = grid[0] * grid[1] * grid[2]
    heads, head_dim, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    run.record.update(model="Wan 2.1 T2V 1.3B" + (" (tiny)" if run.tiny else ""), config=cfg,
                      schedule_ref={"steps": WAN_STEPS, "dense_steps": WAN_DENSE_STEPS,
                                    "dense_layers": WAN_DENSE_LAYERS, "decay_factor": WAN_DECAY},
                      cfg_note="WanPipeline runs cond and uncond as two batch-1 forwards per step: times are per "
                               "forward (batch 1); a step is two of them, the ratios are the same")
    t = time.perf_counter()
    model = build_on_device(WanTransformer3DModel, cfg, run.device, run.dtype)
    run.record["build_s"] = time.perf_counter() - t
    qkv = [randn((1, heads, tokens, head_dim), run.device, run.dtype, s) for s in range(3)]
    sdpa = pick_sdpa(*qkv, run.repeats())
    del qkv
    run.record["sdpa"] = sdpa
    main = {"video_frames": video, "size_px": [hp, wp], "latent": list(latent), "token_grid": list(grid),
            "tokens": tokens}
    run.record["main"] = main
    run.save()
    main.update(wan_variants(run, model, wan_inputs(run, latent, cfg), sdpa["chosen"], per_block=False))
    d, m, fr = main["dense"]["seconds"], main["method"]["seconds"], main["free"]["seconds"]
    main.update(sparse_step_speedup=d / m, step_bound=d / fr, attention_share_replaced=1 - fr / d,
                schedule=wan_schedule(d, m, fr))
    run.save()
    print(f"[wan] {tokens} tokens: sparse step {d / m:.2f}x (bound {d / fr:.2f}x), amortised "
          f"{main['schedule']['amortized_speedup']:.2f}x (bound {main['schedule']['amdahl_bound']:.2f}x)", flush=True)

    # ----- 4x length: measured in full where time and memory allow, else projected from 2 measured blocks
    long_latent = wan_latent(long_video, hp, wp)
    long_tokens = long_latent[0] // pt * grid[1] * grid[2]
    scale = long_tokens / tokens
    share_dense = main["attention_share_replaced"]
    est_dense = d * ((1 - share_dense) * scale + share_dense * scale * scale)
    est_run = (1 + run.repeats()) * est_dense * 2.2  # dense + radial (~0.7x) + free (~0.5x): an estimate
    mode, why = a.wan_long, "asked for"
    if run.device.type == "cuda":
        total_mb = torch.cuda.get_device_properties(run.device).total_memory / 2**20
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        est_peak = weights_mb + (main["dense"]["peak_mb"] - weights_mb) * scale
    else:
        total_mb, est_peak = float("inf"), 0.0
    if mode == "auto":
        if est_peak > 0.9 * total_mb:
            mode, why = "project", f"estimated peak {est_peak:.0f} MiB > 90% of {total_mb:.0f} MiB"
        elif est_run > run.left_s():
            mode, why = "project", f"a full measurement takes about {est_run:.0f} s, {run.left_s():.0f} s left of --budget-s"
        else:
            mode, why = "full", f"estimated {est_run:.0f} s and {est_peak:.0f} MiB fit"
    long: dict[str, Any] = {"video_frames": long_video, "latent": list(long_latent), "tokens": long_tokens,
                            "mode": mode, "why": mode_why(mode, why), "estimated_dense_s": est_dense}
    run.record["long"] = long
    run.save()
    if mode == "skip":
        return
    if mode == "full":
        long.update(wan_variants(run, model, wan_inputs(run, long_latent, cfg), sdpa["chosen"], per_block=False))
        ld, lm, lf = (long[k]["seconds"] for k in ("dense", "method", "free"))
    else:
        # a model with the first 2 blocks of the same width: block 0 stays dense (dense_layers=1), block 1 is
        # radial; every further block costs what block 1 costs
        del model
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        small = build_on_device(WanTransformer3DModel, wan_config(run.tiny, num_layers=2), run.device, run.dtype)
        long.update(wan_variants(run, small, wan_inputs(run, long_latent, cfg), sdpa["chosen"], per_block=True))
        proj = {}
        for name in ("dense", "method", "free"):
            blocks = long[name]["block_s"]
            outside = long[name]["seconds"] - sum(blocks)
            proj[name] = outside + blocks[0] + (layers - 1) * blocks[1]
            long[name]["projected_s"] = proj[name]
        ld, lm, lf = proj["dense"], proj["method"], proj["free"]
        long["projection"] = (f"measured on 2 blocks at {long_tokens} tokens: step = outside the blocks + block 0 "
                              f"(dense layer) + {layers - 1} x block 1, per variant")
    long.update(sparse_step_speedup=ld / lm, step_bound=ld / lf, attention_share_replaced=1 - lf / ld,
                schedule=wan_schedule(ld, lm, lf))
    run.save()
    print(f"[wan] 4x length ({long_tokens} tokens, {mode}): sparse step {ld / lm:.2f}x (bound {ld / lf:.2f}x), "
          f"amortised {long['schedule']['amortized_speedup']:.2f}x", flush=True)


def mode_why(mode: str, why: str) -> str:
    if mode == "full":
        return f"measured on the full model ({why})"
    if mode == "project":
        return f"projected from 2 measured blocks ({why})"
    return f"skipped ({why})"


# ----- stage: flux -----------------------------------------------------------------------------------------


def flux_ids(h: int, w: int, device: torch.device, scale: int = 1) -> torch.Tensor:
    """FluxPipeline's latent image ids (0, row, col) of an ``h x w`` token grid, positions times ``scale``."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None] * scale
    ids[..., 2] = torch.arange(w, device=device)[None, :] * scale
    return ids.reshape(h * w, 3)


def flux_inputs(run: Run, cfg: dict[str, Any], hr: int, lr: int, ratio: int) -> dict[str, Any]:
    """The stage-2 call of HighResPipeline: HR latents + LR tokens (ids on the HR RoPE grid), or, with
    ``hr == 0``, a plain stage-1 call of the ``lr x lr`` grid."""
    text = 16 if run.tiny else 512
    dev = run.device
    ids = flux_ids(lr, lr, dev) if not hr else torch.cat([flux_ids(hr, hr, dev), flux_ids(lr, lr, dev, ratio)])
    return dict(
        hidden_states=randn((1, ids.shape[0], cfg["in_channels"]), dev, run.dtype, 1),
        encoder_hidden_states=randn((1, text, cfg["joint_attention_dim"]), dev, run.dtype, 2),
        pooled_projections=randn((1, cfg["pooled_projection_dim"]), dev, run.dtype, 3),
        timestep=torch.full((1,), 0.5, device=dev, dtype=run.dtype),
        guidance=torch.full((1,), 3.5, device=dev, dtype=torch.float32),
        img_ids=ids, txt_ids=torch.zeros(text, 3, device=dev), return_dict=False,
    )


def stage_flux(run: Run) -> None:
    from diffusers import FluxTransformer2DModel

    a = run.args
    cfg = flux_config(run.tiny)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    # token sides (px / 16): LR = the 1K stage 1; HR 2K (ratio 2) and 4K (ratio 4)
    lr = 8 if run.tiny else 64
    sizes = [(2, 2 * lr), (4, 4 * lr)]
    if a.flux_sizes and not run.tiny:
        sizes = [s for s in sizes if s[1] * 16 in a.flux_sizes]
    opts = dict(granularity="block", radius=4 if run.tiny else 8, block_size=a.block_size,
                backend=a.engine_backend)
    run.record.update(model="FLUX.1-dev" + (" (tiny)" if run.tiny else ""), config=cfg,
                      schedule_ref={"lr_steps": FLUX_STEPS, "hr_steps": FLUX_HR_STEPS, "options": opts},
                      cfg_note="FLUX.1-dev is guidance-distilled: one batch-1 forward per step")
    t = time.perf_counter()
    model = build_on_device(FluxTransformer2DModel, cfg, run.device, run.dtype)
    run.record["build_s"] = time.perf_counter() - t
    text = 16 if run.tiny else 512

    # stage 1: the LR step, dense, the same with or without the method
    n1 = lr * lr + text
    sdpa1 = pick_sdpa(*(randn((1, heads, n1, head_dim), run.device, run.dtype, s) for s in range(3)), run.repeats())
    stage1_inputs = flux_inputs(run, cfg, 0, lr, 1)
    with sdpa_priority(sdpa1["chosen"]), torch.no_grad():
        stage1 = measure(lambda: model(**stage1_inputs)[0], run.device, run.repeats(), run.stat)
    run.record["stage1"] = {"grid": lr, "tokens": n1, "sdpa": sdpa1, "dense": stage1}
    run.save()
    print(f"[flux] stage 1 ({lr}x{lr} tokens + text): {stage1['seconds']:.4f}s", flush=True)
    results = run.record.setdefault("sizes", [])
    for ratio, hr in sizes:
        entry: dict[str, Any] = {"px": hr * 16, "hr_grid": hr, "lr_grid": lr, "ratio": ratio,
                                 "tokens": hr * hr + lr * lr + text}
        results.append(entry)
        flux_size(run, model, cfg, entry, opts, stage1["seconds"])
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def flux_size(run: Run, model: nn.Module, cfg: dict[str, Any], entry: dict[str, Any], opts: dict[str, Any],
              stage1_s: float) -> None:
    """Dense / hilbert_local / free stage-2 steps at one HR size, and the two-stage schedule."""
    heads, head_dim, n, hr = cfg["num_attention_heads"], cfg["attention_head_dim"], entry["tokens"], entry["hr_grid"]
    entry["sdpa"] = sdpa = pick_sdpa(*(randn((1, heads, n, head_dim), run.device, run.dtype, s)
                                       for s in range(3)), run.repeats())
    run.save()
    inputs = flux_inputs(run, cfg, hr, entry["lr_grid"], entry["ratio"])

    def call() -> torch.Tensor:
        return model(**inputs)[0]

    for name in ("dense", "method", "free"):
        with sdpa_priority(sdpa["chosen"]), torch.no_grad():
            if name == "dense":
                entry[name] = measure(call, run.device, run.repeats(), run.stat)
            else:
                with applied(model, "hilbert_local", free=name == "free", lr_ratio=entry["ratio"], **opts) as patch:
                    entry[name] = measure(call, run.device, run.repeats(), run.stat)
                    entry[name]["patch"] = patch_facts(patch)
        print(f"[flux] {hr * 16}px {name:6s} {entry[name]['seconds']:.4f}s "
              f"(first call {entry[name]['first_call_s']:.2f}s, peak {entry[name]['peak_mb']:.0f} MiB)", flush=True)
        run.save()
    d, m, fr = (entry[k]["seconds"] for k in ("dense", "method", "free"))
    entry.update(sparse_step_speedup=d / m, step_bound=d / fr, attention_share_replaced=1 - fr / d,
                 schedule=schedule_figures([
                     {"name": f"stage 1: {FLUX_STEPS} LR steps (dense)", "steps": FLUX_STEPS, "dense_s": stage1_s,
                      "method_s": stage1_s, "free_s": stage1_s},
                     {"name": f"stage 2: {FLUX_HR_STEPS} HR steps", "steps": FLUX_HR_STEPS, "dense_s": d,
                      "method_s": m, "free_s": fr},
                 ]))
    run.save()
    print(f"[flux] {hr * 16}px ({n} tokens): stage-2 step {d / m:.2f}x (bound {d / fr:.2f}x), two-stage run "
          f"{entry['schedule']['amortized_speedup']:.2f}x", flush=True)


# ----- stage: unet ----------------------------------------------------------------------------------------


class UNetCall:
    """The UNet's call with positional ``sample, timestep, encoder_hidden_states`` (tomesd's hook reads the
    sample from the positional arguments)."""

    def __init__(self, run: Run, cfg: dict[str, Any], px: int, sdxl: bool) -> None:
        lat = px // 8
        text = 7 if run.tiny else 77
        dev, dt = run.device, run.dtype
        self.args = (randn((2, 4, lat, lat), dev, dt, 1), torch.tensor([500.0, 500.0], device=dev),
                     randn((2, text, cfg["cross_attention_dim"]), dev, dt, 2))
        self.kwargs: dict[str, Any] = {"return_dict": False}
        if sdxl:
            text_embeds = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            time_ids = torch.tensor([[px, px, 0, 0, px, px]] * 2, device=dev, dtype=dt)
            self.kwargs["added_cond_kwargs"] = {"text_embeds": randn((2, text_embeds), dev, dt, 3), "time_ids": time_ids}

    def __call__(self, unet: nn.Module) -> torch.Tensor:
        return unet(*self.args, **self.kwargs)[0]


class FreeLayer:
    """A processor whose layer costs nothing: returns its input (the floor of any method on that layer)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def tomesd_module(unet: nn.Module, inputs: UNetCall) -> tuple[Any | None, str]:
    """tomesd if it imports and patches this UNet (the output changes, and comes back on removal)."""
    try:
        import tomesd
    except ImportError:
        return None, "tomesd is not installed: no tomesd baseline"
    try:
        with torch.no_grad():
            base = inputs(unet)
            tomesd.apply_patch(unet, ratio=TOME_RATIO)
            try:
                merged = inputs(unet)
            finally:
                tomesd.remove_patch(unet)
    except Exception as e:  # an incompatible diffusers: say so
        return None, f"tomesd fails with this diffusers ({type(e).__name__}: {e}): no tomesd baseline"
    if torch.equal(merged, base):
        return None, "tomesd did not change this UNet's output: no tomesd baseline"
    return tomesd, f"tomesd {getattr(tomesd, '__version__', '')} at ratio {TOME_RATIO}".replace("  ", " ")


def compile_regions(unet: nn.Module, backend: str) -> int:
    """Regional compilation: ``module.compile()`` on every repeated block (``BasicTransformerBlock``, also
    when tomesd has swapped its class for a subclass). Returns how many."""
    from diffusers.models.attention import BasicTransformerBlock

    if backend == "none":
        return 0
    # one graph per UNet level and attention kind: more than dynamo's default 8 recompiles of one frame
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    count = 0
    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            m.compile(backend=backend)
            count += 1
    return count


def uncompile(unet: nn.Module) -> None:
    for m in unet.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def stage_unet(run: Run) -> None:
    from diffusers import UNet2DConditionModel

    from diffattn.processors.agent import DEFAULT_SCHEDULE

    a = run.args
    phase1, phase2 = DEFAULT_SCHEDULE[0][1], DEFAULT_SCHEDULE[1][1]
    w1 = DEFAULT_SCHEDULE[0][0]
    steps1 = round(UNET_STEPS * w1)
    backend = a.compile_backend or ("inductor" if run.device.type == "cuda" else "eager")
    if run.device.type != "cuda" and backend == "eager":
        run.note("compile backend 'eager' (dynamo only, no inductor codegen): the graph breaks and regional "
                 "compilation run, the kernels are eager")
    run.record.update(compile={"backend": backend, "regions": "every BasicTransformerBlock (module.compile())"},
                      schedule_ref={"steps": UNET_STEPS, "phase1_steps": steps1, "phase1": vars(phase1),
                                    "phase2": vars(phase2), "tome_ratio": TOME_RATIO},
                      cfg_note="SD pipelines run cond + uncond as one batch-2 forward: times are per step")
    models = run.record.setdefault("models", [])
    px = 128 if run.tiny else 1024
    for name, cfg_fn, sdxl in (("SD 1.5", sd15_config, False), ("SDXL", sdxl_config, True)):
        if a.unets and name.replace(" ", "").lower() not in a.unets:
            continue
        cfg = cfg_fn(run.tiny)
        size = 256 if run.tiny and sdxl else px
        entry: dict[str, Any] = {"model": name, "px": size, "config": cfg, "variants": {}}
        models.append(entry)
        unet_model(run, entry, UNet2DConditionModel, backend, sdxl, (phase1, phase2), steps1)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def unet_model(run: Run, entry: dict[str, Any], cls: type, backend: str, sdxl: bool, phases: tuple[Any, Any],
               steps1: int) -> None:
    """One UNet: compiled dense, AgentSD per phase, the agent layers free, tomesd; the phase schedule."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    import diffattn

    cfg, size = entry["config"], entry["px"]
    t = time.perf_counter()
    unet = build_on_device(cls, cfg, run.device, run.dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    entry["build_s"] = time.perf_counter() - t
    inputs = UNetCall(run, cfg, size, sdxl)
    # the layers AgentSD takes: its processors that ran a phase on an eager forward
    tokens: dict[nn.Module, int] = {}

    def note_tokens(m: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens.setdefault(m, args[0].shape[1])

    with applied(unet, "agent") as patch, torch.no_grad():
        hooks = [layer.register_forward_pre_hook(note_tokens, with_kwargs=True) for _, _, layer, _, _ in patch.saved]
        inputs(unet)
        for h in hooks:
            h.remove()
        agent_layers = [layer for _, _, layer, _, new in patch.saved if getattr(new, "last_phase", None)]
    if not agent_layers:
        raise RuntimeError(f"agent applied to no layer of the {entry['model']} UNet at {size} px")
    # the dense SDPA backend: picked on the first such layer's shape (tokens of its level, its heads)
    first = agent_layers[0]
    n, head_dim = tokens[first], first.to_q.out_features // first.heads
    entry["sdpa"] = sdpa = pick_sdpa(*(randn((2, first.heads, n, head_dim), run.device, run.dtype, s)
                                       for s in range(3)), run.repeats())
    entry["agent_layers"] = len(agent_layers)
    entry["agent_layer_tokens"] = n
    tome, status = tomesd_module(unet, inputs)
    entry["tomesd"] = status
    run.note(status)
    run.save()

    def call() -> torch.Tensor:
        return inputs(unet)

    def variant(label: str, enter: Callable[[], Any], leave: Callable[[Any], None]) -> None:
        state = enter()
        try:
            regions = compile_regions(unet, backend)
            with sdpa_priority(sdpa["chosen"]), torch.no_grad():
                # two more untimed calls: dynamo compiles a few frames around the graph breaks on the second
                res = measure(call, run.device, run.repeats(1 if run.tiny else 10), run.stat, warmup=2)
            res["compiled_regions"] = regions
            entry["variants"][label] = res
        finally:
            uncompile(unet)
            leave(state)
        print(f"[unet] {entry['model']} {size}px {label:14s} {res['seconds'] * 1e3:8.2f} ms "
              f"(first call {res['first_call_s']:.1f}s)", flush=True)
        run.save()

    def agent(phase: Any) -> Callable[[], Any]:
        return lambda: diffattn.apply(unet, "agent", schedule=[(1.0, phase)])

    def free_layers() -> list[tuple[nn.Module, Any]]:
        saved = [(layer, layer.processor) for layer in agent_layers]
        free = FreeLayer()  # one instance, as the dense layers share one (a guard per instance otherwise)
        for layer in agent_layers:
            layer.processor = free
        return saved

    def restore(saved: list[tuple[nn.Module, Any]]) -> None:
        for layer, proc in saved:
            layer.processor = proc

    variant("dense", lambda: None, lambda s: None)
    variant("agent phase 1", agent(phases[0]), lambda p: p.remove())
    variant("agent phase 2", agent(phases[1]), lambda p: p.remove())
    variant("free layers", free_layers, restore)
    if tome is not None:
        variant("tomesd", lambda: tome.apply_patch(unet, ratio=TOME_RATIO), lambda s: tome.remove_patch(unet))
    v = {k: r["seconds"] for k, r in entry["variants"].items()}
    d, fr = v["dense"], v["free layers"]
    entry["schedule"] = schedule_figures([
        {"name": f"phase 1: {steps1} steps", "steps": steps1, "dense_s": d, "method_s": v["agent phase 1"],
         "free_s": fr},
        {"name": f"phase 2: {UNET_STEPS - steps1} steps", "steps": UNET_STEPS - steps1, "dense_s": d,
         "method_s": v["agent phase 2"], "free_s": fr},
    ])
    entry["speedups"] = {k: d / t for k, t in v.items()}
    entry["attention_share_replaced"] = 1 - fr / d
    if "tomesd" in v:
        entry["agent_schedule_over_tomesd"] = v["tomesd"] / (entry["schedule"]["method_total_s"] / UNET_STEPS)
    run.save()
    print(f"[unet] {entry['model']}: schedule {entry['schedule']['amortized_speedup']:.2f}x over compiled dense "
          f"(bound {entry['schedule']['amdahl_bound']:.2f}x)", flush=True)


# ----- plots ---------------------------------------------------------------------------------------------


def plot(run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, env = run.record, run.record["environment"]
    where = f"{env.get('gpu', env['device'])}, {run.args.dtype}" + (", --tiny" if run.tiny else "")
    fig, ax = plt.subplots(figsize=(11, 4.5))
    if run.stage == "engine":
        rows = rec.get("rows", [])
        labels = [f"{r['tokens'] // 1024}k\n{r['family']}\n{r['block_density']:.2f}" for r in rows]
        xs = range(len(rows))
        ax.bar(xs, [r["efficiency"] for r in rows], label="efficiency (speedup x density)")
        ax.axhline(0.8, color="r", lw=0.8, ls="--", label="target 0.8")
        ax.set_xticks(list(xs), labels, fontsize=6)
        ax.set_ylabel("efficiency vs best dense SDPA")
        ax.set_title(f"engine: block-sparse vs dense SDPA ({where})")
    else:
        entries: list[tuple[str, dict[str, Any]]] = []
        if run.stage == "wan":
            entries = [(f"{k} ({rec[k]['tokens']} tok)", rec[k]) for k in ("main", "long") if "schedule" in rec.get(k, {})]
        elif run.stage == "flux":
            entries = [(f"{e['px']} px", e) for e in rec.get("sizes", []) if "schedule" in e]
        else:
            entries = [(f"{e['model']} {e['px']} px", e) for e in rec.get("models", []) if "schedule" in e]
        names = ("per-step", "amortised", "Amdahl bound")
        for i, name in enumerate(names):
            vals = []
            for _, e in entries:
                s = e["schedule"]
                step = e.get("sparse_step_speedup", max(s["segment_speedups"]))
                vals.append({"per-step": step, "amortised": s["amortized_speedup"], "Amdahl bound": s["amdahl_bound"]}[name])
            ax.bar([j + 0.27 * i for j in range(len(entries))], vals, width=0.27, label=name)
        ax.set_xticks([j + 0.27 for j in range(len(entries))], [n for n, _ in entries])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{run.stage}: {rec.get('model', 'UNets under torch.compile')} ({where})")
    ax.legend(fontsize=8)
    save_figure(fig, run.path.with_suffix(".png"))
    plt.close(fig)


# ----- command line ----------------------------------------------------------------------------------------

STAGE_FNS = {"engine": stage_engine, "wan": stage_wan, "flux": stage_flux, "unet": stage_unet}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", choices=STAGES, required=True,
                   help="stages to run, in this order (each writes its own JSON and PNG)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run of every code path (CPU: seconds)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--stat", choices=["median", "min"], default=None,
                   help="figure of each variant's timed calls (default: median on CUDA, min on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per variant (default: 3 for models, 5 for the engine; the UNets take >= 10)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="seconds a stage may take: '--wan-long auto' measures 4x length in full only if it fits")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="engine: sequence lengths")
    p.add_argument("--densities", type=float, nargs="+", default=None,
                   help="engine: band-mask block densities (default 0.07 0.15 0.3 0.4)")
    p.add_argument("--radii", type=int, nargs="+", default=None, help="engine: Hilbert-local radii (default 8 24)")
    p.add_argument("--heads", type=int, default=None, help="engine: heads (default 12)")
    p.add_argument("--head-dim", type=int, default=None, help="engine: head size (default 128)")
    p.add_argument("--block-size", type=int, default=None, help="engine block size (default 128)")
    p.add_argument("--engine-backend", default="auto", help="engine backend of every sparse call: auto, flex, gather, sdpa")
    p.add_argument("--wan-long", choices=["auto", "full", "project", "skip"], default="auto",
                   help="wan at 4x length: measured in full, projected from 2 measured blocks, or by time and memory")
    p.add_argument("--flux-sizes", type=int, nargs="+", default=None, help="flux: HR sizes in px (2048 4096)")
    p.add_argument("--unets", nargs="+", choices=["sd1.5", "sdxl"], default=None, help="unet: which UNets")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager", "eager", "none"], default=None,
                   help="unet: torch.compile backend of the regions (default: inductor on CUDA, eager on CPU)")
    p.add_argument("--out-dir", default="outputs/bench_gpu_e2e")
    args = p.parse_args(argv)

    def bad(arg: str, why: str) -> None:
        p.error(f"argument {arg}: {why}")

    try:
        device = torch.device(args.device)
    except RuntimeError:
        bad("--device", f"not a device: {args.device!r}")
    if device.type not in ("cuda", "cpu"):
        bad("--device", f"must be cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        bad("--device", "torch sees no CUDA GPU here (use --device cpu --tiny for a smoke run)")
    args.device = str(device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    from diffattn.benchmark import ENGINE_BACKENDS

    if args.engine_backend not in ENGINE_BACKENDS:
        bad("--engine-backend", f"must be one of {list(ENGINE_BACKENDS)}, got {args.engine_backend!r}")
    if args.repeats is not None and args.repeats < 1:
        bad("--repeats", f"must be >= 1, got {args.repeats}")
    if args.budget_s <= 0:
        bad("--budget-s", f"must be > 0, got {args.budget_s}")
    if args.densities is not None and any(not 0 < d <= 1 for d in args.densities):
        bad("--densities", f"each must be in (0, 1], got {args.densities}")
    tiny = args.tiny
    defaults = dict(lengths=[256, 512] if tiny else [32768, 65536, 131072], radii=[2] if tiny else [8, 24],
                    densities=[0.15, 0.4] if tiny else [0.07, 0.15, 0.3, 0.4],
                    heads=2 if tiny else 12, head_dim=32 if tiny else 128, block_size=32 if tiny else 128)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("lengths", "radii"):
        if any(x < 1 for x in getattr(args, name)):
            bad(f"--{name}", f"each must be >= 1, got {getattr(args, name)}")
    for name in ("heads", "head_dim", "block_size"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(args, name)}")
    if args.flux_sizes and any(s not in (2048, 4096) for s in args.flux_sizes):
        bad("--flux-sizes", f"each must be 2048 or 4096, got {args.flux_sizes}")
    args.stage = [s for s in STAGES if s in args.stage]  # priority order
    return args


class CutOff(Exception):
    """SIGTERM (``timeout``'s signal) arrived: the stage stops, its JSON and PNG are written."""


_CUT: list[int] = []  # the signal, once it came (an import may wrap CutOff in another error)


def _on_sigterm(signum: int, frame: Any) -> None:
    _CUT.append(signum)
    raise CutOff("stopped by SIGTERM (a time limit): the JSON holds what was measured before")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    failed = []
    for stage in args.stage:
        run = Run(args, stage, device, dtype)
        run.record = {"stage": stage, "environment": device_info(device), "args": vars(args).copy(), "notes": [],
                      "status": "running"}
        cpu_notes(run)
        run.save()
        print(f"== {stage} on {run.record['environment'].get('gpu', device)} ({args.dtype})", flush=True)
        try:
            STAGE_FNS[stage](run)
            run.record["status"] = "done"
        except Exception as e:  # keep what was measured; the next stage still runs (unless cut off)
            import traceback

            traceback.print_exc()
            run.record["status"] = f"{'cut off' if _CUT else 'failed'}: {type(e).__name__}: {e}"[:500]
            failed.append(stage)
        run.save(complete=run.record["status"] == "done")
        try:
            plot(run)
        except Exception as e:  # a plot must not lose the JSON
            print(f"[{stage}] plot failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"== {stage}: {run.record['status']}, wrote {run.path}.json and .png "
              f"({run.record['elapsed_s']:.1f} s)", flush=True)
        if run.record["status"].startswith("cut off"):
            break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
