"""diffattn.calibrate: per-layer errors against a plain reference, the choice against brute force over the
uniform settings, targets, verification, presets, the heat map, the CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffattn
from diffattn import calibration as CAL
from diffattn.cli import main
from diffattn.testbed import models as TM

CANDS = [{"decay_factor": d, "block_size": 64} for d in (0.25, 1.0)]
STEPS = 3
COSTS = [1.0, 0.2, 0.6]  # the fixed_costs fixture's seconds per call: dense, decay 0.25, decay 1


@pytest.fixture(scope="module")
def video():
    """A tiny untrained digits-video (2 blocks): its numbers mean nothing, its mechanics are the real ones."""
    torch.manual_seed(0)
    pipe = TM.build("digits-video", num_layers=2, heads=2)
    call = TM.default_call_kwargs("digits-video")
    call.pop("num_inference_steps")
    call["num_frames"] = 13  # 4 latent frames of 64 tokens: 2 blocks of radial's 64
    return pipe, call


def _calibrate(video, target, **kw):
    pipe, call = video
    kw = {"candidates": CANDS, "num_inference_steps": STEPS, "call_kwargs": call, "progress": False, **kw}
    return diffattn.calibrate(pipe, "radial", ["a 3"], target=target, **kw)


def test_layer_errors_match_a_sparse_layer_in_a_dense_run(video, one_thread):
    """At step 0 the first block's inputs are the same in a dense run and in a run where only that block
    is sparse; its output error there is the recorder's entry (sample_steps=1 samples step 0 only)."""
    pipe, call = video
    pipe_kw = {**call, "num_inference_steps": STEPS, "output_type": "np"}
    models = diffattn.api.denoisers(pipe)
    plans = [diffattn.api._plan(models, "radial", c) for c in CANDS]
    layers = [(f"{type(m).__name__}.{n}", layer) for m, n, layer, _, _ in plans[0].changes]
    procs = [{id(layer): new for _, _, layer, _, new in p.changes} for p in plans]
    first_name, first = layers[0]

    def outputs_at_step0(patch_ctx):
        seen = []
        ctx = patch_ctx.context
        h = first.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()) if ctx.step_index == 0 else None)
        try:
            pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **pipe_kw)
        finally:
            h.remove()
        return seen

    with diffattn.apply(pipe, "dense") as p:
        hooks = [m.register_forward_pre_hook(diffattn.context.ContextHook(pl.context, pipe), with_kwargs=True) for pl in plans for _, m in models]
        dense_procs = {id(layer): new for _, _, layer, _, new in p.saved}
        with CAL._Recorder(layers, procs, p.context, {0}, dense_procs) as rec:
            pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **pipe_kw)
        with CAL._Recorder(layers, procs, p.context, {0}, dense_procs) as idle, p.suspended():
            pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **pipe_kw)
        for h in hooks:
            h.remove()
        dense = outputs_at_step0(p)
    assert idle.calls.sum() == 0  # a suspended patch's calls are not recorded
    assert len(dense) == 2  # classifier-free guidance: two calls at step 0
    assert rec.calls[0] == 2 and (rec.err[:, 0] == 0).all()
    for j, cand in enumerate(CANDS, start=1):
        others = {name: "dense" for name, _ in layers[1:]}
        with diffattn.apply(pipe, "radial", layers={first_name: cand, **others}) as sp:
            sparse = outputs_at_step0(sp)
        ref = np.mean([float((s.double() - d.double()).norm() / d.double().norm()) for s, d in zip(sparse, dense)])
        assert rec.err[0, j] / rec.calls[0] == pytest.approx(ref, rel=1e-6, abs=1e-9)
        assert ref > 1e-4  # the candidate changes the layer: the check could fail


def test_path_is_a_pareto_front_with_every_uniform_setting_dominated_or_on_it():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_layers, n_cand = rng.integers(2, 6), rng.integers(2, 5)
        err = np.concatenate([np.zeros((n_layers, 1)), rng.random((n_layers, n_cand))], axis=1)
        cost = np.concatenate([np.ones((n_layers, 1)), rng.random((n_layers, n_cand))], axis=1)
        path = CAL._path(err, cost)
        rows = np.arange(n_layers)
        e = [err[rows, c].sum() for c in path]
        k = [cost[rows, c].sum() for c in path]
        assert not path[0].any()  # all dense first (error 0, the most expensive point)
        assert all(a > b for a, b in zip(k, k[1:])) and all(a < b for a, b in zip(e, e[1:]))
        for j in range(1 + n_cand):  # every uniform setting: on the front or beaten at no more cost
            u = np.full(n_layers, j)
            ue, uk = err[rows, u].sum(), cost[rows, u].sum()
            assert any(pe <= ue + 1e-12 and pk <= uk + 1e-12 for pe, pk in zip(e, k))


