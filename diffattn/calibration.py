"""``diffattn.calibrate``: per-layer settings of a sparse method chosen to a quality or speed target.

Layers are not alike: some attend locally and lose nothing under a tight mask, others need wide context.
Calibration measures that per layer, on the user's own model and prompts, in about the time of a few
generations:

1. **Record.** A few denoising trajectories run with dense attention (diffattn's ``dense`` processors).
   At ``sample_steps`` evenly spaced steps, every layer the method applies to is run again, on the same
   inputs, under each candidate setting; its output is compared with the dense output (relative L2
   error) and each call is timed. The trajectory itself stays dense, so each layer's error is measured on
   the inputs it sees in a dense run and does not depend on the other layers' choices.
2. **Cost model.** A candidate's cost at a layer is its measured call time on this device (dense's too),
   so the choice is right for the hardware calibration ran on; where a candidate leaves a layer's output
   exactly unchanged it does not act there, and costs what dense does (:func:`effective_costs`).
3. **Choice.** For a trade-off weight ``lam``, every layer takes the candidate (or dense) minimising
   ``error + lam * cost / dense_cost_of_all_layers``; sweeping ``lam`` gives the path of best settings
   from all-dense to cheapest. :class:`Speed` takes the most accurate point of the path whose predicted
   attention time meets the speed-up. :class:`Quality` searches the path with end-to-end generations on
   the calibration seeds (PSNR of the final output against the recorded dense output, same seed): the
   first trial at the path's middle, each next at the cheapest point that a model anchored on the trials
   so far (PSNR falling 20 dB per decade of the summed layer error) predicts meets the target (after a
   met target, also the next cheaper point if predicted to miss by less than ``SEARCH_SLACK_DB``); it
   takes the cheapest point measured to meet the PSNR.
4. **Verification.** Dense and the chosen settings generate on held-out seeds; the measured PSNR and
   attention speed-up are reported beside the predicted ones.

:meth:`CalibrationResult.retarget` repeats steps 3-4 for another target on the same record.

The result becomes a :class:`~diffattn.presets.CalibrationPreset` (:meth:`CalibrationResult.preset`)
that ``diffattn.apply(pipe, method, preset=...)`` applies. A target that no candidate reaches is a
:class:`CalibrationError` naming the best quality / speed found and the setting that gave it; nothing is
applied.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import registry
from .api import _plan, apply
from .benchmark import PSNR_CAP_DB, output_array, time_attention
from .context import ContextHook
from .denoisers import denoisers, is_pipeline

__all__ = [
    "DEFAULT_CANDIDATES",
    "CalibrationError",
    "CalibrationResult",
    "Quality",
    "Speed",
    "calibrate",
    "default_candidates",
    "effective_costs",
]

# Candidate settings per method (every layer may also stay dense). Why these: each spans the method's
# main density knob from tight to wide, so the path from cheapest to all-dense has points in between.
DEFAULT_CANDIDATES: dict[str, list[dict[str, Any]]] = {
    # radial: the decay factor scales every band's width (larger: denser)
    "radial": [{"decay_factor": d} for d in (0.5, 1.0, 2.0, 4.0)],
    # Hilbert-local: the neighbourhood radius in tokens; the low-resolution branch as configured
    "hilbert_local": [{"radius": r} for r in (2, 4, 8, 16)],
    # pooled agents (DiTs): agents per frame; AgentSD (UNets) uses _AGENT_SD instead
    "agent": [{"num_agents": n} for n in (16, 64, 256)],
}
_AGENT_SD = [  # AgentSD on UNet self-attention: fixed phase settings instead of the step schedule
    {"sx": 4, "sy": 4, "ratio": 0.4, "agent_ratio": 0.95},
    {"sx": 2, "sy": 2, "ratio": 0.4, "agent_ratio": 0.5},
    {"sx": 2, "sy": 2, "ratio": 0.2, "agent_ratio": 0.5},
]


class CalibrationError(ValueError):
    """No candidate reaches the target; the message names the best quality / speed found and its setting.

    Attributes:
        best: ``{"psnr_db" or "attention_speedup": value, "layers": settings}`` of the best point found.
    """

    def __init__(self, message: str, best: dict[str, Any]) -> None:
        super().__init__(message)
        self.best = best


@dataclass(frozen=True)
class Quality:
    """Target: the final output within ``psnr`` dB of dense attention's (same prompt and seed)."""

    psnr: float

    def __post_init__(self) -> None:
        if isinstance(self.psnr, bool) or not isinstance(self.psnr, (int, float)) or not 0 < self.psnr < PSNR_CAP_DB:
            raise ValueError(f"Quality(psnr=...) must be a number of dB in (0, {PSNR_CAP_DB:g}), got {self.psnr!r}")

    def to_dict(self) -> dict[str, Any]:
        """The target as saved in a preset: ``{"kind": "quality", "psnr": ...}``."""
        return {"kind": "quality", "psnr": float(self.psnr)}


