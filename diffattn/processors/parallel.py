"""Context parallelism (Ulysses) for diffattn's processors: the one place that talks to other ranks.

diffusers' ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` splits the model's
token sequence over N ranks (the model's ``_cp_plan`` says which inputs are split) and sets
``_parallel_config`` on every attention processor. The stock processors then hand q/k/v to
``dispatch_attention_fn``, which runs Ulysses: an all-to-all turns each rank's ``(tokens / N, heads)`` into
``(tokens, heads / N)``, attention runs over the whole sequence, and a second all-to-all brings the output
back. A diffattn core computes the attention product itself, so it would attend within the rank's shard
only; :func:`ulysses_attention` wraps the core in the same two all-to-alls instead (the engine in
``ops`` stays single-device math). The cores' masks depend on token positions only, never on the head, so
they need no change (a core with per-head masks would need the rank's head offset:
``rank * heads / N``; no built-in method has one).

What a core sees under Ulysses is the full sequence, in the layout it expects:

* the visual tokens of every rank's shard, in rank order, are the model's visual tokens in order (the
  cp plans split the patchified sequence into contiguous chunks);
* when the plan also splits the text (Flux), each rank's joint sequence is ``[text_r; visual_r]``, so the
  gathered sequence ``[text_0; visual_0; text_1; visual_1; ...]`` is permuted to ``[text; visual]`` before
  the core and back after it, and the layout's ``n_text`` is the total;
* cross-attention keys (Wan's text) are not split: after the all-to-all they are repeated N times, which
  leaves softmax attention unchanged (the same as diffusers' own Ulysses does).

The grid ``apply`` records comes from the model's forward pre-hook, which runs before diffusers' split
hooks, so it describes the full input already.

Not supported, refused with a ``ValueError`` when the config is set (``enable_parallelism`` after
``apply``) or at ``apply`` (after ``enable_parallelism``), before any step: ``ring_degree > 1`` (use
Ulysses), ``ulysses_anything`` (uneven shards), a ``ulysses_degree`` that does not divide a layer's number
of heads, and processors that are not head-parallel (``lamamba``'s SS2D branch mixes all channels,
AgentSD merges tokens across the whole UNet sequence).
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import AttentionCore, TokenLayout

__all__ = [
    "check_context_parallel",
    "context_parallel_config",
    "follow_model",
    "gather_sequence",
    "joint_order",
    "model_parallel_config",
    "scatter_sequence",
    "ulysses_attention",
    "ulysses_degree",
]


def context_parallel_config(config: Any) -> Any:
    """The ``ContextParallelConfig`` inside what diffusers sets as ``_parallel_config`` (a ``ParallelConfig``,
    or a bare ``ContextParallelConfig``), or ``None`` (no config, or tensor parallelism only)."""
    if config is None:
        return None
    if hasattr(config, "ulysses_degree"):
        return config
    return getattr(config, "context_parallel_config", None)


def ulysses_degree(config: Any) -> int:
    """The Ulysses degree of a parallel config (1: no context parallelism)."""
    cp = context_parallel_config(config)
    return int(getattr(cp, "ulysses_degree", None) or 1) if cp is not None else 1


def check_context_parallel(processor: Any, config: Any, heads: set[int] | tuple[int, ...] = ()) -> None:
    """Refuse a context-parallel config that ``processor`` cannot honour.

    Args:
        processor: a diffattn processor; ``processor.context_parallel`` is True or says why it cannot run
            under Ulysses.
        config: what diffusers sets as ``_parallel_config`` (``None`` passes).
        heads: the head counts of the layers the processor serves (checked against the degree).

    Raises:
        ValueError: naming the degree and the rule: ring attention, ``ulysses_anything``, a processor
            that cannot run head-parallel, or a Ulysses degree that does not divide a layer's heads.
    """
    cp = context_parallel_config(config)
    if cp is None:
        return
    name = type(processor).__name__
    ring = int(getattr(cp, "ring_degree", None) or 1)
    degree = int(getattr(cp, "ulysses_degree", None) or 1)
    if ring == 1 and degree == 1:
        return
    why_not = getattr(processor, "context_parallel", True)
    if why_not is not True:
        raise ValueError(
            f"{name} does not run under context parallelism: {why_not}. Run it without "
            "enable_parallelism (diffattn.restore(...) first if it is applied), or use dense, radial, "
            "hilbert_local or agent (transformers) with ContextParallelConfig(ulysses_degree=N)"
        )
    if ring > 1:
        raise ValueError(
            f"{name} supports Ulysses context parallelism only, got ring_degree={ring}: "
            "use ContextParallelConfig(ulysses_degree=N) (ring_degree=1)"
        )
    if getattr(cp, "ulysses_anything", False):
        raise ValueError(
            f"{name} needs equal shards under Ulysses, got ulysses_anything=True: use "
            "ContextParallelConfig(ulysses_degree=N) with N dividing the heads and the sequence"
        )
    bad = sorted(h for h in set(heads) if h % degree)
    if bad:
        raise ValueError(
            f"ulysses_degree={degree} does not divide the {bad[0]} attention heads of a layer {name} "
            "runs: Ulysses gives each rank heads / ulysses_degree heads, so the degree "
            "must divide the number of heads"
        )


def _group(cp: Any) -> Any:
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise RuntimeError(
            "the context-parallel config has no Ulysses mesh yet: set it with model.enable_parallelism(config=...)"
        )
    return mesh.get_group()


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-to-all over dim 0 (chunk i goes to rank i; the result's chunk j came from rank j)."""
    import torch.distributed._functional_collectives as funcol

    shape = x.shape
    flat = x.contiguous().flatten()
    exchange = funcol.all_to_all_single_autograd if flat.requires_grad else funcol.all_to_all_single
    out = exchange(flat, None, None, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out.reshape(shape)


def gather_sequence(x: torch.Tensor, degree: int, group: Any) -> torch.Tensor:
    """``(batch, heads, n_local, d)`` on every rank -> ``(batch, heads / degree, degree * n_local, d)``:
    rank r keeps heads ``[r * heads / degree, (r + 1) * heads / degree)`` of every rank's shard, in rank
    order."""
    b, h, n, d = x.shape
    x = x.reshape(b, degree, h // degree, n, d).permute(1, 0, 2, 3, 4)
    x = _all_to_all(x, group)  # (degree: source rank, b, h / degree, n, d)
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // degree, degree * n, d)


def scatter_sequence(x: torch.Tensor, degree: int, group: Any) -> torch.Tensor:
    """The inverse of :func:`gather_sequence`: ``(batch, heads / degree, degree * n_local, d)`` ->
    ``(batch, heads, n_local, d)``."""
    b, h, n, d = x.shape
    x = x.reshape(b, h, degree, n // degree, d).permute(2, 0, 1, 3, 4)
    x = _all_to_all(x, group)  # (degree: source rank = head group, b, h, n_local, d)
    return x.permute(1, 0, 2, 3, 4).reshape(b, degree * h, n // degree, d)


def joint_order(n_local: int, n_text_local: int, text_position: str | None, degree: int) -> torch.Tensor | None:
    """Indices that turn the gathered ``[text_0; visual_0; text_1; ...]`` (``text_position="first"``) or
    ``[visual_0; text_0; ...]`` (``"last"``) into one text run and one visual run in rank order; ``None``
    when there is no text (the gathered sequence is already in order)."""
    if not n_text_local or degree == 1:
        return None
    starts = torch.arange(degree)[:, None] * n_local
    text = torch.arange(n_text_local)[None, :]
    visual = torch.arange(n_local - n_text_local)[None, :]
    if text_position == "first":
        parts = [starts + text, starts + n_text_local + visual]
    else:
        parts = [starts + visual, starts + (n_local - n_text_local) + text]
    return torch.cat([p.flatten() for p in parts])


def ulysses_attention(
    attend: AttentionCore,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    attn_mask: torch.Tensor | None,
    *,
    config: Any,
    total_text: int | None = None,
) -> torch.Tensor:
    """Run ``attend`` on the full sequence from one rank's shard: all-to-all, the core, all-to-all back.

    Args:
        attend: the core, ``attend(q, k, v, layout, attn_mask)`` on ``(batch, heads, tokens, d)``.
        q, k, v: this rank's ``(batch, heads, n_local, d)`` (keys may be longer: cross-attention).
        layout: the layout of this rank's call (``n_text``: the text tokens of its shard).
        attn_mask: ``None`` or a key mask ``(batch, 1, 1, keys)``; masks per query are refused.
        config: the processor's ``_parallel_config``.
        total_text: the text tokens of the whole sequence when known (``apply``'s recorded context): the
            shards' text must add up to it.

    Returns:
        this rank's ``(batch, heads, n_local, d)`` output.
    """
    cp = context_parallel_config(config)
    degree = int(cp.ulysses_degree)
    group = _group(cp)
    heads = q.shape[1]
    if heads % degree:
        raise ValueError(
            f"ulysses_degree={degree} does not divide the {heads} heads of layer {layout.layer}: the degree "
            "must divide the number of heads"
        )
    if layout.text_valid is not None and bool((layout.text_valid < layout.n_text).any()):
        raise ValueError(
            f"layer {layout.layer}: padded text tokens are not supported under context parallelism "
            f"(ulysses_degree={degree}): pass prompt embeddings cut to the valid tokens"
        )
    n_local, nk_local = q.shape[2], k.shape[2]
    joint = not layout.is_cross and layout.n_text > 0
    if joint and total_text and layout.n_text * degree != total_text:
        raise ValueError(
            f"layer {layout.layer}: each rank holds {layout.n_text} of the {total_text} text tokens; with "
            f"ulysses_degree={degree} the cp plan must split the text like the visual tokens (or not at all "
            "for cross-attention)"
        )
    q, k, v = (gather_sequence(x, degree, group) for x in (q, k, v))
    mask = None
    if attn_mask is not None:
        if attn_mask.ndim != 4 or attn_mask.shape[-2] != 1 or attn_mask.shape[1] != 1:
            raise ValueError(
                f"layer {layout.layer}: only key masks (batch, 1, 1, keys) are supported under context "
                f"parallelism, got a mask of shape {tuple(attn_mask.shape)}"
            )
        # every rank's key mask, in rank order, like the keys
        import torch.distributed as dist

        parts = [torch.empty_like(attn_mask) for _ in range(degree)]
        dist.all_gather(parts, attn_mask.contiguous(), group=group)
        mask = torch.cat(parts, dim=-1)
    order = joint_order(n_local, layout.n_text, layout.text_position, degree) if joint else None
    if order is None:
        glayout = layout
    else:
        if nk_local != n_local:
            raise ValueError(f"layer {layout.layer}: joint attention with {n_local} queries but {nk_local} keys")
        order = order.to(q.device)
        q, k, v = (x.index_select(2, order) for x in (q, k, v))
        if mask is not None:
            mask = mask.index_select(-1, order)
        # every text token is valid here (padding was refused above); a core that reads per-sample text
        # lengths next to a key mask (radial on HunyuanVideo) gets the whole sequence's
        valid = None if layout.text_valid is None else torch.full_like(layout.text_valid, layout.n_text * degree)
        glayout = TokenLayout(
            layout.family, is_cross=False, n_text=layout.n_text * degree, text_position=layout.text_position,
            text_valid=valid, layer=layout.layer,
        )
    out = attend(q, k, v, glayout, mask)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))
    return scatter_sequence(out, degree, group)


def model_parallel_config(model: Any) -> Any:
    """The ``ParallelConfig`` ``enable_parallelism`` recorded on ``model`` when it holds context
    parallelism, else ``None`` (tensor parallelism stays out of the processors, as in diffusers)."""
    config = getattr(model, "_parallel_config", None)
    return config if context_parallel_config(config) is not None else None


def follow_model(processor: Any, module: Any, model: Any) -> None:
    """Make ``processor``, about to serve attention ``module`` of ``model``, agree with the model's context
    parallelism: record the module's heads and, when ``enable_parallelism`` ran already, take its config
    (checked), as diffusers would have set it. The order of ``apply`` and ``enable_parallelism`` then
    does not matter.

    Raises:
        ValueError: the model's context-parallel config is one ``processor`` cannot honour.
    """
    serve = getattr(processor, "serve", None)
    if callable(serve):
        serve(module)
    config = model_parallel_config(model)
    if config is not None and hasattr(processor, "_parallel_config"):
        processor._parallel_config = config
