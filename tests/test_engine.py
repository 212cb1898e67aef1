"""The block-sparse engine against the dense SDPA reference with an explicit mask.

Tolerances: fp32 max abs error <= 1e-5 (forward and gradients); fp16/bf16 compare against the fp32
reference at 1e-2 / 3e-2.
"""

from __future__ import annotations

import pytest
import torch

from diffattn.ops import BlockMask, block_sparse_attention, native_cpu, resolve_backend, sdpa_reference
from diffattn.ops.block_mask import text_dense_ranges


@pytest.fixture(autouse=True, params=["native", "sdpa"])
def cpu_kernel(request):
    """Every test runs on both CPU kernels of the gather backend: the native C++ kernel (where it builds;
    a machine without a compiler skips those) and torch's fused SDPA kernel over strided and gathered
    blocks."""
    if request.param == "native":
        ok, why = native_cpu.available()
        if not ok:
            pytest.skip(f"native CPU kernel: {why}")
        yield "native"
    else:
        with native_cpu.disabled():
            yield "sdpa"


def _dense_masked(q, k, v, mask):
    """Independent reference: explicit softmax over an explicit token mask; empty rows give 0."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)


def _assert_matches_with_grads(q, k, v, bm, batch, heads, tol=1e-5):
    """The gather backend equals the explicit reference in output and in q/k/v gradients (<= tol)."""
    ref = _dense_masked(q, k, v, bm.to_dense(batch, heads))
    out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - ref).abs().max() <= tol
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        assert torch.isfinite(b).all()
        assert (a - b).abs().max() <= tol
    return ref


def _qkv(b, h, n, m, d, dtype=torch.float32, grad=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, L, d, generator=g).to(device, dtype) for L in (n, m, m))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def _band(qb, kb, width):
    i = torch.arange(qb)[:, None]
    j = torch.arange(kb)[None, :]
    return (i - j).abs() <= width


def _cases():
    g = torch.Generator().manual_seed(1)
    yield "band", 256, 256, 32, lambda: BlockMask(_band(8, 8, 1), 256, 256, 32)
    yield "block_diagonal", 256, 256, 64, lambda: BlockMask(torch.eye(4, dtype=torch.bool), 256, 256, 64)
    yield "random_per_head", 200, 170, 32, lambda: BlockMask(torch.rand(2, 7, 6, generator=g) < 0.4, 200, 170, 32)
    yield (
        "random_per_batch_head",
        150,
        150,
        32,
        lambda: BlockMask(torch.rand(2, 2, 5, 5, generator=g) < 0.3, 150, 150, 32),
    )
    yield (
        "text_first_rows_cols",
        230,
        230,
        32,
        lambda: BlockMask(_band(8, 8, 0), 230, 230, 32, dense_q=(0, 37), dense_kv=(0, 37)),
    )
    yield (
        "text_last_with_padding",
        230,
        230,
        32,
        lambda: BlockMask(
            _band(8, 8, 0),
            230,
            230,
            32,
            dense_q=(200, 230),
            dense_kv=(200, 230),
            key_padding=torch.arange(230)[None].expand(2, -1) < torch.tensor([[230], [215]]),
        ),
    )
    yield (
        "token_rule_window",
        190,
        190,
        32,
        lambda: BlockMask(_band(6, 6, 1), 190, 190, 32, token_rule=lambda b, h, qi, ki: (qi - ki).abs() <= 20),
    )
    yield "empty_rows", 128, 128, 32, lambda: BlockMask(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]] * 2).bool(), 128, 128, 32)


CASES = list(_cases())


@pytest.mark.parametrize("name,n,m,bs,make", CASES, ids=[c[0] for c in CASES])
def test_gather_matches_reference_forward_and_grad(name, n, m, bs, make):
    bm = make()
    q, k, v = _qkv(2, 2, n, m, 16, grad=True)
    ref = _assert_matches_with_grads(q, k, v, bm, 2, 2)
    # the library's own SDPA reference agrees with the explicit one
    assert (sdpa_reference(q, k, v, bm) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name,n,m,bs,make", CASES, ids=[c[0] for c in CASES])
def test_gather_generic_autograd_path_matches_reference(name, n, m, bs, make, monkeypatch):
    """Off CPU, gradients flow through index_select + SDPA's own backward: the same results."""
    import importlib

    # the package re-exports the function under the module's name, so fetch the module itself
    monkeypatch.setattr(importlib.import_module("diffattn.ops.gather_attention"), "_has_cpu_flash", lambda q: False)
    _assert_matches_with_grads(*_qkv(2, 2, n, m, 16, grad=True), make(), 2, 2)
    # and without autograd: single-run rows read in place, one piece each (SDPA returns no lse to merge)
    bm = make()
    q, k, v = _qkv(2, 2, n, m, 16)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - _dense_masked(q, k, v, bm.to_dense(2, 2))).abs().max() <= 1e-5


