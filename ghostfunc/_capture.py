"""Capture: every recognised op's input ``A`` and output gradient ``B`` in one backward.

``model_fn`` runs once per batch under ``vmap`` (so every op sees one sample and
the per-sample structure is exact, whatever the layout: flattened, broadcast,
sequence-first) inside a :class:`torch.overrides.TorchFunctionMode` that knows the
trainable parameters by identity. A recognised call records its saved inputs and
adds a zero *tap* to its output; ``torch.func.vjp`` with respect to the taps gives
every ``B``. Parameters used any other way are handed to the model as per-sample
copies (``p.expand(n, ...)``), so the same backward pass gives their exact
per-sample gradients (the ``vmap(grad)`` fallback, fused into the one pass). No
graph is built for the parameters themselves.

Tap shapes come from a *trace*: the same run on one sample under ``no_grad``,
cached by input signature; a real run that meets a different sequence of calls
raises :class:`_Stale` and is traced again, so a stale cache cannot give a wrong
number.

Data-dependent control flow (``bool(tensor)``, ``.item()``) is answered per batch
when every sample gives the same value; otherwise :class:`_Diverged` carries every
sample's value and the caller runs the batch in groups that agree
(:mod:`ghostfunc._groups`). A model ``vmap`` inside ``vjp`` cannot run at all goes
sample by sample (:mod:`ghostfunc._eager`).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ._bymodel import ByModel
from ._draws import (
    DROPOUTS,
    ONCE,
    NoReplay,
    Recorded,
    Replay,
    draw_once,
    draws_once,
    fork_rng,
    record,
    set_rng_state,
)
from ._interact import (
    EAGER,
    FACTORIES,
    TO_PYTHON,
    InPlaceWriteError,
    eager_stance,
    fingerprint,
    is_value,
    keep_in_call,
    param_signature,
    remember,
    retry_writing,
    training_flags,
    value_key,
)
from ._ops import EXACT, TABLE, Direct, Factored, Match, Rule, SamplesInteractError, recognise
from ._ops.embedding import renormed_by_call
from ._ops.rnn import RECURRENT, decompose

ModelFn = Callable[[dict[str, Tensor], Any], Tensor]


class Site(NamedTuple):
    """One recognised call that touches trainable parameters (per-sample view)."""

    rule: Rule
    roles: tuple[tuple[str, str], ...]  # (role, parameter name)
    out_shape: torch.Size
    out_dtype: torch.dtype


class Trace(NamedTuple):
    sites: tuple[Site, ...]
    other_uses: dict[str, str]  # parameter name -> the unrecognised call that used it
    notes: tuple[str, ...] = ()  # what the plan should say about how the model ran


class _Stale(Exception):
    """The run met a different sequence of calls than the trace: trace again."""


class Batch(NamedTuple):
    """A batch pytree split into its tensor leaves (sample axis first) and the rest."""

    tensors: list[Tensor]
    rebuild: Callable[[list[Tensor]], Any]
    size: int
    signature: tuple


def split_batch(batch: Any) -> Batch:
    flat = _flat_batch(batch)
    if flat is not None:
        return flat
    if is_foreign_mapping(batch):  # e.g. transformers.BatchEncoding: split as a dict, rebuilt as its own type
        inner = split_batch(dict(batch))
        return inner._replace(rebuild=lambda tensors: _as_type(type(batch), inner.rebuild(tensors)),
                              signature=(type(batch).__qualname__, inner.signature))
    leaves, spec = pytree.tree_flatten(batch, is_leaf=is_foreign_mapping)
    if any(is_foreign_mapping(leaf) for leaf in leaves):  # nested in a tuple/dict: each leaf split on its own
        return _joined([split_batch(leaf) for leaf in leaves], spec)
    tensors, rebuild = tensor_leaves(leaves, spec)
    sig = tuple(
        (tuple(leaf.shape[1:]), leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else _hashable(leaf)
        for leaf in leaves
    )
    return Batch(tensors, rebuild, tensors[0].shape[0] if tensors else 0, (str(spec), sig))


#: ``(container type, length)`` -> the ``str`` of its pytree spec: a batch that is a tensor, or a plain
#: tuple or list of tensors, is split without a pytree walk (a few microseconds a call on a small model),
#: under the signature the walk gives.
_SPECS: dict[tuple[type, int], str] = {}


def _flat_batch(batch: Any) -> Batch | None:
    """:func:`split_batch` of a tensor or a plain tuple/list of tensors; ``None`` for anything else."""
    kind = type(batch)
    if kind is Tensor:
        tensors = [batch]
    elif (kind is tuple or kind is list) and batch and all(type(t) is Tensor for t in batch):
        tensors = list(batch)
    else:
        return None
    if not all(t.dim() for t in tensors):  # a scalar leaf: the walk raises as it always has
        return None
    key = (kind, len(tensors))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = str(pytree.tree_flatten(batch)[1])
    sig = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors)
    rebuild: Callable[[list[Tensor]], Any] = (
        (lambda ts: ts[0]) if kind is Tensor else (lambda ts: tuple(ts)) if kind is tuple else (lambda ts: list(ts)))
    return Batch(tensors, rebuild, tensors[0].shape[0], (spec, sig))


def tensor_leaves(leaves: list[Any], spec: pytree.TreeSpec) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensor leaves of a flattened pytree, and a function that puts new ones in their places."""
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    def rebuild(tensors: list[Tensor]) -> Any:
        out = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            out[i] = t
        return pytree.tree_unflatten(out, spec)

    return [leaves[i] for i in where], rebuild


def _joined(parts: list[Batch], spec: pytree.TreeSpec) -> Batch:
    """One :class:`Batch` of the leaves ``parts`` (each split on its own) under ``spec``."""
    counts = [len(part.tensors) for part in parts]

    def rebuild(tensors: list[Tensor]) -> Any:
        out, at = [], 0
        for part, count in zip(parts, counts, strict=True):
            out.append(part.rebuild(tensors[at:at + count]))
            at += count
        return pytree.tree_unflatten(out, spec)

    tensors = [t for part in parts for t in part.tensors]
    return Batch(tensors, rebuild, tensors[0].shape[0] if tensors else 0,
                 (str(spec), tuple(part.signature for part in parts)))


def is_foreign_mapping(x: Any) -> bool:
    """A ``Mapping`` that torch's pytree does not know (it would be one opaque leaf)."""
    return issubclass(type(x), Mapping) and type(x) not in pytree.SUPPORTED_NODES  # (not x.__class__: a proxy's)


def _as_type(kind: type, d: dict) -> Any:
    try:
        return kind(d)
    except TypeError:  # a Mapping type not constructible from a dict: the model gets a dict
        return d


def _hashable(x: Any) -> Any:
    """A non-tensor leaf's part of a batch's signature (what checks, verdicts, routings and replays are kept
    under). Numbers, strings and other immutable values by value (:func:`ghostfunc._interact.is_value`);
    anything else by :func:`ghostfunc._interact.fingerprint`, what it holds: a config changed in place between
    calls is a new signature (checked again), an equal one made anew is not. An object's own equality is not
    used: a frozen dataclass compares a config it holds by identity (one changed in place kept the old checks),
    and an ``__eq__`` that raises, or answers with an array, raised out of the caches' lookups."""
    if is_value(x) and not isinstance(x, (type, enum.Enum)):  # (a class's settings, an enum's methods: walked)
        return (type(x), value_key(x))  # (a float by its bits: -0.0 is not 0.0)
    return (type(x), fingerprint(x))


class AutogradStateRead(RuntimeError):
    """``model_fn`` read a tensor's ``requires_grad``, ``grad_fn`` or ``is_leaf`` or put a gradient hook on one
    under ``vmap``.

    There none is what a plain run shows (batched tensors report ``requires_grad=False``
    and no ``grad_fn``, a hook cannot be registered, a module's backward hooks are skipped), so the
    batched capture refuses and the per-sample path, with ordinary autograd, runs
    (:func:`ghostfunc._eager.unbatchable`): the branch, the hook or the module hook then
    act as they do in a plain backward.
    """


