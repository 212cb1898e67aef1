"""Block-sparse attention in plain torch: each query block attends to its gathered key blocks.

This is the engine's sparse path with autograd on every device (FlexAttention has no backward on CPU).
Every (batch, head, query block) is a *row* with its own list of kept key blocks, and every row runs
through the fused ``scaled_dot_product_attention`` kernel, so the score matrix is never materialised
and the backward is the fused kernel's own. Work and memory scale with the number of kept blocks,
never with ``q_len x kv_len``.

- Without autograd, rows whose kept blocks form one contiguous run (bands, local windows) read their
  keys in place through strided views; rows with identical runs share one long query.
- Other rows are grouped by how many blocks they keep (no row is ever padded), their key/value blocks
  gathered with ``index_select`` into a reused workspace, and token-level checks applied only to rows
  that need them.
"""

from __future__ import annotations

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
        eff = bm.effective_bitmap()
        full = bm.full_bitmap()
        shape = torch.broadcast_shapes(eff.shape, full.shape)
        eff = eff.expand(shape).reshape(-1, shape[-1])
        full = full.expand(shape).reshape(-1, shape[-1]) & eff
        counts = eff.sum(-1)
        run, _ = _run_rows(eff, counts, (eff & ~full).any(-1))
        total = int(counts.sum())
        bm._cache["run_fraction"] = float(counts[run].sum()) / total if total else 0.0
    return bm._cache["run_fraction"]


