"""Radial attention's static spatiotemporal mask (Li et al. 2025, "Radial Attention: O(n log n) Sparse
Attention with Energy Decay for Long Video Generation").

Visual tokens are ``num_frames`` latent frames of ``s = tokens_per_frame`` tokens each (raster order in a
frame, frame after frame). For query frame ``i`` and key frame ``j`` at distance ``d = |i - j|``:

- ``d <= 1``: the whole frame is visible (``adjacent="half"``: at ``d == 1`` only ``|k - l| <= s // 2``, the
  reference's earlier rule for Wan);
- otherwise, with ``L = 2**bit_length(s) / 2**bit_length(d)``, the pair of frames is kept only when
  ``L >= block_size`` or ``d % int(block_size / L) == 0`` (far frames are subsampled), and then token ``k``
  of frame ``i`` sees token ``l`` of frame ``j`` when ``|k - l| <= w`` with
  ``w = max(L * decay_factor, block_size)``;
- ``sink``: every frame sees the first frame in full (Wan's attention sink);
- text tokens (``text_tokens`` placed ``"first"`` or ``"last"``) see and are seen by every token.

At ``granularity="block"`` the token mask is turned into ``block_size`` x ``block_size`` blocks by the
reference's rule: a block is kept when more than 60% of its non-empty key columns have a density above
1/3 over the block's query rows. Two choices where the reference leaves the case undefined (it needs
token counts that are multiples of 128): a column's density is taken over the block's *visual* query
rows (the reference pads to a multiple of the block size and counts padding as empty rows), and the
diagonal blocks are always kept (when a block spans several frames, ``s < block_size``, the rule can drop
a block's own frame and leave its queries with no key at all). Text rows and columns are whole blocks, as
in the reference. The reference shrinks frame pair by frame pair (to save memory) and ORs the results;
that differs from shrinking the whole mask only in blocks that straddle a frame boundary (0.25% of the
blocks at Wan 480p x 21 latent frames, none when frames are whole blocks).

Everything is computed from frame-pair windows and block index ranges, never by evaluating the token
rule over all ``n**2`` pairs (except :func:`radial_token_mask`, which is that mask, for small shapes).
Block bitmaps and the engine's parts are cached by shape and options.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

import torch

from ..ops.block_mask import BlockMask, num_blocks, text_dense_ranges

__all__ = [
    "RadialGeometry",
    "RadialOptions",
    "RadialTokenRule",
    "frame_window",
    "radial_block_mask",
    "radial_density",
    "radial_mask",
    "radial_token_mask",
    "window_table",
]

Granularity = Literal["block", "token"]
Adjacent = Literal["full", "half"]

# Elements of the (segments x key columns) count matrix computed at once when building a bitmap.
_CHUNK_ELEMS = 1 << 23


class RadialOptions(TypedDict, total=False):
    """The keyword options every public mask function of this module takes beside the frame grid (the
    fields of :class:`RadialGeometry`).

    Attributes:
        decay_factor: scales the spatial window (1.0; the reference uses 0.2 for Wan 2.1, 0.95 for
            HunyuanVideo).
        block_size: engine block size; also the window floor and the subsampling threshold (128).
        sink: every frame sees the first frame in full (Wan's attention sink; off by default).
        text_tokens: a run of text tokens with dense rows and columns (0).
        text_position: where that run sits, ``"first"`` or ``"last"`` (needed when ``text_tokens > 0``).
        adjacent: window at frame distance 1, ``"full"`` (the current reference; default) or ``"half"``
            (the earlier Wan rule).
    """

    decay_factor: float
    block_size: int
    sink: bool
    text_tokens: int
    text_position: str | None
    adjacent: Adjacent


@dataclass(frozen=True)
class RadialGeometry:
    """Validated sizes and options of one radial mask (see the module docstring for the rule).

    Raises:
        ValueError: non-positive sizes or ``decay_factor``, a bad ``text_position`` or ``adjacent``.
    """

    num_frames: int
    tokens_per_frame: int
    decay_factor: float = 1.0
    block_size: int = 128
    sink: bool = False
    text_tokens: int = 0
    text_position: str | None = None
    adjacent: str = "full"

    def __post_init__(self) -> None:
        for name in ("num_frames", "tokens_per_frame", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        d = self.decay_factor
        if not isinstance(d, int | float) or isinstance(d, bool) or not d > 0:
            raise ValueError(f"decay_factor must be a number > 0, got {d!r}")
        if not math.isfinite(d):
            raise ValueError(f"decay_factor must be finite, got {d!r}")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        if self.text_tokens and self.text_position not in ("first", "last"):
            raise ValueError(
                f"text_position must be 'first' or 'last' when text_tokens > 0, got {self.text_position!r}"
            )
        if self.adjacent not in ("full", "half"):
            raise ValueError(f"adjacent must be 'full' or 'half', got {self.adjacent!r}")
        # canonical values, so equal masks share one cache entry
        object.__setattr__(self, "decay_factor", float(d))
        object.__setattr__(self, "sink", bool(self.sink))
        if not self.text_tokens:
            object.__setattr__(self, "text_position", None)

    @property
    def n(self) -> int:
        """Tokens in the sequence, text included."""
        return self.num_frames * self.tokens_per_frame + self.text_tokens

    def window_args(self) -> tuple[int, int, float, int, bool, str]:
        """The arguments of the cached frame-pair window table."""
        return (self.num_frames, self.tokens_per_frame, self.decay_factor, self.block_size, self.sink, self.adjacent)

    def bitmap_args(self) -> tuple[int, int, float, int, bool, str, int, str | None]:
        """The arguments of the cached block bitmaps."""
        return (*self.window_args(), self.text_tokens, self.text_position)


def _check_granularity(granularity: str) -> None:
    if granularity not in ("block", "token"):
        raise ValueError(f"granularity must be 'block' or 'token', got {granularity!r}")


def frame_window(
    distance: int, tokens_per_frame: int, decay_factor: float, block_size: int = 128, adjacent: Adjacent = "full"
) -> int:
    """Half-width of the spatial window between two frames ``distance`` apart.

    Returns ``-1`` when the pair of frames is dropped (subsampled away) and ``tokens_per_frame`` (or more)
    when the whole frame is visible; token ``k`` sees token ``l`` when ``|k - l| <=`` the result.
    """
    s, d = tokens_per_frame, abs(distance)
    if d == 0 or (d == 1 and adjacent == "full"):
        return s
    if d == 1:
        return s // 2
    bls, bld = s.bit_length(), d.bit_length()
    # L = 2**bls / 2**bld; both tests in integers so they are exact for any shape
    if 2**bls < block_size * 2**bld and d % (block_size * 2**bld // 2**bls) != 0:
        return -1
    # the reference's float expression, so that fractional windows round exactly as there
    w = 2**bls / 2**bld * decay_factor
    return math.floor(w) if w >= block_size else block_size


@functools.lru_cache(maxsize=64)
def _window_table(
    num_frames: int, tokens_per_frame: int, decay_factor: float, block_size: int, sink: bool, adjacent: str
) -> torch.Tensor:
    by_distance = [
        frame_window(d, tokens_per_frame, decay_factor, block_size, adjacent)  # type: ignore[arg-type]
        for d in range(num_frames)
    ]
    idx = torch.arange(num_frames)
    table = torch.tensor(by_distance, dtype=torch.int64)[(idx[:, None] - idx[None, :]).abs()]
    if sink:
        table[:, 0] = tokens_per_frame
    return table


def window_table(
    num_frames: int, tokens_per_frame: int, **options: Unpack[RadialOptions]
) -> torch.Tensor:
    """``(num_frames, num_frames)`` int64 table of :func:`frame_window` for every (query, key) frame pair."""
    g = RadialGeometry(num_frames, tokens_per_frame, **options)
    return _window_table(*g.window_args()).clone()


def _band_pairs(s: int, w: int) -> int:
    """Number of (k, l) pairs in an ``s x s`` frame pair with ``|k - l| <= w``."""
    if w < 0:
        return 0
    if w >= s - 1:
        return s * s
    return s + 2 * (w * s - w * (w + 1) // 2)


def radial_density(
    num_frames: int,
    tokens_per_frame: int,
    *,
    granularity: Granularity = "token",
    **options: Unpack[RadialOptions],
) -> float:
    """Fraction of (query, key) pairs the mask keeps: exact token density, or the block bitmap's density.

    The token density is counted per frame pair, so it is cheap at any size (e.g. 69k tokens).
    """
    g = RadialGeometry(num_frames, tokens_per_frame, **options)
    _check_granularity(granularity)
    if granularity == "block":
        return float(_bitmaps(*g.bitmap_args())[0].float().mean())
    table = _window_table(*g.window_args())
    visual = sum(_band_pairs(tokens_per_frame, int(w)) for w in table.flatten().tolist())
    n = g.n
    return (visual + n * n - (n - g.text_tokens) ** 2) / (n * n)


class RadialTokenRule:
    """The radial rule as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` over joint indices.

    Only visual-visual pairs are decided here; text rows and columns are the ``BlockMask``'s dense ranges.
    A stable object (cached by shape), so compiled kernels are reused across layers and calls.
    """

    def __init__(self, table: torch.Tensor, tokens_per_frame: int, offset: int) -> None:
        self.table = table
        self.tokens_per_frame = tokens_per_frame
        self.offset = offset
        self.n_visual = table.shape[0] * tokens_per_frame

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        s = self.tokens_per_frame
        # text and padding indices are clamped into range: their answer is overridden by the BlockMask
        qv = (q_idx - self.offset).clamp(0, self.n_visual - 1)
        kv = (kv_idx - self.offset).clamp(0, self.n_visual - 1)
        return ((qv % s) - (kv % s)).abs() <= self.table[qv // s, kv // s]

    def __repr__(self) -> str:
        return f"RadialTokenRule(frames={self.table.shape[0]}, tokens_per_frame={self.tokens_per_frame}, offset={self.offset})"


def _visual_offset(n_text: int, text_position: str | None) -> int:
    return n_text if (n_text and text_position == "first") else 0


@functools.lru_cache(maxsize=64)
def _bitmaps(
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    block_size: int,
    sink: bool,
    adjacent: str,
    n_text: int,
    text_position: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference block rule, blocks holding any visible pair) over the joint sequence, text blocks dense."""
    f, s, bs = num_frames, tokens_per_frame, block_size
    table = _window_table(f, s, decay_factor, bs, sink, adjacent).to(torch.int32)
    n_vis = f * s
    n = n_vis + n_text
    off = _visual_offset(n_text, text_position)
    nb = num_blocks(n, bs)
    rule = torch.zeros(nb, nb, dtype=torch.bool)
    anyv = torch.zeros(nb, nb, dtype=torch.bool)

    # Key columns: frame and in-frame position of every visual token.
    cols = torch.arange(n_vis, dtype=torch.int32)
    col_frame, col_pos = cols // s, cols % s

    # Query segments: the part of one frame inside one query block, as (block, frame, k0, k1).
    segs: list[tuple[int, int, int, int]] = []
    for i in range(f):
        start, end = off + i * s, off + (i + 1) * s
        for b in range(start // bs, (end - 1) // bs + 1):
            lo, hi = max(start, b * bs), min(end, (b + 1) * bs)
            segs.append((b, i, lo - start, hi - start))
    seg_t = torch.tensor(segs, dtype=torch.int32).reshape(-1, 4)
    rows_visual = torch.zeros(nb, dtype=torch.int32).index_add_(
        0, seg_t[:, 0], seg_t[:, 3] - seg_t[:, 2]
    )

    # Walk query blocks in chunks; per chunk count, for every key column, the visible query rows.
    per_chunk = max(1, _CHUNK_ELEMS // max(1, n_vis))
    pos = 0
    while pos < len(segs):
        b0 = segs[pos][0]
        end = pos
        while end < len(segs) and end - pos < per_chunk:
            end += 1
        # never split a block across chunks
        b1 = segs[end - 1][0]
        while end < len(segs) and segs[end][0] == b1:
            end += 1
        chunk = seg_t[pos:end]
        blk, frame, k0, k1 = (chunk[:, c : c + 1] for c in range(4))
        w = table.index_select(0, frame[:, 0])[:, col_frame]  # (segments, columns)
        cnt = (torch.minimum(k1, col_pos + w + 1) - torch.maximum(k0, col_pos - w)).clamp_min_(0)
        counts = torch.zeros(b1 - b0 + 1, nb * bs, dtype=torch.int32)
        counts[:, off : off + n_vis].index_add_(0, (blk[:, 0] - b0), cnt)
        counts = counts.view(b1 - b0 + 1, nb, bs)
        rows = rows_visual[b0 : b1 + 1].view(-1, 1, 1)
        nonempty = (counts > 0).sum(-1)
        # density > 1/3 and fraction > 0.6, in integers (exactly the reference's float comparisons)
        high = (3 * counts > rows).sum(-1)
        rule[b0 : b1 + 1] = 5 * high > 3 * nonempty
        anyv[b0 : b1 + 1] = nonempty > 0
        pos = end

    visual_blocks = rows_visual > 0
    diag = torch.arange(nb)
    rule[diag[visual_blocks], diag[visual_blocks]] = True
    text = text_dense_ranges(n, n_text, text_position if n_text else None)
    if text is not None:
        t0, t1 = text[0] // bs, num_blocks(text[1], bs)
        for m in (rule, anyv):
            m[t0:t1, :] = True
            m[:, t0:t1] = True
    return rule, anyv


def radial_token_mask(num_frames: int, tokens_per_frame: int, **options: Unpack[RadialOptions]) -> torch.Tensor:
    """The exact ``(n, n)`` boolean token mask (``n = num_frames * tokens_per_frame + text_tokens``).

    Memory is ``n**2`` bytes, so it is not cached: for pictures, references and small shapes.
    """
    g = RadialGeometry(num_frames, tokens_per_frame, **options)
    n = g.n
    rule = RadialTokenRule(
        _window_table(*g.window_args()), tokens_per_frame, _visual_offset(g.text_tokens, g.text_position)
    )
    idx = torch.arange(n)
    mask = torch.empty(n, n, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.int64)
    step = max(1, (1 << 22) // n)
    for r in range(0, n, step):  # row chunks keep the int64 temporaries small
        mask[r : r + step] = rule(zero, zero, idx[r : r + step, None], idx[None, :])
    text = text_dense_ranges(n, g.text_tokens, g.text_position)
    if text is not None:
        mask[text[0] : text[1], :] = True
        mask[:, text[0] : text[1]] = True
    return mask


def radial_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    granularity: Granularity = "block",
    **options: Unpack[RadialOptions],
) -> torch.Tensor:
    """Radial attention's mask over ``num_frames * tokens_per_frame + text_tokens`` tokens.

    Args:
        num_frames: latent frames after patchify.
        tokens_per_frame: tokens per latent frame (any value: no multiple-of-128 requirement).
        **options: the :class:`RadialOptions` (decay, block size, sink, text run, adjacent rule).
        granularity: ``"block"``: the ``(q_blocks, k_blocks)`` bitmap by the reference's block rule;
            ``"token"``: the exact ``(n, n)`` token mask.

    Returns:
        A fresh bool tensor; its mean is the density (see also :func:`radial_density`).

    Raises:
        ValueError: non-positive sizes or ``decay_factor``, bad ``text_position`` / ``granularity``.
    """
    g = RadialGeometry(num_frames, tokens_per_frame, **options)
    _check_granularity(granularity)
    if granularity == "token":
        return radial_token_mask(num_frames, tokens_per_frame, **options)
    rule, _ = _bitmaps(*g.bitmap_args())
    return rule.clone()


@functools.lru_cache(maxsize=64)
def _engine_parts(
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    block_size: int,
    sink: bool,
    adjacent: str,
    n_text: int,
    text_position: str | None,
    granularity: str,
    device: str,
) -> tuple[torch.Tensor, RadialTokenRule | None]:
    rule, anyv = _bitmaps(num_frames, tokens_per_frame, decay_factor, block_size, sink, adjacent, n_text, text_position)
    if granularity == "block":
        return rule.to(device), None
    table = _window_table(num_frames, tokens_per_frame, decay_factor, block_size, sink, adjacent).to(device)
    return anyv.to(device), RadialTokenRule(table, tokens_per_frame, _visual_offset(n_text, text_position))


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    granularity: Granularity = "block",
    text_valid: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **options: Unpack[RadialOptions],
) -> BlockMask:
    """The engine's :class:`~diffattn.ops.BlockMask` for radial attention.

    ``granularity="block"`` runs the reference's block bitmap (every pair inside a kept block is visible);
    ``"token"`` runs the blocks holding any visible pair with the exact rule inside them. ``text_valid``
    (``(batch,)`` valid text tokens per sample, counted from the start of the text run) hides padded text
    keys from every query, as the stock processors' key-padding masks do.
    """
    g = RadialGeometry(num_frames, tokens_per_frame, **options)
    _check_granularity(granularity)
    dev = torch.device(device)
    bitmap, rule = _engine_parts(*g.bitmap_args(), granularity, str(dev))
    n = g.n
    text = text_dense_ranges(n, g.text_tokens, g.text_position)
    key_padding = None
    if text_valid is not None and text is not None:
        valid = text_valid.to(dev).reshape(-1, 1)
        idx = torch.arange(n, device=dev)[None, :]
        in_text = (idx >= text[0]) & (idx < text[1])
        key_padding = ~in_text | (idx - text[0] < valid)
    return BlockMask(bitmap, n, n, g.block_size, token_rule=rule, dense_q=text, dense_kv=text, key_padding=key_padding)
