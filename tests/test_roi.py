"""ROICtrl adapter and the regional methods (``roi``, ``regional_mask``) on tiny zoo UNets."""

from __future__ import annotations

import pytest
import torch

import diffattn
from diffattn import zoo
from diffattn.models import ROICtrlAdapter
from diffattn.models.roictrl import ROIBlockAdapter
from diffattn.ops import roi_align, roi_unpool
from diffattn.processors.roi import (
    RegionInstances,
    RegionMaskAttnProcessor,
    RegionState,
    box_masks,
    set_instances,
    validate_instances,
)

BOXES = [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.95, 0.9], [0.0, 0.7, 0.3, 1.0]]


@pytest.fixture(scope="module")
def sd():
    return zoo.load("sd")


def _unet_inputs(unet, batch=2, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, hw, hw, generator=g)
    enc = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return x, enc


def _instances(unet, batch=2, boxes=BOXES, seed=1, n_text=5):
    g = torch.Generator().manual_seed(seed)
    b = torch.tensor(boxes).expand(batch, -1, -1).clone()
    emb = torch.randn(batch, len(boxes), n_text, unet.config.cross_attention_dim, generator=g)
    return RegionInstances(b, emb)


def _perturb(adapter: ROICtrlAdapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _small_adapter(unet, **kw):
    kw.setdefault("roi_sizes", (5, 4, 3))
    return ROICtrlAdapter.from_unet(unet, **kw)


def test_untrained_adapter_is_identity(sd):
    unet = sd.unet
    x, enc = _unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, 10, enc).sample
        adapter = _small_adapter(unet)
        with diffattn.apply(unet, "roi", adapter=adapter, instances=_instances(unet)) as patch:
            assert len(patch.layers) == len(adapter.config.layers) and all(n.endswith("attn2") for n in patch.layers)
            out = unet(x, 10, enc).sample
        after = unet(x, 10, enc).sample
    assert torch.equal(out, base)  # every gate is tanh(0) = 0: exactly the base output (target <= 1e-6)
    assert torch.equal(after, base)


