"""Embedding lookups: ``F.embedding(ids, W, padding_idx=..., scale_grad_by_freq=..., sparse=...)``.

``y[t] = W[ids[t]]``, so ``g_W = Σ_t onehot(ids[t]) ⊗ B[t]``: factored with an
integer left factor (``[n, t]`` ids, never a one-hot tensor) and ``B`` on the right.
The ``padding_idx`` row gets no gradient: its tokens' ``B`` rows are zeroed.
``scale_grad_by_freq`` divides each token's ``B[t]`` by how often its id occurs in
the call; run alone, a sample's call holds only its own ids, so the count is taken
within each sample (``B[t] / count_i(ids[t])``). ``max_norm`` rescales the looked-up
rows (see :func:`embedding`) and ``sparse`` the layout of the gradient autograd
would return; neither changes the gradient's form. Broadcast ids (position ids
of shape ``(1, T)``) come back from ``vmap`` expanded to every sample, so nothing
needs guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import Factored, Grad, Match, Rule


def _match(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(
        input: Tensor,
        weight: Tensor,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> Match | None:
        del max_norm, norm_type, sparse  # max_norm changes the looked-up values, not the gradient's form
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        return Match({"weight": weight}, (input,), (padding_idx, bool(scale_grad_by_freq)))

    return bind(*args, **kwargs)


def _grad(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del role
    padding_idx, by_freq = static
    (ids,) = saved
    vocab, width = shape
    ids = ids.reshape(ids.shape[0], -1)  # [n, t]
    right = grad_out.reshape(ids.shape[0], -1, width)  # [n, t, d]
    if by_freq:
        right = right / counts_within_sample(ids, vocab).to(right.dtype)[..., None]
    if padding_idx is not None:
        right = right.masked_fill((ids == padding_idx)[..., None], 0)
    return Factored(ids, right, vocab)


def counts_within_sample(ids: Tensor, vocab: int) -> Tensor:
    """``[n, t]`` ids -> ``[n, t]``: how often each token's id occurs in its own sample (``n·(vocab + t)``)."""
    n = ids.shape[0]
    per_id = torch.zeros(n, vocab, dtype=torch.int64, device=ids.device)
    per_id.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int64))  # [n, vocab]
    return per_id.gather(1, ids)  # [n, t]


class _Scaled(torch.autograd.Function):
    """``x * value`` forward; the backward multiplies the incoming gradient by ``grad`` (not by ``value``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        return x * value

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None, max_norm: float | None = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``F.embedding`` with the same values and gradients, exact per sample under ``vmap`` (the capture runs it).

    - ``scale_grad_by_freq``: under ``vmap`` with an unbatched ``weight`` (one ordinary
      backward over every sample, as the reduced validation gradient is computed)
      functorch runs one embedding backward over all samples' ids, counting ids
      across samples. Here each sample's own ids are counted (``vmap`` keeps the
      count per sample) and the output's gradient is divided by it.
    - ``max_norm``: torch renormalises the looked-up rows of ``weight`` in place (an
      in-place write that ``vmap`` cannot batch, and a change to the caller's
      parameters), then looks them up; the gradient is that of the plain lookup.
      Here the rows are scaled on the way out instead (``weight`` is untouched),
      with the gradient of the plain lookup.
    - ``sparse`` only changes the layout of the gradient: a dense one, the same values.
    - ``padding_idx``: the padding lookups are taken as constants here (``detach``), as torch's backward leaves
      them: under ``vmap`` over a batched ``weight`` (a table on the per-sample fallback) torch masked the
      padding row of the first sample only, and the others' padding lookups reached it (scores 2.6e-3 off).
    """
    del sparse
    out = F.embedding(input, weight, None, None, norm_type, False, False)  # [*ids, d]
    if padding_idx is not None:
        pad = padding_idx + weight.shape[0] if padding_idx < 0 else padding_idx
        out = torch.where((input == pad).unsqueeze(-1), out.detach(), out)
    if not scale_grad_by_freq and max_norm is None:
        return out
    one = out.new_ones(())
    value, grad = one, one
    if max_norm is not None:
        with torch.no_grad():  # torch.embedding_renorm_: rows above max_norm scaled to max_norm / (norm + 1e-7)
            norm = torch.linalg.vector_norm(out, ord=norm_type, dim=-1, keepdim=True)
            value = torch.where(norm > max_norm, max_norm / (norm + 1e-7), one)  # [*ids, 1]
    if scale_grad_by_freq:
        flat = input.reshape(-1)  # [t] (per sample under vmap)
        per_id = torch.zeros(weight.shape[0], dtype=torch.int64, device=flat.device).scatter_add(
            0, flat, torch.ones_like(flat, dtype=torch.int64))  # [vocab], occurrences in the call
        grad = 1.0 / per_id.gather(0, flat).reshape(*input.shape, 1).to(out.dtype)  # [*ids, 1]
    return _Scaled.apply(out, value, grad)


