"""Models people write that once gave silent wrong numbers, and the refusals that replace the rest.

Each class has several variants of its own; every exact case is compared in float64
with :func:`ghostfunc.reference_graddot` (a loop of single-sample backward passes) for
every policy and ``val_reduce`` (scores, per-parameter parts, training gradient and
losses); every refusal is checked by its message.

- convolutions called on one unbatched sample at a time (``F.conv1d/2d`` on ``[C, *S]``);
- ``torch.compile``d modules and ``model_fn``s (each backend that runs on this CPU);
- ``F.embedding`` with ``scale_grad_by_freq`` (counted within each sample), ``max_norm`` and ``sparse``;
- losses in which samples interact: ``SamplesInteractError``, at every entry point;
- a ``model_fn`` that never uses ``params``; a partly unused ``params`` is fine;
- ``transformers.BatchEncoding`` batches; fresh tensors filled in place; BatchNorm in
  training mode in every variant.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import functools
import importlib
import math
import shutil
import sys
import types
import typing
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

import ghostfunc
from ghostfunc import SamplesInteractError, StateWrittenError

F64 = torch.float64
F32 = torch.float32
COMBOS = [(policy, reduce) for reduce in ("mean", "sum", None)
          for policy in ("auto", "2t2", "ghost", "materialize", "contract")
          if not (policy == "contract" and reduce is None)]

#: Worst relative error per class (``pytest -s`` prints it at the end of the module).
WORST: dict[str, float] = {}


def teardown_module() -> None:
    print("\ntest_reliability worst float64 relative error:", {k: f"{v:.1e}" for k, v in sorted(WORST.items())})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_exact(model_fn, params, train, val, cls: str, combos=COMBOS, tol: float = 1e-10, ref_fn=None) -> None:
    """graddot equals the single-sample loop for every (policy, val_reduce) in ``combos``.

    ``ref_fn``: the model the loop runs (default ``model_fn``; a compiled model's
    loop may run its eager twin).
    """
    refs = {}
    for policy, reduce in combos:
        if reduce not in refs:
            refs[reduce] = ghostfunc.reference_graddot(ref_fn or model_fn, params, train, val, val_reduce=reduce)
        scores, per_param, grad = refs[reduce]
        out = ghostfunc.graddot(model_fn, params, train, val, val_reduce=reduce, policy=policy)
        errs = [rel(out.scores, scores)]
        errs += [rel(out.per_param[k], per_param[k]) for k in params if per_param[k].abs().max() > 0]
        errs += [rel(out.train_grad[k], grad[k]) for k in params if grad[k].abs().max() > 0]
        worst = max(errs)
        WORST[cls] = max(WORST.get(cls, 0.0), worst)
        assert worst < tol, f"{cls}: policy={policy} val_reduce={reduce}: relative error {worst:.2e}"
        for k in params:
            if grad[k].abs().max() == 0:
                assert out.train_grad[k].abs().max() == 0 and out.per_param[k].abs().max() == 0, k
        assert out.train_loss.shape == (len(out.scores),)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 1. convolutions on one unbatched sample ---------------------------------------------------------------

CONVS = {  # name: (conv, C_in, C_out, kernel, input spatial, bias, stride, padding, dilation)
    "2d H_out==C_out": (F.conv2d, 3, 5, (3, 3), (7, 6), True, 1, 0, 1),  # out [5, 5, 4]
    "2d stride2 pad1": (F.conv2d, 2, 3, (3, 2), (6, 5), True, 2, 1, 1),
    "2d no bias dilation2": (F.conv2d, 2, 4, (2, 2), (6, 6), False, 1, 1, 2),
    "1d L_out==C_out": (F.conv1d, 3, 4, (3,), (6,), True, 1, 0, 1),  # out [4, 4]
    "1d stride2 pad1 dil2": (F.conv1d, 2, 3, (3,), (9,), True, 2, 1, 2),
    "1d no bias": (F.conv1d, 3, 2, (2,), (5,), False, 1, 0, 1),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_on_one_unbatched_sample(name):
    conv, c_in, c_out, kernel, spatial, bias, stride, padding, dilation = CONVS[name]
    g = _g(1)
    p = {"W": torch.randn(c_out, c_in, *kernel, generator=g, dtype=F64) / 3}
    if bias:
        p["b"] = torch.randn(c_out, generator=g, dtype=F64) / 3

    def model_fn(p, x):  # a Python loop over the batch, each conv on [C, *S]
        h = torch.stack([conv(xi, p["W"], p.get("b"), stride, padding, dilation) for xi in x.unbind(0)])
        return torch.tanh(h).pow(2).flatten(1).sum(1) + h.flatten(1)[:, 0]

    train, val = torch.randn(4, c_in, *spatial, generator=g, dtype=F64), torch.randn(3, c_in, *spatial, generator=g,
                                                                                      dtype=F64)
    assert_exact(model_fn, p, train, val, "conv unbatched")


def test_conv_module_on_unbatched_input_next_to_a_batched_one():
    torch.manual_seed(0)
    net = nn.ModuleDict({"a": nn.Conv2d(2, 3, 3, padding=1), "b": nn.Conv1d(3, 3, 2)}).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):  # x [B, 2, 4, 4]: conv2d per sample (unbatched), then conv1d on the batch
        h = torch.stack([functional_call(net["a"], {k[2:]: v for k, v in p.items() if k.startswith("a.")}, (xi,))
                         for xi in x])  # [B, 3, 4, 4]
        h = functional_call(net["b"], {k[2:]: v for k, v in p.items() if k.startswith("b.")}, (h.flatten(2),))
        return torch.tanh(h).sum((1, 2))

    g = _g(2)
    assert_exact(model_fn, p, torch.randn(3, 2, 4, 4, generator=g, dtype=F64),
                 torch.randn(2, 2, 4, 4, generator=g, dtype=F64), "conv unbatched")


# --- 2. torch.compile ----------------------------------------------------------------------------------------

BACKENDS = ["eager", "aot_eager"] + (["inductor"] if shutil.which("cc") or shutil.which("gcc") else [])


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _xy(n: int, seed: int):
    g = _g(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module(backend):
    net = _mlp(0)
    compiled = torch.compile(net, backend=backend)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(compiled, p, (x,)), y, reduction="none")

    def eager_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    train, val = _xy(5, 1), _xy(3, 2)
    compiled(train[0])  # compiled (and its graphs cached) before ghostfunc sees it
    combos = COMBOS if backend != "inductor" else [("auto", "mean"), ("ghost", None), ("contract", "sum")]
    assert_exact(model_fn, p, train, val, "torch.compile", combos, ref_fn=eager_fn if backend == "inductor" else None)
    assert str(ghostfunc.plan(model_fn, p, train, val)).count("ghost") + 1  # plan runs on the compiled model too


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_fn(backend):
    net = _mlp(3)
    p = {k: v.detach() for k, v in net.named_parameters()}

    @torch.compile(backend=backend)
    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    train, val = _xy(4, 4), _xy(3, 5)
    model_fn(p, train)
    assert_exact(model_fn, p, train, val, "torch.compile", [c for c in COMBOS if c[0] in ("auto", "ghost", "contract")])


# --- 3. embeddings: scale_grad_by_freq and sparse -------------------------------------------------------------


def _ids(n: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=_g(seed))  # vocab < t: every sample repeats ids


def _emb_params(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = _g(seed)
    return {"E": torch.randn(vocab, 3, generator=g, dtype=F64), "w": torch.randn(3, generator=g, dtype=F64)}


@pytest.mark.parametrize("by_freq, sparse, padding_idx, max_norm", [
    (True, False, None, None), (True, False, 2, None), (False, True, None, None), (False, True, -1, None),
    (False, False, None, 1.5), (True, False, 0, 1.0), (False, True, None, 2.0)])
def test_embedding_by_freq_sparse_max_norm(by_freq, sparse, padding_idx, max_norm):
    # (torch itself refuses scale_grad_by_freq together with sparse gradients)
    def model_fn(p, ids):
        h = F.embedding(ids, p["E"], padding_idx, max_norm, scale_grad_by_freq=by_freq, sparse=sparse)  # [B, T, 3]
        return torch.tanh(h @ p["w"]).pow(2).sum(1)

    p = _emb_params(5, 0)
    before = p["E"].clone()
    assert_exact(model_fn, p, _ids(4, 7, 5, 1), _ids(3, 6, 5, 2), "embedding")
    assert torch.equal(p["E"], before)  # max_norm renormalises the looked-up rows, never the caller's weight


def test_a_max_norm_lookup_behind_dropout_leaves_the_callers_table_alone():
    """A model that draws (dropout) is run plainly on its first call to compare its losses: that run renormalised
    the caller's table in place where max_norm looked rows up (the capture never does: it renormalises a copy)."""
    def model_fn(p, ids):
        h = F.dropout(F.embedding(ids, p["E"], max_norm=0.5), 0.2, True)
        return torch.tanh(h @ p["w"]).pow(2).sum(1)

    p = _emb_params(5, 0)
    before = p["E"].clone()
    assert (before.norm(dim=1) > 0.5).any()
    ghostfunc.graddot(model_fn, p, _ids(4, 7, 5, 1), _ids(3, 6, 5, 2))
    assert torch.equal(p["E"], before)


@pytest.mark.parametrize("padding_idx", [0, 2, -1])
@pytest.mark.parametrize("other_use", ["penalty", "sliced tied head"])
def test_a_padded_lookup_of_a_table_on_the_fallback_is_exact(padding_idx, other_use):
    """A table looked up with ``padding_idx`` and used by a call with no rule (so on the per-sample fallback, its
    weight batched under ``vmap``): torch's backward there masked the padding row of the first sample only, and the
    other samples' padding lookups reached it (2.6e-3 off the loop, ``graddot_direction`` 0.39 off)."""
    def model_fn(p, ids):
        h = F.embedding(ids, p["E"], padding_idx=padding_idx).mean(1)  # [B, 3]
        extra = p["E"].pow(2).sum() * 1e-2 if other_use == "penalty" else (h @ p["E"][:2].T).sum(1)
        return torch.tanh(h @ p["w"]).pow(2) + extra

    p = _emb_params(5, 56)
    train, val = _ids(4, 7, 5, 57), _ids(3, 6, 5, 58)
    train[:, 0] = val[:, 0] = padding_idx % 5  # every sample looks the padding row up
    assert_exact(model_fn, p, train, val, "embedding", [c for c in COMBOS if c[0] in ("auto", "ghost")])
    direction = {k: torch.randn(v.shape, generator=_g(59), dtype=F64) for k, v in p.items()}

    def dot(i: int) -> torch.Tensor:  # <g_i, direction> by one backward of sample i alone
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        grads = torch.autograd.grad(model_fn(q, train[i:i + 1]).sum(), list(q.values()))
        return sum((g * direction[k]).sum() for k, g in zip(q, grads, strict=True))

    loop = torch.stack([dot(i) for i in range(len(train))])
    assert rel(ghostfunc.graddot_direction(model_fn, p, train, direction).scores, loop) < 1e-12


MAX_NORM_REUSES = {  # a max_norm lookup, then another use of the table: torch reads the rows renormalised in place
    "tied head on the parameter": lambda p, ids: F.linear(F.embedding(ids, p["E"], max_norm=0.5).mean(1), p["E"]),
    "tied head on a copy": lambda p, ids: (lambda E: F.linear(F.embedding(ids, E, max_norm=0.5).mean(1), E))(
        p["E"] * 1.0),
    "bag, then the transpose": lambda p, ids: F.embedding_bag(ids, p["E"], max_norm=0.5) @ p["E"].T,
    "a view looked up, the whole table used": lambda p, ids: (
        F.embedding(ids, p["E"][:5], max_norm=0.5).sum(1) + p["E"].sum(0)),
    "a lookup without max_norm after": lambda p, ids: (
        F.embedding(ids, p["E"], max_norm=0.5) + F.embedding(ids.flip(1), p["E"])).sum(1),
}


@pytest.mark.parametrize("name", MAX_NORM_REUSES)
def test_a_table_used_again_after_a_max_norm_lookup_is_refused(name):
    """The rows torch renormalised in place for one sample's lookup are what another sample's use of the table
    reads: refused by name (the capture renormalises only what it looks up, and never writes the table)."""
    use = MAX_NORM_REUSES[name]

    def model_fn(p, ids):
        return torch.tanh(use(p, ids)).pow(2).flatten(1).sum(1)

    p = {**_emb_params(5, 21), "E": 2 * torch.randn(5, 3, generator=_g(22), dtype=F64)}
    with pytest.raises(SamplesInteractError, match=r"^graddot: .*with max_norm=0.5 renormalises the rows it looks up "
                                                   r"in .* in place, and model_fn then uses that table again"):
        ghostfunc.graddot(model_fn, p, _ids(4, 6, 5, 23), _ids(3, 6, 5, 24))


def test_max_norm_lookups_that_agree_and_shape_reads_are_exact():
    """Two lookups with the same max_norm renormalise the same rows the same way, and reading the table's shape
    reads no rows: exact, the table never written."""
    def model_fn(p, ids):
        a = F.embedding(ids, p["E"], max_norm=0.5)
        b = F.embedding(ids.flip(1), p["E"], None, 0.5)
        scale = 1.0 / p["E"].shape[0] + p["E"].size(1)
        return torch.tanh((a * b) @ p["w"] * scale).pow(2).sum(1)

    p = {**_emb_params(5, 25), "E": 2 * torch.randn(5, 3, generator=_g(26), dtype=F64)}
    before = p["E"].clone()
    assert_exact(model_fn, p, _ids(4, 6, 5, 27), _ids(3, 6, 5, 28), "embedding")
    assert torch.equal(p["E"], before)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_with_max_norm_is_exact_and_leaves_the_table(mode):
    """torch renormalises the looked-up rows in place; the capture reads them renormalised without writing (the
    rows ``max`` picks are those of the renormalised table, as in torch)."""
    def model_fn(p, ids):
        weights = torch.linspace(0.5, 1.5, ids.shape[-1], dtype=F64).expand(ids.shape) if mode == "sum" else None
        h = F.embedding_bag(ids, p["E"], max_norm=1.0, mode=mode, per_sample_weights=weights)  # [B, 3]
        return torch.tanh(h @ p["w"]).pow(2)

    p = {**_emb_params(5, 29), "E": 2 * torch.randn(5, 3, generator=_g(30), dtype=F64)}
    before = p["E"].clone()
    assert_exact(model_fn, p, _ids(4, 6, 5, 31), _ids(3, 6, 5, 32), "embedding",
                 [c for c in COMBOS if c[0] in ("auto", "ghost")])
    assert torch.equal(p["E"], before)


def test_order_2_through_a_max_norm_bag_names_the_missing_second_derivative():
    """torch has no second derivative of embedding_bag's backward: order 2 (exact) says so and what works instead
    (it was reported as samples interacting: the check took the caller's own backward for a use of the table);
    the secant, of first derivatives only, runs."""
    def model_fn(p, ids):
        return torch.tanh(F.embedding_bag(ids, p["E"], max_norm=1.0, mode="mean") @ p["w"]).pow(2)

    p = {**_emb_params(5, 33), "E": 2 * torch.randn(5, 3, generator=_g(34), dtype=F64)}
    train, val = _ids(4, 6, 5, 35), _ids(3, 6, 5, 36)
    with pytest.raises(NotImplementedError, match=r"^inrun_shapley: order 2 with curvature='exact' differentiates "
                                                  r"model_fn twice.*_embedding_bag_backward.*curvature='secant'"):
        ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2)
    assert torch.isfinite(ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2, curvature="secant")).all()


@pytest.mark.parametrize("call", ["graddot", "train_step", "secant"])
def test_a_sparse_embedding_bag_is_exact(call):
    """``F.embedding_bag(..., sparse=True)``: its gradients come sparse, and summing them into the batch's rows
    raised ``TypeError: Cannot assign to a sparse tensor`` (the secant: ``reshape is not implemented for sparse
    tensors``); they are made dense, as the loop's are. ``unroll`` names the second derivative torch lacks."""
    def model_fn(p, ids):
        return torch.tanh(F.embedding_bag(ids, p["E"], mode="mean", sparse=True) @ p["w"]).pow(2)

    p = _emb_params(5, 49)
    train, val = _ids(4, 6, 5, 50), _ids(3, 6, 5, 51)
    if call == "graddot":
        out = ghostfunc.graddot(model_fn, p, train, val)
        assert rel(out.scores, ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-12
        assert all(g.layout is torch.strided for g in out.train_grad.values())
    elif call == "train_step":
        step = ghostfunc.train_step(model_fn, ghostfunc.adamw(0.1))
        state, info = step(step.init(p), train, val)
        assert rel(info.values, ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1)) < 1e-12
        assert all(v.layout is torch.strided for v in state.params.values())
    else:
        values = ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2, curvature="secant")
        dense = ghostfunc.inrun_shapley(lambda q, ids: torch.tanh(F.embedding_bag(ids, q["E"], mode="mean")
                                                                  @ q["w"]).pow(2), p, train, val, lr=0.1, order=2,
                                        curvature="secant")
        assert rel(values, dense) < 1e-12
        batches = [(ids, torch.arange(4) + 4 * t) for t, ids in enumerate((train, _ids(4, 6, 5, 52)))]
        with pytest.raises(NotImplementedError, match=r"^unroll: the replay differentiates each step's gradient.*"
                                                      r"no second derivative.*F\.embedding and a sum or mean"):
            ghostfunc.unroll(lambda q, b: model_fn(q, b["x"]), ghostfunc.sgd(0.1), p,
                             [{"x": ids, "index": i} for ids, i in batches], {"x": val})


def test_embedding_bag_by_freq():
    def model_fn(p, ids):  # no rule for embedding_bag: the fallback, exact per sample
        return torch.tanh(F.embedding_bag(ids, p["E"], mode="sum", scale_grad_by_freq=True) @ p["w"])

    assert_exact(model_fn, _emb_params(5, 8), _ids(4, 6, 5, 9), _ids(2, 6, 5, 10), "embedding",
                 [c for c in COMBOS if c[0] in ("auto", "ghost")])


def test_embedding_module_by_freq_with_padding_idx_tied_head():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, padding_idx=0, scale_grad_by_freq=True).to(F64)
    p = {"emb.weight": emb.weight.detach().clone()}

    def model_fn(p, ids):  # the embedding is tied to the output layer: two uses, cross terms included
        h = functional_call(emb, {"weight": p["emb.weight"]}, (ids,))  # [B, T, 4]
        logits = F.linear(torch.tanh(h), p["emb.weight"])  # [B, T, 6]
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(1, 1).flatten(), reduction="none").view(len(ids), -1).sum(1)

    assert_exact(model_fn, p, _ids(4, 6, 6, 3), _ids(2, 5, 6, 4), "embedding")


TRANSPOSED_HEADS = {  # a tied output layer written by hand: the embedding's transpose as a matmul's right operand
    "x @ E.T": lambda h, E: h @ E.T,
    "x @ E.mT": lambda h, E: h @ E.mT,
    "x @ E.t()": lambda h, E: h @ E.t(),
    "torch.matmul(x, torch.t(E))": lambda h, E: torch.matmul(h, torch.t(E)),
    "x.matmul(E.transpose(0, 1))": lambda h, E: h.matmul(E.transpose(0, 1)),
    "x @ torch.transpose(E, -1, -2)": lambda h, E: h @ torch.transpose(E, -1, -2),
    "x @ E.transpose(dim0=1, dim1=0)": lambda h, E: h @ E.transpose(dim0=1, dim1=0),
    # torch.mm takes 2-D operands: the tokens as rows, then back (not recognised before: the fallback, h100)
    "torch.mm(x, E.t())": lambda h, E: torch.mm(h.reshape(-1, h.shape[-1]), E.t()).reshape(*h.shape[:-1], -1),
    "x.mm(E.T)": lambda h, E: h.reshape(-1, h.shape[-1]).mm(E.T).reshape(*h.shape[:-1], -1),
}


def _tied_by_hand(head):
    def model_fn(p, ids):
        h = torch.tanh(F.embedding(ids, p["E"]) @ p["W"])  # [B, T, 3]
        return torch.logsumexp(head(h, p["E"]), -1).sum(1)

    g = _g(5)
    return model_fn, {"E": torch.randn(4, 3, generator=g, dtype=F64), "W": torch.randn(3, 3, generator=g, dtype=F64)}


@pytest.mark.parametrize("spelling", list(TRANSPOSED_HEADS))
def test_a_matmul_by_a_transposed_weight_is_a_linear_call(spelling):
    """``x @ E.T`` is ``F.linear(x, E)``: E's two uses (the embedding and the head) both recognised, exact."""
    model_fn, p = _tied_by_hand(TRANSPOSED_HEADS[spelling])
    train, val = _ids(3, 6, 4, 6), _ids(2, 6, 4, 7)
    assert_exact(model_fn, p, train, val, "embedding")
    route = ghostfunc.plan(model_fn, p, train, val).routes["E"]
    assert route.factored and route.uses == ("embedding", "linear"), route


@pytest.mark.parametrize("spelling", ["torch.mm(x, W)", "x.mm(W)"])
def test_a_2d_matmul_by_a_weight_stored_in_by_out_is_recognised(spelling):
    """``torch.mm(x, W)`` with ``W`` ``[in, out]``: the matmul rule, as ``x @ W`` (it took the fallback, h100)."""
    g = _g(6)
    p = {"W": torch.randn(5, 4, generator=g, dtype=F64) / 2, "V": torch.randn(4, 3, generator=g, dtype=F64) / 2}

    def model_fn(p, batch):
        x, y = batch
        h = torch.tanh(torch.mm(x, p["W"]) if spelling.startswith("torch") else x.mm(p["W"]))
        return F.cross_entropy(h.mm(p["V"]), y, reduction="none")

    data = (torch.randn(9, 5, generator=g, dtype=F64), torch.randint(0, 3, (9,), generator=g))
    train, val = tuple(t[:6] for t in data), tuple(t[6:] for t in data)
    assert_exact(model_fn, p, train, val, "matmul")
    routes = ghostfunc.plan(model_fn, p, train, val).routes
    assert all(r.factored and r.uses == ("matmul",) for r in routes.values()), routes


@pytest.mark.parametrize("other", ["penalty", "linear of the transpose", "left operand", "a slice of the view"])
def test_a_transposed_weight_used_otherwise_takes_the_fallback(other):
    """The transpose used by a call no rule knows (or as a linear layer's weight, which would be the
    transpose's gradient): the parameter takes the exact per-sample fallback, and the plan names the call."""
    def head(h, E):
        if other == "penalty":
            return h @ E.T + 0.1 * E.T.pow(2).sum()
        if other == "linear of the transpose":
            return F.linear(h, E.T.T)
        if other == "left operand":  # (E.T.T @ h^T)^T = h @ E.T
            return (E.T.T @ h.transpose(-1, -2)).transpose(-1, -2)
        return h @ E.T[:, :4]

    model_fn, p = _tied_by_hand(head)
    train, val = _ids(3, 6, 4, 6), _ids(2, 6, 4, 7)
    assert_exact(model_fn, p, train, val, "embedding")
    route = ghostfunc.plan(model_fn, p, train, val).routes["E"]
    assert route.path == "fallback" and route.reason.startswith("used by "), route


def test_embedding_by_freq_on_the_fallback():
    # E also used by an op no rule knows (a row-norm penalty): E takes the per-sample fallback
    def model_fn(p, ids):
        h = F.embedding(ids, p["E"], scale_grad_by_freq=True)
        return torch.tanh(h @ p["w"]).sum(1) + 0.1 * torch.linalg.vector_norm(p["E"][ids], dim=-1).sum(1)

    p = _emb_params(4, 5)
    assert_exact(model_fn, p, _ids(3, 6, 4, 6), _ids(3, 6, 4, 7), "embedding")
    assert ghostfunc.plan(model_fn, p, _ids(3, 6, 4, 6), _ids(3, 6, 4, 7)).routes["E"].path == "fallback"


