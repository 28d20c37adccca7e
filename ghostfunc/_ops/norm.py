"""Normalisation and elementwise affine calls: every gradient here is direct.

- ``F.layer_norm`` / ``F.rms_norm``: ``y = x̂ ⊙ w + b`` with ``x̂`` the normalised
  input, so ``g_w = Σ_t B[t] ⊙ x̂[t]`` and ``g_b = Σ_t B[t]``.
- ``F.group_norm``: the same per channel (axis 1 of the model's batch layout).
- ``x * w`` and ``x + w`` with a parameter ``w`` (HF ``LlamaRMSNorm``,
  ``T5LayerNorm``, learnable scales and shifts): ``g_w = sum_to(B ⊙ x)`` and
  ``g_w = sum_to(B)`` under broadcasting.
- ``F.batch_norm`` in training mode mixes the samples of a batch: refused (see :func:`batch_norm`), but for
  one that normalises a single row no vmap batches, with no running statistics: a weight standardised by it
  (Hugging Face BiT's ``WeightStandardizedConv2d``, timm's ``StdConv2d``) runs as any other call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import Direct, Grad, Match, Rule, align, sum_to


class SamplesInteractError(ValueError):
    """The model mixes the samples of a batch, so per-sample gradients do not exist."""


def _match_layer_norm(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
             bias: Tensor | None = None, eps: float = 1e-5) -> Match | None:
        roles = {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}
        return Match(roles, (input,), (tuple(normalized_shape), eps))

    return bind(*args, **kwargs)


def _grad_layer_norm(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    if role == "bias":
        return Direct(sum_to(grad_out, shape))
    normalized_shape, eps = static
    (x,) = saved
    x_hat = F.layer_norm(x, normalized_shape, None, None, eps)
    return Direct(sum_to(grad_out * x_hat, shape))


def _match_rms_norm(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
             eps: float | None = None) -> Match | None:
        if weight is None:
            return None
        return Match({"weight": weight}, (input,), (tuple(normalized_shape), eps))

    return bind(*args, **kwargs)


def _grad_rms_norm(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del role
    normalized_shape, eps = static
    (x,) = saved
    return Direct(sum_to(grad_out * F.rms_norm(x, normalized_shape, None, eps), shape))


def _match_group_norm(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, num_groups: int, weight: Tensor | None = None,
             bias: Tensor | None = None, eps: float = 1e-5) -> Match | None:
        if input.dim() < 2:
            return None
        roles = {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}
        return Match(roles, (input,), (num_groups, eps))

    return bind(*args, **kwargs)


def _grad_group_norm(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    num_groups, eps = static
    (x,) = saved  # [n, b, c, *spatial]: the model's own batch axis b is 1 per sample
    y = grad_out if role == "bias" else grad_out * F.group_norm(x.flatten(0, 1), num_groups, None, None, eps).view_as(x)
    dims = [1] + list(range(3, y.dim()))
    return Direct(y.sum(dim=dims))  # [n, c]


_BATCH_STATS = (
    "the model calls batch_norm in training mode (a BatchNorm layer in train mode, or one with "
    "track_running_stats=False, which always uses batch statistics), which normalises each sample "
    "with statistics of the whole batch, so samples interact and per-sample gradients do not exist; "
    "put BatchNorm layers in eval mode (model.eval()) with running statistics, or use GroupNorm/LayerNorm"
)


def _batch_statistics(input: Any, running_mean: Any, running_var: Any, training: Any) -> bool:
    """Whether a ``batch_norm`` call is refused: in training mode, unless it normalises one row (``input.shape[0] ==
    1``) that no ``vmap`` batches and keeps no running statistics. That one is a function of its row alone, as
    Hugging Face BiT's and timm's weight standardisation call it on a convolution's weight (``weight.reshape(1,
    out_channels, -1)``; refused as a BatchNorm in train mode before). A model that folds its samples into that row
    (``h.transpose(0, 1).reshape(1, C, -1)``) mixes them as ``h - h.mean(0)`` would, and is refused by the checks
    that compare the batch's losses with each sample's alone."""
    if not training:
        return False
    if running_mean is not None or running_var is not None or not isinstance(input, Tensor) or input.dim() < 2:
        return True
    return input.shape[0] != 1 or _varies_by_sample(input)


def _varies_by_sample(t: Tensor) -> bool:
    """Whether ``t`` differs between the samples a ``vmap`` batches it over, at some level of its functorch wrappers
    (inside ``vmap(grad(f))`` a sample's activation is a gradient-tracking wrapper around a batched tensor). A
    parameter's copy per sample (the capture's fused fallback, :mod:`ghostfunc._capture`) and what is made of it
    alone are batched but the same for every sample: a weight standardised per sample is each sample's own call."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            u, axis = functorch.get_unwrapped(t), functorch.maybe_get_bdim(t)
            if u.shape[axis] > 1 and u.stride(axis) != 0:
                with torch.no_grad():
                    if not bool((u == u.narrow(axis, 0, 1)).all()):
                        return True
            t = u
        else:
            t = functorch.get_unwrapped(t)
    return False


