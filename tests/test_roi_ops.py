"""ROI-Align / ROI-Unpool against per-box loop references of their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from diffattn.ops.roi_align import roi_align, roi_size_for_downsample
from diffattn.ops.roi_separable import (
    BoxWindows,
    align_weights,
    box_windows,
    roi_align_windows,
    roi_unpool_windows,
)
from diffattn.ops.roi_unpool import box_pixel_spans, roi_unpool, unpool_region, unpool_windows

# ----- references: one box at a time, one sample at a time (torchvision's roi_align definition) ---------------


def _bilinear_tv(feat: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's bilinear_interpolate for one (C, H, W) map."""
    _, h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feat[:, y_low, x_low]
        + hy * lx * feat[:, y_low, x_high]
        + ly * hx * feat[:, y_high, x_low]
        + ly * lx * feat[:, y_high, x_high]
    )


def _roi_align_loop(feat, boxes, p, s=2, aligned=True):
    b, c, h, w = feat.shape
    n = boxes.shape[1]
    out = feat.new_zeros(b, n, c, p, p)
    off = 0.5 if aligned else 0.0
    for bi in range(b):
        for ni in range(n):
            x1, y1, x2, y2 = (float(v) for v in boxes[bi, ni])
            sx, sy = x1 * w - off, y1 * h - off
            rw, rh = x2 * w - off - sx, y2 * h - off - sy
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
            bw, bh = rw / p, rh / p
            for py in range(p):
                for px in range(p):
                    acc = feat.new_zeros(c)
                    for iy in range(s):
                        yy = sy + py * bh + (iy + 0.5) * bh / s
                        for ix in range(s):
                            xx = sx + px * bw + (ix + 0.5) * bw / s
                            acc = acc + _bilinear_tv(feat[bi], yy, xx)
                    out[bi, ni, :, py, px] = acc / (s * s)
    return out


def _roi_unpool_loop(roi, boxes, hw):
    b, n, c, p, q = roi.shape
    h, w = hw
    out = roi.new_zeros(b, n, c, h, w)
    for bi in range(b):
        for ni in range(n):
            x1, y1, x2, y2 = (float(v) for v in boxes[bi, ni])
            X1, Y1, X2, Y2 = x1 * w, y1 * h, x2 * w, y2 * h
            bw, bh = (X2 - X1) / q, (Y2 - Y1) / p
            for i in range(h):
                for j in range(w):
                    cy, cx = i + 0.5, j + 0.5
                    if not (Y1 <= cy <= Y2 and X1 <= cx <= X2):
                        continue
                    u = min(max((cy - Y1) / bh - 0.5, 0.0), p - 1.0)
                    v = min(max((cx - X1) / bw - 0.5, 0.0), q - 1.0)
                    u0, v0 = min(int(math.floor(u)), p - 1), min(int(math.floor(v)), q - 1)
                    u1, v1 = min(u0 + 1, p - 1), min(v0 + 1, q - 1)
                    a, bb = u - u0, v - v0
                    g = roi[bi, ni]
                    out[bi, ni, :, i, j] = (
                        (1 - a) * (1 - bb) * g[:, u0, v0]
                        + (1 - a) * bb * g[:, u0, v1]
                        + a * (1 - bb) * g[:, u1, v0]
                        + a * bb * g[:, u1, v1]
                    )
    return out


def _boxes(gen, b, n, edge=False):
    xy = torch.rand(b, n, 2, generator=gen) * 0.7
    wh = torch.rand(b, n, 2, generator=gen) * 0.5 + 0.05
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], -1)
    if edge:  # boxes touching the map borders
        boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        boxes[:, -1] = torch.tensor([0.61, 0.57, 1.0, 1.0])  # no pixel centre exactly on an edge
    return boxes


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("p,s", [(3, 2), (4, 1), (2, 3)])
def test_roi_align_matches_torchvision_definition(aligned, p, s):
    gen = torch.Generator().manual_seed(p * 10 + s)
    feat = torch.randn(2, 3, 9, 11, generator=gen)
    boxes = _boxes(gen, 2, 4, edge=True)
    got = roi_align(feat, boxes, p, sampling_ratio=s, aligned=aligned)
    ref = _roi_align_loop(feat.double(), boxes.double(), p, s, aligned).float()
    assert got.shape == (2, 4, 3, p, p)
    assert (got - ref).abs().max() <= 1e-5