#: The descriptors of ``Tensor.requires_grad``, ``grad_fn`` and ``is_leaf``: their reads reach
#: ``__torch_function__`` as their ``__get__``.
REQUIRES_GRAD, GRAD_FN, _IS_LEAF = (torch._C.TensorBase.__dict__[k] for k in ("requires_grad", "grad_fn", "is_leaf"))


def reads_autograd_state(func: Any) -> bool:
    """Whether ``func`` reads a tensor's ``requires_grad``, ``grad_fn`` or ``is_leaf`` (a module's backward hooks
    do, to set up: a full hook the first, the older ``register_backward_hook`` the second) or registers a
    gradient hook on it."""
    if func is Tensor.register_hook:
        return True
    owner = getattr(func, "__self__", None)
    return (owner is REQUIRES_GRAD or owner is GRAD_FN or owner is _IS_LEAF) and getattr(func, "__name__", "") == "__get__"


#: Backward calls (the per-sample path runs the caller's inside the mode): they read no table rows.
_BACKWARDS = frozenset({torch.autograd.grad, torch.autograd.backward, Tensor.backward})
_REQUIRES_GRAD_ = torch._C.TensorBase.requires_grad_


def _base(t: Tensor) -> Tensor:
    """The tensor under ``t``'s functorch wrappers (``vmap``, ``grad``): the one an in-place write bumps."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def note_versions(versions: list[tuple[Tensor, int, str]], saved: tuple[Tensor, ...], call: str) -> None:
    """Append each saved input's version counter (under its wrappers) as the recognised call ``call`` saw it."""
    if torch.compiler.is_compiling():  # a compiled graph holds no version counters (its inputs are its own)
        return
    for t in saved:
        if isinstance(t, Tensor):
            base = _base(t)
            versions.append((base, base._version, call))


def rewritten(versions: list[tuple[Tensor, int, str]]) -> tuple[Tensor, int, str] | None:
    """The first saved input (:func:`note_versions`) written in place after its call, if any."""
    return next((v for v in versions if v[0]._version != v[1]), None)


def refuse_rewritten(versions: list[tuple[Tensor, int, str]], where: str) -> None:
    """Raise ``RuntimeError`` (as plain PyTorch's backward does) if a recognised call's saved input was written
    in place after the call: the kernels would read the new values (the call's gradient is of the old ones)."""
    if (changed := rewritten(versions)) is not None:
        base, version, call = changed
        raise RuntimeError(
            f"{where}: one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: the input of {call} was written in place after the call (version {version}, now "
            f"{base._version}); plain PyTorch's backward refuses this model too. Write into a copy "
            f"(x = x.clone()) or before the call")


class _Interceptor(TorchFunctionMode):
    """Recognises calls on trainable parameters; traces them, or taps them.

    With ``taps is None`` it traces: records every recognised call as a
    :class:`Site` and every other use of a parameter. Otherwise it expects the
    sites ``expect`` in order, adds ``taps[k]`` to the ``k``-th output and keeps
    the rule's saved tensors.
    """

    def __init__(self, names: dict[int, str], taps: tuple[Tensor, ...] | None = None,
                 expect: tuple[Site, ...] = ()) -> None:
        super().__init__()
        self.names = names
        self.taps = taps
        self.expect = expect
        self.sites: list[Site] = []
        self.other_uses: dict[str, str] = {}
        self.saved: list[Tensor] = []
        self.statics: list[Any] = []
        self.fresh: set[int] = set()  # ids of the tensors made by FACTORIES in this run
        self.branch_points = 0  # data-dependent branch points met so far (their ordinal names them)
        self._entered: list[_ReentrantAsPlain] = []  # what each entry of the mode set up
        self.lifted_checkpoint = False  # a checkpointed segment ran as a plain call (_without_checkpoint, _ReentrantAsPlain)
        self.transposed = Transposed()  # parameters' transposed views (x @ w.T runs as F.linear(x, w))
        self.replay: Replay | None = None  # dropout calls take a plain run's masks (ghostfunc._draws)
        self.level: int | None = None  # the functorch level at the first entry (see _rule)
        self.versions: list[tuple[Tensor, int, str]] = []  # the saved inputs' version counters (note_versions)
        # tracing: id of each table looked up with max_norm (and of its base) -> (table, (max_norm, norm_type), call)
        self.renormed: dict[int, tuple[Tensor, tuple[float, float], str]] = {}
        self._checking_renormed = False

    #: Answer data-dependent branches under ``vmap`` (:func:`_agreed_value`).
    follow_branches = True
    #: The model runs under ``vmap``: a read of autograd state raises :class:`AutogradStateRead`.
    batched = True

    def __enter__(self) -> _Interceptor:
        # torch.compile'd code runs eagerly in here: dynamo traced this mode (taps, saved inputs) into its
        # graph with the model, and under backend="eager" that graph gave every tap's gradient twice.
        # The mode may be entered again while active (an RNN's gate linears): one pair per entry, exited in order.
        EAGER.enter()
        reentrant = _ReentrantAsPlain(self)
        try:
            reentrant.__enter__()
        except BaseException:
            EAGER.exit()
            raise
        self._entered.append(reentrant)
        if len(self._entered) == 1:  # the transform level the capture runs the model at (None: no transform)
            self.level = torch._C._functorch.maybe_current_level()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        reentrant = self._entered.pop()
        try:
            reentrant.__exit__(*exc)
        finally:
            EAGER.exit()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _REQUIRES_GRAD_ and self.batched and args and id(args[0]) not in self.names and \
                (args[1] if len(args) > 1 else kwargs.get("requires_grad", True)):
            # an activation made to require grad (Hugging Face's enable_input_require_grads, for re-entrant
            # checkpoints, which the capture runs as plain calls): no parameter's gradient changes, in a plain run
            # either; under vmap it raised, and the model ran one sample at a time (with dropout, the per-sample
            # masks left torch.optim's trajectory: 0.05-0.35 over 5 steps, h51). A read of the flag after it, a
            # backward taken to it, still take the per-sample capture (they raise here).
            return args[0]
        if self.batched and reads_autograd_state(func):
            raise AutogradStateRead(f"model_fn reads autograd state or registers a gradient hook ({_name(func)}), "
                                    f"which tensors under vmap do not show as a plain run does")
        if (hooks := checkpoint_hooks()) is not None:
            return _without_checkpoint(self, hooks, func, types, args, kwargs)
        if self.taps is None and (self.renormed or func is F.embedding or func is F.embedding_bag):
            if (refused := self._renormed_use(func, types, args, kwargs)) is not None:
                return refused[0]
        if self.replay is not None and func in DROPOUTS:
            return self.replay(func, args, kwargs)
        unowned = draws_once(func, args, kwargs)  # torch.randn(d, d), a seeded generator's draw: once where
        if unowned:  # that is what a plain call does (ghostfunc._graddot.as_plain_draws compares)
            ONCE.seen += 1
        once: bool | None = unowned and (ONCE.on or None)  # (None: as vmap draws, where vmap can)
        if func in _TO_PYTHON and self.follow_branches and args and _batch_level_count(args[0]) == 1:
            self.branch_points += 1
            return _agreed_value(func, args, kwargs, self.branch_points)
        if func is F.scaled_dot_product_attention:
            func = _sdpa
        func = EXACT.get(func, func)  # e.g. F.embedding with per-sample scale_grad_by_freq under vmap
        if func in RECURRENT and (decomposed := decompose(func, args, kwargs)) is not None:
            with self:  # an RNN as gate linears, each intercepted (ghostfunc._ops.rnn)
                return decomposed()
        if func in TRANSPOSES or self.transposed.names:  # x @ w.T as a linear call (most calls skip this)
            view, func, args, kwargs, viewed = self.transposed.see(func, args, kwargs, self.names)
            if view is not None:
                return view
            if viewed:  # a parameter's transpose in a call no rule knows: a use of the parameter
                if self.taps is not None:
                    raise _Stale(f"{_name(func)} used the transpose of {viewed[0]}")
                for name in viewed:
                    self.other_uses.setdefault(name, _name(func))
        found = params_among(args, kwargs, self.names) if self.names else []
        if not found:
            try:
                out = _drawn(func, args, kwargs, once)
            except RuntimeError as err:  # e.g. a per-sample write into a fresh tensor: made exact, or explained
                out = retry_writing(func, args, kwargs, self.fresh, err)
            if func in FACTORIES:
                self.fresh.add(id(out))
            return out
        rule, match = recognise(self._rule(func), args, kwargs)
        roles = matched_roles(match, self.names, found)
        out = _drawn(func, args, kwargs, once)
        if func in CONVERSIONS and args and args[0] is found[0] and unchanged(out, found[0], args, kwargs):
            return found[0]  # w.to(w.dtype), w.float(), +w: the parameter itself, as eagerly (w is returned)
        if func in FACTORIES:  # e.g. torch.zeros_like(weight): a fresh buffer too
            self.fresh.add(id(out))
        if found and _makes_tensor(out, found):
            if self.taps is not None:
                raise _Stale(f"{_name(func)} used {self.names[id(found[0])]}")
            for t in found:
                self.other_uses.setdefault(self.names[id(t)], _name(func))
        if not roles or match is None or rule is None:
            return out
        site = Site(rule, tuple(sorted(roles.items())), out.shape, out.dtype)
        if self.taps is None:
            self.sites.append(site)
            return out
        tap = self._tap(site, out)
        self.saved.extend(match.saved)
        self.statics.append((match.static, len(match.saved)))
        if rule.kind in _FRESH and torch._C._functorch.is_batchedtensor(out):
            tapped = out.add_(tap)  # a fresh, per-sample result: tap it in place, no copy
        else:
            tapped = out + tap
        note_versions(self.versions, match.saved, _name(func))
        return tapped

    def _renormed_use(self, func: Any, types: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any] | None:
        """While tracing: note the tables of ``max_norm`` lookups; run a later call that takes one of them (or a
        view of one) and raise :class:`SamplesInteractError` if it computes a tensor from it (``(result,)`` if it
        only reads its shape or dtype; ``None``: the call is not such a use, and runs as usual). torch
        renormalises the looked-up rows in place, so that use reads rows every sample's lookups renormalised
        (and for a parameter, torch writes into ``params``); the capture scales the rows on the way out
        (:func:`ghostfunc._ops.embedding.embedding`), which equals torch for the lookups only."""
        if self._checking_renormed or func in _BACKWARDS:  # a backward the caller runs inside: no use of the rows
            return None
        lookup = renormed_by_call(func, args, kwargs)
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)] if self.renormed else []
        hit = next(((t, self.renormed[key]) for t in leaves for key in (id(t), id(t._base))
                    if key in self.renormed), None)
        if lookup is not None:
            table, norm = lookup
            for key in {id(table), id(table._base)} - {id(None)}:
                self.renormed.setdefault(key, (table, norm, _name(func)))
            if hit is None or hit[1][1] == norm:  # a lookup with the same max_norm renormalises the same way
                return None
        if hit is None:
            return None
        self._checking_renormed = True
        try:
            out = self.__torch_function__(func, types, args, kwargs)
        finally:
            self._checking_renormed = False
        if not _makes_tensor(out, [hit[0]]):
            return (out,)
        table, (max_norm, _), lookup_name = hit[1]
        what = f"params[{self.names[id(table)]!r}]" if id(table) in self.names else "a table model_fn computes"
        raise SamplesInteractError(
            f"{lookup_name} with max_norm={max_norm:g} renormalises the rows it looks up in {what} in place, and "
            f"model_fn then uses that table again ({_name(func)}): in a batch, that use reads rows renormalised by "
            f"every sample's lookups, so the samples interact (and torch writes into the table"
            f"{', one of params' if id(table) in self.names else ''}). Rescale the looked-up vectors yourself "
            f"(h = F.embedding(ids, w); h = h * (max_norm / h.norm(dim=-1, keepdim=True)).clamp(max=1)) or do not "
            f"use the table after a max_norm lookup")

    def _rule(self, func: Any) -> Rule | None:
        """The rule that recognises ``func``, if any; none inside a transform the model runs itself
        (``torch.func.jvp`` of a layer): the saved inputs would be that transform's, dead once it returns."""
        if self.level is not None and (now := torch._C._functorch.maybe_current_level()) is not None \
                and now > self.level:
            return None
        return TABLE.get(func)

    def _tap(self, site: Site, out: Tensor) -> Tensor:
        """The tap for the next recognised call: the one the trace expected there."""
        del out
        k = len(self.statics)
        if k >= len(self.expect) or self.expect[k] != site:
            raise _Stale(f"call {k} is {site.rule.kind} on {dict(site.roles)}, the trace expected "
                         f"{self.expect[k:k + 1]}")
        assert self.taps is not None
        return self.taps[k]


