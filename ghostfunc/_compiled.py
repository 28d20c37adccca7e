"""``graddot(..., compile=True)``: a known small model's whole call as one compiled graph.

On a small model the eager call is Python more than arithmetic: the model's own
modules, the interception of every call, the kernels' many small products (about
3x the plain step at ``T = 1``, width 64, on 2 CPU cores, where the same numbers
written by hand take 1.7x). Once a signature has a replay
(:func:`ghostfunc._graddot.replay_of`: both batches ran in one whole-batch run
that the per-sample capture confirmed), the same computation is compiled with
``torch.compile(fullgraph=True, dynamic=False)``: the model on ``[train; val]``
with a zero tap added to each recognised call's output, the taps' gradients by
``torch.func.grad`` (the output gradients the rules need), the per-sample
factors, the validation reduction and the scores, in one graph.

What keeps it exact:

- the whole-batch run's interception (:class:`ghostfunc._whole._Taps`, every
  refusal) runs while dynamo traces: a compiled graph has no value-dependent
  movement of rows, parameters only in recognised calls, the trace's calls row
  for row; a data-dependent branch (``bool``, ``item``) cannot be traced into one
  graph (``fullgraph``) and is refused as well;
- dynamo's guards catch a change in anything the trace read (shapes, module
  flags, values in closures) that the graph does not take as an input: when one
  fails, dynamo compiles again, and that call and the signature's later ones run
  eagerly (a recompiled graph was never checked against the eager numbers, and a
  run does not pause to compile again and again);
- the random state is compared around every call: a model that draws is refused;
- the first compiled result of a signature is compared with the eager replay's
  (``sqrt(eps)`` of the scale, :func:`ghostfunc._whole.close`);
- any refusal or error marks the signature: the eager path runs from then on. A
  non-finite loss goes to the eager path, which names the rows.

The first compiled call of a signature costs the compilation (seconds); it pays
over the many steps of a small model's training run. Every call before it (the
first of a signature verifies, races routings and records the replay) is eager.
"""

from __future__ import annotations

import collections
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._bymodel import ByModel
from ._capture import Batch, Half, ModelFn, Site
from ._draws import ALL_DROPOUTS, RANDOM
from ._draws import draws as _draws
from ._eager import summary
from ._graddot import (
    GradDot,
    Replay,
    _replay,
    paths,
    reduced,
    replay_key,
    replay_of,
    score_streamed,
    score_uses,
    sum_scores,
    val_weights,
)
from ._interact import EAGER, Identity, _is_array, negative_zeros, remember, steady_settings
from ._plan import Plan
from ._whole import NotDirect, _rows, _Taps, close, per_sample, rng_state, set_rng_state

#: ``model_fn`` -> {(replay key, compute dtype): (the compiled call, the parameter tensors it is called with,
#: their lock), verified; or why it was refused (the calls' note)}.
_STATE: ByModel[Any, collections.OrderedDict[tuple, Any]] = ByModel()
#: Held while a signature compiles and runs its first call (a first call's parameter tensors are its own).
_COMPILING = threading.Lock()


class _Added(_Taps):
    """The whole-batch interception with each recognised call's output plus a zero tap (``zeros[k]``): its
    gradient is the output gradient, through ``torch.func.grad`` (traceable, unlike gradient edges)."""

    def __init__(self, names: dict[int, str], expect: tuple[Site, ...], n: int, zeros: list[Tensor]) -> None:
        super().__init__(names, expect, n)
        self.zeros = zeros

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in _DRAWS and _draws(func, args, kwargs or {}):  # seen while tracing: no draw in a graph
            raise NotDirect(f"{getattr(func, '__name__', func)} draws random numbers")
        return super().__torch_function__(func, types, args, kwargs)

    def _tap(self, out: Tensor, k: int) -> Tensor:
        return out + self.zeros[k]


#: Calls that draw random numbers (:func:`ghostfunc._draws.draws`).
_DRAWS = frozenset({*ALL_DROPOUTS, *RANDOM})


#: Why a ``compile=True`` call ran eagerly, for its plan's notes (:func:`ran_eagerly`).
NO_REPLAY = ("no verified whole-batch run of this signature yet (its first calls verify it), or the model "
             "cannot run as one whole batch (a parameter on the fallback or direct-only path, a "
             "value-dependent branch, random draws, large activations)")
