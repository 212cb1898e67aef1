"""Every script in examples/ runs offline (zoo / testbed models, tiny sizes, 1-2 steps) and writes what it
says: valid images or GIFs of the expected size, a method that changes the output, LoRA / adapter weights.

Each example runs as a user would run it (a subprocess); the training scripts run with ``--max-steps 1``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PY_EXAMPLES = ["agent_sd.py", "radial_wan.py", "high_res_flux.py", "regional_control_sd.py",
               "lamamba_class_conditional.py"]
SH_EXAMPLES = ["train_long_video_lora.sh", "train_high_res_bridge.sh", "train_roictrl.sh"]
# the train flags every offline training run adds: one step on the CPU in float32, no fixed-set loss
TRAIN_FAST = ["--max-steps", "1", "--batch-size", "1", "--mixed-precision", "no", "--cpu", "--eval-samples", "0"]


def _env(path_dir: Path | None = None) -> dict[str, str]:
    """This interpreter's bin folder (the `diffattn` command) first on PATH, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    dirs = [str(path_dir)] if path_dir else []
    env["PATH"] = os.pathsep.join([*dirs, str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(script: str, *args: str, cwd: Path, path_dir: Path | None = None) -> str:
    """Run an example (python or bash) in ``cwd``; its stdout. A failure shows the stderr tail."""
    cmd = [sys.executable] if script.endswith(".py") else ["bash"]
    res = subprocess.run([*cmd, str(EXAMPLES / script), *args], cwd=cwd, env=_env(path_dir), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The pixels of a valid RGB image of ``size`` that is not blank (NaNs decode to one flat colour)."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size and im.mode == "RGB", (im.format, im.size, im.mode)
        pixels = np.asarray(im).astype(np.float64)
    assert pixels.std() > 1.0, f"{path} is blank"
    return pixels


def gif(path: Path, frames: int, size: tuple[int, int]) -> np.ndarray:
    """The frames of a valid animated GIF with ``frames`` frames of ``size``."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == "GIF" and im.size == size and im.n_frames == frames, (im.format, im.size, im.n_frames)
        pixels = np.stack([np.asarray(f.convert("RGB")).astype(np.float64) for f in ImageSequence.Iterator(im)])
    assert pixels.std() > 1.0, f"{path} is blank"
    return pixels


def differ(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert np.abs(a - b).mean() > 0.1, f"{what}: the output equals the baseline's (the method did nothing)"


def lora_file(run_dir: Path, name: str = "pytorch_lora_weights.safetensors") -> dict:
    """The tensors of a training run's weights file (which must hold some)."""
    from safetensors.torch import load_file

    path = run_dir / name
    assert path.is_file(), f"no {name} in {sorted(p.name for p in run_dir.iterdir())}"
    tensors = load_file(str(path))
    assert tensors and all(t.isfinite().all() for t in tensors.values())
    return tensors


# ------------------------------------------------------------------------------------------ interfaces


@pytest.mark.parametrize("script", PY_EXAMPLES)
def test_python_example_help(script: str, monkeypatch, capsys) -> None:
    """``--help`` exits 0 and lists the shared interface (run in-process: no second interpreter start)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--out", "--device", "--dtype", "--steps"):
        assert flag in text, f"{script} --help lacks {flag}"
    doc = (EXAMPLES / script).read_text().split('"""')[1]
    assert f"python examples/{script}" in doc and "offline" in doc, "the docstring shows the GPU and offline commands"


@pytest.mark.parametrize("script", SH_EXAMPLES)
def test_training_script_arguments(script: str, tmp_path, monkeypatch) -> None:
    """The model is the first argument (a real hub id by default) and every other argument reaches
    ``diffattn train`` after the script's defaults, so it overrides them (a stub `diffattn` records them)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "diffattn").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$ARGS_LOG"\n')
    (stub / "diffattn").chmod(0o755)
    log = tmp_path / "args"
    monkeypatch.setenv("ARGS_LOG", str(log))
    run(script, "--max-steps", "7", cwd=tmp_path, path_dir=stub)
    default_args = log.read_text().splitlines()
    log.unlink()
    run(script, "zoo:x", "--output", "o", cwd=tmp_path, path_dir=stub)
    given_args = log.read_text().splitlines()
    assert default_args[0] == "train"
    model = default_args[default_args.index("--model") + 1]
    assert "/" in model and not model.startswith(("zoo:", "testbed:", ".")), f"default model {model!r} is no hub id"
    assert default_args[-2:] == ["--max-steps", "7"]
    assert given_args[given_args.index("--model") + 1] == "zoo:x" and given_args[-2:] == ["--output", "o"]


@pytest.mark.slow
@pytest.mark.parametrize("script", PY_EXAMPLES + SH_EXAMPLES)
def test_example_help_subprocess(script: str, tmp_path) -> None:
    """``--help`` as a user types it (the .sh ones reach the real ``diffattn train --help``)."""
    assert "--model" in run(script, "--help", cwd=tmp_path)


# ------------------------------------------------------------------------------------------ generation


def test_agent_sd(tmp_path) -> None:
    out = run("agent_sd.py", "--model", "zoo:sd", "--steps", "2", "--compare", "--out", "agent.png", cwd=tmp_path)
    assert "agent attention on" in out and "agent attention on 0 layers" not in out
    assert "speed-up" in out
    differ(image(tmp_path / "agent.png", (32, 32)), image(tmp_path / "agent-dense.png", (32, 32)), "agent")


@pytest.mark.slow
def test_agent_sd_testbed(tmp_path) -> None:
    """The testbed's trained SD stand-in (a class caption as the prompt, pixel space)."""
    out = run("agent_sd.py", "--model", "testbed:digits-unet", "--steps", "2", "--out", "digit.png", cwd=tmp_path)
    assert "wrote" in out
    image(tmp_path / "digit.png", (32, 32))


def test_radial_wan(tmp_path) -> None:
    out = run("radial_wan.py", "--model", "zoo:wan", "--frames", "17", "--tile-size", "16", "--option",
              "granularity=token", "--compare", "--out", "long.gif", cwd=tmp_path)
    assert "17 frames, 32x32" in out
    differ(gif(tmp_path / "long.gif", 17, (32, 32)), gif(tmp_path / "long-dense.gif", 17, (32, 32)), "radial")


def test_radial_wan_refuses_all_dense(tmp_path) -> None:
    res = subprocess.run([sys.executable, str(EXAMPLES / "radial_wan.py"), "--model", "zoo:wan", "--steps", "2",
                          "--dense-timesteps", "2"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2 and "radial attention would never run" in res.stderr
    assert not list(tmp_path.iterdir())


def test_high_res_flux(tmp_path) -> None:
    out = run("high_res_flux.py", "--model", "zoo:flux", "--size", "64", "--radius", "3", "--out", "hr.png",
              cwd=tmp_path)
    assert "(64x64)" in out
    image(tmp_path / "hr.png", (64, 64))


def test_regional_control_sd(tmp_path) -> None:
    out = run("regional_control_sd.py", "--model", "zoo:sd", "--steps", "2", "--compare", "--out", "rc.png",
              cwd=tmp_path)
    assert "regional_mask, 2 instances" in out
    regional = image(tmp_path / "rc.png", (32, 32))
    differ(regional, image(tmp_path / "rc-plain.png", (32, 32)), "regional_mask")
    differ(image(tmp_path / "rc-boxes.png", (32, 32)), regional, "the drawn boxes")


def test_lamamba_class_conditional(tmp_path) -> None:
    out = run("lamamba_class_conditional.py", "--labels", "3", "7", "--steps", "2", "--out", "lm.png", cwd=tmp_path)
    assert "(class 3)" in out and "(class 7)" in out
    differ(image(tmp_path / "lm_0.png", (32, 32)), image(tmp_path / "lm_1.png", (32, 32)), "two classes")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny testbed data sets: moving-digit clips, photos, digit scenes with boxes."""
    from diffattn.testbed.commands import export

    root = tmp_path_factory.mktemp("data")
    export("moving", root / "clips", count=2, size=32, frames=9)
    export("photos", root / "images", count=2, size=64)
    export("scenes", root / "scenes", count=2, size=32)
    return root


@pytest.fixture(scope="module")
def roictrl_run(data, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("roictrl")
    run("train_roictrl.sh", "zoo:sd", "--data", str(data / "scenes" / "boxes.jsonl"), "--output", "run",
        "--resolution", "32", *TRAIN_FAST, cwd=cwd)
    return cwd / "run"


@pytest.fixture(scope="module")
def long_video_run(data, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("long_video")
    run("train_long_video_lora.sh", "zoo:wan", "--data", str(data / "clips"), "--output", "run", "--num-frames", "9",
        "--resolution", "32", *TRAIN_FAST, cwd=cwd)
    return cwd / "run"


@pytest.fixture(scope="module")
def bridge_run(data, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("bridge")
    run("train_high_res_bridge.sh", "zoo:flux", "--data", str(data / "images"), "--output", "run", "--resolution",
        "64", "--max-sequence-length", "16", *TRAIN_FAST, cwd=cwd)
    return cwd / "run"


def test_train_roictrl(roictrl_run) -> None:
    from diffattn.lora.recipe_roictrl import load_adapter

    assert any("roictrl_adapter." in k for k in lora_file(roictrl_run, "extra_modules.safetensors"))
    assert load_adapter(roictrl_run).config.max_instances > 0


def test_train_long_video_lora(long_video_run) -> None:
    assert any("lora_A" in k for k in lora_file(long_video_run))


@pytest.mark.slow
def test_train_high_res_bridge(bridge_run) -> None:
    keys = lora_file(bridge_run)
    assert any("x_embedder" in k for k in keys) and any("lora_B" in k for k in keys)


@pytest.mark.slow
def test_regional_control_with_trained_adapter(roictrl_run, tmp_path) -> None:
    out = run("regional_control_sd.py", "--model", "zoo:sd", "--steps", "2", "--adapter", str(roictrl_run),
              "--out", "rc.png", cwd=tmp_path)
    assert "roi, 2 instances" in out
    image(tmp_path / "rc.png", (32, 32))


@pytest.mark.slow
def test_radial_wan_with_trained_lora(long_video_run, tmp_path) -> None:
    run("radial_wan.py", "--model", "zoo:wan", "--frames", "9", "--lora", str(long_video_run), "--out", "v.gif",
        cwd=tmp_path)
    gif(tmp_path / "v.gif", 9, (32, 32))


@pytest.mark.slow
def test_high_res_flux_with_trained_bridge(bridge_run, tmp_path) -> None:
    run("high_res_flux.py", "--model", "zoo:flux", "--size", "64", "--radius", "3", "--bridge", str(bridge_run),
        "--out", "hr.png", cwd=tmp_path)
    image(tmp_path / "hr.png", (64, 64))
