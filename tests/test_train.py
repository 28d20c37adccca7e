"""train_step and the pure optimizers: the trajectory equals torch.optim's, values equal inrun_shapley."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

import ghostfunc
from ghostfunc._reference import per_sample_grads

DT = torch.float64


def mlp_fn(p, batch):
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


def problem(seed=0, n_data=48, d=4, hidden=6, classes=3, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    params = {"w1": 0.5 * torch.randn(hidden, d, generator=g, dtype=dtype), "b1": torch.zeros(hidden, dtype=dtype),
              "w2": 0.5 * torch.randn(classes, hidden, generator=g, dtype=dtype), "b2": torch.zeros(classes, dtype=dtype)}
    data = {"x": torch.randn(n_data, d, generator=g, dtype=dtype), "y": torch.randint(0, classes, (n_data,), generator=g),
            "index": torch.arange(n_data)}
    val = {"x": torch.randn(5, d, generator=g, dtype=dtype), "y": torch.randint(0, classes, (5,), generator=g),
           "index": torch.arange(5)}
    return params, data, val


def batches(data, steps, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = len(data["index"])
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:size]
        yield {k: v[idx] for k, v in data.items()}


def torch_trajectory(params, data, make_opt, steps, lr_lambda=None):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make_opt(list(p.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    out = []
    for batch in batches(data, steps):
        opt.zero_grad()
        mlp_fn(p, batch).mean().backward()
        opt.step()
        if sched:
            sched.step()
        out.append({k: v.detach().clone() for k, v in p.items()})
    return out


def ghost_trajectory(params, data, val, optimizer, steps, **kw):
    step = ghostfunc.train_step(mlp_fn, optimizer, **kw)
    state = step.init(params)
    out, infos = [], []
    for batch in batches(data, steps):
        state, info = step(state, batch, val)
        out.append(state.params)
        infos.append(info)
    return out, infos, state


def max_diff(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> float:
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b, strict=True) for k in x)


CASES = {
    "sgd-momentum": (lambda: ghostfunc.sgd(0.1, momentum=0.9, weight_decay=1e-3),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov-dampening": (lambda: ghostfunc.sgd(0.05, momentum=0.8, nesterov=True),
                               lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True)),
    "sgd-dampening": (lambda: ghostfunc.sgd(0.05, momentum=0.8, dampening=0.3),
                      lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3)),
    "adamw": (lambda: ghostfunc.adamw(0.01, betas=(0.8, 0.99), weight_decay=0.05),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05)),
    "adamw-defaults": (lambda: ghostfunc.adamw(), lambda ps: torch.optim.AdamW(ps)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_torch_optim_50_steps(case):
    mine, theirs = CASES[case]
    params, data, val = problem()
    want = torch_trajectory(params, data, theirs, 50)
    got, infos, state = ghost_trajectory(params, data, val, mine(), 50)
    assert max_diff(got, want) < 1e-6  # the contract; in float64 it is ~1e-15
    assert max_diff(got, want) < 1e-12
    assert state.step == 50 and state.opt_state.step == 50
    assert all(i.values.shape == (8,) and i.train_loss.shape == (8,) and i.val_loss.shape == (5,) for i in infos)
    moved = max((got[-1][k] - params[k]).abs().max().item() for k in params)
    assert moved > 1e-2  # the test would be vacuous if nothing moved


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw"])
def test_trajectory_float32(case):
    mine, theirs = CASES[case]
    params, data, val = problem(dtype=torch.float32)
    got, _, _ = ghost_trajectory(params, data, val, mine(), 50)
    assert max_diff(got, torch_trajectory(params, data, theirs, 50)) < 1e-6


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("kw", [{}, {"order": 2, "curvature": "secant"}])
def test_a_run_under_the_callers_inference_mode_continues_as_outside_it(mode, kw):
    """Steps (and init) called under ``torch.inference_mode()``, as in an evaluation loop: the state a step
    returned was made of inference tensors, and the next step refused it, blaming the caller."""
    params, data, val = problem(seed=7)
    want, infos, _ = ghost_trajectory(params, data, val, ghostfunc.adamw(0.05), 4, **kw)
    step = ghostfunc.train_step(mlp_fn, ghostfunc.adamw(0.05), **kw)
    rows = list(batches(data, 4))  # (a batch made under inference_mode is refused by name: README)
    with getattr(torch, mode)():
        state = step.init(params)
        got = []
        for batch, info in zip(rows, infos, strict=True):
            state, mine = step(state, batch, val)
            got.append(state.params)
            torch.testing.assert_close(mine.values, info.values, rtol=1e-12, atol=1e-15)
    assert not any(t.is_inference() for t in pytree.tree_leaves(state) if isinstance(t, Tensor))
    assert max_diff(got, want) == 0.0


def test_lr_schedule_matches_lambda_lr():
    sched = lambda count: 1.0 / (1 + count)  # noqa: E731
    params, data, val = problem(seed=3)
    want = torch_trajectory(params, data, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5), 12, lr_lambda=sched)
    got, infos, _ = ghost_trajectory(params, data, val, ghostfunc.sgd(lambda c: 0.2 * sched(c), momentum=0.5), 12)
    assert max_diff(got, want) < 1e-12
    assert [i.lr for i in infos[:3]] == [0.2, 0.1, 0.2 / 3]


@pytest.mark.parametrize("order", [1, 2])
def test_values_equal_inrun_shapley_at_each_step(order):
    params, data, val = problem(seed=5)
    opt = ghostfunc.adamw(0.05)
    step = ghostfunc.train_step(mlp_fn, opt, order=order)
    state = step.init(params)
    for batch in batches(data, 3):
        want = ghostfunc.inrun_shapley(mlp_fn, state.params, batch, val, lr=0.05, order=order)
        want1 = ghostfunc.inrun_shapley(mlp_fn, state.params, batch, val, lr=0.05)
        losses = mlp_fn(state.params, batch)
        state, info = step(state, batch, val)
        torch.testing.assert_close(info.values, want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(info.first_order, want1, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(info.train_loss, losses, rtol=1e-12, atol=0)
        assert info.lr == 0.05


def test_adamw_preconditioned_values_against_torch_state():
    """φ_i = −(lr/n)·<g_i, ḡ_val / (√v̂ + ε)> with v̂ read from torch.optim.AdamW's own state after the step."""
    params, data, val = problem(seed=6)
    lr, eps, beta2 = 0.02, 1e-3, 0.99  # a large eps makes a wrong ε placement visible
    step = ghostfunc.train_step(mlp_fn, ghostfunc.adamw(lr, betas=(0.9, beta2), eps=eps), precondition=True)
    state = step.init(params)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(p.values(), lr=lr, betas=(0.9, beta2), eps=eps)
    for t, batch in enumerate(batches(data, 4), start=1):
        gt, _ = per_sample_grads(mlp_fn, state.params, batch)
        gv, _ = per_sample_grads(mlp_fn, state.params, val)
        state, info = step(state, batch, val)
        opt.zero_grad()
        mlp_fn(p, batch).mean().backward()
        opt.step()
        ref = torch.zeros(8, dtype=DT)
        for k, q in p.items():
            v_hat = opt.state[q]["exp_avg_sq"] / (1 - beta2**t)
            direction = gv[k].mean(0) / (v_hat.sqrt() + eps)
            ref += gt[k].flatten(1) @ direction.flatten()
        ref *= -lr / 8
        torch.testing.assert_close(info.values, ref, rtol=1e-10, atol=0)
    plain = ghostfunc.inrun_shapley(mlp_fn, state.params, batch, val, lr=lr)
    assert (plain - info.values).abs().max() > 1e-3 * plain.abs().max()


