"""A bound method passed as ``model_fn`` (``graddot(model.loss, ...)``): every attribute access makes a new method
object, and each call started from nothing (checks, traces, the routing race: about 100x a call on a small MLP, and
``compile=True`` never compiled). Its entries are kept by its object and function now, for as long as the object
lives, and go with it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import ghostfunc
from ghostfunc import _bymodel, _capture, _compiled

F64 = torch.float64
NOTE = "compiled: the whole call as one torch.compile graph"


class Regressor(nn.Module):
    """A module whose ``loss`` method is the model_fn (rows ``(x, y)``, a squared error per row)."""

    def __init__(self, seed: int, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
        self.scale = scale

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.named_parameters()}

    def loss(self, params, batch):
        x, y = batch
        return (self.scale * functional_call(self.net, params, (x,)).squeeze(-1) - y) ** 2


class Slotted:
    """An object that cannot be weakly referenced (``__slots__`` without ``__weakref__``)."""

    __slots__ = ("net",)

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def loss(self, params, batch):
        x, y = batch
        return (functional_call(self.net, params, (x,)).squeeze(-1) - y) ** 2


def rows(seed: int, n: int = 9) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    return (x[:6], y[:6]), (x[6:], y[6:])


def exact(out: ghostfunc.GradDot, model_fn, params, train, val) -> None:
    scores = ghostfunc.reference_graddot(model_fn, params, train, val)[0]
    assert torch.allclose(out.scores, scores, rtol=1e-10, atol=1e-12 * scores.abs().max().item())


def test_equal_methods_share_one_key_for_as_long_as_their_object_lives() -> None:
    a, b = Regressor(0), Regressor(0)
    assert _bymodel.key_of(a.loss) is _bymodel.key_of(a.loss)
    assert _bymodel.key_of(a.loss) is not _bymodel.key_of(b.loss)
    assert _bymodel.key_of(a.loss) is not _bymodel.key_of(a.params)
    assert _bymodel.same_fn(a.loss, a.loss) and not _bymodel.same_fn(a.loss, b.loss)
    key = weakref.ref(_bymodel.key_of(a.loss))
    ident = id(a)
    del a
    gc.collect()
    assert key() is None and ident not in _bymodel._ANCHORS


def test_a_method_written_at_each_call_keeps_its_traces_and_compiles() -> None:
    """Before, every ``model.loss`` started over: the traces kept under the first method object went with it, and
    ``compile=True`` never reached its second call."""
    model = Regressor(1)
    params = model.params()
    train, val = rows(1)
    exact(ghostfunc.graddot(model.loss, params, train, val), model.loss, params, train, val)
    assert model.loss in _capture._TRACES
    notes = []
    for _ in range(3):
        out = ghostfunc.graddot(model.loss, params, train, val, compile=True)
        exact(out, model.loss, params, train, val)
        notes.append(out.plan.notes)
    assert NOTE in notes[-1]
    assert len(_compiled._STATE[model.loss]) == 1


def test_two_objects_of_one_class_alternated_each_keep_their_own_answers() -> None:
    """The same function on two objects (another scale) is two model_fns: neither is served the other's entries."""
    one, two = Regressor(2, scale=1.0), Regressor(2, scale=3.0)
    params = one.params()
    train, val = rows(2)
    for _ in range(3):
        for model in (one, two):
            for compile in (False, True):
                out = ghostfunc.graddot(model.loss, params, train, val, compile=compile)
                exact(out, model.loss, params, train, val)


def test_a_method_of_an_object_that_cannot_be_weakly_referenced_runs_exactly() -> None:
    model = Regressor(3)
    obj = Slotted(model.net)
    with pytest.raises(TypeError):
        weakref.ref(obj)
    assert _bymodel.key_of(obj.loss) is not _bymodel.key_of(obj.loss)  # (keyed by itself, as before)
    params = model.params()
    train, val = rows(3)
    for _ in range(2):
        exact(ghostfunc.graddot(obj.loss, params, train, val), obj.loss, params, train, val)


def _use_everything(model: Regressor) -> None:
    params = model.params()
    train, val = rows(4)
    for compile in (False, True, True, True):
        ghostfunc.graddot(model.loss, params, train, val, compile=compile)
    for order, curvature in ((1, "exact"), (2, "exact"), (2, "secant")):
        step = ghostfunc.train_step(model.loss, ghostfunc.sgd(0.1), order=order, curvature=curvature)
        state = step.init(params)
        for _ in range(2):
            state, _info = step(state, train, val)
    ghostfunc.inrun_shapley(model.loss, params, train, val, lr=0.1, order=2)
    x, y = train
    batches = [{"index": torch.arange(3), "x": x[:3], "y": y[:3]}, {"index": torch.arange(3, 6), "x": x[3:], "y": y[3:]}]

    def as_rows(p, b):
        return model.loss(p, (b["x"], b["y"]))

    ghostfunc.unroll(as_rows, ghostfunc.sgd(0.1), params, batches, {"x": val[0], "y": val[1]})


def test_what_is_kept_for_a_method_does_not_keep_its_object_alive() -> None:
    """The entries live as long as the object, so none of them may hold it: every path a method reaches, then the
    object dropped, is freed (and its key with it)."""
    def use() -> tuple[weakref.ref, int]:
        model = Regressor(4)
        _use_everything(model)
        return weakref.ref(model), id(model)

    ref, ident = use()
    gc.collect()
    assert ref() is None
    assert ident not in _bymodel._ANCHORS
