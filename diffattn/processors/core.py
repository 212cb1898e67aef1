"""One diffusers attention processor for every supported model; methods only supply the attention core.

``CoreAttnProcessor`` reproduces what the stock processor of the module's family computes (see
``families.py``) and hands the projected, normalised, rotated ``(batch, heads, tokens, head_dim)`` q/k/v,
together with a :class:`TokenLayout`, to an :data:`AttentionCore`. Without a core, or on layers where
``applies`` says no, it calls the stock processor itself, so the result is bit-identical to stock.

Single-stream Flux blocks receive ``[text; image]`` already concatenated and the attention module cannot know
where the text ends (rotary embeddings cover both parts). The number of text tokens comes from, in order:

1. a ``text_len`` keyword of the call: ``transformer(..., joint_attention_kwargs={"text_len": n})`` reaches
   every Flux attention call, as diffusers forwards the keys the processor's ``__call__`` names;
2. :func:`track_text_len` (called by :func:`install_processor`): forward pre-hooks on the single-stream
   blocks, which get ``encoder_hidden_states`` separately, inject that ``text_len`` for each call — no state
   is kept between calls;
3. ``CoreAttnProcessor(text_len=n)``, a fixed value (e.g. 512 for FLUX.1-dev pipelines);
4. otherwise a ``ValueError`` says how to provide it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..ops.block_mask import BlockMask
from ..ops.block_sparse_attention import block_sparse_attention, resolve_backend
from .families import (
    FAMILY_ATTR,
    NAME_ATTR,
    TEXT_ONLY_ATTR,
    AttnCall,
    family_of_processor,
    get_family,
    infer_family,
)
from .layout import AttentionCore, TokenLayout, dense_core
from .parallel import check_context_parallel, ulysses_attention, ulysses_degree

__all__ = [
    "CoreAttnProcessor",
    "attention_modules",
    "install_processor",
    "set_processor_names",
    "track_text_len",
]

Applies = Callable[[nn.Module, TokenLayout], bool]
_TEXT_LEN_HOOK_ATTR = "_diffattn_text_len_hook"
_DENSE_NOTES: set[tuple] = set()  # (what, shape) already reported by note_dense_here


def note_dense_here(what: str, key: tuple, why: str) -> None:
    """Warn once per process and shape that a method computes dense attention here (no speed-up), instead
    of running dense silently: e.g. a mask that keeps every block at this size."""
    if (what, key) in _DENSE_NOTES:
        return
    _DENSE_NOTES.add((what, key))
    warnings.warn(f"{what} runs dense attention here: {why}", UserWarning, stacklevel=3)


class CoreAttnProcessor:
    """A diffusers attention processor whose attention product is an :data:`AttentionCore`.

    Args:
        core: the attention core; ``None`` means stock behaviour (the stock processor is called).
        family: the stock processor family (``"sd"``, ``"sd3"``, ``"flux"``, ``"wan"``, ``"hunyuan-video"``,
            ``"mochi"``, ``"cogvideox"``); ``None`` infers it per module (``infer_family``), cached on the module.
        applies: ``applies(attn, layout)``; where it returns False the layer runs the stock processor.
        text_len: text tokens at the start of single-stream Flux sequences, when not given per call.

    Methods subclass this and override ``core`` (a method ``core(self, q, k, v, layout, attn_mask)``),
    ``applies`` (a method ``applies(self, attn, layout)``) or ``attention``.
    """

    # Class-level defaults so subclasses may define `core`/`applies` as methods; __init__ only shadows them
    # when given.
    core: AttentionCore | None = None
    # Set by diffusers' `set_attention_backend`/context parallelism on whatever processor a module holds;
    # forwarded to the stock processor when this one falls back to it. `_parallel_config` is a property
    # (below) that refuses, when it is set, a context-parallel config this processor cannot honour.
    _attention_backend: Any = None
    # True, or why this processor cannot run under context parallelism (see processors/parallel.py)
    context_parallel: Any = True

    def __init__(
        self,
        core: AttentionCore | None = None,
        family: str | None = None,
        applies: Applies | None = None,
        text_len: int | None = None,
    ) -> None:
        if core is not None:
            self.core = core
        if applies is not None:
            self.applies = applies  # type: ignore[method-assign]
        if family is not None:
            get_family(family)  # validate the name early
        self.family = family
        self.text_len = text_len
        self._stock: dict[type, Any] = {}

    # ----- context parallelism ---------------------------------------------------------------------------

    @property
    def _parallel_config(self) -> Any:
        """What diffusers' ``enable_parallelism`` set (a ``ParallelConfig``), or ``None``."""
        return self.__dict__.get("_diffattn_parallel_config")

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        # Checked when set (enable_parallelism after apply, or apply after it), i.e. before any step.
        check_context_parallel(self, config, self.__dict__.get("_diffattn_heads", ()))
        self.__dict__["_diffattn_parallel_config"] = config

    def serve(self, attn: nn.Module) -> None:
        """Record that this processor runs on ``attn`` (its head count is checked against a Ulysses degree).

        Raises:
            ValueError: a context-parallel config is set already and its degree does not divide the heads.
        """
        heads = getattr(attn, "heads", None)
        if isinstance(heads, int):
            known = self.__dict__.setdefault("_diffattn_heads", set())
            check_context_parallel(self, self._parallel_config, {*known, heads})
            known.add(heads)

    # ----- what methods override -------------------------------------------------------------------------

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        """Whether the core replaces the stock attention on this call (default: everywhere)."""
        return True

    def sparse_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bm: BlockMask, backend: str = "auto"
    ) -> torch.Tensor:
        """The engine on one call, remembering the backend it ran and the mask for :meth:`describe`."""
        resolved = resolve_backend(q, k, v, bm, backend)
        self.last_sparse_call = (resolved, bm)
        key = (bm.q_len, bm.kv_len, bm.block_size)
        # once per shape (one host read of the bitmap), never inside a compiled graph
        if (type(self).__name__, key) not in _DENSE_NOTES and not torch.compiler.is_compiling() and bool(bm.bitmap.all()):
            note_dense_here(
                type(self).__name__, key,
                f"at {bm.q_len} tokens the mask keeps every {bm.block_size}-token block, so there is no speed-up "
                "(a longer sequence or a smaller block_size makes it sparse)",
            )
        return block_sparse_attention(q, k, v, bm, backend=resolved)

    def describe(self) -> str:
        """What the last block-sparse call ran: backend, block density and tokens (``""`` before any)."""
        last = getattr(self, "last_sparse_call", None)
        if last is None:
            return ""
        backend, bm = last
        return f"backend {backend}, block density {bm.density():.3f} at {bm.q_len} tokens"

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The attention product on (batch, heads, tokens, head_dim): ``self.core``, or dense SDPA without one."""
        core = self.core
        if core is None:
            return dense_core(q, k, v, layout, attn_mask)
        return core(q, k, v, layout, attn_mask)

    @property
    def has_core(self) -> bool:
        """False when this processor would compute exactly the stock attention (no core, ``attention`` as is)."""
        return self.core is not None or type(self).attention is not CoreAttnProcessor.attention

    # ----- plumbing --------------------------------------------------------------------------------------

    def family_of(self, attn: nn.Module, has_rotary: bool | None = None) -> str:
        """The family used for ``attn``: the explicit one, else inferred once and cached on the module."""
        if self.family is not None:
            return self.family
        fam = getattr(attn, FAMILY_ATTR, None)
        if fam is None:
            fam = infer_family(attn, has_rotary=has_rotary)
            setattr(attn, FAMILY_ATTR, fam)
        return fam

    def stock_processor(self, family: str, attn: nn.Module) -> Any:
        """This processor's (cached) stock processor for ``family`` on ``attn``."""
        cls = get_family(family).stock_type(attn)
        cached = self._stock.get(cls)
        if cached is None:
            cached = self._stock[cls] = cls()
        # Follow `set_attention_backend`/parallel config changes made on this processor.
        if hasattr(cached, "_attention_backend"):
            cached._attention_backend = self._attention_backend
            cached._parallel_config = self._parallel_config
        return cached

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *,
        rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        text_len: int | None = None,
    ) -> Any:
        # Parameter names matter: Attention/FluxAttention.forward only forward the keyword arguments named
        # here. FluxAttention and WanAttention pass their rotary embedding positionally as the 5th argument,
        # which lands in `image_rotary_emb` whatever the module calls it.
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        family = get_family(self.family_of(attn, has_rotary=rotary is not None))
        call = AttnCall(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            rotary=rotary,
            temb=temb,
            text_len=text_len if text_len is not None else self.text_len,
        )
        # under Ulysses, layers on the split sequence (not HunyuanVideo's text-only token refiner, which runs
        # on the whole prompt on every rank) exchange tokens for heads around the attention product
        ulysses = ulysses_degree(self._parallel_config) > 1 and not getattr(attn, TEXT_ONLY_ATTR, False)
        layout = family.layout(attn, call) if self.has_core else None
        attend = self.attention
        if layout is None or not self.applies(attn, layout):
            stock = self.stock_processor(family.name, attn)
            if not ulysses or hasattr(stock, "_parallel_config"):
                return family.call_stock(stock, attn, call)
            # this family's stock processor (CogVideoX, Mochi) calls SDPA itself and ignores the parallel
            # config: run its math here, dense, with the Ulysses exchange
            layout = layout if layout is not None else family.layout(attn, call)
            attend = dense_core
        if ulysses:
            # the core runs on the full sequence (heads / N per rank), not on this rank's shard
            context = getattr(self, "context", None)
            attend = functools.partial(
                ulysses_attention, attend, config=self._parallel_config,
                total_text=getattr(context, "n_text", None) or None,
            )
        return family.run(attn, call, layout, attend)

    def __repr__(self) -> str:
        core = getattr(self.core, "__name__", type(self.core).__name__) if self.core is not None else None
        return f"{type(self).__name__}(core={core}, family={self.family!r})"


