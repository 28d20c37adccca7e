"""curvature="secant": the trapezoid order-2 values, against the exact ones, the real loss change, and the step cache."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import ghostfunc
from ghostfunc import _interact, _secant
from tests._models import IdentityForward

from .test_shapley import (
    attention_fn,
    attention_model,
    double_backward_hvp,
    flat_grads,
    linreg_fn,
    mlp,
    mlp_fn,
    reference_order1,
    reference_order2,
    rel,
    theta_of,
    unflatten,
)
from .test_train import problem

DT = torch.float64


def linreg(seed=0, n=6, m=5, d=4, k=2):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(k, d, generator=g, dtype=DT), "b": torch.randn(k, generator=g, dtype=DT)}

    def batch(rows):
        return {"x": torch.randn(rows, d, generator=g, dtype=DT), "y": torch.randn(rows, k, generator=g, dtype=DT)}

    return params, batch(n), batch(m)


def secant(params, train, val, lr, fn=mlp_fn):
    return ghostfunc.inrun_shapley(fn, params, train, val, lr=lr, order=2, curvature="secant")


def exact(params, train, val, lr, fn=mlp_fn, order=2):
    return ghostfunc.inrun_shapley(fn, params, train, val, lr=lr, order=order)


def test_equals_exact_order2_for_quadratic_loss():
    """``H_val`` is constant for a quadratic loss: the trapezoid is the exact order-2 value."""
    params, train, val = linreg()
    for lr in (0.05, 0.7):
        torch.testing.assert_close(secant(params, train, val, lr, linreg_fn), exact(params, train, val, lr, linreg_fn),
                                   rtol=1e-10, atol=1e-14)


def tokens_fn(p, batch):
    """A token-wise tanh MLP over ``[B, T, 3]``: long enough (T=128) that the secant materialises."""
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))  # [B, T, 4]
    return 0.5 * (F.linear(h, p["w2"])[..., 0] - batch["y"]).pow(2).mean(1)


def tokens_model(seed=0, n=3, m=2, t=128):
    g = torch.Generator().manual_seed(seed)
    params = {"w1": torch.randn(4, 3, generator=g, dtype=DT), "b1": torch.randn(4, generator=g, dtype=DT),
              "w2": torch.randn(1, 4, generator=g, dtype=DT)}

    def batch(rows):
        return {"x": torch.randn(rows, t, 3, generator=g, dtype=DT), "y": torch.randn(rows, t, generator=g, dtype=DT)}

    return params, batch(n), batch(m)


MODELS = {"mlp": (mlp_fn, mlp), "tokens-materialise": (tokens_fn, tokens_model),
          "attention-tied-embedding": (attention_fn, attention_model)}


@pytest.mark.parametrize("costs", ["materialise=1", "materialise=2000"], ids=["materialise", "contract"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_brute_force_trapezoid(name, costs, monkeypatch):
    """``−(a/2)·<g_i, ḡ_val(θ) + ḡ_val(θ − a·G)>`` from a loop of single-sample gradients, with the
    two directions dotted through one materialisation or two contractions (the cost constants decide)."""
    monkeypatch.setenv("GHOSTFUNC_COSTS", costs)
    fn, build = MODELS[name]
    params, train, val = build()
    lr = 0.3
    gt = flat_grads(fn, params, train)  # [n, P]
    moved = unflatten(params, theta_of(params) - (lr / len(gt)) * gt.sum(0))
    gv = flat_grads(fn, params, val).mean(0) + flat_grads(fn, moved, val).mean(0)
    want = -(lr / len(gt) / 2) * gt @ gv
    torch.testing.assert_close(secant(params, train, val, lr, fn), want, rtol=1e-10, atol=1e-14)


def test_difference_from_exact_is_third_order():
    """Non-quadratic model: halving lr divides |secant − exact| by ~8 (absolute ``O(a³)``, relative ``O(a²)``)."""
    params, train, val = mlp(seed=3)
    diffs, rels = [], []
    for lr in (0.4, 0.2, 0.1, 0.05):
        s, e = secant(params, train, val, lr), exact(params, train, val, lr)
        diffs.append((s - e).abs().max().item())
        rels.append(rel(s, e))
    assert rels[0] < 0.05
    for big, small in zip(diffs, diffs[1:], strict=False):
        assert 6.0 < big / small < 10.0, diffs
    for big, small in zip(rels, rels[1:], strict=False):
        assert 3.0 < big / small < 5.0, rels


def test_efficiency_against_the_real_validation_loss_change():
    """Σ φ is the step's validation-loss change to third order; order 1 misses it by the curvature term.

    Validation rows that overlap the training rows, so the step clearly lowers their loss.
    """
    params, data, _ = problem()
    train, val = {k: v[:8] for k, v in data.items()}, {k: v[4:10] for k, v in data.items()}
    lr = 0.4
    g = ghostfunc.graddot(mlp_fn, params, train, val).train_grad  # mean train gradient
    moved = unflatten(params, theta_of(params) - lr * theta_of(g))
    with torch.no_grad():
        change = (mlp_fn(moved, val).mean() - mlp_fn(params, val).mean()).item()
    assert change < -0.1
    miss = {name: abs(phi.sum().item() - change) / abs(change) for name, phi in
            (("secant", secant(params, train, val, lr)), ("exact", exact(params, train, val, lr)),
             ("order 1", exact(params, train, val, lr, order=1)))}
    assert miss["secant"] < 2e-3 and miss["exact"] < 1e-2 and miss["order 1"] > 0.1, miss


def spy(monkeypatch):
    """Counts the ordinary validation backward passes the secant path makes (the real function runs)."""
    calls = []
    real = _secant.weighted_grad

    def counted(*args, **kwargs):
        calls.append(args[2])  # the params it ran at
        return real(*args, **kwargs)

    monkeypatch.setattr(_secant, "weighted_grad", counted)
    return calls


def batches(seed, steps, n=6):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield {"x": torch.randn(n, 3, generator=g, dtype=DT), "y": torch.randint(0, 3, (n,), generator=g),
               "index": torch.arange(n)}


def test_train_step_reuses_the_validation_gradient_under_sgd(monkeypatch):
    """Fixed validation batch, plain SGD: one validation backward per step after the first, same values."""
    params, _, val = mlp(seed=2)
    calls = spy(monkeypatch)
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init(params)
    for i, batch in enumerate(batches(5, 4)):
        before = len(calls)
        want = secant(state.params, batch, val, 0.3)
        want_first = exact(state.params, batch, val, 0.3, order=1)
        want_loss = mlp_fn(state.params, val)
        calls_for_want = len(calls) - before
        state, info = step(state, batch, {k: v.clone() for k, v in val.items()})  # equal contents, new tensors
        assert len(calls) - before - calls_for_want == (2 if i == 0 else 1)
        torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(info.first_order, want_first, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(info.val_loss, want_loss, rtol=1e-12, atol=1e-15)
        assert state.val_grad is not None and all(state.val_grad.params[k] is state.params[k] for k in params)


def test_train_step_recomputes_for_a_new_or_changed_validation_batch(monkeypatch):
    params, _, val = mlp(seed=2)
    calls = spy(monkeypatch)
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init(params)
    train = list(batches(6, 3))
    state, _ = step(state, train[0], val)
    val2 = {k: v.clone() for k, v in val.items()}
    val2["x"][0, 0] += 1.0  # one number differs: a different batch
    before = len(calls)
    want = secant(state.params, train[1], val2, 0.3)
    state, info = step(state, train[1], val2)
    assert len(calls) - before == 4  # two for `want`, two for the step
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
    val2["x"][1, 1] += 1.0  # changed in place after the step: the cached copy no longer matches
    before = len(calls)
    state, _ = step(state, train[2], val2)
    assert len(calls) - before == 2


def bag_fn(p, batch):  # token embeddings, averaged, then a linear head: a row sees only its tokens' rows
    h = p["emb"][batch["t"]].mean(1)
    return F.cross_entropy(F.linear(torch.tanh(h), p["w"]), batch["y"], reduction="none")


@pytest.mark.parametrize("edit", ["no_grad view", "renorm_", "detached alias", "a new tensor in the state's dict",
                                  "replaced, equal values", "none"])
def test_train_step_recomputes_when_the_states_parameters_are_written_in_place(edit, monkeypatch):
    """The carried ḡ_val(θ') was taken at the state's own parameter tensors: a write into them between steps (a
    max-norm projection of some rows, a clamp) makes the next step take it again, and its values equal a fresh
    secant step at the edited parameters. The edits touch embedding rows the first validation row does not
    read, so its loss (the backup check) cannot see them: the values once reused the stale gradient (7e-2 off; a
    new tensor put in the state's own dict 26% off: the record held that dict). New tensors of equal values
    still reuse it."""
    g = torch.Generator().manual_seed(5)
    params = {"emb": torch.randn(11, 4, generator=g, dtype=DT), "w": torch.randn(3, 4, generator=g, dtype=DT)}
    val = {"t": torch.tensor([[0, 1, 2], [7, 8, 9]]), "y": torch.tensor([0, 1])}
    train = [{"t": torch.randint(0, 11, (4, 3), generator=g), "y": torch.randint(0, 3, (4,), generator=g)}
             for _ in range(2)]
    calls = spy(monkeypatch)
    step = ghostfunc.train_step(bag_fn, ghostfunc.sgd(0.5), order=2, curvature="secant")
    state, _ = step(step.init(params), train[0], val)
    assert state.val_grad is not None
    with torch.no_grad():
        if edit == "no_grad view":
            state.params["emb"][7:10] *= 3.0
        elif edit == "renorm_":
            state.params["emb"][7:10].renorm_(2, 0, 0.1)
        elif edit == "detached alias":
            state.params["emb"].detach()[8].add_(0.5)
        elif edit == "a new tensor in the state's dict":  # out of place, put in the dict the state holds
            emb = state.params["emb"]
            state.params["emb"] = torch.cat([emb[:7], 3.0 * emb[7:10], emb[10:]])
        elif edit == "replaced, equal values":
            state = state._replace(params={k: v.clone() for k, v in state.params.items()})
    want = ghostfunc.inrun_shapley(bag_fn, {k: v.clone() for k, v in state.params.items()}, train[1], val, lr=0.5,
                                   order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == (1 if edit in ("none", "replaced, equal values") else 2)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)


FROZEN = {"scale": torch.ones(5, dtype=DT), "temperature": 1.0}


def frozen_fn(p, batch):  # reads a frozen tensor and a number besides its arguments
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"])) * FROZEN["scale"]
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]) / FROZEN["temperature"], batch["y"], reduction="none")


@pytest.mark.parametrize("change", ["replaced", "in place", "number", "another model_fn", "nothing"])
def test_train_step_recomputes_when_what_the_model_reads_changes(change, monkeypatch):
    """The carried gradient is the model's as it was: a frozen tensor replaced or changed in place, a number
    the model reads, or a state handed to a step of another model_fn make the next step take it again."""
    params, _, val = mlp(seed=3)
    calls = spy(monkeypatch)
    FROZEN.update(scale=torch.ones(5, dtype=DT), temperature=1.0)
    step = ghostfunc.train_step(frozen_fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init(params)
    train = list(batches(7, 2))
    state, _ = step(state, train[0], val)
    fn = frozen_fn
    if change == "replaced":
        FROZEN["scale"] = torch.full((5,), 3.0, dtype=DT)
    elif change == "in place":
        FROZEN["scale"].mul_(3.0)
    elif change == "number":
        FROZEN["temperature"] = 0.5
    elif change == "another model_fn":
        fn = mlp_fn
        step = ghostfunc.train_step(fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    want = ghostfunc.inrun_shapley(fn, state.params, train[1], val, lr=0.3, order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == (1 if change == "nothing" else 2)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
    FROZEN.update(scale=torch.ones(5, dtype=DT), temperature=1.0)


def test_a_frozen_module_made_under_inference_mode_is_read_by_the_secant(monkeypatch):
    """A frozen module (and tensor) the model reads that was made under ``torch.inference_mode()`` keeps no version
    counter: the carried gradient's fingerprint of what the model reads raised torch's error on every step."""
    params, _, val = mlp(seed=4)
    with torch.inference_mode():
        frozen = nn.Linear(3, 3, dtype=DT)
        shift = torch.randn(3, dtype=DT)

    def fn(p, batch):
        return mlp_fn(p, {**batch, "x": frozen(batch["x"]) + shift})

    calls = spy(monkeypatch)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init(params)
    train = list(batches(7, 2))
    state, _ = step(state, train[0], val)
    want = ghostfunc.inrun_shapley(fn, state.params, train[1], val, lr=0.3, order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == 1  # (the carried gradient taken)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)


class Scaled(nn.Module):
    """A model whose loss is a bound method reading a buffer and a number of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(5, dtype=DT))
        self.temperature = 1.0

    def loss(self, p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"])) * self.scale
        return F.cross_entropy(F.linear(h, p["w2"], p["b2"]) / self.temperature, batch["y"], reduction="none")


@pytest.mark.parametrize("change", ["buffer in place", "number", "nothing"])
@pytest.mark.parametrize("form", ["bound method", "partial"])
def test_secant_state_of_a_bound_method_or_partial(change, form, monkeypatch):
    import functools

    params, _, val = mlp(seed=4)
    calls = spy(monkeypatch)
    owner = Scaled()
    fn = owner.loss if form == "bound method" else functools.partial(lambda m, p, b: m.loss(p, b), owner)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init(params)
    train = list(batches(8, 2))
    state, _ = step(state, train[0], val)
    if change == "buffer in place":
        owner.scale.mul_(2.0)
    elif change == "number":
        owner.temperature = 0.5
    want = ghostfunc.inrun_shapley(fn, state.params, train[1], val, lr=0.3, order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == (1 if change == "nothing" else 2)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("change", ["backward hook", "forward hook", "class swapped", "row-dependent hook", "nothing"])
def test_secant_sees_hooks_and_swapped_modules(change, monkeypatch):
    """A hook put on or a module swapped between steps: the next step takes the validation gradient again (the
    carried one's fingerprint includes the modules' hooks and classes, besides the one-row loss check)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    held = {"model": {"net": net}}  # two containers down, as a config dict holds it

    def fn(p, batch):
        return F.cross_entropy(functional_call(held["model"]["net"], p, (batch["x"],)), batch["y"], reduction="none")

    calls = spy(monkeypatch)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    state = step.init({k: v.detach() for k, v in net.named_parameters()})
    train = list(batches(9, 3))
    val = train.pop()
    state, _ = step(state, train[0], val)
    if change == "backward hook":
        net[1].register_full_backward_hook(lambda m, gi, go: (gi[0] * 0.5,))
    elif change == "forward hook":
        net[1].register_forward_hook(lambda m, i, o: o * 2.0)
    elif change == "class swapped":
        net[1] = nn.Sigmoid()
    elif change == "row-dependent hook":  # doubles the larger rows only: the first validation row's loss stays
        val["x"][0].mul_(0.01 / val["x"][0].norm())
        state, _ = step(state, train[0], val)  # the small row's batch is carried; the one change is the hook
        net[0].register_forward_hook(lambda m, i, o: o * torch.where(i[0].norm(dim=-1, keepdim=True) > 1.0, 2.0, 1.0))
    want = ghostfunc.inrun_shapley(fn, state.params, train[1], val, lr=0.3, order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == (1 if change == "nothing" else 2)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("optimizer", [ghostfunc.sgd(0.2, momentum=0.9), ghostfunc.sgd(0.2, weight_decay=0.1),
                                       ghostfunc.adamw(0.05)], ids=["momentum", "weight-decay", "adamw"])
def test_train_step_other_optimizers_values_at_each_steps_params(optimizer):
    """The values are those of an SGD step from the state's params; the cache keeps only an exact landing."""
    params, _, val = mlp(seed=4)
    step = ghostfunc.train_step(mlp_fn, optimizer, order=2, curvature="secant")
    state = step.init(params)
    for i, batch in enumerate(batches(7, 3)):
        lr = optimizer.lr(state.opt_state)
        want = secant(state.params, batch, val, lr)
        state, info = step(state, batch, val)
        torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
        first_lands_on_sgd = i == 0 and optimizer.name == "sgd" and state.opt_state.momentum is not None
        assert (state.val_grad is not None) == first_lands_on_sgd


@pytest.mark.parametrize("sequence_first", [False, True])
def test_dropout_is_refused(sequence_first):
    """Order 2 needs a deterministic model_fn: the secant refused dropout, and exact curvature ran with masks of its
    own (a dropout on a sequence-first tensor: values 0.7-0.93 off the plain step's masks, the update 0.6 off,
    no note); both refuse it, whoever calls first (inrun_shapley or a training step), on a fresh model_fn."""
    for curvature in ("secant", "exact"):
        net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT).train()
        params = {k: v.detach() for k, v in net.named_parameters()}

        def fn(p, batch, net=net):
            x = batch["x"]
            if sequence_first:  # [B, d] -> [d, B]: the masks drawn over another axis than the samples'
                h = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
                h = F.dropout(h.T, 0.5, training=True).T
                logits = F.linear(h, p["3.weight"], p["3.bias"])
            else:
                logits = torch.func.functional_call(net, p, (x,))
            return F.cross_entropy(logits, batch["y"], reduction="none")

        _, train, val = mlp()
        said = "curvature='secant'" if curvature == "secant" else "order=2"
        with pytest.raises(ValueError, match=rf"^inrun_shapley: {said} needs a deterministic model_fn"):
            ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, order=2, curvature=curvature)
        step = ghostfunc.train_step(lambda p, b, fn=fn: fn(p, b), ghostfunc.sgd(0.1), order=2, curvature=curvature)
        with pytest.raises(ValueError, match=rf"^train_step: {said} needs a deterministic model_fn"):
            step(step.init(params), train, val)


def test_a_loss_without_a_second_derivative_names_the_way_out():
    """``F.multi_margin_loss`` has no double backward: exact order 2 raised torch's bare RuntimeError from the
    one-sample-at-a-time path; now the NotImplementedError that names the secant and order 1, which run."""
    params, train, val = mlp()

    def fn(p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
        return F.multi_margin_loss(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")

    for call in (lambda: ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, order=2),
                 lambda: (lambda s: s(s.init(params), train, val))(ghostfunc.train_step(fn, ghostfunc.sgd(0.1), order=2))):
        with pytest.raises(NotImplementedError, match=r"order 2 with curvature='exact' differentiates model_fn twice"
                                                      r".*multi_margin_loss.*curvature='secant' needs first"):
            call()
    assert ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, order=2, curvature="secant").isfinite().all()


def test_argument_errors():
    params, train, val = mlp()
    with pytest.raises(ValueError, match=r"^inrun_shapley: curvature must be 'exact' or 'secant'; got 'newton'"):
        ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.1, order=2, curvature="newton")
    with pytest.raises(ValueError, match=r"^inrun_shapley: curvature='secant' is the order-2 term; it needs order=2"):
        ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.1, curvature="secant")
    with pytest.raises(ValueError, match=r"^train_step: curvature='secant' is the order-2 term"):
        ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1), curvature="secant")
    with pytest.raises(ValueError, match=r"^train_step: precondition=True gives first-order values only"):
        ghostfunc.train_step(mlp_fn, ghostfunc.adamw(0.1), order=2, curvature="secant", precondition=True)


