"""In-Run Data Shapley (Wang et al., "Data Shapley in One Training Run", ICLR 2025).

One SGD step with the mean update moves ``θ`` to ``θ − (η/n)·Σ_i g_i``. The utility
of a subset ``S`` of the ``n`` training rows is the change of the mean validation
loss that its part of the step causes:

    U(S) = L_val(θ − (η/n)·Σ_{i∈S} g_i) − L_val(θ).

Taylor-expanding ``U`` to second order makes it a sum of single and pairwise
terms, whose Shapley values are closed-form (with ``a = η/n``):

    φ_i = −a·<g_i, ḡ_val>                                (order 1)
        + (a²/2)·g_iᵀ H_val G,   G = Σ_j g_j             (order 2)

(the quadratic term ``(a²/2)·Σ_{i,j∈S} g_iᵀ H g_j`` gives each pair's share
half-and-half and each diagonal term to its row). Both orders are the single
contraction ``φ_i = <g_i, u>`` against the fixed direction

    u = −a·ḡ_val + (a²/2)·H_val G,

where the ``g_i`` come from a tap capture of the training rows, ``ḡ_val`` from one
ordinary backward over the validation batch (order 1), and at order 2 ``ḡ_val``
and ``H_val G`` together from one exact forward-over-reverse pass over it
(``torch.func.jvp`` of ``torch.func.grad``, whose primal output is ``ḡ_val``). By Shapley efficiency, ``Σ_i φ_i`` equals the Taylor
expansion of ``U`` (all rows) to the chosen order.

**Sign convention** (everywhere in ghostfunc): values are ``φ``, the Shapley
value of the *change of validation loss*. A sample that helps (its step lowers
the validation loss) has a **negative** value; a harmful one (a mislabelled
sample, say) a positive one. ``−φ`` is the usual "higher is better" data value.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import _dist
from ._capture import Batch, Half, _check_finite, _rephrase, common_weight, per_sample_losses, second_derivative
from ._checks import check_compile
from ._draws import ONCE, host_states, same_host_states
from ._eager import unbatchable, val_grad_hvp_eager
from ._graddot import (
    GradDot,
    Routing,
    _draws_random,
    _mark_random,
    _prepare,
    _rng_state,
    _same,
    _set_rng_state,
    capture_one,
    drawn_unlike_a_plain_call,
    group_policy,
    no_path,
    prepare_group,
    refuse_coupled_rows,
    refuse_non_finite,
    refuse_non_finite_val,
    retry_stale,
    routing,
    run_streamed,
    score_group,
    score_streamed,
    sum_scores,
    train_traces,
    unused,
    val_weights,
)
from ._groups import Part, split, split_sum
from ._interact import check_batch_gradient, check_step_gradient, counted_over_batch, in_one_call
from ._ops import SamplesInteractError
from ._optim import one_element
from ._plan import Plan
from ._secant import (
    Scratch,
    ValGrad,
    check_curvature,
    give_back,
    grouped_val_grad,
    refuse_non_finite_rows,
    row_dots,
    row_groups,
    rows_of,
    secant_values,
    train_rows,
)

Params = dict[str, Tensor]
ORDERS = (1, 2)


class Values(NamedTuple):
    """One step's values and by-products (internal; :func:`train_step` and :func:`inrun_shapley` use it).

    ``values`` ``[n]`` of the requested order, ``first_order`` ``[n]`` (the order-1
    part; the same tensor when ``order=1``), ``train_grad`` the mean training
    gradient (name -> shaped like the parameter), losses ``[n]`` and ``[m]``.
    """

    values: Tensor
    first_order: Tensor | None
    train_grad: Params
    train_loss: Tensor
    val_loss: Tensor
    plan: Plan
    val_grad: ValGrad | None = None  # curvature="secant": ḡ_val at θ' = θ − a·G, for the next step
    unused: frozenset[str] = frozenset()  # parameters no training sample reaches (on any rank; _graddot.unused)


def _import_jvp_decompositions() -> None:
    """``torch.func.jvp`` imports its decompositions on first use, which calls ``torch.jit.script``
    and so warns that TorchScript is deprecated (torch's own code, nothing the caller can fix):
    import them once here with that warning silenced."""
    if "torch._decomp.decompositions_for_jvp" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


class _TangentsAsGradients(TorchFunctionMode):
    """Forward mode (``torch.func.jvp`` of ``torch.func.grad``: ``H·v``) differentiating as the gradient does.

    - Calls made with gradients off (``torch.no_grad()``, ``set_grad_enabled(False)``, inference mode) carry no
      tangent, as ``.detach()`` carries none: ``no_grad`` does not apply to forward mode, so a parameter read inside
      ``no_grad`` put that branch's curvature into ``H·v``, which the gradient (and a double backward) leaves out
      (a detached scale: the second-order term 72% off the loop's).
    - ``clamp``/``clip`` with a tensor bound and ``fmax`` run as the ``where`` that routes their gradient (the same
      values): at a tie (a learnable floor at 0 under ReLU'd features) torch's forward rule takes the bound's
      tangent where the backward gives the gradient to the input (h49: 1.8e-2 off, one value 2x the loop's).
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        wrong = _FORWARD_WRONG.get(func)
        if wrong is not None and torch.is_grad_enabled() and wrong(args, kwargs):
            raise _ForwardWrong(func)
        if not torch.is_grad_enabled():
            before = torch._C._is_fwd_grad_enabled()
            torch._C._set_fwd_grad_enabled(False)
            try:
                return func(*args, **kwargs)
            finally:
                torch._C._set_fwd_grad_enabled(before)
        rewrite = _AS_GRADIENTS.get(func)
        if rewrite is not None and (out := rewrite(*args, **kwargs)) is not NotImplemented:
            return out
        return func(*args, **kwargs)


def _arguments(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A call's arguments by torch's names (positional or keyword); ``None`` where it has others (``out=``)."""
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return None
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _clamp_routed(*args: Any, **kwargs: Any) -> Any:
    """``clamp(input, min, max)`` with a tensor bound, as the ``where`` its backward routes by: the input keeps a tie
    (and a NaN of its own), the bound takes what lies beyond it (and a NaN of its own, as torch's clamp gives)."""
    given = _arguments(("input", "min", "max"), args, kwargs)
    x, low, high = (None, None, None) if given is None else (given.get("input"), given.get("min"), given.get("max"))
    if not isinstance(x, Tensor) or not (isinstance(low, Tensor) or isinstance(high, Tensor)):
        return NotImplemented  # (out=, or no tensor bound: torch's own)
    y = x if low is None else torch.where(_beyond(x < low, low), low, x)
    return y if high is None else torch.where(_beyond(y > high, high), high, y)


def _beyond(past: Tensor, bound: Any) -> Tensor:
    """Where ``clamp`` takes its bound: past it, or the bound is NaN."""
    return past | bound.isnan() if isinstance(bound, Tensor) else past


def _fmax_routed(*args: Any, **kwargs: Any) -> Any:
    """``fmax(input, other)`` as the ``where`` its backward routes by (``input`` at a tie and where ``other`` is NaN)."""
    given = _arguments(("input", "other"), args, kwargs)
    a, b = (None, None) if given is None else (given.get("input"), given.get("other"))
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return NotImplemented
    return torch.where((a >= b) | b.isnan(), a, b)


class _ForwardWrong(RuntimeError):
    """A call whose backward torch differentiates wrongly in forward mode: the Hessian-vector product goes
    reverse-over-reverse (:func:`_val_grad_hvp_batched`)."""


def _prod_reduced(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a ``scatter_reduce`` call reduces by ``"prod"`` (its arguments unreadable: taken as one that may)."""
    given = _arguments(("input", "dim", "index", "src", "reduce", "include_self"), args, kwargs)
    return given is None or given.get("reduce") == "prod"


def _always(args: tuple, kwargs: dict[str, Any]) -> bool:
    return True


#: torch calls whose backward's forward-mode rule is wrong, with when: ``scatter_reduce(..., "prod")``'s gave H·v
#: 1.36 off a double backward on four elements, and order-2 values 26% off the loop (h70); ``prelu`` at an input of
#: exactly 0 (a zero-initialised layer's output) follows the other side of its kink than its backward (order 2 0.32
#: off; whether an input is 0 cannot be asked under vmap, so every call); ``cholesky_inverse`` (a learned precision:
#: 4.3e-2 off) and the deprecated ``triangular_solve`` through its matrix (2.4e-3 off; h75).
_FORWARD_WRONG: dict[Any, Callable[[tuple, dict[str, Any]], bool]] = {
    torch.scatter_reduce: _prod_reduced, Tensor.scatter_reduce: _prod_reduced, Tensor.scatter_reduce_: _prod_reduced,
    **dict.fromkeys([F.prelu, torch.prelu, Tensor.prelu, torch.cholesky_inverse, Tensor.cholesky_inverse,
                     torch.triangular_solve, Tensor.triangular_solve], _always),
}


_AS_GRADIENTS: dict[Any, Callable[..., Any]] = {
    torch.clamp: _clamp_routed, Tensor.clamp: _clamp_routed, torch.clip: _clamp_routed, Tensor.clip: _clamp_routed,
    torch.fmax: _fmax_routed, Tensor.fmax: _fmax_routed,
}


def val_grad_hvp(model_fn: Callable[[Params, Any], Tensor], params: Params, val: Batch, weights: Tensor,
                 vector: Params, where: str, groups: list[slice] | None = None) -> tuple[Params, Params, Tensor]:
    """:func:`_val_grad_hvp_batched` over the row ranges ``groups`` (default: all rows at once), each in
    groups of samples that agree at data-dependent branches, all summed; a model the batched pass
    cannot run goes sample by sample with ordinary autograd. Equal weights (a mean) run at unit
    weight, scaled after (:func:`ghostfunc._capture.common_weight`). The batch's tensors are taken detached: a
    validation feature computed with gradients on (an upstream encoder's output) gave values attached to its graph,
    which each step's info then kept alive. One that requires grad still does (a leaf of its own: a model may
    differentiate with respect to its inputs, a gradient penalty)."""
    val = val._replace(tensors=[t.detach().requires_grad_(t.requires_grad) for t in val.tensors])
    scale = common_weight(weights)
    if scale is not None and scale != 1.0:
        g, hv, losses = val_grad_hvp(model_fn, params, val, torch.ones_like(weights), vector, where, groups)
        return {k: x * scale for k, x in g.items()}, {k: x * scale for k, x in hv.items()}, losses

    def rows_from(start: int) -> Callable[[Batch, Part], tuple[tuple[Params, Params], Tensor]]:
        def one(part_batch: Batch, part: Part) -> tuple[tuple[Params, Params], Tensor]:
            rows = torch.arange(start, start + part_batch.size) if part.rows is None else part.rows + start
            g, hv, losses = _val_grad_hvp_batched(model_fn, params, part_batch, weights[rows.to(weights.device)],
                                                  vector, where, rows)
            return (g, hv), losses

        return one

    out = []
    try:
        for rows in groups or [slice(0, val.size)]:
            (g, hv), losses, _ = split_sum(rows_from(rows.start), rows_of(val, rows))
            out.append((g, hv, losses))
    except RuntimeError as err:
        if not unbatchable(err):
            raise
        with sdpa_kernel([SDPBackend.MATH]):  # (a fused attention kernel has no double backward)
            return val_grad_hvp_eager(model_fn, params, val, weights, vector, where)
    g, hv, _ = out[0]
    for g2, hv2, _ in out[1:]:
        g, hv = {k: g[k] + g2[k] for k in g}, {k: hv[k] + hv2[k] for k in hv}
    return g, hv, torch.cat([losses for *_, losses in out])


def _val_grad_hvp_batched(model_fn: Callable[[Params, Any], Tensor], params: Params, val: Batch, weights: Tensor,
                          vector: Params, where: str, rows: Tensor) -> tuple[Params, Params, Tensor]:
    """``ḡ = Σ_v w_v g_v``, ``H·vector`` (``H`` the exact Hessian of ``Σ_v w_v L_v``) and the losses ``[m]``.

    One forward-over-reverse pass (``torch.func.jvp`` of ``torch.func.grad``): its
    primal output is the gradient, so the validation batch runs once for both,
    at about the cost of three ordinary backward passes. Samples run alone under
    ``vmap``, as in the capture. Fused attention kernels have no forward-mode
    derivative on every backend, so ``scaled_dot_product_attention`` runs on its
    math backend here (the same function); an op with no forward-mode rule at all
    (or an ``autograd.Function`` without ``jvp``) falls back to reverse-over-reverse (``vjp`` of ``grad``, exact
    as well).
    """
    losses_of = per_sample_losses(model_fn, val, where)

    def total(p: Params) -> tuple[Tensor, Tensor]:
        losses = losses_of(p)
        return (losses * weights.to(losses.dtype)).sum(), losses

    grad = torch.func.grad(total, has_aux=True)
    _import_jvp_decompositions()
    with sdpa_kernel([SDPBackend.MATH]), _rephrase(where, splits=True):
        try:
            with _TangentsAsGradients():  # (what no_grad computes a constant, ties as the gradient's)
                g, hv, losses = torch.func.jvp(grad, (params,), (vector,), has_aux=True)  # type: ignore[misc]
            reverse = _overflowed(hv, g)
        except (NotImplementedError, AssertionError, RuntimeError):
            # no forward-mode rule (an op without one; an autograd.Function without jvp: functorch asserts), or a
            # wrong one (_FORWARD_WRONG): reverse-over-reverse, exact as well; a genuine mistake in the model fails
            # there too, and says so
            reverse = True
        if reverse:
            (g, losses), pullback = torch.func.vjp(grad, params)  # type: ignore[misc]
            hv = pullback((vector, torch.zeros_like(losses)))[0]  # H symmetric: vᵀH = (Hv)ᵀ
    _check_finite(losses, "val", where, rows)  # rows: the samples' positions in the whole batch
    return g, hv, losses.detach()


#: How :func:`compute_values`' refusal of non-finite order-2 values ends (the exact curvature term's Hessian-vector
#: product can overflow where the gradients do not: a float16 model, h64).
_SECANT_HINT = (". At order 2 the values also take the validation loss's Hessian times the training gradients' sum, "
                "which may overflow where the gradients do not (float16): curvature='secant' takes no Hessian")


def _overflowed(hv: Params, g: Params) -> bool:
    """Whether a float16 Hessian-vector product by forward mode overflowed where the gradient did not: its tangents
    pass through intermediate values (a layer norm's) beyond float16's range where reverse mode's do not (a float16
    ViT's order-2 values were refused as not finite, the reverse-mode loop's were 6.6e-4 off the truth, h64). Other
    dtypes are not looked at (no device sync)."""
    half = [k for k, v in hv.items() if v.dtype == torch.float16]
    if not half:
        return False
    return not bool(torch.stack([torch.isfinite(hv[k]).all() for k in half]).all()) and \
        bool(torch.stack([torch.isfinite(g[k]).all() for k in half]).all())


@in_one_call
def compute_values(where: str, model_fn: Callable[[Params, Any], Tensor], params: Mapping[str, Tensor], train: Any,
                   val: Any, **options: Any) -> Values:
    """:func:`values_of`, refused (``FloatingPointError``, naming rows and parameters) where the values are not
    finite though the losses are (:func:`ghostfunc._graddot.refuse_non_finite`): a step would write NaN into the
    parameters."""
    prepared: list[tuple[Params, Batch]] = []
    out = values_of(where, model_fn, params, train, val, prepared=prepared, **options)
    group = options.get("group")
    with _dist.collectively(where, group):  # a rank's values alone may overflow: every rank raises
        refuse_non_finite(where, out.values, None, out.train_grad, group is not None, "values",
                          _SECANT_HINT if options.get("order") == 2 and options.get("curvature", "exact") == "exact"
                          else None)
    if options.get("optimizer") and group is None and not split(out.plan.notes, "train"):  # (a batch split by
        check_step_gradient(model_fn, *prepared[0], out.train_grad, where)  # branch: per-sample by design)
    return out


def values_of(
    where: str,
    model_fn: Callable[[Params, Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    lr: float,
    order: int,
    precondition: Callable[[Params, Params], Params] | None = None,
    first_order: bool = True,
    group: Any = None,
    curvature: str = "exact",
    val_grad: ValGrad | None = None,
    compile: bool = False,
    scratch: Scratch | None = None,
    optimizer: tuple = (),
    optimizer_state: Any = (),
    prepared: list[tuple[Params, Batch]] | None = None,
) -> Values:
    """The values against ``u = −a·P(ḡ_val) + (a²/2)·H_val G`` (``a = lr/n``), and the mean train gradient.

    ``precondition(direction, train_grad) -> direction`` (``P``, order 1 only) is
    the optimizer's diagonal preconditioner; ``None`` is the identity. At order 2,
    ``first_order=False`` skips the extra contraction that reports the order-1 part
    (``Values.first_order`` is then ``None``).

    Plain order 1 is ``−a`` times :func:`ghostfunc.graddot`'s scores (the same
    streamed capture, the default policy). Otherwise the training rows go first
    (``G`` and the train gradient from their factors, or from per-row gradients
    materialised once and kept for the dot products: :func:`ghostfunc._secant.train_rows`),
    then the validation batch once: an ordinary backward for ``ḡ_val`` (order 1), or one
    forward-over-reverse pass for ``ḡ_val`` and ``H_val G`` together (order 2);
    then one contraction against ``u`` (two at order 2 for the order-1 part).

    With ``group`` (see ``ghostfunc._dist``): ``n`` and ``m`` are the global row
    counts, ``ḡ_val`` (with ``H_val G`` at order 2) and the train gradient are
    all-reduced, and the values are this rank's rows'.
    ``curvature="secant"`` (order 2) takes the secant path of :mod:`ghostfunc._secant`
    instead, reusing ``val_grad`` (a previous step's ``Values.val_grad``) when it matches.
    ``compile`` (order 1 without ``precondition``, one process): the values from the compiled
    graph of :mod:`ghostfunc._compiled` where it runs, else as without it. ``scratch``: memory for
    the training rows' materialised gradients, reused from call to call (:data:`ghostfunc._secant.Scratch`).
    ``prepared``: where given, the checked parameters and training batch are appended to it (for the caller's
    checks after the values, without splitting the batch again).
    """
    if one_element(lr):
        lr = lr.item()  # a one-element tensor, as sgd/adamw (and torch.optim) take it
    check_lr_order(where, lr, order)
    lr = float(lr)
    check_curvature(where, curvature, order)
    if precondition is not None and order != 1:
        raise ValueError(f"{where}: optimizer-aware (preconditioned) values are first order only; got order={order}")
    world = None
    if group is None:
        params, tb, vb = _prepare(where, model_fn, params, train, val, val_reduce="mean", policy="auto")
        n, m = tb.size, vb.size
    else:
        (params, tb, vb), world = prepare_group(where, group, model_fn, params, train, val, val_reduce="mean",
                                                policy="auto",
                                                precheck=lambda: check_compile(where, compile, "mean", group),
                                                same={"lr": lr, "order": order, "curvature": curvature,
                                                      "precondition": precondition is not None,
                                                      **({"optimizer": optimizer} if optimizer else {}),
                                                      **({"optimizer state (step count, fingerprints)":
                                                          optimizer_state} if optimizer_state else {})})
        n, m = world.n, world.m
    if prepared is not None:
        prepared.append((params, tb))
    if optimizer and (by_freq := sorted(counted_over_batch(model_fn))):
        raise SamplesInteractError(
            f"{where}: {', '.join(by_freq)} {'is' if len(by_freq) == 1 else 'are'} looked up with "
            f"scale_grad_by_freq=True: a backward over the batch divides each id's gradient by its count in the "
            f"whole batch, so the batch gradient a torch.optim step uses is not the mean of the samples' own "
            f"gradients (each counts its own ids), and this step would leave torch.optim's trajectory. Build the "
            f"embedding with scale_grad_by_freq=False to train with values; graddot and inrun_shapley give the "
            f"per-sample values (ids counted per sample) as they are")
    if optimizer:  # the trajectory's claim: the batch gradient is the sum of the samples' own (cached)
        with _dist.collectively(where, group):
            check_batch_gradient(model_fn, params, tb, where)
    a = lr / n
    weights = val_weights("mean", m, params)
    assert weights is not None
    weights = weights[: vb.size]  # with a group: 1/m (global m) for this rank's validation rows
    checked = params

    def reach(names: list[str]) -> frozenset[str]:  # used, zero gradient: is there an autograd path to them?
        return no_path(model_fn, checked, tb, names)

    if order == 1 and precondition is None and world is not None:
        with _dist.collectively(where, group):  # an error on one rank raises on every rank (one tiny all-reduce)
            st = run_streamed(model_fn, params, tb, vb, where, group_policy("auto"), "sum")
            refuse_non_finite_val(where, st.val_dir)
        per_param, g_train, the_plan, nowhere = score_group(st, params, "mean", world, group, None, reach)
        values = sum_scores(per_param, params).mul(-a)
        return Values(values, values, g_train, st.train_loss, st.val_loss, the_plan, None, nowhere)
    if curvature == "secant":
        if world is not None:
            raise ValueError(f"{where}: curvature='secant' is one process only for now; use curvature='exact' "
                             f"with group=, or run without a process group")
        sec = secant_values(where, model_fn, params, tb, vb, lr=lr, weights=weights, before=val_grad,
                            scratch=scratch)
        return Values(sec.values, sec.first_order, sec.train_grad, sec.train_loss, sec.val_loss, sec.plan, sec.after,
                      unused(sec.train_traces, sec.train_grad, reach))
    if order == 1 and precondition is None:
        eager_why: list[str] = []  # compile=True: why these values were computed eagerly (a plan note)
        if compile:  # one process (checked by the caller): the compiled graph where it can run
            from . import _compiled  # it builds on _graddot

            done = _compiled.scores(model_fn, params, tb, vb, where, "auto", "mean", None)
            if isinstance(done, GradDot):
                values = done.scores.mul(-a)
                return Values(values, values, done.train_grad, done.train_loss, done.val_loss, done.plan)
        st = run_streamed(model_fn, params, tb, vb, where, "auto", "mean")
        if compile:
            assert isinstance(done, str)
            eager_why.append(_compiled.ran_eagerly(done, st.plan))
        per_param, g_train = score_streamed(st, params, weights, n, m, None)
        values = sum_scores(per_param, params).mul(-a)
        return Values(values, values, g_train, st.train_loss, st.val_loss,
                      st.plan._replace(notes=(*st.plan.notes, *eager_why)), None, unused(st.train_traces, g_train, reach))

    def train_first(fresh: bool) -> tuple[Routing, Half]:
        r = routing(model_fn, params, tb, vb, where, "contract", "mean", fresh)
        return r, capture_one(model_fn, params, tb, r, 0, where)

    device = next(iter(params.values())).device
    start, host = _rng_state(device), host_states()
    with _dist.collectively(where, group):  # group=None: nothing; else every rank raises if one fails here
        if order == 2 and _draws_random(model_fn):
            raise ValueError(ORDER2_RANDOM.format(where=where))
        seen = ONCE.seen
        r, t = retry_stale(where, train_first)
        if ONCE.seen != seen and drawn_unlike_a_plain_call(model_fn, params, tb, t.loss, start, host):
            _mark_random(model_fn)  # a draw no sample owns (a seeded generator's projection): drawn per sample here
            raise ValueError((ORDER2_RANDOM if order == 2 else PRECONDITION_UNOWNED).format(where=where))
        refuse_coupled_rows(model_fn, params, tb, t.loss, r.plan.notes, where, start)
        rows, g_train = train_rows(r.plan, t.grads, params, tb.size, 2 if order == 2 and first_order else 1, scratch)
        refuse_non_finite_rows(where, rows, g_train, params, local=world is not None)  # (this rank's rows)
    train_loss = t.loss
    del t  # the factors of the kept parameters go now
    local_unused = unused(train_traces(r), g_train, reach)  # with a group: unused on every rank (the all-reduce's flags)
    if world is not None:
        g_train, local_unused = _dist.global_mean(g_train, world, group, local_unused)
        r = r._replace(plan=r.plan._replace(n_train=n, n_val=m))

    if order == 1:
        assert precondition is not None
        with _dist.collectively(where, group):
            g_val, val_loss = grouped_val_grad(model_fn, params, vb, weights, where, row_groups(vb, r.plan))
        if world is not None:
            g_val = _dist.allreduce_sum(g_val, group)
        values = row_dots(rows, [{k: g.mul(-a) for k, g in precondition(g_val, g_train).items()}], params)[:, 0]
        give_back(scratch, rows)
        return Values(values, values, g_train, train_loss, val_loss, r.plan, None, local_unused)
    with _dist.collectively(where, group):
        with second_derivative(where, "order 2 with curvature='exact' differentiates model_fn twice",
                               "curvature='secant' needs first derivatives only, or use order=1"):
            g_val, hg, val_loss = val_grad_hvp(model_fn, params, vb, weights, {k: g.mul(n) for k, g in g_train.items()},
                                               where, row_groups(vb, r.plan))  # H_val G, G = Σ_j g_j
            g_val, hg = ({k: v.detach() for k, v in d.items()} for d in (g_val, hg))  # (an input leaf's graph)
        if not _same(start, _rng_state(device)) or not same_host_states(host, host_states()):  # dropout, np.random:
            # other draws than a plain step's (and the secant's)
            _set_rng_state(device, start)
            raise ValueError(ORDER2_RANDOM.format(where=where))
    if world is not None:  # ḡ_val and H_val G: one all-reduce
        both = _dist.allreduce_sum({**{"g:" + k: v for k, v in g_val.items()},
                                    **{"h:" + k: v for k, v in hg.items()}}, group)
        g_val, hg = {k: both["g:" + k] for k in g_val}, {k: both["h:" + k] for k in hg}
    u1 = {k: g.mul(-a) for k, g in g_val.items()}
    u = {k: u1[k] + hg[k].to(u1[k].dtype).mul(a * a / 2) for k in u1}
    dots = row_dots(rows, [u1, u] if first_order else [u], params)  # [n, 2] (one pass for both) or [n, 1]
    give_back(scratch, rows)
    return Values(dots[:, -1].contiguous(), dots[:, 0].contiguous() if first_order else None, g_train, train_loss,
                  val_loss, r.plan, None, local_unused)


ORDER2_RANDOM = (
    "{where}: order=2 needs a deterministic model_fn, and this one draws random numbers (dropout in training mode, "
    "a torch.Generator of its own?): the training rows' gradients and the validation rows' Hessian-vector product "
    "would each see draws of their own, not a plain step's. Put dropout in eval mode, draw what is drawn once outside "
    "model_fn and pass it in, or use order=1 (whose training rows take the plain step's draws)"
)


PRECONDITION_UNOWNED = (
    "{where}: precondition=True captures the training rows with a draw per sample, and this model_fn draws random "
    "numbers no sample owns (a torch.Generator of its own, torch.randn(d, d) in the forward: one draw for the whole "
    "batch, as a plain step makes it): the values would be of other draws than the step's. Draw it outside model_fn "
    "and pass it in (a buffer, a closure tensor), or use precondition=False (whose training rows take the plain "
    "step's draws)"
)


def check_lr_order(where: str, lr: Any, order: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 <= float(lr) < math.inf:  # numpy too
        raise ValueError(f"{where}: lr must be a finite float >= 0 (the step's learning rate); got {lr!r}")
    if type(order) is not int or order not in ORDERS:  # not 2.0 or True (== 1)
        raise ValueError(f"{where}: order must be 1 or 2; got {order!r}")


def inrun_shapley(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    lr: float,
    order: int = 1,
    group: Any = None,
    curvature: str = "exact",
) -> Tensor:
    """In-Run Data Shapley values of one SGD step (mean update) over the training batch.

    With ``a = lr / n`` and ``L_val`` the mean validation loss, the utility of a
    subset ``S`` of the ``n`` training rows is
    ``U(S) = L_val(θ − a·Σ_{i∈S} g_i) − L_val(θ)`` and the values are

    - ``order=1``: ``φ_i = −a·<g_i, ḡ_val>``;
    - ``order=2``: ``φ_i = −a·<g_i, ḡ_val> + (a²/2)·g_iᵀ H_val Σ_j g_j``,

    the exact Shapley values of ``U``'s Taylor expansion to that order (so
    ``Σ_i φ_i`` is that expansion of ``U(all rows)``). ``H_val`` is the exact
    Hessian of ``L_val`` (a ``torch.func`` Hessian-vector product, any
    architecture). Both orders are one contraction of the per-sample gradients
    against ``u = −a·ḡ_val + (a²/2)·H_val G``.

    **Sign:** this returns ``φ``, the share of the validation-loss *change*. A
    sample that lowers the validation loss gets a **negative** value; ``−φ`` is
    the "higher is better" value.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` ``[B]``, samples independent
            (for ``order=2`` also deterministic: no dropout).
        params: name -> trainable tensor ``θ``; not modified.
        train: batch pytree, sample axis first (``n`` rows).
        val: batch pytree with the same structure (``m`` rows).
        lr: the step's learning rate ``η`` (the per-sample weight of the mean update is ``η / n``).
        order: 1 or 2.
        group: ``None`` (one process) or a ``torch.distributed`` process group:
            ``train`` and ``val`` are this rank's rows of the global batches, ``n``
            is the global batch size, ``G`` the global sum, ``H_val`` the Hessian of
            the global validation mean; returns this rank's rows' values.
        curvature: how ``order=2`` gets its curvature term. ``"exact"``: the
            Hessian-vector product above (one forward-over-reverse pass over the
            validation batch). ``"secant"``: the trapezoid
            ``φ_i = −(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ − a·G)>``, two ordinary validation
            backward passes; equal to ``"exact"`` for a quadratic loss, otherwise
            within ``O(a³)`` (``O(a²)`` relative). Needs a deterministic ``model_fn``.

    Returns:
        ``φ``: ``[n]``, in the parameters' dtype (at least float32).
    """
    return compute_values("inrun_shapley", model_fn, params, train, val, lr=lr, order=order, first_order=False,
                          group=group, curvature=curvature).values