def test_sgd_preconditioned_values_are_plain_values():
    params, data, val = problem()
    batch = next(batches(data, 1))
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1, momentum=0.9), precondition=True)
    _, info = step(step.init(params), batch, val)
    torch.testing.assert_close(info.values, ghostfunc.inrun_shapley(mlp_fn, params, batch, val, lr=0.1), rtol=1e-13, atol=0)


def test_inputs_never_mutated_and_not_retained():
    params, data, val = problem()
    step = ghostfunc.train_step(mlp_fn, ghostfunc.adamw(0.1), order=2)
    state = step.init(params)
    state, _ = step(state, next(batches(data, 1)), val)  # non-trivial optimizer state
    batch = next(batches(data, 1, seed=9))
    watched = [*state.params.values(), *state.opt_state.mu.values(), *state.opt_state.nu.values(),
               *batch.values(), *val.values()]
    copies = [t.clone() for t in watched]
    versions = [t._version for t in watched]
    new, info = step(state, batch, val)
    assert all(torch.equal(a, b) for a, b in zip(watched, copies, strict=True))
    assert versions == [t._version for t in watched]
    assert all(new.params[k].data_ptr() != state.params[k].data_ptr() for k in params)
    # neither the new state nor the info keeps the training inputs alive
    ref = weakref.ref(batch["x"])
    del batch, watched, copies
    gc.collect()
    assert ref() is None


