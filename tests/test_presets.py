"""Per-layer settings (``diffattn.apply(..., layers=...)``) and calibration presets (issue 28, items 2-3):
exactly the named layers change, bad names and options are refused with nothing applied, a preset
round-trips bit-identically, is refused for another model config or method, bad files name the file and
the field, and the hub is stood in for by a local folder (no network)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import diffattn
from diffattn import presets, registry, zoo
from diffattn.cli import main
from diffattn.io import current_umask
from diffattn.presets import CalibrationPreset, PresetError

pytestmark = pytest.mark.usefixtures("one_thread")

W0, W1 = "WanTransformer3DModel.blocks.0.attn1", "WanTransformer3DModel.blocks.1.attn1"
# the tiny Wan has 4 tokens per frame: block size 2 and the exact token rule make radial really sparse;
# the gather backend needs no FlexAttention compile on CPU
BASE = {"decay_factor": 0.2, "block_size": 2, "granularity": "token", "backend": "gather"}


@pytest.fixture(scope="module")
def wan():
    return zoo.load("wan")


def _layers(pipe):
    from diffattn.api import _attention_layers, denoisers

    return {f"{type(m).__name__}.{n}": layer for _, m in denoisers(pipe) for n, layer in _attention_layers(m)}


def _run(pipe, name="wan"):
    """The output and the output of each Wan self-attention layer at its first call."""
    caps: dict[int, torch.Tensor] = {}
    blocks = pipe.transformer.blocks
    hooks = [b.attn1.register_forward_hook(lambda m, a, o, i=i: caps.setdefault(i, o.detach().clone()))
             for i, b in enumerate(blocks)]
    try:
        out = pipe(**zoo.default_call_kwargs(name)).frames
    finally:
        for h in hooks:
            h.remove()
    return torch.as_tensor(np.asarray(out)), caps


@pytest.fixture(scope="module")
def outputs(wan):
    """Stock and plain-radial runs, shared by the output tests."""
    stock = _run(wan)
    with diffattn.apply(wan, "radial", **BASE):
        plain = _run(wan)
    return stock, plain


# ----- per-layer settings ------------------------------------------------------------------------------

CASES = [  # model, method, base options, per-layer options of the second layer
    ("wan", "radial", BASE, {"decay_factor": 0.5}),
    ("flux", "hilbert_local", {"radius": 2}, {"radius": 3, "lr_mode": "all"}),
    ("sd", "agent", {"ratio": 0.3}, {"ratio": 0.1, "agent_ratio": 0.2}),
]


@pytest.mark.parametrize(("model", "method", "base", "own"), CASES, ids=[c[1] for c in CASES])
def test_per_layer_settings_change_exactly_the_named_layers(model, method, base, own):
    pipe = zoo.load(model)
    stock = {name: layer.processor for name, layer in _layers(pipe).items()}
    with diffattn.apply(pipe, method, **base) as plain:
        names = plain.layers
        plain_configs = {n: _layers(pipe)[n].processor.config for n in names}
    dense, target = names[0], names[1]
    spec = registry.get(method)
    with diffattn.apply(pipe, method, **base, layers={target: own, dense: "dense"}) as patch:
        layers = _layers(pipe)
        assert patch.layers == [n for n in names if n != dense]
        assert layers[dense].processor is stock[dense]  # the stock processor object itself
        assert layers[target].processor.config == spec.build_config({**base, **own}) != plain_configs[target]
        for n in names[2:]:
            assert layers[n].processor.config == plain_configs[n]
        assert f"{dense}  dense: per-layer setting" in patch.summary()
        assert "1 per-layer setting" in patch.headline()
        assert patch.options == base and patch.layer_settings == {target: own, dense: "dense"}
    assert {n: layer.processor for n, layer in _layers(pipe).items()} == stock


def test_per_layer_outputs(wan, outputs):
    (_, stock_caps), (plain_out, plain_caps) = outputs
    assert (plain_caps[0] - stock_caps[0]).abs().max() > 1e-3, "radial must be really sparse here"
    # every layer named, each at the base setting: the plain apply, bit for bit
    with diffattn.apply(wan, "radial", **BASE, layers={W0: {}, W1: {"decay_factor": 0.2}}):
        out, _ = _run(wan)
    assert torch.equal(out, plain_out)
    # a dense layer runs the stock processor: its output equals the stock one (the first layer sees the same input)
    with diffattn.apply(wan, "radial", **BASE, layers={W0: "dense"}):
        out, caps = _run(wan)
    assert torch.equal(caps[0], stock_caps[0])
    assert not torch.equal(out, plain_out)
    # an option on the second layer: the first is untouched, the second changes
    with diffattn.apply(wan, "radial", **BASE, layers={W1: {"sink": False}}):
        _, caps = _run(wan)
    assert torch.equal(caps[0], plain_caps[0])
    assert not torch.equal(caps[1], plain_caps[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": {"WanTransformer3DModel.blocks.0.attn": "dense"}}, ValueError,
         r"'WanTransformer3DModel.blocks.0.attn': no attention layer of that name; close matches: \[.*blocks.0.attn1"),
        ({"layers": {"WanTransformer3DModel.blocks.0.attn2": {}}}, ValueError, r"does not change it \(cross-attention\)"),
        ({"layers": {"blocks.0.attn1": "dense"}}, ValueError, r"'blocks.0.attn1'.*close matches"),
        ({"layers": {W0: {"decay": 0.5}}}, TypeError, r"unknown option\(s\) \['decay'\].*layers\['Wan.*valid options: \['decay_factor'"),
        ({"layers": {W0: {"decay_factor": -1}}}, ValueError, r"layers\['WanTransformer3DModel.blocks.0.attn1'\].*decay_factor"),
        ({"layers": {W0: "sparse"}}, TypeError, r"options dict or 'dense'"),
        ({"layers": [W0]}, TypeError, r"layers must be a mapping"),
        ({"layers": {W0: {}}, "preset": "x.json"}, TypeError, r"preset= carries the options"),
    ],
)
def test_bad_per_layer_settings_refused_with_nothing_applied(wan, kwargs, error, match):
    before = {n: layer.processor for n, layer in _layers(wan).items()}
    with pytest.raises(error, match=match):
        diffattn.apply(wan, "radial", **BASE, **kwargs)
    assert diffattn.applied(wan) == []
    assert {n: layer.processor for n, layer in _layers(wan).items()} == before


def test_methods_without_per_layer_settings_refuse_them(wan):
    with pytest.raises(TypeError, match=r"'dense' takes no per-layer settings.*\['agent', 'hilbert_local', 'radial'\]"):
        diffattn.apply(wan, "dense", layers={W0: {}})
    assert diffattn.applied(wan) == []


# ----- presets --------------------------------------------------------------------------------------------


def test_preset_round_trip_bit_identical(wan, outputs, tmp_path):
    settings = {W0: "dense", W1: {"decay_factor": 0.5, "sink": False}}
    with diffattn.apply(wan, "radial", **BASE, layers=settings) as patch:
        by_hand, _ = _run(wan)
        preset = CalibrationPreset.from_patch(patch, target={"psnr": 30.0}, quality={"psnr": 31.5}, speed={"x": 1.2}, device="cpu")
    path = preset.save(tmp_path / "wan-radial.json")
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert [p.name for p in tmp_path.iterdir()] == ["wan-radial.json"], "no temp file left"
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["method"] == "radial" and data["layers"] == settings
    assert data["model_class"] == "WanTransformer3DModel" and len(data["config_hash"]) == 64
    loaded = presets.load(path)
    assert loaded == preset and loaded.source == str(path)
    with diffattn.apply(wan, "radial", preset=str(path)) as patch:
        assert patch.layer_settings == settings
        out, _ = _run(wan)
    assert torch.equal(out, by_hand)
    # a folder holds diffattn_preset.json; the config hash ignores where the model was saved
    preset.save(tmp_path)
    assert presets.load(tmp_path) == preset
    assert presets.denoiser_fingerprint(zoo.load("wan", seed=3)) == (preset.model_class, preset.config_hash)
    # a preset with every layer at the base setting is the plain apply, bit for bit
    every = CalibrationPreset.for_model(wan, "radial", BASE, {W0: dict(BASE), W1: {}})
    with diffattn.apply(wan, "radial", preset=every):
        out, _ = _run(wan)
    assert torch.equal(out, outputs[1][0])


def test_agent_schedule_round_trips(tmp_path):
    from diffattn.processors.agent import AgentPhase

    pipe = zoo.load("sd")
    options = {"schedule": ((0.5, AgentPhase(sx=2, sy=2, ratio=0.3, agent_ratio=0.6)), (1.0, {"ratio": 0.2}))}
    name = "UNet2DConditionModel.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    preset = CalibrationPreset.for_model(pipe, "agent", options, {name: {"k_shortcut": 0.1}})
    loaded = presets.load(preset.save(tmp_path / "sd-agent.json"))
    spec = registry.get("agent")
    assert spec.build_config(loaded.options) == spec.build_config(options)
    with diffattn.apply(pipe, "agent", preset=loaded) as patch:
        assert _layers(pipe)[name].processor.config == spec.build_config({**options, "k_shortcut": 0.1})
        assert len(patch.layers) == 7


def test_preset_for_another_model_or_method_refused(wan, tmp_path):
    path = CalibrationPreset.for_model(wan, "radial", BASE, {W0: "dense"}).save(tmp_path / "p.json")
    flux = zoo.load("flux")
    with pytest.raises(PresetError, match=r"p\.json'.*field 'config_hash': made for WanTransformer3DModel with config "
                       r"sha256 [0-9a-f]{64}; this model is FluxTransformer2DModel with config sha256 [0-9a-f]{64}"):
        diffattn.apply(flux, "radial", preset=str(path))
    # the same class with another config (one block fewer): refused too, naming both hashes
    other = type(wan.transformer).from_config({**wan.transformer.config, "num_layers": 1})
    preset = presets.load(path)
    with pytest.raises(PresetError, match=rf"{preset.config_hash}.*this model is WanTransformer3DModel with config sha256 "):
        diffattn.apply(other, "radial", preset=preset)
    with pytest.raises(PresetError, match=r"p\.json'.*field 'method': made for method 'radial', not 'hilbert_local'"):
        diffattn.apply(wan, "hilbert_local", preset=str(path))
    assert diffattn.applied(wan) == [] and diffattn.applied(flux) == [] and diffattn.applied(other) == []


GOOD = {"schema_version": 1, "method": "radial", "model_class": "WanTransformer3DModel", "config_hash": "0" * 64,
        "options": {"decay_factor": 0.2}, "layers": {W0: "dense"}}


@pytest.mark.parametrize(
    ("text", "field", "match"),
    [
        ("{not json", None, r"not valid JSON \(line 1, column 2"),
        ("[1, 2]", None, r"must be a JSON object, got list"),
        (json.dumps({**GOOD, "schema_version": 2}), "schema_version", r"unknown version 2; this diffattn reads 1"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "method"}), "method", "missing"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "config_hash"}), "config_hash", "missing"),
        (json.dumps({**GOOD, "method": "nope"}), "method", r"unknown method 'nope'"),
        (json.dumps({**GOOD, "config_hash": "abc"}), "config_hash", r"64 lowercase hex digits"),
        (json.dumps({**GOOD, "options": {"decay": 1}}), "options", r"unknown option\(s\) \['decay'\]"),
        (json.dumps({**GOOD, "layers": {W0: "sparse"}}), "layers", r"options dict or 'dense'"),
        (json.dumps({**GOOD, "layer": {}}), "layer", r"unknown field"),
        (json.dumps({**GOOD, "method": "dense", "options": {}}), "layers", r"'dense' takes no per-layer settings"),
    ],
    ids=["json", "array", "version", "no-method", "no-hash", "method", "hash", "options", "layers", "unknown", "no-per-layer"],
)
def test_bad_preset_files_name_file_and_field(tmp_path, text, field, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PresetError, match=match) as info:
        presets.load(path)
    assert str(path) in str(info.value) and info.value.field == field
    if field:
        assert f"field {field!r}" in str(info.value)


def test_missing_preset_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        presets.load(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"presets/wan.json'.*no such file"):
        presets.load("presets/wan.json")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A local folder standing in for the Hugging Face Hub: ``create_repo`` / ``upload_file`` write into it,
    ``hf_hub_download`` reads from it; nothing touches the network."""
    import huggingface_hub

    root = tmp_path / "hub"

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        (root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message=None, **kw):
        assert (root / repo_id).is_dir(), "create_repo first"
        target = root / repo_id / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path_or_fileobj)
        return f"commit: {commit_message}"

    def hf_hub_download(repo_id, filename, revision=None, **kw):
        target = root / repo_id / filename
        if not target.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(target)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_push_to_hub_and_load_by_hub_id(wan, local_hub):
    preset = CalibrationPreset.for_model(wan, "radial", BASE, {W1: {"decay_factor": 0.5}}, device="cpu")
    info = preset.push_to_hub("me/wan-radial")
    assert "radial for WanTransformer3DModel" in info
    assert (local_hub / "me/wan-radial/diffattn_preset.json").is_file()
    assert presets.load("me/wan-radial") == preset
    preset.push_to_hub("me/wan-radial", filename="fast/preset.json")
    assert presets.load("me/wan-radial/fast/preset.json") == preset
    with diffattn.apply(wan, "radial", preset="me/wan-radial") as patch:
        assert patch.layer_settings == {W1: {"decay_factor": 0.5}}
    with pytest.raises(FileNotFoundError, match=r"cannot get diffattn_preset.json from hub repo me/missing"):
        presets.load("me/missing")
    assert diffattn.applied(wan) == []