def test_float32_close_to_float64():
    params, train, val = mlp(seed=5)
    lr = 0.2
    want = secant(params, train, val, lr)
    f32 = lambda t: {k: v.float() if v.is_floating_point() else v for k, v in t.items()}  # noqa: E731
    got = secant(f32(params), f32(train), f32(val), lr)
    assert got.dtype == torch.float32
    assert rel(got.double(), want) < 1e-5


def test_secant_state_saves_and_resumes_to_the_same_values(tmp_path):
    """``DataValues.save(state=...)`` of a secant run loads back (the cached validation gradient is dropped,
    the resumed step recomputes it) and the resumed run gives the uninterrupted run's values and parameters."""
    params, _, val = mlp(seed=3)
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.3), order=2, curvature="secant")
    run = list(batches(7, 4))

    def go(state, values, steps):
        for batch in steps:
            state, info = step(state, batch, val)
            values = values.add(batch["index"], info.values)
        return state, values

    whole, whole_values = go(step.init(params), ghostfunc.DataValues.zeros(6), run)
    half, half_values = go(step.init(params), ghostfunc.DataValues.zeros(6), run[:2])
    assert half.val_grad is not None
    half_values.save(tmp_path / "v.pt", state=half)
    loaded, state = ghostfunc.DataValues.load(tmp_path / "v.pt", with_state=True)
    assert state.val_grad is None and state.step == 2
    resumed, resumed_values = go(state, loaded, run[2:])
    torch.testing.assert_close(resumed_values.total, whole_values.total, rtol=1e-12, atol=1e-15)
    for k in params:
        torch.testing.assert_close(resumed.params[k], whole.params[k], rtol=0, atol=0)


