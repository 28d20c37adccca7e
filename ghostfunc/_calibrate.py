"""The cost model's memory-traffic constants, and ``auto``'s routing measured at first use.

:func:`ghostfunc._plan.costs` counts each kernel in multiply-add equivalents. The
GEMMs are counted exactly; two terms are memory traffic, whose price in
multiply-adds depends on the machine (cache sizes, bandwidth against FLOPs):

- ``materialise``: per element of a materialised per-row gradient block
  (written by a ``bmm``, read to dot it and to sum it);
- ``gram``: per (train token, val token) pair of the Gram kernel.

The environment variable ``GHOSTFUNC_COSTS`` chooses them: unset or ``"default"``,
the constants fitted on a 2-core CPU (:data:`DEFAULT`); ``"measure"``, measured once
per process and ``(device, dtype)`` by :func:`measure` (a few tens of milliseconds:
the real kernels :func:`ghostfunc._kernels.materialise_dots` and
:func:`ghostfunc._kernels.gram` on small synthetic factors against a GEMM of known
size, the fastest of a few repeats; kept for the process, nothing written to disk);
``"materialise=96,gram=32"``, given values.

Measuring is opt-in because, on the machine it was tried on, it routed worse than
the fixed constants (``benchmarks/mlp2d.py``, both in the same run: auto within 5% of
the fastest kernel in 14/25 cells measured, 17/25 fixed): synthetic factors in an
otherwise idle cache understate the block traffic of a real capture.

**Measured routing** (``GHOSTFUNC_ROUTING``, default ``"measure"``). No per-kernel
cost model predicts the whole call well at small sizes, where dispatch and the
capture, not the products, set the time, and where the routes are coupled: one
ghost-routed parameter makes the validation rows take a tap capture of their own
factors, where without ghost they take one ordinary backward. So the first
``graddot(policy="auto")`` call for a call signature (``model_fn``, parameter names,
shapes, dtypes and device, both batches' sizes and structures, ``val_reduce`` reduced or not,
train/eval modes) *races* the candidate routings (:func:`race`): the cost model's, the
cost model's without ghost, and ghost, materialise and contract everywhere (merged
where they route alike), each a whole exact call timed with the CPU-time clock
(one torch thread on a CPU) or the wall clock (synchronised on CUDA), best of up to
:data:`RACE_ROUNDS` rounds within :func:`_budget` (after the first, only the candidates
within :data:`CLOSE_FACTOR` of the fastest run again; round 1 skips those the cost model
puts far behind when they would also overrun the budget). The fastest routing is cached
(:class:`Choice`, in memory, per ``model_fn``); that call returns its result, and later
calls with the signature route by it (so do ``plan`` and the training steps, which
never race themselves). Every candidate computes the same exact numbers, the random
state after the call is the winner's, and the plan says what was timed. ``"model"``:
never race, route by the cost model alone.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import torch

from . import _kernels as K
from ._interact import param_signature, training_flags
from ._ops import Factored
from ._whole import rng_state as _rng_state
from ._whole import set_rng_state as _set_rng_state

ENV = "GHOSTFUNC_COSTS"


class Constants(NamedTuple):
    """Multiply-add equivalents of one materialised block element and of one Gram token pair.

    ``source``: ``"default"``, ``"env"`` or ``"measured"``.
    """

    materialise: float
    gram: float
    source: str


#: Fitted once on a 2-core CPU (``benchmarks/mlp2d.py``): materialise 50-180, gram 25-65.
DEFAULT = Constants(96.0, 32.0, "default")
#: Measured figures are clipped to this range (a timer glitch must not send every call one way).
LIMITS = (1.0, 2000.0)

_MEASURED: dict[tuple, Constants] = {}


def constants(device: torch.device, dtype: torch.dtype) -> Constants:
    """The constants for kernels on ``device`` in ``dtype`` as ``GHOSTFUNC_COSTS`` says (default: :data:`DEFAULT`)."""
    setting = os.environ.get(ENV, "default").strip()
    if setting != "measure":
        return parse(setting)
    key = (device.type, device.index, dtype, torch.__version__)
    if key not in _MEASURED:
        _MEASURED[key] = measure(device, dtype)
    return _MEASURED[key]


def parse(text: str) -> Constants:
    """``"default"`` or ``"materialise=<float>,gram=<float>"`` (either may be left out)."""
    if text.strip() in ("default", ""):
        return DEFAULT
    values = {"materialise": DEFAULT.materialise, "gram": DEFAULT.gram}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in values:
            raise ValueError(f"{ENV}: expected 'default', 'measure' or 'materialise=<float>,gram=<float>'; "
                             f"got {text!r}")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{ENV}: {name.strip()} must be a number; got {value!r}") from None
    return Constants(values["materialise"], values["gram"], "env")


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls (after one warm-up), synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device: torch.device, dtype: torch.dtype) -> Constants:
    """Time a GEMM, the fused materialise and the Gram kernel on small factors; express the last two
    in multiply-adds of the first, minus their own GEMM work (a few milliseconds on a CPU)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    big = 4 if device.type == "cuda" else 1  # GPUs need larger problems to leave the launch-bound regime
    k = 192 * big
    a, b = rand(k, k), rand(k, k)
    _seconds(lambda: a @ b, device)  # wake the thread pool
    per_mac = _seconds(lambda: a @ b, device, repeats=5) / k**3

    n, p, d = 8 * big, 256, 256  # materialise at T = 1: the block traffic dominates
    rows = Factored(rand(n, 1, p), rand(n, 1, d), p)
    u = rand(p, d)
    spent = _seconds(lambda: K.materialise_dots([rows], u, n), device) / per_mac
    materialise = (spent - n * p * d) / (n * p * d)

    n, t, p, d = 8 * big, 16, 64, 64  # Gram at short sequences and narrow layers: the pair traffic dominates
    left, right = Factored(rand(n, t, p), rand(n, t, d), p), Factored(rand(n, t, p), rand(n, t, d), p)
    spent = _seconds(lambda: K.gram(left, right), device) / per_mac
    gram = spent / (n * n * t * t) - p - d

    def clip(x: float) -> float:
        return min(max(x, LIMITS[0]), LIMITS[1])

    return Constants(clip(materialise), clip(gram), "measured")