BY_FREQ_LOOKUPS = {  # each way to look up a table with scale_grad_by_freq: (h [B, ·, 3] from ids, the table's name)
    "F.embedding": lambda p, ids: F.embedding(ids, p["E"], scale_grad_by_freq=True),
    "torch.embedding": lambda p, ids: torch.embedding(p["E"], ids, -1, True),
    "F.embedding_bag": lambda p, ids: F.embedding_bag(ids, p["E"], mode="mean", scale_grad_by_freq=True)[:, None],
    "a view of the table": lambda p, ids: F.embedding(ids, p["E"].view(-1, 3), scale_grad_by_freq=True),
}


class _NoWeakref:
    """A callable ``model_fn`` that cannot be weakly referenced (checked on every call, nothing kept)."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, p, ids):
        return self.fn(p, ids)


@pytest.mark.parametrize("lookup", list(BY_FREQ_LOOKUPS))
@pytest.mark.parametrize("weakref_able", [True, False])
def test_train_step_refuses_a_trained_table_counted_by_frequency(lookup, weakref_able):
    """A batch's backward counts each id over the whole batch, a sample's over its own ids: the mean of the
    samples' gradients is not the batch gradient torch.optim steps with (the trajectory would differ, by 10% of
    the gradient here). train_step refuses it by name; graddot keeps the per-sample values and notes it."""
    def model_fn(p, ids):
        return torch.tanh(BY_FREQ_LOOKUPS[lookup](p, ids) @ p["w"]).pow(2).sum(1)

    fn = model_fn if weakref_able else _NoWeakref(model_fn)
    p, train, val = _emb_params(5, 11), _ids(4, 7, 5, 12), _ids(2, 7, 5, 13)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    model_fn(leaves, train).mean().backward()  # what torch.optim would step with
    out = ghostfunc.graddot(fn, p, train, val)
    assert not torch.allclose(out.train_grad["E"], leaves["E"].grad)  # the interaction is real
    train_grad = ghostfunc.reference_graddot(model_fn, p, train, val)[2]
    torch.testing.assert_close(out.train_grad["E"], train_grad["E"])  # the samples' own gradients, as the loop
    assert any("scale_grad_by_freq on E:" in note and "not torch's batch gradient" in note for note in out.plan.notes)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.1))
    with pytest.raises(SamplesInteractError, match=r"^train_step: E is looked up with scale_grad_by_freq=True.*"
                                                   r"torch\.optim step uses is not the mean"):
        step(step.init(p), train, val)
    ghostfunc.inrun_shapley(fn, p, train, val, lr=0.1)  # values per sample: defined by the samples' own gradients


def test_a_frozen_table_counted_by_frequency_trains_as_torch_optim():
    """The count only scales the table's own gradient: a table outside params changes no trained gradient, so
    train_step runs and follows torch.optim."""
    table = torch.randn(5, 3, generator=_g(14), dtype=F64)

    def model_fn(p, ids):
        return torch.tanh(F.embedding(ids, table, scale_grad_by_freq=True) @ p["w"]).pow(2).sum(1)

    p, train, val = {"w": torch.randn(3, generator=_g(15), dtype=F64)}, _ids(4, 7, 5, 16), _ids(2, 7, 5, 17)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    state, _ = step(step.init(p), train, val)
    w = p["w"].clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.1)
    model_fn({"w": w}, train).mean().backward()
    opt.step()
    torch.testing.assert_close(state.params["w"], w.detach())
    assert not any("scale_grad_by_freq" in note for note in ghostfunc.graddot(model_fn, p, train, val).plan.notes)


# --- 4. samples that interact: refused at every entry point ---------------------------------------------------


def _lin(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"W": torch.randn(4, 3, generator=_g(seed), dtype=F64)}


def infonce(p, x):  # in-batch negatives
    z = F.normalize(x @ p["W"].T, dim=-1)
    return F.cross_entropy(z @ z.T / 0.5, torch.arange(len(x)), reduction="none")


def baseline(p, x):  # a batch-mean baseline
    loss = (x @ p["W"].T).pow(2).sum(1)
    return loss - loss.mean()


def reweight(p, x):  # softmax weights across the batch
    loss = torch.tanh(x @ p["W"].T).pow(2).sum(1)
    return len(x) * torch.softmax(loss.detach(), 0) * loss


def batch_center(p, x):  # normalisation with batch statistics written out by hand
    h = x @ p["W"].T
    return ((h - h.mean(0)) / (h.std(0) + 1)).pow(2).sum(1)


def shared_buffer(p, x):  # every sample added into one weight-shaped buffer
    h = torch.zeros_like(p["W"])  # [4, 3]
    h.index_add_(0, torch.zeros(len(x), dtype=torch.long), x)
    return F.linear(x, p["W"] + h).pow(2).sum(1)


INTERACT = {"infonce": infonce, "baseline": baseline, "reweight": reweight, "batch_center": batch_center,
            "shared_buffer": shared_buffer}


@pytest.mark.parametrize("name", list(INTERACT))
def test_samples_interact_refused(name):
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the first 3 "
                                                   r"train samples together, the losses of \d of them differ"):
        ghostfunc.graddot(INTERACT[name], _lin(), x, xv)


@pytest.mark.parametrize("name", list(INTERACT))
def test_samples_interact_seen_past_identical_leading_samples(name):
    """The first samples are copies of one (a coupling through the batch is invisible among them): the
    check compares samples that differ, and names their rows; a batch of copies only is not vouched for."""
    x, xv = torch.randn(7, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    x[1:4] = x[0]
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on 3 distinct "
                                                   r"train samples \(rows 0, 4, 5\) together"):
        ghostfunc.graddot(INTERACT[name], _lin(), x, xv)
    same = x[:1].repeat(6, 1)  # nothing to compare on copies: not cached, so the next batch is checked
    assert (ghostfunc.graddot(baseline, _lin(), same, same).scores == 0).all()  # each alone: loss - loss
    with pytest.raises(SamplesInteractError):
        ghostfunc.graddot(baseline, _lin(), x[3:], xv)


def test_float64_losses_of_a_float32_model_are_compared_at_float32_rounding():
    """Batched and single-sample float32 kernels round differently; the losses taken to float64 at the end
    must not make that look like an interaction."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(net, p, (x,)).double(), y, reduction="none")

    g = torch.Generator().manual_seed(1)
    train = (100 * torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g))
    val = (100 * torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
    out = ghostfunc.graddot(model_fn, params, train, val)
    ref, _, _ = ghostfunc.reference_graddot(model_fn, params, train, val)
    assert ((out.scores - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_a_float32_layer_inside_a_float64_model_is_compared_at_float32_rounding():
    """Hand-rolled mixed precision (one layer cast to float32 and back): the check's rounding is that of the
    coarsest dtype any call computed in, not of the float64 parameters, inputs and losses (these draws were
    refused: 9.3e-8 apart batched and alone, float64 rounding allowed 4.0e-8)."""
    torch.manual_seed(0)
    train = (torch.randn(7, 5, dtype=F64), torch.randint(0, 3, (7,)))
    val = (torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,)))
    p = {"W": torch.randn(6, 5, dtype=F64) * .5, "b": torch.randn(6, dtype=F64) * .5,
         "V": torch.randn(3, 6, dtype=F64) * .5}

    def model_fn(p, batch):
        x, y = batch
        h = torch.tanh(F.linear(x.float(), p["W"].float(), p["b"].float()).double())
        return F.cross_entropy(F.linear(h, p["V"]), y, reduction="none")

    out = ghostfunc.graddot(model_fn, p, train, val)
    ref, _, _ = ghostfunc.reference_graddot(model_fn, p, train, val)
    assert rel(out.scores, ref) < 1e-5


@pytest.mark.parametrize("name", list(INTERACT))
@pytest.mark.parametrize("drop", ["F.dropout", "nn.Dropout", "sdpa dropout_p"])
def test_samples_interact_refused_in_a_model_that_drops_out(name, drop):
    """A model in training mode draws other dropout masks for three rows than for each alone, so the interaction
    check compared nothing and a batch mean behind dropout passed with a note blaming the masks (the scores 0.6
    off the loop, every step). The check runs the model with dropout drawing nothing, as in eval mode."""
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    layer = nn.Dropout(0.3)

    def model_fn(p, x):
        if drop == "F.dropout":
            x = F.dropout(x, 0.3, True)
        elif drop == "nn.Dropout":
            x = layer(x)
        else:  # attention over each sample's three features, dropped inside the fused call
            a = x.unsqueeze(-1)
            x = x + F.scaled_dot_product_attention(a, a, a, dropout_p=0.3).squeeze(-1)
        return INTERACT[name](p, x)

    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the first 3 "
                                                   r"train samples together"):
        ghostfunc.graddot(model_fn, _lin(), x, xv)


#: Random draws a model makes in its forward, each per-sample and the same per sample batched or alone in
#: distribution: ``noise(x [B, 3]) -> [B, 3]``.
NOISE = {
    "randn_like": lambda x: x + 0.1 * torch.randn_like(x),
    "randn(B, 3)": lambda x: x + 0.1 * torch.randn(x.shape[0], 3, dtype=x.dtype),
    "rand with generator": lambda x: x * torch.rand(x.shape, generator=torch.Generator().manual_seed(0),
                                                    dtype=x.dtype),
    "normal(mean, std)": lambda x: torch.normal(x, 0.1),
    "normal_ in place": lambda x: x + torch.empty_like(x).normal_(0.0, 0.1),
    "uniform_ and exponential_": lambda x: x * torch.empty_like(x).uniform_(0.5, 1.5) * torch.empty_like(
        x).exponential_(2.0),
    "bernoulli": lambda x: x * torch.bernoulli(torch.full_like(x, 0.7)),
    "randint": lambda x: x + torch.randint(0, 3, x.shape).to(x.dtype),
    "gumbel_softmax": lambda x: x * F.gumbel_softmax(x, tau=0.5, hard=True),
    "multinomial": lambda x: x.gather(1, torch.multinomial(x.softmax(1), 2)).repeat(1, 2)[:, :3],
    "randperm of features": lambda x: x[:, torch.randperm(3)],
    "dropout and randn_like": lambda x: F.dropout(x, 0.3, True) + 0.1 * torch.randn_like(x),
    "unit-norm noise": lambda x: x + 0.1 * F.normalize(torch.randn_like(x), dim=-1),  # (0/0 at a zero stand-in)
    "Beta weights": lambda x: x * torch.distributions.Beta(2.0, 2.0).sample((x.shape[0], 1)).to(x.dtype),
    "binomial": lambda x: x + torch.binomial(torch.full_like(x, 3.0), torch.full_like(x, 0.4)),
    "numpy noise": lambda x: x + 0.1 * torch.from_numpy(np.random.randn(*x.shape)).to(x.dtype),
    "numpy scale and shift": lambda x: x * torch.from_numpy(np.random.rand(x.shape[0], 1) + 0.5).to(x.dtype)
    + torch.from_numpy(np.random.randn(x.shape[0], 1)).to(x.dtype),  # (two draws: the second starts elsewhere)
    "numpy feature-major noise": lambda x: x + torch.from_numpy(np.random.randn(x.shape[1], x.shape[0])).T.to(x.dtype),
    "Poisson counts": lambda x: x + torch.distributions.Poisson(torch.full_like(x[:, 0], 2.0)).sample().unsqueeze(1),
}

#: Couplings through a random draw itself: ``x -> [B, 3]``, each sample's row mixed with another's.
DRAWN_COUPLINGS = {
    "mixup by randperm": lambda x: 0.7 * x + 0.3 * x[torch.randperm(x.shape[0])],
    "noise scaled by the batch mean": lambda x: x + torch.randn_like(x) * x.mean(0),
    "mixup weight from numpy": lambda x: (lambda lam: lam * x + (1 - lam) * x.roll(1, 0))(float(np.random.beta(2, 2))),
    "REINFORCE over a batch mean": lambda x: (lambda h, d: h + d.log_prob(d.sample()).unsqueeze(1))(
        x - x.mean(0), torch.distributions.Bernoulli(probs=torch.sigmoid(x[:, 0]))),  # (log_prob validates)
}


@pytest.mark.parametrize("name", ["baseline", "batch_center", "reweight"])
@pytest.mark.parametrize("noise", list(NOISE))
def test_samples_interact_refused_in_a_model_that_draws_random_numbers(name, noise):
    """A model that draws random numbers (noise beside dropout, a random op of its own) draws others for three
    rows than for each alone, so the interaction check compared nothing and a batch mean behind the draws
    passed with a note blaming the dropout masks (the scores of another loss, every step). The checks run every
    draw as its mean (or a fixed choice of indices): each sample is then the same function batched or alone."""
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)

    def model_fn(p, x):
        return INTERACT[name](p, NOISE[noise](x))

    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the first 3 "
                                                   r"train samples together"):
        ghostfunc.graddot(model_fn, _lin(), x, xv)


def test_a_loss_finite_only_together_is_told_so_not_as_a_zero_difference():
    """A batch statistic that one sample cannot make (a standard deviation over the batch): the losses are finite
    together and not alone, and the message said ``largest finite difference 0, rounding allows 2.23e-308``."""
    def model_fn(p, x):
        h = x @ p["W"].T
        return (h - h.mean(0)).pow(2).sum(1) / h.std(0).sum()

    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"a loss finite one way and not the other") as err:
        ghostfunc.graddot(model_fn, _lin(), x, xv)
    assert "largest finite difference" not in str(err.value)


@pytest.mark.parametrize("coupling", list(DRAWN_COUPLINGS))
def test_a_coupling_through_a_random_draw_is_refused(coupling):
    """Couplings made by the draw (mixup partners from ``randperm``, zero-mean noise times a batch statistic, a
    mixup weight from NumPy): the checks' stand-ins were the identity permutation and zero, which hid them, and a
    NumPy draw was not seen at all. The stand-ins are a reversed permutation and half a standard deviation; with
    NumPy's or Python's generator drawing, the first sample alone starts from the batch's state."""
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)

    def model_fn(p, x):
        return (DRAWN_COUPLINGS[coupling](x) @ p["W"].T).tanh().pow(2).sum(1)

    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the first 3 "
                                                   r"train samples together"):
        ghostfunc.graddot(model_fn, _lin(), x, xv)


def test_draws_from_numpy_or_python_generators_are_noted_and_left_alone_by_the_checks():
    """A model drawing from NumPy's and Python's global generators: under vmap one draw serves every sample, which
    is not a plain call's draws, and nothing said so (the plan says it now); the checks' runs draw from forks of
    those generators, so they leave a training loop's later draws as they were."""
    import random

    from ghostfunc._capture import split_batch
    from ghostfunc._interact import check_model

    def model_fn(p, x):
        noise = torch.from_numpy(np.random.randn(*x.shape)).to(x.dtype) * random.random()
        return ((x + 0.1 * noise) @ p["W"].T).tanh().pow(2).sum(1)

    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    before = (np.random.get_state()[1].copy(), random.getstate())
    check_model(model_fn, _lin(), (split_batch(x), split_batch(xv)), "graddot")
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    for _ in range(2):
        assert ghostfunc._graddot.HOST_DRAWS in ghostfunc.graddot(model_fn, _lin(), x, xv).plan.notes

    class Noisy(nn.Module):  # such draws switched on by a module's setting after a first call (SpecAugment's prob)
        def __init__(self):
            super().__init__()
            self.noise = 0.0

        def forward(self, x):
            return x + torch.from_numpy(np.random.randn(*x.shape)).to(x.dtype) * self.noise if self.noise else x

    class NoiseConfig:  # a config object the module holds and its forward reads (Hugging Face's mask_time_prob)
        noise = 0.0

    class Configured(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = NoiseConfig()

        def forward(self, x):
            noise = self.config.noise
            return x + torch.from_numpy(np.random.randn(*x.shape)).to(x.dtype) * noise if noise else x

    noisy, configured = Noisy(), Configured()

    def switched(p, x):
        return (noisy(x) @ p["W"].T).tanh().pow(2).sum(1)

    def by_config(p, x):
        return (configured(x) @ p["W"].T).tanh().pow(2).sum(1)

    for noise in (0.0, 0.1, 0.0, 0.1):  # (whether the capture draws so is kept per signature and module settings)
        noisy.noise = configured.config.noise = noise
        for fn in (switched, by_config):
            notes = ghostfunc.graddot(fn, _lin(), x, xv).plan.notes
            assert (ghostfunc._graddot.HOST_DRAWS in notes) == bool(noise), (fn.__name__, noise, notes)


@pytest.mark.parametrize("noise", list(NOISE))
def test_a_model_that_draws_random_numbers_per_sample_is_not_refused(noise):
    """The other side: the same draws in a model whose samples do not interact pass the checks."""
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)

    def model_fn(p, x):
        return (NOISE[noise](x) @ p["W"].T).tanh().pow(2).sum(1)

    torch.manual_seed(0)
    out = ghostfunc.graddot(model_fn, _lin(), x, xv)
    assert out.scores.shape == (5,) and bool(out.scores.isfinite().all())


def test_the_checks_run_every_random_call_as_a_fixed_draw_in_the_shape_it_draws():
    """:func:`ghostfunc._draws.fixed_draw` against the calls themselves: the shape, dtype and device of each form of
    each random call (keywords, ``out=``), the value where it has one, and ``None`` for calls it leaves alone."""
    from ghostfunc._draws import NORMAL_AT, UNIFORM_AT, fixed_draw

    x = torch.rand(4, 3, dtype=F64) + 0.5
    g = torch.Generator().manual_seed(0)
    calls = [
        (torch.randn, (2, 3), {}), (torch.randn, ((2, 3),), {"dtype": F64}), (torch.rand, (), {"size": (4,)}),
        (torch.rand, (3,), {"generator": g}), (torch.randn_like, (x,), {}), (torch.rand_like, (x,), {"dtype": F32}),
        (torch.randn_like, (), {"input": x}), (torch.randint, (5, (2, 2)), {}),
        (torch.randint, (2, 5, (3,)), {"dtype": torch.int32}), (torch.randint, (), {"high": 5, "size": (2,)}),
        (torch.randint_like, (x, 4), {}), (torch.randint_like, (x, 1, 4), {}),
        (torch.randint_like, (), {"input": x, "high": 4}), (torch.randperm, (6,), {}),
        (torch.normal, (x, 0.5), {}), (torch.normal, (1.5, x), {}), (torch.normal, (x, x), {}),
        (torch.normal, (2.0, 1.0, (2, 5)), {"dtype": F64}), (torch.normal, (), {"mean": x, "std": x}),
        (torch.bernoulli, (x / 2,), {}), (torch.bernoulli, (x, 0.25), {}), (Tensor.bernoulli, (x / 2,), {}),
        (torch.poisson, (x,), {}), (torch.multinomial, (x, 2), {}), (torch.multinomial, (x, 5, True), {}),
        (Tensor.multinomial, (x, 1), {}), (F.gumbel_softmax, (x,), {"tau": 0.5}),
        (F.gumbel_softmax, (x,), {"hard": True}), (torch._standard_gamma, (x,), {}), (torch._sample_dirichlet, (x,), {}),
        (torch.binomial, (x.round(), x / 3), {}), (F.fractional_max_pool2d, (x.expand(2, 3, 4, 3) * 1.0, 2),
                                                   {"output_size": (2, 1)}),
    ]
    for func, args, kwargs in calls:
        real = func(*args, **kwargs)
        fixed = fixed_draw(func, args, kwargs)
        assert fixed is not None, func
        got = fixed()
        assert (got.shape, got.dtype, got.device) == (real.shape, real.dtype, real.device), (func, args, kwargs)
    assert torch.equal(fixed_draw(torch.randperm, (4,), {})(), torch.tensor([3, 2, 1, 0]))  # (not the identity)
    assert torch.equal(fixed_draw(torch.randn, (2,), {})(), torch.full((2,), NORMAL_AT))  # (not 0: nothing vanishes)
    assert torch.allclose(fixed_draw(torch.normal, (x, 2.0), {})(), x + 2 * NORMAL_AT)
    for func, args in [(torch.normal, (x, 0.5)), (torch.bernoulli, (x / 2,)), (torch.multinomial, (x, 2)),
                       (torch.randn, (4, 3)), (torch.randint, (0, 5, (4, 3)))]:
        buf = torch.full_like(func(*args), 7)
        out = fixed_draw(func, args, {"out": buf})()
        assert out is buf and not bool((buf == 7).any()), func  # written into out=, as the call writes
    fills = [(Tensor.normal_, (1.5, 0.1), 1.5 + NORMAL_AT * 0.1), (Tensor.uniform_, (1.0, 3.0), 1.0 + 2 * UNIFORM_AT),
             (Tensor.exponential_, (4.0,), .25), (Tensor.geometric_, (0.5,), 2.0), (Tensor.cauchy_, (-1.0,), -0.5),
             (Tensor.random_, (3, 9), 3.0), (Tensor.bernoulli_, (0.3,), 1.0), (Tensor.bernoulli_, (0.2,), 0.0),
             (Tensor.log_normal_, (0.0, 0.5), math.exp(0.25))]
    for func, args, value in fills:
        t = torch.empty(3, 2, dtype=F64)
        thunk = fixed_draw(func, (t, *args), {})
        assert thunk is not None and thunk() is t and torch.allclose(t, torch.full_like(t, value)), func
    # counts and Bernoulli outcomes stay in their support (a distribution's log_prob validates them)
    assert torch.equal(fixed_draw(torch.bernoulli, (torch.tensor([0.1, 0.3, 0.9]),), {})(), torch.tensor([0., 1., 1.]))
    assert torch.equal(fixed_draw(torch.poisson, (torch.tensor([0.4, 2.6]),), {})(), torch.tensor([0., 3.]))
    assert torch.equal(fixed_draw(torch.binomial, (torch.tensor([5.0]), torch.tensor([0.35])), {})(), torch.tensor([2.]))
    assert fixed_draw(torch.nn.init.normal_, (torch.empty(2),), {}) is None
    assert fixed_draw(torch.tanh, (x,), {}) is None


def test_a_random_fill_of_a_parameter_is_refused_by_the_checks_too():
    """Run as its mean by the checks, ``p.normal_()`` still writes into a parameter: refused before it runs."""
    def model_fn(p, x):
        p["W"].normal_()
        return (x @ p["W"].T).pow(2).sum(1)

    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    p = _lin()
    before = p["W"].clone()
    with pytest.raises(StateWrittenError, match="W"):
        ghostfunc.graddot(model_fn, p, x, xv)
    assert torch.equal(p["W"], before)


def test_a_dropout_of_p_one_is_run_as_it_is_by_the_interaction_check():
    """F.dropout(x, 1.0, True) zeroes x without drawing: a batch-context branch switched off that way joins no
    sample to another. The check ran it as the identity (as eval mode would) and refused a valid model."""
    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)

    def model_fn(p, x):
        h = x @ p["W"].T
        return (h + F.dropout(h.mean(0, keepdim=True), 1.0, True)).pow(2).sum(1)

    out = ghostfunc.graddot(model_fn, _lin(), x, xv)
    assert rel(out.scores, ghostfunc.reference_graddot(model_fn, _lin(), x, xv)[0]) < 1e-10


def test_a_branch_on_a_random_draw_names_layerdrop():
    """LayerDrop (`if torch.rand(()) < p: skip the layer`, Whisper/BART in training mode) makes other calls on
    each run: the error said only that the calls differed, with an internal dump first."""
    def model_fn(p, x):
        h = x @ p["W"].T
        if torch.rand(()) < 0.5:
            h = torch.tanh(h) @ p["W"] @ p["W"].T
        return h.pow(2).sum(1)

    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    with pytest.raises(RuntimeError, match=r"^graddot: model_fn made different parametrised calls on two runs with "
                                           r"the same input shapes; .*LayerDrop.*encoder_layerdrop"):
        for seed in range(8):  # (a seed whose draws agree on every run passes)
            torch.manual_seed(seed)
            ghostfunc.graddot(model_fn, _lin(), x, xv)


