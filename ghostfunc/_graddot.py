"""``graddot`` and ``plan``: the public entry points over capture, plan and kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _kernels as K
from ._capture import Batch, Captured, ModelFn, _Stale, capture, trace
from ._checks import check_model_fn, check_options, check_pair, check_params
from ._ops import Direct, Factored
from ._plan import Plan, Usage, make_plan, usages


class GradDot(NamedTuple):
    """What :func:`graddot` returns.

    Attributes:
        scores: ``[n_train]`` with ``scores[i] = <g_i, ḡ_val>`` (``val_reduce="mean"``),
            ``<g_i, Σ_v g_v>`` (``"sum"``), or the ``[n_train, n_val]`` matrix
            ``<g_i, g_v>`` (``None``).
        per_param: name -> tensor shaped like ``scores``; the entries sum to ``scores``.
        train_grad: name -> ``mean_i g_i`` over the training rows, shaped like the
            parameter (what an optimizer step on the training batch uses).
        train_loss: ``[n_train]`` per-sample losses.
        val_loss: ``[n_val]`` per-sample losses.
        plan: the path every parameter took (prints as a table).
    """

    scores: Tensor
    per_param: dict[str, Tensor]
    train_grad: dict[str, Tensor]
    train_loss: Tensor
    val_loss: Tensor
    plan: Plan


class Run(NamedTuple):
    """One capture, with the usage that routed it (shared by graddot and the training step)."""

    captured: Captured
    usage: dict[str, Usage]


def run(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str) -> Run:
    """Trace (cached) and capture; a stale trace is refreshed once."""
    for attempt in range(2):
        fresh = attempt > 0
        traces = (trace(model_fn, params, train, where, fresh=fresh), trace(model_fn, params, val, where, fresh=fresh))
        use = usages(params, traces)
        kernel = {k for k, u in use.items() if u.form is not None}
        try:
            return Run(capture(model_fn, params, train, val, traces, kernel, where), use)
        except _Stale as err:
            if fresh:
                raise RuntimeError(
                    f"{where}: model_fn made different parametrised calls on two runs with the same input "
                    f"shapes ({err}); ghostfunc needs the calls to depend on shapes only"
                ) from None
    raise AssertionError("unreachable")


def _total(parts: list[Tensor], like: Tensor) -> Tensor:
    return torch.stack(parts).sum(0) if parts else torch.zeros_like(like)


def _direct(uses: list[Factored | Direct], n: int, shape: torch.Size, ref: Tensor) -> Tensor:
    grads = [u.grad for u in uses if isinstance(u, Direct)]
    return _total(grads, ref.new_zeros(n, *shape)).reshape(n, -1)  # [n, P]


def _val_direction(uses: list, weights: Tensor, p: int, d: int, ref: Tensor) -> Tensor:
    return _total([K.weight_sum(u, weights) for u in uses], ref.new_zeros(p, d))


def score_param(route_path: str, tr: list, va: list, weights: Tensor | None, n: int, m: int,
                param: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """One parameter's score contribution (``[n]`` or ``[n, m]``) and mean train gradient."""
    shape = param.shape
    if route_path in ("direct", "fallback"):
        gt, gv = _direct(tr, n, shape, param), _direct(va, m, shape, param)  # [n, P], [m, P]
        other = gv.T if weights is None else (weights @ gv)
        return gt @ other, gt.mean(0).reshape(shape)
    p = shape[0]
    d = param.numel() // p
    zero_pd = param.new_zeros(p, d)
    if route_path == "materialize":
        if weights is None:
            other = _total([K.materialise(u, slice(None)) for u in va], param.new_zeros(m, p, d)).reshape(m, -1).T
        else:  # a reduced validation gradient: one column
            other = _val_direction(va, weights, p, d, param).reshape(-1, 1)
        other_c = other if dtype is None else other.to(dtype)
        scores = param.new_zeros(n, other.shape[1])
        total = zero_pd.clone()
        for rows in K.chunk_rows(n, p, d):
            g = _total([K.materialise(u, rows) for u in tr], param.new_zeros(rows.stop - rows.start, p, d))
            gc = g.reshape(g.shape[0], -1)
            scores[rows] = (gc if dtype is None else gc.to(dtype)) @ other_c
            total += g.sum(0)
        scores = scores if weights is None else scores[:, 0]
        return scores, (total / n).reshape(shape)
    train_mean = (_total([K.weight_sum(u) for u in tr], zero_pd) / n).reshape(shape)
    if route_path == "ghost":
        mat = _total([K.gram(a, b, dtype) for a in tr for b in va], param.new_zeros(n, m))
        return (mat if weights is None else mat @ weights), train_mean
    assert weights is not None, "contract needs a reduced validation gradient"
    u_val = _val_direction(va, weights, p, d, param)  # contract
    return _total([K.contract(a, u_val, dtype) for a in tr], param.new_zeros(n)), train_mean


