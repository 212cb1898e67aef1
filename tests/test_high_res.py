"""HighResPipeline (issue 8): two stages, LR tokens with scaled anchors under hilbert_local, bad sizes, LoRA."""

from __future__ import annotations

import pytest
import torch
from diffattn.pipelines import HighResPipeline
from diffattn.pipelines.high_res import sharpen, upsample_image

from diffattn import zoo
from diffattn.processors import HilbertLocalAttnProcessor
from diffattn.processors.core import attention_modules


def _highres(name="flux"):
    if name == "flux":
        pipe = zoo.load("flux")
    else:
        from diffattn.testbed import models

        pipe = models.build(name)
    hr = HighResPipeline(**pipe.components)
    hr.set_progress_bar_config(disable=True)
    return hr


def _call(hr, **kw):
    args = dict(prompt="a handwritten digit 3", height=64, width=64, lr_height=32, lr_width=32,
                num_inference_steps=3, hr_steps=2, radius=3, lr_window=4, backend="gather",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np")
    args.update(kw)
    return hr(**args)


@pytest.fixture(scope="module")
def flux():
    return _highres("flux")


def test_two_stages_with_lr_tokens_and_scaled_anchors(flux):
    hr = flux
    before = {n: m.processor for n, m in attention_modules(hr.transformer).items()}
    calls, seen = [], []

    def spy(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"].clone()))
        seen.append({type(m.processor) for m in attention_modules(module).values()})

    handle = hr.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = _call(hr, return_lr=True)
    finally:
        handle.remove()
    assert out.images.shape == (1, 64, 64, 3) and out.lr_images.shape == (1, 32, 32, 3)
    assert (out.images >= 0).all() and (out.images <= 1).all()
    h_tok = 64 // (hr.vae_scale_factor * 2)
    l_tok = 32 // (hr.vae_scale_factor * 2)
    # stage 1: 3 steps on LR tokens alone, stock attention; stage 2: 2 steps on [HR; LR], hilbert_local
    assert [n for n, _ in calls] == [l_tok**2] * 3 + [h_tok**2 + l_tok**2] * 2
    assert all(HilbertLocalAttnProcessor not in s for s in seen[:3])
    assert all(s == {HilbertLocalAttnProcessor} for s in seen[3:])
    ids = calls[-1][1]
    hr_ids, lr_ids = ids[: h_tok**2], ids[h_tok**2 :]
    assert hr_ids[:, 1].max() == h_tok - 1
    lr_plain = HighResPipeline._prepare_latent_image_ids(1, l_tok, l_tok, "cpu", ids.dtype)
    assert torch.equal(lr_ids[:, 1:], lr_plain[:, 1:] * (h_tok // l_tok)), "LR ids scaled by the HR/LR ratio"
    # the processors are given back
    assert all(m.processor is before[n] for n, m in attention_modules(hr.transformer).items())
    # local attention changes stage 2 against dense attention over the same tokens
    dense = _call(hr, local_attention=False)
    again = _call(hr)
    assert (again.images == out.images).all(), "seeded: deterministic"
    assert abs(dense.images - out.images).max() > 1e-4


def test_methods_applied_by_the_user_run_in_stage_2_only(flux):
    """A hilbert_local patch applied to the pipeline with the call's options gives the pipeline's own stage 2
    exactly (stage 1 runs the stock processors under it); an applied dense patch gives local_attention=False
    exactly; per-layer settings (a calibration's) reach stage 2."""
    import diffattn

    hr = flux
    own, dense = _call(hr), _call(hr, local_attention=False)
    seen = []

    def spy(module, args, kwargs):
        seen.append({type(m.processor).__name__ for m in attention_modules(module).values()})

    handle = hr.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with diffattn.apply(hr, "hilbert_local", radius=3, lr_window=4, backend="gather"):
            user = _call(hr, radius=1)  # the call's radius is not used: the applied patch is
    finally:
        handle.remove()
    assert all("HilbertLocalAttnProcessor" not in s for s in seen[:3]) and seen[3:] and all(
        s == {"HilbertLocalAttnProcessor"} for s in seen[3:]
    )
    assert (user.images == own.images).all()
    with diffattn.apply(hr, "dense"):
        assert (_call(hr).images == dense.images).all()
    names = diffattn.apply(hr, "hilbert_local", radius=3, lr_window=4, backend="gather")
    layer_names = names.layers
    names.remove()
    half = {n: ("dense" if i % 2 else {"radius": 1}) for i, n in enumerate(layer_names)}
    with diffattn.apply(hr, "hilbert_local", lr_window=4, backend="gather", layers=half):
        mixed = _call(hr)
    assert abs(mixed.images - own.images).max() > 1e-4 and abs(mixed.images - dense.images).max() > 1e-4
    assert not diffattn.applied(hr)


def test_calibrate_reaches_stage_2_only(monkeypatch):
    """diffattn.calibrate on a HighResPipeline: the sampled steps are stage 2's (``method_steps``), stage 1's
    calls are not recorded, and the result applies to stage 2."""
    import diffattn

    hr = _highres("digits-dit")
    call = dict(height=64, width=64, lr_height=32, lr_width=32, hr_steps=2, lr_window=4, max_sequence_length=16)
    assert hr.method_steps(num_inference_steps=3, hr_steps=2) == range(1, 3) and hr.method_steps() == range(10, 28)
    counts = []
    real = diffattn.calibration._Recorder.__exit__

    def count_exit(self, *exc):
        counts.append(self.calls.copy())
        return real(self, *exc)

    monkeypatch.setattr(diffattn.calibration._Recorder, "__exit__", count_exit)
    try:
        result = diffattn.calibrate(
            hr, "hilbert_local", ["a 3"], target=diffattn.Quality(psnr=5.0), num_inference_steps=6, sample_steps=3,
            candidates=[{"radius": 1, "lr_window": 4}, {"radius": 2, "lr_window": 4}], call_kwargs=call, progress=False,
            max_trials=2,
        )
    except diffattn.CalibrationError as e:  # tiny-model timings may make no candidate cheaper than dense
        assert "not reached" in str(e) or "dense" in str(e)
    else:
        assert result.layers and result.measured["psnr_db"] > 0
    # stage 2 runs steps 4 and 5 of 6 (hr_steps=2), once each (no CFG): both sampled, though sampling 3 of
    # the whole schedule's 6 steps would have hit stage 2 once
    assert counts and (counts[0] == 2).all(), counts
    assert not diffattn.applied(hr)


def test_testbed_dit():
    hr = _highres("digits-dit")
    out = _call(hr, true_cfg_scale=2.0, negative_prompt="")
    assert out.images.shape == (1, 64, 64, 3)


def test_bad_sizes(flux):
    unit = flux.vae_scale_factor * 2
    with pytest.raises(ValueError, match=f"height=62 must be a positive multiple of {unit}"):
        _call(flux, height=62)
    with pytest.raises(ValueError, match="same integer on both axes"):
        _call(flux, lr_height=24, lr_width=24)
    with pytest.raises(ValueError, match="same integer on both axes"):
        _call(flux, width=128, lr_height=32, lr_width=32)
    with pytest.raises(ValueError, match="together"):
        _call(flux, lr_height=32, lr_width=None)
    with pytest.raises(ValueError, match="hr_steps"):
        _call(flux, hr_steps=4)
    with pytest.raises(ValueError, match="radius"):
        _call(flux, radius=64)


def test_default_base_size():
    from diffattn.pipelines.high_res import _ratio

    assert _ratio(4096, 4096, None, None, 16) == 4
    assert _ratio(3072, 3072, None, None, 16) == 3
    assert _ratio(2048, 3072, None, None, 16) == 4  # 512 x 768: 3 does not divide 2048
    assert _ratio(1024, 1024, None, None, 16) == 1


def test_upsample_and_sharpen():
    img = torch.rand(1, 3, 8, 8)
    up = upsample_image(img, 32, 32)
    assert up.shape == (1, 3, 32, 32) and up.min() >= 0 and up.max() <= 1
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(sharpen(flat, 0.7), flat, atol=1e-6)


def test_lora_bridge_loads_with_load_lora_weights(flux, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = zoo.load("flux")
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                              init_lora_weights=False))
    layers = get_peft_model_state_dict(source.transformer)
    HighResPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers)
    hr = _highres("flux")
    base = _call(hr, num_inference_steps=2, hr_steps=1).images
    hr.load_lora_weights(tmp_path)
    assert hr.get_active_adapters()
    bridged = _call(hr, num_inference_steps=2, hr_steps=1).images
    assert abs(bridged - base).max() > 1e-4


def test_high_res_recipe_trains_and_loads(tmp_path):
    """Two steps of the LoRA bridge on zoo Flux: LR tokens reach the model, the bridge loads and runs."""
    import numpy as np
    from diffattn.lora.recipes import get_recipe
    from diffattn.lora.trainer import TrainConfig, Trainer
    from test_lora_helpers import write_images

    recipe = get_recipe("high-res")
    assert recipe.attention == ("hilbert_local", {"radius": 8, "lr_mode": "all"})
    data = write_images(tmp_path / "d", n=2, size=32)
    cfg = TrainConfig(recipe="high-res", model="zoo:flux", data=str(data), output=str(tmp_path / "o"), resolution=32,
                      max_steps=2, cpu=True, eval_samples=0, rank=4, attention_options={"radius": 3})
    trainer = Trainer(cfg)
    seen = []
    trainer.family.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True
    )
    assert np.isfinite(trainer.train().final_loss)
    unit = 2 * zoo.load("flux").vae_scale_factor
    n_hr, n_lr = (32 // unit) ** 2, (32 // 4 // unit) ** 2
    assert seen and set(seen) == {n_hr + n_lr}, "the model ran on [HR; LR] tokens"
    assert trainer.family.denoiser._diffattn_high_res_hooks[2].n_lr == n_lr, "LR tokens modulated at t=0"
    hr = _highres("flux")
    hr.load_lora_weights(str(tmp_path / "o"))
    names = [n for n, _ in hr.transformer.named_parameters() if "lora_A" in n]
    assert any("x_embedder" in n for n in names) and any("ff.net" in n for n in names)
    assert _call(hr, num_inference_steps=2, hr_steps=1).images.shape == (1, 64, 64, 3)


def test_lr_modulation(flux):
    """Per-token modulation: equal to stock when the LR timestep is the HR one; LR at t=0 changes the HR output."""
    from diffattn.pipelines.high_res import LRModulation

    model = flux.transformer
    g = torch.Generator().manual_seed(0)
    n_hr, n_lr = 16, 4
    kw = dict(
        hidden_states=torch.randn(1, n_hr + n_lr, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 6, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]),
        txt_ids=torch.zeros(6, 3),
        img_ids=torch.cat([HighResPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                           HighResPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32) * 2]),
        return_dict=False,
    )
    with torch.no_grad():
        stock = model(**kw)[0]
        with LRModulation(model, timestep=0.7) as mod:
            mod.n_lr = n_lr
            same = model(**kw)[0]
            mod.n_lr = 0
            off = model(**kw)[0]
        with LRModulation(model, timestep=0.0) as mod:
            mod.n_lr = n_lr
            clean = model(**kw)[0]
        after = model(**kw)[0]
    assert (same - stock).abs().max() <= 1e-5
    assert torch.equal(off, stock) and torch.equal(after, stock), "n_lr=0 and remove() give the stock model"
    assert (clean[:, :n_hr] - stock[:, :n_hr]).abs().max() > 1e-4, "LR at t=0 reaches the HR tokens"
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)