def _token_counts() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Eight rows of six token ids and targets, rows 0-2 holding four targets each (the batch's mean count), and an
    embedding table and head: a batch whose first rows hide a normaliser over the whole batch's count."""
    torch.manual_seed(0)
    d, v = 8, 11
    ids, tgt = torch.randint(0, v, (8, 6)), torch.randint(0, v, (8, 6))
    for i in range(8):
        tgt[i, : (2 if i < 3 else i % 5)] = -100  # rows 0-2: four targets each, as the batch's mean
    return ids, tgt, {"emb": torch.randn(v, d, dtype=F64) / 2, "head": torch.randn(v, d, dtype=F64) / 3}


@pytest.mark.parametrize("entry", ["graddot", "inrun_shapley", "graddot_direction", "val", "inrun_shapley order 2",
                                   "inrun_shapley secant", "train_step precondition"])
def test_a_loss_normalised_over_the_whole_batch_is_refused_at_every_entry_point(entry):
    """The whole batch's token count (Hugging Face's num_items_in_batch) with the rows the interaction check
    compares holding as many tokens as the batch's mean: those rows agree together and alone, and graddot gave
    the per-sample numbers of another loss (0.33 off a loop over the plain call's rows), silently (only
    train_step's gradient check refused it). The first call of a signature compares each whole batch's losses
    from a plain run with the capture's."""
    ids, tgt, p = _token_counts()

    def model_fn(q, b):
        h = torch.tanh(F.embedding(b["ids"], q["emb"]))
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) * len(b["tgt"]) / (b["tgt"] != -100).sum()

    batch, few = {"ids": ids, "tgt": tgt}, {"ids": ids[:3], "tgt": tgt[:3]}
    train, val = (few, batch) if entry == "val" else (batch, few)
    label = "val" if entry == "val" else "train"
    u = {k: torch.ones_like(t) for k, t in p.items()}
    step = ghostfunc.train_step(model_fn, ghostfunc.adamw(0.1), precondition=True)
    call = {"graddot": lambda: ghostfunc.graddot(model_fn, p, train, val),
            "val": lambda: ghostfunc.graddot(model_fn, p, train, val),
            "inrun_shapley": lambda: ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1),
            # (these captured the training rows outside the comparison: accepted, silently)
            "inrun_shapley order 2": lambda: ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2),
            "inrun_shapley secant": lambda: ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2,
                                                                    curvature="secant"),
            "train_step precondition": lambda: step(step.init(p), train, val),
            "graddot_direction": lambda: ghostfunc.graddot_direction(model_fn, p, train, u)}[entry]
    where = entry.split()[0].replace("val", "graddot")
    with pytest.raises(SamplesInteractError, match=rf"^{where}: samples interact in "
                                                   rf"model_fn: run on the whole {label} batch \(8 samples\) "
                                                   rf"together, the losses of 4 of them differ"):
        call()

    def own_count(q, b):  # each sample normalised by its own count: the loop's numbers, no refusal
        h = torch.tanh(F.embedding(b["ids"], q["emb"]))
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) / (b["tgt"] != -100).sum(1)

    if entry == "graddot":
        assert rel(ghostfunc.graddot(own_count, p, train, val).scores,
                   ghostfunc.reference_graddot(own_count, p, train, val)[0]) < 1e-10


@pytest.mark.parametrize("draw", ["numpy", "python"])
def test_a_loss_normalised_over_the_whole_batch_is_refused_beside_a_numpy_draw(draw):
    """A draw from NumPy's or Python's generator (even one that changes nothing) turned the few-rows comparison to
    the first sample and the whole-batch comparison off, and a loss normalised by the whole batch's token count
    passed (0.12 off torch's batch gradient). Each sample is compared in a batch of copies of itself that starts
    from the batch's generator state, so its row takes the same draws."""
    import random

    ids, tgt, p = _token_counts()

    def model_fn(q, b):
        jitter = np.random.rand() if draw == "numpy" else random.random()
        h = torch.tanh(F.embedding(b["ids"], q["emb"])) * (1 + 0.01 * jitter)
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) * len(b["tgt"]) / (b["tgt"] != -100).sum()

    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the whole train "
                                                   r"batch \(8 samples\) together"):
        ghostfunc.graddot(model_fn, p, {"ids": ids, "tgt": tgt}, {"ids": ids[:3], "tgt": tgt[:3]})


@pytest.mark.parametrize("curvature", ["exact", "secant"])
def test_order_2_refuses_a_model_drawing_from_numpy(curvature):
    """Order 2 needs a deterministic model (two validation passes must see the same function): a torch draw was
    refused, a NumPy draw was not (two identical calls 5e-3 to 2.3 apart)."""
    def model_fn(p, x):
        return ((x + 0.1 * torch.from_numpy(np.random.randn(*x.shape))) @ p["W"].T).tanh().pow(2).sum(1)

    x, xv = torch.randn(5, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    with pytest.raises(ValueError, match=r"needs a deterministic model_fn"):
        ghostfunc.inrun_shapley(model_fn, _lin(), x, xv, lr=0.1, order=2, curvature=curvature)


def _regressor_near_1000(body: nn.Module, data_seed: int, lstm: bool = False):
    """A float32 regressor ``body -> Linear(32, 1)`` whose outputs sit near 1000, fitted to targets 0.01 off its own
    outputs (losses ~1e-4: small differences of large outputs): the module, ``params``, ``model_fn``, 32 training
    and 8 validation rows of ``[32, 16]``."""
    net = nn.ModuleDict({"body": body, "head": nn.Linear(32, 1)}).eval()
    with torch.no_grad():
        net["head"].weight.mul_(100.0)
        net["head"].bias.fill_(1000.0)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def forward(q, x):
        h = functional_call(net["body"], {k[5:]: v for k, v in q.items() if k.startswith("body.")}, (x,))
        h = h[0][:, -1] if lstm else h
        return F.linear(h, q["head.weight"], q["head.bias"]).squeeze(-1)

    def model_fn(q, b):
        return (forward(q, b[0]) - b[1]) ** 2

    g = torch.Generator().manual_seed(data_seed)
    x, xv = torch.randn(32, 32, 16, generator=g), torch.randn(8, 32, 16, generator=g)
    with torch.no_grad():
        y, yv = forward(p, x) + 0.01 * torch.randn(32, generator=g), forward(p, xv) + 0.01 * torch.randn(8, generator=g)
    return net, p, model_fn, (x, y), (xv, yv)


@pytest.mark.parametrize("arch", ["conv", "lstm"])
def test_small_losses_of_large_outputs_are_not_taken_for_samples_that_interact(arch):
    """A float32 regressor fitted to targets near 1000 (losses ~1e-4, small differences of large outputs): the
    capture's losses and a batch of one round otherwise than the whole batch, by 5-7x sqrt(eps) of the largest
    loss, and the first call's whole-batch comparison refused it. A difference is confirmed on a batch of the
    same shapes holding copies of the sample (the same kernels: the sample's own loss bit for bit)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 32)) \
        if arch == "conv" else nn.LSTM(16, 32, batch_first=True)
    _, p, model_fn, train, val = _regressor_near_1000(body, 1, lstm=arch == "lstm")
    out = ghostfunc.graddot(model_fn, p, train, val)
    # (residuals of 0.01 from outputs near 1000 hold float32's eps * 1e5 ~ 1e-2 of relative rounding, in the loop too)
    assert rel(out.scores, ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 2e-2


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_small_losses_of_large_outputs_are_not_taken_for_samples_that_interact_by_the_few_rows(mode, seed):
    """The same kind of regressor (GELU, LayerNorm and dropout in its body) on the few rows the interaction check
    runs together and alone: a batch of three and a batch of one round otherwise (30x sqrt(eps) of the three
    rows' largest loss), and those seeds were refused, in eval mode and (dropout run without drawing) in train
    mode. A difference there is confirmed on a batch of three copies of the sample."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 32), nn.GELU(), nn.LayerNorm(32), nn.Dropout(0.1),
                         nn.Linear(32, 32))
    net, p, model_fn, train, val = _regressor_near_1000(body, seed + 1)
    net.train(mode == "train")
    out = ghostfunc.graddot(model_fn, p, train, val)
    if mode == "eval":
        assert rel(out.scores, ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 2e-2


def test_a_loss_normalised_over_the_whole_batch_is_refused_behind_dropout():
    """The whole-batch count (Hugging Face's num_items_in_batch) with the first rows holding as many tokens as each
    other, in a model that drops out: the few rows compared agree, the step's gradient check does not compare a
    model that draws, and the losses' difference from a plain call's was put down to the masks (a note; the step
    0.02 off torch.optim's). Where no way of drawing gives the plain call's losses, the whole batch is compared
    with its samples alone, dropout drawing nothing: the samples interact."""
    torch.manual_seed(0)
    d, v = 8, 11
    ids, tgt = torch.randint(0, v, (8, 6)), torch.randint(0, v, (8, 6))
    for i in range(8):
        tgt[i, : (2 if i < 3 else i % 5)] = -100  # the first three rows: four targets each
    p = {"emb": torch.randn(v, d, dtype=F64) / 2, "head": torch.randn(v, d, dtype=F64) / 3}

    def model_fn(q, b):
        h = F.dropout(torch.tanh(F.embedding(b["ids"], q["emb"])), 0.1, True)
        token = F.cross_entropy(F.linear(h, q["head"]).transpose(1, 2), b["tgt"], reduction="none")
        return token.sum(1) * len(b["tgt"]) / (b["tgt"] != -100).sum()

    train, val = {"ids": ids, "tgt": tgt}, {"ids": ids[:3], "tgt": tgt[:3]}
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the whole "
                                                   r"train batch \(8 samples\) together"):
        ghostfunc.graddot(model_fn, p, train, val)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(1.0))
    with pytest.raises(SamplesInteractError, match=r"^train_step: samples interact"):
        step(step.init(p), train, val)


def _routed(strength: float, whole_batch_only: bool = False):
    """A float64 model whose router runs in float32 (a mixture of experts' ``softmax(logits.float())``) and adds
    ``strength`` times a statistic of the whole batch's routing (a load-balancing loss): a coupling under
    float32's ``sqrt(eps)`` of the loss. ``whole_batch_only``: added only to batches of more than 3 rows, which the
    few rows the first check runs together do not show."""
    def model_fn(p, x):
        gate = torch.softmax((x @ p["R"].T).float(), -1)  # [B, 2], float32
        h = torch.tanh(x @ p["W"].T).pow(2).sum(1) * (1 + 0.1 * gate[:, 0].double())  # [B]
        balance = (gate.mean(0) ** 2).sum().double() if len(x) > 3 or not whole_batch_only else 0.0
        return h + strength * balance
    return model_fn


@pytest.mark.parametrize("whole_batch_only", [False, True])
def test_a_weak_coupling_through_a_float32_part_is_refused(whole_batch_only):
    """A float32 router in a float64 model set the rounding allowance to float32's ``sqrt(eps)`` (3.5e-4 of the
    loss) and OLMoE's load-balancing loss at its default weight (5e-5 of the loss; the gradient 3.5e-3 off the
    batch's) passed graddot and inrun_shapley (h55). A sample's loss in the batch is compared with its loss in a
    batch of copies of itself (the same kernels) at ``eps ** (2/3)`` of float64 or 16 ulps of float32."""
    x, xv = torch.randn(6, 3, generator=_g(1), dtype=F64), torch.randn(4, 3, generator=_g(2), dtype=F64)
    p = {**_lin(), "R": torch.randn(2, 3, generator=_g(3), dtype=F64)}
    which = "the whole train batch \\(6 samples\\)" if whole_batch_only else "the first 3 train samples"
    for strength in (1e-3, 1e-4):
        model_fn = _routed(strength, whole_batch_only)
        together, alone = model_fn(p, x), torch.cat([model_fn(p, x[i:i + 1]) for i in range(6)])
        assert 1e-6 < (together - alone).abs().max() / together.abs().max() < 3e-4  # under float32's sqrt(eps)
        for where, call in {"graddot": lambda f: ghostfunc.graddot(f, p, x, xv),
                            "inrun_shapley": lambda f: ghostfunc.inrun_shapley(f, p, x, xv, lr=0.1, order=2)}.items():
            with pytest.raises(SamplesInteractError, match=rf"^{where}: samples interact in model_fn: run on {which} "
                                                           rf"together, .* in a batch of copies of itself"):
                call(_routed(strength, whole_batch_only))  # (a new function: nothing cached)
    uncoupled = _routed(0.0)  # the same float32 router without the coupling: the loop's numbers
    got, want = ghostfunc.graddot(uncoupled, p, x, xv), ghostfunc.reference_graddot(uncoupled, p, x, xv)[0]
    assert rel(got.scores, want) < 1e-6



def _packed_tokens():
    """A float32 token regressor over the valid tokens packed with ``x[mask]`` (unpadding): one matmul over the
    tokens of every row, its row count set by the rows' lengths; outputs of tens fitted to 0.3 (small losses)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 1)
    p = {k: v.detach() for k, v in lin.named_parameters()}

    def model_fn(q, batch):
        x, mask, y = batch
        out = torch.zeros(mask.shape).masked_scatter(mask, F.linear(x[mask], q["weight"], q["bias"]).squeeze(-1))
        return (((out - y) * mask) ** 2).sum(1) / mask.sum(1)

    def make(n, seed):
        g = _g(seed)
        x, lens = torch.randn(n, 6, 64, generator=g) * 100, torch.randint(1, 7, (n,), generator=g)
        lens[0] = 1
        y = F.linear(x, p["weight"], p["bias"]).squeeze(-1) + 0.3 * torch.randn(n, 6, generator=g)
        return x, torch.arange(6)[None] < lens[:, None], y

    return model_fn, p, make(3, 0), make(3, 100)


def _packed_lstm():
    """A float32 LSTM regressor over ``pack_padded_sequence``: step t's matmul has as many rows as the batch has
    sequences longer than t; outputs of tens fitted to 0.1."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    rnn, head = nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 1)
    net = nn.ModuleDict({"rnn": rnn, "head": head})
    p = {k: v.detach() for k, v in net.named_parameters()}

    def forward(q, x, lens):
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        out, _ = functional_call(rnn, {k[4:]: v for k, v in q.items() if k.startswith("rnn.")}, (packed,))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=10)
        return F.linear(out, q["head.weight"], q["head.bias"]).squeeze(-1) * 100

    def model_fn(q, batch):
        x, lens, y = batch
        return (((forward(q, x, lens) - y) * (torch.arange(10)[None] < lens[:, None])) ** 2).sum(1) / lens

    def make(n, seed):
        g = _g(seed)
        x, lens = torch.randn(n, 10, 16, generator=g), torch.randint(1, 11, (n,), generator=g)
        with torch.no_grad():
            return x, lens, forward(p, x, lens) + 0.1 * torch.randn(n, 10, generator=g)

    return model_fn, p, make(4, 0), make(3, 100)


@pytest.mark.parametrize("build", [_packed_tokens, _packed_lstm])
def test_rows_packed_by_their_lengths_are_not_refused(build):
    """Where the rows' lengths set a kernel's shape (tokens packed with ``x[mask]``, a packed sequence's steps), a
    batch of copies of a row runs other shapes than the batch, and MKL rounds a row otherwise at another row count
    (1e-4 of a small float32 loss): the finer comparison with copies refused these per-sample models (h58). It
    compares only copies that ran the batch's shapes; the numbers are the float32 loop's."""
    model_fn, p, train, val = build()
    want = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
    assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, want) < 1e-4
    ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2)

def test_samples_interact_seen_in_val_when_train_has_one_sample():
    x, xv = torch.randn(1, 3, generator=_g(1), dtype=F64), torch.randn(2, 3, generator=_g(2), dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"^plan: samples interact .* first 2 val samples together"):
        ghostfunc.plan(baseline, _lin(), x, xv)
    ghostfunc.graddot(baseline, _lin(), x, x)  # one sample alone cannot interact: nothing to refuse


def test_samples_interact_at_every_entry_point():
    x, xv = torch.randn(4, 3, generator=_g(1), dtype=F64), torch.randn(3, 3, generator=_g(2), dtype=F64)
    p = _lin()
    calls = {
        "graddot": lambda f: ghostfunc.graddot(f, p, x, xv),
        "plan": lambda f: ghostfunc.plan(f, p, x, xv),
        "inrun_shapley": lambda f: ghostfunc.inrun_shapley(f, p, x, xv, lr=0.1),
        "train_step": lambda f: (lambda s: s(s.init(p), x, xv))(ghostfunc.train_step(f, ghostfunc.sgd(0.1))),
    }
    for where, call in calls.items():
        def fresh_infonce(p, x):  # a new function each time: nothing cached
            return infonce(p, x)

        with pytest.raises(SamplesInteractError, match=rf"^{where}: samples interact"):
            call(fresh_infonce)


def test_independent_models_are_not_flagged():
    # float32 with batched-vs-single rounding, dropout (random draws: not compared), per-sample normalisation
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        h = functional_call(net, p, (x,))
        return (h - h.mean(1, keepdim=True)).pow(2).sum(1) + F.group_norm(x.unsqueeze(-1), 2).pow(3).sum((1, 2))

    x, xv = torch.randn(6, 6, generator=_g(1)) * 100, torch.randn(3, 6, generator=_g(2))
    for mode in (net.train, net.eval):
        mode()
        ghostfunc.graddot(model_fn, p, x, xv)

    own = torch.Generator().manual_seed(0)

    def noisy(p, x):  # random draws from the model's own generator: not compared either
        noise = torch.randn(4, len(x), generator=own, dtype=x.dtype).T  # [B, 4]: drawn feature-major
        return (x @ p["W"].T + 0.1 * noise).pow(2).sum(1)

    ghostfunc.graddot(noisy, _lin(), x[:, :3].double(), xv[:, :3].double())


def test_interaction_check_is_cached_and_leaves_the_rng_alone(monkeypatch):
    # the cost model routes (no race at first use: its whole calls would be counted too, as many as its timing
    # takes, now that W in ``x @ W.T`` is recognised and has routings to race)
    monkeypatch.setenv("GHOSTFUNC_ROUTING", "model")
    calls = []

    def model_fn(p, x):
        calls.append(len(x))
        return (x @ p["W"].T).pow(2).sum(1)

    x, xv = torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    state = torch.get_rng_state()
    ghostfunc.graddot(model_fn, _lin(), x, xv)
    assert torch.equal(state, torch.get_rng_state())
    first = len(calls)
    # three train samples together, twice: the interaction check's run without gradients, and the run with them
    # that checks the losses have a gradient path (val has the same signature: not again)
    assert calls.count(3) == 2
    ghostfunc.graddot(model_fn, _lin(), x[:4], xv)
    assert len(calls) - first < first  # the second call is not checked again


# --- 5. params that never reach the computation ---------------------------------------------------------------


def test_model_fn_that_never_uses_params():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, x):
        return net(x).pow(2).sum(1)  # the module's own weights, not params

    x = torch.randn(4, 3, dtype=F64)
    for where, call in {"graddot": ghostfunc.graddot, "plan": ghostfunc.plan}.items():
        with pytest.raises(ValueError, match=rf"^{where}: no parameter reached the computation: .*"
                                             r"functional_call\(net, params, \(x,\)\) instead of net\(x\)"):
            call(model_fn, p, x, x)


def test_a_non_finite_direction_is_refused_naming_it():
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(3, 4, generator=g, dtype=F64)}
    x = torch.randn(5, 4, generator=g, dtype=F64)
    u = {"w": torch.full((3, 4), float("nan"), dtype=F64)}
    with pytest.raises(FloatingPointError, match=r"^graddot_direction: direction\['w'\] holds non-finite entries "
                                                 r"\(12 of 12\)"):
        ghostfunc.graddot_direction(lambda q, b: (b @ q["w"].T).pow(2).sum(1), p, x, u)


@pytest.mark.parametrize("how", ["detach", "no_grad", "item"])
def test_losses_without_a_gradient_path_are_refused(how):
    """Losses computed from params but handed back without an autograd path (``.detach()``, ``no_grad``, rebuilt
    from ``.item()``): plain PyTorch's backward raises; graddot and train_step said every score was 0 (and AdamW
    still decayed the parameters)."""
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(3, 4, generator=g, dtype=F64)}

    def model_fn(params, batch):
        x, y = batch
        if how == "no_grad":
            with torch.no_grad():
                return F.cross_entropy(F.linear(x, params["w"]), y, reduction="none")
        losses = F.cross_entropy(F.linear(x, params["w"]), y, reduction="none")
        if how == "item":
            return torch.tensor([v.item() for v in losses], dtype=F64)
        return losses.detach()

    batch = (torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g))
    step = ghostfunc.train_step(model_fn, ghostfunc.adamw(0.1, weight_decay=0.5))
    for where, call in {"graddot": lambda: ghostfunc.graddot(model_fn, p, batch, batch),
                        "train_step": lambda: step(step.init(p), batch, batch)}.items():
        with pytest.raises(ValueError, match=rf"^{where}: model_fn's losses do not depend on params: .*"
                                             r"\.detach\(\)-ed"):
            call()


def test_some_params_unused_get_zero_gradient():
    torch.manual_seed(0)
    net = nn.ModuleDict({"body": nn.Linear(3, 4), "head": nn.Linear(4, 2), "unused_head": nn.Linear(4, 5)}).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        h = torch.tanh(functional_call(net["body"], {"weight": p["body.weight"], "bias": p["body.bias"]}, (x,)))
        return functional_call(net["head"], {"weight": p["head.weight"], "bias": p["head.bias"]}, (h,)).pow(2).sum(1)

    assert_exact(model_fn, p, torch.randn(4, 3, generator=_g(1), dtype=F64),
                 torch.randn(3, 3, generator=_g(2), dtype=F64), "partly unused params")


# --- messages: BatchEncoding, fresh tensors filled in place, BatchNorm in training mode -----------------------


def test_batch_encoding_batches():
    transformers = pytest.importorskip("transformers")
    p = _emb_params(7, 0)

    def model_fn(p, batch):
        assert isinstance(batch, transformers.BatchEncoding)
        h = F.embedding(batch.input_ids, p["E"])  # attribute access, as with a tokenizer's output
        return (torch.tanh(h @ p["w"]) * batch["attention_mask"]).sum(1)

    def enc(n, t, seed):
        mask = torch.ones(n, t)
        mask[0, -2:] = 0
        return transformers.BatchEncoding({"input_ids": _ids(n, t, 7, seed), "attention_mask": mask.to(F64)})

    train, val = enc(4, 5, 1), enc(3, 6, 2)
    assert_exact(model_fn, p, train, val, "BatchEncoding", [("auto", "mean"), ("ghost", None), ("contract", "sum")])

    def nested_fn(p, batch):  # (encoding, targets), as a data loader may yield
        encoding, target = batch
        return (model_fn(p, encoding) - target) ** 2

    nested = [(train, torch.randn(4, generator=_g(5), dtype=F64)), (val, torch.randn(3, generator=_g(6), dtype=F64))]
    assert_exact(nested_fn, p, *nested, "BatchEncoding", [("materialize", "mean"), ("auto", None)])
    with pytest.raises(ValueError, match=r"^graddot: the tensor leaves of train must share the sample axis"):
        ghostfunc.graddot(nested_fn, p, (train, torch.zeros(3, dtype=F64)), nested[1])

    def by_items(p, batch):  # a dict beside a BatchEncoding is the same batch (each goes to model_fn as it came)
        return (torch.tanh(F.embedding(batch["input_ids"], p["E"]) @ p["w"]) * batch["attention_mask"]).sum(1)

    want = ghostfunc.graddot(by_items, p, train, val).scores
    assert rel(ghostfunc.graddot(by_items, p, train, dict(val)).scores, want) < 1e-12
    assert rel(ghostfunc.graddot(by_items, p, dict(train), val).scores, want) < 1e-12


