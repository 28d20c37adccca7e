"""Small models without ``vmap``: the capture on the whole batch, verified against the per-sample one.

On a small model (an MLP on tabular rows, a small CNN) the per-sample capture of
:mod:`ghostfunc._capture` spends most of its time on ``vmap``'s batching and the
functional transforms, not on arithmetic. When every sample's rows stay in their
own slice of the leading axis of every recognised call, the same numbers come from
running ``model_fn`` once on the batch as it is, with taps on the recognised calls
and one ``torch.autograd.grad``: each call's input and output gradient, viewed as
``[n, rows per sample, ...]``, are the per-sample ones the rules expect.

That layout is a property of the model, checked here, never assumed:

- per call, the run must be one the layout cannot depend on: no data-dependent
  branch (``bool(t)``, ``t.item()``), no random draw, no value-dependent movement
  of rows (sorting, ``nonzero``, indexing with a tensor, ``gather``/``scatter`` and
  the like), no checkpointing or recurrent layer, every parameter used only by
  recognised calls, and each recognised call's output has the per-sample trace's
  shape times ``n`` on its leading axis; otherwise :class:`NotDirect`;
- once per ``model_fn``, parameter and batch signatures and batch sizes, the first
  call runs both captures and compares every per-sample factor and loss (up to
  ``sqrt(eps)`` of their scale): the whole-batch capture is used for later calls
  of that signature only if they agree, and the first call returns the per-sample
  capture's numbers either way.

A model that fails either check keeps the per-sample capture (exact by
construction). ``GHOSTFUNC_DIRECT=0`` in the environment turns this path off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ._bymodel import ByModel
from ._capture import (
    CONVERSIONS,
    TRANSPOSES,
    Batch,
    Half,
    ModelFn,
    Site,
    Trace,
    Transposed,
    _check_finite,
    _in_dtype,
    _keep,
    _makes_tensor,
    holds_tensor,
    matched_roles,
    note_versions,
    params_among,
    rewritten,
    unchanged,
)
from ._draws import host_states, rng_state, same_host_states, set_host_states, set_rng_state
from ._interact import TO_PYTHON, eager_stance, param_signature, remember, still_zero, training_flags, zero_params
from ._ops import EXACT, TABLE, Direct, Factored, recognise
from ._ops.norm import BATCH_NORMS, one_row_input
from ._ops.rnn import RECURRENT

#: Off with ``GHOSTFUNC_DIRECT=0`` (every call then takes the per-sample capture).
ENABLED = os.environ.get("GHOSTFUNC_DIRECT", "1") != "0"


class NotDirect(Exception):
    """This run's layout cannot be vouched for: the per-sample capture runs instead."""


#: Calls whose result moves values between positions according to tensor values (or makes
#: value-dependent shapes): after one, a row of a later call may belong to any sample.
_MOVES = frozenset({
    torch.sort, Tensor.sort, torch.argsort, Tensor.argsort, torch.topk, Tensor.topk, torch.kthvalue, Tensor.kthvalue,
    torch.msort, torch.nonzero, Tensor.nonzero, torch.argwhere, Tensor.argwhere, torch.masked_select,
    Tensor.masked_select, torch.unique, Tensor.unique, torch.unique_consecutive, Tensor.unique_consecutive,
    torch.index_select, Tensor.index_select, torch.gather, Tensor.gather, torch.take, Tensor.take,
    torch.take_along_dim, Tensor.take_along_dim, torch.scatter, Tensor.scatter, Tensor.scatter_,
    torch.scatter_add, Tensor.scatter_add, Tensor.scatter_add_, torch.scatter_reduce, Tensor.scatter_reduce,
    Tensor.scatter_reduce_, torch.index_add, Tensor.index_add, Tensor.index_add_, torch.index_copy,
    Tensor.index_copy, Tensor.index_copy_, torch.index_put, Tensor.index_put, Tensor.index_put_,
    torch.index_fill, Tensor.index_fill, Tensor.index_fill_, Tensor.masked_scatter, Tensor.masked_scatter_,
    torch.repeat_interleave, Tensor.repeat_interleave, torch.bincount, Tensor.bincount,
    torch.searchsorted, torch.bucketize, torch.multinomial, Tensor.multinomial,
})