# ----- the CLI ------------------------------------------------------------------------------------------


def test_generate_with_preset(wan, tmp_path, capsys):
    path = CalibrationPreset.for_model(wan, "radial", BASE, {W0: "dense"}).save(tmp_path / "wan.json")
    out = tmp_path / "wan.gif"
    assert main(["generate", "--model", "zoo:wan", "--preset", str(path), "--out", str(out)]) == 0
    assert "1 per-layer setting" in capsys.readouterr().out and out.is_file()
    # refused before loading the model: a bad file, another method, extra options
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**GOOD, "schema_version": 9}))
    for args, match in [
        (["--preset", str(bad)], r"--preset: preset '.*bad\.json': field 'schema_version'"),
        (["--preset", str(path), "--attention", "hilbert_local"], r"is for method 'radial', not --attention 'hilbert_local'"),
        (["--preset", str(path), "--option", "decay_factor=0.5"], r"--preset .* takes no --option"),
        (["--preset", str(tmp_path / "none.json")], r"no such file"),
    ]:
        assert main(["generate", "--model", "zoo:wan", *args, "--out", str(out)], validate_only=True) == 2
        assert re.search(match, capsys.readouterr().err)
    # a method that does not fit the model: refused before loading it
    flux = CalibrationPreset.for_model(zoo.load("flux"), "hilbert_local", {"radius": 2}).save(tmp_path / "flux.json")
    assert main(["generate", "--model", "zoo:wan", "--preset", str(flux), "--out", str(out)], validate_only=True) == 2
    assert "hilbert_local" in capsys.readouterr().err
    # another config of the same model class: refused once the model is loaded, naming both hashes
    other = type(wan.transformer).from_config({**wan.transformer.config, "num_layers": 1})
    path = CalibrationPreset.for_model(other, "radial", BASE).save(tmp_path / "other.json")
    out2 = tmp_path / "other.gif"
    assert main(["generate", "--model", "zoo:wan", "--preset", str(path), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "field 'config_hash'" in err and err.count("WanTransformer3DModel with config sha256") == 2
    assert not out2.exists()


def test_every_layer_dense_by_hand_says_so(wan):
    with pytest.warns(UserWarning, match="'radial' changes no layer: layers= sets all 2 layers"):
        patch = diffattn.apply(wan, "radial", **BASE, layers={W0: "dense", W1: "dense"})
    assert patch.layers == [] and "dense: 2 per-layer setting" in patch.headline()
    patch.remove()