def fill_slices(p, x):  # h = zeros(...); h[:, :k] = ...
    h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
    h[:, :4] = F.linear(x, p["W"])
    h[:, 4:] = x[:, :2]
    return torch.tanh(h @ p["v"])


def fill_index_add(p, x):  # index_add_ into a new buffer; += into another
    h = x.new_zeros(x.shape[0], 3, 4)
    h.index_add_(1, torch.tensor([0, 2]), F.linear(x, p["W"]).unsqueeze(1).expand(-1, 2, -1))
    acc = torch.ones(x.shape[0], 4, dtype=x.dtype)
    for k in range(3):
        acc += h[:, k] * p["v"][k]
    return torch.tanh(acc @ p["v"][:4])


def fill_scatter(p, x):  # scatter_ and a masked fill into tensors made by torch.full / zeros_like
    h = torch.full((x.shape[0], 4), 0.5, dtype=x.dtype)
    h.scatter_(1, torch.tensor([[1, 3]]).expand(x.shape[0], 2), F.linear(x, p["W"])[:, :2])
    m = torch.zeros_like(h)
    m.masked_scatter_(torch.tensor([True, False, True, False]).expand_as(m), h[:, :2] * p["v"][:2])
    return (h + m).pow(2) @ p["v"][2:6]


def fill_joined(p, x):  # a tensor joined from constants (torch.cat, torch.stack), written through itself (h70)
    h = torch.cat([torch.zeros(1, 6, dtype=x.dtype)] * x.shape[0])
    h[:, 1:5] = F.linear(x, p["W"])
    s = torch.stack([torch.ones(4, dtype=x.dtype) for _ in range(x.shape[0])])
    s[:, :2] = h[:, 2:4] * p["v"][:2]
    return torch.tanh(h @ p["v"]) + s.pow(2).sum(1)


def masked_positions(p, x):  # a boolean mask of the batch indexing a tensor the model made: read, not written (h70)
    h = torch.tanh(F.linear(x, p["W"]))  # [B, 4]
    keep = h > 0
    positions = torch.arange(4, dtype=x.dtype).expand(x.shape[0], 4)[keep]  # data-dependent shape
    rows = torch.arange(x.shape[0])[:, None].expand(-1, 4)[keep]
    return torch.zeros(x.shape[0], dtype=x.dtype).index_add(0, rows, h[keep] * (positions + 1)) + h @ p["v"][:4]


@pytest.mark.parametrize("model_fn", [fill_slices, fill_index_add, fill_scatter, fill_joined, masked_positions],
                         ids=lambda f: f.__name__)
def test_fresh_tensor_filled_in_place_is_exact(model_fn):
    p = {"W": torch.randn(4, 3, generator=_g(0), dtype=F64), "v": torch.randn(6, generator=_g(1), dtype=F64)}
    assert_exact(model_fn, p, torch.randn(4, 3, generator=_g(2), dtype=F64),
                 torch.randn(3, 3, generator=_g(3), dtype=F64), "fresh tensor in place")


INPUT_WRITTEN_AFTER = {  # a recognised call's input written in place after the call (plain backward refuses)
    "a copy of the batch scaled": lambda p, x: (lambda z: (lambda h: (z.mul_(3), h)[1])(F.linear(z, p["w1"])))(
        x.clone()),
    "an embedding's ids shifted": lambda p, x: (lambda ids: (lambda h: (ids.add_(1), h)[1])(
        F.embedding(ids, p["e"]).sum(1)))((x[:, :2].abs() * 2).long().clamp(max=3)),
    "a scale's input zeroed through a view": lambda p, x: (lambda z: (lambda h: (z[:, :1].zero_(), h)[1])(
        z * p["s"]))(x.clone()),
}


@pytest.mark.parametrize("name", INPUT_WRITTEN_AFTER)
def test_an_input_written_in_place_after_its_call_is_refused_as_plain_backward_refuses(name):
    """Plain PyTorch's backward raises "modified by an inplace operation" (the input is saved for the weight's
    gradient); the capture saved it too, but no autograd node of its own checked it: the kernels read the new
    values and returned the gradient of another model. Every path now raises as torch does."""
    use = INPUT_WRITTEN_AFTER[name]
    g = _g(50)
    p = {"w1": torch.randn(3, 4, generator=g, dtype=F64), "e": torch.randn(4, 3, generator=g, dtype=F64),
         "s": torch.randn(4, generator=g, dtype=F64)}

    def model_fn(q, x):
        return torch.tanh(use(q, x)).pow(2).sum(1)

    x, xv = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        ghostfunc.reference_graddot(model_fn, p, x, xv)
    for policy in ("auto", "ghost", "materialize", "contract"):
        with pytest.raises(RuntimeError, match=r"one of the variables needed for gradient computation has been "
                                               r"modified by an inplace operation"):  # ours, or torch's own
            ghostfunc.graddot(model_fn, p, x, xv, policy=policy)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        step(step.init(p), x, xv)


def test_write_into_a_view_of_a_fresh_tensor_is_refused_precisely():
    def into_view(p, x):
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        h[:, :4].copy_(F.linear(x, p["W"]))  # the view h[:, :4] is taken first, then written
        return h.pow(2).sum(1)

    def view_kept(p, x):
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        head = h[:, :4]  # a view taken before the write, read after it
        h[:, :4] = F.linear(x, p["W"])
        return head.pow(2).sum(1)

    def contiguous_expand(p, x):  # for one sample, .contiguous() of an expanded tensor is the view itself (h70)
        h = torch.zeros(6, dtype=x.dtype).expand(x.shape[0], 6).contiguous()
        h[:, :4] += F.linear(x, p["W"])
        return h.pow(2).sum(1)

    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"^graddot: model_fn writes per-sample values in place \(.*copy_\) into a "
                                         r"view of a tensor it created"):
        ghostfunc.graddot(into_view, _lin(), x, x, policy="materialize")
    with pytest.raises(ValueError, match=r"view of a tensor it created.*\.contiguous\(\) or \.reshape\(\) of an "
                                         r"expanded tensor .* is that view, not a copy: make it with torch.zeros\(B"):
        ghostfunc.graddot(contiguous_expand, _lin(), x, x)
    with pytest.raises(ValueError, match=r"^graddot: model_fn writes per-sample values in place into a tensor it "
                                         r"created after taking a view of it"):
        ghostfunc.graddot(view_kept, _lin(), x, x)


BN_FIX = r"put BatchNorm layers in eval mode \(model.eval\(\)\) with running statistics, or use GroupNorm/LayerNorm"


def _bn_net(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3, **kw), nn.Flatten(), nn.Linear(12, 2)).to(F64)


@pytest.mark.parametrize("variant", ["affine", "frozen affine", "no running stats", "no affine no running stats",
                                     "no running stats in eval mode", "functional"])
def test_batch_norm_in_training_mode_refused(variant):
    net = _bn_net(**{"no running stats": {"track_running_stats": False},
                     "no affine no running stats": {"affine": False, "track_running_stats": False},
                     "no running stats in eval mode": {"track_running_stats": False}}.get(variant, {}))
    if variant == "no running stats in eval mode":
        net.eval()  # without running statistics BatchNorm uses the batch's even in eval mode
    p = {k: v.detach() for k, v in net.named_parameters() if not (variant == "frozen affine" and k.startswith("1."))}
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}

    def model_fn(p, x):
        if variant == "functional":
            h = F.conv2d(x, p["0.weight"], p["0.bias"])
            return torch.batch_norm(h, None, None, None, None, True, 0.1, 1e-5, False).pow(2).sum((1, 2, 3))
        return functional_call(net, p, (x,), strict=False).pow(2).sum(1)

    x = torch.randn(4, 2, 3, 3, generator=_g(1), dtype=F64)
    for where, call in {"graddot": ghostfunc.graddot, "plan": ghostfunc.plan}.items():
        with pytest.raises(SamplesInteractError, match=rf"^{where}: the model calls batch_norm in training mode.*{BN_FIX}"):
            call(model_fn, p, x, x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # running statistics did not move


def test_batch_norm_switched_to_train_after_a_cached_eval_trace():
    net = _bn_net()
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        return functional_call(net, p, (x,)).pow(2).sum(1)

    x = torch.randn(4, 2, 3, 3, generator=_g(1), dtype=F64)
    net.eval()
    assert_exact(model_fn, p, x, x[:2], "BatchNorm eval", [("auto", "mean"), ("ghost", None)])
    net.train()
    for where, call in {"graddot": ghostfunc.graddot, "plan": ghostfunc.plan}.items():
        with pytest.raises(SamplesInteractError, match=rf"^{where}: the model calls batch_norm in training mode"):
            call(model_fn, p, x, x[:2])


def _cross_entropy_of(net: nn.Module):
    """``model_fn`` of ``net`` on ``(x, y)`` rows: cross-entropy per sample, through ``functional_call``."""
    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    return model_fn


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_hook_added_after_the_first_calls_is_seen(where):
    """A forward hook put on after a signature's first calls (whose checks, verdict and replay are cached):
    one that scales an activation gives the loop's numbers with the hook, one that mixes the batch's rows is
    refused as any interacting model is (it was scored with the rows mixed: 0.35 off)."""
    net = _mlp(3)
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _cross_entropy_of(net)

    train, val = _xy(7, 4), _xy(3, 5)
    for _ in range(3):  # checked, verified, replayed
        ghostfunc.graddot(model_fn, p, train, val)

    def put(hook):
        if where == "module":
            return net[1].register_forward_hook(lambda m, i, o: hook(o))
        return torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: hook(o) if m is net[1] else None)

    handle = put(lambda o: o * 3.0)
    try:
        assert_exact(model_fn, p, train, val, "scaling hook", [("auto", "mean"), ("auto", "mean"), ("ghost", None)])
    finally:
        handle.remove()
    assert_exact(model_fn, p, train, val, "hook removed", [("auto", "mean")])
    handle = put(lambda o: o - o.mean(0, keepdim=True))
    try:
        with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
            ghostfunc.graddot(model_fn, p, train, val)
    finally:
        handle.remove()


class _Held:  # a class attribute holding the model (``_Held.net``), set by the test
    net: nn.Module | None = None


class _LazyDict(dict):
    """A dict subclass whose own ``values()`` must not run (a lazy loader's)."""

    def values(self):
        raise AssertionError("the walk called a container's own values()")


class _Box:
    def __init__(self, net):
        self.net = net

    def get(self):
        return self.net


class _OnClass:  # an instance whose class holds the model (self.net read from the class)
    net: nn.Module | None = None


REACHES = {  # how model_fn reaches the model: (what it reads, given the model) -> the module as it reads it
    "class attribute": lambda net: _Held,
    "trainer with a log": None,
    "instance of a class holding it": lambda net: _OnClass(),
    "lambda in a dict": lambda net: {"get": lambda: net},
    "bound method kept": lambda net: types.SimpleNamespace(get=_Box(net).get),
    "partial in a list": lambda net: [functools.partial(lambda m: m, net)],
    "weak reference": lambda net: types.SimpleNamespace(ref=weakref.ref(net)),
    "beside a log of small lists": lambda net: types.SimpleNamespace(state=types.SimpleNamespace(models={"n": net})),
    "in a lazy dict": lambda net: _LazyDict(n=net),
}


def _unwrap(holder, reach):
    if reach == "class attribute":
        return holder.net
    if reach == "instance of a class holding it":
        return holder.net
    if reach == "lambda in a dict":
        return holder["get"]()
    if reach == "bound method kept":
        return holder.get()
    if reach == "partial in a list":
        return holder[0]()
    if reach == "weak reference":
        return holder.ref()
    if reach == "beside a log of small lists":
        return holder.state.models["n"]
    return dict.__getitem__(holder, "n")


_LOG = [{"step": i, "lrs": [0.1], "losses": [0.5], "norms": [1.0], "seen": [i]} for i in range(300)]


@pytest.mark.parametrize("reach", list(REACHES))
def test_a_row_mixing_hook_on_a_model_held_out_of_the_way_is_refused(reach):
    """The model reached as a class's attribute or behind a trainer's log of 300 small dicts (the walk's budget ran
    out first): a hook that centres the batch, put on after the first calls, was not seen and the replay scored the
    mixed rows (2.1 and 1.9 off); the walk now looks at classes' attributes, breadth first."""
    net = _mlp(4)
    p = {k: v.detach() for k, v in net.named_parameters()}

    class Trainer:
        def __init__(self):
            self.history = [{"loss": [0.1], "acc": [0.2], "lr": [0.3]} for _ in range(300)]
            self.net = net

        def loss(self, p, batch):
            return _cross_entropy_of(self.net)(p, batch)

    _Held.net = _OnClass.net = net
    if reach == "trainer with a log":
        model_fn = Trainer().loss
    else:
        holder = REACHES[reach](net)

        def model_fn(p, batch):
            if len(_LOG) < 0:  # (reads the log: a list of small dicts of small lists beside the model)
                print(_LOG)
            return _cross_entropy_of(_unwrap(holder, reach))(p, batch)

    train, val = _xy(7, 4), _xy(3, 5)
    try:
        for _ in range(3):  # checked, verified, replayed
            ghostfunc.graddot(model_fn, p, train, val)
        handle = net[1].register_forward_hook(lambda m, i, o: o - o.mean(0, keepdim=True))
        try:
            with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
                ghostfunc.graddot(model_fn, p, train, val)
        finally:
            handle.remove()
    finally:
        _Held.net = _OnClass.net = None


def test_the_ranks_compare_the_modules_they_compared_before():
    """``modules_of(wide=False)``, what ``ghostfunc._dist`` compares across ranks, looks where it looked before the
    wider walk (a per-rank meter module held on a class the loss reads was refused as another model)."""
    from ghostfunc._interact import modules_of, one_call

    net = _mlp(5)

    class Run:
        model = net

    def model_fn(p, batch):
        return _cross_entropy_of(Run.model)(p, batch)

    with one_call():
        assert net in modules_of(model_fn) and net not in modules_of(model_fn, wide=False)


class _Centring(nn.Module):
    """A linear layer whose output is centred over the batch when its setting (an attribute, or one of a config
    object it holds) says so, and scaled by ``self.scale``."""

    class CentringConfig:
        centre = False

    ON = False

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.centre, self.scale, self.config = False, 1.0, self.CentringConfig()

    def forward(self, x):
        h = self.lin(x) * self.scale
        on = (self.centre or self.config.centre or getattr(self, "_on", False) or getattr(self, "mode", None) is
              _Mode.CENTRE or bool(getattr(self, "flag", False)) or _hp_on(getattr(self, "hp", None)) or
              getattr(getattr(self.config, "sub", None), "centre", False) or type(self).ON or
              getattr(self, "state", (0, False))[1] or getattr(getattr(self, "slotted", None), "on", False))
        return h - h.mean(0) if on else h


def _hp_on(hp):
    return bool(hp["centre"] if isinstance(hp, dict) else getattr(hp, "centre", False))


class _HparamsTuple(typing.NamedTuple):
    centre: bool = False


class _AttrDict(dict):
    """An attribute dict (as EasyDict's, Lightning's ``AttributeDict``)."""

    __getattr__ = dict.__getitem__


class _Mode(enum.Enum):
    PLAIN = 0
    CENTRE = 1


@dataclasses.dataclass
class _Hparams:
    centre: bool = False


SWITCHES = {  # where a module keeps the flag that switches a batch mean on: (set up, switch on)
    "attribute": (lambda m: None, lambda m: setattr(m, "centre", True)),
    "config": (lambda m: None, lambda m: setattr(m.config, "centre", True)),
    "private attribute": (lambda m: setattr(m, "_on", False), lambda m: setattr(m, "_on", True)),
    "enum": (lambda m: setattr(m, "mode", _Mode.PLAIN), lambda m: setattr(m, "mode", _Mode.CENTRE)),
    "numpy bool": (lambda m: setattr(m, "flag", np.bool_(False)), lambda m: setattr(m, "flag", np.bool_(True))),
    "hparams dict": (lambda m: setattr(m, "hp", {"centre": False}), lambda m: m.hp.update(centre=True)),
    "dataclass": (lambda m: setattr(m, "hp", _Hparams()), lambda m: setattr(m.hp, "centre", True)),
    "sub-config": (lambda m: setattr(m.config, "sub", type(m.config)()), lambda m: setattr(m.config.sub, "centre", True)),
    "class attribute": (lambda m: None, lambda m: setattr(type(m), "ON", True)),
    "base class attribute": (lambda m: None, lambda m: setattr(type(m).__mro__[1], "ON", True)),
    "slots dataclass": (lambda m: setattr(m, "hp", _SlotHparams()), lambda m: setattr(m.hp, "centre", True)),
    "dict on the class": (lambda m: setattr(type(m), "hp", {"centre": False}), lambda m: type(m).hp.update(centre=True)),
    "tuple beside a counter": (lambda m: setattr(m, "state", (0, False)),
                               lambda m: setattr(m, "state", (m.state[0], True))),
    "slots config with __getattr__": (lambda m: setattr(m, "slotted", _SlottedConfig()),
                                      lambda m: setattr(m.slotted, "on", True)),
    # h45: subclasses of tuple and dict were no settings, nor a dict's int keys (1.46 off)
    "NamedTuple": (lambda m: setattr(m, "hp", _HparamsTuple()), lambda m: setattr(m, "hp", m.hp._replace(centre=True))),
    "OrderedDict": (lambda m: setattr(m, "hp", collections.OrderedDict(centre=False)), lambda m: m.hp.update(centre=True)),
    "attribute dict": (lambda m: setattr(m, "hp", _AttrDict(centre=False)), lambda m: m.hp.update(centre=True)),
    "hparams dict beside a vocabulary": (lambda m: setattr(m, "hp", {"vocab": {str(i): i for i in range(5000)},
                                                                     "centre": False}),
                                         lambda m: m.hp.update(centre=True)),
    # h48: two 600-entry label maps held before it took a shared budget first (1.87 off)
    "hparams dict after label maps": (lambda m: [setattr(m, "id2name", {f"c{i}": str(i) for i in range(600)}),
                                                 setattr(m, "name2id", {str(i): i for i in range(600)}),
                                                 setattr(m, "hp", {"centre": False})],
                                      lambda m: m.hp.update(centre=True)),
}


@dataclasses.dataclass(slots=True)
class _SlotHparams:
    centre: bool = False


class _SlottedConfig:
    """A config with ``__slots__`` and a ``__getattr__`` that reads its own dict (``getattr(x, "__dict__")`` raised
    KeyError out of the settings' walk)."""

    __slots__ = ("on", "extra")

    def __init__(self):
        self.on = False
        self.extra = {}

    def __getattr__(self, name):
        return self.extra[name]


@pytest.mark.parametrize("setting", list(SWITCHES))
@pytest.mark.parametrize("entry", ["graddot", "train_step"])
def test_a_modules_setting_changed_after_the_first_calls_is_checked_again(setting, entry):
    """A module's plain setting (a bool attribute, or one of a config object it holds, as a Hugging Face model
    reads ``self.config``) that switches a batch mean on after a signature's first calls: the checks, the whole-batch
    verdict and the replay were kept under the train/eval flags, classes and hooks only, and the replay scored the
    coupled batch silently (the loop's gradients were 0, ghostfunc's not). A setting changed on every call (a scale
    annealed per step) is checked again each time and stays exact."""
    base = type("CentringBase", (_Centring,), {})  # (classes of its own: the class attributes set below stay here)
    kind = type("Centring", (base,), {})
    net = nn.Sequential(kind(), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    setup, switch = SWITCHES[setting]
    setup(net[0])
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(7, 4), _xy(3, 5)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))

    def call():
        if entry == "graddot":
            return ghostfunc.graddot(model_fn, p, train, val)
        return step(step.init(p), train, val)

    for call_no, scale in enumerate((1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)):  # checked, verified, replayed; settings that move
        net[0].scale = scale  # every call (left out after 3 such calls; h44: a counter in a tuple beside the flag)
        if setting == "tuple beside a counter":
            net[0].state = (call_no, False)
        call()
        assert_exact(model_fn, p, train, val, f"scale {scale}", [("auto", "mean")])
    switch(net[0])
    with pytest.raises(SamplesInteractError, match=rf"^{entry}: samples interact"):
        call()



#: Settings a model_fn reads itself (h57): a global dict, a global flag, a class of one's own.
_READ_FLAGS = {"centre": False}
_READ_CENTRE = False


class _ReadCfg:
    centre = False


class _Options:  # (an argparse-like options object of one's own)
    def __init__(self):
        self.centre = False


_READ_ARGS = _Options()
_READ_MODULE = types.ModuleType("ghostfunc_test_settings")  # (a config module of one's own)
_READ_MODULE.CENTRE = False


def _reading(where: str):
    """``(model_fn, switch)``: a model_fn whose batch mean is switched on by a setting it reads ``where``, and what
    switches it on."""
    net = _mlp(3)
    hp, box, cell = {"centre": False}, types.SimpleNamespace(centre=False), [False]
    on = {"global dict": lambda: _READ_FLAGS["centre"], "global flag": lambda: _READ_CENTRE,
          "class of one's own": lambda: _ReadCfg.centre, "closure dict": lambda: hp["centre"],
          "closure namespace": lambda: box.centre, "options object": lambda: _READ_ARGS.centre,
          "config module": lambda: _READ_MODULE.CENTRE}
    centre = False

    def model_fn(p, batch):
        h = functional_call(net, p, (batch["x"],))
        if on[where]() if where in on else centre:  # ("closure cell": the nonlocal below)
            h = h - h.mean(0)
        return F.cross_entropy(h, batch["y"], reduction="none")

    def switch():
        nonlocal centre
        _READ_FLAGS["centre"] = where == "global dict"
        globals()["_READ_CENTRE"] = where == "global flag"
        _ReadCfg.centre = where == "class of one's own"
        _READ_ARGS.centre, _READ_MODULE.CENTRE = where == "options object", where == "config module"
        hp["centre"], box.centre, cell[0] = True, True, True
        centre = True

    return model_fn, switch, {k: v.detach() for k, v in net.named_parameters()}


@pytest.mark.parametrize("where", ["global dict", "global flag", "class of one's own", "closure dict",
                                   "closure namespace", "closure cell", "options object", "config module"])
@pytest.mark.parametrize("entry", ["graddot", "train_step", "unroll"])
def test_a_setting_model_fn_reads_itself_changed_after_the_first_calls_is_checked_again(where, entry):
    """A flag model_fn reads itself, not through a module (a global or closure dict, a global bool, a class
    attribute), that switches a batch mean on after the first calls: the checks were kept, and unroll returned the
    values of each row alone, 1.0 off the derivative through the training loop (h57); now checked again."""
    model_fn, switch, p = _reading(where)
    (x, y), (xv, yv) = _xy(7, 4), _xy(3, 5)
    train, val = {"x": x, "y": y, "index": torch.arange(7)}, {"x": xv, "y": yv, "index": torch.arange(3)}
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    calls = {"graddot": lambda: ghostfunc.graddot(model_fn, p, train, val),
             "train_step": lambda: step(step.init(p), train, val),
             "unroll": lambda: ghostfunc.unroll(model_fn, ghostfunc.sgd(0.1), p, [train, train], val)}
    try:
        for _ in range(4):  # checked, verified, replayed
            calls[entry]()
        switch()
        with pytest.raises(SamplesInteractError, match=rf"^{entry}: samples interact"):
            calls[entry]()
    finally:
        _READ_FLAGS["centre"], _ReadCfg.centre, _READ_ARGS.centre, _READ_MODULE.CENTRE = False, False, False, False
        globals()["_READ_CENTRE"] = False


