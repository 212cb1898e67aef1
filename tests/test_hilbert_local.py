"""Hierarchical local attention in Hilbert order (issue 8): curve, masks against token-level references, the
engine against SDPA with explicit masks, and the processor on the zoo Flux / SD3 pipelines and the testbed DiT."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn import zoo
from diffattn.masks import (
    block_fill,
    hilbert_order,
    local_block_mask,
    local_density,
    local_token_mask,
    raster_order,
    window_order,
)
from diffattn.masks.hilbert import order_steps, token_order
from diffattn.ops import block_sparse_attention
from diffattn.processors import CoreAttnProcessor, HilbertLocalAttnProcessor, HilbertLocalConfig
from diffattn.processors.core import attention_modules, install_processor
from diffattn.processors.hilbert_local import lr_grid

# ----- the curve ----------------------------------------------------------------------------------------------


def _coords(perm, width):
    return perm // width, perm % width


SIZES = [(h, w) for h in range(1, 25) for w in range(1, 25)] + [
    (97, 131), (131, 97), (1, 131), (97, 1), (64, 64), (63, 65), (33, 100), (100, 33), (2, 99), (99, 3), (96, 130),
]


def test_hilbert_is_a_continuous_bijection_for_every_size():
    for h, w in SIZES:
        perm = hilbert_order(h, w)
        assert perm.dtype == torch.int64 and perm.shape == (h * w,)
        assert torch.equal(torch.sort(perm).values, torch.arange(h * w)), (h, w)
        assert int(perm[0]) == 0, "the curve starts in the corner (0, 0)"
        steps = order_steps(perm, w)
        assert steps["jumps"] == 0, (h, w, steps)  # every step has Chebyshev length 1
        # at most one diagonal step, taken by a split that cannot keep both parts even; none when both sides
        # are even (measured over every size from 1x1 to 131x131 while writing this)
        assert steps["diagonal"] <= 1, (h, w, steps)
        if h % 2 == 0 and w % 2 == 0:
            assert steps["diagonal"] == 0, (h, w)
        assert steps["adjacent"] + steps["diagonal"] == h * w - 1


def test_hilbert_on_powers_of_two_is_the_hilbert_curve():
    """Every aligned run of 4**k consecutive tokens fills a 2**k x 2**k square."""
    side = 32
    y, x = _coords(hilbert_order(side, side), side)
    for k in (1, 2, 3, 4):
        run = 4**k
        for s in range(0, side * side, run):
            ys, xs = y[s : s + run], x[s : s + run]
            assert int(ys.max() - ys.min()) == 2**k - 1 and int(xs.max() - xs.min()) == 2**k - 1


def test_orders_share_the_convention_and_invert():
    h, w = 21, 37
    tokens = torch.randn(2, h * w, 3)
    for perm in (hilbert_order(h, w), window_order(h, w, 8), raster_order(h, w)):
        inv = torch.argsort(perm)
        assert torch.equal(tokens[:, perm][:, inv], tokens)
        # tokens[:, perm][:, i] is the token at raster index perm[i]
        assert torch.equal(tokens[:, perm][:, 5], tokens[:, int(perm[5])])
    assert torch.equal(raster_order(h, w), torch.arange(h * w))
    expected = sorted(range(h * w), key=lambda i: ((i // w) // 8, (i % w) // 8, (i // w) % 8, (i % w) % 8))
    assert window_order(h, w, 8).tolist() == expected
    # caches hand out fresh tensors
    p = hilbert_order(h, w)
    p[0] = -1
    assert int(hilbert_order(h, w)[0]) == 0


@pytest.mark.parametrize("fn", [hilbert_order, window_order, raster_order])
def test_order_bad_sizes(fn):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="height"):
            fn(bad, 4)
        with pytest.raises(ValueError, match="width"):
            fn(4, bad)
    with pytest.raises(ValueError, match="window"):
        window_order(4, 4, 0)
    with pytest.raises(ValueError, match="order"):
        token_order(4, 4, "zigzag")


# ----- masks against token-level references ---------------------------------------------------------------------


def _raster_reference(h, w, r, n_text=0, position="first"):
    """The local rule in the model's raster order, straight from coordinates, text dense."""
    n = n_text + h * w
    off = n_text if position == "first" else 0
    idx = torch.arange(n)
    vis = (idx >= off) & (idx < off + h * w)
    p = (idx - off).clamp(0, h * w - 1)
    y, x = p // w, p % w
    m = vis[:, None] & vis[None, :] & ((y[:, None] - y[None, :]).abs() <= r) & ((x[:, None] - x[None, :]).abs() <= r)
    return m | ~vis[:, None] | ~vis[None, :]


