"""Block masks: which query block sees which key block, plus optional token-level refinements.

A sparse method describes its pattern as a boolean *bitmap* over (query block, key block) pairs. The
engine pays for every kept block, so the bitmap is the cost model. Three optional refinements act at
token level inside kept blocks:

- ``token_rule(b, h, q_idx, kv_idx) -> bool`` (FlexAttention ``mask_mod`` convention, broadcastable
  integer tensors): tokens of a kept block pair may still be masked.
- ``dense_q`` / ``dense_kv``: half-open token ranges whose rows (columns) are fully visible, e.g. text
  tokens placed first or last in a joint sequence. They override the bitmap and the rule.
- ``key_padding``: ``(batch, kv_len)`` bool, False for keys nobody may see (padded text). It overrides
  everything, dense ranges included.

Every query token must see at least one key, or its output row is defined as zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TokenRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def num_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A block-level attention pattern for ``q_len`` queries and ``kv_len`` keys.

    Args:
        bitmap: bool tensor ``(q_blocks, k_blocks)``, ``(heads, q_blocks, k_blocks)`` or
            ``(batch, heads, q_blocks, k_blocks)``; stored as 4-D with size-1 broadcast dims.
        q_len, kv_len: token counts; need not be multiples of ``block_size``.
        block_size: tokens per block on both axes.
        token_rule: optional token-level rule applied inside kept blocks.
        dense_q, dense_kv: optional ``(start, end)`` token ranges that are dense rows / columns.
        key_padding: optional ``(batch, kv_len)`` bool, True where a key is valid.
    """

    bitmap: torch.Tensor
    q_len: int
    kv_len: int
    block_size: int = 128
    token_rule: TokenRule | None = None
    dense_q: tuple[int, int] | None = None
    dense_kv: tuple[int, int] | None = None
    key_padding: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        bitmap = self.bitmap
        if not isinstance(bitmap, torch.Tensor):
            raise TypeError(f"bitmap must be a torch.Tensor, got {type(bitmap).__name__}")
        if bitmap.dim() not in (2, 3, 4):
            raise ValueError(
                "bitmap must have shape (q_blocks, k_blocks), (heads, q_blocks, k_blocks) or "
                f"(batch, heads, q_blocks, k_blocks); got {tuple(bitmap.shape)}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        bitmap = bitmap.to(torch.bool)
        while bitmap.dim() < 4:
            bitmap = bitmap.unsqueeze(0)
        expected = (num_blocks(self.q_len, self.block_size), num_blocks(self.kv_len, self.block_size))
        if tuple(bitmap.shape[-2:]) != expected:
            raise ValueError(
                f"bitmap block shape {tuple(bitmap.shape[-2:])} does not match q_len={self.q_len}, "
                f"kv_len={self.kv_len} with block_size={self.block_size}: expected {expected}"
            )
        object.__setattr__(self, "bitmap", bitmap)
        for name, rng, length in (("dense_q", self.dense_q, self.q_len), ("dense_kv", self.dense_kv, self.kv_len)):
            if rng is not None:
                start, end = rng
                if not (0 <= start <= end <= length):
                    raise ValueError(f"{name}={rng} must satisfy 0 <= start <= end <= {length}")
        if self.key_padding is not None:
            kp = self.key_padding
            if kp.dim() != 2 or kp.shape[1] != self.kv_len:
                raise ValueError(
                    f"key_padding must have shape (batch, kv_len={self.kv_len}); got {tuple(kp.shape)}"
                )
            object.__setattr__(self, "key_padding", kp.to(torch.bool))

    # --- derived block structure -------------------------------------------------------------
    @property
    def q_blocks(self) -> int:
        return self.bitmap.shape[-2]

    @property
    def k_blocks(self) -> int:
        return self.bitmap.shape[-1]

    def _range_blocks(self, rng: tuple[int, int] | None, n_blocks: int) -> torch.Tensor:
        flags = torch.zeros(n_blocks, dtype=torch.bool, device=self.bitmap.device)
        if rng is not None and rng[1] > rng[0]:
            flags[rng[0] // self.block_size : num_blocks(rng[1], self.block_size)] = True
        return flags

    def _range_full_blocks(self, rng: tuple[int, int] | None, n_blocks: int, length: int) -> torch.Tensor:
        """Blocks lying entirely inside ``rng`` (so every token in them is dense)."""
        flags = torch.zeros(n_blocks, dtype=torch.bool, device=self.bitmap.device)
        if rng is not None and rng[1] > rng[0]:
            bs = self.block_size
            first = num_blocks(rng[0], bs)
            last = rng[1] // bs if rng[1] < length else n_blocks
            if last > first:
                flags[first:last] = True
        return flags

    def effective_bitmap(self) -> torch.Tensor:
        """Blocks the engine computes: the bitmap plus every block touched by a dense row or column."""
        if "effective" not in self._cache:
            eff = self.bitmap
            if self.dense_q is not None or self.dense_kv is not None:
                rows = self._range_blocks(self.dense_q, self.q_blocks)
                cols = self._range_blocks(self.dense_kv, self.k_blocks)
                eff = eff | rows[:, None] | cols[None, :]
            self._cache["effective"] = eff
        return self._cache["effective"]

    def full_bitmap(self, padded_tail: bool = True) -> torch.Tensor:
        """Kept blocks where every (query, key) pair is visible, so no token-level check is needed.

        ``padded_tail=False``: the zero padding past ``kv_len`` in the tail key block does not count
        (for a reader whose key view stops at ``kv_len``).
        """
        key = "full" if padded_tail else "full_unpadded"
        if key not in self._cache:
            bs = self.block_size
            full = self.bitmap.clone()
            if self.token_rule is not None:
                full = torch.zeros_like(full)
            dense_rows = self._range_full_blocks(self.dense_q, self.q_blocks, self.q_len)
            dense_cols = self._range_full_blocks(self.dense_kv, self.k_blocks, self.kv_len)
            full = full | dense_rows[:, None] | dense_cols[None, :]
            if padded_tail and self.kv_len % bs:
                full[..., -1] = False  # the tail key block holds padding past kv_len
            if self.key_padding is not None:
                kp = self.key_padding
                pad = (-self.kv_len) % bs
                kp_blocks = torch.nn.functional.pad(kp, (0, pad), value=False).view(kp.shape[0], -1, bs).all(-1)
                full = full & kp_blocks[:, None, None, :]
            self._cache[key] = full
        return self._cache[key]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs the engine computes, averaged over batch/heads."""
        return float(self.effective_bitmap().float().mean())

    def needs_token_check(self) -> bool:
        """Whether some kept block is partial, so the token rule must run inside it."""
        return bool((self.effective_bitmap() & ~self.full_bitmap()).any())

    # --- token level ------------------------------------------------------------------------
    def allowed(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Token-level visibility for broadcastable index tensors (FlexAttention ``mask_mod`` form).

        Indices past ``q_len``/``kv_len`` are never visible.
        """
        bs = self.block_size
        bm = self.bitmap
        bb = b if bm.shape[0] > 1 else torch.zeros_like(b)
        hh = h if bm.shape[1] > 1 else torch.zeros_like(h)
        qb = (q_idx // bs).clamp(max=self.q_blocks - 1)
        kb = (kv_idx // bs).clamp(max=self.k_blocks - 1)
        ok = bm[bb, hh, qb, kb]
        if self.token_rule is not None:
            ok = ok & self.token_rule(b, h, q_idx, kv_idx)
        if self.dense_q is not None:
            ok = ok | ((q_idx >= self.dense_q[0]) & (q_idx < self.dense_q[1]))
        if self.dense_kv is not None:
            ok = ok | ((kv_idx >= self.dense_kv[0]) & (kv_idx < self.dense_kv[1]))
        ok = ok & (kv_idx < self.kv_len)
        if self.key_padding is not None:
            ok = ok & self.key_padding[b, kv_idx.clamp(max=self.kv_len - 1)]
        return ok

    def to_dense(self, batch: int = 1, heads: int = 1) -> torch.Tensor:
        """The token-level mask ``(batch, heads, q_len, kv_len)``: for references and pictures only."""
        dev = self.bitmap.device
        if self.key_padding is not None:
            batch = max(batch, self.key_padding.shape[0])
        batch = max(batch, self.bitmap.shape[0])
        heads = max(heads, self.bitmap.shape[1])
        b = torch.arange(batch, device=dev)[:, None, None, None]
        h = torch.arange(heads, device=dev)[None, :, None, None]
        q = torch.arange(self.q_len, device=dev)[None, None, :, None]
        k = torch.arange(self.kv_len, device=dev)[None, None, None, :]
        return self.allowed(b, h, q, k).expand(batch, heads, self.q_len, self.kv_len)

    def to(self, device: torch.device | str) -> BlockMask:
        """The same mask with its tensors on ``device``."""
        return BlockMask(
            self.bitmap.to(device),
            self.q_len,
            self.kv_len,
            self.block_size,
            self.token_rule,
            self.dense_q,
            self.dense_kv,
            None if self.key_padding is None else self.key_padding.to(device),
        )


def text_dense_ranges(
    n_tokens: int, n_text: int, text_position: str | None
) -> tuple[int, int] | None:
    """The token range of ``n_text`` text tokens placed ``"first"`` or ``"last"`` in ``n_tokens``."""
    if n_text <= 0 or text_position is None:
        return None
    if text_position == "first":
        return (0, n_text)
    if text_position == "last":
        return (n_tokens - n_text, n_tokens)
    raise ValueError(f"text_position must be 'first' or 'last', got {text_position!r}")