def test_trained_adapter_changes_output_and_trains(sd):
    unet = sd.unet
    x, enc = _unet_inputs(unet)
    adapter = _small_adapter(unet)
    _perturb(adapter)
    with torch.no_grad():
        base = unet(x, 10, enc).sample
    with diffattn.apply(unet, "roi", adapter=adapter, instances=_instances(unet)) as patch:
        out = unet(x, 10, enc).sample
        assert (out - base).abs().max() > 1e-3 and torch.isfinite(out).all()
        out.square().mean().backward()
        grads = [p.grad for p in adapter.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        with torch.no_grad():  # no instances: base, bit-identical
            set_instances(patch, None)
            assert torch.equal(unet(x, 10, enc).sample, base)
    unet.zero_grad(set_to_none=True)


def _dense_fusion(block, hidden, base, boxes, embeds, mask, hw, p, cross):
    """Reference: full-map unpool of every instance and one softmax over N + 1 slots."""
    b, length, d = hidden.shape
    h, w = hw
    fmap = hidden.transpose(1, 2).reshape(b, d, h, w)
    roi = roi_align(fmap, boxes, p)
    n = boxes.shape[1]
    tok = roi.flatten(0, 1).flatten(2).transpose(1, 2)
    r = cross(tok, embeds.flatten(0, 1))
    r = r + torch.tanh(block.roi_alpha) * block.roi_attn(block.roi_norm(r))
    gate = block.instance_gate(r.mean(1))[:, 0].view(b, n)
    maps = roi_unpool(r.view(b, n, p, p, d).permute(0, 1, 4, 2, 3), boxes, hw)  # (B, N, D, H, W)
    inside = box_masks(boxes, hw).view(b, n, h, w) & mask[..., None, None]
    g = base.view(b, h, w, d)
    slots = torch.cat([g[:, None], maps.permute(0, 1, 3, 4, 2)], 1)  # (B, N+1, H, W, D)
    logits = block._slot_logit(slots)
    logits[:, 0] += block.global_gate
    logits[:, 1:] += gate[..., None, None]
    logits[:, 1:] = logits[:, 1:].masked_fill(~inside, float("-inf"))
    fused = (logits.softmax(1)[..., None] * slots).sum(1)
    return (g + torch.tanh(block.fuse_gate) * (fused - g)).reshape(b, length, d)


@pytest.mark.parametrize("group_elements", [None, 1], ids=["one_group", "group_per_instance"])
def test_online_fusion_matches_dense_softmax(monkeypatch, group_elements):
    """The windowed scatter fusion equals one dense softmax over full-size maps, output and gradients
    (1e-5), with boxes of different sizes, a padded slot, a box too thin to cover a pixel centre, and the
    instance windows processed at once or one per group."""
    if group_elements is not None:
        monkeypatch.setattr(ROIBlockAdapter, "FUSE_GROUP_ELEMENTS", group_elements)
    torch.manual_seed(0)
    d, h, w, p = 8, 12, 10, 4
    block = ROIBlockAdapter(d, 6, 2, gligen=False)
    with torch.no_grad():
        for prm in block.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    lin = torch.nn.Linear(6, d)

    def cross(tok, ctx):
        return tok + lin(ctx).mean(1, keepdim=True)

    hidden = torch.randn(2, h * w, d, requires_grad=True)
    base = torch.randn(2, h * w, d, requires_grad=True)
    boxes = torch.tensor(BOXES + [[0.51, 0.2, 0.54, 0.9]]).expand(2, -1, -1).clone()  # the last: no column centre
    boxes[1, 0] = torch.tensor([0.2, 0.0, 1.0, 0.45])
    embeds = torch.randn(2, 4, 5, 6)
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    got = block(hidden, base, boxes, embeds, mask, (h, w), p, cross)
    ref = _dense_fusion(block, hidden, base, boxes, embeds, mask, (h, w), p, cross)
    assert (got - ref).abs().max() <= 1e-5
    # outside every box: exactly the global output
    cover = (box_masks(boxes, (h, w)) & mask[..., None]).any(1)
    assert torch.equal(got[~cover], base.detach()[~cover])
    leaves = [hidden, base, *block.parameters(), *lin.parameters()]
    weight = torch.randn(got.shape)
    g_got = torch.autograd.grad((got * weight).sum(), leaves, allow_unused=True)
    g_ref = torch.autograd.grad((ref * weight).sum(), leaves, allow_unused=True)
    for a, e in zip(g_got, g_ref):
        if e is None:
            assert a is None or a.abs().max() == 0
            continue
        assert (a - e).abs().max() <= 1e-5 * max(1.0, e.abs().max().item())


def test_instance_order_and_padding_invariance(sd):
    unet = sd.unet
    x, enc = _unet_inputs(unet)
    adapter = _small_adapter(unet)
    _perturb(adapter, seed=3)
    inst = _instances(unet)
    perm = [2, 0, 1]
    permuted = RegionInstances(inst.boxes[:, perm], inst.embeds[:, perm])
    padded = RegionInstances(
        torch.cat([inst.boxes, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).expand(2, -1, -1)], 1),
        torch.cat([inst.embeds, 5 * torch.randn(2, 1, *inst.embeds.shape[2:])], 1),
        torch.tensor([[True, True, True, False]] * 2),
    )
    outs = []
    with torch.no_grad(), diffattn.apply(unet, "roi", adapter=adapter) as patch:
        for i in (inst, permuted, padded):
            set_instances(patch, i)
            outs.append(unet(x, 10, enc).sample)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert (outs[0] - outs[2]).abs().max() <= 1e-5


def test_windows_are_built_once_per_level_and_reused(sd):
    """The layers of one UNet level share one set of instance windows (kept on the batch-tiled instances),
    a second call reuses them and gives the same output bit for bit, and instances with autograd history
    are never cached."""
    unet = sd.unet
    x, enc = _unet_inputs(unet)
    adapter = _small_adapter(unet)
    _perturb(adapter, seed=4)
    inst = _instances(unet, batch=1)
    with torch.no_grad(), diffattn.apply(unet, "roi", adapter=adapter, instances=inst):
        first = unet(x, 10, enc).sample
        tiled = inst.cache[("batch", x.shape[0], x.device, enc.dtype)]
        windows = [k for k in tiled.cache if k[0] == "windows"]
        levels = {k[1:3] for k in windows}
        assert len(windows) == len(levels) >= 2
        second = unet(x, 10, enc).sample
        assert inst.cache[("batch", x.shape[0], x.device, enc.dtype)] is tiled
    assert torch.equal(first, second)
    fresh = _instances(unet, batch=1)
    fresh.embeds.requires_grad_(True)
    with diffattn.apply(unet, "roi", adapter=adapter, instances=fresh):
        third = unet(x, 10, enc).sample
    assert not fresh.cache and (third - first).abs().max() <= 1e-5