@pytest.mark.parametrize("name,n,m,bs,make", CASES, ids=[c[0] for c in CASES])
def test_gather_inference_path_matches_reference(name, n, m, bs, make):
    """Without autograd, rows made of one contiguous run of blocks read keys in place (strided views)."""
    bm = make()
    q, k, v = _qkv(2, 2, n, m, 16)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - _dense_masked(q, k, v, bm.to_dense(2, 2))).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "bitmap",
    [
        _band(12, 12, 2),  # interior rows: one progression per head
        torch.ones(6, 6, dtype=torch.bool),  # every row the same run: stride 0
        torch.tril(torch.ones(6, 6, dtype=torch.bool)),  # runs of growing length from block 0
        torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool),  # mixed
    ],
    ids=["band", "full", "causal", "mixed"],
)
@pytest.mark.parametrize("short", [0, 7], ids=["whole_blocks", "padded_tail"])
def test_contiguous_run_views_on_non_contiguous_inputs(bitmap, short):
    """Runs read keys in place; one that ends in a padded tail block stops its view at kv_len."""
    qb, kb = bitmap.shape
    n, m = qb * 32 - short, kb * 32 - short
    q, k, v = _qkv(2, 3, n, m, 16)
    # processors hand the engine (batch, tokens, heads, dim) tensors transposed: not contiguous
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    bm = BlockMask(bitmap, n, m, 32)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - _dense_masked(q, k, v, bm.to_dense(2, 3))).abs().max() <= 1e-5
    # the CPU training path reads the same runs in place in its forward and its recomputing backward
    _assert_matches_with_grads(*(t.requires_grad_() for t in (q, k, v)), bm, 2, 3)


def _grouped_cases():
    # (name, bitmap, q_len, kv_len): block size 16, runs long enough that rows are grouped
    band13 = _band(30, 30, 6)  # runs of 13 blocks: pairs of rows
    band33 = _band(48, 48, 16)  # runs of 33 blocks: groups of six
    causal = torch.tril(torch.ones(40, 40, dtype=torch.bool))  # runs from block 0, growing by one
    per_head = torch.stack([_band(40, 40, 6), _band(40, 40, 17)])  # (heads, q, k): a group size per head
    window = torch.block_diag(*[torch.ones(8, 8, dtype=torch.bool)] * 3)  # identical runs: one long query
    shifted = torch.zeros(20, 71, dtype=torch.bool)  # runs shifting by two blocks per row: leftovers cap groups
    for i in range(20):
        shifted[i, 2 * i : 2 * i + 33] = True
    # rows of several runs: long ones read in place (grouped per run), short ones gathered into one piece
    two_bands = _band(40, 40, 6) | _band(40, 40, 2).roll(20, dims=1)  # runs of 13 and 5 blocks per row
    mixed = _band(40, 40, 8) | (torch.arange(40)[None, :] % 9 == 0)  # a long run plus single blocks
    from diffattn.masks import radial_block_mask

    radial = radial_block_mask(6, 100, decay_factor=0.5, block_size=16, sink=True).effective_bitmap()[0, 0]
    yield "two_bands", two_bands, 40 * 16, 40 * 16 - 11
    yield "long_and_short_runs", mixed, 40 * 16 - 3, 40 * 16
    yield "radial", radial, 600, 600
    yield "band13", band13, 30 * 16, 30 * 16
    yield "band33_padded_tail", band33, 48 * 16 - 5, 48 * 16 - 9
    yield "causal", causal, 40 * 16, 40 * 16 - 3
    yield "per_head", per_head, 40 * 16 - 7, 40 * 16
    yield "window", window, 24 * 16, 24 * 16
    yield "shifted", shifted, 20 * 16, 71 * 16 - 1


