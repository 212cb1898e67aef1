"""Every method x diffusers' own features (issue 27, item 2): each cell of ``EXPECT`` is a test.

A cell is one of

* ``works``: the feature runs with the method applied; the output is the method's own output within the
  cell's stated tolerance (exactly equal where the feature is exact), the method's processors stay in place,
  and ``diffattn.restore`` afterwards gives the stock output with the feature, bit for bit;
* ``refused``: a clear error (the message is checked);
* ``n/a``: the feature does not exist for the method's models (the reason is checked, e.g. the model has
  no ``enable_cache``).

``docs/composition.md`` mirrors ``EXPECT`` (``test_docs_table_mirrors_expect`` checks it). The inductor
compile cells are ``slow`` (``python -m pytest -q -m slow tests/test_composition_matrix.py``); the fast part
compiles once with dynamo's ``eager`` backend, which checks tracing and recompiles without code generation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import diffattn
from diffattn import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

W, R, NA = "works", "refused", "n/a"
CACHES = ("first_block_cache", "taylorseer_cache", "pyramid_attention_broadcast", "faster_cache", "mag_cache")
FEATURES = (
    *CACHES,
    "compile",
    "compile_repeated_blocks",
    "group_offload",
    "model_cpu_offload",
    "lora",
    "attention_backend_before",
    "attention_backend_after",
    "layerwise_casting",
    "save_pretrained",
)
METHODS = ("dense", "agent", "radial", "hilbert_local", "lamamba", "roi", "regional_mask")


@dataclass(frozen=True)
class Cell:
    """One (method, feature) outcome: ``W`` on ``model``, ``R`` with an error matching ``why``, or ``NA`` with
    ``why``. ``tol``: the stated tolerance against the method alone (``0`` = exactly equal; for the approximate
    features, caches and fp8 casting, how much more than the stock model's own change the method may move)."""

    outcome: str
    model: str | None = None
    why: str = ""
    tol: float = 0.0


_UNET_NO_CACHE = "UNet2DConditionModel has no cache support in diffusers (not a CacheMixin)"
_FASTER_STOCK_FAILS = (
    "diffusers' FasterCache fails on the stock model of every family this method supports (Flux: guidance-"
    "distilled, no cached attention state; Wan: cond / uncond run as two calls, FasterCache wants them batched)"
)


def _row(model: str, cache_model: str | None, faster_model: str | None, na_cache: str = "", **over: Cell) -> dict:
    """A method's row: its model per feature; ``over`` replaces single cells."""
    row: dict[str, Cell] = {}
    for f in CACHES:
        m = faster_model if f == "faster_cache" else cache_model
        why = _FASTER_STOCK_FAILS if (f == "faster_cache" and cache_model) else na_cache
        row[f] = Cell(W, m, tol=2.0) if m else Cell(NA, why=why)
    row["compile"] = Cell(W, model, tol=1e-4)
    row["compile_repeated_blocks"] = Cell(W, model, tol=1e-4)
    row["group_offload"] = Cell(W, model)
    row["model_cpu_offload"] = Cell(W, model)
    row["lora"] = Cell(W, model, tol=1e-4)
    row["attention_backend_before"] = Cell(W, model, tol=2e-5)
    row["attention_backend_after"] = Cell(W, model, tol=2e-5)
    row["layerwise_casting"] = Cell(W, model, tol=1e-5)
    row["save_pretrained"] = Cell(W, model)
    row.update(over)
    return row


# The expectation table; docs/composition.md mirrors it.
EXPECT: dict[str, dict[str, Cell]] = {
    "dense": _row("wan", "wan", "cogvideox"),
    "agent": _row("sd", "wan", None),
    "radial": _row("wan", "wan", "cogvideox"),
    "hilbert_local": _row("flux", "flux", None),
    "lamamba": _row("flux", "flux", None),
    "roi": _row("sd", None, None, na_cache=_UNET_NO_CACHE),
    "regional_mask": _row("sd", None, None, na_cache=_UNET_NO_CACHE),
}

# --------------------------------------------------------------------------------------------- set-up


BOXES = [[0.0, 0.0, 0.5, 0.5], [0.4, 0.3, 1.0, 0.9]]


def _instances(unet, batch: int = 2):
    from diffattn.processors import RegionInstances

    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor(BOXES).expand(batch, -1, -1).clone()
    return RegionInstances(boxes, torch.randn(batch, len(BOXES), 5, unet.config.cross_attention_dim, generator=g))


def _options(method: str, model: str, pipe) -> dict:
    """Options that make each method really change the output at the zoo sizes used here."""
    if method == "agent":
        return {} if model in ("sd", "sdxl") else {"num_agents": 1, "agent_frames": 1} if model == "wan" else {"num_agents": 4}
    if method == "radial":
        return {"decay_factor": 0.2, "block_size": 2, "backend": "gather"}
    if method == "hilbert_local":
        return {"radius": 1, "block_size": 4, "backend": "gather"}
    if method == "lamamba":
        return {"window_size": 2}
    if method == "roi":
        from diffattn.models import ROICtrlAdapter

        adapter = ROICtrlAdapter.from_unet(pipe.unet, roi_sizes=(5, 4, 3))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        return {"adapter": adapter, "instances": _instances(pipe.unet)}
    if method == "regional_mask":
        return {"instances": _instances(pipe.unet)}
    return {}


def _after_apply(method: str, patch) -> None:
    if method == "lamamba":  # a live SS2D branch, as after training (its gate starts at zero)
        with torch.no_grad():
            for *_, new in patch.saved:
                new.gate.fill_(0.5)


def _kwargs(model: str, steps: int = 2) -> dict:
    kw = zoo.default_call_kwargs(model)
    kw.update(output_type="latent", num_inference_steps=steps)  # latents: what attention changes
    if model in ("wan", "cogvideox"):
        kw.update(height=64, width=64, num_frames=17)  # 5 latent frames: radial's mask is really sparse
    return kw


def _run(pipe, model: str, steps: int = 2) -> np.ndarray:
    out = pipe(**_kwargs(model, steps))
    out = out.frames if hasattr(out, "frames") else out.images
    return (out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)).astype(np.float32)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


