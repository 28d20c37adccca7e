"""``auto``'s routing measured at first use: a race of whole exact calls, cached per call signature.

Whichever routing wins, the numbers are the exact ones (every candidate, and any
per-parameter mix of kernels, agrees with the single-sample loop in float64); the
cache makes later calls, ``plan`` and the random state deterministic.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import ghostfunc
from ghostfunc import _calibrate
from ghostfunc._capture import split_batch
from ghostfunc._graddot import routing
from ghostfunc._plan import candidate_policies

from . import _models

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _seq(tied: bool = True, shared: bool = True):
    """Embedding (tied to the output: two uses), a linear layer applied twice, a norm: every route kind."""
    torch.manual_seed(0)
    model_fn, params, make = _models.seq(11, 6, "layer", True, None, tied, shared, F64)
    g = torch.Generator().manual_seed(1)
    return model_fn, params, make(3, 5, g), make(2, 4, g)


def _key(model_fn, params, train, val, val_reduce):
    return _calibrate.route_key(model_fn, params, split_batch(train), split_batch(val), val_reduce)


def _candidate_paths(model_fn, params, train, val, val_reduce) -> list[dict[str, str]]:
    tb, vb = split_batch(train), split_batch(val)
    return [{k: r.path for k, r in routing(model_fn, params, tb, vb, "graddot", policy, val_reduce, False)
             .plan.routes.items() if r.factored} for _, policy in candidate_policies(val_reduce)]


@pytest.mark.parametrize("val_reduce", ["mean", None])
def test_first_call_races_the_candidates_and_later_calls_route_by_the_cache(monkeypatch, val_reduce):
    monkeypatch.delenv(_calibrate.ROUTING_ENV, raising=False)
    model_fn, params, train, val = _seq()
    key = _key(model_fn, params, train, val, val_reduce)
    assert _calibrate.untimed(model_fn, key)
    before = ghostfunc.plan(model_fn, params, train, val, val_reduce=val_reduce)
    assert before.tuning.startswith("cost model; the first graddot call")
    first = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce)
    assert first.plan.tuning.startswith("auto measured at first use"), first.plan
    assert "routing: auto measured at first use" in str(first.plan)
    choice = _calibrate.tuned(model_fn, key)
    assert choice is not None and not _calibrate.untimed(model_fn, key)
    paths = {k: r.path for k, r in first.plan.routes.items() if r.factored}
    assert paths == choice.paths
    assert paths in _candidate_paths(model_fn, params, train, val, val_reduce)  # one of the candidates
    # the winner: the routing kept, or the first to take its turn when routings close to it take turns
    assert choice.state in ("fastest", "taking its turn")
    assert (choice.state == "taking its turn") == (_calibrate.turns(model_fn, key) is not None)
    assert first.plan.tuning == choice.why and (_calibrate.TAKING_TURNS in choice.why) == (choice.state != "fastest")
    assert all(r.reason == f"measured: {choice.label} fastest" for r in first.plan.routes.values() if r.factored)
    for label in choice.label.split(" = "):  # every timed candidate is listed with its time
        assert label in first.plan.tuning
    ref, _, _ = ghostfunc.reference_graddot(model_fn, params, train, val, val_reduce=val_reduce)
    assert rel(first.scores, ref) < 1e-10
    # the routings close to the winner may take turns on the next calls, each exact, then the cache settles
    candidates, calls = _candidate_paths(model_fn, params, train, val, val_reduce), 0
    while _calibrate.turns(model_fn, key) is not None:
        during = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce)
        assert _calibrate.TAKING_TURNS in during.plan.tuning
        assert {k: r.path for k, r in during.plan.routes.items() if r.factored} in candidates
        assert rel(during.scores, ref) < 1e-10
        calls += 1
        assert calls <= _calibrate.TURNS_CYCLES * _calibrate.TURNS_MAX * _calibrate.TURNS_BLOCK_MAX
    settled = _calibrate.tuned(model_fn, key)
    assert settled is not None and settled.state == "fastest"
    # later calls: no race, the same routing, the same numbers bit for bit; plan() shows it too
    second = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce)
    third = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce)
    assert second.plan == third.plan and second.plan.tuning == settled.why
    assert torch.equal(second.scores, third.scores)
    assert {k: r.path for k, r in second.plan.routes.items() if r.factored} == settled.paths
    assert all(r.reason == f"measured: {settled.label} fastest" for r in second.plan.routes.values() if r.factored)
    assert ghostfunc.plan(model_fn, params, train, val, val_reduce=val_reduce).routes == second.plan.routes
    assert rel(second.scores, ref) < 1e-10


@given(data=st.data())
def test_any_measured_routing_is_exact(data):
    """Seed the cache with any per-parameter mix of kernels: auto follows it and stays exact."""
    val_reduce = data.draw(st.sampled_from(["mean", "sum", None]))
    tied, shared = data.draw(st.booleans()), data.draw(st.booleans())
    model_fn, params, train, val = _seq(tied, shared)
    factored = _candidate_paths(model_fn, params, train, val, val_reduce)[0]
    kernels = ["ghost", "materialize"] + (["contract"] if val_reduce is not None else [])
    paths = {k: data.draw(st.sampled_from(kernels), label=k) for k in factored}
    key = _key(model_fn, params, train, val, val_reduce)
    _calibrate._CHOICES.setdefault(model_fn, {})[key] = _calibrate.Choice(paths, "seeded", "seeded by the test")
    out = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce)
    assert {k: r.path for k, r in out.plan.routes.items() if r.factored} == paths
    assert out.plan.tuning == "seeded by the test"
    ref, ref_pp, ref_grad = ghostfunc.reference_graddot(model_fn, params, train, val, val_reduce=val_reduce)
    assert rel(out.scores, ref) < 1e-10, out.plan
    scale = float(ref.abs().max())
    for k in params:
        torch.testing.assert_close(out.per_param[k], ref_pp[k], rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(out.train_grad[k], ref_grad[k], rtol=1e-10, atol=1e-12)


def test_the_race_leaves_the_random_state_of_the_winner_alone():
    """Dropout draws random numbers: the race's call returns what the winner alone would, and leaves its state."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).to(F64).train()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        return functional_call(net, p, (x,)).pow(2).sum((1, 2))

    g = torch.Generator().manual_seed(2)
    train, val = torch.randn(4, 3, 5, generator=g, dtype=F64), torch.randn(3, 3, 5, generator=g, dtype=F64)
    torch.manual_seed(7)
    raced = ghostfunc.graddot(model_fn, params, train, val)
    after_race = torch.get_rng_state()
    assert raced.plan.tuning.startswith("auto measured at first use")
    torch.manual_seed(7)
    cached = ghostfunc.graddot(model_fn, params, train, val)  # routes by the cache: no race
    assert torch.equal(cached.scores, raced.scores)
    assert torch.equal(torch.get_rng_state(), after_race)
    # the calls on which close routings take turns draw as any one routing would: the same masks, call after call
    key = _key(model_fn, params, train, val, "mean")
    torch.manual_seed(8)
    auto = [ghostfunc.graddot(model_fn, params, train, val).scores]
    while _calibrate.turns(model_fn, key) is not None:
        auto.append(ghostfunc.graddot(model_fn, params, train, val).scores)
    auto.append(ghostfunc.graddot(model_fn, params, train, val).scores)
    after_auto = torch.get_rng_state()
    torch.manual_seed(8)
    fixed = [ghostfunc.graddot(model_fn, params, train, val, policy="contract").scores for _ in auto]
    assert torch.equal(torch.get_rng_state(), after_auto)
    for a, f in zip(auto, fixed, strict=True):
        assert rel(a, f) < 1e-10


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_race_times_distinct_candidates_and_keeps_the_fastest():
    """The race itself on a stand-in call (CPU busy-work per candidate): merge, order, failures, cache."""

    def model_fn():  # only the cache's key
        return None

    work = {"slow": 0.004, "fast": 0.001, "same as slow": 0.004}
    seen: list[str] = []

    def call() -> str:
        choice = _calibrate._CHOICES[model_fn][("k",)]
        assert choice.why == "being measured"
        seen.append(choice.label)
        if choice.label == "broken":
            raise RuntimeError("no kernel for this")
        _busy(work[choice.label.split(" = ")[0]])
        return choice.label

    candidates = [_calibrate.Candidate("slow", {"w": "ghost"}, 1.0),
                  _calibrate.Candidate("fast", {"w": "materialize"}, 2.0),
                  _calibrate.Candidate("same as slow", {"w": "ghost"}, 3.0),
                  _calibrate.Candidate("broken", {"w": "contract"}, 4.0)]
    result, choice = _calibrate.race(model_fn, ("k",), candidates, call, torch.device("cpu"))
    assert result == "fast" and choice.label == "fast" and choice.paths == {"w": "materialize"}
    # cheapest estimate first (a short first run runs twice: its one-time costs), alike routings merged
    assert seen[:4] == ["slow = same as slow", "slow = same as slow", "fast", "broken"]
    assert "broken failed (RuntimeError: no kernel for this)" in choice.why
    assert _calibrate.tuned(model_fn, ("k",)) == choice
    # a single distinct routing is not timed
    one, only = _calibrate.race(model_fn, ("j",), candidates[:1], lambda: "ran", torch.device("cpu"))
    assert one == "ran" and "nothing to time" in only.why