@pytest.mark.parametrize("costs", ["materialise=1", "materialise=2000"], ids=["kept", "factors"])
@pytest.mark.parametrize("name", ["tokens-materialise", "attention-tied-embedding"])
def test_exact_order2_with_rows_kept_or_from_factors(name, costs, monkeypatch):
    """Exact order 2 (values and the order-1 part) equals the brute-force Hessian product whether the training
    rows' gradients are kept materialised for the later dot products or contracted from their factors again."""
    monkeypatch.setenv("GHOSTFUNC_COSTS", costs)
    fn, build = MODELS[name]
    params, train, val = build()
    lr = 0.3
    want = reference_order2(fn, params, train, val, lr, double_backward_hvp(fn, params, val))
    assert rel(exact(params, train, val, lr, fn), want) < 1e-10
    step = ghostfunc.train_step(fn, ghostfunc.sgd(lr), order=2)
    _, info = step(step.init(params), train, val)
    assert rel(info.values, want) < 1e-10
    assert rel(info.first_order, reference_order1(fn, params, train, val, lr)) < 1e-10


@pytest.mark.parametrize(("costs", "kept"), [("materialise=1", {"w1", "w2"}), ("materialise=2000", set())])
def test_train_rows_keeps_long_sequences_and_their_mean(costs, kept, monkeypatch):
    """Long sequences (T=128) keep their per-row gradients when materialising is cheap; the mean and the dots
    agree with the per-sample loop either way; the budget keeps nothing when the factors are small."""
    monkeypatch.setenv("GHOSTFUNC_COSTS", costs)
    from ghostfunc._capture import split_batch
    from ghostfunc._graddot import capture_one, routing

    params, train, val = tokens_model()
    tb, vb = split_batch(train), split_batch(val)
    r = routing(tokens_fn, params, tb, vb, "t", "contract", "mean", False)
    t = capture_one(tokens_fn, params, tb, r, 0, "t")
    rows, mean = _secant.train_rows(r.plan, t.grads, params, tb.size, 2)
    assert set(rows.kept) == kept
    gt = flat_grads(tokens_fn, params, train)  # [n, P]
    torch.testing.assert_close(theta_of(mean), gt.mean(0), rtol=1e-12, atol=1e-14)
    u, v = unflatten(params, torch.linspace(-1, 1, gt.shape[1], dtype=DT)), unflatten(params, gt[0])
    torch.testing.assert_close(_secant.row_dots(rows, [u, v], params), gt @ torch.stack([theta_of(u), theta_of(v)], 1),
                               rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(_secant, "KEEP_BUDGET", 0.0)
    assert not _secant.train_rows(r.plan, t.grads, params, tb.size, 2)[0].kept


@pytest.mark.parametrize("name", ["tokens-materialise", "attention-tied-embedding"])
def test_validation_rows_in_groups_change_nothing(name, monkeypatch):
    """On CPU the validation passes run in row groups (:data:`_secant.GROUP_TOKENS`); one row per group
    gives the brute-force exact and secant order-2 values, and a non-finite validation loss is reported
    at its row in the whole batch."""
    fn, build = MODELS[name]
    params, train, val = build()
    monkeypatch.setattr(_secant, "GROUP_TOKENS", 1)
    lr = 0.3
    want = reference_order2(fn, params, train, val, lr, double_backward_hvp(fn, params, val))
    assert rel(exact(params, train, val, lr, fn), want) < 1e-10
    gt = flat_grads(fn, params, train)
    moved = unflatten(params, theta_of(params) - (lr / len(gt)) * gt.sum(0))
    gv = flat_grads(fn, params, val).mean(0) + flat_grads(fn, moved, val).mean(0)
    torch.testing.assert_close(secant(params, train, val, lr, fn), -(lr / len(gt) / 2) * gt @ gv,
                               rtol=1e-10, atol=1e-14)
    if name == "tokens-materialise":
        bad = {k: v.clone() for k, v in val.items()}
        bad["y"][1, 3] = float("nan")
        for curvature in ("exact", "secant"):
            with pytest.raises(FloatingPointError, match=r"^inrun_shapley: .* val samples \[1\]"):
                ghostfunc.inrun_shapley(fn, params, train, bad, lr=lr, order=2, curvature=curvature)
        bad = {k: v.clone() for k, v in train.items()}
        bad["x"][2, 5, 1] = float("nan")  # the training rows run whole: named as they are
        for curvature in ("exact", "secant"):
            with pytest.raises(FloatingPointError, match=r"^inrun_shapley: .* train samples \[2\]"):
                ghostfunc.inrun_shapley(fn, params, bad, val, lr=lr, order=2, curvature=curvature)


@pytest.mark.parametrize("curvature", ["exact", "secant"])
def test_a_training_row_with_a_non_finite_gradient_is_named_at_order_2(curvature):
    """Finite losses, one training row's gradient NaN (``sqrt`` at 0): order 2 named every row (``H·G`` carries
    the NaN into every value) and the secant blamed the learning rate (the step's end point held the NaN);
    both name that row and the parameter, as order 1 does."""
    params, train, val = mlp(seed=5)

    def fn(p, batch):
        z = p["b1"][0] - p["b1"][0].detach()  # 0, with gradient 1
        return mlp_fn(p, batch) + torch.sqrt(z.abs() + (batch["index"] != 2))  # row 2: sqrt'(0)

    for call in (lambda: ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, order=2, curvature=curvature),
                 lambda: (lambda s: s(s.init(params), train, val))(ghostfunc.train_step(
                     fn, ghostfunc.sgd(0.1), order=2, curvature=curvature))):
        with pytest.raises(FloatingPointError, match=r"^(inrun_shapley|train_step): the gradients of train samples "
                                                     r"\[2\] are not finite though the losses are: their gradients "
                                                     r"of params \['b1'\]"):
            call()