_INDEXING = frozenset({Tensor.__getitem__, Tensor.__setitem__})


class _Taps(TorchFunctionMode):
    """Runs ``model_fn`` on a whole batch: notes where the recognised calls the trace expects leave the
    autograd graph, refuses what it cannot vouch for.

    Parameters are leaves that require gradients, so each recognised call's output
    has a ``grad_fn``; its gradient edge (taken as the call returns, before any
    in-place change) is where :func:`_capture`'s one backward stops: no tap tensors,
    and no parameter gradient is computed. With ``expect`` empty it only guards (a
    plain gradient of the whole batch).
    """

    def __init__(self, names: dict[int, str], expect: Sequence[Site], n: int) -> None:
        super().__init__()
        self.names, self.expect, self.n = names, expect, n
        # each expected call's output shape on the whole batch: the per-sample trace's, its rows times n
        self.shapes = [None if s.out_shape is None or not len(s.out_shape) else
                       torch.Size((s.out_shape[0] * n, *s.out_shape[1:])) for s in expect]
        self.taps: list[GradientEdge] = []
        self.saved: list[tuple[Tensor, ...]] = []
        self.whole: list[tuple[bool, ...]] = []  # per saved tensor: a parameter itself (no rows to split)
        self.statics: list[Any] = []
        self.versions: list[tuple[Tensor, int, str]] = []  # the saved inputs' version counters (note_versions)
        self.transposed = Transposed()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _WATCHED:
            _refuse(func, args, kwargs, self.n)
        if kwargs and kwargs.get("generator") is not None:
            raise NotDirect("a random generator")
        func = EXACT.get(func, func)  # BatchNorm in training mode refused as in the capture
        if func in BATCH_NORMS and (row := one_row_input(func, args, kwargs)) is not None and \
                id(row if row._base is None else row._base) not in self.names:  # (one row of a parameter's own
            # values runs here; any other, per sample; a set's look-up first: this runs on every intercepted call)
            raise NotDirect("batch_norm in training mode over a row that is not a parameter's")
        if func in TRANSPOSES or self.transposed.names:  # x @ w.T as a linear call (most calls skip this)
            view, func, args, kwargs, viewed = self.transposed.see(func, args, kwargs, self.names)
            if view is not None:
                return view
            if viewed:
                raise NotDirect(f"the transpose of {viewed[0]} used by an unrecognised call")
        found = params_among(args, kwargs, self.names) if self.names else []
        if not found:
            return func(*args, **kwargs)
        rule, match = recognise(TABLE.get(func), args, kwargs)
        roles = matched_roles(match, self.names, found)
        out = func(*args, **kwargs)
        if func in CONVERSIONS and args and args[0] is found[0] and unchanged(out, found[0], args, kwargs):
            return found[0]  # the parameter itself, as in the trace (ghostfunc._capture.CONVERSIONS)
        if found and _makes_tensor(out, found):
            raise NotDirect(f"{self.names[id(found[0])]} used by an unrecognised call")
        if not roles or match is None or rule is None:
            return out
        k = len(self.saved)
        want = self.expect[k] if k < len(self.expect) else None
        n = self.n
        if (want is None or (want.rule is not rule and want.rule != rule) or want.roles != tuple(sorted(roles.items()))
                or out.dtype != want.out_dtype or not _leading_times(out, want.out_shape, self.shapes[k], n)):
            raise NotDirect(f"call {k} is not the trace's, row for row")
        for s in match.saved:  # (a parameter saved as an operand, a scale's weight, has no rows: none needed)
            if s.dim() and s.shape[0] % n and id(s) not in self.names:
                raise NotDirect(f"call {k} saves a tensor without the samples' rows first")
        out = self._tap(out, k)
        self.saved.append(match.saved)
        self.whole.append(tuple(id(s) in self.names for s in match.saved))
        self.statics.append(match.static)
        note_versions(self.versions, match.saved, getattr(func, "__name__", str(func)))
        return out

    def _tap(self, out: Tensor, k: int) -> Tensor:
        """Where the backward stops for the ``k``-th recognised call: its output's gradient edge."""
        if torch._C._autograd._top_saved_tensors_default_hooks(False):
            raise NotDirect("saved-tensor hooks (checkpointing)")
        if out.grad_fn is None:  # also when gradients are off
            raise NotDirect(f"call {k} has no gradient")
        self.taps.append(get_gradient_edge(out))
        return out