GROUPED = list(_grouped_cases())


@pytest.mark.parametrize("name,bitmap,n,m", GROUPED, ids=[c[0] for c in GROUPED])
def test_grouped_runs_match_reference(name, bitmap, n, m):
    """Consecutive rows sharing one query call and their leftover pieces merged by log-sum-exp give the
    reference output and gradients (fp32, <= 1e-5), with and without autograd, on transposed inputs."""
    from diffattn.ops.gather_attention import _plan

    bm = BlockMask(bitmap, n, m, 16)
    heads = 2
    batches, _ = _plan(bm, 1, heads, m, 16, 4, in_place=True, group=True, multi_run=True)
    assert any(b.q_len > 1 for b in batches)  # rows really are grouped
    if name != "window":
        assert any(not b.first for b in batches)  # and leftover pieces really are merged
    q, k, v = _qkv(1, heads, n, m, 16, seed=3)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - _dense_masked(q, k, v, bm.to_dense(1, heads))).abs().max() <= 1e-5
    _assert_matches_with_grads(*(t.requires_grad_() for t in (q, k, v)), bm, 1, heads)


@pytest.mark.parametrize("name,bitmap,n,m", GROUPED, ids=[c[0] for c in GROUPED])
def test_runs_off_cpu_path_match_reference(name, bitmap, n, m, monkeypatch):
    """Off CPU (no log-sum-exp to merge with) the same masks run ungrouped: same results."""
    import importlib

    monkeypatch.setattr(importlib.import_module("diffattn.ops.gather_attention"), "_has_cpu_flash", lambda q: False)
    bm = BlockMask(bitmap, n, m, 16)
    q, k, v = _qkv(1, 2, n, m, 16, seed=4)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert (out - _dense_masked(q, k, v, bm.to_dense(1, 2))).abs().max() <= 1e-5