def test_non_finite_exact_order_2_values_point_to_the_secant():
    """Finite gradients, an infinite curvature (``|w|**1.5`` at 0): the exact order-2 values are refused naming the
    Hessian-vector product and the secant, which takes none (and runs here)."""
    params = {"w": torch.zeros(3, dtype=torch.float64), "v": torch.ones(3, dtype=torch.float64)}

    def fn(p, x):
        return (x * p["v"]).sum(1) ** 2 + (p["w"].abs() ** 1.5).sum() + x @ p["w"]

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"^inrun_shapley: the values of train samples .*At order 2 the values "
                                                 r"also take the validation loss's Hessian .*curvature='secant' takes "
                                                 r"no Hessian$"):
        ghostfunc.inrun_shapley(fn, params, x, x[:2], lr=0.1, order=2)
    assert torch.isfinite(ghostfunc.inrun_shapley(fn, params, x, x[:2], lr=0.1, order=2, curvature="secant")).all()


def test_a_step_too_long_for_the_secant_is_named_as_such():
    """Validation losses finite at θ but not at the secant's θ' = θ - lr·ḡ_train: the error says so and what to do,
    instead of sending the user to check model_fn(params, val), which is finite."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 5, generator=g, dtype=torch.float64) / 3}

    def fn(p, batch):
        return torch.exp(torch.nn.functional.linear(batch[0], p["w"])).sum(-1)

    train, val = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64),), \
        (3 * torch.randn(4, 5, generator=g, dtype=torch.float64),)
    assert bool(torch.isfinite(fn(params, val)).all())
    with pytest.raises(FloatingPointError, match=r"^inrun_shapley: model_fn returned non-finite losses for val "
                                                 r"samples .* at θ' = θ - lr·ḡ_train, .*lr=100000 steps too far"):
        ghostfunc.inrun_shapley(fn, params, train, val, lr=1e5, order=2, curvature="secant")


@pytest.mark.parametrize("curvature", ["secant", "exact"])
@pytest.mark.parametrize("name", ["tokens-materialise", "attention-tied-embedding"])
def test_train_step_reuses_its_materialised_rows_memory(name, curvature, monkeypatch):
    """A step's materialised training rows go into memory the step keeps (``_scratch``) and reuses on the next
    call (one allocation per shape, not one per step); the values equal the functional API's at every step,
    nothing returned aliases that memory, and a batch of another size allocates anew."""
    monkeypatch.setenv("GHOSTFUNC_COSTS", "materialise=1")
    fn, build = MODELS[name]
    params, train, val = build()
    lr = 0.3
    step = ghostfunc.train_step(fn, ghostfunc.sgd(lr), order=2, curvature=curvature)
    state = step.init(params)
    held = None
    for i in range(3):
        want = ghostfunc.inrun_shapley(fn, state.params, train, val, lr=lr, order=2, curvature=curvature)
        state, info = step(state, train, val)
        torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
        assert step._scratch, "the kept rows went back to the step"
        ptrs = {k: t.data_ptr() for k, t in step._scratch.items()}
        if held is not None:
            assert ptrs == held, f"step {i}: the rows were materialised into new memory"
        held = ptrs
        mine = {t.untyped_storage().data_ptr() for t in step._scratch.values()}
        out = [info.values, info.first_order, info.train_loss, info.val_loss, *state.params.values()]
        if state.val_grad is not None:
            out += list(state.val_grad.grad.values())
        assert not mine & {t.untyped_storage().data_ptr() for t in out}
    fewer = torch.utils._pytree.tree_map(lambda x: x[:2], train)
    want = ghostfunc.inrun_shapley(fn, state.params, fewer, val, lr=lr, order=2, curvature=curvature)
    _, info = step(state, fewer, val)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
    assert all(t.shape[0] == 2 for t in step._scratch.values())


class Reader(nn.Module):
    """A model whose state a step can change in many places: its mode, a plain attribute, a frozen weight, a
    tensor in a dict attribute, and an object deeper than the fingerprint walks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)
        self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)
        self.temp = 1.0
        self.extra = {"shift": torch.zeros(3)}
        self.deep = types.SimpleNamespace(inner=types.SimpleNamespace(scale=1.0))
        self._class_scale = {0: 1.0}  # a private one (h45: not fingerprinted, 0.30 off)

    def forward(self, x):
        h = torch.tanh(self.a(x + self.extra["shift"])) * self.frozen * self.temp * self.deep.inner.scale
        h = h * self._class_scale[0]
        return self.b(h * 2 if self.training else h)