def test_roi_align_outside_samples_are_zero():
    # a box reaching past the map: samples beyond -1 / H are zero (torchvision's rule), not clamped
    feat = torch.ones(1, 1, 4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 1.0]]])  # twice the map's width (not validated by the op)
    got = roi_align(feat, boxes, 4, sampling_ratio=1)
    ref = _roi_align_loop(feat.double(), boxes.double(), 4, 1).float()
    assert (got - ref).abs().max() <= 1e-6
    assert got[0, 0, 0, :, -1].abs().max() == 0


def test_roi_unpool_matches_loop():
    gen = torch.Generator().manual_seed(1)
    roi = torch.randn(2, 3, 2, 4, 4, generator=gen)
    boxes = _boxes(gen, 2, 3, edge=True)
    got = roi_unpool(roi, boxes, (10, 13))
    ref = _roi_unpool_loop(roi.double(), boxes.double(), (10, 13)).float()
    assert got.shape == (2, 3, 2, 10, 13)
    assert (got - ref).abs().max() <= 1e-5


def test_roi_unpool_covers_box_without_edge_strip():
    roi = torch.ones(1, 1, 1, 5, 5)
    boxes = torch.tensor([[[0.25, 0.25, 1.0, 1.0]]])
    out = roi_unpool(roi, boxes, (16, 16))[0, 0, 0]
    expected = torch.zeros(16, 16)
    expected[4:, 4:] = 1.0  # every pixel centre in [4, 16] -> rows/cols 4..15, right/bottom edge included
    assert torch.equal(out == 0, expected == 0)
    assert (out - expected).abs().max() <= 1e-6


def test_region_equals_full_map_crop():
    gen = torch.Generator().manual_seed(2)
    roi = torch.randn(3, 2, 3, 3, generator=gen)
    boxes = _boxes(gen, 1, 3)[0]
    full, inside = unpool_region(roi, boxes, (12, 12))
    part, pin = unpool_region(roi, boxes, (12, 12), rows=(3, 9), cols=(2, 11))
    assert torch.equal(part, full[:, :, 3:9, 2:11]) and torch.equal(pin, inside[:, :, 3:9, 2:11])


def test_windows_equal_full_map_crops_and_cover_each_box():
    """Per-box windows (each at its own origin) are crops of the full-map unpool, and a window placed
    at a box's pixel span holds every pixel of that box."""
    gen = torch.Generator().manual_seed(5)
    roi = torch.randn(4, 2, 3, 3, generator=gen)
    boxes = _boxes(gen, 1, 4)[0]
    h, w = 13, 11
    full, inside = unpool_region(roi, boxes, (h, w))
    origins = torch.tensor([[0, 0], [5, 2], [9, 7], [3, 8]])
    part, pin = unpool_windows(roi, boxes, (h, w), origins, (4, 3))
    for m, (r, c) in enumerate(origins.tolist()):
        assert torch.equal(part[m], full[m, :, r : r + 4, c : c + 3])
        assert torch.equal(pin[m], inside[m, :, r : r + 4, c : c + 3])
    r_lo, r_hi = box_pixel_spans(boxes, h, axis=1)
    c_lo, c_hi = box_pixel_spans(boxes, w, axis=0)
    for m in range(4):
        rows, cols = inside[m, 0].any(1).nonzero().flatten(), inside[m, 0].any(0).nonzero().flatten()
        assert r_lo[m] <= rows.min() and rows.max() < r_hi[m] and r_hi[m] - r_lo[m] <= rows.numel() + 2
        assert c_lo[m] <= cols.min() and cols.max() < c_hi[m] and c_hi[m] - c_lo[m] <= cols.numel() + 2


def test_gradcheck_roi_align():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0.13, 0.21, 0.71, 0.83], [0.05, 0.4, 0.52, 0.91]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, 3), (feat,))
    # boxes too (interior samples, away from bilinear kinks)
    b = boxes.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda bb: roi_align(feat.detach(), bb, 3), (b,), atol=1e-5)


def test_gradcheck_roi_unpool():
    gen = torch.Generator().manual_seed(4)
    roi = torch.randn(1, 2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0.1, 0.2, 0.7, 0.9], [0.3, 0.0, 1.0, 0.6]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: roi_unpool(r, boxes, (7, 8)), (roi,))