RACING = "the first call of a signature times the candidate routings (policy='auto'), each eagerly"
MARKED = "this signature could not be one checked graph"
#: Why (after :data:`MARKED`): kept per signature, so each later call's note says it too.
REFUSED = "refused or failed while compiling"
RECOMPILED = "a value the graph was traced with changed (dynamo compiled again; the new graph was never checked)"
DREW = "the model drew random numbers"
STANCE = "torch.compiler's stance is {!r} (torch.compiler.set_stance): the graph would not run as compiled"
NOT_KEPT = "model_fn cannot be weakly referenced: nowhere to keep its graph"
NOT_FINITE = "a loss is not finite (the eager path names the rows)"
NOT_FINITE_SCORES = "a score is not finite (the eager path names the rows and parameters)"
#: Compiled graphs kept per ``model_fn`` (one per signature: each batch size is one); past it the least recently used
#: goes, and its signature runs eagerly from then on (:data:`EVICTED`).
COMPILED_SIGNATURES = 32
EVICTED = (f"its graph was dropped to keep {COMPILED_SIGNATURES} per model_fn, and it is not compiled again (more "
           f"batch sizes in turn than that recompiled for seconds on most calls); pad batches to fewer sizes")
#: The signatures whose graph went (:data:`EVICTED`), per ``model_fn``.
_EVICTED: ByModel[Any, dict[tuple, None]] = ByModel()
HELD_DATA = ("a non-tensor batch leaf holds a tensor or an array: the graph would read the one of the call it was "
             "built from (an equal object of a later call is the same signature)")
MISMATCH = "the first compiled result differed from the eager replay's"


def _holds_data(signature: Any, depth: int = 12) -> bool:
    """Whether a batch signature's non-tensor leaves hold a tensor or an array (by checksum, or by identity where
    larger): the compiled graph rebuilds the batch with the leaves of the call it was built from, and reads such
    a tensor at run time without a guard on its values (one changed in place since: 24x off, with no note)."""
    if isinstance(signature, Identity):
        return isinstance(held := signature.get(), Tensor) or _is_array(held)
    if not isinstance(signature, tuple) or depth <= 0:
        return False
    if len(signature) > 1 and signature[0] in ("tensor", "array"):  # (a string in a leaf is ("tensor",))
        return True
    return any(_holds_data(x, depth - 1) for x in signature)


def ran_eagerly(why: str, plan: Plan | None = None) -> str:
    """The plan note of a ``compile=True`` call that ran eagerly; with no replay, where the eager ``plan`` has
    parameters on the exact fallback, those (the general note said only what might apply, on every call, h100)."""
    fallback = [f"{k} ({r.reason})" for k, r in plan.routes.items() if r.path == "fallback"] if plan else []
    if why == NO_REPLAY and fallback:
        why = (f"parameters on the exact fallback cannot run as one whole batch: {', '.join(fallback[:4])}"
               f"{', ...' if len(fallback) > 4 else ''}")
    return f"compile=True: this call ran eagerly: {why}"


