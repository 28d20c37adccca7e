"""``graddot`` and ``plan``: the public entry points over capture, plan and kernels."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from . import _calibrate, _dist, _whole
from . import _kernels as K
from ._bymodel import ByModel
from ._capture import (
    Batch,
    Captured,
    Half,
    ModelFn,
    Site,
    Trace,
    _Diverged,
    _keep,
    _Stale,
    capture_batches,
    checkpoints_as_plain,
    on_batch,
    trace,
    weighted_grad_split,
)
from ._checks import check_compile, check_model_fn, check_options, check_pair, check_params
from ._draws import ONCE, fork_rng, host_states, same_host_states, set_host_states
from ._eager import capture_eager, summary, trace_eager, unbatchable
from ._groups import WHOLE, Part, describe, merge_halves, refine, split, subset
from ._interact import (
    _UsesAndDtypes,
    behaviour,
    check_model,
    coarsest,
    copies_losses,
    counted_over_batch,
    eager_stance,
    fine_copies,
    group_named,
    in_one_call,
    keep_in_call,
    kept_in_call,
    param_signature,
    refuse_batch_losses,
    refuse_coupled_draws,
    remember,
    run_with_grads,
    steady_settings,
    still_zero,
    training_flags,
    zero_params,
)
from ._ops import Direct, Factored
from ._plan import DIRECTION, Plan, Usage, candidate_policies, contenders, make_plan, usages
from ._whole import rng_state as _rng_state
from ._whole import set_rng_state as _set_rng_state

R = TypeVar("R")


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


class Attempt:
    """What the retry loop of :func:`retry_stale` has learnt so far about one call.

    ``fresh``: trace again instead of using cached traces; ``parts``: how each
    batch (train, val) is split at data-dependent branches (:mod:`ghostfunc._groups`);
    ``eager``: why the batched capture cannot run the model (then every sample
    runs alone with ordinary autograd, :mod:`ghostfunc._eager`), else ``None``.
    It is handed to ``attempt`` in place of a ``fresh`` flag and is truthy iff ``fresh``.
    """

    def __init__(self, fresh: bool = False, parts: tuple[tuple[Part, ...], tuple[Part, ...]] = (WHOLE, WHOLE),
                 eager: str | None = None) -> None:
        self.fresh, self.parts, self.eager = fresh, parts, eager

    def __bool__(self) -> bool:
        return self.fresh

    def but(self, **changes: Any) -> Attempt:
        return Attempt(**{"fresh": self.fresh, "parts": self.parts, "eager": self.eager, **changes})


class _Resplit(Exception):
    """A part of batch ``which`` diverged at a branch: split it and run again."""

    def __init__(self, which: int, part: Part, err: _Diverged) -> None:
        super().__init__(str(err))
        self.which, self.part, self.err = which, part, err


class _Retry(Exception):
    """Run the attempt again from ``state`` (what was learnt part-way through it)."""

    def __init__(self, state: Attempt) -> None:
        super().__init__("retry")
        self.state = state


class _Unbatchable(Exception):
    """The batched capture cannot run the model: run it sample by sample (``error`` says why)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def retry_stale(where: str, attempt: Callable[[Any], Any]) -> Any:
    """``attempt(state)`` until it runs, ``state`` an :class:`Attempt` (truthy iff traces must be fresh).

    A stale cached trace (:class:`_Stale`) is refreshed once, then it is an error;
    a batch whose samples diverge at a branch is split and run again (each split
    is finer, so this ends); a model the batched capture cannot run switches to
    the per-sample path once.
    """
    state = Attempt()
    while True:
        try:
            return attempt(state)
        except _Stale as err:
            if state.fresh:
                raise RuntimeError(
                    f"{where}: model_fn made different parametrised calls on two runs with the same input "
                    f"shapes; ghostfunc needs the calls to depend on shapes only (or on values each sample holds). "
                    f"A branch on a random draw does this, LayerDrop's `if torch.rand(()) < p: skip the layer` "
                    f"(Whisper, BART, wav2vec2 in training mode): set its probability to 0 (e.g. "
                    f"config.encoder_layerdrop = config.decoder_layerdrop = 0.0) or use model.eval(); so does a "
                    f"branch on a counter or a clock. Where the calls parted: {err}"
                ) from None
            state = state.but(fresh=True)
        except _Resplit as split:
            parts = list(state.parts)
            parts[split.which] = refine(parts[split.which], split.err, split.part)
            state = state.but(parts=tuple(parts))
        except _Retry as again:
            state = again.state
        except _Unbatchable as err:
            if state.eager is not None:
                raise err.error from None
            state = state.but(eager=summary(err.error))


class Routing(NamedTuple):
    """The traces of both batches, the parameters the kernels handle, and the plan.

    ``traces``: the first part's trace of each batch; ``part_traces[w][j]``: the
    trace of part ``parts[w][j]`` of batch ``w``; ``eager``: why the batches run
    sample by sample (``None``: batched).
    """

    traces: tuple[Trace, Trace]
    kernel: set[str]
    plan: Plan
    parts: tuple[tuple[Part, ...], tuple[Part, ...]] = (WHOLE, WHOLE)
    part_traces: tuple[tuple[Trace, ...], tuple[Trace, ...]] = ((), ())
    eager: str | None = None


def routing(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
            val_reduce: str | None, fresh: bool | Attempt) -> Routing:
    """Trace (cached) every part of both batches and route every parameter.

    ``fresh`` is a flag or the :class:`Attempt` of :func:`retry_stale`. When the
    batched trace cannot run the model, the per-sample trace runs instead.
    """
    state = fresh if isinstance(fresh, Attempt) else Attempt(bool(fresh))
    known = (param_signature(params), train.signature, val.signature,
             training_flags(model_fn))  # e.g. HF checkpointing runs in training mode only
    tuned = (_calibrate.tuned(model_fn, _calibrate.route_key(model_fn, params, train, val, val_reduce))
             if policy == "auto" else None)
    first = next(iter(params.values()))
    used = (tuned, _calibrate.constants(first.device, first.dtype))  # what make_plan routes by, besides shapes
    memo_key = (known, train.size, val.size, policy, val_reduce, tuned is None)  # auto, or by the cost model
    memo = _routed(model_fn)
    if state.eager is None and state.parts == (WHOLE, WHOLE):
        if not state.fresh and (hit := memo.get(memo_key)) is not None and hit[0][0] is tuned and hit[0][1] == used[1]:
            return hit[1]
    else:
        memo.pop(memo_key, None)
    r = _route(model_fn, params, train, val, where, policy, val_reduce, state, known, tuned)
    if r.eager is None and r.parts == (WHOLE, WHOLE):
        remember(memo, memo_key, (used, r))
    return r


#: ``model_fn`` -> {(signatures, sizes, policy, val_reduce): ((the measured choice and cost constants it used),
#: :class:`Routing`)}. A later call of the same signature reuses the routing (the traces are the cached ones,
#: and a stale one is caught by the capture as before, whose retry routes afresh and replaces the entry).
_ROUTED: ByModel[Any, dict[tuple, tuple[Any, Routing]]] = ByModel()


def _routed(model_fn: ModelFn) -> dict[tuple, tuple[Any, Routing]]:
    try:
        return _ROUTED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: route every call
        return {}


def _route(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
           val_reduce: str | None, state: Attempt, known: tuple, tuned: Any) -> Routing:
    batches = (train, val)
    eager = state.eager or _UNBATCHABLE_SEEN.get(model_fn, {}).get(known) if _weakrefable(model_fn) else state.eager
    part_traces: tuple[tuple[Trace, ...], ...] = ((), ())
    if eager is None:
        try:
            part_traces = tuple(tuple(_traced(model_fn, params, subset(b, p), where, state.fresh,
                                              ("train", "val")[w] if p.rows is None else None)
                                      for p in state.parts[w]) for w, b in enumerate(batches))
        except RuntimeError as err:
            if not unbatchable(err):
                raise
            eager = summary(err)
    parts = state.parts
    if eager is not None:
        if _weakrefable(model_fn):  # later calls with these shapes go straight to the per-sample path
            remember(_UNBATCHABLE_SEEN.setdefault(model_fn, {}), known, eager)
        parts = (WHOLE, WHOLE)
        part_traces = tuple((_traced_alone(model_fn, params, b, where, state.fresh, label),)
                            for b, label in zip(batches, ("train", "val"), strict=True))
    for w, b in enumerate(batches):  # a split batch's groups, for this call's whole-batch comparison
        if parts[w] != WHOLE:
            keep_in_call("parts", b, parts[w])
    use = _merged_usages(params, part_traces[0], part_traces[1])
    kernel = {k for k, u in use.items() if u.form is not None}
    notes = [note for w, label in enumerate(("train", "val")) if (note := describe(parts[w], label))]
    notes.extend(dict.fromkeys(note for traces in part_traces for tr in traces for note in tr.notes))
    if eager is not None:
        notes.append(f"per-sample capture: each sample runs alone with ordinary autograd (one forward and backward "
                     f"each; kernels kept for recognised calls) because the batched capture cannot run the model: "
                     f"{eager}")
    the_plan = make_plan(params, use, policy, train.size, val.size, val_reduce, tuned)._replace(notes=tuple(notes))
    traces = (part_traces[0][0], part_traces[1][0])
    return Routing(traces, kernel, the_plan, parts, (part_traces[0], part_traces[1]), eager)