@pytest.mark.parametrize("table", ["counts bumped in turn", "metrics overwritten", "per-item metadata"])
def test_what_model_fn_reads_and_a_loop_writes_is_not_checked_on_every_call(table, monkeypatch):
    """Objects model_fn reads that a training loop writes: a per-class counter bumped one class per step in turn, a
    metrics dict overwritten each step (no entry changes on 3 calls in a row, so no setting churned: every call was
    checked again, 3-8x a call), a table of a thousand items' metadata (read as settings: 15x a call; h59). Checked
    on the first calls only; the numbers stay the loop's."""
    from ghostfunc import _interact

    net = _mlp(5)
    p = {k: v.detach() for k, v in net.named_parameters()}
    held = {"per-item metadata": {f"item_{i}": {"weight": 1.0, "split": "train", "ok": True} for i in range(1000)}
            }.get(table, {f"class_{c}": 0 for c in range(5)})

    def model_fn(q, batch):
        x, y = batch
        scale = 1.0 if held.get("item_0", {"weight": 1.0})["weight"] else 0.0
        return F.cross_entropy(functional_call(net, q, (x,)), y, reduction="none") * scale

    checks = []
    real = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or real(*a, **k))
    train, val = _xy(7, 4), _xy(3, 5)
    for call in range(12):
        if table == "counts bumped in turn":
            held[f"class_{call % 5}"] += 1
        elif table == "metrics overwritten":
            held.update({k: float(call) for k in held})
        ghostfunc.graddot(model_fn, p, train, val)
    assert len(checks) <= 2 * 5, len(checks)  # (train and val, on at most the first 5 calls)
    assert len(_interact.module_settings(model_fn)) < 100  # (the table is not read as 3000 settings every call)
    assert_exact(model_fn, p, train, val, table, [("auto", "mean")])

def test_a_module_holding_an_object_of_an_odd_class_is_scored():
    """The settings' walk looks at what a module holds: an object whose metaclass raises on every look (its
    ``__getattr__`` and ``__dir__``) is no config, and the model is scored as before."""
    class Loud(type):
        def __getattr__(cls, name):
            raise RuntimeError("looked at")

        def __dir__(cls):
            raise RuntimeError("looked at")

    class Odd(metaclass=Loud):
        pass

    net = _mlp(6)
    net[0].odd = Odd()
    p = {k: v.detach() for k, v in net.named_parameters()}
    assert_exact(_cross_entropy_of(net), p, _xy(7, 4), _xy(3, 5), "odd holder", [("auto", "mean")])

    class Proxy(type):  # and one whose metaclass raises on its __mro__, read by model_fn itself (h59: it crashed)
        def __getattribute__(cls, name):
            if name == "__mro__":
                raise RuntimeError("looked at")
            return super().__getattribute__(name)

    lazy = Proxy("Lazy", (), {})()
    inner = _cross_entropy_of(net)

    def model_fn(q, batch):
        assert lazy is not None
        return inner(q, batch)

    assert_exact(model_fn, p, _xy(7, 4), _xy(3, 5), "odd read", [("auto", "mean")])


def test_a_model_fn_reading_an_object_whose_class_hides_its_module_is_scored():
    """A class whose metaclass raises on ``__module__`` (a lazy proxy): the walk asked whether it is one of the user's
    classes and the RuntimeError reached the caller (h45)."""
    class Lazy(type):
        @property
        def __module__(cls):
            raise RuntimeError("not loaded")

    plugin = Lazy("Plugin", (), {})()
    net = _mlp(6)
    p = {k: v.detach() for k, v in net.named_parameters()}
    loss = _cross_entropy_of(net)

    def reading(params, batch, held=plugin):  # (the walk looks at what model_fn holds)
        return loss(params, batch)

    assert_exact(reading, p, _xy(7, 4), _xy(3, 5), "lazy class", [("auto", "mean")])


def test_the_settings_read_per_call_are_bounded():
    """Dicts a module holds are read for settings (an hparams dict), but a table is not (a 50k-word vocabulary: 1024
    of its entries read per call, 4x a small model's call) and a dict of dicts is read up to
    :data:`ghostfunc._interact.HELD_BUDGET` entries per level, the smallest first (1024 x 1024: 5 s a call; h45)."""
    from ghostfunc import _interact

    net = _mlp(6)
    model_fn = _cross_entropy_of(net)
    net[0].vocab = {f"w{i}": i for i in range(_interact.HELD_SETTINGS + 1)}
    net[0].nested = {f"k{i}": {f"j{j}": float(j) for j in range(300)} for i in range(300)}
    net[0].hp = {"centre": False}
    with _interact.one_call():
        settings = _interact.module_settings(model_fn)
    assert len(settings) <= 2 * _interact.HELD_BUDGET + 64
    assert not any("w1" in key[0] for key in settings)  # (the vocabulary's words are no settings)
    assert any(key[0][-1] == "centre" for key in settings)


def test_the_module_walk_meets_a_bounded_number_of_objects(monkeypatch):
    """The walk for modules takes a module as it meets it, looks into the nearest level first and in it the smaller
    containers first, and stops after :data:`ghostfunc._interact.MODULE_MET` objects met (a cache of 1000 dicts of 300
    lists queued 330k objects per call: 64 ms; h45): a model held beside a large cache, or after 150 metric histories
    in one dict (h48: not found, and a hook put on it later was not seen, 1.09 off), is met early."""
    from ghostfunc import _interact

    net = _mlp(6)
    cache = {i: {j: [j, j + 1] for j in range(300)} for i in range(1000)}
    beside = types.SimpleNamespace(cache=cache, deep={"a": {"b": net}})
    after = {**{f"metric{i}": [float(j) for j in range(256)] for i in range(150)}, "model": net}
    for holder in (beside, after):
        assert _interact._modules_in([holder]) == [net]
        monkeypatch.setattr(_interact, "MODULE_MET", 400)
        assert _interact._modules_in([holder]) == [net]
        monkeypatch.undo()
    # h50: beside 120 objects of 40 attributes each, opened first as the smaller (a budget of 4096 was spent on them)
    records = [types.SimpleNamespace(**{f"a{j}": float(j) for j in range(40)}) for _ in range(120)]
    assert _interact._modules_in([(*range(130), types.SimpleNamespace(model=net)), records]) == [net]
    monkeypatch.setattr(_interact, "MODULE_MET", 2)  # (the holder, then its two attributes: no more)
    assert _interact._modules_in([beside]) == []


def test_a_log_the_loop_writes_per_step_is_not_a_setting_checked_on_every_call(monkeypatch):
    """A module's dict the training loop adds an entry to per step (``net.log[f"step_{i}"] = loss``) gained a setting
    per call, and every call was checked again (6-8 runs of model_fn a call, 12x; h48); an int-keyed one is a table.
    A flag switched later is still seen."""
    from ghostfunc import _interact

    checks = []
    run = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or run(*a, **k))
    net = nn.Sequential(_Centring(), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    net[0].log, net[0].by_step = {}, {}
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(7, 4), _xy(3, 5)
    for step in range(12):
        out = ghostfunc.graddot(model_fn, p, train, val)
        net[0].log[f"step_{step}"] = net[0].by_step[step] = float(out.train_loss.mean())
    assert len(checks) <= 2 * (_interact.CHURN + 1), len(checks)
    net[0].centre = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


def test_a_flag_in_a_tuple_beside_a_counter_is_seen():
    """``self.state = (step, centre)``: the step changes on every call, so the tuple as one setting was left out after
    3 calls, and the flag switched on later was replayed (2.21 off); a tuple's items are settings of their own."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.state = (0, False)

        def forward(self, h):
            return h - h.mean(0, keepdim=True) if self.state[1] else h

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Block(), nn.Linear(8, 3)).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(12, 4), _xy(6, 5)
    for i in range(8):
        net[2].state = (i, False)
        ghostfunc.graddot(model_fn, p, train, val)
    net[2].state = (9, True)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


def test_a_setting_that_changes_on_every_call_is_not_checked_on_every_call(monkeypatch):
    """A counter the forward bumps, a temperature annealed per call: keyed by the settings, every call checked again
    (2.7x a call; traced and verified again, 10x). After :data:`ghostfunc._interact.CHURN` calls that each changed
    it, such a setting is left out; a flag switched once later on is still seen."""
    from ghostfunc import _interact

    checks = []
    run = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or run(*a, **k))
    net = nn.Sequential(_Centring(), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(7, 4), _xy(3, 5)
    for call in range(12):
        net[0].scale = 1.0 - 0.01 * call
        net[0].calls = call
        assert_exact(model_fn, p, train, val, f"call {call}", [("auto", "mean")])
    assert len(checks) <= 2 * (_interact.CHURN + 1), len(checks)  # (train and val batches, until it is left out)
    net[0].centre = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


@pytest.mark.parametrize("change", ["swapped submodule", "instance forward", "class forward"])
def test_a_submodule_replaced_after_the_first_calls_is_checked_again(change):
    """A submodule swapped for one that centres over the batch (or given such a forward on the instance) after
    the signature's checks were cached: refused as interacting (it was scored with the rows mixed: 0.50 off)."""
    class Centre(nn.Module):
        def forward(self, h):
            return h - h.mean(0, keepdim=True)

    class Identity(nn.Module):
        def forward(self, h):
            return h

    net = _mlp(6)
    net[1] = Identity()
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _cross_entropy_of(net)

    train, val = _xy(7, 8), _xy(3, 9)
    for _ in range(3):
        ghostfunc.graddot(model_fn, p, train, val)
    if change == "swapped submodule":
        net[1] = Centre()
    elif change == "instance forward":
        net[1].forward = lambda h: h - h.mean(0, keepdim=True)
    else:
        Identity.forward = Centre.forward
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


@pytest.mark.parametrize("layout", ["a trainer's list", "a dict of dicts"])
@pytest.mark.parametrize("change", ["hook", "swapped"])
def test_modules_held_deeper_are_seen(layout, change):
    """A module two containers from model_fn (``self.models[0]``, ``cfg["model"]["net"]``): its hooks and swaps
    were looked for one level down only, so a change after the first calls went unchecked (0.15-0.42 off)."""
    class Centre(nn.Module):
        def forward(self, h):
            return h - h.mean(0, keepdim=True)

    net = _mlp(8)
    if layout == "a trainer's list":
        class Trainer:
            def __init__(self) -> None:
                self.models = [net]

            def loss(self, p, batch):
                x, y = batch
                return F.cross_entropy(functional_call(self.models[0], p, (x,)), y, reduction="none")

        model_fn = Trainer().loss
    else:
        cfg = {"model": {"net": net}}

        def model_fn(p, batch):
            x, y = batch
            return F.cross_entropy(functional_call(cfg["model"]["net"], p, (x,)), y, reduction="none")

    p = {k: v.detach() for k, v in net.named_parameters()}
    train, val = _xy(7, 12), _xy(3, 13)
    for _ in range(3):
        ghostfunc.graddot(model_fn, p, train, val)
    if change == "hook":
        net[1].register_forward_hook(lambda m, i, o: o - o.mean(0, keepdim=True))
    else:
        net[1] = Centre()
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


def test_a_hook_taken_off_leaves_no_stale_trace():
    """A hook that used a bias outside a recognised call sent it to the fallback; once the hook is off, the
    trace (cached by signatures only) still said so: a new policy or ``plan`` routed the bias to the fallback
    (exact, 2-3x slower, and compile=True never engaged)."""
    net = _mlp(7)
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _cross_entropy_of(net)

    train, val = _xy(7, 10), _xy(3, 11)
    ghostfunc.graddot(model_fn, p, train, val)
    handle = net[2].register_forward_hook(lambda m, i, o: o * torch.exp(m.bias))
    assert ghostfunc.graddot(model_fn, p, train, val).plan.routes["2.bias"].path == "fallback"
    handle.remove()
    for policy in ("2t2", "materialize"):
        assert ghostfunc.plan(model_fn, p, train, val, policy=policy).routes["2.bias"].path != "fallback"
        out = ghostfunc.graddot(model_fn, p, train, val, policy=policy)
        assert out.plan.routes["2.bias"].path != "fallback", out.plan
    assert_exact(model_fn, p, train, val, "hook off", [("contract", "mean")])


class _StdConv(nn.Conv2d):
    """A weight-standardised convolution as timm's ``StdConv2d`` and Hugging Face BiT's write it: ``batch_norm`` in
    training mode over the weight's one row (``aten``: through ``torch.batch_norm``)."""

    def __init__(self, *args, aten: bool = False, **kw) -> None:
        super().__init__(*args, **kw)
        self.aten = aten

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, self.out_channels, -1)
        w = (torch.batch_norm(w, None, None, None, None, True, 0.0, 1e-6, False) if self.aten
             else F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-6))
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


@pytest.mark.parametrize("aten", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_weight_standardised_convolution_is_exact(aten, mode):
    """batch_norm in training mode over one row that holds no sample (a weight standardised by it, BiT's and
    timm's convolutions) is each sample's own call: exact in either mode (refused as a BatchNorm in train mode
    before, so every BiT model was)."""
    torch.manual_seed(0)
    net = nn.Sequential(_StdConv(2, 4, 3, padding=1, aten=aten), nn.GroupNorm(2, 4), nn.ReLU(),
                        _StdConv(4, 3, 3, aten=aten, bias=False), nn.Flatten(), nn.Linear(12, 2)).to(F64)
    getattr(net, mode)()
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        return functional_call(net, p, (x,)).pow(2).sum(1)

    x = torch.randn(5, 2, 4, 4, generator=_g(1), dtype=F64)
    assert_exact(model_fn, p, x, x[:3] + 0.5, "weight standardisation")
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    state, out = step(step.init(p), x, x[:3] + 0.5)
    ref = ghostfunc.reference_graddot(model_fn, p, x, x[:3] + 0.5)
    assert rel(out.values, -0.1 / 5 * ref[0]) < 1e-10  # order 1: -(lr/n) times the scores


def test_sync_batch_norms_batch_statistics_are_refused():
    """``torch.batch_norm_stats``, the batch's statistics SyncBatchNorm takes in training mode across processes, is
    refused as BatchNorm in training mode is, before it runs (on a GPU under ``group=``; the op has no CPU kernel,
    so on this CPU the refusal is all that runs)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(F64)
    p = {k: v.detach() for k, v in lin.named_parameters()}

    def model_fn(p, batch):
        h = functional_call(lin, p, (batch,))
        mean, invstd = torch.batch_norm_stats(h, 1e-5)
        return ((h - mean) * invstd).pow(2).sum(-1)

    x = torch.randn(5, 4, dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"batch_norm in training mode.*SyncBatchNorm in training mode"):
        ghostfunc.graddot(model_fn, p, x, x)


@pytest.mark.parametrize("how", ["samples folded into the row", "samples an axis of the row"])
def test_batch_norm_over_one_row_that_holds_the_samples_is_refused(how):
    """The one-row batch_norm left to run (above) mixes samples when the model puts them into that row: refused by
    the comparison of the batch's losses with each sample's alone, at every entry point, never a silent number."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2).to(F64)
    p = {k: v.detach() for k, v in conv.named_parameters()}

    def model_fn(p, x):
        h = F.conv2d(x, p["weight"], p["bias"])  # [B, 3, 2, 2]
        if how == "samples folded into the row":
            row = h.transpose(0, 1).reshape(1, 3, -1)  # [1, C, B*4]: statistics over the batch
            out = F.batch_norm(row, None, None, training=True).reshape(3, -1, 4).transpose(0, 1)
        else:  # [1, C, B, 2, 2]: the samples a spatial axis
            out = F.batch_norm(h.transpose(0, 1).unsqueeze(0), None, None, training=True)[0].transpose(0, 1)
        return out.pow(3).flatten(1).sum(1)

    x = torch.randn(4, 2, 3, 3, generator=_g(1), dtype=F64)
    for where, call in {"graddot": ghostfunc.graddot, "inrun_shapley": ghostfunc.inrun_shapley}.items():
        with pytest.raises(SamplesInteractError, match=rf"^{where}: "):
            call(model_fn, p, x, x[:2]) if where == "graddot" else call(model_fn, p, x, x[:2], lr=0.1)


def test_batch_norm_over_one_row_switched_on_where_the_checks_cannot_see_it_is_refused():
    """A fold of the samples into one batch_norm row switched on after the checks were cached (a flag five levels
    into an object): the whole-batch replay ran it, 9.2 off the loop (h63). It runs there only over a parameter's
    own row; any other goes to the per-sample capture, which refuses a row that differs from sample to sample."""
    torch.manual_seed(0)
    p = {"w1": torch.randn(5, 6, dtype=F64), "w2": torch.randn(1, 5, dtype=F64)}
    cfg = types.SimpleNamespace(a=types.SimpleNamespace(b=types.SimpleNamespace(c=[{"fold": False}])))

    class Holder:  # (out of reach of the settings the checks are kept under)
        pass

    holder = Holder()
    holder.deep = cfg

    def model_fn(p, batch):
        x, y = batch
        h = F.linear(x, p["w1"])  # [B, T, C]
        if holder.deep.a.b.c[0]["fold"]:
            b, t = h.shape[:2]
            h = F.batch_norm(h.permute(2, 0, 1).reshape(1, 5, -1), None, None, training=True)
            h = h.reshape(5, b, t).permute(1, 2, 0)
        return (F.linear(torch.tanh(h), p["w2"]).squeeze(-1).mean(-1) - y) ** 2

    g = _g(1)
    train = (torch.randn(8, 3, 6, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64))
    val = (torch.randn(4, 3, 6, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64))
    for _ in range(2):
        ghostfunc.graddot(model_fn, p, train, val)
    holder.deep.a.b.c[0]["fold"] = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: the model calls batch_norm in training mode"):
        ghostfunc.graddot(model_fn, p, train, val)


def test_batch_norm_over_one_row_with_running_statistics_is_refused():
    """A one-row batch_norm in training mode that updates running statistics writes state every call: refused as a
    BatchNorm in train mode, and the statistics do not move."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(F64)
    p = {k: v.detach() for k, v in lin.named_parameters()}
    mean, var = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)

    def model_fn(p, x):
        w = F.batch_norm(p["weight"].T.unsqueeze(0), mean, var, training=True).squeeze(0).T
        return F.linear(x, w, p["bias"]).pow(2).sum(1)

    x = torch.randn(4, 3, generator=_g(1), dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"^graddot: the model calls batch_norm in training mode"):
        ghostfunc.graddot(model_fn, p, x, x)
    assert torch.equal(mean, torch.zeros(2, dtype=F64)) and torch.equal(var, torch.ones(2, dtype=F64))


def test_batch_norm_held_where_the_check_cannot_see_it():
    # the module lives in an object's attribute: the boundary check's cache cannot see the mode switch,
    # the capture still refuses (the in-place update of num_batches_tracked names the fix)
    class Model:
        def __init__(self) -> None:
            self.net = _bn_net()

        def __call__(self, p, x):
            return functional_call(self.net, p, (x,)).pow(2).sum(1)

    model = Model()
    p = {k: v.detach() for k, v in model.net.named_parameters()}
    x = torch.randn(4, 2, 3, 3, generator=_g(1), dtype=F64)
    model.net.eval()
    ghostfunc.graddot(model, p, x, x)
    model.net.train()
    with pytest.raises(SamplesInteractError, match=r"^graddot: .*(batch_norm in training mode|model.eval\(\))"):
        ghostfunc.graddot(model, p, x, x)


def test_samples_interact_seen_through_a_branch_every_sample_agrees_on():
    """A coupled loss stays refused when the model also branches on a tensor value (HF models ask
    ``mask.all()``): the batch and each sample alone took the same branch, so their losses are compared."""

    def baseline(p, x):
        losses = (F.linear(x, p["W"]) ** 2).sum(1)
        if bool(torch.isfinite(losses).all()):  # every run takes this branch
            losses = losses - losses.mean()
        return losses

    p = {"W": torch.randn(3, 4, dtype=torch.float64)}
    x = torch.randn(5, 4, dtype=torch.float64)
    for call in (lambda: ghostfunc.graddot(baseline, p, x, x),
                 lambda: ghostfunc.graddot_direction(baseline, p, x, {"W": torch.ones(3, 4, dtype=torch.float64)})):
        with pytest.raises(ghostfunc.SamplesInteractError, match="samples interact"):
            call()


class _Counted(nn.Module):
    """A model that counts its calls in a buffer (in place, every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def _state_writers() -> dict[str, nn.Module]:
    torch.manual_seed(6)
    conv_in = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                            nn.Flatten(), nn.Linear(16, 3))
    spectral = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Tanh(),
                             nn.Linear(5, 3))
    return {"instance norm running stats": conv_in, "spectral_norm": spectral, "a call counter": _Counted()}