def _monotone_path(rng, n):
    """A synthetic path: summed errors rising from 0 and a true PSNR that follows 20 dB per decade with a
    random offset, slope and noise (so the search's model is only roughly right)."""
    esum = np.concatenate([[0.0], np.sort(rng.uniform(1e-3, 1.0, n - 1))])
    slope, offset = rng.uniform(12, 30), rng.uniform(5, 25)
    psnr = np.minimum(100.0, offset - slope * np.log10(np.maximum(esum, 1e-12)) + rng.normal(0, 0.3, n))
    return esum, np.minimum.accumulate(psnr)  # monotone: a cheaper point is never more accurate


def test_quality_search_finds_the_cheapest_point_a_brute_force_scan_finds():
    """Against a scan over every path point: the search never returns a point that misses the target; it
    returns the cheapest point meeting it in (nearly) every case, since it also tries the next cheaper point
    predicted to miss by under SEARCH_SLACK_DB (a point meeting the target exactly is predicted either
    side of it); where it stops short, that point meets the target by under 1.5 dB; it uses fewer trials
    than bisection (log2 of the path length) on average."""
    rng = np.random.default_rng(1)
    used, exact = [], []
    for _ in range(200):
        n = int(rng.integers(3, 60))
        esum, psnr = _monotone_path(rng, n)
        target = float(rng.uniform(psnr[-1] - 3, psnr[1] + 3))
        calls = []

        def trial(i, psnr=psnr, calls=calls):
            calls.append(i)
            return float(psnr[i])

        found = CAL._quality_search(esum, trial, target, max_trials=n)
        meets = [i for i in range(1, n) if psnr[i] >= target]
        if meets:
            assert found["ok"] is not None and psnr[found["ok"][0]] >= target
            i = found["ok"][0]
            exact.append(i == max(meets))
            assert i == max(meets) or psnr[i + 1] - target < 1.5, (found, meets)
        else:
            assert found["ok"] is None and found["seen"] is not None
        assert len(calls) == len(set(calls)) == len(found["trials"])  # no point tried twice
        used.append(len(calls))
        capped = CAL._quality_search(esum, trial, target, max_trials=1)
        assert len(capped["trials"]) == 1 and capped["trials"][0]["index"] == (n + 1) // 2  # the middle first
    assert np.mean(used) < 3.0 < np.log2(30) and np.mean(exact) > 0.98


def test_layers_the_method_leaves_unchanged_stay_dense():
    err = np.array([[0.0, 0.3, 0.1], [0.0, 0.0, 0.0], [0.0, 0.2, 0.0]])
    assert CAL._drop_no_ops(np.array([1, 2, 2]), err).tolist() == [1, 0, 0]
    assert CAL._drop_no_ops(np.array([0, 1, 1]), err).tolist() == [0, 0, 1]


@pytest.fixture
def fixed_costs(monkeypatch):
    """A stand-in cost model: dense 1.0 s, decay 0.25 0.2 s, decay 1 0.6 s per call (measured times of a
    tiny model are noise, and sparse can be slower than dense there)."""
    recorder_hook = CAL._Recorder._hook

    def hook_with_fixed_costs(self, i):
        hook = recorder_hook(self, i)

        def wrapped(module, args, kwargs, out):
            before = self.cost[i].copy()
            hook(module, args, kwargs, out)
            if self.context.step_index in self.sampled:
                self.cost[i] = before + np.array(COSTS)

        return wrapped

    monkeypatch.setattr(CAL._Recorder, "_hook", hook_with_fixed_costs)


def test_speed_target_picks_the_most_accurate_affordable_point(video, one_thread, fixed_costs):
    """With costs fixed, the choice is here the brute-force optimum over all 9 per-layer combinations (in
    general the path guarantees a choice no worse than the best uniform setting, see the path test)."""
    result = _calibrate(video, diffattn.Speed(x=1.4))
    err, names = result.errors, result.layer_names
    assert result.candidates == ["dense", *CANDS] and len(names) == 2
    best = None
    for a in range(3):
        for b in range(3):
            c = np.array([a, b])
            speed = 2.0 / np.array([1.0, 0.2, 0.6])[c].sum()
            if speed >= 1.4 and (best is None or err[[0, 1], c].sum() < best[0] - 1e-12):
                best = (err[[0, 1], c].sum(), c)
    chosen = np.array([result.candidates.index(result.layers[n]) for n in names])
    assert err[[0, 1], chosen].sum() == pytest.approx(best[0])
    assert result.predicted["attention_speedup"] >= 1.4
    assert result.measured["seeds"] == [1000] and 0 < result.measured["psnr_db"] <= 100
    assert result.seconds > 0 and result.generation_seconds > 0
    assert not diffattn.applied(video[0])


