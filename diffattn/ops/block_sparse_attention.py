"""The one entry point every sparse method goes through.

Backends:

- ``flex``: FlexAttention compiled once per shape and mask signature; forward everywhere, backward on
  GPU only (torch has no flex backward on CPU).
- ``gather``: on CPU in fp32 the forward runs the native C++ kernel (``native_cpu``: every kept run of
  key blocks read in place, one online softmax per query block) where it is built; otherwise, and for
  rows needing token checks, plain torch reads runs of kept key blocks in place (strided views) and
  gathers the rest, then runs the fused SDPA kernel; forward and backward on every device, memory
  bounded by chunking. The CPU training path: its backward recomputes each piece from the saved
  log-sum-exp, so no gathered block is kept between the passes.
- ``sdpa``: dense ``scaled_dot_product_attention`` with the expanded token mask. The reference the
  others are tested against; its memory is ``q_len x kv_len``, so small shapes only.

``auto`` is deterministic and :func:`resolve_backend` tells which backend a call will use:

- ``gather`` when gradients are needed on CPU (no flex backward there) or when the whole problem is a
  single block (compiling costs more than it saves);
- on CPU in fp32 with the native kernel built (``native_cpu``), ``gather`` when at least half of the
  kept blocks are in rows it runs (rows without token checks): it reads every kept run in place at
  0.94-1.08 of dense SDPA's speed per score (band masks, 8k-32k tokens), where compiled flex's CPU
  kernel reaches about 0.65 (token-rule masks, whose rows all need checks, keep the rules below);
- otherwise on CPU without gradients, ``gather`` when at least half of the kept blocks are read in place
  (rows made of one run of blocks, and runs of at least 4 blocks in other rows: bands, radial masks up
  to a few dozen frames; ``gather`` then runs the fused SDPA kernel on long queries, measured faster
  than compiled flex), else ``flex`` (short scattered runs: gathering them costs more);
- ``flex`` otherwise (GPU).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from . import flex_backend
from .block_mask import BlockMask
from .gather_attention import cpu_kernel, gather_attention, in_place_fraction, native_fraction

Backend = Literal["auto", "flex", "gather", "sdpa"]
BACKENDS: tuple[str, ...] = ("auto", "flex", "gather", "sdpa")


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMask, scale: float | None = None):
    """Dense attention with the expanded token mask; rows with no visible key give zeros."""
    mask = bm.to_dense(q.shape[0], q.shape[1]).to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.float32:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))
    # low precision: softmax in fp32 so the reference stays the reference
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v.float()).to(q.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMask, backend: str = "auto") -> str:
    """The backend a call with these inputs will run on."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.device.type == "cpu" and _needs_grad(q, k, v):
        return "gather"
    if bm.q_blocks * bm.k_blocks <= 1:
        return "gather"
    if q.device.type == "cpu":
        if cpu_kernel(q) == "native" and native_fraction(bm) >= 0.5:
            return "gather"
        if in_place_fraction(bm) >= 0.5:
            return "gather"
    ok, why = flex_backend.available()
    if not ok:
        raise RuntimeError(f"backend 'auto' needs FlexAttention here: {why}")
    return "flex"


def _as_block_mask(
    block_mask: torch.Tensor | BlockMask, q: torch.Tensor, k: torch.Tensor, block_size: int
) -> BlockMask:
    if isinstance(block_mask, BlockMask):
        bm = block_mask
        if (bm.q_len, bm.kv_len) != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"block_mask is for q_len={bm.q_len}, kv_len={bm.kv_len} but q has shape {tuple(q.shape)} "
                f"and k has shape {tuple(k.shape)}"
            )
    elif isinstance(block_mask, torch.Tensor):
        try:
            bm = BlockMask(block_mask, q.shape[2], k.shape[2], block_size)
        except ValueError as e:
            raise ValueError(
                f"block_mask of shape {tuple(block_mask.shape)} does not fit q of shape {tuple(q.shape)} and "
                f"k of shape {tuple(k.shape)}: {e}"
            ) from None
    else:
        raise TypeError(f"block_mask must be a bool tensor or diffattn.ops.BlockMask, got {type(block_mask).__name__}")
    b, h = q.shape[0], q.shape[1]
    if bm.bitmap.shape[0] not in (1, b) or bm.bitmap.shape[1] not in (1, h):
        raise ValueError(
            f"block_mask bitmap of shape {tuple(bm.bitmap.shape)} does not broadcast to batch={b}, heads={h}"
        )
    if bm.key_padding is not None and bm.key_padding.shape[0] != b:
        raise ValueError(f"key_padding has batch {bm.key_padding.shape[0]} but q has batch {b}")
    if bm.bitmap.device != q.device:
        bm = bm.to(q.device)
    return bm


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | BlockMask,
    block_size: int = 128,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention restricted to the kept blocks of ``block_mask``.

    Args:
        q: ``(batch, heads, q_len, head_dim)``.
        k, v: ``(batch, heads, kv_len, head_dim)``; ``kv_len`` may differ from ``q_len`` and neither needs
            to be a multiple of ``block_size``.
        block_mask: bool bitmap ``(q_blocks, k_blocks)``, ``(heads, q_blocks, k_blocks)`` or
            ``(batch, heads, q_blocks, k_blocks)``, or a :class:`BlockMask` (which carries its own block
            size, token rule, dense text rows/columns and key padding).
        block_size: tokens per block when ``block_mask`` is a bitmap.
        scale: softmax scale, ``head_dim ** -0.5`` by default.
        backend: ``"auto"``, ``"flex"``, ``"gather"`` or ``"sdpa"``.

    Returns:
        ``(batch, heads, q_len, head_dim)`` in the dtype of ``q``. Query rows that see no key are zero.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, tokens, head_dim); got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    bm = _as_block_mask(block_mask, q, k, block_size)
    chosen = resolve_backend(q, k, v, bm, backend)
    if chosen == "sdpa":
        return sdpa_reference(q, k, v, bm, scale)
    if chosen == "gather":
        return gather_attention(q, k, v, bm, scale)
    ok, why = flex_backend.available()
    if not ok:
        raise RuntimeError(f"backend='flex' is unavailable: {why}")
    return flex_backend.flex_block_sparse(q, k, v, bm, scale)