def _traced(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, where: str, fresh: bool,
            label: str | None) -> Trace:
    """:func:`ghostfunc._capture.trace` of ``batch``; a model's error says which batch raised it (``label``; ``None``:
    a part of a batch split by branch, its own errors told by the whole batch's run before)."""
    if label is None:
        return trace(model_fn, params, batch, where, fresh=fresh)
    with on_batch(where, _first_sample(label)):
        return trace(model_fn, params, batch, where, fresh=fresh)


def _traced_alone(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, where: str, fresh: bool,
                  label: str) -> Trace:
    """:func:`trace_eager` of ``batch``; a model's error says which batch raised it."""
    with on_batch(where, _first_sample(label)):
        return trace_eager(model_fn, params, batch, where, fresh)


def _first_sample(label: str) -> str:
    """Which run a trace's error came from (:func:`ghostfunc._capture.on_batch`): the training batch's trace runs
    first, so an error on the validation batch's alone points at how the two differ."""
    if label == "val":
        return ("the val batch's first sample, run alone, after it ran on the train batch's: check the val batch's "
                "structure and shapes against train's")
    return f"the {label} batch's first sample, run alone (tracing the calls)"


#: ``model_fn`` -> {(param and batch signatures): why the batched capture could not run it}.
_UNBATCHABLE_SEEN: ByModel[Any, dict[tuple, str]] = ByModel()


def _weakrefable(x: Any) -> bool:
    try:
        weakref.ref(x)
    except TypeError:
        return False
    return True


def _merged_usages(params: dict[str, Tensor], train: tuple[Trace, ...], val: tuple[Trace, ...]) -> dict[str, Usage]:
    """Every parameter's usage over all parts: one form if all parts agree, the fallback otherwise.

    Tokens are the largest any part saw (the policy's cost model sees the longest part).
    """
    if len(train) == 1 and len(val) == 1:
        return usages(params, (train[0], val[0]))
    each = [usages(params, (t, v)) for t in train for v in val]
    out = {}
    for k in params:
        us = [u[k] for u in each]
        if (none := next((u for u in us if u.form is None), None)) is not None:
            out[k] = none
        elif len({u.form for u in us}) > 1:
            out[k] = Usage(None, "used both as a matrix and elementwise", us[0].uses, 0, 0)
        else:
            out[k] = us[0]._replace(tokens=max(u.tokens for u in us), val_tokens=max(u.val_tokens for u in us))
    return out


def capture_one(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, r: Routing, which: int,
                where: str) -> Half:
    """Capture one batch (``which``: 0 train, 1 val) on its own: a forward and a tap backward."""
    return capture_all(model_fn, params, (batch,), r, (which,), where)[0]


def capture_all(model_fn: ModelFn, params: dict[str, Tensor], batches: tuple[Batch, ...], r: Routing,
                which: tuple[int, ...], where: str) -> list[Half]:
    """Capture ``batches`` (``which[b]``: 0 train, 1 val) in one tap backward, part by part, merged in order.

    A batch whose samples diverge at a branch raises :class:`_Resplit`; a model
    the batched capture cannot run raises :class:`_Unbatchable` (both for :func:`retry_stale`).
    """
    labels = [("train", "val")[w] for w in which]
    if r.eager is not None:
        return [capture_eager(model_fn, params, b, r.kernel, where, label)
                for b, label in zip(batches, labels, strict=True)]
    subs, traces, tags, rows = [], [], [], []
    for b, w in zip(batches, which, strict=True):
        for part, tr in zip(r.parts[w], r.part_traces[w], strict=True):
            subs.append(subset(b, part))
            traces.append(tr)
            tags.append((w, part))
            rows.append(part.rows)
    whole = all(part.rows is None for part in (p for w in which for p in r.parts[w]))

    def per_sample() -> list[Half]:
        # a signature whose vmap masks are not a plain call's takes a plain run's (unsplit batches: as_plain_draws)
        return capture_batches(model_fn, params, subs, traces, r.kernel, where, [("train", "val")[w] for w, _ in tags],
                               rows, plain_draws=whole and _PLAIN.on)

    try:
        if whole and _whole.small(traces, subs):
            halves = _whole.verified(
                model_fn, params, _whole.capture_key(params, subs, r.kernel), per_sample,
                lambda: _whole.capture(model_fn, params, subs, traces, r.kernel, where, labels), _whole.same_run,
                lambda hs: _whole.run_losses(hs, subs, traces, r.kernel),
                lambda hs: _whole.same_reordered(model_fn, params, subs, traces, r.kernel, where, labels, hs))
        else:
            halves = per_sample()
    except _Diverged as err:
        w, part = tags[err.batch]
        raise _Resplit(w, part, err) from None
    except RuntimeError as err:
        if not unbatchable(err):
            raise
        raise _Unbatchable(err) from err
    out, at = [], 0
    for b, w in zip(batches, which, strict=True):
        k = len(r.parts[w])
        out.append(merge_halves(halves[at:at + k], r.parts[w], b.size))
        at += k
    return out


def run(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
        val_reduce: str | None) -> tuple[Captured, Plan]:
    """Trace (cached), route, and capture both batches in one backward."""

    def attempt(fresh: Attempt) -> tuple[Captured, Plan]:
        r = routing(model_fn, params, train, val, where, policy, val_reduce, fresh)
        t, v = capture_all(model_fn, params, (train, val), r, (0, 1), where)
        return Captured(t.loss, v.loss, {k: (t.grads[k], v.grads[k]) for k in params}), r.plan

    (cap, the_plan), notes = as_plain_draws(model_fn, params, (train, val), lambda: retry_stale(where, attempt),
                                            lambda out: (out[0].train_loss, out[0].val_loss), where,
                                            lambda out: out[1].notes)
    return cap, noted(the_plan, notes)


#: ``model_fn`` -> {signature: (whether the batches take a plain run's dropout masks, whether draws no sample owns
#: are made once (:func:`ghostfunc._draws.draws_once`), the plan's notes, the parameters zero everywhere when it was
#: decided (:func:`ghostfunc._interact.zero_params`: the verdict holds while they stay zero))}.
_DRAWS: ByModel[Any, dict[tuple, tuple[bool, bool, list[str], frozenset[str]]]] = ByModel()

MASKS_DIFFER = (
    "random draws: the training rows' dropout masks differ from those model_fn(params, train) draws from the same "
    "RNG state (their losses differ), so the numbers are exact for the masks drawn here, not for a plain step's: "
    "a dropout call whose samples could not be sliced out of a plain run's mask (the samples flattened into "
    "another axis), a random op other than dropout drawing in another order, or a batch split by a branch or "
    "run sample by sample; model.eval() for deterministic numbers")


#: The note of a signature decided while parameters were zero everywhere (:func:`as_plain_draws`), ``{}`` their names.
DRAWS_UNTOLD = (
    "random draws: decided while {} were zero everywhere, when every way of drawing gave the plain call's losses, "
    "so the gradients of such a parameter take vmap's draws, one per sample, where a plain call may draw once "
    "for the batch (torch.randn(d, d)); decided again once they move; model.eval() for deterministic numbers")


class _Plain(threading.local):
    on = False


_PLAIN = _Plain()


@contextlib.contextmanager
def _plain_draws(on: bool, once: bool = False) -> Iterator[None]:
    """Within: unsplit batches of a model that draws random numbers take a plain run's dropout masks
    (``capture_batches(plain_draws=True)``, :mod:`ghostfunc._draws`), and with ``once`` the draws no sample owns
    are made once for the batch (:func:`ghostfunc._draws.draws_once`)."""
    before, _PLAIN.on = _PLAIN.on, on
    before_once, ONCE.on = ONCE.on, once
    try:
        yield
    finally:
        _PLAIN.on, ONCE.on = before, before_once


def _draws_key(model_fn: ModelFn, params: dict[str, Tensor], batches: Sequence[Batch]) -> tuple:
    return param_signature(params), tuple((b.signature, b.size) for b in batches), behaviour(model_fn)


#: The note of a call whose ``model_fn`` drew from Python's or NumPy's global generator (:func:`as_plain_draws`).
HOST_DRAWS = (
    "random draws: model_fn drew from NumPy's or Python's global random generator (np.random, random), which "
    "ghostfunc cannot hand out per sample as a plain call does (under vmap one draw serves every sample; the "
    "checks run on copies of the generator's state), so the numbers are exact for the draws made here, not for a "
    "plain step's; draw with torch (torch.rand, torch.randn) for a plain step's, or model.eval()")