def test_quality_target_meets_the_psnr_on_the_calibration_seeds(video, one_thread, fixed_costs):
    result = _calibrate(video, diffattn.Quality(psnr=20.0), max_trials=4)
    assert result.trials and result.predicted["psnr_db"] >= 20.0
    assert any(v != "dense" for v in result.layers.values())
    # the trial that was kept is reproduced by applying the result
    pipe, call = video
    kw = {**call, "num_inference_steps": STEPS, "output_type": "np"}
    with diffattn.apply(pipe, "dense"):
        ref = pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **kw).frames
    with result.apply(pipe):
        got = pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **kw).frames
    assert CAL._psnr(got, ref) == pytest.approx(result.predicted["psnr_db"], abs=1e-3)


def test_unreachable_targets_name_the_best_found_and_apply_nothing(video, one_thread, fixed_costs):
    with pytest.raises(diffattn.CalibrationError, match=r"Speed\(x=1000\) not reached: the fastest setting found gives .*x") as e:
        _calibrate(video, diffattn.Speed(x=1000))
    assert e.value.best["attention_speedup"] > 0 and set(e.value.best["layers"]) and not diffattn.applied(video[0])
    with pytest.raises(diffattn.CalibrationError, match=r"Quality\(psnr=99\) not reached: the best quality found is .* dB") as e:
        _calibrate(video, diffattn.Quality(psnr=99), max_trials=1)
    assert "psnr_db" in e.value.best and not diffattn.applied(video[0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompts": []}, ValueError, "prompts must be a non-empty list of strings"),
        ({"seeds": []}, ValueError, "seeds must be a non-empty list"),
        ({"seeds": [-1]}, ValueError, "seeds must be integers >= 0"),
        ({"held_out_seeds": [0]}, ValueError, "held_out_seeds must differ from seeds"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer >= 1"),
        ({"sample_steps": 0}, ValueError, "sample_steps must be an integer >= 1"),
        ({"target": 30}, TypeError, r"target must be diffattn.Quality\(psnr=...\)"),
        ({"candidates": []}, ValueError, "candidates must be a non-empty list"),
        ({"candidates": [{"decay": 1}]}, TypeError, "decay"),
        ({"method": "dense"}, ValueError, "cannot be calibrated per layer"),
    ],
)
def test_bad_input_is_refused_before_any_work(video, kwargs, error, match, monkeypatch):
    pipe, call = video
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("generated before refusing"))
    args = {"method": "radial", "prompts": ["a 3"], "target": diffattn.Speed(x=2.0), "candidates": CANDS, **kwargs}
    with pytest.raises(error, match=match):
        diffattn.calibrate(pipe, args.pop("method"), args.pop("prompts"), **args)


def test_targets_validate_their_values():
    with pytest.raises(ValueError, match=r"Quality\(psnr=...\) must be a number of dB"):
        diffattn.Quality(psnr=0)
    with pytest.raises(ValueError, match=r"Speed\(x=...\) must be a finite number > 1"):
        diffattn.Speed(x=1.0)


def test_result_round_trips_as_a_preset_and_draws_its_heat_map(video, one_thread, tmp_path, fixed_costs):
    pipe, call = video
    result = _calibrate(video, diffattn.Quality(psnr=15.0), max_trials=2)
    path = result.preset(pipe).save(tmp_path / "preset.json")
    loaded = diffattn.CalibrationPreset.load(path)
    assert loaded.layers == json.loads(json.dumps(result.layers)) and loaded.target == {"kind": "quality", "psnr": 15.0}
    kw = {**call, "num_inference_steps": STEPS, "output_type": "np"}
    with result.apply(pipe):
        a = pipe(prompt="a 5", generator=torch.Generator().manual_seed(3), **kw).frames
    with diffattn.apply(pipe, "radial", preset=path):
        b = pipe(prompt="a 5", generator=torch.Generator().manual_seed(3), **kw).frames
    assert np.array_equal(a, b)  # bit-identical
    other = TM.build("digits-video", num_layers=3, heads=2)
    with pytest.raises(ValueError, match="config"):
        diffattn.apply(other, "radial", preset=path)
    result.heatmap(tmp_path / "heat.png")
    from PIL import Image

    assert Image.open(tmp_path / "heat.png").width > 100
    assert json.loads(json.dumps(result.to_dict()))["errors"][0][0] == 0.0


