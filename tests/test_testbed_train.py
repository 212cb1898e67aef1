"""``diffattn testbed train digits-unet|digits-dit|digits-video|digits-lamamba`` on the trainer (tiny versions)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from diffattn.lora import adapters
from diffattn.lora.trainer import TrainConfig, Trainer
from test_lora_helpers import one_thread, write_images  # noqa: F401 (autouse fixture)

from diffattn.testbed import commands, models

# a handful of images, tiny widths: each run is a few seconds on one thread
TINY = {
    "digits-unet": {"block_out_channels": (8, 16, 16), "heads": (1, 1, 1)},
    "digits-dit": {"num_layers": 1, "num_single_layers": 1, "heads": 2},
    "digits-video": {"num_layers": 1, "heads": 2},
    "digits-lamamba": {"embed_dim": 8, "num_heads": 1, "depths": (1, 1), "window_size": 4},
}
FAST = dict(
    num_images=16,
    max_steps=12,
    batch_size=8,
    learning_rate=3e-3,
    lr_warmup_steps=0,
    lr_scheduler="constant",
    ema=False,
    eval_samples=8,
    checkpoint_every=6,
    log_every=1,
)
# digits-video's image phase (single frames), as tiny
PRETRAIN_FAST = {k: v for k, v in FAST.items() if k != "num_images"} | {"max_steps": 4, "checkpoint_every": 2}


def _options(name: str) -> dict:
    return {**FAST, "pretrain": PRETRAIN_FAST} if name == "digits-video" else dict(FAST)


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit", "digits-video", "digits-lamamba"])
def test_train_tiny_model_loadable_and_loss_decreases(tmp_path, name):
    out, run = tmp_path / "model", tmp_path / "run"
    record = commands.train(name, out=out, seed=0, run_dir=run, model_options=TINY[name], **_options(name))
    assert record["steps"] == 12 and record["train_items"] == 16
    assert record["fixed_set_loss_end"] < record["fixed_set_loss_start"]  # it learns
    assert record["size_mb"] < 20
    # a testbed folder: its pipeline class, testbed.json with the training record, the loss log
    pipe = models.load_folder(out, name)
    assert type(pipe).__name__ == models.get(name).pipeline_class
    info = models.read_info(out)
    assert info["name"] == name and info["training"]["steps"] == 12
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left over
    kw = models.prompt_kwargs(
        {**models.default_call_kwargs(name), "num_inference_steps": 2}, ["a 3"], [torch.Generator().manual_seed(0)]
    )
    if name == "digits-video":
        img = np.asarray(pipe(**{**kw, "num_frames": 5}).frames)
        assert img.shape == (1, 5, 32, 32, 3) and np.isfinite(img).all()
    else:
        img = np.asarray(pipe(**kw).images)
        assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    # two checkpoints kept; resuming continues from the newest and publishes again
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    again = commands.train(
        name, out=out, seed=0, run_dir=run, resume=True, model_options=TINY[name], **{**_options(name), "max_steps": 14}
    )
    assert again["steps"] == 14 and again["resumed_from"].endswith("step-000012")
    assert len(list(csv.DictReader((out / "train_log.csv").open()))) == 14
    if name == "digits-video":
        # the image phase ran once, on single frames, and ships its own loss log; resuming skipped it
        assert record["pretrain"]["steps"] == 4 and record["pretrain"]["train_config"]["num_frames"] == 1
        assert again["pretrain"]["steps"] == 4 and again["pretrain"]["final_train_loss"] == record["pretrain"]["final_train_loss"]
        assert again["pretrain"]["train_seconds_this_call"] == 0.0
        assert len(list(csv.DictReader((out / "pretrain_log.csv").open()))) == 4
        with pytest.raises(ValueError, match="the finished image phase .* ran with"):
            commands.train(name, out=out, seed=0, run_dir=run, resume=True, model_options=TINY[name],
                           **{**_options(name), "pretrain": {**PRETRAIN_FAST, "max_steps": 5}})
    else:
        assert "pretrain" not in record and not (out / "pretrain_log.csv").exists()


def test_video_phase_starts_from_the_image_phase(tmp_path):
    # a video phase that cannot move the weights (learning rate 0, no EMA) publishes the image phase's model
    frozen = {**FAST, "max_steps": 2, "learning_rate": 0.0, "weight_decay": 0.0, "checkpoint_every": 0}
    opts = dict(model_options=TINY["digits-video"], pretrain={**PRETRAIN_FAST, "max_steps": 3})
    commands.train("digits-video", out=tmp_path / "m", run_dir=tmp_path / "r", **opts, **frozen)
    published = models.load_folder(tmp_path / "m", "digits-video").transformer.state_dict()
    pre = models.load_folder(tmp_path / "r" / "pretrain" / "pipeline", "digits-video").transformer.state_dict()
    init = models.load_folder(tmp_path / "r" / "init", "digits-video").transformer.state_dict()
    assert all(torch.equal(published[k], pre[k]) for k in pre)
    assert any(not torch.equal(init[k], pre[k]) for k in pre)  # and the image phase did train
    # no checkpoints were kept, yet a fresh call into the same run folder is refused: it would rebuild
    # the untrained model under the finished image phase
    with pytest.raises(ValueError, match=r"finished image phase\); pass --resume"):
        commands.train("digits-video", out=tmp_path / "m", run_dir=tmp_path / "r", seed=1, **opts, **frozen)
    # no image phase: the video phase starts from the untrained model
    commands.train("digits-video", out=tmp_path / "m2", run_dir=tmp_path / "r2", pretrain=False,
                   model_options=TINY["digits-video"], **frozen)
    bare = models.load_folder(tmp_path / "m2", "digits-video").transformer.state_dict()
    assert all(torch.equal(bare[k], init[k]) for k in init)
    assert not (tmp_path / "r2" / "pretrain").exists()


def test_train_bad_input(tmp_path):
    with pytest.raises(ValueError, match="valid names: classifier, digits-unet, digits-dit"):
        commands.train("digits-vae", out=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown training option"):
        commands.train("digits-unet", out=tmp_path / "x", run_dir=tmp_path / "r", max_stepz=3)
    with pytest.raises(ValueError, match="unknown pretrain option"):
        commands.train("digits-video", out=tmp_path / "x", run_dir=tmp_path / "r", pretrain={"max_stepz": 3})
    with pytest.raises(ValueError, match="has no image phase"):
        commands.train("digits-unet", out=tmp_path / "x", run_dir=tmp_path / "r", pretrain={"max_steps": 3})
    with pytest.raises(ValueError, match="pretrain must be True, False or a dict"):
        commands.train("digits-video", out=tmp_path / "x", run_dir=tmp_path / "r", pretrain="yes")
    assert not (tmp_path / "x").exists()


def test_resume_with_other_model_options_refused(tmp_path):
    run = tmp_path / "run"
    commands.train(
        "digits-unet", out=tmp_path / "m", run_dir=run, model_options=TINY["digits-unet"], **{**FAST, "max_steps": 2, "checkpoint_every": 2}
    )
    with pytest.raises(ValueError, match="already holds a training run"):
        commands.train("digits-unet", out=tmp_path / "m", run_dir=run, model_options=TINY["digits-unet"], **FAST)
    with pytest.raises(ValueError, match="was built with"):
        commands.train(
            "digits-unet",
            out=tmp_path / "m",
            run_dir=run,
            resume=True,
            model_options={"block_out_channels": (8, 8, 16), "heads": (1, 1, 1)},
            **FAST,
        )


def test_cli_train_tiny(tmp_path, capsys):
    from diffattn.cli import main

    args = ["testbed", "train", "digits-dit", "--out", str(tmp_path / "m"), "--run-dir", str(tmp_path / "r")]
    opts = ["num_images=8", "max_steps=2", "batch_size=4", "eval_samples=2", f"model_options={TINY['digits-dit']!r}"]
    assert main(args + [a for o in opts for a in ("--option", o)]) == 0
    assert "steps=2" in capsys.readouterr().out and (tmp_path / "m" / "testbed.json").is_file()
    assert main(["testbed", "train", "classifier", "--resume"]) == 2  # a user error: one line, status 2
    assert "--resume / --run-dir apply to the diffusion" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the trainer side


def test_mark_extra_trainable_star_is_every_parameter():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).requires_grad_(False)
    names = adapters.mark_extra_trainable(m, ["*"])
    assert names == sorted(n for n, _ in m.named_parameters())
    assert all(p.requires_grad for p in m.parameters())


def test_full_recipe_saves_pipeline_and_refuses_lora(tmp_path):
    data = write_images(tmp_path / "d", n=4, size=16)
    init = tmp_path / "init"
    models.build("digits-unet", **TINY["digits-unet"]).save_pretrained(init)
    common = dict(model=str(init), data=str(data), resolution=16, max_steps=2, batch_size=2, cpu=True, eval_samples=0)
    with pytest.raises(ValueError, match="--save-pipeline saves a stock pipeline"):
        Trainer(TrainConfig(recipe="image", output=str(tmp_path / "a"), save_pipeline=True, **common))
    trainer = Trainer(TrainConfig(recipe="full", output=str(tmp_path / "b"), **common))
    assert trainer.cfg.save_pipeline and not trainer.has_lora
    n = sum(p.numel() for p in trainer.family.denoiser.parameters())
    assert sum(p.numel() for p in trainer.params) == n  # every parameter trains
    trainer.train()
    saved = json.loads((tmp_path / "b" / "pipeline" / "model_index.json").read_text())
    assert saved["_class_name"] == "StableDiffusionPipeline"
    models.load_folder(tmp_path / "b" / "pipeline", "digits-unet")