# ----------------------------------------------------------------------------- measured routing

ROUTING_ENV = "GHOSTFUNC_ROUTING"
ROUTING_MODES = ("measure", "model")
#: At most this many rounds of the race (each candidate's fastest run counts) ... Calls of a few milliseconds
#: fit several rounds in the budget, and need them: on the token-wise MLP at T = 4, width 128 (3 ms a call), a
#: race of 3 rounds picked ghost, 10% slower than contract, after a burst of another process's load.
RACE_ROUNDS = 6
#: ... and another round only while the race, that round included, stays within this many seconds or
#: :data:`RACE_CALLS` calls of the fastest routing, whichever is more (round 1 runs whatever pruning leaves).
RACE_BUDGET_S = 0.05
RACE_CALLS = 8
#: A first run of the race shorter than this runs again at once: it paid the call's one-time costs (a few
#: milliseconds on a CPU), which would count against the cost model's routing (always the first to run).
WARM_UP_S = 0.25
#: Round 1 skips a candidate the cost model puts beyond this factor of the cheapest when the cheapest one's run
#: took :data:`PRUNE_AFTER_S` or more (the products, which the model counts well, set the time), or when, scaled
#: by that run, it would take over twice the budget.
PRUNE_FACTOR = 2.0
PRUNE_AFTER_S = 0.05
#: After a round, only candidates within this factor of the fastest so far run again (the others are clearly out);
#: a candidate timed once so far, within :data:`COLD_FACTOR` (its one run may have paid one-time costs: on the
#: token-wise MLP at T = 256, width 64, materialise's first run took 1.4x its later ones, 1.4x contract's).
CLOSE_FACTOR = 1.3
COLD_FACTOR = 1.6
#: A call whose cost-model routing runs longer than this is not raced (the race would cost several such calls,
#: where the products, which the cost model counts well, set the time): the cost model's routing is kept.
RACE_LIMIT_S = 0.1
#: Measured routings kept per ``model_fn`` (a new call signature races once; every distinct padded length is one).
MAX_SIGNATURES = 64