@pytest.mark.parametrize("name", ["instance norm running stats", "spectral_norm", "a call counter"])
def test_a_model_that_writes_its_own_state_is_refused_and_left_as_it_was(name):
    """Running statistics in training mode, spectral_norm's power iteration, a counter: model_fn writes a buffer
    in place on every call, and graddot runs it several times, so the runs would see different models (and the
    buffer would move several times a call). Refused, naming the buffer, with the module as it was before; in
    eval mode (the first two) it is exact."""
    net = _state_writers()[name].double().train()
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}

    def fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    g = _g(3)
    shape = (7, 3, 4, 4) if name.startswith("instance") else (7, 4)
    x, y = torch.randn(*shape, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    train, val = (x[:4], y[:4]), (x[4:], y[4:])
    before = {k: b.clone() for k, b in net.named_buffers()}
    for call in (lambda: ghostfunc.graddot(fn, params, train, val),
                 lambda: ghostfunc.train_step(fn, ghostfunc.sgd(0.1))(ghostfunc.train_step(fn, ghostfunc.sgd(0.1))
                                                                       .init(params), train, val)):
        with pytest.raises(ghostfunc.StateWrittenError, match="in place on every call") as err:
            call()
        written = [k for k in before if k.rsplit(".", 1)[-1] in ("running_mean", "_u", "calls")]
        assert written and any(k in str(err.value) for k in written), str(err.value)
        assert all(torch.equal(before[k], b) for k, b in net.named_buffers()), "the check left a buffer moved"
    if name != "a call counter":
        net.eval()
        out = ghostfunc.graddot(fn, params, train, val)
        ref, _, _ = ghostfunc.reference_graddot(fn, params, train, val)
        assert rel(out.scores, ref) < 1e-10


class _Switching(nn.Module):
    """A model that counts its runs in a Python attribute and, from run ``at`` on, doubles its hidden layer; with
    ``couple``, a batch mean is added too (samples that interact). ``calls`` moves on every run either way."""

    def __init__(self, at: int, couple: bool = False, period: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.calls, self.at, self.couple, self.period = 0, at, couple, period

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.a(x))
        if (self.calls % self.period == 0) if self.period else self.calls >= self.at:
            h = h * 2
        if self.couple:
            h = h + h.mean(0)
        return self.b(h)


def _switching_call(net):
    net = net.double()
    fn, params = ghostfunc.from_module(net, lambda out, b: F.cross_entropy(out, b["y"], reduction="none"))
    g = _g(11)
    batch = lambda n: {"x": torch.randn(n, 5, generator=g, dtype=F64), "y": torch.randint(0, 3, (n,), generator=g)}  # noqa: E731
    return fn, params, batch(6), batch(4)


@pytest.mark.parametrize("how", ["from its 2nd call", "from its 3rd call", "from its 4th call", "every 2nd call",
                                 "every 3rd call", "unroll, from its 2nd call", "unroll, every 2nd call"])
def test_a_python_counter_that_switches_the_model_between_the_checks_runs_is_state_written(how):
    """A counter in a Python attribute that switches the computation between the checks' runs made the rows alone
    differ from the batch: taken for samples that interact, which names the wrong cause and fix (h85). The same
    rows run again (three times: a counter toggling it every other call agreed with the first on one run, h91)
    give other losses: StateWrittenError, naming the attribute. ``unroll``'s check of state writes runs the model
    first, and one switched at its 2nd call was scored as the switched model (2.25 off, h91): where a run moved a
    setting, the rows run again there too."""
    at, period = (int(how.split(" ")[-2][0]), 0) if "from" in how else (0, int(how.split(" ")[-2][0]))
    fn, params, train, val = _switching_call(_Switching(at, period=period))
    said = r"gave other losses for the same (train|training) rows on a later run .*it moved calls\)"
    with pytest.raises(ghostfunc.StateWrittenError, match=said):
        if how.startswith("unroll"):
            ghostfunc.unroll(fn, ghostfunc.sgd(0.1), params, [{**train, "index": torch.arange(6)}], val)
        else:
            ghostfunc.graddot(fn, params, train, val)


def test_a_logging_counter_beside_samples_that_interact_is_still_samples_interact():
    """The re-run that tells a changing model apart gives the same losses where only a logging counter moves: a
    batch mean is still named as samples that interact."""
    fn, params, train, val = _switching_call(_Switching(10 ** 9, couple=True))
    with pytest.raises(ghostfunc.SamplesInteractError, match="samples interact"):
        ghostfunc.graddot(fn, params, train, val)


def test_a_logging_counter_in_a_python_attribute_runs_exact():
    """A counter in a Python attribute its forward advances, no part of the loss: the model's own, exact."""
    net = _Switching(10 ** 9)
    fn, params, train, val = _switching_call(net)
    out = ghostfunc.graddot(fn, params, train, val)
    ref, _, _ = ghostfunc.reference_graddot(fn, params, train, val)
    assert rel(out.scores, ref) < 1e-10 and net.calls > 0


def test_a_frozen_embedding_with_max_norm_is_not_state_written():
    """torch renormalises a max_norm embedding's weight in place on every call: that is the model's own
    semantics for a (frozen) parameter, not a buffer a layer keeps; graddot runs it and equals the loop."""
    torch.manual_seed(7)
    emb = nn.Embedding(9, 4, max_norm=1.0).double().requires_grad_(False)
    params = {"w": torch.randn(3, 4, dtype=F64)}

    def fn(p, batch):
        ids, y = batch
        return F.cross_entropy(emb(ids).mean(1) @ p["w"].t(), y, reduction="none")

    g = _g(4)
    ids, y = torch.randint(0, 9, (7, 5), generator=g), torch.randint(0, 3, (7,), generator=g)
    ref, _, _ = ghostfunc.reference_graddot(fn, params, (ids[:4], y[:4]), (ids[4:], y[4:]))
    out = ghostfunc.graddot(fn, params, (ids[:4], y[:4]), (ids[4:], y[4:]))
    assert rel(out.scores, ref) < 1e-10


def test_a_copy_of_a_parameter_written_into_leaves_the_parameter():
    """``w.to(w.dtype, copy=True)`` is a copy the model may write into, not the parameter itself."""
    torch.manual_seed(8)
    params = {"w": torch.randn(3, 4, dtype=F64)}
    kept = params["w"].clone()

    def fn(p, batch):
        x, y = batch
        w = p["w"].to(F64, copy=True)
        w.mul_(2.0)
        return F.cross_entropy(x @ w.t(), y, reduction="none")

    g = _g(5)
    x, y = torch.randn(7, 4, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    out = ghostfunc.graddot(fn, params, (x[:4], y[:4]), (x[4:], y[4:]))
    ref, _, _ = ghostfunc.reference_graddot(fn, params, (x[:4], y[:4]), (x[4:], y[4:]))
    assert rel(out.scores, ref) < 1e-10
    assert torch.equal(params["w"], kept)


_PARAM_WRITES = {
    "mul_": lambda w: w.mul_(0.9),
    "a row set": lambda w: w.__setitem__(0, 0.0),
    "a view's add_": lambda w: w[:, 1:].add_(1.0),
    "+=": lambda w: w.__iadd__(1.0),
    "out=": lambda w: torch.mul(w, 2.0, out=w),
    "nn.init": lambda w: nn.init.normal_(w),
    ".data": lambda w: w.data.mul_(2.0),
}


@pytest.mark.parametrize("how", list(_PARAM_WRITES))
def test_a_model_that_writes_into_its_params_is_refused_before_the_write(how):
    """A model_fn that writes into a tensor of params (in place, under no_grad, through a view or ``.data``)
    would change the caller's parameters once per internal run and make those runs see different models:
    refused, naming the parameter and the call, before the write happens (graddot and train_step; unroll below),
    whether the write is in model_fn or in a module's forward reached through functional_call."""
    write = _PARAM_WRITES[how]

    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                write(self.lin.weight)
            return self.lin(x)

    torch.manual_seed(10)
    net = Writes().double()
    g = _g(7)
    x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    train, val = (x[:4], y[:4]), (x[4:], y[4:])

    def in_fn(p, b):
        with torch.no_grad():
            write(p["lin.weight"])
        return F.cross_entropy(F.linear(b[0], p["lin.weight"], p["lin.bias"]), b[1], reduction="none")

    def in_module(p, b):
        return F.cross_entropy(functional_call(net, p, (b[0],)), b[1], reduction="none")

    for fn in (in_fn, in_module):
        params = {k: v.detach().clone() for k, v in net.named_parameters()}
        kept = {k: v.clone() for k, v in params.items()}
        step = ghostfunc.train_step(fn, ghostfunc.sgd(0.1))
        for where in ("graddot", "train_step"):
            with pytest.raises(ghostfunc.StateWrittenError, match=f"{where}: model_fn writes into "
                                                                  r"params\['lin.weight'\] in place"):
                if where == "graddot":
                    ghostfunc.graddot(fn, params, train, val)
                else:
                    step(step.init(params), train, val)
            assert all(torch.equal(kept[k], v) for k, v in params.items()), f"{where} changed params ({how})"


def test_unroll_refuses_a_model_that_writes_into_its_params():
    """unroll replays a run many times: a model_fn that writes into params is refused before the write."""
    torch.manual_seed(11)
    params = {"w": torch.randn(3, 4, dtype=F64)}
    kept = params["w"].clone()

    def fn(p, b):
        with torch.no_grad():
            p["w"].mul_(0.9)
        return F.cross_entropy(b["x"] @ p["w"].t(), b["y"], reduction="none")

    g = _g(8)
    x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    batches = [{"x": x[:4], "y": y[:4], "index": torch.arange(4)}, {"x": x[4:], "y": y[4:], "index": torch.arange(4, 8)}]
    with pytest.raises(ghostfunc.StateWrittenError, match=r"unroll: model_fn writes into params\['w'\] in place"):
        ghostfunc.unroll(fn, ghostfunc.sgd(0.1), params, batches, {"x": x[:3], "y": y[:3]})
    assert torch.equal(params["w"], kept)


class _Lazy(nn.Module):
    """Fills a buffer on its first call (a cache made lazily)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.zeros(4))
        self.ready = False

    def forward(self, x):
        if not self.ready:
            self.scale.copy_(torch.linspace(0.5, 1.5, 4, dtype=self.scale.dtype))
            self.ready = True
        return self.lin(x * self.scale)


@pytest.mark.parametrize("holder", ["closure", "dict", "trainer"])
def test_state_writes_are_told_from_fills_wherever_the_model_is_held(holder):
    """A buffer filled once (lazily) is the model's own: it runs and equals the loop (a refusal that put it back
    would leave the module's own flag saying it is filled). A buffer moved by every call is refused however the model is held (in the closure, in a dict, on a
    trainer object), and put back."""
    torch.manual_seed(9)
    lazy = _Lazy().double()
    spectral = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Tanh(),
                             nn.Linear(5, 3)).double().train()

    def make(net):
        if holder == "closure":
            return lambda p, b: F.cross_entropy(functional_call(net, p, (b[0],)), b[1], reduction="none")
        if holder == "dict":
            held = {"model": net}
            return lambda p, b: F.cross_entropy(functional_call(held["model"], p, (b[0],)), b[1], reduction="none")

        class Trainer:
            def __init__(self, model):
                self.model = model

            def loss(self, p, b):
                return F.cross_entropy(functional_call(self.model, p, (b[0],)), b[1], reduction="none")
        return Trainer(net).loss

    g = _g(6)
    x, y = torch.randn(7, 4, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    train, val = (x[:4], y[:4]), (x[4:], y[4:])
    fn = make(lazy)
    params = {k: v.detach() for k, v in lazy.named_parameters()}
    out = ghostfunc.graddot(fn, params, train, val)
    ref, _, _ = ghostfunc.reference_graddot(fn, params, train, val)
    assert rel(out.scores, ref) < 1e-10 and lazy.ready and float(lazy.scale[0]) == 0.5
    fn = make(spectral)
    params = {k: v.detach() for k, v in spectral.named_parameters() if v.requires_grad}
    before = {k: b.clone() for k, b in spectral.named_buffers()}
    with pytest.raises(ghostfunc.StateWrittenError, match="graddot: model_fn writes into the buffer"):
        ghostfunc.graddot(fn, params, train, val)
    assert all(torch.equal(before[k], b) for k, b in spectral.named_buffers())


class _Config:  # a plain object: hashed and compared by identity
    def __init__(self, centre: bool) -> None:
        self.centre = centre


@dataclasses.dataclass
class _DataConfig:  # eq=True: unhashable
    centre: bool = False


@dataclasses.dataclass(frozen=True)
class _TupleDefaults:  # defaults the class holds: a tuple and a frozenset of numbers, a dtype, a class
    betas: tuple = (0.9, 0.999)
    sizes: frozenset = frozenset({1, 2})
    dtype: torch.dtype = torch.float64
    act: type = nn.Tanh


@dataclasses.dataclass
class _WithMethods:  # a helper method and a property reading only the instance
    scale: float = 1.0

    def doubled(self):
        return 2 * self.scale

    @property
    def halved(self):
        return self.scale / 2


def _centring(net, centre_of):
    """``net``'s cross-entropy per sample on ``batch["x"]``, centred over the batch (the rows then interact) where
    ``centre_of(batch)``."""
    def model_fn(params, batch):
        x = batch["x"] - batch["x"].mean(0, keepdim=True) if centre_of(batch) else batch["x"]
        return F.cross_entropy(functional_call(net, params, (x,)), batch["y"], reduction="none")

    return model_fn


@pytest.mark.parametrize("how", ["plain object changed in place", "dataclass changed in place",
                                 "new dataclass per call"])
def test_a_config_leaf_of_the_batch_that_changes_is_a_new_signature(how):
    """A non-tensor leaf of the batch that ``model_fn`` branches on (``if cfg.centre: x - x.mean(0)``) changed
    between calls: in place, or a new object per call (which CPython puts where the freed one was, so a bare
    ``id`` matched). The first calls' checks and whole-batch replay were kept for the changed leaf (0.46-0.65
    off); now it is a new signature, checked again, and refused as interacting."""
    net = _mlp(13)
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _centring(net, lambda batch: batch["cfg"].centre)

    (tx, ty), (vx, vy) = _xy(9, 14), _xy(4, 15)
    kind = _Config if how.startswith("plain") else _DataConfig
    cfg = kind(False)
    for _ in range(3):
        if how == "new dataclass per call":
            del cfg
            cfg = kind(False)
        train, val = {"x": tx, "y": ty, "cfg": cfg}, {"x": vx, "y": vy, "cfg": cfg}
        ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10
    if how == "new dataclass per call":
        del cfg, train, val
        cfg = kind(True)
    else:
        cfg.centre = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, {"x": tx, "y": ty, "cfg": cfg}, {"x": vx, "y": vy, "cfg": cfg})


class _Refusing:
    """A hashable leaf whose equality refuses (``__eq__`` raises), or answers with an array."""

    def __init__(self, scale, answer):
        self.scale, self.answer = scale, answer

    def __hash__(self):
        return 7  # every one collides: the caches' lookups would compare them

    def __eq__(self, other):
        if self.answer == "raise":
            raise TypeError("not comparable")
        return np.array([True, False])


@pytest.mark.parametrize("answer", ["raise", "array"])
def test_a_batch_leaf_whose_equality_refuses_is_kept_by_identity(answer):
    """A hashable leaf whose ``__eq__`` raises or answers with an array was keyed by value, and the second call's
    cache lookup raised the leaf's own error (or NumPy's ambiguous truth value) out of ``graddot``; such a leaf
    is kept by identity and fingerprint, and each call gets its own leaf's numbers."""
    net = _mlp(22)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        x, y, leaf = batch
        return F.cross_entropy(functional_call(net, params, (x * leaf.scale,)), y, reduction="none")

    (tx, ty), (vx, vy) = _xy(6, 23), _xy(3, 24)
    for scale in (1.0, 2.0, 1.0):
        leaf = _Refusing(scale, answer)
        train, val = (tx, ty, leaf), (vx, vy, leaf)
        ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10


def test_a_forward_patched_in_again_where_the_last_one_was_freed_is_checked_again():
    """A context manager that sets ``module.forward`` and deletes it on exit: the next patch's object lands where
    the last one was, so a bare ``id`` in the training flags matched and a patch that centres over the batch
    kept the harmless one's checks (0.53 off)."""
    net = _mlp(16)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(8, 17), _xy(4, 18)
    first = net[1]

    def centred(h, k):
        return torch.tanh(h - k * h.mean(0, keepdim=True))

    for k in (0.0, 0.0, 0.5):
        first.forward = functools.partial(centred, k=k)
        try:
            if k == 0.0:
                ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
                assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10
            else:
                with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
                    ghostfunc.graddot(model_fn, p, train, val)
        finally:
            del first.forward


def test_a_branch_on_a_tensors_repr_is_taken_per_sample():
    """``if "True" in str(mask)``: under ``vmap`` a tensor's repr prints every sample's rows, so every sample took
    the branch only one of them takes alone (0.31 off); now a data-dependent branch like ``.item()``."""
    net = _mlp(19)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        x, y = batch
        if "True" in str((x.abs() > 2.5).any(-1)):
            x = x * 0.5
        return F.cross_entropy(functional_call(net, params, (x,)), y, reduction="none")

    (tx, ty), val = _xy(8, 20), _xy(4, 21)
    tx = tx.clamp(-2, 2)
    tx[5, 0] = 3.0  # one sample over the threshold
    ref = ghostfunc.reference_graddot(model_fn, p, (tx, ty), val)[0]
    for _ in range(2):
        assert rel(ghostfunc.graddot(model_fn, p, (tx, ty), val).scores, ref) < 1e-10


def test_the_secant_takes_the_validation_gradient_again_when_a_config_leaf_changes():
    """``train_step(order=2, curvature="secant")`` carries ``ḡ_val`` to the next step when the validation batch is
    the same by value; a config leaf of it (per-class loss weights) changed in place, or made anew where the
    old one was freed, is another batch (the carried gradient was reused: values 0.41 off)."""
    torch.manual_seed(22)
    params = {"w1": torch.randn(6, 4, dtype=F64) / 2, "b1": torch.zeros(6, dtype=F64),
              "w2": torch.randn(3, 6, dtype=F64) / 2}

    def model_fn(p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
        w = torch.tensor(batch["cfg"].weights, dtype=h.dtype)
        return F.cross_entropy(F.linear(h, p["w2"]), batch["y"], reduction="none") * w[batch["y"]]

    @dataclasses.dataclass
    class Weights:
        weights: tuple = (1.0, 1.0, 1.0)

    (tx, ty), (vx, vy) = _xy(10, 23), _xy(6, 24)
    vy[0] = 0
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=2, curvature="secant")
    for how in ("in place", "new object"):
        cfg = Weights()
        state, _ = step(step.init(params), {"x": tx, "y": ty, "cfg": Weights()}, {"x": vx, "y": vy, "cfg": cfg})
        if how == "in place":
            cfg.weights = (1.0, 1.0, 5.0)
        else:
            del cfg
            cfg = Weights((1.0, 1.0, 5.0))
        val = {"x": vx, "y": vy, "cfg": cfg}
        _, carried = step(state, {"x": tx, "y": ty, "cfg": Weights()}, val)
        _, fresh = step(state._replace(val_grad=None), {"x": tx, "y": ty, "cfg": Weights()}, val)
        assert rel(carried.values, fresh.values) < 1e-10, how
        assert torch.equal(carried.val_loss, fresh.val_loss), how


class _ActNorm(nn.Module):
    """Centres by the mean of the first batch it sees (a data-dependent initialisation), flagged by a buffer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(width, dtype=F64))
        self.register_buffer("done", torch.tensor(False))

    def forward(self, h):
        if not self.done:
            with torch.no_grad():
                self.mu.copy_(h.mean(0))
                self.done.fill_(True)
        return h - self.mu


def test_a_buffer_filled_from_the_first_batch_is_refused_until_the_model_has_seen_one():
    """ActNorm's initialisation: a buffer filled once, from whichever batch comes first. graddot's checks ran
    first on three training rows, so the model was initialised from them (0.27 off a loop after a plain
    forward). Refused, with the buffers put back; after a plain forward on the batch it runs and equals the loop."""
    torch.manual_seed(25)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), _ActNorm(5), nn.Linear(5, 3)).double()
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(9, 26), _xy(4, 27)
    with pytest.raises(SamplesInteractError, match=r"^graddot: model_fn fills the buffer\(s\) 2.mu from the batch"):
        ghostfunc.graddot(model_fn, p, train, val)
    assert not bool(net[2].done) and not net[2].mu.any()
    model_fn(p, train)  # the training loop's first forward
    ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
    assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10


@pytest.mark.parametrize("couples", ["with gradients on", "without gradients"])
def test_the_interaction_check_runs_the_model_as_the_capture_does(couples):
    """The check ran the model without gradients: one that standardises over the batch only without them (an
    evaluation mode keyed on ``torch.is_grad_enabled()``) was refused though the capture never runs it so, and
    one that couples rows only with gradients on passed. It runs with gradients on now, as the capture does."""
    net = _mlp(28)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        x, y = batch
        if torch.is_grad_enabled() == (couples == "with gradients on"):
            x = x - 0.5 * x.mean(0)
        return F.cross_entropy(functional_call(net, params, (x,)), y, reduction="none")

    train, val = _xy(9, 29), _xy(4, 30)
    if couples == "with gradients on":
        with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
            ghostfunc.graddot(model_fn, p, train, val)
    else:
        ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10


def test_a_batch_leaf_holding_the_model_is_not_checked_again_after_each_step(monkeypatch):
    """A batch whose config leaf holds the trained module (``SimpleNamespace(model=net, temperature=...)``) in a
    ``torch.optim`` loop: the module is keyed by identity, not by its tensors' versions (which every step
    moves), so the checks run once, not on every call (36 ms a call against 1.3 ms)."""
    from ghostfunc import _interact

    net = _mlp(31)
    checks = []
    real = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or real(*a, **k))

    def model_fn(params, batch):
        logits = functional_call(batch["ctx"].model, params, (batch["x"],)) / batch["ctx"].temperature
        return F.cross_entropy(logits, batch["y"], reduction="none")

    ctx = types.SimpleNamespace(model=net, temperature=2.0)
    (tx, ty), (vx, vy) = _xy(8, 32), _xy(4, 33)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        p = {k: v.detach() for k, v in net.named_parameters()}
        train, val = {"x": tx, "y": ty, "ctx": ctx}, {"x": vx, "y": vy, "ctx": ctx}
        ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10
        opt.zero_grad()
        model_fn(dict(net.named_parameters()), train).mean().backward()
        opt.step()
    assert len(checks) == 1  # (train and val rows share a signature)
    ctx.temperature = 0.5  # what it holds by value: checked again
    ghostfunc.graddot(model_fn, {k: v.detach() for k, v in net.named_parameters()}, train, val)
    assert len(checks) == 2


def _exact_until_coupled(model_fn, p, train, val, couple):
    """Two calls equal to the loop, then ``couple()`` turns on a coupling of rows in place: refused."""
    for _ in range(2):
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
                   ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
    couple()
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, train, val)


def test_a_new_leaf_holding_an_object_beyond_the_walks_depth_is_checked_again():
    """A leaf made anew per call holding, four levels down, a shared object changed in place: beyond the walk's
    depth that object was keyed by its identity alone, and the new leaf's key matched the last one's (0.32 off the
    loop once the change coupled the rows). The leaf's identity is in its key then."""
    net = _mlp(64)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _centring(net, lambda batch: batch["meta"].a.b.c.centre)
    (tx, ty), (vx, vy) = _xy(8, 65), _xy(4, 66)
    shared = types.SimpleNamespace(centre=False)

    def batches():
        meta = types.SimpleNamespace(a=types.SimpleNamespace(b=types.SimpleNamespace(c=shared)))
        return {"x": tx, "y": ty, "meta": meta}, {"x": vx, "y": vy, "meta": meta}

    for _ in range(2):
        train, val = batches()
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
                   ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
    shared.centre = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, *batches())


def test_batches_of_one_sample_are_checked_once_and_a_bigger_batch_again(monkeypatch):
    """Online scoring, one row against one query: a batch of one sample says nothing about a bigger batch of its
    signature, so its check was not kept and ran on every call (2x a call). It is kept for batches of one; the
    first bigger batch is still checked, and a model whose rows interact is refused there."""
    from ghostfunc import _interact

    checks = []
    real = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or real(*a, **k))
    net = _mlp(67)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _centring(net, lambda batch: len(batch["x"]) > 1)  # rows interact whenever there are several
    for seed in range(4):
        (tx, ty), (vx, vy) = _xy(1, 70 + seed), _xy(1, 80 + seed)
        train, val = {"x": tx, "y": ty}, {"x": vx, "y": vy}
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
                   ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
    assert len(checks) == 1  # (train and validation rows share a signature)
    (tx, ty), (vx, vy) = _xy(4, 90), _xy(1, 91)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, p, {"x": tx, "y": ty}, {"x": vx, "y": vy})


def test_a_flag_listed_after_a_long_list_is_keyed():
    """A config holding a 300-item list before its flag: the walk spent its 256 entries on the list, so the flag
    was out of the key and turning it on in place kept the first calls' checks (0.57 off the loop). Numbers and
    strings are walked before the containers beside them."""
    net = _mlp(53)
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _centring(net, lambda batch: batch["meta"].centre)

    (tx, ty), (vx, vy) = _xy(8, 54), _xy(4, 55)
    meta = types.SimpleNamespace(vocab=list(range(300)), centre=False)
    train, val = {"x": tx, "y": ty, "meta": meta}, {"x": vx, "y": vy, "meta": meta}
    _exact_until_coupled(model_fn, p, train, val, lambda: setattr(meta, "centre", True))


@dataclasses.dataclass(frozen=True)
class _Options:  # a frozen dataclass: hashable, compares its fields, and so the config it holds by identity
    cfg: _Config


class _Task:  # equal and hashed by name, with a mutable config beside it
    def __init__(self, name, cfg):
        self.name, self.cfg = name, cfg

    def __eq__(self, other):
        return isinstance(other, _Task) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


@pytest.mark.parametrize("wrap", [_Options, functools.partial(_Task, "task")], ids=["frozen dataclass", "eq by name"])
def test_a_leaf_that_compares_by_value_holding_a_config_changed_in_place_is_checked_again(wrap):
    """A batch leaf with an equality of its own (a frozen dataclass, a class equal by name) holding a mutable
    config: it was keyed by itself, whose ``__eq__`` compares the config by identity (or not at all), so turning
    on a coupling of rows in place kept the first calls' checks (3.28 off the loop). Keyed by what it holds."""
    net = _mlp(34)
    p = {k: v.detach() for k, v in net.named_parameters()}

    model_fn = _centring(net, lambda batch: batch["meta"].cfg.centre)

    (tx, ty), (vx, vy) = _xy(8, 35), _xy(4, 36)
    cfg = _Config(False)
    train, val = {"x": tx, "y": ty, "meta": wrap(cfg)}, {"x": vx, "y": vy, "meta": wrap(cfg)}
    _exact_until_coupled(model_fn, p, train, val, lambda: setattr(cfg, "centre", True))


