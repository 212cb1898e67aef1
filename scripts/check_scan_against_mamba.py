"""Compare diffattn's selective scan with mamba-ssm's own pure-torch reference, without mamba-ssm's kernels.

mamba-ssm cannot be installed without CUDA (and its ``selective_scan_interface`` imports the compiled
kernel at module level), but its ``selective_scan_ref`` is plain torch + einops. This reads that one
function from a mamba-ssm source tree (the sdist, unpacked) and compares it with ``backend="reference"``
and ``backend="chunked"`` on random inputs, for every B/C layout diffattn accepts, with and without
``D``/``z``/``delta_bias``/softplus, and the last state. It checks that the arguments
:func:`diffattn.ops.selective_scan` hands straight to mamba-ssm's ``selective_scan_fn`` mean the same thing
there. (On a CUDA machine with mamba-ssm installed, ``tests/test_cuda.py`` compares the kernel itself.)

    pip download --no-deps --no-build-isolation mamba-ssm -d /tmp/m   # with MAMBA_SKIP_CUDA_BUILD=TRUE
    tar xzf /tmp/m/mamba_ssm-*.tar.gz -C /tmp/m
    python scripts/check_scan_against_mamba.py /tmp/m/mamba_ssm-2.3.2.post1        # needs einops
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def load_mamba_reference(root: Path):  # noqa: ANN201 - mamba-ssm's function
    path = root / "mamba_ssm" / "ops" / "selective_scan_interface.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the unpacked mamba-ssm source folder")
    from einops import rearrange, repeat

    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref")
    namespace = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module([fn], []), str(path), "exec"), namespace)  # noqa: S102 - one pure function
    return namespace["selective_scan_ref"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mamba_source", type=Path, help="unpacked mamba-ssm source folder")
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args(argv)
    from diffattn.ops.selective_scan import selective_scan

    mamba_ref = load_mamba_reference(args.mamba_source)
    torch.manual_seed(0)
    b, d, n, length, g = 2, 8, 4, 37, 2
    worst = 0.0
    for layout, shape in (("(b, n, L)", (b, n, length)), ("(b, g, n, L)", (b, g, n, length))):
        for extras in ((), ("D", "z"), ("D", "delta_bias", "delta_softplus")):
            u, delta = torch.randn(b, d, length), torch.rand(b, d, length) * 0.5
            A = -torch.rand(d, n) - 0.1
            B, C = torch.randn(*shape), torch.randn(*shape)
            kw = {
                "D": torch.randn(d) if "D" in extras else None,
                "z": torch.randn(b, d, length) if "z" in extras else None,
                "delta_bias": torch.randn(d) * 0.1 if "delta_bias" in extras else None,
                "delta_softplus": "delta_softplus" in extras,
            }
            ref, ref_last = mamba_ref(u, delta, A, B, C, return_last_state=True, **kw)
            for backend in ("reference", "chunked"):
                out, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend=backend, **kw)
                err = max(float((out - ref).abs().max()), float((last - ref_last).abs().max()))
                worst = max(worst, err)
                print(f"B, C {layout:13s} {'+'.join(extras) or 'plain':28s} {backend:9s} max |diff| {err:.2e}")
    ok = worst <= args.tolerance
    print(f"worst {worst:.2e} ({'<=' if ok else '>'} {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
