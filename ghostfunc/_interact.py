"""Two checks at the boundary: parameters reach the losses, and samples do not interact.

ghostfunc runs every sample alone (under ``vmap``), which is what the reference loop
of single-sample backward passes does. A ``model_fn`` whose per-sample loss depends on
the other samples of its batch (an in-batch contrastive loss, a batch-mean baseline,
batch statistics) has no per-sample gradient in that sense: each sample alone would
give numbers that are not the gradients of the user's batched loss. And a ``model_fn``
that never touches ``params`` (it calls ``net(x)`` instead of
``functional_call(net, params, (x,))``) has zero gradients everywhere.

:func:`check_model` catches both, once per ``model_fn``, parameter shapes and input
signature (cached like the trace), for the cost of two small forward passes under
``no_grad``: ``model_fn`` on the first ``k ≤ 3`` samples together, then on each alone.
Losses that differ beyond rounding mean the samples interact. A model that draws
random numbers (dropout in training mode; seen by the global RNG state, or a call given
a ``generator=``) cannot be compared this way (the draws of a batch and of
its samples alone differ), so for it only the parameter check runs. A model that
branches on tensor values (``bool(t)``, ``t.item()``) is compared only when the batch
and every sample alone took the same branches (the values are recorded): a branch
that a sample takes alone is the loop's answer, not an interaction (the capture
splits such batches). The global RNG state is left as it was.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import dis
import enum
import fractions
import functools
import heapq
import itertools
import os
import pathlib
import sys
import threading
import types
import uuid
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ._bymodel import ByModel
from ._draws import RANDOM, fixed_draw, fork_rng, host_states, same_host_states, set_host_states, undrawn
from ._ops import EXACT, SamplesInteractError
from ._ops.embedding import counted_over_call, renormed_by_call

#: How many samples the interaction check runs together (and alone).
ROWS = 3

#: Calls that turn a tensor into a Python value, i.e. data-dependent control flow.
TO_PYTHON = frozenset({
    Tensor.__bool__, Tensor.item, Tensor.__int__, Tensor.__float__, Tensor.__index__,
    Tensor.__contains__, Tensor.tolist, Tensor.__format__,  # f"{tensor}" in an error message
    Tensor.__repr__,  # str(t), repr(t): "nan" in repr(h); under vmap it prints every sample's rows
})


class Identity:
    """An object's identity as part of a cache key: equal to the identity of the same object only while it lives.

    A bare ``id()`` is reused by the next object allocated at a freed address (a new config object per call, a
    ``forward`` patched in by a context manager and deleted on exit), so a key holding the old object's id
    matched the new one and a check made for the old object was taken for the new. The object is held weakly
    where it can be (else strongly, for as long as the key lives)."""

    __slots__ = ("_id", "_ref")

    def __init__(self, obj: Any) -> None:
        self._id = id(obj)
        try:
            self._ref: Callable[[], Any] = weakref.ref(obj)
        except TypeError:  # not weak-referenceable (a list, a plain object()): held for as long as the key
            self._ref = functools.partial(_same, obj)

    def __hash__(self) -> int:
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity) or other._id != self._id:
            return False
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def get(self) -> Any:
        """The object, or ``None`` once it is gone."""
        return self._ref()

    def __repr__(self) -> str:
        return f"Identity({self._id:#x})"


def _same(obj: Any) -> Any:
    return obj


class ParamsUnusedError(ValueError):
    """No tensor of ``params`` reaches ``model_fn``'s computation."""


class CheckpointWithoutGradError(ValueError):
    """A re-entrant ``torch.utils.checkpoint`` segment has no input that requires grad: torch gives the parameters
    used inside it no gradient (and warns), the capture (which runs the segment as a plain call) would."""


#: torch's warning when a re-entrant checkpoint's inputs do not require grad (torch.utils.checkpoint).
_CHECKPOINT_NO_GRAD = "None of the inputs have requires_grad=True"


class LossShapeError(ValueError):
    """``model_fn`` returned something other than one loss per sample for a batch of several samples."""


class StateWrittenError(ValueError):
    """``model_fn`` writes another value into a module's buffer on every call, in place (running statistics in
    training mode, spectral_norm's power iteration, a counter), or writes into one of ``params``: the runs of one
    call would see different models."""


def param_written(name: str, func: Any) -> str:
    """Why a ``model_fn`` that writes into ``params[name]`` in place is refused (before the write)."""
    return (f"model_fn writes into params[{name!r}] in place ({_func_name(func)}); ghostfunc differentiates "
            f"model_fn at the params it is given, runs it several times per call and never modifies them, so "
            f"each run would see another parameter. The write was refused before it happened (params are as "
            f"they were). Compute a new tensor instead (w = p[{name!r}] * 0.9, not p[{name!r}].mul_(0.9)), or "
            f"keep state that changes between calls outside params. A model that rescales its own weights once, at "
            f"its first forward in eval mode (Hugging Face's RWKV with config.rescale_every > 0), can run one plain "
            f"forward before its params are taken, or set rescale_every=0")


#: ``model_fn`` -> {(parameter shapes, training flags, batch signature): the parameters that were zero when it
#: was checked (:func:`zero_params`)}.
_CHECKED: ByModel[Any, dict[tuple, frozenset[str]]] = ByModel()
#: ``model_fn`` -> the parameters its first checked calls looked up with ``scale_grad_by_freq``.
_BY_FREQ: ByModel[Any, frozenset[str]] = ByModel()


def counted_over_batch(model_fn: Callable) -> frozenset[str]:
    """The parameters ``model_fn`` looks up with ``scale_grad_by_freq=True`` (seen by :func:`check_model`).

    Each sample's gradient (the loop's, ghostfunc's) divides by how often an id occurs in
    that sample; a backward over the whole batch divides by how often it occurs in the
    batch. For these parameters the mean of the samples' gradients (``train_grad``) is not
    the batch gradient ``torch.optim`` would step with: ``train_step`` refuses such a model,
    ``graddot`` says so in its plan.
    """
    try:
        return _BY_FREQ.get(model_fn, frozenset())
    except TypeError:  # not weak-referenceable: checked on every call, remembered for the call
        hit = _SCOPE.memo.get(("by_freq", id(model_fn))) if _SCOPE.memo is not None else None
        return hit[1] if hit is not None and hit[0] is model_fn else frozenset()


def _remember_by_freq(model_fn: Callable, names: set[str]) -> None:
    if not names:
        return
    try:
        _BY_FREQ[model_fn] = _BY_FREQ.get(model_fn, frozenset()) | names
    except TypeError:
        if _SCOPE.memo is not None:
            _SCOPE.memo[("by_freq", id(model_fn))] = (model_fn, frozenset(names))


#: In-place operators (their ``__name__``); other in-place calls end in ``_`` (``mul_``, ``copy_``, ``normal_``).
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                              "__imatmul__"})
#: ``tensor.data`` reaches a mode as this descriptor's ``__get__`` (a new method-wrapper object each time).
_DATA = torch._C.TensorBase.__dict__["data"]
#: Calls named like in-place ones that leave the values alone.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "detach_", "retain_grad"})


def _written(func: Any, args: tuple, kwargs: dict[str, Any]) -> list[Tensor]:
    """The tensors a call writes into in place: its first argument for ``x.mul_(...)``, ``x[i] = v``, ``x += v``,
    ``torch.relu_(x)``, ``nn.init.normal_(x)``, ``F.relu(x, inplace=True)``, and its ``out=`` tensors."""
    name = getattr(func, "__name__", "") or ""
    out = kwargs.get("out")
    found = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]
    inplace = (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")
                                            and name not in _NOT_WRITES) or kwargs.get("inplace") is True)
    target = args[0] if args else kwargs.get("tensor", kwargs.get("input"))  # nn.init passes tensor= by name
    if inplace and isinstance(target, Tensor):
        found.append(target)
    return found