class Applied:
    """``diffattn.apply`` with the cell's options, remembering what to compare against."""

    def __init__(self, method: str, model: str, pipe) -> None:
        self.method, self.model, self.pipe = method, model, pipe
        self.options = _options(method, model, pipe)
        self.lamamba_state: dict | None = None

    def on(self, pipe) -> Applied:
        """The same method, options and added weights on another copy of the pipeline."""
        other = Applied.__new__(Applied)
        other.__dict__.update(self.__dict__, pipe=pipe)
        return other

    def apply(self):
        patch = diffattn.apply(self.pipe, self.method, **self.options)
        if self.lamamba_state is None:
            _after_apply(self.method, patch)
            if self.method == "lamamba":
                self.lamamba_state = {i: new.state_dict() for i, (_, _, _, _, new) in enumerate(patch.saved)}
        else:  # the same added weights every time
            for i, (_, _, _, _, new) in enumerate(patch.saved):
                new.load_state_dict(self.lamamba_state[i])
        return patch


def _method_processors_in_place(patch) -> None:
    assert patch.active and patch.layers and patch.replaced == []


def _check_restore(pipe, model, reference, steps=2, atol=0.0):
    diffattn.restore(pipe)
    assert diffattn.applied(pipe) == []
    out = _run(pipe, model, steps)
    if atol == 0:
        np.testing.assert_array_equal(out, reference)
    else:
        np.testing.assert_allclose(out, reference, atol=atol, rtol=0)


def _cells(*features: str, outcome: str | None = None):
    return [
        pytest.param(m, f, id=f"{m}-{f}")
        for f in features
        for m in METHODS
        if outcome is None or EXPECT[m][f].outcome == outcome
    ]


# --------------------------------------------------------------------------------------------- the table


def test_every_cell_is_decided():
    for m in METHODS:
        assert set(EXPECT[m]) == set(FEATURES), m
        for f, cell in EXPECT[m].items():
            assert cell.outcome in (W, R, NA), (m, f)
            assert (cell.model is not None) == (cell.outcome == W), (m, f)
            assert cell.outcome == W or cell.why, (m, f)
            if cell.model:
                assert set(diffattn.registry.get(m).families) & _families(cell.model), f"{m} does not support {cell.model}"


@functools.cache
def _families(model: str) -> frozenset:
    from diffattn.processors.families import family_of_processor

    return frozenset(
        family_of_processor(mod.processor) for mod in _denoiser(zoo.load(model)).modules() if hasattr(mod, "processor")
    )


def _docs_table() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "composition.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    header = next(ln for ln in text.splitlines() if ln.startswith("| method |"))
    cols = [c.strip() for c in header.strip("|").split("|")][1:]
    table = {}
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(cols, cells[1:], strict=True))
    return table


