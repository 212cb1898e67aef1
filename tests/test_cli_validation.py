"""Every ``diffattn`` command checks its arguments before loading a model or doing any work.

A user error exits with status 2 and one line on stderr (``diffattn CMD: error: ...``), without a
traceback and without writing anything. Three parts: the regressions of issue 30 (each with the exact
command), a property-based test driving each command's validation stage (``main(argv,
validate_only=True)``) with random invalid and boundary arguments, and one tiny valid run per command.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffattn import zoo
from diffattn.cli import main

CHECKS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run (CI)
)
NAME = st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=12)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(argv: list[str], capsys, validate_only: bool = False) -> tuple[int, str, str]:
    try:
        rc = main(argv, validate_only=validate_only)
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_user_error(rc: int, err: str, command: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(f"diffattn {command}: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder holding the inputs the commands read (nothing else may appear in it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "broken.json").write_text('[{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a cat"')
    (tmp_path / "bad-entry.json").write_text(json.dumps([{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a"}, {"box": [0.5]}]))
    return tmp_path


# ----- the regressions of issue 30, each with its exact command ---------------------------------------------


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--model", "zoo:sd", "--steps", "0", "--out", "x.png"], ["--steps", ">= 1", "got 0"]),  # was ZeroDivisionError
        (["generate", "--model", "zoo:sd", "--height", "-32", "--out", "x.png"], ["--height", "got -32"]),  # was RuntimeError
        (["generate", "--model", "zoo:sd", "--out", "x.txt"], ["--out", ".png", "x.txt"]),  # was refused after generating
        (["generate", "--model", "zoo:wan", "--num-frames", "0", "--out", "x.gif"], ["--num-frames", ">= 1"]),  # was a 1-frame GIF
        (["generate", "--model", "zoo:wan", "--num-frames", "70", "--out", "x.gif"], ["--num-frames", "nearest: 69 or 73"]),  # was rounded
        (["generate", "--model", "zoo:sd", "--attention", "radial", "--out", "x.png"], ["radial", "zoo:sd"]),  # was after loading
        (["generate", "--model", "zoo:sd", "--option", "bogus=1", "--out", "x.png"], ["bogus", "valid options"]),
        (["generate", "--model", "zoo:sd", "--instances", "broken.json", "--out", "x.png"], ["broken.json", "not valid JSON", "line 1"]),
        (["generate", "--model", "zoo:sd", "--instances", "bad-entry.json", "--out", "x.png"], ["bad-entry.json", "entry 1", "box"]),
        (["mask", "dense", "--block-size", "0"], ["--block-size", "got 0"]),  # was ZeroDivisionError
        (["mask", "radial", "--frames", "70", "--height", "480", "--width", "832"], ["--frames", "nearest: 69 or 73"]),
        (["mask", "dense", "--frames", "0", "--height", "480", "--width", "832"], ["--frames", ">= 1"]),
        (["mask", "dense", "--grid", "1,8,8", "--out", "m.txt"], ["--out", ".png", "m.txt"]),  # was written as m.png
        (["bench", "--heads", "0"], ["--heads", "got 0"]),
        (["bench", "--methods", "roi"], ["roi", "benchmarkable"]),
        (["bench", "--grid", "8,16,16", "--methods", "hilbert_local", "--out", "x.txt"], ["--out", "x.txt"]),
        (["evaluate", "--method", "dense", "--samples", "0"], ["--samples", "got 0"]),
        (["evaluate", "--method", "nope"], ["nope", "available methods"]),
        (["train", "image", "--data", "data", "--output", "out", "--max-steps", "0"], ["--max-steps", "got 0"]),
        (["train", "video", "--model", "zoo:wan", "--data", "data", "--output", "out", "--num-frames", "70"], ["nearest: 69 or 73"]),
        (["train", "video", "--model", "zoo:mochi", "--data", "data", "--output", "out"], ["recipe's default", "nearest: 13 or 19"]),
        (["train", "image", "--data", "missing", "--output", "out"], ["--data", "missing"]),
        (["train", "image", "--data", "data"], ["required", "--output"]),
        (["testbed", "train", "digits-unet", "--option", "max_steps=0"], ["max_steps", "got 0"]),
        (["testbed", "train", "classifier", "--resume"], ["--resume", "classifier"]),
        (["testbed", "data", "moving", "--out", "data"], ["exists", "--overwrite"]),
        (["methods", "extra"], ["unrecognized arguments"]),
    ],
)
def test_issue_30_regressions(argv, needles, sandbox, capsys):
    before = files(sandbox)
    rc, _, err = run(argv, capsys)
    command = " ".join(argv[:2]) if argv[0] == "testbed" else argv[0]
    assert_user_error(rc, err, command, *needles)
    assert files(sandbox) == before, "nothing may be written on a user error"


def test_write_error_names_the_users_path_not_the_temp_file(tmp_path, capsys):
    """``--out /proc/x.png``: the error names /proc/x.png, not the temporary file it was written to."""
    if os.access("/proc", os.W_OK) is False or not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    rc, _, err = run(["generate", "--model", "zoo:sd", "--steps", "1", "--out", "/proc/x.png"], capsys)
    line = assert_user_error(rc, err, "generate", "'/proc/x.png'")
    assert ".tmp" not in line and "/proc/.x" not in line


def test_bench_skips_what_does_not_apply_before_timing(tmp_path, capsys):
    """The default method list skips hilbert_local on a video grid with a line, and still writes JSON + PNG."""
    stem = tmp_path / "b"
    args = ["bench", "--grid", "2,8,8", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--out", str(stem)]
    rc, out, err = run(args, capsys)
    assert rc == 0, err
    lines = out.splitlines()
    skip = next(i for i, line in enumerate(lines) if line.startswith("hilbert_local") and "skipped" in line)
    assert skip < next(i for i, line in enumerate(lines) if line.startswith("dense-sdpa")), "decided before timing"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert "hilbert_local" in data["skipped"] and "hilbert_local" not in [r["method"] for r in data["rows"]]
    assert stem.with_suffix(".png").stat().st_size > 0


# ----- property-based: random invalid and boundary arguments, validation stage only ------------------------


def _ints_below(n: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=-(10**6), max_value=n - 1)


def _bad_frames(temporal: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=-100, max_value=400).filter(lambda n: n < 1 or (n - 1) % temporal)


def _non_multiple(m: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=-(10**4), max_value=4096).filter(lambda n: n < 1 or n % m)


BAD_EXT = st.sampled_from([".txt", ".json", ".bmp", ".png.txt", ".PNGX", ""])
TESTBED = {"digits-unet", "digits-dit", "digits-video", "digits-lamamba"}
METHOD_NAMES = {"agent", "dense", "hilbert_local", "lamamba", "radial", "regional_mask", "roi", "none"}

GENERATE_BAD = st.one_of(
    st.tuples(st.just("zoo:sd"), st.just("--steps"), _ints_below(1).map(str)),
    st.tuples(st.just("zoo:mochi"), st.just("--steps"), st.just("1")),  # mochi's scheduler needs 2
    st.tuples(st.sampled_from(["zoo:sd", "zoo:wan", "zoo:flux"]), st.sampled_from(["--height", "--width"]), _ints_below(1).map(str)),
    st.tuples(st.just("zoo:sd"), st.sampled_from(["--height", "--width"]), _non_multiple(8).map(str)),
    st.tuples(st.just("zoo:wan"), st.sampled_from(["--height", "--width"]), _non_multiple(16).map(str)),
    st.tuples(st.just("zoo:wan"), st.just("--num-frames"), _bad_frames(4).map(str)),
    st.tuples(st.just("zoo:mochi"), st.just("--num-frames"), _bad_frames(6).map(str)),
    st.tuples(st.just("zoo:sd"), st.just("--num-frames"), st.integers(-5, 100).map(str)),  # an image model
    st.tuples(st.sampled_from(["zoo:sd", "zoo:wan", "testbed:digits-unet"]), st.just("--out"), BAD_EXT.map(lambda e: "o" + e)),
    st.tuples(st.just("zoo:sd"), st.just("--out"), st.sampled_from(["o.gif", "o.mp4"])),  # video extension, image model
    st.tuples(st.just("zoo:sd"), st.just("--attention"), NAME.filter(lambda s: s not in METHOD_NAMES)),
    st.tuples(st.just("zoo:flux"), st.just("--option"), st.sampled_from(["radius=0", "order=spiral", "radius=-3", "bogus=1", "=3", "noequals"])),
    st.tuples(st.just("zoo:sd"), st.just("--seed"), _ints_below(0).map(str)),
    st.tuples(st.just("zoo:sd"), st.just("--steps"), st.sampled_from(["x", "1.5", ""])),
    st.tuples(st.just("zoo:sd"), st.just("--instances"), st.sampled_from(["broken.json", "bad-entry.json", "missing.json", "data"])),
    st.tuples(NAME.filter(lambda s: s not in zoo.names()).map(lambda s: "zoo:" + s), st.just("--steps"), st.just("1")),
    st.tuples(NAME.filter(lambda s: s not in TESTBED).map(lambda s: "testbed:" + s), st.just("--steps"), st.just("1")),
    st.tuples(st.just("a-file"), st.just("--steps"), st.just("1")),
    st.tuples(st.just("zoo:sd"), st.just("--device"), st.sampled_from(["gpu", "cuda:x", "tpu"])),
)


@CHECKS
@given(bad=GENERATE_BAD, valid_steps=st.integers(2, 50))
def test_generate_validation_refuses(bad, valid_steps, sandbox, capsys):
    model, flag, value = bad
    argv = ["generate", "--model", model, "--steps", str(valid_steps)]
    if flag != "--out":
        argv += ["--out", "o.gif" if model in ("zoo:wan", "zoo:mochi") else "o.png"]
    if flag == "--option":
        argv += ["--attention", "hilbert_local"]
    before = files(sandbox)
    rc, _, err = run([*argv, flag, value], capsys, validate_only=True)
    assert_user_error(rc, err, "generate")
    assert files(sandbox) == before


@CHECKS
@given(
    case=st.one_of(
        st.tuples(st.just("zoo:sd"), st.sampled_from([8, 16, 32, 64, 512]), st.none(), st.sampled_from(["o.png", "o.jpg", "o.webp"])),
        st.tuples(st.just("zoo:wan"), st.sampled_from([16, 32, 480]), st.integers(0, 30).map(lambda k: 4 * k + 1), st.sampled_from(["o.gif", "o.png"])),
        st.tuples(st.just("zoo:mochi"), st.sampled_from([16, 32]), st.integers(0, 10).map(lambda k: 6 * k + 1), st.just("o.gif")),
        st.tuples(st.just("zoo:flux"), st.sampled_from([4, 32, 36]), st.none(), st.just("o.png")),
    ),
    steps=st.integers(2, 100),
    seed=st.integers(0, 2**32),
)
def test_generate_validation_accepts_boundaries(case, steps, seed, sandbox, capsys):
    model, side, frames, out = case
    argv = ["generate", "--model", model, "--height", str(side), "--width", str(side), "--steps", str(steps)]
    argv += ["--seed", str(seed), "--out", out] + (["--num-frames", str(frames)] if frames else [])
    before = files(sandbox)
    rc, _, err = run(argv, capsys, validate_only=True)
    assert rc == 0, err
    assert files(sandbox) == before


MASK_BAD = st.one_of(
    st.tuples(st.just("--block-size"), _ints_below(1).map(str)),
    st.tuples(st.just("--text"), _ints_below(0).map(str)),
    st.tuples(st.just("--out"), BAD_EXT.map(lambda e: "m" + e)),
    st.tuples(st.just("--grid"), st.sampled_from(["0,4,4", "a,b", "1,2,3,4", "4", "-1,4,4", "1,0,8", ""])),
    st.tuples(st.just("--option"), st.sampled_from(["bogus=1", "decay_factor=0", "noequals"])),
    st.tuples(st.just("--frames"), _bad_frames(4).map(lambda n: f"{n} --height 32 --width 32")),
    st.tuples(st.just("--height"), _non_multiple(16).map(lambda n: f"{n} --frames 9 --width 32")),
    st.tuples(st.just("--frames"), st.just("9")),  # without --height and --width
    st.tuples(st.just("--model"), NAME.filter(lambda s: s not in ("wan", "mochi", "cogvideox")).map(lambda s: f"{s} --frames 9 --height 32 --width 32")),
    st.tuples(st.just("--block-size"), st.just("1 --grid 64,64,64")),  # a mask too large to draw
)


@CHECKS
@given(bad=MASK_BAD, method=st.sampled_from(["dense", "radial"]))
def test_mask_validation_refuses(bad, method, sandbox, capsys):
    flag, value = bad
    if flag == "--option" and method == "dense" and value == "decay_factor=0":
        value = "bogus=2"
    before = files(sandbox)
    rc, _, err = run(["mask", method, flag, *value.split(" ")], capsys, validate_only=True)
    assert_user_error(rc, err, "mask")
    assert files(sandbox) == before


@CHECKS
@given(method=st.one_of(NAME.filter(lambda s: s not in METHOD_NAMES), st.sampled_from(["agent", "lamamba", "roi"])))
def test_mask_validation_refuses_methods_without_a_mask(method, sandbox, capsys):
    rc, _, err = run(["mask", method, "--grid", "1,8,8"], capsys, validate_only=True)
    assert_user_error(rc, err, "mask")
    assert not (sandbox / "mask.png").exists()


BENCH_BAD = st.one_of(
    st.tuples(st.sampled_from(["--heads", "--head-dim", "--repeats"]), _ints_below(1).map(str)),
    st.tuples(st.just("--text"), _ints_below(0).map(str)),
    st.tuples(st.just("--methods"), st.one_of(NAME.filter(lambda s: s not in METHOD_NAMES), st.sampled_from(["roi", "regional_mask"]))),
    st.tuples(st.just("--option"), st.sampled_from(["radial.bogus=1", "nomethod.x=1", "radial.decay_factor=-1", "x"])),
    st.tuples(st.just("--out"), st.sampled_from(["b.txt", "b.gif", "a-file/b", "a-file/b.json"])),
    st.tuples(st.just("--grid"), st.sampled_from(["0,1,1", "x", "1,2,3,4"])),
    st.tuples(st.just("--dtype"), st.sampled_from(["fp64", "int8"])),
)


@CHECKS
@given(bad=BENCH_BAD)
def test_bench_validation_refuses(bad, sandbox, capsys):
    flag, value = bad
    before = files(sandbox)
    rc, _, err = run(["bench", "--grid", "1,8,8", flag, value], capsys, validate_only=True)
    assert_user_error(rc, err, "bench")
    assert files(sandbox) == before


EVALUATE_BAD = st.one_of(
    st.tuples(st.sampled_from(["--samples", "--batch-size", "--steps"]), _ints_below(1).map(str)),
    st.tuples(st.just("--method"), NAME.filter(lambda s: s not in METHOD_NAMES)),
    st.tuples(st.just("--option"), st.sampled_from(["bogus=1", "dense_layers=-1", "k"])),
    st.tuples(st.just("--model"), st.sampled_from(["zoo:nope", "testbed:nope", "a-file", "./missing-folder"])),
    st.tuples(st.just("--out"), st.sampled_from(["a-file", "a-file/sub"])),
    st.tuples(st.just("--seed"), _ints_below(0).map(str)),
)


@CHECKS
@given(bad=EVALUATE_BAD)
def test_evaluate_validation_refuses(bad, sandbox, capsys):
    flag, value = bad
    argv = ["evaluate", "--model", "zoo:wan", "--method", "radial", flag, value]
    before = files(sandbox)
    rc, _, err = run(argv, capsys, validate_only=True)
    assert_user_error(rc, err, "evaluate")
    assert files(sandbox) == before


TRAIN_BAD = st.one_of(
    st.tuples(st.sampled_from(["--max-steps", "--batch-size", "--grad-accum", "--rank", "--log-every"]), _ints_below(1).map(str)),
    st.tuples(st.sampled_from(["--checkpoint-every", "--eval-samples", "--lr-warmup-steps"]), _ints_below(0).map(str)),
    st.tuples(st.just("--learning-rate"), st.sampled_from(["0", "-1e-4", "nan"])),
    st.tuples(st.just("--caption-dropout"), st.sampled_from(["1.5", "-0.1"])),
    st.tuples(st.just("--resolution"), _non_multiple(8).map(str)),
    st.tuples(st.just("--data"), st.sampled_from(["missing", "missing/x"])),
    st.tuples(st.just("--output"), st.just("a-file")),
    st.tuples(st.just("--model"), st.sampled_from(["zoo:nope", "testbed:nope", "a-file"])),
    st.tuples(st.just("--attention"), NAME.filter(lambda s: s not in METHOD_NAMES)),
    st.tuples(st.just("--option"), st.sampled_from(["bogus=1", "noequals"])),
    st.tuples(st.just("--resume"), st.just("missing-checkpoint")),
    st.tuples(st.just("--num-frames"), st.integers(-3, 40).map(str)),  # an image model
    st.tuples(st.just("--mixed-precision"), st.just("fp8")),
)


@CHECKS
@given(bad=TRAIN_BAD, recipe=st.sampled_from(["image", "full"]))
def test_train_validation_refuses(bad, recipe, sandbox, capsys):
    flag, value = bad
    argv = ["train", recipe, "--model", "zoo:sd", "--data", "data", "--output", "out", flag, value]
    if flag == "--option":
        argv += ["--attention", "dense"]
    before = files(sandbox)
    rc, _, err = run(argv, capsys, validate_only=True)
    assert_user_error(rc, err, "train")
    assert files(sandbox) == before


TESTBED_BAD = st.one_of(
    st.tuples(st.just("train"), NAME.filter(lambda s: not s.startswith("digits") and s != "classifier"), st.just([])),
    st.tuples(st.just("train"), st.just("digits-unet"), st.sampled_from([["--option", "max_steps=0"], ["--option", "bogus=1"], ["--out", "a-file"], ["--seed", "-1"]])),
    st.tuples(st.just("train"), st.just("classifier"), st.sampled_from([["--option", "epochs=0"], ["--resume"], ["--run-dir", "r"], ["--option", "max_steps=3"]])),
    st.tuples(st.just("data"), NAME.filter(lambda s: s not in ("digits", "scenes", "photos", "moving")), st.just(["--out", "d"])),
    st.tuples(st.just("data"), st.sampled_from(["scenes", "photos", "moving"]), st.sampled_from([["--out", "d", "--count", "0"], ["--out", "d", "--size", "-1"], ["--out", "data"], ["--out", "a-file", "--overwrite"]])),
    st.tuples(st.just("data"), st.sampled_from(["digits", "scenes", "photos"]), st.just(["--out", "d", "--frames", "5"])),
    st.tuples(st.just("data"), st.just("digits"), st.just(["--out", "d", "--count", "5"])),
    st.tuples(st.just("data"), st.just("moving"), st.sampled_from([["--out", "d", "--frames", "0"], ["--out", "d", "--size", "10"]])),
)


@CHECKS
@given(bad=TESTBED_BAD)
def test_testbed_validation_refuses(bad, sandbox, capsys):
    sub, name, extra = bad
    before = files(sandbox)
    rc, _, err = run(["testbed", sub, name, *extra], capsys, validate_only=True)
    assert_user_error(rc, err, f"testbed {sub}")
    assert files(sandbox) == before


# ----- one tiny valid run per command -------------------------------------------------------------------------


def test_tiny_valid_runs(sandbox, capsys):
    """methods, generate, mask, bench, evaluate, testbed data / train / list and train, each once, tiny."""
    assert run(["methods"], capsys)[0] == 0
    assert run(["generate", "--model", "zoo:sd", "--steps", "1", "--out", "g.png"], capsys)[0] == 0
    assert (sandbox / "g.png").is_file()
    assert run(["mask", "radial", "--grid", "2,4,4", "--block-size", "8", "--out", "m.png"], capsys)[0] == 0
    assert (sandbox / "m.png").is_file()
    rc, _, err = run(["bench", "--grid", "1,4,4", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--methods", "dense", "--out", "b"], capsys)
    assert rc == 0, err
    assert (sandbox / "b.json").is_file() and (sandbox / "b.png").is_file()
    args = ["evaluate", "--model", "zoo:sd", "--method", "dense", "--samples", "1", "--batch-size", "1", "--steps", "1", "--out", "ev"]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    assert (sandbox / "ev" / "report.json").is_file()
    rc, _, err = run(["testbed", "data", "photos", "--out", "photos", "--count", "2", "--size", "32"], capsys)
    assert rc == 0, err
    assert run(["testbed", "list"], capsys)[0] == 0
    args = ["train", "image", "--model", "zoo:sd", "--data", "photos", "--output", "lora", "--max-steps", "1"]
    rc, _, err = run([*args, "--resolution", "32", "--eval-samples", "0", "--cpu"], capsys)
    assert rc == 0, err
    assert (sandbox / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_testbed_train_says_what_runs_and_how_long(sandbox, capsys):
    rc, _, err = run(["testbed", "train", "classifier", "--out", "clf", "--option", "epochs=1"], capsys)
    assert rc == 0, err
    notice = [line for line in err.splitlines() if line.startswith("diffattn: training")]
    assert len(notice) == 1 and "about" in notice[0]


# ----- quiet by default -----------------------------------------------------------------------------------------


def test_generate_on_the_default_model_prints_no_warning(tmp_path):
    """No transformers torchvision notice, no "Expected types for vae ... PixelSpaceVAE"; progress bars stay."""
    cmd = [sys.executable, "-m", "diffattn.cli", "generate", "--steps", "1", "--out", str(tmp_path / "d.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    noisy = [line for line in res.stderr.splitlines() if "warn" in line.lower() or "expected types" in line.lower()]
    assert not noisy, noisy
    assert (tmp_path / "d.png").is_file()


def test_the_tables_checked_before_loading_agree_with_the_loaded_models():
    """checks._ZOO / _TESTBED_MULTIPLE and cli.PIPELINE_ATTENTION describe models without loading them: each
    row must say what the loaded model is (pipeline class, denoiser class, attention family, frames)."""
    from diffattn import checks, cli, zoo
    from diffattn.processors.core import attention_modules
    from diffattn.processors.families import family_of_processor
    from diffattn.testbed import models as testbed_models

    assert sorted(checks._ZOO) == sorted(zoo.names())
    assert sorted(checks._TESTBED_MULTIPLE) == sorted(testbed_models.names())
    for name, (pipeline, _, frames) in checks._ZOO.items():
        pipe = zoo.load(name)
        assert type(pipe).__name__ == pipeline, name
        assert zoo.default_call_kwargs(name).get("num_frames") == frames, name
        assert (checks.PIPELINES[pipeline][0] is not None) == (frames is not None), name
        family, denoiser = cli.PIPELINE_ATTENTION[pipeline]
        model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        assert type(model).__name__ == denoiser, name
        families = {family_of_processor(m.processor) for m in attention_modules(model).values()} - {None}
        assert family in families, (name, families)
