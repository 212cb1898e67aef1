"""diffattn.io: every file the project writes is atomic and gets the mode a plain ``open`` would (issue 30)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from test_lora_helpers import one_thread, write_images  # noqa: F401 (autouse fixture)

from diffattn import io


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _plain_modes(tmp_path: Path) -> tuple[int, int]:
    """The modes a plain ``open`` and ``mkdir`` give here and now: the reference."""
    f, d = tmp_path / "plain-file", tmp_path / "plain-dir"
    with open(f, "w"):
        pass
    d.mkdir()
    return stat.S_IMODE(f.stat().st_mode), stat.S_IMODE(d.stat().st_mode)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _assert_tree(root: Path, file_mode: int, dir_mode: int) -> int:
    n = 0
    for p in [root, *root.rglob("*")]:
        assert _mode(p) == (dir_mode if p.is_dir() else file_mode), (p, oct(_mode(p)))
        n += 1
    return n


def test_umask_mode_is_what_a_plain_open_gives(tmp_path, umask):
    file_mode, dir_mode = _plain_modes(tmp_path)
    assert io.current_umask() == umask
    assert io.umask_mode() == file_mode and io.umask_mode(directory=True) == dir_mode


def test_images_gif_and_reports_follow_the_umask(tmp_path, umask):
    from diffattn.benchmark import save_figure, write_json

    file_mode, dir_mode = _plain_modes(tmp_path)
    img = np.zeros((8, 8, 3), np.float32)
    written = [
        *io.save_images([img], tmp_path / "one.png"),
        *io.save_images([img, img], tmp_path / "two.png"),
        *io.save_frames([img, img], tmp_path / "clip.gif"),
        io.save_labelled_grid([img, img], ["a", "b"], tmp_path / "grid.png"),
        io.atomic_text(tmp_path / "new" / "report.txt", "x"),
    ]
    write_json(tmp_path / "bench.json", {"a": 1})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    save_figure(fig, tmp_path / "bench.png")
    plt.close(fig)
    written += [tmp_path / "bench.json", tmp_path / "bench.png"]
    for p in written:
        assert p.is_file() and _mode(p) == file_mode, (p, oct(_mode(p)), oct(file_mode))
    assert _mode(tmp_path / "new") == dir_mode
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_failed_write_leaves_nothing_and_names_the_path(tmp_path):
    def boom(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("died mid-write")

    with pytest.raises(RuntimeError, match="died mid-write"):
        io.atomic_write(tmp_path / "x.png", boom)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="x.txt"):  # the user's path, not the temp file's
        io.atomic_write(tmp_path / "x.txt", lambda tmp: open(Path(tmp) / "no" / "dir", "w"))


def test_folders_replace_atomically_and_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = _plain_modes(tmp_path)
    out = tmp_path / "model"
    for text in ("old", "new"):
        with io.atomic_path(out, directory=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.txt").write_text(text)
            os.chmod(tmp / "sub" / "w.txt", 0o600)  # as a writer using mkstemp leaves it
    assert (out / "sub" / "w.txt").read_text() == "new"
    assert _assert_tree(out, file_mode, dir_mode) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plain-dir", "plain-file"]


def test_testbed_data_folder_follows_the_umask(tmp_path, umask):
    from diffattn.testbed.data import DigitScenesDataset, write_image_folder

    file_mode, dir_mode = _plain_modes(tmp_path)
    scenes = DigitScenesDataset(num_scenes=2, canvas=32, min_size=8, max_size=14, channels=3, max_digits=2)
    folder = write_image_folder(scenes, tmp_path / "scenes", progress=False)
    assert _assert_tree(folder, file_mode, dir_mode) > 2


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_training_outputs_and_checkpoints_follow_the_umask(tmp_path, mask):
    """The LoRA weights, model card, config, log, samples and every file of a checkpoint folder."""
    from diffattn.lora.trainer import TrainConfig, Trainer

    data = write_images(tmp_path / "data")
    old = os.umask(mask)
    try:
        file_mode, dir_mode = _plain_modes(tmp_path)
        out = tmp_path / "out"
        cfg = TrainConfig(recipe="image", model="zoo:sd", data=str(data), output=str(out), resolution=16, cpu=True,
                          eval_samples=0, max_steps=1, batch_size=2, checkpoint_every=1, validation_every=1)
        Trainer(cfg).train()
    finally:
        os.umask(old)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "step-000001" / "optimizer.pt").is_file()
    assert (out / "samples" / "step-000001.png").is_file()
    assert _assert_tree(out, file_mode, dir_mode) >= 10