embedding.__name__ = embedding.__qualname__ = "embedding"


def embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None, max_norm: float | None = None,
                  norm_type: float = 2, *args: Any, **kwargs: Any) -> Tensor:
    """``F.embedding_bag`` with the same values and gradients, without writing into ``weight``.

    ``max_norm``: torch renormalises the looked-up rows of ``weight`` in place (under
    ``no_grad``), then reduces the bags; the gradient is that of the plain call on the
    renormalised table. Here the table the bags read is ``weight`` plus the renormalisation
    as a constant (every row above ``max_norm``: a row no bag looks up changes nothing), so
    the values, the rows ``mode="max"`` picks and the gradient are torch's; ``weight`` is untouched.
    """
    if max_norm is not None:
        with torch.no_grad():  # torch.embedding_renorm_: rows above max_norm scaled to max_norm / (norm + 1e-7)
            norm = torch.linalg.vector_norm(weight, ord=norm_type, dim=-1, keepdim=True)  # [V, 1]
            shift = weight * (torch.where(norm > max_norm, max_norm / (norm + 1e-7), norm.new_ones(())) - 1)
        weight = weight + shift
    return F.embedding_bag(input, weight, offsets, None, norm_type, *args, **kwargs)


embedding_bag.__name__ = embedding_bag.__qualname__ = "embedding_bag"


#: Per lookup call: (position of ``weight``, its keyword; position of ``scale_grad_by_freq``, its keyword).
_BY_FREQ_ARGS: dict[Callable[..., Any], tuple[int, str, int, str]] = {
    F.embedding: (1, "weight", 5, "scale_grad_by_freq"),  # (input, weight, padding_idx, max_norm, norm_type, ...)
    F.embedding_bag: (1, "weight", 5, "scale_grad_by_freq"),  # (input, weight, offsets, max_norm, norm_type, ...)
    torch.embedding: (0, "weight", 3, "scale_grad_by_freq"),  # (weight, indices, padding_idx, scale_grad_by_freq)
    torch.embedding_bag: (0, "weight", 3, "scale_grad_by_freq"),  # (weight, indices, offsets, scale_grad_by_freq)
}


def counted_over_call(func: Any, args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The table of a lookup whose gradient divides by each id's count in the call (``scale_grad_by_freq``),
    else ``None``. Run on a batch, that count is over every sample's ids: the batch's gradient is then not the
    sum of the samples' own gradients (each counts its own ids, as the loop of single samples does)."""
    where = _BY_FREQ_ARGS.get(func)
    if where is None:
        return None
    w_at, w_key, flag_at, flag_key = where
    flag = args[flag_at] if len(args) > flag_at else kwargs.get(flag_key, False)
    weight = args[w_at] if len(args) > w_at else kwargs.get(w_key)
    return weight if flag and isinstance(weight, Tensor) else None


def renormed_by_call(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, tuple[float, float]] | None:
    """``(table, (max_norm, norm_type))`` of a lookup with ``max_norm`` (``F.embedding``, ``F.embedding_bag``),
    else ``None``. torch renormalises the looked-up rows of the table in place; :func:`embedding` scales them on
    the way out instead, which equals torch for the lookup itself, not for a later use of the table (that reads
    rows renormalised by every sample's lookups: the samples of a batch interact)."""
    if func is not F.embedding and func is not F.embedding_bag:
        return None
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if max_norm is None or not isinstance(weight, Tensor):
        return None
    return weight, (float(max_norm), float(args[4] if len(args) > 4 else kwargs.get("norm_type", 2.0)))


EMBEDDING = Rule("embedding", _match, _grad, frozenset({"weight"}), out_axis=1)

TABLE: dict[Callable[..., Any], Rule] = {F.embedding: EMBEDDING, embedding: EMBEDDING}

#: Calls the capture runs in place of torch's own (same values, exact per-sample gradients under ``vmap``).
EXACT: dict[Callable[..., Any], Callable[..., Any]] = {F.embedding: embedding, F.embedding_bag: embedding_bag}