#: Calls that reverse or rotate a tensor along axes (``dims``: their second argument or keyword).
_FLIPS = frozenset({torch.flip, Tensor.flip, torch.roll, Tensor.roll, torch.rot90, Tensor.rot90, torch.fliplr,
                    Tensor.fliplr, torch.flipud, Tensor.flipud})

#: Calls :func:`_refuse` looks at before they run.
_WATCHED = frozenset({*TO_PYTHON, *_MOVES, *RECURRENT, *_INDEXING, *_FLIPS, torch.where, F.embedding})


def _refuse(func: Any, args: tuple, kwargs: dict[str, Any], n: int) -> None:
    """Raise :class:`NotDirect` if the call could move rows by value, or needs a per-sample rule.

    A reordering across the samples (a flip or roll along the leading axis, or of a tensor whose leading axis
    no longer holds whole samples: ``t.reshape(n // 2, 2, d).flip(1)`` swaps pairs) or a lookup into a computed
    table (``F.embedding(ids, h)``: rows gathered by ids) moves rows between samples; what a later value-dependent
    choice takes from it (``torch.where(swap, moved, t)``) the first call's comparison cannot vouch for on the
    next batch (0.37-0.69 off where a later batch swapped pairs the first did not)."""
    if func in _INDEXING:
        if holds_tensor(args[1:2]):
            raise NotDirect("indexing with a tensor")
    elif func is torch.where:
        if len(args) + len(kwargs) == 1:
            raise NotDirect("torch.where(condition) (nonzero)")
    elif func is F.embedding:
        if kwargs.get("scale_grad_by_freq") or (len(args) > 5 and args[5]):
            raise NotDirect("scale_grad_by_freq counts ids per sample")
        table = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(table, Tensor) and table.grad_fn is not None:
            raise NotDirect("an embedding lookup into a computed table (rows gathered by ids)")
    elif func in _FLIPS:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor) and x.dim():
            if func in (torch.roll, Tensor.roll):  # roll(x, shifts, dims=None): None rolls the flattened tensor
                dims = args[2] if len(args) > 2 else kwargs.get("dims")
            elif func in (torch.rot90, Tensor.rot90):
                dims = args[2] if len(args) > 2 else kwargs.get("dims", (0, 1))
            elif func in (torch.fliplr, Tensor.fliplr, torch.flipud, Tensor.flipud):
                dims = (1,) if func in (torch.fliplr, Tensor.fliplr) else (0,)
            else:
                dims = args[1] if len(args) > 1 else kwargs.get("dims")
            axes = range(x.dim()) if dims is None else [dims] if isinstance(dims, int) else list(dims)
            if x.shape[0] % n or any(d % x.dim() == 0 for d in axes):
                raise NotDirect(f"{getattr(func, '__name__', func)} across the samples")
    else:
        raise NotDirect(f"{getattr(func, '__name__', func)} in the model")


def _leading_times(x: Tensor, per_sample: torch.Size | None, whole: torch.Size | None, n: int) -> bool:
    """``x`` has ``n`` times the per-sample rows on its leading axis (and the per-sample shape otherwise):
    its shape is ``whole``, that of ``per_sample`` on ``n`` samples (``None`` when there is no such shape)."""
    if whole is not None:
        return x.shape == whole
    return per_sample is None and x.dim() > 0 and x.shape[0] % n == 0


def _guarded(mode: _Taps) -> Any:
    """The contexts a whole-batch run needs: the mode, gradients on, compiled code run eagerly."""
    return mode, torch.enable_grad(), eager_stance()