DOC_COLUMNS = {
    "first_block_cache": "first-block cache",
    "taylorseer_cache": "TaylorSeer",
    "pyramid_attention_broadcast": "PAB",
    "faster_cache": "FasterCache",
    "mag_cache": "MagCache",
    "compile": "compile",
    "compile_repeated_blocks": "compile blocks",
    "group_offload": "group offload",
    "model_cpu_offload": "model CPU offload",
    "lora": "LoRA",
    "attention_backend_before": "backend before",
    "attention_backend_after": "backend after",
    "layerwise_casting": "layerwise casting",
    "save_pretrained": "save / load",
}


def test_docs_table_mirrors_expect():
    table = _docs_table()
    assert set(table) == set(METHODS)
    for m in METHODS:
        for f, col in DOC_COLUMNS.items():
            cell = EXPECT[m][f]
            shown = table[m][col]
            word = {W: "works", R: "refused", NA: "n/a"}[cell.outcome]
            assert shown.startswith(word), (m, f, shown)
            if cell.model:
                assert f"({cell.model})" in shown, (m, f, shown)


# --------------------------------------------------------------------------------------------- caches


def _cache_config(feature: str, pipe, steps: int):
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    timestep = lambda: pipe.current_timestep  # noqa: E731
    if feature == "first_block_cache":
        return FirstBlockCacheConfig(threshold=1.0)
    if feature == "taylorseer_cache":
        return TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=1,
            taylor_factors_dtype=torch.float32,
            # diffusers' default patterns (`^blocks.*attn`, full match) miss Wan's `blocks.0.attn1`
            cache_identifiers=[r"(single_)?(transformer_)?blocks\.\d+\.attn\d?"],
        )
    if feature == "pyramid_attention_broadcast":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        )
    if feature == "faster_cache":
        distilled = not hasattr(pipe, "negative_prompt_embeds") and type(pipe).__name__.startswith("Flux")
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            unconditional_batch_skip_range=2,
            unconditional_batch_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=distilled,
            tensor_format="BFCHW" if "CogVideoX" in type(pipe).__name__ else "BCHW",
        )
    if feature == "mag_cache":
        return MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps, threshold=0.5)
    raise AssertionError(feature)


CACHE_STEPS = 6


@pytest.mark.parametrize("method,feature", _cells(*CACHES, outcome=W))
def test_cache_hook(method, feature):
    cell = EXPECT[method][feature]
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    a = Applied(method, cell.model, pipe)
    stock = _run(pipe, cell.model, CACHE_STEPS)
    with a.apply():
        alone = _run(pipe, cell.model, CACHE_STEPS)
    assert np.abs(alone - stock).max() > 1e-4 or method == "dense", "the method must change the output"
    model.enable_cache(_cache_config(feature, pipe, CACHE_STEPS))
    stock_cached = _run(pipe, cell.model, CACHE_STEPS)
    stock_err = np.abs(stock_cached - stock).max()
    assert stock_err > 0, "the cache must skip some work at this size"
    patch = a.apply()
    cached = _run(pipe, cell.model, CACHE_STEPS)
    _method_processors_in_place(patch)
    err = np.abs(cached - alone).max()
    # the cache moves the method's output about as much as it moves the stock model's
    assert err <= (1 + cell.tol) * stock_err + 1e-4, (err, stock_err)
    if method != "dense":
        assert np.abs(cached - stock_cached).max() > 1e-4, "the method must still act under the cache"
    _check_restore(pipe, cell.model, stock_cached, CACHE_STEPS)
    model.disable_cache()
    np.testing.assert_array_equal(_run(pipe, cell.model, CACHE_STEPS), stock)