def test_init_copies_params():
    params, _, _ = problem()
    state = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1)).init(params)
    assert state.step == 0 and all(state.params[k].data_ptr() != params[k].data_ptr() for k in params)


def test_errors_name_the_function():
    with pytest.raises(TypeError, match=r"^train_step: optimizer must be a ghostfunc.Optimizer"):
        ghostfunc.train_step(mlp_fn, torch.optim.SGD)
    with pytest.raises(ValueError, match=r"^train_step: order must be 1 or 2; got 0"):
        ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1), order=0)
    with pytest.raises(ValueError, match=r"^train_step: order must be 1 or 2; got 2.0"):
        ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1), order=2.0)
    with pytest.raises(TypeError, match=r"^train_step: precondition must be True or False; got 'yes'"):
        ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1), precondition="yes")
    with pytest.raises(ValueError, match=r"^train_step: precondition=True gives first-order values only"):
        ghostfunc.train_step(mlp_fn, ghostfunc.adamw(), order=2, precondition=True)
    with pytest.raises(TypeError, match=r"^train_step: state must be the TrainState"):
        ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1))({}, None, None)
    with pytest.raises(ValueError, match=r"^sgd: lr must be a float >= 0"):
        ghostfunc.sgd(-0.1)
    with pytest.raises(ValueError, match=r"^sgd: nesterov needs momentum > 0"):
        ghostfunc.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"^adamw: need 0 <= betas < 1"):
        ghostfunc.adamw(betas=(0.9, 1.0))
    params, data, val = problem()
    opt = ghostfunc.sgd(0.1)
    with pytest.raises(ValueError, match=r"^sgd: grads and params must have the same keys"):
        opt.update({"w1": params["w1"]}, opt.init(params), params)
    step = ghostfunc.train_step(mlp_fn, opt)
    bad_val = {k: v for k, v in val.items() if k != "index"}
    with pytest.raises(ValueError, match=r"^train_step: train and val must have the same structure"):
        step(step.init(params), next(batches(data, 1)), bad_val)


def branchy_fn(p, batch):
    """``head`` is never used; ``v`` only by samples with a positive first feature (a batch of one sign)."""
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
    if batch["x"][0, 0] > 0:  # the test's batches are of one sign: batched and sample by sample agree
        h = h + torch.tanh(F.linear(batch["x"], p["v"]))
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


UNUSED_CASES = [("sgd-momentum", {}), ("sgd-momentum", {"order": 2}), ("sgd-momentum", {"order": 2, "curvature": "secant"}),
                ("sgd-momentum", {"precondition": True}), ("adamw", {}), ("adamw", {"order": 2}),
                ("adamw", {"precondition": True})]