#: The plan's note when a checkpointed segment ran as a plain call.
CHECKPOINT_NOTE = ("torch.utils.checkpoint runs as if not checkpointed: exact, without its memory saving",)


class _ReentrantAsPlain:
    """While a capture runs, a re-entrant ``torch.utils.checkpoint`` segment runs as a plain call.

    A re-entrant checkpoint (``use_reentrant=True``, torch's default when unspecified)
    runs its segment under ``no_grad`` through ``CheckpointFunction`` and recomputes it
    inside the backward pass, where no interceptor runs (and where ``functional_call``
    has put a module's own weights back): its calls would get no taps. Here
    ``CheckpointFunction.apply(function, preserve_rng_state, *args)`` is ``function(*args)``
    (its forward, which sees the same inputs and the same random state), so every call
    is intercepted once: exact, without the memory saving; the plan notes it. A non-re-entrant
    segment (``use_reentrant=False``, Hugging Face's default) runs so too: torch's generator that sets
    its saved-tensor hooks (which ``torch.func`` refuses) is replaced by one that sets none, keeping a
    ``context_fn``'s forward context. The patches live on the class and module while any capture runs,
    in any thread (installed by the first, removed by the last, under a lock: captures in several threads
    at once leave them as they were); a checkpoint in a thread with no capture running meanwhile takes
    torch's own.
    """

    def __init__(self, mode: _Interceptor) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        import torch.utils.checkpoint as checkpointing
        from torch.utils.checkpoint import CheckpointFunction

        global _PATCHED
        _CAPTURING.__dict__.setdefault("modes", []).append(self.mode)
        with _PATCH_LOCK:
            if _PATCHED is None:
                original = CheckpointFunction.apply  # the inherited autograd.Function.apply, bound
                generator = checkpointing._checkpoint_without_reentrant_generator

                def apply(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
                    modes = _CAPTURING.__dict__.get("modes")
                    if not modes:  # a checkpoint in a thread with no capture running
                        return original(function, preserve_rng_state, *args)
                    modes[-1].lifted_checkpoint = True
                    return function(*args)  # the segment runs once, now: the random state is the forward's own

                def plain(function: Callable, *args: Any, **kwargs: Any) -> Iterator[None]:
                    # the non-re-entrant form's set-up around the segment (checkpoint() runs the segment between
                    # this generator's two steps): no saved-tensor hooks, which torch.func refuses (the model ran
                    # one sample at a time: the loop's cost, and with dropout, masks of its own, 0.34-0.38 off
                    # torch.optim over 4 steps of Hugging Face's default checkpointing, h52); the forward context
                    # of a context_fn is kept (an autocast: h53), a selective checkpoint's caching mode is not
                    modes = _CAPTURING.__dict__.get("modes")
                    if not modes:
                        yield from generator(function, *args, **kwargs)
                        return
                    modes[-1].lifted_checkpoint = True
                    make = args[1] if len(args) > 1 else kwargs.get("context_fn")  # (checkpoint() passes it second)
                    forward = make()[0] if callable(make) and make is not checkpointing.noop_context_fn else None
                    with contextlib.nullcontext() if forward is None or isinstance(forward, TorchDispatchMode) \
                            else forward:
                        yield

                _PATCHED = (CheckpointFunction.__dict__.get("apply"), generator, 0)  # None: inherited
                CheckpointFunction.apply = staticmethod(apply)  # type: ignore[method-assign, assignment]
                checkpointing._checkpoint_without_reentrant_generator = plain  # type: ignore[assignment]
            _PATCHED = (*_PATCHED[:2], _PATCHED[2] + 1)

    def __exit__(self, *exc: Any) -> None:
        import torch.utils.checkpoint as checkpointing
        from torch.utils.checkpoint import CheckpointFunction

        global _PATCHED
        _CAPTURING.modes.pop()
        with _PATCH_LOCK:
            assert _PATCHED is not None
            before, generator, depth = _PATCHED
            _PATCHED = (before, generator, depth - 1) if depth > 1 else None
            if depth == 1:
                checkpointing._checkpoint_without_reentrant_generator = generator
                if before is None:
                    del CheckpointFunction.apply
                else:
                    CheckpointFunction.apply = before  # type: ignore[method-assign]


#: ``_ReentrantAsPlain``'s shared state: the class's own ``apply`` before the patch (``None``: inherited), the
#: non-re-entrant form's generator before it, and how many captures hold them (``_PATCHED is None``: not patched);
#: each thread's running captures. The lock also serialises the captures' math-only attention calls
#: (``sdpa_kernel`` sets process-wide flags).
_PATCH_LOCK = threading.RLock()
_PATCHED: tuple[Any, Any, int] | None = None
_CAPTURING = threading.local()


class _CheckpointsAsPlain(TorchFunctionMode):
    """A non-re-entrant ``torch.utils.checkpoint`` region (``use_reentrant=False``, HF's
    ``gradient_checkpointing_enable``) run as if not checkpointed, as the capture runs it: each call with the
    region's saved-tensor hooks lifted saves its tensors as usual, so the backward recomputes nothing (a
    recomputation runs outside ``functional_call``, with the module's own weights instead of ``params``:
    0.9 off on a Llama whose params had moved from its weights). With :class:`_ReentrantAsPlain`'s stand-in for
    torch's generator, ``torch.utils.checkpoint`` sets no hooks; this lifts those set otherwise (the composable
    ``torch.distributed._composable.checkpoint``, which holds torch's generator by name)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if (hooks := checkpoint_hooks()) is None:
            return func(*args, **kwargs)
        return lifted(hooks, lambda: func(*args, **kwargs))


@contextlib.contextmanager
def checkpoints_as_plain() -> Iterator[None]:
    """Both forms of ``torch.utils.checkpoint`` run as plain calls, for runs of ``model_fn`` that differentiate
    ``params`` with ordinary autograd (the reference loop, the training step's comparison with the batch's
    gradient): a segment recomputed in the backward runs outside ``functional_call``, with the module's own weights
    (a training step whose parameters had moved from them was refused as samples that interact, h49)."""
    with _CheckpointsAsPlain(), _ReentrantAsPlain(cast(Any, SimpleNamespace(lifted_checkpoint=False))):
        yield


def _without_checkpoint(mode: _Interceptor, hooks: tuple, func: Any, types: Any, args: tuple,
                        kwargs: dict[str, Any]) -> Any:
    """A call inside a non-re-entrant ``torch.utils.checkpoint`` region, run as if not checkpointed.

    The region's saved-tensor hooks would drop the call's saved tensors and recompute
    them in the backward pass, where no interceptor runs (and where ``functional_call``
    has put a module's own weights back). With the hooks lifted for the call, its
    tensors are saved as usual and nothing is recomputed: exact, without the memory saving.
    """
    mode.lifted_checkpoint = True
    return lifted(hooks, lambda: mode.__torch_function__(func, types, args, kwargs))


def checkpoint_hooks() -> tuple | None:
    """The innermost saved-tensor hooks if a non-re-entrant ``torch.utils.checkpoint`` region set them, else ``None``."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks if hooks is not None and "checkpoint" in getattr(hooks[0], "__qualname__", "") else None


def lifted(hooks: tuple, call: Callable[[], Any]) -> Any:
    """``call()`` with the innermost saved-tensor ``hooks`` (:func:`checkpoint_hooks`) lifted: its tensors are saved
    as usual, so the backward recomputes nothing."""
    torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        return call()
    finally:
        torch._C._autograd._push_saved_tensors_default_hooks(*hooks)


#: Rule kinds whose call returns a fresh tensor that the call itself does not save for its backward,
#: so the tap can be added in place (``expand`` returns a view of the parameter: never in place).
_FRESH = frozenset({"linear", "addmm", "matmul", "embedding", "layer_norm", "rms_norm", "group_norm",
                    "conv1d", "conv2d", "scale", "shift"})


#: Calls that turn a tensor into a Python value, i.e. data-dependent control flow.
_TO_PYTHON = TO_PYTHON


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
          *args: Any, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` as it runs outside ``vmap``; two gaps under ``vjp(vmap)``.

    - Autocast: outside ``vmap`` it casts the floating inputs to the autocast dtype;
      under ``vmap`` it does not (mixed dtypes then fail), so the cast is done here.
    - A floating ``attn_mask`` carrying gradient (a learned bias, e.g. T5's position
      bias): the batched mask reports ``requires_grad=False`` (the gradient lives one
      functorch level down), so sdpa may pick a fused CPU kernel without a derivative
      for the mask; the composite math kernel runs instead.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)

        def cast(x: Any) -> Any:
            return x.to(low) if isinstance(x, Tensor) and x.is_floating_point() else x

        query, key, value, attn_mask = cast(query), cast(key), cast(value), cast(attn_mask)
    if _needs_grad(attn_mask):
        # the backend flags are process-wide: one such call at a time, so each restores what it found
        with _PATCH_LOCK, sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)
    out = _sdpa_batched(query, key, value, attn_mask, args, kwargs)
    if out is not None:
        return out
    return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)


_sdpa.__name__ = _sdpa.__qualname__ = "scaled_dot_product_attention"


def _sdpa_batched(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, args: tuple,
                  kwargs: dict[str, Any]) -> Tensor | None:
    """sdpa on all samples at once: a batching rule for the fused CPU kernels, which have none.

    Without one, functorch runs the kernel once per sample and stacks the results
    (forward and backward; ~25% slower attention on 2 CPU cores). Here ``query``,
    ``key``, ``value`` (batched at the current ``vmap`` level, ``[b, h, T, e]`` per
    sample) are unwrapped to ``[n·b, h, T, e]``, attended in one call (recorded by
    the outer ``vjp`` as usual) and wrapped back. Only without dropout and with no
    mask or a mask shared by all samples; otherwise ``None`` (the caller falls back).
    """
    ft = torch._C._functorch
    dropout = kwargs.get("dropout_p", args[0] if args else 0.0)
    shared_mask = attn_mask is None or not (isinstance(attn_mask, Tensor) and ft.is_batchedtensor(attn_mask))
    if dropout != 0.0 or not shared_mask or query.dim() != 4:
        return None
    try:
        level = ft.maybe_current_level()
        if level is None or not all(ft.is_batchedtensor(x) and ft.maybe_get_level(x) == level
                                    for x in (query, key, value)):
            return None
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] != 1:
            return None
        flat = []
        for x in (query, key, value):
            inner, bdim = ft._unwrap_batched(x, level)
            if bdim is None:
                return None
            flat.append(inner.movedim(bdim, 0))  # [n, b, h, T, e]
        n = flat[0].shape[0]
        if any(x.shape[0] != n for x in flat):
            return None
        q, k, v = (x.flatten(0, 1) for x in flat)  # [n·b, h, T, e]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, *args, **kwargs)
        return ft._add_batch_dim(out.unflatten(0, (n, -1)), 0, level)  # back to [b, h, T, e] per sample
    except (AttributeError, RuntimeError, TypeError):  # an older or newer functorch: the per-sample loop
        return None


def _needs_grad(x: Any) -> bool:
    """A floating tensor that requires grad at some functorch level."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return False
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):
        if x.requires_grad:
            return True
        x = ft.get_unwrapped(x)
    return x.requires_grad


def _batch_level_count(x: Any) -> int:
    count = 0
    while isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
        count += int(torch._C._functorch.is_batchedtensor(x))
        x = torch._C._functorch.get_unwrapped(x)
    return count


def _per_sample(x: Tensor) -> Tensor:
    """The plain tensor under the (single) vmap level, sample axis first."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):
        x = ft.get_unwrapped(x).movedim(ft.maybe_get_bdim(x), 0) if ft.is_batchedtensor(x) else ft.get_unwrapped(x)
    return x


def _drawn(func: Any, args: tuple, kwargs: dict[str, Any], once: bool | None) -> Any:
    """``func(*args, **kwargs)``, drawn once for the batch where ``once`` (:func:`ghostfunc._draws.draw_once`); where
    ``once`` is ``None`` (a draw no sample owns, not yet drawn once) also where ``vmap`` cannot give each sample
    its own (an in-place fill of an unbatched tensor, inside ``F.gumbel_softmax`` too: it raised, and was taken for
    samples that interact)."""
    if once:
        return draw_once(func, args, kwargs)
    try:
        return func(*args, **kwargs)
    except RuntimeError as err:
        if once is None and "randomness on an unbatched tensor" in str(err):
            return draw_once(func, args, kwargs)
        raise


class DivergentBranchError(ValueError):
    """``model_fn`` branches on tensor values, the samples of a batch disagree, and the batch cannot be split."""


class _Diverged(Exception):
    """The samples of a batch gave different Python values at a data-dependent branch point.

    ``values``: one per sample (in batch order); ``ordinal``: which branch point of
    the run (1 for the first); ``call``: the call that asked (``Tensor.__bool__``...).
    The caller splits the batch by these values (:mod:`ghostfunc._groups`).
    """

    def __init__(self, values: list, ordinal: int, call: str) -> None:
        super().__init__(f"{call} at branch point {ordinal} gave per-sample values {values[:8]}")
        self.values, self.ordinal, self.call = values, ordinal, call
        self.batch = 0  # set by capture_batches: the position of the diverging batch among its batches


def _agreed_value(func: Any, args: tuple, kwargs: dict[str, Any], ordinal: int = 0) -> Any:
    """Data-dependent control flow under vmap: the answer if every sample gives the same one.

    Each sample alone (the single-sample reference) would take the branch its own
    value picks; when all agree, that branch is exact for the whole batch. When
    they disagree it raises :class:`_Diverged` with every sample's value, and the
    caller runs the samples in groups that agree.
    """
    if any(_batch_level_count(a) for a in pytree.tree_leaves((args[1:], kwargs))):
        return func(*args, **kwargs)  # let functorch raise its own error
    values = [func(row, *args[1:], **kwargs) for row in _per_sample(args[0])]
    if any(repr(v) != repr(values[0]) for v in values[1:]):  # by repr, as the groups are keyed (nan agrees)
        raise _Diverged(values, ordinal, _short_name(func))
    return values[0]


def _short_name(func: Any) -> str:
    attribute = _attribute(func)
    return attribute or getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _attribute(func: Any) -> str | None:
    """``"Tensor.T"`` for the getter of a tensor attribute (what ``__torch_function__`` sees for ``w.T``,
    ``w.mT``, ``x.shape``: a ``getset_descriptor``'s ``__get__``), else ``None``."""
    if getattr(func, "__name__", None) == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", None)
        if isinstance(name, str):
            return f"Tensor.{name}"
    return None


#: Argument types that hold no tensor (skipped without a pytree walk).
_ATOMS = (int, float, bool, complex, str, bytes, type(None), type(Ellipsis), slice, torch.dtype, torch.device,
          torch.layout, torch.memory_format)


#: Argument types looked up directly by :func:`params_among`: tensors (by id) and types that hold none.
_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})
_ATOM_TYPES = frozenset({*_ATOMS, torch.Size})


#: A 2-D tensor's transpose: ``w.T``, ``w.mT``, ``w.t()``, ``torch.t(w)``, ``w.transpose(0, 1)``.
TRANSPOSES = frozenset({inspect.getattr_static(Tensor, "T").__get__, inspect.getattr_static(Tensor, "mT").__get__,
                        Tensor.t, torch.t, Tensor.transpose, torch.transpose})
_MATMULS = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm})


class Transposed:
    """The transposed views of 2-D parameters one run of the model takes, and what it does with them.

    ``x @ w.T`` (a tied output layer written by hand, say) is ``F.linear(x, w)``: a matmul
    whose right operand is such a view runs as that linear call, which a rule recognises
    (same numbers; the call that made the view is not a use of ``w`` by itself). Any other
    call that receives the view is a use of ``w`` that no rule knows.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # id(view) -> the parameter's name
        self.held: dict[int, tuple[Tensor, Tensor]] = {}  # id(view) -> (the parameter, the view, kept alive)

    def see(self, func: Any, args: tuple, kwargs: dict[str, Any],
            names: dict[int, str]) -> tuple[Tensor | None, Any, tuple, dict[str, Any], list[str]]:
        """One call, before the interceptor classifies it: ``(view, func, args, kwargs, viewed)``.

        ``view``: the call transposed a 2-D parameter (the caller returns it as is); else the call to
        classify (``matmul(x, w.T)`` as ``F.linear(x, w)``) and ``viewed``, the parameters whose
        transposes it receives otherwise (uses no rule knows).
        """
        if func in TRANSPOSES and (view := self._made(func, args, kwargs, names)) is not None:
            return view, func, args, kwargs, []
        if not self.names:
            return None, func, args, kwargs, []
        if func in _MATMULS and len(args) == 2 and not kwargs and id(args[1]) in self.names:
            func, args = F.linear, (args[0], self.held[id(args[1])][0])
        return None, func, args, kwargs, [self.names[id(v)] for v in params_among(args, kwargs, self.names)]

    def _made(self, func: Any, args: tuple, kwargs: dict[str, Any], names: dict[int, str]) -> Tensor | None:
        if not args or type(args[0]) not in _TENSOR_TYPES or id(args[0]) not in names or args[0].dim() != 2:
            return None
        if func in (Tensor.transpose, torch.transpose):
            dims = (*args[1:], *kwargs.values())
            if len(dims) != 2 or not all(isinstance(d, int) for d in dims) or {d % 2 for d in dims} != {0, 1}:
                return None
        elif kwargs or len(args) != 1:
            return None
        view = func(*args, **kwargs)
        self.names[id(view)], self.held[id(view)] = names[id(args[0])], (args[0], view)
        return view


def params_among(args: tuple, kwargs: dict[str, Any], names: dict[int, str]) -> list[Tensor]:
    """:func:`_params_in` of a call's ``(args, kwargs)``, without a walk when every argument is a plain tensor
    or holds none (most calls: on a small model a few microseconds per call is much of the forward)."""
    found = []
    for x in (*args, *kwargs.values()) if kwargs else args:
        kind = type(x)
        if kind in _TENSOR_TYPES:
            if id(x) in names:
                found.append(x)
        elif kind not in _ATOM_TYPES:
            return _params_in((args, kwargs), names)
    return found


def _params_in(tree: Any, names: dict[int, str]) -> list[Tensor]:
    """The trainable parameters among the tensor leaves of ``tree`` (in ``pytree.tree_leaves`` order).

    Every call of every torch function inside the model comes through here, so plain
    tensors, lists, tuples and dicts are walked directly (a generic pytree walk was a
    third of graddot's time on small models); anything else still goes through
    ``pytree.tree_leaves``, so a parameter inside a registered container is never missed.
    """
    found: list[Tensor] = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, Tensor):
            if id(x) in names:
                found.append(x)
        elif isinstance(x, (tuple, list)) and type(x) in (tuple, list, torch.Size):
            stack.extend(reversed(x))
        elif type(x) is dict:
            stack.extend(reversed(list(x.values())))
        elif not isinstance(x, _ATOMS):
            found.extend(t for t in pytree.tree_leaves(x) if isinstance(t, Tensor) and id(t) in names)
    return found


def matched_roles(match: Match | None, names: dict[int, str], found: list[Tensor]) -> dict[str, str]:
    """Role -> parameter name for the trainable parameters a rule's ``match`` recognised; each is removed
    from ``found`` (what remains was used some other way)."""
    roles: dict[str, str] = {}
    if match is not None:
        for role, t in match.roles.items():
            name = names.get(id(t))
            if name is not None:
                roles[role] = name
                for i, f in enumerate(found):
                    if f is t:
                        del found[i]
                        break
    return roles


#: Conversions that return their tensor itself when there is nothing to convert (``w.to(w.dtype)``,
#: ``w.float()`` on a float32 ``w``, ``w.cpu()`` on the CPU, ``+w``). Eagerly that is the parameter object; under
#: ``vmap`` and ``grad`` it is a new wrapper of it. Both count as the parameter itself (see :func:`unchanged`).
CONVERSIONS = frozenset({Tensor.to, Tensor.type, Tensor.type_as, Tensor.float, Tensor.double, Tensor.half,
                         Tensor.bfloat16, Tensor.cpu, Tensor.cuda, Tensor.contiguous, Tensor.__pos__, torch.positive,
                         Tensor.positive})


def unchanged(out: Any, param: Tensor, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether ``out`` (a :data:`CONVERSIONS` call's result on ``param``) is ``param`` as it was: the same object,
    or a tensor of its dtype, device, shape and strides (a wrapper of the same values). Not ``w.to(..., copy=True)``:
    a copy the model may write into."""
    if out is param:
        return True
    flags = [a for a in args[1:] if isinstance(a, bool)]  # to(dtype | device[, dtype] | other, non_blocking, copy)
    if kwargs.get("copy") or (len(flags) >= 2 and flags[1]):  # a copy asked for
        return False
    return (type(out) in _TENSOR_TYPES and out.dtype == param.dtype and out.device == param.device
            and out.shape == param.shape and out.stride() == param.stride())


def _makes_tensor(out: Any, found: list[Tensor]) -> bool:
    if type(out) in _TENSOR_TYPES:  # most calls return one tensor: no pytree walk
        return not any(out is f for f in found)
    return any(isinstance(o, Tensor) and not any(o is f for f in found) for o in pytree.tree_leaves(out))


def holds_tensor(tree: Any) -> bool:
    """Whether ``tree`` (an index, say) has a tensor among its leaves (``pytree.tree_leaves``): plain
    tuples, lists and atoms are walked directly (a generic pytree walk costs microseconds per call)."""
    kind = type(tree)
    if kind in _TENSOR_TYPES:
        return True
    if kind in _ATOM_TYPES:
        return False
    if kind is tuple or kind is list:
        return any(holds_tensor(x) for x in tree)
    return any(isinstance(t, Tensor) for t in pytree.tree_leaves(tree))


def _name(func: Any) -> str:
    attribute = _attribute(func)
    if attribute:
        return attribute
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None) or ""
    return f"{mod}.{qual}" if mod and not qual.startswith(mod) else qual


def _one_loss(losses: Any, where: str) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (1,):
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{where}: model_fn(params, batch) must return one loss per sample, a tensor of shape [B]; "
            f"for one sample alone (ghostfunc runs each sample as a batch of 1) it returned {got}"
        )
    if not losses.is_floating_point():
        raise ValueError(f"{where}: model_fn must return floating-point losses, got {losses.dtype}")
    return losses[0]


def _unsqueeze_all(tensors: list[Tensor]) -> list[Tensor]:
    return [t.unsqueeze(0) for t in tensors]


_TRACES: ByModel[Any, dict[tuple, Trace]] = ByModel()


def trace(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, where: str, *, fresh: bool = False) -> Trace:
    """Run ``model_fn`` on the first sample of ``batch`` and record its parametrised calls."""

    def compute() -> Trace:
        names = {id(v): k for k, v in params.items()}
        mode = _Interceptor(names)

        def one(tensors: list[Tensor]) -> Tensor:
            with mode:
                losses = model_fn(dict(params), batch.rebuild(_unsqueeze_all(tensors)))
            return _one_loss(losses, where)

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # gradients on, as in the capture (under vjp) and a plain step: a model that reads the mode takes the same
        # calls (Hugging Face's checkpointed layers run their segments only with gradients on; no tensor here needs
        # a gradient, so no graph is built)
        with fork_rng(devices), torch.enable_grad(), _rephrase(where):
            torch.func.vmap(one, randomness="different")([t[:1] for t in batch.tensors])
        return Trace(tuple(mode.sites), mode.other_uses, CHECKPOINT_NOTE if mode.lifted_checkpoint else ())

    return cached_trace(model_fn, params, batch, "vmap", fresh, compute)


def cached_trace(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, how: str, fresh: bool,
                 compute: Callable[[], Trace]) -> Trace:
    """``compute()``, cached per ``model_fn`` by parameter and batch signature, the modules' flags, classes and
    hooks (:func:`ghostfunc._interact.training_flags`: a hook taken off leaves no stale use behind) and ``how``
    it was traced."""
    key = (param_signature(params), batch.signature, training_flags(model_fn), how)
    try:
        cache = _TRACES.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: trace every call
        cache = {}
    if not fresh and key in cache:
        return cache[key]
    result = compute()
    remember(cache, key, result)
    return result


@contextlib.contextmanager
def on_batch(where: str, what: str) -> Iterator[None]:
    """An error of the model's own (or torch's) raised inside says where it came from: a note (PEP 678,
    shown under the traceback; the message is unchanged) ``"{where}: model_fn raised this on {what}"``, e.g.
    ``"the val batch (4 samples, run together)"`` or ``"train sample 3"``. ghostfunc's own errors name
    their batch in the message; the innermost note wins (a per-sample run inside a batch's)."""
    try:
        yield
    except Exception as err:
        note_batch(err, where, what)
        raise


def note_batch(err: BaseException, where: str, what: str) -> None:
    """Add :func:`on_batch`'s note to ``err`` unless it is ghostfunc's own or already has one."""
    if type(err).__module__.partition(".")[0] == "ghostfunc" or not hasattr(err, "add_note"):
        return
    if not any(note.startswith(f"{where}: model_fn raised this on ") for note in getattr(err, "__notes__", ())):
        err.add_note(f"{where}: model_fn raised this on {what}")


@contextlib.contextmanager
def second_derivative(where: str, why: str, way_out: str) -> Iterator[None]:
    """Differentiating ``model_fn`` twice (``why``): torch's error for a call without a second derivative
    (``F.embedding_bag``'s backward) as ``NotImplementedError`` naming ``where`` and ``way_out``."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        if "derivative for" not in str(err) or "not implemented" not in str(err):
            raise
        raise NotImplementedError(f"{where}: {why}, and torch has no second derivative for one of its calls "
                                  f"({str(err).strip().splitlines()[0]}); {way_out}") from err


class _rephrase:
    """Turn errors from inside the model into ones that name the public function.

    Also silences functorch's notice that an op has no batching rule (it then
    loops over samples: slower, still exact), e.g. CPU flash attention.
    """

    def __init__(self, where: str, splits: bool = False) -> None:
        self.where = where
        self.splits = splits  # the caller splits diverging batches (else divergence is refused here)
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        self._warnings.__exit__(None, None, None)
        if isinstance(err, _Diverged) and not self.splits:
            shown = f"{err.values[:8]}{'...' if len(err.values) > 8 else ''}"
            raise DivergentBranchError(
                f"{self.where}: model_fn turns a tensor into a Python value ({err.call}) and the samples of the "
                f"batch disagree (values {shown}); this computation runs the whole batch in one pass "
                f"and cannot split it into groups that agree. Compute the branch with tensor ops "
                f"(torch.where) or pass batches whose samples take the same branch"
            ) from None
        for kind in (SamplesInteractError, DivergentBranchError, InPlaceWriteError):
            if isinstance(err, kind) and not str(err).startswith(self.where):
                raise kind(f"{self.where}: {err}") from None
        if isinstance(err, RuntimeError) and "vmap" in str(err) and ("inplace" in str(err) or "in-place" in str(err)):
            raise SamplesInteractError(
                f"{self.where}: the model writes batch-dependent values into a tensor shared by all "
                f"samples (for example BatchNorm running statistics), so samples interact; "
                f"put such layers in eval mode. The underlying error was: {err}"
            ) from err
        return None


class Captured(NamedTuple):
    """Everything one backward pass gives, split by train and val rows.

    ``grads[name] = (train_uses, val_uses)``: lists of :class:`Factored` or
    :class:`Direct` per-sample gradients, one per use of the parameter.
    """

    train_loss: Tensor
    val_loss: Tensor
    grads: dict[str, tuple[list[Factored | Direct], list[Factored | Direct]]]


class Half(NamedTuple):
    """One batch's share of a capture: per-sample ``loss`` ``[B]`` and, per parameter, one per-sample
    gradient (:class:`Factored` or :class:`Direct`) per use."""

    loss: Tensor
    grads: dict[str, list[Factored | Direct]]


def capture_batches(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
                    traces: Sequence[Trace], kernel: set[str], where: str,
                    labels: Sequence[str] = ("train", "val"), rows: Sequence[Tensor | None] = (),
                    plain_draws: bool = False) -> list[Half]:
    """One forward over each batch (each under ``vmap``) and one tap backward over all of them.

    ``traces[b]`` is the trace of ``batches[b]``; ``labels`` name the batches in errors,
    ``rows[b]`` (optional) the positions of ``batches[b]``'s samples in the batch the user passed.
    A data-dependent branch on which a batch's samples disagree raises :class:`_Diverged`
    with ``batch`` set to that batch's position in ``batches``.
    Calling it once per batch instead of once for all gives the same numbers with
    the memory of one batch at a time (a caller that reduces each batch before the next).
    ``plain_draws`` (a model that draws random numbers): each batch first runs plainly without gradients, in
    order, and its dropout calls take that run's masks (:mod:`ghostfunc._draws`).
    """
    device = next(iter(params.values())).device
    recorded = _recorded(model_fn, params, batches, device) if plain_draws else None
    if recorded is None:
        return _capture_batches(model_fn, params, batches, traces, kernel, where, labels, rows, None)
    try:
        return _capture_batches(model_fn, params, batches, traces, kernel, where, labels, rows, recorded)
    except NoReplay:
        set_rng_state(device, recorded[0].start)  # as vmap draws, from where the batches began
        return _capture_batches(model_fn, params, batches, traces, kernel, where, labels, rows, None)


def _recorded(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
              device: torch.device) -> list[Recorded] | None:
    """Every batch run plainly, in order (:func:`ghostfunc._draws.record`), the generator back where the first
    began; ``None`` when a run raised or no dropout call drew."""
    out: list[Recorded] = []
    for batch in batches:
        rec = record(model_fn, params, batch, device, eager_stance)
        if rec is None:
            break
        out.append(rec)
    if out:
        set_rng_state(device, out[0].start)
    return out if len(out) == len(batches) and any(r.masks for r in out) else None


def _capture_batches(model_fn: ModelFn, params: Mapping[str, Tensor], batches: Sequence[Batch],
                     traces: Sequence[Trace], kernel: set[str], where: str, labels: Sequence[str],
                     rows: Sequence[Tensor | None], recorded: list[Recorded] | None) -> list[Half]:
    device = next(iter(params.values())).device
    names = {id(params[k]): k for k in kernel}
    fallback = [k for k in params if k not in kernel]
    expect = [tuple(_keep(tr.sites, kernel)) for tr in traces]
    statics: list[list[Any]] = [[] for _ in batches]

    def per_sample(which: int) -> Callable:
        def f(taps: tuple[Tensor, ...], fb: tuple[Tensor, ...], tensors: list[Tensor]) -> tuple[Tensor, tuple]:
            mode = _Interceptor(names, taps, expect[which])
            if recorded is not None and recorded[which].masks:
                mode.replay = Replay(recorded[which], batches[which].size)
            try:
                with mode:
                    losses = model_fn({**params, **dict(zip(fallback, fb, strict=True))},
                                      batches[which].rebuild(_unsqueeze_all(tensors)))
            except _Diverged as err:
                err.batch = which  # which batch to split
                raise
            if len(mode.statics) != len(expect[which]):
                raise _Stale(f"{len(mode.statics)} recognised calls, the trace had {len(expect[which])}")
            refuse_rewritten(mode.versions, where)
            statics[which] = mode.statics
            return _one_loss(losses, where), tuple(mode.saved)

        return f

    def run(taps: tuple, fbs: tuple) -> tuple:
        outs = []
        for b, (t, fb, batch) in enumerate(zip(taps, fbs, batches, strict=True)):
            if recorded is not None:
                set_rng_state(device, recorded[b].start)  # each batch's draws begin where its plain run's did
            whole = not rows or rows[b] is None
            with on_batch(where, f"the {labels[b]} batch ({batch.size} samples, run together)" if whole
                          else f"{batch.size} samples of the {labels[b]} batch, run together"):
                outs.append(torch.func.vmap(per_sample(b), randomness="different")(t, fb, batch.tensors))
            if recorded is not None:
                set_rng_state(device, recorded[b].end)
        return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    def zeros(sites: tuple[Site, ...], n: int) -> tuple[Tensor, ...]:
        device = next(iter(params.values())).device
        return tuple(torch.zeros((), dtype=s.out_dtype, device=device).expand(n, *s.out_shape) for s in sites)

    def copies(n: int) -> tuple[Tensor, ...]:
        return tuple(params[k].expand(n, *params[k].shape) for k in fallback)

    taps = tuple(zeros(e, b.size) for e, b in zip(expect, batches, strict=True))
    fbs = tuple(copies(b.size) for b in batches)
    with _rephrase(where, splits=True):
        losses, pullback, saved = torch.func.vjp(run, taps, fbs, has_aux=True)  # type: ignore[misc]
    for b, (loss, label) in enumerate(zip(losses, labels, strict=True)):
        _check_finite(loss, label, where, rows[b] if rows else None)
    # One backward: free each saved activation once used (as an ordinary backward does) and record no
    # graph of the backward itself; otherwise every activation lives until the end (~1.3x peak memory).
    b_outs, b_fbs = pullback(tuple(torch.ones_like(x) for x in losses), retain_graph=False, create_graph=False)
    del pullback
    halves = []
    for which, (sites, mine_all, outs, fb_grads) in enumerate(zip(expect, saved, b_outs, b_fbs, strict=True)):
        grads: dict[str, list[Factored | Direct]] = {k: [] for k in params}
        at = 0
        for site, (static, count), out in zip(sites, statics[which], outs, strict=True):
            # (detached, as the eager and whole-batch captures' are: an input computed from a tensor outside
            # params that requires grad, a frozen table left requiring it, kept its graph, and the ghost kernel's
            # in-place centring raised, h69)
            mine, at = tuple(s.detach() for s in mine_all[at:at + count]), at + count
            for role, name in site.roles:
                shape = params[name].shape
                g = site.rule.grad(static, mine, out, role, shape)
                grads[name].append(_in_dtype(g, params[name].dtype))
        for k, g in zip(fallback, fb_grads, strict=True):
            grads[k].append(Direct(dense(g)))
        halves.append(Half(losses[which].detach(), grads))
    return halves


def per_sample_losses(model_fn: ModelFn, batch: Batch, where: str, recorded: Recorded | None = None,
                      label: str = "val") -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``params -> losses [B]`` with every sample run alone (under ``vmap``), as the capture runs it.

    Differentiable in ``params`` by any ``torch.func`` transform; with ``params``
    unbatched, a reverse pass gives ``Σ_v c_v g_v`` for a cotangent ``c`` at the
    cost of one ordinary backward pass (no taps, no per-sample factors). Calls are
    intercepted only for attention batching and data-dependent control flow, and, with
    ``recorded`` (a plain run of ``batch``), dropout calls take its masks (:mod:`ghostfunc._draws`).
    ``label`` names the batch in a note on the model's own errors (:func:`on_batch`).
    """

    def one(params: Mapping[str, Tensor], tensors: list[Tensor]) -> Tensor:
        mode = _Interceptor({})
        if recorded is not None and recorded.masks:
            mode.replay = Replay(recorded, batch.size)
        with mode:
            losses = model_fn(dict(params), batch.rebuild(_unsqueeze_all(tensors)))
        return _one_loss(losses, where)

    def losses(params: Mapping[str, Tensor]) -> Tensor:
        if recorded is not None:
            set_rng_state(recorded.device, recorded.start)
        with on_batch(where, f"the {label} batch ({batch.size} samples, run together)"):
            out = torch.func.vmap(one, in_dims=(None, 0), randomness="different")(params, batch.tensors)
        if recorded is not None:
            set_rng_state(recorded.device, recorded.end)
        return out

    return losses


def weighted_grad(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, weights: Tensor, where: str,
                  label: str) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`weighted_grad_split` without the note on how the batch ran."""
    grads, losses, _ = weighted_grad_split(model_fn, params, batch, weights, where, label)
    return grads, losses


def weighted_grad_split(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, weights: Tensor, where: str,
                        label: str, plain_draws: bool = False) -> tuple[dict[str, Tensor], Tensor, str | None]:
    """``Σ_v w_v g_v`` for every parameter, by one ordinary backward pass, and the losses ``[B]``.

    What a reduced validation gradient needs when no parameter takes the ghost
    path: the same numbers as reducing the captured per-sample factors, with the
    cost and memory of ``loss.backward()`` on the batch. ``label`` names the batch in errors.
    Samples that diverge at a data-dependent branch run in groups that agree
    (:func:`ghostfunc._groups.split_sum`); a model the batched run cannot transform
    runs sample by sample with ordinary autograd (:func:`ghostfunc._eager.weighted_grad_eager`).
    Returns the gradient, the losses ``[B]`` and a note for the plan (``None``: one batched pass).
    ``plain_draws``: as in :func:`capture_batches` (an unsplit batch takes a plain run's dropout masks).
    """
    scale = common_weight(weights)
    if scale is not None and scale != 1.0:  # a mean: the unit-weight sum, scaled after its backward
        grads, losses, note = weighted_grad_split(model_fn, params, batch, torch.ones_like(weights), where, label,
                                                  plain_draws)
        return {k: g * scale for k, g in grads.items()}, losses, note
    from . import _whole as whole_batch
    from ._eager import summary, unbatchable, weighted_grad_eager  # both build on this module
    from ._groups import WHOLE, Part, describe, split_sum

    def one(part_batch: Batch, part: Part) -> tuple[dict[str, Tensor], Tensor]:
        w = weights if part.rows is None else weights[part.rows.to(weights.device)]
        device = next(iter(params.values())).device
        recorded = _recorded(model_fn, params, [part_batch], device) if plain_draws and part.rows is None else None
        try:
            with _rephrase(where, splits=True):
                losses, pullback = torch.func.vjp(per_sample_losses(  # type: ignore[misc]
                    model_fn, part_batch, where, recorded[0] if recorded else None, label), dict(params))
        except NoReplay:
            assert recorded is not None
            set_rng_state(device, recorded[0].start)  # as vmap draws
            with _rephrase(where, splits=True):
                losses, pullback = torch.func.vjp(per_sample_losses(  # type: ignore[misc]
                    model_fn, part_batch, where, None, label), dict(params))
        _check_finite(losses, label, where, part.rows)
        (grads,) = pullback(w.to(losses.dtype), retain_graph=False, create_graph=False)
        return grads, losses.detach()

    def per_sample() -> tuple[dict[str, Tensor], Tensor, tuple[Part, ...]]:
        return split_sum(one, batch)

    def whole() -> tuple[dict[str, Tensor], Tensor, tuple[Part, ...]]:
        return (*whole_batch.weighted_grad(model_fn, params, batch, weights, where, label), WHOLE)

    try:
        grads, losses, parts = whole_batch.verified(
            model_fn, params, whole_batch.signature(params, (batch,), "weighted"), per_sample, whole,
            lambda a, b: whole_batch.same_run(a[:2], b[:2]) and len(a[2]) == 1, lambda a: [a[1]])
        note = describe(parts, label, "one forward and backward per group")
        if parts != WHOLE:  # (the call's comparisons of samples that interact go group by group)
            keep_in_call("parts", batch, parts)
    except RuntimeError as err:
        if not unbatchable(err):
            raise
        grads, losses = weighted_grad_eager(model_fn, params, batch, weights, where, label)
        note = f"{label}: per-sample autograd (the batched pass cannot run the model: {summary(err)})"
    return {k: dense(g) for k, g in grads.items()}, losses, note


def common_weight(weights: Tensor) -> float | None:
    """The one value of ``weights`` when they are all equal (``1/m``: a mean), else ``None``.

    A weighted gradient ``Σ_v w_v g_v`` with equal weights is taken as ``w·Σ_v g_v``:
    the backward then runs at the samples' own scale, as each sample's backward in
    the single-sample loop does, so a lower-precision step inside a model (a float32
    norm in a float64 model) rounds every sample's gradient as the loop does, instead
    of rounding ``w·g_v`` (about 1e-8 apart in float64 with a float32 island).
    """
    if weights.numel() == 0 or not bool((weights == weights[0]).all()):
        return None
    return float(weights[0])


def dense(g: Tensor) -> Tensor:
    """A gradient as a plain (strided) tensor: a sparse one (``F.embedding_bag(..., sparse=True)``) could not be
    summed into a batch's rows (``Cannot assign to a sparse tensor``)."""
    return g if g.layout is torch.strided else g.to_dense()


def _in_dtype(g: Factored | Direct, dtype: torch.dtype) -> Factored | Direct:
    """A per-sample gradient in its parameter's dtype.

    Under autocast an op's saved input and output gradient can differ (a float32
    input, a bfloat16 output gradient); autograd returns a float32 parameter's
    gradient in float32, and so do the kernels.
    """

    def cast(x: Tensor) -> Tensor:
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    if isinstance(g, Direct):
        return g if g.grad.dtype == dtype else Direct(cast(g.grad))
    if g.right.dtype == dtype and (g.left.dtype == dtype or not g.left.is_floating_point()):
        return g
    return g._replace(left=cast(g.left), right=cast(g.right))


def _keep(sites: tuple[Site, ...], kernel: set[str]) -> list[Site]:
    kept = []
    for s in sites:
        roles = tuple((r, n) for r, n in s.roles if n in kernel)
        if roles:
            kept.append(s._replace(roles=roles))
    return kept


def _check_finite(losses: Tensor, which: str, where: str, rows: Tensor | None = None) -> None:
    """Refuse non-finite losses, naming the samples (``rows``: their positions in the user's batch)."""
    if bool(torch.isfinite(losses).all()):
        return
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        where_bad = bad.nonzero().flatten()
        idx = (where_bad if rows is None else rows.to(where_bad.device)[where_bad]).tolist()
        raise FloatingPointError(
            f"{where}: model_fn returned non-finite losses for {which} samples {idx} "
            f"(values {losses[bad].tolist()}); per-sample gradients of those samples are undefined. Run "
            f"model_fn(params, batch) on those rows to see where it comes from (a transformers model in float64 "
            f"with left padding: Bloom, Falcon with ALiBi and MPT give a padded row NaN themselves; use float32 "
            f"or right padding)"
        )