def test_no_setting_cheaper_than_dense_is_an_error(video, one_thread, fixed_costs, monkeypatch):
    monkeypatch.setitem(globals(), "COSTS", [1.0, 1.5, 2.0])  # every candidate slower than dense
    with pytest.raises(diffattn.CalibrationError, match="no candidate setting measured cheaper than dense"):
        _calibrate(video, diffattn.Quality(psnr=10.0))
    assert not diffattn.applied(video[0])


def test_cli_writes_a_preset_that_generate_applies(tmp_path, one_thread, fixed_costs, capsys):
    out, report, heat = tmp_path / "p.json", tmp_path / "r.json", tmp_path / "h.png"
    args = ["calibrate", "--model", "testbed:digits-video", "--method", "radial", "--prompt", "a 3", "--psnr", "15",
            "--steps", "3", "--candidate", "decay_factor=0.25,block_size=64", "--candidate", "decay_factor=1,block_size=64",
            "--out", str(out), "--report", str(report), "--heatmap", str(heat)]  # fmt: skip
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "layers sparse; predicted attention" in line and "measured on held-out seeds [1000]" in line
    preset = diffattn.CalibrationPreset.load(out)
    rep = json.loads(report.read_text())
    assert preset.layers == rep["layers"] and preset.method == "radial" and heat.is_file()
    assert rep["model"] == "testbed:digits-video" and rep["predicted"]["psnr_db"] >= 15
    gen = ["generate", "--model", "testbed:digits-video", "--preset", str(out), "--steps", "3", "--prompt", "a 3", "--out", str(tmp_path / "v.gif")]
    assert main(gen) == 0 and (tmp_path / "v.gif").is_file()


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "give exactly one target"),
        (["--psnr", "20", "--speed", "2"], "give exactly one target"),
        (["--speed", "1"], "--speed: Speed"),
        (["--psnr", "20", "--seeds", "1,x"], "--seeds expects comma-separated integers"),
        (["--psnr", "20", "--held-out-seeds", "0"], "--held-out-seeds must differ from --seeds"),
        (["--psnr", "20", "--candidate", "decay=1"], "--candidate radial"),
        (["--psnr", "20", "--method", "dense"], "cannot be calibrated"),
        (["--psnr", "20", "--sample-steps", "0"], "--sample-steps"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, match):
    args = ["calibrate", "--model", "testbed:digits-video", "--method", "radial", "--prompt", "a 3", "--out", str(tmp_path / "p.json")]
    if "--method" in extra:
        i = extra.index("--method")
        args[args.index("radial")] = extra[i + 1]
        extra = extra[:i] + extra[i + 2 :]
    assert main([*args, *extra]) == 2
    assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_two_denoisers_with_the_same_layer_names_are_refused():
    from diffattn import zoo

    pipe = zoo.load("wan22")
    with pytest.raises(ValueError, match="cannot tell this pipeline's denoisers apart"):
        diffattn.calibrate(pipe, "radial", ["a cat"], target=diffattn.Speed(x=2.0), candidates=CANDS)