def routing_mode() -> str:
    """``"measure"`` (race at first use, the default) or ``"model"`` (the cost model alone), as ``GHOSTFUNC_ROUTING`` says."""
    setting = os.environ.get(ROUTING_ENV, "").strip() or "measure"
    if setting not in ROUTING_MODES:
        raise ValueError(f"{ROUTING_ENV}: expected one of {ROUTING_MODES}; got {setting!r}")
    return setting


class Choice(NamedTuple):
    """``auto``'s routing for one call signature, measured at first use.

    ``paths``: factored parameter -> kernel; ``label``: the candidate(s) that route
    so (``"materialize = cost model"`` when two routed alike); ``why``: what was timed.
    """

    paths: dict[str, str]
    label: str
    why: str


class Candidate(NamedTuple):
    """One routing the race may time: ``estimate`` is the cost model's multiply-adds for the whole call."""

    label: str
    paths: dict[str, str]
    estimate: float


#: ``model_fn`` -> {call signature: its measured routing}.
_CHOICES: weakref.WeakKeyDictionary[Any, dict[tuple, Choice]] = weakref.WeakKeyDictionary()


def route_key(model_fn: Callable, params: Mapping[str, torch.Tensor], train: Any, val: Any,
              val_reduce: str | None) -> tuple:
    """What a measured routing is cached by (besides ``model_fn``): parameter names, shapes, dtypes and
    devices, each batch's size and signature (:class:`ghostfunc._capture.Batch`), reduced or not, train/eval modes."""
    return (param_signature(params), train.size, train.signature,
            val.size, val.signature, val_reduce is not None, training_flags(model_fn))


def tuned(model_fn: Callable, key: tuple) -> Choice | None:
    """The cached routing for this call signature (``None``: none yet, or ``GHOSTFUNC_ROUTING=model``)."""
    if routing_mode() != "measure":
        return None
    try:
        return _CHOICES.get(model_fn, {}).get(key)
    except TypeError:  # not weak-referenceable
        return None


def untimed(model_fn: Callable, key: tuple) -> bool:
    """Whether a call with this signature should race: measuring is on, nothing is cached, and it can be cached."""
    if routing_mode() != "measure":
        return False
    try:
        weakref.ref(model_fn)
    except TypeError:  # nowhere to keep the result: racing every call would cost more than it saves
        return False
    return key not in _CHOICES.get(model_fn, {})


R = TypeVar("R")