def test_grouped_plan_covers_every_kept_block_once():
    """The pieces of each row tile its run exactly: no block read twice, none left out."""
    from diffattn.ops.gather_attention import _plan
    from diffattn.ops.run_plan import piece_blocks

    for _, bitmap, n, m in GROUPED:
        bm = BlockMask(bitmap, n, m, 16)
        batches, chunks = _plan(bm, 1, 2, m, 16, 4, in_place=True, group=True, multi_run=True)
        seen = torch.zeros(2 * bm.q_blocks, bm.k_blocks, dtype=torch.int64)
        for b in batches:
            keys = piece_blocks(b.k_start, b.k_step, b.k_len, b.n, "cpu").view(b.n, b.k_len)
            for i in range(b.n):
                for r in range(b.q_start + i * b.q_step, b.q_start + i * b.q_step + b.q_len):
                    seen[r, keys[i] - (r // bm.q_blocks) * bm.k_blocks] += 1
        for c in chunks:
            for r, flat in zip(c.rows.tolist(), c.flat.view(len(c.rows), c.m)):
                seen[r, flat - (r // bm.q_blocks) * bm.k_blocks] += 1
        expected = bm.effective_bitmap().expand(1, 2, bm.q_blocks, bm.k_blocks).reshape(-1, bm.k_blocks)
        assert torch.equal(seen, expected.long())


def test_grouped_runs_low_precision():
    """Merged pieces accumulate in fp32: bf16 stays within the single-call tolerance."""
    bm = BlockMask(_band(48, 48, 16), 768, 768, 16)
    q, k, v = _qkv(1, 2, 768, 768, 16)
    ref = _dense_masked(q, k, v, bm.to_dense(1, 2))
    ql, kl, vl = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(ql, kl, vl, bm, backend="gather")
    assert (out.float() - ref).abs().max() <= 3e-2
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad(out, (ql, kl, vl), grad.to(torch.bfloat16))
    g_ref = torch.autograd.grad(_dense_masked(qr, kr, vr, bm.to_dense(1, 2)), (qr, kr, vr), grad)
    for a, b in zip(g_ref, g_out):
        assert (a - b.float()).abs().max() <= 0.12


def test_structure_is_respected():
    """Changing a key the mask hides changes nothing; changing a visible one changes the output."""
    bm = BlockMask(_band(4, 4, 0), 128, 128, 32)
    q, k, v = _qkv(1, 1, 128, 128, 8)
    out = block_sparse_attention(q, k, v, bm, backend="gather")
    v2 = v.clone()
    v2[..., 100:, :] += 10.0  # block 3 only
    out2 = block_sparse_attention(q, k, v2, bm, backend="gather")
    assert torch.equal(out[..., :96, :], out2[..., :96, :])
    assert not torch.allclose(out[..., 96:, :], out2[..., 96:, :])


def test_empty_rows_are_zero():
    bm = BlockMask(torch.tensor([[True, False], [False, False]]), 64, 64, 32)
    q, k, v = _qkv(1, 1, 64, 64, 8)
    out = block_sparse_attention(q, k, v, bm, backend="gather")
    assert torch.equal(out[..., 32:, :], torch.zeros_like(out[..., 32:, :]))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    bm = BlockMask(_band(5, 5, 1), 150, 150, 32, dense_q=(0, 10), dense_kv=(0, 10))
    q, k, v = _qkv(1, 2, 150, 150, 16)
    ref = _dense_masked(q, k, v, bm.to_dense(1, 2))
    out = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), bm, backend="gather")
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= tol
    out_sdpa = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), bm, backend="sdpa")
    assert (out_sdpa.float() - ref).abs().max() <= tol
    # gradients of the training path in low precision against the fp32 reference's
    ql, kl, vl = (t.to(dtype).requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad(block_sparse_attention(ql, kl, vl, bm, backend="gather"), (ql, kl, vl), grad.to(dtype))
    g_ref = torch.autograd.grad(_dense_masked(qr, kr, vr, bm.to_dense(1, 2)), (qr, kr, vr), grad)
    for a, b in zip(g_ref, g_out):
        assert b.dtype == dtype
        assert (a - b.float()).abs().max() <= 4 * tol


def test_flex_matches_reference_and_caches():
    from diffattn.ops import flex_backend

    q, k, v = _qkv(2, 2, 300, 270, 16)
    kp = torch.ones(2, 270, dtype=torch.bool)
    kp[1, -20:] = False
    bits = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.5
    bm = BlockMask(bits, 300, 270, 128, dense_q=(0, 10), dense_kv=(255, 270), key_padding=kp)
    ref = _dense_masked(q, k, v, bm.to_dense(2, 2))
    out = block_sparse_attention(q, k, v, bm, backend="flex")
    assert (out - ref).abs().max() <= 1e-5
    before = flex_backend.STATS.compiles
    bits2 = ~bits  # same shape, other pattern: no recompile
    bm2 = BlockMask(bits2, 300, 270, 128, dense_q=(0, 10), dense_kv=(255, 270), key_padding=kp)
    out2 = block_sparse_attention(q, k, v, bm2, backend="flex")
    assert flex_backend.STATS.compiles == before
    assert (out2 - _dense_masked(q, k, v, bm2.to_dense(2, 2))).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,n,m,bs,make", CASES, ids=[c[0] for c in CASES])
def test_flex_all_cases(name, n, m, bs, make):
    bm = make()
    q, k, v = _qkv(2, 2, n, m, 16)
    ref = _dense_masked(q, k, v, bm.to_dense(2, 2))
    out = block_sparse_attention(q, k, v, bm, backend="flex")
    assert (out - ref).abs().max() <= 1e-5


def test_auto_backend_choice(cpu_kernel):
    bm = BlockMask(_band(4, 4, 1), 256, 256, 64)
    q, k, v = _qkv(1, 1, 256, 256, 8, grad=True)
    assert resolve_backend(q, k, v, bm) == "gather"  # CPU + grad: flex has no CPU backward
    with torch.no_grad():
        # a band: every row one contiguous run, read in place by gather
        assert resolve_backend(q, k, v, bm) == "gather"
        scattered = BlockMask(torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]] * 2).bool(), 256, 256, 64)
        if cpu_kernel == "native":  # the native kernel reads scattered runs in place too
            assert resolve_backend(q, k, v, scattered) == "gather"
            assert resolve_backend(q.half(), k.half(), v.half(), scattered) == "flex"  # fp32 only
            # ... but not rows with token checks: a token rule on every row keeps flex
            ruled = BlockMask(scattered.bitmap, 256, 256, 64, token_rule=lambda b, h, qi, ki: qi >= ki)
            assert resolve_backend(q, k, v, ruled) == "flex"
            return
        assert resolve_backend(q, k, v, scattered) == "flex"
        # rows of several runs: long runs are read in place too, short ones are not
        long_runs = _band(16, 16, 2) | _band(16, 16, 2).roll(8, dims=1)  # runs of 5 blocks, 2 per row
        assert resolve_backend(q, k, v, BlockMask(long_runs, 1024, 1024, 64)) == "gather"
        short_runs = _band(16, 16, 1) | _band(16, 16, 1).roll(8, dims=1)  # runs of 3 blocks
        assert resolve_backend(q, k, v, BlockMask(short_runs, 1024, 1024, 64)) == "flex"
    one = BlockMask(torch.ones(1, 1, dtype=torch.bool), 32, 32, 64)
    q1, k1, v1 = _qkv(1, 1, 32, 32, 8)
    assert resolve_backend(q1, k1, v1, one) == "gather"