def _blocks_with_pairs(mask, bs):
    n = mask.shape[0]
    nb = -(-n // bs)
    pad = nb * bs - n
    return F.pad(mask, (0, pad, 0, pad)).view(nb, bs, nb, bs).any(3).any(1)


CASES = [
    # h, w, radius, order, block, options
    (8, 8, 2, "hilbert", 8, {}),
    (9, 13, 3, "hilbert", 16, dict(text_len=5)),
    (9, 13, 3, "raster", 16, dict(text_len=5, text_position="last")),
    (11, 7, 1, "window", 6, dict(window=4, text_len=3)),
    (12, 16, 2, "hilbert", 10, dict(text_len=7, lr_height=3, lr_width=4, lr_radius=1, lr_mode="all", lr_window=4)),
    (12, 18, 3, "hilbert", 13, dict(text_len=3, text_position="last", lr_height=6, lr_width=9, lr_radius=1,
                                    lr_window=5)),
    (12, 18, 3, "window", 16, dict(window=4, text_len=4, lr_height=4, lr_width=6, lr_radius=0, lr_window=3)),
    (16, 16, 4, "hilbert", 32, dict(text_len=16, lr_height=8, lr_width=8, lr_radius=2, lr_window=4)),
    (12, 18, 3, "hilbert", 13, dict(text_len=3, text_position="last", lr_height=6, lr_width=9, lr_radius=1,
                                    lr_mode="sliding", lr_window=5)),
    # a reach under one LR cell (3 * lr_window < 2 * ratio): the bitmap goes token by token
    (16, 24, 2, "window", 8, dict(window=4, lr_height=4, lr_width=6, lr_radius=1, lr_mode="sliding", lr_window=1)),
]


def test_sliding_lr_guidance_by_hand():
    """lr_mode="sliding": an HR token sees the LR cells whose centre is within 1.5 * lr_window of it, so the
    seen LR columns shift by one cell every ``ratio`` HR columns and never jump at a window border."""
    h = w = 32
    lh = lw = 8  # ratio 4: LR cell centres at 1.5, 5.5, 9.5, ...
    opts = dict(lr_height=lh, lr_width=lw, lr_radius=1, lr_mode="sliding", lr_window=4)  # reach 6 HR tokens
    ref = local_token_mask(h, w, 1, "raster", **opts)
    hr = lambda y, x: y * w + x  # noqa: E731
    lr = lambda y, x: h * w + y * lw + x  # noqa: E731

    def seen_cols(y, x):
        return [c for c in range(lw) if ref[hr(y, x), lr(y // 4, c)]]

    for x in range(w):
        expect = [c for c in range(lw) if abs(x - (4 * c + 1.5)) <= 6]
        assert seen_cols(16, x) == expect
    # rows follow the same rule: from y = 16, LR rows 3-5 (centres 13.5, 17.5, 21.5), not row 2 (9.5)
    assert [r for r in range(lh) if ref[hr(16, 16), lr(r, 4)]] == [3, 4, 5]
    # interior tokens all see 3 LR columns (a window-based rule would see 3 windows' worth, jumping at borders)
    assert {len(seen_cols(16, x)) for x in range(6, 26)} == {3}


@pytest.mark.parametrize("h,w,r,order,bs,opts", CASES)
def test_mask_matches_token_reference(h, w, r, order, bs, opts):
    bm = local_block_mask(h, w, r, order, bs, **opts)
    ref = local_token_mask(h, w, r, order, **opts)
    assert torch.equal(bm.to_dense()[0, 0], ref)
    # the bitmap holds exactly the blocks with a visible pair (none is missing, none is wasted)
    assert torch.equal(bm.bitmap[0, 0], _blocks_with_pairs(ref, bs))
    assert abs(local_density(h, w, r, order, bs, **opts) - ref.double().mean().item()) < 1e-12
    assert local_density(h, w, r, order, bs, granularity="block", **opts) == pytest.approx(bm.density())
    computed = _blocks_with_pairs(torch.ones_like(ref), bs)  # sizes of the computed blocks
    sizes = torch.tensor([min(bs, ref.shape[0] - i * bs) for i in range(computed.shape[0])], dtype=torch.float64)
    eff = bm.effective_bitmap()[0, 0].double()
    assert block_fill(h, w, r, order, bs, **opts) == pytest.approx(ref.sum().item() / float(sizes @ eff @ sizes))
    if not opts.get("lr_height"):
        # without LR tokens, the mask is the raster rule with the tokens permuted
        perm = token_order(h, w, order, opts.get("window", 16))
        n_text, position = opts.get("text_len", 0), opts.get("text_position", "first")
        off = n_text if position == "first" else 0
        seq = torch.arange(n_text + h * w)
        seq[off : off + h * w] = off + perm
        raster = _raster_reference(h, w, r, n_text, position)
        assert torch.equal(ref, raster[seq][:, seq])


def test_lr_rules_by_hand():
    """LR tokens: HR sees LR under its window and the adjacent ones; LR sees LR within lr_radius only."""
    h = w = 8
    opts = dict(text_len=2, lr_height=4, lr_width=4, lr_radius=1, lr_window=2)
    ref = local_token_mask(h, w, 1, "raster", **opts)
    t, n_hr = 2, h * w
    hr = lambda y, x: t + y * w + x  # noqa: E731
    lr = lambda y, x: t + n_hr + y * 4 + x  # noqa: E731
    assert ref[hr(0, 0), lr(0, 0)] and ref[hr(0, 0), lr(1, 1)]  # same window, adjacent window
    assert not ref[hr(0, 0), lr(2, 0)]  # LR (2, 0) lies under HR window (2, 0): two windows away
    assert ref[hr(5, 5), lr(3, 3)] and not ref[hr(1, 1), lr(3, 3)]
    assert ref[lr(1, 1), lr(2, 2)] and not ref[lr(0, 0), lr(2, 0)]
    assert not ref[lr(0, 0), hr(0, 0)] and not ref[lr(0, 0), 0], "LR sees neither HR nor text"
    assert ref[0].tolist() == [True] * (t + n_hr) + [False] * 16, "text sees text and HR"
    assert ref[t:, 0].tolist() == [True] * n_hr + [False] * 16, "HR sees text, LR does not"


@pytest.mark.parametrize("h,w,r,order,bs,opts", [CASES[1], CASES[2], CASES[5], CASES[7], CASES[8]])
@pytest.mark.parametrize("backend", ["sdpa", "gather"])
def test_engine_matches_sdpa_with_explicit_mask(h, w, r, order, bs, opts, backend):
    bm = local_block_mask(h, w, r, order, bs, **opts)
    ref = local_token_mask(h, w, r, order, **opts)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, ref.shape[0], 16, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, bm, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=ref)
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_flex_runs_the_lookup_table_rule():
    """The token rule compiles in FlexAttention (table lookups) and matches the explicit mask."""
    from diffattn.ops import flex_backend

    ok, why = flex_backend.available()
    if not ok:
        pytest.skip(why)
    opts = dict(text_len=5, lr_height=6, lr_width=8, lr_radius=1, lr_window=4)
    bm = local_block_mask(12, 16, 2, "hilbert", 16, **opts)
    ref = local_token_mask(12, 16, 2, "hilbert", **opts)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, ref.shape[0], 16, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, bm, backend="flex")
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=ref)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "gather"])
def test_block_granularity_keeps_whole_blocks(backend):
    opts = dict(text_len=7, lr_height=6, lr_width=8, lr_radius=1, lr_window=4)
    bm = local_block_mask(12, 16, 2, "hilbert", 16, granularity="block", **opts)
    ref = local_token_mask(12, 16, 2, "hilbert", **opts)
    dense = bm.to_dense()[0, 0]
    n = ref.shape[0]
    expanded = bm.bitmap[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :n]
    assert torch.equal(dense, expanded) and bool((dense | ~ref).all()), "whole blocks, a superset of the rule"
    assert bm.token_rule is None and dense.float().mean() > ref.float().mean()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, bm, backend=backend)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=dense)).abs().max() <= 1e-5