def scores(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
           val_reduce: str, dtype: torch.dtype | None) -> GradDot | str:
    """The call by its compiled graph, or why the eager path must run (no replay yet, a refusal, a
    non-finite loss; a string for the plan's notes): see the module docstring."""
    rep = replay_of(model_fn, params, train, val, where, policy, val_reduce)
    if rep is None:
        return NO_REPLAY
    try:
        states = _STATE.setdefault(model_fn, collections.OrderedDict())
    except TypeError:  # not weak-referenceable: nowhere to keep a compiled call
        return NOT_KEPT
    # (the modules' settings too: dynamo's guards take -0.0 for 0.0, and a setting read through copysign kept
    # the graph built with the other, 0.92 off; one that changes on every call is left out: steady_settings)
    key = (replay_key(model_fn, params, train, val, policy, val_reduce), steady_settings(model_fn),
           negative_zeros(model_fn), dtype)  # (a churning setting at -0.0: h44, 0.55 off)
    known = states.get(key)
    if isinstance(known, str):  # refused before, for this reason
        return known
    entered = EAGER.entries  # (before the stance is read: an eager call another thread starts after it shows)
    stance = _stance()
    if stance != "default":  # the caller's (or another thread's eager interception): run eagerly, mark nothing
        return STANCE.format(stance)
    first = known is None
    if first:  # (the key holds both signatures: one that holds data is never built, so never known)
        if _holds_data(train.signature) or _holds_data(val.signature):
            return HELD_DATA
        gone = _EVICTED.setdefault(model_fn, {})
        if key in gone:  # (more sizes in turn than graphs kept: compiled again and again, seconds each, h93)
            return EVICTED
        built = [k for k, v in states.items() if not isinstance(v, str)]  # (least recently used first)
        while len(built) >= COMPILED_SIGNATURES:  # the least recently used graph goes (emptied whole, 18 sizes in
            old = built.pop(0)  # turn recompiled), and its signature runs eagerly from then on
            del states[old]
            remember(gone, old, None, 4 * COMPILED_SIGNATURES)
        marks = [k for k, v in states.items() if isinstance(v, str)]  # (why signatures ran eagerly: the oldest go)
        for old in marks[:max(0, len(marks) - 4 * COMPILED_SIGNATURES)]:
            del states[old]
        known = (_build(model_fn, rep, train, val.size, val_reduce, dtype),
                 {k: torch.empty_like(v, requires_grad=False) for k, v in params.items()}, threading.Lock())
    assert known is not None
    if not first:
        try:  # (the most recently used last: the least recently used goes first; in one step, as another thread
            states.move_to_end(key)  # may look the key up meanwhile)
        except KeyError:  # (another thread's new graph pushed this one out meanwhile: this call still has it)
            pass
    fn, leaves, lock = known
    device = next(iter(params.values())).device
    # The same tensors every call (the interception knows parameters by identity, and dynamo guards the
    # identities it reads: a new tensor each call would not match), so one call at a time per signature; and
    # one compilation at a time in the process.
    with _COMPILING if first else lock:
        with torch.no_grad():
            for k, v in leaves.items():
                v.copy_(params[k])
        before = rng_state(device)
        graphs = _graphs()
        try:
            out = fn(leaves, list(train.tensors), list(val.tensors))
        except Exception as err:  # noqa: BLE001 - refused while tracing (NotDirect, a graph break) or failed:
            set_rng_state(device, before)  # eager from now on
            if EAGER.entries != entered or _stance() != "default":  # (another thread's eager call set the process's
                return STANCE.format("force_eager")  # stance meanwhile: not this graph's failure, nothing marked, h94)
            return _mark(states, key, f"{REFUSED}: {_cause(err)}")
        if not first and _graphs() != graphs:  # a guard failed (a value the trace read changed) and dynamo compiled
            set_rng_state(device, before)  # again: this call and later ones run eagerly (no recompiling mid-run;
            return _mark(states, key, RECOMPILED)  # the new graph was never checked against the eager numbers)
    if not all(torch.equal(x, y) for x, y in zip(before, rng_state(device), strict=True)):
        set_rng_state(device, before)  # it drew random numbers: the eager path decides
        return _mark(states, key, DREW)
    total, per_param, train_grad, train_loss, val_loss, finite = out
    losses_finite, scores_finite = finite.tolist()  # (one read of the device: both flags)
    if not losses_finite:
        return NOT_FINITE
    if not scores_finite:  # finite losses, a non-finite gradient or product: the eager path raises, naming them
        return NOT_FINITE_SCORES
    plan = rep.routing.plan
    if first:  # the first compiled result must be the eager replay's
        st = _replay(model_fn, params, train, val, where, policy, val_reduce)
        if st is None:
            return _mark(states, key, "the eager replay to check its first result against did not run")
        weights = val_weights(val_reduce, val.size, params)
        assert weights is not None
        eager = score_streamed(st, params, weights, train.size, val.size, dtype)
        if not close((out[1], out[2], out[3], out[4]), (eager[0], eager[1], st.train_loss, st.val_loss)):
            return _mark(states, key, MISMATCH)
        states[key] = known
    return GradDot(total, per_param, train_grad, train_loss, val_loss,
                    plan._replace(notes=(*plan.notes, "compiled: the whole call as one torch.compile graph")))


def _cause(err: BaseException) -> str:
    """Why tracing or compiling failed, in a line: the model's or the interception's own error where dynamo wrapped
    it (its "Observed exception" hid ``NotDirect("call 0 is not the trace's, row for row")``, h100)."""
    found, seen = err, 0
    at: BaseException | None = err
    while at is not None and seen < 8:
        if isinstance(at, (NotDirect, torch._dynamo.exc.ObservedException)):
            found = at
        at, seen = at.__cause__ or at.__context__, seen + 1
    text = summary(found)
    return text.removeprefix("raised exception ")


