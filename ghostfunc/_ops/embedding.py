"""Embedding lookups: ``F.embedding(ids, W, padding_idx=...)``.

``y[t] = W[ids[t]]``, so ``g_W = Σ_t onehot(ids[t]) ⊗ B[t]``: factored with an
integer left factor (``[n, t]`` ids, never a one-hot tensor) and ``B`` on the right.
The ``padding_idx`` row gets no gradient: its tokens' ``B`` rows are zeroed.
Broadcast ids (position ids of shape ``(1, T)``) come back from ``vmap`` expanded
to every sample, so nothing needs guessing.
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
        del norm_type, sparse
        if max_norm is not None or scale_grad_by_freq:  # renormalises W in place / couples tokens
            return None
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        return Match({"weight": weight}, (input,), padding_idx)

    return bind(*args, **kwargs)


def _grad(padding_idx: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del role
    (ids,) = saved
    vocab, width = shape
    ids = ids.reshape(ids.shape[0], -1)  # [n, t]
    right = grad_out.reshape(ids.shape[0], -1, width)  # [n, t, d]
    if padding_idx is not None:
        right = right.masked_fill((ids == padding_idx)[..., None], 0)
    return Factored(ids, right, vocab)


EMBEDDING = Rule("embedding", _match, _grad, frozenset({"weight"}), out_axis=1)

TABLE: dict[Callable[..., Any], Rule] = {F.embedding: EMBEDDING}
