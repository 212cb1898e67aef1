"""LaMamba blocks and LaMamba-Diff: window attention vs dense, scan orders, the U-Net, presets, I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffattn.models import SS2D, LaMambaBlock, LaMambaDiffModel, WindowAttention
from diffattn.models.ss2d import serpentine_scan_orders

TINY = dict(
    sample_size=16,
    embed_dim=16,
    num_heads=2,
    depths=(2, 2, 1, 1),
    bottleneck_depth=1,
    window_size=4,
    num_classes=10,
)


def tiny_model(**kw) -> LaMambaDiffModel:
    torch.manual_seed(0)
    return LaMambaDiffModel(**{**TINY, **kw})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero gates and outputs, so the whole network matters in a test."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() and (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# ----------------------------------------------------------------------------- window attention


def dense_window_reference(m: WindowAttention, x: torch.Tensor, shift: int) -> torch.Tensor:
    """Full attention over all h*w tokens with an explicit n x n block-diagonal (+shift) mask."""
    b, h, w, c = x.shape
    ws = m.window_size
    ws_h, ws_w = min(ws, h), min(ws, w)
    sh, sw = (shift if h > ws else 0), (shift if w > ws else 0)
    H, W = math.ceil(h / ws_h) * ws_h, math.ceil(w / ws_w) * ws_w
    r, cc = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    rs, cs = (r - sh) % H, (cc - sw) % W  # coordinates after the cyclic shift of the padded grid
    allowed = (
        (rs[:, None] // ws_h == rs[None] // ws_h)
        & (cs[:, None] // ws_w == cs[None] // ws_w)
        & ((r[:, None] < sh) == (r[None] < sh))  # wrapped and non-wrapped tokens never mix
        & ((cc[:, None] < sw) == (cc[None] < sw))
    )
    rel = (r[:, None] - r[None] + ws - 1) * (2 * ws - 1) + (cc[:, None] - cc[None] + ws - 1)
    bias = m.relative_position_bias_table[rel.clamp(0, (2 * ws - 1) ** 2 - 1)].permute(2, 0, 1)
    bias = bias.masked_fill(~allowed, float("-inf"))
    heads, hd = m.num_heads, c // m.num_heads
    q, k, v = m.qkv(x.reshape(b, h * w, c)).view(b, h * w, 3, heads, hd).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
    return m.proj(out).view(b, h, w, c)


@pytest.mark.parametrize("hw", [(8, 8), (7, 10), (9, 5), (3, 6), (13, 11)])
@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_dense_masked_reference(hw, shift):
    # tolerance: 1e-5 absolute, fp32 (observed ~2e-7)
    torch.manual_seed(0)
    m = WindowAttention(16, 2, window_size=4)
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, *hw, 16)
    torch.testing.assert_close(m(x, shift), dense_window_reference(m, x, shift), atol=1e-5, rtol=1e-5)


def test_window_attention_padding_is_transparent_and_bad_input():
    m = WindowAttention(8, 2, window_size=4)
    x = torch.randn(1, 6, 6, 8, requires_grad=True)
    out = m(x, 2)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and out.shape == x.shape
    with pytest.raises(ValueError, match="shift"):
        m(x, 4)
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention(10, 3)


# ----------------------------------------------------------------------------- scan orders


@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 7), (8, 8), (6, 9)])
def test_serpentine_scans_visit_each_token_once_through_neighbours(hw):
    h, w = hw
    paths, inverse = serpentine_scan_orders(h, w)
    assert paths.shape == (4, h * w)
    starts = set()
    for k in range(4):
        assert sorted(paths[k].tolist()) == list(range(h * w))
        assert torch.equal(paths[k][inverse[k]], torch.arange(h * w))  # round trip
        r, c = paths[k] // w, paths[k] % w
        steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
        assert (steps == 1).all(), f"scan {k} jumps"
        starts.add(int(paths[k][0]))
    if h > 1 and w > 1:
        assert len(starts) >= 3  # different corners
    # two row-wise scans then two column-wise scans
    if h > 1 and w > 1:
        assert int(paths[0][1] - paths[0][0]) == 1 and abs(int(paths[2][1] - paths[2][0])) == w


def test_ss2d_grid_order_roundtrip_and_shapes():
    torch.manual_seed(0)
    m = SS2D(8, d_state=1)
    for hw in [(5, 7), (4, 4), (1, 3)]:
        x = torch.randn(2, *hw, 8)
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    # a token's output depends on the whole grid (global context), through all four scans
    x = torch.randn(1, 5, 6, 8, requires_grad=True)
    m(x)[0, 2, 3].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


# ----------------------------------------------------------------------------- block and model


def test_block_is_identity_at_init():
    torch.manual_seed(0)
    blk = LaMambaBlock(16, 2, cond_dim=32, window_size=4, shift=True, cross_attention_dim=12)
    x, c = torch.randn(2, 5, 7, 16), torch.randn(2, 32)
    torch.testing.assert_close(blk(x, c, encoder_hidden_states=torch.randn(2, 3, 12)), x)
    randomize(blk)
    assert not torch.allclose(blk(x, c, encoder_hidden_states=torch.randn(2, 3, 12)), x)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        blk(x, c)


@pytest.mark.parametrize("hw", [(16, 16), (15, 9), (12, 20), (7, 7)])
def test_model_forward_odd_and_rectangular(hw):
    model = randomize(tiny_model()).eval()
    x = torch.randn(2, 4, *hw)
    out = model(x, torch.tensor([10, 500]), class_labels=torch.tensor([1, 3]))
    assert out.sample.shape == (2, 8, *hw)  # learned sigma: 2 x in_channels
    assert torch.isfinite(out.sample).all()
    (tup,) = model(x, 10, class_labels=torch.tensor([1, 3]), return_dict=False)
    assert tup.shape == out.sample.shape


def test_model_output_is_zero_at_init_and_trains():
    model = tiny_model()
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero final layer, as DiT
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = (model(x, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample.abs().sum() > 0


def test_text_conditional_variant():
    model = randomize(tiny_model(num_classes=0, cross_attention_dim=12)).eval()
    x, text = torch.randn(2, 4, 9, 11), torch.randn(2, 5, 12)
    out = model(x, 3, encoder_hidden_states=text).sample
    assert out.shape == (2, 8, 9, 11)
    assert not torch.allclose(out, model(x, 3, encoder_hidden_states=text.flip(0)).sample)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, 3)


def test_presets_and_unknown_preset():
    with torch.device("meta"):
        xl = LaMambaDiffModel.from_preset("XL")
        small = LaMambaDiffModel.from_preset("s", num_classes=10)
    n_xl = sum(p.numel() for p in xl.parameters())
    assert abs(n_xl / 652.5e6 - 1) < 0.03
    assert small.config.num_classes == 10 and small.config.embed_dim == 72
    with pytest.raises(ValueError, match=r"\['B', 'L', 'S', 'XL'\]"):
        LaMambaDiffModel.from_preset("XXL")


def test_xl_gflops_match_paper():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        xl = LaMambaDiffModel.from_preset("XL")
        x = torch.randn(1, 4, 32, 32)
        with FlopCounterMode(display=False) as fc:
            xl(x, torch.tensor([1.0]), torch.tensor([0]))
    gmacs = (fc.get_total_flops() / 2 + xl.scan_macs(1, 32, 32)) / 1e9
    assert abs(gmacs / 45.7 - 1) < 0.10


def test_save_load_roundtrip_and_mismatched_checkpoint(tmp_path):
    model = randomize(tiny_model()).eval()
    model.save_pretrained(tmp_path / "a")
    loaded = LaMambaDiffModel.from_pretrained(tmp_path / "a").eval()
    x = torch.randn(1, 4, 10, 12)
    torch.testing.assert_close(loaded(x, 5, torch.tensor([2])).sample, model(x, 5, torch.tensor([2])).sample)
    # weights of another configuration under this config: an error naming the mismatched keys
    other = tiny_model(embed_dim=24)
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"another LaMamba-Diff configuration") as err:
        LaMambaDiffModel.from_pretrained(tmp_path / "b")
    assert "pos_embed (checkpoint (1, 16, 16, 24), config (1, 16, 16, 16))" in str(err.value)
    assert "patch_embed.weight" in str(err.value)
    with pytest.raises(RuntimeError, match=r"size mismatch for pos_embed"):
        model.load_state_dict(other.state_dict())


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(1, 3, 8, 8), 1, torch.tensor([0]))
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_heads"):
        LaMambaDiffModel(**{**TINY, "num_heads": 3})


# ----------------------------------------------------------------------------- pipeline


def _pipe(vae: bool = False, text: bool = False):
    from diffattn.pipelines import LaMambaDiffPipeline
    from diffusers import DDIMScheduler

    from diffattn import zoo

    parts = {}
    if text:
        from transformers import CLIPTextModel

        tok = zoo.tiny_clip_tokenizer(model_max_length=8)
        parts["tokenizer"] = tok
        parts["text_encoder"] = CLIPTextModel(zoo.tiny_clip_config(tok)).eval()
    if vae:
        torch.manual_seed(0)
        parts["vae"] = zoo._vae_kl(4).eval()
    kw = dict(sample_size=8, in_channels=4 if vae else 3)
    if text:
        kw.update(num_classes=0, cross_attention_dim=parts["text_encoder"].config.hidden_size)
    model = randomize(tiny_model(**kw)).eval()
    return LaMambaDiffPipeline(transformer=model, scheduler=DDIMScheduler(num_train_timesteps=100), **parts)


def test_pipeline_pixel_space_cfg_and_roundtrip(tmp_path):
    from diffattn.pipelines import LaMambaDiffPipeline
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = _pipe()
    kw = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=3.0, output_type="np")
    img = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 8, 8, 3) and np.isfinite(img).all()
    pipe.save_pretrained(tmp_path / "p")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert isinstance(loaded, LaMambaDiffPipeline) and loaded.vae is None
    np.testing.assert_allclose(
        loaded(**kw, generator=torch.Generator().manual_seed(0)).images, img, atol=1e-5
    )
    # any scheduler; odd rectangular size in pixel space
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe(class_labels=3, height=7, width=10, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 7, 10)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[11])
    with pytest.raises(ValueError, match="not both"):
        pipe(class_labels=1, prompt="a digit")
    by_prompt = loaded(
        prompt=["1", "digit 2"],
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(by_prompt, img, atol=1e-6)  # prompts name the class labels
    with pytest.raises(ValueError, match="names no class label"):
        pipe(prompt="a cat")


def test_pipeline_latent_space_and_text(tmp_path):
    pipe = _pipe(vae=True)
    img = pipe(class_labels=[0], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3)  # 8x8 latent, VAE factor 2
    tpipe = _pipe(text=True)
    out = tpipe(prompt=["a cat", "a dog"], num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="prompt"):
        tpipe(num_inference_steps=1)


# ----------------------------------------------------------------------------- training recipe


def test_lamamba_recipe_trains_checkpoints_and_resumes(tmp_path):
    from diffattn.lora.trainer import TrainConfig, Trainer
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"digit {i % 3}")
    _pipe().save_pretrained(tmp_path / "model")
    base = dict(
        recipe="lamamba",
        model=str(tmp_path / "model"),
        data=str(data),
        output=str(tmp_path / "out"),
        resolution=8,
        cpu=True,
        eval_samples=2,
        batch_size=2,
        ema=True,
        caption_dropout=0.5,
        checkpoint_every=2,
        learning_rate=1e-3,
    )
    Trainer(TrainConfig(**base, max_steps=2)).train()
    assert (tmp_path / "out" / "checkpoints" / "step-000002" / "state.json").is_file()
    res = Trainer(TrainConfig(**base, max_steps=3, resume="latest")).train()
    assert res is not None
    log = (tmp_path / "out" / "logs" / "train_log.csv").read_text().splitlines()
    assert log[-1].startswith("3,")
    from diffusers import DiffusionPipeline

    trained = DiffusionPipeline.from_pretrained(tmp_path / "out" / "pipeline")
    start = _pipe().transformer
    assert any(not torch.equal(a, b) for a, b in zip(trained.transformer.parameters(), start.parameters()))
    assert trained(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------- diffattn.apply(..., "lamamba")


def _allowed_image_pairs(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Explicit (h*w, h*w) shifted-window rule on a padded grid, as in dense_window_reference."""
    ws_h, ws_w = min(ws, h), min(ws, w)
    sh, sw = (shift if h > ws else 0), (shift if w > ws else 0)
    H, W = math.ceil(h / ws_h) * ws_h, math.ceil(w / ws_w) * ws_w
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    rs, cs = (r - sh) % H, (c - sw) % W
    return (
        (rs[:, None] // ws_h == rs[None] // ws_h)
        & (cs[:, None] // ws_w == cs[None] // ws_w)
        & ((r[:, None] < sh) == (r[None] < sh))
        & ((c[:, None] < sw) == (c[None] < sw))
    )


@pytest.mark.parametrize("hw,shift,n_text", [((6, 6), 0, 0), ((7, 9), 2, 3), ((5, 8), 1, 4)])
def test_window_joint_attention_equals_dense_masked_reference(hw, shift, n_text):
    from diffattn.processors.lamamba import window_joint_attention

    torch.manual_seed(0)
    h, w = hw
    b, nh, d = 2, 2, 8
    q, k, v = (torch.randn(b, nh, h * w, d) for _ in range(3))
    tk, tv = (torch.randn(b, nh, n_text, d) for _ in range(2)) if n_text else (None, None)
    keep = torch.tensor([[True] * n_text, [True] * (n_text - 1) + [False]]) if n_text else None
    out = window_joint_attention(q, k, v, hw, 4, shift, tk, tv, keep)
    allowed = _allowed_image_pairs(h, w, 4, shift).expand(b, h * w, h * w)
    keys, vals = k, v
    if n_text:
        allowed = torch.cat([allowed, keep[:, None, :].expand(b, h * w, n_text)], dim=-1)
        keys, vals = torch.cat([k, tk], 2), torch.cat([v, tv], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed[:, None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _call(name):
    from diffattn import zoo

    kw = zoo.default_call_kwargs(name)  # a fresh generator every call
    kw["output_type"] = "np"
    return kw


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_apply_lamamba_on_pretrained_transformers(name):
    import diffattn
    from diffattn import zoo
    from diffattn.processors import LaMambaAttnProcessor

    pipe = zoo.load(name)
    base = pipe(**_call(name)).images
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    # a window covering the whole grid and a zero gate: exactly the stock attention
    with diffattn.apply(pipe, "lamamba", window_size=64) as patch:
        assert patch.layers
        np.testing.assert_allclose(pipe(**_call(name)).images, base, atol=2e-5)
        assert sum(p.numel() for p in pipe.transformer.parameters()) > n_params
    # small windows: at apply time the model is window-attention-only (the SS2D gate starts at zero)
    with diffattn.apply(pipe, "lamamba", window_size=2, ssm=False):
        window_only = pipe(**_call(name)).images
    assert np.abs(window_only - base).max() > 1e-3
    with diffattn.apply(pipe, "lamamba", window_size=2) as patch:
        np.testing.assert_allclose(pipe(**_call(name)).images, window_only, atol=1e-6)
        procs = [m for m in pipe.transformer.modules() if isinstance(m, LaMambaAttnProcessor)]
        assert procs and all(
            "processor.gate" in n for n, _ in pipe.transformer.named_parameters() if n.endswith(".gate")
        )
        assert {p.shift for p in procs} == ({0, 1} if len(procs) > 1 else {0})  # shifted on odd blocks
        with torch.no_grad():
            for p in procs:
                p.gate.fill_(0.5)
        assert np.abs(pipe(**_call(name)).images - window_only).max() > 1e-4  # the branch is live
    # restore: the same processors, no new parameters, bit-identical output
    assert sum(p.numel() for p in pipe.transformer.parameters()) == n_params
    np.testing.assert_array_equal(pipe(**_call(name)).images, base)


def test_lamamba_processor_gate_gets_gradient_and_bad_options():
    import diffattn
    from diffattn import zoo

    pipe = zoo.load("pixart")
    with diffattn.apply(pipe.transformer, "lamamba", window_size=2):
        model = pipe.transformer
        x = torch.randn(1, model.config.in_channels, 8, 8)
        text = torch.randn(1, 4, model.config.caption_channels)
        out = model(
            x,
            encoder_hidden_states=text,
            timestep=torch.tensor([3]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        out.sum().backward()
        gates = [p for n, p in model.named_parameters() if n.endswith("processor.gate")]
        assert gates and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    with pytest.raises(TypeError, match="window_size"):
        diffattn.apply(pipe, "lamamba", windowsize=4)
    with pytest.raises(ValueError, match="window_size"):
        diffattn.apply(pipe, "lamamba", window_size=0)
    assert "lamamba" in diffattn.methods()


def test_lamamba_lora_recipe_trains_new_parameters_and_loads_back(tmp_path):
    from diffattn.lora import adapters
    from diffattn.lora.trainer import TrainConfig, Trainer

    import diffattn
    from diffattn import zoo

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        from PIL import Image

        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
    out = tmp_path / "out"
    cfg = TrainConfig(
        recipe="lamamba-lora",
        model="zoo:sd3",
        data=str(data),
        output=str(out),
        resolution=16,
        cpu=True,
        eval_samples=0,
        batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        attention_options={"window_size": 2},
    )
    trainer = Trainer(cfg)
    trainer.train()
    names = trainer.param_names
    assert any(".processor.gate" in n for n in names) and any("lora_" in n for n in names)
    gate = dict(trainer.pipe.transformer.named_parameters())
    assert any(v.abs().sum() > 0 for n, v in gate.items() if n.endswith("processor.gate"))  # the gate moved
    trainer.pipe.transformer.eval()
    trained = trainer.pipe(**_call("sd3")).images
    fresh = zoo.load("sd3")
    diffattn.apply(fresh, "lamamba", window_size=2)
    adapters.load(fresh, out)
    np.testing.assert_allclose(fresh(**_call("sd3")).images, trained, atol=1e-4)


def test_digits_lamamba_build_size():
    from diffattn.testbed import models

    pipe = models.build("digits-lamamba")
    assert type(pipe).__name__ == models.get("digits-lamamba").pipeline_class
    n = sum(p.numel() for p in pipe.transformer.parameters())
    assert n * 4 / 2**20 <= 20  # fp32 weights within the testbed's 20 MB budget
    img = pipe(class_labels=[3], num_inference_steps=1, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_digits_lamamba_twenty_step_run(tmp_path):
    from diffusers import DiffusionPipeline

    from diffattn.testbed.lamamba import train

    rec = train(
        tmp_path / "out",
        run_dir=tmp_path / "run",
        max_steps=20,
        batch_size=8,
        num_images=64,
        eval_samples=4,
        log_every=5,
    )
    assert rec["steps"] == 20 and np.isfinite(rec["final_train_loss"]) and rec["size_mb"] <= 20
    pipe = DiffusionPipeline.from_pretrained(rec["out"])
    assert pipe(prompt=["a 3"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_low_precision_follows_dtype(dtype):
    x = torch.randn(2, 4, 9, 12)
    ref = randomize(tiny_model()).eval()(x, 5, torch.tensor([1, 2])).sample
    out = randomize(tiny_model()).eval().to(dtype)(x.to(dtype), 5, torch.tensor([1, 2])).sample
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=5e-2)