def score_direction(route_path: str, tr: list, u: Tensor, n: int, param: Tensor,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``<g_i, U>`` for a fixed direction ``u`` (shaped like ``param``): ``[n]``, and the mean train gradient.

    Factored parameters use ``contract`` (``"materialize"`` keeps its fused form,
    which also yields the train gradient); direct and fallback ones a dot product.
    """
    if route_path in ("direct", "fallback"):
        gt = _direct(tr, n, param.shape, param)
        return gt @ u.reshape(-1), gt.mean(0).reshape(param.shape)
    p = param.shape[0]
    u2 = u.reshape(p, -1)
    if route_path == "materialize":
        scores, total = param.new_zeros(n), torch.zeros_like(u2)
        for rows in K.chunk_rows(n, p, u2.shape[1]):
            g = _total([K.materialise(f, rows) for f in tr], param.new_zeros(rows.stop - rows.start, *u2.shape))
            scores[rows] = g.reshape(g.shape[0], -1) @ u2.reshape(-1)
            total += g.sum(0)
        return scores, (total / n).reshape(param.shape)
    train_mean = (_total([K.weight_sum(f) for f in tr], torch.zeros_like(u2)) / n).reshape(param.shape)
    return _total([K.contract(f, u2, dtype) for f in tr], param.new_zeros(n)), train_mean


def val_grad(route_path: str, va: list, weights: Tensor, param: Tensor) -> Tensor:
    """``Σ_v w_v g_v`` for one parameter, shaped like it."""
    if route_path in ("direct", "fallback"):
        return (weights @ _direct(va, len(weights), param.shape, param)).reshape(param.shape)
    p = param.shape[0]
    return _val_direction(va, weights, p, param.numel() // p, param).reshape(param.shape)


def val_weights(val_reduce: str | None, m: int, like: Tensor) -> Tensor | None:
    if val_reduce is None:
        return None
    return torch.full((m,), 1.0 / m if val_reduce == "mean" else 1.0, dtype=like.dtype, device=like.device)


def _prepare(where: str, model_fn: Any, params: Any, train: Any, val: Any,
             **options: Any) -> tuple[dict[str, Tensor], Batch, Batch]:
    check_model_fn(model_fn, where)
    check_options(where, **options)
    params = check_params(params, where)
    tb, vb = check_pair(train, val, where)
    return params, tb, vb


def graddot(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    val_reduce: str | None = "mean",
    policy: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> GradDot:
    """Per-sample gradient dot products with the validation gradient, in one backward pass.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` of shape ``[B]``, one loss
            per sample; it must treat samples independently.
        params: name -> trainable tensor (these get gradients; anything else the
            model uses is a constant). Not modified.
        train: a tensor or pytree of tensors with the sample axis first
            (``n_train`` samples); non-tensor leaves pass through.
        val: the same structure as ``train`` (``n_val`` samples; other sizes of
            the non-sample axes are fine, e.g. a different padded length).
        val_reduce: ``"mean"`` (``ḡ_val = mean_v g_v``), ``"sum"``, or ``None``
            for the full ``[n_train, n_val]`` matrix.
        policy: ``"auto"`` (cost model, the default), ``"2t2"``, ``"ghost"``,
            ``"materialize"`` or ``"contract"``; all give the same numbers.
        compute_dtype: opt-in lower precision (e.g. ``torch.bfloat16``) for the
            Gram/contract/materialise products, accumulated in float32.

    Returns:
        :class:`GradDot` with ``scores`` ``[n_train]`` (or ``[n_train, n_val]``),
        ``per_param``, ``train_grad``, ``train_loss`` ``[n_train]``,
        ``val_loss`` ``[n_val]`` and ``plan``.

    Example:
        >>> import torch, ghostfunc
        >>> def model_fn(p, batch):
        ...     x, y = batch
        ...     return 0.5 * ((x @ p["w"]) - y) ** 2
        >>> p = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> x, y = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> ghostfunc.graddot(model_fn, p, (x, y), (x, y)).scores
        tensor([0.3333, 0.3333, 0.3333], dtype=torch.float64)
    """
    where = "graddot"
    checked, tb, vb = _prepare(where, model_fn, params, train, val,
                               val_reduce=val_reduce, policy=policy, compute_dtype=compute_dtype)
    params = checked
    cap, use = run(model_fn, checked, tb, vb, where)
    the_plan = make_plan(checked, use, policy, tb.size, vb.size, val_reduce)
    weights = val_weights(val_reduce, vb.size, next(iter(params.values())))
    per_param, train_grad = {}, {}
    for k, route in the_plan.routes.items():
        tr, va = cap.grads[k]
        w = None if weights is None else weights.to(params[k].dtype)
        s, g = score_param(route.path, tr, va, w, tb.size, vb.size, params[k], compute_dtype)
        per_param[k], train_grad[k] = s, g
    acc = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    scores = torch.stack([v.to(acc) for v in per_param.values()]).sum(0)
    return GradDot(scores, per_param, train_grad, cap.train_loss, cap.val_loss, the_plan)


def plan(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    val_reduce: str | None = "mean",
    policy: str = "auto",
) -> Plan:
    """The path every trainable parameter would take in :func:`graddot`, and why.

    Runs ``model_fn`` on one train and one val sample only (no backward pass).
    The result prints as a table with the ``T`` (train tokens), ``S`` (val
    tokens), ``p`` and ``d`` that the policy saw.
    """
    where = "plan"
    params, tb, vb = _prepare(where, model_fn, params, train, val, val_reduce=val_reduce, policy=policy)
    traces = (trace(model_fn, params, tb, where), trace(model_fn, params, vb, where))
    return make_plan(params, usages(params, traces), policy, tb.size, vb.size, val_reduce)
