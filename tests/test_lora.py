"""diffattn.lora: datasets, objectives, the data schedule, LoRA targets, the trainer on zoo ``sd``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffattn.lora import adapters
from diffattn.lora.data import BoxesJsonl, DataError, ImageFolder, VideoFolder, parse_buckets
from diffattn.lora.objectives import objective_from_scheduler
from diffattn.lora.trainer import Schedule, TrainConfig, Trainer
from PIL import Image
from test_lora_helpers import one_thread, write_gifs, write_images  # noqa: F401 (autouse fixture)

from diffattn import zoo

# ----------------------------------------------------------------------------------------- data


def test_image_folder_sidecar_and_jsonl(tmp_path):
    a = ImageFolder(write_images(tmp_path / "a"), resolution=16)
    b = ImageFolder(write_images(tmp_path / "b", captions="jsonl"), resolution=(16, 8))
    assert [it.caption for it in a.items] == [it.caption for it in b.items]
    x = a.load(0)
    assert x["pixels"].shape == (3, 16, 16) and -1 <= x["pixels"].min() and x["pixels"].max() <= 1
    assert b.load(1)["pixels"].shape == (3, 16, 8)
    # random crops come from the generator: same seed, same crop
    r = ImageFolder(tmp_path / "a", resolution=12, crop="random")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(r.load(2, g())["pixels"], r.load(2, g())["pixels"])


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        ImageFolder(tmp_path / "empty")
    d = write_images(tmp_path / "d")
    (d / "img1.txt").unlink()
    (d / "img3.txt").unlink()
    (d / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        ImageFolder(d)
    msg = str(e.value)
    assert (
        "3 problem(s)" in msg and "img1.png: no caption" in msg and "img3.png" in msg and "broken.png" in msg
    )
    (d / "broken.png").unlink()
    assert len(ImageFolder(d, default_caption="a photo").items) == 4


def test_video_folder_gif_frames_and_too_short(tmp_path):
    v = write_gifs(tmp_path / "v", n=1, frames=9)
    frames = v / "clip_frames"
    frames.mkdir()
    for f in range(5):
        Image.new("RGB", (16, 16), (f * 40, 0, 0)).save(frames / f"{f:03d}.png")
    (v / "clip_frames.txt").write_text("frames")
    ds = VideoFolder(v, resolution=8, num_frames=5)
    assert len(ds) == 2 and ds.load(0)["pixels"].shape == (3, 5, 8, 8)
    with pytest.raises(DataError, match=r"clip0\.gif: has 9 frames, fewer than the 17 needed"):
        VideoFolder(v, resolution=8, num_frames=17)
    # the GIF plays at 8 fps (its square moves 1 px a frame): at fps=4 every other frame is taken
    clip = VideoFolder(v, resolution=16, num_frames=5, fps=4).load(0)["pixels"]
    for k in range(1, 5):
        assert clip[0, k, 5, 2 * k] > 0.9 and clip[0, k, 5, 2 * k - 1] < 0
    with pytest.raises(DataError, match="fewer than the 11 needed for num_frames=6 at fps=4"):
        VideoFolder(v, resolution=16, num_frames=6, fps=4)
    (v / "bad.gif").write_bytes(b"junk")
    (v / "bad.txt").write_text("x")
    with pytest.raises(DataError, match=r"bad\.gif: unreadable video"):
        VideoFolder(v, resolution=16, num_frames=5)


def test_video_folder_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from diffattn.io import save_frames

    frames = [np.full((16, 16, 3), f * 30, np.uint8) for f in range(6)]
    save_frames(frames, tmp_path / "v" / "a.mp4", fps=8)
    (tmp_path / "v" / "a.txt").write_text("grey")
    clip = VideoFolder(tmp_path / "v", resolution=16, num_frames=3).load(0)["pixels"]
    assert clip.shape == (3, 3, 16, 16) and clip[:, 2].mean() > clip[:, 0].mean()


def test_boxes_jsonl_follow_the_crop(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    row = {"file_name": "a.png", "caption": "two cats", "boxes": [[10, 0, 30, 10]], "box_captions": ["a cat"]}
    (tmp_path / "boxes.jsonl").write_text(json.dumps(row) + "\n")
    item = BoxesJsonl(tmp_path, resolution=10).load(0)
    # 40x20 -> 20x10, center crop 10x10 from x=5: the box [5, 0, 15, 5] -> [0, 0, 1, 0.5]
    assert torch.allclose(item["boxes"], torch.tensor([[0.0, 0.0, 1.0, 0.5]]))
    (tmp_path / "boxes.jsonl").write_text(json.dumps({**row, "box_captions": []}) + "\n")
    with pytest.raises(DataError, match="1 boxes but 0 box_captions"):
        BoxesJsonl(tmp_path / "boxes.jsonl")


# ----------------------------------------------------------------------------------------- objectives


def test_objective_read_from_scheduler():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    assert objective_from_scheduler(zoo.load("sd").scheduler).kind == "epsilon"
    assert objective_from_scheduler(DDIMScheduler(prediction_type="v_prediction")).kind == "v_prediction"
    sd3 = objective_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), sampling="logit_normal")
    wan = objective_from_scheduler(
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    )
    assert (sd3.kind, sd3.shift, wan.kind, wan.shift) == ("flow", 3.0, "flow", 5.0)
    assert sd3.timestep(0.5) == pytest.approx(750.0)  # shift 3: sigma = 1.5 / 2
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    noisy, target = sd3.noisy_and_target(x0, noise, torch.tensor([0.0, 1000.0]))
    assert (
        torch.allclose(noisy[0], x0[0])
        and torch.allclose(noisy[1], noise[1])
        and torch.allclose(target, noise - x0)
    )
    with pytest.raises(ValueError, match="timestep sampling"):
        objective_from_scheduler(DDIMScheduler(), sampling="cosine")


def test_schedule_is_independent_of_the_process_split():
    one = Schedule(16, seed=5, batch_size=2, grad_accum=2, world=1)
    two = Schedule(16, seed=5, batch_size=2, grad_accum=1, world=2)
    for step in range(6):  # crosses epochs (4 samples per step, 4 steps per epoch)
        e1, mb1 = one.micro_batches(step, 0)
        e2, r0 = two.micro_batches(step, 0)
        _, r1 = two.micro_batches(step, 1)
        assert e1 == e2 and sorted(map(tuple, mb1)) == sorted(map(tuple, r0 + r1))
    with pytest.raises(DataError, match="fewer than one global batch"):
        Schedule(3, 0, batch_size=2, grad_accum=2, world=1)


def test_checkpoint_write_is_atomic(tmp_path):
    from diffattn.lora import checkpoints

    def boom(folder):
        (folder / "trainable.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # dies mid-save

    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_checkpoint(tmp_path, 2, boom, {"step": 2})
    assert list((tmp_path / "checkpoints").iterdir()) == []
    (tmp_path / "checkpoints" / ".tmp-step-000004-1-1").mkdir()  # as a SIGKILL mid-save leaves it
    assert checkpoints.resolve_resume(tmp_path, "latest") is None
    def files(folder, x):  # what verify() asks of a checkpoint
        from safetensors.torch import save_file

        save_file({"w": torch.full((2,), float(x))}, str(folder / "trainable.safetensors"))
        torch.save({"param_groups": []}, folder / "optimizer.pt")
        torch.save({}, folder / "lr_scheduler.pt")

    checkpoints.write_checkpoint(tmp_path, 4, lambda f: files(f, 4), {"step": 4}, total_limit=1)
    checkpoints.write_checkpoint(tmp_path, 6, lambda f: files(f, 6), {"step": 6}, total_limit=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000006"]
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "step-000006"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoints.resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_size_buckets(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for i, (w, h) in enumerate([(32, 16), (30, 16), (16, 32), (16, 28), (20, 20)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("x")
    assert parse_buckets("auto", 16) == [(16, 16), (16, 24), (24, 16)]  # (height, width), multiples of 8
    ds = ImageFolder(d, resolution=16, buckets=parse_buckets("8x16,16x8,16x16", 16))
    assert ds.groups() == [[0, 1], [2, 3], [4]]
    assert ds.load(0)["pixels"].shape == (3, 8, 16) and ds.load(2)["pixels"].shape == (3, 16, 8)
    sched = Schedule(len(ds), seed=1, batch_size=2, grad_accum=1, world=1, groups=ds.groups())
    assert sched.steps_per_epoch == 2  # the lone square image never fills a micro-batch
    for step in range(4):
        (mb,) = sched.micro_batches(step, 0)[1]
        assert sorted(mb) in ([0, 1], [2, 3])
    with pytest.raises(ValueError, match="--buckets expects"):
        parse_buckets("16by16", 16)
    res = Trainer(
        _cfg(
            d,
            tmp_path / "out",
            buckets="8x16,16x8,16x16",
            batch_size=2,
            max_steps=2,
            eval_samples=0,
            lora_init="gaussian",
        )
    ).train()
    assert np.isfinite(res.final_loss)


def test_unknown_lora_target_lists_candidates():
    unet = zoo.load("sd").unet
    with pytest.raises(
        ValueError, match=r"no layer of UNet2DConditionModel matches \['to_qq'\].*to_q, .*to_v"
    ):
        adapters.add_lora(unet, rank=2, targets=["to_q", "to_qq"])
    with pytest.raises(ValueError, match="no module 'nope'"):
        adapters.mark_extra_trainable(unet, ["nope"])


# ----------------------------------------------------------------------------------------- training


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "recipe": "image",
        "model": "zoo:sd",
        "data": str(data),
        "output": str(out),
        "resolution": 16,
        "cpu": True,
        "eval_samples": 4,
    }
    return TrainConfig(**{**base, **kw})


def test_overfit_four_images_and_load_lora_weights(tmp_path):
    """4 images: the fixed-set loss falls >= 3x; the saved LoRA reproduces the trained model's output."""
    data = write_images(tmp_path / "data")
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "conv1",
        "conv2",
        "conv_in",
        "conv_out",
    ]
    trainer = Trainer(
        _cfg(
            data,
            tmp_path / "out",
            max_steps=60,
            batch_size=4,
            learning_rate=1e-2,
            rank=8,
            lora_alpha=4,
            lora_targets=targets,
            log_every=10,
        )
    )
    res = trainer.train()
    print(
        f"fixed-set loss {res.fixed_loss_start:.4f} -> {res.fixed_loss_end:.4f} ({res.fixed_loss_start / res.fixed_loss_end:.2f}x)"
    )
    assert res.fixed_loss_start / res.fixed_loss_end >= 3.0, (res.fixed_loss_start, res.fixed_loss_end)
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert (
        "zoo:sd" in card
        and "| recipe | image |" in card
        and "fixed_set_loss_end" in card
        and "| steps | 60 |" in card
    )
    rows = (out / "logs" / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr") and rows[-1].startswith("60,")

    trainer.pipe.unet.eval()
    trained = trainer.pipe(**zoo.default_call_kwargs("sd")).images
    fresh = zoo.load("sd")
    fresh.load_lora_weights(str(out))
    loaded = fresh(**zoo.default_call_kwargs("sd")).images
    base = zoo.load("sd")(**zoo.default_call_kwargs("sd")).images
    assert np.abs(trained - base).max() > 1e-2  # the LoRA changed the model ...
    print(
        f"trained vs loaded output: max |d| = {np.abs(trained - loaded).max():.2e}; vs base {np.abs(trained - base).max():.2e}"
    )
    assert np.abs(trained - loaded).max() < 1e-4  # ... and loads back exactly


def test_checkpoints_resume_guards_and_extras(tmp_path):
    """Short run with a checkpoint, validation sample, extra module; resuming with other options fails."""
    data = write_images(tmp_path / "data", captions="jsonl")
    out = tmp_path / "out"
    cfg = _cfg(
        data,
        out,
        max_steps=2,
        batch_size=2,
        checkpoint_every=2,
        validation_every=2,
        train_modules=["conv_out"],
        lora_dropout=0.1,
        validation_prompt=["a red cat", "a blue dog"],
    )
    Trainer(cfg).train()
    ckpt = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "lr_scheduler.pt",
        "optimizer.pt",
        "state.json",
        "trainable.safetensors",
    ]
    assert Image.open(out / "samples" / "step-000002.png").size == (32, 16)  # two prompts in a row
    assert (out / adapters.EXTRA_FILE).is_file() and (out / adapters.LORA_FILE).is_file()
    pipe = zoo.load("sd")
    before = pipe.unet.conv_out.weight.clone()
    adapters.load(pipe, out)
    assert not torch.equal(before, pipe.unet.conv_out.weight)

    with pytest.raises(ValueError, match="already holds a training run"):
        Trainer(_cfg(data, out, max_steps=4, batch_size=2, train_modules=["conv_out"]))
    with pytest.raises(ValueError, match=r"--rank 8 differs from 4 in checkpoint"):
        Trainer(
            _cfg(data, out, max_steps=4, batch_size=2, rank=8, train_modules=["conv_out"], resume="latest")
        )
    with pytest.raises(ValueError, match=r"--model 'zoo:sdxl' differs from 'zoo:sd'"):
        Trainer(
            _cfg(
                data,
                out,
                model="zoo:sdxl",
                max_steps=4,
                batch_size=2,
                train_modules=["conv_out"],
                resume="latest",
            )
        )
    assert (ckpt / "state.json").is_file() and (out / adapters.LORA_FILE).is_file()  # nothing saved was lost


