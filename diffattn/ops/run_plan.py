"""Which query rows read their keys in place, and which rows share their keys: pure planning.

A *row* is one (batch, head, query block). Rows whose kept key blocks form one contiguous *run*
(bands, causal runs, local windows, text rows) read their keys through strided views of the key/value
storage, never copied (copying the blocks costs about as much as the attention on CPU).

torch's fused CPU attention kernel tiles a call's queries in splits of 32 below 192 queries, 64 below
768 and 256 from there, and the small splits re-read the keys for every 32 queries: one 128-query row
costs 1.2-1.4x more per score than a long query (``scripts/bench_engine.py --kernel-table``). So
consecutive rows whose runs overlap are *grouped*: the ``c`` rows of a group run as one long query
against the blocks they all see (the intersection of their runs), and each row's remaining blocks
(at most ``c - 1``, in one piece on each side) run as that row's own short pieces. The pieces of a row
are combined exactly through their log-sum-exps (see ``gather_attention``).

Pieces with the same shape whose query and key starts form arithmetic progressions are one
:class:`RunBatch`: one fused kernel call over strided views.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Consecutive rows grouped by run length (blocks): measured on the 2-core CPU (fp32, 64-dim heads),
# a 128-query call costs ~1.2x per score, 256 queries ~1.1x and >= 768 queries ~1.0x of dense attention,
# while a row's leftover piece of a few blocks costs ~1.4-1.6x. Six rows pay off once the run is long
# enough that the five leftover blocks are a small share of it, two rows (one leftover block) from
# twelve blocks on (an interleaved sweep of 1-8 rows at 16k tokens; below 12 blocks no grouping won).
_GROUP_BY_RUN = ((32, 6), (12, 2))

# In rows made of several runs, shorter runs are gathered into one piece with the row's other short
# runs: a piece of under 512 keys runs at ~1.4x the cost per score of dense attention (one partial
# kernel tile), and each piece adds a merge.
MIN_RUN_IN_PLACE = 4


def group_size(run_blocks: int) -> int:
    """How many consecutive rows with runs of ``run_blocks`` blocks share one query call."""
    for at_least, rows in _GROUP_BY_RUN:
        if run_blocks >= at_least:
            return rows
    return 1


class RunBatch(NamedTuple):
    """``n`` pieces in one kernel call. Piece ``i`` has the query blocks ``q_start + i * q_step`` ..
    ``+ q_len`` and the key blocks ``k_start + i * k_step`` .. ``+ k_len`` (flat block indices of the
    padded ``(rows, block_size, dim)`` storage), minus the last ``cut`` key tokens (the tail block's
    padding past ``kv_len``). ``first``: the first piece of each of its rows (written, not merged)."""

    n: int
    q_start: int
    q_step: int
    q_len: int
    k_start: int
    k_step: int
    k_len: int
    cut: int
    first: bool


def _single_run_rows(eff: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """Rows (of a ``(rows, k_blocks)`` bitmap) whose kept blocks are one contiguous run."""
    kb_n = eff.shape[-1]
    first = eff.to(torch.int8).argmax(-1)
    last = kb_n - 1 - eff.flip(-1).to(torch.int8).argmax(-1)
    return (counts > 0) & ~partial & (last - first + 1 == counts)


def _groups(rows: list[int], first: list[int], last: list[int], qb_n: int, group: bool) -> list[tuple[int, int]]:
    """Consecutive rows as ``(index of the group's first row in rows, row count)``.

    A group is rows of one (batch, head) with consecutive query blocks whose run starts and ends never
    decrease (then the blocks all rows see are ``[last row's start, first row's end]``). It stops at
    :func:`group_size` rows and when a row would leave more than ``size - 1`` blocks of its own on either
    side; while every row so far has the very same run, more such rows always join (no leftovers).
    Without ``group`` only such identical rows are grouped.
    """
    out = []
    i, n = 0, len(rows)
    while i < n:
        a0, b0 = first[i], last[i]
        size = group_size(b0 - a0 + 1) if group else 1
        j = i + 1
        while j < n and rows[j] == rows[j - 1] + 1 and rows[j] // qb_n == rows[i] // qb_n:
            a, b = first[j], last[j]
            if a == a0 and b == b0 and first[j - 1] == a0 and last[j - 1] == b0:
                j += 1
                continue
            if (
                j - i >= size
                or a < first[j - 1]
                or b < last[j - 1]
                or a - a0 > size - 1
                or b - b0 > size - 1
                or b0 - a + 1 < 1
            ):
                break
            j += 1
        out.append((i, j - i))
        i = j
    return out


def _runs(eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every maximal run of kept blocks in the rows of ``eff``: (row, first block, last block), ordered
    by row then position."""
    pad = torch.zeros(eff.shape[0], 1, dtype=torch.int8, device=eff.device)
    step = torch.diff(eff.to(torch.int8), dim=1, prepend=pad, append=pad)
    row, a = torch.nonzero(step == 1, as_tuple=True)
    b = torch.nonzero(step == -1, as_tuple=True)[1] - 1
    return row, a, b


def _tracks(row: torch.Tensor) -> torch.Tensor:
    """For runs sorted by row, each run's number within its row (0, 1, ...)."""
    starts = torch.ones_like(row, dtype=torch.bool)
    starts[1:] = row[1:] != row[:-1]
    idx = torch.arange(len(row), device=row.device)
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values


def in_place_runs(
    eff: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor, multi_run: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runs read in place, as (row, first block, last block) ordered by row then position, and the
    ``(rows, k_blocks)`` bitmap of the blocks they cover.

    ``partial``: rows that need a token check once the tail block's padding is ignored
    (``full_bitmap(padded_tail=False)``); they are never read in place. Rows of one run are; with
    ``multi_run`` so are the runs of at least ``MIN_RUN_IN_PLACE`` blocks in other rows.
    """
    single = _single_run_rows(eff, counts, partial)
    rows_in = ((counts > 0) & ~partial) if multi_run else single
    rows_t = torch.nonzero(rows_in).flatten()
    row, a_t, b_t = _runs(eff[rows_t])
    row = rows_t[row]
    keep = (b_t - a_t + 1 >= MIN_RUN_IN_PLACE) | single[row]
    row, a_t, b_t = row[keep], a_t[keep], b_t[keep]
    # mark the kept runs' blocks: +1 at each start, -1 past each end, summed along the row
    kb_n = eff.shape[-1]
    marks = torch.zeros(eff.shape[0], kb_n + 1, dtype=torch.int32, device=eff.device)
    one = torch.ones_like(row, dtype=torch.int32)
    marks.index_put_((row, a_t), one, accumulate=True)
    marks.index_put_((row, b_t + 1), -one, accumulate=True)
    return row, a_t, b_t, marks.cumsum(-1)[:, :kb_n] > 0


def plan_runs(
    eff: torch.Tensor, counts: torch.Tensor, partial: torch.Tensor, qb_n: int, tail_pad: int, group: bool,
    multi_run: bool = False,
) -> tuple[list[RunBatch], torch.Tensor]:
    """The kernel calls that read keys in place, and the ``(rows, k_blocks)`` bitmap of blocks they read.

    Which runs: :func:`in_place_runs`. A piece that ends in the tail block stops ``tail_pad`` tokens
    early. ``group``: share key reads between consecutive rows. With ``multi_run`` the blocks of a row
    not read in place are left to the caller, whose results must come first (the pieces of such rows
    are merged, never written). Both need a kernel that returns log-sum-exps; without them every row
    read in place is one run and one piece.
    """
    kb_n = eff.shape[-1]
    row, a_t, b_t, covered = in_place_runs(eff, counts, partial, multi_run)
    if len(row) == 0:
        return [], covered
    rest = (eff & ~covered).any(-1)  # rows whose other blocks the caller gathers (written first)
    track = _tracks(row)  # runs of one row are numbered in order; run t of consecutive rows may group
    rest_l = rest.tolist()

    by_track: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for r, t, a, b in zip(row.tolist(), track.tolist(), a_t.tolist(), b_t.tolist()):
        rows_l, first_l, last_l = by_track.setdefault(t, ([], [], []))
        rows_l.append(r)
        first_l.append(a)
        last_l.append(b)

    # pieces: (is_first, q_len, k_len, cut, q_start, k_start); a row's first run (track 0) is written
    # unless the caller wrote the row first, every other piece is merged
    pieces: list[tuple[bool, int, int, int, int, int]] = []
    for t, (rows, first, last) in sorted(by_track.items()):
        for i, c in _groups(rows, first, last, qb_n, group):
            r0, base = rows[i], (rows[i] // qb_n) * kb_n
            lo, hi = first[i + c - 1], last[i]  # blocks every row of the group sees
            written = t == 0 and not any(rest_l[r0 : r0 + c])
            pieces.append((written, c, hi - lo + 1, tail_pad if hi == kb_n - 1 else 0, r0, base + lo))
            for j in range(c):
                a, b = first[i + j], last[i + j]
                if a < lo:
                    pieces.append((False, 1, lo - a, 0, r0 + j, base + a))
                if b > hi:
                    pieces.append((False, 1, b - hi, tail_pad if b == kb_n - 1 else 0, r0 + j, base + hi + 1))

    # first pieces before the pieces merged into them; then one batch per arithmetic progression
    pieces.sort(key=lambda p: (not p[0], p[1], p[2], p[3], p[4]))
    batches: list[RunBatch] = []
    i = 0
    while i < len(pieces):
        is_first, q_len, k_len, cut, q0, k0 = pieces[i]
        j, q_step, k_step = i + 1, q_len, 0
        if j < len(pieces) and pieces[j][:4] == pieces[i][:4]:
            q_step, k_step = pieces[j][4] - q0, pieces[j][5] - k0
            # pieces of one call must not share query rows (each row's result is written in place), and
            # views cannot step backwards
            if q_step >= q_len and k_step >= 0:
                while (
                    j < len(pieces)
                    and pieces[j][:4] == pieces[i][:4]
                    and pieces[j][4] - pieces[j - 1][4] == q_step
                    and pieces[j][5] - pieces[j - 1][5] == k_step
                ):
                    j += 1
            else:
                q_step, k_step = q_len, 0
        batches.append(RunBatch(j - i, q0, q_step, q_len, k0, k_step, k_len, cut, is_first))
        i = j
    return batches, covered


def strided_rows(x: torch.Tensor, start: int, step: int, length: int, n: int, cut: int = 0) -> torch.Tensor:
    """``n`` runs of ``length`` blocks of the ``(rows, bs, dim)`` storage ``x`` (or ``(rows, bs)``), run
    ``i`` starting at block ``start + i * step``, as an ``(n, 1, length * bs - cut, ...)`` view."""
    bs = x.shape[1]
    inner = x.shape[2:]
    row_stride = bs * (inner[0] if inner else 1)
    size = (n, 1, length * bs - cut, *inner)
    stride = (step * row_stride, 0, *x.stride()[1:])
    return x.as_strided(size, stride, x.storage_offset() + start * row_stride)


def piece_blocks(start: int, step: int, length: int, n: int, device: torch.device | str) -> torch.Tensor:
    """Flat block indices of ``n`` pieces of ``length`` blocks starting at ``start + i * step``, piece by
    piece (duplicates where pieces overlap): a batch's query blocks or its key blocks."""
    starts = start + step * torch.arange(n, device=device)
    return (starts[:, None] + torch.arange(length, device=device)).reshape(-1)


def token_runs(eff: torch.Tensor, rows: torch.Tensor, qb_n: int, block_size: int, tail_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The native CPU kernel's plan: every maximal run of kept blocks in the ``rows`` (bool, per row) of
    ``eff``, as ``[start, end)`` token ranges of the flat ``(batch * heads * k_blocks * block_size, dim)``
    key storage (a run ending in the tail block stops ``tail_pad`` tokens early), and the CSR offsets
    ``row_ptr`` (``len(eff) + 1``) of each row's runs; other rows get none."""
    kb_n = eff.shape[-1]
    row, a, b = _runs(eff & rows[:, None])
    base = (row // qb_n) * kb_n  # first block of the row's (batch, head) keys
    end = (base + b + 1) * block_size - torch.where(b == kb_n - 1, tail_pad, 0)
    row_ptr = torch.zeros(eff.shape[0] + 1, dtype=torch.long, device=eff.device)
    row_ptr[1:] = torch.bincount(row, minlength=eff.shape[0]).cumsum(0)
    return row_ptr, torch.stack([(base + a) * block_size, end], 1).long().contiguous()
