"""The chunked selective scan against the sequential reference, forward and backward (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from diffattn.ops.selective_scan import (
    resolve_scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_macs,
    selective_scan_ref,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _close(actual, expected, what="output"):
    """|actual - expected| <= 1e-5 * max(1, max|expected|) + 1e-5 * |expected|: 1e-5 relative to the
    tensor's scale (a gradient of A sums b * L terms; both sides carry fp32 rounding of that size)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _inputs(b=2, d=6, n=3, length=37, groups=None, a_scale=1.0, dt_shift=0.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    u = r(b, d, length)
    delta = r(b, d, length, scale=0.5) + dt_shift
    A = -(torch.rand(d, n, generator=g) * a_scale + 0.1).to(dtype)
    bc_shape = (b, n, length) if groups is None else (b, groups, n, length)
    B, C = r(*bc_shape, scale=0.5), r(*bc_shape, scale=0.5)
    D, z, delta_bias = r(d), r(b, d, length), r(d, scale=0.5)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _grads(fn, inputs, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, delta_softplus=True, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * w).sum().backward()
    # an input that cannot influence the output (A when L == 1) may get no grad at all: that is zero
    return out.detach(), {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}


CASES = {
    "random": dict(),
    "odd_length": dict(length=23),
    "length_1": dict(length=1),
    "grouped_bc": dict(d=6, groups=3, length=19),
    "strongly_negative_A": dict(a_scale=80.0, length=29),
    "large_delta": dict(dt_shift=6.0, a_scale=5.0, length=41),
    "long": dict(b=1, d=4, n=1, length=301),
}


@pytest.mark.parametrize("intra", ["steps", "segsum"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [None, 8])
def test_chunked_matches_reference_forward_backward(case, intra, chunk):
    inputs = _inputs(**CASES[case])
    y_ref, g_ref = _grads(selective_scan_ref, inputs)
    y, g = _grads(selective_scan_chunked, inputs, chunk_size=chunk, intra=intra)
    assert torch.isfinite(y).all()
    _close(y, y_ref)
    for k in g_ref:
        _close(g[k], g_ref[k], f"grad of {k}")


def test_last_state_and_no_optional_inputs():
    inp = _inputs(length=45)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    y_ref, h_ref = selective_scan_ref(*args, return_last_state=True)
    y, h = selective_scan_chunked(*args, return_last_state=True, chunk_size=10)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    assert h.shape == (2, 6, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_input_dtype(dtype):
    inp = _inputs(length=20)
    y = selective_scan(**{k: v.to(dtype) for k, v in inp.items()}, delta_softplus=True)
    y_ref = selective_scan_ref(**inp, delta_softplus=True)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=5e-2)


def test_dispatch_and_bad_input():
    inp = _inputs(length=8)
    assert resolve_scan_backend(inp["u"]) == "chunked"
    torch.testing.assert_close(selective_scan(**inp, backend="reference"), selective_scan_ref(**inp), **TOL)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inp, backend="nope")
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(**inp, backend="mamba_ssm")
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**inp, "A": inp["A"][:-1]})
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**inp, "B": inp["B"][..., :-1]})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**inp, chunk_size=0)
    assert selective_scan_macs(1, 2, 3, 1, with_d=False) == 54


def test_import_diffattn_does_not_import_mamba_ssm():
    import subprocess
    import sys

    code = "import sys, diffattn, diffattn.ops, diffattn.models; print('mamba_ssm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