def test_damaged_checkpoints_are_named_and_latest_falls_back(tmp_path, capsys):
    """Issue 30: each file of the newest checkpoint truncated in turn (and the optimizer's bytes flipped).
    An explicit ``--resume PATH`` is an error naming the file; ``--resume latest`` warns that it skips the
    damaged one and resumes the one before (and ends where the uninterrupted run did);
    ``--no-checkpoint-fallback`` makes it an error; ``diffattn train`` says so in one line, exit code 2."""
    import re
    import shutil

    from diffattn.lora import checkpoints
    from safetensors.torch import load_file

    from diffattn.cli import main as cli_main

    data = write_images(tmp_path / "data")
    base = tmp_path / "base"
    kw = {"max_steps": 3, "batch_size": 2, "checkpoint_every": 1, "eval_samples": 0}
    Trainer(_cfg(data, base, **kw)).train()
    newest = base / "checkpoints" / "step-000003"
    names = sorted(p.name for p in newest.iterdir())
    assert names == ["lr_scheduler.pt", "optimizer.pt", "state.json", "trainable.safetensors"]

    def truncate(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip(f):
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))

    cases = [(n, truncate) for n in names] + [("optimizer.pt", flip)]
    for i, (name, damage) in enumerate(cases):
        out = tmp_path / f"case{i}"
        shutil.copytree(base, out)
        bad = out / "checkpoints" / "step-000003" / name
        damage(bad)
        bad_re = re.escape(str(bad))
        with pytest.raises(checkpoints.CheckpointError, match=f"--resume .*{bad_re}"):
            Trainer(_cfg(data, out, **kw, resume=str(bad.parent)))
        with pytest.raises(checkpoints.CheckpointError, match=f"{bad_re}.*no-checkpoint-fallback"):
            Trainer(_cfg(data, out, **kw, resume="latest", no_checkpoint_fallback=True))
        with pytest.warns(UserWarning, match=f"skipped 1 damaged checkpoint.*{bad_re}.*resuming from .*step-000002"):
            trainer = Trainer(_cfg(data, out, **kw, resume="latest"))
        assert trainer.resume_from == out / "checkpoints" / "step-000002"
        argv = ["train", "image", "--model", "zoo:sd", "--data", str(data), "--output", str(out), "--cpu",
                "--resolution", "16", "--max-steps", "3", "--batch-size", "2", "--resume", "latest",
                "--no-checkpoint-fallback"]
        capsys.readouterr()
        assert cli_main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err, err
        if i == 0:  # the fallback resumes and ends where the uninterrupted run ended, bit for bit
            trainer.train()
            a, b = load_file(str(base / adapters.LORA_FILE)), load_file(str(out / adapters.LORA_FILE))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every checkpoint damaged: nothing to fall back to
    out = tmp_path / "all"
    shutil.copytree(base, out)
    for ck in (out / "checkpoints").iterdir():
        truncate(ck / "optimizer.pt")
    with pytest.raises(checkpoints.CheckpointError, match="no valid checkpoint.*step-000003.*step-000001"):
        Trainer(_cfg(data, out, **kw, resume="latest"))


