"""``graddot`` and ``plan``: the public entry points over capture, plan and kernels."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _kernels as K
from ._capture import Batch, Captured, Half, ModelFn, Trace, _Stale, capture, capture_batches, trace, weighted_grad
from ._checks import check_model_fn, check_options, check_pair, check_params
from ._interact import check_model
from ._ops import Direct, Factored
from ._plan import Plan, make_plan, usages


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


def retry_stale(where: str, attempt: Callable[[bool], Any]) -> Any:
    """``attempt(fresh)``; a stale cached trace (:class:`_Stale`) is refreshed once, then it is an error."""
    for fresh in (False, True):
        try:
            return attempt(fresh)
        except _Stale as err:
            if fresh:
                raise RuntimeError(
                    f"{where}: model_fn made different parametrised calls on two runs with the same input "
                    f"shapes ({err}); ghostfunc needs the calls to depend on shapes only"
                ) from None
    raise AssertionError("unreachable")


class Routing(NamedTuple):
    """The traces of both batches, the parameters the kernels handle, and the plan."""

    traces: tuple[Trace, Trace]
    kernel: set[str]
    plan: Plan


def routing(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
            val_reduce: str | None, fresh: bool) -> Routing:
    """Trace (cached) both batches and route every parameter."""
    traces = (trace(model_fn, params, train, where, fresh=fresh), trace(model_fn, params, val, where, fresh=fresh))
    use = usages(params, traces)
    kernel = {k for k, u in use.items() if u.form is not None}
    return Routing(traces, kernel, make_plan(params, use, policy, train.size, val.size, val_reduce))


def capture_one(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, r: Routing, which: int,
                where: str) -> Half:
    """Capture one batch (``which``: 0 train, 1 val) on its own: a forward and a tap backward."""
    label = ("train", "val")[which]
    return capture_batches(model_fn, params, (batch,), (r.traces[which],), r.kernel, where, (label,))[0]


def run(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
        val_reduce: str | None) -> tuple[Captured, Plan]:
    """Trace (cached), route, and capture both batches in one backward."""

    def attempt(fresh: bool) -> tuple[Captured, Plan]:
        r = routing(model_fn, params, train, val, where, policy, val_reduce, fresh)
        return capture(model_fn, params, train, val, r.traces, r.kernel, where), r.plan

    return retry_stale(where, attempt)


class Streamed(NamedTuple):
    """A capture taken one batch at a time, validation first, each reduced before the next.

    ``val_dir[name]``: ``Σ_v w_v g_v`` shaped like the parameter, for every parameter
    not routed to ghost; ``val_uses[name]``: the validation rows' per-sample gradients
    (one per use), kept only for ghost-routed parameters; ``train[name]``: the
    training rows' per-sample gradients (one per use).
    """

    plan: Plan
    val_dir: dict[str, Tensor]
    val_uses: dict[str, list[Factored | Direct]]
    train: dict[str, list[Factored | Direct]]
    train_loss: Tensor
    val_loss: Tensor


def run_streamed(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str,
                 policy: str, val_reduce: str) -> Streamed:
    """One batch at a time, the validation batch reduced to ``Σ_v w_v g_v`` before the training rows run.

    The same numbers as :func:`run`, with the peak memory of one batch instead of
    both. When no parameter takes the ghost path, the validation side needs only
    ``Σ_v w_v g_v``: one ordinary backward pass (:func:`weighted_grad`), no taps and
    no per-sample factors; otherwise it is captured like the training rows. The
    validation batch goes first, so its activations are freed before the training
    rows' forward. A model that draws random numbers (dropout in training mode) must
    see the training rows first, as in ``model_fn(params, train)`` and :func:`run`:
    then the RNG state is restored and the training batch goes first (and does so on
    later calls of this ``model_fn``). ``val_reduce`` is ``"mean"`` or ``"sum"``.
    """
    return retry_stale(where, lambda fresh: _streamed_once(model_fn, params, train, val, where, policy,
                                                           val_reduce, fresh))


def _streamed_once(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str,
                   policy: str, val_reduce: str, fresh: bool) -> Streamed:
    r = routing(model_fn, params, train, val, where, policy, val_reduce, fresh)
    weights = val_weights(val_reduce, val.size, next(iter(params.values())))
    assert weights is not None
    ghost = [k for k, route in r.plan.routes.items() if route.path == "ghost"]

    def capture_val() -> tuple[dict[str, Tensor], dict[str, list[Factored | Direct]], Tensor]:
        if not ghost:
            val_dir, loss = weighted_grad(model_fn, params, val, weights, where, "val")
            return val_dir, {}, loss
        v = capture_one(model_fn, params, val, r, 1, where)
        val_dir = {k: val_grad(route.path, v.grads[k], weights.to(params[k].dtype), params[k])
                   for k, route in r.plan.routes.items() if k not in ghost}
        return val_dir, {k: v.grads[k] for k in ghost}, v.loss

    device = next(iter(params.values())).device
    before = _rng_state(device)
    if not _draws_random(model_fn):
        val_dir, val_uses, val_loss = capture_val()
        if _same(before, _rng_state(device)):
            t = capture_one(model_fn, params, train, r, 0, where)
            return Streamed(r.plan, val_dir, val_uses, t.grads, t.loss, val_loss)
        _set_rng_state(device, before)  # it drew random numbers: the training rows go first
        _mark_random(model_fn)
        del val_dir, val_uses, val_loss
    t = capture_one(model_fn, params, train, r, 0, where)
    val_dir, val_uses, val_loss = capture_val()
    return Streamed(r.plan, val_dir, val_uses, t.grads, t.loss, val_loss)


def score_streamed(st: Streamed, params: dict[str, Tensor], weights: Tensor, n: int, m: int,
                   dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every parameter's ``<g_i, Σ_v w_v g_v>`` ``[n]`` and mean train gradient, from a streamed capture."""
    per_param, train_grad = {}, {}
    for k, route in st.plan.routes.items():
        if route.path == "ghost":
            s, g = score_param("ghost", st.train[k], st.val_uses[k], weights.to(params[k].dtype), n, m, params[k],
                               dtype)
        else:
            s, g = score_direction(route.path, st.train[k], st.val_dir[k], n, params[k], dtype)
        per_param[k], train_grad[k] = s, g
    return per_param, train_grad