def test_radial_with_a_lora_and_a_cache_together(tmp_path):
    """Three at once on Wan: a LoRA loaded through diffusers, radial applied, the first-block cache on; the
    cache moves the result about as much as it moves the LoRA model alone, and restore is exact."""
    cell = EXPECT["radial"]["first_block_cache"]
    folder = _write_lora(cell.model, tmp_path)
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    pipe.load_lora_weights(folder, adapter_name="a")
    a = Applied("radial", cell.model, pipe)
    stock = _run(pipe, cell.model, CACHE_STEPS)  # stock attention + the LoRA
    with a.apply():
        alone = _run(pipe, cell.model, CACHE_STEPS)  # radial + the LoRA
    assert np.abs(alone - stock).max() > 1e-4, "radial must act"
    model.enable_cache(_cache_config("first_block_cache", pipe, CACHE_STEPS))
    stock_cached = _run(pipe, cell.model, CACHE_STEPS)
    stock_err = np.abs(stock_cached - stock).max()
    assert stock_err > 0, "the cache must skip some work at this size"
    patch = a.apply()
    cached = _run(pipe, cell.model, CACHE_STEPS)
    _method_processors_in_place(patch)
    assert np.abs(cached - alone).max() <= (1 + cell.tol) * stock_err + 1e-4
    assert np.abs(cached - stock_cached).max() > 1e-4, "radial must still act under the cache and the LoRA"
    _check_restore(pipe, cell.model, stock_cached, CACHE_STEPS)
    model.disable_cache()
    np.testing.assert_array_equal(_run(pipe, cell.model, CACHE_STEPS), stock)


@pytest.mark.parametrize("model", ["sd", "sdxl", "sd3", "pixart"])
def test_cache_not_applicable_models(model):
    """The UNets, SD3 and PixArt have no cache support in diffusers: those cells are "not applicable"."""
    from diffusers.models.cache_utils import CacheMixin

    assert not isinstance(_denoiser(zoo.load(model)), CacheMixin)
    for m in METHODS:
        cell_models = {EXPECT[m][f].model for f in CACHES}
        assert model not in cell_models


@pytest.mark.parametrize("method,feature", _cells(*CACHES, outcome=NA))
def test_cache_not_applicable_cells(method, feature):
    cell = EXPECT[method][feature]
    from diffusers.models.cache_utils import CacheMixin

    spec = diffattn.registry.get(method)
    if cell.why == _FASTER_STOCK_FAILS:
        # the method's cache-capable models: FasterCache fails on the stock model already
        for model in ("flux", "wan"):
            pipe = zoo.load(model)
            _denoiser(pipe).enable_cache(_cache_config(feature, pipe, CACHE_STEPS))
            with pytest.raises((TypeError, IndexError)):
                _run(pipe, model, CACHE_STEPS)
        assert {"hunyuan-video", "mochi", "cogvideox"}.isdisjoint(spec.families)
        return
    assert set(spec.models) <= {"UNet2DConditionModel"} and not isinstance(_denoiser(zoo.load("sd")), CacheMixin)
    assert "no cache support" in cell.why


# --------------------------------------------------------------------------------------------- compile


def _compile_counts():
    from torch._dynamo.utils import counters

    return dict(counters["stats"]), dict(counters["frames"])


def _check_compile(method: str, feature: str, backend: str):
    cell = EXPECT[method][feature]
    torch._dynamo.reset()
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    a = Applied(method, cell.model, pipe)
    with a.apply():
        alone = _run(pipe, cell.model)
    if feature == "compile":
        model.compile(backend=backend)
    else:
        assert getattr(model, "_repeated_blocks", None), f"{type(model).__name__} declares no repeated blocks"
        model.compile_repeated_blocks(backend=backend)
    stock_compiled = _run(pipe, cell.model)
    patch = a.apply()
    first = _run(pipe, cell.model)
    before = _compile_counts()
    assert before[0].get("unique_graphs", 0) > 0, "nothing was compiled"
    second = _run(pipe, cell.model)
    assert _compile_counts() == before, "a second full generation recompiled"
    _method_processors_in_place(patch)
    # inductor's kernels round differently from eager, and a graph compiled again after restore (or with
    # shapes dynamo has since marked dynamic) may too: exact with the eager backend, `tol` with inductor
    tol = 0.0 if backend == "eager" else cell.tol
    # compiled vs eager: inductor's fused fp32 kernels round in proportion to the values (SD's UNet: 1.2e-4
    # at 2.3, a relative 5e-5), so that comparison also allows a relative 1e-4
    np.testing.assert_allclose(first, alone, atol=tol, rtol=0.0 if backend == "eager" else 1e-4)
    np.testing.assert_allclose(second, first, atol=tol, rtol=0)
    _check_restore(pipe, cell.model, stock_compiled, atol=tol)
    torch._dynamo.reset()