def test_data_workers_do_not_change_the_result(tmp_path):
    """Loading in a worker process draws the same crops, captions dropped, timesteps and noise."""
    from safetensors.torch import load_file

    data = write_images(tmp_path / "data")
    kw = {
        "max_steps": 2,
        "batch_size": 2,
        "crop": "random",
        "caption_dropout": 0.5,
        "eval_samples": 0,
        "resolution": 12,
    }
    Trainer(_cfg(data, tmp_path / "w0", num_workers=0, **kw)).train()
    Trainer(_cfg(data, tmp_path / "w1", num_workers=1, **kw)).train()
    a, b = (load_file(str(tmp_path / d / adapters.LORA_FILE)) for d in ("w0", "w1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_video_recipe_on_zoo_wan(tmp_path):
    data = write_gifs(tmp_path / "clips", n=2, frames=9, size=16)
    cfg = TrainConfig(
        recipe="video",
        model="zoo:wan",
        data=str(data),
        output=str(tmp_path / "out"),
        resolution=16,
        num_frames=5,
        max_steps=1,
        cpu=True,
        validation_every=1,
        eval_samples=0,
        timestep_sampling="logit_normal",
        attention="dense",
    )
    res = Trainer(cfg).train()
    assert np.isfinite(res.final_loss)
    assert (tmp_path / "out" / "samples" / "step-000001.gif").is_file()
    pipe = zoo.load("wan")
    pipe.load_lora_weights(str(tmp_path / "out"))  # Wan's stock loader takes it


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sdxl", "epsilon"),
        ("sd3", "flow"),
        ("flux", "flow"),
        ("hunyuan-video", "flow"),
        ("cogvideox", "v_prediction"),
        ("mochi", "flow"),
    ],
)
def test_every_supported_family_trains_and_loads(tmp_path, name, kind):
    """One step on each family; the result loads with the stock pipeline's load_lora_weights."""
    pipe = zoo.load(name)
    video = name in ("hunyuan-video", "cogvideox", "mochi")
    data = write_gifs(tmp_path / "d", n=1, frames=9, size=32) if video else write_images(tmp_path / "d", n=1)
    cfg = TrainConfig(
        recipe="video" if video else "image",
        model=f"zoo:{name}",
        data=str(data),
        output=str(tmp_path / "o"),
        resolution=32 if name == "cogvideox" else 16,
        num_frames=7 if name == "mochi" else 9,
        max_steps=1,
        cpu=True,
        eval_samples=0,
    )
    trainer = Trainer(cfg)
    assert trainer.objective.kind == kind
    assert np.isfinite(trainer.train().final_loss)
    pipe.load_lora_weights(str(tmp_path / "o"))
    denoiser = pipe.unet if name == "sdxl" else pipe.transformer
    assert any("lora_A" in n for n, _ in denoiser.named_parameters())


