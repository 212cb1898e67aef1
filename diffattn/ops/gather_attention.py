"""Block-sparse attention in plain torch: each query block attends to its gathered key blocks.

This is the engine's sparse path with autograd on every device (FlexAttention has no backward on CPU).
Every (batch, head, query block) is a *row* with its own list of kept key blocks. Rows are grouped
by how many blocks they keep, so no row is ever padded. Each chunk gathers its key/value blocks with
``index_select`` and runs the fused ``scaled_dot_product_attention`` kernel on them, so the score
matrix is never materialised and the backward is the fused kernel's own. Work and memory scale with
the number of kept blocks, never with ``q_len x kv_len``.
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
    group_key = counts * 2 + partial.long()
    order = torch.argsort(group_key, stable=True)
    sorted_keys = group_key[order].tolist()

    qf, kf, vf = _pad_rows(q, bs), _pad_rows(k, bs), _pad_rows(v, bs)
    # Without autograd the gathered blocks are scratch: one buffer reused by every chunk. Freshly
    # allocated large tensors are paid for in page faults on first touch, which on CPU cost as much as
    # the attention itself; with autograd each chunk's gather must live on for the backward.
    reuse = not _needs_grad(q, k, v)
    block_elems = bs * dim
    workspace = None
    if reuse:
        max_blocks = max(1, _CHUNK_BYTES // (2 * block_elems * k.element_size()))
        total_blocks = int(counts.sum())
        workspace = k.new_empty(2, min(max_blocks, max(total_blocks, 1)), bs, dim)
    outs, rows_done = [], []
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
        if workspace is not None and flat.numel() <= workspace.shape[1]:
            kc = torch.index_select(kf, 0, flat, out=workspace[0, : flat.numel()])
            vc = torch.index_select(vf, 0, flat, out=workspace[1, : flat.numel()])
        else:
            kc, vc = kf.index_select(0, flat), vf.index_select(0, flat)
        kc = kc.view(len(rows), 1, m * bs, dim)
        vc = vc.view(len(rows), 1, m * bs, dim)
        qc = qf.index_select(0, rows)[:, None]

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
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
        if empty is not None:
            o = o.masked_fill(empty.expand_as(o), 0.0)
        outs.append(o[:, 0])
        rows_done.append(rows)

    out = torch.zeros_like(qf)
    if outs:
        out = out.index_copy(0, torch.cat(rows_done), torch.cat(outs))
    return out.view(batch, heads, qb_n * bs, dim)[:, :, :q_len]
