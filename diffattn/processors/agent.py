"""``agent``: agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
Attention") as training-free diffusers processors.

A small set of agent tokens ``A`` sits between queries and keys::

    O = softmax(Q A^T * s2) @ (softmax(A K^T * s1) @ V) + k_shortcut * V

which costs O(N n) for n agents instead of O(N^2).

* :class:`AgentAttnProcessor` — AgentSD for UNet self-attention (``attn1`` of SD 1.x/2.x/SDXL). The
  layer's input features are split into one dst token per ``sx x sy`` window and the rest (ToMe);
  the ``agent_r = floor(N * agent_ratio)`` most similar src tokens are averaged into their dst tokens
  and those merged tokens, passed through ``to_q``, are the agents. Optionally the features themselves
  are merged with ``ratio`` before ``to_q/to_k/to_v`` and unmerged after ``to_out`` (ToMe for SD).
  Agents are used only where ``2 * (N - agent_r) < N - r`` (otherwise: ToMe with dense attention), as in
  the reference. A step schedule picks the settings: ``sx = sy = 4, ratio 0.4, agent_ratio 0.95`` for
  the first 40% of the steps, then ``sx = sy = 2, agent_ratio 0.5`` (which is ToMe only).
* :class:`PooledAgentAttnProcessor` — for transformers (Flux, SD3, PixArt, Wan): agents are the queries
  of the visual tokens average-pooled to ``num_agents`` per frame; text queries stay dense; agents see
  every key (text included), so the prompt reaches image tokens through them.

Differences from the reference (LeapLabTHU/Agent-Attention ``agentsd``, a fork of tomesd): the
similarity metric is the attention layer's input (the block's ``norm1`` output; the reference uses the
block input before the norm, which a processor does not see); ``ratio = 0`` keeps the agents (the
reference then skips agents too); the random dst choice is seeded by ``(seed, layer, step)`` instead of
a global generator, so classifier-free-guidance halves run separately get the same partition and a
seed reproduces an image; ties in the similarity sort are broken stably.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..context import AttentionContext, Grid, given_grid, layer_grid
from ..ops.agent_attention import agent_attention, agent_grid, pool_agents
from ..ops.host_copy import to_device_async
from ..ops.token_merging import bipartite_soft_matching, merge, num_dst, random_partition, unmerge
from ..registry import LayerInfo, Method, config_from
from .core import CoreAttnProcessor, note_dense_here
from .families import FAMILY_ATTR, NAME_ATTR, TEXT_ONLY_ATTR, infer_family
from .layout import TokenLayout, dense_core

__all__ = [
    "DEFAULT_SCHEDULE",
    "AgentAttnProcessor",
    "AgentConfig",
    "AgentPhase",
    "PooledAgentAttnProcessor",
    "agent_attention",
    "agent_grid",
    "pool_agents",
]

# ----- configuration ------------------------------------------------------------------------------------


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_stride(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class AgentPhase:
    """AgentSD settings for one phase of the denoising schedule.

    Attributes:
        sx, sy: dst window width and height in tokens (one dst token per window).
        ratio: fraction of the layer's tokens merged away before attention (ToMe); 0 disables it.
        agent_ratio: fraction of the tokens merged away to make the agents; the agents are the
            ``N - floor(N * agent_ratio)`` tokens left (at least one per window).
    """

    sx: int = 2
    sy: int = 2
    ratio: float = 0.4
    agent_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check_stride("sx", self.sx)
        _check_stride("sy", self.sy)
        _check_ratio("ratio", self.ratio)
        _check_ratio("agent_ratio", self.agent_ratio)


# The reference's recommendation: agents + ToMe for the first 40% of the steps, then ToMe only.
DEFAULT_SCHEDULE: tuple[tuple[float, AgentPhase], ...] = (
    (0.4, AgentPhase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95)),
    (1.0, AgentPhase(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)),
)

_PHASE_FIELDS = ("sx", "sy", "ratio", "agent_ratio")


def _as_phase(value: Any) -> AgentPhase:
    if isinstance(value, AgentPhase):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_PHASE_FIELDS))
        if unknown:
            raise TypeError(f"unknown phase setting(s) {unknown}; valid: {list(_PHASE_FIELDS)}")
        return AgentPhase(**value)
    raise TypeError(f"a schedule phase must be an AgentPhase or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class AgentConfig:
    """Options of the ``agent`` method (``diffattn.apply(pipe, "agent", **options)``).

    UNet (AgentSD):
        schedule: ``((until_fraction, phase), ...)`` with increasing ``until_fraction`` in (0, 1]; the
            phase used at a step is the first whose ``until_fraction`` exceeds the fraction of steps done
            (the last one also covers any later step). A phase is an :class:`AgentPhase` or a dict.
            Without a known step (a processor set by hand) the first phase is used.
        sx, sy, ratio, agent_ratio: when given, override that setting in every phase.
        k_scale2: the query-agent softmax scale is ``head_dim ** (-0.5 * k_scale2)``.
        k_shortcut: weight of the ``+ k_shortcut * V`` term.
        max_downsample: apply to layers whose spatial downsampling from the denoiser input is at most
            this (1, 2, 4, ...); ``None``: only the highest-resolution level with attention (SD 1.x/2.x:
            1, SDXL: 2).
        use_rand: random dst token inside each window (else its top-left token).
        seed: seeds the random dst choice together with the layer and the step.

    Transformers (pooled agents):
        num_agents: agents per (pooled) frame, arranged like the token grid (default 64 = 8 x 8).
        agent_frames: frames of the agent grid for video; ``None``: one per latent frame.
        dit_k_scale2, dit_k_shortcut: as ``k_scale2`` / ``k_shortcut``, for transformers (default: the
            paper's plain formula, scale ``head_dim ** -0.5`` and no shortcut).
    """

    schedule: tuple = DEFAULT_SCHEDULE
    sx: int | None = None
    sy: int | None = None
    ratio: float | None = None
    agent_ratio: float | None = None
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    max_downsample: int | None = None
    use_rand: bool = True
    seed: int = 0
    num_agents: int = 64
    agent_frames: int | None = None
    dit_k_scale2: float = 1.0
    dit_k_shortcut: float = 0.0

    def __post_init__(self) -> None:
        for name in ("sx", "sy"):
            if getattr(self, name) is not None:
                _check_stride(name, getattr(self, name))
        for name in ("ratio", "agent_ratio"):
            if getattr(self, name) is not None:
                _check_ratio(name, getattr(self, name))
        for name in ("k_scale2", "k_shortcut", "dit_k_scale2", "dit_k_shortcut"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        md = self.max_downsample
        if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1 or md & (md - 1)):
            raise ValueError(f"max_downsample must be None or a power of two >= 1, got {md!r}")
        if isinstance(self.num_agents, bool) or not isinstance(self.num_agents, int) or self.num_agents < 1:
            raise ValueError(f"num_agents must be an integer >= 1, got {self.num_agents!r}")
        if self.agent_frames is not None:
            _check_stride("agent_frames", self.agent_frames)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

        if isinstance(self.schedule, (str, bytes)) or not isinstance(self.schedule, Sequence) or not self.schedule:
            raise ValueError(f"schedule must be a non-empty sequence of (until_fraction, phase), got {self.schedule!r}")
        normalized, last = [], 0.0
        for entry in self.schedule:
            if not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"schedule entries must be (until_fraction, phase) pairs, got {entry!r}")
            until, phase = entry
            if isinstance(until, bool) or not isinstance(until, (int, float)) or not last < until <= 1.0:
                raise ValueError(
                    f"schedule fractions must increase within (0, 1]; got {until!r} after {last!r}"
                )
            last = float(until)
            normalized.append((last, _as_phase(phase)))
        object.__setattr__(self, "schedule", tuple(normalized))
        overrides = {k: getattr(self, k) for k in _PHASE_FIELDS if getattr(self, k) is not None}
        # not a field: derived from the fields above (and so out of __eq__/__repr__)
        object.__setattr__(self, "_phases", tuple((u, dataclasses.replace(p, **overrides)) for u, p in normalized))

    @property
    def phases(self) -> tuple[tuple[float, AgentPhase], ...]:
        """The schedule with the ``sx``/``sy``/``ratio``/``agent_ratio`` overrides applied."""
        return self._phases

    def phase_at(self, fraction: float | None) -> AgentPhase:
        """The settings for a step ``fraction`` of the way through denoising (``None``: the first phase)."""
        if fraction is None:
            return self.phases[0][1]
        for until, phase in self.phases:
            if fraction < until:
                return phase
        return self.phases[-1][1]


# ----- grids --------------------------------------------------------------------------------------------


def _downsampled(grid: Grid, n: int) -> tuple[int, int, int] | None:
    """``(downsample, h, w)`` of the UNet level of ``grid`` with ``n`` tokens (one frame), or None."""
    f, h, w = grid
    s = 1
    while s <= max(h, w):
        gh, gw = -(-h // s), -(-w // s)
        if f * gh * gw == n:
            return s, gh, gw
        s *= 2
    return None


def _seed(seed: int, key: int, step: int) -> int:
    return ((seed * 1_000_003 + key) * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF


# ----- UNet: AgentSD ------------------------------------------------------------------------------------

_TOP_LEVEL_ATTR = "_diffattn_agent_top_level"  # on the AttentionContext of one apply: see _make


@dataclass(frozen=True)
class _Plan:
    """What one AgentSD call does, fixed for a phase and a layer shape (so torch.compile guards hold)."""

    phase: AgentPhase
    h: int
    w: int
    r: int
    agent_r: int
    use_agents: bool


class AgentAttnProcessor(CoreAttnProcessor):
    """AgentSD for the self-attention layers of a UNet: a drop-in for ``AttnProcessor2_0``.

    Set by ``diffattn.apply(pipe, "agent", ...)``, or by hand::

        pipe.unet.set_attn_processor(AgentAttnProcessor(height=64, width=64))   # 512 px SD latents

    On every other call (cross-attention, masked attention, layers deeper than ``max_downsample``,
    other processor families) it runs the stock processor, bit-identically. Set by hand, with no
    ``height``/``width`` each layer's grid is taken as a square; ``max_downsample=None`` counts levels
    from the largest layer seen (a UNet's first attention call is its highest-resolution level, so SD
    and SDXL both get their top attention level); with no denoising step known the first phase of the
    schedule is used.

    Args:
        config: an :class:`AgentConfig`; ``**options`` are its fields (they override ``config``).
        context: the :class:`~diffattn.context.AttentionContext` that ``apply`` fills (grid, step).
        height, width: the latent token grid at the UNet input, when set by hand.
        layer_name: seeds the random dst choice (default: the module's recorded name, or the order
            in which layers were first seen).

    Under ``torch.compile`` the phase lookup and the random partition run outside the graph (one
    graph break per applied layer), so a phase is compiled once: no recompile within a phase.
    """

    context_parallel = (
        "AgentSD merges tokens over a UNet layer's whole token grid (UNets have no context-parallel plan); "
        "the pooled agent processor of the transformers does run under Ulysses"
    )

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        context: AttentionContext | None = None,
        height: int | None = None,
        width: int | None = None,
        layer_name: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.config = config_from(AgentConfig, config, options, "agent attention")
        self._own_grid = given_grid(None, height, width)
        self.context = context
        self.layer_name = layer_name
        self._largest = 0  # by hand without a grid: tokens of the highest-resolution level seen
        self._ordinals: dict[int, int] = {}
        self.last_phase: AgentPhase | None = None  # the phase of the latest applied call (introspection)
        # Fill the stock-processor cache now: filled inside a compiled graph it would change a guarded
        # dict and cost a recompile on the second call.
        self.stock_processor("sd", None)

    # ----- what the call needs to know --------------------------------------------------------------------

    def _level(self, base: Grid, hidden_states: torch.Tensor) -> tuple[int, int, int] | None:
        """``(downsample, h, w)`` of this call on the ``base`` grid, or None when it is no level of it."""
        if hidden_states.ndim == 4:
            h, w = hidden_states.shape[2], hidden_states.shape[3]
            found = _downsampled(base, h * w)
            return (found[0], h, w) if found is not None else None
        return _downsampled(base, hidden_states.shape[1])

    def _max_downsample(self, top: int | None) -> int:
        if self.config.max_downsample is not None:
            return self.config.max_downsample
        return top if top is not None else 1

    def family_of(self, attn: nn.Module, has_rotary: bool | None = None) -> str:
        # Like CoreAttnProcessor.family_of but without caching on the module: a cache filled inside a
        # compiled graph changes a guarded attribute and costs a recompile on the next call.
        return self.family or getattr(attn, FAMILY_ATTR, None) or infer_family(attn, has_rotary=has_rotary)

    def _eligible(self, attn: nn.Module, call_args: tuple) -> bool:
        hidden_states, encoder_hidden_states, attention_mask, rotary = call_args
        return (
            encoder_hidden_states is None
            and attention_mask is None
            and rotary is None
            and hidden_states.ndim in (3, 4)
            and self.family_of(attn) == "sd"
            and not getattr(attn, "is_cross_attention", False)
            and not getattr(attn, TEXT_ONLY_ATTR, False)
            and getattr(attn, "scale_qk", True)
        )

    def _layer_key(self, attn: nn.Module) -> int:
        name = self.layer_name or getattr(attn, NAME_ATTR, None)
        if name is not None:
            return zlib.crc32(name.encode())
        return self._ordinals.setdefault(id(attn), len(self._ordinals))

    @torch.compiler.disable
    def _draw(
        self, attn: nn.Module, shape: tuple[int, ...], level: tuple[int, int, int] | None, device: torch.device
    ) -> tuple[_Plan, torch.Tensor, torch.Tensor] | None:
        """The plan and the src/dst partition of this call, or None where AgentSD does not apply.

        Runs outside any compiled graph: the step changes every call but the returned plan only at phase
        changes, and only the plan is guarded on. ``level`` None means set by hand (no grid recorded by
        ``apply``): the grid comes from ``height``/``width`` or is taken as a square, and with
        ``max_downsample=None`` levels are counted from the largest layer seen (state kept here).
        """
        if level is None:
            n = shape[2] * shape[3] if len(shape) == 4 else shape[1]
            if len(shape) == 4:
                h, w = shape[2], shape[3]
                found = _downsampled(self._own_grid, n) if self._own_grid is not None else None
            elif self._own_grid is not None:
                found = _downsampled(self._own_grid, n)
                if found is None:
                    return None  # not a level of the given grid (e.g. a temporal attention)
                _, h, w = found
            else:
                found = None
                _, h, w = layer_grid(n, None, None, f"layer {getattr(attn, NAME_ATTR, None) or type(attn).__name__}")
            self._largest = max(self._largest, n)
            relative = max(1, round(math.sqrt(self._largest / n)))
            if self.config.max_downsample is None:
                ok = relative <= 1
            else:
                ok = (found[0] if found is not None else relative) <= self.config.max_downsample
            if not ok:
                return None
        else:
            _, h, w = level
            n = h * w
        ctx = self.context
        phase = self.config.phase_at(ctx.step_fraction if ctx is not None else None)
        step = ctx.step_index if ctx is not None and ctx.step_index is not None else 0
        if w < phase.sx or h < phase.sy:
            name = self.layer_name or getattr(attn, NAME_ATTR, "") or "a layer"
            raise ValueError(
                f"sx x sy = {phase.sx} x {phase.sy} does not fit the {h} x {w} token grid of {name}; use "
                "smaller sx/sy or a lower max_downsample"
            )
        gen = None
        if self.config.use_rand:
            gen = torch.Generator().manual_seed(_seed(self.config.seed, self._layer_key(attn), step))
        src, dst = random_partition(h, w, phase.sx, phase.sy, generator=gen, randomize=self.config.use_rand)
        n_src = n - num_dst(h, w, phase.sx, phase.sy)
        r = min(int(n * phase.ratio), n_src)
        agent_r = min(int(n * phase.agent_ratio), n_src)
        self.last_phase = phase
        if r == 0 and 2 * (n - agent_r) >= n:
            return None  # neither merging nor agents: the stock processor
        plan = _Plan(phase, h, w, r, agent_r, use_agents=2 * (n - agent_r) < n - r)
        return plan, to_device_async(src, device), to_device_async(dst, device)

    # ----- the call -----------------------------------------------------------------------------------------

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *,
        rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        text_len: int | None = None,
    ) -> Any:
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        if self._eligible(attn, (hidden_states, encoder_hidden_states, attention_mask, rotary)):
            ctx = self.context
            drawn = None
            if ctx is None or ctx.grid is None:
                drawn = self._draw(attn, tuple(hidden_states.shape), None, hidden_states.device)
            else:
                # with apply's grid the level is decided here, in the graph: it changes with the
                # resolution, not the step
                level = self._level(ctx.grid, hidden_states)
                if level is not None and level[0] <= self._max_downsample(getattr(ctx, _TOP_LEVEL_ATTR, None)):
                    drawn = self._draw(attn, tuple(hidden_states.shape), level, hidden_states.device)
            if drawn is not None:
                return self._agentsd(attn, hidden_states, temb, *drawn)
        # CoreAttnProcessor without a core calls the stock processor
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
            rotary_emb=rotary_emb, temb=temb, text_len=text_len,
        )

    def _agentsd(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None,
        plan: _Plan,
        src: torch.Tensor,
        dst: torch.Tensor,
    ) -> torch.Tensor:
        # AttnProcessor2_0's steps around the attention product, with merge before the projections and
        # unmerge after the output projection (to_out is per token, so unmerging after it is the same).
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]

        matching = bipartite_soft_matching(hidden_states, src, dst)
        x = merge(hidden_states, matching, plan.r) if plan.r else hidden_states
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if plan.use_agents:
            agents = heads(attn.to_q(merge(hidden_states, matching, plan.agent_r)))
            if attn.norm_q is not None:
                agents = attn.norm_q(agents)
            out = agent_attention(
                query, key, value, agents,
                agent_scale=head_dim ** (-0.5 * self.config.k_scale2),
                shortcut=self.config.k_shortcut,
            )
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if plan.r:
            out = unmerge(out, matching, plan.r)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def __repr__(self) -> str:
        return f"AgentAttnProcessor(layer={self.layer_name!r}, config={self.config})"


# ----- transformers: pooled agents ----------------------------------------------------------------------

_POOL_FAMILIES = ("sd", "sd3", "flux", "wan")


class PooledAgentAttnProcessor(CoreAttnProcessor):
    """Agent attention for transformer self-/joint attention: agents pooled from the visual queries.

    Visual queries attend to ``num_agents`` agents per frame (the queries average-pooled over the token
    grid); the agents attend to every key, text included; text queries keep dense attention.
    Cross-attention and per-query masks (regional prompting) stay dense, as do layers with fewer than
    ``2 * num_agents`` visual tokens. Training-free, it is an approximation of dense attention that
    the LoRA recipes can adapt a model to.

    Args:
        config: an :class:`AgentConfig` (``num_agents``, ``agent_frames``, ``dit_k_scale2``,
            ``dit_k_shortcut``); ``**options`` are its fields.
        context: the :class:`~diffattn.context.AttentionContext` ``apply`` fills (token grid).
        num_frames, height, width: the visual token grid after patchify, when set by hand
            (without them a square single-frame grid is inferred).
        family, text_len: as for :class:`~diffattn.processors.CoreAttnProcessor`.
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        context: AttentionContext | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        family: str | None = None,
        text_len: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(family=family, text_len=text_len)
        self.config = config_from(AgentConfig, config, options, "agent attention")
        self._own_grid = given_grid(num_frames, height, width)
        self.context = context
        if family is not None:  # see AgentAttnProcessor.__init__
            self.stock_processor(family, None)

    def family_of(self, attn: nn.Module, has_rotary: bool | None = None) -> str:
        # no caching on the module inside a compiled graph (see AgentAttnProcessor.family_of)
        return self.family or getattr(attn, FAMILY_ATTR, None) or infer_family(attn, has_rotary=has_rotary)

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        return not layout.is_cross and layout.family in _POOL_FAMILIES

    def grid(self, n_visual: int) -> Grid:
        """The visual token grid of a call with ``n_visual`` visual tokens."""
        return layer_grid(n_visual, self._own_grid, self.context, "PooledAgentAttnProcessor")

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        n = q.shape[2]
        n_visual = layout.n_visual(n)
        if layout.is_cross or n_visual <= 0 or (attn_mask is not None and attn_mask.shape[-2] != 1):
            return dense_core(q, k, v, layout, attn_mask)
        grid = self.grid(n_visual)
        ag = agent_grid(grid, self.config.num_agents, self.config.agent_frames)
        if 2 * ag[0] * ag[1] * ag[2] >= n_visual:
            note_dense_here(
                "agent", (self.config.num_agents, n_visual),
                f"{n_visual} visual tokens are fewer than 2 x the {ag[0] * ag[1] * ag[2]} agents (num_agents="
                f"{self.config.num_agents}): agents would not save work",
            )
            return dense_core(q, k, v, layout, attn_mask)
        vis = layout.visual_slice(n)
        qv = q[:, :, vis]
        agents = pool_agents(qv, grid, ag)
        head_dim = q.shape[-1]
        out = agent_attention(
            qv, k, v, agents, agent_scale=head_dim ** (-0.5 * self.config.dit_k_scale2), key_mask=attn_mask
        )
        if self.config.dit_k_shortcut:
            out = out + self.config.dit_k_shortcut * v[:, :, vis]
        if layout.n_text == 0:
            return out
        text = slice(0, layout.n_text) if layout.text_position == "first" else slice(n - layout.n_text, n)
        out_text = F.scaled_dot_product_attention(q[:, :, text], k, v, attn_mask=attn_mask)
        parts = [out_text, out] if layout.text_position == "first" else [out, out_text]
        return torch.cat(parts, dim=2)

    def __repr__(self) -> str:
        return f"PooledAgentAttnProcessor(family={self.family!r}, config={self.config})"


# ----- registration -------------------------------------------------------------------------------------

_UNET_MODELS = ("UNet2DConditionModel",)
_TRANSFORMER_MODELS = (
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "PixArtTransformer2DModel",
    "WanTransformer3DModel",
)


def _note_top_level(ctx: AttentionContext, name: str) -> None:
    """Record on the apply's context the downsampling of the UNet's highest-resolution attention level.

    ``down_blocks.{i}`` runs at downsampling ``2**i``; SDXL has no attention in ``down_blocks.0``.
    """
    found = re.match(r"down_blocks\.(\d+)\.", name)
    if found is None:
        return
    level = 2 ** int(found.group(1))
    top = getattr(ctx, _TOP_LEVEL_ATTR, None)
    setattr(ctx, _TOP_LEVEL_ATTR, level if top is None else min(top, level))


def _make(config: AgentConfig, ctx: AttentionContext, layer: LayerInfo) -> CoreAttnProcessor | None:
    if layer.is_cross:
        return None
    if layer.model in _UNET_MODELS:
        if layer.family != "sd":
            return None
        _note_top_level(ctx, layer.name)
        return AgentAttnProcessor(config, context=ctx, layer_name=layer.name)
    # other UNets (temporal / motion attention is not over an image grid) and non-denoisers stay stock
    if layer.model.startswith(("UNet", "Autoencoder", "VQModel", "ControlNet")):
        return None
    if "token_refiner" in layer.name:  # HunyuanVideo's prompt refiner: attention over text tokens only
        return None
    if layer.family in _POOL_FAMILIES:
        return PooledAgentAttnProcessor(config, context=ctx, family=layer.family)
    return None


def _attention(config: AgentConfig, grid: Grid, n_text: int, text_position: str | None) -> Callable[..., Any]:
    """Pooled agent attention on a bare (q, k, v) shape, for ``diffattn bench``."""
    proc = PooledAgentAttnProcessor(config, num_frames=grid[0], height=grid[1], width=grid[2])
    layout = TokenLayout("sd", n_text=n_text, text_position=text_position if n_text else None)
    return lambda q, k, v: proc.attention(q, k, v, layout, None)


METHOD = Method(
    name="agent",
    config=AgentConfig,
    families=_POOL_FAMILIES,
    make_processor=_make,
    models=(*_UNET_MODELS, *_TRANSFORMER_MODELS, "other transformers whose self-attention runs "
            "AttnProcessor2_0 / JointAttnProcessor2_0 / FluxAttnProcessor / WanAttnProcessor"),
    attention=_attention,
    description="agent attention: AgentSD (ToMe-merged agents + step schedule) for UNets, pooled agents for DiTs",
    per_layer=True,
)