def one_row_input(func: Any, args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The input of a ``batch_norm`` call (:func:`batch_norm`, :func:`_batch_norm_aten`, as the interceptions run
    them) in training mode, else ``None``. Outside ``vmap`` such a call that was not refused normalises one row
    (:func:`_batch_statistics`), which may hold a parameter's values (weight standardisation) or the batch's samples
    folded in: the whole-batch replay (:mod:`ghostfunc._whole`) runs only the first, a view of a parameter, and
    leaves the rest to the per-sample capture, where :func:`_varies_by_sample` tells them apart by value (a fold
    switched on after the checks were cached ran there unrefused: 9.2 off the loop, h63)."""
    if func not in BATCH_NORMS:
        return None
    training = args[5] if len(args) > 5 else kwargs.get("training", False)  # (the sixth in both signatures)
    first = args[0] if args else kwargs.get("input")
    return first if training and isinstance(first, Tensor) else None


def _match_batch_norm(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    def bind(input: Tensor, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
             training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Match | None:
        del momentum
        if _batch_statistics(input, running_mean, running_var, training):
            raise SamplesInteractError(_BATCH_STATS)
        if training:  # one row's own statistics (see _batch_statistics): no rule, taken as any unrecognised call
            return None
        if not (isinstance(running_mean, Tensor) and isinstance(running_var, Tensor)) or input.dim() < 2:
            return None
        # eval mode: a scale and shift per channel (axis 1) of the normalised input
        roles = {role: t for role, t in (("weight", weight), ("bias", bias)) if isinstance(t, Tensor)}
        return Match(roles, (input,), (running_mean, running_var, eps))

    return bind(*args, **kwargs)


def _grad_batch_norm(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    """Eval-mode BatchNorm: ``[n, N, C, *]`` output gradient -> per-sample ``[n, C]`` (times ``x̂`` for the weight)."""
    g = grad_out
    if role == "weight":
        mean, var, eps = static
        view = (1, 1, -1) + (1,) * (g.dim() - 3)  # the channel axis of the call (1) is axis 2 here
        g = g * ((saved[0] - mean.reshape(view)) * torch.rsqrt(var.reshape(view) + eps)).to(g.dtype)
    return Direct(g.sum([d for d in range(1, g.dim()) if d != 2]).reshape(g.shape[0], *shape))


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> Tensor:
    """``F.batch_norm``, refused in training mode whether or not it touches a trainable parameter (but for one
    row's own statistics, :func:`_batch_statistics`).

    Run in its place by the capture and the boundary checks, so frozen or absent
    affine weights, ``track_running_stats=False`` and a trace cached in eval mode
    reused in train mode all raise :class:`SamplesInteractError` before any running
    statistic is updated.
    """
    if _batch_statistics(input, running_mean, running_var, training):
        raise SamplesInteractError(_BATCH_STATS)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm_aten(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                     running_var: Tensor | None, training: bool, *args: Any, **kwargs: Any) -> Tensor:
    """``torch.batch_norm`` (the ATen signature), refused in training mode like :func:`batch_norm`."""
    if _batch_statistics(input, running_mean, running_var, training):
        raise SamplesInteractError(_BATCH_STATS)
    return torch.batch_norm(input, weight, bias, running_mean, running_var, training, *args, **kwargs)


def _operands(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    if kwargs or len(args) != 2:
        return None
    return args[0], args[1]


def _match_mul(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    pair = _operands(args, kwargs)
    if pair is None or not all(isinstance(a, Tensor) for a in pair):
        return None
    # Either side may be the parameter; the rule learns which from the roles.
    return Match({"left": pair[0], "right": pair[1]}, pair, None)


def _grad_mul(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static
    other = saved[1] if role == "left" else saved[0]
    return Direct(sum_to(grad_out * align(other, grad_out.dim()), shape))


def _grad_add(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static, saved, role
    return Direct(sum_to(grad_out, shape))


def _match_add(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    pair = _operands(args, kwargs)
    if pair is None or not all(isinstance(a, Tensor) for a in pair):
        return None
    return Match({"left": pair[0], "right": pair[1]}, (), None)


LAYER_NORM = Rule("layer_norm", _match_layer_norm, _grad_layer_norm)
RMS_NORM = Rule("rms_norm", _match_rms_norm, _grad_rms_norm)
GROUP_NORM = Rule("group_norm", _match_group_norm, _grad_group_norm)
BATCH_NORM = Rule("batch_norm", _match_batch_norm, _grad_batch_norm)
SCALE = Rule("scale", _match_mul, _grad_mul)
SHIFT = Rule("shift", _match_add, _grad_add)

TABLE: dict[Callable[..., Any], Rule] = {
    F.layer_norm: LAYER_NORM,
    batch_norm: BATCH_NORM,
    F.rms_norm: RMS_NORM,
    torch.rms_norm: RMS_NORM,  # (what a compiled trace meets: dynamo runs F.rms_norm's body, not its dispatch)
    F.group_norm: GROUP_NORM,
    F.batch_norm: BATCH_NORM,
    torch.mul: SCALE,
    torch.Tensor.mul: SCALE,
    torch.Tensor.__mul__: SCALE,
    torch.Tensor.__rmul__: SCALE,
    torch.add: SHIFT,
    torch.Tensor.add: SHIFT,
    torch.Tensor.__add__: SHIFT,
    torch.Tensor.__radd__: SHIFT,
}

def _batch_norm_stats(*args: Any, **kwargs: Any) -> Any:
    """``torch.batch_norm_stats``: the batch's statistics ``SyncBatchNorm`` takes in training mode across processes
    (before its collectives), refused as :func:`batch_norm` in training mode is (on uneven shards the checks' runs
    moved its buffers another number of times on each rank, and the ranks' comparison of their models said
    "frozen tensors differ", h86)."""
    raise SamplesInteractError(_BATCH_STATS + " (SyncBatchNorm in training mode, synchronised across processes)")


batch_norm.__name__ = batch_norm.__qualname__ = "batch_norm"
_batch_norm_aten.__name__ = _batch_norm_aten.__qualname__ = "batch_norm"

#: The ``batch_norm`` calls the interceptions run (:func:`one_row_input`).
BATCH_NORMS = frozenset({batch_norm, _batch_norm_aten})

#: Calls the capture runs in place of torch's own (the refusal comes before any running statistic moves).
EXACT: dict[Callable[..., Any], Callable[..., Any]] = {F.batch_norm: batch_norm, torch.batch_norm: _batch_norm_aten,
                                                       torch.batch_norm_stats: _batch_norm_stats}
