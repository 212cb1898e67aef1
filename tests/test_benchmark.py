"""The timing helpers every benchmark uses."""


import pytest

from diffattn import benchmark


def _fake_clock(monkeypatch, durations):
    """perf_counter that advances by the next duration at every call pair (start, stop)."""
    now = [0.0]
    seq = iter(durations)

    def perf_counter():
        now[0] += next(seq) if perf_counter.stop else 0.0
        perf_counter.stop = not perf_counter.stop
        return now[0]

    perf_counter.stop = False
    monkeypatch.setattr(benchmark.time, "perf_counter", perf_counter)


def test_interleaved_times_one_call_of_each_per_round(monkeypatch):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    # rounds of (a, b): a takes 3, 1, 2 and b 5, 9, 4 seconds
    _fake_clock(monkeypatch, [3, 5, 1, 9, 2, 4])
    samples = benchmark.interleaved_samples(fns, 3, warmup=0)
    assert calls == ["a", "b"] * 3
    assert samples == {"a": [3, 1, 2], "b": [5, 9, 4]}
    _fake_clock(monkeypatch, [3, 5, 1, 9, 2, 4])
    assert benchmark.interleaved(fns, 3, warmup=0) == {"a": 2, "b": 5}


def test_environment_records_allocator_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert benchmark.environment()["allocator_env"]["MALLOC_TRIM_THRESHOLD_"] == "123"


def test_rounds_figures_compare_best_rounds_and_keep_medians():
    fig = benchmark.rounds_figures([10.0, 12.0, 11.0], [4.0, 2.0, 5.0], density=0.25)
    assert fig["dense_s"] == 10.0 and fig["sparse_s"] == 2.0
    assert fig["speedup"] == 5.0 and fig["efficiency"] == 1.25 and fig["ideal"] == 4.0
    assert fig["dense_median_s"] == 11.0 and fig["sparse_median_s"] == 4.0
    assert fig["efficiency_median"] == 11.0 / 4.0 * 0.25 and fig["rounds"] == 3


def test_engine_call_times_either_cpu_kernel_and_says_which():
    """``gather-sdpa`` runs gather with the native kernel off; both give the same attention (<= 1e-5) and
    report their kernel; an unknown entry is refused by name."""
    import pytest
    import torch

    from diffattn.ops import BlockMask, native_cpu, sdpa_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 700, 32, generator=g) for _ in range(3))
    bm = BlockMask(torch.rand(6, 6, generator=g) < 0.5, 700, 700, 128)
    ref = sdpa_reference(q, k, v, bm)
    backend, fn, kernel = benchmark.engine_call(q, k, v, bm, "gather-sdpa")
    assert (backend, kernel) == ("gather", "sdpa")
    assert (fn() - ref).abs().max() <= 1e-5
    backend, fn, kernel = benchmark.engine_call(q, k, v, bm, "gather")
    assert backend == "gather" and kernel == ("native" if native_cpu.available()[0] else "sdpa")
    assert (fn() - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="gather-sdpa"):
        benchmark.engine_call(q, k, v, bm, "fast")


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_roictrl_fit_recovers_fixed_and_per_instance_cost_under_drift():
    """bench_roictrl's fit on synthetic step times: a variant costing 30 ms once plus 2 ms per instance,
    timed on a machine whose base drifts from 40 to 55 ms between points, comes out as exactly that; the
    slope over all N (0 included) folds the fixed part in."""
    mod = _script("bench_roictrl")
    rows = []
    for n, base in zip([0, 1, 4, 8, 16, 30], [40.0, 47.0, 41.0, 55.0, 44.0, 50.0]):
        roi = base + (30.0 + 2.0 * n if n else 0.0)
        mask = base + 5.0 * n
        rows.append({"instances": n, "seconds": {"base": base, "roi": roi, "regional_mask": mask}})
    e = mod.summarize_counts(rows, ["roi", "regional_mask"])
    assert e["per_instance_seconds_from_one"]["roi"] == pytest.approx(2.0)
    assert e["fixed_seconds"]["roi"] == pytest.approx(30.0)
    assert e["per_instance_seconds_from_one"]["regional_mask"] == pytest.approx(5.0)
    assert e["fixed_seconds"]["regional_mask"] == pytest.approx(0.0, abs=1e-9)
    assert e["roi_over_mask_from_one"] == pytest.approx(0.4)
    assert e["marginal_seconds_per_instance"]["regional_mask"] == pytest.approx(5.0)
    assert e["marginal_seconds_per_instance"]["roi"] > 2.0 + 0.4  # the jump from 0 to 1 instance leaks in


def test_agent_schedule_bound():
    """bench_agent's bound: attention half of a 100 s UNet, phases 40% / 60%, ToMe ratio 0.4 in phase 2:
    0.4 * 50 + 0.6 * (50 + 0.36 * 50) = 60.8 s, so at most 100 / 60.8; free attention alone gives 2x. The
    SD 1.5 layout has 5 full-resolution self-attention layers."""
    mod = _script("bench_agent")
    b = mod.schedule_bound(100.0, 10.0, 5)
    assert b["attention_share"] == pytest.approx(0.5)
    assert b["free_attention_bound"] == pytest.approx(2.0)
    assert b["schedule_bound"] == pytest.approx(100.0 / 60.8)
    assert mod.agent_layer_count(mod.sd15_unet()) == 5
