"""Methods composing with each other and with diffusers calls that replace processors: disjoint layers,
overlap refused, replaced processors caught, restore exact in any order, the per-layer summary."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import diffattn
from diffattn import zoo
from diffattn.processors import RegionInstances, set_instances

BOXES = [[0.0, 0.0, 0.5, 0.5], [0.4, 0.3, 1.0, 0.9]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return zoo.load("sd")


def _inputs(unet, batch=2, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, hw, hw, generator=g)
    enc = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return x, enc


def _instances(unet, batch=2):
    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor(BOXES).expand(batch, -1, -1).clone()
    return RegionInstances(boxes, torch.randn(batch, len(BOXES), 5, unet.config.cross_attention_dim, generator=g))


@torch.no_grad()
def _out(unet, x, enc):
    return unet(x, 10, enc).sample


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


def test_two_methods_on_disjoint_layers_in_one_call_or_in_turn(sd):
    unet = sd.unet
    x, enc = _inputs(unet)
    before = _processors(unet)
    base = _out(unet, x, enc)
    options = {"agent": {}, "regional_mask": {"instances": _instances(unet)}}
    with diffattn.apply(unet, "agent"):
        agent_only = _out(unet, x, enc)
    with diffattn.apply(unet, "regional_mask", **options["regional_mask"]):
        mask_only = _out(unet, x, enc)
    group = diffattn.apply(unet, options)
    assert [p.method for p in diffattn.applied(unet)] == ["agent", "regional_mask"]
    both = _out(unet, x, enc)
    set_instances(group, None)  # the group reaches its regional patch: without instances, agent alone
    assert torch.equal(_out(unet, x, enc), agent_only)
    set_instances(group, options["regional_mask"]["instances"])
    group.remove()
    assert diffattn.applied(unet) == []
    assert torch.equal(_out(unet, x, enc), base)
    # both methods act: the result differs from either alone and from the stock model
    for other in (base, agent_only, mask_only):
        assert (both - other).abs().max() > 1e-4
    # in turn gives the same output, and restore is exact in either order
    for order in ((0, 1), (1, 0)):
        first = diffattn.apply(unet, "agent")
        second = diffattn.apply(unet, "regional_mask", **options["regional_mask"])
        assert torch.equal(_out(unet, x, enc), both)
        patches = (first, second)
        patches[order[0]].remove()
        patches[order[1]].remove()
        assert torch.equal(_out(unet, x, enc), base)
        assert all(_processors(unet)[k] is v for k, v in before.items())


def test_agentsd_with_roictrl_regional_control(sd):
    """AgentSD on the UNet's self-attention and ROICtrl (a trained-looking adapter) on its cross-attention."""
    from diffattn.models import ROICtrlAdapter

    unet = sd.unet
    x, enc = _inputs(unet)
    base = _out(unet, x, enc)
    adapter = ROICtrlAdapter.from_unet(unet, roi_sizes=(5, 4, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained adapter is the identity: move it so the regional path acts
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    roi = {"adapter": adapter, "instances": _instances(unet)}
    with diffattn.apply(unet, "agent"):
        agent_only = _out(unet, x, enc)
    with diffattn.apply(unet, "roi", **roi):
        roi_only = _out(unet, x, enc)
    with diffattn.apply(unet, {"agent": {}, "roi": roi}) as group:
        assert [p.method for p in group.patches] == ["agent", "roi"]
        both = _out(unet, x, enc)
    for other in (base, agent_only, roi_only):
        assert (both - other).abs().max() > 1e-4
    agent = diffattn.apply(unet, "agent")
    regions = diffattn.apply(unet, "roi", **roi)
    assert torch.equal(_out(unet, x, enc), both)
    agent.remove()
    assert torch.equal(_out(unet, x, enc), roi_only)
    regions.remove()
    assert torch.equal(_out(unet, x, enc), base)


def test_two_methods_on_one_layer_are_refused_and_nothing_is_applied(sd):
    unet = sd.unet
    before = _processors(unet)
    with diffattn.apply(unet, "agent") as patch:
        with pytest.raises(ValueError, match=r"'dense'.*'agent'.*already applied"):
            diffattn.apply(unet, "dense")
        assert diffattn.applied(unet) == [patch]
    with pytest.raises(ValueError, match=r"'dense'.*'agent'"):
        diffattn.apply(unet, {"agent": {}, "dense": {}})
    assert diffattn.applied(unet) == []
    assert all(_processors(unet)[k] is v for k, v in before.items())
    with pytest.raises(TypeError, match="in the dict"):
        diffattn.apply(unet, {"agent": {}}, num_agents=4)


@pytest.mark.parametrize("replace", ["set_attn_processor", "attention_slicing", "fuse_qkv"])
def test_replaced_processors_are_caught_and_restore_is_exact(sd, replace):
    pipe, unet = sd, sd.unet
    x, enc = _inputs(unet)
    before = _processors(unet)
    base = _out(unet, x, enc)
    patch = diffattn.apply(pipe, "dense")
    dense = _out(unet, x, enc)
    if replace == "set_attn_processor":
        unet.set_attn_processor(AttnProcessor2_0())
    elif replace == "attention_slicing":
        pipe.enable_attention_slicing()
    else:
        unet.fuse_qkv_projections()
    assert patch.replaced, "the patch must say which layers were replaced"
    assert diffattn.applied(pipe) == [patch]
    assert "replaced by" in patch.summary()
    with pytest.raises(RuntimeError, match=r"'dense'.*replaced after diffattn.apply"):
        _out(unet, x, enc)
    if replace == "fuse_qkv":  # undoing the call brings diffattn's processors back
        unet.unfuse_qkv_projections()
        assert patch.replaced == []
        assert torch.equal(_out(unet, x, enc), dense)
    diffattn.restore(pipe)
    assert all(_processors(unet)[k] is v for k, v in before.items())
    assert torch.equal(_out(unet, x, enc), base)


def test_apply_after_fuse_then_unfuse():
    pipe = zoo.load("sd")
    x, enc = _inputs(pipe.unet)
    base = _out(pipe.unet, x, enc)
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        diffattn.apply(pipe, "dense")
    pipe.unet.unfuse_qkv_projections()
    with diffattn.apply(pipe, "dense"):
        np.testing.assert_allclose(_out(pipe.unet, x, enc), base, atol=2e-5, rtol=0)
    assert torch.equal(_out(pipe.unet, x, enc), base)


def test_summary_names_every_layer_with_what_runs_there():
    pipe = zoo.load("wan")
    kwargs = zoo.default_call_kwargs("wan")
    # 5 latent frames of 4x4 tokens: frames 2 or more apart exist, so the mask is really sparse
    kwargs.update(height=64, width=64, num_frames=17, output_type="latent")
    with diffattn.apply(pipe, "radial", granularity="token", block_size=4) as patch:
        text = patch.summary()
        assert "not run yet" not in text  # before a call: no backend line, but every layer is listed
        for layer in patch.layers:
            assert layer in text
        assert text.count("dense: cross-attention") == len(patch.skipped) > 0
        pipe(**kwargs)
        text = patch.summary()
    rows = [line for line in text.splitlines() if "radial: RadialAttnProcessor" in line]
    assert len(rows) == len(patch.layers)
    densities = [float(r.split("block density ")[1].split()[0]) for r in rows]
    assert all(0 < d < 1 for d in densities), rows  # really sparse at this size
    assert all("backend " in r for r in rows)


def test_a_mask_that_keeps_every_block_says_so_once():
    """Radial on a tiny video keeps every 128-token block: a warning says the layer runs dense, once."""
    from diffattn.processors import core

    pipe = zoo.load("wan")
    kwargs = zoo.default_call_kwargs("wan")
    core._DENSE_NOTES.clear()
    with diffattn.apply(pipe, "radial"):
        with pytest.warns(UserWarning, match="runs dense attention here: .*keeps every 128-token block"):
            pipe(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # once per shape, not per layer or call
            pipe(**zoo.default_call_kwargs("wan"))
    core._DENSE_NOTES.clear()
    with diffattn.apply(pipe, "radial", block_size=4, granularity="token"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # really sparse: no notice
            kwargs = zoo.default_call_kwargs("wan")
            kwargs.update(height=64, width=64, num_frames=17, output_type="latent")
            pipe(**kwargs)


def test_agents_on_too_few_tokens_say_so():
    from diffattn.processors import core

    pipe = zoo.load("flux")
    core._DENSE_NOTES.clear()
    with diffattn.apply(pipe, "agent", num_agents=64):
        with pytest.warns(UserWarning, match="agent runs dense attention here: .*fewer than 2 x"):
            pipe(**zoo.default_call_kwargs("flux"))
