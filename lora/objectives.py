"""Training objectives read from the pipeline's scheduler config, and timestep sampling.

- DDPM-style schedulers (DDIM, DDPM, Euler, PNDM, ...): ``prediction_type`` epsilon or v_prediction;
  noisy = sqrt(abar) x0 + sqrt(1 - abar) noise.
- Flow-matching schedulers (``FlowMatch*``, or ``use_flow_sigmas`` / ``prediction_type ==
  "flow_prediction"`` as Wan's UniPC config has): noisy = (1 - sigma) x0 + sigma noise, target
  noise - x0, timestep = 1000 sigma, with the scheduler's static ``shift`` applied to sigma.

Timesteps are drawn per sample from a generator the caller seeds, "uniform" or "logit_normal"
(sigmoid of a normal: more weight on the middle of the schedule, as in SD3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class Objective:
    """Noising and regression target for one model; ``kind`` is "epsilon", "v_prediction" or "flow"."""

    kind: str
    num_train_timesteps: int = 1000
    shift: float = 1.0
    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    alphas_cumprod: torch.Tensor | None = None
    t_range: tuple[float, float] = (0.0, 1.0)  # a part of the schedule (one expert of Wan 2.2)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"timestep sampling must be one of {SAMPLINGS}, got {self.sampling!r}")

    def sample_u(self, generator: torch.Generator) -> float:
        """One draw in [0, 1) from the timestep distribution."""
        if self.sampling == "logit_normal":
            z = torch.randn(1, generator=generator) * self.logit_std + self.logit_mean
            return float(torch.sigmoid(z))
        return float(torch.rand(1, generator=generator))

    def timestep(self, u: float) -> float:
        """Map a draw in [0, 1) to the model's timestep (an integer index for DDPM, 1000 sigma for flow)."""
        lo, hi = self.t_range
        if self.kind == "flow":
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
            return (lo + (hi - lo) * sigma) * self.num_train_timesteps
        u = lo + (hi - lo) * u
        return float(min(int(u * self.num_train_timesteps), self.num_train_timesteps - 1))

    def noisy_and_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, regression target) for clean latents ``x0`` at timesteps ``t`` (shape (B,))."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if self.kind == "flow":
            sigma = (t / self.num_train_timesteps).view(shape).to(x0)
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        assert self.alphas_cumprod is not None
        abar = self.alphas_cumprod.to(x0.device)[t.long()].view(shape).to(x0)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        noisy = a * x0 + s * noise
        return noisy, (noise if self.kind == "epsilon" else a * noise - s * x0)


def objective_from_scheduler(
    scheduler: Any, sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0
) -> Objective:
    """Build the :class:`Objective` a pipeline's scheduler implies."""
    cfg = scheduler.config
    n = int(cfg.get("num_train_timesteps", 1000))
    flow = (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(cfg.get("use_flow_sigmas"))
        or cfg.get("prediction_type") == "flow_prediction"
    )
    common = {
        "num_train_timesteps": n,
        "sampling": sampling,
        "logit_mean": logit_mean,
        "logit_std": logit_std,
    }
    if flow:
        if cfg.get("use_dynamic_shifting"):
            shift = (
                1.0  # resolution-dependent shift (Flux): training on plain sigmas, as diffusers' scripts do
            )
        else:
            shift = float(cfg.get("shift", None) or cfg.get("flow_shift", None) or 1.0)
        return Objective("flow", shift=shift, **common)
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler {type(scheduler).__name__} has prediction_type={kind!r}; training supports epsilon, v_prediction and flow matching"
        )
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, torch.Tensor) or len(abar) != n:
        from diffusers import DDPMScheduler

        abar = DDPMScheduler.from_config(cfg).alphas_cumprod
    # the scheduler's own table keeps its quirks (CogVideoX's SNR shift, zero-terminal-SNR rescaling)
    return Objective(kind, alphas_cumprod=abar.clone().float(), **common)
