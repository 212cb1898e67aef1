"""Hierarchical local attention (Zhang and Tai 2025, "Scale-DiT: Ultra-High-Resolution Image Generation with
Hierarchical Local Attention") as a block mask over a token sequence in Hilbert (or another) order.

The joint sequence is ``[text; HR; LR]`` (``text_position="first"``, Flux) or ``[HR; LR; text]``
(``"last"``, SD3), where ``HR`` are the ``height x width`` high-resolution tokens and ``LR`` the optional
``lr_height x lr_width`` low-resolution guidance tokens, each permuted by the chosen order
(:mod:`diffattn.masks.hilbert`). Rules, with ``(y, x)`` the token's position on its own grid:

- HR sees HR when ``|dy| <= radius`` and ``|dx| <= radius`` (a ``(2r+1)^2`` Chebyshev neighbourhood);
- HR sees text, text sees text and HR (text is dense when there are no LR tokens);
- HR sees LR: ``lr_mode="window"``: the LR tokens under its ``lr_window x lr_window`` HR window and the
  8 adjacent windows (an LR token lies under the HR window of its position times the HR/LR ratio);
  ``lr_mode="all"``: every LR token (the reference's training setting); ``lr_mode="sliding"``: the LR
  tokens whose cell centre lies within ``1.5 * lr_window`` HR tokens of it on both axes (the same reach
  as the 3 x 3 windows on average, but centred on each token, so the LR context shifts smoothly instead
  of jumping at window borders, where ``"window"`` leaves seams);
- LR sees LR with ``|dy|, |dx| <= lr_radius`` on the LR grid. LR sees neither text nor HR.

The block bitmap is built from block geometry, never from ``n**2`` token pairs: the grid is cut into
row *runs* (maximal horizontal runs of tokens sharing a block), and the runs that can see each other
are found per row offset with a binary search, which yields exactly the blocks holding at least one
visible pair (about a million run pairs at 256 x 256 tokens). The HR -> LR part goes through a
(block x window) incidence product. Token densities are counted in closed form (all rules are
separable in y and x), so :func:`local_density` and :func:`block_fill` are cheap at any size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

import torch

from ..ops.block_mask import BlockMask, num_blocks
from .hilbert import ORDERS, token_order

__all__ = [
    "LocalGeometry",
    "LocalOptions",
    "LocalTokenRule",
    "block_fill",
    "geometry_block_mask",
    "local_block_mask",
    "local_density",
    "local_token_mask",
    "visible_pairs",
]

LRMode = Literal["window", "all", "sliding"]
LR_MODES: tuple[str, ...] = ("window", "all", "sliding")
Granularity = Literal["token", "block"]

# token kinds in the rule's lookup table
TEXT, HR, LR = 0, 1, 2


def _pos_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class LocalOptions(TypedDict, total=False):
    """The keyword options every public function of this module takes beside the grid, radius, order and
    block size (the fields of :class:`LocalGeometry`).

    Attributes:
        window: window side of ``order="window"`` (16).
        text_len: text tokens in the joint sequence (0).
        text_position: ``"first"`` (``[text; HR; LR]``, the default) or ``"last"`` (``[HR; LR; text]``).
        lr_height: LR guidance grid height (none by default); the HR/LR ratio must be the same integer on
            both axes.
        lr_width: LR guidance grid width, given with ``lr_height``.
        lr_radius: LR tokens see LR tokens within this Chebyshev radius on the LR grid (2).
        lr_mode: ``"window"`` (HR sees the LR tokens under its ``lr_window`` window and the adjacent ones,
            the reference's inference mask; the default), ``"all"`` (HR sees every LR token) or
            ``"sliding"`` (the LR tokens within ``1.5 * lr_window`` of each HR token: no window borders, so
            no seams at them).
        lr_window: HR window side of the LR rule (16 in the reference).
    """

    window: int
    text_len: int
    text_position: str | None
    lr_height: int | None
    lr_width: int | None
    lr_radius: int
    lr_mode: LRMode
    lr_window: int


@dataclass(frozen=True)
class LocalGeometry:
    """Validated sizes of one local-attention sequence (see the module docstring for the rules).

    ``text_position=None`` means ``"first"`` and ``lr_height`` / ``lr_width`` ``None`` mean no LR tokens.
    """

    height: int
    width: int
    radius: int = 8
    order: str = "hilbert"
    block_size: int = 128
    window: int = 16
    text_len: int = 0
    text_position: str = "first"
    lr_height: int = 0
    lr_width: int = 0
    lr_radius: int = 2
    lr_mode: str = "window"
    lr_window: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_position", self.text_position or "first")
        object.__setattr__(self, "lr_height", self.lr_height or 0)
        object.__setattr__(self, "lr_width", self.lr_width or 0)
        _pos_int("height", self.height)
        _pos_int("width", self.width)
        _pos_int("radius", self.radius)
        if self.radius > max(self.height, self.width, 2) - 1:
            raise ValueError(
                f"radius={self.radius} is larger than the {self.height}x{self.width} token grid (at most "
                f"{max(self.height, self.width) - 1} reaches every token); use dense attention or a smaller radius"
            )
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {self.order!r}")
        _pos_int("block_size", self.block_size)
        _pos_int("window", self.window)
        _pos_int("text_len", self.text_len, 0)
        if self.text_position not in ("first", "last"):
            raise ValueError(f"text_position must be 'first' or 'last', got {self.text_position!r}")
        _pos_int("lr_height", self.lr_height, 0)
        _pos_int("lr_width", self.lr_width, 0)
        if bool(self.lr_height) != bool(self.lr_width):
            raise ValueError(
                f"give lr_height and lr_width together, got lr_height={self.lr_height}, lr_width={self.lr_width}"
            )
        if self.lr_height:
            if self.height % self.lr_height or self.width % self.lr_width:
                raise ValueError(
                    f"the HR/LR ratio must be an integer: HR grid {self.height}x{self.width} is not a multiple of "
                    f"lr_height x lr_width = {self.lr_height}x{self.lr_width}"
                )
            if self.height // self.lr_height != self.width // self.lr_width:
                raise ValueError(
                    f"HR grid {self.height}x{self.width} and LR grid {self.lr_height}x{self.lr_width} have different "
                    "HR/LR ratios along height and width"
                )
        _pos_int("lr_radius", self.lr_radius, 0)
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {list(LR_MODES)}, got {self.lr_mode!r}")
        _pos_int("lr_window", self.lr_window)

    @property
    def n_hr(self) -> int:
        return self.height * self.width

    @property
    def n_lr(self) -> int:
        return self.lr_height * self.lr_width

    @property
    def ratio(self) -> int:
        return self.height // self.lr_height if self.lr_height else 1

    @property
    def n(self) -> int:
        return self.text_len + self.n_hr + self.n_lr

    @property
    def hr_start(self) -> int:
        return self.text_len if self.text_position == "first" else 0

    @property
    def lr_start(self) -> int:
        return self.hr_start + self.n_hr

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "first" else self.n_hr + self.n_lr

    def text_range(self) -> tuple[int, int] | None:
        return (self.text_start, self.text_start + self.text_len) if self.text_len else None


# ----- lookup tables and the token rule ---------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _tables(g: LocalGeometry) -> torch.Tensor:
    """``(5, n)`` int32: kind, y, x, window row, window column of every sequence position."""
    t = torch.zeros(5, g.n, dtype=torch.int32)
    t[0, g.text_start : g.text_start + g.text_len] = TEXT
    perm = token_order(g.height, g.width, g.order, g.window)
    hr = slice(g.hr_start, g.hr_start + g.n_hr)
    t[0, hr] = HR
    t[1, hr] = (perm // g.width).to(torch.int32)
    t[2, hr] = (perm % g.width).to(torch.int32)
    t[3, hr] = t[1, hr] // g.lr_window
    t[4, hr] = t[2, hr] // g.lr_window
    if g.n_lr:
        lperm = token_order(g.lr_height, g.lr_width, g.order, g.window)
        lr = slice(g.lr_start, g.lr_start + g.n_lr)
        t[0, lr] = LR
        t[1, lr] = (lperm // g.lr_width).to(torch.int32)
        t[2, lr] = (lperm % g.lr_width).to(torch.int32)
        t[3, lr] = t[1, lr] * g.ratio // g.lr_window
        t[4, lr] = t[2, lr] * g.ratio // g.lr_window
    return t


def _sliding_near(hr: torch.Tensor, lr: torch.Tensor, ratio: int, lr_window: int) -> torch.Tensor:
    """``lr_mode="sliding"`` on one axis: the LR cell's centre ``lr * ratio + (ratio - 1) / 2`` lies within
    ``1.5 * lr_window`` of the HR coordinate ``hr`` (counted in half tokens, so in integers)."""
    return (2 * hr - 2 * ratio * lr - (ratio - 1)).abs() <= 3 * lr_window


def _sliding_span(lo: torch.Tensor, hi: torch.Tensor, ratio: int, lr_window: int, n_lr: int):
    """LR coordinates ``[first, last]`` seen (``"sliding"``) from any HR coordinate in ``[lo, hi]``."""
    shift, reach = ratio - 1, 3 * lr_window
    first = torch.div(2 * lo - shift - reach + 2 * ratio - 1, 2 * ratio, rounding_mode="floor")  # ceil
    last = torch.div(2 * hi - shift + reach, 2 * ratio, rounding_mode="floor")
    return first.clamp(min=0), last.clamp(max=n_lr - 1)


class LocalTokenRule:
    """The local rule as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` over sequence indices.

    Looks up kind and coordinates of both tokens in per-position tables (no index arithmetic on the
    permutation at call time). A stable object cached by geometry, so compiled kernels are reused.
    """

    def __init__(
        self, tables: torch.Tensor, radius: int, lr_radius: int, lr_mode: str, ratio: int = 1, lr_window: int = 16
    ) -> None:
        self.tables = tables
        self.n = tables.shape[1]
        self.radius = radius
        self.lr_radius = lr_radius
        self.lr_mode = lr_mode
        self.ratio = ratio
        self.lr_window = lr_window

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        t = self.tables
        q = q_idx.clamp(0, self.n - 1)
        k = kv_idx.clamp(0, self.n - 1)
        kq, kk = t[0][q], t[0][k]
        dy = (t[1][q] - t[1][k]).abs()
        dx = (t[2][q] - t[2][k]).abs()
        hr_q, hr_k = kq == HR, kk == HR
        lr_q, lr_k = kq == LR, kk == LR
        text_q, text_k = kq == TEXT, kk == TEXT
        ok = hr_q & hr_k & (dy <= self.radius) & (dx <= self.radius)
        ok = ok | (lr_q & lr_k & (dy <= self.lr_radius) & (dx <= self.lr_radius))
        ok = ok | (text_q & (text_k | hr_k)) | (hr_q & text_k)
        if self.lr_mode == "all":
            ok = ok | (hr_q & lr_k)
        elif self.lr_mode == "sliding":
            near = _sliding_near(t[1][q], t[1][k], self.ratio, self.lr_window) & _sliding_near(
                t[2][q], t[2][k], self.ratio, self.lr_window
            )
            ok = ok | (hr_q & lr_k & near)
        else:
            near = ((t[3][q] - t[3][k]).abs() <= 1) & ((t[4][q] - t[4][k]).abs() <= 1)
            ok = ok | (hr_q & lr_k & near)
        return ok

    def __repr__(self) -> str:
        return (
            f"LocalTokenRule(n={self.n}, radius={self.radius}, lr_radius={self.lr_radius}, lr_mode={self.lr_mode!r}, "
            f"ratio={self.ratio}, lr_window={self.lr_window})"
        )


# ----- block bitmap from run geometry ------------------------------------------------------------------------


def _runs(block_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximal horizontal runs of equal block id: (row, x_lo, x_hi, block), sorted by row then x."""
    h, w = block_grid.shape
    flat = block_grid.flatten()
    xs = torch.arange(w).repeat(h)
    start = torch.ones(h * w, dtype=torch.bool)
    start[1:] = (xs[1:] == 0) | (flat[1:] != flat[:-1])
    first = start.nonzero().flatten()
    last = torch.cat([first[1:] - 1, torch.tensor([h * w - 1])])
    return first // w, first % w, last % w, flat[first]


def _local_block_pairs(block_grid: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query block, key block) pairs holding a token pair within Chebyshev ``radius`` on one grid."""
    h, w = block_grid.shape
    row, lo, hi, blk = _runs(block_grid)
    big = w + 1
    key_lo = row * big + lo  # both sorted: runs of a row are disjoint and ordered by x
    key_hi = row * big + hi
    q_all, k_all = [], []
    a = (lo - radius).clamp(min=0)
    b = (hi + radius).clamp(max=w - 1)
    for dy in range(-radius, radius + 1):
        target = row + dy
        ok = (target >= 0) & (target < h)
        idx = ok.nonzero().flatten()
        if not len(idx):
            continue
        tr = target[idx]
        # first run of the target row ending at or after a, last run starting at or before b
        first = torch.searchsorted(key_hi, tr * big + a[idx], right=False)
        last = torch.searchsorted(key_lo, tr * big + b[idx], right=True) - 1
        count = (last - first + 1).clamp(min=0)
        if int(count.sum()) == 0:
            continue
        src = idx.repeat_interleave(count)
        offs = torch.arange(int(count.sum())) - (torch.cumsum(count, 0) - count).repeat_interleave(count)
        dst = first.repeat_interleave(count) + offs
        q_all.append(blk[src])
        k_all.append(blk[dst])
    return torch.cat(q_all), torch.cat(k_all)


def _block_grid(perm: torch.Tensor, h: int, w: int, start: int, bs: int) -> torch.Tensor:
    """Block id of every grid cell, for tokens at sequence positions ``start + argsort-position``."""
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.numel())
    return ((pos + start) // bs).view(h, w)


def _incidence(block_ids: torch.Tensor, window_ids: torch.Tensor, n_blocks: int, n_windows: int) -> torch.Tensor:
    m = torch.zeros(n_blocks, n_windows)
    m[block_ids, window_ids] = 1.0
    return m


@functools.lru_cache(maxsize=32)
def _bitmap(g: LocalGeometry) -> torch.Tensor:
    bs = g.block_size
    nb = num_blocks(g.n, bs)
    bitmap = torch.zeros(nb, nb, dtype=torch.bool)
    perm = token_order(g.height, g.width, g.order, g.window)
    hr_grid = _block_grid(perm, g.height, g.width, g.hr_start, bs)
    qb, kb = _local_block_pairs(hr_grid, g.radius)
    bitmap[qb, kb] = True
    hr_blocks = torch.unique(hr_grid)
    text = g.text_range()
    if text is not None:
        tb = torch.arange(text[0] // bs, num_blocks(text[1], bs))
        bitmap[tb[:, None], tb[None, :]] = True
        bitmap[tb[:, None], hr_blocks[None, :]] = True  # text sees HR
        bitmap[hr_blocks[:, None], tb[None, :]] = True  # HR sees text
    if g.n_lr:
        lperm = token_order(g.lr_height, g.lr_width, g.order, g.window)
        lr_grid = _block_grid(lperm, g.lr_height, g.lr_width, g.lr_start, bs)
        qb, kb = _local_block_pairs(lr_grid, g.lr_radius)
        bitmap[qb, kb] = True
        lr_blocks = torch.unique(lr_grid)
        if g.lr_mode == "all":
            bitmap[hr_blocks[:, None], lr_blocks[None, :]] = True
        elif g.lr_mode == "sliding":
            bitmap |= _sliding_blocks(g, hr_grid, lr_grid, nb)
        else:
            # windows: HR tokens by their own window, LR tokens by the HR window they lie under
            n_wy, n_wx = -(-g.height // g.lr_window), -(-g.width // g.lr_window)
            ys, xs = torch.meshgrid(torch.arange(g.height), torch.arange(g.width), indexing="ij")
            hr_win = (ys // g.lr_window) * n_wx + xs // g.lr_window
            ly, lx = torch.meshgrid(torch.arange(g.lr_height), torch.arange(g.lr_width), indexing="ij")
            lr_win = (ly * g.ratio // g.lr_window) * n_wx + lx * g.ratio // g.lr_window
            nw = n_wy * n_wx
            a_hr = _incidence(hr_grid.flatten(), hr_win.flatten(), nb, nw)
            a_lr = _incidence(lr_grid.flatten(), lr_win.flatten(), nb, nw)
            wy, wx = torch.arange(nw) // n_wx, torch.arange(nw) % n_wx
            near = (((wy[:, None] - wy[None, :]).abs() <= 1) & ((wx[:, None] - wx[None, :]).abs() <= 1)).float()
            bitmap |= (a_hr @ near @ a_lr.T) > 0
    return bitmap


def _sliding_blocks(g: LocalGeometry, hr_grid: torch.Tensor, lr_grid: torch.Tensor, nb: int) -> torch.Tensor:
    """HR -> LR blocks of ``lr_mode="sliding"``: each HR run sees an LR rectangle; the rectangles are painted
    per HR block (corner increments, then 2-D prefix sums) and the LR blocks under them are kept."""
    row, lo, hi, blk = _runs(hr_grid)
    if 3 * g.lr_window < 2 * g.ratio:
        # a reach under one LR cell: some HR columns see no LR column, so a run's columns need not see
        # one contiguous LR span; go token by token
        row, lo = torch.meshgrid(torch.arange(g.height), torch.arange(g.width), indexing="ij")
        row, lo, blk = row.flatten(), lo.flatten(), hr_grid.flatten()
        hi = lo
    y0, y1 = _sliding_span(row, row, g.ratio, g.lr_window, g.lr_height)
    x0, x1 = _sliding_span(lo, hi, g.ratio, g.lr_window, g.lr_width)
    ok = (y0 <= y1) & (x0 <= x1)
    hr_blocks = torch.unique(hr_grid)
    local = torch.searchsorted(hr_blocks, blk[ok])
    y0, y1, x0, x1 = y0[ok], y1[ok] + 1, x0[ok], x1[ok] + 1
    paint = torch.zeros(len(hr_blocks), g.lr_height + 1, g.lr_width + 1, dtype=torch.int32)
    ones = torch.ones_like(local, dtype=torch.int32)
    for yy, xx, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        paint.index_put_((local, yy, xx), sign * ones, accumulate=True)
    covered = paint.cumsum(1).cumsum(2)[:, :-1, :-1] > 0  # (HR blocks, LR rows, LR cols)
    lr_blocks = torch.unique(lr_grid)
    lr_onehot = _incidence(torch.arange(g.n_lr), torch.searchsorted(lr_blocks, lr_grid.flatten()), g.n_lr, len(lr_blocks))
    seen = (covered.flatten(1).float() @ lr_onehot) > 0  # (HR blocks, LR blocks)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    out[hr_blocks[:, None], lr_blocks[None, :]] = seen
    return out


# ----- closed-form token counts -----------------------------------------------------------------------------


def _reach(n: int, r: int) -> int:
    """Number of ordered pairs (i, j) in ``range(n)`` with ``|i - j| <= r``."""
    r = min(r, n - 1)
    return n + 2 * (r * n - r * (r + 1) // 2)


def _near_window_pairs(n_hr: int, n_lr: int, ratio: int, window: int) -> int:
    """Pairs (HR index, LR index) on one axis whose windows are at most one apart."""
    hw = torch.arange(n_hr) // window
    lw = torch.arange(n_lr) * ratio // window
    return int(((hw[:, None] - lw[None, :]).abs() <= 1).sum())


def _sliding_pairs(n_hr: int, n_lr: int, ratio: int, window: int) -> int:
    """Pairs (HR index, LR index) on one axis within the sliding reach."""
    return int(_sliding_near(torch.arange(n_hr)[:, None], torch.arange(n_lr)[None, :], ratio, window).sum())


def visible_pairs(g: LocalGeometry) -> int:
    pairs = _reach(g.height, g.radius) * _reach(g.width, g.radius)
    t = g.text_len
    pairs += t * t + 2 * t * g.n_hr
    if g.n_lr:
        pairs += _reach(g.lr_height, g.lr_radius) * _reach(g.lr_width, g.lr_radius)
        if g.lr_mode == "all":
            pairs += g.n_hr * g.n_lr
        elif g.lr_mode == "sliding":
            pairs += _sliding_pairs(g.height, g.lr_height, g.ratio, g.lr_window) * _sliding_pairs(
                g.width, g.lr_width, g.ratio, g.lr_window
            )
        else:
            pairs += _near_window_pairs(g.height, g.lr_height, g.ratio, g.lr_window) * _near_window_pairs(
                g.width, g.lr_width, g.ratio, g.lr_window
            )
    return pairs


def _computed_pairs(g: LocalGeometry, effective: torch.Tensor) -> int:
    bs = g.block_size
    nb = num_blocks(g.n, bs)
    sizes = torch.full((nb,), bs, dtype=torch.float64)
    sizes[-1] = g.n - (nb - 1) * bs
    eff = effective.reshape(-1, nb, nb).double().mean(0)
    return int(round(float(sizes @ eff @ sizes)))


# ----- public API -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _engine_parts(g: LocalGeometry, device: str) -> tuple[torch.Tensor, LocalTokenRule]:
    rule = LocalTokenRule(_tables(g).to(device), g.radius, g.lr_radius, g.lr_mode, g.ratio, g.lr_window)
    return _bitmap(g).to(device), rule


def geometry_block_mask(
    g: LocalGeometry, device: torch.device | str = "cpu", granularity: Granularity = "token"
) -> BlockMask:
    """:func:`local_block_mask` for a validated :class:`LocalGeometry`."""
    if granularity not in ("token", "block"):
        raise ValueError(f"granularity must be 'token' or 'block', got {granularity!r}")
    bitmap, rule = _engine_parts(g, str(torch.device(device)))
    # without LR tokens text rows and columns are dense: mark them so the engine skips their token check
    dense = g.text_range() if not g.n_lr else None
    return BlockMask(
        bitmap, g.n, g.n, g.block_size, token_rule=rule if granularity == "token" else None, dense_q=dense,
        dense_kv=dense,
    )


def local_block_mask(
    height: int,
    width: int,
    radius: int = 8,
    order: str = "hilbert",
    block_size: int = 128,
    *,
    granularity: Granularity = "token",
    device: torch.device | str = "cpu",
    **options: Unpack[LocalOptions],
) -> BlockMask:
    """The engine's :class:`~diffattn.ops.BlockMask` for hierarchical local attention.

    Args:
        height, width: HR token grid (after patchify).
        radius: HR tokens see HR tokens with ``|dy| <= radius`` and ``|dx| <= radius`` (8 in the reference).
        order: token order of the HR (and LR) tokens in the sequence: ``"hilbert"``, ``"window"`` or
            ``"raster"`` (the sequence is assumed permuted by :func:`~diffattn.masks.hilbert.token_order`).
        block_size: engine block size.
        **options: the :class:`LocalOptions` (text tokens, LR guidance grid and its rule).
        granularity: ``"token"``: the exact rule inside the kept blocks; ``"block"``: every pair of a kept
            block is visible (a superset of the rule, like the reference's block-sparse kernel; no
            token-level checks, so the engine runs kept blocks at full speed).
        device: where the bitmap and the rule's tables live.

    Returns:
        A ``BlockMask`` whose bitmap holds exactly the blocks with at least one visible pair and whose
        token rule is exact (cached by geometry; cheap at 256x256 tokens).

    Raises:
        ValueError: radius < 1 or larger than the grid, a non-integer HR/LR ratio, bad sizes or options.
    """
    g = LocalGeometry(height, width, radius, order, block_size, **options)
    return geometry_block_mask(g, device, granularity)


def local_density(
    height: int,
    width: int,
    radius: int = 8,
    order: str = "hilbert",
    block_size: int = 128,
    *,
    granularity: Granularity = "token",
    **options: Unpack[LocalOptions],
) -> float:
    """Fraction of (query, key) pairs kept: ``"token"``: by the rule (exact, closed form, order-independent);
    ``"block"``: the fraction of blocks the engine computes (depends on ``order``)."""
    g = LocalGeometry(height, width, radius, order, block_size, **options)
    if granularity == "token":
        return visible_pairs(g) / (g.n * g.n)
    if granularity == "block":
        return geometry_block_mask(g).density()
    raise ValueError(f"granularity must be 'token' or 'block', got {granularity!r}")


def block_fill(
    height: int,
    width: int,
    radius: int = 8,
    order: str = "hilbert",
    block_size: int = 128,
    **options: Unpack[LocalOptions],
) -> float:
    """Fraction of the token pairs in the computed blocks that the token rule keeps (1.0 = no waste)."""
    g = LocalGeometry(height, width, radius, order, block_size, **options)
    return visible_pairs(g) / _computed_pairs(g, geometry_block_mask(g).effective_bitmap())


def local_token_mask(
    height: int,
    width: int,
    radius: int = 8,
    order: str = "hilbert",
    **options: Unpack[LocalOptions],
) -> torch.Tensor:
    """The exact ``(n, n)`` token mask over the permuted sequence, computed from coordinates pair by pair.

    Independent of the lookup-table rule and the bitmap (a reference for tests and pictures); memory is
    ``n**2`` bytes, so small shapes only.
    """
    g = LocalGeometry(height, width, radius, order, 128, **options)
    kind = torch.full((g.n,), TEXT, dtype=torch.int64)
    ys = torch.zeros(g.n, dtype=torch.int64)
    xs = torch.zeros(g.n, dtype=torch.int64)
    # LR tokens carry their position scaled onto the HR grid, HR tokens their own position
    perm = token_order(g.height, g.width, g.order, g.window)
    hr = slice(g.hr_start, g.hr_start + g.n_hr)
    kind[hr], ys[hr], xs[hr] = HR, perm // g.width, perm % g.width
    if g.n_lr:
        lperm = token_order(g.lr_height, g.lr_width, g.order, g.window)
        lr = slice(g.lr_start, g.lr_start + g.n_lr)
        kind[lr], ys[lr], xs[lr] = LR, lperm // g.lr_width * g.ratio, lperm % g.lr_width * g.ratio
    q_kind, k_kind = kind[:, None], kind[None, :]
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    mask = (q_kind == HR) & (k_kind == HR) & (dy <= g.radius) & (dx <= g.radius)
    lr_reach = g.lr_radius * g.ratio
    mask |= (q_kind == LR) & (k_kind == LR) & (dy <= lr_reach) & (dx <= lr_reach)
    mask |= (q_kind == TEXT) & (k_kind != LR)
    mask |= (q_kind == HR) & (k_kind == TEXT)
    if g.lr_mode == "all":
        mask |= (q_kind == HR) & (k_kind == LR)
    elif g.lr_mode == "sliding":
        # LR coordinates are scaled onto the HR grid here: the cell centre is ys + (ratio - 1) / 2
        reach = 3 * g.lr_window
        cy = (2 * ys[:, None] - 2 * ys[None, :] - (g.ratio - 1)).abs() <= reach
        cx = (2 * xs[:, None] - 2 * xs[None, :] - (g.ratio - 1)).abs() <= reach
        mask |= (q_kind == HR) & (k_kind == LR) & cy & cx
    else:
        wy = ys // g.lr_window
        wx = xs // g.lr_window
        near = ((wy[:, None] - wy[None, :]).abs() <= 1) & ((wx[:, None] - wx[None, :]).abs() <= 1)
        mask |= (q_kind == HR) & (k_kind == LR) & near
    return mask