def test_from_pretrained_flux_folder(tmp_path):
    zoo.load("flux").save_pretrained(tmp_path)
    hr = HighResPipeline.from_pretrained(tmp_path)
    hr.set_progress_bar_config(disable=True)
    assert type(hr) is HighResPipeline
    assert _call(hr, num_inference_steps=2, hr_steps=1).images.shape == (1, 64, 64, 3)


def test_lr_only_lora_on_norm_and_ff():
    """Norm/FF LoRA acts on LR tokens only; split per-token calls equal the stock block otherwise."""
    from diffattn.pipelines.high_res import LRModulation, _AdaptersOff
    from peft import LoraConfig

    model = zoo.load("flux").transformer
    targets = ["norm1.linear", "norm.linear", "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    ff = model.transformer_blocks[0].ff
    x = torch.randn(1, 5, ff.net[0].proj.in_features)
    with torch.no_grad():
        with_lora = ff(x)
        with _AdaptersOff(True, ff):
            off = ff(x)
        model.disable_adapters()
        base = ff(x)
        model.enable_adapters()
        assert torch.equal(off, base) and (with_lora - base).abs().max() > 1e-4 and torch.equal(ff(x), with_lora)
    g = torch.Generator().manual_seed(0)
    n_hr, n_lr = 16, 4
    kw = dict(
        hidden_states=torch.randn(1, n_hr + n_lr, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 6, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]), txt_ids=torch.zeros(6, 3),
        img_ids=HighResPipeline._prepare_latent_image_ids(1, 4, 5, "cpu", torch.float32), return_dict=False,
    )
    with torch.no_grad():
        stock = model(**kw)[0]
        with LRModulation(model, timestep=0.7, lr_only_lora=False) as mod:
            mod.n_lr = n_lr
            split = model(**kw)[0]
        with LRModulation(model, timestep=0.7, lr_only_lora=True) as mod:
            mod.n_lr = n_lr
            lr_only = model(**kw)[0]
    assert (split - stock).abs().max() <= 1e-5, "the split forward is the stock block"
    assert (lr_only - stock).abs().max() > 1e-4, "HR tokens run norm/FF without their LoRA"
    assert all(not m._disable_adapters for m in model.modules() if hasattr(m, "_disable_adapters"))


def test_eval_script_border_seams():
    """The testbed check's seam figures: a planted jump at one window border is found there alone, and the
    LR guidance changes by two windows at the centre of a 4-window row, one at the other borders."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_high_res.py"
    spec = importlib.util.spec_from_file_location("eval_high_res", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    image = rng.random((32, 64, 3)) * 0.1
    image[:, 32:] += 0.5  # a step at pixel column 32: the border between the 2nd and 3rd 16-px windows
    seams = mod.border_seams(image, unit=2, window=8)
    assert len(seams) == 3 and seams[1] > 5 and max(seams[0], seams[2]) < 2
    assert mod.seam_ratio(image, unit=2) == pytest.approx(seams[1])
    assert mod.lr_context_changes(4) == [1, 2, 1]
    assert mod.lr_context_changes(2) == [0]
    assert mod.lr_context_changes(6) == [1, 2, 2, 2, 1]
