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

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _kernels as K
from ._bymodel import same_fn
from ._calibrate import Constants, constants
from ._capture import Batch, Trace, _check_finite, per_sample_losses, weighted_grad
from ._dist import param_checksum
from ._draws import ONCE, host_states, same_host_states
from ._graddot import (
    Routing,
    _draws_random,
    _factored,
    _mark_random,
    _rng_state,
    _same,
    capture_one,
    contract_direction,
    drawn_unlike_a_plain_call,
    refuse_coupled_rows,
    refuse_non_finite,
    retry_stale,
    routing,
    sum_scores,
    train_mean,
    train_traces,
)
from ._interact import beyond_rounding, coarsest, state_of
from ._ops import Direct, Factored
from ._plan import Plan, Route, direction_kernel

Params = dict[str, Tensor]
CURVATURES = ("exact", "secant")
#: :func:`train_rows` keeps materialised per-row gradients of at most this many elements per element of
#: the training rows' captured factors; the kept parameters' factors are released once it returns.
KEEP_BUDGET = 2.0
#: Memory the materialised rows of one parameter can reuse from step to step: name -> tensor
#: (:class:`ghostfunc.TrainStep` holds one). On CPU a fresh ``[n, P]`` block of tens of MiB is a fresh
#: ``mmap`` whose pages the kernel faults in and zeroes on first touch, every step; measured on the
#: headline shape (2-core CPU), reusing them took :func:`train_rows` from 0.81 s to 0.44 s a step.
Scratch = dict[str, Tensor]
#: On CPU the validation passes run the rows in groups of about this many positions (rows times the
#: longest sequence a parameter sees): a group's activations stay nearer the cache. Measured on the
#: headline shape (GPT-2-like, T = 256, 2-core CPU shared with other work, one thread): groups of 2 rows
#: took 0.75x the time of all 8 at once for the Hessian-vector product, 0.9x for a validation backward.
GROUP_TOKENS = 1024


class ValGrad(NamedTuple):
    """The mean validation gradient at ``params`` for one validation batch, and its losses.

    ``val``: copies of the batch's tensor leaves and ``signature`` the rest of it
    (what :func:`matches` compares); ``params``: the ``θ`` the gradient was taken
    at; ``grad``: ``ḡ_val(θ)`` (name -> shaped like the parameter); ``loss``: ``[m]``;
    ``model_fn`` the function it is the gradient of and ``state`` what that function read
    besides its arguments (:func:`ghostfunc._interact.state_of`).
    """

    val: tuple[Tensor, ...]
    signature: tuple
    params: Params
    grad: Params
    loss: Tensor
    model_fn: Any = None
    state: tuple = ()
    versions: tuple[int, ...] = ()  # each parameter's version counter when cached (in ``params``' order)
    checksum: dict[str, tuple[str, str]] | None = None  # the parameters' values (a ``.data`` write moves no version)


def versions(params: Params) -> tuple[int, ...]:
    """Every parameter's version counter (``Tensor._version``: every in-place write bumps it, under ``no_grad`` too)."""
    return tuple(p._version for p in params.values())


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
    train_traces: tuple[Trace, ...] | None = None  # the training batch's traces (which parameters it uses)


def check_curvature(where: str, curvature: Any, order: Any) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"{where}: curvature must be 'exact' or 'secant'; got {curvature!r}")
    if curvature == "secant" and order != 2:
        raise ValueError(f"{where}: curvature='secant' is the order-2 term; it needs order=2, got order={order!r}")


