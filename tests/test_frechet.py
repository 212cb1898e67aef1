"""The testbed's Fréchet distance: closed form, reference computation, real-data sanity, the equal-n rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffattn.cli import main
from diffattn.testbed import classifier as C
from diffattn.testbed import data as D
from diffattn.testbed import metrics as M
from diffattn.testbed import models as TM

scipy_linalg = pytest.importorskip("scipy.linalg")

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 1e-3 * np.eye(d))


def _scipy_frechet(mu1, c1, mu2, c2) -> float:
    """The plain reference: FID's formula with scipy's general matrix square root of ``c1 @ c2``."""
    covmean = scipy_linalg.sqrtm(c1 @ c2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean).real)


# --------------------------------------------------------------------------------------------------
# Against closed forms and a numpy / scipy reference
# --------------------------------------------------------------------------------------------------


def test_gaussian_frechet_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2
    assert M.gaussian_frechet([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.gaussian_frechet(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # a rotation of both covariances changes nothing
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    rotated = M.gaussian_frechet(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    # b has a zero eigenvalue: the square root turns its ~1e-16 round-off into ~1e-8
    assert rotated == pytest.approx(expected, rel=1e-7)
    # identical Gaussians: exactly 0 (round-off is clamped, never negative)
    c = _spd(np.random.default_rng(1), 16)
    assert M.gaussian_frechet(mu1[:1].repeat(16), c, mu1[:1].repeat(16), c) == pytest.approx(0.0, abs=1e-9)
    assert M.gaussian_frechet(np.zeros(16), c, np.zeros(16), c) >= 0.0
    with pytest.raises(ValueError, match="do not match"):
        M.gaussian_frechet(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("rank", [None, 10])  # full rank, and rank-deficient (fewer samples than dims)
def test_gaussian_frechet_matches_scipy_sqrtm(rank):
    rng = np.random.default_rng(2)
    for _ in range(3):
        mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
        c1, c2 = _spd(rng, 32, rank), _spd(rng, 32, rank)
        ours = M.gaussian_frechet(mu1, c1, mu2, c2)
        assert ours == pytest.approx(_scipy_frechet(mu1, c1, mu2, c2), rel=1e-6, abs=1e-6)


def test_frechet_distance_features_matches_reference_and_the_true_value():
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _spd(rng, d), _spd(rng, d)
    truth = M.gaussian_frechet(mu1, c1, mu2, c2)
    a = rng.multivariate_normal(mu1, c1, size=20000)
    b = rng.multivariate_normal(mu2, c2, size=20000)
    r = M.frechet_distance_features(a, b, rounds=10)
    # the fitted Gaussians: np.mean / np.cov (ddof 1) through scipy's sqrtm
    ref = _scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert r["fd"] == pytest.approx(ref, rel=1e-9)
    assert r["fd"] == pytest.approx(truth, rel=0.03)  # large n: the sample estimate reaches the closed form
    assert r["n"] == 20000 and r["dims"] == d and r["frames"] == 1 and r["noise"] == "bootstrap"
    assert r["subsampled"] is False and r["counts"] == {"generated": 20000, "reference": 20000}


def test_videos_pool_frames_and_resample_whole_clips():
    rng = np.random.default_rng(4)
    # the frames of a clip are alike (a clip-level offset plus a little per-frame noise)
    a = rng.standard_normal((30, 1, 4)) + 0.1 * rng.standard_normal((30, 5, 4))
    b = rng.standard_normal((30, 1, 4)) * 1.3 + 0.1 * rng.standard_normal((30, 5, 4)) + 0.5
    r = M.frechet_distance_features(a, b, rounds=20)
    pooled = M.frechet_distance_features(a.reshape(150, 4), b.reshape(150, 4), rounds=20)
    assert r["fd"] == pytest.approx(pooled["fd"], rel=1e-12)  # the Gaussians are fitted per frame
    assert r["n"] == 30 and r["frames"] == 5 and pooled["n"] == 150
    assert r["std"] > 1.5 * pooled["std"]  # 30 clips carry less than 150 independent frames would


# --------------------------------------------------------------------------------------------------
# Equal sample counts, and the noise
# --------------------------------------------------------------------------------------------------


def test_equal_n_is_enforced():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((40, 3)), rng.standard_normal((25, 3))
    with pytest.raises(ValueError, match="equal sample counts.*pass n="):
        M.frechet_distance_features(a, b)
    r = M.frechet_distance_features(a, b, n=25, rounds=5)
    assert r["n"] == 25 and r["subsampled"] is True and r["counts"] == {"generated": 40, "reference": 25}
    assert r == M.frechet_distance_features(a, b, n=25, rounds=5), "the subsample is seeded"
    with pytest.raises(ValueError, match=r"n must be in \[2, 25\]"):
        M.frechet_distance_features(a, b, n=26)
    with pytest.raises(ValueError, match="n must be"):
        M.frechet_distance_features(a[:1], b[:1])
    with pytest.raises(ValueError, match="trailing shape"):
        M.frechet_distance_features(a, rng.standard_normal((40, 4)))
    with pytest.raises(ValueError, match="rounds"):
        M.frechet_distance_features(a, a, rounds=1)
    # images against the 359 held-out digits: refused without n
    with pytest.raises(ValueError, match="equal sample counts"):
        M.frechet_distance(D.DigitsDataset("train").images[:20])


def test_noise_is_positive_and_shrinks_with_n():
    rng = np.random.default_rng(6)
    pop_a, pop_b = rng.standard_normal((4000, 8)), rng.standard_normal((4000, 8)) * 1.2 + 0.3
    stds = [M.frechet_distance_features(pop_a[:n], pop_b[:n], rounds=100)["std"] for n in (50, 200, 800, 3200)]
    assert all(s > 0 for s in stds)
    assert all(x > y for x, y in zip(stds, stds[1:])), stds


# --------------------------------------------------------------------------------------------------
# Real digits
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf() -> C.DigitClassifier:
    return C.load_classifier()


@pytest.fixture(scope="module")
def digits(clf) -> dict[str, torch.Tensor | np.ndarray]:
    held = D.DigitsDataset("heldout").images
    train = D.DigitsDataset("train").images
    pick = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(train), len(held), replace=False)))
    return {"held": M.frechet_features(held, clf), "train_images": train[pick]}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = M.gaussian_kernel(sigma).float()
    r = k.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def test_classifier_features_are_the_penultimate_layer(clf, digits):
    x = digits["train_images"][:50]
    f = C.features(x, clf)
    assert f.shape == (50, clf.config.hidden) and (f >= 0).all()  # after the ReLU
    with torch.no_grad():
        torch.testing.assert_close(clf.head[-1](f), clf(x))
    clf.train()
    try:
        torch.testing.assert_close(clf.embed(x), f)  # eval mode inside (no dropout), training mode restored
        assert clf.training
    finally:
        clf.eval()


def test_real_digits_are_near_zero_and_corruption_rises_monotonically(clf, digits):
    held, train = digits["held"], digits["train_images"]

    def fd(images: torch.Tensor, rounds: int = 2) -> dict:
        return M.frechet_distance_features(M.frechet_features(images, clf), held, rounds=rounds)

    real = fd(train, rounds=50)
    assert real["n"] == 359 and not real["subsampled"]
    blurred = [fd(_blur(train, s))["fd"] for s in (1.0, 2.0, 3.0)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(train.shape, generator=g)
    noised = [fd((train + s * noise).clamp(0, 1))["fd"] for s in (0.1, 0.2, 0.3)]
    # measured: real 2.29 +- 1.4 (bootstrap std); blur sigma 1, 2, 3 px: 3.6, 14.7, 46; noise sigma 0.1, 0.2, 0.3: ~4.6, 33, 84
    assert real["fd"] < 5.0 and real["std"] > 0
    for curve in (blurred, noised):
        values = [real["fd"], *curve]
        assert all(x < y for x, y in zip(values, values[1:])), values
        assert curve[-1] > 10 * real["fd"]


def test_moving_digit_videos_default_to_held_out_clips(clf):
    ds = D.MovingDigitsDataset(num_clips=12, split="train", num_frames=6)
    videos = np.stack([ds[i]["pixel_values"].permute(1, 2, 3, 0).numpy() for i in range(12)])
    real = M.frechet_distance(videos, digit_size=D.MOVING_DIGIT, classifier=clf, rounds=20)
    assert real["n"] == 12 and real["frames"] == 6 and real["counts"] == {"generated": 12, "reference": 12}
    blurred = _blur(torch.from_numpy(videos).permute(0, 1, 4, 2, 3).reshape(-1, 1, 32, 32), 2.0)
    blurred = blurred.reshape(12, 6, 1, 32, 32).permute(0, 1, 3, 4, 2).numpy()
    worse = M.frechet_distance(blurred, digit_size=D.MOVING_DIGIT, classifier=clf, rounds=20)
    assert worse["fd"] > real["fd"] > 0


# --------------------------------------------------------------------------------------------------
# diffattn evaluate
# --------------------------------------------------------------------------------------------------


def test_evaluate_reports_frechet_distance_beside_accuracy(tmp_path, capsys):
    folder = TM.save(TM.build("digits-dit"), tmp_path / "dit", "digits-dit")
    args = ["evaluate", "--model", str(folder), "--method", "dense", "--samples", "4", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    line = capsys.readouterr().out
    assert "accuracy dense=" in line and "fd dense=" in line and "(n=4, bootstrap std)" in line
    fd = json.loads((tmp_path / "ev" / "report.json").read_text())["frechet_distance"]
    assert fd["dense"] == fd["method"]  # dense vs itself: same samples, same reference subsample
    assert fd["dense"]["n"] == 4 and fd["dense"]["counts"] == {"generated": 4, "reference": 359}
    assert fd["dense"]["subsampled"] and fd["dense"]["fd"] > 0 and fd["dense"]["std"] > 0
    assert "held-out" in fd["fd_of"]