@pytest.mark.parametrize(("case", "kw"), UNUSED_CASES, ids=[f"{c}-{k}" for c, k in UNUSED_CASES])
def test_parameters_no_sample_reaches_are_left_as_torch_optim_leaves_them(case, kw):
    """A parameter the batch's loss never reaches gets no update, no weight decay and keeps its optimizer
    state (torch.optim skips a ``.grad`` of ``None``); one reached on some steps only moves on those."""
    mine, theirs = CASES[case]
    params, data, val = problem()
    g = torch.Generator().manual_seed(3)
    params = {**params, "v": 0.5 * torch.randn(6, 4, generator=g, dtype=DT), "head": torch.randn(2, 6, dtype=DT)}
    steps = [{k: v[i * 6:(i + 1) * 6] for k, v in data.items()} for i in range(6)]
    for i, batch in enumerate(steps):  # v on steps 2 and 4 only: every sample takes the batch's branch
        batch["x"][:, 0] = batch["x"][:, 0].abs() * (1 if i in (2, 4) else -1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = theirs(list(leaves.values()))
    step = ghostfunc.train_step(branchy_fn, mine(), **kw)
    state = step.init(params)
    for i, batch in enumerate(steps):
        opt.zero_grad(set_to_none=True)
        branchy_fn(leaves, batch).mean().backward()
        opt.step()
        state, _ = step(state, batch, val)
        for k in params:
            torch.testing.assert_close(state.params[k], leaves[k].detach(), rtol=1e-12, atol=1e-14, msg=(k, i))
    assert torch.equal(state.params["head"], params["head"])
    assert not torch.equal(state.params["v"], params["v"])


def stopped_fn(p, batch, how):
    """``s`` reaches the losses only through a use autograd does not follow (``how``): torch.optim gives it
    ``.grad`` ``None``; ``w1`` and ``w2`` are ordinary."""
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
    logits = F.linear(h, p["w2"], p["b2"])
    if how == "detach":
        logits = logits * p["s"].detach()
    elif how == "no_grad":
        with torch.no_grad():
            scale = p["s"].exp()
        logits = logits * scale
    elif how == "argmax":
        logits = logits + torch.nn.functional.one_hot(p["s"].argmax(), 3).to(logits.dtype)
    elif how == "discarded":
        _ = (h[:, :3] * p["s"]).sum(1)  # computed, never part of the loss
    return F.cross_entropy(logits, batch["y"], reduction="none")


@pytest.mark.parametrize("how", ["detach", "no_grad", "argmax", "discarded"])
@pytest.mark.parametrize(("case", "kw"), [("sgd-momentum", {}), ("adamw", {}), ("adamw", {"order": 2}),
                                          ("sgd-momentum", {"order": 2, "curvature": "secant"})])
def test_a_parameter_used_without_a_gradient_path_is_left_as_torch_optim_leaves_it(how, case, kw):
    """A parameter the model uses, but only where autograd does not follow (``.detach()``, ``no_grad``, an
    integer result, an output thrown away: stop-gradient code, a frozen teacher's scale) gets ``.grad`` ``None``
    in torch, so torch.optim skips it: no weight decay, no momentum. The step leaves it the same way (it was
    decayed as a zero gradient: 3e-2 off after 3 steps), and the other parameters follow torch.optim."""
    mine, theirs = CASES[case]
    params, data, val = problem()
    params = {**params, "s": torch.tensor([0.5, 2.0, 1.0], dtype=DT)}
    fn = functools.partial(stopped_fn, how=how)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = theirs(list(leaves.values()))
    step = ghostfunc.train_step(fn, mine(), **kw)
    state = step.init(params)
    for i in range(3):
        batch = {k: v[i * 6:(i + 1) * 6] for k, v in data.items()}
        opt.zero_grad(set_to_none=True)
        fn(leaves, batch).mean().backward()
        assert leaves["s"].grad is None
        opt.step()
        state, _ = step(state, batch, val)
        for k in params:
            torch.testing.assert_close(state.params[k], leaves[k].detach(), rtol=1e-12, atol=1e-14, msg=(k, i))
    assert torch.equal(state.params["s"], params["s"])


class _Switched(torch.nn.Module):
    """A head whose bias is scaled by ``k`` and used through ``.detach()`` when ``stop`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(6, 8).to(DT), torch.nn.Linear(8, 3).to(DT)
        self.b = torch.nn.Parameter(torch.zeros(3, dtype=DT))
        self.k, self.stop = 1.0, False

    def forward(self, x):
        b = self.b.detach() if self.stop else self.b
        return self.head(torch.tanh(self.body(x))) + b * self.k


@pytest.mark.parametrize("kw", [{}, {"order": 2}], ids=["order 1", "order 2"])
def test_a_setting_that_cuts_a_parameters_gradient_path_later_is_followed(kw):
    """A step with ``k = 0`` (the bias's gradient exactly 0, a path there), then ``stop`` set (no path): whether a
    path exists was kept per signature alone, and the step went on moving the bias by momentum where torch.optim
    leaves it (1.2e-2 off after the next step, h98)."""
    mine, ref = _Switched(), _Switched()

    def fn(p, batch):
        return F.cross_entropy(torch.func.functional_call(mine, p, (batch["x"],)), batch["y"], reduction="none")

    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(12, 6, generator=g, dtype=DT), "y": torch.randint(0, 3, (12,), generator=g)}
    val = {"x": torch.randn(5, 6, generator=g, dtype=DT), "y": torch.randint(0, 3, (5,), generator=g)}
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.1, momentum=0.9), **kw)
    state = step.init({k: v.detach() for k, v in mine.named_parameters()})
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i, (k, stop) in enumerate([(1.0, False), (0.0, False), (1.0, True), (1.0, True)]):
        for model in (mine, ref):
            model.k, model.stop = k, stop
        state, _ = step(state, data, val)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(data["x"]), data["y"]).backward()
        opt.step()
        for name, v in ref.named_parameters():
            torch.testing.assert_close(state.params[name], v.detach(), rtol=1e-12, atol=1e-14, msg=(name, i))


def test_the_gradient_path_check_writes_nothing():
    """The plain run that looks for a gradient path (a parameter used only through ``.detach()`` here) runs the
    calls the capture replaces as the capture does: an embedding's ``max_norm`` renormalises a copy, never the
    state's parameters (which a plain ``F.embedding`` call would rewrite in place)."""
    g = torch.Generator().manual_seed(0)
    params = {"E": 3 * torch.randn(7, 4, generator=g, dtype=DT), "w": torch.randn(3, 4, generator=g, dtype=DT),
              "s": torch.tensor(2.0, dtype=DT)}

    def fn(p, batch):
        h = F.embedding(batch["t"], p["E"], max_norm=1.0).mean(1)
        return F.cross_entropy(F.linear(h, p["w"]) * p["s"].detach(), batch["y"], reduction="none")

    batch = {"t": torch.randint(0, 7, (5, 3), generator=g), "y": torch.randint(0, 3, (5,), generator=g)}
    step = ghostfunc.train_step(fn, ghostfunc.adamw(0.1))
    state = step.init(params)
    before = {k: v.clone() for k, v in state.params.items()}
    new, _ = step(state, batch, batch)
    for k in params:
        assert torch.equal(state.params[k], before[k]), k
    assert torch.equal(new.params["s"], params["s"])


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw"])
def test_a_state_of_parameters_that_require_grad_gives_detached_states_no_graph_across_steps(case):
    """A state built by hand from ``nn.Parameter``s (not by ``step.init``, which copies them detached): each
    step's new parameters and optimizer state are plain tensors, so no autograd graph chains step to step
    (it did, and memory grew over the run)."""
    params, data, val = problem()
    opt = CASES[case][0]()
    state = ghostfunc.TrainState({k: torch.nn.Parameter(v.clone()) for k, v in params.items()}, opt.init(params), 0)
    step = ghostfunc.train_step(mlp_fn, opt)
    reference = step.init(params)
    for batch in batches(data, 3):
        state, _ = step(state, batch, val)
        reference, _ = step(reference, batch, val)
        tensors = [*state.params.values(), *[t for t in torch.utils._pytree.tree_leaves(state.opt_state)
                                              if isinstance(t, Tensor)]]
        assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert all(torch.equal(state.params[k], reference.params[k]) for k in params)


def test_a_malformed_state_is_refused_before_the_step_naming_what_disagrees():
    """A state whose parts disagree (edited by hand, or made for other parameters) is refused by train_step, before
    its passes, saying what was expected and what came: it raised raw AttributeErrors, TypeErrors and broadcasting
    errors (some after the values were computed)."""
    params, data, val = problem()
    batch = next(batches(data, 1))
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1, momentum=0.9))
    state = step.init(params)
    later, _ = step(state, batch, val)
    bufs = later.opt_state.momentum
    bad = [(later._replace(opt_state=later.opt_state._replace(momentum={**bufs, "b1": torch.zeros(5, dtype=DT)})),
            ValueError, r"^train_step: the optimizer state's momentum\['b1'\] must match params\['b1'\] "
                        r"\(torch.float64, shape \(6,\), on cpu\); got torch.float64, shape \(5,\)"),
           (later._replace(params={k: v for k, v in later.params.items() if k != "b1"}), ValueError,
            r"^train_step: the optimizer state's momentum must have some of the keys of params .*\['b1'\] not in params"),
           (state._replace(opt_state=None), TypeError,
            r"^train_step: the optimizer state must be the SGDState that sgd\(\.\.\.\)\.init made; got NoneType"),
           (state._replace(opt_state=ghostfunc.adamw().init(params)), TypeError,
            r"^train_step: the optimizer state must be the SGDState .*; got AdamWState"),
           (state._replace(step="a"), TypeError, r"^train_step: state.step must be an int >= 0 .*; got 'a' \(a str\)$"),
           (state._replace(step=-1), ValueError, r"^train_step: state.step must be an int >= 0 .*; got -1$"),
           (state._replace(params=[params["w1"]]), TypeError, r"^train_step: state.params must be a non-empty dict"),
           (state._replace(params={**params, "b1": 0.5}), TypeError, r"^train_step: params\['b1'\] must be a tensor")]
    for broken, error, message in bad:
        with pytest.raises(error, match=message):
            step(broken, batch, val)
    adamw = ghostfunc.train_step(mlp_fn, ghostfunc.adamw())
    with pytest.raises(ValueError, match=r"^train_step: the optimizer state's mu must have the keys of params .*"
                                         r"\['b1'\] not in params$"):
        adamw(adamw.init(params)._replace(params={k: v for k, v in params.items() if k != "b1"}), batch, val)
    # a fresh SGD state records no parameters: model_fn's own KeyError, with a note that names the state's keys
    with pytest.raises(KeyError, match="b1") as caught:
        step(state._replace(params={k: v for k, v in state.params.items() if k != "b1"}), batch, val)
    assert any(note.startswith("train_step: state.params has no 'b1' (it holds ['b2', 'w1', 'w2'])")
               for note in caught.value.__notes__)