class LossOf:
    """A callable object as model_fn."""

    def __init__(self, net):
        self.net = net

    def __call__(self, p, batch):
        return F.cross_entropy(functional_call(self.net, p, (batch["x"],)), batch["y"], reduction="none")


HELPER_SHIFT = torch.zeros(3, dtype=DT)
NUMPY_SHIFT = np.zeros(3)
DEFAULT_SHIFT = torch.zeros(3, dtype=DT)


CONFIG = {"loss": {"w": torch.ones(3, dtype=DT)}}


class Weights:
    scale = 1.0


WEIGHTS = Weights()


def _shift():  # a helper whose global the model reads
    return HELPER_SHIFT


REVERSE_SCALE = [1.0]


class _Reverse(IdentityForward):
    """A gradient reversal (DANN): the identity forward, the gradient scaled by ``-alpha`` (and a global) backward."""

    alpha = 1.0

    @staticmethod
    def backward(ctx, g):
        return -_Reverse.alpha * REVERSE_SCALE[0] * g


def _reader_fn(net, shift=lambda: 0.0):
    def fn(p, batch):
        return F.cross_entropy(functional_call(net, p, (batch["x"] + shift(),)), batch["y"], reduction="none")
    return fn


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


#: A change the fingerprint does not reach (an object deeper than it walks), which the row's loss shows. (A frozen
#: weight changed through .data, whose version counter is its own, is seen by the frozen tensors' checksums.)
UNSEEN = ("deeper than the fingerprint",)
READER_CHANGES = {
    "from_module, eval()": ("from_module", lambda net: net.eval()),
    "from_module, attribute": ("from_module", lambda net: setattr(net, "temp", 1.5)),
    "from_module, frozen weight in place": ("from_module", lambda net: _no_grad(net.frozen.mul_, 2.0)),
    "from_module, frozen weight through .data": ("from_module", lambda net: net.frozen.data.mul_(2.0)),
    "from_module, tensor in a dict attribute": ("from_module", lambda net: net.extra["shift"].add_(0.5)),
    "from_module, a private attribute's dict": ("from_module", lambda net: net._class_scale.update({0: 3.0})),
    "callable object, eval()": ("object", lambda net: net.eval()),
    "callable object, frozen weight in place": ("object", lambda net: _no_grad(net.frozen.mul_, 2.0)),
    "a helper's global": ("helper", lambda net: HELPER_SHIFT.add_(0.5)),
    "a default argument": ("default", lambda net: DEFAULT_SHIFT.add_(0.5)),
    "a NumPy global": ("numpy", lambda net: NUMPY_SHIFT.__iadd__(0.5)),
    "a class weight in a nested config": ("config", lambda net: CONFIG["loss"]["w"].__setitem__(1, 3.0)),
    # an EMA teacher's tensors updated through .data (no version moves): by a checksum
    "a config tensor through .data": ("config", lambda net: CONFIG["loss"]["w"].data.mul_(2.0)),
    "a class attribute": ("config", lambda net: setattr(Weights, "scale", 2.0)),
    # what moves the gradient only (the losses as they were): an autograd.Function's class attribute, a global its
    # backward reads (h49: a DANN reversal annealed between steps, 3.5e-2 off)
    "an autograd.Function's class attribute": ("reversal", lambda net: setattr(_Reverse, "alpha", 0.1)),
    "a global an autograd.Function's backward reads": ("reversal", lambda net: REVERSE_SCALE.__setitem__(0, 0.1)),
    "deeper than the fingerprint": ("from_module", lambda net: setattr(net.deep.inner, "scale", 1.5)),
    "nothing": ("from_module", lambda net: None),
}


