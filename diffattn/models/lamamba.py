"""LaMamba blocks and the LaMamba-Diff U-Net (Fu et al., "LaMamba-Diff: Linear-Time High-Fidelity
Diffusion Models Based on Local Attention and Mamba").

A :class:`LaMambaBlock` is adaLN-Zero conditioned (9 chunks: shift, scale, gate for three branches)::

    x += g1 * SS2D(mod1(LN(x)))             # global context, linear in tokens
    x += g2 * WindowAttention(mod2(LN(x)))  # local detail, 8x8 windows, shifted on odd blocks
    [x += CrossAttention(LN(x), text)]      # text-conditional variant only
    x += g3 * MLP(mod3(LN(x)))

:class:`LaMambaDiffModel` is the reference's U-Net: a 1x1 (patch) embedding with a learnable absolute
position embedding; encoder stages of ``depths`` blocks at widths ``C, 2C, 4C, 4C`` where the first
``len(depths) - 2`` stages end in a patch merging (2x down: 32 -> 16 -> 8 -> 8 tokens a side at 256 px);
a bottleneck of ``bottleneck_depth`` blocks added residually; an SD-UNet-style decoder with one more
block per stage, additive skips and patch expanding; an adaLN final layer; learned sigma (twice the
input channels out). Any latent size works: odd sizes are padded (patch merging) and cropped back
(after patch expanding and at the output), and the position embedding is resized bicubically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from .ss2d import SS2D
from .window_attention import WindowAttention

# The reference ships XL only (configs/LaMamba-DIff-XL.yaml, 16 heads). S/B/L keep its layout and
# scale the width so the parameter counts sit near DiT-S/B/L (33M / 130M / 458M): our choice.
PRESETS: dict[str, dict[str, Any]] = {
    "S": dict(embed_dim=72, num_heads=6),
    "B": dict(embed_dim=144, num_heads=12),
    "L": dict(embed_dim=272, num_heads=16),
    "XL": dict(embed_dim=320, num_heads=16),
}
# The paper's figures at 256 px (latent 32x32) and 512 px, multiply-adds; XL from the issue / paper.
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "XL": {"params_m": 652.5, "gflops_256": 45.7, "gflops_512": 181.9}
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE-style 2D sine-cosine position embedding, ``(h, w, dim)`` (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the sin-cos position embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(n: int) -> torch.Tensor:
        out = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    eh, ew = axis(h), axis(w)
    return torch.cat([eh[:, None].expand(h, w, -1), ew[None].expand(h, w, -1)], dim=-1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens; the output projection starts at zero (identity at init)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, h, w, c = x.shape
        hd = c // self.num_heads
        q = self.to_q(x.reshape(b, h * w, c)).view(b, -1, self.num_heads, hd).transpose(1, 2)
        k = self.to_k(context).view(b, -1, self.num_heads, hd).transpose(1, 2)
        v = self.to_v(context).view(b, -1, self.num_heads, hd).transpose(1, 2)
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, h, w, c))


class LaMambaBlock(nn.Module):
    """One LaMamba block on a channels-last grid: ``forward(x (b, h, w, dim), c (b, cond_dim))``.

    ``shift``: shift the attention windows by half a window (set on every second block). The
    condition is projected to ``dim`` when ``project_condition`` or the widths differ. With
    ``cross_attention_dim`` the block also attends to ``encoder_hidden_states``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cond_dim: int,
        window_size: int = 8,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        project_condition: bool = False,
        cross_attention_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.shift = window_size // 2 if shift else 0
        self.condition_projection = (
            nn.Linear(cond_dim, dim) if (project_condition or cond_dim != dim) else nn.Identity()
        )
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(
            dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias
        )
        self.norm_swin = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        if cross_attention_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, cross_attention_dim, num_heads)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        self.zero_init()

    @torch.no_grad()
    def zero_init(self) -> None:
        """adaLN-Zero: every gate (and the cross-attention output) starts at zero: the block is the identity."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        if self.cross_attn is not None:
            nn.init.zeros_(self.cross_attn.to_out.weight)
            nn.init.zeros_(self.cross_attn.to_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(self.condition_projection(c))[:, None, None, :]
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = mod.chunk(9, dim=-1)
        x = x + g1 * self.op(modulate(self.norm(x), s1, sc1))
        x = x + g2 * self.attn(modulate(self.norm_swin(x), s2, sc2), shift=self.shift)
        if self.cross_attn is not None:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required by a text-conditional LaMamba block")
            x = x + self.cross_attn(self.norm_cross(x), encoder_hidden_states, encoder_attention_mask)
        return x + g3 * self.mlp(modulate(self.norm2(x), s3, sc3))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: LayerNorm(4C) + Linear(4C, out). Odd sides are zero-padded."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """One token -> ``scale x scale`` tokens: Linear(C, scale^2 * out) + rearrange + LayerNorm(out)."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2) -> None:
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        p = self.scale
        x = self.expand(x).view(b, h, w, p, p, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * p, w * p, self.out_dim))