def matches(cached: ValGrad | None, params: Mapping[str, Tensor], val: Batch, model_fn: Any) -> bool:
    """Whether ``cached`` is ``ḡ_val`` of this ``model_fn`` at exactly these parameters for exactly this
    validation batch.

    Compares values, not identities (the same tensors compare in ``O(1)`` per parameter):
    a batch rebuilt with equal contents hits, one changed in place misses. What the
    model reads besides its arguments must look unchanged too (:func:`ghostfunc._interact.state_of`:
    a frozen weight or buffer changed or replaced, a number in its closure or globals, a
    module switched between train and eval mode): then the gradient is taken again.
    """
    if cached is None or cached.signature != val.signature or len(cached.val) != len(val.tensors):
        return False
    if not same_fn(cached.model_fn, model_fn) or cached.state != state_of(model_fn):
        return False
    if cached.params.keys() != params.keys():
        return False
    same = all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
               for a, b in zip(cached.val, val.tensors, strict=True))
    if not same:
        return False
    for (k, q), version in itertools.zip_longest(cached.params.items(), cached.versions):
        p = params[k]
        if _aliases(p, q):  # the memory the gradient was taken at (the tensor, or a detached alias sharing
            # its version counter): unchanged unless written in place since (equal values prove nothing here)
            if version is None or p._version != version:
                return False
        elif not (p.shape == q.shape and p.dtype == q.dtype and p.device == q.device and torch.equal(p, q)):
            return False
    # a write through .data moves no version counter: the values' checksum, one pass over the parameters
    return cached.checksum is None or param_checksum({k: params[k] for k in cached.params}) == cached.checksum


def _aliases(p: Tensor, q: Tensor) -> bool:
    """``p`` is ``q`` or views the same memory the same way (``q.detach()``)."""
    return p is q or (p.device == q.device and p.dtype == q.dtype and p.shape == q.shape and p.stride() == q.stride()
                      and p.data_ptr() == q.data_ptr())


def still_holds(cached: ValGrad, model_fn: Callable[[Params, Any], Tensor], params: Params, vb: Batch,
                where: str) -> bool:
    """Whether the first validation row's loss, computed again now, equals the one ``cached`` recorded.

    The check behind :func:`matches` for state its fingerprint cannot see (an object
    deeper than it walks, a C extension's state): one forward of one row without
    gradients (a small fraction of the validation backward it saves). Rounding apart
    (the row ran in a group before): the rows' dtypes' tolerance (:func:`ghostfunc._interact.beyond_rounding`).
    """
    try:
        with torch.no_grad():
            now = per_sample_losses(model_fn, rows_of(vb, slice(0, 1)), where)(params)
    except Exception:  # noqa: BLE001 - a model that cannot run one row alone: take the gradient again
        return False
    dtype = coarsest([*params.values(), *vb.tensors, now])
    differ, _, _ = beyond_rounding(now.detach().reshape(-1)[:1], cached.loss.detach().reshape(-1)[:1], dtype)
    return not bool(differ.any())


def sgd_point(params: Mapping[str, Tensor], train_grad: Mapping[str, Tensor], lr: float) -> Params:
    """``θ' = θ − lr·ḡ_train = θ − a·G``, rounded exactly as :func:`ghostfunc.sgd` rounds its update."""
    return {k: p.add(train_grad[k], alpha=-lr) for k, p in params.items()}