def test_later_rounds_overturn_a_burst_of_load_in_the_early_ones():
    """Two routings 10% apart (2.2 and 2.0 ms of CPU work): the faster one's first three runs land in a burst of
    other load (+0.5 ms each). Short calls fit more rounds in the race's budget, and its later runs decide."""

    def model_fn():
        return None

    work = {"slow": 0.0022, "fast": 0.0020}
    runs = {"slow": 0, "fast": 0}

    def call() -> str:
        label = _calibrate._CHOICES[model_fn][("k",)].label
        runs[label] += 1
        _busy(work[label] + (0.0005 if label == "fast" and runs[label] <= 3 else 0.0))
        return label

    candidates = [_calibrate.Candidate("slow", {"w": "ghost"}, 1.0),
                  _calibrate.Candidate("fast", {"w": "materialize"}, 2.0)]
    result, choice = _calibrate.race(model_fn, ("k",), candidates, call, torch.device("cpu"))
    assert runs["fast"] > 3, runs
    assert result == "fast" and choice.label == "fast", choice.why


def test_close_routings_take_turns_on_later_calls_and_the_faster_in_use_is_kept():
    """Two routings 10% apart once in use (2.0 and 2.2 ms of CPU work); at first use the faster one also pays
    0.4 ms a run (what the race sees of a routing right after another one ran), so the race keeps the slower. The
    two then take turns on the real calls that follow, in cycles of blocks, and the faster one in use is kept."""

    def model_fn():
        return None

    work = {"slow": 0.0022, "fast": 0.0020}
    racing, ran = [True], []

    def call() -> str:
        label = _calibrate._CHOICES[model_fn][("k",)].label
        ran.append(label)
        _busy(work[label] + (0.0004 if racing[0] and label == "fast" else 0.0))
        return label

    cpu = torch.device("cpu")
    candidates = [_calibrate.Candidate("slow", {"w": "ghost"}, 1.0),
                  _calibrate.Candidate("fast", {"w": "materialize"}, 2.0)]
    _, choice = _calibrate.race(model_fn, ("k",), candidates, call, cpu)
    assert choice.label == "slow" and choice.state == "taking its turn", choice.why
    assert _calibrate.TAKING_TURNS in choice.why and _calibrate.tuned(model_fn, ("k",)) is choice
    turns = _calibrate.turns(model_fn, ("k",))
    assert turns is not None and _calibrate.TURNS_BLOCK_MIN <= turns.block <= _calibrate.TURNS_BLOCK_MAX
    racing[0], ran[:] = False, []
    while (now := _calibrate.turns(model_fn, ("k",))) is not None:
        assert now is turns
        assert _calibrate.tuned(model_fn, ("k",)).state == "taking its turn"
        assert turns.take(model_fn, ("k",), call, cpu) == (ran[-1],)
        assert len(ran) <= 2 * _calibrate.TURNS_CYCLES * turns.block
    b = turns.block  # cycles A B, B A, A B, B A: a call right after the other routing ran is not counted
    assert _calibrate.TURNS_CYCLES == 4
    assert ran == ["slow"] * b + ["fast"] * 2 * b + ["slow"] * 2 * b + ["fast"] * 2 * b + ["slow"] * b
    assert [[len(t) for t in cycle] for cycle in turns.times] == [[b - 1, b - 1], [b - 1, b], [b, b - 1], [b - 1, b]]
    kept = _calibrate.tuned(model_fn, ("k",))
    assert kept.label == "fast" and kept.paths == {"w": "materialize"} and kept.state == "fastest"
    assert kept.why.startswith(turns.winner.why) and kept.why.endswith("kept fast")
    assert _calibrate.TAKING_TURNS not in kept.why


