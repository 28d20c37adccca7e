"""What an op rule is: how one parametrised torch call turns into per-sample gradients.

Index letters used in every rule: ``n`` samples, ``t`` tokens (every position that
shares the parameter: sequence steps, conv patches, flattened rows), ``p`` the
parameter's first (row) axis, ``d`` its second (column) axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Factored(NamedTuple):
    """A per-sample gradient ``g_n = Σ_t left[n, t] ⊗ right[n, t]`` (a ``[p, d]`` matrix).

    ``left`` is ``[n, t, p]`` (float), or ``[n, t]`` integer ids standing for one-hot
    rows of a ``p``-row matrix (embeddings); ``right`` is ``[n, t, d]``.
    """

    left: Tensor
    right: Tensor
    p: int

    @property
    def ids(self) -> bool:
        return not self.left.is_floating_point()


class Direct(NamedTuple):
    """A per-sample gradient kept whole: ``grad`` is ``[n, *param.shape]``."""

    grad: Tensor


Grad = Factored | Direct


class Match(NamedTuple):
    """A call that a rule recognised.

    ``roles`` maps a role (``"weight"``, ``"bias"``) to the tensor in that role;
    ``saved`` are the tensors the rule needs after the backward pass (per sample);
    ``static`` is whatever non-tensor configuration it needs (eps, stride...);
    ``rule``, when set, is the rule that handles this call instead of the table's
    (a grouped conv keeps its weight's per-sample gradient whole: another form).
    """

    roles: dict[str, Tensor]
    saved: tuple[Tensor, ...]
    static: Any
    rule: Any = None


class Rule(NamedTuple):
    """How one family of torch calls is recognised and turned into per-sample grads.

    ``match(args, kwargs)`` returns a :class:`Match` or ``None`` when the call is
    used in a way the rule does not know (then its parameters take the fallback).
    ``grad(static, saved, grad_out, role, param_shape)`` gets ``saved`` and the
    output gradient ``grad_out`` with the sample axis first (``[n, *out]``) and
    returns the role's per-sample gradient. ``forms`` says which roles are
    :class:`Factored` (the others are :class:`Direct`).
    """

    kind: str
    match: Callable[[tuple, dict[str, Any]], Match | None]
    grad: Callable[[Any, tuple[Tensor, ...], Tensor, str, torch.Size], Grad]
    factored_roles: frozenset[str] = frozenset()
    out_axis: int = 0  # the parameter axis that indexes output features (tokens = out.numel() / that size)


def recognise(rule: Rule | None, args: tuple, kwargs: dict[str, Any]) -> tuple[Rule | None, Match | None]:
    """The table's ``rule`` for a call (``None``: none) applied to its arguments: the rule that handles the
    call (a match may name another, :attr:`Match.rule`) and the match (``None``: a use the rule does not know)."""
    match = rule.match(args, kwargs) if rule is not None else None
    return (match.rule if match is not None and match.rule is not None else rule), match


def sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` of shape ``[n, *s]`` down to ``[n, *shape]`` by broadcasting rules.

    ``shape`` is right-aligned against ``s`` as in ``torch.broadcast_shapes``.
    """
    n, s = x.shape[0], x.shape[1:]
    if len(s) == len(shape) + 1 and s[1:] == shape:  # [n, t, *shape]: the common case (tokens summed)
        return x.sum(1)
    lead = len(s) - len(shape)
    if lead < 0:
        raise ValueError(f"cannot sum shape {tuple(s)} to {tuple(shape)}")
    x = x.sum(dim=tuple(range(1, 1 + lead))) if lead else x
    keep = [i + 1 for i, size in enumerate(shape) if size == 1 and x.shape[i + 1] != 1]
    if keep:
        x = x.sum(dim=keep, keepdim=True)
    return x.reshape(n, *shape)


def tokens(x: Tensor, width: int) -> Tensor:
    """``[n, ..., width] -> [n, t, width]``: every leading position is a token."""
    return x if x.dim() == 3 and x.shape[2] == width else x.reshape(x.shape[0], -1, width)


def align(x: Tensor, ndim: int) -> Tensor:
    """View ``[n, *s]`` as ``[n, 1, ..., 1, *s]`` with ``ndim`` dims (right-aligned broadcast)."""
    return x.reshape(x.shape[0], *([1] * (ndim - x.dim())), *x.shape[1:])
