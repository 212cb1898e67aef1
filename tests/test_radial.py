"""Radial attention: the mask against plain per-token references, the engine path against SDPA with the
same expanded mask, and the processors on every zoo video pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffattn
from diffattn import zoo
from diffattn.cli import main
from diffattn.masks import radial_block_mask, radial_density, radial_mask, radial_token_mask
from diffattn.masks.radial import frame_window
from diffattn.masks.video_geometry import latent_grid
from diffattn.ops import block_sparse_attention, flex_backend, sdpa_reference
from diffattn.processors import RadialAttnProcessor, RadialConfig
from diffattn.processors.core import install_processor
from diffattn.processors.radial import BlockOrder

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- plain references ---------------------------------------------------------------------------------


def loop_token_mask(f, s, decay, bs, sink=False, n_text=0, position=None, adjacent="full"):
    """The rule of issue 7, one token pair at a time, with the reference's float arithmetic."""
    n = f * s + n_text
    off = n_text if position == "first" else 0
    rows = []
    for a in range(n):
        row = []
        for b in range(n):
            if not (off <= a < off + f * s and off <= b < off + f * s):
                row.append(True)  # text rows and columns are dense
                continue
            i, k = divmod(a - off, s)
            j, m = divmod(b - off, s)
            d = abs(i - j)
            if sink and j == 0:
                ok = True
            elif d == 0:
                ok = True
            elif d == 1:
                ok = adjacent == "full" or abs(k - m) <= s // 2
            else:
                L = 2 ** s.bit_length() / 2 ** d.bit_length()
                if L < bs and d % int(bs / L) != 0:
                    ok = False
                else:
                    w = L * decay
                    w = w if w >= bs else bs
                    ok = abs(k - m) <= w
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows)


def block_reference(token_mask, f, s, bs, n_text=0, position=None):
    """The reference's token -> block rule, block by block, over the visual part of ``token_mask``."""
    n = token_mask.shape[0]
    off = n_text if position == "first" else 0
    vis = torch.zeros(n, dtype=torch.bool)
    vis[off : off + f * s] = True
    visual = token_mask & vis[:, None] & vis[None, :]
    nb = math.ceil(n / bs)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for bi in range(nb):
        r0, r1 = bi * bs, min(n, (bi + 1) * bs)
        n_rows = int(vis[r0:r1].sum())
        if n_rows == 0:
            continue
        for bj in range(nb):
            c0, c1 = bj * bs, min(n, (bj + 1) * bs)
            density = visual[r0:r1, c0:c1].sum(0).double() / n_rows
            nonempty = int((density > 0).sum())
            high = int((density > 1 / 3).sum())
            out[bi, bj] = high / (nonempty + 1e-9) > 0.6
        out[bi, bi] = True
    text = ~vis
    for b in range(nb):
        if text[b * bs : (b + 1) * bs].any():
            out[b, :] = True
            out[:, b] = True
    return out


SHAPES = [
    # f, s, decay, block, sink, text, position, adjacent
    (5, 50, 0.5, 16, False, 0, None, "full"),  # s not a multiple of the block
    (7, 37, 0.3, 16, True, 20, "first", "full"),  # text first (CogVideoX)
    (6, 33, 1.0, 8, False, 11, "last", "half"),  # text last (HunyuanVideo, Mochi); earlier Wan rule
    (9, 20, 0.5, 8, False, 0, None, "full"),  # window below a block: far frames subsampled
    (4, 100, 0.7, 8, True, 0, None, "full"),  # fractional window (22.4 tokens)
    (3, 130, 0.2, 128, True, 5, "last", "full"),  # s just above 128, f not a multiple of anything
]


@pytest.mark.parametrize("f,s,decay,bs,sink,n_text,position,adjacent", SHAPES)
def test_mask_matches_per_token_reference(f, s, decay, bs, sink, n_text, position, adjacent):
    kw = dict(decay_factor=decay, block_size=bs, sink=sink, text_tokens=n_text, text_position=position, adjacent=adjacent)
    ref = loop_token_mask(f, s, decay, bs, sink, n_text, position, adjacent)
    token = radial_mask(f, s, granularity="token", **kw)
    assert torch.equal(token, ref)
    assert torch.equal(radial_token_mask(f, s, **kw), ref)
    assert radial_density(f, s, granularity="token", **kw) == pytest.approx(ref.sum().item() / ref.numel(), abs=1e-12)
    # the pattern is really sparse somewhere, so equality is not trivial
    assert not ref.all()

    block = radial_mask(f, s, granularity="block", **kw)
    assert torch.equal(block, block_reference(ref, f, s, bs, n_text, position))
    assert radial_density(f, s, granularity="block", **kw) == pytest.approx(block.float().mean().item())

    # what the engine computes: exactly the token mask, or every pair in the kept blocks
    bm_token = radial_block_mask(f, s, granularity="token", **kw)
    assert torch.equal(bm_token.to_dense()[0, 0], ref)
    bm_block = radial_block_mask(f, s, granularity="block", **kw)
    n = ref.shape[0]
    expanded = block.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
    assert torch.equal(bm_block.to_dense()[0, 0], expanded)


