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

Where a part common to each row's tokens dominates a factor, the Gram kernel pairs the
tokens centred and their mean (:func:`centred`: the same ``g_n``, ``T + 1`` tokens), so
that part is not squared before it cancels.

Tied parameters have several uses; their gradient is the sum over uses, so every
kernel is applied to every pair (gram) or every use (the others): cross terms are
exact. ``dtype`` (``compute_dtype``) casts the factors for the products; sums
over tokens and rows are taken in the output dtype. Float16 factors are multiplied and summed in float32
(:func:`_working`) and the result given back in float16.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from einops import rearrange
from torch import Tensor

from ._ops import Factored

#: Elements a Gram block may hold; larger problems are cut into row and token chunks.
GRAM_BLOCK = 1 << 24


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` in ``dtype`` if it is a float tensor (as it is when ``dtype`` is ``None`` or its own)."""
    return x if dtype is None or x.dtype == dtype or not x.is_floating_point() else x.to(dtype)


def _working(dtype: torch.dtype | None, factor: torch.dtype) -> torch.dtype | None:
    """The dtype products are taken in: ``dtype`` (``compute_dtype``) when given; float32 for float16 factors,
    whose range ends near 6e-8 (the products of two small per-token gradients underflowed to zero: a loss
    scaled by 1e-2 gave 0.92 off, by 1e-3 all zeros, where the float16 loop keeps its digits); else the factors'
    own. Results come back in the factors' dtype as before."""
    if dtype is None and factor == torch.float16:
        return torch.float32
    return dtype


def _left_gram(a: Tensor, b: Tensor, a_ids: bool, b_ids: bool, dtype: torch.dtype) -> Tensor:
    """``[n, t, ·] x [m, s, ·] -> [n, t, m, s]``: inner products of left factors."""
    if a_ids and b_ids:
        return (a[:, :, None, None] == b[None, None]).to(dtype)
    if a_ids:  # one-hot row a[n, t] picks entry a[n, t] of b[m, s]
        return rearrange(b, "m s p -> p m s")[a]
    if b_ids:
        return rearrange(rearrange(a, "n t p -> p n t")[b], "m s n t -> n t m s")
    return _pair_dots(a, b)


def _pair_dots(a: Tensor, b: Tensor) -> Tensor:
    """``[n, t, k] x [m, s, k] -> [n, t, m, s]``: every row of ``a`` dotted with every row of ``b`` (one GEMM)."""
    n, t, k = a.shape
    m, s, _ = b.shape
    return (a.reshape(n * t, k) @ b.reshape(m * s, k).T).view(n, t, m, s)


def _blocks(n: int, t: int, per_token: int) -> Iterator[tuple[slice, slice]]:
    """Row and token slices whose block ``rows·tokens·per_token`` stays under GRAM_BLOCK."""
    tok = max(1, min(t, GRAM_BLOCK // max(per_token, 1)))
    rows = max(1, GRAM_BLOCK // max(per_token * t, 1)) if tok == t else 1
    for i in range(0, n, rows):
        for j in range(0, t, tok):
            yield slice(i, min(i + rows, n)), slice(j, min(j + tok, t))


def gram(a: Factored, b: Factored, dtype: torch.dtype | None = None) -> Tensor:
    """``<g_n, g_m>`` for every train row ``n`` of ``a`` and val row ``m`` of ``b``: ``[n, m]``.

    ``Σ_{t,s} (L_a[n,t]·L_b[m,s]) (R_a[n,t]·R_b[m,s])`` (over each row's tokens centred and
    their mean where a common part dominates: :func:`centred`), in blocks so memory stays
    under :data:`GRAM_BLOCK` elements even at long sequences.
    """
    out_dtype = a.right.dtype
    dtype = _working(dtype, out_dtype)
    b = centred(b)
    n, t = a.right.shape[:2]
    m, s = b.right.shape[:2]
    bl, br = _cast(b.left, dtype), _cast(b.right, dtype)
    acc = torch.promote_types(out_dtype, torch.float32) if dtype else out_dtype
    blocks = list(_blocks(n, t, m * s))
    out = None if len(blocks) == 1 else torch.zeros(n, m, dtype=acc, device=a.right.device)
    for rows, al, ar in _centred_blocks(a, blocks, m * s):
        al, ar = _cast(al, dtype), _cast(ar, dtype)
        left = _left_gram(al, bl, a.ids, b.ids, ar.dtype)  # [c, t, m, s]
        right = _pair_dots(ar, br)
        # [c, t, m, s] ⊙ [c, t, m, s] summed over t, s: in place (einsum permutes both: ~4x slower)
        part = left.to(acc).mul_(right.to(acc)).sum(dim=(1, 3))
        if out is None:  # one block: the whole answer
            return part.to(out_dtype)
        out[rows] += part
    assert out is not None
    return out.to(out_dtype)


#: :func:`centred` centres a factor whose tokens hold more than this share of their energy in the part common to
#: each row's tokens: below it, leaving them as they are costs at most 2x in that factor's rounding, and saves the
#: extra token (``T + S + 1`` more pairs: +56% at T = 4) and a pass over the factor.
CENTRE_SHARE = 0.5


def centred(f: Factored) -> Factored:
    """The same ``g_n`` from each row's tokens centred, and one token more, the row's mean:
    ``Σ_t (L_t − L̄) ⊗ (R_t − R̄) + T·L̄ ⊗ R̄`` (the cross terms vanish: centred tokens sum to zero);
    ``f`` itself where no common part dominates (:data:`CENTRE_SHARE`).

    Why: the Gram kernel multiplies token inner products before it sums them, so a
    part common to every token of a row (un-centred features, a residual stream's
    large constant dimensions) whose gradient contributions cancel over the tokens (a
    pooling softmax's logits, a centring) is squared before it cancels, and float32
    loses the digits the loop and the other kernels keep (measured: 3.4e-3 off where
    they are 8.5e-5 off; 2.3 where they are 1e-4). Centred, that part is the one mean
    token, weighted by the sum it cancels to. Dense factors of ``T > 1`` tokens only
    (an id factor is one-hot; one token has nothing to centre).
    """
    return _centred_by(f, _centring(f))


def _centred_by(f: Factored, means: tuple[Tensor, Tensor] | None) -> Factored:
    """:func:`centred` with :func:`_centring`'s answer ``means`` given."""
    if means is None:
        return f
    return Factored(_and_mean(f.left, means[0], f.right.shape[1]), _and_mean(f.right, means[1], 1), f.p)


def _centring(f: Factored) -> tuple[Tensor, Tensor] | None:
    """Each row's mean token of ``L`` and ``R`` (``[n, 1, p]``, ``[n, 1, d]``) when :func:`centred` centres
    ``f``: a dense factor of ``T > 1`` tokens whose common part holds over :data:`CENTRE_SHARE` of the energy of
    ``L`` or of ``R``, judged on every row (one host sync, a pass over the factor next to the Gram's ``T·S``
    products per row pair; judged on the first 8 rows, a batch whose later rows carry the common part kept
    float32 at 10-76x the loop's error; rounding only: either form is the same gradient), and always in a
    compiled graph."""
    t = f.right.shape[1]
    if f.ids or t < 2:
        return None
    if torch.compiler.is_compiling():  # a compiled graph cannot branch on values: it always centres (fused)
        return f.left.mean(1, keepdim=True), f.right.mean(1, keepdim=True)
    # ‖Σ_t x_t‖² / (T·Σ_t ‖x_t‖²) = T·‖x̄‖² / Σ_t ‖x_t‖², for L and R at once: four norms, one sync
    norms = torch.stack([torch.linalg.vector_norm(y) for x in (f.left, f.right) for y in (x.sum(1), x)]).tolist()
    if not any(s * s > CENTRE_SHARE * t * v * v for s, v in zip(norms[::2], norms[1::2], strict=True)):
        return None
    return f.left.mean(1, keepdim=True), f.right.mean(1, keepdim=True)



def _and_mean(x: Tensor, mean: Tensor, scale: int) -> Tensor:
    """``[n, t, k] -> [n, t + 1, k]``: the tokens less their ``mean`` ``[n, 1, k]``, then the mean times ``scale``
    (eagerly written in place of a concatenation, one pass; a compiled graph takes the concatenation, which it
    fuses)."""
    n, t, k = x.shape
    if torch.compiler.is_compiling():  # (an out= into a slice is refused while tracing)
        return torch.cat([x - mean, mean * scale], 1)
    out = x.new_empty(n, t + 1, k)
    torch.sub(x, mean, out=out[:, :t])
    torch.mul(mean, scale, out=out[:, t:])
    return out


def _centred_blocks(a: Factored, blocks: list[tuple[slice, slice]], per_token: int
                    ) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(rows, L, R)`` of :func:`centred` ``a``, block by block (``blocks`` of ``a``'s own tokens; the mean
    tokens after them), without holding the centred copy of every row at once."""
    n, t = a.right.shape[:2]
    means = _centring(a)
    if means is None:
        for rows, toks in blocks:
            yield rows, a.left[rows, toks], a.right[rows, toks]
        return
    if len(blocks) == 1:
        c = _centred_by(a, means)
        yield slice(0, n), c.left, c.right
        return
    lm, rm = means
    for rows, toks in blocks:
        yield rows, a.left[rows, toks] - lm[rows], a.right[rows, toks] - rm[rows]
    for rows, _ in _blocks(n, 1, per_token):  # every row's mean token
        yield rows, lm[rows] * t, rm[rows]


def weight_sum(f: Factored, weights: Tensor | None = None) -> Tensor:
    """``Σ_n w_n Σ_t L[n,t] ⊗ R[n,t]``: ``[p, d]`` (the rows' weighted gradient sum)."""
    right = f.right if weights is None else f.right * _cast(weights, f.right.dtype).view(-1, 1, 1)
    d = right.shape[-1]
    if f.ids:
        out = torch.zeros(f.p, d, dtype=right.dtype, device=right.device)
        return out.index_add_(0, f.left.reshape(-1), right.reshape(-1, d))
    return f.left.reshape(-1, f.p).T @ right.reshape(-1, d)  # one GEMM over every (row, token): [p, d]


#: Elements one block of materialised gradients may hold in :func:`materialise_dots` on CPU
#: (16 MiB in float32: it stays in the last-level cache while it is dotted and summed; smaller
#: blocks make the per-row GEMMs too small to use two cores well).
DOT_BLOCK = 1 << 22
#: The same on GPUs, where fewer, larger launches win.
DOT_BLOCK_GPU = 1 << 26


def _dot_blocks(rows: int, other: int, p: int, d: int, device: torch.device) -> tuple[int, int]:
    """Row chunk ``c`` and row-of-``p`` block ``pb`` with ``(c + other)·pb·d <= block``, ``pb`` not tiny."""
    block = DOT_BLOCK if device.type == "cpu" else DOT_BLOCK_GPU
    pb_min = min(p, 128)
    c = max(1, min(rows, block // max(pb_min * d, 1) - other))
    pb = min(p, max(pb_min, block // max((c + other) * d, 1)))
    return c, pb


def _block(uses: list[Factored], rows: slice, ps: slice, into: Tensor | None = None) -> Tensor:
    """Rows ``rows`` of ``Σ_uses g_n``, restricted to rows ``ps`` of ``p``: ``[c, pb, d]``.

    Dense uses are a ``bmm`` each (``[c, pb, t] @ [c, t, d]``), accumulated in place;
    id uses add only the tokens whose id falls in ``ps`` (``index_add``). ``into``: a
    ``[c, pb, d]`` tensor to write the block into (its contents are overwritten).
    """
    out: Tensor | None = None
    for f in uses:
        if f.ids:
            continue
        lt = f.left[rows, :, ps].transpose(1, 2)  # [c, pb, t]
        out = torch.bmm(lt, f.right[rows], out=into) if out is None else out.baddbmm_(lt, f.right[rows])
    ids_uses = [f for f in uses if f.ids]
    if out is None:
        right = ids_uses[0].right
        c, pb = len(range(*rows.indices(right.shape[0]))), ps.stop - ps.start
        out = right.new_zeros(c, pb, right.shape[-1]) if into is None else into.zero_()
    c, pb, d = out.shape
    for f in ids_uses:
        ids, right = f.left[rows], f.right[rows]  # [c, t], [c, t, d]
        n_at, t_at = ((ids >= ps.start) & (ids < ps.stop)).nonzero(as_tuple=True)
        flat = n_at * pb + ids[n_at, t_at] - ps.start  # rows of out viewed as [c·pb, d]
        out.view(c * pb, d).index_add_(0, flat, right[n_at, t_at].to(out.dtype))
    return out


def materialise(uses: list[Factored], n: int, into: Tensor | None = None) -> Tensor:
    """Every row's whole gradient ``Σ_uses Σ_t L[n,t] ⊗ R[n,t]``: ``[n, p, d]``, held at once
    (``n·p·d`` memory; one ``bmm`` per dense use, ``n·T·p·d`` multiply-adds). ``into``: an
    ``[n, p, d]`` tensor of the uses' dtype and device to write it into (overwritten), reused
    memory instead of a fresh allocation."""
    return _block(uses, slice(0, n), slice(0, uses[0].p), into)


def materialise_dots(tr: list[Factored], other: list[Factored] | Tensor, n: int,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Fused materialise: every ``<g_n, h>`` and ``Σ_n g_n``, holding one cache-sized block at a time.

    ``g_n = Σ_uses Σ_t L[n,t] ⊗ R[n,t]`` over the train uses ``tr``; ``h`` is either a
    fixed ``U`` (``other`` a ``[p, d]`` tensor: returns ``[n]``), ``k`` fixed directions
    (a ``[k, p, d]`` tensor: returns ``[n, k]``, one materialisation for all of them) or
    every val row's gradient (``other`` the val uses: returns ``[n, m]``). Blocks of ``c`` rows
    times ``pb`` rows of ``p`` are materialised with ``bmm`` (``[c, pb, t] @ [c, t, d]``),
    dotted with the same block of ``h`` and summed while in cache, so memory stays
    at :data:`DOT_BLOCK` elements and cost at ``(n + m)·T·p·d`` multiply-adds (``n·T·p·d``
    against a fixed ``U``: the FLOPs of the weight gradient that an ordinary backward
    pass spends on the train rows). Shared parameters (several uses) are summed
    per block, so cross terms are exact. Against a fixed ``U``, id (embedding) uses
    need no block: ``<g_n, U>`` is linear in the uses, so they gather rows of ``U``
    (:func:`contract`, ``n·T·d``) and scatter-add into the sum.
    """
    ref = tr[0].right
    dtype = _working(dtype, ref.dtype)
    p, d = tr[0].p, ref.shape[-1]
    fixed = isinstance(other, Tensor)
    one = isinstance(other, Tensor) and other.dim() == 2  # a single [p, d] direction: scores [n]
    if isinstance(other, Tensor):
        other = other.reshape(-1, p, d)  # [k, p, d]
    m = other.shape[0] if isinstance(other, Tensor) else other[0].right.shape[0]
    acc = torch.promote_types(ref.dtype, torch.float32) if dtype else ref.dtype
    scores = torch.zeros(n, m, dtype=acc, device=ref.device)
    total = torch.zeros(p, d, dtype=ref.dtype, device=ref.device)
    if isinstance(other, Tensor):
        for f in (f for f in tr if f.ids):
            for k in range(m):
                scores[:, k] += contract(f, other[k], dtype).to(acc)
            total.index_add_(0, f.left.reshape(-1), f.right.reshape(-1, d).to(total.dtype))
        tr = [f for f in tr if not f.ids]
        if not tr:
            return (scores[:, 0] if one else scores).to(ref.dtype), total
    c, pb = _dot_blocks(n, 0 if fixed else m, p, d, ref.device)
    for j in range(0, p, pb):
        ps = slice(j, min(j + pb, p))
        if isinstance(other, Tensor):
            h = _cast(other[:, ps], dtype).reshape(m, -1)  # [k, pb·d]
        else:
            h = _cast(_block(other, slice(None), ps), dtype).reshape(m, -1)  # [m, pb·d]
        for i in range(0, n, c):
            rows = slice(i, min(i + c, n))
            g = _block(tr, rows, ps)  # [c, pb, d]
            scores[rows] += (_cast(g, dtype).reshape(g.shape[0], -1) @ h.T).to(acc)
            total[ps] += g.sum(0)
    return (scores[:, 0] if one else scores).to(ref.dtype), total


def contract(f: Factored, u: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``<g_n, U> = Σ_t L[n,t]ᵀ U R[n,t]`` for a fixed ``U`` ``[p, d]``: ``[n]``."""
    right = f.right
    dtype = _working(dtype, right.dtype)
    if f.ids:
        lu = u[f.left]  # [n, t, d]: the rows of U that the ids pick
    else:
        lu = _cast(f.left, dtype) @ _cast(u, dtype)  # [n, t, p] @ [p, d] -> [n, t, d]
    if dtype is None and lu.dtype == right.dtype:  # Σ over t and d (one pass, no permute)
        return (lu * right).flatten(1).sum(1)
    acc = torch.promote_types(right.dtype, torch.float32) if dtype else right.dtype
    return (lu.to(acc) * right.to(acc)).flatten(1).sum(1).to(right.dtype)