def test_a_step_built_directly_checks_its_arguments_as_train_step_does():
    """``TrainStep(...)`` accepted ``optimizer=None`` and ``compile='x'`` and failed at the first step."""
    sgd = ghostfunc.sgd(0.1)
    for kw, error, message in [({"optimizer": None}, TypeError, r"^train_step: optimizer must be a ghostfunc.Optimizer"),
                               ({"compile": "x"}, TypeError, r"^train_step: compile must be True or False; got 'x'$"),
                               ({"order": 5}, ValueError, r"^train_step: order must be 1 or 2; got 5$"),
                               ({"precondition": 1}, TypeError, r"^train_step: precondition must be True or False"),
                               ({"model_fn": None}, TypeError, r"^train_step: model_fn must be callable"),
                               ({"order": 1, "curvature": "secant"}, ValueError, r"^train_step: curvature='secant'")]:
        args = {"model_fn": mlp_fn, "optimizer": sgd, **kw}
        with pytest.raises(error, match=message):
            ghostfunc.TrainStep(**args)
    assert ghostfunc.TrainStep(mlp_fn, sgd) == ghostfunc.train_step(mlp_fn, sgd)


def test_results_and_states_round_trip_through_torch_save_and_load(tmp_path):
    """A training loop checkpoints with torch.save/torch.load (weights_only=True, torch's default): ghostfunc's
    results and states load back (every type was an "Unsupported global"), and a secant state, whose carried
    validation gradient held a local model_fn and weak references (it did not pickle), saves without that cache
    and the next step takes it again, to the same numbers."""
    torch.manual_seed(0)
    w = {"w": torch.randn(2, 3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}

    def model_fn(q, batch):  # (local: not picklable by reference)
        x, y = batch
        return F.cross_entropy(F.linear(x, q["w"], q["b"]), y, reduction="none")

    g = torch.Generator().manual_seed(1)
    train = (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    val = (torch.randn(3, 3, generator=g, dtype=torch.float64), torch.tensor([1, 0, 1]))
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=2, curvature="secant")
    state, info = step(step.init(w), train, val)
    adam = ghostfunc.train_step(model_fn, ghostfunc.adamw(0.1))
    objects = {"graddot": ghostfunc.graddot(model_fn, w, train, val), "secant state": state, "info": info,
               "adamw state": adam(adam.init(w), train, val)[0], "values": ghostfunc.DataValues.zeros(4),
               "direction": ghostfunc.graddot_direction(model_fn, w, train, {k: torch.ones_like(v) for k, v in w.items()}),
               "trajectory": ghostfunc.Trajectory.start(adam.init(w), 2)}
    for name, obj in objects.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        back = torch.load(tmp_path / f"{name}.pt")
        assert type(back) is type(obj), name
    back = torch.load(tmp_path / "secant state.pt")
    assert back.val_grad is None and state.val_grad is not None
    a, b = step(state, train, val), step(back, train, val)
    assert torch.equal(a[1].values, b[1].values)
    assert all(torch.equal(a[0].params[k], b[0].params[k]) for k in w)


def test_an_optimizer_state_made_afresh_mid_run_starts_its_schedule_again():
    """TrainState.step counts the run's updates, opt_state.step drives the schedule: a reset optimizer state (a new
    torch.optim optimizer mid-run) is taken, its learning rate from its own count (refusing the two counts that
    differ would refuse every step after such a reset)."""
    torch.manual_seed(0)
    w = {"w": torch.randn(2, 3, dtype=torch.float64)}

    def model_fn(q, batch):
        return (batch @ q["w"].T).pow(2).sum(1)

    x = torch.randn(4, 3, dtype=torch.float64)
    opt = ghostfunc.sgd(lambda count: 0.1 / (1 + count))
    step = ghostfunc.train_step(model_fn, opt)
    state = step.init(w)
    for _ in range(3):
        state, _ = step(state, x, x)
    state = state._replace(opt_state=opt.init(state.params))
    for _ in range(2):
        state, info = step(state, x, x)
    assert state.step == 5 and state.opt_state.step == 2 and info.lr == 0.1 / 2


def test_a_loss_normalised_over_the_whole_batch_is_refused_whatever_rows_come_first():
    """A loss normalised by the whole batch's token count (Hugging Face's num_items_in_batch) couples the samples;
    with the first rows holding as many tokens as each other, the few rows the checks compare agreed and the step
    took the mean of the samples' own gradients, not the batch's (0.30 off torch.optim's step): the first step of
    a signature also compares the batch's gradient with the mean the step takes."""
    torch.manual_seed(0)
    d, v = 8, 11
    ids, tgt = torch.randint(0, v, (8, 6)), torch.randint(0, v, (8, 6))
    for i in range(8):
        tgt[i, : (2 if i < 3 else i % 5)] = -100  # the first three rows: four targets each
    p = {"emb": torch.randn(v, d, dtype=torch.float64) / 2, "head": torch.randn(v, d, dtype=torch.float64) / 3}

    def model_fn(q, b):
        h = torch.tanh(F.embedding(b["ids"], q["emb"]))
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) * len(b["tgt"]) / (b["tgt"] != -100).sum()

    train, val = {"ids": ids, "tgt": tgt}, {"ids": ids[:3], "tgt": tgt[:3]}
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(1.0))
    for _ in range(2):  # the same call made again is refused again (the verdict was kept before the refusal)
        with pytest.raises(ghostfunc.SamplesInteractError, match=r"^train_step: samples interact .*whole train(ing)? "
                                                                   r"batch \(8 samples\).*num_items_in_batch"):
            step(step.init(p), train, val)

    def own_count(q, b):  # each sample normalised by its own count: the same numbers as a loop, no refusal
        h = torch.tanh(F.embedding(b["ids"], q["emb"]))
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) / (b["tgt"] != -100).sum(1)

    step = ghostfunc.train_step(own_count, ghostfunc.sgd(1.0))
    state, _ = step(step.init(p), train, val)
    leaves = {k: t.clone().requires_grad_() for k, t in p.items()}
    grads = torch.autograd.grad(own_count(leaves, train).mean(), list(leaves.values()))
    for (k, t), g in zip(p.items(), grads, strict=True):
        torch.testing.assert_close(state.params[k], t - g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["checkpoint", "per-sample capture"])