_BOUND = _Config(True)


@pytest.mark.parametrize("make", [lambda: _DataConfig(False), lambda: np.arange(6.0), lambda: {"scale": [1.0, 2.0]},
                                  lambda: types.SimpleNamespace(weights=torch.arange(3.0)),
                                  lambda: datetime.date(2026, 1, 2), lambda: decimal.Decimal("1.5"), lambda: range(3),
                                  lambda: np.dtype([("a", "f4")]), lambda: _BOUND.__init__, _TupleDefaults,
                                  _WithMethods, lambda: argparse.Namespace(lr=0.1, name="run")],
                         ids=["dataclass", "array", "dict of lists", "namespace holding a tensor", "date", "Decimal",
                              "range", "structured dtype", "bound method", "dataclass with tuple and class defaults",
                              "dataclass with a method and a property", "argparse Namespace"])
def test_an_equal_leaf_made_anew_for_every_call_is_not_checked_again(monkeypatch, make):
    """A non-tensor leaf made anew for each call with the same contents (a config dataclass, a small array or
    tensor, a dict): its key is what it holds, not its identity, so the first call's checks hold (they ran on
    every call: 50 ms a call against 1 ms); one with other contents is checked again. So are immutable values
    beyond numbers and strings (a date, a ``Decimal``, a ``range``, a NumPy dtype) and a bound method (made anew
    on each access: keyed by its object and function), which were checked again on every call (20 ms against
    0.7) once their own equality was no longer used. A class with methods or Python properties of its own (an
    ``argparse.Namespace``) is keyed with what they read, not by identity (checked again per call: 40-50 ms)."""
    from ghostfunc import _interact

    net = _mlp(37)
    p = {k: v.detach() for k, v in net.named_parameters()}
    checks = []
    real = _interact._check_batch
    monkeypatch.setattr(_interact, "_check_batch", lambda *a, **k: checks.append(1) or real(*a, **k))

    def model_fn(params, batch):
        return F.cross_entropy(functional_call(net, params, (batch["x"],)), batch["y"], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 38), _xy(4, 39)
    for _ in range(4):
        leaf = make()
        ghostfunc.graddot(model_fn, p, {"x": tx, "y": ty, "leaf": leaf}, {"x": vx, "y": vy, "leaf": leaf})
    assert len(checks) == 1
    ghostfunc.graddot(model_fn, p, {"x": tx, "y": ty, "leaf": [leaf]}, {"x": vx, "y": vy, "leaf": [leaf]})
    assert len(checks) == 2


_SETTINGS = {"centre": False}


class _ClassDefault:  # a class-level default, changed on the class between calls
    centre = False


class _Computed:  # a property reading module state
    @property
    def centre(self):
        return _SETTINGS["centre"]


class _Options2(dict):  # a dict subclass holding an attribute
    pass


def _optioned(centre):
    opts = _Options2(a=1)
    opts.centre = centre
    return types.SimpleNamespace(opts=opts)


_FLAG = [False]


def _held():
    return _FLAG[0]


class _Mode(enum.Enum):
    PLAIN = 0
    CENTRE = 1


class _ClassEnum:  # an enum default on the class
    mode = _Mode.PLAIN


class _ClassDict:  # a dict on the class, changed in place
    opts = {"centre": False}


class _Method:  # a method reading module state
    def centre(self):
        return _SETTINGS["centre"]


class _Flags:  # a class used as a namespace of constants
    centre = False


def _never():
    return False


def _always():
    return True


_HELPER = _never


class _ReadsAClass:  # a method reading a global class's attribute
    def centre(self):
        return _Flags.centre


class _CallsAHelper:  # a method calling a global function the user rebinds
    def centre(self):
        return _HELPER()


class _DeepGlobal:  # a method reading a global four levels down
    def centre(self):
        return _DEEP.a.b.c.centre


_DEEP = types.SimpleNamespace(a=types.SimpleNamespace(b=types.SimpleNamespace(c=types.SimpleNamespace(centre=False))))


_OUT_OF_SIGHT = {"partial": lambda leaf: leaf(), "class attribute": lambda leaf: leaf.centre,
                 "property": lambda leaf: leaf.centre, "dict subclass": lambda leaf: leaf.opts.centre,
                 "held function": lambda leaf: leaf.f(), "class enum": lambda leaf: leaf.mode is _Mode.CENTRE,
                 "class dict": lambda leaf: leaf.opts["centre"], "method": lambda leaf: leaf.centre(),
                 "held class": lambda leaf: leaf.kind.centre, "method reading a class": lambda leaf: leaf.centre(),
                 "method calling a rebound helper": lambda leaf: leaf.centre(),
                 "method reading deep": lambda leaf: leaf.centre()}


@pytest.mark.parametrize("case", list(_OUT_OF_SIGHT))
def test_a_new_leaf_whose_state_is_out_of_the_walks_sight_is_checked_again(case):
    """A leaf made anew for a call whose walked contents equal the last one's, but whose state is partly out of
    sight (a ``functools.partial``'s arguments, a class attribute, a property, a dict subclass's attribute, the
    closure of a function it holds, an enum or a dict on its class, a method of its own reading module state,
    a class it holds): keyed by contents alone, the first call's checks were kept when the state turned on a
    coupling of rows (up to 369 against 0; the last four 0.57, in ``train_step`` and ``inrun_shapley`` too).
    Such a leaf is keyed by its identity too, or its class by the values it holds."""
    net = _mlp(43)
    p = {k: v.detach() for k, v in net.named_parameters()}
    centre_of = _OUT_OF_SIGHT[case]

    model_fn = _centring(net, lambda batch: centre_of(batch["leaf"]))

    def make(centre):
        if case == "partial":
            return functools.partial(bool, centre)
        if case == "dict subclass":
            return _optioned(centre)
        _SETTINGS["centre"] = _FLAG[0] = _ClassDefault.centre = _ClassDict.opts["centre"] = centre
        _Flags.centre = _DEEP.a.b.c.centre = centre
        _ClassEnum.mode = _Mode.CENTRE if centre else _Mode.PLAIN
        globals()["_HELPER"] = _always if centre else _never
        return {"class attribute": _ClassDefault, "property": _Computed,
                "held function": lambda: types.SimpleNamespace(f=_held), "class enum": _ClassEnum,
                "class dict": _ClassDict, "method": _Method,
                "held class": lambda: types.SimpleNamespace(kind=_ClassDefault), "method reading a class": _ReadsAClass,
                "method calling a rebound helper": _CallsAHelper, "method reading deep": _DeepGlobal}[case]()

    (tx, ty), (vx, vy) = _xy(8, 44), _xy(4, 45)
    try:
        for centre in (False, False, True):
            leaf = make(centre)
            train, val = {"x": tx, "y": ty, "leaf": leaf}, {"x": vx, "y": vy, "leaf": leaf}
            if not centre:
                assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
                           ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
            else:
                with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
                    ghostfunc.graddot(model_fn, p, train, val)
    finally:
        _SETTINGS["centre"] = _FLAG[0] = _ClassDefault.centre = _ClassDict.opts["centre"] = False
        _Flags.centre = _DEEP.a.b.c.centre = False
        _ClassEnum.mode = _Mode.PLAIN
        globals()["_HELPER"] = _never


class _ClassLeaf:  # a class passed as a leaf itself, its setting on the class
    centre = False


class _Patched:  # a method replaced on the class after the first calls
    def centre(self):
        return False


_STRENGTH = {"centre": False}


class _EnumMode(enum.Enum):  # a member whose property reads a module's dict
    CENTRE = "centre"

    @property
    def on(self):
        return _STRENGTH[self.value]


class _IntMode(enum.IntEnum):  # an IntEnum (an int too) whose property reads a module's dict
    CENTRE = 1

    @property
    def on(self):
        return _STRENGTH["centre"]


class _CallMode(enum.Enum):  # a member whose own __call__ reads a module's dict
    CENTRE = "centre"

    def __call__(self):
        return _STRENGTH[self.value]


def _strength():  # a plain function passed as a leaf, reading a module's dict
    return _STRENGTH["centre"]


class _Holder:
    def __init__(self):
        self.centre = False

    def get(self):
        return self.centre


def _opts_get(opts):
    return opts["centre"]


_CHANGED_LATER = {"class as the leaf": lambda leaf: leaf.centre, "class in a dict": lambda leaf: leaf["c"].centre,
                  "method patched on the class": lambda leaf: leaf.centre(), "enum property": lambda leaf: leaf.on,
                  "bound method": lambda leaf: leaf(), "partial over a dict": lambda leaf: leaf(),
                  "IntEnum property": lambda leaf: leaf.on, "partial of a bound method": lambda leaf: leaf(),
                  "enum __call__": lambda leaf: leaf(), "function": lambda leaf: leaf()}


@pytest.mark.parametrize("case", list(_CHANGED_LATER))
def test_a_leaf_changed_where_its_key_did_not_look_is_checked_again(case):
    """A class passed as a leaf (its setting changed on the class), a method replaced on a config's class, an enum
    member whose property (or own ``__call__``) reads a module's dict, a bound method whose object changes in place,
    a partial over a dict changed in place, a function reading a module's dict: each kept the first calls' checks
    when the change turned on a coupling of rows (0.55-0.76 off). Classes are keyed with their settings and methods, enum members with what their methods read, bound
    methods and partials with what their object and arguments hold."""
    net = _mlp(47)
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _centring(net, lambda batch: _CHANGED_LATER[case](batch["leaf"]))
    holder, opts = _Holder(), {"centre": False}
    leaf = {"class as the leaf": _ClassLeaf, "class in a dict": {"c": _ClassLeaf},
            "method patched on the class": _Patched(), "enum property": _EnumMode.CENTRE,
            "bound method": holder.get, "partial over a dict": functools.partial(_opts_get, opts),
            "IntEnum property": _IntMode.CENTRE, "partial of a bound method": functools.partial(holder.get),
            "enum __call__": _CallMode.CENTRE, "function": _strength}[case]
    (tx, ty), (vx, vy) = _xy(8, 48), _xy(4, 49)
    train, val = {"x": tx, "y": ty, "leaf": leaf}, {"x": vx, "y": vy, "leaf": leaf}
    try:
        for _ in range(2):
            assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
                       ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
        _ClassLeaf.centre = _STRENGTH["centre"] = holder.centre = opts["centre"] = True
        _Patched.centre = lambda self: True
        with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
            ghostfunc.graddot(model_fn, p, train, val)
    finally:
        _ClassLeaf.centre = _STRENGTH["centre"] = False
        _Patched.centre = lambda self: False


def test_odd_leaves_a_proxy_and_a_string_naming_a_tensor():
    """A transparent proxy around a dict (its __class__ answers dict) is a leaf, not a mapping to rebuild (it
    raised "not subscriptable"); a config holding the string "tensor" does not send compile=True's calls to run
    eagerly as if it held a tensor."""
    from ghostfunc._capture import _hashable
    from ghostfunc._compiled import _holds_data

    class Proxy:
        def __init__(self, target):
            object.__setattr__(self, "_t", target)

        def __getattribute__(self, name):
            if name == "_t":
                return object.__getattribute__(self, name)
            return getattr(object.__getattribute__(self, "_t"), name)

    net = _mlp(51)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        return F.cross_entropy(functional_call(net, params, (batch["x"],)), batch["y"], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 52), _xy(4, 53)
    leaf = Proxy({"a": 1})
    train, val = {"x": tx, "y": ty, "m": leaf}, {"x": vx, "y": vy, "m": leaf}
    assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
               ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10
    assert not _holds_data(_hashable(types.SimpleNamespace(kind="tensor", names=["array"])))
    assert _holds_data(_hashable(types.SimpleNamespace(kind=torch.ones(2))))


def test_a_partial_leaf_the_walk_cannot_see_whole_keeps_one_key():
    """A partial whose arguments the walk cannot see whole (a dict of tensors past the checksum's bytes) was keyed by
    the identity of a tuple made for each walk: a new key, and every check again, on every call (7x a call)."""
    from ghostfunc._capture import _hashable
    from ghostfunc._interact import _SCOPE

    big = {"w": torch.zeros(40_000)}  # past LEAF_ARRAY_BYTES: by identity and version
    leaf = functools.partial(_opts_get, big)
    keys = []
    for _ in range(2):
        _SCOPE.memo = {}
        try:
            keys.append(_hashable(leaf))
        finally:
            _SCOPE.memo = None
    assert keys[0] == keys[1]


def test_a_write_into_the_batch_names_the_batch_and_the_fix():
    """model_fn writing into its input (x.sub_(0.5)) was told it updates "a module buffer (BatchNorm ...)"; the
    message names the batch too, and the out-of-place form."""
    net = _mlp(55)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        x = batch["x"]
        x.sub_(0.5)
        return F.cross_entropy(functional_call(net, params, (x,)), batch["y"], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 56), _xy(4, 57)
    with pytest.raises(SamplesInteractError, match=r"a tensor of the batch.*x = x - 0\.5"):
        ghostfunc.graddot(model_fn, p, {"x": tx, "y": ty}, {"x": vx, "y": vy})


def test_a_set_leaf_is_keyed_without_its_items_repr():
    """A set leaf was ordered by its items' ``repr``: one that raises raised out of ``graddot``, and a set of a
    million ints was sorted on every call (144 ms a call)."""
    class Loud:
        def __repr__(self):
            raise RuntimeError("no repr")

    net = _mlp(40)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        return F.cross_entropy(functional_call(net, params, (batch[0],)), batch[1], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 41), _xy(4, 42)
    for leaf in ({Loud(), Loud()}, set(range(10**6))):
        ref = ghostfunc.reference_graddot(model_fn, p, (tx, ty, leaf), (vx, vy, leaf))[0]
        assert rel(ghostfunc.graddot(model_fn, p, (tx, ty, leaf), (vx, vy, leaf)).scores, ref) < 1e-10


@pytest.mark.parametrize("make", [lambda: torch.fft.rfft(torch.randn(8)).conj(), lambda: torch._neg_view(torch.randn(4)),
                                  lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]),
                                  lambda: _inference(torch.randn(20_000)), lambda: _inference(torch.randn(4))],
                         ids=["conjugate view", "negative view", "nested", "large inference tensor",
                              "small inference tensor"])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_batch_leaf_holding_a_tensor_torch_cannot_read_as_bytes_runs(make):
    """A config holding a tensor whose bytes torch will not view (a conjugate or negative view, a nested tensor) or
    one made under ``torch.inference_mode()`` (no version counter): the leaf's key raised torch's error out of
    ``graddot``; such a tensor is keyed by identity (and version where it has one)."""
    net = _mlp(46)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        return F.cross_entropy(functional_call(net, params, (batch["x"],)), batch["y"], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 47), _xy(4, 48)
    meta = types.SimpleNamespace(filter=make())
    train, val = {"x": tx, "y": ty, "meta": meta}, {"x": vx, "y": vy, "meta": meta}
    ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
    for _ in range(2):
        assert rel(ghostfunc.graddot(model_fn, p, train, val).scores, ref) < 1e-10


def _inference(x):
    with torch.inference_mode():
        return x.clone()


def test_a_module_made_under_inference_mode_is_read_without_its_version_counter():
    """A frozen module built under ``torch.inference_mode()`` (its buffer added to the output) runs in plain
    PyTorch; the check of which buffers the model writes read its version counter and raised torch's
    "Inference tensors do not track version counter"."""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.randn(3, generator=_g(60), dtype=F64))

        def forward(self, x):
            return x + self.shift

    with torch.inference_mode():
        shift = Shift()
    net = _mlp(61)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(params, batch):
        return F.cross_entropy(shift(functional_call(net, params, (batch["x"],))), batch["y"], reduction="none")

    (tx, ty), (vx, vy) = _xy(8, 62), _xy(4, 63)
    train, val = {"x": tx, "y": ty}, {"x": vx, "y": vy}
    assert rel(ghostfunc.graddot(model_fn, p, train, val).scores,
               ghostfunc.reference_graddot(model_fn, p, train, val)[0]) < 1e-10


class _RandomFeatures(nn.Module):
    """Random features drawn once, on the first call, after dropout: a fill that reads no data."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(5, 5, dtype=F64))
        self.register_buffer("ready", torch.tensor(False))

    def forward(self, h):
        if not self.ready:
            self.w.normal_()
            self.ready.fill_(True)
        return h @ self.w


def test_a_random_fill_after_dropout_is_not_taken_for_one_from_the_batch():
    """Dropout in training mode, then a buffer filled once with random numbers: one row draws other numbers than
    three, so the fill differed and was taken for one from the batch; a model that draws is not judged so."""
    torch.manual_seed(34)
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.2), _RandomFeatures(), nn.Tanh(), nn.Linear(5, 3)).double()
    p = {k: v.detach() for k, v in net.named_parameters()}
    out = ghostfunc.graddot(_cross_entropy_of(net), p, _xy(8, 35), _xy(4, 36))
    assert torch.isfinite(out.scores).all() and bool(net[2].ready)


class _Refresh(nn.Module):
    """Copies a value from the batch into a buffer on every call, then scales by the buffer (longrope's way)."""

    def __init__(self, agreed: bool, how: str) -> None:
        super().__init__()
        self.agreed, self.how = agreed, how
        self.register_buffer("scale", torch.ones((), dtype=F64))

    def forward(self, h):
        if self.agreed:  # the same for every sample: 1.5 where every row is finite
            value = torch.isfinite(h.detach()).all().to(h.dtype) * 1.5
        else:  # the batch's largest entry
            value = h.detach().abs().amax()
        if self.how == "copy_":
            self.scale.copy_(value)
        elif self.how == "fill_":
            self.scale.fill_(value)
        else:
            self.scale[...] = value
        return h * self.scale


@pytest.mark.parametrize("how", ["copy_", "fill_", "[...] ="])
@pytest.mark.parametrize("agreed", [True, False])
def test_a_buffer_refreshed_from_the_batch_on_every_call(agreed, how):
    """A value written into a buffer on every call: where every sample alone would write the same, the write is
    made once and the numbers are the loop's; where they differ, the rows interact through the buffer. Written
    with ``fill_`` or ``buf[...] = v`` the agreed write was refused as samples that interact."""
    torch.manual_seed(37)
    net = nn.Sequential(nn.Linear(4, 5), _Refresh(agreed, how), nn.Tanh(), nn.Linear(5, 3)).double()
    p = {k: v.detach() for k, v in net.named_parameters()}
    model_fn = _cross_entropy_of(net)
    train, val = _xy(8, 38), _xy(4, 39)
    if agreed:
        ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
        for policy in ("auto", "ghost"):
            assert rel(ghostfunc.graddot(model_fn, p, train, val, policy=policy).scores, ref) < 1e-10
    else:
        with pytest.raises(SamplesInteractError):
            ghostfunc.graddot(model_fn, p, train, val)


def _frozen_encoder(nested: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).to(F64).eval().requires_grad_(False)


def _padded(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    pad = torch.zeros(n, 5, dtype=torch.bool)
    pad[1:, -2:] = True
    return torch.randn(n, 5, 8, generator=g, dtype=F64), pad, torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize("frozen", ["frozen encoder", "encoder under no_grad"])
def test_a_fast_path_a_plain_call_takes_is_refused(frozen):
    """A frozen nn.TransformerEncoder in eval mode given src_key_padding_mask runs torch's nested-tensor fast path in a
    plain call (padded positions come out as zeros) and not under ghostfunc's interception, which torch counts as a
    __torch_function__ override: with a loss pooling over the padded positions, graddot was 0.65 off the loop and a
    train_step 0.16 off torch's (h65). Refused at every entry point; with the fast path off, exact."""
    enc = _frozen_encoder()
    if frozen == "encoder under no_grad":
        enc.requires_grad_(True)
    head = nn.Linear(8, 1).to(F64)
    p = {k: v.detach() for k, v in head.named_parameters()}

    def model_fn(p, batch):
        x, pad, y = batch
        with torch.no_grad() if frozen == "encoder under no_grad" else contextlib.nullcontext():
            h = enc(x, src_key_padding_mask=pad)
        return (functional_call(head, p, (h.mean(1),))[:, 0] - y) ** 2

    g = _g(1)
    train, val = _padded(5, g), _padded(3, g)
    said = r"model_fn's TransformerEncoder gives other outputs for .* in a plain call than while ghostfunc " \
           r"intercepts .*torch.backends.mha.set_fastpath_enabled\(False\)"
    for where, call in {"graddot": lambda: ghostfunc.graddot(model_fn, p, train, val),
                        "inrun_shapley": lambda: ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1),
                        "train_step": lambda: (s := ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1)))(
                            s.init(p), train, val)}.items():
        with pytest.raises(ValueError, match=rf"^{where}: {said}"):
            call()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert_exact(model_fn, p, train, val, "fast path off", [("auto", "mean"), ("ghost", None)])
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def _pooled_probe(enc: nn.Module):
    """``(model_fn, params)``: a linear head, trained, on ``enc``'s outputs pooled over every position, padded ones
    too (``_padded`` batches)."""
    head = nn.Linear(8, 1).to(F64)

    def model_fn(p, batch):
        x, pad, y = batch
        return (functional_call(head, p, (enc(x, src_key_padding_mask=pad).mean(1),))[:, 0] - y) ** 2

    return model_fn, {k: v.detach() for k, v in head.named_parameters()}


def test_an_encoder_without_its_nested_tensor_path_is_exact():
    model_fn, p = _pooled_probe(_frozen_encoder(nested=False))
    g = _g(1)
    assert_exact(model_fn, p, _padded(5, g), _padded(3, g), "no nested tensors", [("auto", "mean"), ("ghost", None)])


