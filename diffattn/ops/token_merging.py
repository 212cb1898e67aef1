"""Token merging (ToMe for Stable Diffusion) on a 2D token grid: pure functions.

Bipartite soft matching (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion"): the ``h x w``
tokens of one image are split into *dst* tokens, one per ``sx x sy`` window (random inside the
window), and *src* tokens (the rest). Every src token finds its most similar dst token (cosine
similarity); the ``r`` src tokens with the highest similarity are averaged into their dst token.
:func:`merge` returns ``N - r`` tokens, :func:`unmerge` copies each merged result back to every
position it came from.

    src, dst = random_partition(h, w, sx, sy, generator=g)
    m = bipartite_soft_matching(metric, src, dst)
    y = merge(x, m, r)           # (B, N - r, C): [unmerged src | dst]
    x_back = unmerge(y, m, r)    # (B, N, C)

With ``r == 0`` merge is a permutation and unmerge its inverse. Ties are broken deterministically
(stable sorts), which is the one place where this differs from ``tomesd`` (its argsorts are unstable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "merge",
    "num_dst",
    "random_partition",
    "unmerge",
]


# Score elements computed per slice in bipartite matching (16 MB in fp32: inside a 32 MB L3 cache).
_SCORE_CHUNK_ELEMENTS = 4 * 2**20


def num_dst(h: int, w: int, sx: int, sy: int) -> int:
    """Number of dst tokens: one per full ``sx x sy`` window (rows/columns left over are all src)."""
    return (h // sy) * (w // sx)


def random_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    generator: torch.Generator | None = None,
    randomize: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the raster-ordered ``h x w`` grid into src and dst token positions.

    One dst token per full ``sx`` (wide) x ``sy`` (high) window: a random one (drawn with
    ``generator``) or, with ``randomize=False``, the window's top-left token. Rows and columns that do
    not fill a window are src.

    Returns:
        ``(src_pos, dst_pos)``: 1-D int64 raster positions, each in increasing order.

    Raises:
        ValueError: when ``sx``/``sy`` are not positive or no window fits the grid.
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"sx and sy must be >= 1, got sx={sx}, sy={sy}")
    hsy, wsx = h // sy, w // sx
    if hsy == 0 or wsx == 0:
        raise ValueError(f"an sx x sy = {sx} x {sy} window does not fit a token grid of {h} x {w} (h x w)")
    if randomize:
        # generated on the generator's device (CPU by default), then moved: seeded results do not
        # depend on the device the model runs on
        pick = torch.randint(sx * sy, (hsy, wsx), generator=generator)
    else:
        pick = torch.zeros(hsy, wsx, dtype=torch.long)
    rows = torch.arange(hsy).view(-1, 1) * sy + pick // sx
    cols = torch.arange(wsx).view(1, -1) * sx + pick % sx
    dst_pos = (rows * w + cols).flatten().sort().values
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst_pos] = True
    src_pos = (~is_dst).nonzero().flatten()
    return src_pos.to(device), dst_pos.to(device)


@dataclass(frozen=True)
class Matching:
    """The result of bipartite soft matching for a batch.

    Attributes:
        src_pos: ``(Ns,)`` raster positions of the src tokens.
        dst_pos: ``(Nd,)`` raster positions of the dst tokens.
        order: ``(B, Ns)`` src indices (into ``src_pos``) from most to least similar to their dst.
        best_dst: ``(B, Ns)`` the most similar dst index (into ``dst_pos``) of each src token.
    """

    src_pos: torch.Tensor
    dst_pos: torch.Tensor
    order: torch.Tensor
    best_dst: torch.Tensor

    @property
    def num_src(self) -> int:
        return self.src_pos.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.src_pos.shape[0] + self.dst_pos.shape[0]


def bipartite_soft_matching(metric: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor) -> Matching:
    """Match each src token of ``metric`` (B, N, C) to its most cosine-similar dst token.

    The indices carry no gradient (as in ToMe); :func:`merge` / :func:`unmerge` stay differentiable
    in the values they move.
    """
    if metric.ndim != 3:
        raise ValueError(f"metric must be (batch, tokens, channels), got shape {tuple(metric.shape)}")
    n = metric.shape[1]
    if src_pos.numel() + dst_pos.numel() != n:
        raise ValueError(
            f"src ({src_pos.numel()}) + dst ({dst_pos.numel()}) positions do not cover the {n} tokens of metric"
        )
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        src, dst_t = m[:, src_pos], m[:, dst_pos].transpose(-1, -2)
        b, ns, nd = src.shape[0], src.shape[1], dst_t.shape[-1]
        # the (B, Ns, Nd) scores are only reduced to a max per row: computed a slice of rows at a time
        # into one reused buffer that stays in cache (the whole matrix is 400 MB for SD at 1024 px,
        # and writing it out cost a third of the matching)
        rows = max(1, _SCORE_CHUNK_ELEMENTS // max(1, b * nd))
        node_max = torch.empty(b, ns, dtype=m.dtype, device=m.device)
        best_dst = torch.empty(b, ns, dtype=torch.long, device=m.device)
        buf = m.new_empty(b, min(rows, ns), nd)
        for i in range(0, ns, rows):
            part = torch.bmm(src[:, i : i + rows], dst_t, out=buf[:, : min(rows, ns - i)])
            torch.max(part, dim=-1, out=(node_max[:, i : i + rows], best_dst[:, i : i + rows]))
        order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    return Matching(src_pos, dst_pos, order, best_dst)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for (B, T, C) ``x`` and (B, K) ``idx``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge(x: torch.Tensor, matching: Matching, r: int, mode: str = "mean") -> torch.Tensor:
    """Merge the ``r`` best-matched src tokens of ``x`` (B, N, C) into their dst tokens.

    Returns ``(B, N - r, C)``: the ``Ns - r`` unmerged src tokens (most similar first), then the dst
    tokens in ``dst_pos`` order, each the ``mode`` ("mean", "sum", "amax", ...) of itself and the src
    tokens merged into it (tomesd's unweighted mean).
    """
    if not 0 <= r <= matching.num_src:
        raise ValueError(f"r={r} must be in [0, {matching.num_src}] (the number of src tokens)")
    order = matching.order.expand(x.shape[0], -1)
    # rows are gathered straight from x by position: no intermediate src/dst copies
    unm = _rows(x, matching.src_pos[order[:, r:]])
    dst = x[:, matching.dst_pos]
    if r > 0:
        merged = order[:, :r]
        into = torch.gather(matching.best_dst.expand(x.shape[0], -1), 1, merged)
        index = into.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        src = _rows(x, matching.src_pos[merged])
        # in place on the fresh copy `dst` (autograd-safe: indexing does not keep its output)
        if mode == "mean":
            # sum, then divide by the group sizes: several times faster than scatter_reduce's "mean"
            count = torch.ones(dst.shape[:2], dtype=dst.dtype, device=dst.device)
            count = count.scatter_add_(1, into, torch.ones_like(into, dtype=dst.dtype))
            dst = dst.scatter_add_(1, index, src) / count.unsqueeze(-1)
        else:
            dst = dst.scatter_reduce_(1, index, src, reduce=mode)
    return torch.cat([unm, dst], dim=1)


def unmerge(y: torch.Tensor, matching: Matching, r: int) -> torch.Tensor:
    """Inverse of :func:`merge` for the token axis: (B, N - r, C) -> (B, N, C).

    Unmerged src and dst tokens go back to their positions; every merged src position receives its
    dst token's value.
    """
    n, ns = matching.num_tokens, matching.num_src
    if y.shape[1] != n - r:
        raise ValueError(f"expected {n - r} merged tokens (N={n}, r={r}), got {y.shape[1]}")
    b = y.shape[0]
    order = matching.order.expand(b, -1)
    # for every position, the row of y it takes its value from; then one gather over (N, C)
    row = torch.empty(b, n, dtype=torch.long, device=y.device)
    row[:, matching.dst_pos] = torch.arange(ns - r, n - r, device=y.device)
    row.scatter_(1, matching.src_pos[order[:, r:]], torch.arange(ns - r, device=y.device).expand(b, -1))
    if r > 0:
        merged = order[:, :r]
        into = torch.gather(matching.best_dst.expand(b, -1), 1, merged)
        row.scatter_(1, matching.src_pos[merged], into + (ns - r))
    return _rows(y, row)