def test_block_rule_matches_reference_frame_pairs_when_aligned():
    """With frames a multiple of the block, the reference's per-frame-pair shrinking gives the same bitmap."""
    f, s, bs, decay = 6, 256, 128, 0.3
    table = [[frame_window(i - j, s, decay, bs) for j in range(f)] for i in range(f)]
    k = torch.arange(s)
    nb = s // bs
    out = torch.zeros(f * nb, f * nb, dtype=torch.bool)
    for i in range(f):
        for j in range(f):
            w = s if j == 0 else table[i][j]  # sink
            local = (k[:, None] - k[None, :]).abs() <= w
            dens = local.view(nb, bs, nb, bs).sum(1).double() / bs  # (q block, k block, column)
            keep = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9) > 0.6
            out[i * nb : (i + 1) * nb, j * nb : (j + 1) * nb] = keep
    assert torch.equal(radial_mask(f, s, decay_factor=decay, block_size=bs, sink=True), out)


def test_wan_768p_densities():
    """Wan 2.1 768x1280x69 (18 latent frames x 3840 tokens), decay 0.2, sink: 26.9% tokens, ~28.7% blocks."""
    assert latent_grid("wan", 69, 768, 1280) == (18, 48, 80)
    kw = dict(decay_factor=0.2, block_size=128, sink=True)
    token = radial_density(18, 3840, granularity="token", **kw)
    block = radial_density(18, 3840, granularity="block", **kw)
    assert abs(token - 0.269) <= 0.01, token
    assert abs(block - 0.287) <= 0.01, block
    # the windows behind them: 2**12 / 2**bit_length(d) * 0.2, floored at 128
    assert [frame_window(d, 3840, 0.2) for d in (0, 1, 2, 3, 4, 8, 17)] == [3840, 3840, 204, 204, 128, 128, 128]
    bitmap = radial_mask(18, 3840, **kw)
    assert bitmap.shape == (540, 540) and bitmap[:, :30].all()  # the sink: every block sees frame 0


def test_mask_cache_returns_fresh_tensors():
    a = radial_mask(5, 50, decay_factor=0.5, block_size=16)
    a.fill_(False)
    b = radial_mask(5, 50, decay_factor=0.5, block_size=16)
    assert b.any(), "mutating a returned mask must not change the cache"
    bm1 = radial_block_mask(5, 50, decay_factor=0.5, block_size=16, granularity="token")
    bm2 = radial_block_mask(5, 50, decay_factor=0.5, block_size=16, granularity="token")
    assert bm1.bitmap.data_ptr() == bm2.bitmap.data_ptr() and bm1.token_rule is bm2.token_rule  # built once


def test_bad_input():
    with pytest.raises(ValueError, match="decay_factor"):
        radial_mask(4, 16, decay_factor=0)
    with pytest.raises(ValueError, match="decay_factor"):
        radial_mask(4, 16, decay_factor=-0.5)
    with pytest.raises(ValueError, match="decay_factor"):
        RadialConfig(decay_factor=0.0)
    with pytest.raises(ValueError, match="text_position"):
        radial_mask(4, 16, text_tokens=3)
    with pytest.raises(ValueError, match="granularity"):
        radial_mask(4, 16, granularity="pixel")
    with pytest.raises(ValueError, match="tokens_per_frame"):
        radial_mask(4, 0)
    with pytest.raises(ValueError, match="4k\\+1 frames; 70 .*69 or 73"):
        latent_grid("wan", 70, 480, 832)
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_grid("wan", 81, 480, 830)
    with pytest.raises(TypeError, match="valid options"):
        RadialAttnProcessor(decay=0.2)
    # a grid that does not match the sequence
    proc = RadialAttnProcessor(num_frames=4, height=4, width=5)
    q = torch.randn(1, 2, 4 * 4 * 4, 8)
    from diffattn.processors.layout import TokenLayout

    with pytest.raises(ValueError, match=r"\(4, 4, 5\) has 80 tokens .* 64 visual tokens"):
        proc.attention(q, q, q, TokenLayout("wan", layer="blocks.0.attn1"), None)
    pipe = zoo.load("wan")
    with pytest.raises(ValueError, match="decay_factor"):
        diffattn.apply(pipe, "radial", decay_factor=-1)
    assert diffattn.applied(pipe) == []