def test_a_long_call_is_not_raced_but_the_routings_the_cost_model_puts_close_take_turns(monkeypatch):
    """A call whose cost-model routing runs past RACE_LIMIT_S is not raced (only that routing runs, once or twice
    for its warm-up): its result is returned at once. The routings the cost model puts within TURNS_FACTOR of it
    take turns on the calls that follow, LONG_TURNS_CYCLES cycles of LONG_TURNS_BLOCK calls, and the faster in use
    is kept; one the cost model puts far behind never runs (on the GPT-2-shaped sweep at T = 64 the cost model's
    mixed routing ran 1.16x the plain step, ghost everywhere 0.94x)."""
    monkeypatch.setattr(_calibrate, "RACE_LIMIT_S", 0.001)  # the calls below last 2-3 ms: "long"

    def model_fn():
        return None

    work = {"model": 0.003, "close": 0.002, "far": 0.001}
    ran = []

    def call() -> str:
        label = _calibrate._CHOICES[model_fn][("k",)].label
        ran.append(label)
        _busy(work[label])
        return label

    cpu = torch.device("cpu")
    candidates = [_calibrate.Candidate("model", {"w": "ghost"}, 1.0),
                  _calibrate.Candidate("close", {"w": "materialize"}, 1.2),
                  _calibrate.Candidate("far", {"w": "contract"}, 3.0)]
    result, choice = _calibrate.race(model_fn, ("k",), candidates, call, cpu)
    assert result == "model" and set(ran) == {"model"} and len(ran) <= 2, ran
    assert "not timed (the cost model's routing took over" in choice.why
    assert "then the routings the cost model puts within 1.5x of its own take turns" in choice.why
    turns = _calibrate.turns(model_fn, ("k",))
    assert turns is not None and [c.label for c in turns.choices] == ["model", "close"]
    ran.clear()
    while _calibrate.turns(model_fn, ("k",)) is not None:
        turns.take(model_fn, ("k",), call, cpu)
    b = _calibrate.LONG_TURNS_BLOCK
    assert ran == (["model"] * b + ["close"] * b) + (["close"] * b + ["model"] * b)
    kept = _calibrate.tuned(model_fn, ("k",))
    assert kept.label == "close" and kept.state == "fastest" and kept.why.endswith("kept close"), kept.why
    assert "took turns on 8 later calls" in kept.why and "2 cycles" in kept.why