def as_plain_draws(model_fn: ModelFn, params: dict[str, Tensor], batches: Sequence[Batch], compute: Callable[[], R],
                   losses: Callable[[R], Sequence[Tensor]], where: str,
                   notes_of: Callable[[R], Sequence[str]]) -> tuple[R, list[str]]:
    """:func:`_as_plain_draws`, noting a draw from Python's or NumPy's global generator (:data:`HOST_DRAWS`: such a
    model's SpecAugment masks, Wav2Vec2's in training mode, are other draws than a plain call's). Whether the model
    draws so is seen on the first call of a signature and kept (reading NumPy's state costs 30 µs)."""
    key = _draws_key(model_fn, params, batches)  # (a module's setting may switch such draws on: a config's mask_time_prob)
    try:
        book = _HOST.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: seen on every call
        book = {}
    drew = book.get(key)
    if drew is None:
        host = host_states()
        out, notes = _as_plain_draws(model_fn, params, batches, compute, losses, where, notes_of)
        drew = not same_host_states(host, host_states())
        remember(book, key, drew)
    else:
        out, notes = _as_plain_draws(model_fn, params, batches, compute, losses, where, notes_of)
    return (out, [*notes, HOST_DRAWS]) if drew else (out, notes)


#: ``model_fn`` -> {signature: whether its capture drew from Python's or NumPy's generator} (:func:`as_plain_draws`).
_HOST: ByModel[Any, dict[tuple, bool]] = ByModel()


def _as_plain_draws(model_fn: ModelFn, params: dict[str, Tensor], batches: Sequence[Batch], compute: Callable[[], R],
                    losses: Callable[[R], Sequence[Tensor]], where: str,
                    notes_of: Callable[[R], Sequence[str]]) -> tuple[R, list[str]]:
    """``compute()`` with the training rows' random draws those of ``model_fn(params, train)`` from the same
    RNG state, then the validation rows' those of ``model_fn(params, val)`` (``batches``: ``(train, val)`` or
    ``(train,)``; ``losses(result)``: their losses; a model that draws none: ``compute()`` as it is).

    ``vmap`` gives each sample its row of one draw shaped ``[n, ...]``; a plain call draws in the dropped
    tensor's memory order: the same masks when that memory holds the samples one after another. The first
    call of a signature that draws random numbers compares ``compute()``'s training losses with a plain run's
    (one forward without gradients); when they differ it computes again with the plain run's masks
    (:mod:`ghostfunc._draws`: one more forward without gradients per batch, on this call and later ones of the
    signature), and if the losses still differ the plan says so (:data:`MASKS_DIFFER`; later calls then draw as
    ``vmap`` does, without the plain runs), unless the batch's samples interact with dropout run without drawing
    (:func:`ghostfunc._interact.refuse_coupled_draws`: ``SamplesInteractError``, prefixed with ``where``).
    Returns the result and the plan's notes on its draws. A model that draws nothing is compared with a plain
    run too, on the first call of each signature (:func:`_refuse_coupled_batch`).
    """
    device = next(iter(params.values())).device
    try:
        book = _DRAWS.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: decide on every call
        book = {}
    key = _draws_key(model_fn, params, batches) if book else None  # (no verdict yet for this model_fn: none to find)
    known = book.get(key) if key is not None else None
    if known is not None and not still_zero(params, known[3]):
        known = None  # decided while a parameter was zero (a LoRA B: every way of drawing gave the same losses)
    start, seen = _rng_state(device), ONCE.seen
    with _plain_draws(known is not None and known[0], known is not None and known[1]):
        out = compute()
    unowned = ONCE.seen != seen  # a draw no sample owns (a seeded generator's leaves the global state alone)
    if _same(start, _rng_state(device)) and not unowned:  # no random draw (a model in eval mode)
        _refuse_coupled_batch(model_fn, params, batches, losses(out), notes_of(out), where)
        return out, []
    if known is not None:
        return out, known[2]
    key, zeros = _draws_key(model_fn, params, batches), zero_params(params)
    plain, coarse = _plain_losses(model_fn, params, batches, start, device)  # (the validation rows' too: one
    # training row cannot tell a draw shared by the batch from its own)
    fine = torch.finfo(coarse).eps <= torch.finfo(torch.float32).eps
    if plain is None or (fine and _close_losses(plain, losses(out))):
        # vmap's draws are the plain call's, or cannot be told apart: behind a parameter zero everywhere (a LoRA B)
        # a draw no sample owns gives the same losses drawn per sample or once, and the plan says so until it moves
        # (dropout's masks too may be vmap's own there, a sequence-first tensor's: not said, most such models'
        # zero biases would say it on every first step)
        notes = [DRAWS_UNTOLD.format(", ".join(sorted(zeros)))] if zeros and unowned and plain is not None else []
        remember(book, key, (False, False, notes, zeros))
        return out, notes
    first, after_first = out, _rng_state(device)
    # Another way of drawing may give the plain call's losses: a plain run's dropout masks, and draws no sample
    # owns made once (torch.randn(d, d), a seeded generator's projection) where there were such draws. A model
    # computing in a 16-bit float rounds its losses by more than other masks may move them (bfloat16's sqrt(eps)
    # is 8.8% of the largest loss: vmap's masks of a sequence-first dropout passed, 0.12 off): there every way
    # is tried and the one closest to the plain call's losses kept (vmap's own unless another is half as far).
    tried = [(False, False, first, _loss_gap(plain, losses(first)), after_first)]
    for masks, once in ((False, True), (True, False), (True, True)):
        if once and not unowned:
            continue
        _set_rng_state(device, start)
        with _plain_draws(masks, once):
            out = compute()
        if fine and _close_losses(plain, losses(out)):
            remember(book, key, (masks, once, [], zeros))
            return out, []
        if not fine:
            tried.append((masks, once, out, _loss_gap(plain, losses(out)), _rng_state(device)))
    if not fine:
        best = min(tried, key=lambda t: t[3])
        if best[3] >= tried[0][3] / 2:
            best = tried[0]
        if best[3] <= torch.finfo(coarse).eps ** 0.5:
            _set_rng_state(device, best[4])
            remember(book, key, (best[0], best[1], [], zeros))
            return best[2], []
    for b, label in zip(batches, ("train", "val"), strict=False):  # not the draws: the samples interact
        parts = kept_in_call("parts", b)  # (a batch split at branches: group by group)
        refuse_coupled_draws(model_fn, params, b, label, where,
                             None if parts is None else [p.rows.tolist() for p in parts if p.rows is not None])
    # No way made the losses agree (another random op): later calls draw as vmap does, without the plain runs,
    # and so does this one (its result and generator state are the first computation's), so that a run resumed
    # in a new process repeats the uninterrupted one.
    _set_rng_state(device, after_first)
    remember(book, key, (False, False, [MASKS_DIFFER], zeros))
    return first, book[key][2]


#: ``model_fn`` -> {signature: the parameters zero everywhere when its whole batches were compared}.
_COUPLED: ByModel[Any, dict[tuple, frozenset[str]]] = ByModel()


def _refuse_coupled_batch(model_fn: ModelFn, params: dict[str, Tensor], batches: Sequence[Batch],
                          captured: Sequence[Tensor], notes: Sequence[str], where: str) -> None:
    """On the first call of a signature (and once a parameter zero everywhere then has moved), each whole batch's
    losses from a plain run (:func:`_plain_losses`) against the capture's, each sample's own: where they differ
    the samples interact (:func:`ghostfunc._interact.refuse_batch_losses`, which confirms a difference on batches
    of copies of the sample, :func:`ghostfunc._interact.copies_losses`), through more of the batch than the few rows :func:`ghostfunc._interact.check_model`
    runs (a loss normalised by the whole batch's token count, where those rows held as many tokens as the batch's
    mean: 0.30-0.33 off the loop, silently). One forward per batch. A batch split at data-dependent branches (each
    sample its own branch, by design: the whole batch may take another) is compared group by group instead
    (:func:`_refuse_coupled_groups`)."""
    try:
        seen = _COUPLED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: compare every call
        seen = {}
    key = (param_signature(params), tuple((b.signature, b.size) for b in batches), behaviour(model_fn))
    if key in seen and still_zero(params, seen[key]):
        return
    zeros = zero_params(params)
    device = next(iter(params.values())).device
    start = _rng_state(device)
    hosts: list[tuple[Any, ...]] = []  # (each batch's copies start from the host state its plain run started from)
    branches: list[list[str]] = []  # (and copies compared at the finer allowance take its branches and shapes)
    shapes: list[list[Any]] = []
    plain, coarse = _plain_losses(model_fn, params, batches, start, device, branches, hosts=hosts, shapes=shapes)
    for b, label, together, own, host, took, shaped in zip(batches, ("train", "val"), plain or (), captured, hosts,
                                                           branches, shapes, strict=False):
        if b.size > 1 and not split(notes, label):
            refuse_batch_losses(together, own, label, coarse, where,
                                functools.partial(copies_losses, model_fn, params, b, host=host),
                                declared=coarsest([*params.values(), *b.tensors]),
                                fine_confirm=fine_copies(model_fn, params, b, took, host, shaped))
        elif b.size > 1 and isinstance(own, Tensor) and own.shape == (b.size,):
            _refuse_coupled_groups(model_fn, params, b, own, label, where, start, host)
    remember(seen, key, zeros)


def refuse_coupled_rows(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, losses: Tensor,
                        notes: Sequence[str], where: str, start: tuple[Tensor, ...]) -> None:
    """:func:`_refuse_coupled_batch` of one batch captured outside :func:`as_plain_draws` (the training rows of
    the second-order, secant and preconditioned values: a loss normalised by the whole batch's token count passed
    there), where the capture drew no random number (``start``: the generator state before it)."""
    if _same(start, _rng_state(next(iter(params.values())).device)):
        _refuse_coupled_batch(model_fn, params, (batch,), (losses,), notes, where)