def test_block_order():
    order = BlockOrder()
    names = [
        "context_embedder.token_refiner.refiner_blocks.0.attn",
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.2.attn",
        "blocks.7.attn1",
    ]
    for n in names:
        order.observe(n)
    assert [order.index(n) for n in names] == [None, 0, 1, 2, 4, 7]


# ----- the engine path --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_sparse_path_matches_sdpa_forward_and_backward(granularity):
    f, s, nt = 8, 37, 13
    bm = radial_block_mask(
        f, s, decay_factor=0.3, block_size=8, sink=True, text_tokens=nt, text_position="last",
        granularity=granularity, text_valid=torch.tensor([13, 6]),
    )
    assert bm.to_dense().float().mean() < 0.8  # really sparse at token level
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, f * s + nt, 16, generator=g).requires_grad_() for _ in range(3))
    ref = sdpa_reference(q, k, v, bm)
    out = block_sparse_attention(q, k, v, bm, backend="auto")  # CPU + grad -> gather
    assert (out - ref).abs().max() <= 1e-5
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        assert (a - b).abs().max() <= 1e-5


def test_flex_token_rule_matches_sdpa_and_reuses_kernel():
    """One compile: the token rule runs inside FlexAttention; a new decay at the same shape reuses it."""
    f, s, nt = 4, 37, 20
    n = f * s + nt
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    kw = dict(block_size=16, sink=True, text_tokens=nt, text_position="last", granularity="token")
    bm = radial_block_mask(f, s, decay_factor=0.3, text_valid=torch.tensor([20, 9]), **kw)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, bm, backend="flex")
        assert (out - sdpa_reference(q, k, v, bm)).abs().max() <= 1e-5
        compiles = flex_backend.STATS.compiles
        bm2 = radial_block_mask(f, s, decay_factor=0.7, text_valid=torch.tensor([20, 15]), **kw)
        out2 = block_sparse_attention(q, k, v, bm2, backend="flex")
        assert flex_backend.STATS.compiles == compiles, "same shape must not recompile"
        assert (out2 - sdpa_reference(q, k, v, bm2)).abs().max() <= 1e-5


