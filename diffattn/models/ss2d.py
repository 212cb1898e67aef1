"""SS2D: the 2D selective-scan (Mamba) branch of a LaMamba block, with continuous serpentine scans.

The ``(h, w)`` token grid is read along four boustrophedon paths, so consecutive tokens of every scan
are 4-neighbours on the grid (the reference calls these "continuous" scans): two row-wise paths (from
the top-left and from the bottom-left corner) and two column-wise paths (from the bottom-left and from
the bottom-right corner). Each path has its own ``x_proj`` / ``dt_proj`` / ``A_log`` / ``D``; the four
outputs are mapped back to grid order and summed. Any ``h`` and ``w`` work, odd and rectangular
included (the reference builds its paths for square grids only).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.selective_scan import selective_scan, selective_scan_macs

NUM_SCANS = 4


def _rows_path(h: int, w: int, from_bottom: bool) -> torch.Tensor:
    rows = torch.arange(h - 1, -1, -1, device="cpu") if from_bottom else torch.arange(h, device="cpu")
    grid = torch.arange(h * w, device="cpu").view(h, w)[rows]
    grid[1::2] = grid[1::2].flip(-1)  # every second row of the path runs right to left
    return grid.reshape(-1)


def _cols_path(h: int, w: int, from_right: bool) -> torch.Tensor:
    cols = torch.arange(w - 1, -1, -1, device="cpu") if from_right else torch.arange(w, device="cpu")
    grid = torch.arange(h * w, device="cpu").view(h, w).t()[cols].flip(-1)  # each column bottom to top
    grid[1::2] = grid[1::2].flip(-1)  # every second column of the path runs top to bottom
    return grid.reshape(-1)


@functools.lru_cache(maxsize=64)
def serpentine_scan_orders(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four scan paths of an ``h x w`` grid and their inverses, each ``(4, h * w)`` long tensors.

    ``paths[k, i]`` is the row-major grid index of the ``i``-th token of scan ``k``; ``inverse[k, j]``
    is the position of grid token ``j`` in scan ``k``. Scans: rows from the top-left corner, rows from
    the bottom-left corner, columns from the bottom-left corner, columns from the bottom-right corner.
    """
    if h < 1 or w < 1:
        raise ValueError(f"grid (h, w) must be positive, got ({h}, {w})")
    paths = torch.stack(
        [_rows_path(h, w, False), _rows_path(h, w, True), _cols_path(h, w, False), _cols_path(h, w, True)]
    )
    return paths, torch.argsort(paths, dim=-1)


class SS2D(nn.Module):
    """2D selective scan over a channels-last grid ``(b, h, w, dim) -> (b, h, w, dim)``.

    ``in_proj`` to ``(x, z)`` of width ``ssm_ratio * dim`` each; 3x3 depthwise conv + SiLU on ``x``;
    four serpentine selective scans (``d_state`` states, ``dt_rank`` = ``ceil(dim / 16)`` by default);
    sum back in grid order; LayerNorm; times ``SiLU(z)``; ``out_proj``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim < 1 or d_state < 1 or ssm_ratio <= 0:
            raise ValueError(
                f"SS2D needs dim >= 1, d_state >= 1, ssm_ratio > 0; got {dim}, {d_state}, {ssm_ratio}"
            )
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be an odd kernel size, got {d_conv}")
        self.dim = dim
        self.d_state = d_state
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.dt_rank = dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        k = NUM_SCANS
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self._dt = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: dt bias so softplus(bias) is log-uniform in [dt_min, dt_max], S4D-real A."""
        dt_min, dt_max, floor = self._dt
        bound = 1.0 / math.sqrt(self.d_inner)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_projs_weight, -std, std)
        dt = torch.exp(
            torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=self.A_logs.dtype, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def scan_macs(self, batch: int, h: int, w: int) -> int:
        """Multiply-adds of the four selective scans (a flop counter does not see them)."""
        return selective_scan_macs(batch, NUM_SCANS * self.d_inner, h * w, self.d_state, with_d=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"SS2D expects (batch, h, w, {self.dim}), got shape {tuple(x.shape)}")
        b, h, w, _ = x.shape
        length, k, d, n, r = h * w, NUM_SCANS, self.d_inner, self.d_state, self.dt_rank
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).flatten(2)  # (b, d, L)
        paths, inverse = serpentine_scan_orders(h, w)
        paths, inverse = paths.to(x.device), inverse.to(x.device)
        xs = x[:, :, paths].transpose(1, 2)  # (b, k, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.to(xs.dtype))
        ys = selective_scan(
            xs.reshape(b, k * d, length),
            dts.reshape(b, k * d, length),
            -torch.exp(self.A_logs.float()),
            Bs,
            Cs,
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        ).view(b, k, d, length)
        # back to grid order: grid token j sits at position inverse[k, j] of scan k
        y = torch.gather(ys, -1, inverse[None, :, None, :].expand(b, k, d, length)).sum(1)
        y = self.out_norm(y.transpose(1, 2).to(z.dtype)).view(b, h, w, d)
        return self.out_proj(y * F.silu(z))