def test_taking_turns_yields_to_an_overlapping_call_and_keeps_the_winner_when_a_call_fails():
    def model_fn():
        return None

    cpu = torch.device("cpu")
    candidates = [_calibrate.Candidate("a", {"w": "ghost"}, 1.0), _calibrate.Candidate("b", {"w": "materialize"}, 2.0)]
    _, choice = _calibrate.race(model_fn, ("k",), candidates, lambda: _busy(0.001), cpu)
    turns = _calibrate.turns(model_fn, ("k",))
    assert turns is not None  # the same work: within TURNS_FACTOR
    with turns.lock:  # another thread's call holds the turn: this one runs as the cache stands, untimed
        assert turns.take(model_fn, ("k",), lambda: "ran", cpu) is None
    assert turns.calls == 0

    def fails():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        turns.take(model_fn, ("k",), fails, cpu)
    assert _calibrate.turns(model_fn, ("k",)) is None
    assert _calibrate.tuned(model_fn, ("k",)) == turns.winner == choice._replace(why=turns.winner.why, state="fastest")


def test_the_cheapest_estimate_must_run():
    def model_fn():
        return None

    def call():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        _calibrate.race(model_fn, ("k",), [_calibrate.Candidate("a", {"w": "ghost"}, 1.0),
                                           _calibrate.Candidate("b", {"w": "materialize"}, 2.0)],
                        call, torch.device("cpu"))
    assert _calibrate.untimed(model_fn, ("k",))  # nothing half-measured is left in the cache