def _wan_layer():
    pipe = zoo.load("wan")
    return pipe.transformer.blocks[0].attn1


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_processor_gradients_match_sdpa(granularity):
    """Training through the processor: output and LoRA-style weight gradients equal the SDPA reference."""
    attn = _wan_layer()
    f, h, w = 5, 4, 6
    x = torch.randn(2, f * h * w, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("auto", "sdpa"):
        proc = RadialAttnProcessor(
            f, h, w, decay_factor=0.2, block_size=4, granularity=granularity, backend=backend, family="wan"
        )
        attn.zero_grad()
        out = proc(attn, x)
        out.square().sum().backward()
        results.append((out.detach(), attn.to_q.weight.grad.clone(), attn.to_v.weight.grad.clone()))
    (o1, gq1, gv1), (o2, gq2, gv2) = results
    assert (o1 - o2).abs().max() <= 1e-5
    assert gq1.abs().max() > 0
    assert (gq1 - gq2).abs().max() <= 1e-5 * max(1.0, gq2.abs().max().item())
    assert (gv1 - gv2).abs().max() <= 1e-5 * max(1.0, gv2.abs().max().item())
    # and it is not dense attention
    stock = attn.processor(attn, x)
    assert (o1 - stock).abs().max() > 1e-4


# ----- the processors on the zoo pipelines ------------------------------------------------------------

VIDEO = ["wan", "wan-i2v", "wan22", "hunyuan-video", "mochi", "cogvideox"]


def _kwargs(name, **extra):
    kw = dict(zoo.default_call_kwargs(name))
    # 5 latent frames x 4x4 tokens, so that frames 2 or more apart exist; latents (no VAE decode) are
    # what attention changes
    kw.update(height=64, width=64, num_frames=25 if name == "mochi" else 17, output_type="latent")
    kw.update(extra)
    return kw


def _run(pipe, name, **extra):
    out = pipe(**_kwargs(name, **extra)).frames
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _modules(pipe):
    return {
        f"{comp}.{n}": m
        for comp, model in diffattn.api.denoisers(pipe)
        for n, m in diffattn.processors.core.attention_modules(model).items()
    }


def _processors(pipe):
    return {key: m.processor for key, m in _modules(pipe).items()}


class _Pipes(dict):
    """Zoo pipelines and their stock outputs, built once per module."""

    def __missing__(self, name):
        pipe = zoo.load(name)
        self[name] = (pipe, _run(pipe, name))
        return self[name]


@pytest.fixture(scope="module")
def pipes():
    return _Pipes()


@pytest.fixture
def sparse_calls(monkeypatch):
    """(layer, step) of every call that ran the sparse core."""
    calls: list = []
    original = RadialAttnProcessor.attention

    def spy(self, q, k, v, layout, attn_mask):
        calls.append((layout.layer, self.context.step_index))
        return original(self, q, k, v, layout, attn_mask)

    monkeypatch.setattr(RadialAttnProcessor, "attention", spy)
    return calls


OPTS = dict(decay_factor=0.2, block_size=2, backend="gather")


@pytest.mark.parametrize("name", VIDEO)
def test_zoo_pipeline_radial(pipes, name, sparse_calls):
    pipe, base = pipes[name]
    steps = _kwargs(name)["num_inference_steps"]
    before = _processors(pipe)
    with diffattn.apply(pipe, "radial", **OPTS) as patch:
        sparse = _run(pipe, name)
        grid, n_text = patch.context.grid, patch.context.n_text
        changed = {id(layer) for _, _, layer, _, _ in patch.saved}
        now = _processors(pipe)
    # the mask at this size is really sparse
    f, h, w = grid
    assert f >= 5
    assert radial_density(f, h * w, decay_factor=0.2, block_size=2, sink=name.startswith("wan")) < 0.8
    assert np.isfinite(sparse).all()
    assert np.abs(sparse - base).max() > 1e-4, "radial attention must change the output"
    assert sparse_calls and {s for _, s in sparse_calls} == set(range(steps))
    # only video self-attention changed: cross-attention and the token refiner keep their processor objects
    modules = _modules(pipe)
    kept = {k for k in before if now[k] is before[k]}
    assert kept == {k for k, m in modules.items() if id(m) not in changed}
    assert all(isinstance(now[k], RadialAttnProcessor) for k in before if k not in kept)
    if name.startswith("wan"):
        assert {k for k in before if k.endswith("attn2")} <= kept
        assert {k for k in before if k.endswith("attn1")}.isdisjoint(kept)
    if name == "hunyuan-video":
        refiner = {k for k in before if "token_refiner" in k}
        assert refiner and refiner <= kept
        assert n_text > 0

    # dense for every step: bit-identical to stock, and the sparse core never runs
    sparse_calls.clear()
    with diffattn.apply(pipe, "radial", **OPTS, dense_timesteps=steps):
        assert np.array_equal(_run(pipe, name), base)
    assert not sparse_calls
    assert np.array_equal(_run(pipe, name), base), "restore must be bit-identical"
    assert all(_processors(pipe)[k] is v for k, v in before.items())


def test_dense_steps_and_layers(pipes, sparse_calls):
    pipe, base = pipes["wan22"]  # two transformers: the step index is the scheduler's, not a call count
    steps = _kwargs("wan22")["num_inference_steps"]
    for dense in (dict(dense_last_timesteps=steps), dict(dense_layers=99)):
        with diffattn.apply(pipe, "radial", **OPTS, **dense):
            assert np.array_equal(_run(pipe, "wan22"), base), dense
    assert not sparse_calls
    with diffattn.apply(pipe, "radial", **OPTS):
        sparse = _run(pipe, "wan22")
    sparse_calls.clear()
    # dense warm-up on the first step only: sparse on the second step alone, and a third result
    with diffattn.apply(pipe, "radial", **OPTS, dense_timesteps=1):
        warm = _run(pipe, "wan22")
    assert {s for _, s in sparse_calls} == {1}
    assert not np.array_equal(warm, base) and not np.array_equal(warm, sparse)
    sparse_calls.clear()
    with diffattn.apply(pipe, "radial", **OPTS, dense_last_timesteps=1, dense_layers=1):
        _run(pipe, "wan22")
    assert {s for _, s in sparse_calls} == {0}
    assert {layer for layer, _ in sparse_calls} == {"blocks.1.attn1"}


def test_hunyuan_dense_layers_count_dual_then_single_blocks(pipes, sparse_calls):
    pipe, _ = pipes["hunyuan-video"]
    dual = len(pipe.transformer.transformer_blocks)
    single = len(pipe.transformer.single_transformer_blocks)
    with diffattn.apply(pipe, "radial", **OPTS, dense_layers=dual + 1):
        _run(pipe, "hunyuan-video", num_inference_steps=1)
    assert single >= 2
    assert {layer for layer, _ in sparse_calls} == {f"single_transformer_blocks.{i}.attn" for i in range(1, single)}


@pytest.mark.parametrize("name", ["wan", "hunyuan-video", "mochi", "cogvideox"])
def test_every_pair_visible_equals_dense(pipes, name):
    """A processor set by hand on every layer, with a mask that keeps every pair, equals stock attention."""
    pipe, base = pipes[name]
    model = pipe.transformer
    saved = {n: m.processor for n, m in diffattn.processors.core.attention_modules(model).items()}
    grid = latent_grid(name, *(_kwargs(name)[k] for k in ("num_frames", "height", "width")))
    assert radial_density(grid[0], grid[1] * grid[2], decay_factor=100.0, block_size=4) == 1.0
    proc = RadialAttnProcessor(*grid, decay_factor=100.0, block_size=4, granularity="token", backend="gather")
    try:
        install_processor(model, proc)  # every attention layer, cross-attention and refiner included
        out = _run(pipe, name)
    finally:
        for n, m in diffattn.processors.core.attention_modules(model).items():
            if hasattr(m, "set_processor"):
                m.set_processor(saved[n])
            else:
                m.processor = saved[n]
    assert np.abs(out - base).max() <= 1e-5


@pytest.mark.parametrize("name", ["wan", "hunyuan-video", "mochi"])
def test_processor_by_hand_equals_apply(pipes, name):
    """One processor on every layer (the diffusers-native way) is stock on cross-attention and the refiner."""
    pipe, _ = pipes[name]
    with diffattn.apply(pipe, "radial", **OPTS):
        applied = _run(pipe, name)
    model = pipe.transformer
    saved = {n: m.processor for n, m in diffattn.processors.core.attention_modules(model).items()}
    grid = latent_grid(name, *(_kwargs(name)[k] for k in ("num_frames", "height", "width")))
    proc = RadialAttnProcessor(*grid, **OPTS)
    try:
        if hasattr(model, "set_attn_processor") and name != "mochi":
            model.set_attn_processor(proc)
        else:
            install_processor(model, proc)  # Mochi's attention is not reached by set_attn_processor
        by_hand = _run(pipe, name)
    finally:
        for n, m in diffattn.processors.core.attention_modules(model).items():
            if hasattr(m, "set_processor"):
                m.set_processor(saved[n])
            else:
                m.processor = saved[n]
    assert np.array_equal(by_hand, applied)


# ----- the command ----------------------------------------------------------------------------------------


def test_cli_mask_radial(tmp_path, capsys):
    png = tmp_path / "radial.png"
    args = ["mask", "radial", "--frames", "81", "--height", "480", "--width", "832", "--model", "wan"]
    assert main([*args, "--option", "decay_factor=0.2", "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "grid 21x30x52" in text and "32760 tokens" in text
    expected = radial_density(21, 1560, decay_factor=0.2, sink=True, granularity="block")
    assert f"block density {expected:.4f}" in text
    assert f"token density {radial_density(21, 1560, decay_factor=0.2, sink=True):.4f}" in text
    assert png.stat().st_size > 0
    assert main([*args[:3], "80", *args[4:], "--out", str(png)]) == 2
    assert "4k+1 frames" in capsys.readouterr().err
    # text layout from the model: CogVideoX puts 226 text tokens first
    assert main(["mask", "radial", "--frames", "9", "--height", "64", "--width", "64", "--model", "cogvideox",
                 "--block-size", "16", "--out", str(png)]) == 0
    assert "+ 226 text" in capsys.readouterr().out


# ------------------------------------------------------------------------- long-video recipe (training)


def _train_long_video(tmp_path, tag, attention, options, cpu=True, mixed_precision="no"):
    """Two steps of the long-video recipe on a 1-layer digits-video (shared with tests/test_cuda.py)."""
    from diffattn.lora.trainer import TrainConfig, Trainer

    from diffattn.testbed.data import MovingDigitsDataset, write_video_folder
    from diffattn.testbed.models import build

    data = tmp_path / "clips"
    if not data.exists():
        write_video_folder(MovingDigitsDataset(num_clips=2, num_frames=29, channels=3), data, progress=False)
    model = tmp_path / "model"
    if not model.exists():
        build("digits-video", num_layers=1, heads=2).save_pretrained(model)
    cfg = TrainConfig(
        recipe="long-video",
        model=str(model),
        data=str(data),
        output=str(tmp_path / tag),
        resolution=32,
        num_frames=29,  # 8 latent frames x 64 tokens
        max_steps=2,
        batch_size=2,
        learning_rate=1e-2,
        cpu=cpu,
        mixed_precision=mixed_precision,
        eval_samples=0,
        max_sequence_length=16,
        attention=attention,
        attention_options=options,
    )
    assert np.isfinite(Trainer(cfg).train().final_loss)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / tag / "pytorch_lora_weights.safetensors"))


def test_long_video_recipe_trains_through_radial_attention(tmp_path):
    """The recipe applies radial attention while training: with every pair visible it trains the same
    LoRA as dense attention (gradients through the engine equal dense ones); a sparse mask trains another."""
    from diffattn.lora.recipes import get_recipe

    assert get_recipe("long-video").attention == ("radial", {})
    dense = _train_long_video(tmp_path, "dense", "dense", {})
    # block 16 <= the narrowest window, decay 8 -> windows wider than a frame: every pair visible
    full = _train_long_video(tmp_path, "full", None, {"block_size": 16, "decay_factor": 8.0})
    sparse = _train_long_video(tmp_path, "sparse", None, {"block_size": 16, "decay_factor": 0.05})
    assert dense.keys() == full.keys() == sparse.keys() and len(dense) > 0
    for k in dense:
        torch.testing.assert_close(full[k], dense[k], atol=1e-5, rtol=1e-4)
    assert max((sparse[k] - dense[k]).abs().max().item() for k in dense) > 1e-4


def _length_extension_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "length_extension.py"
    spec = importlib.util.spec_from_file_location("length_extension", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_length_extension_script_end_to_end(tmp_path, monkeypatch):
    """The README's length-extension table command on a tiny untrained model: every condition is
    generated and scored, both LoRAs train, the JSON records the training and generation options."""
    import json
    import sys

    from diffattn.testbed import models as TM

    mod = _length_extension_script()
    folder = TM.save(TM.build("digits-video", num_layers=1, heads=2), tmp_path / "model", "digits-video")
    argv = ["length_extension.py", "--model", str(folder), "--samples", "2", "--trained-samples", "3", "--train-steps", "1", "--clips", "2",
            "--batch-size", "1", "--steps", "2", "--dense-timesteps", "1", "--factor", "2", "--out", str(tmp_path / "le")]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    result = json.loads((tmp_path / "le.json").read_text())
    assert [r["condition"][:3] for r in result["rows"]] == ["den", "rad", "(a)", "(b)", "(c)", "(d)", "rea"]
    assert result["frames"] == 61 and result["latent_frames"] == 16  # 2x the trained 8 latent frames
    assert "dense_timesteps" not in result["radial_options"]  # training is sparse on every step
    assert result["radial_generation_options"]["dense_timesteps"] == 1
    assert all(0.0 <= r["frame_accuracy"] <= 1.0 for r in result["rows"])
    assert result["rows"][-1]["frame_accuracy"] >= 0.9  # the real clips are read as their digit
    assert all(len(r["lora_fixed_set_loss"]) == 2 for r in result["rows"][4:6])
    assert (tmp_path / "le.png").is_file()
    # the trained-length rows draw --trained-samples videos and their gap is paired video by video
    assert [len(r["per_video"]) for r in result["rows"][:3]] == [3, 3, 2]
    gap = result["radial_minus_dense_trained_length"]
    per = [b - a for a, b in zip(result["rows"][0]["per_video"], result["rows"][1]["per_video"])]
    assert gap["videos"] == 3 and gap["mean"] == pytest.approx(sum(per) / 3, abs=1e-3)
    assert set(result["paired_differences_4x"]) == {"(b) - (a)", "(c) - (a)", "(c) - (b)", "(d) - (a)"}
    monkeypatch.setattr(sys, "argv", argv[:1] + ["--steps", "4", "--dense-timesteps", "5"])
    with pytest.raises(SystemExit):
        mod.main()