def test_compile_eager_backend_fast():
    """The fast part: dynamo traces radial's processors on Wan (whole model) with no recompile."""
    _check_compile("radial", "compile", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("method,feature", _cells("compile", "compile_repeated_blocks", outcome=W))
def test_compile_inductor(method, feature):
    _check_compile(method, feature, "inductor")


# --------------------------------------------------------------------------------------------- offloading


@pytest.mark.parametrize("method", METHODS)
def test_group_offload(method):
    cell = EXPECT[method]["group_offload"]
    pipe = zoo.load(cell.model)
    a = Applied(method, cell.model, pipe)
    stock = _run(pipe, cell.model)
    with a.apply():
        alone = _run(pipe, cell.model)
    # CPU to CPU (this machine has no accelerator; streams need one): the hooks, not the transfers
    _denoiser(pipe).enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1,
    )
    np.testing.assert_array_equal(_run(pipe, cell.model), stock)
    patch = a.apply()
    np.testing.assert_array_equal(_run(pipe, cell.model), alone)
    _method_processors_in_place(patch)
    _check_restore(pipe, cell.model, stock)


@pytest.mark.parametrize("method", METHODS)
def test_model_cpu_offload(method):
    cell = EXPECT[method]["model_cpu_offload"]
    pipe = zoo.load(cell.model)
    a = Applied(method, cell.model, pipe)
    stock = _run(pipe, cell.model)
    with a.apply():
        alone = _run(pipe, cell.model)
    if not torch.accelerator.is_available():
        with pytest.raises(RuntimeError, match="requires accelerator"):
            pipe.enable_model_cpu_offload()
        pipe.enable_model_cpu_offload(device="cpu")  # the offload hooks with CPU as the execution device
    else:  # pragma: no cover - not on this machine
        pipe.enable_model_cpu_offload()
    patch = a.apply()
    np.testing.assert_array_equal(_run(pipe, cell.model), alone)
    _method_processors_in_place(patch)
    _check_restore(pipe, cell.model, stock)


# --------------------------------------------------------------------------------------------- LoRA


def _write_lora(model_name: str, folder: Path) -> Path:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = zoo.load(model_name, seed=1)
    den = _denoiser(source)
    den.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    comp = "unet" if hasattr(source, "unet") else "transformer"
    type(source).save_lora_weights(folder, **{f"{comp}_lora_layers": get_peft_model_state_dict(den)})
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_lora(method, tmp_path):
    cell = EXPECT[method]["lora"]
    folder = _write_lora(cell.model, tmp_path)
    pipe = zoo.load(cell.model)
    a = Applied(method, cell.model, pipe)
    with a.apply():
        alone = _run(pipe, cell.model)
    pipe.load_lora_weights(folder, adapter_name="a")
    pipe.set_adapters(["a"], [0.7])
    stock_lora = _run(pipe, cell.model)
    patch = a.apply()
    with_lora = _run(pipe, cell.model)
    _method_processors_in_place(patch)
    assert np.abs(with_lora - alone).max() > 1e-4, "the LoRA must act"
    assert method == "dense" or np.abs(with_lora - stock_lora).max() > 1e-4, "the method must act"
    pipe.disable_lora()
    np.testing.assert_array_equal(_run(pipe, cell.model), alone)  # exact: the adapters are bypassed
    pipe.enable_lora()
    np.testing.assert_array_equal(_run(pipe, cell.model), with_lora)
    _check_restore(pipe, cell.model, stock_lora)
    # LoRA loaded after apply: the same output
    patch = a.apply()
    pipe.set_adapters(["a"], [0.7])
    np.testing.assert_array_equal(_run(pipe, cell.model), with_lora)
    pipe.fuse_lora(adapter_names=["a"], lora_scale=1.0)
    fused = _run(pipe, cell.model)
    np.testing.assert_allclose(fused, with_lora, atol=cell.tol, rtol=0)
    pipe.unfuse_lora()
    np.testing.assert_allclose(_run(pipe, cell.model), with_lora, atol=cell.tol, rtol=0)
    _method_processors_in_place(patch)
    # unfusing subtracts the delta again (rounding): restore is compared to the stock model as it is now
    _check_restore(pipe, cell.model, stock_lora, atol=cell.tol)


# --------------------------------------------------------------------------------------------- attention backend


