"""FlexAttention backend: a diffattn BlockMask turned into a flex BlockMask, run compiled.

The flex block mask is built straight from the bitmap (``BlockMask.from_kv_blocks``), never by
evaluating a token-level function over all query/key pairs. Kept blocks split into *full* blocks
(no token check) and *partial* ones (``mask_mod`` evaluated inside the kernel).

``flex_attention`` is compiled once; dynamo then specialises per input shapes and mask signature and
reuses the kernel on later calls. Eager flex is about 10x slower than dense SDPA on CPU, so it is
never run silently: if compilation fails the error propagates.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from .block_mask import BlockMask, num_blocks

# Distinct shapes a long-running process may see (resolutions x frame counts x layers' grids); the
# dynamo default of 8 would silently drop to eager flex after the eighth.
_RECOMPILE_LIMIT = 256


@dataclass
class FlexStats:
    """Compile and cache counters, reported by the benchmarks."""

    compiles: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"compiles": self.compiles, "cache_hits": self.cache_hits, "compile_seconds": self.compile_seconds}


STATS = FlexStats()
_ANNOUNCED: list[bool] = []  # the one-line notice before the first compile is printed once per process


def available() -> tuple[bool, str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False, "torch.nn.attention.flex_attention needs torch >= 2.5"
    return True, ""


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _ordered(bitmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = bitmap.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


# flex's GPU kernels tile queries and keys by up to 128 tokens and need the flex block size to be a
# multiple of their tiles (torch 2.11 on an H200 refused blocks of 4 to 32 tokens); the CPU kernel takes
# any block size.
GPU_BLOCK_SIZE = 128


def flex_block_size(bm: BlockMask, device: torch.device | str) -> int:
    """Block size of the flex mask for ``bm`` on ``device``: ``bm``'s own, except on GPU when it is not a
    multiple of :data:`GPU_BLOCK_SIZE`; then 128-token blocks, each kept where any of ``bm``'s blocks it
    overlaps is kept, and ``bm``'s bitmap is looked up token by token inside the kernel (``mask_mod``)."""
    bs = bm.block_size
    return bs if torch.device(device).type == "cpu" or bs % GPU_BLOCK_SIZE == 0 else GPU_BLOCK_SIZE


def coarsen(eff: torch.Tensor, full: torch.Tensor, bm: BlockMask, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bm``'s kept and full block bitmaps re-tiled to ``size``-token blocks.

    A coarse block is kept if any fine block it overlaps is kept, and full (no token check) only if
    every fine block it overlaps is full and it holds no keys past ``kv_len``. Box sums over a 2-D
    prefix sum of the fine bitmaps, so nothing is expanded to tokens.
    """
    bs = bm.block_size

    def spans(length: int, n_fine: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.arange(num_blocks(length, size), device=eff.device) * size
        last = torch.clamp(first + size, max=length) - 1
        return first // bs, torch.clamp(last // bs, max=n_fine - 1) + 1  # fine blocks [start, stop)

    r0, r1 = spans(bm.q_len, bm.q_blocks)
    c0, c1 = spans(bm.kv_len, bm.k_blocks)

    def box_sum(x: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.pad(x.to(torch.int32).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
        return s[..., r1[:, None], c1] - s[..., r0[:, None], c1] - s[..., r1[:, None], c0] + s[..., r0[:, None], c0]

    kept = box_sum(eff) > 0
    full = (box_sum(full) == (r1 - r0)[:, None] * (c1 - c0)) & kept
    if bm.kv_len % size:
        full[..., -1] = False
    return kept, full


def to_flex_block_mask(bm: BlockMask, batch: int, heads: int, device: torch.device | str = "cpu"):
    """Convert to ``torch.nn.attention.flex_attention.BlockMask`` (cached on ``bm`` per batch, heads and
    flex block size)."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    size = flex_block_size(bm, device)
    key = ("flex", batch, heads, size)
    if key not in bm._cache:
        eff = bm.effective_bitmap()
        full = bm.full_bitmap()
        shape_b = max(eff.shape[0], full.shape[0])
        shape_h = max(eff.shape[1], full.shape[1])
        eff = eff.expand(shape_b, shape_h, bm.q_blocks, bm.k_blocks)
        full = (full & eff).expand(shape_b, shape_h, bm.q_blocks, bm.k_blocks)
        if size != bm.block_size:
            eff, full = coarsen(eff, full, bm, size)
        partial = eff & ~full
        kv_num, kv_idx = _ordered(partial)
        full_num, full_idx = _ordered(full)
        bm._cache[key] = FlexBlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=size,
            mask_mod=bm.allowed,
            seq_lengths=(bm.q_len, bm.kv_len),
        )
    return bm._cache[key]


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMask, scale: float | None):
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "FlexAttention has no backward on CPU; use backend='gather' (or 'auto', which picks it) for training"
        )
    if not torch.is_grad_enabled():
        # flex refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    flex_mask = to_flex_block_mask(bm, q.shape[0], q.shape[1], q.device)
    fn = _compiled_flex()
    if not STATS.compiles and not STATS.cache_hits and not _ANNOUNCED:
        _ANNOUNCED.append(True)
        print(
            "diffattn: compiling the FlexAttention kernel (first call, about 10-60 s; each new shape "
            "recompiles in a few seconds)",
            file=sys.stderr,
            flush=True,
        )
    # dynamo's own graph counter tells a real recompile from a cache hit
    graphs_before = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = fn(q, k, v, block_mask=flex_mask, scale=scale)
    if counters["stats"]["unique_graphs"] > graphs_before:
        STATS.compile_seconds += time.perf_counter() - t0
        STATS.compiles += 1
    else:
        STATS.cache_hits += 1
    return out
