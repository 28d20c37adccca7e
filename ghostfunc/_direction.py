"""``graddot_direction``: every training row's ``<g_i, u>`` against a fixed direction ``u``, in one pass.

The direction is any parameter-shaped pytree: a reduced validation gradient, an
Adam-preconditioned one, a second-order direction, a test gradient from another
checkpoint, or the adjoint of a training run (:func:`ghostfunc.unroll`). The
training rows are captured once (a forward and a tap backward) and every
parameter is contracted against its slice of ``u`` by the contract or fused
materialise kernel; the Gram (ghost) kernel needs factors of ``u`` and does not
apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import check_batch, check_model_fn, check_options, check_params
from ._graddot import (
    as_plain_draws,
    capture_one,
    noted,
    refuse_non_finite,
    retry_stale,
    routing,
    score_direction,
    sum_scores,
)
from ._interact import check_model, in_one_call
from ._plan import DIRECTION, Plan

Params = dict[str, Tensor]
#: The kernel policies against a direction (``"ghost"`` and ``"2t2"`` need a second batch's factors).
DIRECTION_POLICIES = ("auto", "materialize", "contract")


class DirectionScores(NamedTuple):
    """What :func:`graddot_direction` returns.

    Attributes:
        scores: ``[n]`` with ``scores[i] = <g_i, u>``.
        per_param: name -> ``[n]``, each parameter's share; they sum to ``scores``.
        train_grad: name -> ``mean_i g_i``, shaped like the parameter.
        train_loss: ``[n]`` per-sample losses.
        plan: the path every parameter took (``n_val`` is 0: there is no second batch).
    """

    scores: Tensor
    per_param: dict[str, Tensor]
    train_grad: dict[str, Tensor]
    train_loss: Tensor
    plan: Plan


def check_direction(direction: Any, params: Mapping[str, Tensor], where: str, name: str = "direction") -> Params:
    """``direction`` as a dict with exactly the keys, shapes, dtype and device of ``params``."""
    if not isinstance(direction, Mapping):
        raise TypeError(f"{where}: {name} must be a dict name -> tensor shaped like params; "
                        f"got {type(direction).__name__}")
    if set(direction) != set(params):
        missing, extra = sorted(set(params) - set(direction)), sorted(set(direction) - set(params))
        raise ValueError(f"{where}: {name} must have the keys of params; missing {missing}, unexpected {extra}")
    out = {}
    for k, p in params.items():
        u = direction[k]
        if not isinstance(u, Tensor):
            raise TypeError(f"{where}: {name}[{k!r}] must be a tensor; got {type(u).__name__}")
        if u.shape != p.shape:
            raise ValueError(f"{where}: {name}[{k!r}] must have the shape of params[{k!r}], "
                             f"{tuple(p.shape)}; got {tuple(u.shape)}")
        if u.dtype != p.dtype or u.device != p.device:
            raise TypeError(f"{where}: {name}[{k!r}] must have the dtype and device of params[{k!r}] "
                            f"({p.dtype}, {p.device}); got {u.dtype}, {u.device}")
        if not bool(torch.isfinite(u).all()):
            raise FloatingPointError(f"{where}: {name}[{k!r}] holds non-finite entries "
                                     f"({int((~torch.isfinite(u)).sum())} of {u.numel()}); every score would be too")
        out[k] = u.detach()
    return out


@in_one_call
def graddot_direction(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    direction: Mapping[str, Tensor],
    *,
    policy: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> DirectionScores:
    """Every training row's gradient dotted with a fixed direction: ``scores[i] = <g_i, u>``.

    One forward and one tap backward over ``train`` (as :func:`ghostfunc.graddot`
    makes for its training rows), then per parameter one contraction against
    ``u[name]``: ``Σ_t L[i,t]ᵀ U R[i,t]`` for matrix parameters (contract, or the
    fused materialise kernel, chosen per parameter by cost under ``"auto"``), a
    dot product of the per-sample gradients for the others. No validation batch.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` ``[B]``, samples independent.
        params: name -> trainable tensor; not modified.
        train: batch pytree, sample axis first (``n`` rows); leaves the model
            ignores (a dataset ``index``) ride along.
        direction: name -> tensor with the keys, shapes and dtype of ``params``.
        policy: ``"auto"`` (cost model), ``"materialize"`` or ``"contract"``; all give the same numbers.
        compute_dtype: opt-in lower precision for the contractions (accumulated in float32).

    Returns:
        :class:`DirectionScores`: ``scores`` ``[n]``, ``per_param``, ``train_grad``, ``train_loss`` ``[n]``, ``plan``.

    Example:
        >>> import torch, ghostfunc
        >>> def model_fn(p, batch):
        ...     x, y = batch
        ...     return 0.5 * ((x @ p["w"]) - y) ** 2
        >>> p = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> x, y = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> u = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
        >>> ghostfunc.graddot_direction(model_fn, p, (x, y), u).scores
        tensor([-1., -2., -3.], dtype=torch.float64)
    """
    where = "graddot_direction"
    check_model_fn(model_fn, where)
    if policy not in DIRECTION_POLICIES:
        raise ValueError(f"{where}: policy must be one of {DIRECTION_POLICIES} (ghost needs a second batch's "
                         f"factors, not a fixed direction); got {policy!r}")
    check_options(where, compute_dtype=compute_dtype)
    checked = check_params(params, where)
    u = check_direction(direction, checked, where)
    tb = check_batch(train, "train", where)
    check_model(model_fn, checked, (tb,), where, ("train",))  # parameters used, samples independent (cached)

    def attempt(fresh: bool) -> DirectionScores:
        r = routing(model_fn, checked, tb, tb, where, DIRECTION if policy == "auto" else policy, "mean", fresh)
        r = r._replace(plan=r.plan._replace(policy=policy, n_val=0, val_reduce=None))
        half = capture_one(model_fn, checked, tb, r, 0, where)
        per_param, train_grad = {}, {}
        for k, route in r.plan.routes.items():
            per_param[k], train_grad[k] = score_direction(route.path, half.grads[k], u[k], tb.size, checked[k],
                                                          compute_dtype)
        scores = sum_scores(per_param, checked)
        refuse_non_finite(where, scores, per_param, train_grad)
        return DirectionScores(scores, per_param, train_grad, half.loss, r.plan)

    # a model that draws random numbers: the rows see what model_fn(params, train) draws (as in graddot)
    out, notes = as_plain_draws(model_fn, checked, (tb,), lambda: retry_stale(where, attempt),
                                lambda o: (o.train_loss,), where, lambda o: o.plan.notes)
    return out._replace(plan=noted(out.plan, notes)) if notes else out