#: ``model_fn``s seen drawing random numbers (their training batch is captured first).
_RANDOM: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _draws_random(model_fn: ModelFn) -> bool:
    try:
        return _RANDOM.get(model_fn, False)
    except TypeError:  # not weak-referenceable: assume it may
        return True


def _mark_random(model_fn: ModelFn) -> None:
    try:
        _RANDOM[model_fn] = True
    except TypeError:
        pass


def _rng_state(device: torch.device) -> tuple[Tensor, ...]:
    """The global generator states a model's random draws advance (CPU, and the device's)."""
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return (torch.get_rng_state(),)


def _set_rng_state(device: torch.device, state: tuple[Tensor, ...]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _same(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _total(parts: list[Tensor], like: Tensor) -> Tensor:
    if not parts:
        return torch.zeros_like(like)
    out = parts[0]
    for x in parts[1:]:  # no stacked copy: a single part comes back as it is
        out = out + x
    return out


def _direct(uses: list[Factored | Direct], n: int, shape: torch.Size, ref: Tensor) -> Tensor:
    """Per-sample gradients ``[n, P]`` of a direct or fallback parameter (the plan never mixes forms)."""
    grads = [u.grad for u in uses if isinstance(u, Direct)]
    if len(grads) != len(uses):
        raise AssertionError("a direct/fallback parameter has a factored use")
    return _total(grads, ref.new_zeros(n, *shape)).reshape(n, -1)  # [n, P]


def _factored(uses: list[Factored | Direct]) -> list[Factored]:
    out = [u for u in uses if isinstance(u, Factored)]
    if len(out) != len(uses):
        raise AssertionError("a factored parameter has a direct use")
    return out


def _val_direction(uses: list, weights: Tensor, p: int, d: int, ref: Tensor) -> Tensor:
    return _total([K.weight_sum(u, weights) for u in _factored(uses)], ref.new_zeros(p, d))


def train_mean(route_path: str, tr: list[Factored | Direct], n: int, param: Tensor) -> Tensor:
    """``mean_i g_i`` over the training rows, shaped like ``param``."""
    if route_path in ("direct", "fallback"):
        return _direct(tr, n, param.shape, param).mean(0).reshape(param.shape)
    p = param.shape[0]
    return (_total([K.weight_sum(f) for f in _factored(tr)], param.new_zeros(p, param.numel() // p)) / n
            ).reshape(param.shape)


def contract_direction(route_path: str, tr: list[Factored | Direct], u: Tensor, n: int, param: Tensor,
                       dtype: torch.dtype | None = None) -> Tensor:
    """``<g_i, U>`` for every training row and a fixed ``u`` shaped like ``param``: ``[n]``.

    Factored parameters: ``Σ_t L[i,t]ᵀ U R[i,t]`` (:func:`ghostfunc._kernels.contract`);
    direct and fallback ones: a dot product of their per-sample gradients.
    """
    if route_path in ("direct", "fallback"):
        return _direct(tr, n, param.shape, param) @ u.reshape(-1).to(param.dtype)  # [n, P] @ [P]
    u2 = u.reshape(param.shape[0], -1)
    return _total([K.contract(f, u2, dtype) for f in _factored(tr)], param.new_zeros(n))


def score_param(route_path: str, tr: list, va: list, weights: Tensor | None, n: int, m: int,
                param: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """One parameter's ``<g_i, g_v>`` against every validation row, ``[n, m]`` (times ``weights``
    ``[m]`` when given: ``[n]``), and its mean train gradient. Against one reduced validation
    gradient, :func:`score_direction` is the cheaper call (the only one for ``contract``)."""
    shape = param.shape
    if route_path in ("direct", "fallback"):
        gt, gv = _direct(tr, n, shape, param), _direct(va, m, shape, param)  # [n, P], [m, P]
        mat, train = gt @ gv.T, gt.mean(0).reshape(shape)
    elif route_path == "materialize":  # fused: per-row gradients in cache-sized blocks, dotted and summed
        mat, total = K.materialise_dots(_factored(tr), _factored(va), n, dtype)
        train = (total / n).reshape(shape)
    elif route_path == "ghost":
        mat = _total([K.gram(a, b, dtype) for a in _factored(tr) for b in _factored(va)], param.new_zeros(n, m))
        train = train_mean(route_path, tr, n, param)
    else:
        raise AssertionError(f"score_param: {route_path!r} contracts against one direction: use score_direction")
    return (mat if weights is None else mat @ weights), train


def score_direction(route_path: str, tr: list, u: Tensor, n: int, param: Tensor,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``<g_i, U>`` for a fixed direction ``u`` (shaped like ``param``): ``[n]``, and the mean train gradient.

    ``"materialize"`` keeps its fused form, which yields the train gradient as it
    goes; every other path is :func:`contract_direction` and :func:`train_mean`.
    """
    if route_path == "materialize":
        scores, total = K.materialise_dots(_factored(tr), u.reshape(param.shape[0], -1), n, dtype)
        return scores, (total / n).reshape(param.shape)
    return contract_direction(route_path, tr, u, n, param, dtype), train_mean(route_path, tr, n, param)


def val_grad(route_path: str, va: list, weights: Tensor, param: Tensor) -> Tensor:
    """``Σ_v w_v g_v`` for one parameter, shaped like it."""
    if route_path in ("direct", "fallback"):
        return (weights @ _direct(va, len(weights), param.shape, param)).reshape(param.shape)
    p = param.shape[0]
    return _val_direction(va, weights, p, param.numel() // p, param).reshape(param.shape)


def sum_scores(per_param: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Tensor:
    """``Σ_k per_param[k]``, accumulated in the parameters' dtype (at least float32)."""
    acc = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    return torch.stack([v.to(acc) for v in per_param.values()]).sum(0)


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
    check_model(model_fn, params, (tb, vb), where)  # parameters used, samples independent (cached)
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
    weights = val_weights(val_reduce, vb.size, next(iter(params.values())))
    if val_reduce is not None:  # validation first, reduced to ḡ_val: the memory of one batch at a time
        st = run_streamed(model_fn, checked, tb, vb, where, policy, val_reduce)
        the_plan, train_loss, val_loss = st.plan, st.train_loss, st.val_loss
        assert weights is not None
        per_param, train_grad = score_streamed(st, params, weights, tb.size, vb.size, compute_dtype)
    else:  # the full [n_train, n_val] matrix needs every validation row's factors
        cap, the_plan = run(model_fn, checked, tb, vb, where, policy, val_reduce)
        train_loss, val_loss = cap.train_loss, cap.val_loss
        per_param, train_grad = {}, {}
        for k, route in the_plan.routes.items():
            tr, va = cap.grads[k]
            s, g = score_param(route.path, tr, va, None, tb.size, vb.size, params[k], compute_dtype)
            per_param[k], train_grad[k] = s, g
    return GradDot(sum_scores(per_param, params), per_param, train_grad, train_loss, val_loss, the_plan)


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

    Runs ``model_fn`` on one train and one val sample only (no backward pass), and
    on a first call the boundary checks (up to 3 samples together and alone, see
    :func:`ghostfunc._interact.check_model`).
    The result prints as a table with the ``T`` (train tokens), ``S`` (val
    tokens), ``p`` and ``d`` that the policy saw.
    """
    where = "plan"
    params, tb, vb = _prepare(where, model_fn, params, train, val, val_reduce=val_reduce, policy=policy)
    traces = (trace(model_fn, params, tb, where), trace(model_fn, params, vb, where))
    return make_plan(params, usages(params, traces), policy, tb.size, vb.size, val_reduce)