class LaMambaDiffModel(ModelMixin, ConfigMixin):
    """LaMamba-Diff U-Net; ``forward(sample, timestep, class_labels=None, encoder_hidden_states=None)``
    like diffusers' ``DiTTransformer2DModel``, returning ``Transformer2DModelOutput(sample=...)``.

    ``num_classes`` > 0: class-conditional (label ``num_classes`` is the null label used for
    classifier-free guidance; labels are dropped with ``class_dropout_prob`` in training mode).
    ``cross_attention_dim``: text-conditional through cross-attention in every block. Both may be set.
    Named configurations: :meth:`from_preset` (``S``, ``B``, ``L``, ``XL``).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        learn_sigma: bool = True,
        patch_size: int = 1,
        embed_dim: int = 320,
        depths: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        bottleneck_depth: int = 2,
        decoder_extra_blocks: int = 1,
        num_heads: int = 16,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        ssm_d_state: int = 1,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        cross_attention_dim: int | None = None,
        frequency_embedding_size: int = 256,
    ) -> None:
        super().__init__()
        depths = list(depths)
        if len(depths) < 2:
            raise ValueError(f"depths needs at least 2 stages, got {depths}")
        if patch_size < 1 or sample_size < 1:
            raise ValueError(f"patch_size and sample_size must be >= 1, got {patch_size}, {sample_size}")
        n = len(depths)
        num_down = max(0, n - 2)  # the reference downsamples all but the last two stages
        dims = [embed_dim * 2 ** min(i, num_down) for i in range(n)]
        for d in dims:
            if d % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide every stage width {dims}")
        self.dims, self.num_down = dims, num_down
        self.out_channels = out_channels or (2 * in_channels if learn_sigma else in_channels)
        cond = dims[-1]
        block_kw = dict(
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            d_state=ssm_d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=ssm_dt_rank,
            d_conv=ssm_conv,
            conv_bias=ssm_conv_bias,
            cross_attention_dim=cross_attention_dim,
        )

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        grid = max(1, sample_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.t_embedder = TimestepEmbedder(cond, frequency_embedding_size)
        self.y_embedder = (
            nn.Embedding(num_classes + (1 if class_dropout_prob > 0 else 0), cond)
            if num_classes > 0
            else None
        )

        def stage(dim: int, depth: int, project: bool) -> nn.ModuleList:
            return nn.ModuleList(
                LaMambaBlock(dim, num_heads, cond, shift=bool(i % 2), project_condition=project, **block_kw)
                for i in range(depth)
            )

        self.down_blocks = nn.ModuleList(stage(dims[i], depths[i], False) for i in range(n))
        self.downsamplers = nn.ModuleList(
            PatchMerging(dims[i], dims[i + 1]) if i < num_down else nn.Identity() for i in range(n)
        )
        self.mid_blocks = stage(dims[-1], bottleneck_depth, False)
        dec = dims[::-1]
        self.up_blocks = nn.ModuleList(
            stage(dec[i], depths[::-1][i] + decoder_extra_blocks, True) for i in range(n)
        )
        # stage i of the decoder upsamples first when the matching encoder stage was at a higher resolution
        self.upsamplers = nn.ModuleList(
            PatchExpanding(dec[i - 1], dec[i]) if i >= n - num_down else nn.Identity() for i in range(n)
        )
        self.final_up = PatchExpanding(embed_dim, embed_dim, patch_size)
        self.final_condition_projection = nn.Linear(cond, embed_dim)
        self.norm_final = nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))
        self.final_linear = nn.Linear(embed_dim, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LaMambaDiffModel:
        """A named configuration (``S``, ``B``, ``L``, ``XL``) with any config field overridden."""
        key = name.upper() if isinstance(name, str) else name
        if key not in PRESETS:
            raise ValueError(f"unknown LaMamba-Diff preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any
    ) -> LaMambaDiffModel:
        """diffusers' ``from_pretrained``; weights that do not fit the saved config raise a ``ValueError``
        naming every mismatched, missing and unexpected key (diffusers names only the first)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ValueError as exc:
            if "expected shape" not in str(exc):
                raise
            detail = _checkpoint_mismatch(cls, pretrained_model_name_or_path, kwargs.get("subfolder"))
            if detail is None:
                raise
            raise ValueError(
                f"the checkpoint at {pretrained_model_name_or_path} was saved from another LaMamba-Diff "
                f"configuration than its config.json describes: {detail}"
            ) from exc

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The reference's init: xavier linears, sin-cos position embedding, adaLN-Zero, zero output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        g = self.pos_embed.shape[1]
        self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], g, g)[None].to(self.pos_embed.device))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, LaMambaBlock):
                m.zero_init()
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def _pos_embed(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        pe = self.pos_embed
        if pe.shape[1:3] != (h, w):
            pe = F.interpolate(
                pe.permute(0, 3, 1, 2).float(), size=(h, w), mode="bicubic", align_corners=False
            )
            pe = pe.permute(0, 2, 3, 1)
        return pe.to(dtype)

    def _condition(self, timestep, class_labels, batch: int, device, dtype) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timestep = timestep.to(device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise ValueError(
                f"timestep must be a scalar or have batch size {batch}, got {timestep.numel()} values"
            )
        c = self.t_embedder(timestep)
        if self.y_embedder is not None:
            null = self.config.num_classes
            if class_labels is None:
                if self.config.class_dropout_prob <= 0:
                    raise ValueError("class_labels is required: this model has no null (unconditional) label")
                class_labels = torch.full((batch,), null, device=device, dtype=torch.long)
            class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            if class_labels.numel() != batch:
                raise ValueError(f"class_labels must have batch size {batch}, got {class_labels.numel()}")
            if self.training and self.config.class_dropout_prob > 0:
                drop = torch.rand(batch, device=device) < self.config.class_dropout_prob
                class_labels = torch.where(drop, torch.full_like(class_labels, null), class_labels)
            c = c + self.y_embedder(class_labels)
        return c.to(dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample must be (batch, {self.config.in_channels}, height, width), got shape {tuple(sample.shape)}"
            )
        if self.config.cross_attention_dim is not None and encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states is required: this model is text-conditional")
        b, _, H, W = sample.shape
        p = self.config.patch_size
        ph, pw = -(-H // p) * p - H, -(-W // p) * p - W
        x = F.pad(sample, (0, pw, 0, ph)) if (ph or pw) else sample
        dtype = self.patch_embed.weight.dtype
        x = self.patch_norm(self.patch_embed(x.to(dtype)).permute(0, 2, 3, 1))
        x = x + self._pos_embed(x.shape[1], x.shape[2], x.dtype)
        c = self._condition(timestep, class_labels, b, x.device, x.dtype)
        ctx = dict(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)

        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamplers):
            for blk in blocks:
                x = blk(x, c, **ctx)
            skips.append(x)
            x = down(x)
        h = x
        for blk in self.mid_blocks:
            h = blk(h, c, **ctx)
        x = x + h
        for blocks, up, skip in zip(self.up_blocks, self.upsamplers, reversed(skips)):
            x = up(x)[:, : skip.shape[1], : skip.shape[2]]  # crop what padding added on the way down
            x = x + skip
            for blk in blocks:
                x = blk(x, c, **ctx)

        cf = self.final_condition_projection(c)[:, None, None, :]
        x = self.final_up(x)
        shift, scale = self.final_adaLN_modulation(cf).chunk(2, dim=-1)
        x = self.final_linear(modulate(self.norm_final(x), shift, scale))
        out = x.permute(0, 3, 1, 2)[:, :, :H, :W].contiguous()
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def scan_macs(self, batch: int, height: int, width: int) -> int:
        """Multiply-adds of every selective scan in one forward at latent ``height x width`` (analytic:
        ``torch.utils.flop_counter`` does not count the scan's elementwise ops)."""
        p = self.config.patch_size
        sizes = [(-(-height // p), -(-width // p))]
        for i in range(len(self.dims) - 1):
            h, w = sizes[-1]
            sizes.append((-(-h // 2), -(-w // 2)) if i < self.num_down else (h, w))
        total = 0
        for blocks, (h, w) in zip(self.down_blocks, sizes):
            total += sum(b.op.scan_macs(batch, h, w) for b in blocks)
        total += sum(b.op.scan_macs(batch, *sizes[-1]) for b in self.mid_blocks)
        for blocks, (h, w) in zip(self.up_blocks, reversed(sizes)):
            total += sum(b.op.scan_macs(batch, h, w) for b in blocks)
        return total


def _checkpoint_mismatch(cls: type, path: Any, subfolder: str | None) -> str | None:
    """Shape, missing and unexpected keys of a local safetensors checkpoint against its config."""
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(path) / (subfolder or "")
    files = sorted(folder.glob("*.safetensors"))
    if not folder.is_dir() or not files:
        return None
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in cls.from_config(cls.load_config(folder)).state_dict().items()
        }
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                found[k] = tuple(fh.get_slice(k).get_shape())
    shape = [
        f"{k} (checkpoint {found[k]}, config {expected[k]})"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]

    def part(name: str, keys: list[str]) -> str:
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"{len(keys)} {name}: " + ", ".join(keys[:8]) + more

    return "; ".join(
        part(n, k)
        for n, k in (("shape mismatches", shape), ("missing", missing), ("unexpected", unexpected))
        if k
    )