def _run(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, mode: _Taps) -> Tensor:
    """``model_fn`` on the whole batch under ``mode``; refuses a random model and losses not shaped ``[n]``."""
    device = next(iter(params.values())).device
    before = rng_state(device)
    a, b, c = _guarded(mode)
    try:
        with a, b, c:
            losses = model_fn(dict(params), batch.rebuild(list(batch.tensors)))
    finally:
        after = rng_state(device)
        if not all(torch.equal(x, y) for x, y in zip(before, after, strict=True)):
            set_rng_state(device, before)  # the draws are undone: the per-sample capture makes them as it should
            raise NotDirect("the model draws random numbers")
    if not isinstance(losses, Tensor) or losses.shape != (batch.size,) or not losses.is_floating_point():
        raise NotDirect("losses not shaped [n]")
    return losses


def capture(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch], traces: Sequence[Trace],
            kernel: set[str], where: str, labels: Sequence[str]) -> list[Half]:
    """What :func:`ghostfunc._capture.capture_batches` gives, from whole-batch runs and one backward.

    Batches of one signature (train and validation rows shaped alike) run as one
    concatenated batch: one forward, as in a plain training step on both. Every
    parameter must be in ``kernel`` (a per-sample copy needs ``vmap``). Raises
    :class:`NotDirect` when the run's layout cannot be vouched for.
    """
    if set(params) != kernel:
        raise NotDirect("a parameter takes the per-sample fallback")
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # leaves: every call has a grad_fn
    names = {id(params[k]): k for k in kernel}
    expect = [tuple(_keep(tr.sites, kernel)) for tr in traces]
    if joins(batches, expect):
        (half,) = _capture(model_fn, params, [_join(batches)], expect[:1], names)
        halves = _split(half, batches)
        if bool(torch.isfinite(half.loss).all()):  # one check of every batch's losses; else name the rows
            return halves
    else:
        halves = _capture(model_fn, params, batches, expect, names)
    for half, label in zip(halves, labels, strict=True):
        _check_finite(half.loss, label, where)
    return halves


def joins(batches: Sequence[Batch], expect: Sequence[tuple[Site, ...]]) -> bool:
    """Whether :func:`capture` runs ``batches`` as one concatenated batch (one signature, one expected trace)."""
    return len(batches) > 1 and all(b.signature == batches[0].signature for b in batches) and len(set(expect)) == 1


def _join(batches: Sequence[Batch]) -> Batch:
    return Batch([torch.cat(ts) for ts in zip(*(b.tensors for b in batches), strict=True)],
                 batches[0].rebuild, sum(b.size for b in batches), batches[0].signature)


def _split(half: Half, batches: Sequence[Batch]) -> list[Half]:
    halves, at = [], 0
    for b in batches:
        halves.append(_rows(half, at, at + b.size))
        at += b.size
    return halves


#: How close the whole-batch run's factors and losses must come to the per-sample capture's for a match:
#: ``eps ** (2/3)`` of the scale (2.4e-5 in float32, 3.7e-11 in float64), the accuracy the numbers promise.
#: At ``sqrt(eps)`` a weak coupling of rows (``h + 1e-4 * (h - h.mean(0))`` in float32) passed and the
#: whole-batch numbers were 2e-4 off the loop; a mismatch only costs the per-sample capture's time. 16-bit
#: floats keep ``sqrt(eps)``: at ``eps ** (2/3)`` (3.9e-2 in bfloat16) a 6-layer LayerNorm stack's summation
#: order (4.3e-2, about 5 ulps) lost its whole-batch run (2x slower).
VERDICT_POWER = 2 / 3


def same_run(a: Any, b: Any) -> bool:
    """:func:`close` at the verdict's tolerance (:data:`VERDICT_POWER`)."""
    return close(a, b, VERDICT_POWER)


def run_losses(halves: Sequence[Half], batches: Sequence[Batch], traces: Sequence[Trace],
               kernel: set[str]) -> list[Tensor]:
    """The losses of each whole-batch run :func:`capture` makes of ``batches``: one run of every batch's rows
    where they join (a training and a validation row of the same sample prove nothing together), else one
    per batch."""
    if joins(batches, [tuple(_keep(tr.sites, kernel)) for tr in traces]):
        return [torch.cat([h.loss for h in halves])]
    return [h.loss for h in halves]


