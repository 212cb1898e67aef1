"""apply / restore / registry / context on every zoo pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import diffattn
from diffattn import registry, zoo
from diffattn.processors import CoreAttnProcessor
from diffattn.processors.layout import dense_core


def _run(pipe, name, seed=0):
    kwargs = dict(zoo.default_call_kwargs(name))
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    out = pipe(**kwargs)
    arr = out.frames if hasattr(out, "frames") else out.images
    return np.asarray(arr)


def _processors(pipe):
    procs = {}
    for comp, model in diffattn.api.denoisers(pipe):
        for name, m in model.named_modules():
            if hasattr(m, "processor") and (hasattr(m, "set_processor") or hasattr(m, "to_q")):
                procs[f"{comp}.{name}"] = m.processor
    return procs


def _hook_counts(pipe):
    return {comp: len(m._forward_pre_hooks) for comp, m in diffattn.api.denoisers(pipe)}


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, name):
    if name not in pipes:
        pipes[name] = zoo.load(name)
    return pipes[name]


@pytest.mark.parametrize("name", zoo.names())
def test_apply_dense_matches_and_restore_is_bit_identical(pipes, name):
    pipe = _pipe(pipes, name)
    base = _run(pipe, name)
    before = _processors(pipe)
    hooks = _hook_counts(pipe)
    patch = diffattn.apply(pipe, "dense")
    assert patch.layers, "dense must patch at least one layer"
    assert any(isinstance(p, CoreAttnProcessor) for p in _processors(pipe).values())
    dense = _run(pipe, name)
    # diffattn's processors reproduce the stock ones (fp32; reordered sums only)
    np.testing.assert_allclose(dense, base, atol=2e-4, rtol=0)
    diffattn.restore(pipe)
    after = _processors(pipe)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "restore must put back the very same processor objects"
    assert _hook_counts(pipe) == hooks
    assert np.array_equal(_run(pipe, name), base)


def test_context_manager_and_double_apply(pipes):
    pipe = _pipe(pipes, "sd")
    before = _processors(pipe)
    with diffattn.apply(pipe, "dense") as patch:
        assert diffattn.applied(pipe) == [patch]
        with pytest.raises(ValueError, match="already applied"):
            diffattn.apply(pipe, "dense")
    assert diffattn.applied(pipe) == []
    assert all(_processors(pipe)[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="no diffattn method is applied"):
        diffattn.restore(pipe)


def test_suspended_patch_runs_the_stock_processors_and_comes_back(pipes):
    pipe = _pipe(pipes, "sd")
    before = _processors(pipe)
    base = _run(pipe, "sd")
    with diffattn.apply(pipe, "agent") as patch:
        patched = _processors(pipe)
        sparse = _run(pipe, "sd")
        with patch.suspended():
            assert all(_processors(pipe)[k] is v for k, v in before.items())
            assert np.array_equal(_run(pipe, "sd"), base)  # the intact check does not fire while suspended
            with pytest.raises(RuntimeError, match="cannot be suspended: it is suspended"):
                with patch.suspended():
                    pass
        assert all(_processors(pipe)[k] is v for k, v in patched.items())
        assert np.array_equal(_run(pipe, "sd"), sparse) and not np.array_equal(sparse, base)
        with patch.suspended():
            patch.remove()  # removing inside the block leaves the stock processors in place
    assert all(_processors(pipe)[k] is v for k, v in before.items()) and not diffattn.applied(pipe)
    with pytest.raises(RuntimeError, match="cannot be suspended: it is removed"):
        with patch.suspended():
            pass


def test_bad_method_and_options(pipes):
    pipe = _pipe(pipes, "sd")
    before = _processors(pipe)
    with pytest.raises(ValueError, match="available methods: .*dense"):
        diffattn.apply(pipe, "radiall")
    with pytest.raises(TypeError, match="valid options"):
        diffattn.apply(pipe, "dense", decay_factor=0.2)
    with pytest.raises(ValueError, match="no attention processors"):
        diffattn.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(TypeError, match="pipeline or a torch.nn.Module"):
        diffattn.apply("not a model", "dense")
    assert diffattn.applied(pipe) == []
    assert all(_processors(pipe)[k] is v for k, v in before.items())


@dataclass(frozen=True)
class _RecordConfig:
    family: str = "wan"


def _recording_method(name: str, families: tuple[str, ...], log: list):
    def make(config, ctx, layer):
        def core(q, k, v, layout, mask):
            log.append(
                {
                    "layer": layer.name,
                    "module_id": id(layer.module),
                    "model": layer.model,
                    "step": ctx.step_index,
                    "num_steps": ctx.num_steps,
                    "fraction": ctx.step_fraction,
                    "grid": ctx.grid,
                    "n_text": ctx.n_text,
                    "text_position": ctx.text_position,
                    "visual": layout.n_visual(q.shape[2]),
                    "layout": layout,
                }
            )
            return dense_core(q, k, v, layout, mask)

        return CoreAttnProcessor(core=core, family=layer.family)

    if name not in registry._METHODS:
        registry.register(registry.Method(name, _RecordConfig, families, make, models=("TestModel",)))


def test_unsupported_model_leaves_pipeline_untouched(pipes):
    _recording_method("_test_wan_only", ("wan",), [])
    pipe = _pipe(pipes, "sd")
    before = _processors(pipe)
    with pytest.raises(ValueError, match="does not support .*UNet2DConditionModel.*TestModel"):
        diffattn.apply(pipe, "_test_wan_only")
    assert diffattn.applied(pipe) == []
    assert all(_processors(pipe)[k] is v for k, v in before.items())


def test_fused_projections_error(pipes):
    pipe = zoo.load("sd")
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        diffattn.apply(pipe, "dense")
    assert diffattn.applied(pipe) == []


@pytest.mark.parametrize(
    "name,calls_per_step",
    [("wan", 2), ("wan22", 2), ("flux", 1), ("sd", 2), ("cogvideox", 2), ("hunyuan-video", 1), ("mochi", 2)],
)
def test_context_step_comes_from_scheduler(pipes, name, calls_per_step):
    """Step index follows the scheduler: CFG calls share a step; Wan 2.2 switches models mid-call."""
    log: list = []
    method = f"_test_record_{name}"
    from diffattn.processors.families import FAMILIES

    _recording_method(method, tuple(FAMILIES), log)
    pipe = _pipe(pipes, name)
    kwargs = dict(zoo.default_call_kwargs(name))
    with diffattn.apply(pipe, method) as patch:
        pipe(**kwargs)
        ctx = patch.context
    steps = kwargs["num_inference_steps"]
    seen = sorted({e["step"] for e in log})
    assert seen == list(range(steps)), seen
    assert all(e["num_steps"] == steps for e in log)
    assert all(e["fraction"] == e["step"] / steps for e in log)
    assert ctx.grid is not None
    if name == "wan22":
        # the high-noise step runs `transformer`, the low-noise one `transformer_2`; the step index
        # still counts the scheduler's steps, not calls of either model
        modules_by_step = {}
        for e in log:
            modules_by_step.setdefault(e["step"], set()).add(e["module_id"])
        assert not (modules_by_step[0] & modules_by_step[1])
        assert diffattn.applied(pipe) == []


@pytest.mark.parametrize(
    "name,position",
    [("flux", "first"), ("cogvideox", "first"), ("sd3", "last"), ("hunyuan-video", "last"), ("mochi", "last")],
)
def test_context_text_layout(pipes, name, position):
    log: list = []
    method = f"_test_layout_{name}"
    from diffattn.processors.families import FAMILIES

    _recording_method(method, tuple(FAMILIES), log)
    pipe = _pipe(pipes, name)
    with diffattn.apply(pipe, method):
        pipe(**zoo.default_call_kwargs(name))
    # (HunyuanVideo's token refiner attends over text only: no visual tokens, not a joint layer)
    joint = [e for e in log if e["layout"].n_text > 0 and not e["layout"].is_cross and e["visual"] > 0]
    assert joint, "the model attends jointly over text and visual tokens"
    f, h, w = joint[0]["grid"]
    for e in joint:
        assert e["text_position"] == position
        assert e["layout"].text_position == position
        # visual tokens in every joint layer are exactly the recorded grid
        assert e["visual"] == f * h * w


def test_context_grid_for_unet_levels(pipes):
    log: list = []
    from diffattn.processors.families import FAMILIES

    _recording_method("_test_grid_sd", tuple(FAMILIES), log)
    pipe = _pipe(pipes, "sd")
    with diffattn.apply(pipe, "_test_grid_sd") as patch:
        pipe(**zoo.default_call_kwargs("sd"))
        ctx = patch.context
    f, h, w = ctx.grid
    assert f == 1
    sizes = {e["visual"] for e in log if not e["layout"].is_cross}
    assert h * w in sizes and len(sizes) >= 2  # several UNet levels
    for n in sizes:
        gf, gh, gw = ctx.grid_for(n)
        assert gf * gh * gw == n
    with pytest.raises(ValueError, match="match no downsampling"):
        ctx.grid_for(7)


def test_bare_model_apply_records_grid_without_step(pipes):
    log: list = []
    from diffattn.processors.families import FAMILIES

    _recording_method("_test_bare", tuple(FAMILIES), log)
    pipe = _pipe(pipes, "wan")
    model = pipe.transformer
    with diffattn.apply(model, "_test_bare") as patch:
        x = torch.randn(1, model.config.in_channels, 3, 16, 16)
        enc = torch.randn(1, 8, model.config.text_dim)
        model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=enc)
        pt, ph, pw = model.config.patch_size
        assert patch.context.grid == (3 // pt, 16 // ph, 16 // pw)
        assert patch.context.step_index is None


def test_user_hooks_survive_restore(pipes):
    pipe = _pipe(pipes, "flux")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        diffattn.apply(pipe, "dense")
        diffattn.restore(pipe)
        pipe(**zoo.default_call_kwargs("flux"))
        assert calls, "a hook the user installed must stay"
    finally:
        handle.remove()


def test_coexists_with_attention_backend(pipes):
    """diffusers' own backend selection stays on the restored processors (they are the same objects)."""
    pipe = zoo.load("wan")
    pipe.transformer.set_attention_backend("native")
    base = _run(pipe, "wan")
    backends = {k: getattr(p, "_attention_backend", None) for k, p in _processors(pipe).items()}
    assert any(b is not None for b in backends.values())
    with diffattn.apply(pipe, "dense"):
        np.testing.assert_allclose(_run(pipe, "wan"), base, atol=2e-4, rtol=0)
    assert {k: getattr(p, "_attention_backend", None) for k, p in _processors(pipe).items()} == backends
    assert np.array_equal(_run(pipe, "wan"), base)
