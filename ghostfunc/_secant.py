"""Order-2 In-Run Data Shapley values from a secant: two validation gradients instead of a Hessian product.

With ``a = lr/n``, ``G = Σ_j g_j`` and ``θ' = θ − a·G`` (the SGD step on the
training rows), ``ḡ_val(θ') = ḡ_val(θ) − a·H_val G + O(a²)``, so the order-2 value

    φ_i = −a·<g_i, ḡ_val(θ)> + (a²/2)·g_iᵀ H_val G

is, up to ``O(a³)``, the trapezoid

    φ_i ≈ −(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ')>.

For a quadratic validation loss both are exact (``H_val`` is constant); otherwise
they differ by ``O(a³)`` absolute, ``O(a²)`` relative to the values. The curvature
costs one ordinary validation backward at ``θ'`` instead of a forward-over-reverse
pass; and ``θ'`` is the next step's ``θ`` under plain SGD, so with a fixed
validation batch :func:`ghostfunc.train_step` reuses ``ḡ_val(θ')`` as the next
step's ``ḡ_val(θ)`` (:class:`ValGrad`, kept in the train state) and a step costs
about what an order-1 step costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _kernels as K
from ._calibrate import constants
from ._capture import Batch, weighted_grad
from ._graddot import (
    Routing,
    _draws_random,
    _rng_state,
    _same,
    capture_one,
    contract_direction,
    retry_stale,
    routing,
    sum_scores,
    train_mean,
)
from ._ops import Direct, Factored
from ._plan import Plan, Route, direction_kernel

Params = dict[str, Tensor]
CURVATURES = ("exact", "secant")


class ValGrad(NamedTuple):
    """The mean validation gradient at ``params`` for one validation batch, and its losses.

    ``val``: copies of the batch's tensor leaves and ``signature`` the rest of it
    (what :func:`matches` compares); ``params``: the ``θ`` the gradient was taken
    at; ``grad``: ``ḡ_val(θ)`` (name -> shaped like the parameter); ``loss``: ``[m]``.
    """

    val: tuple[Tensor, ...]
    signature: tuple
    params: Params
    grad: Params
    loss: Tensor


class Secant(NamedTuple):
    """One step's secant values: ``values`` ``[n]``, ``first_order`` ``[n]`` (``−a·<g_i, ḡ_val(θ)>``),
    the mean train gradient, losses ``[n]`` and ``[m]`` at ``θ``, the plan, and ``after``: ``ḡ_val(θ')``."""

    values: Tensor
    first_order: Tensor
    train_grad: Params
    train_loss: Tensor
    val_loss: Tensor
    plan: Plan
    after: ValGrad


def check_curvature(where: str, curvature: Any, order: Any) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"{where}: curvature must be 'exact' or 'secant'; got {curvature!r}")
    if curvature == "secant" and order != 2:
        raise ValueError(f"{where}: curvature='secant' is the order-2 term; it needs order=2, got order={order!r}")


def matches(cached: ValGrad | None, params: Mapping[str, Tensor], val: Batch) -> bool:
    """Whether ``cached`` is ``ḡ_val`` at exactly these parameters for exactly this validation batch.

    Compares values, not identities (the same tensors compare in ``O(1)`` per parameter):
    a batch rebuilt with equal contents hits, one changed in place misses.
    """
    if cached is None or cached.signature != val.signature or len(cached.val) != len(val.tensors):
        return False
    if cached.params.keys() != params.keys():
        return False
    same = all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
               for a, b in zip(cached.val, val.tensors, strict=True))
    return same and all(p is q or (p.shape == q.shape and p.dtype == q.dtype and p.device == q.device
                                   and torch.equal(p, q)) for p, q in ((params[k], cached.params[k]) for k in params))


def sgd_point(params: Mapping[str, Tensor], train_grad: Mapping[str, Tensor], lr: float) -> Params:
    """``θ' = θ − lr·ḡ_train = θ − a·G``, rounded exactly as :func:`ghostfunc.sgd` rounds its update."""
    return {k: p.add(train_grad[k], alpha=-lr) for k, p in params.items()}