@pytest.mark.parametrize("case", list(READER_CHANGES))
def test_secant_carried_gradient_sees_what_the_model_reads(case, monkeypatch):
    """Every way a step can change what the model computes besides its parameters makes the next step take
    the validation gradient again (the fingerprint sees the model through from_module's closures, a callable
    object, a helper's globals, default arguments and NumPy arrays; one row's loss is compared for what it
    cannot see); nothing changed: it is reused."""
    form, change = READER_CHANGES[case]
    HELPER_SHIFT.zero_(), DEFAULT_SHIFT.zero_()
    NUMPY_SHIFT[:] = 0
    CONFIG["loss"]["w"].fill_(1.0)
    Weights.scale = 1.0
    _Reverse.alpha, REVERSE_SCALE[0] = 1.0, 1.0
    torch.manual_seed(0)
    net = Reader().double().train()
    ce = lambda out, batch: F.cross_entropy(out, batch["y"], reduction="none")  # noqa: E731
    if form == "from_module":
        fn, params = ghostfunc.from_module(net, ce)
    else:
        params = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}
        fn = {"object": LossOf(net), "helper": _reader_fn(net, _shift),
              "default": lambda p, b, shift=DEFAULT_SHIFT: _reader_fn(net, lambda: shift)(p, b),
              "numpy": _reader_fn(net, lambda: torch.from_numpy(NUMPY_SHIFT)),
              "config": lambda p, b: F.cross_entropy(functional_call(net, p, (b["x"],)), b["y"], reduction="none")
              * CONFIG["loss"]["w"][b["y"]] * WEIGHTS.scale,
              "reversal": lambda p, b: F.cross_entropy(functional_call(net, p, (b["x"],)), b["y"], reduction="none")
              + _Reverse.apply(functional_call(net, p, (b["x"],))).pow(2).mean(1)}[form]
    calls = spy(monkeypatch)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.5), order=2, curvature="secant")
    state = step.init(params)
    train = list(batches(9, 2))
    _, _, val = mlp(seed=5)
    state, _ = step(state, train[0], val)
    fingerprint = _interact.state_of(fn)
    change(net)
    assert (_interact.state_of(fn) == fingerprint) == (case in (*UNSEEN, "nothing"))
    want = ghostfunc.inrun_shapley(fn, state.params, train[1], val, lr=0.5, order=2, curvature="secant")
    before = len(calls)
    state, info = step(state, train[1], val)
    assert len(calls) - before == (1 if case == "nothing" else 2)
    torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)


