"""Context-parallel plans for the video transformers that diffusers 0.42 ships without one.

diffusers' ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N), cp_plan=...)`` splits the
model's token sequence over N ranks where the plan says: a plan maps a submodule name (``""``: the model
itself, ``"blocks.*"``: every block) to the inputs it splits (``ContextParallelInput``; with
``split_output=True``, the outputs) or to the outputs it gathers (``ContextParallelOutput``). Wan and Flux
have a ``_cp_plan``; HunyuanVideo, CogVideoX and Mochi do not, and :func:`for_model` supplies one::

    from diffusers import ContextParallelConfig
    from diffattn.processors import cp_plans

    diffattn.apply(pipe, "radial", ...)  # before or after enable_parallelism
    pipe.transformer.enable_parallelism(
        config=ContextParallelConfig(ulysses_degree=2), cp_plan=cp_plans.for_model(pipe.transformer)
    )

Each plan splits the patchified video tokens and the text tokens into N contiguous chunks, so rank ``r``
holds the joint sequence ``[video_r; text_r]`` (CogVideoX: ``[text_r; video_r]``), with the rotary
embeddings of its video chunk; the output projection's tokens are gathered back. What the plans split:

* HunyuanVideo: the outputs of ``x_embedder`` (video tokens), ``context_embedder`` (text tokens, after the
  token refiner has run on the whole prompt) and ``rope`` (cos / sin per video token). The joint mask the
  model builds from those local lengths is right only when no text token is padding (see below).
* CogVideoX: ``transformer_blocks.0``'s ``hidden_states`` and ``encoder_hidden_states`` (after the patch
  embedding, which adds positions over the whole sequence) and, for the models with rotary embeddings, the
  model's ``image_rotary_emb`` (the pipeline passes it by keyword). Its 226 text tokens are split too, so
  ``ulysses_degree`` 2 is the only degree that divides them (226 = 2 x 113).
* Mochi: the text output of ``time_embed`` (after it pooled the whole prompt), the video tokens at
  ``transformer_blocks.0``, the ``rope`` output, and every block's ``encoder_attention_mask``.

:func:`for_model` also registers a forward pre-hook on the model (:func:`check_call`, once) that refuses,
before any work of a call under context parallelism, what these plans cannot run exactly:

* a token count the degree does not divide (video tokens, and the text tokens every plan splits);
* text padding (HunyuanVideo, Mochi): HunyuanVideo builds its joint key mask in ``forward`` from the number
  of valid text tokens and the *local* lengths, so every rank's text chunk would be masked as if it
  started at text token 0; Mochi's processor drops each sample's padded text tokens, so ranks would hold
  different numbers of tokens. Neither can be fixed by a plan without changing diffusers; encode the
  prompt without padding (``prompt_embeds`` cut to the valid tokens, a length the degree divides);
* attention layers on the split sequence whose processor ignores the parallel config: diffusers'
  ``CogVideoXAttnProcessor2_0`` and ``MochiAttnProcessor2_0`` call ``F.scaled_dot_product_attention``
  themselves, so stock CogVideoX and Mochi would attend within each rank's shard. diffattn's processors
  (``dense`` computes exactly the stock attention) do the Ulysses exchange: apply one of them.

HunyuanVideo's ``token_replace`` variant (image-to-video) is refused: its blocks treat the first
``first_frame_num_tokens`` tokens of the *local* sequence as the first frame.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..context import AttentionContext, record_grid
from .parallel import model_parallel_config, ulysses_degree

__all__ = ["SUPPLIED", "check_call", "for_model"]

# the denoisers whose plan this module supplies, and the blocks whose attention sees the split sequence
SUPPLIED: dict[str, tuple[str, ...]] = {
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "MochiTransformer3DModel": ("transformer_blocks",),
}
_GUARD = "_diffattn_cp_guard"  # on a model: the handle of check_call's pre-hook


def _plan(name: str, rotary: bool = False) -> dict[str, Any]:
    from diffusers.models._modeling_parallel import ContextParallelInput as In
    from diffusers.models._modeling_parallel import ContextParallelOutput as Out

    def tokens(**kw: Any) -> Any:  # (batch, tokens, channels)
        return In(split_dim=1, expected_dims=3, **kw)

    gather = Out(gather_dim=1, expected_dims=3)
    if name == "HunyuanVideoTransformer3DModel":
        return {
            "x_embedder": {0: tokens(split_output=True)},
            "context_embedder": {0: tokens(split_output=True)},
            "rope": {i: In(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},  # (tokens, dim)
            "proj_out": gather,
        }
    if name == "CogVideoXTransformer3DModel":
        plan = {
            "transformer_blocks.0": {"hidden_states": tokens(), "encoder_hidden_states": tokens()},
            "proj_out": gather,
        }
        if rotary:  # CogVideoX 1.5 / 1.0-5B: (cos, sin) per video token; 1.0-2B adds sincos positions instead
            plan[""] = {"image_rotary_emb": [In(split_dim=0, expected_dims=2) for _ in range(2)]}
        return plan
    if name == "MochiTransformer3DModel":
        return {
            "time_embed": {1: tokens(split_output=True)},  # (temb, text)
            "transformer_blocks.0": {"hidden_states": tokens()},
            "transformer_blocks.*": {"encoder_attention_mask": In(split_dim=1, expected_dims=2)},
            "rope": {i: In(split_dim=0, expected_dims=3, split_output=True) for i in (0, 1)},  # (tokens, heads, dim)
            "proj_out": gather,
        }
    raise AssertionError(name)


def for_model(model: nn.Module) -> dict[str, Any]:
    """The cp plan for ``model``: diffusers' own ``_cp_plan`` when it has one, else the one this module
    supplies (HunyuanVideo, CogVideoX, Mochi). For a supplied plan it also registers :func:`check_call`
    as a forward pre-hook on ``model`` (once), so what the plan cannot run exactly is refused before any
    work of a call.

    Raises:
        ValueError: a model with neither (naming the ones supported), or HunyuanVideo's ``token_replace``
            variant.
    """
    model = getattr(model, "_orig_mod", model)
    name = type(model).__name__
    own = getattr(model, "_cp_plan", None)
    if name not in SUPPLIED:
        if own is not None:
            return own
        raise ValueError(
            f"{name} has no cp plan: diffusers 0.42 ships one for Wan and Flux (their _cp_plan), diffattn one "
            f"for {', '.join(sorted(SUPPLIED))}"
        )
    if name == "HunyuanVideoTransformer3DModel" and getattr(model.config, "image_condition_type", None) == "token_replace":
        raise ValueError(
            "HunyuanVideo with image_condition_type='token_replace' cannot be split by a cp plan: its blocks "
            "modulate the first first_frame_num_tokens tokens of each rank's local sequence as the first frame, "
            "which only rank 0 holds"
        )
    if _GUARD not in model.__dict__:
        model.__dict__[_GUARD] = model.register_forward_pre_hook(_guard, with_kwargs=True)
    return _plan(name, rotary=bool(getattr(model.config, "use_rotary_positional_embeddings", False)))


def _guard(module: nn.Module, args: tuple, kwargs: dict) -> None:
    check_call(module, args, kwargs)


def _arg(args: tuple, kwargs: dict, model: nn.Module, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    import inspect

    params = list(inspect.signature(type(model).forward).parameters)[1:]
    i = params.index(name) if name in params else len(args)
    return args[i] if i < len(args) else None


def check_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse a call of ``model`` under Ulysses that its cp plan cannot run exactly (nothing without context
    parallelism). ``args`` / ``kwargs``: the model's full forward arguments (a forward pre-hook's).

    Raises:
        ValueError: naming the degree and the rule: the video tokens or the split text tokens are not a
            multiple of ``ulysses_degree``, padded text (HunyuanVideo, Mochi), or (supplied plans) an
            attention layer on the split sequence whose processor ignores context parallelism.
    """
    model = getattr(model, "_orig_mod", model)
    config = model_parallel_config(model)
    degree = ulysses_degree(config)
    if degree <= 1:
        return
    name = type(model).__name__
    ctx = AttentionContext()
    record_grid(ctx, model, args, kwargs)
    if ctx.grid is not None:
        n_video = math.prod(ctx.grid)
        if n_video % degree:
            raise ValueError(
                f"{name}: {n_video} video tokens ({ctx.grid[0]} x {ctx.grid[1]} x {ctx.grid[2]} after patchify) "
                f"cannot be split over ulysses_degree={degree}: the cp plan gives every rank an equal share, so "
                f"the degree must divide the number of tokens; pick a size whose token count is a multiple of {degree}"
            )
    # every plan of a joint-attention model splits the text as well (Flux, HunyuanVideo, CogVideoX, Mochi)
    if ctx.n_text and ctx.n_text % degree:
        raise ValueError(
            f"{name}: {ctx.n_text} text tokens cannot be split over ulysses_degree={degree}: the cp plan splits "
            f"the text like the video tokens, so the degree must divide the number of text tokens; pad or cut "
            f"the prompt embeddings to a multiple of {degree}"
        )
    if name not in SUPPLIED:
        return
    if name != "CogVideoXTransformer3DModel":
        mask = _arg(args, kwargs, model, "encoder_attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
            raise ValueError(
                f"{name}: the prompt has padded text tokens (encoder_attention_mask has zeros), which the cp plan "
                f"cannot split over ulysses_degree={degree}: "
                + ("HunyuanVideo builds its joint mask from the number of valid text tokens and each rank's local "
                   "length, so every rank's text chunk would be masked as if it started at token 0"
                   if name.startswith("Hunyuan") else
                   "Mochi drops each sample's padded text tokens, so the ranks would hold different numbers of tokens")
                + f"; pass prompt_embeds cut to the valid tokens (a multiple of {degree}) with an all-ones mask"
            )
    for prefix in SUPPLIED[name]:
        blocks = getattr(model, prefix, None)
        for qual, sub in (blocks.named_modules(prefix=prefix) if blocks is not None else ()):
            processor = getattr(sub, "processor", None)
            if processor is None or not hasattr(sub, "to_q"):  # attention modules only
                continue
            if getattr(processor, "_parallel_config", None) is None:
                raise ValueError(
                    f"{name}.{qual}: its processor {type(processor).__name__} ignores context parallelism (it calls "
                    f"F.scaled_dot_product_attention itself), so under ulysses_degree={degree} it would attend "
                    "within each rank's shard only. Apply a diffattn method first (diffattn.apply(model, 'dense') "
                    "computes exactly the stock attention with the Ulysses exchange)"
                )
