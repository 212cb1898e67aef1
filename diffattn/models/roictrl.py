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
   empty at a pixel is left out there. The softmax is computed **online**, instance by instance (running
   max and sum over the box's pixel rectangle only), so memory grows with the boxes' area, not with
   ``N x H x W``;
5. the fused map enters through its own zero-initialised gate, ``global + tanh(a) * (fused - global)``;
6. optional (``gligen=True``): a GLIGEN-style gated self-attention over ``[visual tokens; grounding
   tokens]`` (grounding token = MLP of the box's Fourier embedding and the pooled instance caption) and a
   gated feed-forward, both through ``tanh(0) = 0`` gates at init.

At init every gate is zero, so the adapter returns the global cross-attention output unchanged (bit for
bit): an untrained adapter leaves the base model as it was.

Differences from the reference: the GLIGEN branch acts on the normed states cross-attention sees and adds
to cross-attention's output (the reference inserts it on the residual stream before cross-attention); the
ROI-Unpool covers the whole box (no zero strip along the right / bottom edges); fusion runs online.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..ops.roi_align import roi_align
from ..ops.roi_unpool import box_pixel_range, unpool_region

__all__ = ["MAX_INSTANCES", "ROIBlockAdapter", "ROICtrlAdapter", "fourier_box_embedding", "layer_key"]

MAX_INSTANCES = 30
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
    ) -> torch.Tensor:
        """The block's cross-attention output with the instances fused in.

        Args:
            hidden_states: ``(B, H*W, D)`` normed states that cross-attention saw.
            global_out: ``(B, H*W, D)`` cross-attention output for the global prompt.
            boxes: ``(B, N, 4)`` normalized xyxy; embeds: ``(B, N, L, Dc)`` instance caption embeddings;
            mask: ``(B, N)`` bool, False for padding.
            hw: the token grid ``(H, W)``; roi_size: ``P``.
            cross_attention: ``(tokens (M, T, D), context (M, L, Dc)) -> (M, T, D)``, the block's own ``attn2``.
        """
        b, length, d = hidden_states.shape
        h, w = hw
        n = boxes.shape[1]
        dt = global_out.dtype
        p = roi_size
        valid = mask.reshape(-1).nonzero().flatten()
        if n == 0 or valid.numel() == 0:
            return global_out
        # --- ROI branch on valid instances only
        fmap = hidden_states.transpose(1, 2).reshape(b, d, h, w)
        roi = roi_align(fmap, boxes, p)  # (B, N, D, P, P)
        tokens = roi.flatten(0, 1)[valid].flatten(2).transpose(1, 2)  # (M, P*P, D)
        context = embeds.flatten(0, 1)[valid]
        r = cross_attention(tokens, context)
        r = r + torch.tanh(self.roi_alpha).to(dt) * self.roi_attn(self.roi_norm(r))
        inst_gate = self.instance_gate(r.mean(1))[:, 0]  # (M,)
        full = r.new_zeros(b * n, p * p, d).index_copy(0, valid, r).view(b, n, p, p, d)
        gates = r.new_zeros(b * n).index_copy(0, valid, inst_gate).view(b, n)
        roi_maps = full.permute(0, 1, 4, 2, 3)  # (B, N, D, P, P)

        # --- online softmax over [global, instances] per pixel
        g = global_out.view(b, h, w, d)
        run_max = self._slot_logit(g) + self.global_gate.to(dt)
        run_sum = torch.ones_like(run_max)
        acc = g.clone()
        for i in range(n):
            present = mask[:, i]
            if not bool(present.any()):
                continue
            used = boxes[present, i]
            rows = box_pixel_range(used, h, axis=1)
            cols = box_pixel_range(used, w, axis=0)
            if rows[0] == rows[1] or cols[0] == cols[1]:
                continue
            vals, inside = unpool_region(roi_maps[:, i], boxes[:, i], (h, w), rows, cols)
            inside = inside[:, 0] & present[:, None, None]  # (B, h', w')
            u = vals.permute(0, 2, 3, 1)  # (B, h', w', D)
            logit = self._slot_logit(u) + gates[:, i, None, None]
            logit = logit.masked_fill(~inside, float("-inf"))
            sl = (slice(None), slice(*rows), slice(*cols))
            m_old, s_old, a_old = run_max[sl].clone(), run_sum[sl].clone(), acc[sl].clone()
            m_new = torch.maximum(m_old, logit)
            e_old, e_new = torch.exp(m_old - m_new), torch.exp(logit - m_new)
            run_max[sl] = m_new
            run_sum[sl] = s_old * e_old + e_new
            acc[sl] = a_old * e_old[..., None] + e_new[..., None] * u
        fused = acc / run_sum[..., None]
        out = g + torch.tanh(self.fuse_gate).to(dt) * (fused - g)
        out = out.reshape(b, length, d)

        if self.gligen:
            pooled = embeds.mean(2)  # (B, N, Dc)
            ground = self.box_mlp(torch.cat([fourier_box_embedding(boxes.to(dt), self.fourier_freqs), pooled.to(dt)], -1))
            seq = torch.cat([hidden_states, ground], 1)
            keep = torch.cat([mask.new_ones(b, length), mask], 1)
            gsa = self.gsa(self.gsa_norm(seq), key_padding=keep)[:, :length]
            out = out + torch.tanh(self.gsa_gate).to(dt) * gsa
            out = out + torch.tanh(self.ff_gate).to(dt) * self.ff(self.ff_norm(out))
        return out


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

    def block_for(self, layer: str) -> ROIBlockAdapter | None:
        """The branch of the layer named ``layer``, or ``None``."""
        key = layer_key(layer)
        return self.blocks[key] if key in self.blocks else None

    def roi_size(self, level: int) -> int:
        sizes = list(self.config.roi_sizes)
        return int(sizes[min(max(level, 0), len(sizes) - 1)])

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - processors call the blocks
        raise RuntimeError("ROICtrlAdapter runs inside the UNet: attach it with diffattn.apply(pipe, 'roi', adapter=...)")
