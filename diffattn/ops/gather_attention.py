"""Block-sparse attention in plain torch: each query block attends to its gathered key blocks.

This is the engine's sparse path with autograd on every device (FlexAttention has no backward on CPU).
Every (batch, head, query block) is a *row* with its own list of kept key blocks, and every row runs
through the fused ``scaled_dot_product_attention`` kernel, so the score matrix is never materialised.
Work and memory scale with the number of kept blocks, never with ``q_len x kv_len``.

- Rows whose kept blocks form one contiguous run (bands, causal runs, local windows) read their keys
  in place through strided views (``run_plan``); a run that ends in the zero-padded tail block stops
  its view at ``kv_len`` instead of needing a token mask. On CPU, consecutive rows whose runs overlap
  share one long query against their common blocks (the CPU kernel is ~20% faster per score on long
  queries) and each row's leftover blocks run as short pieces, merged exactly by log-sum-exp.
- Other rows are grouped by how many blocks they keep (no row is ever padded), their key/value blocks
  gathered with ``index_select`` (into a reused workspace where nothing keeps them), and token-level
  checks applied only to rows that need them.
- On CPU a custom ``autograd.Function`` calls the fused flash kernel and its backward directly: the
  forward keeps only the output and its log-sum-exp, the backward reads the keys again and
  recomputes, so no gathered block lives between the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native_cpu
from .block_mask import BlockMask
from .run_plan import RunBatch, in_place_runs, piece_blocks, plan_runs, strided_rows, token_runs

# Bytes of gathered key/value blocks per chunk; bounds peak memory on long sequences without grad.
_CHUNK_BYTES = 64 * 2**20
# A plan (which rows read what) is cached on its mask, token-level masks included up to this size.
_CACHED_MASK_BYTES = 256 * 2**20


def _pad_rows(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B*H*blocks, bs, D)``, zero-padding the tail block."""
    pad = (-x.shape[2]) % bs
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, bs, x.shape[-1])


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kept_fraction(
    bm: BlockMask, name: str, covered: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
) -> float:
    """Fraction of the kept blocks that ``covered(eff, counts, partial_unpadded)`` (a ``(rows, k_blocks)``
    bitmap over the mask's own batch/heads rows) marks; cached on the mask under ``name``."""
    if name not in bm._cache:
        shape = torch.broadcast_shapes(bm.effective_bitmap().shape, bm.full_bitmap().shape)
        eff, _, counts, _, partial_unpadded = _row_plan(bm, shape[0], shape[1])
        total = int(counts.sum())
        bm._cache[name] = float(covered(eff, counts, partial_unpadded).sum()) / total if total else 0.0
    return bm._cache[name]


def in_place_fraction(bm: BlockMask) -> float:
    """Fraction of the kept blocks that the CPU path reads in place (runs, see ``run_plan``) rather
    than gathering."""
    # runs stop their key view at kv_len: the tail block's padding needs no token check
    return _kept_fraction(
        bm, "in_place_fraction", lambda eff, counts, pu: in_place_runs(eff, counts, pu, multi_run=True)[3]
    )


def native_fraction(bm: BlockMask) -> float:
    """Fraction of the kept blocks in rows the native CPU kernel runs (rows without token checks once
    the tail block's padding is cut off); the others go through the gathered, masked path."""
    return _kept_fraction(bm, "native_fraction", lambda eff, counts, pu: eff & ~pu[:, None])


class _Chunk(NamedTuple):
    """Rows that keep ``m`` gathered key blocks each (``flat``: their flat block indices)."""

    rows: torch.Tensor
    flat: torch.Tensor
    m: int
    mask: torch.Tensor | None  # (rows, 1, bs, m * bs) token visibility, only where a block is partial
    empty: torch.Tensor | None  # (rows, 1, bs, 1) queries that see no key at all


