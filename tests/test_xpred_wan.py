"""digits-video's denoiser: stock Wan whose network predicts x0, returning a flow velocity."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffattn.testbed import models
from diffattn.testbed.xpred_wan import XPredictionWanTransformer3DModel

CFG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=64,
    ffn_dim=64,
    num_layers=2,
)


def _call(model, x, text, t):
    return model(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def _pair(min_sigma=0.05):
    torch.manual_seed(0)
    xpred = XPredictionWanTransformer3DModel(**CFG, min_sigma=min_sigma).eval()
    stock = WanTransformer3DModel(**CFG).eval()
    stock.load_state_dict(xpred.state_dict())
    return xpred, stock


def test_velocity_is_the_stock_networks_output_read_as_x0():
    xpred, stock = _pair(min_sigma=0.1)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(3, 4, 2, 32, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    t = torch.tensor([900.0, 300.0, 20.0])  # the last one is below min_sigma: clamped to 0.1
    with torch.no_grad():
        x0_hat = _call(stock, x, text, t)
        v = _call(xpred, x, text, t)
    sigma = torch.tensor([0.9, 0.3, 0.1]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, (x - x0_hat) / sigma, rtol=1e-5, atol=1e-5)
    # one Euler step of the flow ODE from sigma to 0 lands on the network's x0 (above min_sigma)
    torch.testing.assert_close((x - 0.9 * v)[:1], x0_hat[:1], rtol=1e-5, atol=1e-5)
    # a scalar timestep is broadcast, and return_dict gives the same tensor
    with torch.no_grad():
        out = xpred(x, timestep=torch.tensor(300.0), encoder_hidden_states=text).sample
        ref = _call(xpred, x, text, torch.full((3,), 300.0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_gradients_reach_every_layer():
    xpred, _ = _pair()
    x, text = torch.randn(2, 4, 2, 32, 32), torch.randn(2, 5, 32)
    _call(xpred, x, text, torch.tensor([500.0, 100.0])).square().mean().backward()
    missing = [
        n
        for n, p in xpred.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not [n for n in missing if "image_embedder" not in n], missing


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_sigma": 0.0}, "min_sigma"),
        ({"min_sigma": 1.5}, "min_sigma"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"out_channels": 8}, "out_channels"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XPredictionWanTransformer3DModel(**{**CFG, **kwargs})


def test_per_token_timesteps_are_refused():
    xpred, _ = _pair()
    x, text = torch.randn(2, 4, 2, 32, 32), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="timestep must be one value per sample"):
        _call(xpred, x, text, torch.full((2, 128), 500.0))


def test_digits_video_saves_and_loads_with_its_denoiser_class(tmp_path):
    from diffattn.lora.models import WanFamily, family_for

    pipe = models.build("digits-video", num_layers=1, heads=2)
    assert isinstance(pipe.transformer, XPredictionWanTransformer3DModel)
    assert isinstance(family_for(pipe), WanFamily)
    folder = models.save(pipe, tmp_path / "video", "digits-video")
    back = models.load_folder(folder, "digits-video")
    assert type(back.transformer) is XPredictionWanTransformer3DModel
    assert back.transformer.config.min_sigma == pipe.transformer.config.min_sigma
    x, text, t = torch.randn(1, 4, 2, 32, 32), torch.randn(1, 5, 32), torch.tensor([700.0])
    with torch.no_grad():
        torch.testing.assert_close(
            _call(back.transformer, x, text, t), _call(pipe.transformer, x, text, t), rtol=0, atol=1e-5
        )
    # the stock (velocity-predicting) class stays buildable and loadable under the same name
    stock = models.build("digits-video", num_layers=1, heads=2, x_prediction=False)
    assert type(stock.transformer) is WanTransformer3DModel
    assert (
        type(models.load_folder(models.save(stock, tmp_path / "stock", "digits-video")).transformer)
        is WanTransformer3DModel
    )