def secant_values(where: str, model_fn: Callable[[Params, Any], Tensor], params: Params, tb: Batch, vb: Batch, *,
                  lr: float, weights: Tensor, before: ValGrad | None = None,
                  scratch: Scratch | None = None) -> Secant:
    """Secant order-2 values ``φ_i = −(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ')>`` (``a = lr/n``, ``θ' = θ − a·G``).

    Passes: a tap capture of the training rows (``g_i`` factors), then :func:`train_rows`
    (``G``, and the per-row gradients kept where that is cheaper than a second pass over
    the factors); ``ḡ_val(θ)`` from ``before`` when it :func:`matches` (else one ordinary
    validation backward); one ordinary validation backward at ``θ'``; the dot products
    ``<g_i, ḡ_val(·)>`` with both, in one pass (:func:`row_dots`).
    ``weights`` ``[m]`` are the validation weights (``1/m``: the mean). A model that
    draws random numbers (dropout in training mode) is refused: the two validation
    gradients would see different masks, and their difference would not be curvature.
    ``scratch``: memory for the materialised rows, reused from call to call (:data:`Scratch`).
    """
    if _draws_random(model_fn):
        raise ValueError(_RANDOM_MESSAGE.format(where=where))
    device = next(iter(params.values())).device
    rng, host = _rng_state(device), host_states()
    n = tb.size
    a = lr / n

    def train_first(fresh: bool) -> tuple[Routing, Any]:
        r = routing(model_fn, params, tb, vb, where, "contract", "mean", fresh)
        return r, capture_one(model_fn, params, tb, r, 0, where)

    seen = ONCE.seen
    r, t = retry_stale(where, train_first)
    if ONCE.seen != seen and drawn_unlike_a_plain_call(model_fn, params, tb, t.loss, rng, host):
        _mark_random(model_fn)  # a draw no sample owns (a seeded generator's projection): drawn per sample here (the
        raise ValueError(_RANDOM_MESSAGE.format(where=where))  # difference was reported as samples that interact)
    refuse_coupled_rows(model_fn, params, tb, t.loss, r.plan.notes, where, rng)
    rows, g_train = train_rows(r.plan, t.grads, params, n, 2, scratch)
    refuse_non_finite_rows(where, rows, g_train, params)
    groups = row_groups(vb, r.plan)
    train_loss = t.loss
    del t  # the factors of the kept parameters go now
    if before is not None and matches(before, params, vb, model_fn) and still_holds(before, model_fn, params, vb,
                                                                                      where):
        g_now, loss_now = before.grad, before.loss
    else:
        g_now, loss_now = grouped_val_grad(model_fn, params, vb, weights, where, groups)
    moved = sgd_point(params, g_train, lr)
    try:
        g_next, loss_next = grouped_val_grad(model_fn, moved, vb, weights, where, groups)
    except FloatingPointError as err:  # finite at θ (checked above): the step's end point is not
        raise FloatingPointError(
            f"{str(err).split(';')[0]} at θ' = θ - lr·ḡ_train, the end of the plain SGD step the secant "
            f"evaluates the validation gradient at (the losses at params are finite): lr={lr:g} steps too far "
            f"for this model. Use a smaller lr, or curvature='exact' (no evaluation at θ')") from None
    if not _same(rng, _rng_state(device)) or not same_host_states(host, host_states()):  # (NumPy's draws too)
        raise ValueError(_RANDOM_MESSAGE.format(where=where))

    both = row_dots(rows, (g_now, g_next), params)  # [n, 2]
    give_back(scratch, rows)
    del rows
    now, nxt = both.unbind(1)  # <g_i, ḡ_val(θ)>, <g_i, ḡ_val(θ')>  [n] each
    values = (now + nxt).mul(-a / 2)
    if before is not None and g_now is before.grad:
        copies = before.val  # the batch equals these copies
    else:
        copies = tuple(x.detach().clone() for x in vb.tensors)
    after = ValGrad(copies, vb.signature, moved, g_next, loss_next, model_fn, state_of(model_fn), versions(moved))
    return Secant(values, now.mul(-a), g_train, train_loss, loss_now, r.plan, after, train_traces(r))


