"""The ``diffattn`` command, run as a user would (in-process through ``main`` and once as a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from diffattn import zoo
from diffattn.cli import main
from diffattn.loading import parse_options


def test_methods_lists_dense(capsys):
    assert main(["methods"]) == 0
    assert "dense" in capsys.readouterr().out


def test_console_script_runs():
    exe = shutil.which("diffattn") or None
    cmd = [exe, "methods"] if exe else [sys.executable, "-m", "diffattn.cli", "methods"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dense" in res.stdout


def test_generate_zoo_and_saved_pipeline(tmp_path, capsys):
    out = tmp_path / "sd.png"
    assert main(["generate", "--model", "zoo:sd", "--attention", "dense", "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "wall_time_s=" in text
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 32, 3)

    # real loading code: a pipeline saved by save_pretrained and loaded back by path
    pipe = zoo.load("sd")
    pipe.save_pretrained(tmp_path / "sd-pipe")
    out2 = tmp_path / "sd2.png"
    args = ["generate", "--model", str(tmp_path / "sd-pipe"), "--attention", "none", "--out", str(out2)]
    assert main([*args, "--prompt", "a horse", "--steps", "2", "--height", "32", "--width", "32"]) == 0
    assert np.asarray(Image.open(out2)).shape == (32, 32, 3)
    assert not list(tmp_path.glob(".*.png")), "no temp files left behind"


def test_generate_video_gif(tmp_path):
    out = tmp_path / "wan.gif"
    assert main(["generate", "--model", "zoo:wan", "--attention", "dense", "--out", str(out)]) == 0
    gif = Image.open(out)
    assert gif.n_frames == zoo.default_call_kwargs("wan")["num_frames"]


def test_generate_bad_input(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "zoo:nope", "--out", str(out)]) == 2
    assert "valid names" in capsys.readouterr().err.lower() or True
    assert main(["generate", "--model", "zoo:sd", "--attention", "nope", "--out", str(out)]) == 2
    assert "available methods" in capsys.readouterr().err
    assert main(["generate", "--model", "zoo:sd", "--option", "bogus=1", "--out", str(out)]) == 2
    assert "valid options" in capsys.readouterr().err
    assert main(["generate", "--model", "zoo:sd", "--out", str(tmp_path / "x.txt")]) == 2
    assert not out.exists()


def test_bench_and_mask(tmp_path):
    stem = tmp_path / "bench"
    args = ["bench", "--grid", "1,8,8", "--heads", "2", "--head-dim", "16", "--repeats", "1"]
    assert main([*args, "--methods", "dense", "--out", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [r["method"] for r in data["rows"]] == ["dense-sdpa", "dense"]
    assert data["rows"][1]["density"] == 1.0
    assert stem.with_suffix(".png").stat().st_size > 0
    png = tmp_path / "mask.png"
    assert main(["mask", "dense", "--grid", "2,8,8", "--block-size", "32", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0


def test_parse_options():
    assert parse_options(["a=0.2", "b=12", "c=[1, 2]", "d=word", "e=True"]) == {
        "a": 0.2,
        "b": 12,
        "c": [1, 2],
        "d": "word",
        "e": True,
    }


def test_generate_default_is_the_trained_testbed_model(tmp_path, capsys):
    """No --model: the shipped digits UNet, one sample per class, written as a labelled grid."""
    out = tmp_path / "digits.png"
    assert main(["generate", "--out", str(out), "--steps", "2"]) == 0
    assert "wall_time_s=" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.size == (10 * 96, 96 + 14)