def drawn_unlike_a_plain_call(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, losses: Tensor,
                              start: tuple[Tensor, ...], host: tuple[Any, ...]) -> bool:
    """Whether a capture of ``batch`` that met draws no sample owns (:data:`ghostfunc._draws.ONCE`'s count moved) gave
    other losses than a plain call from the same generator states (``start``, ``host``): ``vmap`` drew per sample
    what the plain call draws once for the batch (a seeded generator's projection). A draw shaped by the batch
    (``torch.rand(x.shape[0], 1)``, stochastic depth: each sample its row) gives the plain call's. One forward."""
    plain, _ = _plain_losses(model_fn, params, (batch,), start, next(iter(params.values())).device, host=host)
    return plain is None or not _close_losses(plain, [losses])


def _refuse_coupled_groups(model_fn: ModelFn, params: dict[str, Tensor], batch: Batch, captured: Tensor, label: str,
                           where: str, start: tuple[Tensor, ...], host: tuple[Any, ...]) -> None:
    """:func:`_refuse_coupled_batch` for a batch split at data-dependent branches: each group of two or more samples
    that took the same branches alone (the parts this call's capture ran) run together plainly, against the
    capture's losses of those rows, a difference confirmed on copies of the sample that take the group's branches
    (a loss normalised by the whole batch's token count in a padded Hugging Face batch, whose unpadded rows take
    ``mask.all()``'s other branch: 0.19 off torch's batch gradient, silently). Where the group together takes
    other branches than its copies (a branch on a statistic of the batch), nothing is said: each sample's own
    branch is the loop's answer. A group of one says nothing (a count taken to Python per sample, ``int(mask.sum())``,
    puts every sample in its own group)."""
    parts = kept_in_call("parts", batch)
    device = next(iter(params.values())).device
    for part in parts or ():
        if part.rows is None or len(part.rows) < 2:
            continue
        sub, rows = subset(batch, part), part.rows.tolist()
        branches: list[list[str]] = []
        shapes: list[list[Any]] = []
        plain, coarse = _plain_losses(model_fn, params, [sub], start, device, branches, host=host, shapes=shapes)
        if plain is None:
            continue
        def confirm(at: list[int], sub: Batch = sub, rows: list[int] = rows, seen: list[str] = branches[0],
                    **how: Any) -> Any:
            return copies_losses(model_fn, params, sub, [rows.index(i) for i in at], seen, host, **how)

        refuse_batch_losses(plain[0], captured[part.rows.to(captured.device)], label, coarse, where, confirm,
                            rows, batch.size, which=group_named(rows, label),
                            declared=coarsest([*params.values(), *sub.tensors]),
                            fine_confirm=fine_copies(model_fn, params, sub, branches[0], host, shapes[0], rows))


def _plain_losses(model_fn: ModelFn, params: dict[str, Tensor], batches: Sequence[Batch],
                  start: tuple[Tensor, ...], device: torch.device, branches: list[list[str]] | None = None,
                  hosts: list[tuple[Any, ...]] | None = None, host: tuple[Any, ...] | None = None,
                  shapes: list[list[Any]] | None = None) -> tuple[list[Tensor] | None, torch.dtype]:
    """``model_fn(params, batch)`` for each batch in turn, as a plain step runs it (gradients on, the parameters
    leaves that require them: a model that reads ``grad_fn`` takes the step's branch; the graph is let go), from
    RNG state ``start`` (the state after is kept as it was), and the coarsest floating dtype it computed in (its
    losses' too); ``None`` for a model that cannot run so (one that runs only under ``vmap``). ``branches``, if
    given, gets what each batch's tensors became in Python (its data-dependent branches), a list per batch;
    ``hosts``, Python's and NumPy's generator states each batch's run started from; ``host``, the state each
    starts from (the one before its batch's copies, :func:`ghostfunc._interact.copies_losses`); ``shapes``, if given,
    gets each batch's calls' output shapes, a list per batch."""
    devices = [device.index or 0] if device.type == "cuda" else []
    leaves = {k: v.detach().requires_grad_(v.is_floating_point() or v.is_complex()) for k, v in params.items()}
    # the calls the capture replaces run as it runs them (an embedding's max_norm renormalises a copy, not the
    # caller's table), a write into a parameter refused before it happens; the coarsest dtype computed noted
    out, mode = [], _UsesAndDtypes(leaves)
    try:
        with fork_rng(devices), torch.enable_grad(), eager_stance():
            _set_rng_state(device, start)
            for b in batches:
                mode.branches, mode.shapes = [], []
                if host is not None:
                    set_host_states(host)
                if hosts is not None:
                    hosts.append(host_states())
                whole = b.rebuild(list(b.tensors))
                with mode:
                    out.append(model_fn(dict(leaves), whole))
                if branches is not None:
                    branches.append(mode.branches)
                if shapes is not None:
                    shapes.append(mode.shapes)
    except Exception:  # noqa: BLE001 - not told
        return None, mode.computed
    if not all(isinstance(o, Tensor) for o in out):
        return None, mode.computed
    return [o.detach() for o in out], mode.computed


def _close_losses(plain: Sequence[Tensor], captured: Sequence[Tensor]) -> bool:
    return len(plain) == len(captured) and all(
        a.shape == b.shape and _whole.close(a.to(b.dtype), b.detach()) for a, b in zip(plain, captured, strict=True))


def _loss_gap(plain: Sequence[Tensor], captured: Sequence[Tensor]) -> float:
    """The largest difference of ``captured`` from the ``plain`` losses, relative to the largest loss (``inf``
    where they do not line up or are not finite)."""
    gaps = [math.inf]
    if len(plain) == len(captured) and all(a.shape == b.shape for a, b in zip(plain, captured, strict=True)):
        gaps = []
        for a, b in zip(plain, captured, strict=True):
            a, b = a.double(), b.detach().double()
            scale = max(a.abs().max().item(), b.abs().max().item()) if a.numel() else 0.0
            gap = (a - b).abs().max().item() / scale if scale else 0.0
            gaps.append(gap if math.isfinite(gap) else math.inf)
    return max(gaps, default=0.0)


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
    train_traces: tuple[Trace, ...] | None = None  # the training batch's traces (None: not known)


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
    replayed = _replay(model_fn, params, train, val, where, policy, val_reduce)
    if replayed is not None:
        return replayed  # (a whole-batch run: no random draw)
    st, notes = as_plain_draws(model_fn, params, (train, val), lambda: retry_stale(where, lambda fresh: _streamed_once(
        model_fn, params, train, val, where, policy, val_reduce, fresh)), lambda out: (out.train_loss, out.val_loss),
        where, lambda out: out.plan.notes)
    return st._replace(plan=noted(st.plan, notes)) if notes else st


class Replay(NamedTuple):
    """How a signature's streamed capture last ran: both batches in one whole-batch run (the verdict under
    ``verdict`` held), routed by ``routing``, the recognised calls ``sites`` expected."""

    routing: Routing
    sites: tuple[Site, ...]
    verdict: tuple
    settings: tuple = ()  # the modules' settings it ran under (:func:`ghostfunc._interact.steady_settings`)


#: ``model_fn`` -> {(:func:`replay_key`, id of the routing): :class:`Replay`}: what a call of a known signature
#: does again without re-deciding it (on a small model, the deciding costs about as much as the arithmetic).
#: Keyed by the routing too, so routings of one signature that alternate (``auto`` and
#: ``GHOSTFUNC_ROUTING=model`` in one process) keep a replay each; the entry holds the routing object.
_REPLAYS: ByModel[Any, dict[tuple, Replay]] = ByModel()


def replay_key(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, policy: str,
                val_reduce: str) -> tuple:
    return (param_signature(params), train.signature, val.signature, train.size, val.size,
            training_flags(model_fn), policy, val_reduce)


def _replay(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
            val_reduce: str) -> Streamed | None:
    """:func:`run_streamed` as the last call of this signature ran it (both batches in one whole-batch
    run), or ``None`` when there is nothing to replay or it no longer applies: the routing was redone,
    the verdict changed, or the run failed a guard or raised (then the full path decides, and explains)."""
    rep = replay_of(model_fn, params, train, val, where, policy, val_reduce)
    if rep is None:
        return None
    try:  # (settings moved since: a draw from NumPy's or Python's generator is looked for, as the full path notes it)
        t, v = _whole.rerun(model_fn, params, (train, val), rep.sites, host=steady_settings(model_fn) != rep.settings)
    except Exception:  # noqa: BLE001 - a guard (NotDirect) or the model's own error: the full path runs
        forget(model_fn, params, train, val, policy, val_reduce, rep)
        return None
    st = _streamed_of(rep.routing, t, v, params, val_reduce, val.size)
    try:  # (a signature whose capture drew from NumPy's or Python's generator: the note the full path gives)
        drew = _HOST.get(model_fn, {}).get(_draws_key(model_fn, params, (train, val)))
    except TypeError:
        drew = None
    return st._replace(plan=noted(st.plan, [HOST_DRAWS])) if drew else st