def test_unpool_of_align_reproduces_smooth_map():
    """``roi_unpool(roi_align(x))`` on smooth maps: the bound.

    For a linear map ``x = a*i + b*j + c`` every step is exact (bilinear interpolation and averaging reproduce
    linear functions) except the clamp at the ROI edges: pixels whose centre is less than half a bin from
    the box edge take the edge cell's value, an error of at most ``|slope| * bin / 2`` along that axis.
    Interior pixels (cell-centre coordinates in ``[0, P - 1]``, samples inside the map) are exact to
    float rounding. For a sinusoid ``A sin(w1 i + w2 j)`` the interpolation errors add up to at most
    ``A (w1^2 + w2^2) (1/8 + bin^2/32 + bin^2/8)`` (map bilinear, sample averaging, ROI-grid bilinear) inside
    the cell-centre hull, plus ``A |w| bin / 2`` in the edge strip.
    """
    h = w = 48
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    boxes = torch.tensor([[[0.2, 0.25, 0.7, 0.8]]], dtype=torch.float64)
    p = 13
    bin_w, bin_h = 0.5 * w / p, 0.55 * h / p
    x1, y1 = 0.2 * w, 0.25 * h
    cy, cx = ii + 0.5, jj + 0.5
    u, v = (cy - y1) / bin_h - 0.5, (cx - x1) / bin_w - 0.5
    inside = (cy >= y1) & (cy <= 0.8 * h) & (cx >= x1) & (cx <= 0.7 * w)
    core = inside & (u >= 0) & (u <= p - 1) & (v >= 0) & (v <= p - 1)

    a_, b_ = 0.3, -0.2
    lin = (a_ * ii + b_ * jj + 1.0)[None, None]
    out = roi_unpool(roi_align(lin, boxes, p), boxes, (h, w))[0, 0, 0]
    err = (out - lin[0, 0]).abs()
    assert err[core].max() <= 1e-9
    edge_bound = abs(a_) * bin_h / 2 + abs(b_) * bin_w / 2
    assert err[inside].max() <= edge_bound + 1e-9
    assert torch.all(out[~inside] == 0)

    w1, w2, amp = 0.15, 0.1, 1.0
    sin = (amp * torch.sin(w1 * ii + w2 * jj))[None, None]
    out = roi_unpool(roi_align(sin, boxes, p), boxes, (h, w))[0, 0, 0]
    err = (out - sin[0, 0]).abs()
    binm = max(bin_w, bin_h)
    interp_bound = amp * (w1**2 + w2**2) * (1 / 8 + binm**2 / 32 + binm**2 / 8)
    assert err[core].max() <= interp_bound
    assert err[inside].max() <= interp_bound + amp * math.hypot(w1, w2) * binm / 2
    assert torch.all(out[~inside] == 0)


def test_dtypes_follow_input():
    feat = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.9]]])
    r = roi_align(feat, boxes, 4)
    assert r.dtype == torch.bfloat16
    assert roi_unpool(r, boxes, (8, 8)).dtype == torch.bfloat16
    assert roi_align(feat, boxes[:, :0], 4).shape == (1, 0, 2, 4, 4)


def test_roi_size_helper_and_bad_input():
    assert [roi_size_for_downsample(d) for d in (8, 16, 32, 64)] == [25, 19, 13, 7]
    with pytest.raises(ValueError, match="downsample"):
        roi_size_for_downsample(4)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4), 2, sampling_ratio=0)
    with pytest.raises(ValueError, match="roi_features"):
        roi_unpool(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4), (4, 4))


# ----- the separable, windowed forms the ROICtrl adapter runs ----------------------------------------------------


def _assert_same_values_and_grads(got, ref, leaves, gen):
    """fp64: values within 1e-12, and the gradients of a random weighting within 1e-10, for every leaf."""
    assert (got - ref).abs().max() <= 1e-12
    weight = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    g_got = torch.autograd.grad((got * weight).sum(), leaves)
    for a, e in zip(g_got, g_ref):
        assert (a - e).abs().max() <= 1e-10


def _windowed(gen, b, n, h, w, edge=True):
    boxes = _boxes(gen, b, n, edge=edge).flatten(0, 1).double()
    boxes[1] = torch.tensor([0.51, 0.2, 0.512, 0.9])  # thinner than a pixel: no column centre inside
    batch_of = torch.arange(b).repeat_interleave(n)
    return boxes, batch_of, *box_windows(boxes, batch_of, (h, w))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("p,s", [(3, 2), (5, 1), (4, 3)])
def test_roi_align_windows_equals_roi_align(aligned, p, s):
    """Separable ROI-Align on windows == ``roi_align`` (<= 1e-12 in fp64), values and the gradients of the
    features and of the boxes, with boxes at the map borders, one thinner than a pixel and windows pushed
    back inside the map."""
    gen = torch.Generator().manual_seed(11)
    b, n, c, h, w = 2, 4, 3, 13, 11
    boxes, batch_of, *_ = _windowed(gen, b, n, h, w)
    feat = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    bx = boxes.clone().requires_grad_(True)
    ref = roi_align(feat, bx.view(b, n, 4), p, sampling_ratio=s, aligned=aligned).flatten(0, 1)
    tokens = feat.permute(0, 2, 3, 1).reshape(-1, c)
    windows = BoxWindows.build(bx, boxes, batch_of, (h, w), p, torch.float64, sampling_ratio=s, aligned=aligned)
    got = roi_align_windows(tokens, windows)
    _assert_same_values_and_grads(got.permute(0, 3, 1, 2), ref, (feat, bx), gen)


