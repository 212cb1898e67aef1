"""Selective scan (the Mamba S6 recurrence) in plain torch, plus the mamba-ssm kernel where available.

For every batch ``b``, channel ``d`` and state ``n``::

    delta = softplus(delta + delta_bias)            # if delta_softplus
    h[t]  = exp(delta[t] * A[d, n]) * h[t-1] + delta[t] * B[n, t] * u[t]
    y[t]  = sum_n C[n, t] * h[t] + D[d] * u[t]
    y     = y * silu(z)                              # if z is given

Shapes follow mamba-ssm's ``selective_scan_fn``: ``u``, ``delta``, ``z``: ``(b, d, L)``; ``A``:
``(d, n)``; ``B``, ``C``: ``(b, n, L)`` or grouped ``(b, g, n, L)`` (channel ``i`` uses group
``i // (d // g)``); ``D``, ``delta_bias``: ``(d,)``.

- :func:`selective_scan_ref`: the sequential loop over time; the reference.
- :func:`selective_scan_chunked`: a parallel scan in plain torch, the CPU default. The sequence is cut
  into chunks (about ``sqrt(L) / 2`` steps); all chunks advance together, either ``chunk_size`` recurrence
  steps with factors ``exp(delta * A) <= 1`` (``intra="steps"``, default) or through the
  ``chunk_size x chunk_size`` matrix ``exp(S[t] - S[s])`` (``s <= t``) of segment sums of the
  within-chunk cumulative log decays ``S`` (``intra="segsum"``). The state carried into each chunk
  comes from a log-depth (Hillis-Steele) scan over the chunk ends with chunk decays ``exp(S[-1]) <= 1``
  and is added with weights ``exp(S[t]) <= 1``. No ``exp`` of a growing positive number is ever formed,
  so strongly negative ``A`` or large ``delta`` cannot overflow. Backward is plain autograd.
- :func:`selective_scan`: the dispatcher. ``backend="auto"`` runs mamba-ssm's CUDA kernel when the
  tensors are on CUDA and ``mamba_ssm`` imports (a one-time warning names the fallback otherwise), the
  chunked scan everywhere else. ``mamba_ssm`` is never imported at ``import diffattn``.

All math runs in float32 (float64 inputs stay float64); the output has ``u``'s dtype.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

ScanBackend = Literal["auto", "chunked", "reference", "mamba_ssm"]
SCAN_BACKENDS: tuple[str, ...] = ("auto", "chunked", "reference", "mamba_ssm")


def _check(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, d_state), got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (b, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == b and t.shape[2:] == (n, length) and t.shape[1] > 0 and d % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (batch={b}, d_state={n}, length={length}) or (batch, groups, d_state, length) "
                f"with groups dividing dim={d}, got shape {tuple(t.shape)}"
            )
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must be (dim={d},), got shape {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"delta_bias must be (dim={d},), got shape {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _expand_bc(t: torch.Tensor, d: int) -> torch.Tensor:
    """(b, n, L) -> (b, 1, n, L); (b, g, n, L) -> (b, d, n, L) with each group repeated d // g times."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    g = t.shape[1]
    return t.repeat_interleave(d // g, dim=1) if g > 1 else t


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    ct = torch.promote_types(u.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    d = u.shape[1]
    return u.to(ct), delta, A.to(ct), _expand_bc(B.to(ct), d), _expand_bc(C.to(ct), d)


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D.to(y.dtype)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sequential recurrence, one time step at a time (the reference; slow for long ``L``)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u, D, z, out_dtype)
    return (out, h) if return_last_state else out


def _log_scan(decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of ``h[c] = decay[c] * h[c-1] + state[c]`` along the last axis, in log2 steps."""
    offset = 1
    num = state.shape[-1]
    while offset < num:
        state = torch.cat(
            [state[..., :offset], state[..., offset:] + decay[..., offset:] * state[..., :-offset]], -1
        )
        decay = torch.cat([decay[..., :offset], decay[..., offset:] * decay[..., :-offset]], -1)
        offset *= 2
    return state


def _auto_chunk(length: int) -> int:
    return int(min(32, max(8, round(length**0.5 / 2))))


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
    intra: str = "steps",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel scan in plain torch.

    The sequence is cut into chunks of ``chunk_size`` steps (default about ``sqrt(L) / 2``, 8 to 32). Inside
    the chunks, all chunks at once: ``intra="steps"`` runs the recurrence ``chunk_size`` steps (factors
    ``exp(delta * A) <= 1``); ``intra="segsum"`` forms the ``chunk_size x chunk_size`` matrix of
    ``exp(S[t] - S[s])`` from segment sums of the log decays (more memory, no loop). The state carried
    into each chunk comes from a log-depth scan over the chunk ends, added with weights
    ``exp(S[t])``, ``S`` the within-chunk cumulative log decay. No ``exp`` of a growing positive number
    is ever formed, so strongly negative ``A`` or large ``delta`` cannot overflow.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    if intra not in ("steps", "segsum"):
        raise ValueError(f"intra must be 'steps' or 'segsum', got {intra!r}")
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]
    if chunk_size is None:
        chunk_size = _auto_chunk(length)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    T = min(chunk_size, length)
    nc = -(-length // T)
    pad = nc * T - length
    # zero padding at the end: log decay 0 and input 0 leave the state unchanged
    du = delta * u
    if pad:
        delta = F.pad(delta, (0, pad))
        du = F.pad(du, (0, pad))
        B = F.pad(B, (0, pad))
        C = F.pad(C, (0, pad))
    if intra == "steps":
        # time-in-chunk first, (T, b, d, n, nc): every step reads contiguous slices. Only the (b, d, L)
        # inputs are transposed; the (b, d, n, L) products are formed in this layout.
        def t_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*t.shape[:-1], nc, T).movedim(-1, 0).contiguous()

        la = t_first(delta).unsqueeze(-2) * A[:, :, None]  # log decays, (T, b, d, n, nc)
        dA = torch.exp(la)
        xt = t_first(du).unsqueeze(-2) * t_first(B)  # inputs, (T, b, d, n, nc)
        # unbind (not xt[t]): its backward is one stack, where T selects would each zero-fill a full buffer
        xs, dAs = xt.unbind(0), dA.unbind(0)
        hs = [xs[0]]
        for t in range(1, T):
            hs.append(torch.addcmul(xs[t], dAs[t], hs[-1]))
        h = torch.stack(hs)  # within-chunk states from a zero start
        if nc > 1:
            P = torch.exp(torch.cumsum(la, dim=0))  # exp(S[t]) <= 1: decay from the chunk start
            carry = _log_scan(P[-1], h[-1])  # (b, d, n, nc)
            h_in = torch.cat([torch.zeros_like(carry[..., :1]), carry[..., :-1]], dim=-1)
            h = torch.addcmul(h, P, h_in)
        y = (h * t_first(C)).sum(3)  # (T, b, d, nc)
        last = h[(length - 1) % T, ..., (length - 1) // T]
        y = y.movedim(0, -1).reshape(b, d, nc * T)[..., :length]
    else:
        a = (delta[:, :, None, :] * A[None, :, :, None]).view(b, d, n, nc, T)  # log decays
        x = (du[:, :, None, :] * B).view(b, d, n, nc, T)  # inputs
        S = torch.cumsum(a, dim=-1)
        # (.., t, s) = sum_{s < r <= t} a_r for s <= t; -inf above the diagonal (exp -> 0, zero gradient)
        above = torch.full((T, T), float("-inf"), device=u.device, dtype=a.dtype).triu(1)
        w = torch.exp(S[..., :, None] - S[..., None, :] + above)
        h = torch.einsum("...ts,...s->...t", w, x)
        if nc > 1:
            # carried states: H[c] = exp(S[c, T-1]) * H[c-1] + h[c, T-1]; the state entering chunk c is H[c-1]
            carry = _log_scan(torch.exp(S[..., -1]), h[..., -1])  # (b, d, n, nc)
            h_in = torch.cat([torch.zeros_like(carry[..., :1]), carry[..., :-1]], dim=-1)
            h = h + torch.exp(S) * h_in[..., None]
        h = h.reshape(b, d, n, nc * T)
        y = (h * C).sum(2)[..., :length]
        last = h[..., length - 1]
    out = _finish(y, u, D, z, out_dtype)
    if return_last_state:
        return out, last
    return out


@functools.lru_cache(maxsize=1)
def _mamba_kernel() -> Callable | None:
    """mamba-ssm's fused kernel, or None (warned once) when it does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a build against another torch/CUDA
        warnings.warn(
            f"mamba_ssm is not available ({type(exc).__name__}: {exc}); selective_scan runs the pure-torch "
            "chunked scan on CUDA (install the [gpu] extra for the fused kernel)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return selective_scan_fn


def resolve_scan_backend(u: torch.Tensor, backend: str = "auto") -> str:
    """The backend :func:`selective_scan` will run for ``u`` (``mamba_ssm`` only on CUDA)."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"backend must be one of {list(SCAN_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if u.is_cuda and _mamba_kernel() is not None:
            return "mamba_ssm"
        return "chunked"
    if backend == "mamba_ssm":
        if not u.is_cuda:
            raise ValueError(f"backend='mamba_ssm' needs CUDA tensors, got u on {u.device}")
        if _mamba_kernel() is None:
            raise ValueError("backend='mamba_ssm' requested but mamba_ssm does not import")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature; see the module docstring."""
    which = resolve_scan_backend(u, backend)
    if which == "mamba_ssm":
        _check(u, delta, A, B, C, D, z, delta_bias)
        return _mamba_kernel()(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    if which == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=chunk_size
    )


def selective_scan_macs(
    batch: int, dim: int, length: int, d_state: int, with_d: bool = True, with_z: bool = False
) -> int:
    """Multiply-adds of the recurrence itself (as mamba-ssm / VMamba count it: 9 per (b, d, n, t) step,
    plus the skip and gate), for FLOP budgets where a flop counter does not see the scan."""
    macs = 9 * batch * dim * length * d_state
    if with_d:
        macs += batch * dim * length
    if with_z:
        macs += batch * dim * length
    return macs
