"""The native CPU block-sparse attention kernel (``csrc/block_sparse_cpu.cpp``): built on first use.

It is compiled once per machine with torch's C++ extension loader (a C++ compiler and ninja are needed;
``TORCH_EXTENSIONS_DIR`` says where the build is kept, ``~/.cache/torch_extensions`` by default) for
the CPU's vector width. Where it cannot be built, :func:`available` says why and the engine warns once
and runs its pure-torch path (the fused SDPA kernel over strided and gathered key blocks).
``DIFFATTN_NATIVE_CPU=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
_lock = threading.Lock()
_module: Any = None
_error: str | None = None
_warned = False
_disabled = 0  # depth of active ``disabled()`` contexts


def _capability_flags() -> tuple[str, list[str]]:
    """The ATen vector namespace and compiler flags for this CPU (as torch's own kernels are built)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return "AVX2", ["-mavx2", "-mfma"]
    return "DEFAULT", []


def _build() -> Any:
    from torch.utils.cpp_extension import _get_build_directory, load

    cap, flags = _capability_flags()
    name = f"diffattn_block_sparse_cpu_{cap.lower()}"
    if not list(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so")):
        # a first build is silent for about 30 s: say what is happening
        print(
            f"diffattn: building the native CPU attention kernel ({cap}); about 30-80 s, once per machine",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp", f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *flags],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _turned_off() -> bool:
    return bool(_disabled) or os.environ.get("DIFFATTN_NATIVE_CPU", "1") == "0"


def load_kernel() -> Any:
    """The compiled module, building it on first call; ``None`` where it is off or cannot be built."""
    global _module, _error
    if _turned_off():
        return None
    if _module is None and _error is None:
        with _lock:
            if _module is None and _error is None:
                try:
                    _module = _build()
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _module


def available() -> tuple[bool, str]:
    """Whether the kernel runs here, and if not why."""
    if _turned_off():
        return False, "turned off (DIFFATTN_NATIVE_CPU=0 or native_cpu.disabled())"
    if load_kernel() is None:
        return False, f"the C++ extension could not be built ({_error})"
    return True, "built"


def kernel_or_warn() -> Any:
    """The module, or ``None`` after warning once why it is missing (unless it was turned off)."""
    global _warned
    mod = load_kernel()
    if mod is None and _error is not None and not _warned:
        _warned = True
        warnings.warn(
            f"diffattn: the native CPU block-sparse kernel is unavailable ({_error}); the engine runs its "
            "slower pure-torch path (fused SDPA over strided and gathered key blocks)",
            RuntimeWarning,
            stacklevel=3,
        )
    return mod


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the pure-torch CPU path inside this block (tests compare the two; benchmarks report both)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1