def test_stop_fraction_turns_adapter_off(sd):
    pipe = sd
    adapter = _small_adapter(pipe.unet)
    _perturb(adapter)
    kw = zoo.default_call_kwargs("sd")
    kw["num_inference_steps"] = 4
    kw["output_type"] = "latent"
    seen = []
    base = pipe(**kw).images
    inst = _instances(pipe.unet, batch=1)
    with diffattn.apply(pipe, "roi", adapter=adapter, instances=inst, stop_fraction=0.5) as patch:
        proc = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.processor
        real = proc.regional

        def spy(*a):
            seen.append(patch.context.step_index)
            return real(*a)

        proc.regional = spy
        kw["generator"] = torch.Generator().manual_seed(0)
        half = pipe(**kw).images
    assert sorted(set(seen)) == [0, 1]
    assert not torch.equal(half, base)


def test_regional_mask_baseline(sd):
    unet = sd.unet
    x, enc = _unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, 10, enc).sample
        # instances whose captions are the prompt itself: identical to the base model
        same = RegionInstances(torch.tensor(BOXES).expand(2, -1, -1), enc[:, None].expand(-1, 3, -1, -1))
        with diffattn.apply(unet, "regional_mask", instances=same):
            assert (unet(x, 10, enc).sample - base).abs().max() <= 1e-5
    # at one attention layer: outside the boxes the global output, inside the mean of covering instances
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    h = w = 8
    hs = torch.randn(2, h * w, attn.to_q.in_features)
    inst = _instances(unet)
    proc = RegionMaskAttnProcessor(RegionState(inst), None, hw=(16, 16))
    with torch.no_grad():
        out = proc(attn, hs, enc)
        glob = proc.stock(attn, hs, enc, None, None)
        per = torch.stack([proc.stock(attn, hs, inst.embeds[:, i], None, None) for i in range(3)], 1)
    m = box_masks(inst.boxes, (h, w)).float()[..., None]  # (B, N, HW, 1)
    cnt = m.sum(1)
    ref = torch.where(cnt > 0, (per * m).sum(1) / cnt.clamp(min=1), glob)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(out[cnt[..., 0] == 0], glob[cnt[..., 0] == 0])
    naive = RegionMaskAttnProcessor(RegionState(inst), None, hw=(16, 16), share_queries=False)
    with torch.no_grad():
        assert (naive(attn, hs, enc) - ref).abs().max() <= 1e-5


def test_adapter_save_load_roundtrip(sd, tmp_path):
    adapter = _small_adapter(sd.unet, gligen=False)
    _perturb(adapter)
    adapter.save_pretrained(tmp_path / "a")
    back = ROICtrlAdapter.from_pretrained(tmp_path / "a")
    assert back.config.layers == adapter.config.layers and not back.config.gligen
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_sdxl_untrained_identity():
    pipe = zoo.load("sdxl")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    enc = torch.randn(1, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        base = unet(x, 10, enc, added_cond_kwargs=added).sample
        adapter = _small_adapter(unet)
        with diffattn.apply(unet, "roi", adapter=adapter, instances=_instances(unet, batch=1)) as patch:
            assert len(patch.layers) == len(adapter.config.layers) > 0
            same = unet(x, 10, enc, added_cond_kwargs=added).sample
            _perturb(adapter)
            diff = unet(x, 10, enc, added_cond_kwargs=added).sample
    assert (same - base).abs().max() <= 1e-6
    assert (diff - base).abs().max() > 1e-4


def test_bad_input(sd):
    unet = sd.unet
    with pytest.raises(ValueError, match="adapter"):
        diffattn.apply(unet, "roi")
    with pytest.raises(ValueError, match="stop_fraction"):
        diffattn.apply(unet, "roi", adapter=_small_adapter(unet), stop_fraction=0.0)
    with pytest.raises(TypeError, match="valid options"):
        diffattn.apply(unet, "roi", adapter=_small_adapter(unet), boxes=1)
    with pytest.raises(ValueError, match="no branch"):
        other = ROICtrlAdapter(layers=["x.attn2"], dims=[8], cross_dims=[8], heads=[2])
        diffattn.apply(unet, "roi", adapter=other)
    assert diffattn.applied(unet) == []
    with pytest.raises(ValueError, match="embeds"):
        RegionInstances(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4, 8))
    with pytest.raises(ValueError, match="instance 1"):
        validate_instances([(0.1, 0.1, 0.5, 0.5), (0.5, 0.1, 0.4, 0.6)])
    with pytest.raises(ValueError, match="instance 0"):
        validate_instances([(0.1, 0.1, 1.5, 0.5)])
    with pytest.raises(ValueError, match="captions"):
        validate_instances([(0.1, 0.1, 0.5, 0.5)], ["a", "b"])
    with pytest.raises(ValueError, match="max_instances"):
        validate_instances([(0.1, 0.1, 0.5, 0.5)] * 31)
    with pytest.raises(ValueError, match="set_instances"):
        set_instances(unet, None)