def replay_of(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str, policy: str,
              val_reduce: str) -> Replay | None:
    """The replay of this signature if there is one and it still applies (its routing is the one a call
    would take now, its whole-batch verdict still holds); a stale one is dropped."""
    try:
        book = _REPLAYS.get(model_fn)
    except TypeError:  # not weak-referenceable
        return None
    if not book:
        return None
    r = routing(model_fn, params, train, val, where, policy, val_reduce, False)  # the memo's, or routed again
    key = (replay_key(model_fn, params, train, val, policy, val_reduce), id(r))
    rep = book.get(key)
    if rep is None:
        return None
    if rep.routing is not r or not _whole.holds(model_fn, rep.verdict, params):
        del book[key]
        return None
    return rep


def forget(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, policy: str,
           val_reduce: str, rep: Replay) -> None:
    """Drop the replay ``rep``: the next call takes the full path (and records a new one if it can)."""
    _REPLAYS.get(model_fn, {}).pop((replay_key(model_fn, params, train, val, policy, val_reduce),
                                    id(rep.routing)), None)


def _remember(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, policy: str,
              val_reduce: str, r: Routing) -> None:
    """Keep the replay of a streamed capture that just ran both batches in one verified whole-batch run."""
    batches = (train, val)
    sites = tuple(_keep(r.traces[0].sites, r.kernel))
    verdict = _whole.verdict_key(model_fn, params, batches, r.kernel)
    if not _whole.joins(batches, (sites, tuple(_keep(r.traces[1].sites, r.kernel)))) or not _whole.holds(
            model_fn, verdict, params):
        return
    try:
        book = _REPLAYS.setdefault(model_fn, {})
    except TypeError:
        return
    remember(book, (replay_key(model_fn, params, train, val, policy, val_reduce), id(r)),
             Replay(r, sites, verdict, steady_settings(model_fn)))


def _streamed_of(r: Routing, t: Half, v: Half, params: dict[str, Tensor], val_reduce: str, m: int) -> Streamed:
    """A :class:`Streamed` from both batches' captures: ghost-routed parameters keep the validation
    rows, every other one their reduced ``Σ_v w_v g_v``."""
    weights = val_weights(val_reduce, m, params)
    assert weights is not None
    return Streamed(r.plan, *reduced(paths(r.plan), v, params, weights), t.grads, t.loss, v.loss, train_traces(r))


def paths(plan: Plan) -> dict[str, str]:
    """Every parameter's path (``"ghost"``, ``"contract"``, ...), in the plan's order."""
    return {k: route.path for k, route in plan.routes.items()}


def reduced(routes: Mapping[str, str], v: Half, params: dict[str, Tensor],
            weights: Tensor) -> tuple[dict[str, Tensor], dict[str, list[Factored | Direct]]]:
    """The validation side of a :class:`Streamed` from the validation rows' capture ``v``: ``Σ_v w_v g_v``
    for every parameter not routed (``routes``: name -> path) to ghost, the rows themselves for the rest."""
    val_dir = {k: val_grad(path, v.grads[k], _as(weights, params[k].dtype), params[k])
               for k, path in routes.items() if path != "ghost"}
    return val_dir, {k: v.grads[k] for k, path in routes.items() if path == "ghost"}


def _streamed_once(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str,
                   policy: str, val_reduce: str, fresh: bool) -> Streamed:
    r = routing(model_fn, params, train, val, where, policy, val_reduce, fresh)
    if r.eager is None and r.parts == (WHOLE, WHOLE) and not _draws_random(model_fn) and _whole.together(
            model_fn, params, (train, val), r.kernel, r.traces):  # a small model: both batches in one whole-batch run
        start = _rng_state(next(iter(params.values())).device)
        t, v = capture_all(model_fn, params, (train, val), r, (0, 1), where)
        if not _whole.refused(model_fn, _whole.verdict_key(model_fn, params, (train, val), r.kernel)):
            _remember(model_fn, params, train, val, policy, val_reduce, r)
            return _streamed_of(r, t, v, params, val_reduce, val.size)
        # The whole-batch run was refused just now: later calls of this signature take the batches one at a
        # time (below), and so does this call, so that its numbers are theirs bit for bit (a run resumed in
        # a new process repeats the uninterrupted one), drawing what a model that draws random numbers draws.
        _set_rng_state(next(iter(params.values())).device, start)
        del t, v
    weights = val_weights(val_reduce, val.size, params)
    assert weights is not None

    def capture_val() -> tuple[dict[str, Tensor], dict[str, list[Factored | Direct]], Tensor]:
        if not _ghosts(r) and r.eager is None:
            val_dir, loss, note = weighted_grad_split(model_fn, params, val, weights, where, "val",
                                                      _PLAIN.on)
            notes.extend([note] if note else [])
            return val_dir, {}, loss
        v = capture_one(model_fn, params, val, r, 1, where)
        return (*reduced(paths(r.plan), v, params, weights), v.loss)

    device = next(iter(params.values())).device
    before = _rng_state(device)
    notes: list[str] = []  # how the validation batch ran when weighted_grad_split split it
    if not _draws_random(model_fn):
        val_dir, val_uses, val_loss = capture_val()
        if _same(before, _rng_state(device)):
            r, t = _train_after_val(model_fn, params, train, val, where, policy, val_reduce, fresh, r)
            return Streamed(noted(r.plan, notes), val_dir, val_uses, t.grads, t.loss, val_loss, train_traces(r))
        _set_rng_state(device, before)  # it drew random numbers: the training rows go first
        _mark_random(model_fn)
        del val_dir, val_uses, val_loss
        notes.clear()
    t = capture_one(model_fn, params, train, r, 0, where)
    val_dir, val_uses, val_loss = capture_val()
    return Streamed(noted(r.plan, notes), val_dir, val_uses, t.grads, t.loss, val_loss, train_traces(r))


def _train_after_val(model_fn: ModelFn, params: dict[str, Tensor], train: Batch, val: Batch, where: str,
                     policy: str, val_reduce: str, fresh: bool | Attempt, r: Routing) -> tuple[Routing, Half]:
    """The training rows' capture once the validation side is done; a training batch that diverges is split here.

    The validation side does not depend on how the training batch is split, so it
    is kept, unless the new routing changes which parameters take the ghost path
    (or goes per sample): then the whole attempt runs again from the new state.
    """
    state = fresh if isinstance(fresh, Attempt) else Attempt(bool(fresh))
    while True:
        try:
            return r, capture_one(model_fn, params, train, r, 0, where)
        except _Resplit as split:
            state = state.but(parts=(refine(state.parts[0], split.err, split.part), state.parts[1]))
            new = routing(model_fn, params, train, val, where, policy, val_reduce, state)
            if new.eager is not None or _ghosts(new) != _ghosts(r):
                raise _Retry(state) from None
            r = new


def train_traces(r: Routing) -> tuple[Trace, ...]:
    """The traces of every part of the training batch."""
    return r.part_traces[0] or (r.traces[0],)


def unused(traces: tuple[Trace, ...] | None, train_grad: Mapping[str, Tensor],
           reach: Callable[[list[str]], frozenset[str]] | None = None) -> frozenset[str]:
    """The parameters no training sample reaches, whose training gradient is exactly 0: no call in the training
    batch's ``traces`` uses them (``None``: not known, so none), or, among those used, ``reach`` (:func:`no_path`
    on the training batch) finds no autograd path from the losses to them (used only through ``.detach()``,
    ``no_grad`` or an integer result such as ``argmax``). A training step leaves them, and their optimizer
    state, as torch.optim leaves a parameter whose ``.grad`` is ``None``."""
    if traces is None:
        return frozenset()
    used = {name for tr in traces for site in tr.sites for _, name in site.roles} | {
        name for tr in traces for name in tr.other_uses}
    unreached = {k for k, g in train_grad.items() if k not in used and not bool(g.any())}
    if reach is not None and (seen := [k for k in train_grad if k in used]):
        # one fused pass and one host sync for the used parameters (not one per parameter, every step)
        norms = torch.stack([n.float() for n in torch._foreach_norm([train_grad[k] for k in seen])]).tolist()
        zero = [k for k, n in zip(seen, norms, strict=True) if n == 0]
        unreached |= reach(zero) if zero else frozenset()
    return frozenset(k for k in train_grad if k in unreached)


#: ``model_fn`` -> {(parameter and batch signature, settings, name): whether the losses have an autograd path to it}.
_PATHS: ByModel[Any, dict[tuple, bool]] = ByModel()


def no_path(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, names: list[str]) -> frozenset[str]:
    """Among ``names`` (parameters the model uses whose training gradient is exactly 0), those the losses of a plain
    run on ``batch`` have no autograd path to: what ``torch.autograd.grad(..., allow_unused=True)`` gives ``None``
    for, and ``loss.backward()`` leaves ``.grad`` ``None``. One forward (random draws undone) and a backward to
    those parameters only, once per ``model_fn``, signature and parameter (a zero gradient is rare; a parameter
    used only through ``.detach()`` stays so). Kept under the model's settings too (:func:`behaviour`): a setting
    that switched the parameter to ``.detach()`` after a step found it with a path (its gradient 0 there), and
    ``train_step`` went on moving it by momentum where ``torch.optim`` leaves it (1e-2 off, h98)."""
    key = (param_signature(params), batch.signature, behaviour(model_fn))
    try:
        known = _PATHS.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: nowhere to remember
        known = {}
    ask = [k for k in names if (key, k) not in known]
    if ask:
        with checkpoints_as_plain():  # (the model without checkpointing, as every number here: recomputed in the
            # backward with the module's own weights, a segment raised or hid a LoRA A's path, h51)
            leaves, losses = run_with_grads(model_fn, params, batch.rebuild(list(batch.tensors)), ask)
        grads: tuple[Tensor | None, ...] = tuple(None for _ in ask)
        if isinstance(losses, Tensor) and losses.requires_grad:
            grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in ask], allow_unused=True)
        if len(known) > 256:
            known.clear()
        known.update({(key, k): g is not None for k, g in zip(ask, grads, strict=True)})
    return frozenset(k for k in names if not known[(key, k)])