def test_recipe_hooks_boxes_data_and_no_lora(tmp_path):
    """A recipe without LoRA trains whole modules only; its ``condition`` hook sees the batch's boxes."""
    from diffattn.lora import recipes

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (10, 10, 200)).save(tmp_path / "b.png")
    rows = [
        {"file_name": n, "caption": "two cats", "boxes": [[0, 0, 8, 8]], "box_captions": ["a cat"]}
        for n in ("a.png", "b.png")
    ]
    (tmp_path / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def condition(trainer, batch, cond):
        seen.append(batch["boxes"][0].tolist())
        return {**cond, "model_kwargs": {"cross_attention_kwargs": {}}}

    recipe = recipes.Recipe(
        name="test-boxes",
        description="test",
        data="boxes",
        lora_targets=(),
        train_modules=("conv_out",),
        condition=condition,
    )
    recipes.register_recipe(recipe)
    try:
        cfg = _cfg(
            tmp_path / "boxes.jsonl", tmp_path / "out", recipe="test-boxes", max_steps=2, eval_samples=0
        )
        Trainer(cfg).train()
    finally:
        recipes._RECIPES.pop("test-boxes")
    assert seen and seen[0] == [[0.0, 0.0, 0.5, 0.5]]
    assert (tmp_path / "out" / adapters.EXTRA_FILE).is_file()
    assert not (tmp_path / "out" / adapters.LORA_FILE).exists()


@pytest.mark.parametrize("expert", ["high", "low"])
def test_wan22_trains_one_expert(tmp_path, expert):
    data = write_gifs(tmp_path / "clips", n=1, frames=9, size=16)
    cfg = TrainConfig(
        recipe="video",
        model="zoo:wan22",
        data=str(data),
        output=str(tmp_path / "o"),
        resolution=16,
        num_frames=9,
        max_steps=1,
        cpu=True,
        eval_samples=0,
        expert=expert,
        learning_rate=1e-2,
    )
    trainer = Trainer(cfg)
    boundary = trainer.pipe.config.boundary_ratio
    ts = [trainer.objective.timestep(u) for u in np.linspace(0, 0.999, 50)]
    assert (min(ts) >= boundary * 1000) if expert == "high" else (max(ts) < boundary * 1000)
    trainer.train()
    pipe = zoo.load("wan22")
    pipe.load_lora_weights(str(tmp_path / "o"), load_into_transformer_2=expert == "low")
    trained = pipe.transformer_2 if expert == "low" else pipe.transformer
    other = pipe.transformer if expert == "low" else pipe.transformer_2
    assert any("lora_A" in n for n, _ in trained.named_parameters())
    assert not any("lora_A" in n for n, _ in other.named_parameters())
    with pytest.raises(ValueError, match="--expert high or --expert low"):
        Trainer(TrainConfig(**{**cfg.__dict__, "expert": None, "output": str(tmp_path / "o2")}))


def test_cli_errors_and_offline_push(tmp_path, capsys, monkeypatch):
    from diffattn.cli import main

    assert main(["train", "image", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "data folder" in capsys.readouterr().err
    data = write_images(tmp_path / "d")
    assert (
        main(
            ["train", "image", "--data", str(data), "--output", str(tmp_path / "o"), "--lora-targets", "nope"]
        )
        == 2
    )
    assert "--lora-targets" in capsys.readouterr().err
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert (
        main(
            [
                "train",
                "image",
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                "--push-to-hub",
                "me/lora",
            ]
        )
        == 2
    )
    assert "offline" in capsys.readouterr().err
    assert main(["train", "nosuch", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "valid recipes: image, video" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_push_to_hub_failure_is_clear(tmp_path, monkeypatch):
    import huggingface_hub
    from diffattn.lora.trainer import push_to_hub

    def fail(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "create_repo", fail)
    with pytest.raises(RuntimeError, match=r"--push-to-hub 'me/x' failed .*saved in"):
        push_to_hub(tmp_path, "me/x")


def test_import_diffattn_imports_no_training_code():
    code = "import sys, diffattn, diffattn.cli; assert not [m for m in sys.modules if m.startswith(('diffattn.lora', 'peft'))]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wan_i2v_trains_with_the_pipelines_first_frame_conditioning(tmp_path):
    """Wan 2.1 image-to-video: the trainer builds the same [mask; first-frame latent] condition and CLIP
    image embedding that WanImageToVideoPipeline builds, trains, validates with an image, and the LoRA
    loads into the stock pipeline."""
    from diffattn.lora.models import WanI2VFamily, family_for

    data = write_gifs(tmp_path / "clips", n=2, frames=9, size=16)
    pipe = zoo.load("wan-i2v")
    fam = family_for(pipe, {"max_sequence_length": 16})
    assert isinstance(fam, WanI2VFamily)
    clip = VideoFolder(data, resolution=16, num_frames=5).load(0)["pixels"][None]  # in [-1, 1]
    cond = fam.condition_on_pixels(clip, {})
    image = pipe.video_processor.preprocess(WanI2VFamily.validation_extra(fam, VideoFolder(data, 16, 5))["image"], 16, 16)
    torch.testing.assert_close(image, clip[:, :, 0], atol=1 / 127.5, rtol=0)  # the same first frame (8-bit)
    _, ref = pipe.prepare_latents(clip[:, :, 0], 1, 16, 16, 16, 5, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(cond["i2v_condition"], ref, atol=1e-5, rtol=1e-5)
    from diffattn.lora.models import _first_frames_pil

    torch.testing.assert_close(cond["image_embeds"], pipe.encode_image(_first_frames_pil(clip), torch.device("cpu")))
    cfg = TrainConfig(
        recipe="video",
        model="zoo:wan-i2v",
        data=str(data),
        output=str(tmp_path / "out"),
        resolution=16,
        num_frames=5,
        max_steps=2,
        cpu=True,
        validation_every=2,
        eval_samples=2,
    )
    res = Trainer(cfg).train()
    assert np.isfinite(res.final_loss) and res.fixed_loss_end is not None
    assert (tmp_path / "out" / "samples" / "step-000002.gif").is_file()
    fresh = zoo.load("wan-i2v")
    fresh.load_lora_weights(str(tmp_path / "out"))
    assert any("lora_A" in n for n, _ in fresh.transformer.named_parameters())


def test_sharded_modes_other_than_fsdp2_are_refused_with_the_alternative():
    from diffattn.lora.sharding import check_supported

    for kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_supported(kind, None)
    check_supported("FSDP", 2)
    with pytest.raises(NotImplementedError, match="FSDP version 1.*fsdp_version: 2"):
        check_supported("FSDP", 1)
    for stage in (0, 1, 2, 3):
        check_supported("DEEPSPEED", zero_stage=stage)
    with pytest.raises(NotImplementedError, match="stage=None.*ZeRO stages 0-3"):
        check_supported("DEEPSPEED", zero_stage=None)
    with pytest.raises(NotImplementedError, match="configured for MEGATRON_LM.*FSDP2.*DDP"):
        check_supported("MEGATRON_LM")


def test_deepspeed_config_is_filled_from_the_options_and_must_agree():
    from diffattn.lora.sharding import configure_deepspeed

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "zero_optimization": {}}
    configure_deepspeed(config, batch_size=2, grad_accum=3, processes=4, clip=1.0)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24 and config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but --batch-size gives 2"):
        configure_deepspeed({"train_micro_batch_size_per_gpu": 8}, batch_size=2, grad_accum=1, processes=1, clip=1.0)


@pytest.mark.parametrize(
    "module,recipe", [("recipe_roictrl", "roictrl"), ("recipe_high_res", "high-res"), ("recipe_lamamba", "lamamba")]
)
def test_recipe_module_imports_first(module, recipe):
    """A recipe module imported before anything else of diffattn.lora (``from diffattn.lora.recipe_roictrl
    import load_adapter`` in a fresh process) imports, and every recipe is registered."""
    code = (
        f"import diffattn.lora.{module}\n"
        "from diffattn.lora.recipes import recipe_names\n"
        f"assert {recipe!r} in recipe_names() and 'image' in recipe_names(), recipe_names()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_subclassed_denoiser_gets_its_base_class_family():
    from diffattn.lora.models import WanFamily, family_for
    from diffusers import WanTransformer3DModel

    class MyWan(WanTransformer3DModel):
        pass

    pipe = zoo.load("wan")
    pipe.transformer.__class__ = MyWan
    assert isinstance(family_for(pipe), WanFamily)
    pipe.transformer.__class__ = torch.nn.Linear  # nothing known in its MRO
    with pytest.raises(NotImplementedError, match="Linear"):
        family_for(pipe)
