"""Linear-like calls: ``F.linear``, ``torch.addmm`` (HF ``Conv1D``), ``x @ W``.

For ``y = x Wᵀ + b`` with ``x [n, t, d]``, ``y [n, t, p]`` and output gradient ``B``:
``g_W = Σ_t B[t] ⊗ x[t]`` (factored, ``[p, d]``) and ``g_b = Σ_t B[t]`` (direct).
``torch.addmm(b, x, W)`` stores ``W`` as ``[d, p]``, so its factors swap sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import Direct, Factored, Grad, Match, Rule, sum_to, tokens


def _match_linear(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Match | None:
        if weight.dim() != 2:
            return None
        roles = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return Match(roles, (input,), None)

    return bind(*args, **kwargs)


def _grad_linear(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static
    if role == "bias":
        return Direct(sum_to(grad_out, shape))
    (x,) = saved
    p, d = shape
    return Factored(tokens(grad_out, p), tokens(x, d), p)  # [n,t,p] x [n,t,d]


def _match_addmm(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, mat1: Tensor, mat2: Tensor, *, beta: Any = 1, alpha: Any = 1) -> Match | None:
        if beta != 1 or alpha != 1:
            return None
        return Match({"bias": input, "weight": mat2}, (mat1,), None)

    return bind(*args, **kwargs)


def _grad_addmm(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static
    if role == "bias":
        return Direct(sum_to(grad_out, shape))
    (x,) = saved
    d, p = shape  # W is [in, out]: rows follow the input
    return Factored(tokens(x, d), tokens(grad_out, p), d)  # [n,t,in] x [n,t,out]


def _match_matmul(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, other: Tensor) -> Match | None:
        if other.dim() != 2 or input.dim() < 1:
            return None
        return Match({"weight": other}, (input,), None)

    return bind(*args, **kwargs)


def _grad_matmul(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static, role
    (x,) = saved
    d, p = shape  # x @ W with W [in, out]
    return Factored(tokens(x, d), tokens(grad_out, p), d)


LINEAR = Rule("linear", _match_linear, _grad_linear, frozenset({"weight"}))
ADDMM = Rule("addmm", _match_addmm, _grad_addmm, frozenset({"weight"}), out_axis=1)
MATMUL = Rule("matmul", _match_matmul, _grad_matmul, frozenset({"weight"}), out_axis=1)

TABLE: dict[Callable[..., Any], Rule] = {
    F.linear: LINEAR,
    torch.addmm: ADDMM,
    torch.matmul: MATMUL,
    torch.Tensor.matmul: MATMUL,
    torch.Tensor.__matmul__: MATMUL,
    torch.mm: MATMUL,  # (both operands 2-D: x [n, in] @ W [in, out])
    torch.Tensor.mm: MATMUL,
}