def test_a_loss_normalised_over_the_whole_batch_is_refused_whatever_the_plan_notes(how):
    """The whole-batch gradient check was skipped for any plan with a note: a checkpointed model's note, or the
    per-sample capture's, let a loss normalised by the batch's token count through (0.07 off torch.optim's
    step). Only a training batch split at data-dependent branches (per-sample by design) is not compared."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    d, t, b = 6, 5, 8
    p = {"w": torch.randn(d, d, dtype=torch.float64) / 3, "b": torch.randn(d, dtype=torch.float64) / 5}

    def per_token(q, x):
        if how == "per-sample capture":  # (a boolean mask's data-dependent shape: vmap inside vjp cannot run it)
            x = x[torch.ones_like(x, dtype=torch.bool)].view(x.shape)
        return (F.linear(x, q["w"], q["b"]) ** 2).sum(-1)

    def model_fn(q, batch, own=False):
        tokens = checkpoint(per_token, q, batch["x"], use_reentrant=False) if how == "checkpoint" else \
            per_token(q, batch["x"])
        if own:  # each sample by its own count
            return (tokens * batch["mask"]).sum(-1) / batch["mask"].sum(-1)
        return (tokens * batch["mask"]).sum(-1) * len(batch["mask"]) / batch["mask"].sum()

    mask = torch.ones(b, t, dtype=torch.float64)
    for i in range(3, b):
        mask[i, 1 + i % (t - 1):] = 0  # the first three rows unpadded: the few-row checks agree
    train = {"x": torch.randn(b, t, d, dtype=torch.float64), "mask": mask}
    val = {"x": torch.randn(4, t, d, dtype=torch.float64), "mask": torch.ones(4, t, dtype=torch.float64)}
    own = ghostfunc.graddot(functools.partial(model_fn, own=True), p, train, val)
    assert own.plan.notes  # the note that turned the check off
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    with pytest.raises(ghostfunc.SamplesInteractError, match=r"^train_step: samples interact .*whole train(ing)? "
                                                               r"batch \(8 samples\)"):
        step(step.init(p), train, val)


def test_a_float32_model_at_its_optimum_is_not_taken_for_samples_that_interact():
    """Least squares at its solution in float32: the samples' own gradients (up to ~9) cancel in the mean (~1e-8),
    and the batch's gradient and the mean of the samples' agree to float32 rounding of the samples' own; the
    whole-batch check's rounding was scaled by the mean alone and refused it (4.7e-8 against 1.5e-11)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    w = torch.linalg.lstsq(x.double(), y.double().unsqueeze(1)).solution.squeeze(1).float()

    def model_fn(q, batch):
        return 0.5 * (batch[0] @ q["w"] - batch[1]) ** 2

    for opt in (ghostfunc.sgd(0.1), ghostfunc.adamw(0.01)):
        step = ghostfunc.train_step(model_fn, opt)
        state, info = step(step.init({"w": w}), (x, y), (x[:8], y[:8]))
        assert torch.isfinite(info.values).all()