def test_a_fast_path_that_only_rounds_otherwise_passes_with_near_zero_losses():
    """A linear probe on a frozen encoder (float32, eval, no padding mask): the plain call's fused kernels round
    otherwise than the intercepted plain path (1.9e-7 of the encoder's outputs), and residuals near 1e-4 make that
    0.3% of the losses. Judged on the encoder's outputs, it is rounding, and the call runs (it was refused, h66)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval().requires_grad_(False)
    head = nn.Linear(32, 1)
    p = {k: v.detach() for k, v in head.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        return (functional_call(head, p, (enc(x).mean(1),)).squeeze(-1) - y) ** 2

    g = _g(1)
    x, xv = torch.randn(16, 10, 32, generator=g), torch.randn(8, 10, 32, generator=g)
    with torch.no_grad():
        y = head(enc(x).mean(1)).squeeze(-1) + 1e-4 * torch.randn(16, generator=g)
        yv = head(enc(xv).mean(1)).squeeze(-1) + 1e-4 * torch.randn(8, generator=g)
    out = ghostfunc.graddot(model_fn, p, (x, y), (xv, yv))
    assert torch.isfinite(out.scores).all()


def test_the_fast_path_switched_back_on_after_a_checked_call_is_refused():
    """The padded encoder checked with torch's fast paths off (the message's fix), then the switch turned back on
    (torch's default): the check is kept under the switch too, so the next call is refused again (it ran unseen,
    0.59 off plain torch, h66)."""
    model_fn, p = _pooled_probe(_frozen_encoder())
    g = _g(1)
    train, val = _padded(5, g), _padded(3, g)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        ghostfunc.graddot(model_fn, p, train, val)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(ValueError, match=r"^graddot: model_fn's TransformerEncoder gives other outputs"):
        ghostfunc.graddot(model_fn, p, train, val)


@pytest.mark.parametrize("where", ["rows not checked", "a later call", "beside dropout"])
def test_the_nested_tensor_path_is_refused_wherever_the_padding_is(where):
    """The comparison ran on the checked rows of a signature's first call: padding only in rows past them, or only
    in a later call of the signature (the mask's values are not in it), took torch's nested-tensor path in a plain
    call unseen (0.54 and 0.63 off the loop, h73). The path is taken for any mask, padded or not: seen in the plain
    call, it is refused whatever the rows hold; beside a module that draws too (the outputs are not compared
    then)."""
    enc = _frozen_encoder()
    head = nn.Linear(8, 1).to(F64)
    drop = nn.Dropout(0.1).train()
    p = {k: v.detach() for k, v in head.named_parameters()}

    def model_fn(p, batch):
        x, pad, y = batch
        h = enc(x, src_key_padding_mask=pad).mean(1)
        return (functional_call(head, p, (drop(h) if where == "beside dropout" else h,))[:, 0] - y) ** 2

    def batch(n: int, padded: list[int], g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        x, pad, y = _padded(n, g)
        pad[:] = False
        pad[padded, -2:] = True
        return x, pad, y

    g = _g(1)
    train = batch(6, [4, 5] if where == "rows not checked" else [], g)
    said = r"^graddot: model_fn's TransformerEncoder gives other outputs for every sample with padding in a plain " \
           r"call .*nested-tensor path.*set_fastpath_enabled\(False\)"
    with pytest.raises(ValueError, match=said):
        ghostfunc.graddot(model_fn, p, train, batch(3, [], g))
        ghostfunc.graddot(model_fn, p, batch(6, [0, 1, 2, 3], g), batch(3, [], g))  # ("a later call")
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if where != "beside dropout":
            assert_exact(model_fn, p, train, batch(3, [1], g), where, [("auto", "mean")])
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


_CENTER = False  # a script's global flag (test_a_global_bool_flag_switched_after_a_first_call_is_checked_again)


def _centred_when(flag: typing.Callable[[], typing.Any]):
    """``(model_fn, params, train, val)``: cross-entropy of an MLP whose outputs are centred over the batch (its
    samples interact) while ``flag()`` holds."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)

    def model_fn(p, b):
        h = functional_call(net, p, (b[0],))
        return F.cross_entropy(h - h.mean(0) if flag() else h, b[1], reduction="none")

    g = _g(1)
    train = (torch.randn(8, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))
    val = (torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    return model_fn, {k: v.detach() for k, v in net.named_parameters()}, train, val


def test_a_global_bool_flag_switched_after_a_first_call_is_checked_again(monkeypatch):
    """``True`` and ``False`` are one object wherever they are read: the reads were kept once per object, so a global
    flag read after functional_call's own ``strict=False`` was not kept, and switching it on after a first call
    scored a batch mean silently (1.5 off the loop, whose scores are 0; h68)."""
    _, params, train, val = _centred_when(lambda: False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)

    def model_fn(p, b):
        h = functional_call(net, p, (b[0],))  # (functional_call's defaults read first, then the flag)
        if _CENTER:
            h = h - h.mean(0)
        return F.cross_entropy(h, b[1], reduction="none")

    ghostfunc.graddot(model_fn, params, train, val)
    monkeypatch.setattr(sys.modules[__name__], "_CENTER", True)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, params, train, val)


def test_a_config_module_imported_inside_model_fn_is_read(tmp_path, monkeypatch):
    """``import cfg`` inside the code ``model_fn`` runs, then ``cfg.CENTER``: a local name, not a global load; the
    module is read as an imported one (it was missed once only global loads were read, h68)."""
    (tmp_path / "ghostfunc_test_cfg.py").write_text("CENTER = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import ghostfunc_test_cfg as cfg

    def flag():
        import ghostfunc_test_cfg
        return ghostfunc_test_cfg.CENTER

    model_fn, params, train, val = _centred_when(flag)
    ghostfunc.graddot(model_fn, params, train, val)
    monkeypatch.setattr(cfg, "CENTER", 1)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, params, train, val)


@pytest.mark.parametrize("how", ["from pkg import cfg", "pkg.cfg.CENTER", "pkg.sub.cfg.CENTER three calls down",
                                 "beside a package of many modules", "a closure's pkg.sub.cfg.CENTER",
                                 "import pkg.sub as s in the body", "import pkg in the body, pkg.sub.cfg", "a dict's sub module",
                                 "a class's sub module", "self.settings, a sub module", "a list's sub module",
                                 "a tuple's sub module", "a helper called as sub.helper()"])
def test_a_config_submodule_of_a_package_is_read(tmp_path, monkeypatch, how):
    """``from pkg import cfg`` in model_fn's body imports ``pkg`` by name; ``pkg.cfg.CENTER`` reads a global
    package: either way the switch sits in a submodule, which was not read (13.8 off the loop, h73). Walking every
    submodule of a read package missed one read three calls down (13.7 off) and cost 90x a call for a package of 300
    modules (h76): the submodules along the attribute chains the code reads are read, and those only. A chain off a
    local name an import in the body bound, and a module held in a dict, on a class or as an object's attribute,
    were not read (4.9 off, h83)."""
    root = tmp_path / "ghostfunc_test_pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from . import cfg, sub\n" + "".join(
        f"from . import m{i}\n" for i in range(300 if how.startswith("beside") else 0)))
    for i in range(300 if how.startswith("beside") else 0):
        (root / f"m{i}.py").write_text("".join(f"S{j} = {j}\n" for j in range(100)))
    (root / "cfg.py").write_text("CENTER = 0\n")
    (root / "sub" / "__init__.py").write_text("from . import cfg\n\n\ndef helper():\n    return cfg.CENTER\n")
    (root / "sub" / "cfg.py").write_text("CENTER = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "ghostfunc_test_pkg"]:  # (another case's package)
        monkeypatch.delitem(sys.modules, name)
    package = importlib.import_module("ghostfunc_test_pkg")
    monkeypatch.setitem(globals(), "ghostfunc_test_pkg", package)  # (read as a global below)
    switched = package.sub.cfg if "sub" in how else package.cfg

    def from_import():
        from ghostfunc_test_pkg import cfg
        return cfg.CENTER

    def through_package():
        return ghostfunc_test_pkg.cfg.CENTER  # type: ignore[name-defined]  # noqa: F821

    def deep():
        return ghostfunc_test_pkg.sub.cfg.CENTER  # type: ignore[name-defined]  # noqa: F821

    def closure():
        return package.sub.cfg.CENTER

    def local_alias():
        import ghostfunc_test_pkg.sub as s
        return s.cfg.CENTER

    def local_package():
        import ghostfunc_test_pkg
        return ghostfunc_test_pkg.sub.cfg.CENTER

    held = {"cfg": package.sub.cfg}
    listed, tupled = [package.sub.cfg], (package.sub.cfg,)

    class Holder:
        cfg = package.sub.cfg

        def __init__(self):
            self.settings = package.sub.cfg

        def read(self):
            return self.settings.CENTER

    def one():
        return deep()

    def two():
        return one()

    flag = {"from pkg import cfg": from_import, "pkg.cfg.CENTER": through_package,
            "pkg.sub.cfg.CENTER three calls down": two, "beside a package of many modules": through_package,
            "a closure's pkg.sub.cfg.CENTER": closure, "import pkg.sub as s in the body": local_alias,
            "import pkg in the body, pkg.sub.cfg": local_package, "a dict's sub module": lambda: held["cfg"].CENTER,
            "a class's sub module": lambda: Holder.cfg.CENTER, "self.settings, a sub module": Holder().read,
            "a list's sub module": lambda: listed[0].CENTER, "a tuple's sub module": lambda: tupled[0].CENTER,
            "a helper called as sub.helper()": lambda: ghostfunc_test_pkg.sub.helper()}[how]  # noqa: F821
    model_fn, params, train, val = _centred_when(flag)
    ghostfunc.graddot(model_fn, params, train, val)
    if how.startswith("beside"):  # (not its 300 modules' 30,000 settings read on every call)
        from ghostfunc._interact import named_reads
        assert [label.split(".")[-1] for label, v in named_reads(model_fn) if isinstance(v, types.ModuleType)] == [
            "through_package: global ghostfunc_test_pkg", "cfg"]
    monkeypatch.setattr(switched, "CENTER", 1)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, params, train, val)


class _LazyModule(types.ModuleType):
    """A lazily importing module whose optional dependency is missing: any name it lacks raises ImportError."""

    def __getattr__(self, name: str) -> typing.Any:
        raise ImportError(f"optional dependency for {name} is not installed")


@pytest.mark.parametrize("how", ["its module imported after the first call", "its __module__ set after it"])
def test_a_settings_class_that_becomes_the_users_after_a_first_call_is_read(tmp_path, monkeypatch, how):
    """Whether a class is the user's is kept per class, with the module it names and whether that is imported: a
    config class made by ``type(...)`` naming a module imported only after a first call, or whose ``__module__`` is
    set later, was kept as a library's and its switch not seen (4.1 off, h90)."""
    name = "ghostfunc_test_late_cfg"
    (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    kind = type("LateOptions", (), {"__module__": name if how.startswith("its module") else "torch.nn"})
    options = kind()
    options.center = False
    model_fn, params, train, val = _centred_when(lambda: options.center)
    ghostfunc.graddot(model_fn, params, train, val)
    if how.startswith("its module"):
        importlib.import_module(name)
    else:
        kind.__module__ = "__main__"
    options.center = True
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, params, train, val)


def test_a_lazy_module_that_raises_for_what_it_lacks_is_read(monkeypatch):
    """A module read by model_fn was asked for ``__file__`` through getattr, and a lazy module raised ImportError
    out of graddot (h76); its own dict is read."""
    lazy = _LazyModule("ghostfunc_test_lazy")
    lazy.SCALE = 2.0
    monkeypatch.setitem(globals(), "ghostfunc_test_lazy", lazy)
    model_fn, params, train, val = _centred_when(lambda: ghostfunc_test_lazy.SCALE > 3)  # noqa: F821
    assert_exact(model_fn, params, train, val, "lazy module", [("auto", "mean")])
    monkeypatch.setattr(lazy, "SCALE", 4.0)  # (its setting switched: read, and checked again)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact"):
        ghostfunc.graddot(model_fn, params, train, val)


@pytest.mark.parametrize("reached", ["through globals()", "four attributes in", "with a random draw"])
def test_a_fast_path_module_however_it_is_reached_is_compared(reached):
    """The fast-path comparison took the modules the walk of what model_fn reads found: an encoder reached through
    ``globals()[...]`` or an object four attributes in was not compared, nor any model that drew a random number
    (1.28 off the loop, h68). torch's global module hooks reach every instance; torch's draws start alike in both
    runs."""
    holder = types.SimpleNamespace(a=types.SimpleNamespace(b=types.SimpleNamespace(c=types.SimpleNamespace(
        d=_frozen_encoder()))))
    globals()["_hidden_encoder"] = holder.a.b.c.d
    head = nn.Linear(8, 1).to(F64)
    p = {k: v.detach() for k, v in head.named_parameters()}

    def reaching(p, batch):
        x, pad, y = batch
        enc = globals()["_hidden_encoder"] if reached == "through globals()" else holder.a.b.c.d
        h = enc(x, src_key_padding_mask=pad).mean(1)
        if reached == "with a random draw":
            h = h + 0.0 * torch.rand(())
        return (functional_call(head, p, (h,))[:, 0] - y) ** 2

    g = _g(1)
    with pytest.raises(ValueError, match=r"^graddot: model_fn's TransformerEncoder gives other outputs"):
        ghostfunc.graddot(reaching, p, _padded(5, g), _padded(3, g))


class _TokensAfterNorm(nn.Module):
    """Conv2d, BatchNorm2d (eval), the feature map as tokens ``[B, HW, C]``, a product of tokens: a vision
    transformer's patch embedding (LeViT). ``by_hand``: the same normalisation written out."""

    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.by_hand = by_hand
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if self.by_hand:
            n, at = self.norm, (1, -1, 1, 1)
            h = (h - n.running_mean.view(at)) / torch.sqrt(n.running_var.view(at) + n.eps) * n.weight.view(at) + \
                n.bias.view(at)
        else:
            h = self.norm(h)
        h = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        return self.head((h * h).mean(1))


def test_batch_norm_in_eval_mode_before_tokens_is_exact():
    """torch's own eval-mode batch_norm backward is wrong for a batch of one sample given a transposed gradient
    (torch 2.13 on CPU: a loop of single samples was 0.30 off the same normalisation written out, and off the whole
    batch's backward; h69 took that loop for the truth). graddot equals the loop of the normalisation written out."""
    torch.manual_seed(1)
    net = _TokensAfterNorm(False).to(F64).eval()
    twin = _TokensAfterNorm(True).to(F64).eval()
    twin.load_state_dict(net.state_dict())
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch, net=net):
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1], reduction="none")

    g = _g(2)
    train = (torch.randn(4, 3, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    val = (torch.randn(3, 3, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g))
    assert_exact(model_fn, p, train, val, "batch_norm before tokens", [("auto", "mean"), ("ghost", None)],
                 ref_fn=functools.partial(model_fn, net=twin))


@pytest.mark.parametrize("policy", ["ghost", "auto", "materialize"])
def test_a_frozen_parameter_left_requiring_grad_is_a_constant(policy):
    """A module's parameter left out of params but still requiring grad (a frozen table) adds a large common part to
    a linear layer's tokens: the ghost kernel centres such factors in place, and the factor, captured with the
    table's graph, raised there (h69, on LeViT's attention biases). Captured factors hold no graph."""
    torch.manual_seed(0)
    table = nn.Parameter(torch.full((3, 8), 10.0, dtype=F64))  # (requires grad, not in params)
    lin = nn.Linear(8, 1).to(F64)
    at = torch.tensor([0, 1, 2, 0, 1, 2])
    p = {k: v.detach() for k, v in lin.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        return (functional_call(lin, p, (x + table[at],)).squeeze(-1).mean(-1) - y) ** 2

    g = _g(3)
    train = (torch.randn(4, 6, 8, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64))
    val = (torch.randn(3, 6, 8, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64))
    assert_exact(model_fn, p, train, val, "frozen parameter requiring grad", [(policy, "mean"), (policy, None)])
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    _, info = step(step.init(p), train, val)
    assert torch.isfinite(info.values).all()
    assert table.grad is None


def _capacity_moe_fn(experts: list[Tensor], router_bias: Tensor, factor: float = 1.25):
    """A top-1 mixture of experts whose capacity is counted over the whole batch's tokens (Switch Transformer's
    ``capacity_factor * tokens / experts``): tokens past an expert's capacity, in the batch's order, are dropped."""
    def model_fn(p, batch):
        x, y = batch  # [B, T, d], [B]
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        route = (tokens @ p["router"] + router_bias).argmax(-1)  # [B*T]
        capacity = math.ceil(factor * b * t / len(experts))
        out = torch.zeros_like(tokens)
        for e, w in enumerate(experts):
            picked = (route == e).nonzero().flatten()[:capacity]
            out = out.index_add(0, picked, torch.tanh(tokens[picked] @ w @ p["w"]))
        return (out.reshape(b, t, d).mean(1) @ p["head"] - y) ** 2

    return model_fn


@pytest.mark.parametrize(("how", "dtype"), [("a loss divided by the batch size", F64),
                                            ("a loss divided by the batch size", torch.float32),
                                            ("a loss cast with .float(), then divided", torch.float32),
                                            ("a loss cast with .to(bfloat16), then divided", torch.float32),
                                            ("a loss divided by torch.ones(B).sum()", torch.float32),
                                            ("a loss divided by torch.tensor(float(B))", torch.float32),
                                            ("a loss divided by torch.full((), B, dtype=float32)", torch.float32),
                                            ("a loss divided by a .type(torch.FloatTensor) tensor", torch.float32),
                                            ("a loss behind a torch.where(mask, 0.0, finfo.min) mask, divided",
                                             torch.float32),
                                            ("a loss through a complex64 cast, divided", torch.float32),
                                            ("a loss divided by a bool mask's count times 1.0", torch.float32),
                                            ("a capacity counted over the batch's tokens", F64)])
def test_a_loss_that_depends_on_the_batch_size_is_refused(how, dtype):
    """A sample's loss that depends on how many samples its batch holds, not on which: the rows compared together
    and alone differ, and copies of a sample in a batch of the batch's size agree with it, which was taken for a
    batch of one's rounding (h77: a capacity-limited mixture of experts whose router sends every token to one
    expert scored silently, its train_grad 1.22 off the batch's gradient). A batch of twice the copies tells; in
    float32 too, whose copies were sliced inside the check's mode and counted as a float32 computation, which
    skipped it (h84: train_grad 7.0 off); a cast to float32 in the loss (as Hugging Face's losses cast), or a
    divisor a factory made in the default dtype, ran float32 in the widened run and skipped it too (h86: 15x off),
    as did one made float32 on purpose or by a legacy tensor type (h90).
    (Float32 experts held as constants outside params compute narrower than the
    widened run: the check says nothing then, as the README says.)"""
    g = _g(7)
    d = 4
    p = {"router": torch.randn(d, 3, generator=g, dtype=F64), "w": torch.randn(d, d, generator=g, dtype=F64),
         "head": torch.randn(d, generator=g, dtype=F64)}
    p = {k: v.to(dtype) for k, v in p.items()}
    if how.startswith("a loss"):
        def model_fn(p, batch):
            x, y = batch
            b = x.shape[0]
            h = x @ p["w"]
            if "torch.where" in how:  # Hugging Face's additive mask: Python numbers, the default dtype (h95)
                keep = x[..., 0] > -3
                h = h * torch.softmax(h.sum(-1) + torch.where(keep, 0.0, torch.finfo(h.dtype).min), -1)[..., None]
            out = torch.tanh(h.mean(1)) @ p["head"]
            if "complex64" in how:
                z = out.to(torch.complex64)
                out = (z * z.conj()).real
            out = out.float() if ".float()" in how else out.to(torch.bfloat16).to(x.dtype) if "bfloat16" in how else out
            by = (torch.ones(b).sum() if "ones" in how else torch.tensor(float(b)) if "tensor(" in how else
                  torch.full((), b, dtype=torch.float32) if "full" in how else
                  torch.tensor(b).type(torch.FloatTensor) if ".type(" in how else
                  (x[:, 0, 0] == x[:, 0, 0]).sum() * 1.0 if "bool mask" in how else b)
            return (out - y) ** 2 / by
    else:
        experts = [torch.eye(d, dtype=F64) * (1 + e) for e in range(3)]
        model_fn = _capacity_moe_fn(experts, torch.tensor([50.0, 0.0, 0.0], dtype=dtype))  # every token to expert 0
    train = (torch.randn(6, 8, d, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype))
    val = (torch.randn(3, 8, d, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype))
    said = r"^graddot: samples interact in model_fn: .* in batches of two and four times as many copies of itself: " \
           r"its loss depends on the batch's size"
    with pytest.raises(SamplesInteractError, match=said):
        ghostfunc.graddot(model_fn, p, train, val)
    with pytest.raises(SamplesInteractError, match=said.replace("graddot", "inrun_shapley")):
        ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1)


VALID_WIDENED = {
    "torch.where mask, a row all masked": lambda h, x: h.sum(-1) + torch.where(
        (x[..., 0] > -3) & (torch.arange(x.shape[1]) > 0), 0.0, torch.finfo(h.dtype).min),
    "torch.full of finfo.min": lambda h, x: h.sum(-1) + torch.full(x.shape[:2], torch.finfo(h.dtype).min) * (
        x[..., 0] < -1),
    "noise from torch.randn": lambda h, x: h.sum(-1) + 1e-3 * torch.randn(x.shape[:2]),
    "complex64 round trip": lambda h, x: torch.fft.ifft(torch.fft.fft(h.sum(-1).to(torch.complex64))).real,
}


@pytest.mark.parametrize("how", list(VALID_WIDENED))
def test_what_the_widened_run_makes_in_float64_keeps_a_valid_model_exact(how):
    """The batch-size check's widened run makes float64 what Python numbers made in the default dtype (h95):
    a mask whose row is all ``finfo(float64).min`` (which overflows float32 to -inf) stays finite, and random
    draws and complex casts run; each valid float32 model is scored, equal to the loop."""
    g = _g(9)
    d = 4
    p = {"w": torch.randn(d, d, generator=g), "head": torch.randn(d, generator=g)}

    def model_fn(p, batch):
        x, y = batch
        h = x @ p["w"]
        logits = VALID_WIDENED[how](h, x)
        h = h * torch.softmax(logits, -1)[..., None]
        return (torch.tanh(h.mean(1)) @ p["head"] - y) ** 2

    train = (torch.randn(6, 8, d, generator=g), torch.randn(6, generator=g))
    val = (torch.randn(3, 8, d, generator=g), torch.randn(3, generator=g))
    if "randn" in how:
        torch.manual_seed(0)
        out = ghostfunc.graddot(model_fn, p, train, val)
        assert out.scores.isfinite().all()
        return
    out = ghostfunc.graddot(model_fn, p, train, val)
    ref = ghostfunc.reference_graddot(model_fn, p, train, val)[0]
    assert rel(out.scores, ref) < 1e-5


def test_a_capacity_never_reached_is_exact():
    """The same mixture of experts with a capacity no batch reaches (one expert may take every token): each sample's
    loss is its own, and graddot equals the loop (the batch-size check says nothing of it)."""
    g = _g(8)
    d = 4
    p = {"router": torch.randn(d, 3, generator=g, dtype=F64), "w": torch.randn(d, d, generator=g, dtype=F64),
         "head": torch.randn(d, generator=g, dtype=F64)}
    experts = [torch.eye(d, dtype=F64) * (1 + e) for e in range(3)]
    model_fn = _capacity_moe_fn(experts, torch.zeros(3, dtype=F64), factor=3.0)  # room for every token
    train = (torch.randn(6, 2, d, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64))
    val = (torch.randn(3, 2, d, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64))
    assert_exact(model_fn, p, train, val, "capacity never reached", [("auto", "mean")])


@pytest.mark.parametrize("how", ["float64", "a frozen float32 base"])
def test_small_losses_of_large_outputs_are_not_taken_for_a_loss_that_depends_on_the_batch_size(how):
    """A regressor fitted to 1e-6 (float64) or 1e-3 (a frozen float32 base the parameters do not reach, under a
    trainable head) of outputs near 1000: a batch of one and of three round otherwise, the copies agree with the
    batch, and the batch-size comparison ran copies of 3 and 6 rows, which CPU matrix products round otherwise too
    (h81: both refused). It runs batches of 4 rows or more, in float64, and says nothing where a call the widening
    does not reach computed narrower."""
    torch.manual_seed(0)
    dtype = F64 if how == "float64" else torch.float32
    base = nn.Linear(64, 1).requires_grad_(False)  # (float32 either way: a constant, not in params)
    head = nn.Linear(64, 1).to(dtype)
    with torch.no_grad():
        (head if how == "float64" else base).weight.mul_(10)
        if how != "float64":
            head.weight.mul_(1e-3)
    params = {k: v.detach() for k, v in head.named_parameters()}

    def forward(p, x):
        out = functional_call(head, p, (x,))
        return (out if how == "float64" else base(x.float()).to(x.dtype) + out).squeeze(1)

    x = torch.randn(8, 64, generator=_g(4), dtype=dtype) * 30
    with torch.no_grad():
        y = torch.cat([forward(params, x[i:i + 1]) for i in range(8)]) + (1e-6 if how == "float64" else 1e-3)

    def model_fn(p, batch):
        return (forward(p, batch[0]) - batch[1]) ** 2

    out = ghostfunc.graddot(model_fn, params, (x, y), (x[:4].clone(), y[:4].clone()))
    if how == "float64":
        assert rel(out.scores, ghostfunc.reference_graddot(model_fn, params, (x, y), (x[:4], y[:4]))[0]) < 1e-6