def test_roi_unpool_windows_equals_unpool_windows():
    """Separable ROI-Unpool == the ``grid_sample`` form (<= 1e-12 in fp64): values, the inside mask and
    the gradients of the ROI features and of the boxes."""
    gen = torch.Generator().manual_seed(12)
    b, n, c, h, w, p = 2, 4, 3, 13, 11, 4
    boxes, batch_of, _, origins, window = _windowed(gen, b, n, h, w)
    bx = boxes.clone().requires_grad_(True)
    roi = torch.randn(b * n, c, p, p, generator=gen, dtype=torch.float64, requires_grad=True)
    ref, ref_in = unpool_windows(roi, bx, (h, w), origins, window)
    windows = BoxWindows.build(bx, boxes, batch_of, (h, w), p, torch.float64)
    assert torch.equal(windows.origins, origins) and windows.window == window
    got = roi_unpool_windows(roi.permute(0, 2, 3, 1), windows)
    assert torch.equal(windows.inside, ref_in[:, 0])
    # a slice of the windows unpools its own boxes
    assert torch.equal(roi_unpool_windows(roi[2:5].permute(0, 2, 3, 1), windows.select(slice(2, 5))), got[2:5])
    _assert_same_values_and_grads(got.permute(0, 3, 1, 2), ref, (roi, bx), gen)


def test_box_windows_hold_each_box_and_its_samples():
    """Every window lies inside the map, holds every pixel centre of its box and every pixel its
    ROI-Align samples touch (non-zero weight), and indexes its own batch item."""
    gen = torch.Generator().manual_seed(13)
    b, n, h, w, p = 2, 5, 13, 11, 4
    boxes, batch_of, pixels, origins, (wh, ww) = _windowed(gen, b, n, h, w)
    assert pixels.shape == (b * n, wh, ww)
    assert (origins >= 0).all() and (origins[:, 0] + wh <= h).all() and (origins[:, 1] + ww <= w).all()
    assert torch.equal(pixels // (h * w), batch_of[:, None, None].expand_as(pixels))
    full, inside = unpool_region(torch.ones(b * n, 1, p, p, dtype=torch.float64), boxes, (h, w))
    for m, (r, c) in enumerate(origins.tolist()):
        assert inside[m, 0].sum() == inside[m, 0, r : r + wh, c : c + ww].sum()
        # ROI-Align's weights of the whole map, read through a window the size of the map
        a_y = align_weights(boxes[m : m + 1, 1], boxes[m : m + 1, 3], h, p, torch.zeros(1), h)[0]
        a_x = align_weights(boxes[m : m + 1, 0], boxes[m : m + 1, 2], w, p, torch.zeros(1), w)[0]
        rows, cols = a_y.abs().sum(0).nonzero().flatten(), a_x.abs().sum(0).nonzero().flatten()
        assert r <= rows.min() and rows.max() < r + wh and c <= cols.min() and cols.max() < c + ww


def test_roi_windows_in_half_precision_stay_close_to_fp32():
    """fp16 / bf16 features with fp32 boxes: coordinates stay in fp32, so the result is the fp32 one to
    the dtype's rounding (<= 1e-2 fp16, <= 5e-2 bf16 of unit-scale features)."""
    gen = torch.Generator().manual_seed(14)
    b, n, c, h, w, p = 1, 3, 4, 64, 64, 7
    boxes, batch_of, *_ = _windowed(gen, b, n, h, w)
    boxes = boxes.float()
    tokens = torch.randn(b * h * w, c, generator=gen)
    windows = BoxWindows.build(boxes, boxes, batch_of, (h, w), p, torch.float32)
    ref = roi_align_windows(tokens, windows)
    ref_u = roi_unpool_windows(ref, windows)
    for dt, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        half = BoxWindows.build(boxes, boxes, batch_of, (h, w), p, dt)
        got = roi_align_windows(tokens.to(dt), half)
        got_u = roi_unpool_windows(got, half)
        assert got.dtype == dt and got_u.dtype == dt and (got.float() - ref).abs().max() <= tol
        assert (got_u.float() - ref_u).abs().max() <= tol