@dataclass(frozen=True)
class Speed:
    """Target: attention ``x`` times faster than dense (summed attention-module time, this device)."""

    x: float

    def __post_init__(self) -> None:
        if isinstance(self.x, bool) or not isinstance(self.x, (int, float)) or not self.x > 1.0 or not math.isfinite(self.x):
            raise ValueError(f"Speed(x=...) must be a finite number > 1 (the attention speed-up), got {self.x!r}")

    def to_dict(self) -> dict[str, Any]:
        """The target as saved in a preset: ``{"kind": "speed", "x": ...}``."""
        return {"kind": "speed", "x": float(self.x)}


@dataclass
class CalibrationResult:
    """What :func:`calibrate` chose and measured.

    Attributes:
        method: the method calibrated.
        target: the :class:`Quality` or :class:`Speed` asked for.
        layers: the chosen per-layer settings (``{layer: options or "dense"}``; ``diffattn.apply``'s
            ``layers=``).
        candidates: the candidate settings, in the order of the tables' columns (``"dense"`` first).
        layer_names: the layers, in the order of the tables' rows.
        errors: ``(layers, candidates)`` mean relative L2 error of each layer's output against dense.
        costs: ``(layers, candidates)`` mean seconds per call of each layer under each candidate.
        predicted: ``{"attention_speedup", "psnr_db"}`` from the record pass and the trials (``psnr_db``:
            measured on the calibration seeds; ``None`` for a speed target without trials).
        measured: ``{"attention_speedup", "psnr_db", "seeds"}`` on the held-out seeds.
        seconds: calibration wall time; ``generation_seconds``: one plain dense generation's (the
            verification's, averaged).
        trials: the end-to-end trials of a quality target (``{"index", "psnr_db", "predicted_psnr_db",
            "predicted_speedup"}`` each; ``index``: the point on the path, 0 the most accurate).
    """

    method: str
    target: Quality | Speed
    layers: dict[str, Any]
    candidates: list[Any]
    layer_names: list[str]
    errors: np.ndarray
    costs: np.ndarray
    predicted: dict[str, Any]
    measured: dict[str, Any]
    seconds: float
    generation_seconds: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    _record: Any = field(default=None, repr=False, compare=False)

    def retarget(
        self, pipe: Any, target: Quality | Speed, *, max_trials: int = 3, held_out_seeds: Sequence[int] | None = None,
        progress: bool = True,
    ) -> CalibrationResult:  # fmt: skip
        """Choose again, for another ``target``, from this calibration's record pass (no re-recording).

        The per-layer errors and costs, the calibration runs' dense outputs and the call are reused; only
        the choice, a :class:`Quality` target's trials and the held-out verification run. Useful to try
        several targets, and to compare choices on one cost table (the cost of a call is measured, so two
        record passes differ by the timing noise).

        Args:
            pipe: the pipeline this result was calibrated on, with no diffattn method applied.
            target: the new :class:`Quality` or :class:`Speed` target.
            max_trials: as in :func:`calibrate`.
            held_out_seeds: verification seeds (default: this calibration's).
            progress: show a progress bar.

        Returns:
            A new :class:`CalibrationResult`; its ``seconds`` is the record pass's plus this choice's, the
            time a fresh :func:`calibrate` to ``target`` would take.

        Raises:
            ValueError: a result not made by :func:`calibrate` in this process (e.g. rebuilt from JSON), another
                pipeline, a pipeline with methods applied, bad ``max_trials`` / ``held_out_seeds``.
                :class:`CalibrationError` as in :func:`calibrate`.
            TypeError: a target that is not :class:`Quality` / :class:`Speed`.
        """
        rec = self._check_record(pipe)
        _check_target(target)
        _check_positive_int("max_trials", max_trials)
        held_out = rec.held_out if held_out_seeds is None else _seed_list("held_out_seeds", held_out_seeds)
        if set(held_out) & {s for _, s in rec.runs}:
            raise ValueError("held_out_seeds must differ from the calibration seeds (verification on unseen seeds)")
        from tqdm.auto import tqdm

        bar = tqdm(total=max_trials + 2 * len(held_out), desc=f"calibrate {rec.method}", disable=not progress)
        return _choose(pipe, rec, target, max_trials, held_out, bar, time.perf_counter() - rec.seconds)

    def psnr_of(self, pipe: Any, setting: Mapping[str, Any]) -> float:
        """Mean PSNR against dense of ``setting`` on this calibration's runs (its prompts and seeds, against
        the dense outputs it recorded): the measure a :class:`Quality` target's trials use, for a setting of
        your own, e.g. to compare a uniform setting with the calibrated one on the same footing.

        Args:
            pipe: the pipeline this result was calibrated on, with no diffattn method applied.
            setting: options for every layer (``{"decay_factor": 1.0}``) or per-layer settings keyed by
                ``layer_names`` (like ``result.layers``; ``"dense"`` allowed).

        Raises:
            ValueError: as :meth:`retarget` for the pipeline; an invalid setting as ``diffattn.apply``.
            TypeError: a setting that is not a dict.
        """
        rec = self._check_record(pipe)
        if not isinstance(setting, Mapping):
            raise TypeError(f"setting must be a dict of options or of per-layer settings, got {setting!r}")
        per_layer = bool(setting) and set(setting) <= set(self.layer_names)
        patch = apply(pipe, self.method, layers=dict(setting)) if per_layer else apply(pipe, self.method, **dict(setting))
        with patch:
            return _runs_psnr(pipe, rec)

    def _check_record(self, pipe: Any) -> _Record:
        from .api import applied

        rec = self._record
        if rec is None:
            raise ValueError("this needs a result made by diffattn.calibrate in this process (it reuses its record pass)")
        if pipe is not rec.pipe():
            raise ValueError("this needs the pipeline this result was calibrated on (the record pass is that model's)")
        if applied(pipe):
            raise ValueError("this needs the pipeline without diffattn methods applied: call diffattn.restore(pipe) first")
        return rec

    def apply(self, pipe_or_model: Any) -> Any:
        """Apply the chosen settings (``diffattn.apply(pipe, method, layers=...)``); returns the patch."""
        return apply(pipe_or_model, self.method, layers=dict(self.layers))

    def preset(self, pipe_or_model: Any) -> Any:
        """The result as a :class:`~diffattn.presets.CalibrationPreset` for ``pipe_or_model``'s config."""
        from .presets import CalibrationPreset

        return CalibrationPreset.for_model(
            pipe_or_model, self.method, {}, self.layers, target=self.target.to_dict(),
            quality={"psnr_db": self.measured.get("psnr_db")}, speed={"attention_speedup": self.measured.get("attention_speedup")},
            device=self.device,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (tables as nested lists)."""
        return {
            "method": self.method,
            "target": self.target.to_dict(),
            "layers": self.layers,
            "candidates": self.candidates,
            "layer_names": self.layer_names,
            "errors": np.round(self.errors, 6).tolist(),
            "costs_s": np.round(self.costs, 7).tolist(),
            "predicted": self.predicted,
            "measured": self.measured,
            "trials": self.trials,
            "seconds": round(self.seconds, 2),
            "generation_seconds": round(self.generation_seconds, 2),
            "device": self.device,
        }

    def heatmap(self, path: Any) -> None:
        """Write a PNG: each layer's error under each candidate (rows: layers; columns: candidates), the
        chosen cell outlined; local layers show low error under the tight candidates."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .io import atomic_path

        n_layers, n_cand = self.errors.shape
        fig, ax = plt.subplots(figsize=(2.4 + 1.1 * n_cand, 1.6 + 0.22 * n_layers))
        shown = np.log10(np.maximum(self.errors, 1e-4))
        im = ax.imshow(shown, aspect="auto", cmap="viridis")
        ax.set_xticks(range(n_cand), [_label(c) for c in self.candidates], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(n_layers), [n.split(".", 1)[-1] for n in self.layer_names], fontsize=6)
        for i, name in enumerate(self.layer_names):
            j = self.candidates.index(self.layers.get(name, registry.DENSE))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        fig.colorbar(im, ax=ax, label="log10 rel. error")
        ax.set_title(f"{self.method}: per-layer error (chosen outlined)", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # long layer names stay whole
        plt.close(fig)


def _label(candidate: Any) -> str:
    if candidate == registry.DENSE:
        return "dense"
    return ",".join(f"{k}={v}" for k, v in candidate.items())


def default_candidates(pipe_or_model: Any, method: str) -> list[dict[str, Any]]:
    """The candidate settings :func:`calibrate` tries for ``method`` on this model (dense is always one)."""
    if method not in DEFAULT_CANDIDATES:
        raise ValueError(f"method {method!r} has no calibration candidates; calibrated methods: {', '.join(DEFAULT_CANDIDATES)}")
    if method == "agent" and any(type(m).__name__ == "UNet2DConditionModel" for _, m in denoisers(pipe_or_model)):
        return [dict(c) for c in _AGENT_SD]
    return [dict(c) for c in DEFAULT_CANDIDATES[method]]


def _check_inputs(
    pipe: Any, method: str, prompts: Any, seeds: Any, held_out_seeds: Any, num_inference_steps: Any, sample_steps: Any,
    target: Any, candidates: Any, max_trials: Any,
) -> tuple[list[str], list[int], list[int], list[dict[str, Any]]]:  # fmt: skip
    if not is_pipeline(pipe):
        raise TypeError(f"calibrate needs a diffusers pipeline (it generates), got {type(pipe).__name__}")
    spec = registry.get(method)
    if not spec.per_layer or method not in DEFAULT_CANDIDATES:
        raise ValueError(f"method {method!r} cannot be calibrated per layer; calibrated methods: {', '.join(DEFAULT_CANDIDATES)}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    out_seeds = [_seed_list("seeds", seeds), _seed_list("held_out_seeds", held_out_seeds)]
    if set(out_seeds[0]) & set(out_seeds[1]):
        raise ValueError(f"held_out_seeds must differ from seeds (verification on unseen seeds); both hold {sorted(set(out_seeds[0]) & set(out_seeds[1]))}")
    for name, value in (("num_inference_steps", num_inference_steps), ("sample_steps", sample_steps), ("max_trials", max_trials)):
        if value is not None:
            _check_positive_int(name, value)
    _check_target(target)
    if candidates is None:
        candidates = default_candidates(pipe, method)
    if not isinstance(candidates, Sequence) or not candidates or not all(isinstance(c, Mapping) and c for c in candidates):
        raise ValueError(f"candidates must be a non-empty list of non-empty option dicts, got {candidates!r}")
    for c in candidates:
        spec.build_config(dict(c))  # an unknown option / bad value fails here, before any work
    return list(prompts), out_seeds[0], out_seeds[1], [dict(c) for c in candidates]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_target(target: Any) -> None:
    if not isinstance(target, (Quality, Speed)):
        raise TypeError(f"target must be diffattn.Quality(psnr=...) or diffattn.Speed(x=...), got {target!r}")


def _seed_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty list of integers >= 0, got {value!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise ValueError(f"{name} must be integers >= 0, got {list(value)!r}")
    return list(value)


def _rel_error(out: Any, ref: Any) -> float:
    a = out[0] if isinstance(out, tuple) else out
    b = ref[0] if isinstance(ref, tuple) else ref
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(1.0 / mse))


class _Recorder:
    """Forward hooks that, at sampled steps, rerun each layer under every candidate on the dense inputs.

    Only calls through the dense patch's processors count: a pipeline stage that suspends the patch
    (:meth:`~diffattn.api.AttentionPatch.suspended`, e.g. stage 1 of ``HighResPipeline``) is not one the
    method will run in, so it is not recorded."""

    def __init__(
        self, layers: list[tuple[str, nn.Module]], procs: list[dict[int, Any]], context: Any, sampled: set[int],
        dense: dict[int, Any],
    ) -> None:  # fmt: skip
        self.layers, self.procs, self.context, self.sampled, self.dense = layers, procs, context, sampled, dense
        n = len(procs) + 1  # column 0: dense
        self.err = np.zeros((len(layers), n))
        self.cost = np.zeros((len(layers), n))
        self.calls = np.zeros(len(layers))
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for i, (_, module) in enumerate(self.layers):
            self.handles.append(module.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if self.context.step_index not in self.sampled or module.processor is not self.dense.get(id(module)):
                return
            with torch.no_grad():
                t0 = time.perf_counter()
                module.forward(*args, **kwargs)  # dense again, timed like the candidates
                self.cost[i, 0] += time.perf_counter() - t0
                own = module.processor
                try:
                    for j, procs in enumerate(self.procs, start=1):
                        module.processor = procs[id(module)]
                        t0 = time.perf_counter()
                        o = module.forward(*args, **kwargs)
                        self.cost[i, j] += time.perf_counter() - t0
                        self.err[i, j] += _rel_error(o, out)
                finally:
                    module.processor = own
            self.calls[i] += 1

        return hook


def _default_steps(pipe: Any) -> int:
    """The pipeline's own default ``num_inference_steps`` (its ``__call__`` signature)."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    if param is None or not isinstance(param.default, int):
        raise ValueError(f"{type(pipe).__name__} has no default num_inference_steps; pass num_inference_steps")
    return param.default


def _path(err: np.ndarray, cost: np.ndarray) -> list[np.ndarray]:
    """The settings worth trying, from all-dense to the cheapest: per-layer choices minimising
    ``err + lam * cost / total dense cost`` over a sweep of ``lam`` (the Lagrangian path), plus every
    uniform setting (one candidate on all layers), reduced to the Pareto front of predicted error (the sum
    of the layers' errors) against predicted cost and ordered by falling cost. The uniform settings are
    in it so that a per-layer choice is never predicted worse than the best uniform one."""
    n_layers, n_cand = err.shape
    scale = cost[:, 0].sum()
    options = [np.zeros(n_layers, dtype=int)] + [np.full(n_layers, j) for j in range(1, n_cand)]
    for lam in np.logspace(-6, 6, 241):
        options.append(np.argmin(err + lam * cost / scale + 1e-12 * np.arange(n_cand), axis=1))
    rows = np.arange(n_layers)
    scored = {}
    for c in options:
        scored.setdefault(tuple(c.tolist()), (float(err[rows, c].sum()), float(cost[rows, c].sum())))
    front = []
    for key, (e, _cost) in sorted(scored.items(), key=lambda kv: (kv[1][1], kv[1][0])):  # cheapest first
        if not front or e < front[-1][1] - 1e-15:
            front.append((key, e))
    return [np.asarray(key) for key, _ in reversed(front)]


def effective_costs(errors: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """The cost table calibration chooses on: ``costs`` with dense's cost wherever a candidate left the
    layer's output exactly unchanged (error 0). The method does not act there (it is dense in effect, and
    :func:`_drop_no_ops` makes it so), so a measured difference is timing noise, not a gain to buy.

    Args:
        errors: ``(layers, candidates)`` relative errors, column 0 dense (``CalibrationResult.errors``).
        costs: ``(layers, candidates)`` measured seconds per call (``CalibrationResult.costs``).
    """
    return np.where(errors == 0, costs[:, :1], costs)


def _drop_no_ops(choice: np.ndarray, err: np.ndarray) -> np.ndarray:
    """``choice`` with dense on every layer whose chosen candidate left its output exactly unchanged (error
    0 at every sampled call): the method does nothing there (AgentSD below its top UNet level, a mask that
    keeps everything), so a preset should not claim it, and a choice that is sparse only on such layers is
    all dense in effect."""
    return np.where(err[np.arange(len(choice)), choice] == 0, 0, choice)


SEARCH_SLACK_DB = 1.5  # the quality search also tries the next cheaper point predicted to miss by less


def _fit_psnr(anchors: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, s)`` of ``PSNR = a - s * log10(error_sum)`` through the trials so far.

    Why this form: a small perturbation of every layer's output moves the final output in proportion, so
    its MSE scales with the square of the summed layer error (20 dB per decade). One trial fixes ``a``
    with that slope; two or more at different errors fit the slope too (kept within 5-60 dB per decade,
    else the default)."""
    pts = [(math.log10(max(e, 1e-12)), p) for e, p in anchors if p < PSNR_CAP_DB]
    if not pts:
        return PSNR_CAP_DB, 20.0
    x = np.array([q[0] for q in pts])
    y = np.array([q[1] for q in pts])
    if len(pts) >= 2 and np.ptp(x) > 1e-6:
        slope = -float(np.polyfit(x, y, 1)[0])
        if 5.0 <= slope <= 60.0:
            return float(np.mean(y + slope * x)), slope
    return float(np.mean(y + 20.0 * x)), 20.0


def _quality_search(
    esum: np.ndarray, trial: Any, target: float, max_trials: int, skip_first: bool = True
) -> dict[str, Any]:
    """Find the cheapest path point whose measured PSNR meets ``target`` in at most ``max_trials`` trials.

    ``esum[i]``: the predicted (summed per-layer) error of path point ``i`` (index 0: the most accurate,
    rising to the cheapest); ``trial(i)``: the measured PSNR of point ``i``. Points are taken as monotone
    (a cheaper point is no more accurate). The first trial is the middle of the path; each next is the
    cheapest untried point the model of :func:`_fit_psnr`, anchored on the trials so far, predicts meets
    the target; after a met target with none predicted, the next cheaper point if it is predicted to miss
    by less than ``SEARCH_SLACK_DB`` (a point meeting the target exactly is predicted either side of it).
    The search then stops, so two or three trials usually suffice where bisection would take
    ``log2(len(path))``.

    Returns ``{"ok": (index, psnr) or None, "seen": best (index, psnr) or None, "trials": [...]}``."""
    lo, hi = (1 if skip_first else 0), len(esum) - 1
    anchors: list[tuple[float, float]] = []
    ok = seen = None
    trials: list[dict[str, Any]] = []
    while len(trials) < max_trials and lo <= hi:
        if not anchors:
            i, predicted = (lo + hi + 1) // 2, None
        else:
            a, s = _fit_psnr(anchors)
            pred = a - s * np.log10(np.maximum(esum, 1e-12))
            meets = [j for j in range(lo, hi + 1) if pred[j] >= target]
            if not meets and ok is not None and pred[lo] < target - SEARCH_SLACK_DB:
                break  # nothing cheaper is predicted to meet the target, or to come close
            # none predicted: the most accurate point left (after a met target: the next cheaper one, whose
            # predicted shortfall is within the model's error, as for a point that meets it exactly)
            i = max(meets) if meets else lo
            predicted = round(float(pred[i]), 3)
        value = trial(i)
        anchors.append((float(esum[i]), value))
        trials.append({"index": int(i), "psnr_db": round(value, 3), "predicted_psnr_db": predicted})
        if seen is None or value > seen[1]:
            seen = (i, value)
        if value >= target:
            ok, lo = (i, value), i + 1
        else:
            hi = i - 1
    return {"ok": ok, "seen": seen, "trials": trials}


def calibrate(
    pipe: Any,
    method: str,
    prompts: str | Sequence[str],
    *,
    target: Quality | Speed,
    seeds: Sequence[int] = (0,),
    held_out_seeds: Sequence[int] = (1000,),
    num_inference_steps: int | None = None,
    sample_steps: int = 4,
    candidates: Sequence[Mapping[str, Any]] | None = None,
    max_trials: int = 3,
    call_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Choose ``method``'s setting per layer to ``target`` on ``pipe``; see the module docstring.

    Args:
        pipe: a diffusers pipeline with no diffattn method applied.
        method: ``"radial"``, ``"hilbert_local"`` or ``"agent"``.
        prompts: the calibration prompts (each runs once per seed).
        target: :class:`Quality` (``psnr`` dB against dense) or :class:`Speed` (``x``: attention speed-up).
        seeds: the calibration seeds. ``held_out_seeds``: the verification seeds (with the first prompt).
        num_inference_steps: the denoising steps (default: the pipeline's own default or ``call_kwargs``').
        sample_steps: how many evenly spaced steps the per-layer errors are measured at.
        candidates: option dicts to choose from per layer (default :func:`default_candidates`); every layer
            may also stay dense.
        max_trials: end-to-end generations a :class:`Quality` target may use to locate its point.
        call_kwargs: other pipeline keywords (``height``, ``num_frames``, ``guidance_scale`` ...).
        progress: show a progress bar.

    Returns:
        A :class:`CalibrationResult`; ``result.preset(pipe).save(path)`` writes a preset.

    Raises:
        ValueError: empty or non-positive prompts / seeds / steps, a method that cannot be calibrated,
            a bad candidate, a pipeline already patched. :class:`CalibrationError` (a ``ValueError``): no
            candidate reaches the target (the best found and its setting are named). Nothing is applied.
        TypeError: a target that is not :class:`Quality` / :class:`Speed`, or not a pipeline.
    """
    from tqdm.auto import tqdm

    from .api import applied

    prompts, seeds, held_out, cands = _check_inputs(
        pipe, method, prompts, seeds, held_out_seeds, num_inference_steps, sample_steps, target, candidates, max_trials
    )
    if applied(pipe):
        raise ValueError("calibrate needs the pipeline without diffattn methods applied: call diffattn.restore(pipe) first")
    models = denoisers(pipe)
    plans = [_plan(models, method, c) for c in cands]  # checks applicability; nothing is installed
    layers = [(f"{type(m).__name__}.{n}", layer) for m, n, layer, _, _ in plans[0].changes]
    names = [q for q, _ in layers]
    if len(set(names)) != len(names):  # Wan 2.2: transformer and transformer_2 share class and layer names
        raise ValueError(
            "calibrate cannot tell this pipeline's denoisers apart: two of them share a class and layer names "
            "(Wan 2.2's transformer and transformer_2), and per-layer settings are keyed by those names"
        )
    procs = [{id(layer): new for _, _, layer, _, new in plan.changes} for plan in plans]
    if any(set(p) != {id(m) for _, m in layers} for p in procs):
        raise ValueError(f"the candidates of {method!r} apply to different layers; give candidates that change the same layers")
    call = dict(call_kwargs or {})
    call.setdefault("output_type", "np")
    if num_inference_steps is not None:
        call["num_inference_steps"] = num_inference_steps

    t_start = time.perf_counter()
    runs = [(p, s) for p in prompts for s in seeds]
    dense_out: dict[tuple[str, int], np.ndarray] = {}
    bar = tqdm(total=len(runs) + max_trials + 2 * len(held_out), desc=f"calibrate {method}", disable=not progress)
    num = call.get("num_inference_steps") or _default_steps(pipe)
    # A pipeline with stages (HighResPipeline) says at which steps applied methods run; sample among those.
    steps = list(pipe.method_steps(**{**call, "num_inference_steps": num})) if hasattr(pipe, "method_steps") else list(range(num))
    sampled = {steps[int(round(x))] for x in np.linspace(0, len(steps) - 1, min(sample_steps, len(steps)))}
    err = cost = calls = None
    with apply(pipe, "dense") as dense_patch:
        hooks = [m.register_forward_pre_hook(ContextHook(plan.context, pipe), with_kwargs=True) for plan in plans for _, m in models]
        try:
            dense_procs = {id(layer): new for _, _, layer, _, new in dense_patch.saved}
            for prompt, seed in runs:
                with _Recorder(layers, procs, dense_patch.context, sampled, dense_procs) as rec:
                    dense_out[(prompt, seed)] = _generate(pipe, call, prompt, seed)
                if rec.calls.min() == 0:
                    raise ValueError(
                        f"no layer ran at the sampled steps {sorted(sampled)}: the pipeline ran another step count; "
                        "pass num_inference_steps"
                    )
                err = rec.err if err is None else err + rec.err
                cost = rec.cost if cost is None else cost + rec.cost
                calls = rec.calls if calls is None else calls + rec.calls
                bar.update()
        finally:
            for h in hooks:
                h.remove()
    err, cost = err / calls[:, None], cost / calls[:, None]
    record = _Record(
        pipe=weakref.ref(pipe), method=method, names=names, columns=[registry.DENSE, *cands], errors=err, costs=cost,
        runs=runs, dense_out=dense_out, call=call, held_out=held_out, seconds=time.perf_counter() - t_start,
    )  # fmt: skip
    return _choose(pipe, record, target, max_trials, held_out, bar, t_start)


def _generate(pipe: Any, call: Mapping[str, Any], prompt: str, seed: int) -> np.ndarray:
    device = getattr(pipe, "device", torch.device("cpu"))
    gen = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)
    return output_array(pipe(prompt=prompt, generator=gen, **call))


def _runs_psnr(pipe: Any, rec: _Record) -> float:
    """Mean PSNR of the pipeline as it stands (a method applied) against the record's dense outputs."""
    return float(np.mean([_psnr(_generate(pipe, rec.call, p, s), rec.dense_out[(p, s)]) for p, s in rec.runs]))


@dataclass
class _Record:
    """What the record pass measured, kept in the result so :meth:`CalibrationResult.retarget` can choose
    again without re-recording. ``pipe``: a weak reference (a result does not keep a pipeline alive);
    ``seconds``: the record pass's wall time."""

    pipe: weakref.ref
    method: str
    names: list[str]
    columns: list[Any]
    errors: np.ndarray
    costs: np.ndarray
    runs: list[tuple[str, int]]
    dense_out: dict[tuple[str, int], np.ndarray]
    call: dict[str, Any]
    held_out: list[int]
    seconds: float


def _choose(
    pipe: Any, rec: _Record, target: Quality | Speed, max_trials: int, held_out: list[int], bar: Any, t_start: float
) -> CalibrationResult:
    """Steps 3-4 of the module docstring on a record pass: the choice for ``target``, then verification."""
    err, names, columns, method, runs = rec.errors, rec.names, rec.columns, rec.method, rec.runs
    cost = effective_costs(err, rec.costs)
    rows = np.arange(len(names))

    def settings(choice: np.ndarray) -> dict[str, Any]:
        return {name: columns[j] if j else registry.DENSE for name, j in zip(names, choice.tolist())}

    def speedup(choice: np.ndarray) -> float:
        return float(cost[:, 0].sum() / cost[rows, choice].sum())

    path = _path(err, cost)
    trials: list[dict[str, Any]] = []
    chosen: np.ndarray | None = None
    predicted_psnr = None
    if isinstance(target, Speed):
        ok = [c for c in path if speedup(c) >= target.x]
        if not ok:
            fastest = max(path, key=speedup)
            raise CalibrationError(
                f"target Speed(x={target.x:g}) not reached: the fastest setting found gives {speedup(fastest):.2f}x "
                f"attention speed-up on this device ({_describe(settings(fastest))}); nothing applied",
                {"attention_speedup": speedup(fastest), "layers": settings(fastest)},
            )
        chosen = min(ok, key=lambda c: float(err[rows, c].sum()))
    else:
        esum = np.array([float(err[rows, c].sum()) for c in path])

        def trial(i: int) -> float:
            with apply(pipe, method, layers=settings(path[i])):
                value = _runs_psnr(pipe, rec)
            bar.update()
            return value

        search = _quality_search(esum, trial, target.psnr, max_trials, skip_first=not path[0].any())
        trials = [{**t, "predicted_speedup": round(speedup(path[t["index"]]), 3)} for t in search["trials"]]
        best_ok = (path[search["ok"][0]], search["ok"][1]) if search["ok"] is not None else None
        best_seen = (path[search["seen"][0]], search["seen"][1]) if search["seen"] is not None else None
        if len(path) == 1:
            raise CalibrationError(
                f"target Quality(psnr={target.psnr:g}) not reached: no candidate setting measured cheaper than dense "
                "attention on this device, so none trades quality for speed; nothing applied",
                {"psnr_db": PSNR_CAP_DB, "layers": settings(path[0])},
            )
        if best_ok is None:
            found = best_seen if best_seen is not None else (path[-1], float("nan"))
            raise CalibrationError(
                f"target Quality(psnr={target.psnr:g}) not reached: the best quality found is {found[1]:.2f} dB PSNR "
                f"against dense ({_describe(settings(found[0]))}; {len(trials)} trial(s)); lower the target or raise "
                "max_trials; nothing applied",
                {"psnr_db": found[1], "layers": settings(found[0])},
            )
        chosen, predicted_psnr = best_ok
    chosen = _drop_no_ops(chosen, err)
    choice = settings(chosen)
    if all(v == registry.DENSE for v in choice.values()):
        raise CalibrationError(
            f"target {target!r} is met only with every layer dense: no sparse setting helps; nothing applied",
            {"layers": choice},
        )
    bar.total = bar.n + 2 * len(held_out)  # a quality search may stop before max_trials
    bar.refresh()
    # verification on held-out seeds: dense, then the choice; attention time summed over the attention modules
    scores, t_dense, t_method, gen_seconds = [], 0.0, 0.0, []
    for seed in held_out:
        with apply(pipe, "dense"), time_attention(pipe) as td:
            t0 = time.perf_counter()
            ref = _generate(pipe, rec.call, runs[0][0], seed)
            gen_seconds.append(time.perf_counter() - t0)  # a plain dense generation: calibration time's unit
        bar.update()
        with apply(pipe, method, layers=choice), time_attention(pipe) as tm:
            got = _generate(pipe, rec.call, runs[0][0], seed)
        bar.update()
        scores.append(_psnr(got, ref))
        t_dense, t_method = t_dense + td.seconds, t_method + tm.seconds
    bar.close()
    device = getattr(pipe, "device", torch.device("cpu"))
    return CalibrationResult(
        method=method, target=target, layers=choice, candidates=columns, layer_names=names, errors=err, costs=rec.costs,
        predicted={"attention_speedup": round(speedup(chosen), 3), "psnr_db": None if predicted_psnr is None else round(predicted_psnr, 3),
                   "error_sum": round(float(err[rows, chosen].sum()), 6)},
        measured={"attention_speedup": round(t_dense / t_method, 3) if t_method > 0 else None,
                  "psnr_db": round(float(np.mean(scores)), 3), "seeds": held_out},
        seconds=time.perf_counter() - t_start, generation_seconds=float(np.mean(gen_seconds)), trials=trials,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, _record=rec,
    )  # fmt: skip


def _describe(layers: Mapping[str, Any]) -> str:
    """``"12 layers: 5 dense, 7 decay_factor=0.5"``: a setting in a line."""
    counts: dict[str, int] = {}
    for v in layers.values():
        key = "dense" if v == registry.DENSE else _label(v)
        counts[key] = counts.get(key, 0) + 1
    return f"{len(layers)} layers: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
