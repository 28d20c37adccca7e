"""``ghostfunc.sgd`` / ``ghostfunc.adamw`` refuse bad hyper-parameters at once, naming the argument and the value.

torch.optim's ranges are kept (lr, momentum, eps, weight_decay >= 0; 0 <= betas < 1;
dampening any); NaN, inf, bools and non-numbers are refused as well (torch.optim.AdamW
refuses NaN eps / weight_decay; a NaN hyper-parameter otherwise turns the parameters
into NaN on the first update, silently). A learning-rate schedule's values are checked
when they are used.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ghostfunc

NAN, INF = float("nan"), float("inf")

BAD = [  # (factory, exception, message regex)
    (lambda: ghostfunc.sgd(NAN), ValueError, r"^sgd: lr must be a float >= 0 .*got nan$"),
    (lambda: ghostfunc.sgd(INF), ValueError, r"^sgd: lr must be a float >= 0 .*got inf$"),
    (lambda: ghostfunc.sgd(-1.0), ValueError, r"^sgd: lr must be a float >= 0 .*got -1.0$"),
    (lambda: ghostfunc.sgd(True), TypeError, r"^sgd: lr must be a float >= 0 .*got True \(a bool\)$"),
    (lambda: ghostfunc.sgd("0.1"), TypeError, r"^sgd: lr must be a float .*got '0.1' \(a str\)$"),
    (lambda: ghostfunc.sgd(0.1, momentum=NAN), ValueError, r"^sgd: momentum must be a finite float >= 0; got nan$"),
    (lambda: ghostfunc.sgd(0.1, momentum=INF), ValueError, r"^sgd: momentum must be a finite float >= 0; got inf$"),
    (lambda: ghostfunc.sgd(0.1, momentum=-0.5), ValueError, r"^sgd: momentum must be a finite float >= 0; got -0.5$"),
    (lambda: ghostfunc.sgd(0.1, momentum="0.9"), TypeError, r"^sgd: momentum must be a finite float >= 0; got '0.9' \(a str\)$"),
    (lambda: ghostfunc.sgd(0.1, momentum=True), TypeError, r"^sgd: momentum must be .*got True \(a bool\)$"),
    (lambda: ghostfunc.sgd(0.1, momentum=None), TypeError, r"^sgd: momentum must be .*got None \(a NoneType\)$"),
    (lambda: ghostfunc.sgd(0.1, momentum=0.9, dampening=NAN), ValueError, r"^sgd: dampening must be a finite float; got nan$"),
    (lambda: ghostfunc.sgd(0.1, momentum=0.9, dampening=-INF), ValueError, r"^sgd: dampening must be a finite float; got -inf$"),
    (lambda: ghostfunc.sgd(0.1, momentum=0.9, dampening="0"), TypeError, r"^sgd: dampening must be .*got '0' \(a str\)$"),
    (lambda: ghostfunc.sgd(0.1, weight_decay=NAN), ValueError, r"^sgd: weight_decay must be a finite float >= 0; got nan$"),
    (lambda: ghostfunc.sgd(0.1, weight_decay=INF), ValueError, r"^sgd: weight_decay must be a finite float >= 0; got inf$"),
    (lambda: ghostfunc.sgd(0.1, weight_decay=-0.1), ValueError, r"^sgd: weight_decay must be a finite float >= 0; got -0.1$"),
    (lambda: ghostfunc.sgd(0.1, weight_decay=False), TypeError, r"^sgd: weight_decay must be .*got False \(a bool\)$"),
    (lambda: ghostfunc.adamw(NAN), ValueError, r"^adamw: lr must be a float >= 0 .*got nan$"),
    (lambda: ghostfunc.adamw(INF), ValueError, r"^adamw: lr must be a float >= 0 .*got inf$"),
    (lambda: ghostfunc.adamw(eps=NAN), ValueError, r"^adamw: eps must be a finite float >= 0; got nan$"),
    (lambda: ghostfunc.adamw(eps=INF), ValueError, r"^adamw: eps must be a finite float >= 0; got inf$"),
    (lambda: ghostfunc.adamw(eps=-1e-8), ValueError, r"^adamw: eps must be a finite float >= 0; got -1e-08$"),
    (lambda: ghostfunc.adamw(eps="1e-8"), TypeError, r"^adamw: eps must be .*got '1e-8' \(a str\)$"),
    (lambda: ghostfunc.adamw(weight_decay=NAN), ValueError, r"^adamw: weight_decay must be a finite float >= 0; got nan$"),
    (lambda: ghostfunc.adamw(weight_decay=-INF), ValueError, r"^adamw: weight_decay must be a finite float >= 0; got -inf$"),
    (lambda: ghostfunc.adamw(weight_decay=True), TypeError, r"^adamw: weight_decay must be .*got True \(a bool\)$"),
    (lambda: ghostfunc.adamw(betas=(0.9,)), ValueError, r"^adamw: betas must be a pair \(beta1, beta2\).*got \(0.9,\)$"),
    (lambda: ghostfunc.adamw(betas=(0.9, 0.99, 0.999)), ValueError, r"^adamw: betas must be a pair"),
    (lambda: ghostfunc.adamw(betas=0.9), TypeError, r"^adamw: betas must be a pair .*got 0.9$"),
    (lambda: ghostfunc.adamw(betas="ab"), TypeError, r"^adamw: betas must be a pair .*got 'ab'$"),
    (lambda: ghostfunc.adamw(betas=(NAN, 0.999)), ValueError, r"^adamw: betas\[0\] must be a finite float; got nan$"),
    (lambda: ghostfunc.adamw(betas=(0.9, INF)), ValueError, r"^adamw: betas\[1\] must be a finite float; got inf$"),
    (lambda: ghostfunc.adamw(betas=(0.9, "0.999")), TypeError, r"^adamw: betas\[1\] must be .*got '0.999' \(a str\)$"),
    (lambda: ghostfunc.adamw(betas=(True, 0.999)), TypeError, r"^adamw: betas\[0\] must be .*got True \(a bool\)$"),
    (lambda: ghostfunc.adamw(betas=(0.9, 1.0)), ValueError, r"^adamw: need 0 <= betas < 1; got betas=\(0.9, 1.0\)$"),
    (lambda: ghostfunc.adamw(betas=(-0.1, 0.9)), ValueError, r"^adamw: need 0 <= betas < 1; got betas=\(-0.1, 0.9\)$"),
    (lambda: ghostfunc.sgd(0.1, momentum=0.9, nesterov="no"), TypeError, r"^sgd: nesterov must be True or False; got 'no'$"),
]


@pytest.mark.parametrize(("make", "other"), [(ghostfunc.sgd, ghostfunc.adamw), (ghostfunc.adamw, ghostfunc.sgd)])
def test_another_optimizers_state_is_refused_naming_both(make, other) -> None:
    """A state made by another optimizer (a resumed file, an unroll of a trajectory recorded with another one)
    is refused by update and precondition, naming the state each expects, not an AttributeError deep inside."""
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    opt, wrong = make(0.1), other(0.1).init(params)
    name = opt.name
    want = {"sgd": "SGDState", "adamw": "AdamWState"}[name]
    with pytest.raises(TypeError, match=rf"^{name}: the optimizer state must be the {want} that {name}\(\.\.\.\)\.init "
                                        rf"made; got {type(wrong).__name__}"):
        opt.update({"w": torch.ones(2, dtype=torch.float64)}, wrong, params)
    if name == "adamw":
        with pytest.raises(TypeError, match=r"^adamw: the optimizer state must be the AdamWState"):
            opt.precondition(params, params, wrong)


def test_train_step_init_checks_params_as_graddot_does() -> None:
    step = ghostfunc.train_step(lambda p, b: (b @ p["w"]) ** 2, ghostfunc.sgd(0.1))
    with pytest.raises(TypeError, match=r"^train_step.init: params\['b'\] must be a tensor; got float$"):
        step.init({"w": torch.zeros(2), "b": 0.5})
    with pytest.raises(ValueError, match=r"^train_step.init: params\['w'\] is on the meta device: it holds no values"):
        step.init({"w": torch.zeros(2, device="meta")})


@pytest.mark.parametrize("make, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_hyperparameters_are_refused_naming_argument_and_value(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()


def _state(opt: ghostfunc.Optimizer, count: int):
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    return opt.init(params)._replace(step=count), params


@pytest.mark.parametrize("factory", [ghostfunc.sgd, ghostfunc.adamw])
@pytest.mark.parametrize("returned, error, shown", [
    ("x", TypeError, "'x'"), (NAN, ValueError, "nan"), (INF, ValueError, "inf"), (-0.5, ValueError, "-0.5"),
    (None, TypeError, "None"), (True, TypeError, "True"), (torch.tensor([0.1, 0.2]), TypeError, "tensor"),
    (torch.tensor(NAN), ValueError, "tensor\\(nan\\)"),
])
def test_schedule_values_are_checked_naming_schedule_count_and_value(factory, returned, error, shown) -> None:
    def warm(count: int):
        return 0.1 if count < 3 else returned

    opt = factory(warm)
    state, params = _state(opt, 3)
    assert opt.lr(_state(opt, 2)[0]) == 0.1
    where = factory.__name__
    message = rf"^{where}: the lr schedule .*warm returned {shown}.* at count 3; expected a finite float >= 0$"
    with pytest.raises(error, match=message):
        opt.lr(state)
    with pytest.raises(error, match=message):
        opt.update({"w": torch.ones(2, dtype=torch.float64)}, state, params)


@pytest.mark.parametrize("factory", [ghostfunc.sgd, ghostfunc.adamw])
def test_a_one_element_tensor_lr_is_a_number(factory) -> None:
    """torch.optim takes ``lr=torch.tensor(0.1)``; so does a schedule here, and now the lr itself (it was refused).
    A tensor of several elements, a NaN one and a bool one are refused as before."""
    for value in (torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64)):
        assert factory(value).lr(factory(value).init({})) == 0.25
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: lr must be a float >= 0"):
        factory(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: lr must be a float >= 0 \(finite\)"):
        factory(torch.tensor(NAN))
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: lr must be a float >= 0"):
        factory(torch.tensor(True))


def test_schedule_values_that_are_numbers_pass() -> None:
    for value in (0, 0.25, np.float32(0.5), np.int64(1), torch.tensor(0.75)):
        opt = ghostfunc.sgd(lambda count, v=value: v)
        got = opt.lr(opt.init({}))
        assert isinstance(got, float) and got == float(value)


def test_train_step_never_sees_a_nan_hyperparameter() -> None:
    """The fuzz repro: these used to be accepted and turn the parameters into NaN on the first update."""
    for make in (lambda: ghostfunc.adamw(0.1, eps=NAN), lambda: ghostfunc.adamw(0.1, weight_decay=NAN),
                 lambda: ghostfunc.sgd(0.1, momentum=NAN), lambda: ghostfunc.sgd(0.1, weight_decay=NAN)):
        with pytest.raises(ValueError, match="must be a finite float >= 0; got nan"):
            make()
    for kw in (dict(eps=NAN), dict(weight_decay=NAN)):  # torch.optim.AdamW agrees
        with pytest.raises(ValueError):
            torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **kw)


def test_edge_values_torch_accepts_still_pass_and_match_torch() -> None:
    """lr 0, momentum 0, eps 0, beta 0, negative dampening, numpy scalars and a JSON list for betas are accepted."""
    ghostfunc.sgd(0)
    ghostfunc.sgd(np.float64(0.1), momentum=np.float32(0.5), weight_decay=0)
    ghostfunc.adamw(0.0, betas=[0.0, 0.0], eps=0, weight_decay=0)  # a spec.json's arguments: betas a list
    torch.manual_seed(0)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    cases = [(lambda: ghostfunc.sgd(0.1, momentum=0.9, dampening=-0.5, weight_decay=1),
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=-0.5, weight_decay=1)),
             (lambda: ghostfunc.adamw(0.05, betas=[0.8, 0.9], eps=1e-6, weight_decay=0),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0))]
    for mine, theirs in cases:
        opt = mine()
        params, state = {"w": w0.clone()}, opt.init({"w": w0})
        w = w0.clone().requires_grad_(True)
        topt = theirs([w])
        for _ in range(3):
            p = params["w"].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(x @ p.T, y), [p])
            params, state = opt.update({"w": g}, state, params)
            topt.zero_grad()
            F.cross_entropy(x @ w.T, y).backward()
            topt.step()
        assert torch.equal(params["w"], w.detach()), opt.name
        assert math.isfinite(float(params["w"].sum()))


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "sgd-nesterov", "adamw"])
def test_a_parameter_without_gradient_is_left_as_torch_optim_leaves_it(name):
    """``None`` for a parameter's gradient (no gradient reached it): the update leaves the parameter and its
    state (momentum buffer; AdamW's moments and per-parameter count, which its bias correction uses) as
    torch.optim does for ``.grad is None``, over steps where the parameters miss different updates."""
    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(3, 2, generator=g, dtype=torch.float64) for k in "abc"}
    missing = [{"b"}, {"b", "c"}, set(), {"c"}, {"b"}, set()]  # b first gets a gradient at step 2
    make = {"sgd": (lambda: ghostfunc.sgd(0.1, weight_decay=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1,
                                                                                               weight_decay=0.1)),
            "sgd-momentum": (lambda: ghostfunc.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.1),
                             lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1)),
            "sgd-nesterov": (lambda: ghostfunc.sgd(0.1, momentum=0.9, nesterov=True),
                             lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
            "adamw": (lambda: ghostfunc.adamw(0.05, weight_decay=0.1),
                      lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, foreach=False))}[name]
    opt = make[0]()
    params = {k: v.clone() for k, v in start.items()}
    state = opt.init(params)
    leaves = [torch.nn.Parameter(v.clone()) for v in start.values()]
    ref = make[1](leaves)
    for skip in missing:
        grads = {k: None if k in skip else torch.randn(3, 2, generator=g, dtype=torch.float64) for k in "abc"}
        params, state = opt.update(grads, state, params)
        for leaf, k in zip(leaves, "abc", strict=True):
            leaf.grad = None if grads[k] is None else grads[k].clone()
        ref.step()
        for leaf, k in zip(leaves, "abc", strict=True):
            assert torch.equal(params[k], leaf.detach()), (k, skip)


def test_updated_parameters_keep_their_dtype():
    """A float64 gradient (computed in another precision) for float32 parameters: the update is in the parameters'
    dtype, as torch.optim's step on a float32 parameter is, instead of promoting them to float64."""
    params = {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    grads = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.ones(2)}
    for opt in (ghostfunc.sgd(0.1, momentum=0.9, weight_decay=0.01), ghostfunc.adamw(0.01)):
        state = opt.init(params)
        for _ in range(2):
            new, state = opt.update(grads, state, params)
            assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in params.items()}
        want = new["w"]
        same, _ = opt.update({"w": grads["w"].float(), "b": grads["b"].bfloat16()}, opt.init(params), params)
        first, _ = opt.update(grads, opt.init(params), params)
        assert torch.equal(first["w"], same["w"]) and want.dtype == torch.float32