@pytest.fixture
def backend_spy(monkeypatch):
    """Counts calls of diffusers' ``_native_math`` backend, per attention layer; resets the global backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    original = _AttentionBackendRegistry._backends[name]
    calls: list[str | None] = []
    current: list[str | None] = [None]

    def spy(*args, **kwargs):
        calls.append(current[0])
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    active = _AttentionBackendRegistry._active_backend
    yield calls, current
    _AttentionBackendRegistry.set_active_backend(active)


def _track_layers(model, current) -> list:
    handles = []
    for name, m in model.named_modules():
        if hasattr(m, "processor") and (hasattr(m, "set_processor") or hasattr(m, "to_q")):
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: current.__setitem__(0, n)))
    return handles


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("method", METHODS)
def test_attention_backend(method, order, backend_spy):
    """``set_attention_backend`` before or after apply: the dense layers run the user's backend, the method's
    layers keep the method; restore gives the stock model under that backend (the global setting stays)."""
    calls, current = backend_spy
    cell = EXPECT[method][f"attention_backend_{order}"]
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    a = Applied(method, cell.model, pipe)
    with a.apply():
        alone = _run(pipe, cell.model)
    _track_layers(model, current)
    if order == "before":
        model.set_attention_backend("_native_math")
        stock_math = _run(pipe, cell.model)
        patch = a.apply()
    else:
        patch = a.apply()
        model.set_attention_backend("_native_math")
    calls.clear()
    out = _run(pipe, cell.model)
    _method_processors_in_place(patch)
    np.testing.assert_allclose(out, alone, atol=cell.tol, rtol=0)
    hit = set(calls)
    method_layers = {n for _, n, _, _, _ in patch.saved}
    if method == "dense":
        # diffattn's dense processor dispatches through the user's backend on every layer
        assert method_layers <= hit, sorted(method_layers - hit)[:3]
    else:
        # the stock layers the method left alone dispatch through it when their processor does
        left = {n for n, m in model.named_modules() if n not in method_layers and hasattr(m, "processor")
                and hasattr(m.processor, "_attention_backend") and not n.endswith(".processor")}
        assert left <= hit, sorted(left - hit)[:3]
    diffattn.restore(pipe)
    after = _run(pipe, cell.model)
    if order == "before":
        np.testing.assert_array_equal(after, stock_math)
    else:
        model.set_attention_backend("_native_math")  # the stock processors' own attribute too
        np.testing.assert_array_equal(_run(pipe, cell.model), after)


# --------------------------------------------------------------------------------------------- layerwise casting


@pytest.mark.parametrize("method", METHODS)
def test_layerwise_casting(method):
    """float8 storage, float32 compute: the method's output equals the method on a copy of the model whose
    weights are the float8-rounded ones (what the casting hooks compute with)."""
    cell = EXPECT[method]["layerwise_casting"]
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    a = Applied(method, cell.model, pipe)
    with a.apply():
        _run(pipe, cell.model)  # fixes lamamba's added weights (shared with the reference below)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stock_cast = _run(pipe, cell.model)
    rounded = zoo.load(cell.model)
    params = dict(_denoiser(rounded).named_parameters())
    cast = [n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn]
    assert cast, "nothing is stored in float8"
    for n in cast:
        params[n].data = dict(model.named_parameters())[n].data.to(torch.float32)
    np.testing.assert_allclose(_run(rounded, cell.model), stock_cast, atol=cell.tol, rtol=0)
    with a.on(rounded).apply():
        reference = _run(rounded, cell.model)
    patch = a.apply()
    out = _run(pipe, cell.model)
    _method_processors_in_place(patch)
    np.testing.assert_allclose(out, reference, atol=cell.tol, rtol=0)
    if method != "dense":
        assert np.abs(out - stock_cast).max() > 1e-4, "the method must act"
    _check_restore(pipe, cell.model, stock_cast)


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_saves_the_stock_model(method, tmp_path, caplog):
    from diffusers import DiffusionPipeline

    cell = EXPECT[method]["save_pretrained"]
    pipe = zoo.load(cell.model)
    model = _denoiser(pipe)
    stock_keys = set(model.state_dict())
    a = Applied(method, cell.model, pipe)
    stock = _run(pipe, cell.model)
    patch = a.apply()
    alone = _run(pipe, cell.model)
    added = set(model.state_dict()) - stock_keys
    assert bool(added) == (method == "lamamba")  # only lamamba's processors hold parameters
    if added:
        with pytest.warns(UserWarning, match=r"lamamba.*left out"):
            pipe.save_pretrained(tmp_path)
    else:
        pipe.save_pretrained(tmp_path)
    _method_processors_in_place(patch)
    np.testing.assert_array_equal(_run(pipe, cell.model), alone)  # saving changed nothing
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert diffattn.applied(loaded) == []
    assert set(_denoiser(loaded).state_dict()) == stock_keys
    np.testing.assert_array_equal(_run(loaded, cell.model), stock)
    _check_restore(pipe, cell.model, stock)