def _ghosts(r: Routing) -> set[str]:
    return {k for k, route in r.plan.routes.items() if route.path == "ghost"}


def by_freq_notes(model_fn: ModelFn) -> list[str]:
    """The plan note of a model with lookups whose gradient counts ids (:func:`ghostfunc._interact.counted_over_batch`)."""
    names = sorted(counted_over_batch(model_fn))
    if not names:
        return []
    return [f"scale_grad_by_freq on {', '.join(names)}: each sample's gradient counts its own ids (as the loop "
            f"of single samples does), a backward over the whole batch counts them over the batch; train_grad "
            f"there is the mean of the samples' gradients, not torch's batch gradient"]


def noted(plan: Plan, notes: list[str]) -> Plan:
    """``plan`` with ``notes`` added."""
    return plan._replace(notes=(*plan.notes, *notes)) if notes else plan


def score_streamed(st: Streamed, params: dict[str, Tensor], weights: Tensor, n: int, m: int,
                   dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every parameter's ``<g_i, Σ_v w_v g_v>`` ``[n]`` and mean train gradient, from a streamed capture."""
    return score_uses(paths(st.plan), st.train, st.val_dir, st.val_uses, params, weights, n, m, dtype)


def score_uses(routes: Mapping[str, str], train: Mapping[str, list[Factored | Direct]], val_dir: Mapping[str, Tensor],
               val_uses: Mapping[str, list[Factored | Direct]], params: dict[str, Tensor], weights: Tensor, n: int,
               m: int, dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`score_streamed` from its parts, every parameter's path given (``routes``: name -> path):
    ghost-routed parameters against the validation rows ``val_uses``, the rest against ``val_dir``."""
    per_param, train_grad = {}, {}
    for k, path in routes.items():
        if path == "ghost":
            s, g = score_param("ghost", train[k], val_uses[k], weights.to(params[k].dtype), n, m, params[k], dtype)
        else:
            s, g = score_direction(path, train[k], val_dir[k], n, params[k], dtype)
        per_param[k], train_grad[k] = s, g
    return per_param, train_grad


#: ``model_fn``s seen drawing random numbers (their training batch is captured first; order 2 refuses them), each
#: with the :func:`~ghostfunc._interact.behaviour` it drew under: switched to eval mode after a call in train mode, a
#: model with DropPath draws nothing, and was refused at order 2 for good (h71).
_RANDOM: ByModel[Any, dict[Any, bool]] = ByModel()


def _draws_random(model_fn: ModelFn) -> bool:
    """Whether ``model_fn`` was seen drawing random numbers as it is set now. Not weak-referenceable: nothing is
    kept, and each call finds out (as the first call of one that is does); it was taken as one that draws, and a
    deterministic callable object with ``__slots__`` was refused at order 2 (h71)."""
    try:
        drew = _RANDOM.get(model_fn)
    except TypeError:
        return False
    return drew is not None and behaviour(model_fn) in drew


def _mark_random(model_fn: ModelFn) -> None:
    try:
        remember(_RANDOM.setdefault(model_fn, {}), behaviour(model_fn), True)
    except TypeError:
        pass


def _same(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _total(parts: list[Tensor], zeros: Callable[[], Tensor]) -> Tensor:
    """``Σ parts`` (``zeros()`` when there are none: built only then)."""
    if not parts:
        return zeros()
    out = parts[0]
    for x in parts[1:]:  # no stacked copy: a single part comes back as it is
        out = out + x
    return out


def _direct(uses: list[Factored | Direct], n: int, shape: torch.Size, ref: Tensor) -> Tensor:
    """Per-sample gradients ``[n, P]`` of a direct or fallback parameter (the plan never mixes forms), at least in its
    dtype (a float64 weight used in float32, as Switch Transformers' router casts it: its gradient came in float32,
    and the float64 validation weights met it in a matmul, h97)."""
    if len(uses) == 1 and type(uses[0]) is Direct:  # the common case, without building lists
        g = uses[0].grad
    else:
        grads = [u.grad for u in uses if isinstance(u, Direct)]
        if len(grads) != len(uses):
            raise AssertionError("a direct/fallback parameter has a factored use")
        g = _total(grads, lambda: ref.new_zeros(n, *shape))
    return _flat(_at_least(g, ref), n)  # [n, P]


def _at_least(x: Tensor, param: Tensor) -> Tensor:
    """``x`` in ``param``'s dtype where that is wider (a float64 weight used in float32: its gradient, like autograd's,
    in float64), else as it came."""
    return x if x.dtype == param.dtype else x.to(torch.promote_types(x.dtype, param.dtype))


def _like(x: Tensor, param: Tensor) -> Tensor:
    """``x`` shaped like ``param`` (no reshape call when it is: most are, and each call is a dispatch), at least in its
    dtype (:func:`_at_least`)."""
    return _at_least(x if x.shape == param.shape else x.reshape(param.shape), param)


def _flat(x: Tensor, n: int) -> Tensor:
    """``x`` ``[n, ...]`` as ``[n, P]``."""
    return x if x.dim() == 2 else x.reshape(n, -1)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without a dispatch when it is that dtype already."""
    return x if x.dtype == dtype else x.to(dtype)


def _factored(uses: list[Factored | Direct]) -> list[Factored]:
    out = [u for u in uses if isinstance(u, Factored)]
    if len(out) != len(uses):
        raise AssertionError("a factored parameter has a direct use")
    return out


def _val_direction(uses: list, weights: Tensor, p: int, d: int, ref: Tensor) -> Tensor:
    return _total([K.weight_sum(u, weights) for u in _factored(uses)], lambda: ref.new_zeros(p, d))


def train_mean(route_path: str, tr: list[Factored | Direct], n: int, param: Tensor) -> Tensor:
    """``mean_i g_i`` over the training rows, shaped like ``param``."""
    if route_path in ("direct", "fallback"):
        return _like(_direct(tr, n, param.shape, param).mean(0), param)
    p = param.shape[0]
    return _like(_total([K.weight_sum(f) for f in _factored(tr)], lambda: param.new_zeros(p, param.numel() // p)) / n,
                 param)


def contract_direction(route_path: str, tr: list[Factored | Direct], u: Tensor, n: int, param: Tensor,
                       dtype: torch.dtype | None = None) -> Tensor:
    """``<g_i, U>`` for every training row and a fixed ``u`` shaped like ``param``: ``[n]``.

    Factored parameters: ``Σ_t L[i,t]ᵀ U R[i,t]`` (:func:`ghostfunc._kernels.contract`);
    direct and fallback ones: a dot product of their per-sample gradients.
    """
    if route_path in ("direct", "fallback"):
        g = _direct(tr, n, param.shape, param)
        return g @ _as(u.flatten(), g.dtype)  # [n, P] @ [P]
    u2 = u if u.dim() == 2 else u.reshape(param.shape[0], -1)
    return _total([K.contract(f, u2, dtype) for f in _factored(tr)], lambda: param.new_zeros(n))


def score_param(route_path: str, tr: list, va: list, weights: Tensor | None, n: int, m: int,
                param: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """One parameter's ``<g_i, g_v>`` against every validation row, ``[n, m]`` (times ``weights``
    ``[m]`` when given: ``[n]``), and its mean train gradient. Against one reduced validation
    gradient, :func:`score_direction` is the cheaper call (the only one for ``contract``)."""
    shape = param.shape
    if route_path in ("direct", "fallback"):
        gt, gv = _direct(tr, n, shape, param), _direct(va, m, shape, param)  # [n, P], [m, P]
        mat, train = gt @ gv.T, _like(gt.mean(0), param)
    elif route_path == "materialize" and (not tr or not va):  # unused by one batch's rows (a branch): 0
        mat, train = param.new_zeros(n, m), train_mean(route_path, tr, n, param)
    elif route_path == "materialize":  # fused: per-row gradients in cache-sized blocks, dotted and summed
        mat, total = K.materialise_dots(_factored(tr), _factored(va), n, dtype)
        train = _like(total / n, param)
    elif route_path == "ghost":
        mat = _total([K.gram(a, b, dtype) for a in _factored(tr) for b in _factored(va)], lambda: param.new_zeros(n, m))
        train = train_mean(route_path, tr, n, param)
        if weights is not None and va:
            return _reduced_ghost(mat, weights, tr, va, n, param, dtype), train
    else:
        raise AssertionError(f"score_param: {route_path!r} contracts against one direction: use score_direction")
    return (mat if weights is None else mat @ weights), train


#: :func:`_reduced_ghost` recomputes a ghost parameter's reduced scores by contraction where ``eps`` of the
#: dtype the Grams ran in times the validation rows' cancellation (``max_i Σ_v |w_v·<g_i, g_v>|`` over
#: ``max_i |Σ_v w_v·<g_i, g_v>|``) exceeds this, by that dtype: float32 recomputes from a cancellation of
#: about 17x on (the contract is 1e-5), float64 from about 4500x, ``compute_dtype`` bfloat16 from about 4x
#: (documented about 1e-2).
CANCELLATION_LIMIT = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def _reduced_ghost(mat: Tensor, weights: Tensor, tr: list, va: list, n: int, param: Tensor,
                   dtype: torch.dtype | None) -> Tensor:
    """``mat @ weights`` (``[n]``), or, where the validation rows' products cancel in that sum beyond what the
    Grams' rounding allows (:data:`CANCELLATION_LIMIT`), the same scores against ``Σ_v w_v g_v`` formed first
    (:func:`contract_direction`), as the loop and the other kernels sum: the Gram kernel rounds every product
    ``<g_i, g_v>`` at its own scale before they cancel (a zero-initialised head on class-balanced validation
    rows with un-centred features: 130x the float32 loop's error, measured). In a compiled graph both are
    computed and one is picked (no branch on values)."""
    scores = mat @ weights
    computed = dtype if dtype is not None else mat.dtype
    spread = (mat.abs() @ weights.abs()).amax()
    limit = CANCELLATION_LIMIT.get(computed, 3e-2)
    cancels = torch.finfo(computed).eps * spread > limit * scores.abs().amax()
    if not torch.compiler.is_compiling() and not bool(cancels):
        return scores
    u = val_grad("ghost", va, weights, param)
    direct = contract_direction("ghost", tr, u, n, param, dtype).to(scores.dtype)
    return torch.where(cancels, direct, scores) if torch.compiler.is_compiling() else direct



def score_direction(route_path: str, tr: list, u: Tensor, n: int, param: Tensor,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``<g_i, U>`` for a fixed direction ``u`` (shaped like ``param``): ``[n]``, and the mean train gradient.

    ``"materialize"`` keeps its fused form, which yields the train gradient as it
    goes; every other path is :func:`contract_direction` and :func:`train_mean`.
    """
    if route_path == "materialize" and tr:  # (no uses: the parameter is unused by these rows, contracted as 0)
        scores, total = K.materialise_dots(_factored(tr), u.reshape(param.shape[0], -1), n, dtype)
        return scores, _like(total / n, param)
    if route_path in ("direct", "fallback"):  # the per-sample gradients gathered once for both
        g = _direct(tr, n, param.shape, param)  # [n, P]
        return g @ _as(u.flatten(), g.dtype), _like(g.mean(0), param)
    return contract_direction(route_path, tr, u, n, param, dtype), train_mean(route_path, tr, n, param)


def val_grad(route_path: str, va: list, weights: Tensor, param: Tensor) -> Tensor:
    """``Σ_v w_v g_v`` for one parameter, shaped like it."""
    if route_path in ("direct", "fallback"):
        g = _direct(va, len(weights), param.shape, param)
        return _like(_as(weights, g.dtype) @ g, param)
    p = param.shape[0]
    return _like(_val_direction(va, weights, p, param.numel() // p, param), param)


def score_dtype(params: Mapping[str, Tensor]) -> torch.dtype:
    """The widest of the parameters' dtypes, at least float32: what the scores sum in and the validation
    weights are made in. Not the first parameter's: a bfloat16 body listed before a float64 head rounded the
    head's ``1/m`` to bfloat16 (its values 2e-3 off) and the output dtype followed the dict's order."""
    acc = torch.float32
    for v in params.values():
        if v.dtype != acc:  # (no dispatch for the common case, every parameter float32)
            acc = torch.promote_types(acc, v.dtype)
    return acc


def sum_scores(per_param: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Tensor:
    """``Σ_k per_param[k]``, accumulated in :func:`score_dtype`."""
    acc = score_dtype(params)
    return torch.stack([_as(v, acc) for v in per_param.values()]).sum(0)


def refuse_non_finite(where: str, scores: Tensor, per_param: Mapping[str, Tensor] | None,
                      train_grad: Mapping[str, Tensor], local: bool = False, what: str = "scores",
                      hint: str | None = None) -> None:
    """Raise ``FloatingPointError`` if ``scores`` are not finite: the losses were (they are checked first), so a
    gradient is not (a backward through ``sqrt`` or a norm at 0, ``torch.where`` with a non-finite branch) or a
    product overflowed. Names the training rows (``local``: this rank's, under ``group=``) and the parameters.
    Under ``group=`` callers run it inside :func:`ghostfunc._dist.collectively`, so every rank raises. ``hint``:
    what the message ends with (order 2's Hessian-vector product, which the secant does without)."""
    if bool(torch.isfinite(scores).all()):
        return
    rows = (~torch.isfinite(scores)).reshape(len(scores), -1).any(1).nonzero().flatten().tolist()
    named = [k for k, v in (per_param or {}).items() if not bool(torch.isfinite(v).all())]
    train_side = [k for k, g in train_grad.items() if not bool(torch.isfinite(g).all())]
    if train_side:
        side = f"their gradients of params {_listed(train_side)} hold NaN or inf"
    else:
        side = (f"the training gradients are finite, so the validation gradient holds NaN or inf, or the "
                f"products overflowed{f' (params {_listed(named)})' if named else ''}")
    looked = {**train_grad, **(per_param or {})}  # (the tensors named and train_side were read from)
    half = [k for k in named or train_side if looked[k].dtype == torch.float16]
    whose = "this rank's " if local else ""
    raise FloatingPointError(
        f"{where}: the {what} of {whose}train samples "
        f"{rows[:10]}{'...' if len(rows) > 10 else ''} are not finite though the losses are: {side}. "
        + _NON_FINITE_CAUSES
        + (f". Params {_listed(half)} are float16, whose range ends at 65504 (their share is given back in "
           f"float16): a product beyond it is inf; scale the loss down, or use bfloat16" if half else "")
        + (hint or ""))


#: Where a non-finite gradient of finite losses comes from, and how to find the call.
_NON_FINITE_CAUSES = ("A backward through sqrt or a norm at 0, a division by 0, or torch.where with a non-finite "
                      "branch (its gradient is NaN even where the branch is not taken) does this; "
                      "torch.autograd.set_detect_anomaly(True) and a plain backward of model_fn(params, batch).sum() "
                      "find the call")


def refuse_non_finite_val(where: str, val_dir: Mapping[str, Tensor]) -> None:
    """Under ``group=``, inside :func:`ghostfunc._dist.collectively` before the all-reduce: raise
    ``FloatingPointError`` if this rank's own ``Σ_v g_v`` is not finite. After the all-reduce every rank's
    direction held the NaN, and each rank blamed its own finite rows without naming the rank at fault (h96); now
    that rank raises this, and the others name it."""
    held = {k: v for k, v in val_dir.items() if v.numel()}  # (an empty parameter's max |x| has no value)
    if not held:
        return
    norms = torch.stack([n.double() for n in torch._foreach_norm(list(held.values()), math.inf)])  # (max |x|)
    if bool(torch.isfinite(norms).all()):
        return
    named = [k for k, n in zip(held, norms.tolist(), strict=True) if not math.isfinite(n)]
    raise FloatingPointError(
        f"{where}: the validation gradient of this rank's validation rows is not finite though their losses are: "
        f"its params {_listed(named)} hold NaN or inf. " + _NON_FINITE_CAUSES)


def _listed(names: list[str]) -> str:
    return f"{names[:6]}{'...' if len(names) > 6 else ''}"


def val_weights(val_reduce: str | None, m: int, params: Mapping[str, Tensor]) -> Tensor | None:
    """The weights ``w_v`` of ``Σ_v w_v g_v`` (``[m]``, :func:`score_dtype`; each parameter takes them in its own
    dtype from there), ``None`` for the full matrix."""
    if val_reduce is None:
        return None
    device = next(iter(params.values())).device
    return torch.full((m,), 1.0 / m if val_reduce == "mean" else 1.0, dtype=score_dtype(params), device=device)


def _prepare(where: str, model_fn: Any, params: Any, train: Any, val: Any,
             **options: Any) -> tuple[dict[str, Tensor], Batch, Batch]:
    check_model_fn(model_fn, where)
    check_options(where, **options)
    params = check_params(params, where)
    tb, vb = check_pair(train, val, where)
    check_model(model_fn, params, (tb, vb), where)  # parameters used, samples independent (cached)
    return params, tb, vb


@in_one_call
def graddot(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    val_reduce: str | None = "mean",
    policy: str = "auto",
    compute_dtype: torch.dtype | None = None,
    group: Any = None,
    compile: bool = False,
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
        policy: ``"auto"`` (the default: the first call with given shapes times the
            candidate routings, the close ones then take turns on the next few dozen
            calls, and the fastest in use is kept, see ``ghostfunc._calibrate``;
            ``GHOSTFUNC_ROUTING=model`` routes by the cost model alone), ``"2t2"``,
            ``"ghost"``, ``"materialize"`` or ``"contract"``; all give the same numbers
            (to rounding: the kernels sum in other orders).
        compute_dtype: opt-in lower precision (e.g. ``torch.bfloat16``) for the
            Gram/contract/materialise products, accumulated in float32.
        group: ``None`` (one process) or a ``torch.distributed`` process group:
            ``train`` and ``val`` are then this rank's rows of the global batches
            (every rank's rows in rank order), ``scores``, ``per_param`` and the
            losses are this rank's rows against the global validation gradient
            (``val_reduce=None``: against every rank's validation rows, columns in
            rank order), ``train_grad`` the global mean on every rank. See
            ``ghostfunc._dist``.
        compile: for small models called many times with the same shapes (a
            training run): once a signature has run eagerly and its batches were
            confirmed to run as one whole batch, later calls run as one
            ``torch.compile`` graph (fullgraph; the first such call compiles for
            seconds and is checked against the eager numbers). A model that cannot
            be compiled that way keeps the eager path, with the same numbers; the
            plan's notes say which ran. Needs ``val_reduce`` ``"mean"`` or ``"sum"``
            and one process (``group=None``). See ``ghostfunc._compiled``.

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
    if group is not None:  # (its refusal of compile=True on every rank, however the ranks were called)
        return graddot_group(model_fn, params, train, val, val_reduce, policy, compute_dtype, group, compile)
    check_compile(where, compile, val_reduce, group)
    checked, tb, vb = _prepare(where, model_fn, params, train, val,
                               val_reduce=val_reduce, policy=policy, compute_dtype=compute_dtype)
    params = checked
    if compile:
        from . import _compiled  # it builds on this module
    if policy == "auto" and _calibrate.untimed(model_fn, key := _calibrate.route_key(model_fn, params, tb, vb,
                                                                                      val_reduce)):
        # the first call with this signature races the candidate routings (ghostfunc._calibrate.race)
        plans = retry_stale(where, lambda fresh: [(label, routing(model_fn, params, tb, vb, where, c, val_reduce,
                                                                  fresh).plan)
                                                  for label, c in candidate_policies(val_reduce)])
        like = next(iter(params.values()))
        out, choice = _calibrate.race(model_fn, key, contenders(plans, like), lambda: graddot(
            model_fn, params, train, val, val_reduce=val_reduce, compute_dtype=compute_dtype), like.device)
        racing = [_compiled.ran_eagerly(_compiled.RACING)] if compile else []
        if compile and (turns := _calibrate.turns(model_fn, key)) is not None:
            choice = turns.stop(model_fn, key)  # compiled calls keep the race's winner: no turns
        return out._replace(plan=noted(out.plan._replace(tuning=choice.why), racing))
    if policy == "auto" and not compile and (turns := _calibrate.turns(model_fn, key)) is not None:
        # the routings close to the race's winner take turns on the calls after it (ghostfunc._calibrate.Turns)
        taken = turns.take(model_fn, key, lambda: graddot(model_fn, params, train, val, val_reduce=val_reduce,
                                                          compute_dtype=compute_dtype), next(iter(params.values())).device)
        if taken is not None:
            return taken[0]
    eager_why: str | None = None  # compile=True: why this call ran eagerly (a plan note)
    if compile:
        assert val_reduce is not None
        done = _compiled.scores(model_fn, params, tb, vb, where, policy, val_reduce, compute_dtype)
        if isinstance(done, GradDot):  # (its scores found finite in the graph: else the eager path runs, and raises)
            return done
        eager_why = done
    weights = val_weights(val_reduce, vb.size, params)
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
    scores = sum_scores(per_param, params)
    refuse_non_finite(where, scores, per_param, train_grad)
    eager = [] if eager_why is None else [_compiled.ran_eagerly(eager_why, the_plan)]
    return GradDot(scores, per_param, train_grad, train_loss, val_loss,
                   noted(the_plan, [*eager, *by_freq_notes(model_fn)]))


def prepare_group(where: str, group: Any, model_fn: Any, params: Any, train: Any, val: Any,
                  same: Mapping[str, Any] | None = None, precheck: Callable[[], None] | None = None,
                  **options: Any) -> tuple[tuple[dict[str, Tensor], Batch, Batch], _dist.World]:
    """:func:`_prepare` on every rank of ``group`` (after ``precheck``), then :func:`ghostfunc._dist.agree` on
    what must match (parameters, batch structures, ``options`` and ``same``): an error on one rank is raised on
    every rank."""
    def prepare() -> tuple[dict[str, Tensor], Batch, Batch]:
        if precheck is not None:
            precheck()
        return _prepare(where, model_fn, params, train, val, **options)

    return _dist.agree(
        where, group, prepare,
        lambda p: {"parameter names, shapes and dtypes": _dist.param_signature(p[0]),
                   "parameter values (fingerprints)": _dist.param_checksum(p[0]),
                   "train batch structure": _dist.batch_signature(train),
                   "val batch structure": _dist.batch_signature(val), **_dist.model_state(model_fn, p[0]), **options,
                   **(same or {})},
        lambda p: (p[1].size, p[2].size))


def score_group(st: Streamed, params: dict[str, Tensor], val_reduce: str, world: _dist.World, group: Any,
                dtype: torch.dtype | None, reach: Callable[[list[str]], frozenset[str]] | None = None,
                ) -> tuple[dict[str, Tensor], dict[str, Tensor], Plan, frozenset[str]]:
    """:func:`score_streamed` across ranks, from a capture of this rank's rows with ``val_reduce="sum"``.

    The capture ran under :func:`group_policy` (no ghost route: every rank would need
    every validation row's factors), so the local ``Σ_v g_v`` came from one ordinary
    backward; it is all-reduced in one go, divided by the global ``m`` for ``"mean"``;
    every parameter is scored against it; the training gradient is all-reduced to
    the global mean, with the parameters no rank's training rows reach (:func:`unused`).
    """
    assert not st.val_uses, "a ghost route under group="
    direction = _dist.allreduce_sum(dict(st.val_dir), group)
    if val_reduce == "mean":
        direction = {k: v / world.m for k, v in direction.items()}
    the_plan = st.plan._replace(n_train=world.n, n_val=world.m, val_reduce=val_reduce)
    n = world.n_train[world.rank]
    per_param, local_grad = {}, {}
    for k, route in the_plan.routes.items():
        per_param[k], local_grad[k] = score_direction(route.path, st.train[k], direction[k], n, params[k], dtype)
    train_grad, nowhere = _dist.global_mean(local_grad, world, group, unused(st.train_traces, local_grad, reach))
    return per_param, train_grad, the_plan, nowhere


def group_policy(policy: str) -> str:
    """The routing policy under ``group=`` with a reduced validation direction: a ghost route would need
    every rank's validation factors, so ``"auto"``, ``"2t2"`` and ``"ghost"`` pick the cheaper of
    contract and materialise against the all-reduced direction (:data:`ghostfunc._plan.DIRECTION`)."""
    return DIRECTION if policy in ("auto", "2t2", "ghost") else policy


def graddot_group(model_fn: ModelFn, params: Mapping[str, Tensor], train: Any, val: Any, val_reduce: str | None,
                  policy: str, compute_dtype: torch.dtype | None, group: Any, compile: Any = False) -> GradDot:
    """:func:`graddot` with ``group`` given: this rank's rows against the global batches."""
    where = "graddot"
    (checked, tb, vb), world = prepare_group(where, group, model_fn, params, train, val, val_reduce=val_reduce,
                                             policy=policy, compute_dtype=compute_dtype,
                                             precheck=lambda: check_compile(where, compile, val_reduce, group))
    if val_reduce is not None:
        with _dist.collectively(where, group):  # an error on one rank raises on every rank (one tiny all-reduce)
            st = run_streamed(model_fn, checked, tb, vb, where, group_policy(policy), "sum")
            refuse_non_finite_val(where, st.val_dir)
        per_param, train_grad, the_plan, _ = score_group(st, checked, val_reduce, world, group, compute_dtype)
        scores = sum_scores(per_param, checked)
        with _dist.collectively(where, group):  # a rank's scores alone may overflow: every rank raises
            refuse_non_finite(where, scores, per_param, train_grad, local=True)
        return GradDot(scores, per_param, train_grad, st.train_loss, st.val_loss,
                       noted(the_plan, by_freq_notes(model_fn)))
    # every validation row on every rank: gather the rows, score the full matrix locally
    every_val = _dist.gather_batch(vb, world, group)
    with _dist.collectively(where, group):
        cap, the_plan = run(model_fn, checked, tb, every_val, where, policy, None)
        per_param, local_grad = {}, {}
        for k, route in the_plan.routes.items():
            tr, va = cap.grads[k]
            per_param[k], local_grad[k] = score_param(route.path, tr, va, None, tb.size, world.m, checked[k],
                                                      compute_dtype)
        scores = sum_scores(per_param, checked)
        refuse_non_finite(where, scores, per_param, local_grad, local=True)
    val_loss = cap.val_loss[world.val_offset: world.val_offset + vb.size]
    return GradDot(scores, per_param, _dist.global_mean(local_grad, world, group)[0],
                   cap.train_loss, val_loss, noted(the_plan._replace(n_train=world.n), by_freq_notes(model_fn)))


@in_one_call
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
    return retry_stale(where, lambda fresh: routing(model_fn, params, tb, vb, where, policy, val_reduce, fresh).plan)