def test_a_schedule_that_takes_no_count_is_refused_where_it_is_given() -> None:
    """``sgd(lambda: 0.1)`` raised a raw TypeError at the first step; a schedule is called with the count."""
    for factory in (ghostfunc.sgd, ghostfunc.adamw):
        with pytest.raises(TypeError, match=rf"^{factory.__name__}: lr must be a float >= 0 or a callable count -> lr"
                                            r".*got .*<lambda>\(\), which cannot be called with one count$"):
            factory(lambda: 0.1)
        with pytest.raises(TypeError, match=r"which cannot be called with one count$"):
            factory(lambda count, step: 0.1)
    assert ghostfunc.sgd(lambda count, *rest: 0.1).lr(ghostfunc.sgd(0.1).init({})) == 0.1

    # schedules that do take one count, which a reading of their signature refused: a decorator binding an
    # argument (inspect followed __wrapped__ to (step, total)), a class whose __call__ is a staticmethod
    def warmup(total):
        def deco(fn):
            @functools.wraps(fn)
            def rate(step):
                return fn(step, total)
            return rate
        return deco

    @warmup(10)
    def scheduled(step, total):
        return 0.1 * min(1.0, (step + 1) / total)

    class Constant:
        @staticmethod
        def __call__(step):
            return 0.1

    for schedule in (scheduled, Constant()):
        opt = ghostfunc.sgd(schedule)
        assert 0 < opt.lr(opt.init({})) <= 0.1