def test_calibration_evidence_script_end_to_end(tmp_path, monkeypatch, one_thread):
    """scripts/calibration_evidence.py at 2 samples and 2 steps: a row per uniform setting, each with the
    calibrated choices at equal time and at equal quality compared pairwise over the same samples, or the
    reason there is none."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "calibration_evidence.py"
    spec = importlib.util.spec_from_file_location("calibration_evidence", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ev"
    monkeypatch.setattr(sys, "argv", ["x", "--model", "digits-unet", "--method", "agent", "--samples", "2", "--steps", "2",
                                      "--size", "64", "--uniform", "0", "--uniform", "2", "--out", str(out)])  # fmt: skip
    mod.main()
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["samples"] == 2 and [r["uniform"]["setting"] for r in rec["rows"]] == [CAL._AGENT_SD[0], CAL._AGENT_SD[2]]
    for row in rec["rows"]:
        assert row["uniform_speedup"] > 0
        assert row["uniform_calibration_psnr"] is None or 0 < row["uniform_calibration_psnr"] <= 100
        for key in ("at_equal_time", "at_equal_quality"):
            cal = row[key]
            if "error" in cal:
                reasons = ("not reached", "no faster than dense", "every layer dense", "calibration refused every target")
                assert any(w in cal["error"] for w in reasons)
            else:
                assert cal["minus_uniform"]["psnr"]["n"] == 2 and cal["calibration_generations"] > 0
    assert rec["attention_tokens"] == [256, 1024] and rec["call"]["height"] == 64


def test_effective_costs_price_a_no_op_candidate_as_dense():
    err = np.array([[0.0, 0.3, 0.1], [0.0, 0.0, 0.0]])
    cost = np.array([[1.0, 0.2, 0.6], [0.5, 0.45, 0.55]])  # layer 1: the method does nothing, timings are noise
    out = CAL.effective_costs(err, cost)
    assert out.tolist() == [[1.0, 0.2, 0.6], [0.5, 0.5, 0.5]] and cost[1, 1] == 0.45  # input untouched


def test_retarget_chooses_again_from_the_same_record(video, one_thread, fixed_costs, monkeypatch):
    """retarget reuses the record pass (no layer is re-recorded), gives what a fresh calibration to the same
    target gives on that table, and refuses what calibrate refuses."""
    pipe, call = video
    first = _calibrate(video, diffattn.Speed(x=1.4))
    fresh = _calibrate(video, diffattn.Quality(psnr=20.0), max_trials=4)
    monkeypatch.setattr(CAL._Recorder, "__enter__", lambda self: pytest.fail("retarget re-recorded"))
    again = first.retarget(pipe, diffattn.Speed(x=1.4), progress=False)
    assert again.layers == first.layers and again.errors is first.errors and again.costs is first.costs
    assert again.seconds > first._record.seconds
    quality = first.retarget(pipe, diffattn.Quality(psnr=20.0), max_trials=4, progress=False)
    assert quality.layers == fresh.layers and quality.trials == fresh.trials  # fixed costs: the same table
    assert quality.measured["seeds"] == [1000]
    assert first.retarget(pipe, diffattn.Speed(x=1.4), held_out_seeds=[7], progress=False).measured["seeds"] == [7]
    # psnr_of: a trial's measure for any setting, uniform or per layer
    kw = {**call, "num_inference_steps": STEPS, "output_type": "np"}
    with diffattn.apply(pipe, "dense"):
        ref = pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **kw).frames
    with diffattn.apply(pipe, "radial", **CANDS[0]):
        got = pipe(prompt="a 3", generator=torch.Generator().manual_seed(0), **kw).frames
    assert first.psnr_of(pipe, CANDS[0]) == pytest.approx(CAL._psnr(got, ref), abs=1e-9)
    assert first.psnr_of(pipe, {n: CANDS[0] for n in first.layer_names}) == pytest.approx(CAL._psnr(got, ref), abs=1e-9)
    with pytest.raises(TypeError, match="setting must be a dict"):
        first.psnr_of(pipe, "dense")
    with pytest.warns(UserWarning, match="changes no layer"):
        assert first.psnr_of(pipe, dict.fromkeys(first.layer_names, "dense")) == 100.0
    with pytest.raises(ValueError, match="the pipeline this result was calibrated on"):
        first.retarget(TM.build("digits-video", num_layers=2, heads=2), diffattn.Speed(x=1.4))
    with pytest.raises(TypeError, match="target must be"):
        first.retarget(pipe, 2.0)
    with pytest.raises(ValueError, match="max_trials must be an integer >= 1"):
        first.retarget(pipe, diffattn.Speed(x=1.4), max_trials=0)
    with pytest.raises(ValueError, match="held_out_seeds must differ from the calibration seeds"):
        first.retarget(pipe, diffattn.Speed(x=1.4), held_out_seeds=[0])
    with pytest.raises(diffattn.CalibrationError, match=r"Speed\(x=1000\) not reached"):
        first.retarget(pipe, diffattn.Speed(x=1000), progress=False)
    with diffattn.apply(pipe, "dense"), pytest.raises(ValueError, match="without diffattn methods applied"):
        first.retarget(pipe, diffattn.Speed(x=1.4))
    import dataclasses

    with pytest.raises(ValueError, match="a result made by diffattn.calibrate in this process"):
        dataclasses.replace(first, _record=None).retarget(pipe, diffattn.Speed(x=1.4))