def test_bad_input_messages():
    q, k, v = _qkv(1, 2, 128, 128, 8)
    with pytest.raises(ValueError, match=r"\(2, 2\).*q_len=128"):
        block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attention(q[0], k, v, torch.ones(4, 4, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), block_size=32, backend="cuda-magic")
    with pytest.raises(ValueError, match="broadcast"):
        block_sparse_attention(q, k, v, torch.ones(3, 4, 4, dtype=torch.bool), block_size=32)
    bm = BlockMask(torch.ones(2, 2, dtype=torch.bool), 64, 64, 32)
    with pytest.raises(ValueError, match="q_len=64"):
        block_sparse_attention(q, k, v, bm)
    with pytest.raises(NotImplementedError, match="gather"):
        block_sparse_attention(q.requires_grad_(), k, v, torch.ones(4, 4, dtype=torch.bool), 32, backend="flex")


def test_text_dense_ranges():
    assert text_dense_ranges(100, 10, "first") == (0, 10)
    assert text_dense_ranges(100, 10, "last") == (90, 100)
    assert text_dense_ranges(100, 0, "last") is None
    with pytest.raises(ValueError, match="text_position"):
        text_dense_ranges(100, 10, "middle")


@pytest.mark.parametrize("bs,n,m", [(32, 300, 270), (20, 250, 333), (2, 12, 12), (192, 500, 420)])
def test_flex_gpu_block_coarsening(bs, n, m):
    """On GPU flex needs 128-token blocks: a finer mask is re-tiled (kept where any fine block is, full
    where every fine block is) and the fine bitmap checked per token. Block sets against a brute-force
    token expansion; the coarse flex mask (run eagerly on CPU) against the explicit reference."""
    from torch.nn.attention.flex_attention import flex_attention

    from diffattn.ops import flex_backend

    g = torch.Generator().manual_seed(bs)
    qb, kb = -(-n // bs), -(-m // bs)
    kp = torch.ones(2, m, dtype=torch.bool)
    kp[1, -7:] = False
    bm = BlockMask(torch.rand(2, qb, kb, generator=g) < 0.3, n, m, bs, dense_q=(0, 5), dense_kv=(m - 9, m), key_padding=kp)
    assert flex_backend.flex_block_size(bm, "cpu") == bs
    size = flex_backend.flex_block_size(bm, "cuda")
    assert size == (bs if bs % 128 == 0 else 128)
    if size == bs:
        return
    eff = bm.effective_bitmap().expand(2, 2, qb, kb)
    full = (bm.full_bitmap() & bm.effective_bitmap()).expand(2, 2, qb, kb)
    kept, cfull = flex_backend.coarsen(eff, full, bm, size)

    def tokens(x, pad_value):  # fine blocks -> tokens, cropped, then padded to whole coarse tiles
        t = x.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n, :m]
        rows, cols = -(-n // size) * size, -(-m // size) * size
        return torch.nn.functional.pad(t, (0, cols - m, 0, rows - n), value=pad_value)

    def tiles(t):
        return t.unflatten(-2, (-1, size)).unflatten(-1, (-1, size)).transpose(-3, -2).flatten(-2)

    ref_kept = tiles(tokens(eff, False)).any(-1)
    # query rows past q_len do not matter; keys past kv_len make a tile partial
    t = tokens(full, False)
    t[..., n:, :] = True
    assert torch.equal(kept, ref_kept)
    assert torch.equal(cfull, tiles(t).all(-1) & ref_kept)

    q, k, v = _qkv(2, 2, n, m, 16)
    mask = flex_backend.to_flex_block_mask(bm, 2, 2, device="cuda")
    assert mask.BLOCK_SIZE == (size, size)
    out = flex_attention(q, k, v, block_mask=mask)
    ref = _dense_masked(q, k, v, bm.to_dense(2, 2))
    assert (out - ref).abs().max() <= 1e-5


def test_plan_cache_keeps_small_plans_only(monkeypatch, cpu_kernel):
    """Plans are cached on their mask; large token-level masks are rebuilt per call instead of kept."""
    import importlib

    ga = importlib.import_module("diffattn.ops.gather_attention")
    q, k, v = _qkv(1, 2, 190, 190, 16)
    plain = BlockMask(_band(6, 6, 1), 190, 190, 32)
    ruled = BlockMask(_band(6, 6, 1), 190, 190, 32, token_rule=lambda b, h, qi, ki: (qi - ki).abs() <= 20)
    monkeypatch.setattr(ga, "_CACHED_MASK_BYTES", 0)
    with torch.no_grad():
        for bm in (plain, ruled):
            out = block_sparse_attention(q, k, v, bm, backend="gather")
            assert (out - _dense_masked(q, k, v, bm.to_dense(1, 2))).abs().max() <= 1e-5
    plan = "native" if cpu_kernel == "native" else "plan"  # the native kernel's plan has its own key
    assert any(key[0] == plan for key in plain._cache)
    assert not any(key[0] == plan for key in ruled._cache)


def test_long_runs_and_many_runs_per_row(cpu_kernel):
    """Runs longer than the native kernel's 512-key score tile and rows of many runs, with a padded
    tail block: the online softmax across tiles and runs equals the reference (<= 1e-5)."""
    g = torch.Generator().manual_seed(3)
    bitmap = torch.rand(2, 12, 12, generator=g) < 0.45
    bitmap[0, :, :6] = True  # runs of 6 blocks = 768 keys: two tiles
    bitmap[1, 3] = False  # a row without keys
    q, k, v = _qkv(1, 2, 1500, 1500, 32, grad=True)
    bm = BlockMask(bitmap, 1500, 1500, 128)
    _assert_matches_with_grads(q, k, v, bm, 1, 2)

