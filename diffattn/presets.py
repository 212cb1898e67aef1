"""Calibration presets: a method's options and per-layer settings for one model config, in a small
versioned JSON file anyone can load (``diffattn.apply(pipe, "radial", preset="wan-radial.json")``).

A preset names the model it was made for (the denoiser class and a hash of its config), so applying it to
another model config is refused. Presets are written by hand (:meth:`CalibrationPreset.for_model`), from an
applied patch (:meth:`CalibrationPreset.from_patch`), saved atomically (:meth:`CalibrationPreset.save`),
shared on the Hugging Face Hub (:meth:`CalibrationPreset.push_to_hub`) and read back from a file, a folder
or a hub id (:func:`load`). :func:`diffattn.calibrate` (per-layer settings chosen to a target) writes them
too (:meth:`diffattn.CalibrationResult.preset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .denoisers import denoisers
from .io import atomic_text

SCHEMA_VERSION = 1
PRESET_FILENAME = "diffattn_preset.json"  # the file a hub repo (or a folder) holds
_REQUIRED = ("schema_version", "method", "model_class", "config_hash")
_HASH = re.compile(r"[0-9a-f]{64}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?")


class PresetError(ValueError):
    """A preset that cannot be used; the message names the file (or hub id) and the field.

    Attributes:
        source: the file, folder or hub id the preset came from (``"<preset>"`` for one built in memory).
        field: the offending field, or ``None`` when the file as a whole is wrong (not JSON, not an object).
    """

    def __init__(self, source: Any, field: str | None, message: str) -> None:
        where = f"field {field!r}: " if field else ""
        super().__init__(f"preset {str(source)!r}: {where}{message}")
        self.source, self.field = source, field


def denoiser_fingerprint(pipe_or_model: Any) -> tuple[str, str]:
    """``(model class, config hash)`` of a pipeline's denoiser(s) or a bare denoiser.

    The hash is the sha256 of the sorted JSON of ``model.config`` without its private keys (``_class_name``,
    ``_diffusers_version``, ``_name_or_path``: where and with what it was saved does not count). A pipeline
    with two denoisers (Wan 2.2's ``transformer`` and ``transformer_2``) hashes both configs, in order, and
    joins the class names with ``+``. A list of denoisers counts as such a pipeline.

    Raises:
        ValueError: a denoiser without a diffusers config.
    """
    models = list(pipe_or_model) if isinstance(pipe_or_model, list | tuple) else [m for _, m in denoisers(pipe_or_model)]
    classes, configs = [], []
    for model in models:
        config = getattr(model, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError(f"{type(model).__name__} has no diffusers config to hash; presets need a diffusers model")
        classes.append(type(model).__name__)
        configs.append({k: v for k, v in config.items() if not str(k).startswith("_")})
    payload = configs[0] if len(configs) == 1 else configs
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return "+".join(classes), hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Options as JSON values: dataclasses (an agent schedule's phases) as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class CalibrationPreset:
    """A method's options and per-layer settings for one model config (schema version 1).

    Attributes:
        method: the method's name (``radial``, ``hilbert_local``, ``agent``, ...).
        model_class: the denoiser class it was made for (``+``-joined for two denoisers).
        config_hash: sha256 of the denoiser config (see :func:`denoiser_fingerprint`).
        options: the base options, for every layer not named in ``layers``.
        layers: per-layer settings ``{layer name as in AttentionPatch.layers: {option: value} or "dense"}``.
        target: what the settings were chosen for (e.g. ``{"psnr": 30.0}`` or ``{"speedup": 2.0}``), or ``None``.
        quality: measured quality against dense (e.g. ``{"psnr": 31.2, "ssim": 0.95}``), or ``None``.
        speed: measured speed (e.g. ``{"attention_speedup": 2.1}``), or ``None``.
        device: where it was measured (e.g. ``"NVIDIA H100"``, ``"cpu"``), or ``None``.
        schema_version: the file format version (this diffattn reads and writes 1).
        source: the file or hub id it was loaded from (not saved; errors name it).
    """

    method: str
    model_class: str
    config_hash: str
    options: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    device: str | None = None
    schema_version: int = SCHEMA_VERSION
    source: str | None = field(default=None, compare=False, repr=False)

    # ----- building ------------------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls, pipe_or_model: Any, method: str, options: Mapping[str, Any] | None = None,
        layers: Mapping[str, Any] | None = None, **measured: Any,
    ) -> CalibrationPreset:
        """A preset for ``pipe_or_model``'s denoiser config, checked like ``diffattn.apply`` checks options.

        Args:
            pipe_or_model: the pipeline or denoiser the preset is for.
            method: the method's name.
            options: base options.
            layers: per-layer settings (``{name: options or "dense"}``).
            **measured: ``target``, ``quality``, ``speed``, ``device``.
        """
        model_class, config_hash = denoiser_fingerprint(pipe_or_model)
        preset = cls(method=method, model_class=model_class, config_hash=config_hash, options=_jsonable(dict(options or {})),
                     layers=_jsonable(dict(layers or {})), **measured)
        return cls.from_dict(preset.to_dict(), "<preset>")

    @classmethod
    def from_patch(cls, patch: Any, **measured: Any) -> CalibrationPreset:
        """The preset of an applied :class:`~diffattn.AttentionPatch`: its method, options and per-layer
        settings, for the model it patched. ``**measured``: ``target``, ``quality``, ``speed``, ``device``."""
        models = patch.models
        if not models:
            raise ValueError("the patch has no model")
        return cls.for_model(list(models), patch.method, patch.options, patch.layer_settings, **measured)

    # ----- checking ------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: Any = "<preset>") -> CalibrationPreset:
        """A preset from its JSON object, every field checked.

        Raises:
            PresetError: naming ``source`` and the field: not an object, a missing or unknown field, an
                unknown schema version, an unknown method, options the method refuses.
        """
        if not isinstance(data, Mapping):
            raise PresetError(source, None, f"must be a JSON object, got {type(data).__name__}")
        for name in _REQUIRED:
            if name not in data:
                raise PresetError(source, name, "missing")
        version = data["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
            raise PresetError(source, "schema_version", f"unknown version {version!r}; this diffattn reads {SCHEMA_VERSION}")
        known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PresetError(source, unknown[0], f"unknown field (schema {SCHEMA_VERSION} has {known})")
        for name in ("method", "model_class", "config_hash"):
            if not isinstance(data[name], str) or not data[name]:
                raise PresetError(source, name, f"must be a non-empty string, got {data[name]!r}")
        if not _HASH.fullmatch(data["config_hash"]):
            raise PresetError(source, "config_hash", f"must be 64 lowercase hex digits (sha256), got {data['config_hash']!r}")
        for name in ("options", "layers"):
            if not isinstance(data.get(name, {}), Mapping):
                raise PresetError(source, name, f"must be an object, got {type(data[name]).__name__}")
        for name in ("target", "quality", "speed"):
            if data.get(name) is not None and not isinstance(data[name], Mapping):
                raise PresetError(source, name, f"must be an object or null, got {type(data[name]).__name__}")
        if data.get("device") is not None and not isinstance(data["device"], str):
            raise PresetError(source, "device", f"must be a string or null, got {data['device']!r}")
        try:
            spec = registry.get(data["method"])
        except ValueError as e:
            raise PresetError(source, "method", str(e)) from None
        options, layers = dict(data.get("options", {})), dict(data.get("layers", {}))
        try:
            spec.build_config(options)
        except (TypeError, ValueError) as e:
            raise PresetError(source, "options", str(e)) from None
        if layers:
            try:
                spec.layer_configs(options, layers)
            except (TypeError, ValueError) as e:
                raise PresetError(source, "layers", str(e)) from None
        return cls(**{k: data[k] for k in known if k in data}, source=str(source))

    def check(self, pipe_or_model: Any, method: str) -> None:
        """Refuse to apply this preset as another method or to another model config.

        Raises:
            PresetError: naming the preset's source, the field, and both methods or both classes and hashes.
        """
        source = self.source or "<preset>"
        if method != self.method:
            raise PresetError(source, "method", f"made for method {self.method!r}, not {method!r}")
        model_class, config_hash = denoiser_fingerprint(pipe_or_model)
        if (model_class, config_hash) != (self.model_class, self.config_hash):
            raise PresetError(
                source, "config_hash",
                f"made for {self.model_class} with config sha256 {self.config_hash}; this model is {model_class} "
                f"with config sha256 {config_hash}. A preset holds for the model config it was made for only",
            )

    # ----- files and the hub ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the preset (``schema_version`` first; ``source`` left out)."""
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.name not in ("schema_version", "source"):
                out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        """The preset as indented JSON text (ends with a newline).

        Raises:
            ValueError: a value JSON cannot hold (NaN, an object), naming it.
        """
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(f"preset of method {self.method!r} is not JSON: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the preset to ``path`` atomically (never half-written; the umask's mode); a folder gets
        ``diffattn_preset.json`` inside. Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / PRESET_FILENAME
        return atomic_text(path, self.to_json())

    @classmethod
    def load(cls, source: str | os.PathLike, revision: str | None = None) -> CalibrationPreset:
        """See :func:`load`."""
        return load(source, revision=revision)

    def push_to_hub(
        self, repo_id: str, filename: str = PRESET_FILENAME, *, token: str | None = None, private: bool | None = None,
        commit_message: str | None = None,
    ) -> Any:
        """Upload the preset to the Hugging Face Hub repo ``repo_id`` (created when missing) as ``filename``;
        ``load(repo_id)`` reads it back. Returns ``huggingface_hub``'s commit info."""
        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_file(
            path_or_fileobj=self.to_json().encode(), path_in_repo=filename, repo_id=repo_id,
            commit_message=commit_message or f"diffattn preset: {self.method} for {self.model_class}",
        )


def _is_hub_id(text: str) -> bool:
    if text.startswith((".", "/", "~")) or "\\" in text or not _HUB_ID.fullmatch(text):
        return False
    parts = text.split("/")
    return not (len(parts) == 2 and parts[1].endswith(".json"))  # "presets/wan.json" is a (missing) local file


def read_text(source: str | os.PathLike, revision: str | None = None) -> tuple[str, str]:
    """``(text, where)`` of a preset: a file, a folder holding ``diffattn_preset.json``, or a hub id
    ``owner/name`` (its ``diffattn_preset.json``) or ``owner/name/path/in/repo.json``.

    Raises:
        FileNotFoundError: no such file, and not a hub id (or the hub has no such file).
    """
    path = Path(source)
    if path.is_dir():
        path = path / PRESET_FILENAME
    if path.is_file():
        return path.read_text(), str(path)
    text = str(source)
    if not _is_hub_id(text):
        raise FileNotFoundError(f"preset {text!r}: no such file (nor a hub id owner/name[/file.json])")
    import huggingface_hub

    parts = text.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or PRESET_FILENAME
    # a missing file in a repo is a plain Exception in some huggingface_hub versions
    missing = getattr(getattr(huggingface_hub, "errors", None), "EntryNotFoundError", OSError)
    try:
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except (OSError, ValueError, missing) as e:
        raise FileNotFoundError(f"preset {text!r}: cannot get {filename} from hub repo {repo_id}: {e}") from e
    return Path(local).read_text(), text


def load(source: str | os.PathLike | CalibrationPreset, revision: str | None = None) -> CalibrationPreset:
    """A preset from a file, a folder, or a hub id (``owner/name`` or ``owner/name/file.json``; ``revision``:
    a branch, tag or commit on the hub), checked field by field.

    Raises:
        FileNotFoundError: no such file or hub file.
        PresetError: not valid JSON, a missing or unknown field, an unknown schema version or method, or
            options the method refuses; naming the file and the field.
    """
    if isinstance(source, CalibrationPreset):
        return source
    text, where = read_text(source, revision=revision)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PresetError(where, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return CalibrationPreset.from_dict(data, where)


def save(preset: CalibrationPreset, path: str | os.PathLike) -> Path:
    """``preset.save(path)``."""
    return preset.save(path)


def push_to_hub(preset: CalibrationPreset, repo_id: str, **kwargs: Any) -> Any:
    """``preset.push_to_hub(repo_id, **kwargs)``."""
    return preset.push_to_hub(repo_id, **kwargs)