def _gather_kv(
    kf: torch.Tensor, vf: torch.Tensor, c: _Chunk, workspace: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's kept key and value blocks as ``(rows, 1, m * bs, dim)``, into ``workspace`` if it fits."""
    n, bs, dim = c.flat.numel(), kf.shape[1], kf.shape[2]
    if workspace is not None and n <= workspace.shape[1]:
        kc = torch.index_select(kf, 0, c.flat, out=workspace[0, :n])
        vc = torch.index_select(vf, 0, c.flat, out=workspace[1, :n])
    else:
        kc, vc = kf.index_select(0, c.flat), vf.index_select(0, c.flat)
    shape = (len(c.rows), 1, c.m * bs, dim)
    return kc.view(shape), vc.view(shape)


def _gather_chunks(
    bm: BlockMask, eff: torch.Tensor, full: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor,
    handled: torch.Tensor, heads: int, dim: int, itemsize: int, max_bytes: int = _CHUNK_BYTES,
) -> list[_Chunk]:
    """The rows not ``handled``, grouped by (kept blocks, needs a token check) and cut into chunks.

    Inside a group no row is padded, so the fused kernel runs without a mask unless tokens really need
    one (a masked SDPA call costs about twice an unmasked one on CPU).
    """
    bs, qb_n, kb_n, dev = bm.block_size, bm.q_blocks, bm.k_blocks, eff.device
    group_key = torch.where(handled, torch.full_like(counts, -1), counts * 2 + partial.long())
    order = torch.argsort(group_key, stable=True)
    order = order[int(handled.sum()) :]  # handled rows sort first (key -1)
    sorted_keys = group_key[order].tolist()
    chunks: list[_Chunk] = []
    pos, n_rows = 0, len(sorted_keys)
    while pos < n_rows:
        key = sorted_keys[pos]
        m, needs_mask = key // 2, bool(key % 2)
        max_rows = max(1, max_bytes // max(1, m * bs * dim * itemsize * 2))
        end = pos + 1
        while end < n_rows and sorted_keys[end] == key and end - pos < max_rows:
            end += 1
        rows = order[pos:end]
        pos = end
        if m == 0:
            continue
        idx = torch.argsort((~eff[rows]).to(torch.int8), dim=-1, stable=True)[:, :m]  # kept blocks
        bh = rows // qb_n  # (batch * heads) index of each row
        flat = (bh[:, None] * kb_n + idx).reshape(-1)
        mask, empty = None, None
        if needs_mask:
            b_idx = (bh // heads)[:, None, None]
            h_idx = (bh % heads)[:, None, None]
            q_idx = ((rows % qb_n)[:, None] * bs + torch.arange(bs, device=dev))[:, :, None]
            kv_idx = (idx[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(len(rows), 1, m * bs)
            slot_full = full[rows].gather(1, idx)[:, :, None].expand(-1, -1, bs).reshape(len(rows), 1, m * bs)
            mask = (slot_full | bm.allowed(b_idx, h_idx, q_idx, kv_idx))[:, None]  # (C, 1, bs, m*bs)
            # a query with no visible key would make SDPA return NaN (and NaN gradients): let it see
            # slot 0 and zero its output afterwards
            any_key = mask.any(-1, keepdim=True)
            if not bool(any_key.all()):
                empty = ~any_key
                first_slot = torch.zeros_like(mask)
                first_slot[..., 0] = True
                mask = mask | (empty & first_slot)
        chunks.append(_Chunk(rows, flat, m, mask, empty))
    return chunks


def _row_plan(bm: BlockMask, batch: int, heads: int) -> tuple[torch.Tensor, ...]:
    """Per (batch, head, query block) row: kept blocks, blocks needing no token check, counts, whether
    a token check is needed, and whether it is needed once the tail block's padding is cut off."""
    qb_n, kb_n = bm.q_blocks, bm.k_blocks

    def rows(bitmap: torch.Tensor) -> torch.Tensor:
        return bitmap.expand(batch, heads, qb_n, kb_n).reshape(-1, kb_n)

    eff = rows(bm.effective_bitmap())
    full = rows(bm.full_bitmap()) & eff
    counts = eff.sum(-1)
    partial = (eff & ~full).any(-1)
    partial_unpadded = (eff & ~rows(bm.full_bitmap(padded_tail=False))).any(-1)
    return eff, full, counts, partial, partial_unpadded


def _cached_plan(bm: BlockMask, key: tuple, build: Callable[[], tuple]) -> tuple:
    """``build()`` (a plan whose last item is its gathered chunks), cached on the mask under ``key``
    unless its token-level masks are larger than ``_CACHED_MASK_BYTES`` (those are rebuilt per call)."""
    if key not in bm._cache:
        plan = build()
        if sum(c.mask.numel() for c in plan[-1] if c.mask is not None) > _CACHED_MASK_BYTES:
            return plan
        bm._cache[key] = plan
    return bm._cache[key]


def _plan(
    bm: BlockMask, batch: int, heads: int, kv_len: int, dim: int, itemsize: int, in_place: bool, group: bool,
    multi_run: bool = False,
) -> tuple[list[RunBatch], list[_Chunk]]:
    """The run batches read in place (none unless ``in_place``) and the gathered chunks of the other rows.

    ``group``: consecutive rows share their common keys (the pieces are merged by log-sum-exp, so only
    the CPU kernel path, which returns it, asks for this). Cached on the mask per call shape, unless
    its token-level masks are larger than ``_CACHED_MASK_BYTES``.
    """
    def build() -> tuple[list[RunBatch], list[_Chunk]]:
        eff, full, counts, partial, partial_unpadded = _row_plan(bm, batch, heads)
        batches: list[RunBatch] = []
        rest = eff  # blocks left to gather
        if in_place:
            batches, covered = plan_runs(
                eff, counts, partial_unpadded, bm.q_blocks, (-kv_len) % bm.block_size, group, multi_run
            )
            rest = eff & ~covered
        counts_rest = rest.sum(-1)
        return batches, _gather_chunks(bm, rest, full, counts_rest, partial, counts_rest == 0, heads, dim, itemsize)

    return _cached_plan(bm, ("plan", batch, heads, kv_len, dim, itemsize, in_place, group, multi_run), build)


def _native_plan(
    bm: BlockMask, batch: int, heads: int, kv_len: int, dim: int, itemsize: int
) -> tuple[torch.Tensor, torch.Tensor, list[_Chunk]]:
    """The native kernel's key runs (``token_runs``) for every row that needs no token check once the
    tail block's padding is cut off, and the gathered chunks of the rows that do. Cached on the mask
    like :func:`_plan`."""
    def build() -> tuple[torch.Tensor, torch.Tensor, list[_Chunk]]:
        eff, full, counts, partial, partial_unpadded = _row_plan(bm, batch, heads)
        row_ptr, runs = token_runs(eff, ~partial_unpadded, bm.q_blocks, bm.block_size, (-kv_len) % bm.block_size)
        return row_ptr, runs, _gather_chunks(bm, eff, full, counts, partial, ~partial_unpadded, heads, dim, itemsize)

    return _cached_plan(bm, ("native", batch, heads, kv_len, dim, itemsize), build)


def cpu_kernel(q: torch.Tensor) -> str:
    """Which kernel the CPU path runs for ``q``: ``"native"`` (the C++ block-sparse kernel: fp32, built)
    or ``"sdpa"`` (torch's fused kernel over strided and gathered blocks)."""
    if q.device.type != "cpu":
        raise ValueError(f"cpu_kernel is for CPU tensors, got one on {q.device}")
    return "native" if q.dtype == torch.float32 and native_cpu.load_kernel() is not None else "sdpa"


def _workspace(chunks: list[_Chunk], like: torch.Tensor) -> torch.Tensor | None:
    """One scratch buffer for every chunk's gathered blocks (no autograd through it).

    Freshly allocated large tensors are paid for in page faults on first touch, which on CPU cost as
    much as the attention itself.
    """
    if not chunks:
        return None
    bs, dim = like.shape[1], like.shape[2]
    max_blocks = max(1, _CHUNK_BYTES // (2 * bs * dim * like.element_size()))
    return like.new_empty(2, min(max_blocks, sum(c.flat.numel() for c in chunks)), bs, dim)


# --- CPU path ---------------------------------------------------------------------------------------
# The fused CPU flash-attention kernel and its backward, called directly. The forward returns the
# log-sum-exp, which (a) merges a row's pieces exactly (grouped rows, see run_plan) and (b) lets the
# backward recompute each piece's attention from (q, k/v read again, out, lse), so nothing gathered is
# kept between the passes. Autograd through index_select + SDPA kept every gathered key/value block
# alive until the backward (about density x 2 x K per layer: 5.8 GB for one layer at Wan 480p, 21
# latent frames), and that memory traffic made it slower than dense.
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _has_cpu_flash(q: torch.Tensor) -> bool:
    """Whether the CPU kernel path applies (elsewhere autograd runs through the fused SDPA kernels)."""
    return q.device.type == "cpu"


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The kernel takes float masks only: 0 where visible, -inf elsewhere."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lse_o: torch.Tensor) -> None:
    """Fold a piece's ``(o, lse_o)`` into the running ``(out, lse)`` of the same queries, in place."""
    new = torch.logaddexp(lse, lse_o)
    out.mul_((lse - new).exp_().unsqueeze(-1)).add_(o * (lse_o - new).exp_().unsqueeze(-1))
    lse.copy_(new)


def _write_chunks(
    qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, chunks: list[_Chunk], out: torch.Tensor, lse: torch.Tensor,
    scale: float | None,
) -> None:
    """Write each chunk's rows of ``out`` and ``lse``: the fused kernel on their gathered blocks."""
    workspace = _workspace(chunks, kf)  # the backward gathers again: the forward's blocks are scratch
    for c in chunks:
        kc, vc = _gather_kv(kf, vf, c, workspace)
        o, lse_c = _flash_cpu(qf.index_select(0, c.rows)[:, None], kc, vc, 0.0, False,
                              attn_mask=_additive(c.mask, qf.dtype), scale=scale)
        if c.empty is not None:  # only rows with token checks, which have no other piece
            o = o.masked_fill(c.empty, 0.0)
        out[c.rows] = o[:, 0].to(out.dtype)
        lse[c.rows] = lse_c[:, 0].float()


def _sdpa_forward(
    qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, bm: BlockMask, batch: int, heads: int, kv_len: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp of every row through torch's fused kernel: in-place runs as strided views
    (grouped rows merged by log-sum-exp), the other blocks gathered."""
    dim = qf.shape[-1]
    batches, chunks = _plan(bm, batch, heads, kv_len, dim, kf.element_size(), in_place=True, group=True, multi_run=True)
    # merged pieces accumulate in fp32
    acc = torch.float32 if any(not b.first for b in batches) else qf.dtype
    out = torch.zeros(qf.shape, dtype=acc, device=qf.device)
    lse = torch.full(qf.shape[:2], float("-inf"), dtype=torch.float32, device=qf.device)
    # gathered blocks first: a row's gathered piece is written, its in-place pieces merged into it
    _write_chunks(qf, kf, vf, chunks, out, lse, scale)
    for b in batches:
        o, lse_o = _flash_cpu(
            strided_rows(qf, b.q_start, b.q_step, b.q_len, b.n),
            strided_rows(kf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
            strided_rows(vf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
            0.0, False, scale=scale,
        )
        out_v = strided_rows(out, b.q_start, b.q_step, b.q_len, b.n)
        lse_v = strided_rows(lse, b.q_start, b.q_step, b.q_len, b.n)
        if b.first:
            out_v.copy_(o)
            lse_v.copy_(lse_o)
        else:
            _merge(out_v, lse_v, o, lse_o.float())
    return out.to(qf.dtype), lse


class _GatherAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bm: BlockMask, scale: float | None):  # noqa: ANN001, ANN205
        batch, heads, q_len, dim = q.shape
        bs = bm.block_size
        qf, kf, vf = _pad_rows(q, bs).contiguous(), _pad_rows(k, bs).contiguous(), _pad_rows(v, bs).contiguous()
        native = native_cpu.kernel_or_warn() if q.dtype == torch.float32 else None
        if native is not None:
            # rows without token checks: the native kernel reads every kept run in place; the others
            # (written over its zeros) gather their blocks
            row_ptr, runs, chunks = _native_plan(bm, batch, heads, k.shape[2], dim, k.element_size())
            scale_f = dim**-0.5 if scale is None else float(scale)
            out, lse = native.forward(qf, kf.view(-1, dim), vf.view(-1, dim), row_ptr, runs, scale_f)
            _write_chunks(qf, kf, vf, chunks, out, lse, scale)
        else:
            out, lse = _sdpa_forward(qf, kf, vf, bm, batch, heads, k.shape[2], scale)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.plan = (bm, scale, q.shape, k.shape[2])
        return out.view(batch, heads, -1, dim)[:, :, :q_len]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        qf, kf, vf, out, lse = ctx.saved_tensors
        bm, scale, q_shape, kv_len = ctx.plan
        batch, heads, q_len, dim = q_shape
        # the pieces' gradients need only each row's whole (out, lse), whichever kernel made them
        batches, chunks = _plan(bm, batch, heads, kv_len, dim, kf.element_size(), in_place=True, group=True, multi_run=True)
        bs = kf.shape[1]
        gf = _pad_rows(grad_out.contiguous(), bs).to(qf.dtype).contiguous()
        # a row's pieces (and a key block's readers) add up their gradients: accumulate in fp32
        dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (qf, kf, vf))
        for b in batches:
            def rows(x: torch.Tensor, b: RunBatch = b) -> torch.Tensor:
                return strided_rows(x, b.q_start, b.q_step, b.q_len, b.n)

            dqc, dkc, dvc = _flash_cpu_backward(
                rows(gf), rows(qf),
                strided_rows(kf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
                strided_rows(vf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
                rows(out), rows(lse), 0.0, False, scale=scale,
            )
            rows(dq).add_(dqc)
            if b.cut:  # the view stopped at kv_len: the padding tokens get no gradient
                dkc, dvc = F.pad(dkc, (0, 0, 0, b.cut)), F.pad(dvc, (0, 0, 0, b.cut))
            flat = piece_blocks(b.k_start, b.k_step, b.k_len, b.n, kf.device)
            dk.index_add_(0, flat, dkc.reshape(-1, bs, dim).float())
            dv.index_add_(0, flat, dvc.reshape(-1, bs, dim).float())
        for c in chunks:
            kc, vc = _gather_kv(kf, vf, c)
            g = gf.index_select(0, c.rows)[:, None]
            if c.empty is not None:
                g = g.masked_fill(c.empty, 0.0)  # zeroed outputs pass no gradient
            lse_c = lse.index_select(0, c.rows)[:, None]
            dqc, dkc, dvc = _flash_cpu_backward(
                g, qf.index_select(0, c.rows)[:, None], kc, vc, out.index_select(0, c.rows)[:, None], lse_c,
                0.0, False, attn_mask=_additive(c.mask, qf.dtype), scale=scale,
            )
            dq.index_add_(0, c.rows, dqc[:, 0].float())  # the row's in-place pieces add theirs
            dk.index_add_(0, c.flat, dkc.view(-1, bs, dim).float())
            dv.index_add_(0, c.flat, dvc.view(-1, bs, dim).float())

        def unpad(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.to(qf.dtype).view(batch, heads, -1, dim)[:, :, :length]

        return unpad(dq, q_len), unpad(dk, kv_len), unpad(dv, kv_len), None, None


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None = None
) -> torch.Tensor:
    """Block-sparse attention by reading kept key blocks in place or gathering them; differentiable in
    q, k and v.

    Query rows that see no key give zeros (and zero gradients).
    """
    if _has_cpu_flash(q):
        return _GatherAttentionCPU.apply(q, k, v, block_mask, scale)
    bm = block_mask
    batch, heads, q_len, dim = q.shape
    bs = bm.block_size
    qf, kf, vf = _pad_rows(q, bs), _pad_rows(k, bs), _pad_rows(v, bs)
    outs, rows_done = [], []
    grad = _needs_grad(q, k, v)
    if not grad:
        qf, kf, vf = qf.contiguous(), kf.contiguous(), vf.contiguous()  # strided run views assume the layout
    # in-place runs only without autograd (overlapping strided views would make autograd accumulate
    # through as_strided), and ungrouped: SDPA gives no log-sum-exp to merge pieces with
    batches, chunks = _plan(bm, batch, heads, k.shape[2], dim, k.element_size(), in_place=not grad, group=False)
    for b in batches:
        o = F.scaled_dot_product_attention(
            strided_rows(qf, b.q_start, b.q_step, b.q_len, b.n),
            strided_rows(kf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
            strided_rows(vf, b.k_start, b.k_step, b.k_len, b.n, b.cut),
            scale=scale,
        )
        outs.append(o.reshape(b.n * b.q_len, bs, dim))
        rows_done.append(piece_blocks(b.q_start, b.q_step, b.q_len, b.n, q.device))

    # Without autograd the gathered blocks are scratch; with it (off CPU) each chunk's gather lives on
    # for the backward.
    workspace = None if grad else _workspace(chunks, kf)
    for c in chunks:
        kc, vc = _gather_kv(kf, vf, c, workspace)
        o = F.scaled_dot_product_attention(qf.index_select(0, c.rows)[:, None], kc, vc, attn_mask=c.mask, scale=scale)
        if c.empty is not None:
            o = o.masked_fill(c.empty.expand_as(o), 0.0)
        outs.append(o[:, 0])
        rows_done.append(c.rows)

    out = torch.zeros_like(qf)
    if outs:
        out = out.index_copy(0, torch.cat(rows_done), torch.cat(outs))
    return out.view(batch, heads, bm.q_blocks * bs, dim)[:, :, :q_len]
