"""Testbed: data, the digit classifier, metrics, model definitions and ``diffattn evaluate``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import diffattn
from diffattn import registry, zoo
from diffattn.cli import main
from diffattn.processors import CoreAttnProcessor
from diffattn.processors.families import FAMILIES
from diffattn.processors.layout import dense_core
from diffattn.testbed import classifier as C
from diffattn.testbed import data as D
from diffattn.testbed import metrics as M
from diffattn.testbed import models as TM
from diffattn.testbed.evaluate import evaluate

skmetrics = pytest.importorskip("skimage.metrics")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heldout() -> D.DigitsDataset:
    return D.DigitsDataset("heldout")


@pytest.fixture(scope="module")
def clf() -> C.DigitClassifier:
    return C.load_classifier()


# a toy method: softer attention (queries scaled by 0.5) on every layer, so outputs differ from dense
@dataclass(frozen=True)
class _SoftConfig:
    temperature: float = 0.5


def _soft_method() -> str:
    name = "_test_soft"
    if name not in registry._METHODS:

        def make(config, ctx, layer):
            return CoreAttnProcessor(
                core=lambda q, k, v, layout, mask: dense_core(q * config.temperature, k, v, layout, mask),
                family=layer.family,
            )

        registry.register(registry.Method(name, _SoftConfig, tuple(FAMILIES), make))
    return name


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint(heldout):
    train = D.DigitsDataset("train")
    assert len(train) + len(heldout) == 1797 and len(heldout) == 359
    assert not set(train.indices) & set(heldout.indices)
    counts = torch.bincount(heldout.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of every class
    again = D.DigitsDataset("heldout")
    assert np.array_equal(again.indices, heldout.indices) and torch.equal(again.images, heldout.images)
    other = D.split_indices(D.load_digits_8x8()[1], seed=1)[1]
    assert not np.array_equal(other, heldout.indices)
    item = heldout[0]
    assert item["pixel_values"].shape == (1, 32, 32) and 0 <= item["pixel_values"].min() <= item["pixel_values"].max() <= 1
    assert item["caption"] == f"a {item['label']}"
    assert D.DigitsDataset("heldout", channels=3)[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="split must be one of"):
        D.DigitsDataset("test")


def test_scenes_are_deterministic_non_overlapping_and_boxed():
    ds = D.DigitScenesDataset(num_scenes=12, seed=3)
    counts = set()
    for i in range(len(ds)):
        a, b = ds[i], D.DigitScenesDataset(num_scenes=12, seed=3)[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        boxes = (a["boxes"] * 64).round().long().tolist()
        k = len(boxes)
        counts.add(k)
        assert 1 <= k <= 4 and a["pixel_values"].shape == (1, 64, 64)
        assert ((a["boxes"] >= 0) & (a["boxes"] <= 1)).all()
        ink_outside = a["pixel_values"][0].clone()
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            ink_outside[y0:y1, x0:x1] = 0
            for x2, y2, x3, y3 in boxes[j + 1 :]:
                assert not (x0 < x3 and x2 < x1 and y0 < y3 and y2 < y1), "boxes overlap"
        assert ink_outside.abs().max() == 0, "ink only inside boxes"
        assert a["caption"] == D.scene_caption(a["labels"].tolist())
        assert [inst["caption"] for inst in a["instances"]] == [f"a {lab}" for lab in a["labels"].tolist()]
    assert len(counts) > 1
    assert D.scene_caption([3, 7, 1]) == "a 3, a 7 and a 1" and D.scene_caption([5]) == "a 5"
    batch = D.collate_scenes([ds[i] for i in range(4)])
    assert batch["boxes"].shape[:2] == batch["box_mask"].shape


def test_photos_ship_with_scikit_image_and_crop_deterministically():
    assert D.available_photos() == list(D.PHOTOS)  # every listed photo loads offline
    ds = D.PhotoCropsDataset(size=48, num_crops=5, seed=1, photos=["astronaut", "camera", "coins"])
    a = ds[2]
    assert a["pixel_values"].shape == (3, 48, 48) and a["caption"].startswith("a photo of ")
    assert torch.equal(a["pixel_values"], D.PhotoCropsDataset(48, 5, 1, photos=["astronaut", "camera", "coins"])[2]["pixel_values"])
    with pytest.raises(ValueError, match="bundled photos"):
        D.load_photo("eagle")


def test_writers_produce_the_trainers_formats(tmp_path):
    scenes = D.DigitScenesDataset(num_scenes=5, seed=0)
    out = D.write_image_folder(scenes, tmp_path / "scenes", progress=False)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    boxes = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(meta) == len(boxes) == 5 and meta[0]["file_name"] == "00000.png"
    assert boxes[1]["box_captions"] == [i["caption"] for i in scenes[1]["instances"]] and boxes[1]["normalized"]
    assert Image.open(out / "00000.png").mode == "RGB"
    with pytest.raises(FileExistsError, match="overwrite"):
        D.write_image_folder(scenes, out, progress=False)
    assert main(["testbed", "data", "digits", "--split", "heldout", "--out", str(tmp_path / "digits")]) == 0
    rows = (tmp_path / "digits" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 359 and json.loads(rows[0])["text"] == f"a {json.loads(rows[0])['label']}"
    assert not list(tmp_path.glob(".*")), "no temporary folders left behind"
    lora_data = pytest.importorskip("diffattn.lora.data")
    assert len(lora_data.build_dataset("image", tmp_path / "digits", resolution=32)) == 359
    item = lora_data.build_dataset("boxes", out / "boxes.jsonl", resolution=64)[1]
    assert torch.allclose(item["boxes"], scenes[1]["boxes"], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------------


def test_shipped_classifier_is_small_and_accurate(clf, heldout):
    files = list(C.CLASSIFIER_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert any(f.suffix == ".safetensors" for f in files)
    assert C.accuracy(clf, heldout.images, heldout.labels) >= 0.97
    record = json.loads((C.CLASSIFIER_DIR / C.TRAINING_FILE).read_text())
    assert record["heldout_accuracy"] >= 0.97 and record["command"] == "diffattn testbed train classifier"


@pytest.mark.parametrize("form", ["rgb64_uint8", "rgb_float_28", "pil_gray_48", "torch_rgb_40"])
def test_classifier_accuracy_survives_the_generated_image_conversion(clf, heldout, form):
    """Held-out digits dressed as generated images (RGB / gray, other sizes, any container)."""
    x = heldout.images
    if form == "rgb64_uint8":
        images = C.as_generated(x, 64)  # NHWC uint8 RGB, a pipeline's PIL/np output
    elif form == "rgb_float_28":
        images = C.as_generated(x, 28).astype(np.float32) / 255.0
    elif form == "pil_gray_48":
        images = [Image.fromarray(a[..., 0]) for a in C.as_generated(x, 48)]
    else:
        images = torch.from_numpy(C.as_generated(x, 40)).permute(0, 3, 1, 2).float() / 255.0
    assert C.to_classifier_input(images).shape == (len(x), 1, 32, 32)
    assert C.accuracy(clf, images, heldout.labels) >= 0.97


def test_classifier_conversion_is_identity_at_32px(heldout):
    x = heldout.images[:8]
    assert torch.allclose(C.to_classifier_input(x), x)
    rgb = x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    assert torch.allclose(C.to_classifier_input(rgb), x, atol=1e-6)


def test_classifier_training_writes_atomically_and_load_errors(tmp_path):
    record = C.train_classifier(tmp_path / "clf", epochs=1, progress=False)
    assert record["epochs"] == 1 and len(record["history"]) == 1
    assert {p.name for p in (tmp_path / "clf").iterdir()} >= {"config.json", C.TRAINING_FILE}
    assert not list(tmp_path.glob(".*")), "no temporary folder left behind"
    assert isinstance(C.load_classifier(tmp_path / "clf"), C.DigitClassifier)
    with pytest.raises(FileNotFoundError, match="diffattn testbed train classifier"):
        C.load_classifier(tmp_path / "nothing")
    cfg = json.loads((tmp_path / "clf" / "config.json").read_text())
    (tmp_path / "clf" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="expected 'DigitClassifier'"):
        C.load_classifier(tmp_path / "clf")


def test_testbed_train_unknown_name_lists_names(capsys):
    assert main(["testbed", "train", "digits-unett"]) == 2
    assert "valid names: classifier" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def test_ssim_and_psnr_match_scikit_image():
    ds = D.PhotoCropsDataset(size=40, num_crops=3, seed=0)
    a = np.stack([ds[i]["pixel_values"].permute(1, 2, 0).numpy() for i in range(3)]).astype(np.float64)
    b = np.clip(a + np.random.default_rng(0).normal(0, 0.08, a.shape), 0, 1)
    kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
    ref = [skmetrics.structural_similarity(a[i], b[i], channel_axis=-1, **kw) for i in range(3)]
    np.testing.assert_allclose(M.ssim(a, b).numpy(), ref, rtol=0, atol=1e-9)
    ref_gray = [skmetrics.structural_similarity(a[i, ..., 0], b[i, ..., 0], **kw) for i in range(3)]
    np.testing.assert_allclose(M.ssim(a[..., :1], b[..., :1]).numpy(), ref_gray, atol=1e-9)
    # torch NCHW float32 input gives the same numbers
    t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float()  # noqa: E731
    np.testing.assert_allclose(M.ssim(t(a), t(b)).numpy(), ref, atol=1e-6)
    ref_psnr = [skmetrics.peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(M.psnr(a, b).numpy(), ref_psnr, atol=1e-9)
    assert float(M.psnr(a, a)[0]) == M.PSNR_CAP_DB and float(M.ssim(a, a)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(a, b[:, :20])


def test_class_accuracy_and_video_metrics(clf, heldout):
    res = M.class_accuracy(C.as_generated(heldout.images), heldout.labels, classifier=clf)
    assert res["accuracy"] >= 0.97 and res["n"] == 359 and set(res["per_class"]) == {str(c) for c in range(10)}
    video = heldout.images[heldout.labels == 4][:5]  # five frames "of a 4"
    assert M.per_frame_accuracy(video, 4, classifier=clf)["accuracy"] >= 0.8
    still = M.temporal_consistency(video[:1].repeat(3, 1, 1, 1))
    assert still["ssim"] == pytest.approx(1.0) and M.temporal_consistency(video)["ssim"] < 1.0


def test_layer_relative_errors_with_hooks():
    pipe = zoo.load("sd")
    hooks_before = {n: len(m._forward_hooks) for n, m in M.attention_layers(pipe).items()}
    dense = M.layer_relative_errors(pipe, "dense", zoo.default_call_kwargs("sd"))
    assert dense and max(r["rel_error"] for r in dense.values()) < 1e-4
    soft = M.layer_relative_errors(pipe, _soft_method(), zoo.default_call_kwargs("sd"), {"temperature": 0.3})
    assert set(soft) == set(hooks_before)
    assert all(r["rel_error"] > 1e-3 and r["calls"] == 2 for r in soft.values())
    assert all(r["first_call"] <= r["rel_error"] * 10 for r in soft.values())
    assert {n: len(m._forward_hooks) for n, m in M.attention_layers(pipe).items()} == hooks_before
    assert diffattn.applied(pipe) == []


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TM.names())
def test_testbed_model_builds_generates_and_round_trips(tmp_path, name):
    pipe = TM.build(name)
    kw = {**TM.default_call_kwargs(name), "num_inference_steps": 2}
    video = "num_frames" in kw
    if video:
        kw["num_frames"] = 5  # 2 latent frames

    def run(p):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out = p(**TM.prompt_kwargs(kw, ["a 3", "a 7"], gens))
        return out.frames if video else out.images

    out = run(pipe)
    assert out.shape == ((2, 5, 32, 32, 3) if video else (2, 32, 32, 3)) and np.isfinite(out).all()
    lamamba = name == "digits-lamamba"  # its own window attention + SS2D: no diffusers attention to patch
    if not lamamba:
        with diffattn.apply(pipe, "dense") as patch:  # every processor applies to it unchanged
            assert patch.layers
            np.testing.assert_allclose(run(pipe), out, atol=1e-4)
    TM.save(pipe, tmp_path / name, name)
    size = sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{name} is {size / 2**20:.1f} MB"
    info = TM.read_info(tmp_path / name)
    assert info["name"] == name and info["captions"][3] == "a 3"
    loaded = TM.load_folder(tmp_path / name)
    assert type(loaded).__name__ == TM.get(name).pipeline_class
    if lamamba:
        assert loaded.vae is None  # pixel space without an autoencoder
    else:
        assert isinstance(loaded.vae, TM.PixelSpaceVideoVAE if video else TM.PixelSpaceVAE)
    np.testing.assert_array_equal(run(loaded), out)
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(tmp_path / name)).__name__ == TM.get(name).pipeline_class


def test_pixel_space_vae_is_the_identity():
    vae = TM.PixelSpaceVAE()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(vae.encode(x).latent_dist.sample(), x) and torch.equal(vae.encode(x).latent_dist.mode(), x)
    assert torch.equal(vae.decode(x).sample, x)


def test_pixel_space_video_vae_keeps_wans_time_layout_and_inverts_exactly():
    vae = TM.PixelSpaceVideoVAE()
    x = torch.randn(2, 3, 9, 8, 6)  # 1 + 2 * 4 frames
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 12, 3, 8, 6)  # like Wan: frame 0 alone, then one latent frame per 4 frames
    torch.testing.assert_close(z[:, 3:6, 1], x[:, :, 2])  # latent frame 1 holds frames 1..4, channels stacked
    for r in range(4):
        assert torch.equal(z[:, 3 * r : 3 * r + 3, 0], x[:, :, 0])
    torch.testing.assert_close(vae.decode(z).sample, x, atol=0, rtol=0)
    with pytest.raises(ValueError, match="has 8 frames; PixelSpaceVideoVAE needs 1 \\+ k \\* 4 frames"):
        vae.encode(torch.zeros(1, 3, 8, 4, 4))
    with pytest.raises(ValueError, match="z_dim must be latent_channels \\* scale_factor_temporal = 12"):
        TM.PixelSpaceVideoVAE(z_dim=16)
    with pytest.raises(ValueError, match="latent_channels must be 1 \\(grey\\) or in_channels=3"):
        TM.PixelSpaceVideoVAE(z_dim=8, latent_channels=2)


def test_grey_pixel_space_video_vae_stores_one_channel_and_decodes_rgb():
    vae = TM.PixelSpaceVideoVAE(z_dim=4, latent_channels=1)
    grey = torch.randn(2, 1, 9, 8, 6)
    x = grey.expand(-1, 3, -1, -1, -1)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 3, 8, 6)
    torch.testing.assert_close(z[:, 1, 1], grey[:, 0, 2])  # latent frame 1, slot 1: frame 2
    torch.testing.assert_close(vae.decode(z).sample, x, atol=1e-6, rtol=0)
    # colour is averaged away: the latent of an RGB clip is its channel mean
    rgb = torch.randn(1, 3, 5, 4, 4)
    torch.testing.assert_close(vae.decode(vae.encode(rgb).latent_dist.mode()).sample[:, 0], rgb.mean(1), atol=1e-6, rtol=0)


def test_moving_digits_bounce_deterministically_and_are_readable(clf, tmp_path):
    ds = D.MovingDigitsDataset(num_clips=20, split="heldout", num_frames=40, channels=3, seed=3)
    a, b = ds[4], ds[4]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["pixel_values"].shape == (3, 40, 32, 32)
    pos = a["positions"]
    assert pos.min() >= 0 and pos.max() <= 16  # a 16 px digit on a 32 px canvas
    # one pixel at a time, 1-2 px per 4 frames: over 39 frame steps it moves 9-20 times per axis
    step = (pos[1:] - pos[:-1]).abs()
    assert step.max() == 1 and ((step.sum(0) >= 9) & (step.sum(0) <= 20)).all()
    far = D.MovingDigitsDataset(num_clips=20, split="heldout", num_frames=160, channels=3, seed=3)[4]["positions"]
    assert far[:, 0].min() == 0 and far[:, 0].max() == 16  # it bounces from edge to edge
    # speed_period=1: the unit is one frame, so it moves 1-2 px every frame
    fast = D.MovingDigitsDataset(num_clips=20, split="heldout", num_frames=40, seed=3, speed_period=1)[4]["positions"]
    fast_step = (fast[1:] - fast[:-1]).abs()
    assert ((fast_step >= 1) & (fast_step <= D.MOVING_SPEED)).all()
    # the same path at a longer length: the first frames agree
    longer = D.MovingDigitsDataset(num_clips=20, split="heldout", num_frames=80, channels=3, seed=3)[4]
    assert torch.equal(longer["pixel_values"][:, :40], a["pixel_values"])
    # the located digit is where the clip put it, and the classifier reads the crops
    crops, found = M.locate_digit(a["pixel_values"].permute(1, 0, 2, 3), 16)
    # within 4 px (2 digit pixels): a digit's ink rarely fills its whole box, so the best box can slide
    assert (found - pos).abs().max() <= 4 and crops.shape == (40, 3, 16, 16)
    accs = [M.per_frame_accuracy(ds[i]["pixel_values"].permute(1, 0, 2, 3), ds[i]["label"], clf, digit_size=16)["accuracy"] for i in range(20)]
    assert np.mean(accs) >= 0.9
    videos = [ds[i]["pixel_values"].permute(1, 0, 2, 3) for i in range(20)]
    summary = M.moving_digit_metrics(videos, [ds[i]["label"] for i in range(20)], 16, clf)
    assert summary["per_video"] == accs and summary["frame_accuracy"] == pytest.approx(np.mean(accs))
    assert summary["motion_jitter_px"] == pytest.approx(np.mean([M.motion_jitter(v, 16) for v in videos]))
    # single frames (the image phase): accuracy only, no temporal figures
    single = M.moving_digit_metrics([v[:1] for v in videos], [ds[i]["label"] for i in range(20)], 16, clf)
    assert single["per_video"] == [a["per_frame"][0] for a in (M.per_frame_accuracy(v[:1], ds[i]["label"], clf, digit_size=16) for i, v in enumerate(videos))]
    assert single["consecutive_psnr_db"] is None and single["motion_jitter_px"] is None
    square = torch.zeros(6, 3, 32, 32)
    for t in range(6):  # constant velocity: no jitter; a jump: some
        square[t, :, 2 + t : 10 + t, 3 + 2 * t : 11 + 2 * t] = 1.0
    assert M.motion_jitter(square, 8) == 0.0
    square[3] = square[3].roll(5, dims=-1)
    assert M.motion_jitter(square, 8) > 1.0
    with pytest.raises(ValueError, match="max_speed must be in"):
        D.MovingDigitsDataset(max_speed=40)
    with pytest.raises(ValueError, match="speed_period must be >= 1"):
        D.MovingDigitsDataset(speed_period=0)
    out = D.write_video_folder(D.MovingDigitsDataset(num_clips=2, num_frames=5, channels=3), tmp_path / "clips", progress=False)
    from diffattn.lora.data import VideoFolder

    clip = VideoFolder(out, resolution=32, num_frames=5).load(1)
    assert clip["pixels"].shape == (3, 5, 32, 32) and clip["caption"].startswith("a ")
    assert main(["testbed", "data", "moving", "--count", "2", "--frames", "5", "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli" / "00001").glob("*.png"))) == 5


def test_shipped_digits_video_draws_moving_digits(clf):
    # the shipped model, trained image phase then video phase (scripts/length_extension.py measures the
    # default call on 100 videos), real clips 99%, chance 10%
    from diffattn.testbed.xpred_wan import XPredictionWanTransformer3DModel

    pipe = TM.load("digits-video")
    assert isinstance(pipe.transformer, XPredictionWanTransformer3DModel)
    info = TM.read_info(TM.weights_dir("digits-video"))
    assert info["training"]["pretrain"]["train_config"]["num_frames"] == 1
    assert info["training"]["train_config"]["num_frames"] == 29
    call = {**TM.default_call_kwargs("digits-video"), "num_inference_steps": 12}
    videos, labels = [], []
    for c in range(10):
        kw = TM.prompt_kwargs(call, [f"a {c}"], [torch.Generator().manual_seed(1000 * c)])
        videos.append(np.asarray(pipe(**kw).frames[0]))
        labels.append(c)
    m = M.moving_digit_metrics(videos, labels, D.MOVING_DIGIT, clf)
    assert m["frame_accuracy"] >= 0.7, m  # 87.6% measured here (12 steps); chance 10%
    assert m["consecutive_psnr_db"] >= 25.0, m  # 27.7 dB measured; independent frames would give far less
    assert m["motion_jitter_px"] <= 2.5, m  # 1.81 px measured (real clips 1.45); a digit that jumps gives more


def test_testbed_registry_and_broken_folders(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid names: digits-unet, digits-dit"):
        TM.get("digits-vae")
    monkeypatch.setattr(TM, "WEIGHTS_DIR", tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match="diffattn testbed train digits-dit"):
        TM.load("digits-dit")
    folder = TM.save(TM.build("digits-unet"), tmp_path / "unet", "digits-unet")
    with pytest.raises(ValueError, match="expects 'FluxPipeline'"):
        TM.check_folder(folder, "digits-dit")
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet/config.json is missing \(expected a UNet2DConditionModel"):
        TM.load_folder(folder)
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        TM.check_folder(tmp_path)


# --------------------------------------------------------------------------------------------------
# diffattn evaluate
# --------------------------------------------------------------------------------------------------


def test_evaluate_cli_is_deterministic_and_writes_grid(tmp_path, capsys):
    method = _soft_method()
    args = ["evaluate", "--model", "zoo:sd", "--method", method, "--option", "temperature=0.5"]
    args += ["--samples", "3", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "psnr_db=" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a == b, "same command, same JSON"
    assert a["samples"] == 3 and len(a["psnr_db"]["per_sample"]) == 3 and a["options"] == {"temperature": 0.5}
    assert 0 < a["ssim"]["mean"] < 1 and a["psnr_db"]["mean"] < M.PSNR_CAP_DB
    assert a["layers"] and all(r["rel_error"] > 0 for r in a["layers"].values())
    assert "timing" not in a and "class_accuracy" not in a
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    assert not list((tmp_path / "a").glob(".*"))


def test_evaluate_dense_on_a_digits_folder_scores_classes(tmp_path):
    folder = TM.save(TM.build("digits-dit"), tmp_path / "dit", "digits-dit")
    report = evaluate(
        str(folder), "dense", samples=4, steps=2, batch_size=4, out_dir=tmp_path / "ev", progress=False, timing=True
    )
    assert report["psnr_db"]["min"] > 60 and report["layer_rel_error_mean"] < 1e-4
    acc = report["class_accuracy"]
    assert set(acc) == {"dense", "method"} and 0 <= acc["dense"]["accuracy"] <= 1
    timing = report["timing"]
    assert set(timing) == {"dense_s", "method_s", "attention"}
    attn = timing["attention"]
    assert 0 < attn["dense_s"] <= timing["dense_s"] and 0 < attn["method_s"] <= timing["method_s"]
    # Flux: joint blocks see the 256 image tokens, single blocks text + image (16 + 256)
    assert attn["tokens"] == [256, 272] and attn["speedup"] > 0


def test_time_attention_counts_every_attention_call():
    import time

    from diffattn.benchmark import time_attention

    pipe = TM.build("digits-dit")
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in M.attention_layers(pipe).values()]
    call = {**TM.default_call_kwargs("digits-dit"), "num_inference_steps": 2}
    t0 = time.perf_counter()
    with time_attention(pipe) as timer:
        pipe(**TM.prompt_kwargs(call, ["a 1"], [torch.Generator().manual_seed(0)]))
    wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    assert timer.calls == len(calls) > 0 and 0 < timer.seconds < wall
    assert timer.tokens == [256, 272]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in M.attention_layers(pipe).values())


def test_evaluate_lora_applies_to_the_method_samples_only(tmp_path, capsys):
    # a LoRA with non-zero B on an untrained digits-dit: with it, dense-vs-"dense" is no longer identical;
    # the dense reference rows of the grid stay pixel-identical to a run without the LoRA
    from diffattn.lora import adapters

    pipe = TM.build("digits-dit")
    folder = TM.save(pipe, tmp_path / "dit", "digits-dit")
    adapters.add_lora(pipe.transformer, rank=2)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    lora = adapters.save_lora(type(pipe), "transformer", pipe.transformer, tmp_path / "lora")
    kw = dict(samples=2, steps=2, batch_size=2, progress=False)
    base = evaluate(str(folder), "dense", out_dir=tmp_path / "a", **kw)
    tuned = evaluate(str(folder), "dense", out_dir=tmp_path / "b", lora=lora, **kw)
    assert base["lora"] is None and tuned["lora"] == str(lora)
    assert base["psnr_db"]["min"] > 60 and tuned["psnr_db"]["mean"] < 60
    ga, gb = (np.asarray(Image.open(tmp_path / k / "grid.png")) for k in ("a", "b"))
    # grid layout (comparison_grid): 2 px pad, 12 px captions, 64 px tiles, samples from x = 64
    dense_rows, method_rows = slice(14, 78), slice(80, 144)
    assert np.array_equal(ga[dense_rows, 64:], gb[dense_rows, 64:])
    assert not np.array_equal(ga[method_rows, 64:], gb[method_rows, 64:])
    # bad input: named, before any sampling
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lora: .* holds no pytorch_lora_weights"):
        evaluate(str(folder), "dense", lora=tmp_path / "empty", **kw)
    args = ["evaluate", "--model", str(folder), "--method", "dense", "--out", str(tmp_path / "c")]
    assert main([*args, "--lora", str(tmp_path / "missing.txt")]) == 2
    assert "--lora: expected a LoRA folder or a .safetensors file" in capsys.readouterr().err


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_table_script_end_to_end(tmp_path, monkeypatch, capsys):
    """scripts/quality_table.py on digits-dit and digits-lamamba at 2 samples and 2 steps: every row is
    scored, the LoRA row is skipped without --agent-lora, the table and its PNG are written, and the
    paired accuracy difference is the mean of the per-sample differences."""
    import sys

    mod = _script("quality_table")
    out = tmp_path / "qt"
    argv = ["quality_table.py", "--models", "digits-dit,digits-lamamba", "--samples", "2", "--inference-steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    text = capsys.readouterr().out
    assert "skip digits-dit / agent (64 pooled agents) + LoRA: no --agent-lora given" in text
    rec = json.loads(out.with_suffix(".json").read_text())
    labels = [(r["model"], r["label"]) for r in rec["rows"]]
    assert labels == [("digits-dit", "agent (64 pooled agents)"), ("digits-dit", "hilbert_local"), ("digits-lamamba", "lamamba (the model)")]
    for r in rec["rows"][:2]:
        assert r["samples"] == 2 and r["fd_n"] == 2 and r["attention_speedup"] > 0 and r["tokens"] == [256, 272]
        assert 0 <= r["accuracy_method"] <= 1 and r["psnr_db"] < 100
    assert Image.open(out.with_suffix(".png")).height > 100
    assert "| `digits-dit` | agent (64 pooled agents) | 2 |" in text
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "--models", "digits-nope"])
    with pytest.raises(SystemExit):
        mod.main()
    assert "--models: unknown ['digits-nope']" in capsys.readouterr().err


def test_evaluate_reads_every_frame_of_a_moving_digit(clf):
    # digits-video: the classifier reads the located digit of every frame (a 16 px digit on a 32 px
    # frame), the same figure as moving_digit_metrics on the same samples
    report = evaluate("testbed:digits-video", "dense", samples=2, steps=4, batch_size=2, progress=False)
    assert report["class_accuracy_of"] == "every frame (digit located)"
    pipe = TM.load("digits-video")
    call = {**TM.default_call_kwargs("digits-video"), "num_inference_steps": 4}
    videos = [
        np.asarray(pipe(**TM.prompt_kwargs(call, [f"a {i}"], [torch.Generator().manual_seed(i)])).frames[0])
        for i in range(2)
    ]
    expected = M.moving_digit_metrics(videos, [0, 1], D.MOVING_DIGIT, clf)["frame_accuracy"]
    assert report["class_accuracy"]["dense"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert report["class_accuracy"]["method"]["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_bad_input(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["evaluate", "--model", "zoo:sd", "--method", "nope", "--out", out]) == 2
    assert "available methods" in capsys.readouterr().err
    assert main(["evaluate", "--model", "testbed:nope", "--method", "dense", "--out", out]) == 2
    assert "valid names: digits-unet, digits-dit" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--method", "dense", "--out", out]) == 2
    assert "not zoo:NAME, testbed:NAME" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# slow: retraining
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classifier_retrains_to_the_shipped_accuracy(tmp_path, heldout):
    shipped = json.loads((C.CLASSIFIER_DIR / C.TRAINING_FILE).read_text())
    assert main(["testbed", "train", "classifier", "--out", str(tmp_path / "clf")]) == 0
    record = json.loads((tmp_path / "clf" / C.TRAINING_FILE).read_text())
    assert record["heldout_accuracy"] >= 0.97
    assert abs(record["heldout_accuracy"] - shipped["heldout_accuracy"]) <= 0.03
    assert C.accuracy(C.load_classifier(tmp_path / "clf"), heldout.images, heldout.labels) == pytest.approx(
        record["heldout_accuracy"], abs=1e-5
    )