def secant_values(where: str, model_fn: Callable[[Params, Any], Tensor], params: Params, tb: Batch, vb: Batch, *,
                  lr: float, weights: Tensor, before: ValGrad | None = None) -> Secant:
    """Secant order-2 values ``φ_i = −(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ')>`` (``a = lr/n``, ``θ' = θ − a·G``).

    Passes: a tap capture of the training rows (``g_i`` factors, ``G``); ``ḡ_val(θ)``
    from ``before`` when it :func:`matches` (else one ordinary validation backward);
    one ordinary validation backward at ``θ'``; two contractions ``<g_i, ḡ_val(·)>``.
    ``weights`` ``[m]`` are the validation weights (``1/m``: the mean). A model that
    draws random numbers (dropout in training mode) is refused: the two validation
    gradients would see different masks, and their difference would not be curvature.
    """
    if _draws_random(model_fn):
        raise ValueError(_RANDOM_MESSAGE.format(where=where))
    device = next(iter(params.values())).device
    rng = _rng_state(device)
    n = tb.size
    a = lr / n

    def train_first(fresh: bool) -> tuple[Routing, Any]:
        r = routing(model_fn, params, tb, vb, where, "contract", "mean", fresh)
        return r, capture_one(model_fn, params, tb, r, 0, where)

    r, t = retry_stale(where, train_first)
    g_train = {k: train_mean(route.path, t.grads[k], n, params[k]) for k, route in r.plan.routes.items()}
    if before is not None and matches(before, params, vb):
        g_now, loss_now = before.grad, before.loss
    else:
        g_now, loss_now = weighted_grad(model_fn, params, vb, weights, where, "val")
    moved = sgd_point(params, g_train, lr)
    g_next, loss_next = weighted_grad(model_fn, moved, vb, weights, where, "val")
    if not _same(rng, _rng_state(device)):
        raise ValueError(_RANDOM_MESSAGE.format(where=where))

    both = sum_scores({k: two_dots(route, t.grads[k], g_now[k], g_next[k], n, params[k])
                       for k, route in r.plan.routes.items()}, params)  # [n, 2]
    now, nxt = both.unbind(1)  # <g_i, ḡ_val(θ)>, <g_i, ḡ_val(θ')>  [n] each
    values = (now + nxt).mul(-a / 2)
    if before is not None and g_now is before.grad:
        copies = before.val  # the batch equals these copies
    else:
        copies = tuple(x.detach().clone() for x in vb.tensors)
    after = ValGrad(copies, vb.signature, moved, g_next, loss_next)
    return Secant(values, now.mul(-a), g_train, t.loss, loss_now, r.plan, after)


def two_dots(route: Route, uses: list[Factored | Direct], u: Tensor, v: Tensor, n: int, param: Tensor) -> Tensor:
    """``[<g_i, u>, <g_i, v>]`` for every training row: ``[n, 2]``. Factored parameters take the
    cheaper of two contractions and one materialisation dotted with both (:func:`direction_kernel`)."""
    cheaper = direction_kernel(n, route.tokens, route.p, route.d, _ids(uses), 2, constants(param.device, param.dtype))
    if route.factored and cheaper == "materialize":
        uv = torch.stack([u, v]).reshape(2, route.p, route.d).to(param.dtype)  # [2, p, d]
        return K.materialise_dots([f for f in uses if isinstance(f, Factored)], uv, n)[0]
    return torch.stack([contract_direction(route.path, uses, u, n, param),
                        contract_direction(route.path, uses, v, n, param)], 1)


def _ids(uses: list[Factored | Direct]) -> bool:
    return all(isinstance(f, Factored) and f.ids for f in uses)


_RANDOM_MESSAGE = (
    "{where}: curvature='secant' needs a deterministic model_fn, and this one draws random numbers (dropout in "
    "training mode?): it compares validation gradients at two parameter values, and different dropout masks "
    "would make their difference noise, not curvature. Put dropout in eval mode, or use curvature='exact'"
)