def race(model_fn: Callable, key: tuple, candidates: Sequence[Candidate], call: Callable[[], R],
         device: torch.device) -> tuple[R, Choice]:
    """Time ``call()`` under every distinct candidate routing; cache and return the fastest with its result.

    While a candidate runs, it is the cached choice for ``key``, so ``call`` (an
    ``auto`` call) routes by it. Candidates run cheapest estimate first, in rotated
    order over rounds; each starts from the same random state, and the state after
    the winner's run is the one left behind. Of each candidate's runs the fastest counts.
    """
    merged: dict[tuple, Candidate] = {}
    for c in sorted(candidates, key=lambda c: c.estimate):
        same = tuple(sorted(c.paths.items()))
        merged[same] = merged[same]._replace(label=f"{merged[same].label} = {c.label}") if same in merged else c
    order = list(merged.values())
    table = _CHOICES.setdefault(model_fn, {})
    while len(table) >= MAX_SIGNATURES:  # the oldest measurement goes first
        del table[next(iter(table))]
    if len(order) == 1:
        choice = Choice(order[0].paths, order[0].label, f"one candidate routing ({order[0].label}): nothing to time")
        table[key] = choice
        return call(), choice
    clock, clock_name = _clock(device)
    start = _rng_state(device)
    best: dict[str, float] = {}
    runs: dict[str, int] = {}
    failed: dict[str, str] = {}
    kept: tuple[float, Candidate, R, tuple[torch.Tensor, ...]] | None = None
    spent = 0.0

    def run(c: Candidate) -> None:
        nonlocal kept, spent
        table[key] = Choice(c.paths, c.label, "being measured")
        _set_rng_state(device, start)
        try:
            seconds, result = _timed(call, device, clock)
        except Exception as err:  # noqa: BLE001 - a candidate that fails is dropped, and the plan says so
            if kept is None:  # the cheapest estimate (the cost model's routing) must run
                raise
            failed[c.label] = f"{type(err).__name__}: {err}"[:120]
            return
        spent += seconds
        runs[c.label] = runs.get(c.label, 0) + 1
        best[c.label] = min(best.get(c.label, math.inf), seconds)
        if kept is None or seconds < kept[0]:
            kept = (seconds, c, result, _rng_state(device))

    try:
        first = order[0]
        run(first)
        warmed = spent < WARM_UP_S  # the first run of all also paid one-time costs (first captures, allocations)
        spent = 0.0  # those costs are the call's own, not the race's: the budget counts from here
        if warmed:
            run(first)
        if best[first.label] > RACE_LIMIT_S:  # a long call: the race would cost several; the cost model stands
            order = [first]
        # round 1: every other candidate, unless the cost model puts it beyond PRUNE_FACTOR of the cheapest and
        # either the products set the time (the first run was long) or, scaled by that run, it overruns the budget
        t_first = best[first.label]
        for c in order[1:]:
            far = c.estimate > PRUNE_FACTOR * first.estimate
            predicted = t_first * c.estimate / max(first.estimate, 1.0)  # as if the products set every time
            if not far or (t_first < PRUNE_AFTER_S and predicted <= 2 * _budget(t_first)):
                run(c)
        rounds, timed = 1, [c for c in order if c.label in best]
        while rounds < RACE_ROUNDS:
            fastest = min(best.values())
            # a candidate with one run so far may have paid one-time costs in it (the first allocation of a
            # kernel's blocks, say): it runs again unless it is out by COLD_FACTOR
            close = [c for c in timed if best[c.label] <= (CLOSE_FACTOR if runs[c.label] > 1 else COLD_FACTOR) * fastest
                     or (rounds == 1 and c is first and not warmed)]  # one-time costs, in its only run
            if len(close) < 2 or spent + sum(best[c.label] for c in close) > _budget(fastest):
                break
            timed = close[rounds % len(close):] + close[:rounds % len(close)]
            for c in timed:
                run(c)
            rounds += 1
    except BaseException:
        table.pop(key, None)
        _set_rng_state(device, start)
        raise
    assert kept is not None
    _set_rng_state(device, kept[3])
    timings = ", ".join(f"{label} {s * 1e3:.3g} ms" for label, s in sorted(best.items(), key=lambda kv: kv[1]))
    skipped = [c.label for c in merged.values() if c.label not in best and c.label not in failed]
    why = (f"auto measured at first use ({clock_name}, {rounds} round{'s' * (rounds > 1)}, each candidate's "
           f"fastest run): {timings}"
           + (f"; not timed (the cost model's routing took over {RACE_LIMIT_S:g} s): {', '.join(skipped)}"
              if skipped and len(order) == 1 else
              f"; not timed (the cost model puts it past {PRUNE_FACTOR:g}x the cheapest and the race's budget): "
              f"{', '.join(skipped)}" if skipped else "")
           + "".join(f"; {label} failed ({e})" for label, e in failed.items()))
    choice = Choice(kept[1].paths, kept[1].label, why)
    table[key] = choice
    return kept[2], choice


def _budget(fastest: float) -> float:
    """Seconds the race may spend in all: :data:`RACE_BUDGET_S`, or :data:`RACE_CALLS` calls of the fastest routing."""
    return max(RACE_BUDGET_S, RACE_CALLS * fastest)


def _clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """This process's CPU time on a one-thread CPU (other processes' load barely moves it), else the wall clock."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "CPU time"
    return time.perf_counter, "wall clock"


def _timed(call: Callable[[], R], device: torch.device, clock: Callable[[], float]) -> tuple[float, R]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = clock()
    out = call()
    sync()
    return clock() - t0, out