class _CountedBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Counted(_CountedBase):
    calls = 0  # a counter on the module's class, for logging: no part of the loss

    def forward(self, x):
        _Counted.calls += 1
        return super().forward(x)  # (zero-argument super(): the method's __class__ cell names the class)


def test_a_counter_on_a_modules_class_does_not_drop_the_carried_gradient(monkeypatch):
    """The fingerprint reads the classes of the user's own that model_fn names, but not a module's class (named by its
    methods' super() cells; its instances' state is walked): a counter there made every step take the validation
    gradient again (h50: 2 backward passes a step instead of 1)."""
    torch.manual_seed(0)
    net = _Counted().double()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    fn = lambda p, b: F.cross_entropy(functional_call(net, p, (b["x"],)), b["y"], reduction="none")  # noqa: E731
    calls = spy(monkeypatch)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.5), order=2, curvature="secant")
    state = step.init(params)
    _, _, val = mlp(seed=5)
    for batch in batches(9, 4):
        before = len(calls)
        state, _ = step(state, batch, val)
        assert len(calls) - before == (2 if state.step == 1 else 1)


def test_a_parameter_written_through_data_after_a_step_is_not_carried():
    """A write through ``.data`` moves no version counter: a renormalised embedding row only the second validation
    row reads (the one-row check looks at the first) kept the carried ``ḡ_val`` (0.40 off a fresh call); the
    carried gradient also keeps a checksum of the parameters' values."""
    g = torch.Generator().manual_seed(11)

    def fn(p, b):
        h = torch.tanh(F.linear(F.embedding(b["ids"], p["emb"]).mean(1), p["w1"]))
        return F.cross_entropy(F.linear(h, p["w2"]), b["y"], reduction="none")

    params = {"emb": torch.randn(10, 6, generator=g, dtype=DT), "w1": torch.randn(8, 6, generator=g, dtype=DT) / 2,
              "w2": torch.randn(3, 8, generator=g, dtype=DT) / 3}
    train = {"ids": torch.randint(0, 9, (16, 3), generator=g), "y": torch.randint(0, 3, (16,), generator=g)}
    val = {"ids": torch.tensor([[0, 1, 2], [9, 9, 9], [3, 4, 5]]), "y": torch.tensor([0, 1, 2])}
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.5), order=2, curvature="secant")
    state, _ = step(step.init(params), {k: v[:8] for k, v in train.items()}, val)
    assert state.val_grad is not None
    state.params["emb"].data[9] += 1.0
    rest = {k: v[8:] for k, v in train.items()}
    fresh = ghostfunc.inrun_shapley(fn, state.params, rest, val, lr=0.5, order=2, curvature="secant")
    assert rel(step(state, rest, val)[1].values, fresh) < 1e-12