class _ParamWrites(TorchFunctionMode):
    """Refuses (:class:`StateWrittenError`) a call that writes into a parameter, a view of one or its ``.data``,
    before it runs: ``params`` (the caller's tensors, detached) stay as they were."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.ids = {id(v): k for k, v in params.items()}  # (a view of a parameter has it as its _base)
        self.held: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return self.guarded(func, args, kwargs or {})

    def name_of(self, t: Tensor) -> str | None:
        """The parameter ``t`` is, or is a view of (``None``: neither)."""
        return self.ids.get(id(t)) or (self.ids.get(id(t._base)) if t._base is not None else None)

    def guarded(self, func: Any, args: tuple, kwargs: dict[str, Any], instead: Callable[[], Any] | None = None) -> Any:
        """``func(*args, **kwargs)`` (or ``instead()``, run in its place), refused before it runs if it writes
        into a parameter."""
        for t in _written(func, args, kwargs):
            name = self.name_of(t)
            if name is not None:
                raise StateWrittenError(param_written(name, func))
        out = func(*args, **kwargs) if instead is None else instead()
        if getattr(func, "__self__", None) is _DATA and args and id(args[0]) in self.ids:
            self.ids[id(out)] = self.ids[id(args[0])]  # p.data: the parameter's values as another object
            self.held.append(out)  # (its id stays its own while the mode runs)
        return out


class _Uses(_ParamWrites):
    """Records whether any torch call receives one of the parameters (by identity), and random draws; refuses
    a write into a parameter before it happens (:class:`_ParamWrites`). With ``quiet``, dropout (and attention's
    ``dropout_p``) runs without drawing, as in eval mode (:func:`ghostfunc._draws.undrawn`), and every other random
    call of :data:`ghostfunc._draws.RANDOM` as one fixed draw (:func:`ghostfunc._draws.fixed_draw`; ``quieted`` says
    whether any did): a model in training mode, or one with noise of its own, is then the same function of each
    sample on every run, which the batch-against-alone comparison needs."""

    def __init__(self, params: Mapping[str, Tensor], quiet: bool = False) -> None:
        super().__init__(params)
        self.used = False
        self.random = False
        self.quiet, self.quieted = quiet, False
        self.branches: list[str] = []  # the Python values tensors became (data-dependent control flow), in order
        self.by_freq: set[str] = set()  # parameters looked up with scale_grad_by_freq (counted_over_batch)
        self.renorms = False  # a lookup with max_norm ran (run as torch runs it, it writes its table in place)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if is_collective(func):  # (before it runs: every rank's first run stops at its first collective, h84)
            raise SamplesInteractError(collective_refused(func))
        if (table := counted_over_call(func, args, kwargs)) is not None and (name := self.name_of(table)):
            self.by_freq.add(name)
        if not self.renorms and renormed_by_call(func, args, kwargs) is not None:
            self.renorms = True
        func = EXACT.get(func, func)  # as in the capture: BatchNorm in training mode refused before it runs
        if not self.used:
            self.used = any(isinstance(t, Tensor) and id(t) in self.ids for t in pytree.tree_leaves((args, kwargs)))
        if self.quiet and func in RANDOM and (fixed := fixed_draw(func, args, kwargs)) is not None:
            self.quieted = True  # (a fill of a parameter is refused as the draw into it would be)
            return self.guarded(func, args, kwargs, fixed)
        if kwargs.get("generator") is not None:
            self.random = True  # a draw from the model's own generator (the global one is watched by its state)
        if self.quiet and (quieted := undrawn(func, args, kwargs)) is not None:
            args, kwargs = quieted
            self.quieted = True
        out = self.guarded(func, args, kwargs)
        if func in TO_PYTHON:
            self.branches.append(repr(out))
        return out


def is_collective(func: Any) -> bool:
    """Whether ``func`` is a ``torch.distributed`` communication (``dist.all_reduce``, ``torch.distributed.nn``'s
    differentiable collectives, the functional collectives' ops)."""
    module = getattr(func, "__module__", None)
    if type(module) is str and module.startswith("torch.distributed"):
        return True
    return isinstance(func, torch._ops.OpOverload) and func.namespace in _COLLECTIVE_NAMESPACES


_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"})


def collective_refused(func: Any) -> str:
    """Why a ``model_fn`` that communicates across processes is refused (:func:`is_collective`)."""
    name = (f"torch.ops.{func}" if isinstance(func, torch._ops.OpOverload) else
            f"{getattr(func, '__module__', '')}.{getattr(func, '__name__', func)}".lstrip("."))
    return (f"model_fn calls {name}, a torch.distributed collective: a sample's loss then depends on other "
            f"processes' rows (a statistic all-reduced over ranks, SyncBatchNorm in training mode: samples that "
            f"interact across processes), and graddot runs model_fn several times per call, as many times on each "
            f"rank only where their batches agree, so a collective inside it would wait forever. Keep communication "
            f"outside model_fn (pass group= to graddot or train_step for data parallelism, and compute batch "
            f"statistics per sample)")


def run_with_grads(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, requires: Iterable[str],
                   warned: list[str] | None = None) -> tuple[dict[str, Tensor], Any]:
    """``(leaves, model_fn(leaves, batch))``: a plain run with gradients on, ``leaves`` detached aliases of ``params``
    (those named in ``requires`` requiring gradients), random draws undone, and as the first call's checks run it:
    the calls the capture replaces run as it runs them (:data:`ghostfunc._ops.EXACT`: an embedding's ``max_norm``
    renormalises a copy, never the parameter), a write into a parameter refused before it happens."""
    need = set(requires)
    leaves = {k: v.detach().requires_grad_(k in need) for k, v in params.items()}
    device = next(iter(params.values())).device
    with fork_rng([device.index or 0] if device.type == "cuda" else []), torch.enable_grad(), \
            eager_stance(), warnings.catch_warnings(record=True) as caught, _Uses(leaves):
        warnings.simplefilter("always")  # recorded, not shown: ``warned`` gets their messages
        out = leaves, model_fn(dict(leaves), batch)  # a copy: a model_fn that rebinds an entry keeps our leaves
    if warned is not None:
        warned.extend(str(w.message) for w in caught)
    return out


def check_model(model_fn: Callable, params: Mapping[str, Tensor], batches: tuple[Any, ...], where: str,
                labels: tuple[str, ...] = ("train", "val")) -> None:
    """Raise if no parameter reaches ``model_fn``'s losses, or if its samples interact.

    ``batches`` are :class:`ghostfunc._capture.Batch` values (``tensors``, ``rebuild``,
    ``size``, ``signature``); each signature is checked once per ``model_fn`` and
    parameter shapes, and again once a parameter that was zero everywhere then has moved (:func:`zero_params`). Cost on a first call: ``model_fn`` on ``min(size, 3)`` samples
    together and on each of them alone, without gradients.
    """
    # (torch's fast-path switch too: turned back on after a checked call, the fast path ran unseen, h66)
    shapes = (param_signature(params), behaviour(model_fn), torch.backends.mha.get_fastpath_enabled())
    try:
        seen = _CHECKED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: check every call
        seen = {}
    for batch, label in zip(batches, labels, strict=True):
        key = (shapes, batch.signature)
        if key in seen and still_zero(params, seen[key]):
            continue
        alone = (key, "one sample")  # a batch of one sample says nothing about the next, bigger batch of this
        if batch.size == 1 and alone in seen and still_zero(params, seen[alone]):  # signature: kept apart, for
            continue  # batches of one (online scoring: each call checked again, 2x a call)
        try:
            compared = _check_batch(model_fn, params, batch, label)
        except (SamplesInteractError, ParamsUnusedError, StateWrittenError, LossShapeError,
                CheckpointWithoutGradError, OtherPathError) as err:
            if str(err).startswith(where):
                raise
            raise type(err)(f"{where}: {err}") from None
        remember(seen, key if compared else alone, zero_params(params))


#: How many call signatures each cache keeps per ``model_fn`` (traces, routings, replays, checks, verdicts): past
#: it the oldest goes. (Emptied whole at 16-64 before: dynamic padding over 17 or 65 lengths traced, checked or
#: raced again on most calls, 5-10x a call on a small GPT-2.)
SIGNATURES = 128


def remember(cache: dict, key: Any, value: Any, limit: int = SIGNATURES) -> None:
    """``cache[key] = value``, the oldest entries dropped past ``limit``."""
    cache.pop(key, None)
    while len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


class _Scope(threading.local):
    memo: dict[tuple, Any] | None = None


_SCOPE = _Scope()


@contextlib.contextmanager
def one_call() -> Iterator[None]:
    """Within one public call, :func:`param_signature` and :func:`training_flags` are computed once per
    object: the cache keys of checks, traces, routings and verdicts all use them (on a small model each
    walk costs about as much as a torch call). Nested calls share the outermost scope.

    The call computes gradients whatever the caller's autograd mode: under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (an evaluation loop) it runs with gradients on, so it takes the same paths
    and gives the same numbers (a whole-batch run there once found no graph to differentiate and gave up
    that signature's fast path for good; ``reference_graddot`` raised)."""
    if _SCOPE.memo is not None:
        yield
        return
    _SCOPE.memo = {}
    try:
        with torch.inference_mode(False), torch.enable_grad(), uncached_parametrizations():
            yield
    finally:
        _SCOPE.memo = None


@contextlib.contextmanager
def uncached_parametrizations() -> Iterator[None]:
    """A call inside ``torch.nn.utils.parametrize.cached()`` evaluates the parametrized weights afresh on every run of
    ``model_fn``, as the loop of single-sample passes does: ghostfunc runs ``model_fn`` several times (the trace,
    the checks, the capture, under other ``torch.func`` transforms), and the cache kept the weight of the first
    run, not connected to the later runs' parameters (an orthogonal layer's gradient 1.0 off, 0.23 off scores;
    a training step refused as samples that interact). The caller's cache is back as it was afterwards; a
    ``cached()`` inside ``model_fn`` works as ever (one run's cache)."""
    if not parametrize._cache_enabled:
        yield
        return
    kept = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = kept


P = ParamSpec("P")
R = TypeVar("R")


def in_one_call(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`one_call` (the public entry points: ``graddot``, a training step's values)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with one_call():
                return fn(*args, **kwargs)
        except RuntimeError as err:
            raise_stopped(err)
            raise

    return wrapper


def grads_on(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with gradients on whatever the caller's autograd mode (as :func:`one_call`), without its
    per-call memo (``unroll``: one call over a whole run, whose calls inside scope themselves)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with torch.inference_mode(False), torch.enable_grad(), uncached_parametrizations():
                return fn(*args, **kwargs)
        except RuntimeError as err:
            raise_stopped(err)
            raise

    return wrapper


_HERE = str(pathlib.Path(__file__).resolve().parent) + os.sep  # (the package's folder, not a sibling's)


def stopped(err: BaseException) -> StopIteration | None:
    """The ``StopIteration`` that one of ghostfunc's own generators (a generator expression, a
    ``contextlib.contextmanager``) turned into ``err`` (PEP 479: ``RuntimeError('generator raised StopIteration')``):
    what the model raised (``next()`` on an exhausted iterator in ``model_fn``; under ``group=``, another rank's
    such error). ``None`` where ``err`` is anything else, a RuntimeError the user's own generator made included."""
    cause = err.__cause__
    if not isinstance(cause, StopIteration) or type(err) is not RuntimeError or err.args != (
            "generator raised StopIteration",):
        return None
    tb = cause.__traceback__  # its first frame: the generator it left
    if tb is None or not str(pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_HERE):
        return None
    return cause


def raise_stopped(err: RuntimeError) -> None:
    """Raise :func:`stopped` of ``err`` where there is one (its own traceback kept); else return."""
    cause = stopped(err)
    if cause is not None:
        raise cause.with_traceback(cause.__traceback__) from None


def keep_in_call(kind: str, obj: Any, value: Any) -> None:
    """Keep ``value`` for ``obj`` until the public call ends (:func:`kept_in_call`; nothing outside one)."""
    if _SCOPE.memo is not None:
        _SCOPE.memo[(kind, id(obj))] = (obj, value)


def kept_in_call(kind: str, obj: Any) -> Any:
    """What :func:`keep_in_call` kept for ``obj`` in this public call (``None``: nothing)."""
    hit = _SCOPE.memo.get((kind, id(obj))) if _SCOPE.memo is not None else None
    return hit[1] if hit is not None and hit[0] is obj else None


def _scoped(kind: Any, obj: Any, compute: Callable[[], Any]) -> Any:
    memo = _SCOPE.memo
    if memo is None:
        return compute()
    key = (kind, id(obj))
    hit = memo.get(key)
    if hit is None or hit[0] is not obj:
        hit = memo[key] = (obj, compute())  # the object is held: its id is not reused within the call
    return hit[1]


def zero_params(params: Mapping[str, Tensor]) -> frozenset[str]:
    """The parameters that are zero everywhere. A check passed while one is zero says nothing about what it
    multiplies: a coupling of rows behind a zero-initialised gate (ReZero, adaLN-zero, LoRA's ``B``) gives the
    same losses and factors together and alone. A verdict reached then holds while they stay zero
    (:func:`still_zero`); once training moves one, the next call checks again. One pass over the parameters
    (one device sync), on the calls that check."""
    floats = [(k, v) for k, v in params.items() if v.is_floating_point() and v.numel()]
    if not floats:
        return frozenset()
    nonzero = torch.stack([v.detach().any() for _, v in floats]).tolist()
    return frozenset(k for (k, _), nz in zip(floats, nonzero, strict=True) if not nz)


def still_zero(params: Mapping[str, Tensor], names: frozenset[str]) -> bool:
    """Whether the parameters ``names`` (:func:`zero_params` of a checked call) are all still zero: free when
    none were (the common case), one device sync otherwise, once per public call."""
    if not names:
        return True

    def compute() -> bool:
        if not names <= params.keys():
            return False
        return not bool(torch.stack([params[k].detach().any() for k in sorted(names)]).any())

    return _scoped(("zeros", names), params, compute)


def param_signature(params: Mapping[str, Tensor]) -> tuple:
    """Every parameter's name, shape, dtype and device: what cached checks, traces and verdicts are keyed by."""
    return _scoped("params", params,
                   lambda: tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in params.items()))


def training_flags(model_fn: Callable) -> tuple[Any, ...]:
    """``training`` of every submodule of the modules ``model_fn`` names (closure cells and the globals it
    reads, a bound method's object, a ``functools.partial``'s arguments), their classes and ``forward`` (the
    class's, or one set on an instance), and the forward and backward hooks on them and on every module
    (their handles' ids): switching one between train and eval mode, swapping a submodule for another,
    patching a forward, or adding or removing a hook (a pruning mask, a steering hook, one that mixes rows)
    makes the next call check and trace again, and a compiled graph traced without that hook is not reused."""
    def compute() -> tuple[Any, ...]:
        now = _training_flags(model_fn)
        try:
            last = _FLAGS.get(model_fn)
            if last is not None and last == now:
                return last  # (the same object as the last call's, its hash kept: :class:`_Settings`)
            _FLAGS[model_fn] = out = _Settings(now)
        except TypeError:  # not weak-referenceable
            return now
        return out

    return _scoped("flags", model_fn, compute)


_FLAGS: ByModel[Any, tuple[Any, ...]] = ByModel()


class _EagerStance:
    """``torch.compiler.set_stance("force_eager")`` while any thread is inside an interception, and the stance
    from before once the last one leaves.

    Dynamo's stance is one setting for the process, not per thread: two threads each
    setting it and restoring what they saw would, exiting out of order, leave
    ``force_eager`` behind (every ``torch.compile`` of the process eager from then on).
    Counted under a lock, the first entry sets it and the last exit restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._setting: Any = None  # the set_stance object: its __exit__ restores the stance before the first entry
        self.entries = 0  # how many times it was entered (a compiled call that overlapped one can tell, h94)

    def enter(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._setting = torch.compiler.set_stance("force_eager")  # sets it now
            self._inside += 1
            self.entries += 1

    def exit(self) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                setting, self._setting = self._setting, None
                setting.__exit__(None, None, None)


EAGER = _EagerStance()


class eager_stance:  # noqa: N801 - used as a context manager, like torch's own
    """``torch.compile``'d code runs eagerly inside (:data:`EAGER`, counted across threads). A class, not a
    generator: it is entered a few times per call."""

    def __enter__(self) -> None:
        EAGER.enter()

    def __exit__(self, *exc: Any) -> None:
        EAGER.exit()


#: How many functions deep :func:`reads` follows what a function reads (``from_module``'s ``model_fn`` holds
#: its module two closures down; a user's loss may call a helper that reads a global).
READ_DEPTH = 4
#: Packages whose functions' globals are library code: :func:`reads` follows their closures and default
#: arguments (where a ``from_module`` keeps its module), not the names they read from their own modules.
LIBRARIES = frozenset({"torch", "ghostfunc", "transformers", "numpy", "functools", "typing", "builtins",
                       "collections", "contextlib", "math", "operator", "einops", "accelerate", "peft"})


def reads(model_fn: Callable) -> list[Any]:
    """What ``model_fn`` reads besides its arguments, as far as it can be seen cheaply.

    Its closure cells, default arguments and the globals it names (in nested functions and
    comprehensions too), a bound method's object, a ``functools.partial``'s arguments, a
    callable object itself; and, up to :data:`READ_DEPTH` calls deep, the same of the Python
    functions found among them (a helper it calls; ``from_module``'s inner functions, whose
    closures hold the module). Library functions (:data:`LIBRARIES`) are followed into
    their closures and defaults only. Python modules and classes are not walked.
    """
    return [v for _, v in named_reads(model_fn)]


def named_reads(model_fn: Callable, classes: list[type] | None = None) -> list[tuple[str, Any]]:
    """:func:`reads`, each with where it was read (``"loss_fn: global weights"``, for messages). ``classes``: a list
    that gets the classes of the user's own it reads (not state here; :func:`modules_of` looks among their
    attributes for modules)."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def keep(obj: Any, depth: int, label: str) -> None:
        if type(obj) in _SETTING_TYPES:  # (True, a small int: one object wherever it is read, so read by name each
            found.append((label, obj))  # time: a global flag read after functional_call's strict=False was seen
            return  # there first, and its switch to True after a first call was never checked, h68)
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if issubclass(type(obj), types.ModuleType):
            if _own_module(obj):  # a module of the user's: its attributes are state (a config module's numbers)
                found.append((label, obj))
            return
        if issubclass(type(obj), type):
            if classes is not None and _own_class(obj):
                classes.append(obj)
            return  # a class: code, not state
        if issubclass(type(obj), (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return  # a builtin: code, not state
        if issubclass(type(obj), functools.partial):
            for v in (*obj.args, *obj.keywords.values()):
                keep(v, depth, f"{label}'s argument")
            keep(obj.func, depth, label)
        elif issubclass(type(obj), types.MethodType):
            keep(obj.__self__, depth, f"{label}'s object")
            keep(obj.__func__, depth, label)
        elif issubclass(type(obj), types.FunctionType):
            if depth < 0:
                return
            for name, v in _function_reads(obj):
                keep(v, depth - 1, name)
        else:  # data: a tensor, a number, a module, a container, a callable object (its attributes)
            found.append((label, obj))
            try:
                call = getattr(type(obj), "forward" if issubclass(type(obj), torch.nn.Module) else "__call__", None)
            except Exception:  # noqa: BLE001 - an odd metaclass: nothing to follow
                call = None
            if isinstance(call, types.FunctionType) and depth >= 0:  # a module's forward, an object's __call__
                for name, v in _function_reads(call):
                    keep(v, depth - 1, name)

    keep(model_fn, READ_DEPTH, "model_fn")
    return found


def _own_module(module: types.ModuleType) -> bool:
    """Whether ``module`` is neither a library's (:data:`LIBRARIES`, installed packages) nor the standard library's."""
    try:  # (from the module's own dict: a lazy module's __getattr__ may raise anything for what it lacks, h76)
        name, origin = vars(module).get("__name__") or "", vars(module).get("__file__") or ""
    except TypeError:  # no __dict__
        return False
    if type(name) is not str or type(origin) is not str:
        return False
    top = name.partition(".")[0]
    if top in LIBRARIES or top in sys.stdlib_module_names or top == "__main__":
        return False  # __main__'s globals are read by name already
    return "site-packages" not in origin and "dist-packages" not in origin


def _function_reads(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """One function's closure contents, default arguments and (outside :data:`LIBRARIES`) named globals, each with
    its name (``"f: closure w"``, ``"f: default t"``, ``"f: global CFG"``)."""
    at, code = getattr(fn, "__qualname__", "?"), fn.__code__
    out = [(f"{at}: closure {name}", _contents(c)) for name, c in zip(code.co_freevars, fn.__closure__ or (),
                                                                       strict=False)]
    defaults = fn.__defaults__ or ()
    named = code.co_varnames[code.co_argcount - len(defaults):code.co_argcount]
    out += [(f"{at}: default {name}", v) for name, v in zip(named, defaults, strict=False)]
    out += [(f"{at}: default {name}", v) for name, v in (fn.__kwdefaults__ or {}).items()]
    if (getattr(fn, "__module__", None) or "").partition(".")[0] not in LIBRARIES:
        scope = fn.__globals__
        names, imported, chains = _names(code)
        out += [(f"{at}: global {name}", scope[name]) for name in names if name in scope]
        for level, name, attr in imported:  # (the module an import names, and the submodule a from-import takes)
            full = _absolute(name, level, scope)
            for dotted in (full, f"{full}.{attr}" if attr else None):
                if dotted in sys.modules:
                    out.append((f"{at}: import {dotted}", sys.modules[dotted]))
        cells = dict(zip(code.co_freevars, fn.__closure__ or (), strict=False))
        for chain in chains:  # pkg.sub.cfg.CENTER: the submodules along a global's attributes (h73, h76)
            head = chain[0]
            if isinstance(head, tuple):  # (a module an import in the body bound to a local name, h83)
                head = _absolute(head[2], head[1], scope)
                obj: Any = sys.modules.get(head)
            else:
                obj = _contents(cells[head]) if head in cells else scope.get(head)
            for depth, attr in enumerate(chain[1:], 1):
                if not issubclass(type(obj), types.ModuleType):
                    break
                obj = vars(obj).get(attr)  # (no getattr: a lazy module's __getattr__ would import)
                if issubclass(type(obj), (types.ModuleType, types.FunctionType)):  # (a helper called as M.center(h):
                    out.append((f"{at}: global {'.'.join([head, *chain[1:depth + 1]])}", obj))  # its reads too, h86)
    return out


def _absolute(name: str, level: int, scope: dict[str, Any]) -> str:
    """The absolute name of a module an import names (``from .cfg import x`` in a package: level 1)."""
    if level <= 0:
        return name
    package = scope.get("__package__") or ""
    base = ".".join(package.split(".")[:max(0, len(package.split(".")) - (level - 1))]) if package else ""
    return f"{base}.{name}" if base and name else base or name


@functools.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> tuple[tuple[str, ...], tuple[tuple[int, str, str | None], ...],
                                          tuple[tuple[Any, ...], ...]]:
    """The global names a code object reads and the modules it imports, with those of the functions and
    comprehensions inside it: its global loads, not every name of ``co_names``, which holds the attributes and
    methods it reads too (``self.out`` read as a script's global ``out``: a result that differs by rank refused a
    model under ``group=``, h62); and its imports (``import cfg`` in the body, then ``cfg.CENTER``: a local name,
    h68), each as ``(level, module, name a from-import takes or None)``; and the attribute chains read off a global
    (``pkg.sub.cfg.CENTER``: the submodules along it are read too; a package's cfg submodule's switch was not seen,
    13.8 off, h73)."""
    names: list[str] = []
    imported: list[tuple[int, str, str | None]] = []
    chains: list[tuple[Any, ...]] = []
    chain: list[Any] = []
    consts: list[Any] = [None, None]  # the last two constants loaded (an import's level and from-list)
    module: tuple[int, str] | None = None  # the module the last IMPORT_NAME named
    pending: str | None = None  # the module an import leaves on the stack (what a STORE_FAST then binds)
    aliases: dict[str, tuple[str, int, str]] = {}  # a local name an import bound: ("import", level, module)
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in _ATTRIBUTE_LOADS and chain:
            chain.append(ins.argval)
            continue
        if len(chain) > 1:
            chains.append(tuple(chain))
        chain = []
        if op in _GLOBAL_LOADS:
            names.append(ins.argval)
            chain = [ins.argval]
        elif op == "LOAD_DEREF":  # (a closure's variable: a package imported in the enclosing function)
            chain = [ins.argval]
        elif op in _LOCAL_LOADS and ins.argval in aliases:  # (`import pkg.sub as s` in the body, then s.cfg.FLAG:
            chain = [aliases[ins.argval]]  # a local name, h83)
        elif op == "LOAD_CONST":
            consts = [consts[1], ins.argval]
        elif op == "IMPORT_NAME":
            level = consts[0] if isinstance(consts[0], int) else 0
            module = (level, ins.argval)
            imported.append((level, ins.argval, None))
            # without a from-list the import leaves the top package (``import a.b`` binds ``a``; ``as`` walks down)
            pending = ins.argval if consts[1] is not None else ins.argval.partition(".")[0]
        elif op == "IMPORT_FROM" and module is not None:
            imported.append((*module, ins.argval))
            base = pending if consts[1] is None and pending is not None else module[1]
            pending = f"{base}.{ins.argval}" if base else ins.argval
        elif op == "STORE_FAST" and pending is not None and module is not None:
            aliases[ins.argval] = ("import", module[0], pending)
        if op not in _IMPORT_STEPS:
            pending = None
    if len(chain) > 1:
        chains.append(tuple(chain))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner, inner_imported, inner_chains = _names(const)
            names += inner
            imported += inner_imported
            chains += inner_chains
    return tuple(dict.fromkeys(names)), tuple(dict.fromkeys(imported)), tuple(dict.fromkeys(chains))


#: The instructions that read a global by name (``LOAD_NAME``: in a class body, a name not assigned there).
_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
#: The instructions between an import and the store that binds its module (``import a.b.c as d`` walks down with
#: IMPORT_FROM, dropping each parent: :func:`_names`).
_IMPORT_STEPS = frozenset({"IMPORT_NAME", "IMPORT_FROM", "SWAP", "ROT_TWO", "POP_TOP"})
#: The instructions that read a local variable (a module an import in the body bound: :func:`_names`).
_LOCAL_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"})
#: The instructions that read an attribute (a chain off a global: :func:`_names`).
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


#: A module's hooks that run in its forward or backward (each dict maps a handle's id to the hook; the
#: ``*_with_kwargs``/``*_always_called`` dicts hold ids of these).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def modules_of(model_fn: Callable, wide: bool = True) -> list[torch.nn.Module]:
    """The modules ``model_fn`` reads (:func:`reads`, then :func:`_modules_in`), walked once per public call, also
    among the attributes of the user's classes it reads (``Cfg.model``: a hook put on such a model after a first
    call was not seen, and the replay scored rows the hook mixed, 2.1 off). ``wide=False``: among what it reads
    and their items and attributes only, as the ranks' comparison of their models looks (``ghostfunc._dist``: a
    module found only further off, a per-rank meter held on a class, was refused as another model)."""
    def compute() -> list[torch.nn.Module]:
        reads, classes = _read_by(model_fn)
        found = [v for _, v in reads]
        return _modules_in([*found, *(v for c in (classes if wide else ()) for v in _class_held(c))], wide)

    return _scoped(("modules", wide), model_fn, compute)


def _read_by(model_fn: Callable) -> tuple[list[tuple[str, Any]], list[type]]:
    """:func:`named_reads` of ``model_fn`` and the classes of the user's own it reads, once per public call (the
    module walk and :func:`module_settings` both start there)."""
    def compute() -> tuple[list[tuple[str, Any]], list[type]]:
        classes: list[type] = []
        return named_reads(model_fn, classes), classes

    return _scoped("reads", model_fn, compute)


def _class_held(kind: type) -> list[Any]:
    """What a class of the user's own and its own bases hold as attributes, code left out (:func:`modules_of`)."""
    try:
        return [v for c in kind.__mro__ if _own_class(c) for v in vars(c).values() if not issubclass(type(v), _CODE)]
    except Exception:  # noqa: BLE001 - a class whose metaclass raises on a look (a lazy proxy, h59): nothing held
        return []


#: A class's attributes that are code, not what it holds (:func:`modules_of`).
_CODE = (types.FunctionType, classmethod, staticmethod, property, type, types.BuiltinFunctionType,
         types.MemberDescriptorType, types.GetSetDescriptorType, types.WrapperDescriptorType, str)


def _own_class(kind: type) -> bool:
    """Whether ``kind`` is a class of the user's (``__main__``'s, or a module that is no library's nor the
    standard library's). Kept per class (the settings' walk asks for each class of every submodule on every call)."""
    try:  # (kept with the module it names and whether that is imported: a class whose module is imported only
        name = vars(kind).get("__module__")  # after a first call, or whose __module__ is set later, h90)
        at = (name, sys.modules.get(name) if type(name) is str else None)
        kept = _OWN_CLASSES.get(kind)
        if kept is not None and kept[0] == at[0] and kept[1] is at[1]:
            return kept[2]
    except Exception:  # noqa: BLE001 - a class that cannot be weakly referenced, hashed or looked at
        return _own_class_uncached(kind)
    own = _own_class_uncached(kind)
    try:
        _OWN_CLASSES[kind] = (*at, own)
    except Exception:  # noqa: BLE001 - (as above: asked again next time)
        pass
    return own


_OWN_CLASSES: weakref.WeakKeyDictionary[type, tuple[Any, Any, bool]] = weakref.WeakKeyDictionary()


def _own_class_uncached(kind: type) -> bool:
    try:
        name = getattr(kind, "__module__", None) or ""
    except Exception:  # noqa: BLE001 - a class whose metaclass raises on a look (a lazy proxy): not one of the user's
        return False
    if type(name) is not str:
        return False
    if name == "__main__":
        return True
    module = sys.modules.get(name)
    return module is not None and _own_module(module)


def behaviour(model_fn: Callable) -> tuple[Any, ...]:
    """What the checks that samples do not interact are kept under (:func:`check_model`, the training step's
    gradient checks, the group-by-group comparison, the draws' verdicts): :func:`training_flags` and
    :func:`module_settings`. A module's setting that switches a batch statistic on after a first call
    (``self.center = True`` for ``h - h.mean(0)``) was not checked again: the replay scored it silently (the
    loop's gradients were 0). Traces, routings, whole-batch verdicts and replays keep the flags alone: keyed by
    the settings too, a setting that changes on every call (a counter the forward bumps, a temperature schedule)
    traced and verified every call (10x a call); and a setting that changed on each of :data:`CHURN` calls in a
    row (a counter, a schedule) is left out from then on (checked on every call, such a model took 2.7x a call)."""
    return training_flags(model_fn), steady_settings(model_fn)


#: After how many calls in a row that each changed it a setting counts as one that changes every call, and is left
#: out of :func:`behaviour` (:func:`steady_settings`).
CHURN = 3


def steady_settings(model_fn: Callable) -> tuple[Any, ...]:
    """:func:`module_settings` without those that changed on each of the last :data:`CHURN` calls of this
    ``model_fn`` (a step counter its forward bumps, a temperature annealed per step: once left out, for good), nor
    those of a module or held object that gained entries on each of them (a log written per step: every call was
    checked again, 4x a call). A setting switched once (a mode flag) stays in, so the next call checks again."""
    def compute() -> tuple[Any, ...]:
        now = module_settings(model_fn)
        try:
            last, counts, kept = _CHURNS.get(model_fn, ((), {}, None))
        except TypeError:  # not weak-referenceable: nothing to compare with
            return now
        if kept is not None and now == last:  # (the common call: nothing moved, no count running; the same object
            return kept  # as before, its hash kept: the caches keyed by it look it up by identity)
        before = dict(last)
        grew = {k[0] for k, _ in now if k not in before} if before else set()  # (where new entries appeared)
        # (an object model_fn reads whose entries change in turn, one per call: each of them steady, the object not)
        moved = grew | {k[0] for k, v in now if k[0][0] == _HELD_READ and k in before and before[k] != v}
        counts = {**{k: (counts.get(k, 0) + 1 if k in before and before[k] != v else
                         counts.get(k, 0) if counts.get(k, 0) >= CHURN else 0) for k, v in now},
                  **{(_GREW, w): (counts.get((_GREW, w), 0) + 1 if w in moved else
                                  counts.get((_GREW, w), 0) if counts.get((_GREW, w), 0) >= CHURN else 0)
                     for w in {k[0] for k, _ in now}}}
        out = _Settings((k, v) for k, v in now if counts[k] < CHURN and counts[(_GREW, k[0])] < CHURN)
        settled = all(c == 0 or c >= CHURN for c in counts.values())  # (then an unchanged call keeps them all)
        _CHURNS[model_fn] = (now, counts, out if settled else None)
        return out

    return _scoped("steady", model_fn, compute)


_CHURNS: ByModel[Any, tuple[tuple[Any, ...], dict[Any, int], tuple[Any, ...] | None]] = ByModel()


class _Settings(tuple):
    """:func:`steady_settings`' tuple, its hash computed once (a config module of 200 numbers was hashed several
    times a call, in every cache key it is part of, h86)."""

    def __hash__(self) -> int:
        kept = self.__dict__.get("hash")
        if kept is None:
            kept = self.__dict__["hash"] = tuple.__hash__(self)
        return kept
#: :func:`steady_settings`' count of the calls in a row on which a module or held object gained entries (a log the
#: training loop writes per step, ``metrics[f"step_{i}"] = loss``: its entries are left out as a churning setting is).
_GREW = "grew"


def negative_zeros(model_fn: Callable) -> tuple[Any, ...]:
    """The settings (:func:`module_settings`, churning ones too) that are ``-0.0`` now: what a compiled graph is kept
    under besides :func:`steady_settings`, since dynamo's guards take ``-0.0`` for ``0.0`` (a schedule that reached
    0.0 and then -0.0, read through ``copysign``, kept the graph built at 0.0: 0.55 off)."""
    return tuple(k for k, v in module_settings(model_fn) if v == _NEGATIVE_ZERO)


_NEGATIVE_ZERO = ("float", (-0.0).hex())  # (value_key(-0.0))


def module_settings(model_fn: Callable) -> tuple[Any, ...]:
    """The plain settings every submodule of the modules ``model_fn`` reads holds, once per public call: numbers
    (floats by their bits), strings, bools, ``None``, enum members, NumPy scalars and short tuples of them, under
    any name but a dunder's (``self._center`` too), on the instance or on a class of the user's own; and those of
    the objects a module holds that hold settings (a Hugging Face ``PretrainedConfig``, a dataclass, a
    ``SimpleNamespace``, a dict of hyperparameters, a class of one's own named ``...Config``; and such objects
    inside them, one level down); and those ``model_fn`` reads itself (:func:`named_reads`: a global flag or
    hparams dict, a closure's variable, dict or namespace, the classes of the user's own it names: a global dict's
    flag switching a batch mean on after a first call kept the checks, and ``unroll`` gave each row alone's values,
    1.0 off the derivative through the loop, h57). What :func:`behaviour` adds to :func:`training_flags` (a module switched to drop
    its activations sequence-first kept the first call's verdict on its random draws: 0.27 off; h43: an enum mode,
    a private bool, an hparams dict switching a batch mean on were not seen)."""
    def compute() -> tuple[Any, ...]:
        out: list[Any] = []
        holders: dict[int, Any] = {}
        reads, read_classes = _read_by(model_fn)
        out += _read_settings(reads)
        classes: dict[type, None] = dict.fromkeys(read_classes)  # (Cfg.center, a class model_fn names)
        for at, m in enumerate(submodules(model_fn)):
            out += _settings_of(m.__dict__, holders, ("module", at))
            classes[type(m)] = None
        bases = dict.fromkeys(c for kind in classes for c in kind.__mro__ if _own_class(c))
        for kind in bases:  # (a class attribute the forward reads: self.mode set on the class or a base of it)
            out += _settings_of(dict(vars(kind)), holders, ("class", kind))
        for depth in range(2):  # (a config's sub-config: one level down)
            found, holders = holders, {}
            items: list[tuple[int, dict[Any, Any]]] = []
            for i, holder in enumerate(found.values()):
                if isinstance(holder, dict):
                    if dict.__len__(holder) > HELD_SETTINGS:  # a table (a vocabulary, a cache), not settings
                        continue
                    items.append((i, dict(dict.items(holder))))
                else:
                    attrs = _attributes(holder) or {}
                    items.append((i, attrs if len(attrs) <= HELD_SETTINGS else
                                  dict(itertools.islice(attrs.items(), HELD_SETTINGS))))
            # the smallest first, up to HELD_BUDGET entries per level: settings sit in small objects (an hparams
            # dict beside two 600-entry label maps was left unread when these took a shared budget first, h48), and
            # a dict of 1024 dicts is read 4096 entries deep, not a million (5 s a call, h45)
            left = HELD_BUDGET
            for i, attrs in sorted(items, key=lambda item: len(item[1])):
                if len(attrs) > left:
                    break
                left -= len(attrs)
                out += _settings_of(attrs, holders if depth == 0 else None, ("held", depth, i))
        return tuple(out)

    return _scoped("settings", model_fn, compute)


def _read_settings(reads: list[tuple[str, Any]]) -> list[tuple[Any, Any]]:
    """The settings among what ``model_fn`` reads itself (:func:`module_settings`): its plain values (a global flag,
    a closure's variable) and the plain entries of the objects it reads that hold settings (a dict, a namespace, a
    dataclass or config, an object of a class of one's own, a module of one's own), one level in, each of at most
    :data:`READ_HELD` entries (a table of a thousand items' metadata read as settings was 15x a call, h59); those
    of one such object are left out for good once some entry of it changed on each of :data:`CHURN` calls in a row
    (:func:`steady_settings`: a per-class counter the loop bumps in turn, a metrics dict it overwrites, re-checked
    on every call, 3-8x a call, h59)."""
    plain: dict[str, Any] = {}
    out: list[tuple[Any, Any]] = []
    for label, v in reads:
        at = label if label not in plain else f"{label} ({len(plain)})"
        plain[at] = v
        attrs = _read_held(v)
        if attrs is not None and len(attrs) <= READ_HELD:
            out += _settings_of(attrs, None, (_HELD_READ, at))
    return _settings_of(plain, None, ("read",)) + out


#: The most entries of an object ``model_fn`` reads itself that :func:`_read_settings` reads as settings.
READ_HELD = 256
#: :func:`_read_settings`' mark on the settings of an object read by ``model_fn`` (:func:`steady_settings` leaves
#: one out whole once some entry of it changed on each of :data:`CHURN` calls in a row).
_HELD_READ = "read held"


def _read_held(v: Any) -> dict[str, Any] | None:
    """The entries of ``v`` as an object holding settings (:func:`_read_settings`), or ``None``."""
    kind = type(v)
    if issubclass(kind, types.ModuleType):
        return dict(vars(v))  # (a module of one's own: named_reads keeps no other)
    form = _FORMS.get(kind) or _form(kind)
    if form is _F_HOLDER:
        if isinstance(v, dict):
            return dict(dict.items(v)) if dict.__len__(v) <= READ_HELD else None
        return _attributes(v)
    if form is _F_OTHER and _own_class(kind) and not issubclass(kind, (torch.nn.Module, Tensor)):
        return _attributes(v)  # (an options object: args.centre)
    if kind in (list, tuple) and len(v) <= READ_HELD:  # (a config module held in a list or tuple, h86)
        return {f"[{i}]": x for i, x in enumerate(v) if issubclass(type(x), types.ModuleType)} or None
    return None


_SETTING_TYPES = frozenset({bool, int, float, str, type(None)})
_NOT_A_SETTING = object()
#: The most entries of one object held for its settings (a config, an hparams dict) :func:`module_settings` reads; a
#: dict of more is a table (a vocabulary, a cache), not settings, and is not read (a module holding a 50k-word
#: vocabulary read 1024 of its entries on every call: 4x a small model's call). And how many it reads per level in
#: all, the smallest holders first (a dict of 1024 dicts read each of them: 5 s a call).
HELD_SETTINGS = 1024
HELD_BUDGET = 4 * HELD_SETTINGS


#: What every ``nn.Module`` keeps in its ``__dict__`` (parameters, buffers, submodules, hooks, ``training``): not
#: settings (:func:`training_flags` reads the flag and the hooks).
_MODULE_OWN = frozenset(vars(torch.nn.Module()))


def _settings_of(attrs: dict[str, Any], holders: dict[int, Any] | None, where: Any,
                 modules: bool = True) -> list[tuple[Any, Any]]:
    """The plain settings among ``attrs`` (:func:`module_settings`), each as ``((where, name), key)``, and into
    ``holders`` the objects among them that hold settings; and (``modules``) those of a Python module of the user's
    own among them, one level in (a config module held in a dict, on a class or as ``self.settings``: its flag
    switched after a first call was not seen, h83)."""
    own = []
    for k, v in attrs.items():
        if type(k) is not str or k in _MODULE_OWN or k.startswith("__"):  # (a dict under other keys is a table:
            continue  # id2label, a log by step; read, one grew a setting per call and every call was checked, h48)
        form = _FORMS.get(type(v))
        if form is None:
            form = _form(type(v))
        if form is _F_PLAIN:
            own.append(((where, k), value_key(v)))
        elif form is _F_HOLDER:
            if holders is not None:
                holders[id(v)] = v
        elif form is _F_TUPLE and tuple.__len__(v) <= 16:  # each item its own setting (a counter beside a flag: h44)
            own += [((where, k, *at), key) for at, key in _tuple_settings(v, ())]
        elif form is _F_MODULE:
            if modules and _own_module(v) and len(held := dict(vars(v))) <= READ_HELD:
                own += _settings_of(held, None, (where, k), modules=False)
        elif form is not _F_OTHER and (key := _setting(v)) is not _NOT_A_SETTING:
            own.append(((where, k), key))
    return own


def _tuple_settings(v: tuple, at: tuple) -> list[tuple[tuple, Any]]:
    """The plain settings in a short tuple, each under its position (nested ones within theirs)."""
    out: list[tuple[tuple, Any]] = []
    for i, x in enumerate(tuple.__iter__(v)):
        if isinstance(x, tuple) and tuple.__len__(x) <= 16:
            out += _tuple_settings(x, (*at, i))
        elif (key := _setting(x)) is not _NOT_A_SETTING:
            out.append(((*at, i), key))
    return out


_F_PLAIN, _F_ENUM, _F_TUPLE, _F_NUMPY, _F_HOLDER, _F_MODULE, _F_OTHER = (
    "plain", "enum", "tuple", "numpy", "holder", "module", "other")
#: Each class's :func:`_form` (kept: the settings' walk reads hundreds of attributes per call).
_FORMS: dict[type, str] = {}


def _form(kind: type) -> str:
    """What a value of ``kind`` is to :func:`module_settings`: a plain setting, an enum member, a tuple, a NumPy
    scalar, an object that holds settings (a config, a dataclass, a namespace, a dict), or none of these."""
    numpy = sys.modules.get("numpy")
    if kind in _SETTING_TYPES:
        form = _F_PLAIN
    elif issubclass(kind, enum.Enum):
        form = _F_ENUM
    elif issubclass(kind, tuple):  # (a NamedTuple of hyperparameters, torch.Size)
        form = _F_TUPLE
    elif numpy is not None and issubclass(kind, numpy.generic):
        form = _F_NUMPY
    elif issubclass(kind, dict) or kind is types.SimpleNamespace or _config_kind(kind):  # (OrderedDict, an
        form = _F_HOLDER  # attribute dict as EasyDict's; read as the built-in dict reads them)
    elif issubclass(kind, types.ModuleType):
        form = _F_MODULE
    else:
        form = _F_OTHER
    if len(_FORMS) < 4096:
        _FORMS[kind] = form
    return form


def _setting(v: Any) -> Any:
    """``v``'s key as a plain setting (:func:`value_key`), or :data:`_NOT_A_SETTING` (a tuple's items are settings
    of their own: :func:`_tuple_settings`)."""
    form = _FORMS.get(type(v)) or _form(type(v))
    if form is _F_PLAIN:
        return value_key(v)
    if form is _F_ENUM:
        return (type(v), v.name)
    if form is _F_NUMPY and v.dtype.kind in "biufc":
        return (type(v), value_key(v.item()))
    return _NOT_A_SETTING


def _config_kind(kind: type) -> bool:
    """Whether objects of ``kind`` are configuration objects: a Hugging Face ``PretrainedConfig``, a class of one's
    own named ``...Config`` (or deriving from one), a dataclass, an ``argparse.Namespace``. Kept per class."""
    known = _CONFIG_KINDS.get(kind)
    if known is None:
        try:
            known = (not issubclass(kind, (torch.nn.Module, Tensor, type)) and (
                any(c.__name__.endswith("Config") for c in kind.__mro__) or "__dataclass_fields__" in dir(kind)
                or kind.__name__ == "Namespace"))
        except Exception:  # noqa: BLE001 - a class whose metaclass raises on a look: not one to read settings from
            known = False
        _CONFIG_KINDS[kind] = known
    return known


_CONFIG_KINDS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def submodules(model_fn: Callable) -> list[torch.nn.Module]:
    """Every submodule of the modules ``model_fn`` reads (:func:`modules_of`), as ``Module.modules()`` yields them
    without its generator's cost (a module shared by two roots once per root), once per public call: what
    :func:`training_flags` and :func:`module_settings` read."""
    def compute() -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for obj in modules_of(model_fn):
            stack = [obj]
            while stack:
                m = stack.pop()
                out.append(m)
                stack.extend(c for c in reversed(m._modules.values()) if c is not None)
        return out

    return _scoped("submodules", model_fn, compute)


def _training_flags(model_fn: Callable) -> tuple[Any, ...]:
    flags: list[Any] = []
    for m in submodules(model_fn):
        state = m.__dict__
        kind = type(m)  # the class and its forward too: a submodule swapped for another, a class patched
        flags += (m.training, kind, kind.forward)  # (one that mixes rows)
        if "forward" in state:  # a forward put on the instance
            flags.append(("forward", Identity(state["forward"])))
        for name in _HOOKS:
            if hooks := state.get(name):
                flags.append((name, tuple(hooks)))
    module = torch.nn.modules.module  # hooks on every module (register_module_forward_hook and the like)
    for name in _HOOKS:
        if hooks := getattr(module, f"_global{name}", None):
            flags.append(("global", name, tuple(hooks)))
    return tuple(flags)


def _modules_in(found: list[Any], wide: bool = True) -> list[torch.nn.Module]:
    """The modules among ``found`` and, down to :data:`WALK_DEPTH` levels (as :func:`state_of` looks), among the
    items of its dicts, lists and tuples (read as the built-in types read them: a subclass's own ``values()`` is not
    called), the attributes of its other objects and of their classes of the user's own (``Holder().model`` set
    on the class), and what the functions, bound methods, ``functools.partial`` objects and weak references among
    them hold (a lambda kept in a dict, a trainer's bound method): the first :data:`ITEMS` of each,
    :data:`MODULE_BUDGET` objects looked into and :data:`MODULE_MET` met in all. A module is not walked here (its
    submodules are :func:`_training_flags`' own walk)."""
    out: list[torch.nn.Module] = []
    seen: set[int] = set()
    # what is still to be looked into, the nearest level first and in it the smallest container first (objects
    # of other kinds before containers): (-depth, size, order, object)
    queue: list[tuple[int, int, int, Any]] = []
    met = [MODULE_MET]
    order = itertools.count()

    def meet(objs: Iterable[Any], depth: int) -> None:  # a module is taken as it is met, the rest queued
        met_now = list(itertools.islice(objs, max(met[0], 0)))
        met[0] -= len(met_now)
        for v in met_now:
            kind = type(v)
            if kind in _ATOMS:
                continue
            if kind in _PLAIN_CONTAINERS:  # (most of what a long walk meets: no module, looked into later)
                if depth > 0 and id(v) not in seen:
                    heapq.heappush(queue, (-depth, kind.__len__(v), next(order), v))
                continue
            if issubclass(kind, _NOT_HOLDING) or id(v) in seen:
                continue
            if issubclass(kind, torch.nn.Module):
                seen.add(id(v))
                out.append(v)
            elif depth > 0:
                heapq.heappush(queue, (-depth, 0, next(order), v))

    # Nearest first, modules taken as they are met: what is held near the top is looked into before the items of a
    # long list beside it (a trainer's log of 300 dicts spent the budget before the trainer's model was reached, and
    # a hook put on it was not seen; h43: one of small lists, too), a small dict before a large one beside it (a
    # cache of 1000 dicts of 300 lists beside {"a": {"b": model}}), and a long walk stops after MODULE_MET objects
    # met (h45: that cache met 330k objects per call, 64 ms; h48: a dict of 150 metric histories and the model).
    meet(found, WALK_DEPTH)
    budget = MODULE_BUDGET
    while queue and budget > 0 and met[0] > 0:
        depth, _, _, obj = heapq.heappop(queue)
        depth = -depth
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = type(obj)
        items = _held_by(obj, kind, wide)
        if items is None:
            continue
        budget -= 1
        if issubclass(kind, types.ModuleType):  # a user's own module (reads): its attributes, no deeper
            depth = 1
        meet(itertools.islice(items, ITEMS), depth - 1)
    return out


def _held_by(obj: Any, kind: type, wide: bool = True) -> Iterable[Any] | None:
    """What :func:`_modules_in` looks at inside ``obj`` (``None``: nothing); not ``wide``: containers' items and
    objects' own attributes only."""
    if issubclass(kind, dict):
        return dict.values(obj)
    if issubclass(kind, list):
        return list.__iter__(obj)
    if issubclass(kind, tuple):
        return tuple.__iter__(obj)
    if not wide:
        attrs = None if issubclass(kind, (type, types.FunctionType, types.MethodType)) else _attributes(obj)
        return None if attrs is None else attrs.values()
    if issubclass(kind, types.FunctionType):  # a lambda or a helper kept in a container or an attribute
        return (v for _, v in _function_reads(obj))
    if issubclass(kind, types.MethodType):
        return iter((obj.__self__, obj.__func__))
    if issubclass(kind, functools.partial):
        return iter((obj.func, *obj.args, *obj.keywords.values()))
    if issubclass(kind, weakref.ref):
        return iter((obj(),))
    if issubclass(kind, type):
        return None
    attrs = _attributes(obj)
    if _own_class(kind):  # (what its class holds too: Holder.model read as self.model)
        return itertools.chain(() if attrs is None else attrs.values(), _class_held(kind))
    return None if attrs is None else attrs.values()


#: The most objects :func:`_modules_in` looks into per call (each call of graddot walks them: a trainer object
#: holding a dataset costs at most this many looks), and the most it meets (the items and attributes of those: a
#: cache of 1000 dicts of 300 lists queued 330k objects, 64 ms a call, 9x the walk before it met them breadth first;
#: now about 4 ms at most).
MODULE_BUDGET = 1024
MODULE_MET = 8 * MODULE_BUDGET
_ATOMS = frozenset({bool, int, float, complex, str, bytes, type(None)})  # (_SCALARS' exact types: a set look)
_PLAIN_CONTAINERS = frozenset({list, dict, tuple})


def state_of(model_fn: Callable) -> tuple:
    """A fingerprint of what ``model_fn`` reads besides its arguments (:func:`reads`), as far as it can be
    seen cheaply.

    Every tensor's identity and version counter (an in-place change or a new tensor
    shows), numbers and strings by value, a NumPy array's identity and a checksum of its
    bytes, every module's tensors (parameters and buffers, by identity and version), plain
    attributes (with the items of containers among them) and ``training`` flags, and, one
    level down, the items of dicts, lists and tuples (the first :data:`ITEMS`) and the
    attributes of other objects among them; and :func:`training_flags` (the modules' classes, forwards
    and hooks: a backward hook that clips changes no loss); and the classes of the user's own it names, by their
    data attributes, their functions (a method patched in) and what those read (an ``autograd.Function`` whose
    ``backward`` scales the gradient by a class attribute or a global, annealed between steps: the loss does not
    change, the gradient does; the secant carried a stale one, 3.5e-2 off, h49). Equal fingerprints do not prove that
    nothing changed (state behind deeper objects is not walked); a changed one proves that something did.
    """
    classes: list[type] = []
    found = [v for _, v in named_reads(model_fn, classes)]
    return _state_of_values(found), _classes_state(classes), _training_flags(model_fn)


def _classes_state(classes: list[type]) -> tuple:
    """:func:`state_of`'s part for the classes of the user's own ``model_fn`` names (and their own bases)."""
    out: list[Any] = []
    for kind in dict.fromkeys(c for k in classes for c in k.__mro__ if _own_class(c)
                              and not issubclass(c, torch.nn.Module)):  # (a module's class: named by its methods'
        # super() cells; its instances' state is walked, and a counter on it made every step take the gradient again)
        methods = [fn for v in vars(kind).values() if (fn := _method_function(v)) is not None]
        out.append((kind, _class_stamp(kind), _state_of_values([_class_data(kind),
                                                                 *(v for fn in methods for _, v in named_reads(fn))])))
    return tuple(out)


#: Entries a batch leaf's :func:`fingerprint` looks at, and how deep into its attributes and items.
LEAF_BUDGET, LEAF_DEPTH = 256, 3
#: NumPy arrays in a batch leaf up to this many bytes are fingerprinted by a checksum of their contents.
LEAF_ARRAY_BYTES = 1 << 16


def fingerprint(obj: Any) -> Any:
    """A batch's non-tensor leaf as a cache key, by what it holds: numbers, strings and other immutable values
    (:func:`is_value`) by value, small tensors and NumPy arrays by a checksum (larger ones, past
    :data:`LEAF_ARRAY_BYTES` in all, by identity and version), modules by identity only (their state is the
    model's, seen by :func:`training_flags` and :func:`state_of`), and the items of containers and the
    attributes of objects of plain Python classes (:func:`plain_class`, with the class's own settings)
    :data:`LEAF_DEPTH` levels down, at most :data:`LEAF_BUDGET` entries. A config changed in place is another
    key; an equal one made anew for a call is the same key (its checks are not run again: that cost 50 ms a
    call). Where the walk could not see all the leaf holds (a function, a ``functools.partial``, a random
    generator, a property, a subclass of a container, a long list, the budget spent), the leaf's identity is
    part of the key too: a new one is checked again. Once per public call per leaf."""
    def walk() -> Any:
        checksummed = [LEAF_ARRAY_BYTES]

        def atom(x: Any) -> Any:
            return _local_atom(x, checksummed)

        seen, whole = leaf_walk(obj, LEAF_DEPTH, LEAF_BUDGET, atom, _local_tag)
        return seen if whole else (Identity(obj), seen)

    return _scoped("leaf", obj, walk)


#: Immutable types whose instances are keyed by value (with :func:`_equals_itself`).
VALUE_TYPES: tuple[type, ...] = (bool, int, float, complex, str, bytes, type(None), enum.Enum, type, torch.dtype,
                                 torch.device, torch.layout, torch.memory_format, torch.Size, range,
                                 datetime.date, datetime.time, datetime.timedelta, decimal.Decimal,
                                 fractions.Fraction, uuid.UUID, pathlib.PurePath)


def is_value(x: Any) -> bool:
    """Whether ``x`` is an immutable value keyed by itself: one of :data:`VALUE_TYPES`, a NumPy scalar or dtype,
    equal to itself with a plain ``True`` (not a NaN, not a subclass whose ``__eq__`` raises)."""
    numpy = sys.modules.get("numpy")
    if not (issubclass(type(x), VALUE_TYPES) or (numpy is not None and isinstance(x, (numpy.generic, numpy.dtype)))):
        return False
    return _equals_itself(x)


def value_key(x: Any) -> Any:
    """``x`` as a cache key that tells apart what equality does not: a float by its bits (``-0.0`` from ``0.0``, as
    ``copysign`` and ``1 / x`` do; a compiled graph built with one was reused for the other, 0.39 off), a complex
    number by both parts; anything else as it is."""
    if isinstance(x, float):
        return ("float", float(x).hex())
    if isinstance(x, complex):
        return ("complex", x.real.hex(), x.imag.hex())
    return x


def _equals_itself(x: Any) -> bool:
    try:
        hash(x)
        return type(x).__eq__(x, x) is True  # type: ignore[call-arg]
    except Exception:  # noqa: BLE001 - the value's own hash or equality failed: not a value to key by
        return False


def _local_atom(x: Any, checksummed: list[int]) -> Any:
    """A batch leaf's part that needs no walk (``None`` where it does); ``checksummed``: the bytes of tensors
    and arrays left to sum in this walk."""
    kind = type(x)
    if issubclass(kind, enum.Enum) and is_value(x):  # (an IntEnum, a StrEnum too: a method may read a module's dict)
        return ("value", kind, x, _enum_methods_read(kind))
    if issubclass(kind, _SCALARS):
        return (value_key(x),)
    if issubclass(kind, Tensor):
        size = x.numel() * x.element_size()
        if (kind in (Tensor, torch.nn.Parameter) and x.layout is torch.strided and not x.is_nested
                and x.device.type != "meta" and size <= checksummed[0]):
            checksummed[0] -= size
            if (crc := tensor_checksum(x)) is not None:
                return ("tensor", tuple(x.shape), x.dtype, x.device, crc)
        return (Identity(x), version(x))  # (a change in place moves the version; also one torch cannot read)
    if issubclass(kind, type):  # a class (an activation, a dtype class): with its settings where it is plain
        return _class_key(x)
    if is_value(x):
        return ("value", kind, value_key(x))
    if _is_array(x) and not x.dtype.hasobject:  # (an array of objects: walked as a list)
        if x.nbytes <= checksummed[0]:
            checksummed[0] -= x.nbytes
            return ("array", x.shape, str(x.dtype), zlib.crc32(memoryview(x.tobytes())))
        return None  # (identity, as an object whose state is out of sight)
    if issubclass(kind, torch.nn.Module):
        return Identity(x)
    if issubclass(kind, types.MethodType):  # a bound method, made anew on each access: its function, and its
        return ("method", Identity(x.__func__), _held((x.__self__,), checksummed, x.__self__))  # object walked
    if kind is types.FunctionType:  # a function (a staticmethod's too): what it reads (a module's dict changed in
        read = _reads_of((x,)) if _reads_data_only(x) else None  # place kept the first checks: 0.55 off)
        return ("function", Identity(x), read)
    if kind is functools.partial:  # its function, and its arguments walked (a dict it holds changed in place)
        f, held = x.func, (*x.args, *x.keywords.items())
        if isinstance(f, types.FunctionType):
            read = _reads_of((f,)) if _reads_data_only(f) else None
            return ("partial", Identity(f), _held(held, checksummed, x), read if read is not None else Identity(x))
        return ("partial", _held((f, *held), checksummed, x))  # (a bound method's object, a partial inside)
    return None


def _held(objs: tuple, checksummed: list[int], owner: Any) -> Any:
    """What a bound method's object or a partial's arguments hold, each walked as a leaf is, with ``owner``'s
    identity where the walk does not see all of it (the object, the partial: not a tuple made for the walk, a new
    key on every call); two levels of such nesting at most."""
    depth = getattr(_HELD, "depth", 0)
    if depth >= 2:
        return Identity(owner)
    _HELD.depth = depth + 1
    try:
        walks = [leaf_walk(obj, LEAF_DEPTH, LEAF_BUDGET, lambda y: _local_atom(y, checksummed), _local_tag)
                 for obj in objs]
    finally:
        _HELD.depth = depth
    seen = tuple(w[0] for w in walks)
    return seen if all(w[1] for w in walks) else (Identity(owner), seen)


_HELD = threading.local()


def tensor_checksum(x: Tensor) -> int | None:
    """A CRC-32 of a tensor's bytes; ``None`` for one torch cannot read as bytes (a nested tensor, a subclass)."""
    try:
        data = x.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)
        return zlib.crc32(memoryview(data.numpy().tobytes()))
    except (RuntimeError, TypeError):
        return None


def version(x: Tensor) -> int | None:
    """``x``'s version counter; ``None`` for a tensor made under ``torch.inference_mode()`` (it keeps none, and
    only code under that mode, which cannot run a backward, can change it in place)."""
    try:
        return x._version
    except RuntimeError:
        return None


def _local_tag(x: Any, whole: bool) -> Any:
    """An object in a batch leaf: by its class and the class's own settings where its attributes were walked
    and are all of its state (:func:`plain_class`), else by identity."""
    kind = type(x)
    if whole and plain_class(kind) and (read := _methods_read(kind)) is not None:
        return (kind, _class_settings(kind), _stamp(kind), read)
    return Identity(x)


def _methods_read(kind: type) -> tuple | None:
    """:func:`_reads_of` the methods of a :func:`plain_class`, once per public call per class (a leaf of 64 configs
    walked them 64 times)."""
    return _scoped("methods read", kind, lambda: _reads_of(_OWN_METHODS.get(kind, ())))


#: An enum's special methods that make, show or copy a member, not what a model calls on one.
_NOT_CALLED = frozenset({"__new__", "__init__", "__init_subclass__", "__set_name__", "__repr__", "__str__",
                         "__format__", "__dir__", "__reduce__", "__reduce_ex__", "__hash__", "__copy__",
                         "__deepcopy__", "__class_getitem__", "_generate_next_value_", "_missing_"})


def _enum_methods_read(kind: type) -> tuple | None:
    """What the functions and property getters an ``Enum`` subclass defines itself read (:func:`_reads_of`), with
    their identities (a method patched in); ``None`` where one reads what a key cannot hold by value (then a
    member is its value alone, as :func:`is_value` keys it)."""
    def compute() -> tuple | None:
        methods: list[Callable] = []
        for c in kind.__mro__:
            if c.__module__ == "enum" or c is object or not c.__flags__ & _HEAP_TYPE:
                continue
            for name, v in vars(c).items():
                fn = _method_function(v)
                if fn is not None and fn.__module__ != "enum" and name not in _NOT_CALLED:  # (not Enum's own,
                    # copied in; a __call__ or __getitem__ of one's own is: a user's __call__ reading a dict, 0.55 off)
                    if not _reads_data_only(fn):
                        return None
                    methods.append(fn)
        read = _reads_of(tuple(methods))
        return None if read is None else (_stamp(kind), read)

    return _scoped("enum methods read", kind, compute)


def _reads_of(methods: tuple[Callable, ...]) -> tuple | None:
    """What the methods of a :func:`plain_class` read besides ``self`` (:func:`reads`: the data globals they name,
    their closures and defaults), walked as a batch leaf is; ``None`` where that walk does not see all of it (then
    the object's identity stands for it). A method answering from a module's dict changed with it (a config made anew
    per call kept the first checks, 0.57 off), without counting the method itself as state out of sight (a dataclass
    with a helper method, an ``argparse.Namespace`` made per call were checked again: 40-50 ms)."""
    if not methods:
        return ()
    depth = getattr(_READING, "depth", 0)
    if depth >= 2:  # (a method reading an object whose methods read another: far enough)
        return None
    _READING.depth = depth + 1
    try:
        budget, out = [LEAF_ARRAY_BYTES], []
        for m in methods:
            for obj in reads(m):
                seen, whole = leaf_walk(obj, LEAF_DEPTH, LEAF_BUDGET, lambda x: _local_atom(x, budget), _local_tag)
                if not whole:
                    return None
                out.append(seen)
        return tuple(out)
    finally:
        _READING.depth = depth


_READING = threading.local()


def _class_settings(kind: type, depth: int = 1) -> tuple:
    """A class's own settings (numbers, strings, enum members and other values, classes: a default an instance does
    not shadow), down its MRO. (A class holding other data is not a :func:`plain_class`.)"""
    return tuple((k, _class_key(v, depth - 1) if isinstance(v, type) else v) for c in kind.__mro__[:-1]
                 for k, v in vars(c).items() if not k.startswith("__") and _class_value(v))


def _class_key(kind: type, depth: int = 1) -> tuple:
    """A class as a key: itself, and its settings, methods and what they read where it is a :func:`plain_class`
    (``depth`` classes down)."""
    if depth >= 0 and plain_class(kind):
        return ("class", kind, _class_settings(kind, depth), _stamp(kind), _methods_read(kind))
    return ("class", kind, ())


def _class_value(v: Any, depth: int = 2) -> bool:
    """A class attribute that is a setting: a number, a string, another immutable value, a class (an activation
    chosen by a dataclass field's default, ``act: type = nn.Tanh``), or a tuple or frozenset of those (``betas:
    tuple = (0.9, 0.999)``)."""
    if type(v) in (tuple, frozenset):
        return depth > 0 and len(v) <= ITEMS and all(_class_value(x, depth - 1) for x in v)
    return issubclass(type(v), _SCALARS) or isinstance(v, type) or is_value(v)


def plain_class(kind: type) -> bool:
    """Whether an instance of ``kind`` keeps all its state in its attributes (its ``__dict__`` and slots) and what
    its methods read (:func:`_methods_read`), where a walk sees it: ``types.SimpleNamespace``, or a class written in
    Python, with no C base but ``object`` (a ``functools.partial``, a ``random.Random`` keep theirs out of sight),
    no computed attribute but a Python property's getter (a method too), no data on the class but values
    (:func:`_class_settings`: a dict or list there may change in place) and no ``__getattr__``/``__getattribute__``."""
    stamp = _stamp(kind)
    known = _PLAIN.get(kind)
    if known is None or known[0] != stamp:  # (a method patched onto the class since: decided again)
        if len(_PLAIN) > 1024:
            _PLAIN.clear()
            _OWN_METHODS.clear()
        methods: list[Callable] = []
        known = _PLAIN[kind] = (stamp, _plain_class(kind, methods))
        _OWN_METHODS[kind] = tuple(methods)
    return known[1]


def _stamp(kind: type) -> tuple:
    """:func:`_class_stamp`, once per public call per class."""
    return _scoped("class stamp", kind, lambda: _class_stamp(kind))


def _class_stamp(kind: type) -> tuple:
    """The functions, properties and other descriptors on a class down its MRO, by identity: a method replaced
    or added after a first call (``Cfg.mix = lambda self: 0.5``) is another key (it kept the first checks: 0.76
    off)."""
    try:
        return tuple((k, Identity(v)) for c in kind.__mro__[:-1] for k, v in vars(c).items()
                     if hasattr(type(v), "__get__") or isinstance(v, (staticmethod, classmethod)))
    except Exception:  # noqa: BLE001 - a class whose dict cannot be read: one stamp, as before
        return ()


#: A class -> (its :func:`_class_stamp` when decided, whether it is a :func:`plain_class`).
_PLAIN: dict[type, tuple[tuple, bool]] = {}
#: A :func:`plain_class`'s methods besides those a dataclass writes (:data:`_DATA_METHODS`), down its MRO.
_OWN_METHODS: dict[type, tuple[Callable, ...]] = {}


def _plain_class(kind: type, methods: list[Callable]) -> bool:
    if kind is types.SimpleNamespace:
        return True
    for c in kind.__mro__[:-1]:
        if not c.__flags__ & _HEAP_TYPE:
            return False
        for name, v in vars(c).items():
            if name in ("__dict__", "__weakref__") or isinstance(v, types.MemberDescriptorType):
                continue  # (the instance's own state: walked)
            if name in ("__getattr__", "__getattribute__"):
                return False  # attributes computed on access
            if isinstance(v, (types.FunctionType, staticmethod, classmethod)):
                if name not in _DATA_METHODS:  # what it reads is keyed (_methods_read)
                    fn = _method_function(v)
                    if fn is None or not _reads_data_only(fn):
                        return False
                    methods.append(fn)
                continue
            if type(v) in (property, functools.cached_property) and (getter := _method_function(v)) is not None:
                if not _reads_data_only(getter):  # a Python getter: a method read as an attribute
                    return False
                methods.append(getter)
                continue
            if name.startswith("__") and name.endswith("__") and not hasattr(type(v), "__get__"):
                continue  # the class's own bookkeeping (__module__, __doc__, __dataclass_fields__, ...)
            if isinstance(v, (types.WrapperDescriptorType, types.MethodDescriptorType, types.BuiltinFunctionType,
                              types.GetSetDescriptorType, property)) or hasattr(type(v), "__get__"):
                return False  # implemented in C, or computed on access
            if v is not None and not _class_value(v) and name != "_abc_impl":  # (abc's bookkeeping)
                return False  # data on the class that may change in place (a dict, a list, a class)
    return True


def _method_function(v: Any) -> types.FunctionType | None:
    """The Python function behind a class attribute: itself, a static or class method's, a property's getter (also
    ``functools.cached_property``'s and an enum's ``DynamicClassAttribute``'s); ``None`` for anything else."""
    if isinstance(v, (staticmethod, classmethod)):
        v = v.__func__
    elif isinstance(v, (property, functools.cached_property, types.DynamicClassAttribute)):
        v = getattr(v, "fget", getattr(v, "func", None))
    return v if isinstance(v, types.FunctionType) else None


def _reads_data_only(fn: types.FunctionType) -> bool:
    """Whether what ``fn`` reads besides its arguments is data a key can hold by value (:func:`_methods_read`): the
    globals it names (nested functions' too) and its closure cells are no class, function or module (a class used
    as a namespace of constants, a helper function the user rebinds, ``os.environ``: their state is out of sight),
    and the builtins it names are among :data:`_PLAIN_BUILTINS` (``globals()``, ``open`` are not)."""
    names: set[str] = set()
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"))
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for name in names:
        if name in fn.__globals__:
            if callable(fn.__globals__[name]) or isinstance(fn.__globals__[name], types.ModuleType):
                return False
        elif name not in _PLAIN_BUILTINS:
            return False
    cells = zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False)
    return not any(name != "__class__" and (callable(v := _contents(cell)) or isinstance(v, types.ModuleType))
                   for name, cell in cells)


#: Builtins a method may name and still be keyed by what it reads (they compute from their arguments alone).
_PLAIN_BUILTINS = frozenset({
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "format", "frozenset", "getattr", "hasattr",
    "hash", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "filter", "max", "min", "next", "pow",
    "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "super", "tuple", "type", "zip",
    "NotImplemented", "Ellipsis", "ValueError", "TypeError", "KeyError", "IndexError", "AttributeError",
    "RuntimeError", "NotImplementedError", "Exception"})


#: Methods whose reads are not keyed: those ``dataclasses`` writes (from the fields: construction, printing,
#: comparison, hashing, a frozen instance's guards, pickling a slotted one) and the class's typing hooks.
_DATA_METHODS = frozenset({"__init__", "__post_init__", "__repr__", "__eq__", "__ne__", "__hash__", "__lt__",
                           "__le__", "__gt__", "__ge__", "__setattr__", "__delattr__", "__getstate__",
                           "__setstate__", "__replace__", "__init_subclass__", "__class_getitem__", "__annotate__",
                           "__annotate_func__"})


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE


def leaf_walk(obj: Any, depth: int, budget: int, atom: Callable[[Any], Any],
              tag: Callable[[Any, bool], Any]) -> tuple[Any, bool]:
    """A non-tensor batch leaf as a nested tuple, and whether that is all of it: ``atom(x)`` where it gives one
    (not ``None``: numbers, tensors, arrays, modules), else the items of dicts, lists, tuples, sets and arrays
    of objects and ``tag(x, whole)`` with the attributes of other objects, ``depth`` levels down and ``budget``
    entries in all (``tag(x, False)`` alone beyond; ``whole``: its attributes were walked). A set's items are
    ordered by what the walk made of them (a default ``repr`` names an address: each process orders its own
    way). The batch signature's :func:`fingerprint` and :func:`ghostfunc._dist.described` differ only in
    ``atom`` and ``tag``."""
    left, whole = [budget], [True]

    def items_of(xs: Iterable[Any], size: int, d: int) -> tuple:
        if size > ITEMS:  # the first ITEMS only
            whole[0] = False
        items = list(itertools.islice(xs, ITEMS))
        out: list[Any] = [None] * len(items)
        # numbers and strings first: a flag listed after a long list is seen before that list spends the budget
        for first in (True, False):
            for i, v in enumerate(items):
                if issubclass(type(v), _SCALARS) is first:
                    out[i] = see(v, d - 1)
        return tuple(out)

    def see(x: Any, d: int) -> Any:
        left[0] -= 1
        if left[0] < 0:
            whole[0] = False
            return "..."
        if (seen := atom(x)) is not None:
            return seen
        kind = type(x)
        if d and issubclass(kind, (Mapping, list, tuple, set, frozenset)) and kind not in _CONTAINERS:
            whole[0] = False  # a subclass: what it holds besides its items (attributes, a hook) is not walked
        if d and issubclass(kind, Mapping):
            return ("mapping", tuple(zip(items_of(x.keys(), len(x), 1), items_of(x.values(), len(x), d),
                                         strict=True)))
        if d and issubclass(kind, (list, tuple)):
            return (kind.__name__, items_of(x, len(x), d))
        if d and issubclass(kind, (set, frozenset)):
            if len(x) > ITEMS:  # which items come first is each process's own hash order: the count only
                whole[0] = False
                return (kind.__name__, len(x))
            return (kind.__name__, tuple(sorted(items_of(x, len(x), d), key=repr)))
        if d and _is_array(x) and x.dtype.hasobject:  # an array of objects
            return ("array", x.shape, items_of(x.flat, x.size, d))
        if not plain_class(kind):  # its state is (partly) out of sight: its identity stands for it, and the leaf's
            whole[0] = False
        attrs = _attributes(x) if d else None
        if attrs is None:
            if not d:  # beyond the depth its identity stands for it, and for the leaf's (a new leaf holding it
                whole[0] = False  # changed in place kept the first checks)
            return tag(x, False)
        return (tag(x, True), tuple(zip(attrs, items_of(attrs.values(), len(attrs), d), strict=False)))

    return see(obj, depth), whole[0]


_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
#: How many items of one container :func:`state_of` looks at (a long list adds its length only beyond).
ITEMS = 256
#: NumPy arrays up to this many bytes are fingerprinted by a checksum of their contents (larger: identity,
#: address and shape only).
ARRAY_BYTES = 1 << 24
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_NOT_HOLDING = (Tensor, *_SCALARS)  # (what :func:`_modules_in` does not look into)


#: How deep :func:`state_of` walks containers and objects' attributes (a class weight in ``cfg["loss"]["w"]``).
WALK_DEPTH = 3
#: The most entries one :func:`state_of` looks at in all (past it, the walk stops: a marker says so).
WALK_BUDGET = 8192


def _state_of_values(found: list[Any]) -> tuple:
    """:func:`state_of` of the objects ``found`` (:func:`reads`: closure contents, defaults, named globals,
    bound arguments)."""
    out: list[Any] = []
    budget = [WALK_BUDGET, CHECKSUM_ELEMENTS]
    frozen: dict[str, Tensor] = {}

    def see(obj: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            if budget[0] == -1:
                out.append("(walk budget spent)")
            return
        if issubclass(type(obj), Tensor):
            out.append((Identity(obj), version(obj)))
            if (not obj.requires_grad and budget[1] >= obj.numel() and obj.layout is torch.strided
                    and not obj.is_meta and obj.dtype is not torch.bool and not obj.is_complex()):
                budget[1] -= obj.numel()  # also by a checksum (an EMA teacher's dict updated through .data, whose
                frozen[str(len(frozen))] = obj  # writes move no version: the secant kept a stale gradient, 0.16 off)
        elif issubclass(type(obj), _SCALARS):
            out.append(obj)
        elif _is_array(obj):
            out.append(_array_print(obj))
        elif issubclass(type(obj), torch.nn.Module):
            for m in obj.modules():  # every module's mode, tensors, and plain attributes (a temperature)
                out.extend((Identity(t), version(t)) for t in (*m._parameters.values(), *m._buffers.values())
                           if t is not None)
                # frozen tensors (the model's own values, not the params passed in) also by a checksum, taken
                # at the end: an edit through .data has a version counter of its own
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None and not t.requires_grad and budget[1] >= t.numel():
                        budget[1] -= t.numel()
                        frozen[str(len(frozen))] = t
                for k, v in vars(m).items():  # (a private one too: self._class_scale, a dict the loss reads)
                    if k not in _MODULE_OWN and not k.startswith("__") and not issubclass(type(v), torch.nn.Module):
                        out.append(k)
                        see(v, 1)
        elif depth and issubclass(type(obj), dict):
            out.append(len(obj))
            for k, v in itertools.islice(obj.items(), ITEMS):
                out.append(k if isinstance(k, (int, str)) else Identity(k))
                see(v, depth - 1)
        elif depth and issubclass(type(obj), (list, tuple)):
            out.append(len(obj))
            for v in itertools.islice(obj, ITEMS):
                see(v, depth - 1)
        elif depth and (attrs := _attributes(obj)) is not None:
            out.append(Identity(obj))  # an object's attributes (a bound method's object, a callable object, a module)
            see(attrs, depth)
            if not issubclass(type(obj), types.ModuleType):
                see(_class_data(type(obj)), depth)  # and its class's (a weight set on the class)
        else:
            out.append(Identity(obj))

    for obj in found:
        see(obj, WALK_DEPTH)
    if frozen:
        from ._dist import param_checksum  # (imports this module through _capture)

        out.append(tuple(param_checksum(frozen).values()))
    return tuple(out)


#: The most elements of frozen module tensors one :func:`state_of` checksums (:func:`ghostfunc._dist.param_checksum`;
#: a frozen base model beyond it is seen by identity and version only).
CHECKSUM_ELEMENTS = 1 << 26


def _class_data(cls: type) -> dict[str, Any]:
    """A class's own data attributes (tensors, numbers, strings, containers, arrays; not its methods)."""
    try:
        items = list(itertools.islice(vars(cls).items(), ITEMS))
    except Exception:  # noqa: BLE001 - an odd metaclass
        return {}
    return {k: v for k, v in items if not k.startswith("__")
            and (issubclass(type(v), (Tensor, dict, list, tuple, *_SCALARS)) or _is_array(v))}


def _attributes(obj: Any) -> dict[str, Any] | None:
    """``obj.__dict__``, or ``None`` when it has none or reading it raises (a ``__getattr__`` that raises something
    other than ``AttributeError``, a ``__getattribute__`` with side effects): looked at, never relied on."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:  # noqa: BLE001 - whatever an odd object raises, it has no attributes to walk here
        attrs = None
    try:
        slots = [n for c in type(obj).__mro__ for n in _slot_names(c)]
    except Exception:  # noqa: BLE001 - a class whose metaclass raises on a look (a lazy proxy, h59)
        slots = []
    if not slots:
        return attrs if type(attrs) is dict else None
    held = dict(attrs) if type(attrs) is dict else {}
    for name in slots[:ITEMS]:  # __slots__ objects keep their state outside __dict__
        try:
            held[name] = object.__getattribute__(obj, name)
        except Exception:  # noqa: BLE001 - an unset slot
            continue
    return held


def _slot_names(cls: type) -> list[str]:
    names = cls.__dict__.get("__slots__", ())
    return [names] if isinstance(names, str) else [n for n in names if isinstance(n, str)]


def _is_array(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "__array_interface__") and hasattr(obj, "nbytes")


def _array_print(arr: Any) -> tuple:
    """A NumPy array's identity, address and shape, and a checksum of its bytes when it is small enough."""
    head = (Identity(arr), arr.__array_interface__["data"][0], arr.shape, str(arr.dtype))
    if arr.nbytes > ARRAY_BYTES or arr.dtype.hasobject:
        return head
    return (*head, zlib.crc32(memoryview(arr.tobytes())))


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _check_batch(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str) -> bool:
    """The two checks on one batch (see :func:`check_model`); ``label`` names the batch in messages.

    Returns whether the result holds for every batch of this signature: ``False``
    after a batch of one sample (nothing to compare), ``True`` otherwise.
    """
    chosen = distinct_rows(batch.tensors, batch.size, ROWS)
    k = len(chosen)
    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []
    # the coarsest dtype any call computed in bounds the rounding (a float32 layer); dropout runs without drawing
    mode = _UsesAndDtypes(params, quiet=True)  # (one row would draw other masks than k rows: nothing to compare)

    rows = _rows_of(batch, chosen)

    watch = _Writes(model_fn)
    versions = {k: v._version for k, v in params.items()}  # shared with the caller's tensors (detach keeps it)
    with fork_rng(devices), torch.enable_grad(), eager_stance(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a batch statistic of one sample: the capture warns if it must
        before = _rng_states(devices)
        try:
            first = rows(0, k)
            with mode:  # the mode also runs the calls the capture replaces (EXACT), as the capture would
                together = model_fn(dict(params), first)
                shapes, mode.shapes = mode.shapes, []
                _remember_by_freq(model_fn, mode.by_freq)
                if isinstance(together, Tensor) and together.shape != (k,):  # e.g. a batch mean kept as [1]:
                    reduced = k > 1 and together.dim() <= 1 and together.numel() == 1
                    hint = " (a loss reduced over the batch? use reduction='none')" if reduced else ""
                    raise LossShapeError(  # one sample alone cannot show it
                        f"model_fn(params, batch) must return one loss per sample, a tensor of shape [B]; for "
                        f"{k} {label} samples it returned shape {tuple(together.shape)}{hint}")
                if not isinstance(together, Tensor):  # (None from a forgotten return: named before the unused
                    raise LossShapeError(  # params it also leaves, h60)
                        f"model_fn(params, batch) must return one loss per sample, a tensor of shape [B]; for "
                        f"{k} {label} samples it returned {type(together).__name__}")
                watch.after_first()
                random = mode.random or _drew(before, devices, host=False)
                # Python's or NumPy's generator drew (SpecAugment's masks, a NumPy augmentation): a sample alone
                # draws other numbers than in the batch, so each is compared in a batch of copies of itself that
                # starts from the batch's state (its row takes the same draws; below)
                host = _drew(before, devices, host=True)
                alone: list[Tensor] | None = None
                groups: list[tuple[list[int], Any, Tensor, Tensor, list[str], list[Any]]] = []  # _same_branch_groups
                branches = mode.branches
                if not random and not host and k > 1 and _per_sample_shape(together, k):
                    alone = []
                    for i in range(k):
                        mode.branches = []
                        alone.append(model_fn(dict(params), rows(i, i + 1)).reshape(-1))
                        # A model that branches on tensor values may take another branch for the batch than for
                        # a sample alone; the loop of single samples defines the answer (the capture splits the
                        # batch by branch), so only runs that took the same branches are compared.
                        if mode.branches != branches:
                            alone = None
                            break
                if alone is None and not random and not host and k > 1 and _per_sample_shape(together, k):
                    groups = _same_branch_groups(model_fn, params, batch, mode)
                if alone is None and watch.first_wrote():  # one run only: a second tells an update from a fill
                    model_fn(dict(params), rows(0, k))
        except (SamplesInteractError, InPlaceWriteError, StateWrittenError, LossShapeError):
            raise
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: the capture reports its own errors
            _refuse_param_writes(params, versions)
            return k > 1  # nothing to compare for this signature: not tried again
    _refuse_param_writes(params, versions)
    watch.refuse_moved()
    if k > 1 and not random and not host and not mode.quieted:  # (a model that draws: one row other masks than k,
        watch.refuse_batch_fill(lambda: model_fn(dict(params), rows(k - 1, k)), label, devices)  # whatever it fills)
    if not mode.used:
        raise ParamsUnusedError(
            f"no parameter reached the computation: model_fn(params, batch) ran without using any tensor of "
            f"params (names {list(params)[:6]}{'...' if len(params) > 6 else ''}), so every gradient would be 0. "
            f"model_fn must compute with the tensors it is given, e.g. torch.func.functional_call(net, params, "
            f"(x,)) instead of net(x), or p['w'] instead of a captured copy of the weight"
        )
    def copied(at: list[int], **how: Any) -> Tensor | None:  # (with a host draw, only copies that take the batch's
        return copies_losses(model_fn, params, _rows_batch(batch, chosen), at, branches if host else None,  # branches)
                             before[1], **how)

    if host and not random and k > 1 and _per_sample_shape(together, k):
        alone = None if (own := copied(list(range(k)))) is None else list(own.split(1))
    def compare(together: Tensor, alone: Tensor, named: list[int], part: Any, took: list[str], ran: list[Any],
                confirm: Callable[..., Tensor | None]) -> None:  # (rows ``named`` of the batch, ``part`` their batch)
        declared = coarsest([*params.values(), *batch.tensors, together])
        rounding = max(declared, mode.computed, key=lambda d: torch.finfo(d).eps)  # (float64 losses of a float32
        _compare_confirmed(together, alone, label, named, rounding, confirm, samples_named(named, label),  # model)
                           declared, fine_copies(model_fn, params, part, took, before[1], ran))

    try:
        if alone is not None:  # dropout-like draws differ batched and alone; one sample cannot interact
            compare(together.detach(), torch.cat(alone).detach(), chosen, _rows_batch(batch, chosen), branches,
                    shapes, copied)
        for group, part, group_together, group_alone, took, ran in groups:
            compare(group_together, group_alone, group, part, took, ran,
                    lambda at, part=part, **how: copies_losses(model_fn, params, part, at, None, before[1], **how))
    except SamplesInteractError:  # (or the model changed between the runs compared: said so instead, h85)
        if not random and not host:
            _refuse_changed(model_fn, params, lambda: rows(0, k), together.detach(), label, devices, mode)
        raise
    with _FastPathOutputs() as watched:  # (its run with gradients is the watched run the plain call is compared with)
        _refuse_detached(model_fn, params, lambda: rows(0, k))
    if watched.outputs and not host and not mode.renorms:  # (torch's draws: the same in both, outputs compared
        _refuse_other_path(model_fn, params, rows(0, k), label, chosen, devices, watched.outputs,  # where it drew
                           compare=not mode.random)  # none)
    return k > 1


#: How many runs of the checked rows in a row :func:`_refuse_changed` compares (a counter toggling the computation
#: with a period of 2 or 3 shows in 3).
RERUNS = 3


def _refuse_changed(model_fn: Callable, params: Mapping[str, Tensor], rows: Callable[[], Any], first: Tensor,
                    label: str, devices: list[int], mode: Any, runs: int = RERUNS, moved: list[str] | None = None,
                    grads: bool = True) -> None:
    """Raise :class:`StateWrittenError` if ``model_fn`` gives other losses for the checked rows (``rows()``), on up to
    ``runs`` runs in a row, than its first run did (``first``, run in ``mode``, as these: dropout without drawing) or
    than the run before: the model changed between the runs the interaction check compared (a counter its forward
    advances in a Python attribute that switches its computation after some calls, h85: taken for samples that
    interact, which names the wrong cause; one that toggles it every other call agreed on a single run again, h91).
    Naming the settings that moved (``moved``; else those since the call began)."""
    last = first
    for _ in range(runs):
        with fork_rng(devices), torch.set_grad_enabled(grads), eager_stance(), warnings.catch_warnings(), mode:
            warnings.simplefilter("ignore")  # (as the first run: with gradients on, h61)
            again = model_fn(dict(params), rows())
        if not isinstance(again, Tensor) or again.shape != first.shape or not first.is_floating_point():
            return
        again = again.detach().to(first.dtype)
        factor = 1e3 * torch.finfo(first.dtype).eps  # (the same computation again: a few ulps, not sqrt(eps))
        seen = next((s for s in (first, last) if bool(beyond_rounding(again, s, first.dtype, factor)[0].any())), None)
        if seen is None:
            last = again
            continue
        moved = moved_settings(model_fn) if moved is None else moved
        named = f" (it moved {_first_few(moved)})" if moved else ""
        raise StateWrittenError(
            f"model_fn(params, batch) gave other losses for the same {label} rows on a later run than on an earlier "
            f"one (largest difference {float((again - seen).abs().max()):.3g}), with the same params: the model "
            f"changes from one run to the next{named}, such as a counter its forward advances (self.calls += 1) "
            f"that switches its computation, or a schedule it steps. graddot runs model_fn several times per call (a "
            f"one-sample trace, these checks, the capture), so the runs would see different models. Keep such state "
            f"outside model_fn and set it between calls (a schedule stepped by the training loop is read on every "
            f"call)")


def moved_settings(model_fn: Callable, start: dict[Any, Any] | None = None) -> list[str]:
    """The names of :func:`module_settings` whose values differ now from ``start`` (:func:`settings_now` of an
    earlier moment), by default those read at the start of this public call (read again here, outside the call's
    memo)."""
    start = dict(module_settings(model_fn)) if start is None else start
    now = settings_now(model_fn)
    return list(dict.fromkeys(str(k[-1]) for k, v in now.items() if k in start and start[k] != v))


def settings_now(model_fn: Callable) -> dict[Any, Any]:
    """:func:`module_settings` read now, outside the public call's memo."""
    memo, _SCOPE.memo = _SCOPE.memo, None
    try:
        return dict(module_settings(model_fn))
    finally:
        _SCOPE.memo = memo


#: How many distinct samples :func:`_same_branch_groups` runs alone to find those that branch alike.
BRANCH_ROWS = 8


def _same_branch_groups(model_fn: Callable, params: Mapping[str, Tensor], batch: Any,
                        mode: _UsesAndDtypes) -> list[tuple[list[int], Any, Tensor, Tensor, list[str], list[Any]]]:
    """For a model whose batch takes other data-dependent branches than its samples alone (whose runs
    :func:`_check_batch` does not compare: each sample's own branch is the loop's answer): up to
    :data:`BRANCH_ROWS` distinct samples run alone, and each set of them that took the same branches alone run
    together, where it takes those branches too: ``(rows, their batch, losses together, losses alone, its branches,
    its calls' output shapes)`` to compare. A mixture of experts looping over the experts its tokens hit (Hugging Face
    Mixtral's eager experts) hits others for the batch than for a sample, and its load-balancing loss over the batch
    was scored silently (h77); rows that hit the same experts show it. Run inside ``mode``; nothing where fewer than
    two rows branch alike."""
    chosen = distinct_rows(batch.tensors, batch.size, BRANCH_ROWS)
    rows = _rows_of(batch, chosen)
    alone: list[Tensor] = []
    seen: dict[str, list[int]] = {}
    for i in range(len(chosen)):
        mode.branches = []
        out = model_fn(dict(params), rows(i, i + 1))
        if not _per_sample_shape(out, 1):
            return []
        alone.append(out.detach().reshape(-1))
        seen.setdefault(repr(mode.branches), []).append(i)
    out_groups = []
    for took, at in seen.items():
        if len(at) < 2:
            continue
        mode.branches, mode.shapes = [], []
        group = [chosen[i] for i in at]
        part = _rows_batch(batch, group)
        together = model_fn(dict(params), part.rebuild(part.tensors))
        if repr(mode.branches) != took or not _per_sample_shape(together, len(at)):
            continue  # (together, these rows branch otherwise too: nothing to compare)
        out_groups.append((group, part, together.detach(), torch.cat([alone[i] for i in at]), list(mode.branches),
                           list(mode.shapes)))
    return out_groups


class OtherPathError(ValueError):
    """``model_fn`` computes otherwise while ghostfunc intercepts its torch calls than in a plain call: PyTorch's
    fast paths, taken only where no ``__torch_function__`` mode is active."""


#: torch's modules whose forward takes a fused fast path only where no ``__torch_function__`` mode is active and no
#: gradient is needed: under every interception of ours they take their plain path. The fused kernels round
#: otherwise; ``nn.TransformerEncoder``'s nested-tensor path (eval mode, ``src_key_padding_mask``) gives zeros at the
#: padded positions, which the plain path does not.
FAST_PATHS = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder)


class _Recording(threading.local):
    sink: list[tuple[str, Tensor]] | None = None
    depth: int = 0


_RECORDING = _Recording()


class _FastPathOutputs:
    """While entered, the outputs of the outermost :data:`FAST_PATHS` modules this thread runs, in order (their first
    tensor), in ``outputs``: through torch's global module hooks, which reach every instance however the model holds
    it (a global, an object four attributes in: the walk of what ``model_fn`` reads missed those, h68) and which,
    unlike a hook on the module, leave its fast path on. Other threads' calls are not recorded."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, Tensor]] = []  # (the module's class name, its output)
        self.nested: str | None = None  # the class of a module given a nested tensor (the nested-tensor path taken)

    def __enter__(self) -> _FastPathOutputs:
        def pre(module: torch.nn.Module, args: Any) -> None:
            if _RECORDING.sink is self.outputs and isinstance(module, FAST_PATHS):
                _RECORDING.depth += 1
                if self.nested is None and any(isinstance(a, Tensor) and a.is_nested for a in args):
                    self.nested = type(module).__name__

        def post(module: torch.nn.Module, args: Any, out: Any) -> None:
            if _RECORDING.sink is self.outputs and isinstance(module, FAST_PATHS):
                _RECORDING.depth -= 1
                first = out[0] if isinstance(out, tuple) and out else out
                if _RECORDING.depth == 0 and isinstance(first, Tensor) and first.is_floating_point() and \
                        not first.is_nested:
                    self.outputs.append((type(module).__name__, first.detach()))

        self.before = _RECORDING.sink, _RECORDING.depth
        _RECORDING.sink, _RECORDING.depth = self.outputs, 0
        self.handles = (torch.nn.modules.module.register_module_forward_pre_hook(pre),
                        torch.nn.modules.module.register_module_forward_hook(post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        _RECORDING.sink, _RECORDING.depth = self.before


def _refuse_other_path(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str, chosen: list[int],
                       devices: list[int], watched: list[tuple[str, Tensor]], compare: bool = True) -> None:
    """Raise :class:`OtherPathError` if the outermost modules of :data:`FAST_PATHS` give other outputs in a plain call
    of ``batch`` (no mode of ours active, the parameters leaves that require grad, as in a training step; torch's
    random state as the watched run began) than ``watched``, theirs in the same call watched by a mode of ours
    (:class:`_FastPathOutputs`), beyond the rounding of those outputs (``sqrt(eps)`` of their largest entry). A frozen
    ``nn.TransformerEncoder`` in eval mode given ``src_key_padding_mask`` zeroes its padded positions in a plain call
    only: a loss pooling over them was scored 0.65 off the loop, its step 0.16 off torch's (h65). Judged on the
    modules' outputs, not the losses: a loss near 0 (a fitted regression, a distillation at its first step) moved by
    the fused kernels' rounding beyond the losses' own (h66). Not compared where the model draws from its own
    generator or NumPy's or Python's (the draws would differ), or renormalises its lookups' tables (torch writes those
    in place: the interceptions do not).

    Refused whatever the outputs where the plain call gives one of these modules a nested tensor (``compare=False``:
    this alone, for a model whose other modules draw): ``nn.TransformerEncoder``'s nested-tensor path, which zeroes
    the padded positions of every batch that has any, taken whether or not the checked rows are padded; compared on
    the checked rows alone, padding only in rows not checked, or only in a later call of the signature, was scored
    0.54-0.63 off the loop (h73)."""
    if not torch.backends.mha.get_fastpath_enabled():
        return
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    try:
        with fork_rng(devices), torch.enable_grad(), eager_stance(), warnings.catch_warnings(), \
                _FastPathOutputs() as plain:
            warnings.simplefilter("ignore")
            model_fn(leaves, batch)
    except Exception:  # noqa: BLE001 - the capture reports the model's own errors
        return
    if plain.nested is not None:
        raise OtherPathError(
            f"model_fn's TransformerEncoder gives other outputs for every sample with padding in a plain call than "
            f"while ghostfunc intercepts its torch calls: there it runs PyTorch's nested-tensor path (its "
            f"{plain.nested} is given a nested tensor: a frozen encoder in eval mode given src_key_padding_mask), "
            f"whose padded positions come out as zeros (refused whether or not this batch has padding: the path is "
            f"taken for any src_key_padding_mask, and a later batch's padding would be zeroed unseen). "
            + _FAST_PATH_FIX)
    for (kind, a), (_, b) in zip(plain.outputs, watched if compare else [], strict=False):
        if a.shape != b.shape:
            gap: Any = f"shape {tuple(a.shape)} against {tuple(b.shape)}"
        else:
            mask, _, _ = beyond_rounding(a.flatten(), b.flatten(), a.dtype)
            if not bool(mask.any()):
                continue
            gap = f"{(a.double() - b.double()).abs().max().item():.3g}"
        raise OtherPathError(
            f"model_fn's {kind} gives other outputs for {samples_named(chosen, label)} in a plain call than while "
            f"ghostfunc intercepts its torch calls (largest difference {gap}, beyond rounding). " + _FAST_PATH_FIX)


_FAST_PATH_FIX = (
    "PyTorch takes its fast paths only where no __torch_function__ mode is active and no gradient is needed, and "
    "ghostfunc, which must see every call, cannot take them. Turn them off for your model too: "
    "torch.backends.mha.set_fastpath_enabled(False), or nn.TransformerEncoder(..., enable_nested_tensor=False)")


#: How many samples :func:`refuse_coupled_draws` runs alone.
WHOLE_ROWS = 16


def refuse_coupled_draws(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str, where: str,
                         groups: Sequence[list[int]] | None = None) -> None:
    """Raise :class:`SamplesInteractError` if, dropout run without drawing and other torch draws fixed
    (:class:`_Uses` ``quiet``), the losses of the whole batch differ from those of up to :data:`WHOLE_ROWS` of its
    samples run alone (confirmed as :func:`refuse_batch_losses` does): for a model whose losses under the capture
    differ from a plain call's whichever way it draws (:func:`ghostfunc._graddot.as_plain_draws`), this tells a
    coupling of the batch (a loss normalised by the whole batch's token count, which the few rows
    :func:`check_model` compares may not show) from masks drawn another way. ``groups``: the rows of each group of a
    batch split at data-dependent branches (each sample its own branch: the whole batch may take another), compared
    group by group instead. Where the model draws from NumPy's or Python's generator, each sample's copies start
    from the batch's state (:func:`copies_losses`). Nothing is said where the model draws from ``nn.init`` or a
    call given a generator that is not a random op, branches otherwise alone than together, or cannot run so."""
    if groups is None:
        _refuse_coupled_rows(model_fn, params, batch, label, where, None)
        return
    for rows in groups:
        if len(rows) > 1:
            _refuse_coupled_rows(model_fn, params, _rows_batch(batch, rows), label, where, rows)


def _refuse_coupled_rows(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str, where: str,
                         rows_in: list[int] | None) -> None:
    """:func:`refuse_coupled_draws` of one batch, or of one group of a split batch (``rows_in``: its rows there)."""
    chosen = distinct_rows(batch.tensors, batch.size, WHOLE_ROWS)
    if batch.size < 2 or len(chosen) < 1:
        return
    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []
    mode = _UsesAndDtypes(params, quiet=True)
    rows = _rows_of(batch, chosen)
    with fork_rng(devices), torch.enable_grad(), eager_stance(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _rng_states(devices)
        alone: Tensor | None = None
        try:
            whole = batch.rebuild(list(batch.tensors))
            with mode:
                together = model_fn(dict(params), whole)
                branches, shapes, mode.shapes = mode.branches, mode.shapes, []
                host = _drew(before, devices, host=True)
                if not host:
                    each = []
                    for i in range(len(chosen)):
                        mode.branches = []
                        each.append(model_fn(dict(params), rows(i, i + 1)).reshape(-1))
                        if mode.branches != branches:
                            return
                    alone = torch.cat(each)
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: the capture reports its own errors
            return
        if mode.random or _drew(before, devices, host=False):
            return
    if not isinstance(together, Tensor) or together.shape != (batch.size,):
        return
    if alone is None:  # (NumPy's or Python's generator drew: each sample's copies take its row's draws)
        alone = copies_losses(model_fn, params, batch, chosen, branches, before[1])
        if alone is None:
            return
    picked = together.detach()[torch.tensor(chosen, device=together.device)]
    named = chosen if rows_in is None else [rows_in[i] for i in chosen]
    which = None if rows_in is None else group_named(rows_in, label)
    refuse_batch_losses(picked, alone.detach(), label, mode.computed, where,
                        lambda at, **how: copies_losses(model_fn, params, batch,
                                                        [i if rows_in is None else rows_in.index(i) for i in at],
                                                        branches, before[1], **how),
                        named, batch.size if rows_in is None else None, which,
                        declared=coarsest([*params.values(), *batch.tensors]),
                        fine_confirm=fine_copies(model_fn, params, batch, branches, before[1], shapes, rows_in))


#: How many of the samples that differ :func:`refuse_batch_losses` runs again, each in a batch of copies of itself.
CONFIRM_ROWS = 4


def copies_losses(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, rows: list[int],
                  branches: list[str] | None = None, host: tuple[Any, ...] | None = None,
                  ran: list[list[Any]] | None = None, times: int = 1, wide: bool = False,
                  took: list[list[str]] | None = None) -> Tensor | None:
    """The loss of each sample ``rows[j]`` run plainly in a batch of the batch's shapes holding copies of it, taken
    at its own row: that sample's loss without the others, by the same kernels as the whole batch's (a batch of
    one rounds otherwise: a regression's small losses of outputs near 1000 differed by 5-7x ``sqrt(eps)`` between
    a batch of 32 and each row alone). Run as a plain step runs (gradients on, the parameters leaves that require
    them), dropout drawing nothing and other torch draws fixed (:class:`_Uses` ``quiet``), the random state kept;
    ``None`` where it draws other random numbers or cannot run so, or, with ``branches`` (what the batch's tensors
    became in Python in the run compared with), takes other branches. ``host``: Python's and NumPy's generator
    states the compared run started from (:func:`ghostfunc._draws.host_states`): each run starts there too, so the
    row takes the same draws from them as in that run (a NumPy augmentation per row). ``ran``, if given, gets each
    run's calls' output shapes and dtypes (:func:`fine_copies`). ``times``: a batch that many times the batch's
    size, ``wide``: the parameters and the batch's floating tensors in float64 (:func:`_compare_confirmed`: a loss
    that depends on the batch's size); ``None`` then where Python's or NumPy's generator draws (a bigger batch draws
    other numbers for the row), the model cannot run in float64, or some call still computed narrower. ``took``, if
    given, gets each run's data-dependent branches."""
    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []

    def widened(t: Tensor) -> Tensor:
        return t.double() if wide and t.is_floating_point() else t

    leaves = {k: widened(v.detach()).requires_grad_(v.is_floating_point() or v.is_complex()) for k, v in params.items()}
    mode = (_Widened if wide else _UsesAndDtypes)(leaves, quiet=True)
    own: list[Tensor] = []
    with fork_rng(devices), torch.enable_grad(), eager_stance(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _rng_states(devices)
        try:
            for i in rows:  # (the copies built outside the mode: a float32 batch's slice is no float32 computation,
                copies = batch.rebuild([widened(t[i:i + 1].expand(times * t.shape[0], *t.shape[1:]).contiguous())
                                        for t in batch.tensors])  # and widened, every float32 model was skipped, h84)
                mode.branches = []
                if host is not None:
                    set_host_states(host)
                start = host_states() if times != 1 or wide else None
                mode.shapes = []
                with mode:
                    out = model_fn(dict(leaves), copies)
                    if start is not None and not same_host_states(start, host_states()):
                        return None  # (a host draw: a bigger batch draws other numbers for the row)
                    if branches is not None and mode.branches != branches:
                        return None
                    if took is not None:
                        took.append(list(mode.branches))
                    if ran is not None:
                        ran.append(list(mode.shapes))  # (the mode goes on adding to its list)
                    own.append(out.reshape(-1)[i:i + 1].detach())
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: nothing to confirm with
            return None
        if mode.random or _drew(before, devices, host=False if host is not None else None):
            return None
        if wide and mode.computed != torch.float64:  # (something the widening does not reach ran narrower)
            return None
    return torch.cat(own)


def fine_copies(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, branches: list[str],
                host: tuple[Any, ...] | None, shapes: list[Any],
                rows_in: list[int] | None = None) -> Callable[[list[int]], Any]:
    """The finer comparison's confirmation (:func:`_compare_confirmed`): ``rows -> (losses, dtype) | None``, each of
    ``rows`` run in a batch of copies of itself that takes the batch's data-dependent ``branches``
    (:func:`copies_losses`), with the coarsest floating dtype of the calls whose output shapes differ from the
    batch's run (``shapes``; ``None``: none differs). Where the rows' lengths set a kernel's shape (tokens packed with
    ``x[mask]``, a packed sequence's steps, a mixture of experts' tokens per expert) copies run other shapes, and
    MKL rounds a row otherwise at another row count (1e-4 of a small float32 loss: valid regressors were refused,
    h58): the comparison then allows that dtype's ``sqrt(eps)``. ``rows_in``: where ``batch`` is some rows of a
    larger one, those rows (``rows`` are named as there)."""
    def confirm(rows: list[int]) -> tuple[Tensor, torch.dtype | None] | None:
        ran: list[list[Any]] = []
        at = rows if rows_in is None else [rows_in.index(i) for i in rows]
        own = copies_losses(model_fn, params, batch, at, branches, host, ran)
        return None if own is None else (own, _shaped_otherwise(shapes, ran))

    return confirm


def _shaped_otherwise(shapes: list[Any], runs: list[list[Any]]) -> torch.dtype | None:
    """The coarsest floating dtype among the calls whose output shapes in ``runs`` differ from ``shapes`` (each
    entry a ``(shape, dtype)`` or a tuple of them); where the calls differ in number, among all of them."""
    def dtypes(entry: Any) -> list[torch.dtype]:
        pairs = [entry] if len(entry) == 2 and isinstance(entry[1], torch.dtype) else entry  # (a tensor's, or a tuple's)
        return [d for _, d in pairs if d.is_floating_point]

    found: list[torch.dtype] = []
    for run in runs:
        if len(run) != len(shapes):  # (calls in another number: a loop over the experts a batch's tokens hit) the
            # calls of either run the other lacks, counted as many times as they ran (Qwen2-MoE's float32 router ran
            # alike, its float64 experts did not; all of them counted, the fine comparison gave up at float32's
            # sqrt(eps) and its load-balancing loss over the batch went unseen, h77)
            ours, theirs = collections.Counter(map(repr, shapes)), collections.Counter(map(repr, run))
            odd = (ours - theirs) + (theirs - ours)
            found += [d for entry in (*shapes, *run) if odd[repr(entry)] for d in dtypes(entry)]
            continue
        found += [d for a, b in zip(shapes, run, strict=True) if a != b for d in (*dtypes(a), *dtypes(b))]
    return max(found, key=lambda d: torch.finfo(d).eps, default=None)


def refuse_batch_losses(together: Tensor, captured: Tensor, label: str, computed: torch.dtype, where: str,
                        confirm: Callable[..., Tensor | None], chosen: list[int] | None = None,
                        size: int | None = None, which: str | None = None,
                        declared: torch.dtype | None = None,
                        fine_confirm: Callable[[list[int]], Any] | None = None) -> None:
    """Raise :class:`SamplesInteractError` (prefixed with ``where``) if a whole batch's losses from a plain call
    (``together``, at the batch's rows ``chosen``, all of them by default, of ``size``) differ beyond rounding
    from each sample's own: first against ``captured`` (the capture's, or each run alone), then, where those
    differ, against up to :data:`CONFIRM_ROWS` of those samples each in a batch of copies of itself
    (``confirm(rows)``, :func:`copies_losses`; ``None``: they cannot run so), at ``sqrt(eps)``, and then at
    :func:`fine_rounding` on copies that take the batch's data-dependent branches (``fine_confirm``,
    :func:`fine_copies`; none: not; :func:`_compare_confirmed`). ``computed``: the
    coarsest floating dtype the plain call computed in; ``declared``: the parameters', inputs' and losses'
    (the losses' unless told); ``which``: what ran together, for the message (the whole batch)."""
    if not isinstance(together, Tensor) or together.shape != captured.shape or together.dim() != 1:
        return
    chosen = list(range(len(captured))) if chosen is None else chosen
    declared = max(coarsest([together, captured]), declared or torch.float64, key=lambda d: torch.finfo(d).eps)
    rounding = max(declared, computed, key=lambda d: torch.finfo(d).eps)
    try:
        _compare_confirmed(together.detach().to(captured.dtype), captured.detach(), label, chosen, rounding,
                           lambda at, **how: confirm([chosen[j] for j in at], **how),
                           which or f"the whole {label} batch ({size or len(captured)} samples)",
                           declared, None if fine_confirm is None else lambda at: fine_confirm([chosen[j] for j in at]),
                           each_alone=False)
    except SamplesInteractError as err:
        raise SamplesInteractError(f"{where}: {err}") from None


def _compare_confirmed(together: Tensor, alone: Tensor, label: str, chosen: list[int], rounding: torch.dtype,
                       confirm: Callable[..., Tensor | None], which: str,
                       declared: torch.dtype | None = None, fine_confirm: Callable[[list[int]], Any] | None = None,
                       each_alone: bool = True) -> None:
    """:func:`_compare` of ``k`` samples run together and each alone, where they differ beyond rounding first
    confirmed on up to :data:`CONFIRM_ROWS` of them each in a batch of ``k`` copies of itself (``confirm(at)``,
    ``at`` indexing ``together``; :func:`copies_losses`, taking the batch's data-dependent branches): a batch of
    three and a batch of one round otherwise (a float32 regressor's losses near 1e-6 of outputs near 1000 differed
    by 30x ``sqrt(eps)`` of the three rows' largest loss), copies take the same kernels as the batch. Where they
    cannot run, the difference stands where ``alone`` are runs of each sample alone (``each_alone``; not where they
    are the capture's). ``which``: the samples run together, for the message (``chosen``: those of them compared).

    Then, where no difference passed ``sqrt(eps)``, the same at :func:`fine_rounding` of ``declared`` (the
    parameters', inputs' and losses' coarsest dtype) and ``rounding``, only where copies run taking the batch's branches (``fine_confirm``, :func:`fine_copies`; raised to ``sqrt(eps)``
    of the coarsest dtype whose calls ran other shapes there): a row and its copies take the same kernels, so a sample's loss in the batch and in its
    copies' batch differ by what its neighbours change (a coupling under ``sqrt(eps)`` of a float32 router inside a
    float64 model: OLMoE's load-balancing loss at its default weight, 5e-5 of the loss, its gradient 3.5e-3 off
    the batch's, h55), not by a batch of one's rounding."""
    differ, _, _ = beyond_rounding(together, alone, rounding)
    scale = _largest_finite(together, alone)  # (the confirmation allows what the detection allowed)
    factor: float | None = None
    if not bool(differ.any()):
        fine = None if declared is None else fine_rounding(declared, rounding)
        if fine is None or fine_confirm is None:
            return
        differ, _, _ = beyond_rounding(together, alone, rounding, fine)
        if not bool(differ.any()):
            return
        at = differ.nonzero().flatten().tolist()[:CONFIRM_ROWS]
        got = fine_confirm(at)
        if got is None:
            return
        own, otherwise = got
        factor = fine if otherwise is None else max(fine, torch.finfo(otherwise).eps ** 0.5)
        if factor >= torch.finfo(rounding).eps ** 0.5:
            return
    else:
        at = differ.nonzero().flatten().tolist()[:CONFIRM_ROWS]
        own = confirm(at)
    if own is None or own.shape != (len(at),):
        if each_alone and factor is None:
            _compare(together, alone, label, chosen, rounding, which=which)
        return
    named = [chosen[j] for j in at]
    _compare(together[torch.tensor(at, device=together.device)], own.to(alone.dtype), label, named,
             rounding, which=which, how="each of these samples run in a batch of copies of itself (as if alone)",
             factor=factor, scale=scale)
    if factor is None:  # copies agree with the batch, each alone does not: the batch's size, or its rounding? Copies
        # in batches of twice and four times its size tell, both in float64 and of 4 rows or more, which CPU matrix
        # products round alike (3 and 6 rows did not: a float64 regressor's small losses of outputs near 1000 were
        # refused, h81): a loss divided by the batch's size, or a mixture of experts' capacity counted over the
        # batch's tokens (its router sending every token to one expert: the copies drop the batch's tokens), was
        # taken for a batch of one's rounding and scored silently (h77). Nothing is said where anything in those runs
        # computed in a narrower dtype (a frozen float32 base the parameters do not reach: 3.05e-7 of a 1e-4 loss)
        took_once: list[list[str]] = []
        took_twice: list[list[str]] = []
        once, twice = confirm(at, times=2, wide=True, took=took_once), confirm(at, times=4, wide=True, took=took_twice)
        if once is not None and twice is not None and once.shape == twice.shape == own.shape and \
                took_once == took_twice:  # (a branch on a statistic of the batch taken otherwise: nothing to compare)
            _compare(once, twice, label, named, torch.float64, which=which,
                     how="each of these samples in batches of two and four times as many copies of itself: its loss depends on "
                         "the batch's size, not on its own rows alone (a loss divided by the batch size, a "
                         "capacity counted over the batch's tokens)",
                     kinds=("in a batch of twice its size", "in four times its size"))


#: :func:`fine_rounding`'s allowance for the coarsest dtype computed in, in its ``eps``: a row and its copies run
#: the same kernels (bitwise the same on a CPU), this leaves room for a device's order of accumulation.
FINE_ULPS = 16


def fine_rounding(declared: torch.dtype, rounding: torch.dtype) -> float | None:
    """The relative tolerance of a sample's loss in its batch against its copies' batch (:func:`_compare_confirmed`):
    ``eps ** (2/3)`` of ``declared`` (the parameters', inputs' and losses' coarsest dtype: the accuracy the numbers
    promise, as the whole-batch verdict allows, :data:`ghostfunc._whole.VERDICT_POWER`) or :data:`FINE_ULPS`
    ``eps`` of ``rounding`` (the coarsest anything computed in), the larger; ``None`` where that is no finer than
    ``sqrt(eps)`` of ``rounding`` (16-bit floats)."""
    fine = max(torch.finfo(declared).eps ** (2 / 3), FINE_ULPS * torch.finfo(rounding).eps)
    return fine if fine < torch.finfo(rounding).eps ** 0.5 else None


def _rows_batch(batch: Any, chosen: list[int]) -> Any:
    """The :class:`ghostfunc._capture.Batch` of the samples ``chosen``."""
    at = torch.tensor(chosen)
    return batch._replace(tensors=[t[at.to(t.device)].contiguous() for t in batch.tensors], size=len(chosen))


def _rows_of(batch: Any, chosen: list[int]) -> Callable[[int, int], Any]:
    """``rows(lo, hi)``: the batch of the samples ``chosen[lo:hi]`` (a :class:`ghostfunc._capture.Batch`'s rows)."""
    def rows(lo: int, hi: int) -> Any:
        part = _rows_batch(batch, chosen[lo:hi])
        return part.rebuild(part.tensors)

    return rows


def samples_named(chosen: list[int], label: str) -> str:
    """The samples ``chosen`` of the ``label`` batch, for a message: "the first 3 train samples", or "3 distinct ..."
    with their rows."""
    k = len(chosen)
    return (f"the first {k} {label} samples" if chosen == list(range(k))
            else f"{k} distinct {label} samples (rows {', '.join(map(str, chosen))})")


def group_named(rows: list[int], label: str) -> str:
    """A group of a batch split at data-dependent branches, for a message."""
    return (f"a group of {len(rows)} {label} samples that take the same data-dependent branches "
            f"(rows {rows[:6]}{'...' if len(rows) > 6 else ''})")


#: As :data:`_CHECKED`, for :func:`check_batch_gradient`.
_GRAD_CHECKED: ByModel[Any, dict[tuple, frozenset[str]]] = ByModel()


def check_batch_gradient(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, where: str) -> None:
    """Raise :class:`SamplesInteractError` if the gradient of a batch's mean loss is not the mean of its
    samples' own gradients: samples that interact in the backward only (the losses, which :func:`check_model`
    compares, agree), through a gradient hook that reduces over the batch, a custom ``autograd.Function``
    whose backward mixes rows or is not linear in its incoming gradient (a clamp), an embedding's
    ``scale_grad_by_freq``.

    ``train_step`` steps with the mean of the samples' gradients (the values are theirs); ``torch.optim`` with
    the batch's. Checked once per ``model_fn``, parameter shapes, training flags and batch signature (and again once
    a parameter that was zero everywhere then has moved), on up to
    :data:`ROWS` distinct rows of ``batch`` (a :class:`ghostfunc._capture.Batch`): their mean loss's gradient
    (times their number) against the sum of each row's own, in a run with gradients on and random draws undone.
    Rounding:
    ``sqrt(eps)`` of the coarsest dtype (of the parameters, the inputs and what any call computed in: autocast)
    times the largest entry of any gradient compared (a row's own, the batch's, the sum). Dropout runs without
    drawing and other random calls fixed (:func:`_mean_grads`); a model that draws otherwise
    (``nn.init`` in its forward), branches otherwise on one row than on several, or runs only under ``vmap`` is
    not compared.
    """
    key = (param_signature(params), behaviour(model_fn), batch.signature)
    try:
        seen = _GRAD_CHECKED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: check every call
        seen = {}
    if key in seen and still_zero(params, seen[key]):
        return
    chosen = distinct_rows(batch.tensors, batch.size, ROWS)
    k = len(chosen)
    if k < 2:
        return  # nothing to compare: a later call of this signature tries again

    rows = _rows_of(batch, chosen)

    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with fork_rng(devices), torch.enable_grad(), eager_stance(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            before = _rng_states(devices)
            together, branches, random, computed = _mean_grads(model_fn, params, rows(0, k))
            scale = 0.0  # the largest entry of any gradient compared: a row's own, the batch's or their sum
            if random or _drew(before, devices):
                together = None
            summed: dict[str, Tensor] = {}  # the samples' own gradients, summed as they come (two copies held)
            for i in range(k if together is not None else 0):
                own, own_branches, _, own_dtype = _mean_grads(model_fn, params, rows(i, i + 1))
                if own is None or own_branches != branches:
                    together = None
                    break
                for name, g in own.items():  # a row's gradients may share storage: the first is copied
                    summed[name] = summed[name].add_(g) if name in summed else g.clone()
                    scale = max(scale, g.abs().max().item() if g.numel() else 0.0)
                computed = max(computed, own_dtype, key=lambda d: torch.finfo(d).eps)
        except (SamplesInteractError, StateWrittenError):
            raise
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: the capture reports its own errors
            together = None
    zeros = zero_params(params)  # (the verdict, kept below unless the batch is refused: made again, it ran on)
    if together is None:
        remember(seen, key, zeros)
        return
    together = {n: g * k for n, g in together.items()}  # the mean's gradient, on the scale of the rows' sum
    rounding = max(coarsest([*params.values(), *batch.tensors]), computed, key=lambda d: torch.finfo(d).eps)
    scale = max([scale, *(max(g.abs().max().item(), summed[n].abs().max().item()) for n, g in together.items()
                          if g.numel())])
    worst, gap, tol = _largest_gap(together, summed, rounding, scale)
    if worst is None:
        remember(seen, key, zeros)
        return
    which = samples_named(chosen, "training")
    raise SamplesInteractError(
        f"{where}: samples interact in model_fn's backward: on {which}, the gradient of their mean loss differs "
        f"from the mean of each sample's own gradient (params[{worst!r}]: largest difference {gap:.3g} "
        f"on the scale of their sum, "
        f"rounding allows {tol:.3g}; their losses agree together and alone). torch.optim would step with the "
        f"batch's gradient, this step with the mean of the samples' own gradients (the ones the values are of), "
        f"so the trajectory would leave torch.optim's. Usual causes: a gradient hook that normalises or clips over "
        f"the batch (register_hook), a custom autograd.Function whose backward mixes rows or is not linear in the "
        f"gradient it gets (a clamp: the batch mean's 1/B reaches it, a sample's own gradient does not), an "
        f"embedding with scale_grad_by_freq=True. graddot and inrun_shapley give the per-sample numbers as they are"
    )


def _largest_gap(a: Mapping[str, Tensor], b: Mapping[str, Tensor], rounding: torch.dtype,
                 scale: float) -> tuple[str | None, float, float]:
    """The parameter where gradients ``a`` and ``b`` differ most beyond ``sqrt(eps)`` of ``rounding`` times ``scale``
    (``None``: nowhere), that difference, and the allowance."""
    tol = torch.finfo(rounding).eps ** 0.5 * scale + torch.finfo(rounding).tiny
    diffs = {k: (g - b[k].to(g.dtype)).abs().max().item() for k, g in a.items() if g.numel()}
    worst = max(diffs, key=lambda k: diffs[k], default=None)
    if worst is None or not diffs[worst] > tol:
        return None, 0.0, tol
    return worst, diffs[worst], tol


#: As :data:`_GRAD_CHECKED`, for :func:`check_step_gradient`.
_STEP_CHECKED: ByModel[Any, dict[tuple, frozenset[str]]] = ByModel()


def check_step_gradient(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, train_grad: Mapping[str, Tensor],
                        where: str) -> None:
    """Raise :class:`SamplesInteractError` if ``train_grad`` (the mean of every training row's own gradient, which a
    step takes) is not the gradient of the whole batch's mean loss (what ``torch.optim`` takes): a coupling that
    the few rows :func:`check_model` and :func:`check_batch_gradient` compare cannot show (a loss normalised by the
    whole batch's token count, where those rows hold as many tokens as each other: the step left torch.optim's
    trajectory by 0.30). One backward of the batch, on the first step of each signature (and again once a
    parameter that was zero everywhere has moved); a model that draws random numbers is not compared."""
    key = (param_signature(params), behaviour(model_fn), batch.signature, batch.size)
    try:
        seen = _STEP_CHECKED.setdefault(model_fn, {})
    except TypeError:
        seen = {}
    if key in seen and still_zero(params, seen[key]):
        return
    zeros = zero_params(params)  # (kept as the verdict only once the batch passed: a refused call, made again,
    if batch.size < 2:  # ran on)
        remember(seen, key, zeros)
        return
    from ._capture import checkpoints_as_plain  # it builds on this module

    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []
    mode = _UsesAndDtypes(params)
    with fork_rng(devices), torch.enable_grad(), eager_stance(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _rng_states(devices)
        try:  # (checkpointed segments as plain calls: recomputed in the backward, they ran with the module's own
            with checkpoints_as_plain(), mode:  # weights, and a step whose parameters had moved was refused, h49)
                losses = model_fn(dict(leaves), batch.rebuild(list(batch.tensors)))
            if mode.random or _drew(before, devices):
                remember(seen, key, zeros)
                return
            grads = torch.autograd.grad(losses.mean(), list(leaves.values()), allow_unused=True, retain_graph=True)
            # the samples' own gradients' size, which the mean's rounding follows (near an optimum they cancel in
            # the mean): |Σ r_i g_i| / n for random signs r is about their size / sqrt(n)
            signs = torch.randint(0, 2, (batch.size,), generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
            spread = torch.autograd.grad((losses * signs.to(losses)).mean(), list(leaves.values()), allow_unused=True)
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: nothing to compare
            remember(seen, key, zeros)
            return
    plain = {k: torch.zeros_like(v) if g is None else g.to_dense() if g.is_sparse else g
             for (k, v), g in zip(leaves.items(), grads, strict=True)}
    rounding = max(coarsest([*params.values(), *batch.tensors]), mode.computed, key=lambda d: torch.finfo(d).eps)
    own = max([0.0, *((g.to_dense() if g.is_sparse else g).abs().max().item() for g in spread
                      if g is not None and g.numel())]) * batch.size ** 0.5  # (a sparse embedding's: densified)
    scale = max([own, *(max(g.abs().max().item(), train_grad[k].abs().max().item())
                        for k, g in plain.items() if g.numel())])
    worst, gap, tol = _largest_gap(plain, train_grad, rounding, scale)
    if worst is None:
        remember(seen, key, zeros)
        return
    raise SamplesInteractError(
        f"{where}: samples interact in model_fn: over the whole training batch ({batch.size} samples), the gradient "
        f"of the mean loss differs from the mean of each sample's own gradient (params[{worst!r}]: largest "
        f"difference {gap:.3g}, rounding allows {tol:.3g}), though the few samples compared one by one "
        f"agreed. torch.optim would step with the batch's gradient, this step with the mean of the samples' own, so "
        f"the trajectory would leave torch.optim's. Usual cause: a loss normalised by a count over the whole batch "
        f"(Hugging Face's num_items_in_batch, the batch's non-ignored tokens): normalise each sample by its own "
        f"count. graddot and inrun_shapley give the per-sample numbers as they are")


class _UsesAndDtypes(_Uses):
    """:class:`_Uses`, also noting the coarsest floating dtype any call computed in (autocast, a cast inside the
    model: the backward rounds in it too)."""

    def __init__(self, params: Mapping[str, Tensor], quiet: bool = False) -> None:
        super().__init__(params, quiet)
        self.computed = torch.float64
        self.shapes: list[Any] = []  # each call's output shapes and dtypes, in order (:func:`fine_copies`)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = super().__torch_function__(func, types, args, kwargs)
        moves = getattr(func, "__name__", None) in _MOVES  # (rounds nothing, whatever its shape: not noted)
        if isinstance(out, Tensor):
            if not moves:
                self.shapes.append((out.shape, out.dtype))
            if out.is_floating_point() and torch.finfo(out.dtype).eps > torch.finfo(self.computed).eps:
                self.computed = out.dtype
        elif isinstance(out, tuple) and not moves:
            self.shapes.append(tuple((o.shape, o.dtype) for o in out if isinstance(o, Tensor)))
        return out


class _Widened(_UsesAndDtypes):
    """:class:`_UsesAndDtypes` for the batch-size comparison's float64 runs (:func:`copies_losses` ``wide``): a cast
    to a narrower floating dtype (``logits.float()``, ``.to(torch.float32)``, as Hugging Face's losses cast; a mask's
    ``.float()``) makes float64 instead, and a floating tensor a factory makes in the default dtype
    (``torch.tensor(float(B))``, ``torch.ones(B)``) is made in float64: the model's own arithmetic, every step of it
    in float64 (either ran float32 and the comparison was skipped: a loss divided by the batch size scored
    silently, train_grad 15x off, h86). What it cannot widen (autocast, a frozen float32 module's weights) still
    shows in ``computed``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in _CASTS and args and isinstance(args[0], Tensor):
            if name in ("float", "half", "bfloat16"):
                if not args[0].is_complex():
                    func, name = Tensor.double, "double"
            else:  # to(dtype), to(device, dtype), to(dtype=...), type(dtype)
                args = (args[0], *(_wide(a) for a in args[1:]))
                kwargs = {k: _wide(v) if k == "dtype" else v for k, v in kwargs.items()}
        if name in _MAKERS and kwargs.get("dtype") is not None:  # (a constant made float32 on purpose, h90)
            kwargs = {**kwargs, "dtype": _wide(kwargs["dtype"])}
        # a floating result from no floating tensor: made from Python numbers in the default dtype (a factory, a
        # bool mask times a number, Hugging Face's torch.where(mask, 0.0, finfo.min), h95)
        made = kwargs.get("dtype") is None and "out" not in kwargs and not _floating_among(args, kwargs)
        if made and name == "where" and len(args) == 3:  # its numbers as float64 (finfo(float64).min overflows float32)
            device = args[0].device if isinstance(args[0], Tensor) else None
            args = (args[0], *(torch.tensor(a, dtype=torch.float64, device=device) if type(a) is float else a
                               for a in args[1:]))
        computed = self.computed
        out = super().__torch_function__(func, types, args, kwargs)
        if made and isinstance(out, Tensor) and out.dtype == torch.get_default_dtype() and out.is_floating_point():
            self.computed = computed  # (made, not computed: widened as the batch is)
            if name in _FACTORIES:  # made again in float64 (torch.full(size, finfo(float64).min) stays finite)
                return func(*args, **{**kwargs, "dtype": torch.float64})
            return out.to(torch.float64)
        return out


def _floating_among(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call's arguments hold a floating or complex tensor (one level into lists and tuples)."""
    def floating(x: Any) -> bool:
        return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())

    return any(floating(x) or (isinstance(x, (list, tuple)) and any(map(floating, x)))
               for x in (*args, *kwargs.values()))


def _wide(v: Any) -> Any:
    """``v``, or float64 where ``v`` names a narrower floating dtype: a dtype, a tensor type (``torch.FloatTensor``)
    or its name (``"torch.FloatTensor"``) (:class:`_Widened`)."""
    if isinstance(v, torch.dtype):
        if v.is_complex:
            return torch.complex128
        return torch.float64 if v.is_floating_point and v != torch.float64 else v
    if isinstance(v, str) or (isinstance(v, type) and hasattr(v, "dtype")):
        named = v if isinstance(v, str) else f"{v.__module__}.{v.__name__}"
        return torch.float64 if named.rsplit(".", 1)[-1] in _NARROW_TYPES else v
    return v


#: The legacy tensor types of narrower floats (``x.type(torch.FloatTensor)``; a CUDA one by the same name).
_NARROW_TYPES = frozenset({"FloatTensor", "HalfTensor", "BFloat16Tensor"})


#: The casts :class:`_Widened` keeps in float64, and the factories whose default-dtype floating tensors it widens.
_CASTS = frozenset({"float", "half", "bfloat16", "to", "type"})
_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor", "ones", "zeros", "full", "empty", "arange", "linspace",
                        "logspace", "eye"})
#: The calls that make a tensor of a ``dtype=`` given: a narrower float one widened (:class:`_Widened`).
_MAKERS = _FACTORIES | {"ones_like", "zeros_like", "full_like", "empty_like", "new_tensor", "new_full", "new_ones",
                        "new_zeros", "new_empty"}


#: Calls that move, pick or make values without arithmetic: their outputs' shapes say nothing of rounding
#: (:func:`_shaped_otherwise`; Mixtral's eager experts pick each expert's float32 routing weights by index, a shape
#: the tokens set, and the fine comparison gave up at float32's sqrt(eps), leaving its load-balancing loss over the
#: batch unseen, h77).
_MOVES = frozenset({
    "__getitem__", "__setitem__", "index_select", "gather", "take_along_dim", "masked_select", "nonzero", "where",
    "masked_fill", "cat", "concat", "concatenate", "stack", "reshape", "view", "view_as", "permute", "transpose", "t",
    "expand", "expand_as", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "clone", "detach",
    "squeeze", "unsqueeze", "flatten", "unflatten", "split", "chunk", "unbind", "narrow", "select", "topk", "sort",
    "argsort", "argmax", "argmin", "one_hot", "repeat", "repeat_interleave", "tile", "roll", "flip", "movedim",
    "swapaxes", "swapdims", "zeros", "ones", "zeros_like", "ones_like", "full", "full_like", "empty", "empty_like",
    "arange"})


def _mean_grads(model_fn: Callable, params: Mapping[str, Tensor],
                batch: Any) -> tuple[dict[str, Tensor] | None, list[str], bool, torch.dtype]:
    """The gradient of the mean of ``model_fn``'s losses on ``batch``, what ``torch.optim`` steps on (``None``: no
    per-sample losses with an autograd path), the values its tensors became (branches), whether it drew random
    numbers, and the coarsest floating dtype it computed in. Dropout draws nothing and other random calls run as
    one fixed draw each (:class:`_Uses` ``quiet``): each sample the same function batched or alone."""
    from ._capture import checkpoints_as_plain  # it builds on this module

    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    mode = _UsesAndDtypes(leaves, quiet=True)
    with checkpoints_as_plain(), mode:  # (a segment recomputed in the backward would use the module's weights)
        losses = model_fn(dict(leaves), batch)  # a copy: our leaves stay the ones differentiated
    if not isinstance(losses, Tensor) or not losses.is_floating_point() or not losses.requires_grad:
        return None, mode.branches, mode.random, mode.computed
    grads = torch.autograd.grad(losses.mean(), list(leaves.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    return out, mode.branches, mode.random, mode.computed


def _refuse_detached(model_fn: Callable, params: Mapping[str, Tensor], batch: Callable[[], Any]) -> None:
    """Raise :class:`ParamsUnusedError` if the losses of a run with gradients on have no autograd path to any
    parameter (computed under ``no_grad``, ``.detach()``-ed, taken through ``.item()``): where plain PyTorch's
    ``loss.backward()`` raises, every score would silently be 0. One run of the checked rows, random draws undone;
    a model that cannot run outside ``vmap`` is left to the capture. Raise :class:`CheckpointWithoutGradError` if
    torch warned in that run that a re-entrant checkpoint's inputs do not require grad."""
    warned: list[str] = []
    try:
        _, losses = run_with_grads(model_fn, params, batch(), params, warned)
    except Exception:  # noqa: BLE001 - the capture reports the model's own errors
        return
    if any(_CHECKPOINT_NO_GRAD in w for w in warned) and _checkpoint_changes_gradients(model_fn, params, batch()):
        raise CheckpointWithoutGradError(
            "model_fn runs a torch.utils.checkpoint segment with use_reentrant=True (torch's default) whose inputs "
            "do not require grad (all of them come from the batch, not from params): torch then gives the "
            "parameters used inside it no gradient (its warning: 'None of the inputs have requires_grad=True. "
            "Gradients will be None'); ghostfunc runs checkpointed segments as plain calls and cannot reproduce that. "
            "Pass use_reentrant=False (the gradients of the model without checkpointing), or checkpoint a segment "
            "whose input depends on params")
    if isinstance(losses, Tensor) and losses.is_floating_point() and not losses.requires_grad:
        raise ParamsUnusedError(
            "model_fn's losses do not depend on params: run with gradients on and params that require them, "
            "they came back without an autograd path to any parameter (computed under torch.no_grad(), "
            ".detach()-ed, or rebuilt from .item()), so loss.backward() would fail and every score would be 0. "
            "Return the losses as computed from params"
        )


def _checkpoint_changes_gradients(model_fn: Callable, params: Mapping[str, Tensor], batch: Any) -> bool:
    """Whether the parameters' gradients of ``batch``'s summed losses differ with torch's re-entrant checkpoints
    and with their segments run as plain calls (as the capture runs them): they do when a segment whose inputs
    need no gradient uses a parameter (torch gives it none there); a segment of no parameter changes nothing.
    Two :func:`run_with_grads` runs; ``backward`` (a re-entrant checkpoint refuses ``.grad()``)."""
    from ._capture import _ReentrantAsPlain  # it builds on this module

    grads = []
    for lifted in (False, True):
        noted: Any = types.SimpleNamespace(lifted_checkpoint=False)  # what the stand-in marks (an interceptor's)
        with _ReentrantAsPlain(noted) if lifted else contextlib.nullcontext():
            leaves, losses = run_with_grads(model_fn, params, batch, params)
        if not isinstance(losses, Tensor) or not losses.requires_grad:
            return True  # no gradient at all one way: they differ (or the losses have no path: refused later)
        losses.sum().backward()
        grads.append([torch.zeros_like(v) if v.grad is None else v.grad for v in leaves.values()])
    dtype = coarsest(params.values())
    scale = max([g.abs().max().item() for g in (*grads[0], *grads[1]) if g.numel()] + [0.0])
    tol = torch.finfo(dtype).eps ** 0.5 * scale + torch.finfo(dtype).tiny
    return any(bool(((a - b).abs() > tol).any()) for a, b in zip(*grads, strict=True))


def _refuse_param_writes(params: Mapping[str, Tensor], versions: dict[str, int]) -> None:
    """Raise :class:`StateWrittenError` if a parameter was written in place by a path :class:`_ParamWrites` does not
    see (inside an operator of the model's own): then it was, and stays, changed."""
    written = [k for k, v in params.items() if v._version != versions[k]]
    if written:
        raise StateWrittenError(
            f"model_fn wrote into params[{written[0]!r}] in place"
            + (f" (and {len(written) - 1} more)" if len(written) > 1 else "")
            + ", by a call ghostfunc does not see before it runs, so its values have changed; ghostfunc "
              "differentiates model_fn at the params it is given and runs it several times per call. Compute new "
              "tensors from params instead of writing into them")


def module_buffers(model_fn: Callable) -> dict[str, Tensor]:
    """Every buffer of the modules ``model_fn`` reaches (:func:`reads`, and one level down as
    :func:`training_flags` looks), by name. Parameters are not watched: a frozen embedding with ``max_norm``
    is renormalised in place by torch on every call, as the model's own semantics."""
    out: dict[str, Tensor] = {}
    for obj in modules_of(model_fn):
        for m_name, m in obj.named_modules(remove_duplicate=True):
            for name, t in m._buffers.items():
                if t is not None:
                    out.setdefault(f"{m_name}.{name}" if m_name else name, t)
    return out


def check_state_writes(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, where: str) -> None:
    """Raise :class:`StateWrittenError` (naming ``where``) if ``model_fn`` moves a module buffer on every call, or
    writes into ``params`` (refused before the write): one or two runs on the first rows of ``batch`` (a
    :class:`ghostfunc._capture.Batch`) without gradients, the random state kept. For callers that run the model
    many times without :func:`check_model` (``unroll``)."""
    device = next(iter(params.values())).device
    devices = [device.index or 0] if device.type == "cuda" else []
    at = torch.arange(min(batch.size, ROWS))
    rows = batch.rebuild([t[at.to(t.device)] for t in batch.tensors])
    watch = _Writes(model_fn)
    versions = {k: v._version for k, v in params.items()}
    start, host = settings_now(model_fn), host_states()
    try:
        with fork_rng(devices), torch.no_grad(), eager_stance(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _OwnDraws(params) as own:
                first = model_fn(dict(params), rows)
            drew = own.drew or not same_host_states(host, host_states())
            watch.after_first()
            if watch.first_wrote():
                model_fn(dict(params), rows)
        _refuse_param_writes(params, versions)
        watch.refuse_moved()
        moved = moved_settings(model_fn, start)  # a plain setting the run moved (a counter in a Python attribute):
        if moved and not drew and isinstance(first, Tensor):  # the same rows again, from the same random state
            _refuse_changed(model_fn, params, lambda: rows, first.detach(), "training", devices,  # (one that
                            _ParamWrites(params), moved=moved, grads=False)  # switched at its 2nd call, h91)
    except StateWrittenError as err:
        raise StateWrittenError(f"{where}: {err}") from None
    except Exception as err:  # the model's own error: which run raised it, as graddot says
        err.add_note(f"{where}: model_fn raised this on the first {len(at)} rows of the first training batch, "
                     f"run without gradients (checking that it leaves its buffers and parameters alone)")
        raise


class _OwnDraws(_ParamWrites):
    """:class:`_ParamWrites`, also noting whether a call drew from a generator of the model's own (``generator=``):
    runs from the same global random state draw alike, not from such a one (a model drawing from its own generator
    beside a logging counter was refused as one whose counter changed it, h92)."""

    drew = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if kwargs and kwargs.get("generator") is not None:
            self.drew = True
        return super().__torch_function__(func, types, args, kwargs)


#: :class:`_Writes` keeps copies of buffers up to this many bytes in all (larger: it compares and restores none).
BUFFER_BYTES = 1 << 26


class _Writes:
    """Whether ``model_fn``'s runs keep moving a module buffer: a value written in place by one run and written
    with another value by the next (running statistics, spectral_norm's power iteration, a counter).

    A buffer filled on the first run and left as it is by later runs (a cache made lazily)
    is the model's own and stays. Refused: :class:`StateWrittenError`, with every buffer the
    runs wrote put back as it was before the first (when the copies fit :data:`BUFFER_BYTES`).
    """

    def __init__(self, model_fn: Callable) -> None:
        self.buffers = module_buffers(model_fn)
        self.fits = sum(t.numel() * t.element_size() for t in self.buffers.values()) <= BUFFER_BYTES
        self.versions = {k: version(t) for k, t in self.buffers.items()}
        self.before = {k: t.detach().clone() for k, t in self.buffers.items()} if self.fits else {}
        self.first: dict[str, Tensor] = {}
        self.first_versions: dict[str, int | None] | None = None

    def after_first(self) -> None:
        """Note the buffers' values after the first run."""
        self.first_versions = {k: version(t) for k, t in self.buffers.items()}
        self.first = {k: t.detach().clone() for k, t in self.buffers.items() if version(t) != self.versions[k]}

    def first_wrote(self) -> bool:
        return self.first_versions is not None and self.first_versions != self.versions

    def refuse_moved(self) -> None:
        """Raise :class:`StateWrittenError` if a later run wrote another value than the first left."""
        if self.first_versions is None:
            return
        left = {**self.before, **self.first}  # each buffer as the first run left it (where a copy was kept)
        moved = [k for k, t in self.buffers.items()
                 if version(t) != self.first_versions[k] and (k not in left or not torch.equal(t, left[k]))]
        if not moved:
            return
        with torch.no_grad():
            for k, t in self.buffers.items():
                if version(t) != self.versions[k] and k in self.before:
                    t.copy_(self.before[k])
        back = ("the buffers are put back as they were before this call" if self.fits else
                f"the buffers, over {BUFFER_BYTES >> 20} MiB in all, are left as the check's runs wrote them")
        shown = _first_few(moved)
        raise StateWrittenError(
            f"model_fn writes into the buffer(s) {shown} in place on every call, another value each time: a layer "
            f"that updates its own state from the batch, such as the running statistics of "
            f"InstanceNorm(track_running_stats=True) in training mode, spectral_norm's power iteration in training "
            f"mode, or a counter or moving average. graddot runs model_fn several times per call (a one-sample "
            f"trace, these checks, the capture), so that state would move several times and the runs would see "
            f"different models ({back}). Put such layers in eval "
            f"mode (model.eval() or the layer's .eval()), or keep the state outside model_fn")

    def refuse_batch_fill(self, run: Callable[[], Any], label: str, devices: list[int]) -> None:
        """Raise :class:`SamplesInteractError` if a buffer the first run filled (and later runs left) is filled
        with another value from one other sample: a data-dependent initialisation (ActNorm's mean of the first
        batch it sees). The value would come from whichever run came first, here the check's few rows, where
        each sample alone fills it from itself; a plain training loop fills it from its first batch. Judged by
        putting the filled buffers back as they were and running ``run`` (the last checked row alone) once;
        a fill guarded by a Python flag rather than a buffer does not run again and is not judged."""
        filled = [k for k in self.first if k in self.before]
        if not filled:
            return
        left = {k: self.buffers[k].detach().clone() for k in filled}
        with torch.no_grad():
            for k in filled:
                self.buffers[k].copy_(self.before[k])
        refill: list[str] = []
        versions = {k: version(self.buffers[k]) for k in filled}
        try:
            with fork_rng(devices), torch.no_grad(), eager_stance(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
            refill = [k for k in filled  # written again, with another value
                      if version(self.buffers[k]) != versions[k] and not torch.equal(self.buffers[k], left[k])]
        except Exception:  # noqa: BLE001 - a model that runs only under vmap: nothing judged
            pass
        with torch.no_grad():
            for k in filled:
                self.buffers[k].copy_(self.before[k] if refill else left[k])
        if not refill:
            return
        shown = _first_few(refill)
        raise SamplesInteractError(
            f"model_fn fills the buffer(s) {shown} from the batch on its first call (a data-dependent "
            f"initialisation, such as ActNorm's mean of the first batch): the value would come from whichever run "
            f"comes first (here {label} samples of graddot's own checks), while each sample alone would fill it "
            f"from itself. Run the model once on the batch it should be initialised from (a plain forward, as a "
            f"training loop's first step does) before calling; the buffers are put back as they were")


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


#: Rows :func:`distinct_rows` looks through for samples that differ.
SCAN = 64


def distinct_rows(tensors: list[Tensor], size: int, k: int) -> list[int]:
    """Up to ``k`` rows (positions along the sample axis) whose samples differ pairwise, the first first.

    Identical samples hide an interaction (``x - x.mean(0)`` is 0 on identical rows,
    together or alone), so the boundary check compares samples that differ; among the
    first :data:`SCAN` rows only, and a batch with one distinct sample there gives one row
    (nothing compared: the signature is checked again on a later call).
    """
    chosen = [0] if size else []
    for i in range(1, min(size, SCAN)):
        if len(chosen) == k:
            break
        if all(any(not torch.equal(t[i], t[j]) for t in tensors) for j in chosen):
            chosen.append(i)
    return chosen


def _rng_states(devices: list[int]) -> tuple[list[Tensor], tuple[Any, ...]]:
    """The generator states a model's draws advance: torch's (CPU and ``devices``), Python's and NumPy's."""
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices], host_states()


def _drew(before: tuple[list[Tensor], tuple[Any, ...]], devices: list[int], host: bool | None = None) -> bool:
    """Whether any generator of :func:`_rng_states` moved since ``before`` (``host``: Python's or NumPy's only;
    ``False``: torch's only)."""
    now = _rng_states(devices)
    torch_moved = not all(torch.equal(a, b) for a, b in zip(before[0], now[0], strict=True))
    host_moved = not same_host_states(before[1], now[1])
    return host_moved if host else torch_moved if host is False else torch_moved or host_moved


def _per_sample_shape(losses: Any, k: int) -> bool:
    return isinstance(losses, Tensor) and losses.shape == (k,) and losses.is_floating_point()


def coarsest(tensors: Iterable[Tensor]) -> torch.dtype:
    """The floating dtype of largest ``eps`` among ``tensors`` (float64 when none is floating)."""
    return max((t.dtype for t in tensors if t.is_floating_point()), key=lambda d: torch.finfo(d).eps,
               default=torch.float64)


def beyond_rounding(a: Tensor, b: Tensor, dtype: torch.dtype, factor: float | None = None,
                    scale: float | None = None) -> tuple[Tensor, Tensor, float]:
    """Where two loss vectors differ by more than rounding in ``dtype``: ``(mask, |a - b|, tolerance)``.

    Tolerance: ``factor`` (``sqrt(eps)`` of ``dtype`` unless told) times ``scale`` (the largest finite entry unless
    told: a comparison confirmed on some of its rows keeps the whole one's). An entry finite
    one way and not the other differs; the same non-finite value both ways (NaN and
    NaN, inf and inf) does not.
    """
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    scale = _largest_finite(a, b) if scale is None else scale
    factor = torch.finfo(dtype).eps ** 0.5 if factor is None else factor
    tol = factor * scale + torch.finfo(dtype).tiny
    diff = torch.where(finite, (a - b).abs(), a.new_zeros(()))
    differ = (finite & (diff > tol)) | (~finite & ~((a == b) | (a.isnan() & b.isnan())))
    return differ, diff, tol


def _largest_finite(a: Tensor, b: Tensor) -> float:
    """The largest magnitude among the entries finite in both ``a`` and ``b`` (0 where none is)."""
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    return torch.cat([a[finite].abs(), b[finite].abs(), a.new_zeros(1)]).max().item()


def _compare(together: Tensor, alone: Tensor, label: str, chosen: list[int], dtype: torch.dtype,
             which: str | None = None, how: str = "the same samples run one at a time",
             factor: float | None = None, scale: float | None = None,
             kinds: tuple[str, str] = ("with the others", "alone")) -> None:
    """``together[i]`` (sample ``chosen[i]`` run with the others) against ``alone[i]``, up to rounding.

    Rounding: ``factor`` (``sqrt(eps)`` of ``dtype``, the coarsest of the parameters', the inputs' and
    the losses' floating dtypes, unless told) times the largest finite loss (batched and
    single-sample kernels may sum in different orders). A loss finite one way and not
    the other (a batch statistic of one sample) is a difference; NaN both ways is not.
    """
    if alone.shape != together.shape:
        return  # model_fn's shape errors are reported by the capture, with their own message
    differ, diff, tol = beyond_rounding(together, alone, dtype, factor, scale)
    if not bool(differ.any()):
        return
    rows = differ.nonzero().flatten().tolist()
    seen = ", ".join(f"sample {chosen[i]}: {together[i].item():.6g} {kinds[0]}, {alone[i].item():.6g} {kinds[1]}"
                     for i in rows[:4]) + (f", ... ({len(rows)} in all)" if len(rows) > 4 else "")
    which = which or samples_named(chosen, label)
    finite = bool((torch.isfinite(together) & torch.isfinite(alone))[differ].any())
    gap = (f"largest finite difference {diff.max().item():.3g}, rounding allows {tol:.3g}" if finite else
           "a loss finite one way and not the other: a statistic over the batch, undefined for one sample")
    raise SamplesInteractError(
        f"samples interact in model_fn: run on {which} together, the losses "
        f"of {len(rows)} of them differ from {how} ({seen}; {gap}). Per-sample gradients (and so "
        f"ghostfunc's scores) are those of each sample alone, which are not the gradients of this batched loss. "
        f"Make each sample's loss depend on that sample only: no in-batch negatives, batch means or batch softmax "
        f"in the loss, no normaliser counted over the whole batch (Hugging Face's num_items_in_batch, the batch's "
        f"non-ignored tokens: divide each sample by its own count); BatchNorm in eval mode (model.eval()) or "
        f"GroupNorm/LayerNorm instead"
    )


#: Calls that create a tensor from nothing but constants: inside ``model_fn`` under ``vmap`` it is the same
#: for every sample (unbatched), and an in-place write of per-sample values into it needs one copy per sample.
FACTORIES = frozenset({
    torch.zeros, torch.ones, torch.empty, torch.full, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.tensor, torch.arange, torch.eye, torch.linspace,
    Tensor.new_zeros, Tensor.new_ones, Tensor.new_empty, Tensor.new_full, Tensor.new_tensor, Tensor.clone,
    # (new tensors too, however the model joins them: a path graph's messages written into torch.cat of zeros were
    # refused as a write into BatchNorm's statistics, h70)
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack, torch.tile,
    Tensor.repeat, Tensor.tile,
})


class InPlaceWriteError(ValueError):
    """``model_fn`` writes per-sample values in place where ghostfunc cannot keep one copy per sample."""


def retry_writing(func: Callable, args: tuple, kwargs: dict[str, Any], fresh: set[int], err: RuntimeError) -> Any:
    """After ``func(*args, **kwargs)`` raised ``err``: make a per-sample in-place write exact, or raise.

    Under ``vmap`` a tensor the model creates (``h = torch.zeros(T, d)``) is one tensor
    shared by all samples, so ``h[:k] = x`` or ``h.index_add_(0, i, x)`` with a
    per-sample ``x`` fails. Run alone, every sample would fill its own ``h``: so ``h``
    (``id`` in ``fresh``: made by one of :data:`FACTORIES` during this run) becomes a
    per-sample tensor in place (``torch.utils.swap_tensors``) and the call runs again.
    A write into a view of such a tensor is refused with what to do instead; an
    in-place update of a tensor from outside the call (a buffer) is a
    :class:`SamplesInteractError`; anything else re-raises ``err``.
    """
    if "mutate a captured Tensor" in str(err):  # functorch: in place into a tensor from outside the transform
        if (agreed := _agreed_write(func, args, kwargs)) is not None:
            return agreed[0]
        raise SamplesInteractError(
            f"model_fn updates in place ({_func_name(func)}) a tensor that outlives the call, such as a module "
            f"buffer (BatchNorm's num_batches_tracked and running statistics in training mode) or a tensor of the "
            f"batch it is given; run alone, each sample would update it in turn, so samples interact through it. "
            f"Put such layers in eval mode (model.eval()), or use GroupNorm/LayerNorm instead of BatchNorm; compute "
            f"a new tensor from an input instead of writing into it (x = x - 0.5, not x.sub_(0.5))"
        ) from None
    target = args[0] if args else None
    # (with one sample under vmap the failure is a plain broadcast error, so the message is not checked; a call
    # that writes nothing is not retried: a boolean mask of the batch indexing a tensor the model made, a data-
    # dependent shape vmap cannot run, was refused as a write into a view, h70)
    if not (_writes_in_place(func, kwargs) and isinstance(target, Tensor) and _writes_batched(target, args[1:],
                                                                                             kwargs)):
        raise err
    if id(target) not in fresh:
        base = target._base
        if base is not None and id(base) in fresh:
            raise InPlaceWriteError(
                f"model_fn writes per-sample values in place ({_func_name(func)}) into a view of a tensor it "
                f"created; ghostfunc runs each sample alone under vmap and can give the created tensor one copy "
                f"per sample, but not a view of it taken before the write. Write through the tensor itself "
                f"(h[:, :k] = v, h.index_add_(...)) or build it out of place (torch.cat, torch.where, index_add). "
                f"For one sample, .contiguous() or .reshape() of an expanded tensor (torch.zeros(N, H).expand(B, N, "
                f"H)) is that view, not a copy: make it with torch.zeros(B, N, H) or .clone()"
            ) from None
        if (agreed := _agreed_write(func, args, kwargs)) is not None:
            return agreed[0]
        raise err
    _per_sample_in_place(target, args[1:], kwargs)
    return func(*args, **kwargs)


def _writes_in_place(func: Callable, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``__setitem__``, ``__iadd__``, ``inplace=True``) or
    an ``out=``."""
    name = getattr(func, "__name__", "") or ""
    return "out" in kwargs or kwargs.get("inplace") is True or name in _IN_PLACE_DUNDERS or (
        name.endswith("_") and not name.endswith("__"))


_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                               "__imatmul__"})


#: In-place writes whose result does not depend on how many times they run with one value: ``buf.copy_(v)``,
#: ``buf.fill_(v)`` and ``buf[index] = v``.
_IDEMPOTENT = frozenset({Tensor.copy_, torch._C.TensorBase.copy_, Tensor.fill_, torch._C.TensorBase.fill_,
                         Tensor.__setitem__, torch._C.TensorBase.__setitem__})


def _agreed_write(func: Callable, args: tuple, kwargs: dict[str, Any]) -> tuple[Any] | None:
    """A ``copy_``, ``fill_`` or ``[index] =`` into a tensor from outside the call (a module buffer) of a
    per-sample value every sample agrees on and no parameter reaches, made once with that value outside the
    transforms: each sample alone would write the same. Hugging Face's longrope refreshes ``inv_freq`` so on every call, from the batch's
    longest position (refused as samples that interact before). ``None`` (the caller refuses) where the
    samples disagree, the value carries a gradient, or the write is another."""
    setitem = func is Tensor.__setitem__ or func is torch._C.TensorBase.__setitem__
    if func not in _IDEMPOTENT or len(args) != 2 + setitem or kwargs or not isinstance(args[-1], Tensor):
        return None
    ft = torch._C._functorch
    level = ft.maybe_current_level()
    target, value = args[0], args[-1]
    if level is None or _level_of(value) != level or ft.is_functorch_wrapped_tensor(target) or (
            setitem and any(isinstance(t, Tensor) and ft.is_functorch_wrapped_tensor(t)
                            for t in pytree.tree_leaves(args[1]))):  # (an index per sample: another write)
        return None
    inner, bdim = ft._unwrap_batched(value, level)
    if bdim is None or inner.shape[bdim] == 0:
        return None
    plain = inner
    while ft.is_functorch_wrapped_tensor(plain):  # lower levels: none may batch it or carry a gradient
        if ft.is_batchedtensor(plain) or (ft.is_gradtrackingtensor(plain) and plain.requires_grad):
            return None
        plain = ft.get_unwrapped(plain)
    with torch._C._DisableFuncTorch():
        first = plain.select(bdim, 0)
        if not bool((plain == first.unsqueeze(bdim)).all()):
            return None
        if setitem:
            target[args[1]] = first
            return (None,)
        return (func(target, first),)


def _writes_batched(target: Tensor, rest: tuple, kwargs: dict[str, Any]) -> bool:
    """``target`` is not batched at the current ``vmap`` level and some other argument is."""
    ft = torch._C._functorch
    level = ft.maybe_current_level()
    if level is None or _level_of(target) == level:
        return False
    return any(_level_of(t) == level for t in pytree.tree_leaves((rest, kwargs)) if isinstance(t, Tensor))


def _level_of(t: Tensor) -> int | None:
    ft = torch._C._functorch
    return ft.maybe_get_level(t) if ft.is_batchedtensor(t) else None


def _per_sample_in_place(target: Tensor, rest: tuple, kwargs: dict[str, Any]) -> None:
    """Turn ``target`` into a tensor batched at the current level (one copy per sample), in place."""
    ft = torch._C._functorch
    level = ft.maybe_current_level()
    assert level is not None  # _writes_batched saw a vmap level
    other = next(t for t in pytree.tree_leaves((rest, kwargs)) if isinstance(t, Tensor) and _level_of(t) == level)
    inner, bdim = ft._unwrap_batched(other, level)
    assert bdim is not None
    n = inner.shape[bdim]
    copies = ft._add_batch_dim(target.expand(n, *target.shape).clone(), 0, level)  # [n, *target] per sample
    try:
        torch.utils.swap_tensors(target, copies)
    except RuntimeError:  # still referenced elsewhere (a view taken before the write, a weak reference)
        raise InPlaceWriteError(
            "model_fn writes per-sample values in place into a tensor it created after taking a view of it "
            "(or while something else holds it); ghostfunc runs each sample alone under vmap and cannot give "
            "that tensor one copy per sample without leaving the view behind. Take views after the writes, or "
            "build the tensor out of place (torch.cat, torch.where, index_add)"
        ) from None


def _func_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
