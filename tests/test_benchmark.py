"""The timing helpers every benchmark uses."""


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