@pytest.mark.parametrize("make", [ghostfunc.sgd, ghostfunc.adamw])
def test_init_and_update_refuse_params_and_grads_that_are_not_dicts_of_tensors(make) -> None:
    opt, name = make(0.1), make.__name__
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    for bad, got in (([params["w"]], "got list"), (3, "got int"), ({"w": 1.0}, r"params\['w'\] .*got 1.0 \(a float\)"),
                     ({"w": torch.zeros(2, dtype=torch.long)}, r"params\['w'\] .*got a torch.int64 tensor")):
        with pytest.raises(TypeError, match=rf"^{name}.init: .*{got}$"):
            opt.init(bad)
    with pytest.raises(TypeError, match=rf"^{name}: grads\['w'\] must be a tensor shaped like params\['w'\] \(or None"
                                        r".*\); got 1.0 \(a float\)$"):
        opt.update({"w": 1.0}, opt.init(params), params)
    with pytest.raises(TypeError, match=rf"^{name}: grads must be a dict name -> tensor .*; got list$"):
        opt.update([torch.ones(2)], opt.init(params), params)


def test_a_state_made_for_other_parameters_is_refused_naming_the_keys() -> None:
    """AdamW's state of other parameters raised ``KeyError: 'a'``; a momentum buffer of another shape a raw
    broadcasting error; another dtype promoted the updated parameter silently. Each names the keys now."""
    w = {"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    a = {"a": torch.ones(2, dtype=torch.float64)}
    adamw = ghostfunc.adamw()
    with pytest.raises(ValueError, match=r"^adamw: the optimizer state's mu must have the keys of params \['a'\] .*"
                                         r"got \['b', 'w'\]: \['b', 'w'\] not in params and \['a'\] missing$"):
        adamw.update(a, adamw.init(w), a)
    sgd = ghostfunc.sgd(0.1, momentum=0.9)
    grads = {k: torch.ones_like(v) for k, v in w.items()}
    _, state = sgd.update(grads, sgd.init(w), w)
    with pytest.raises(ValueError, match=r"^sgd: the optimizer state's momentum must have some of the keys of params "
                                         r"\['a'\] .*got \['b', 'w'\]: \['b', 'w'\] not in params$"):
        sgd.update(a, state, a)
    for bad, got in ((torch.zeros(2, dtype=torch.float64), r"torch.float64, shape \(2,\), on cpu"),
                     (torch.zeros(3), r"torch.float32, shape \(3,\), on cpu")):
        broken = state._replace(momentum={**state.momentum, "b": bad})
        with pytest.raises(ValueError, match=r"^sgd: the optimizer state's momentum\['b'\] must match params\['b'\] "
                                             rf"\(torch.float64, shape \(3,\), on cpu\); got {got}"):
            sgd.update(grads, broken, w)
    with pytest.raises(TypeError, match=r"^sgd: the optimizer state's step must be an int >= 0 .*got 'a' \(a str\)$"):
        sgd.update(grads, state._replace(step="a"), w)
    with pytest.raises(ValueError, match=r"^adamw: the optimizer state's counts must be None or a dict"):
        adamw.update(grads, adamw.init(w)._replace(counts={"w": 1}), w)
    with pytest.raises(TypeError, match=r"^sgd: the optimizer state must be the SGDState .*; got NoneType"):
        sgd.lr(None)


def test_a_tensor_lr_is_read_at_every_update_as_torch_optim_reads_it() -> None:
    """A decay written into the lr tensor in place moves torch.optim's next update; it was read once (h61: the
    parameters 0.49 off torch.optim after 3 steps, ``info.lr`` stuck at the first value)."""
    torch.manual_seed(0)
    w0 = torch.randn(3, 2, dtype=torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def model_fn(p, batch):
        return (batch[0] @ p["w"] - batch[1]).pow(2).sum(1)

    ours, theirs = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(ours, momentum=0.9))
    state = step.init({"w": w0})
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=theirs, momentum=0.9)
    for _ in range(3):
        state, info = step(state, (x, y), (x[:2], y[:2]))
        assert info.lr == ours.item()
        opt.zero_grad()
        model_fn({"w": w}, (x, y)).mean().backward()
        opt.step()
        torch.testing.assert_close(state.params["w"], w.detach(), rtol=1e-12, atol=1e-12)
        ours.mul_(0.5)
        theirs.mul_(0.5)
    ours.fill_(NAN)
    with pytest.raises(ValueError, match=r"^sgd: lr must be a float >= 0 .*the lr tensor holds nan at count 3$"):
        step(state, (x, y), (x[:2], y[:2]))