def test_routing_model_keeps_the_cost_model(monkeypatch):
    monkeypatch.setenv(_calibrate.ROUTING_ENV, "model")
    model_fn, params, train, val = _seq()
    out = ghostfunc.graddot(model_fn, params, train, val)
    assert out.plan.tuning == "cost model (GHOSTFUNC_ROUTING=model)"
    assert all(r.reason.startswith("cost ") for r in out.plan.routes.values() if r.factored)
    assert model_fn not in _calibrate._CHOICES
    monkeypatch.setenv(_calibrate.ROUTING_ENV, "fastest")
    with pytest.raises(ValueError, match=r"^GHOSTFUNC_ROUTING: expected one of \('measure', 'model'\); got 'fastest'"):
        ghostfunc.graddot(model_fn, params, train, val)


def test_forced_policies_never_race(monkeypatch):
    monkeypatch.delenv(_calibrate.ROUTING_ENV, raising=False)
    model_fn, params, train, val = _seq()
    out = ghostfunc.graddot(model_fn, params, train, val, policy="materialize")
    assert out.plan.tuning == "" and model_fn not in _calibrate._CHOICES


def test_a_signature_reuses_its_routing_until_a_trace_is_refreshed():
    """Later calls of one signature reuse the routing (no re-planning); a fresh trace replaces it."""
    from ghostfunc import _graddot
    from ghostfunc._capture import split_batch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    p = {k: v.detach() for k, v in net.named_parameters()}

    def fn(q, batch):
        return torch.func.functional_call(net, q, (batch,)).squeeze(-1) ** 2

    x = torch.randn(5, 3, dtype=torch.float64)
    tb, vb = split_batch(x[:3]), split_batch(x[3:])
    first = _graddot.routing(fn, p, tb, vb, "graddot", "ghost", "mean", False)
    assert _graddot.routing(fn, p, tb, vb, "graddot", "ghost", "mean", False) is first
    assert _graddot.routing(fn, p, tb, vb, "graddot", "materialize", "mean", False) is not first  # another policy
    fresh = _graddot.routing(fn, p, tb, vb, "graddot", "ghost", "mean", True)
    assert fresh is not first
    assert _graddot.routing(fn, p, tb, vb, "graddot", "ghost", "mean", False) is fresh
    bigger = split_batch(x[:4])  # another batch size: its own routing
    assert _graddot.routing(fn, p, bigger, vb, "graddot", "ghost", "mean", False).plan.n_train == 4


def test_a_per_row_text_column_and_many_padded_lengths_race_and_trace_once_each(monkeypatch):
    """A batch carrying a per-row text column that is new on every call raced the routings again on every call (the
    race was keyed by the leaves' contents: 36x a call on a small MLP); it is keyed by the tensors' shapes. Cycling
    over 20 padded lengths traced (and raced) again on most calls once a cache of 16 was emptied whole; each cache
    keeps 128 signatures, the oldest dropped first."""
    from ghostfunc import _capture

    races, traces = [], []
    real_race, real_trace = _calibrate.race, _capture.cached_trace
    monkeypatch.setattr(_calibrate, "race", lambda *a, **k: races.append(1) or real_race(*a, **k))

    def counted(model_fn, params, batch, how, fresh, compute):
        return real_trace(model_fn, params, batch, how, fresh, lambda: traces.append(1) or compute())

    monkeypatch.setattr(_capture, "cached_trace", counted)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        return functional_call(net, p, (batch["x"],)).pow(2).mean((1, 2))

    def batch(n, t, words):
        return {"x": torch.randn(n, t, 4, dtype=torch.float64), "text": [f"{words} {i}" for i in range(n)]}

    for call in range(4):
        ghostfunc.graddot(model_fn, params, batch(3, 2, f"call {call}"), batch(3, 2, f"val {call}"))
    assert len(races) == 1
    for cycle in range(2):
        for t in range(3, 23):
            if cycle == 1:
                races.clear(), traces.clear()
            ghostfunc.graddot(model_fn, params, batch(3, t, "same"), batch(3, t, "same"))
            if cycle == 1:
                assert not races and not traces, t