def rerun(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
          sites: tuple[Site, ...], host: bool = False) -> list[Half]:
    """:func:`capture` of ``batches`` run together again, where an earlier call of the same signature ran
    them together under the kept ``sites`` and the per-sample capture agreed: without re-deciding any of
    that. Every run-time guard of the whole-batch run stays; a non-finite loss raises :class:`NotDirect`
    too (the per-sample path names the rows), and with ``host`` so does a draw from NumPy's or Python's global
    generator (undone: the full path notes it; 30-75 µs, asked for where the modules' settings moved)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    before = host_states() if host else None
    (half,) = _capture(model_fn, leaves, [_join(batches)], [sites], {id(v): k for k, v in leaves.items()})
    if before is not None and not same_host_states(before, host_states()):
        set_host_states(before)
        raise NotDirect("the model draws from NumPy's or Python's generator")
    if not bool(torch.isfinite(half.loss).all()):
        raise NotDirect("a loss is not finite")
    return _split(half, batches)


def holds(model_fn: ModelFn, key: tuple, params: Mapping[str, Tensor]) -> bool:
    """Whether the whole-batch run is (still) the verdict for ``model_fn`` under ``key`` (:func:`verdict_key`) at
    ``params``: the parameters that were zero when it was reached still are (:func:`ghostfunc._interact.still_zero`)."""
    try:
        verdict = _VERIFIED.get(model_fn, {}).get(key)
    except TypeError:
        return False
    return isinstance(verdict, frozenset) and still_zero(params, verdict)


def refused(model_fn: ModelFn, key: tuple) -> bool:
    """Whether the whole-batch run was refused for ``model_fn`` under ``key`` (:func:`verdict_key`)."""
    try:
        return _VERIFIED.get(model_fn, {}).get(key) is False
    except TypeError:
        return False


def verdict_key(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch], kernel: set[str]) -> tuple:
    """The key :func:`verified` keeps the verdict of :func:`capture` under (with the training flags)."""
    return capture_key(params, batches, kernel), training_flags(model_fn)


def _capture(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
             expect: Sequence[tuple[Site, ...]], names: dict[int, str]) -> list[Half]:
    modes, losses = [], []
    for batch, sites in zip(batches, expect, strict=True):
        mode = _Taps(names, sites, batch.size)
        losses.append(_run(model_fn, params, batch, mode))
        if len(mode.saved) != len(sites):
            raise NotDirect("fewer recognised calls than the trace")
        if rewritten(mode.versions) is not None:  # the batched capture raises, naming the call
            raise NotDirect("a recognised call's input written in place after the call")
        modes.append(mode)
    taps = [t for m in modes for t in m.taps]
    total = losses[0].sum() if len(losses) == 1 else torch.stack([loss.sum() for loss in losses]).sum()
    outs = list(torch.autograd.grad(total, taps)) if taps else []
    halves, at = [], 0
    for mode, sites, loss, batch in zip(modes, expect, losses, batches, strict=True):
        grads = per_sample(params, sites, mode.saved, mode.whole, mode.statics, outs[at:at + len(sites)], batch.size)
        at += len(sites)
        halves.append(Half(loss.detach(), grads))
    return halves


def per_sample(params: Mapping[str, Tensor], sites: Sequence[Site], saved: Sequence[tuple[Tensor, ...]],
               whole: Sequence[tuple[bool, ...]], statics: Sequence[Any], outs: Sequence[Tensor],
               n: int) -> dict[str, list[Factored | Direct]]:
    """Every parameter's per-sample gradients (one per use) from the whole-batch run of ``n`` samples:
    each recognised call's saved tensors and output gradient, viewed as ``[n, rows per sample, ...]``; a saved
    tensor that is a parameter itself (``whole``, as :class:`_Taps` saw it: a scale's weight) keeps its shape. Not
    by the parameters' identities here: a compiled graph's saved tensors come out of ``torch.func.grad`` as other
    objects, and a scale's weight of 8 was split into 17 samples' rows (h98)."""
    grads: dict[str, list[Factored | Direct]] = {k: [] for k in params}
    for site, kept, flags, static, out in zip(sites, saved, whole, statics, outs, strict=True):
        mine = tuple(s.detach().unflatten(0, (n, -1)) if s.dim() > 0 and not param else s.detach()
                     for s, param in zip(kept, flags, strict=True))
        for role, name in site.roles:
            g = site.rule.grad(static, mine, out.unflatten(0, (n, -1)), role, params[name].shape)
            grads[name].append(_in_dtype(g, params[name].dtype))
    return grads


def _rows(half: Half, lo: int, hi: int) -> Half:
    """Samples ``lo:hi`` of a capture."""
    def cut(g: Factored | Direct) -> Factored | Direct:
        return Direct(g.grad[lo:hi]) if isinstance(g, Direct) else Factored(g.left[lo:hi], g.right[lo:hi], g.p)

    return Half(half.loss[lo:hi], {k: [cut(g) for g in uses] for k, uses in half.grads.items()})


def weighted_grad(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, weights: Tensor, where: str,
                  label: str) -> tuple[dict[str, Tensor], Tensor]:
    """``Σ_v w_v g_v`` and the losses ``[n]`` by one ordinary backward over the whole batch (no ``vmap``)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    losses = _run(model_fn, leaves, batch, _Taps({}, (), batch.size))
    _check_finite(losses, label, where)
    grads = torch.autograd.grad((losses * weights.to(losses.dtype)).sum(), list(leaves.values()), allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(leaves, grads, strict=True)}, \
        losses.detach()


R = TypeVar("R")

#: ``model_fn`` -> {verdict key: ``False`` (refused) or the parameters that were zero when the whole-batch run
#: matched (:func:`ghostfunc._interact.zero_params`; it holds while they stay zero)}.
_VERIFIED: ByModel[Any, dict[tuple, frozenset[str] | bool]] = ByModel()


def verified(model_fn: ModelFn, params: Mapping[str, Tensor], key: tuple, exact: Callable[[], R],
             direct: Callable[[], R], same: Callable[[R, R], bool], losses: Callable[[R], list[Tensor]],
             reordered: Callable[[R], bool] | None = None) -> R:
    """``direct()`` where this ``model_fn`` and ``key`` were seen to match ``exact()``; else ``exact()``.

    An unseen key runs both and records whether ``same`` held (returning the result
    of the path that later calls take); a :class:`NotDirect` or any error of the whole-batch run, at any
    time, sends this and later calls with ``key`` to ``exact()``. A match is recorded
    only when the runs could have shown a mismatch: the rows of each whole-batch run (``losses(result)``;
    train and validation rows together where they ran as one batch) are one sample or samples that
    differ (rows of identical samples in the wrong order look the same). It holds while the
    parameters that were zero when it was recorded stay zero (a coupling of rows behind a zero gate
    looks the same as none); after that the next call compares again. ``reordered(exact result)``, where
    given, is a second comparison the match needs (:func:`same_reordered`: the rows in another order).
    """
    if not ENABLED:
        return exact()
    try:
        seen = _VERIFIED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: nowhere to remember a verdict
        return exact()
    key = (key, training_flags(model_fn))
    verdict = seen.get(key)
    if verdict is False:
        return exact()
    if isinstance(verdict, frozenset) and still_zero(params, verdict):
        try:
            return direct()
        except Exception:  # noqa: BLE001 - e.g. NotDirect, or the model's own error: the exact path explains it
            result = exact()  # an error both paths raise (a NaN loss, a shape mistake) keeps the verdict
            seen[key] = False
            return result
    result = exact()
    if not all(len(x) == 1 or bool((x != x[0]).any()) for x in losses(result)):
        return result  # nothing to learn (a match would prove nothing): ask again on the next call
    try:
        whole = direct()
        ok = same(result, whole) and (reordered is None or reordered(result))
    except Exception:  # noqa: BLE001
        ok = False
    remember(seen, key, zero_params(params) if ok else False)
    # From the first call of a signature on, the numbers come from the path later calls take: a run resumed
    # in a new process repeats the uninterrupted one bit for bit.
    return whole if ok else result


def same_reordered(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
                   traces: Sequence[Trace], kernel: set[str], where: str, labels: Sequence[str],
                   exact: Sequence[Half]) -> bool:
    """Whether :func:`capture` of ``batches`` with each batch's rows rotated by one agrees with ``exact`` (the
    per-sample capture of the batches as given) rotated alike: the second run of a verdict (:func:`verified`).

    One batch's match can be a coincidence of its order. A model that orders its rows by value with
    comparisons and a product over the rows (no sort or gather: ``P = (rank[:, None] == arange(B))``,
    ``P @ f(P.T @ x)``) is exact per sample, and its whole-batch run reads each recognised call's rows in the
    permuted order: on a batch already in that order the permutation is the identity and the runs matched,
    then later calls with rows in another order were 1.06-1.85 off. Rotated, no row keeps its place (one more
    whole-batch run, on the first call of a signature only)."""
    if all(b.size == 1 for b in batches):
        return True
    turned = [Batch([t.roll(1, 0) for t in b.tensors], b.rebuild, b.size, b.signature) for b in batches]

    def rolled(g: Factored | Direct) -> Factored | Direct:
        return Direct(g.grad.roll(1, 0)) if isinstance(g, Direct) else Factored(g.left.roll(1, 0),
                                                                                 g.right.roll(1, 0), g.p)

    want = [Half(h.loss.roll(1, 0), {k: [rolled(g) for g in uses] for k, uses in h.grads.items()}) for h in exact]
    return same_run(want, capture(model_fn, params, turned, traces, kernel, where, labels))


def capture_key(params: Mapping[str, Tensor], batches: Sequence[Batch], kernel: set[str]) -> tuple:
    """The key of :func:`capture`'s verdict."""
    return signature(params, batches, "capture", tuple(sorted(kernel)))


#: Activations (bytes: every recognised call's output, over all batches of a capture) up to which the
#: whole-batch capture is tried (its first call holds both captures' factors at once), and a streamed caller
#: captures its training and validation batches together (one forward instead of two). Small models are
#: where the per-sample capture's overhead shows; large ones keep its memory.
SMALL_BYTES = 64 * 2**20


def small(traces: Sequence[Trace], batches: Sequence[Batch]) -> bool:
    """Whether a capture of ``batches`` (traced as ``traces``) stays under :data:`SMALL_BYTES` of outputs."""
    size = sum(math.prod(s.out_shape) * s.out_dtype.itemsize * b.size
               for tr, b in zip(traces, batches, strict=True) for s in tr.sites)
    return size <= SMALL_BYTES


def together(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch], kernel: set[str],
             traces: Sequence[Trace]) -> bool:
    """Whether batches a caller would capture one at a time (to hold one batch's activations) had better run
    together in one whole-batch capture: small activations, one signature, and no verdict against it yet."""
    if not ENABLED or set(params) != kernel or any(b.signature != batches[0].signature for b in batches):
        return False
    if any(tr.sites != traces[0].sites for tr in traces) or not small(traces, batches):
        return False
    try:
        verdicts = _VERIFIED.get(model_fn, {})
    except TypeError:
        return False
    return verdicts.get(verdict_key(model_fn, params, batches, kernel)) is not False


def signature(params: Mapping[str, Tensor], batches: Sequence[Batch], *rest: Any) -> tuple:
    """The key :func:`verified` remembers a verdict under: parameter shapes, batch signatures and sizes."""
    return (param_signature(params),
            tuple((b.signature, b.size) for b in batches), rest)


def close(a: Any, b: Any, power: float = 0.5) -> bool:
    """The same pytree of tensors up to rounding: ``eps ** power`` of the dtype (``sqrt(eps)`` unless told, and
    for 16-bit floats) times the largest value."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb, strict=True):
        if not isinstance(x, Tensor):
            if x != y:
                return False
            continue
        if not isinstance(y, Tensor) or x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        if x.numel() == 0:
            continue
        xd, yd = x.double(), y.double()
        scale = torch.maximum(xd.abs().max(), yd.abs().max()).item()
        info = torch.finfo(x.dtype)  # 16-bit floats: sqrt(eps) (a few ulps of summation order is 5% in bfloat16)
        tol = info.eps ** (power if info.bits >= 32 else 0.5) * scale
        if not bool(((xd - yd).abs() <= tol).all()):
            return False
    return True
