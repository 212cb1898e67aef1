"""Block-sparse attention in plain torch: each query block attends to its gathered key blocks.

This is the engine's sparse path with autograd on every device (FlexAttention has no backward on CPU).
Every (batch, head, query block) is a *row* with its own list of kept key blocks, and every row runs
through the fused ``scaled_dot_product_attention`` kernel, so the score matrix is never materialised.
Work and memory scale with the number of kept blocks, never with ``q_len x kv_len``.

- Rows whose kept blocks form one contiguous run (bands, local windows) read their keys in place
  through strided views; rows with identical runs share one long query; a run that ends in the
  zero-padded tail block stops its view at ``kv_len`` instead of needing a token mask.
- Other rows are grouped by how many blocks they keep (no row is ever padded), their key/value blocks
  gathered with ``index_select`` (into a reused workspace without autograd), and token-level checks
  applied only to rows that need them.
- On CPU with autograd, a custom ``autograd.Function`` calls the fused flash kernel and its backward
  directly: the forward keeps only the output and its log-sum-exp, the backward gathers again and
  recomputes, so no gathered block lives between the passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .block_mask import BlockMask

# Bytes of gathered key/value blocks per chunk; bounds peak memory on long sequences without grad.
_CHUNK_BYTES = 64 * 2**20


def _pad_rows(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B*H*blocks, bs, D)``, zero-padding the tail block."""
    pad = (-x.shape[2]) % bs
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(-1, bs, x.shape[-1])


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run_rows(eff: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (of a ``(rows, k_blocks)`` bitmap) whose kept blocks are one contiguous run, and run starts."""
    kb_n = eff.shape[-1]
    first = eff.to(torch.int8).argmax(-1)
    last = kb_n - 1 - eff.flip(-1).to(torch.int8).argmax(-1)
    return (counts > 0) & ~partial & (last - first + 1 == counts), first


def contiguous_run_fraction(bm: BlockMask) -> float:
    """Fraction of the kept blocks that sit in rows read in place (one contiguous run, no token check)."""
    if "run_fraction" not in bm._cache:
        shape = torch.broadcast_shapes(bm.effective_bitmap().shape, bm.full_bitmap().shape)
        eff, _, counts, _, partial_unpadded = _row_plan(bm, shape[0], shape[1])
        run, _ = _run_rows(eff, counts, partial_unpadded)  # runs stop their key view at kv_len
        total = int(counts.sum())
        bm._cache["run_fraction"] = float(counts[run].sum()) / total if total else 0.0
    return bm._cache["run_fraction"]


class _Run(NamedTuple):
    """Rows read through one strided view: run starts ``start + i * step`` (in blocks of the flat key
    storage), ``m`` blocks each, the last ``cut`` tokens left out (the tail block's padding)."""

    rows: torch.Tensor
    start: int
    step: int
    m: int
    cut: int


def _run_groups(
    eff: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor, qb_n: int, kb_n: int, n_kblocks: int,
    tail_pad: int,
) -> tuple[list[_Run], torch.Tensor]:
    """Rows whose kept blocks form one contiguous run, grouped so each group is one strided view.

    Local windows and bands are made of such rows. Rows with the same run length whose run starts form
    an arithmetic progression are one strided view of the key/value storage, so a single fused SDPA
    call covers them with no copy (copying the gathered blocks costs about as much as the attention on
    CPU). ``partial`` must ignore the tail block's padding (``full_bitmap(padded_tail=False)``): a run
    that ends in the tail block stops its view at ``kv_len`` (``tail_pad`` tokens early) instead of
    needing a token mask. Returns the groups and the mask of rows covered.
    """
    run, first = _run_rows(eff, counts, partial)
    handled = torch.zeros_like(run)
    groups: list[_Run] = []
    if not bool(run.any()):
        return groups, handled
    rows = torch.nonzero(run).flatten()
    offset = (rows // qb_n) * kb_n + first[rows]
    m_of = counts[rows]
    at_tail = (first[rows] + m_of == kb_n).long()
    order = torch.argsort((m_of * 2 + at_tail) * (n_kblocks + 1) + offset, stable=True)
    rows_l, offset_l, m_l = rows[order].tolist(), offset[order].tolist(), m_of[order].tolist()
    tail_l = at_tail[order].tolist()
    i = 0
    while i < len(rows_l):
        # the longest arithmetic progression of run starts with one run length (and tail or not)
        j, step = i + 1, 0

        def same(a: int, b: int) -> bool:
            return m_l[a] == m_l[b] and tail_l[a] == tail_l[b]

        if j < len(rows_l) and same(j, i):
            step = offset_l[j] - offset_l[i]
            while j < len(rows_l) and same(j, i) and offset_l[j] - offset_l[j - 1] == step:
                j += 1
        rows_t = torch.tensor(rows_l[i:j], device=eff.device)
        groups.append(_Run(rows_t, offset_l[i], step, m_l[i], tail_pad if tail_l[i] else 0))
        i = j
    handled[rows] = True
    return groups, handled


def _run_views(
    qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, run: _Run
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` of one run group as SDPA inputs; keys and values are views, never copies."""
    n, bs, dim = len(run.rows), kf.shape[1], kf.shape[2]
    length = run.m * bs - run.cut
    if run.step == 0:
        # identical key sets: one long query run against one contiguous key slice (a stride-0 batch
        # view would make the kernel expand the keys)
        tok = run.start * bs
        kc = kf.view(-1, dim)[tok : tok + length][None, None]
        vc = vf.view(-1, dim)[tok : tok + length][None, None]
        return qf.index_select(0, run.rows).view(1, 1, n * bs, dim), kc, vc
    size, stride = (n, 1, length, dim), (run.step * bs * dim, 0, dim, 1)
    kc = kf.as_strided(size, stride, kf.storage_offset() + run.start * bs * dim)
    vc = vf.as_strided(size, stride, vf.storage_offset() + run.start * bs * dim)
    return qf.index_select(0, run.rows)[:, None], kc, vc


def _run_flat(run: _Run) -> torch.Tensor:
    """The key blocks a run group reads, as flat block indices (row-major; one row's if ``step`` is 0)."""
    n = len(run.rows) if run.step else 1
    starts = run.start + run.step * torch.arange(n, device=run.rows.device)
    return (starts[:, None] + torch.arange(run.m, device=run.rows.device)).reshape(-1)


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


def _plan(
    bm: BlockMask, batch: int, heads: int, kf: torch.Tensor, kv_len: int, itemsize: int, in_place: bool
) -> tuple[list[_Run], list[_Chunk]]:
    """The run groups read in place (none unless ``in_place``) and the gathered chunks of the other rows.

    ``kf``: the keys padded to whole blocks, ``(rows, block_size, dim)``.
    """
    eff, full, counts, partial, partial_unpadded = _row_plan(bm, batch, heads)
    runs: list[_Run] = []
    handled = torch.zeros_like(counts, dtype=torch.bool)
    if in_place:
        runs, handled = _run_groups(
            eff, counts, partial_unpadded, bm.q_blocks, bm.k_blocks, kf.shape[0], (-kv_len) % bm.block_size
        )
    chunks = _gather_chunks(bm, eff, full, counts, partial, handled, heads, kf.shape[2], itemsize)
    return runs, chunks


# --- CPU training path ------------------------------------------------------------------------------
# The fused CPU flash-attention kernel and its backward, called directly: the forward returns the
# log-sum-exp, so the backward recomputes each chunk's attention from (q, gathered k/v, out, lse) and
# nothing gathered is kept between the passes. Autograd through index_select + SDPA kept every
# gathered key/value block alive until the backward (about density x 2 x K per layer: 5.8 GB for one
# layer at Wan 480p, 21 latent frames), and that memory traffic made it slower than dense.
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _has_cpu_flash(q: torch.Tensor) -> bool:
    """Whether the CPU training path applies (elsewhere autograd runs through the fused SDPA kernels)."""
    return q.device.type == "cpu"


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The kernel takes float masks only: 0 where visible, -inf elsewhere."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _GatherAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bm: BlockMask, scale: float | None):  # noqa: ANN001, ANN205
        batch, heads, q_len, dim = q.shape
        bs = bm.block_size
        qf, kf, vf = _pad_rows(q, bs).contiguous(), _pad_rows(k, bs).contiguous(), _pad_rows(v, bs).contiguous()
        runs, chunks = _plan(bm, batch, heads, kf, k.shape[2], k.element_size(), in_place=True)
        out = torch.zeros_like(qf)
        lse = torch.zeros(qf.shape[:2], dtype=torch.float32, device=q.device)
        for run in runs:
            qc, kc, vc = _run_views(qf, kf, vf, run)
            o, lse_c = _flash_cpu(qc, kc, vc, 0.0, False, scale=scale)
            out[run.rows] = o.reshape(len(run.rows), bs, dim)
            lse[run.rows] = lse_c.reshape(len(run.rows), bs).float()
        for c in chunks:
            kc, vc = _gather_kv(kf, vf, c)
            o, lse_c = _flash_cpu(qf.index_select(0, c.rows)[:, None], kc, vc, 0.0, False,
                                  attn_mask=_additive(c.mask, q.dtype), scale=scale)
            if c.empty is not None:
                o = o.masked_fill(c.empty, 0.0)
            out[c.rows] = o[:, 0]
            lse[c.rows] = lse_c[:, 0].float()
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.plan = (runs, chunks, scale, q.shape, k.shape[2])
        return out.view(batch, heads, -1, dim)[:, :, :q_len]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        qf, kf, vf, out, lse = ctx.saved_tensors
        runs, chunks, scale, q_shape, kv_len = ctx.plan
        batch, heads, q_len, dim = q_shape
        bs = kf.shape[1]
        gf = _pad_rows(grad_out.contiguous(), bs).to(qf.dtype)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for run in runs:
            qc, kc, vc = _run_views(qf, kf, vf, run)
            shape = qc.shape
            g, o = gf[run.rows].view(shape), out[run.rows].view(shape)
            lse_c = lse[run.rows].view(shape[:-1])
            dqc, dkc, dvc = _flash_cpu_backward(g, qc, kc, vc, o, lse_c, 0.0, False, scale=scale)
            dq[run.rows] = dqc.reshape(len(run.rows), bs, dim)
            if run.cut:  # the view stopped at kv_len: the padding tokens get no gradient
                dkc, dvc = F.pad(dkc, (0, 0, 0, run.cut)), F.pad(dvc, (0, 0, 0, run.cut))
            flat = _run_flat(run)  # step 0: one key slice shared by every row (dkc holds it once)
            dk.index_add_(0, flat, dkc.reshape(-1, bs, dim))
            dv.index_add_(0, flat, dvc.reshape(-1, bs, dim))
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
            dq[c.rows] = dqc[:, 0]
            dk.index_add_(0, c.flat, dkc.view(-1, bs, dim))
            dv.index_add_(0, c.flat, dvc.view(-1, bs, dim))

        def unpad(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(batch, heads, -1, dim)[:, :, :length]

        return unpad(dq, q_len), unpad(dk, kv_len), unpad(dv, kv_len), None, None


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None = None
) -> torch.Tensor:
    """Block-sparse attention by gathering kept key blocks; differentiable in q, k and v.

    Query rows that see no key give zeros (and zero gradients).
    """
    if _needs_grad(q, k, v) and _has_cpu_flash(q):
        return _GatherAttentionCPU.apply(q, k, v, block_mask, scale)
    bm = block_mask
    batch, heads, q_len, dim = q.shape
    bs = bm.block_size
    qf, kf, vf = _pad_rows(q, bs), _pad_rows(k, bs), _pad_rows(v, bs)
    outs, rows_done = [], []
    grad = _needs_grad(q, k, v)
    if not grad:
        kf, vf = kf.contiguous(), vf.contiguous()  # the strided run views assume the dense layout
    # forward only for in-place runs: the overlapping strided views would make autograd accumulate
    # through as_strided
    runs, chunks = _plan(bm, batch, heads, kf, k.shape[2], k.element_size(), in_place=not grad)
    for run in runs:
        qc, kc, vc = _run_views(qf, kf, vf, run)
        outs.append(F.scaled_dot_product_attention(qc, kc, vc, scale=scale).reshape(len(run.rows), bs, dim))
        rows_done.append(run.rows)

    # Without autograd the gathered blocks are scratch: one buffer reused by every chunk. Freshly
    # allocated large tensors are paid for in page faults on first touch, which on CPU cost as much as
    # the attention itself. With autograd (GPU; the CPU path above recomputes instead) each chunk's
    # gather lives on for the backward.
    workspace = None
    if not grad and chunks:
        max_blocks = max(1, _CHUNK_BYTES // (2 * bs * dim * k.element_size()))
        total_blocks = sum(c.flat.numel() for c in chunks)
        workspace = k.new_empty(2, min(max_blocks, total_blocks), bs, dim)
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
