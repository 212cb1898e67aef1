"""Build mamba-ssm's selective-scan CUDA kernel from its source for this machine's GPU only.

For a CUDA machine without a registry (the project's lent GPU machines): ``pip install mamba-ssm`` needs
the network, and its ``setup.py`` compiles every kernel for up to nine GPU architectures, longer than a
short session. This compiles only ``selective_scan_cuda`` (the one extension
``diffattn.ops.selective_scan`` uses) for the local architecture with ``torch.utils.cpp_extension.load``
into a persistent build folder: ninja resumes where an interrupted build stopped, so a second call
finishes the first one's work. mamba-ssm's package ``__init__`` imports its whole model zoo (and through
it transformers' generation utilities), so the four source files the scan's interface needs are laid out
as a minimal ``mamba_ssm`` package in the build folder. It prints the ``PYTHONPATH`` that makes
``from mamba_ssm.ops.selective_scan_interface import selective_scan_fn`` work:

    tar xzf .whl/mamba_ssm-2.3.2.post1.tar.gz -C .build
    python scripts/build_mamba_scan.py .build/mamba_ssm-2.3.2.post1 --build-dir .build/mamba_ext
    PYTHONPATH=$(python scripts/build_mamba_scan.py .build/mamba_ssm-2.3.2.post1 --build-dir .build/mamba_ext \
        --print-path) pytest tests/test_cuda.py -k scan

The flags are the ones mamba-ssm's ``setup.py`` passes to nvcc (minus the other architectures).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SOURCES = [
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu",
    "selective_scan_fwd_fp16.cu",
    "selective_scan_fwd_bf16.cu",
    "selective_scan_bwd_fp32_real.cu",
    "selective_scan_bwd_fp32_complex.cu",
    "selective_scan_bwd_fp16_real.cu",
    "selective_scan_bwd_fp16_complex.cu",
    "selective_scan_bwd_bf16_real.cu",
    "selective_scan_bwd_bf16_complex.cu",
]
# the modules selective_scan_interface imports, beside the compiled selective_scan_cuda
PACKAGE_FILES = [
    "ops/selective_scan_interface.py",
    "ops/triton/layer_norm.py",
    "utils/torch.py",
    "utils/determinism.py",
]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="unpacked mamba-ssm source folder (holds mamba_ssm/ and csrc/)")
    ap.add_argument("--build-dir", type=Path, default=Path(".build/mamba_ext"))
    ap.add_argument("--print-path", action="store_true", help="print the PYTHONPATH entries and exit")
    args = ap.parse_args(argv)
    src = args.source.resolve()
    csrc = src / "csrc" / "selective_scan"
    if not (src / "mamba_ssm").is_dir() or not csrc.is_dir():
        ap.error(f"{src} does not look like mamba-ssm's source (no mamba_ssm/ or csrc/selective_scan/)")
    build = args.build_dir.resolve()
    pkg = build / "pkg"
    if args.print_path:
        print(f"{build}{os.pathsep}{pkg}")
        return 0
    import torch
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to build", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    # only this GPU's architecture (setup.py builds sm_75 ... sm_121)
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load(
        name="selective_scan_cuda",
        sources=[str(csrc / s) for s in SOURCES],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(csrc)],
        build_directory=str(build),
        verbose=True,
    )
    print(f"built selective_scan_cuda for sm_{major}{minor} in {time.perf_counter() - t0:.0f} s into {build}")
    for rel in PACKAGE_FILES:
        dst = pkg / "mamba_ssm" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((src / "mamba_ssm" / rel).read_bytes())
    for folder in (pkg / "mamba_ssm", pkg / "mamba_ssm" / "ops", pkg / "mamba_ssm" / "ops" / "triton", pkg / "mamba_ssm" / "utils"):
        (folder / "__init__.py").touch()
    sys.path[:0] = [str(build), str(pkg)]
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401 - the import is the check

    print(f"mamba_ssm's selective_scan_fn imports; use PYTHONPATH={build}{os.pathsep}{pkg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