def test_a_schedule_object_that_takes_no_count_names_the_schedule() -> None:
    """A callable object whose ``__call__`` takes no count is judged at its first call: the message names the
    schedule, the count and what lr must be (it was Python's bare 'takes 1 positional argument')."""
    class Warmup:
        def __call__(self):
            return 0.1

    opt = ghostfunc.sgd(Warmup())
    with pytest.raises(TypeError, match=r"^sgd: the lr schedule .*Warmup.* raised at count 0 \(TypeError: .*\); lr must "
                                        r"be a float >= 0 or a callable count -> lr"):
        opt.lr(opt.init({}))


def _hand_written(precondition=None, lr=lambda state: 0.1) -> ghostfunc.Optimizer:
    base = ghostfunc.sgd(0.1)
    return ghostfunc.Optimizer(base.init, base.update, lr, precondition, "mine")


def test_a_hand_written_optimizer_without_precondition_is_refused_for_precondition_true() -> None:
    def model_fn(p, x):
        return (x @ p["w"]).pow(2).sum(1)

    with pytest.raises(TypeError, match=r"^train_step: precondition=True needs the optimizer's precondition\(direction, "
                                        r"grads, state\); mine's is None$"):
        ghostfunc.train_step(model_fn, _hand_written(), precondition=True)
    step = ghostfunc.train_step(model_fn, _hand_written(lr=lambda state: torch.tensor(0.25)))  # lr(state) a tensor
    x = torch.randn(4, 3, dtype=torch.float64)
    _, info = step(step.init({"w": torch.randn(3, 2, dtype=torch.float64)}), x, x[:2])
    assert type(info.lr) is float and info.lr == 0.25