@pytest.mark.parametrize("h,w", [(64, 64), (128, 128), (256, 256), (48, 48), (96, 160), (192, 192), (97, 131)])
def test_hilbert_has_the_best_block_fill(h, w):
    """1K/2K/4K token grids and non-power-of-two ones (the power-of-two aligned splits matter there)."""
    fill = {o: block_fill(h, w, 8, o) for o in ("raster", "window", "hilbert")}
    dens = {o: local_density(h, w, 8, o, granularity="block") for o in ("raster", "window", "hilbert")}
    assert fill["hilbert"] > fill["window"] and fill["hilbert"] > fill["raster"], fill
    assert dens["hilbert"] < dens["window"] and dens["hilbert"] < dens["raster"], dens


def test_4k_mask_is_cheap_and_sparse():
    """256 x 256 tokens (FLUX 4K) plus 512 text and 64 x 64 LR tokens: built from block geometry."""
    bm = local_block_mask(256, 256, 8, text_len=512, lr_height=64, lr_width=64)
    n = 512 + 256 * 256 + 64 * 64
    assert (bm.q_len, bm.bitmap.shape[-1]) == (n, -(-n // 128))
    assert bm.density() < 0.05
    assert local_density(256, 256, 8, text_len=512, lr_height=64, lr_width=64) < bm.density()


def test_mask_bad_input():
    with pytest.raises(ValueError, match="radius"):
        local_block_mask(8, 8, 0)
    with pytest.raises(ValueError, match="radius=8 is larger than the 8x8"):
        local_block_mask(8, 8, 8)
    local_block_mask(8, 8, 7)  # reaches every token: allowed
    with pytest.raises(ValueError, match="ratio must be an integer"):
        local_block_mask(12, 16, 2, lr_height=5, lr_width=8)
    with pytest.raises(ValueError, match="different HR/LR ratios"):
        local_block_mask(12, 16, 2, lr_height=4, lr_width=4)
    with pytest.raises(ValueError, match="lr_height and lr_width together"):
        local_block_mask(12, 16, 2, lr_height=4)
    with pytest.raises(ValueError, match="order"):
        local_block_mask(8, 8, 2, order="zigzag")
    with pytest.raises(ValueError, match="lr_mode"):
        local_block_mask(8, 8, 2, lr_height=4, lr_width=4, lr_mode="near")
    with pytest.raises(ValueError, match="text_position"):
        local_block_mask(8, 8, 2, text_len=3, text_position="middle")
    with pytest.raises(ValueError, match="block_size"):
        local_block_mask(8, 8, 2, block_size=0)
    with pytest.raises(ValueError, match="granularity"):
        local_density(8, 8, 2, granularity="pixel")


# ----- the processor ----------------------------------------------------------------------------------------


def _raster_core(h, w, r, calls):
    def core(q, k, v, layout, attn_mask):
        assert attn_mask is None
        calls.append(layout.layer)
        mask = _raster_reference(h, w, r, layout.n_text, layout.text_position or "first").to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return core


def _pipe(source, name):
    if source == "zoo":
        pipe = zoo.load(name)
        return pipe, lambda **kw: pipe(**{**zoo.default_call_kwargs(name), "output_type": "latent", **kw}).images
    from diffattn.testbed import models

    pipe = models.build(name)
    pipe.set_progress_bar_config(disable=True)

    def run(**kw):
        call = {**models.default_call_kwargs(name), "prompt": "a handwritten digit 3", "num_inference_steps": 2,
                "output_type": "latent", **kw}
        call["generator"] = torch.Generator().manual_seed(0)
        return pipe(**call).images

    return pipe, run


def _processors(model):
    return {n: m.processor for n, m in attention_modules(model).items()}


def _restore(model, saved):
    for n, m in attention_modules(model).items():
        m.set_processor(saved[n])


PIPES = [("zoo", "flux"), ("zoo", "sd3"), ("testbed", "digits-dit")]


@pytest.mark.parametrize("source,name", PIPES)
def test_processor_on_pipelines(source, name):
    pipe, run = _pipe(source, name)
    base = run()
    before = _processors(pipe.transformer)
    with diffattn.apply(pipe, "hilbert_local", radius=1, block_size=4, backend="gather") as patch:
        local = run()
        _, h, w = patch.context.grid
    assert (h, w) == (8, 8) or name == "digits-dit"
    assert torch.isfinite(local).all()
    assert (local - base).abs().max() > 1e-4, "local attention must change the output"
    assert all(_processors(pipe.transformer)[k] is v for k, v in before.items())
    assert torch.equal(run(), base), "restore must be bit-identical"

    # the same pipeline with an explicit raster-order mask (no permutation, dense SDPA) on every layer
    calls: list = []
    try:
        install_processor(pipe.transformer, CoreAttnProcessor(core=_raster_core(h, w, 1, calls)))
        reference = run()
    finally:
        _restore(pipe.transformer, before)
    assert calls
    assert (local - reference).abs().max() <= 1e-5

    # radius covering the grid: every pair visible, so it equals dense attention
    with diffattn.apply(pipe, "hilbert_local", radius=max(h, w) - 1, block_size=4, backend="gather"):
        full = run()
    assert (full - base).abs().max() <= 1e-5
    assert torch.equal(run(), base)


def test_processor_by_hand_equals_apply():
    pipe, run = _pipe("zoo", "flux")
    with diffattn.apply(pipe, "hilbert_local", radius=2, block_size=8, order="window", window=4, backend="gather"):
        applied = run()
    saved = _processors(pipe.transformer)
    try:
        install_processor(pipe.transformer, HilbertLocalAttnProcessor(8, 8, radius=2, block_size=8, order="window",
                                                                      window=4, backend="gather"))
        by_hand = run()
    finally:
        _restore(pipe.transformer, saved)
    assert torch.equal(by_hand, applied)
    # diffusers' own set_attn_processor, with the text length single-stream blocks cannot see
    try:
        pipe.transformer.set_attn_processor(HilbertLocalAttnProcessor(8, 8, radius=2, block_size=8, order="window",
                                                                      window=4, backend="gather", text_len=16))
        native = run()
    finally:
        _restore(pipe.transformer, saved)
    assert torch.equal(native, applied)


@pytest.mark.parametrize("lr_mode", ["window", "all", "sliding"])
def test_processor_lr_guidance_matches_explicit_mask(lr_mode):
    """A Flux double-stream layer on [text; HR; LR] (LR grid inferred) equals SDPA with the raster-order mask."""
    pipe = zoo.load("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    h, w, lh, lw, t = 12, 16, 3, 4, 5
    g = torch.Generator().manual_seed(0)
    dim = attn.to_q.in_features
    x = torch.randn(2, h * w + lh * lw, dim, generator=g)
    enc = torch.randn(2, t, attn.add_q_proj.in_features, generator=g)
    opts = dict(radius=2, block_size=16, lr_radius=1, lr_mode=lr_mode, lr_window=4)
    proc = HilbertLocalAttnProcessor(h, w, family="flux", backend="gather", **opts)
    out = proc(attn, x, enc)
    mask = local_token_mask(h, w, 2, "raster", text_len=t, lr_height=lh, lr_width=lw, lr_radius=1, lr_mode=lr_mode,
                            lr_window=4)
    ref_proc = CoreAttnProcessor(core=lambda q, k, v, layout, m: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                 family="flux")
    ref = ref_proc(attn, x, enc)
    for a, b in zip(out, ref, strict=True):
        assert (a - b).abs().max() <= 1e-5
    assert lr_grid(h, w, lh * lw) == (lh, lw)


def test_processor_errors():
    with pytest.raises(TypeError, match="valid options"):
        HilbertLocalAttnProcessor(8, 8, radius=2, size=3)
    with pytest.raises(ValueError, match="radius"):
        HilbertLocalConfig(radius=0)
    with pytest.raises(ValueError, match="lr_mode"):
        HilbertLocalConfig(lr_mode="near")
    with pytest.raises(ValueError, match="height and width together"):
        HilbertLocalAttnProcessor(8)
    with pytest.raises(ValueError, match="integer HR/LR"):
        lr_grid(12, 16, 5)
    with pytest.raises(ValueError, match="integer HR/LR"):
        lr_grid(12, 16, 12, ratio=3)
    pipe = zoo.load("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    x = torch.randn(1, 60, attn.to_q.in_features)
    enc = torch.randn(1, 4, attn.add_q_proj.in_features)
    with pytest.raises(ValueError, match="64 tokens but the attention call"):
        HilbertLocalAttnProcessor(8, 8, family="flux", radius=2)(attn, x, enc)
    with pytest.raises(ValueError, match="token grid"):
        HilbertLocalAttnProcessor(family="flux", radius=2)(attn, x, enc)
    with pytest.raises(ValueError, match="radius=10 is larger"):
        HilbertLocalAttnProcessor(6, 10, family="flux", radius=10)(attn, x, enc)
    assert "hilbert_local" in diffattn.methods()


def test_registry_mask_and_density():
    spec = diffattn.registry.get("hilbert_local")
    cfg = spec.build_config(dict(radius=3))
    bm = spec.block_mask(cfg, (1, 16, 16), 8, "first", 32)
    assert bm.q_len == 16 * 16 + 8
    dens = spec.token_density(cfg, (1, 16, 16), 8, "first", 32)
    assert dens == pytest.approx(local_density(16, 16, 3, block_size=32, text_len=8))
    assert dens < bm.density() < 1.0
    with pytest.raises(ValueError, match="frames"):
        spec.block_mask(cfg, (2, 16, 16), 8, "first", 32)


def test_all_orders_agree_on_the_processor():
    """The order only changes cost: raster, window-first and Hilbert give the same layer output."""
    pipe = zoo.load("flux")
    attn = pipe.transformer.transformer_blocks[1].attn
    x = torch.randn(1, 10 * 14, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    enc = torch.randn(1, 6, attn.add_q_proj.in_features, generator=torch.Generator().manual_seed(2))
    outs = [
        HilbertLocalAttnProcessor(10, 14, family="flux", radius=3, block_size=16, order=o, window=4)(attn, x, enc)
        for o in ("raster", "window", "hilbert")
    ]
    for a, b in itertools.pairwise(outs):
        assert (a[0] - b[0]).abs().max() <= 1e-5 and (a[1] - b[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_processor_low_precision(dtype):
    """dtype follows the inputs; the result stays close to the fp32 explicit-mask reference."""
    pipe = zoo.load("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8 * 8, attn.to_q.in_features, generator=g)
    enc = torch.randn(1, 4, attn.add_q_proj.in_features, generator=g)
    mask = _raster_reference(8, 8, 2, 4, "first")
    ref = CoreAttnProcessor(core=lambda q, k, v, layout, m: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                            family="flux")(attn, x, enc)
    attn.to(dtype)
    try:
        out = HilbertLocalAttnProcessor(8, 8, family="flux", radius=2, block_size=16, backend="gather")(
            attn, x.to(dtype), enc.to(dtype)
        )
    finally:
        attn.float()
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == dtype
        assert (a.float() - b).abs().max() <= 5e-2 * max(1.0, b.abs().max().item())
