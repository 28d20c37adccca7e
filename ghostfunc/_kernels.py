"""The three exact ways to take dot products of factored per-sample gradients.

A factored gradient is ``g_n = Σ_t L[n, t] ⊗ R[n, t]`` (a ``[p, d]`` matrix), with
``L`` ``[n, t, p]`` dense or ``[n, t]`` integer ids (one-hot rows, never built) and
``R`` ``[n, t, d]``. Index letters: ``n`` train rows, ``m`` val rows, ``t`` and
``s`` their tokens, ``p`` and ``d`` the parameter's two axes.

| kernel        | computes                                  | time (multiply-adds)  | memory      |
|---------------|-------------------------------------------|-----------------------|-------------|
| ``gram``      | ``Σ_{t,s} (L_n[t]·L_m[s]) (R_n[t]·R_m[s])`` | ``n·m·T·S·(p+d)``     | ``chunk``   |
| ``materialise``| ``g_n`` for a chunk of rows               | ``n·T·p·d``           | ``c·p·d``   |
| ``contract``  | ``Σ_t L_n[t]ᵀ U R_n[t]`` for a fixed ``U`` | ``n·T·p·d``           | ``n·T·d``   |
| ``weight_sum``| ``Σ_n w_n g_n``                            | ``n·T·p·d``           | ``p·d``     |

Tied parameters have several uses; their gradient is the sum over uses, so every
kernel is applied to every pair (gram) or every use (the others): cross terms are
exact. ``dtype`` (``compute_dtype``) casts the factors for the products; sums
over tokens and rows are taken in the output dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from einops import einsum, rearrange
from torch import Tensor

from ._ops import Factored

#: Elements a Gram block may hold; larger problems are cut into row and token chunks.
GRAM_BLOCK = 1 << 24
#: Elements a chunk of materialised per-sample gradients may hold.
MATERIALISE_BLOCK = 1 << 25


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x if dtype is None or not x.is_floating_point() else x.to(dtype)


def _left_gram(a: Tensor, b: Tensor, a_ids: bool, b_ids: bool, dtype: torch.dtype) -> Tensor:
    """``[n, t, ·] x [m, s, ·] -> [n, t, m, s]``: inner products of left factors."""
    if a_ids and b_ids:
        return (a[:, :, None, None] == b[None, None]).to(dtype)
    if a_ids:  # one-hot row a[n, t] picks entry a[n, t] of b[m, s]
        return rearrange(b, "m s p -> p m s")[a]
    if b_ids:
        return rearrange(rearrange(a, "n t p -> p n t")[b], "m s n t -> n t m s")
    return einsum(a, b, "n t p, m s p -> n t m s")


def _blocks(n: int, t: int, per_token: int) -> Iterator[tuple[slice, slice]]:
    """Row and token slices whose block ``rows·tokens·per_token`` stays under GRAM_BLOCK."""
    tok = max(1, min(t, GRAM_BLOCK // max(per_token, 1)))
    rows = max(1, GRAM_BLOCK // max(per_token * t, 1)) if tok == t else 1
    for i in range(0, n, rows):
        for j in range(0, t, tok):
            yield slice(i, min(i + rows, n)), slice(j, min(j + tok, t))


def gram(a: Factored, b: Factored, dtype: torch.dtype | None = None) -> Tensor:
    """``<g_n, g_m>`` for every train row ``n`` of ``a`` and val row ``m`` of ``b``: ``[n, m]``.

    ``Σ_{t,s} (L_a[n,t]·L_b[m,s]) (R_a[n,t]·R_b[m,s])``, in blocks so memory stays
    under :data:`GRAM_BLOCK` elements even at long sequences.
    """
    out_dtype = a.right.dtype
    n, t = a.right.shape[:2]
    m, s = b.right.shape[:2]
    bl, br = _cast(b.left, dtype), _cast(b.right, dtype)
    out = torch.zeros(n, m, dtype=torch.promote_types(out_dtype, torch.float32) if dtype else out_dtype,
                      device=a.right.device)
    for rows, toks in _blocks(n, t, m * s):
        al, ar = _cast(a.left[rows, toks], dtype), _cast(a.right[rows, toks], dtype)
        left = _left_gram(al, bl, a.ids, b.ids, ar.dtype)  # [c, t, m, s]
        right = einsum(ar, br, "n t d, m s d -> n t m s")
        out[rows] += einsum(left.to(out.dtype), right.to(out.dtype), "n t m s, n t m s -> n m")
    return out.to(out_dtype)


def weight_sum(f: Factored, weights: Tensor | None = None) -> Tensor:
    """``Σ_n w_n Σ_t L[n,t] ⊗ R[n,t]``: ``[p, d]`` (the rows' weighted gradient sum)."""
    right = f.right if weights is None else f.right * weights[:, None, None].to(f.right.dtype)
    d = right.shape[-1]
    if f.ids:
        out = torch.zeros(f.p, d, dtype=right.dtype, device=right.device)
        return out.index_add_(0, f.left.reshape(-1), right.reshape(-1, d))
    return einsum(f.left, right, "n t p, n t d -> p d")


def materialise(f: Factored, rows: slice) -> Tensor:
    """The per-sample gradients ``g_n`` of ``rows``: ``[c, p, d]``."""
    left, right = f.left[rows], f.right[rows]
    c, d = right.shape[0], right.shape[-1]
    if f.ids:
        index = left + torch.arange(c, device=left.device)[:, None] * f.p  # [c, t] rows of a [c·p, d] buffer
        out = torch.zeros(c * f.p, d, dtype=right.dtype, device=right.device)
        return out.index_add_(0, index.reshape(-1), right.reshape(-1, d)).view(c, f.p, d)
    return torch.bmm(left.transpose(1, 2), right)  # [c, p, t] @ [c, t, d]


def chunk_rows(n: int, p: int, d: int) -> Iterator[slice]:
    """Row slices whose materialised gradients stay under :data:`MATERIALISE_BLOCK` elements."""
    step = max(1, MATERIALISE_BLOCK // max(p * d, 1))
    for i in range(0, n, step):
        yield slice(i, min(i + step, n))


def contract(f: Factored, u: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``<g_n, U> = Σ_t L[n,t]ᵀ U R[n,t]`` for a fixed ``U`` ``[p, d]``: ``[n]``."""
    right = f.right
    if f.ids:
        lu = u[f.left]  # [n, t, d]: the rows of U that the ids pick
    else:
        lu = _cast(f.left, dtype) @ _cast(u, dtype)  # [n, t, p] @ [p, d] -> [n, t, d]
    acc = torch.promote_types(right.dtype, torch.float32) if dtype else right.dtype
    return einsum(lu.to(acc), right.to(acc), "n t d, n t d -> n").to(right.dtype)