def _contiguous_runs(
    qf: torch.Tensor,
    kf: torch.Tensor,
    vf: torch.Tensor,
    eff: torch.Tensor,
    counts: torch.Tensor,
    partial: torch.Tensor,
    qb_n: int,
    kb_n: int,
    scale: float | None,
    outs: list,
    rows_done: list,
) -> torch.Tensor:
    """Rows whose kept blocks form one contiguous run read their keys in place, without a gather.

    Local windows and bands are made of such rows. Rows with the same run length whose run starts form
    an arithmetic progression are one strided view of the key/value storage, so a single fused SDPA
    call covers them with no copy (copying the gathered blocks costs about as much as the attention on
    CPU). Forward only: the overlapping views would make autograd accumulate through ``as_strided``.
    Returns the rows handled here.
    """
    bs, dim = kf.shape[1], kf.shape[2]
    kf, vf = kf.contiguous(), vf.contiguous()  # the strided views below assume the dense layout
    run, first = _run_rows(eff, counts, partial)
    handled = torch.zeros_like(run)
    if not bool(run.any()):
        return handled
    rows = torch.nonzero(run).flatten()
    offset = (rows // qb_n) * kb_n + first[rows]  # start of the run, in blocks of the flat key storage
    m_of = counts[rows]
    order = torch.argsort(m_of * (kf.shape[0] + 1) + offset, stable=True)
    rows, offset, m_of = rows[order].tolist(), offset[order].tolist(), m_of[order].tolist()
    i = 0
    while i < len(rows):
        # the longest arithmetic progression of run starts with one run length
        j, step = i + 1, 0
        if j < len(rows) and m_of[j] == m_of[i]:
            step = offset[j] - offset[i]
            while j < len(rows) and m_of[j] == m_of[i] and offset[j] - offset[j - 1] == step:
                j += 1
        m, n = m_of[i], j - i
        idx = torch.tensor(rows[i:j], device=qf.device)
        base = offset[i] * bs * dim
        if step == 0:
            # identical key sets: one long query run against one contiguous key slice (a stride-0
            # batch view would make the kernel expand the keys)
            tok = offset[i] * bs
            kc = kf.view(-1, dim)[tok : tok + m * bs][None, None]
            vc = vf.view(-1, dim)[tok : tok + m * bs][None, None]
            qc = qf.index_select(0, idx).view(1, 1, n * bs, dim)
            o = F.scaled_dot_product_attention(qc, kc, vc, scale=scale).view(n, bs, dim)
        else:
            size, stride = (n, 1, m * bs, dim), (step * bs * dim, 0, dim, 1)
            kc = kf.as_strided(size, stride, kf.storage_offset() + base)
            vc = vf.as_strided(size, stride, vf.storage_offset() + base)
            qc = qf.index_select(0, idx)[:, None]
            o = F.scaled_dot_product_attention(qc, kc, vc, scale=scale)[:, 0]
        outs.append(o)
        rows_done.append(idx)
        i = j
    handled[torch.tensor(rows, device=handled.device)] = True
    return handled


def gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None = None
) -> torch.Tensor:
    """Block-sparse attention by gathering kept key blocks; differentiable in q, k and v.

    Query rows that see no key give zeros (and zero gradients).
    """
    bm = block_mask
    batch, heads, q_len, dim = q.shape
    bs, qb_n, kb_n = bm.block_size, bm.q_blocks, bm.k_blocks
    dev = q.device

    eff = bm.effective_bitmap().expand(batch, heads, qb_n, kb_n).reshape(-1, kb_n)
    full = (bm.full_bitmap().expand(batch, heads, qb_n, kb_n).reshape(-1, kb_n)) & eff
    counts = eff.sum(-1)
    # Rows are grouped by (kept blocks, needs a token-level check): inside a group no row is padded,
    # so the fused kernel runs without a mask unless tokens really need one (a masked SDPA call costs
    # about twice an unmasked one on CPU).
    partial = (eff & ~full).any(-1)
    qf, kf, vf = _pad_rows(q, bs), _pad_rows(k, bs), _pad_rows(v, bs)
    outs, rows_done = [], []

    handled = torch.zeros_like(counts, dtype=torch.bool)
    if not _needs_grad(q, k, v):
        handled = _contiguous_runs(qf, kf, vf, eff, counts, partial, qb_n, kb_n, scale, outs, rows_done)
    group_key = torch.where(handled, torch.full_like(counts, -1), counts * 2 + partial.long())
    order = torch.argsort(group_key, stable=True)
    order = order[int(handled.sum()) :]  # handled rows sort first (key -1)
    sorted_keys = group_key[order].tolist()

    # Without autograd the gathered blocks are scratch: one buffer reused by every chunk. Freshly
    # allocated large tensors are paid for in page faults on first touch, which on CPU cost as much as
    # the attention itself; with autograd each chunk's gather must live on for the backward.
    reuse = not _needs_grad(q, k, v)
    block_elems = bs * dim
    workspace = None
    if reuse:
        max_blocks = max(1, _CHUNK_BYTES // (2 * block_elems * k.element_size()))
        total_blocks = int(counts[~handled].sum())
        workspace = k.new_empty(2, min(max_blocks, max(total_blocks, 1)), bs, dim)
    pos, n_rows = 0, len(sorted_keys)
    while pos < n_rows:
        key = sorted_keys[pos]
        m, needs_mask = key // 2, bool(key % 2)
        max_rows = max(1, _CHUNK_BYTES // max(1, m * bs * dim * k.element_size() * 2))
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

        def chunk(qf_, kf_, vf_, rows=rows, flat=flat, m=m, mask=mask, empty=empty, scratch=None):
            if scratch is not None:
                kc = torch.index_select(kf_, 0, flat, out=scratch[0, : flat.numel()])
                vc = torch.index_select(vf_, 0, flat, out=scratch[1, : flat.numel()])
            else:
                kc, vc = kf_.index_select(0, flat), vf_.index_select(0, flat)
            kc = kc.view(len(rows), 1, m * bs, dim)
            vc = vc.view(len(rows), 1, m * bs, dim)
            qc = qf_.index_select(0, rows)[:, None]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
            if empty is not None:
                o = o.masked_fill(empty.expand_as(o), 0.0)
            return o

        if reuse:
            fits = workspace is not None and flat.numel() <= workspace.shape[1]
            o = chunk(qf, kf, vf, scratch=workspace if fits else None)
        else:
            # autograd keeps each chunk's gathered key/value blocks for the backward (about density x
            # the full K and V); recomputing them per chunk (torch.utils.checkpoint) measured several
            # times slower here, so memory is traded for speed
            o = chunk(qf, kf, vf)
        outs.append(o[:, 0])
        rows_done.append(rows)

    out = torch.zeros_like(qf)
    if outs:
        out = out.index_copy(0, torch.cat(rows_done), torch.cat(outs))
    return out.view(batch, heads, qb_n * bs, dim)[:, :, :q_len]
