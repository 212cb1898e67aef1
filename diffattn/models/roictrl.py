"""The ROICtrl adapter (Gu et al., "ROICtrl: Boosting Instance Control for Visual Generation", CVPR 2025).

One :class:`ROIBlockAdapter` per UNet transformer block, run right after the block's cross-attention
(``attn2``) on the normed hidden states that cross-attention sees:

1. ROI-Align every instance box of those states to a ``P x P`` grid (``P`` by UNet level, 25/19/13/7 for
   SD's feature strides 8/16/32/64);
2. run the block's **own** pretrained cross-attention (shared weights, passed in as a callable) on each ROI
   against that instance's caption embedding;
3. a learned ROI self-attention, added through ``tanh(alpha)`` (``alpha = 0`` at init);
4. ROI-Unpool each ROI back onto the pixels its box covers and fuse the global cross-attention output
   with the instance maps by a per-pixel softmax over the ``N + 1`` slots. Logits: a 1x1 convolution of
   each slot's features plus a slot gate (a learned bias for the global slot; for an instance slot a linear
   function of its pooled ROI features, so the gate does not depend on instance order). A slot whose map is
   empty at a pixel is left out there. No instance map is ever full-size: each instance is unpooled onto
   a window around its box only, and the windows' softmax terms are scattered onto one running max, sum
   and weighted sum per pixel, so memory grows with the boxes' area, not with ``N x H x W`` (see
   :meth:`ROIBlockAdapter._fuse`);
5. the fused map enters through its own zero-initialised gate, ``global + tanh(a) * (fused - global)``;
6. optional (``gligen=True``): a GLIGEN-style gated self-attention over ``[visual tokens; grounding
   tokens]`` (grounding token = MLP of the box's Fourier embedding and the pooled instance caption) and a
   gated feed-forward, both through ``tanh(0) = 0`` gates at init.

At init every gate is zero, so the adapter returns the global cross-attention output unchanged (bit for
bit): an untrained adapter leaves the base model as it was.

Differences from the reference: the GLIGEN branch acts on the normed states cross-attention sees and adds
to cross-attention's output (the reference inserts it on the residual stream before cross-attention); the
ROI-Unpool covers the whole box (no zero strip along the right / bottom edges); fusion runs on box windows,
never on N full-size maps.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..ops.host_copy import to_device_async
from ..ops.roi_separable import BoxWindows, roi_align_windows, roi_unpool_windows

__all__ = ["MAX_INSTANCES", "ROIBlockAdapter", "ROICtrlAdapter", "fourier_box_embedding", "layer_key"]

MAX_INSTANCES = 30
# a ``roictrl`` training run (diffattn.lora) writes the adapter's config into this subfolder of its output
# and the weights into the output's extra-module file, keyed ``unet.roictrl_adapter.<parameter>``
RUN_SUBFOLDER = "roictrl_adapter"
RUN_WEIGHTS = "extra_modules.safetensors"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CrossAttention = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_key(name: str) -> str:
    """ModuleDict key of an attention layer's qualified name (dots are not allowed in keys)."""
    return name.replace(".", "__")


def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """``(..., 4)`` boxes -> ``(..., 8 * num_freqs)``: sin and cos of ``2^k * pi * coord`` (GLIGEN)."""
    freqs = (2.0 ** torch.arange(num_freqs, device=boxes.device, dtype=boxes.dtype)) * math.pi
    x = boxes[..., None] * freqs  # (..., 4, F)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2)


class _Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        mask = None if key_padding is None else key_padding[:, None, None, :]  # True = attend
        o = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)), attn_mask=mask)
        return self.to_out[1](self.to_out[0](o.transpose(1, 2).reshape(b, n, d)))