# ----- model helpers ---------------------------------------------------------------------------------------


def _is_attention_module(module: nn.Module) -> bool:
    # Attention/FluxAttention/WanAttention have set_processor; MochiAttention only a `processor` attribute.
    return hasattr(module, "processor") and (hasattr(module, "set_processor") or hasattr(module, "to_q"))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module of ``model`` by qualified name (including MochiAttention, which diffusers'
    ``attn_processors`` does not list)."""
    return {name: m for name, m in model.named_modules() if _is_attention_module(m)}


def set_processor_names(model: nn.Module) -> list[str]:
    """Record on each attention module of ``model`` what a processor cannot see from the module alone.

    * its qualified name (``TokenLayout.layer``);
    * its family, read from the stock processor it holds now (so call this before replacing processors);
    * for HunyuanVideo's token refiner, that it attends over text tokens only (its layout then has
      ``n_text`` = all tokens and ``text_valid`` from the prompt mask).

    Returns the names of the attention modules.
    """
    modules = attention_modules(model)
    for name, module in modules.items():
        setattr(module, NAME_ATTR, name)
        fam = family_of_processor(module.processor)
        if fam is not None:
            setattr(module, FAMILY_ATTR, fam)
    for module in model.modules():
        if type(module).__name__ in ("HunyuanVideoTokenRefiner", "HunyuanVideoIndividualTokenRefiner"):
            for sub in module.modules():
                if _is_attention_module(sub):
                    setattr(sub, TEXT_ONLY_ATTR, True)
    return list(modules)


def _text_len_hook(
    signature: inspect.Signature,
) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    # The signature is the block class's `forward` (with `self`): a module's bound `forward` may be wrapped by
    # offloading/caching hooks that hide the parameter names.
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Only when our processor runs, so that a stock FluxAttention does not warn about an unknown kwarg.
        if not isinstance(getattr(block.attn, "processor", None), CoreAttnProcessor):
            return None
        bound = signature.bind(block, *args, **kwargs)
        ehs = bound.arguments.get("encoder_hidden_states")
        if ehs is None:
            return None
        extra = dict(bound.arguments.get("joint_attention_kwargs") or {})
        extra["text_len"] = ehs.shape[1]
        bound.arguments["joint_attention_kwargs"] = extra
        return bound.args[1:], bound.kwargs

    return hook


def track_text_len(model: nn.Module) -> list[RemovableHandle]:
    """Make single-stream Flux blocks tell their attention how many text tokens lead the sequence.

    Registers a forward pre-hook on every block whose ``attn`` is a single-stream ``FluxAttention`` and whose
    ``forward`` takes ``encoder_hidden_states`` and ``joint_attention_kwargs`` (FluxSingleTransformerBlock,
    also inside Flux ControlNets); while a ``CoreAttnProcessor`` is set, the hook adds
    ``text_len=encoder_hidden_states.shape[1]`` to that call's ``joint_attention_kwargs``. Idempotent.
    Returns the new hook handles.
    """
    handles = []
    for block in model.modules():
        attn = getattr(block, "attn", None)
        if type(attn).__name__ != "FluxAttention" or getattr(attn, "added_kv_proj_dim", None) is not None:
            continue
        signature = inspect.signature(type(block).forward)
        if not {"encoder_hidden_states", "joint_attention_kwargs"} <= set(signature.parameters):
            continue
        previous = getattr(block, _TEXT_LEN_HOOK_ATTR, None)
        if previous is not None and previous.id in block._forward_pre_hooks:
            continue  # already tracked (and not removed since)
        handle = block.register_forward_pre_hook(_text_len_hook(signature), with_kwargs=True)
        setattr(block, _TEXT_LEN_HOOK_ATTR, handle)
        handles.append(handle)
    return handles


def install_processor(model: nn.Module, processor: Any) -> list[str]:
    """Put ``processor`` on the attention modules of ``model`` that run a supported stock processor.

    Works for MochiAttention too (diffusers' ``set_attn_processor`` does not reach it). Modules holding any
    other processor (IP-Adapter, added-KV, PAG, ...) keep it, since replacing it would drop what it adds.
    Calls :func:`set_processor_names` first (while the stock processors are still there) and
    :func:`track_text_len`. Returns the names of the modules that got ``processor``.
    """
    set_processor_names(model)
    track_text_len(model)
    installed = []
    for name, module in attention_modules(model).items():
        current = module.processor
        if family_of_processor(current) is None and not isinstance(current, CoreAttnProcessor):
            continue
        if isinstance(processor, CoreAttnProcessor):
            processor.serve(module)
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor
        installed.append(name)
    return installed
