"""The native CPU kernel's fallback: where it cannot be built the engine says so once and stays exact.

(The kernel's numbers are tested in ``test_engine.py``, where every test runs on both CPU kernels.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diffattn.ops import BlockMask, block_sparse_attention, native_cpu, sdpa_reference


def test_native_build_failure_warns_once_and_runs_the_torch_path(monkeypatch):
    """A machine where the C++ kernel cannot be built says so once and still computes exactly."""
    monkeypatch.setattr(native_cpu, "_module", None)
    monkeypatch.setattr(native_cpu, "_error", None)
    monkeypatch.setattr(native_cpu, "_warned", False)

    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native_cpu, "_build", broken)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    i = torch.arange(3)
    bm = BlockMask((i[:, None] - i[None, :]).abs() <= 1, 300, 300, 128)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - sdpa_reference(q, k, v, bm)).abs().max() <= 1e-5
    assert native_cpu.available() == (False, "the C++ extension could not be built (RuntimeError: no compiler here)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        block_sparse_attention(q, k, v, bm, backend="gather")
