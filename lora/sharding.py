"""Trainable state across sharded data parallel (FSDP2 and DeepSpeed ZeRO through ``accelerate launch``).

Under FSDP2 every parameter is a ``DTensor`` holding one shard per process, and so is every optimizer
and EMA state tensor derived from it. Checkpoints and saved results here are always *full* tensors in
the plain single-process layout, so a checkpoint written by 8 sharded processes resumes on 1 process or
under DDP and back. Gathering a shard (``full_tensor``) is a collective: every process must call these
functions in the same order, while only the main process writes files. Without sharding they are
plain copies and need no other process.

Scattering back uses ``distribute_tensor(..., src_data_rank=None)``: every process loaded the same full
tensor from disk, so each takes its own shard without communicating.

Under DeepSpeed ZeRO the fp32 master weights and Adam state live in the ZeRO optimizer's flat
partitions (and at stage 3 the module's weights too). The whole fp32 weights are gathered with
DeepSpeed's ``safe_get_full_fp32_param``; the optimizer state is saved and restored by DeepSpeed's own
checkpoint files, so those checkpoints resume only under DeepSpeed with the same process count.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# accelerate's distributed types that shard parameters or optimizer state
SHARDED_KINDS = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective when ``t`` is sharded)."""
    t = t.detach()
    if is_sharded(t):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out like ``ref``: this process's shard when ``ref`` is sharded."""
    value = value.to(device=ref.device, dtype=ref.dtype)
    if is_sharded(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
    return value


def full_parameters(named: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` for ``names``, gathered in the order given."""
    return {n: full_tensor(named[n]) for n in names}


def load_parameters(named: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters of the same names and shapes."""
    with torch.no_grad():
        for n, value in tensors.items():
            named[n].copy_(like(value, named[n]))


def _map_state(state: dict[Any, dict[str, Any]], fn: Any) -> dict[Any, dict[str, Any]]:
    # sorted keys: every process gathers the same tensors in the same order
    return {k: {s: fn(k, v) for s, v in sorted(state[k].items())} for k in sorted(state)}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (torch's index-keyed layout)."""
    sd = optimizer.state_dict()
    sd["state"] = _map_state(sd["state"], lambda _k, v: full_tensor(v) if is_sharded(v) else v)
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full (index-keyed) optimizer state; per-parameter tensors are sharded like their parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(k: int, v: Any) -> Any:
        ref = params[k]
        if is_sharded(ref) and torch.is_tensor(v) and tuple(v.shape) == tuple(ref.shape):
            return like(v.to(ref.dtype if v.is_floating_point() else v.dtype), ref)
        return v

    sd = {**sd, "state": _map_state(sd["state"], shard)}
    optimizer.load_state_dict(sd)


def full_ema_state(ema: Any) -> dict[str, Any]:
    """diffusers ``EMAModel.state_dict()`` with the shadow parameters gathered."""
    sd = ema.state_dict()
    sd["shadow_params"] = [full_tensor(t) for t in sd["shadow_params"]]
    return sd


def load_ema_state(ema: Any, sd: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Load a full EMA state; the shadow parameters are then sharded like ``params``."""
    ema.load_state_dict(sd)
    ema.shadow_params = [like(s, p) for s, p in zip(ema.shadow_params, params)]


def reshard(model: torch.nn.Module) -> None:
    """Put FSDP2 modules back to their shards after forward passes without a backward.

    FSDP2 leaves the root module unsharded after a forward (its backward would reshard it), and an
    unsharded module exposes its gathered full parameters, not the DTensor shards the optimizer, EMA and
    checkpoints work on: after an evaluation, a write to the shards would not reach the next forward.
    No-op without FSDP.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_supported(kind: str, fsdp_version: int | None = None, zero_stage: int | None = None) -> None:
    """Refuse the sharded modes this trainer cannot checkpoint, before any step runs."""
    if kind == "FSDP" and fsdp_version == 2:
        return
    if kind == "DEEPSPEED" and zero_stage in (0, 1, 2, 3):
        return
    if kind == "FSDP":
        raise NotImplementedError(
            f"accelerate is configured for FSDP version {fsdp_version}; diffattn's trainer supports FSDP2 "
            "(set `fsdp_version: 2` in the accelerate config, or `accelerate launch --fsdp_version 2`), "
            "whose DTensor parameters it gathers into full checkpoints"
        )
    if kind == "DEEPSPEED":
        raise NotImplementedError(
            f"accelerate is configured for DeepSpeed with zero_optimization.stage={zero_stage!r}; "
            "diffattn's trainer supports ZeRO stages 0-3"
        )
    if kind in SHARDED_KINDS:
        raise NotImplementedError(
            f"accelerate is configured for {kind}; diffattn's trainer supports FSDP2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2`), DeepSpeed ZeRO 0-3 and data parallel "
            "(DDP: `accelerate launch --multi_gpu` or `torchrun`)"
        )


def configure_deepspeed(config: dict[str, Any], batch_size: int, grad_accum: int, processes: int, clip: float) -> None:
    """Fill the DeepSpeed config's batch and clipping entries from the run's options.

    The trainer hands accelerate no data loader (it schedules micro-batches itself), so these cannot be
    inferred; a value the user's DeepSpeed config sets explicitly must agree with the options.
    """
    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * processes,
        "gradient_clipping": float(clip),
    }
    option = {
        "train_micro_batch_size_per_gpu": "--batch-size",
        "gradient_accumulation_steps": "--grad-accum",
        "train_batch_size": "--batch-size x --grad-accum x processes",
        "gradient_clipping": "--max-grad-norm",
    }
    for key, value in wanted.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif float(have) != float(value):
            raise ValueError(
                f"the DeepSpeed config sets {key}={have} but {option[key]} gives {value}; set it to "
                f'"auto" (or to {value}) in the DeepSpeed config'
            )


def gathered(model: torch.nn.Module, deepspeed: bool) -> Any:
    """A context in which ZeRO-3's partitioned weights of ``model`` are whole (a collective);
    a no-op otherwise (FSDP2 shards are gathered tensor by tensor with :func:`full_tensor`)."""
    if not deepspeed:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed as ds

    return ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def deepspeed_full_parameters(named: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The fp32 master weights ZeRO keeps in optimizer partitions, gathered whole (a collective).

    Under ZeRO the module's own weights are the low-precision copies (bf16 with ``--mixed-precision
    bf16``); the checkpoints and the saved LoRA take the fp32 masters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n in names:
        full = safe_get_full_fp32_param(named[n])
        out[n] = (full if full is not None else named[n]).detach().to("cpu", torch.float32).contiguous()
    return out


__all__ = [
    "check_supported",
    "configure_deepspeed",
    "deepspeed_full_parameters",
    "full_ema_state",
    "full_optimizer_state",
    "full_parameters",
    "full_tensor",
    "gathered",
    "is_sharded",
    "like",
    "load_ema_state",
    "load_optimizer_state",
    "load_parameters",
    "reshard",
]