def row_groups(batch: Batch, plan: Plan) -> list[slice]:
    """Consecutive row ranges for the validation passes: the whole batch on an accelerator, and on
    CPU about :data:`GROUP_TOKENS` positions each (per row: the most positions any factored parameter
    sees in a validation sample, its uses summed; 1 when no parameter is factored)."""
    if not batch.tensors or batch.tensors[0].device.type != "cpu":
        return [slice(0, batch.size)]
    tokens = max((r.val_tokens for r in plan.routes.values() if r.factored), default=1)
    rows = max(1, GROUP_TOKENS // max(tokens, 1))
    return [slice(i, min(i + rows, batch.size)) for i in range(0, batch.size, rows)]


def rows_of(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of ``batch`` as a batch of their own."""
    return batch._replace(tensors=[t[rows] for t in batch.tensors], size=rows.stop - rows.start)


def grouped_val_grad(model_fn: Callable[[Params, Any], Tensor], params: Params, vb: Batch, weights: Tensor,
                     where: str, groups: list[slice]) -> tuple[Params, Tensor]:
    """``Σ_v w_v g_v`` and the losses ``[m]`` (:func:`ghostfunc._capture.weighted_grad`), summed over ``groups``."""
    if len(groups) == 1:
        return weighted_grad(model_fn, params, vb, weights, where, "val")
    total: Params = {}
    losses = []
    for rows in groups:
        part = rows_of(vb, rows)
        try:
            g, loss = weighted_grad(model_fn, params, part, weights[rows], where, "val")
        except FloatingPointError:  # name the rows in the whole batch
            with torch.no_grad():
                _check_finite(per_sample_losses(model_fn, part, where)(params), "val", where,
                              torch.arange(rows.start, rows.stop))
            raise
        total = g if not total else {k: total[k] + g[k] for k in total}
        losses.append(loss)
    return total, torch.cat(losses)


class Rows(NamedTuple):
    """The training rows' per-sample gradients, held for dot products with directions known only later.

    ``kept``: name -> ``[n, P]`` materialised per-row gradients, for the parameters where
    one materialisation (giving the mean train gradient and every later dot product) costs less
    than the mean and then each direction from the factors (:func:`keeps`); ``uses``: name ->
    the captured per-sample gradients (factored or direct) of every other parameter.
    """

    plan: Plan
    kept: dict[str, Tensor]
    uses: dict[str, list[Factored | Direct]]
    n: int


def keeps(route: Route, n: int, k: int, c: Constants) -> bool:
    """Whether to materialise ``route``'s per-row gradients once for the mean and ``k`` later dot products.

    In multiply-adds, with ``T`` the route's positions per sample: kept, ``n·T·p·d`` for the
    ``bmm`` plus ``n·(κ + k + 1)·p·d`` for the block traffic (``κ``, the calibrated
    ``materialise`` constant), the ``k`` dots and the sum; not kept, the mean from the factors
    (``n·T·p·d``), then the cheaper of ``k`` contractions and one blockwise materialisation
    (:func:`direction_kernel`). So it pays from ``T`` of about ``κ/k`` up. Only id (embedding)
    uses: never (their contraction is a gather, ``n·T·d``).
    """
    if not route.factored or all(kind == "embedding" for kind in route.uses):
        return False
    pd = route.p * route.d
    later = min(k * n * route.tokens * pd, n * route.tokens * pd + n * (k + c.materialise) * pd)
    return n * (c.materialise + k + 1) * pd < later


def train_rows(plan: Plan, grads: Mapping[str, list[Factored | Direct]], params: Params, n: int,
               k: int, scratch: Scratch | None = None) -> tuple[Rows, Params]:
    """The training rows ready for ``k`` later directions, and their mean gradient (name -> shaped like the param).

    Parameters that :func:`keeps` picks, longest sequences first, are materialised
    (``[n, P]``) while their total stays under :data:`KEEP_BUDGET` times the captured
    factors; their factors are dropped once materialised (the caller drops ``grads``).
    The others keep their factors and take their mean from them (:func:`train_mean`).
    ``scratch``: memory to materialise into (:func:`take`); give it back with :func:`give_back`.
    """
    c = constants(next(iter(params.values())).device, next(iter(params.values())).dtype)
    budget = KEEP_BUDGET * sum(x.numel() for us in grads.values() for f in us if isinstance(f, Factored)
                               for x in (f.left, f.right) if x.is_floating_point())
    uses, kept, mean = dict(grads), {}, {}
    for name, route in sorted(plan.routes.items(), key=lambda kv: -kv[1].tokens):
        size = n * route.p * route.d
        if keeps(route, n, k, c) and size <= budget and uses[name]:  # (no uses: unused by these rows)
            budget -= size
            fs = _factored(uses.pop(name))
            g = K.materialise(fs, n, take(scratch, name, (n, route.p, route.d), fs[0].right))  # [n, p, d]
            kept[name] = g.reshape(n, -1)
            mean[name] = (g.sum(0) / n).reshape(params[name].shape)
        else:
            mean[name] = train_mean(route.path, uses[name], n, params[name])
    return Rows(plan, kept, uses, n), {name: mean[name] for name in plan.routes}


def take(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """``scratch``'s tensor for ``name`` when it has this shape, dtype and device (taken out: a second
    caller at the same time allocates its own); ``None`` (allocate) otherwise."""
    if scratch is None:
        return None
    held = scratch.pop(name, None)
    if held is None or held.shape != shape or held.dtype != like.dtype or held.device != like.device:
        return None
    return held


def give_back(scratch: Scratch | None, rows: Rows) -> None:
    """Put ``rows``' materialised tensors into ``scratch`` for the next step (their contents are dead)."""
    if scratch is not None:
        for name, g in rows.kept.items():
            route = rows.plan.routes[name]
            scratch[name] = g.view(rows.n, route.p, route.d)


def refuse_non_finite_rows(where: str, rows: Rows, g_train: Params, params: Params, local: bool = False) -> None:
    """Raise ``FloatingPointError`` naming the training rows whose gradients are not finite (the losses are),
    where their mean ``g_train`` is not: the secant's step end and exact order 2's ``H·G`` spread it to every
    row's value (every row was named, or the validation losses at ``θ'`` blamed on the learning rate).
    ``local``: under ``group=``, this rank's rows (the caller raises it on every rank)."""
    if bool(torch.stack([torch.isfinite(g).all() for g in g_train.values()]).all()):  # (one device sync a step)
        return
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    refuse_non_finite(where, row_dots(rows, [ones], params)[:, 0], None, g_train, local, what="gradients")


def row_dots(rows: Rows, directions: Sequence[Params], params: Params) -> Tensor:
    """``<g_i, u_j>`` for every training row ``i`` and direction ``u_j`` (name -> shaped like the param): ``[n, k]``."""
    out = {}
    for name, route in rows.plan.routes.items():
        if name in rows.kept:
            g = rows.kept[name]  # [n, P]
            # [k, P] rows, multiplied transposed (no strided copy of a [P, k] stack)
            out[name] = g @ torch.stack([u[name].reshape(-1).to(g.dtype) for u in directions]).T  # [n, k]
        elif len(directions) == 2:
            out[name] = two_dots(route, rows.uses[name], directions[0][name], directions[1][name], rows.n,
                                 params[name])
        else:
            out[name] = torch.stack([contract_direction(route.path, rows.uses[name], u[name], rows.n, params[name])
                                     for u in directions], 1)
    return sum_scores(out, params)


def two_dots(route: Route, uses: list[Factored | Direct], u: Tensor, v: Tensor, n: int, param: Tensor) -> Tensor:
    """``[<g_i, u>, <g_i, v>]`` for every training row: ``[n, 2]``. Factored parameters take the
    cheaper of two contractions and one materialisation dotted with both (:func:`direction_kernel`)."""
    cheaper = direction_kernel(n, route.tokens, route.p, route.d, _ids(uses), 2, constants(param.device, param.dtype))
    if route.factored and cheaper == "materialize" and uses:
        uv = torch.stack([u, v]).reshape(2, route.p, route.d).to(param.dtype)  # [2, p, d]
        return K.materialise_dots([f for f in uses if isinstance(f, Factored)], uv, n)[0]
    return torch.stack([contract_direction(route.path, uses, u, n, param),
                        contract_direction(route.path, uses, v, n, param)], 1)


def _ids(uses: list[Factored | Direct]) -> bool:
    return all(isinstance(f, Factored) and f.ids for f in uses)


_RANDOM_MESSAGE = (
    "{where}: curvature='secant' needs a deterministic model_fn, and this one draws random numbers (dropout in "
    "training mode, a torch.Generator of its own?): it compares validation gradients at two parameter values, and "
    "different draws would make their difference noise, not curvature. Put dropout in eval mode, draw what is drawn "
    "once outside model_fn and pass it in, or use order=1"
)