def _stance() -> str:
    """torch.compiler's stance now (``"default"``, or ``"force_eager"`` while an eager interception runs)."""
    return str(getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default"))


def _mark(states: dict[tuple, Any], key: tuple, why: str) -> str:
    """Keep the signature eager from now on; its calls' notes say why (:data:`MARKED`, then ``why``)."""
    states[key] = note = f"{MARKED}: {why}"
    return note


def load_inductor() -> None:
    """Import ``torch._inductor`` (as ``torch.compile`` does on its first compilation) without passing on the
    ``DeprecationWarning`` its import raises about ``torch.jit``: torch's own matter, not the caller's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401


def _graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _held_weakly(model_fn: ModelFn) -> ModelFn:
    """``model_fn`` called through a weak reference (a bound method: to its object, the function held), as dynamo
    traces it (``weakref.WeakMethod`` it does not); :class:`NotDirect` once it is gone."""
    target, func = ((model_fn.__self__, model_fn.__func__) if isinstance(model_fn, types.MethodType) else
                    (model_fn, None))
    try:
        held: Callable[[], Any] = weakref.ref(target)
    except TypeError:  # (a method's object that cannot be weakly referenced: held, as the method holds it)
        def held() -> Any:
            return target

    def call(params: dict[str, Tensor], batch: Any) -> Tensor:
        obj = held()
        if obj is None:  # (gone: its graph goes with it)
            raise NotDirect("model_fn no longer exists")
        return func(obj, params, batch) if func is not None else obj(params, batch)

    return call


def _build(model_fn: ModelFn, rep: Replay, train: Batch, m: int, val_reduce: str,
           dtype: torch.dtype | None) -> Callable[..., Any]:
    """The replay of ``rep`` as one function of (parameters, train tensors, val tensors), compiled."""
    # plain values only (the paths, not the plan): dynamo guards every field of what the graph reads
    n, sites, rebuild, routes = train.size, rep.sites, train.rebuild, paths(rep.routing.plan)
    big = n + m
    # model_fn held weakly: the graph is kept in _STATE under model_fn, and a closure holding it strongly kept every
    # model_fn (and its module's weights) alive for good (h93: 4 of 4 dropped 4 MB models kept)
    call_model = _held_weakly(model_fn)

    def whole(params: dict[str, Tensor], train_tensors: list[Tensor], val_tensors: list[Tensor]) -> Any:
        like = next(iter(params.values()))
        joined = [torch.cat((a, b)) for a, b in zip(train_tensors, val_tensors, strict=True)]
        zeros = [torch.zeros((s.out_shape[0] * big, *s.out_shape[1:]), dtype=s.out_dtype, device=like.device)
                 for s in sites]
        names = {id(v): k for k, v in params.items()}
        statics: list[Any] = []
        whole_saved: list[tuple[bool, ...]] = []

        def losses_of(taps: list[Tensor]) -> tuple[Tensor, tuple[Tensor, list[tuple[Tensor, ...]]]]:
            mode = _Added(names, sites, big, taps)
            with mode:
                losses = call_model(dict(params), rebuild(joined))
            if len(mode.saved) != len(sites):
                raise NotDirect("fewer recognised calls than the trace")
            if not isinstance(losses, Tensor) or losses.shape != (big,):
                raise NotDirect("losses not shaped [n]")
            statics.extend(mode.statics)
            whole_saved.extend(mode.whole)
            return losses.sum(), (losses, mode.saved)

        outs, (losses, saved) = torch.func.grad(losses_of, has_aux=True)(zeros)
        joined_half = Half(losses, per_sample(params, sites, saved, whole_saved, statics, outs, big))
        t, v = _rows(joined_half, 0, n), _rows(joined_half, n, big)
        weights = val_weights(val_reduce, m, params)
        assert weights is not None
        val_dir, val_uses = reduced(routes, v, params, weights)
        per_param, train_grad = score_uses(routes, t.grads, val_dir, val_uses, params, weights, n, m, dtype)
        total = sum_scores(per_param, params)
        finite = torch.stack((torch.isfinite(losses).all(), torch.isfinite(total).all()))
        return total, per_param, train_grad, t.loss, v.loss, finite

    load_inductor()
    # A code object of its own: dynamo keeps compiled code per code object, so signatures do not share
    # (and exhaust) one object's recompile limit.
    own = types.FunctionType(whole.__code__.replace(), whole.__globals__, whole.__name__, whole.__defaults__,
                             whole.__closure__)
    return torch.compile(own, fullgraph=True, dynamic=False)