class ROIBlockAdapter(nn.Module):
    """The ROICtrl branch of one transformer block (see the module docstring).

    Args:
        dim: channels of the block's hidden states (``attn2.to_q.in_features``).
        cross_dim: channels of the caption embeddings (``attn2.to_k.in_features``).
        heads: heads of the learned attentions.
        gligen: add the gated self-attention over grounding tokens and the gated feed-forward.
        fourier_freqs: frequencies of the box Fourier embedding (GLIGEN branch).
    """

    # the zero-initialised scalar gates (a trainer may give them a larger learning rate)
    GATES = ("roi_alpha", "global_gate", "fuse_gate", "gsa_gate", "ff_gate")

    def __init__(self, dim: int, cross_dim: int, heads: int, gligen: bool = True, fourier_freqs: int = 8) -> None:
        super().__init__()
        self.dim, self.gligen, self.fourier_freqs = dim, gligen, fourier_freqs
        self.roi_norm = nn.LayerNorm(dim)
        self.roi_attn = _Attention(dim, heads)
        self.roi_alpha = nn.Parameter(torch.zeros(()))
        self.fuse_conv = nn.Conv2d(dim, 1, kernel_size=1)  # per-pixel slot logit
        self.global_gate = nn.Parameter(torch.zeros(()))
        self.instance_gate = nn.Linear(dim, 1)  # of an instance's pooled ROI features: order invariant
        self.fuse_gate = nn.Parameter(torch.zeros(()))
        for p in (*self.fuse_conv.parameters(), *self.instance_gate.parameters()):
            nn.init.zeros_(p)
        if gligen:
            self.box_mlp = nn.Sequential(
                nn.Linear(8 * fourier_freqs + cross_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
            )
            self.gsa_norm = nn.LayerNorm(dim)
            self.gsa = _Attention(dim, heads)
            self.gsa_gate = nn.Parameter(torch.zeros(()))
            self.ff_norm = nn.LayerNorm(dim)
            self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
            self.ff_gate = nn.Parameter(torch.zeros(()))

    def _slot_logit(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 conv on channels-last ``(..., D)`` -> ``(...)``."""
        return F.linear(x, self.fuse_conv.weight.view(1, -1).to(x.dtype), self.fuse_conv.bias.to(x.dtype))[..., 0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        global_out: torch.Tensor,
        boxes: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        hw: tuple[int, int],
        roi_size: int,
        cross_attention: CrossAttention,
        host_boxes: torch.Tensor | None = None,
        host_mask: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """The block's cross-attention output with the instances fused in.

        Args:
            hidden_states: ``(B, H*W, D)`` normed states that cross-attention saw.
            global_out: ``(B, H*W, D)`` cross-attention output for the global prompt.
            boxes: ``(B, N, 4)`` normalized xyxy; embeds: ``(B, N, L, Dc)`` instance caption embeddings;
            mask: ``(B, N)`` bool, False for padding.
            hw: the token grid ``(H, W)``; roi_size: ``P``.
            cross_attention: ``(tokens (M, T, D), context (M, L, Dc)) -> (M, T, D)``, the block's own ``attn2``.
            host_boxes, host_mask: CPU copies of ``boxes`` and ``mask`` (made here when not given).
            cache: a dict kept for one set of instances (the caller's). The valid instances' windows and
                weights per map size are stored there, so the layers of one UNet level build them once.
        """
        b, length, d = hidden_states.shape
        h, w = hw
        n = boxes.shape[1]
        dt = global_out.dtype
        p = roi_size
        # which instances run, and where their windows lie, are decided on the host: a device tensor read
        # per instance and layer would stall a GPU's queue once each (the caller passes host copies)
        if host_boxes is None or host_mask is None:
            host_boxes, host_mask = boxes.detach().cpu(), mask.cpu()
        key = ("windows", h, w, p, dt, boxes.device)
        if cache is not None and key in cache:
            windows, context = cache[key]
        else:
            valid_host = host_mask.reshape(-1).nonzero().flatten()
            if n == 0 or valid_host.numel() == 0:
                return global_out
            valid = to_device_async(valid_host, boxes.device)
            # one window per instance serves ROI-Align (every pixel its samples touch) and the fusion (every
            # pixel centre in the box)
            windows = BoxWindows.build(boxes.flatten(0, 1)[valid], host_boxes.reshape(-1, 4)[valid_host],
                                       valid_host // n, hw, p, dt)
            context = embeds.flatten(0, 1)[valid]
            if cache is not None:
                cache[key] = windows, context
        m = len(windows)
        # --- ROI branch on valid instances only, channels last throughout
        tokens = roi_align_windows(hidden_states.reshape(-1, d), windows)
        r = cross_attention(tokens.view(m, p * p, d), context)
        r = r + torch.tanh(self.roi_alpha).to(dt) * self.roi_attn(self.roi_norm(r))
        inst_gate = self.instance_gate(r.mean(1))[:, 0]  # (M,)
        fused = self._fuse(global_out.view(b, h, w, d), r.view(m, p, p, d), inst_gate, windows)
        out = global_out + torch.tanh(self.fuse_gate).to(dt) * (fused.reshape(b, length, d) - global_out)

        if self.gligen:
            key = ("grounding", length, self.fourier_freqs, dt)
            if cache is not None and key in cache:
                box_text, keep = cache[key]
            else:
                pooled = embeds.mean(2)  # (B, N, Dc)
                box_text = torch.cat([fourier_box_embedding(boxes.to(dt), self.fourier_freqs), pooled.to(dt)], -1)
                # no padded slot (the host copy says so without a sync): no mask, so SDPA may take a fused
                # kernel; a boolean mask over 16k + N keys sends it to a slower one
                keep = None if bool(host_mask.all()) else torch.cat([mask.new_ones(b, length), mask], 1)
                if cache is not None:
                    cache[key] = box_text, keep
            seq = torch.cat([hidden_states, self.box_mlp(box_text)], 1)
            gsa = self.gsa(self.gsa_norm(seq), key_padding=keep)[:, :length]
            out = out + torch.tanh(self.gsa_gate).to(dt) * gsa
            out = out + torch.tanh(self.ff_gate).to(dt) * self.ff(self.ff_norm(out))
        return out

    # elements of unpooled instance windows held at once; None: one full-size (B, H, W, D) map's worth or
    # 4M, whichever is larger, so many small boxes go through in one group and large ones in a few
    FUSE_GROUP_ELEMENTS: int | None = None

    def _fuse(self, g: torch.Tensor, maps: torch.Tensor, gates: torch.Tensor, windows: BoxWindows) -> torch.Tensor:
        """Per-pixel softmax over the global slot and the instances covering the pixel.

        ``g`` ``(B, H, W, D)`` global output; ``maps`` ``(M, P, P, D)`` instance ROI maps with instance gates
        ``gates`` ``(M,)``, and the instances' ``windows``. Returns the fused ``(B, H, W, D)``.

        Every instance is unpooled onto its window only. The slot logit is linear in the features, and
        bilinear unpooling is linear too, so the logits are the unpooled 1-channel logit maps. A first cheap
        pass gets every pixel's maximum logit (a scatter-max; treated as a constant, which the softmax is
        invariant to). A second pass, in groups bounded by :attr:`FUSE_GROUP_ELEMENTS`, scatter-adds each
        window's ``exp(logit - max)`` and its weighted features into the per-pixel sum and accumulator.
        Pixels outside every box keep exactly ``g``.
        """
        b, h, w, d = g.shape
        dt = g.dtype
        m, (wh, ww) = len(windows), windows.window
        flat_g = g.reshape(-1, d)
        logit_g = self._slot_logit(flat_g) + self.global_gate.to(dt)  # (B*H*W,)
        logit_maps = F.linear(maps, self.fuse_conv.weight.view(1, -1).to(dt))  # (M, P, P, 1): bias added below
        logit = roi_unpool_windows(logit_maps, windows)[..., 0] + (self.fuse_conv.bias.to(dt) + gates)[:, None, None]
        logit = logit.masked_fill(~windows.inside, float("-inf")).flatten()  # (M*h*w,)
        pix = windows.pixels.flatten()
        top = logit_g.detach().scatter_reduce(0, pix, logit.detach(), "amax", include_self=True)
        e_g = torch.exp(logit_g - top)
        total = e_g
        acc = flat_g * e_g[:, None]
        per = wh * ww
        budget = self.FUSE_GROUP_ELEMENTS or max(1 << 22, g.numel())
        group = max(1, budget // (per * d))
        for s in range(0, m, group):
            sl = slice(s, s + group)
            u = roi_unpool_windows(maps[sl], windows.select(sl))  # (k, h, w, D)
            idx = pix[s * per : (s + group) * per]
            e = torch.exp(logit[s * per : (s + group) * per] - top[idx])
            total = total.index_add(0, idx, e)
            acc = acc.index_add(0, idx, e[:, None] * u.reshape(-1, d))
        return (acc / total[:, None]).view(b, h, w, d)


class ROICtrlAdapter(ModelMixin, ConfigMixin):
    """ROICtrl's trainable modules for one UNet: a :class:`ROIBlockAdapter` per cross-attention layer.

    Build it for a UNet with :meth:`from_unet`; attach it with ``diffattn.apply(pipe, "roi", adapter=...)``.

    Args:
        layers: qualified names of the UNet's cross-attention modules (``...transformer_blocks.0.attn2``).
        dims: hidden channels of each layer; cross_dims: caption-embedding channels of each layer.
        heads: attention heads of each layer's learned attentions.
        roi_sizes: ROI grid ``P`` by UNet level (level 0 = the UNet's input resolution, feature stride 8
            in SD); deeper levels than listed use the last entry.
        max_instances: instances per image (ROICtrl: 30).
        gligen: include the gated self-attention + gated feed-forward branch.
        fourier_freqs: box Fourier embedding frequencies.
    """

    @register_to_config
    def __init__(
        self,
        layers: Sequence[str],
        dims: Sequence[int],
        cross_dims: Sequence[int],
        heads: Sequence[int],
        roi_sizes: Sequence[int] = (25, 19, 13, 7),
        max_instances: int = MAX_INSTANCES,
        gligen: bool = True,
        fourier_freqs: int = 8,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(dims) == len(cross_dims) == len(heads)):
            raise ValueError(
                f"layers, dims, cross_dims and heads must have one entry per layer; got lengths "
                f"{len(layers)}, {len(dims)}, {len(cross_dims)}, {len(heads)}"
            )
        if not roi_sizes or any(int(s) < 1 for s in roi_sizes):
            raise ValueError(f"roi_sizes must be a non-empty list of positive sizes, got {roi_sizes!r}")
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.blocks = nn.ModuleDict(
            {
                layer_key(name): ROIBlockAdapter(int(d), int(c), int(hd), gligen, fourier_freqs)
                for name, d, c, hd in zip(layers, dims, cross_dims, heads)
            }
        )

    @classmethod
    def from_unet(cls, unet: nn.Module, heads: int | None = None, **kwargs: Any) -> ROICtrlAdapter:
        """An untrained adapter for every cross-attention (``attn2``) of ``unet``'s transformer blocks.

        ``heads`` defaults to each ``attn2``'s own head count; other keyword arguments go to the config.

        Raises:
            ValueError: when ``unet`` has no cross-attention layer.
        """
        layers, dims, cross, nheads = [], [], [], []
        for name, module in unet.named_modules():
            if name.endswith("attn2") and hasattr(module, "to_q") and getattr(module, "is_cross_attention", False):
                layers.append(name)
                dims.append(module.to_q.in_features)
                cross.append(module.to_k.in_features)
                nheads.append(heads or module.heads)
        if not layers:
            raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers for ROICtrl")
        return cls(layers=layers, dims=dims, cross_dims=cross, heads=nheads, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> ROICtrlAdapter:
        """diffusers' ``from_pretrained`` (a ``save_pretrained`` folder or a hub id), and also what a ``roictrl``
        training run writes, as written: its output folder, or that folder's ``roictrl_adapter/`` subfolder
        (the config there, the weights in the output's ``extra_modules.safetensors``).

        Raises:
            ValueError: a training output without its weights file, or weights that do not fit the config.
        """
        path = Path(pretrained_model_name_or_path)
        run = None
        if path.is_dir() and not args and not kwargs.get("subfolder"):
            if (path / RUN_SUBFOLDER / "config.json").is_file() and not (path / "config.json").is_file():
                run = path  # the output folder
            elif (path / "config.json").is_file() and not any((path / w).is_file() for w in _DIFFUSERS_WEIGHTS):
                if (path.parent / RUN_WEIGHTS).is_file() or path.name == RUN_SUBFOLDER:
                    run = path.parent  # its roictrl_adapter/ subfolder
        if run is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        weights = run / RUN_WEIGHTS
        if not weights.is_file():
            raise ValueError(
                f"{str(path)!r} is a roictrl training folder without {RUN_WEIGHTS} in {str(run)!r}: the run has not "
                f"finished; load a checkpoint with diffattn.lora.recipe_roictrl.load_adapter(CHECKPOINT_FOLDER)"
            )
        adapter = cls.from_training_files(run / RUN_SUBFOLDER / "config.json", weights)
        dtype = kwargs.get("torch_dtype")
        return adapter.to(dtype) if dtype is not None else adapter

    @classmethod
    def from_training_files(cls, config_file: str | os.PathLike, weights_file: str | os.PathLike) -> ROICtrlAdapter:
        """An adapter from a training run's files: its ``config.json`` (extra keys such as ``stop_fraction``
        ignored) and a safetensors file whose ``...roictrl_adapter.<parameter>`` keys hold its weights
        (``extra_modules.safetensors``, or a checkpoint's ``trainable.safetensors``).

        Raises:
            ValueError: when the file lacks a weight of the adapter the config describes.
        """
        from safetensors.torch import load_file

        config = json.loads(Path(config_file).read_text())
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        adapter = cls(**{k: v for k, v in config.items() if k in names})
        prefix = RUN_SUBFOLDER + "."
        state = {k.split(prefix, 1)[1]: v for k, v in load_file(str(weights_file)).items() if prefix in k}
        missing, _ = adapter.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"{str(weights_file)!r} lacks {len(missing)} of the weights of the adapter {str(config_file)!r} "
                f"describes (e.g. {missing[0]})"
            )
        return adapter

    def block_for(self, layer: str) -> ROIBlockAdapter | None:
        """The branch of the layer named ``layer``, or ``None``."""
        key = layer_key(layer)
        return self.blocks[key] if key in self.blocks else None

    def roi_size(self, level: int) -> int:
        """The ROI grid side at UNet ``level`` (0 = full latent resolution; deeper levels clamp to the last)."""
        sizes = list(self.config.roi_sizes)
        return int(sizes[min(max(level, 0), len(sizes) - 1)])

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - processors call the blocks
        raise RuntimeError("ROICtrlAdapter runs inside the UNet: attach it with diffattn.apply(pipe, 'roi', adapter=...)")
