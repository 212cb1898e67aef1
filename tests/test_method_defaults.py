"""Each method's defaults work on each zoo model it supports, at the zoo's default size (one step).

"Supports" is what ``diffattn generate`` decides before loading a model (:func:`diffattn.cli.supports`), so
this also checks that the pre-load check never lets through a pair that ``diffattn.apply`` refuses.
``roi`` is left out: it has no default (it needs a trained adapter).
"""

from __future__ import annotations

import pytest

import diffattn
from diffattn import registry, zoo
from diffattn.checks import model_geometry
from diffattn.cli import supports

METHODS = [m for m in registry.methods() if m != "roi"]


@pytest.mark.parametrize("name", zoo.names())
def test_every_supported_method_runs_with_its_defaults(name, capfd):
    geo = model_geometry(f"zoo:{name}")
    methods = [m for m in METHODS if supports(m, geo.pipeline)]
    assert "dense" in methods
    pipe = zoo.load(name)
    for method in methods:
        kw = zoo.default_call_kwargs(name)
        kw["num_inference_steps"] = max(1, geo.min_steps)
        with diffattn.apply(pipe, method) as patch:
            assert patch.layers, f"{method} changed no layer of zoo:{name}"
            out = pipe(**kw)
        result = out.frames if getattr(out, "frames", None) is not None else out.images
        assert len(result) == 1, (method, name)
    notices = [line for line in capfd.readouterr().err.splitlines() if "default radius" in line]
    assert len(notices) <= 1, "a clamped default is announced once"


def test_an_explicit_radius_is_never_changed():
    """The default radius is clamped to a small grid; the same radius set by the user is an error saying what works."""
    pipe = zoo.load("flux")
    kw = zoo.default_call_kwargs("flux")
    kw["num_inference_steps"] = 1
    with diffattn.apply(pipe, "hilbert_local"):
        pipe(**kw)
    with pytest.raises(ValueError, match=r"radius=8 is larger than the 8x8 token grid \(at most 7"):
        with diffattn.apply(pipe, "hilbert_local", radius=8):
            pipe(**kw)


@pytest.mark.parametrize(
    "argv, stem",
    [
        (["bench"], "outputs/bench/attention"),  # no options
        (["bench", "--grid", "8,32,32", "--heads", "4", "--head-dim", "64", "--out", "outputs/bench/attn"], "outputs/bench/attn"),  # README
    ],
)
def test_bench_defaults_and_the_readme_example_run(argv, stem, tmp_path, monkeypatch, capsys):
    """Issue 30: both stopped on hilbert_local after timing the others and wrote nothing. Methods that do not
    apply to a video grid are skipped with a line, before any timing, and JSON + PNG are written."""
    import json

    from diffattn.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("hilbert_local") and "skipped" in out.splitlines()[0]
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods[0] == "dense-sdpa" and "radial" in methods and "hilbert_local" not in methods
    assert "hilbert_local" in data["skipped"]
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
