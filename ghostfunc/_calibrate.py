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
never race themselves). A race at first use times each routing a few times, each
right after another one ran, on a machine whose speed may change within the race:
so the routings within :data:`TURNS_FACTOR` of the winner then take turns on the
real ``graddot`` calls that follow (:class:`Turns`: a few dozen calls, each exact,
timed in cycles so that the machine's speed cancels) and the fastest in use is
cached for good. A call that runs longer than :data:`RACE_LIMIT_S` is not raced (the
race would cost several of it): it takes the cost model's routing, and the routings
the cost model puts within :data:`TURNS_FACTOR` of that one take turns on the calls
that follow (a dozen calls for three routings). Every candidate computes the same exact numbers, the random
state after the call is the winner's, and the plan says what was timed. ``"model"``:
never race, route by the cost model alone.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import torch

from . import _kernels as K
from ._bymodel import ByModel
from ._interact import SIGNATURES, param_signature, training_flags
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
#: where the products, which the cost model counts well, set the time): the cost model's routing is kept for it,
#: and the routings the model puts close to it take turns on the calls that follow (:data:`LONG_TURNS_CYCLES`).
RACE_LIMIT_S = 0.1
#: A long call (see :data:`RACE_LIMIT_S`) is not raced, but the routings the cost model puts within
#: :data:`TURNS_FACTOR` of its own (at most :data:`TURNS_MAX`) take turns on the calls that follow, in
#: :data:`LONG_TURNS_CYCLES` cycles of :data:`LONG_TURNS_BLOCK` calls (a long call's time varies little from call
#: to call; a dozen calls in all for three routings). The cost model counts the products well but prices the
#: kernels' memory traffic with constants fitted once: on the GPT-2-shaped sweep at T = 64 (1 s calls) its mixed
#: routing ran 1.16x the plain step where ghost everywhere ran 0.94x.
LONG_TURNS_CYCLES = 2
LONG_TURNS_BLOCK = 2
#: Measured routings kept per ``model_fn`` (a new call signature races once; every distinct padded length is one).
MAX_SIGNATURES = SIGNATURES
#: After the race, the routings whose fastest run came within this factor of the winner's (at most
#: :data:`TURNS_MAX`, the winner included) take turns on the real calls that follow (:class:`Turns`), and the
#: fastest in use is kept. The race times each routing a few times, right after another one ran, at first use; on
#: the token-wise MLP at T = 256, width 256 it put contract 6% ahead of materialise, which ran 15% faster than
#: contract once in use, and at T = 4, width 128 it timed contract at 1.38x ghost, which contract beat by 10% in
#: use (with 1.25 here, contract did not take turns and ghost was kept). A routing that takes its turn in vain
#: costs a few dozen calls at most this factor slower, once per signature.
TURNS_FACTOR = 1.5
TURNS_MAX = 3
#: The turns: :data:`TURNS_CYCLES` cycles, each a block of consecutive calls of every routing (in rotated order).
#: A block lasts about :data:`TURNS_BLOCK_S`, with :data:`TURNS_BLOCK_MIN` to :data:`TURNS_BLOCK_MAX` calls; a
#: call right after another routing ran is not counted.
TURNS_CYCLES = 4
TURNS_BLOCK_S = 0.01
TURNS_BLOCK_MIN = 3
TURNS_BLOCK_MAX = 50
#: In the plan's ``tuning`` line while the routings take turns.
TAKING_TURNS = "take turns on later calls"


def routing_mode() -> str:
    """``"measure"`` (race at first use, the default) or ``"model"`` (the cost model alone), as ``GHOSTFUNC_ROUTING`` says."""
    setting = os.environ.get(ROUTING_ENV, "").strip() or "measure"
    if setting not in ROUTING_MODES:
        raise ValueError(f"{ROUTING_ENV}: expected one of {ROUTING_MODES}; got {setting!r}")
    return setting


class Choice(NamedTuple):
    """``auto``'s routing for one call signature, measured at first use.

    ``paths``: factored parameter -> kernel; ``label``: the candidate(s) that route
    so (``"materialize = cost model"`` when two routed alike); ``why``: what was timed;
    ``state``: ``"fastest"``, or ``"taking its turn"`` while the routings close to the
    race's winner take turns on the calls that follow it (:class:`Turns`).
    """

    paths: dict[str, str]
    label: str
    why: str
    state: str = "fastest"


class Candidate(NamedTuple):
    """One routing the race may time: ``estimate`` is the cost model's multiply-adds for the whole call."""

    label: str
    paths: dict[str, str]
    estimate: float


#: ``model_fn`` -> {call signature: its measured routing}.
_CHOICES: ByModel[Any, dict[tuple, Choice]] = ByModel()
#: ``model_fn`` -> {call signature: the routings still taking turns after its race}.
_TURNS: ByModel[Any, dict[tuple, Turns]] = ByModel()


def route_key(model_fn: Callable, params: Mapping[str, torch.Tensor], train: Any, val: Any,
              val_reduce: str | None) -> tuple:
    """What a measured routing is cached by (besides ``model_fn``): parameter names, shapes, dtypes and
    devices, each batch's size and tensors' shapes, dtypes and devices, reduced or not, train/eval modes. Not the
    batch's other leaves (what the checks and traces are keyed by): a text column or a list of ids that is new on
    every call raced the routings again on every call (36x a call on a small MLP), for times that depend on the
    shapes alone."""
    return (param_signature(params), train.size, _shapes(train), val.size, _shapes(val), val_reduce is not None,
            training_flags(model_fn))


def _shapes(batch: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in batch.tensors)


def tuned(model_fn: Callable, key: tuple) -> Choice | None:
    """The cached routing for this call signature (``None``: none yet, or ``GHOSTFUNC_ROUTING=model``)."""
    return _measured(_CHOICES, model_fn, key)


V = TypeVar("V")


def _measured(table: weakref.WeakKeyDictionary[Any, dict[tuple, V]], model_fn: Callable, key: tuple) -> V | None:
    """``table[model_fn][key]`` while measuring is on (``None``: nothing there, ``GHOSTFUNC_ROUTING=model``, or a
    ``model_fn`` that cannot be weakly referenced)."""
    if routing_mode() != "measure":
        return None
    try:
        return table.get(model_fn, {}).get(key)
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
        _TURNS.get(model_fn, {}).pop(oldest := next(iter(table)), None)
        del table[oldest]
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
    long_call = False

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
        long_call = best[first.label] > RACE_LIMIT_S
        if long_call:  # the race would cost several such calls: the cost model's routing stands (turns below)
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
    if long_call:  # not raced: the routings the cost model puts close to its own take turns
        near = [kept[1], *(c for c in merged.values()  # (in the cost model's order)
                           if c is not kept[1] and c.label not in failed
                           and c.estimate <= TURNS_FACTOR * kept[1].estimate)][:TURNS_MAX]
        which = f"then the routings the cost model puts within {TURNS_FACTOR:g}x of its own"
        cycles, block = LONG_TURNS_CYCLES, LONG_TURNS_BLOCK
    else:
        near = [kept[1], *sorted((c for c in merged.values() if c is not kept[1]
                                  and best.get(c.label, math.inf) <= TURNS_FACTOR * kept[0]),
                                 key=lambda c: best[c.label])][:TURNS_MAX]
        which = f"then the routings within {TURNS_FACTOR:g}x of the fastest"
        cycles = TURNS_CYCLES
        block = min(TURNS_BLOCK_MAX, max(TURNS_BLOCK_MIN, math.ceil(TURNS_BLOCK_S / max(kept[0], 1e-9))))
    if len(near) > 1:  # the winner is cached as taking its turn, the first of the turns
        _TURNS.setdefault(model_fn, {})[key] = turns = Turns(choice, near, block, clock_name, which, cycles)
        choice = turns.choices[0]
    table[key] = choice
    return kept[2], choice


class Turns:
    """The routings close to the race's winner, taking turns on the real calls that follow it.

    :data:`TURNS_CYCLES` cycles; in each, every routing runs ``block`` consecutive
    calls (the order rotated from cycle to cycle); a call right after another
    routing ran is not counted. Within a cycle each routing's median call is
    divided by the cycle's mean of them, so that the machine's speed, which can
    change by a third within a second when other work shares its cores, cancels
    between routings timed close together; the routing with the lowest median of
    these over the cycles is cached for good. Every call computes the same exact
    numbers (to rounding: the kernels sum in other orders); only the time differs.
    One thread at a time takes a turn: a call that overlaps one routes by the cache
    as it stands, untimed.
    """

    def __init__(self, winner: Choice, near: Sequence[Candidate], block: int, clock_name: str,
                 close: str | None = None, cycles: int = TURNS_CYCLES) -> None:
        self.winner, self.block, self.clock_name, self.cycles = winner, block, clock_name, cycles
        self.close = f"{winner.why}; {close or f'then the routings within {TURNS_FACTOR:g}x of the fastest'}"
        head = f"{self.close} {TAKING_TURNS}"
        self.choices = [winner._replace(why=head, state="taking its turn") if c.label == winner.label else
                        Choice(c.paths, c.label, head, "taking its turn") for c in near]
        m = len(near)
        #: (cycle, routing) of each call, in order
        self.schedule = [(r, (r + j) % m) for r in range(cycles) for j in range(m) for _ in range(block)]
        self.times: list[list[list[float]]] = [[[] for _ in near] for _ in range(cycles)]
        self.calls = 0
        self.lock = threading.Lock()

    def take(self, model_fn: Callable, key: tuple, call: Callable[[], R], device: torch.device) -> tuple[R] | None:
        """Run ``call()`` as the schedule's next routing and time it; ``None`` when another call holds the turn
        (the caller then runs as the cache stands)."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            table = _CHOICES.get(model_fn)
            if table is None or _TURNS.get(model_fn, {}).get(key) is not self:  # evicted meanwhile
                return None
            cycle, i = self.schedule[self.calls]
            counted = self.calls > 0 and self.schedule[self.calls - 1][1] == i
            table[key] = self.choices[i]
            try:
                clock, _ = _clock(device)
                seconds, out = _timed(call, device, clock)
            except BaseException:  # keep the race's winner; the error is the call's
                self._finish(model_fn, key, self.winner)
                raise
            self.calls += 1
            if counted:
                self.times[cycle][i].append(seconds)
            if self.calls == len(self.schedule):
                self._finish(model_fn, key, self._verdict())
            return (out,)
        finally:
            self.lock.release()

    def _verdict(self) -> Choice:
        """The routing with the lowest median over cycles of its time relative to the cycle's mean."""
        relative: list[list[float]] = [[] for _ in self.choices]
        for cycle in self.times:
            medians = [statistics.median(t) for t in cycle]
            mean = sum(medians) / len(medians)
            for i, m in enumerate(medians):
                relative[i].append(m / mean)
        score = [statistics.median(r) for r in relative]
        best = min(range(len(score)), key=score.__getitem__)
        overall = [statistics.median(t for cycle in self.times for t in cycle[i]) for i in range(len(self.choices))]
        timings = ", ".join(f"{c.label} {t * 1e3:.3g} ms ({r:.2f})"
                            for c, t, r in zip(self.choices, overall, score, strict=True))
        why = (f"{self.close} took turns on {self.calls} later calls ({self.clock_name}, {self.cycles} cycles; "
               f"median call, and median over cycles of it against the cycle's mean): {timings}; "
               f"kept {self.choices[best].label}")
        return Choice(self.choices[best].paths, self.choices[best].label, why)

    def stop(self, model_fn: Callable, key: tuple) -> Choice:
        """End the turns now, keeping the race's winner (a compiled call would compile one graph per routing)."""
        with self.lock:
            self._finish(model_fn, key, self.winner)
        return self.winner

    def _finish(self, model_fn: Callable, key: tuple, choice: Choice) -> None:
        _CHOICES.setdefault(model_fn, {})[key] = choice
        _TURNS.get(model_fn, {}).pop(key, None)


def turns(model_fn: Callable, key: tuple) -> Turns | None:
    """The routings taking turns for this call signature after its race (``None``: none, or settled)."""
    return _measured(_TURNS, model_fn, key)


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
