"""Token orders of a 2-D token grid: raster, window-first and a generalized Hilbert curve.

Every order is a 1-D ``LongTensor`` ``perm`` of length ``height * width`` where ``perm[i]`` is the raster
index ``y * width + x`` of the ``i``-th token along the order. So ``tokens[:, perm]`` reorders a raster
sequence and ``tokens_in_order[:, torch.argsort(perm)]`` undoes it.

:func:`hilbert_order` works for any rectangle, not only powers of two. It splits the rectangle
recursively in the way of the "generalized Hilbert" (gilbert) construction: a rectangle is traversed
from one corner along a *major* axis ``a`` and a *minor* axis ``b``; a long rectangle (``2|a| > 3|b|``)
is cut into two parts along ``a`` traversed one after the other, any other into three parts (up the
first part of ``b``, along ``a`` over the rest of ``b``, back down). Cuts are made where the curve's
corners line up (even first parts whenever possible), and, unlike plain halving, at a multiple of the
largest power of two within the middle 40% of the side: parts are then power-of-two aligned, so runs of
2**k consecutive tokens are compact as on a true Hilbert curve at any grid size (at 192x192 tokens a
run of 128 tokens is an 8x16 patch; halving 192 -> 96 -> 48 -> 24 -> 12 leaves ragged runs, and
window-first order would beat it). Consecutive tokens are 4-neighbours everywhere except at most one
diagonal step (measured: none when both sides are even, at most one for every size up to 131x131), left
by a split whose parts cannot all keep even sides; :func:`order_steps` counts them. Sides of 1 are
plain runs. On power-of-two squares the curve is the Hilbert curve.

Orders are cached by size; the functions return fresh tensors.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch

__all__ = ["ORDERS", "hilbert_order", "order_steps", "raster_order", "token_order", "window_order"]

Order = Literal["raster", "window", "hilbert"]
ORDERS: tuple[str, ...] = ("raster", "window", "hilbert")


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


# A split point lies in this central fraction of the side; inside it, the one that is a multiple of the
# largest power of two is taken (closest to the middle on ties).
_SPLIT_RANGE = (0.3, 0.7)


def _split(n: int, even: bool) -> int:
    """Where to cut a side of length ``n >= 2``: at a multiple of a power of two as large as possible.

    Power-of-two aligned parts make consecutive runs of 2**k tokens compact squares or 1x2 rectangles
    (as on a true Hilbert curve), whatever the grid size; plain halving (192 -> 96 -> 48 -> 24 -> 12 -> ...)
    would soon leave odd-shaped parts whose runs of tokens straddle them. ``even`` asks for an even cut
    (both parts then keep the parity the curve's corners need), possible whenever ``n > 2``.
    """
    lo = max(1, math.ceil(n * _SPLIT_RANGE[0]))
    hi = min(n - 1, math.floor(n * _SPLIT_RANGE[1]))
    p = 1 << n.bit_length()
    while p >= 1:
        cuts = [m for m in range(-(-lo // p) * p, hi + 1, p) if not (even and n > 2 and m % 2)]
        if cuts:
            return min(cuts, key=lambda m: abs(2 * m - n))
        p >>= 1
    half = n // 2  # unreachable for n >= 2; the plain halving as a guard
    return half + 1 if even and half % 2 and n > 2 else half


def _hilbert_runs(width: int, height: int) -> list[tuple[int, int, int, int, int]]:
    """The curve as straight runs ``(x, y, dx, dy, length)`` in traversal order."""
    runs: list[tuple[int, int, int, int, int]] = []
    # Each task is a rectangle: start corner (x, y), major axis vector (ax, ay), minor axis vector (bx, by).
    # A stack of tasks pushed in reverse keeps the traversal order without recursion.
    if width >= height:
        stack = [(0, 0, width, 0, 0, height)]
    else:
        stack = [(0, 0, 0, height, width, 0)]
    while stack:
        x, y, ax, ay, bx, by = stack.pop()
        major, minor = abs(ax + ay), abs(bx + by)
        dax, day = _sign(ax), _sign(ay)
        dbx, dby = _sign(bx), _sign(by)
        if minor == 1:
            runs.append((x, y, dax, day, major))
            continue
        if major == 1:
            runs.append((x, y, dbx, dby, minor))
            continue
        if 2 * major > 3 * minor:
            # long rectangle: two parts along the major axis, the first of even length
            m = _split(major, even=True)
            hax, hay = dax * m, day * m
            stack.append((x + hax, y + hay, ax - hax, ay - hay, bx, by))
            stack.append((x, y, hax, hay, bx, by))
        else:
            # up the first part of the minor axis (even length), across the rest, back down
            m = _split(minor, even=True)
            hbx, hby = dbx * m, dby * m
            m = _split(major, even=False)
            hax, hay = dax * m, day * m
            third = (
                x + (ax - dax) + (hbx - dbx),
                y + (ay - day) + (hby - dby),
                -hbx,
                -hby,
                -(ax - hax),
                -(ay - hay),
            )
            stack.append(third)
            stack.append((x + hbx, y + hby, ax, ay, bx - hbx, by - hby))
            stack.append((x, y, hbx, hby, hax, hay))
    return runs


@functools.lru_cache(maxsize=64)
def _hilbert(height: int, width: int) -> torch.Tensor:
    runs = np.asarray(_hilbert_runs(width, height), dtype=np.int64).reshape(-1, 5)
    lengths = runs[:, 4]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = np.arange(int(lengths.sum()), dtype=np.int64) - starts  # position inside each run
    xs = np.repeat(runs[:, 0], lengths) + step * np.repeat(runs[:, 2], lengths)
    ys = np.repeat(runs[:, 1], lengths) + step * np.repeat(runs[:, 3], lengths)
    return torch.from_numpy(ys * width + xs)


def hilbert_order(height: int, width: int) -> torch.Tensor:
    """Generalized Hilbert curve over a ``height`` x ``width`` grid (any size).

    Returns:
        ``perm`` (int64, ``height * width``): ``perm[i]`` is the raster index ``y * width + x`` of the
        ``i``-th token along the curve, which starts at ``(0, 0)``.

    Raises:
        ValueError: a side that is not a positive integer.
    """
    _check_size(height, width)
    return _hilbert(int(height), int(width)).clone()


@functools.lru_cache(maxsize=64)
def _window(height: int, width: int, window: int) -> torch.Tensor:
    y = torch.arange(height).view(-1, 1).expand(height, width)
    x = torch.arange(width).view(1, -1).expand(height, width)
    n_wx = -(-width // window)
    # sort key: window row, window column, row inside the window, column inside the window
    key = ((y // window) * n_wx + x // window) * (window * window) + (y % window) * window + (x % window)
    return torch.argsort(key.flatten())


def window_order(height: int, width: int, window: int = 16) -> torch.Tensor:
    """Window-first order: ``window`` x ``window`` windows in raster order, raster order inside each.

    Windows at the right and bottom edges are cut to the grid. Same convention as :func:`hilbert_order`.

    Raises:
        ValueError: non-positive sizes or ``window``.
    """
    _check_size(height, width)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    return _window(int(height), int(width), window).clone()


def raster_order(height: int, width: int) -> torch.Tensor:
    """The identity order (row after row), in the same convention as :func:`hilbert_order`."""
    _check_size(height, width)
    return torch.arange(height * width)


def token_order(height: int, width: int, order: str = "hilbert", window: int = 16) -> torch.Tensor:
    """The order named ``order`` (``"raster"``, ``"window"`` or ``"hilbert"``) of a grid."""
    if order == "hilbert":
        return hilbert_order(height, width)
    if order == "window":
        return window_order(height, width, window)
    if order == "raster":
        return raster_order(height, width)
    raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")


def order_steps(perm: torch.Tensor, width: int) -> dict[str, int]:
    """Count the steps between consecutive tokens of an order by kind.

    Returns:
        ``{"adjacent": 4-neighbour steps, "diagonal": Chebyshev-1 diagonal steps, "jumps": longer steps}``.
    """
    y, x = perm // width, perm % width
    dy, dx = (y[1:] - y[:-1]).abs(), (x[1:] - x[:-1]).abs()
    cheb = torch.maximum(dy, dx)
    return {
        "adjacent": int(((dy + dx) == 1).sum()),
        "diagonal": int(((dy == 1) & (dx == 1)).sum()),
        "jumps": int((cheb > 1).sum()),
    }
