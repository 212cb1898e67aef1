"""Run diffattn's processors under diffusers' context parallelism on CPU processes (a test helper for torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cp_on_cpu.py OUT.pt

Every rank builds the tiny zoo transformers (``zoo:wan``, ``zoo:flux``: the zoo models with a ``_cp_plan``;
``zoo:hunyuan-video``, ``zoo:cogvideox``, ``zoo:mochi`` with the plan ``diffattn.processors.cp_plans`` supplies),
and for each case of :data:`CASES` takes a fresh copy, applies the method and calls
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` in the case's order, then calls the
transformer once on :func:`inputs` (fixed random tensors, ``return_dict=False`` as diffusers' output gather
hook wants). Rank 0 saves ``{case: output tensor, or "ErrorType: message"}`` to ``OUT.pt``; the test
(``tests/test_context_parallel.py``) compares it with the same cases run in one process.

diffusers 0.42's ``enable_parallelism`` picks each rank's device as ``rank % torch.accelerator.device_count()``,
which divides by zero on a machine without accelerators. This launcher, and nothing else, patches
``torch.accelerator.device_count`` to return 1 (the device it picks, ``cpu:0``, is where the models are
anyway); the library is not patched. The process group is gloo over localhost.

Importing this module has no side effects: the test imports :data:`CASES`, :func:`inputs` and :func:`prepare`.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

DEGREE = 2


@dataclass(frozen=True)
class Case:
    """One run: ``method`` (``None``: stock diffusers) with ``options`` on zoo model ``model``.

    ``order``: ``"apply-first"`` (``apply`` then ``enable_parallelism``) or ``"parallel-first"``;
    ``ring``: use ``ring_degree`` instead of ``ulysses_degree``; ``restore``: restore after both;
    ``shard_local``: replace the Ulysses exchange by attention within the rank's shard (the failure mode
    the test must catch); ``heads``: build the model with this many attention heads; ``pipeline``: run
    the whole zoo pipeline (:func:`run_pipeline`) instead of one transformer call.
    """

    name: str
    model: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    order: str = "apply-first"
    ring: bool = False
    restore: bool = False
    shard_local: bool = False
    heads: int | None = None
    pipeline: bool = False


# the gather backend: the sparse engine without FlexAttention's compile (tens of seconds per process)
# radial at Wan 2.1's decay on 5 frames of 4x4 tokens keeps 81% of the (query, key) pairs
RADIAL = {"granularity": "token", "block_size": 4, "decay_factor": 0.2, "backend": "gather"}
HILBERT = {"radius": 2, "block_size": 16, "backend": "gather"}  # 16x16 token grid
AGENT_WAN = {"num_agents": 4}  # 2x2 agents per frame, 5 frames: 20 agents for 80 tokens
AGENT_FLUX = {"num_agents": 16}  # 4x4 agents for 256 image tokens

# (model, method, options) pairs every method supports among the zoo models with a cp plan
PAIRS = [
    ("wan", "dense", {}),
    ("wan", "radial", RADIAL),
    ("wan", "agent", AGENT_WAN),
    ("wan-i2v", "dense", {}),  # I2V: the image-prompt branch of cross-attention
    ("wan-i2v", "radial", RADIAL),
    ("wan-i2v", "agent", AGENT_WAN),
    ("flux", "dense", {}),
    ("flux", "hilbert_local", HILBERT),
    ("flux", "agent", AGENT_FLUX),
    # the plans diffattn supplies (diffattn.processors.cp_plans)
    ("hunyuan-video", "dense", {}),
    ("hunyuan-video", "radial", RADIAL),
    ("cogvideox", "dense", {}),
    ("cogvideox", "radial", RADIAL),
    ("mochi", "dense", {}),
    ("mochi", "radial", RADIAL),
]
SUPPLIED = ("hunyuan-video", "cogvideox", "mochi")

CASES: list[Case] = [
    Case("wan-stock", "wan", None),
    Case("flux-stock", "flux", None),
    *(Case(f"{m}-{meth}-{order}", m, meth, opts, order=order)
      for m, meth, opts in PAIRS for order in ("apply-first", "parallel-first")),
    Case("wan-radial-restored", "wan", "radial", RADIAL, restore=True),
    # Wan 2.2's two transformers, 2 steps (the first dense: stock attention through diffusers' Ulysses)
    Case("wan22-radial-pipeline", "wan22", "radial", {**RADIAL, "dense_timesteps": 1}, pipeline=True),
    Case("wan-dense-shard-local", "wan", "dense", shard_local=True),
    Case("flux-dense-shard-local", "flux", "dense", shard_local=True),
    Case("cogvideox-dense-shard-local", "cogvideox", "dense", shard_local=True),
    # stock under the supplied plans: HunyuanVideo's processor does diffusers' Ulysses, CogVideoX's and
    # Mochi's call SDPA themselves and are refused at the call
    *(Case(f"{m}-stock", m, None) for m in SUPPLIED),
    Case("cogvideox-dense-restored", "cogvideox", "dense", restore=True),
    # bad input, refused before the first step: a token count the degree does not divide, padded text
    Case("error-tokens-wan", "wan-odd", "dense"),
    Case("error-text-flux", "flux-odd-text", "dense"),
    Case("error-padding-hunyuan-video", "hunyuan-video-padded", "dense"),
    Case("error-padding-hunyuan-video-stock", "hunyuan-video-padded", None),
    Case("error-padding-mochi", "mochi-padded", "radial", RADIAL),
    # refused before the first step
    Case("error-ring-apply-first", "wan", "radial", RADIAL, ring=True),
    Case("error-ring-parallel-first", "wan", "radial", RADIAL, order="parallel-first", ring=True),
    Case("error-heads-apply-first", "wan", "radial", RADIAL, heads=3),
    Case("error-heads-parallel-first", "wan", "dense", order="parallel-first", heads=3),
    Case("error-lamamba-apply-first", "flux", "lamamba"),
    Case("error-lamamba-parallel-first", "flux", "lamamba", order="parallel-first"),
]


def inputs(model: str) -> dict[str, torch.Tensor | bool]:
    """Fixed random transformer inputs (batch 2): Wan 5 latent frames of 8x8 latents (4x4 tokens after its
    2x2 patch), Flux a 16x16 token grid; 8 text tokens each (a multiple of the degree: Flux splits text)."""
    g = torch.Generator().manual_seed(7)
    if model == "wan-odd":  # 5 frames of 3x3 tokens: 45 tokens, not a multiple of 2
        return {**inputs("wan"), "hidden_states": torch.randn(2, 16, 5, 6, 6, generator=g)}
    if model == "flux-odd-text":
        return {**inputs("flux"), "encoder_hidden_states": torch.randn(2, 7, 32, generator=g), "txt_ids": torch.zeros(7, 3)}
    if model.endswith("-padded"):  # the last 3 text tokens of the second sample are padding
        base = inputs(model.removesuffix("-padded"))
        mask = torch.ones(2, 8)
        mask[1, 5:] = 0
        return {**base, "encoder_attention_mask": mask}
    if model == "hunyuan-video":  # 5 latent frames of 4x4 tokens (patch 2), 8 text tokens, no padding
        return {
            "hidden_states": torch.randn(2, 16, 5, 8, 8, generator=g),
            "timestep": torch.tensor([500.0, 250.0]),
            "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
            "encoder_attention_mask": torch.ones(2, 8),
            "pooled_projections": torch.randn(2, 32, generator=g),
            "guidance": torch.tensor([3500.0, 3500.0]),
            "return_dict": False,
        }
    if model == "cogvideox":  # (batch, frames, channels, h, w): 8 frames of 4x4 tokens; its 226 text tokens
        return {
            "hidden_states": torch.randn(2, 8, 16, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 226, 32, generator=g),
            "timestep": torch.tensor([500, 250]),
            "return_dict": False,
        }
    if model == "mochi":  # 5 latent frames of 4x4 tokens, 8 text tokens, no padding
        return {
            "hidden_states": torch.randn(2, 12, 5, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
            "timestep": torch.tensor([500.0, 250.0]),
            "encoder_attention_mask": torch.ones(2, 8),
            "return_dict": False,
        }
    if model == "wan":
        return {
            "hidden_states": torch.randn(2, 16, 5, 8, 8, generator=g),
            "timestep": torch.tensor([500.0, 250.0]),
            "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
            "return_dict": False,
        }
    if model == "wan-i2v":  # 16 noise + 4 mask + 16 image-latent channels; Wan's I2V text is 512 tokens
        return {
            "hidden_states": torch.randn(2, 36, 5, 8, 8, generator=g),
            "timestep": torch.tensor([500.0, 250.0]),
            "encoder_hidden_states": torch.randn(2, 512, 32, generator=g),
            "encoder_hidden_states_image": torch.randn(2, 65, 32, generator=g),
            "return_dict": False,
        }
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return {
        "hidden_states": torch.randn(2, 256, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([0.5, 0.25]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.stack([torch.zeros(256), rows.flatten(), cols.flatten()], dim=1),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


_BASE: dict[tuple[str, int | None], torch.nn.Module] = {}


def prepare(model: str, heads: int | None = None) -> torch.nn.Module:
    """A fresh copy of zoo model ``model``'s transformer (with ``heads`` attention heads when given)."""
    model = model.removesuffix("-padded").removesuffix("-odd-text").removesuffix("-odd")
    key = (model, heads)
    if key not in _BASE:
        from diffattn import zoo

        base = zoo.load(model).transformer
        if heads is not None:
            cfg = dict(base.config)
            cfg["num_attention_heads"] = heads
            torch.manual_seed(0)
            base = type(base)(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
        _BASE[key] = base
    return copy.deepcopy(_BASE[key])


def run(model: torch.nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(name))[0]


def pipeline_kwargs(model: str) -> dict[str, Any]:
    """A 2-step generation of 17 frames at 64x64: 5 latent frames of 4x4 tokens, as :func:`inputs`."""
    from diffattn import zoo

    return {**zoo.default_call_kwargs(model), "height": 64, "width": 64, "num_frames": 17, "output_type": "pt"}


def run_pipeline(pipe: Any, model: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**pipeline_kwargs(model)).frames


def _shard_local(attend, q, k, v, layout, attn_mask, **_):  # type: ignore[no-untyped-def]
    return attend(q, k, v, layout, attn_mask)


def run_case(case: Case) -> torch.Tensor:
    """The case under context parallelism on this rank (rank 0's view of the gathered output)."""
    from diffusers import ContextParallelConfig

    import diffattn
    import diffattn.processors.core as core
    from diffattn.processors import cp_plans

    degree = {"ring_degree": DEGREE} if case.ring else {"ulysses_degree": DEGREE}
    if case.pipeline:
        from diffattn import zoo

        model = zoo.load(case.model)
        denoisers = [m for m in (model.transformer, getattr(model, "transformer_2", None)) if m is not None]
    else:
        model = prepare(case.model, case.heads)
        denoisers = [model]

    def parallel() -> None:
        for m in denoisers:
            # Wan, Flux: their own _cp_plan; HunyuanVideo, CogVideoX, Mochi: the one diffattn supplies
            m.enable_parallelism(config=ContextParallelConfig(**degree), cp_plan=cp_plans.for_model(m))

    def apply() -> None:
        if case.method is not None:
            diffattn.apply(model, case.method, **case.options)

    steps = [apply, parallel] if case.order == "apply-first" else [parallel, apply]
    for step in steps:
        step()
    if case.restore:
        diffattn.restore(model)
    if case.pipeline:
        return run_pipeline(model, case.model)
    if case.shard_local:
        saved, core.ulysses_attention = core.ulysses_attention, _shard_local
        try:
            return run(model, case.model)
        finally:
            core.ulysses_attention = saved
    return run(model, case.model)


def main(out: str) -> None:
    import torch.distributed as dist

    # the one patch (see the module docstring): enable_parallelism divides by the accelerator count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for case in CASES:
        try:
            results[case.name] = run_case(case)
        except (ValueError, RuntimeError, AssertionError) as e:
            results[case.name] = f"{type(e).__name__}: {e}"
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
