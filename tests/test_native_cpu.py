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


def test_a_first_build_says_what_it_is_doing(monkeypatch, tmp_path, capsys):
    """A first build is about 30-80 s of silence otherwise: one line on stderr says what runs and how long;
    an already-built kernel (a .so in the build folder) loads without it."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose=False: str(tmp_path))
    monkeypatch.setattr(cpp, "load", lambda **kwargs: "module")
    assert native_cpu._build() == "module"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the native CPU attention kernel" in err and "30-80 s" in err
    name = f"diffattn_block_sparse_cpu_{native_cpu._capability_flags()[0].lower()}"
    (tmp_path / f"{name}.so").write_bytes(b"")
    native_cpu._build()
    assert capsys.readouterr().err == ""