@pytest.mark.parametrize("entry", ["graddot", "train_step.init", "inrun_shapley"])
def test_a_frozen_parameter_in_params_is_refused_naming_it(entry) -> None:
    """``dict(net.named_parameters())`` with a layer frozen: torch.optim does not train the frozen one, train_step
    did and valued it (h61: 9.3e-2 off torch.optim after a step, values 29% off). Its ``.detach()`` is taken."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    net[0].requires_grad_(False)
    params = dict(net.named_parameters())

    def model_fn(p, x):
        return torch.func.functional_call(net, p, (x,)).pow(2).sum(1)

    x = torch.randn(5, 3, dtype=torch.float64)
    call = {"graddot": lambda p: ghostfunc.graddot(model_fn, p, x, x[:2]),
            "train_step.init": lambda p: ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1)).init(p),
            "inrun_shapley": lambda p: ghostfunc.inrun_shapley(model_fn, p, x, x[:2], lr=0.1)}[entry]
    with pytest.raises(ValueError, match=rf"^{entry}: params\['0.weight'\] is a frozen nn.Parameter \(requires_grad="
                                         r"False\), which torch.optim would not train: leave it out of params"):
        call(params)
    call({k: v.detach() for k, v in params.items()})  # differentiated anyway, as asked
    call({k: v for k, v in params.items() if v.requires_grad})
