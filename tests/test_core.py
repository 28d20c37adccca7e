"""Hand-built cases with known answers, layout corners, the fallback, plan, and every error."""

from __future__ import annotations

import collections
import functools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import ghostfunc
from ghostfunc import SamplesInteractError

F64 = torch.float64


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def linreg(p, batch):
    x, y = batch
    return 0.5 * (x @ p["w"] + p["b"] - y) ** 2  # [B]


def test_linear_regression_known_answer():
    # g_i = r_i * (x_i, 1) with residual r_i = w·x_i + b - y_i, written out by hand.
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, generator=g, dtype=F64), "b": torch.tensor(0.3, dtype=F64)}
    xt, yt = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    xv, yv = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    rt, rv = xt @ p["w"] + p["b"] - yt, xv @ p["w"] + p["b"] - yv
    gt = torch.cat([rt[:, None] * xt, rt[:, None]], 1)  # [n, 5]
    gv = torch.cat([rv[:, None] * xv, rv[:, None]], 1)  # [m, 5]
    for policy in ("auto", "ghost", "materialize", "contract", "2t2"):
        out = ghostfunc.graddot(linreg, p, (xt, yt), (xv, yv), policy=policy)
        torch.testing.assert_close(out.scores, gt @ gv.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(out.train_grad["w"], gt[:, :4].mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(out.train_loss, 0.5 * rt**2, rtol=1e-14, atol=0)
        torch.testing.assert_close(out.val_loss, 0.5 * rv**2, rtol=1e-14, atol=0)
    full = ghostfunc.graddot(linreg, p, (xt, yt), (xv, yv), val_reduce=None)
    torch.testing.assert_close(full.scores, gt @ gv.T, rtol=1e-12, atol=0)
    summed = ghostfunc.graddot(linreg, p, (xt, yt), (xv, yv), val_reduce="sum")
    torch.testing.assert_close(summed.scores, gt @ gv.sum(0), rtol=1e-12, atol=0)
    # "w" is used by matmul as a vector (x @ w): not a matrix op, so it is exact through the fallback
    assert full.plan.routes["w"].path in ("fallback", "direct", "ghost", "materialize", "contract")


def test_example_i_has_gradient_i():
    # optax-style known answer: sample i's gradient is e_i (zero included for i = 0 via a zero row)
    def model_fn(p, x):
        return x @ p["w"]  # ℓ_i = x_i·w, so g_i = x_i

    x = torch.eye(4, dtype=F64)
    x[0] = 0
    out = ghostfunc.graddot(model_fn, {"w": torch.zeros(4, dtype=F64)}, x, x, val_reduce=None)
    torch.testing.assert_close(out.scores, x @ x.T)


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    params = {k: v.detach() for k, v in net.named_parameters()}
    return model_fn, params, (torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0]))


def check(model_fn, params, train, val, tol=1e-10, **kw):
    ref, _, ref_grad = ghostfunc.reference_graddot(model_fn, params, train, val, val_reduce=kw.get("val_reduce", "mean"))
    out = ghostfunc.graddot(model_fn, params, train, val, **kw)
    assert rel(out.scores, ref) < tol, out.plan
    for k in params:
        assert (out.train_grad[k] - ref_grad[k]).abs().max() <= tol * max(v.abs().max() for v in ref_grad.values())
    return out


def test_one_sample_one_token():
    model_fn, params, (x, y) = _mlp()
    check(model_fn, params, (x[:1], y[:1]), (x[1:2], y[1:2]))
    check(model_fn, params, (x[:1], y[:1]), (x[1:2], y[1:2]), val_reduce=None)


def test_params_unchanged_and_may_require_grad():
    model_fn, params, batch = _mlp()
    before = {k: v.clone() for k, v in params.items()}
    leafy = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = ghostfunc.graddot(model_fn, leafy, batch, batch)
    assert not out.scores.requires_grad
    for k in params:
        assert torch.equal(leafy[k].detach(), before[k]) and leafy[k].grad is None


class Conv1DLike(nn.Module):
    """HF Conv1D: the batch is flattened inside the op (x.view(-1, d)) and W is [in, out]."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


def test_flattened_batch_inside_the_op():
    net = nn.Sequential(Conv1DLike(3, 5), nn.Tanh(), Conv1DLike(5, 2)).to(F64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):  # x: [B, T, 3]
        return functional_call(net, p, (x,)).pow(2).sum((1, 2))

    x = torch.randn(4, 6, 3, dtype=F64)
    out = check(model_fn, params, x, x[:2, :3])
    assert {r.path for r in out.plan.routes.values()} <= {"ghost", "materialize", "contract", "direct"}
    check(model_fn, params, x, x[:2, :3], val_reduce=None, policy="ghost")


@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_first_transformer_and_mha(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).to(F64).eval()
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).to(F64).eval()
    net = nn.ModuleDict({"layer": layer, "mha": mha})
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):  # x: [B, T, 8]
        h = x if batch_first else x.transpose(0, 1)  # [T, B, 8] when sequence-first
        h = functional_call(net["layer"], {k[6:]: v for k, v in p.items() if k.startswith("layer.")}, (h,))
        mp = {k[4:]: v for k, v in p.items() if k.startswith("mha.")}
        h = functional_call(net["mha"], mp, (h, h, h), {"need_weights": False})[0]
        return h.pow(2).mean((1, 2) if batch_first else (0, 2))

    x = torch.randn(3, 5, 8, dtype=F64)
    out = check(model_fn, params, x, x[:2])
    check(model_fn, params, x, x[:2], val_reduce=None)
    assert out.plan.routes["mha.in_proj_weight"].path == "fallback"
    assert out.plan.routes["layer.linear1.weight"].path in ("ghost", "materialize", "contract")


def test_fallback_for_unrecognised_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1)).to(F64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    params["log_temp"] = torch.tensor(0.2, dtype=F64)

    def model_fn(p, x):
        out = functional_call(net, {k: v for k, v in p.items() if k != "log_temp"}, (x,))[:, 0]
        return (out / torch.exp(p["log_temp"])) ** 2

    x = torch.randn(5, 3, dtype=F64)
    out = check(model_fn, params, x, x[:3])
    routes = out.plan.routes
    assert routes["1.weight"].path == "fallback" and "prelu" in routes["1.weight"].reason
    assert routes["log_temp"].path == "fallback"
    assert routes["0.weight"].factored
    text = str(out.plan)
    for k in params:
        assert k in text


def test_param_used_by_recognised_and_unrecognised_calls_takes_fallback():
    def model_fn(p, x):
        h = F.linear(x, p["W"])  # recognised
        return (h @ p["W"].T.contiguous()).pow(2).sum(1)  # W.T copied: no rule knows that (h @ W.T is a linear call)

    p = {"W": torch.randn(3, 3, dtype=F64)}
    x = torch.randn(4, 3, dtype=F64)
    out = check(model_fn, p, x, x[:2])
    assert out.plan.routes["W"].path == "fallback"


def test_layer_applied_twice_and_tied_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(9, 4, padding_idx=1).to(F64)
    fc = nn.Linear(4, 4).to(F64)
    params = {"emb": emb.weight.detach(), "fc.w": fc.weight.detach(), "fc.b": fc.bias.detach()}

    def model_fn(p, ids):
        h = F.embedding(ids, p["emb"], padding_idx=1)
        for _ in range(2):  # the same layer twice: cross terms between the uses
            h = torch.tanh(F.linear(h, p["fc.w"], p["fc.b"]))
        logits = F.linear(h, p["emb"])  # tied output projection
        return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)

    ids = torch.tensor([[1, 2, 3, 1], [4, 1, 1, 5], [6, 7, 8, 2]])
    for policy in ("ghost", "materialize", "contract", "auto"):
        out = check(model_fn, params, ids, ids[:2, :3], policy=policy)
    assert out.plan.routes["fc.w"].uses == ("linear", "linear")
    assert out.plan.routes["emb"].uses == ("embedding", "linear")


def test_padding_idx_row_gets_no_gradient():
    p = {"emb": torch.randn(5, 3, dtype=F64)}

    def model_fn(p, ids):
        return F.embedding(ids, p["emb"], padding_idx=0).pow(2).sum((1, 2))

    ids = torch.tensor([[0, 1, 0], [2, 0, 3]])
    out = check(model_fn, p, ids, ids, val_reduce=None)
    assert out.train_grad["emb"][0].abs().max() == 0


def test_pytree_inputs_with_any_keys_and_non_tensor_leaves():
    model_fn, params, (x, y) = _mlp()

    def dict_fn(p, batch):
        assert batch["note"] == "kept" and batch["cfg"] is None
        return model_fn(p, (batch["feats"]["a"], batch["target"]))

    train = {"feats": {"a": x}, "target": y, "note": "kept", "cfg": None}
    val = {"feats": {"a": x[:2]}, "target": y[:2], "note": "kept", "cfg": None}
    check(dict_fn, params, train, val)


def test_train_and_val_of_different_lengths():
    def model_fn(p, ids):
        return F.embedding(ids, p["emb"]).sum((1, 2)) ** 2

    p = {"emb": torch.randn(6, 2, dtype=F64)}
    check(model_fn, p, torch.randint(0, 6, (3, 7)), torch.randint(0, 6, (2, 2)), val_reduce=None)


@pytest.mark.parametrize("policy", ["auto", "ghost", "materialize", "contract"])
def test_mean_over_val_rows_rounds_as_the_loop_through_a_float32_step(policy):
    """A float64 model with a float32 step inside (as Hugging Face norms upcast): the mean validation
    gradient is the loop's ``mean_v g_v`` to float64 rounding, not ``Σ_v (g_v/m)`` rounded in float32
    (1e-8 apart with m = 3, whatever path the validation gradient takes)."""
    torch.manual_seed(21)
    p = {"w1": torch.randn(8, 4, dtype=F64), "w2": torch.randn(3, 8, dtype=F64)}

    def model_fn(p, x):
        h = torch.tanh(F.linear(x, p["w1"]).float()).to(F64)  # the float32 island
        return F.linear(h, p["w2"]).pow(2).sum((-2, -1))

    train, val = torch.randn(4, 5, 4, dtype=F64), torch.randn(3, 2, 4, dtype=F64)  # val: another length
    for _ in range(2):  # the first call of a signature and a later one
        check(model_fn, p, train, val, tol=1e-13, policy=policy)


def test_bf16_compute_dtype_within_documented_tolerance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x[:, None].expand(-1, 5, -1),)).mean(1), y, reduction="none")

    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    ref, _, _ = ghostfunc.reference_graddot(model_fn, params, batch, batch)
    for policy in ("ghost", "contract", "materialize"):
        out = ghostfunc.graddot(model_fn, params, batch, batch, policy=policy, compute_dtype=torch.bfloat16)
        assert out.scores.dtype == torch.float32
        assert rel(out.scores, ref) < 2e-2, policy  # README: bf16 products, about 1e-2 relative


class _Float32Router(nn.Module):
    """A float64 model whose router converts itself to float32 in its forward, as Switch Transformers' router does
    (``self.classifier = self.classifier.to(torch.float32)``: the parameter's own tensor changes dtype), then picks
    rows by ``nonzero`` (each sample is captured alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8).double()
        self.router = nn.Linear(8, 3, bias=False).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x, y=None):
        h = torch.tanh(self.body(x))
        self.router = self.router.to(torch.float32)
        gate = torch.softmax(self.router(h.float()), -1).to(h.dtype)
        gate = gate[(gate.sum(-1) > 0).nonzero()[:, 0]]  # (every row: a shape the data sets, as routing makes)
        return self.head(h) * gate


@pytest.mark.parametrize("policy", ["auto", "ghost", "materialize", "contract", "2t2"])
@pytest.mark.parametrize("call", ["graddot", "train_step order 1", "train_step order 2", "inrun_shapley order 1"])
def test_a_parameter_the_model_converts_to_float32_is_scored_in_its_dtype(call, policy):
    """The router's per-sample gradients came in float32, and the float64 validation weights met them in a matmul:
    train_step and inrun_shapley failed with torch's "expected m1 and m2 to have the same dtype" (h97, Switch
    Transformers in float64). Exact to the float32 router's rounding, against the loop on the same model."""
    torch.manual_seed(0)
    model_fn, params = ghostfunc.from_module(_Float32Router(), lambda out, b: F.cross_entropy(out, b["y"],
                                                                                                reduction="none"))
    g = torch.Generator().manual_seed(1)
    train = {"x": torch.randn(7, 6, generator=g, dtype=F64), "y": torch.randint(0, 3, (7,), generator=g)}
    val = {"x": torch.randn(4, 6, generator=g, dtype=F64), "y": torch.randint(0, 3, (4,), generator=g)}
    ref = ghostfunc.reference_graddot(model_fn, params, train, val)[0]
    ghostfunc.graddot(model_fn, params, train, val)  # (a first call: the router is converted from then on)
    if call == "graddot":
        got = ghostfunc.graddot(model_fn, params, train, val, policy=policy).scores
    elif call.startswith("train_step"):
        step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=int(call[-1]))
        _, info = step(step.init(params), train, val)
        got = info.first_order if call.endswith("2") else info.values
        got = got / (-0.1 / 7)
    else:
        got = ghostfunc.inrun_shapley(model_fn, params, train, val, lr=0.1, order=1) / (-0.1 / 7)
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("call", ["graddot", "inrun_shapley order 1", "inrun_shapley order 2", "unroll"])
def test_mixed_parameter_dtypes_do_not_depend_on_the_params_order(call):
    """A bfloat16 body listed before a float64 head: the validation weights ``1/m`` were made in the first
    parameter's dtype (bfloat16: 1/3 -> 0.33398), so the head's float64 numbers were 2e-3 off the loop and the
    values changed with the dict's order alone (``unroll``: the rows' shares, the same way). Now the widest dtype,
    at least float32, for the weights and the scores' sum, whatever the order."""
    g = torch.Generator().manual_seed(5)
    body, head = torch.randn(8, 6, generator=g) / 2, torch.randn(3, 8, generator=g, dtype=F64) / 2

    def model_fn(p, b):
        h = torch.tanh(F.linear(b["x"].to(p["w1"].dtype), p["w1"]))
        return F.cross_entropy(F.linear(h.to(p["head"].dtype), p["head"]), b["y"], reduction="none")

    def data(n):
        return {"x": torch.randn(n, 6, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}

    train, val = data(8), data(3)  # 3 validation rows: 1/3 is not exact in bfloat16
    batches = [{**data(6), "index": torch.arange(6) + 6 * t} for t in range(2)]
    outs = []
    for order in (("w1", "head"), ("head", "w1")):
        both = {"w1": body.bfloat16(), "head": head}
        p = {k: both[k] for k in order}
        if call == "graddot":
            out = ghostfunc.graddot(model_fn, p, train, val)
            assert out.scores.dtype == F64
            assert rel(out.per_param["head"], ghostfunc.reference_graddot(model_fn, p, train, val)[1]["head"]) < 1e-12
            outs.append(out.per_param["head"])
        elif call == "unroll":
            outs.append(ghostfunc.unroll(model_fn, ghostfunc.sgd(0.3), p, batches, val).total)
        else:
            outs.append(ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=int(call[-1])))
    assert outs[0].dtype == outs[1].dtype == F64
    assert rel(outs[0], outs[1]) < 1e-12


def test_float16_parameters_multiply_small_gradients_in_float32():
    """Float16 parameters with small per-token gradients (a mean over 64 tokens, the loss scaled by 1e-2): the
    products of two factors fall below float16's range (6e-8), so the Gram and contract kernels, multiplying in
    float16, gave 0.92 and 0.12 off where the float16 loop keeps its digits. They multiply and sum in float32
    now and agree with the loop to float16's rounding of the scores themselves (about 1e-5 here)."""
    torch.manual_seed(1)
    d, h, c, t = 16, 32, 5, 64
    params = {"w1": (torch.randn(h, d) / d**0.5).half(), "b1": torch.zeros(h).half(),
              "w2": (torch.randn(c, h) / h**0.5).half()}

    def model_fn(p, batch):
        x, y = batch
        z = F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"])
        return 1e-2 * F.cross_entropy(z.reshape(-1, c).float(), y.reshape(-1), reduction="none").reshape(y.shape).mean(-1)

    train = (torch.randn(8, t, d).half(), torch.randint(0, c, (8, t)))
    val = (torch.randn(4, t, d).half(), torch.randint(0, c, (4, t)))
    ref, _, _ = ghostfunc.reference_graddot(model_fn, params, train, val)
    for policy in ("ghost", "contract", "materialize"):
        out = ghostfunc.graddot(model_fn, params, train, val, policy=policy)
        assert out.scores.dtype == torch.float32  # (as every float16 model's: summed in float32)
        assert rel(out.scores.double(), ref.double()) < 1e-2, policy


def test_plan_prints_every_parameter_and_2t2_flips_with_t():
    p = {"W": torch.randn(4, 4, dtype=F64)}

    def model_fn(p, x):
        return F.linear(x, p["W"]).pow(2).sum((1, 2))

    short = ghostfunc.plan(model_fn, p, torch.randn(2, 1, 4, dtype=F64), torch.randn(2, 1, 4, dtype=F64), policy="2t2")
    long = ghostfunc.plan(model_fn, p, torch.randn(2, 9, 4, dtype=F64), torch.randn(2, 9, 4, dtype=F64), policy="2t2")
    assert short.routes["W"].path == "ghost" and (short.routes["W"].tokens, short.routes["W"].p) == (1, 4)
    assert long.routes["W"].path == "materialize" and long.routes["W"].tokens == 9
    assert "W" in str(long) and "2T²=162 > pd=16" in str(long)


# ---------------------------------------------------------------- errors


def test_error_model_fn_returns_scalar():
    model_fn, params, batch = _mlp()
    with pytest.raises(ValueError, match=r"^graddot: model_fn.*one loss per sample.*shape \(\)"):
        ghostfunc.graddot(lambda p, b: model_fn(p, b).mean(), params, batch, batch)


def test_error_model_fn_returns_wrong_shape():
    model_fn, params, batch = _mlp()
    with pytest.raises(ValueError, match=r"^graddot: .*for 3 train samples it returned shape \(3, 2\)$"):
        ghostfunc.graddot(lambda p, b: model_fn(p, b)[:, None].expand(-1, 2), params, batch, batch)


@pytest.mark.parametrize("entry", ["graddot", "train_step", "inrun_shapley"])
@pytest.mark.parametrize("losses", ["batch mean kept as [1]", "one row short"])
def test_error_model_fn_returns_losses_not_one_per_sample(entry, losses):
    """Shapes that are right for one sample alone (where the capture runs each) but not for the batch: a
    batch mean kept as ``[1]`` was once accepted, each sample's "mean" taken alone."""
    model_fn, params, batch = _mlp()
    shaped = {"batch mean kept as [1]": lambda p, b: model_fn(p, b).mean().unsqueeze(0),
              "one row short": lambda p, b: model_fn(p, b)[: max(len(b[0]) - 1, 1)]}[losses]
    want = r"\(1,\) \(a loss reduced over the batch" if losses.startswith("batch") else r"\(2,\)$"
    run = {"graddot": lambda: ghostfunc.graddot(shaped, params, batch, batch),
           "train_step": lambda: (step := ghostfunc.train_step(shaped, ghostfunc.sgd(0.1)))(step.init(params),
                                                                                             batch, batch),
           "inrun_shapley": lambda: ghostfunc.inrun_shapley(shaped, params, batch, batch, lr=0.1)}[entry]
    with pytest.raises(ValueError, match=rf"^{entry}: model_fn\(params, batch\) must return one loss per sample.*"
                                         rf"for 3 train samples it returned shape {want}"):
        run()


@pytest.mark.parametrize("returned", [None, 0.5])
def test_error_model_fn_returns_no_tensor_before_params_unused(returned):
    """A ``model_fn`` that forgot its return (or returns a number) and so also leaves ``params`` unused is told what it
    returned, not that no parameter reached the computation (h60)."""
    _, params, batch = _mlp()
    for entry, run in {"graddot": lambda f: ghostfunc.graddot(f, params, batch, batch),
                       "inrun_shapley": lambda f: ghostfunc.inrun_shapley(f, params, batch, batch, lr=0.1)}.items():
        with pytest.raises(ValueError, match=rf"^{entry}: model_fn\(params, batch\) must return one loss per sample, a "
                                             rf"tensor of shape \[B\]; for 3 train samples it returned "
                                             rf"{type(returned).__name__}$"):
            run(lambda p, b: returned)


def test_error_structure_mismatch():
    model_fn, params, (x, y) = _mlp()
    with pytest.raises(ValueError, match=r"^graddot: train and val must have the same structure.*'label'"):
        ghostfunc.graddot(model_fn, params, {"x": x, "y": y}, {"x": x, "label": y})
    # a list beside a tuple: both described alike ("dict with leaves [...]"); where they differ is said
    with pytest.raises(ValueError, match=r"\(at \['x'\]: list in train, tuple in val\)$"):
        ghostfunc.graddot(model_fn, params, {"x": [x], "y": y}, {"x": (x,), "y": y})
    with pytest.raises(ValueError, match=r"\(at \['x'\]: 2 items in train, 1 in val\)$"):
        ghostfunc.graddot(model_fn, params, {"x": [x, x], "y": y}, {"x": [x], "y": y})


@pytest.mark.parametrize("which", ["train", "val"])
def test_error_empty_batch(which):
    model_fn, params, (x, y) = _mlp()
    empty = (x[:0], y[:0])
    train, val = (empty, (x, y)) if which == "train" else ((x, y), empty)
    with pytest.raises(ValueError, match=rf"^graddot: {which} is empty"):
        ghostfunc.graddot(model_fn, params, train, val)


def test_error_a_list_of_strings_per_sample_says_it_is_structure():
    """DataLoader's default collate gives a text column as a list of strings, one per sample: torch's pytree reads
    it as structure, so train and val of different sizes differ; the message says what the list is."""
    mlp, params, (x, y) = _mlp()

    def model_fn(p, b):  # the text column reaches the model, which does not read it
        return mlp(p, (b["x"], b["y"]))

    def batch(n):
        return {"x": x[:n], "y": y[:n], "text": [f"doc{i}" for i in range(n)]}

    with pytest.raises(ValueError, match=r"train\['text'\] is a list of one non-tensor value per sample"):
        ghostfunc.graddot(model_fn, params, batch(4), batch(3))
    out = ghostfunc.graddot(model_fn, params, batch(3), batch(3))  # the same length: the same structure, it runs
    assert out.scores.shape == (3,)


@pytest.mark.parametrize("what", ["train", "val", "params"])
def test_error_inference_tensors_are_named(what):
    """Tensors made under torch.inference_mode() cannot enter autograd: torch's error named no argument."""
    model_fn, params, (x, y) = _mlp()
    with torch.inference_mode():
        made = {"train": (x + 0, y + 0), "val": (x + 0, y + 0), "params": {k: v + 0 for k, v in params.items()}}
    train, val = made["train"] if what == "train" else (x, y), made["val"] if what == "val" else (x, y)
    p = made["params"] if what == "params" else params
    name = "params['0.weight']" if what == "params" else f"{what}[0]"
    for call in (ghostfunc.graddot, ghostfunc.reference_graddot):
        with pytest.raises(ValueError, match=rf"{re.escape(name)} was made under torch.inference_mode\(\)"):
            call(model_fn, p, train, val)


def test_reference_differentiates_its_own_leaves_when_model_fn_rebinds_params():
    """functional_call writes a module tensor its forward reassigned back into the dict it was given (a pruning
    pre-hook's ``weight``); the loop took the gradient of whatever the dict held after the call (0.5 off)."""
    def model_fn(p, batch):
        x, y = batch
        p["w"] = 2 * p["w"]  # the dict is rebound, the leaf is what the caller passed
        return (x @ p["w"] - y) ** 2

    g = torch.Generator().manual_seed(2)
    p = {"w": torch.randn(3, dtype=F64, generator=g)}
    x, y = torch.randn(5, 3, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g)
    ref, _, ref_grad = ghostfunc.reference_graddot(model_fn, p, (x, y), (x[:2], y[:2]))
    out = ghostfunc.graddot(model_fn, p, (x, y), (x[:2], y[:2]))
    truth = torch.func.grad(lambda w: model_fn({"w": w}, (x, y)).mean())(p["w"])
    assert rel(ref_grad["w"], truth) < 1e-12 and rel(out.train_grad["w"], truth) < 1e-12
    assert rel(out.scores, ref) < 1e-10


def test_error_leaves_disagree_on_sample_count():
    model_fn, params, (x, y) = _mlp()
    with pytest.raises(ValueError, match=r"^graddot: the tensor leaves of train must share the sample axis"):
        ghostfunc.graddot(model_fn, params, (x, y[:2]), (x, y))

def test_error_val_shaped_unlike_train_names_the_val_batch():
    def model_fn(p, x):
        return F.linear(x, p["W"]).pow(2).sum(1)

    p = {"W": torch.randn(2, 3, dtype=F64)}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        ghostfunc.graddot(model_fn, p, torch.randn(5, 3, dtype=F64), torch.randn(4, 7, dtype=F64))
    if hasattr(BaseException, "add_note"):  # Python 3.11+: the note names the batch
        assert any("model_fn raised this on the val batch" in n and "ran on the train batch" in n
                   for n in getattr(info.value, "__notes__", [])), info.value


def _notes(err):
    return getattr(err, "__notes__", [])


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="notes (PEP 678) are Python 3.11+")
@pytest.mark.parametrize("which", ["train", "val"])
@pytest.mark.parametrize("entry", ["graddot", "graddot/ghost", "graddot/matrix", "reference", "train_step/1",
                                   "train_step/2", "inrun_shapley/2"])
def test_a_models_error_on_one_row_says_which_batch(entry, which):
    """An id out of the table's range in row 2 of one batch: the model's own IndexError, its message unchanged,
    with a note naming the batch (or, where samples run alone, the row)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2)).to(F64)

    def model_fn(p, batch):
        ids, y = batch
        return F.cross_entropy(functional_call(net, p, (ids,)), y, reduction="none")

    params = {k: v.detach() for k, v in net.named_parameters()}
    good = (torch.randint(0, 6, (5, 2)), torch.randint(0, 2, (5,)))
    bad = (good[0].clone(), good[1])
    bad[0][2, 1] = 9
    train, val = (bad, good) if which == "train" else (good, bad)
    run = {
        "graddot": lambda: ghostfunc.graddot(model_fn, params, train, val),
        "graddot/ghost": lambda: ghostfunc.graddot(model_fn, params, train, val, policy="ghost"),
        "graddot/matrix": lambda: ghostfunc.graddot(model_fn, params, train, val, val_reduce=None),
        "reference": lambda: ghostfunc.reference_graddot(model_fn, params, train, val),
        "train_step/1": lambda: ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))(
            ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1)).init(params), train, val),
        "train_step/2": lambda: ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=2)(
            ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=2).init(params), train, val),
        "inrun_shapley/2": lambda: ghostfunc.inrun_shapley(model_fn, params, train, val, lr=0.1, order=2),
    }[entry]
    with pytest.raises(IndexError, match="index out of range") as info:
        run()
    where = entry.split("/")[0].replace("reference", "reference_graddot")
    said = [n for n in _notes(info.value) if "model_fn raised this on" in n]
    assert len(said) == 1, _notes(info.value)
    expected = f"{which} sample 2" if entry == "reference" else f"the {which} batch"
    assert said[0].startswith(f"{where}: model_fn raised this on {expected}"), said


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="notes (PEP 678) are Python 3.11+")
def test_an_error_of_the_per_sample_path_names_the_row():
    """A model the batched capture cannot run takes the per-sample path; an error there names the row."""
    def model_fn(p, x):
        a = x[:, :, None] * x[:, None, :] + torch.eye(3, dtype=F64)  # SPD, except where a row is scaled by -1
        return torch.linalg.cholesky(a * x[:, :1, None].sign()).sum((1, 2)) * p["w"].sum()

    p = {"w": torch.ones(2, dtype=F64)}
    x = torch.rand(4, 3, dtype=F64) + 0.1
    bad = x.clone()
    bad[3, 0] = -1.0
    with pytest.raises(RuntimeError) as info:
        ghostfunc.graddot(model_fn, p, x, bad)
    said = [n for n in _notes(info.value) if "model_fn raised this on" in n]
    assert said == ["graddot: model_fn raised this on val sample 3 (run alone)"], (info.value, _notes(info.value))



@pytest.mark.parametrize("entry", ["graddot", "graddot/matrix", "reference", "train_step/1", "train_step/2",
                                   "inrun_shapley/1", "inrun_shapley/2"])
@pytest.mark.parametrize("when", ["first call", "later call"])
def test_a_stop_iteration_in_the_model_reaches_the_caller_as_itself(entry, when):
    """``next()`` on an exhausted iterator inside ``model_fn``: the caller gets that StopIteration, as the model
    raised it, not the ``RuntimeError('generator raised StopIteration')`` that one of ghostfunc's generators (a
    generator expression of the routing, a context manager) made of it (PEP 479); a RuntimeError the user's own
    generator made of one stays theirs."""
    model_fn, params, batch = _mlp()
    stop = [when == "first call"]

    def stops(p, b):
        if stop[0]:
            next(iter(()))
        return model_fn(p, b)

    def own_generator(p, b):  # the user's generator turns it into a RuntimeError: theirs, passed on as it is
        return torch.stack(list(next(iter(())) if stop[0] else x for x in model_fn(p, b)))

    def run(fn):
        step = ghostfunc.train_step(fn, ghostfunc.sgd(0.1), order=2 if entry == "train_step/2" else 1)
        return {
            "graddot": lambda: ghostfunc.graddot(fn, params, batch, batch),
            "graddot/matrix": lambda: ghostfunc.graddot(fn, params, batch, batch, val_reduce=None),
            "reference": lambda: ghostfunc.reference_graddot(fn, params, batch, batch),
            "train_step/1": lambda: step(step.init(params), batch, batch),
            "train_step/2": lambda: step(step.init(params), batch, batch),
            "inrun_shapley/1": lambda: ghostfunc.inrun_shapley(fn, params, batch, batch, lr=0.1),
            "inrun_shapley/2": lambda: ghostfunc.inrun_shapley(fn, params, batch, batch, lr=0.1, order=2),
        }[entry]()

    for fn, kind in ((stops, StopIteration), (own_generator, RuntimeError)):
        stop[0] = when == "first call"
        if not stop[0]:
            run(fn)
            stop[0] = True
        with pytest.raises(kind) as info:
            run(fn)
        assert type(info.value) is kind, info.value
        if kind is RuntimeError:
            assert str(info.value) == "generator raised StopIteration"


def test_only_ghostfunc_s_own_generators_give_back_a_stop_iteration():
    """:func:`ghostfunc._interact.stopped` takes back a StopIteration from a generator in ghostfunc's own folder, not
    from one of a sibling folder whose path starts alike (``.../ghostfunc_plugins/model.py``)."""
    from ghostfunc import _interact

    def made_in(filename):
        code = compile("def gen():\n    yield next(iter(()))\n", filename, "exec")
        space = {}
        exec(code, space)
        try:
            list(space["gen"]())
        except RuntimeError as err:
            return err
        raise AssertionError("no RuntimeError")

    here = _interact._HERE.rstrip("/\\")
    assert isinstance(_interact.stopped(made_in(here + "/_graddot.py")), StopIteration)
    assert _interact.stopped(made_in(here + "_plugins/model.py")) is None
    assert _interact.stopped(made_in("/elsewhere/model.py")) is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_error_non_real_params(dtype):
    model_fn, params, batch = _mlp()
    params["0.weight"] = params["0.weight"].to(dtype)
    with pytest.raises(TypeError, match=rf"^graddot: params\['0.weight'\] must be a real floating-point.*{dtype}"):
        ghostfunc.graddot(model_fn, params, batch, batch)


def test_error_batchnorm_in_training_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(F64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, x):
        return functional_call(net, p, (x,))[:, 0] ** 2

    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(SamplesInteractError, match=r"^graddot: .*batch_norm in training mode"):
        ghostfunc.graddot(model_fn, params, x, x)
    net.eval()  # eval mode: per-sample gradients exist, and are exact
    check(model_fn, params, x, x[:2])


def test_error_a_sparse_batch_leaf_is_named():
    model_fn, params, (x, y) = _mlp()
    with pytest.raises(TypeError, match=r"^graddot: train\[0\] is a torch.sparse_coo tensor; .*to_dense"):
        ghostfunc.graddot(model_fn, params, (x.to_sparse(), y), (x, y))


def test_error_a_batch_that_holds_itself_is_named():
    """A list that contains itself made torch's pytree recurse until Python's limit (a bare RecursionError)."""
    model_fn, params, (x, y) = _mlp()
    train: list = [x, y]
    train.append(train)
    with pytest.raises(TypeError, match=r"^graddot: train holds itself"):
        ghostfunc.graddot(model_fn, params, train, (x, y))


@pytest.mark.parametrize("how", ["keys in another order", "OrderedDict beside a dict"])
def test_val_with_trains_keys_in_another_order_or_mapping_is_the_same_batch(how):
    """A validation dict with the training dict's keys in another order, or an OrderedDict (a BatchEncoding) beside a
    plain dict, was refused as another structure (while unroll took it): the numbers are those of val as train
    orders it, on every policy, val_reduce=None, the training step (orders 1 and 2, the secant) and inrun_shapley."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(q, batch):
        return F.cross_entropy(functional_call(net, q, (batch["x"],)), batch["y"], reduction="none")

    g = torch.Generator().manual_seed(1)
    train = {"x": torch.randn(5, 3, generator=g, dtype=F64), "y": torch.randint(0, 2, (5,), generator=g)}
    val = {"x": torch.randn(3, 3, generator=g, dtype=F64), "y": torch.randint(0, 2, (3,), generator=g)}
    other = ({"y": val["y"], "x": val["x"]} if how == "keys in another order"
             else collections.OrderedDict(val))
    for policy in ("auto", "ghost", "materialize", "contract", "2t2"):
        for val_reduce in ("mean", None) if policy != "contract" else ("mean",):
            a = ghostfunc.graddot(model_fn, p, train, val, policy=policy, val_reduce=val_reduce).scores
            b = ghostfunc.graddot(model_fn, p, train, other, policy=policy, val_reduce=val_reduce).scores
            assert rel(b, a) < 1e-12, (policy, val_reduce)
    for order, curvature in ((1, "exact"), (2, "exact"), (2, "secant")):
        step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=order, curvature=curvature)
        a = step(step.init(p), train, val)[1].values
        b = step(step.init(p), train, other)[1].values
        assert rel(b, a) < 1e-12, (order, curvature)
    a = ghostfunc.inrun_shapley(model_fn, p, train, val, lr=0.1, order=2)
    b = ghostfunc.inrun_shapley(model_fn, p, train, other, lr=0.1, order=2)
    assert rel(b, a) < 1e-12
    with pytest.raises(ValueError, match="same structure"):
        ghostfunc.graddot(model_fn, p, train, {"x": val["x"], "z": val["y"]})
    # nested: a namedtuple holding the dict, and unroll's validation batch under a key
    pair = collections.namedtuple("pair", "batch w")

    def paired(q, batch):
        return model_fn(q, batch.batch) * batch.w

    a = ghostfunc.graddot(paired, p, pair(train, torch.ones(5, dtype=F64)), pair(val, torch.ones(3, dtype=F64)))
    b = ghostfunc.graddot(paired, p, pair(train, torch.ones(5, dtype=F64)), pair(other, torch.ones(3, dtype=F64)))
    assert rel(b.scores, a.scores) < 1e-12

    def keyed(q, batch):
        return model_fn(q, batch["inputs"])

    steps = [{"inputs": train, "index": torch.arange(5)}]
    want = ghostfunc.unroll(keyed, ghostfunc.sgd(0.1), p, steps, {"inputs": val}).total
    assert rel(ghostfunc.unroll(keyed, ghostfunc.sgd(0.1), p, steps, {"inputs": other}).total, want) < 1e-12


def test_a_zero_size_parameter_scores_zero_everywhere():
    """A used parameter with no entries (a [0, d] weight: a layer of width 0) has empty gradients: it scores 0 on
    every path and entry point (it once divided by its width of 0 while planning)."""
    g = torch.Generator().manual_seed(3)
    p = {"w": torch.randn(3, 5, generator=g, dtype=F64), "z": torch.zeros(0, 5, dtype=F64),
         "z_b": torch.zeros(0, dtype=F64)}

    def fn(p, batch):
        x, y = batch
        h = torch.cat([F.linear(x, p["w"]), F.linear(x, p["z"], p["z_b"])], -1)
        return F.cross_entropy(h, y, reduction="none")

    train = (torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    val = (torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    for val_reduce in ("mean", "sum", None):
        ref = ghostfunc.reference_graddot(fn, p, train, val, val_reduce=val_reduce)[0]
        for policy in ("auto", "ghost", "materialize", "contract"):
            if policy == "contract" and val_reduce is None:
                continue
            out = ghostfunc.graddot(fn, p, train, val, policy=policy, val_reduce=val_reduce)
            assert rel(out.scores, ref) < 1e-12 and not out.per_param["z"].any()
            assert out.train_grad["z"].shape == (0, 5) and out.plan.routes["z"].reason == "zero-size"
    for kw in ({}, {"order": 2}, {"order": 2, "curvature": "secant"}):
        assert torch.isfinite(ghostfunc.inrun_shapley(fn, p, train, val, lr=0.1, **kw)).all()
    for opt in (ghostfunc.sgd(0.1, momentum=0.9), ghostfunc.adamw(0.01)):
        step = ghostfunc.train_step(fn, opt)
        state, info = step(step.init(p), train, val)
        assert state.params["z"].shape == (0, 5) and torch.isfinite(info.values).all()


def test_reference_graddot_refuses_a_non_finite_gradient_as_graddot_does():
    """A row with a finite loss and a NaN gradient (sqrt at 0): graddot names the row and the parameter; the
    reference returned a NaN score silently."""
    model_fn, params, (x, y) = _mlp()

    def sqrt_at_zero(p, batch):
        return model_fn(p, batch) + torch.sqrt((batch[0][:, 0] - x[2, 0]).abs() * p["2.bias"][0] ** 2)

    for f, words in ((ghostfunc.graddot, r"train samples \[2\] .*not finite.*\['2.bias'\]"),
                     (ghostfunc.reference_graddot, r"train sample 2's loss .* not finite in params\['2.bias'\]")):
        with pytest.raises(FloatingPointError, match=words):
            f(sqrt_at_zero, params, (x, y), (x[:2], y[:2]))


def test_reference_graddot_checks_its_arguments_as_graddot_does():
    model_fn, params, (x, y) = _mlp()
    with pytest.raises(ValueError, match=r"^reference_graddot: train\[1\] is a scalar"):
        ghostfunc.reference_graddot(model_fn, params, (x, y[0]), (x, y))
    with pytest.raises(ValueError, match=r"^reference_graddot: val is empty"):
        ghostfunc.reference_graddot(model_fn, params, (x, y), (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"^reference_graddot: val_reduce must be one of"):
        ghostfunc.reference_graddot(model_fn, params, (x, y), (x, y), val_reduce="avg")
    with pytest.raises(ValueError, match=r"^reference_graddot: train and val must have the same structure"):
        ghostfunc.reference_graddot(model_fn, params, (x, y), {"x": x, "y": y})
    # what graddot refuses about the losses, the loop refuses too (it would otherwise return a number)
    with pytest.raises(ValueError, match=r"^reference_graddot: model_fn\(params, batch\) must return one "
                                         r"floating-point loss per sample.*4 train samples it returned a "
                                         r"torch.float64 tensor of shape \(\) \(a loss reduced over the batch"):
        ghostfunc.reference_graddot(lambda p, b: model_fn(p, b).mean(), params, (x, y), (x, y))
    with pytest.raises(ValueError, match=r"^reference_graddot: .*for 4 val samples it returned a torch.float64 "
                                         r"tensor of shape \(4, 1\)"):
        ghostfunc.reference_graddot(lambda p, b: model_fn(p, b)[:, None] if len(b[0]) == 4 and b[0] is not x
                                    else model_fn(p, b), params, (x, y), (x.clone(), y))
    # one that cannot run the whole batch (so no batch-level check) and returns several losses for one sample
    tokens = torch.randn(4, 7, x.shape[1], dtype=x.dtype)
    with pytest.raises(ValueError, match=r"^reference_graddot: model_fn\(params, batch\) must return one loss per "
                                         r"sample.*for train sample 0 alone \(a batch of 1\) it returned shape \(7,\)"):
        ghostfunc.reference_graddot(lambda p, b: ((b[0].reshape(-1, 3) @ p["0.weight"].T).sum(1) - b[1]) ** 2,
                                    params, (tokens, y.to(x.dtype)), (tokens, y.to(x.dtype)))
    xn = x.clone()
    xn[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^reference_graddot: model_fn returned a non-finite loss for val "
                                                 r"sample 3"):
        ghostfunc.reference_graddot(model_fn, params, (x, y), (xn, y))
    with pytest.raises(ValueError, match=r"^reference_graddot: the loss of train sample 0 has no autograd path"):
        ghostfunc.reference_graddot(lambda p, b: model_fn(p, b).detach(), params, (x, y), (x, y))


def test_error_nan_losses_name_the_samples():
    model_fn, params, (x, y) = _mlp()
    x = x.clone()
    x[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^graddot: .*non-finite losses for train samples \[2\].*"
                                                 r"Run model_fn\(params, batch\) on those rows"):
        ghostfunc.graddot(model_fn, params, (x, y), (x[:2], y[:2]))


def _nan_gradient_where_flagged(model_fn):
    """``model_fn`` plus ``sqrt(z)`` with ``z = (ℓ - ℓ.detach())² + c``: the loss is unchanged where ``c = 0`` (a row
    whose first feature is 7) but its gradient is ``inf * 0 = NaN`` there (the square root at 0)."""
    def fn(p, batch):
        losses = model_fn(p, batch)
        c = (batch[0][:, 0] != 7).to(losses.dtype)
        return losses + torch.sqrt((losses - losses.detach()) ** 2 + c) - c
    return fn


@pytest.mark.parametrize("side", ["train", "val"])
def test_finite_losses_with_non_finite_gradients_are_refused_everywhere(side):
    """Finite losses, a NaN gradient (a square root at 0): every entry point raises, naming the rows and the
    parameters, instead of NaN scores or a step that writes NaN into the parameters."""
    model_fn, params, (x, y) = _mlp()
    fn = _nan_gradient_where_flagged(model_fn)
    xv = x.flip(0).clone()
    x = x.clone()
    (x if side == "train" else xv)[2, 0] = 7.0
    train, val = (x, y), (xv, y)
    assert bool(torch.isfinite(fn(params, train)).all() and torch.isfinite(fn(params, val)).all())
    rows = r"\[2\]" if side == "train" else r"\[0, 1, 2, 3\]"
    which = "their gradients of params" if side == "train" else "the training gradients are finite, so the validation"
    for policy in ("auto", "ghost", "materialize", "contract"):
        with pytest.raises(FloatingPointError, match=rf"^graddot: the scores of train samples {rows} are not finite "
                                                     rf"though the losses are: {which}"):
            ghostfunc.graddot(fn, params, train, val, policy=policy)
    with pytest.raises(FloatingPointError, match=r"^graddot: the scores"):
        ghostfunc.graddot(fn, params, train, val, val_reduce=None)
    for kw in ({}, {"order": 2}, {"order": 2, "curvature": "secant"}):
        with pytest.raises(FloatingPointError, match=r"^inrun_shapley: "):
            ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, **kw)
    step = ghostfunc.train_step(fn, ghostfunc.sgd(0.1))
    state = step.init(params)
    before = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(FloatingPointError, match=r"^train_step: the values of train samples"):
        step(state, train, val)
    assert all(torch.equal(state.params[k], before[k]) for k in params)
    if side == "train":
        with pytest.raises(FloatingPointError, match=r"^graddot_direction: the scores of train samples \[2\]"):
            ghostfunc.graddot_direction(fn, params, train, {k: torch.ones_like(v) for k, v in params.items()})


@pytest.mark.parametrize("policy", ["ghost", "materialize", "contract"])
def test_error_nan_validation_loss(policy):
    """Both validation paths (captured for ghost, one ordinary backward otherwise) refuse non-finite losses."""
    model_fn, params, (x, y) = _mlp()
    xv = x.clone()
    xv[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^graddot: .*non-finite losses for val samples \[1\]"):
        ghostfunc.graddot(model_fn, params, (x, y), (xv, y), policy=policy)


def _vmap_grads(model_fn, params, batch):
    def one(p, sample):
        return model_fn(p, tuple(t.unsqueeze(0) for t in sample))[0]

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0), randomness="different")(params, batch)


@pytest.mark.parametrize(("policy", "val_reduce"), [(p, r) for p in ("ghost", "materialize", "contract")
                                                   for r in (None, "mean", "sum") if (p, r) != ("contract", None)])
def test_dropout_rows_see_the_masks_of_train_then_val(policy, val_reduce):
    """A model that draws random numbers sees them in the order ``model_fn(params, train)``,
    ``model_fn(params, val)`` would, on every path (the streamed one included), on every call."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).to(F64).train()

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    params = {k: v.detach() for k, v in net.named_parameters()}
    train = (torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1]))
    val = (torch.randn(3, 3, dtype=F64), torch.tensor([1, 0, 1]))
    for _ in range(2):  # the second call knows the model is random and goes train-first at once
        torch.manual_seed(3)
        out = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce, policy=policy)
        torch.manual_seed(3)
        lt, lv = model_fn(params, train), model_fn(params, val)
        torch.manual_seed(3)
        gt, gv = _vmap_grads(model_fn, params, train), _vmap_grads(model_fn, params, val)
        torch.testing.assert_close(out.train_loss, lt, rtol=0, atol=1e-13)
        torch.testing.assert_close(out.val_loss, lv, rtol=0, atol=1e-13)
        mat = sum(gt[k].flatten(1) @ gv[k].flatten(1).T for k in params)
        ref = {None: mat, "mean": mat.mean(1), "sum": mat.sum(1)}[val_reduce]
        assert rel(out.scores, ref) < 1e-10


def _plain_step_grads(model_fn, params, batch):
    """Per-sample gradients of one plain call ``model_fn(params, batch)`` with ordinary autograd (one forward, so
    one draw of its dropout masks from the generator as it stands; not jacrev, whose wrapped tensors draw in
    another order than the plain call's when a dropped tensor is a transposed view)."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    losses = model_fn(leaves, batch)
    rows = [torch.autograd.grad(loss, list(leaves.values()), retain_graph=True) for loss in losses]
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(leaves)}


def _graddot_and_plain_step(model_fn, params, train, val, seed=3):
    """``graddot`` from RNG seed ``seed``, and the loop over the rows of the plain calls ``model_fn(params, train)``
    then ``model_fn(params, val)`` from the same seed (their scores against the mean validation gradient)."""
    torch.manual_seed(seed)
    out = ghostfunc.graddot(model_fn, params, train, val)
    torch.manual_seed(seed)
    gt, gv = _plain_step_grads(model_fn, params, train), _plain_step_grads(model_fn, params, val)
    return out, sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in params)


@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "transposed view", "tokens flattened"])
def test_dropout_takes_the_plain_calls_masks_whatever_the_layout(layout):
    """Dropout draws in the dropped tensor's memory order in a plain call, while vmap gives each sample its row
    of an [n, ...] draw: the same masks only when the samples lie one after another. Dropped sequence-first, or
    as a batch-first view of sequence-first memory (nn.MultiheadAttention's output with batch_first=True), the
    capture takes a plain run's masks along the sample axis: scores, losses and the training gradient are those
    of the plain calls model_fn(params, train) then model_fn(params, val) from the same seed (their Jacobians),
    on both validation paths and every policy. With the samples flattened into the token axis (no single sample
    axis to slice along) the masks are vmap's own: exact for them (vmap(grad) with the same seed), and the plan
    says they are not a plain step's. In eval mode there is nothing to say."""
    torch.manual_seed(1)
    p = {"w": torch.randn(4, 4, dtype=F64), "v": torch.randn(2, 4, dtype=F64)}
    training = [True]

    def make():  # a fresh model_fn per path: each path's first call must find the masks on its own
        return lambda p, batch: model_fn(p, batch)

    def model_fn(p, batch):
        x, y = batch  # [B, T, 4]
        b, t = x.shape[:2]
        h = torch.tanh(F.linear(x if layout == "batch-first" else x.transpose(0, 1), p["w"]))  # [T, B, 4] or not
        if layout == "transposed view":
            h = h.transpose(0, 1)  # [B, T, 4] over [T, B, 4] memory
        elif layout == "tokens flattened":
            h = h.reshape(t * b, 4)  # sequence-major rows
        h = F.dropout(h, 0.5, training=training[0])
        if layout == "sequence-first":
            h = h.transpose(0, 1)
        elif layout == "tokens flattened":
            h = h.reshape(t, b, 4).transpose(0, 1)
        return F.cross_entropy(F.linear(h.mean(1), p["v"]), y, reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (5,), generator=g))
    val = (torch.randn(3, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (3,), generator=g))
    plain_masks = layout != "tokens flattened"
    for val_reduce, policy in (("mean", "materialize"), ("mean", "ghost"), (None, "ghost"), ("sum", "contract")):
        torch.manual_seed(3)
        out = ghostfunc.graddot(make(), p, train, val, val_reduce=val_reduce, policy=policy)
        after = torch.get_rng_state()
        torch.manual_seed(3)
        plain_t, plain_v = model_fn(p, train), model_fn(p, val)
        assert torch.equal(after, torch.get_rng_state())  # the generator left where the two plain calls leave it
        torch.manual_seed(3)
        if plain_masks:
            gt, gv = _plain_step_grads(model_fn, p, train), _plain_step_grads(model_fn, p, val)
        else:
            gt, gv = _vmap_grads(model_fn, p, train), _vmap_grads(model_fn, p, val)
        mat = sum(gt[k].flatten(1) @ gv[k].flatten(1).T for k in p)
        ref = {None: mat, "mean": mat.mean(1), "sum": mat.sum(1)}[val_reduce]
        assert rel(out.scores, ref) < 1e-10, (val_reduce, policy)
        assert all(rel(out.train_grad[k], gt[k].mean(0)) < 1e-10 for k in p)
        assert torch.allclose(out.train_loss, plain_t, rtol=1e-13, atol=0) == plain_masks
        if plain_masks:
            torch.testing.assert_close(out.val_loss, plain_v, rtol=1e-13, atol=0)
        assert (ghostfunc._graddot.MASKS_DIFFER in out.plan.notes) != plain_masks, str(out.plan)
    training[0] = False
    out = ghostfunc.graddot(model_fn, p, train, val)
    assert ghostfunc._graddot.MASKS_DIFFER not in out.plan.notes


def test_noise_drawn_in_another_order_is_told_and_later_calls_repeat_the_first():
    """Noise added with randn_like to a sequence-first tensor: vmap draws it in another order than the plain call,
    and no plain run's mask can stand in for it: exact for the noise drawn (vmap(grad) with the same seed), the
    plan says the draws are not a plain step's, and the first call's numbers and generator state are those of
    later calls from the same seed (a run resumed in a new process repeats the uninterrupted one)."""
    torch.manual_seed(1)
    p = {"w": torch.randn(4, 4, dtype=F64), "v": torch.randn(2, 4, dtype=F64)}

    def model_fn(p, batch):
        x, y = batch
        h = torch.tanh(F.linear(x.transpose(0, 1), p["w"]))  # [T, B, 4]
        h = (h + 0.1 * torch.randn_like(h)).transpose(0, 1)
        return F.cross_entropy(F.linear(h.mean(1), p["v"]), y, reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (5,), generator=g))
    val = (torch.randn(3, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (3,), generator=g))
    outs, states = [], []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(ghostfunc.graddot(model_fn, p, train, val, policy="materialize"))
        states.append(torch.get_rng_state())
    assert torch.equal(outs[0].scores, outs[1].scores) and torch.equal(states[0], states[1])
    assert all(ghostfunc._graddot.MASKS_DIFFER in o.plan.notes for o in outs)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))  # a training loop is told too
    assert ghostfunc._graddot.MASKS_DIFFER in step(step.init(p), train, val)[1].notes
    torch.manual_seed(3)
    gt, gv = _vmap_grads(model_fn, p, train), _vmap_grads(model_fn, p, val)
    assert rel(outs[0].scores, sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)) < 1e-10


@pytest.mark.parametrize("rows", [4, 1])
@pytest.mark.parametrize("draw", ["seeded randn", "seeded fill", "global randn", "reseeded randn", "global fill",
                                  "seeded randperm", "global rand of a parameter's shape", "gumbel softmax",
                                  "alpha dropout", "torch.dropout"])
def test_a_draw_no_sample_owns_is_made_once_as_in_a_plain_call(draw, rows):
    """A tensor drawn inside model_fn from inputs no sample owns (torch.randn(d, d), a fill of a fresh tensor, from
    a torch.Generator seeded in the call or from the global one) is one draw that every sample of a plain call
    shares; vmap(randomness="different") would give each sample its own (1.4 relative off, with no note). The
    scores are the per-sample loop's with the plain calls' draws (train first, then val, from the same seed),
    the losses the plain call's, the generator left where the two plain calls leave it; train_step too."""
    torch.manual_seed(0)
    d, c = 5, 4
    p = {"w": torch.randn(c, d, dtype=F64) / 2, "b": torch.randn(c, dtype=F64)}
    fixed: list[torch.Tensor] = []  # the truth: the plain calls' draws, fixed

    def noise(dtype):
        if fixed:
            return fixed.pop(0)
        g = torch.Generator().manual_seed(7)
        if draw == "seeded randn":
            return torch.randn(d, d, generator=g, dtype=dtype)
        if draw == "seeded fill":
            return torch.diag(torch.empty(d, dtype=dtype).uniform_(0.5, 1.5, generator=g))
        if draw == "global randn":
            return torch.randn(d, d, dtype=dtype)
        if draw == "reseeded randn":
            torch.manual_seed(11)
            return torch.randn(d, d, dtype=dtype)
        if draw == "global fill":
            return torch.diag(torch.empty(d, dtype=dtype).normal_(1.0, 0.3))
        if draw == "seeded randperm":
            return torch.eye(d, dtype=dtype)[torch.randperm(d, generator=g)]
        if draw == "gumbel softmax":  # (draws in place inside: vmap raised, taken for samples that interact)
            return torch.diag(1 + F.gumbel_softmax(torch.zeros(d, dtype=dtype), tau=1.0))
        if draw == "alpha dropout":
            return torch.diag(F.alpha_dropout(torch.ones(d, dtype=dtype), 0.3, True))
        if draw == "torch.dropout":
            return torch.diag(torch.dropout(torch.ones(d, dtype=dtype), 0.3, True))
        return torch.eye(d, dtype=dtype) + torch.rand(d, d, dtype=dtype)

    def model_fn(q, batch):
        x, y = batch
        return F.cross_entropy(F.linear(torch.tanh(x @ noise(x.dtype)), q["w"], q["b"]), y, reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(rows, d, generator=g, dtype=F64), torch.randint(0, c, (rows,), generator=g))
    val = (torch.randn(3, d, generator=g, dtype=F64), torch.randint(0, c, (3,), generator=g))
    for call in range(2):
        torch.manual_seed(3)
        out = ghostfunc.graddot(model_fn, p, train, val)
        after = torch.get_rng_state()
        torch.manual_seed(3)
        drawn = [noise(F64), noise(F64)]  # what model_fn(p, train), then model_fn(p, val), draw
        torch.manual_seed(3)
        lt, lv = model_fn(p, train), model_fn(p, val)
        assert torch.equal(after, torch.get_rng_state()), call
        torch.testing.assert_close(out.train_loss, lt, rtol=1e-13, atol=0)
        torch.testing.assert_close(out.val_loss, lv, rtol=1e-13, atol=0)
        fixed[:] = [drawn[0]] * train[0].shape[0]
        gt = _plain_step_grads(model_fn, p, train)
        fixed[:] = [drawn[1]] * val[0].shape[0]
        gv = _plain_step_grads(model_fn, p, val)
        fixed.clear()
        ref = sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)
        assert rel(out.scores, ref) < 1e-10, (call, rel(out.scores, ref))
        assert ghostfunc._graddot.MASKS_DIFFER not in out.plan.notes
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    torch.manual_seed(3)
    _, info = step(step.init(p), train, val)
    assert rel(info.values, -0.1 / rows * ref) < 1e-10
    # against a fixed direction too (graddot_direction drew per sample: 1.4 off)
    u = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in p.items()}
    torch.manual_seed(3)
    got = ghostfunc.graddot_direction(model_fn, p, train, u)
    assert rel(got.scores, sum(gt[k].flatten(1) @ u[k].flatten() for k in p)) < 1e-10


@pytest.mark.parametrize("losses", ["bfloat16", "float32"])
def test_bfloat16_sequence_first_dropout_takes_the_plain_calls_masks(losses):
    """In bfloat16 the first call's loss comparison allowed sqrt(eps) = 8.8% of the largest loss, so vmap's masks
    of a sequence-first dropout (nn.TransformerEncoderLayer, batch_first=False) passed as the plain call's (0.12
    off the loop, no note); with float32 losses of the bfloat16 model the replayed masks were refused instead (the
    masks-differ note, 0.14 off). A 16-bit model tries every way of drawing and keeps the closest."""
    torch.manual_seed(0)
    dt, d, t = torch.bfloat16, 32, 12
    enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.3, batch_first=False).to(dt).train()
    head = nn.Linear(d, 3).to(dt)
    p = {**{"enc." + k: v.detach() + 0.01 for k, v in enc.named_parameters()},
         **{"head." + k: v.detach() for k, v in head.named_parameters()}}

    def model_fn(q, b):
        x, y = b
        h = functional_call(enc, {k[4:]: v for k, v in q.items() if k.startswith("enc.")}, (x.transpose(0, 1),))
        logits = functional_call(head, {k[5:]: v for k, v in q.items() if k.startswith("head.")},
                                 (h.transpose(0, 1).mean(1),))
        return F.cross_entropy(logits if losses == "bfloat16" else logits.float(), y, reduction="none")

    g = torch.Generator().manual_seed(1)
    train = (torch.randn(16, t, d, generator=g).to(dt), torch.randint(0, 3, (16,), generator=g))
    val = (torch.randn(4, t, d, generator=g).to(dt), torch.randint(0, 3, (4,), generator=g))
    torch.manual_seed(3)
    out = ghostfunc.graddot(model_fn, p, train, val)
    torch.manual_seed(3)
    gt, gv = _plain_step_grads(model_fn, p, train), _plain_step_grads(model_fn, p, val)
    ref = sum(gt[k].float().flatten(1) @ gv[k].float().flatten(1).mean(0) for k in p)
    assert rel(out.scores.float(), ref) < 0.02, rel(out.scores.float(), ref)
    assert not out.plan.notes, out.plan.notes


@pytest.mark.parametrize("draw", ["shared randn", "sequence-first dropout"])
def test_draws_decided_behind_a_zero_parameter_are_told_and_decided_again_once_it_moves(draw):
    """A draw whose only effect is behind a parameter zero everywhere (a LoRA branch, B = 0): every way of drawing
    gives the plain call's losses, so the first call cannot tell vmap's draws from a plain call's. For a draw no
    sample owns that call's plan says so (B's gradients take vmap's draws; for dropout it does not, or every fresh
    Hugging Face model in training mode, zero biases, would say it); once B moves, the next call compares again
    and takes the plain call's draws (the first verdict was kept: 1.07 relative off the plain step, silently)."""
    torch.manual_seed(0)
    d, c = 5, 4
    p = {"w": torch.randn(c, d, dtype=F64) / 2, "A": torch.randn(d, d, dtype=F64), "B": torch.zeros(d, d, dtype=F64)}

    def model_fn(q, batch):
        x, y = batch  # [n, 3, d]
        if draw == "shared randn":
            lora = x @ torch.randn(d, d, dtype=x.dtype) @ q["A"]
        else:
            lora = F.dropout(x.transpose(0, 1).contiguous(), 0.5, True).transpose(0, 1) @ q["A"]
        h = torch.tanh(x + lora @ q["B"]).mean(1)
        return F.cross_entropy(F.linear(h, q["w"]), y, reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(4, 3, d, generator=g, dtype=F64), torch.randint(0, c, (4,), generator=g))
    val = (torch.randn(3, 3, d, generator=g, dtype=F64), torch.randint(0, c, (3,), generator=g))
    torch.manual_seed(3)
    first = ghostfunc.graddot(model_fn, p, train, val)
    told = any("decided while B were zero everywhere" in n for n in first.plan.notes)
    assert told == (draw == "shared randn"), first.plan.notes  # (dropout: not said, below)
    p["B"] = torch.randn(d, d, dtype=F64) / 2  # a training step moved it
    for _ in range(2):
        out, ref = _graddot_and_plain_step(model_fn, p, train, val)
        assert rel(out.scores, ref) < 1e-10, rel(out.scores, ref)
        assert not out.plan.notes, out.plan.notes


@pytest.mark.parametrize("how", ["torch.rand", "new_empty().bernoulli_"])
def test_stochastic_depth_keeps_a_draw_per_sample(how):
    """Stochastic depth draws one number per sample from a shape that names the batch (torch.rand((x.shape[0], 1))
    as Hugging Face's drop_path, x.new_empty(...).bernoulli_ as timm's): each sample its own draw, as in the plain
    call, not one draw for the batch (which the comparison with a plain run rules out for such a model)."""
    torch.manual_seed(0)
    p = {"w": torch.randn(6, 5, dtype=F64), "v": torch.randn(3, 6, dtype=F64)}

    def model_fn(q, batch):
        x, y = batch
        h = torch.tanh(F.linear(x, q["w"]))
        if how == "torch.rand":
            keep = (0.6 + torch.rand((x.shape[0], 1), dtype=x.dtype)).floor()
        else:
            keep = x.new_empty((x.shape[0], 1)).bernoulli_(0.6)
        h = h + torch.tanh(h @ (q["v"].T @ q["v"])) * keep / 0.6
        return F.cross_entropy(F.linear(h, q["v"]), y, reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    val = (torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    for _ in range(2):
        out, ref = _graddot_and_plain_step(model_fn, p, train, val)
        assert rel(out.scores, ref) < 1e-10
        assert ghostfunc._graddot.MASKS_DIFFER not in out.plan.notes


def test_a_module_switched_to_drop_sequence_first_is_compared_again():
    """A module attribute that moves dropout to a sequence-first tensor after a first batch-first call (same
    parameters, batches and modes): the first call's verdict (vmap's masks are the plain call's) was kept, 0.27 off
    the plain step; the verdict is kept under the modules' settings too."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.seq_first = nn.Linear(4, 8), nn.Linear(8, 3), False

        def forward(self, x):  # [B, T, 4]
            h = torch.tanh(self.l1(x))
            if self.seq_first:
                h = F.dropout(h.transpose(0, 1).contiguous(), 0.5, True).transpose(0, 1)
            else:
                h = F.dropout(h, 0.5, True)
            return self.l2(h.mean(1))

    net = Net().to(F64)
    p = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(q, batch):
        return F.cross_entropy(functional_call(net, q, (batch[0],)), batch[1], reduction="none")

    g = torch.Generator().manual_seed(2)
    train = (torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g))
    val = (torch.randn(3, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g))
    for seq_first in (False, True):
        net.seq_first = seq_first
        torch.manual_seed(3)
        out = ghostfunc.graddot(model_fn, p, train, val)
        torch.manual_seed(3)
        gt, gv = _plain_step_grads(model_fn, p, train), _plain_step_grads(model_fn, p, val)
        assert rel(out.scores, sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)) < 1e-10, seq_first


def test_a_transformer_encoder_layer_in_training_mode_is_the_plain_step():
    """nn.TransformerEncoderLayer(batch_first=True) in training mode drops nn.MultiheadAttention's output, a
    batch-first view of sequence-first memory: graddot's scores and losses are the plain call's (ordinary
    autograd, same seed), on the first call (which finds vmap's masks are not the plain call's and computes again
    with a plain run's) and on later ones; train_step's step is torch.optim.SGD's from the same seed."""
    torch.manual_seed(4)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).to(F64).train()
    head = torch.randn(3, 8, dtype=F64)

    def model_fn(p, batch):
        x, y = batch
        return F.cross_entropy(F.linear(functional_call(enc, p, (x,)).mean(1), head), y, reduction="none")

    params = {k: v.detach() for k, v in enc.named_parameters()}
    g = torch.Generator().manual_seed(5)
    train = (torch.randn(4, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    val = (torch.randn(3, 5, 8, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g))
    for seed in (6, 7):
        torch.manual_seed(seed)
        out = ghostfunc.graddot(model_fn, params, train, val, policy="materialize")
        torch.manual_seed(seed)
        gt, gv = _plain_step_grads(model_fn, params, train), _plain_step_grads(model_fn, params, val)
        ref = sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in params)
        assert rel(out.scores, ref) < 1e-10 and not out.plan.notes
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    torch.manual_seed(8)
    state, _ = step(step.init(params), train, val)
    leaves = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.SGD(leaves.values(), lr=0.1)
    torch.manual_seed(8)
    model_fn(leaves, train).mean().backward()
    opt.step()
    assert all(rel(state.params[k], leaves[k].detach()) < 1e-12 for k in params)


def test_divergent_data_dependent_branch_splits_the_batch():
    def model_fn(p, x):
        h = F.linear(x, p["W"])
        if h.sum() > 0:  # data-dependent: one batch when every sample agrees, split into groups otherwise
            return h.pow(2).sum(1)
        return h.abs().sum(1)

    p = {"W": torch.eye(2, dtype=F64)}
    pos = torch.rand(3, 2, dtype=F64) + 0.1
    check(model_fn, p, pos, pos)  # all samples take the same branch: exact
    mixed = torch.cat([pos, -pos])
    check(model_fn, p, mixed, pos)  # each sample takes its own branch, as in the single-sample loop
    assert "train split into 2 groups" in str(ghostfunc.graddot(model_fn, p, mixed, pos).plan)


def test_a_parameter_one_batch_never_reaches_scores_zero_on_every_path():
    """Each sample takes the W or the V branch; the training rows of later calls take W only and the
    validation rows V only, after calls where both did: V has no training uses (and W no validation
    ones), which every kernel and the training step's kept rows must take as zero gradients."""
    g = torch.Generator().manual_seed(0)
    p = {"W": torch.randn(5, 4, generator=g, dtype=F64), "V": torch.randn(5, 4, generator=g, dtype=F64),
         "U": torch.randn(2, 5, generator=g, dtype=F64)}

    def model_fn(p, x):
        h = F.linear(x, p["W"]) if x[:, 0].sum() > 0 else F.linear(x, p["V"])
        return F.linear(torch.tanh(h), p["U"]).pow(2).sum(1)

    w_rows = torch.randn(3, 4, generator=g, dtype=F64).abs() + 0.1  # W branch
    v_rows = -torch.randn(2, 4, generator=g, dtype=F64).abs() - 0.1  # V branch
    mixed = torch.cat([w_rows, v_rows])
    for reduce in ("sum", "mean", None):
        for policy in ("materialize", "ghost", "auto", "2t2") + (("contract",) if reduce else ()):
            for train, val in ((mixed, mixed), (w_rows, v_rows), (w_rows[:1], v_rows), (v_rows, w_rows)):
                check(model_fn, p, train, val, val_reduce=reduce, policy=policy)
    for order, curvature in ((1, "exact"), (2, "exact"), (2, "secant")):
        step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=order, curvature=curvature)
        state = step.init(p)
        for train, val in ((mixed, mixed), (w_rows, v_rows), (w_rows, v_rows)):
            ref = ghostfunc.inrun_shapley(model_fn, state.params, train, val, lr=0.1, order=order, curvature=curvature)
            state, info = step(state, train, val)
            assert rel(info.values, ref) < 1e-10


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"val_reduce": "max"}, "val_reduce must be one of"), ({"policy": "fast"}, "policy must be one of"),
     ({"policy": "contract", "val_reduce": None}, "policy='contract'.*needs val_reduce"),
     ({"compute_dtype": "bfloat16"}, "compute_dtype must be None or a floating torch.dtype")],
)
def test_error_bad_options(kw, match):
    model_fn, params, batch = _mlp()
    with pytest.raises((ValueError, TypeError), match=rf"^graddot: {match}"):
        ghostfunc.graddot(model_fn, params, batch, batch, **kw)


def test_error_params_not_a_dict_and_model_fn_not_callable():
    model_fn, params, batch = _mlp()
    with pytest.raises(TypeError, match=r"^graddot: params must be a dict"):
        ghostfunc.graddot(model_fn, list(params.values()), batch, batch)
    with pytest.raises(TypeError, match=r"^graddot: model_fn must be callable"):
        ghostfunc.graddot(None, params, batch, batch)
    with pytest.raises(ValueError, match=r"^plan: val_reduce"):
        ghostfunc.plan(model_fn, params, batch, batch, val_reduce="max")


def test_flat_batches_split_as_the_pytree_walk_does():
    """A tensor, or a plain tuple/list of tensors, is split without a pytree walk: same signature and
    container as the walk (cached traces, checks and verdicts are keyed by it)."""
    from torch.utils import _pytree as pytree

    from ghostfunc import _capture

    for batch in (torch.randn(3, 2), (torch.randn(3, 2), torch.randn(3)), [torch.randn(3, 4, 2)],
                  (torch.randn(3).to(torch.float64),)):
        fast = _capture.split_batch(batch)
        leaves, spec = pytree.tree_flatten(batch)
        tensors, rebuild = _capture.tensor_leaves(leaves, spec)
        assert fast.signature == (str(spec), tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors))
        assert fast.size == 3 and all(a is b for a, b in zip(fast.tensors, tensors, strict=True))
        again, expected = fast.rebuild(list(fast.tensors)), rebuild(tensors)
        assert type(again) is type(expected) and pytree.tree_structure(again) == pytree.tree_structure(expected)
    assert _capture._flat_batch((torch.randn(3), 1.5)) is None  # a non-tensor leaf: the walk
    assert _capture._flat_batch(torch.tensor(1.0)) is None  # a scalar: the walk names it


NO_OP_CONVERSIONS = {
    "to(dtype)": lambda w, x: w.to(x.dtype),
    "to(device)": lambda w, x: w.to(x.device),
    "float()/double()": lambda w, x: w.double() if w.dtype == F64 else w.float(),
    "type_as": lambda w, x: w.type_as(x),
    "cpu()": lambda w, x: w.cpu(),
    "contiguous()": lambda w, x: w.contiguous(),
    "+w": lambda w, x: +w,
    "to(dtype, non_blocking)": lambda w, x: w.to(x.dtype, True),
    "to(device, dtype, non_blocking, copy=False)": lambda w, x: w.to(x.device, x.dtype, True, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("policy", ["auto", "ghost", "materialize", "contract"])
@pytest.mark.parametrize("spelling", list(NO_OP_CONVERSIONS))
def test_a_conversion_to_what_a_parameter_already_is_is_the_parameter(spelling, policy, dtype):
    """``F.linear(x, w.to(x.dtype))`` and the like (custom layers write them) with nothing to convert: eagerly
    ``w`` itself, under vmap/grad a new wrapper; both are the parameter, which keeps its linear route."""
    convert = NO_OP_CONVERSIONS[spelling]
    torch.manual_seed(3)
    params = {"w": torch.randn(5, 4, dtype=dtype), "b": torch.randn(5, dtype=dtype), "v": torch.randn(3, 5, dtype=dtype)}

    def fn(p, batch):
        x, y = batch
        h = torch.tanh(F.linear(x, convert(p["w"], x), convert(p["b"], x)))
        return F.cross_entropy(h @ convert(p["v"], x).t(), y, reduction="none")

    x, y = torch.randn(9, 4, dtype=dtype), torch.randint(0, 3, (9,))
    train, val = (x[:6], y[:6]), (x[6:], y[6:])
    out = ghostfunc.graddot(fn, params, train, val, policy=policy)
    ref, _, _ = ghostfunc.reference_graddot(fn, params, train, val)
    assert rel(out.scores, ref) < (1e-10 if dtype == F64 else 1e-5)
    assert out.plan.routes["w"].path != "fallback", out.plan
    again = ghostfunc.graddot(fn, params, train, val, policy=policy)  # the later calls' path (a replay)
    assert rel(again.scores, ref) < (1e-10 if dtype == F64 else 1e-5)


def test_a_real_conversion_of_a_parameter_stays_exact():
    """``w.float()`` on a float64 parameter converts: an unrecognised use, the exact fallback."""
    torch.manual_seed(4)
    params = {"w": torch.randn(3, 4, dtype=F64)}

    def fn(p, batch):
        x, y = batch
        return F.cross_entropy(x.float() @ p["w"].float().t(), y, reduction="none").double()

    x, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    out = ghostfunc.graddot(fn, params, (x[:4], y[:4]), (x[4:], y[4:]))
    ref, _, _ = ghostfunc.reference_graddot(fn, params, (x[:4], y[:4]), (x[4:], y[4:]))
    assert rel(out.scores, ref) < 1e-5


def _pooled(p, batch):
    """Attention pooling over tokens: the score layer's output gradients sum to zero over each row's tokens."""
    x, y = batch
    a = torch.softmax(F.linear(x, p["score"]).squeeze(-1), -1)  # [B, T]
    return F.cross_entropy(F.linear((a[..., None] * x).sum(1), p["head"]), y, reduction="none")


@pytest.mark.parametrize("offset", [10.0, 30.0])
def test_the_gram_kernel_keeps_the_loops_float32_digits_when_a_common_part_cancels_over_tokens(offset):
    """Features that share a large part across tokens (un-centred inputs, a residual stream's constant
    dimensions), where the layer's gradient contributions cancel over the tokens: the Gram kernel multiplied
    token inner products before summing, squaring that part before it cancelled (3.4e-3 off at offset 30
    where the float32 loop is 8.5e-5 off; 3.1e-4 against 7.1e-6 at 10). It pairs each row's centred tokens and
    their mean now: ghost is as close to the float64 truth as the float32 loop (both reductions)."""
    g = torch.Generator().manual_seed(0)
    d = 256

    def make(n):
        return offset + torch.randn(n, 4, d, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)

    train, val = make(16), make(8)
    p64 = {"score": torch.randn(1, d, generator=g, dtype=F64) / d / offset,
           "head": torch.randn(3, d, generator=g, dtype=F64) / d / offset}
    _ghost_pooled_as_close_as_the_loop(p64, train, val, 4)


def _ghost_pooled_as_close_as_the_loop(p64, train, val, factor):
    """The ghost kernel's float32 ``per_param["score"]`` of :func:`_pooled` is within ``factor`` times the float32
    loop's error of the float64 truth, for both reductions."""
    p32 = {k: v.float() for k, v in p64.items()}
    t32, v32 = (train[0].float(), train[1]), (val[0].float(), val[1])
    for val_reduce in ("mean", None):
        truth = ghostfunc.reference_graddot(_pooled, p64, train, val, val_reduce=val_reduce)[1]["score"]
        loop = ghostfunc.reference_graddot(_pooled, p32, t32, v32, val_reduce=val_reduce)[1]["score"]
        ghost = ghostfunc.graddot(_pooled, p32, t32, v32, val_reduce=val_reduce, policy="ghost")
        assert ghost.plan.routes["score"].path == "ghost"
        assert rel(ghost.per_param["score"].double(), truth) < factor * max(rel(loop.double(), truth), 1e-6), \
            val_reduce


def test_centring_is_judged_on_every_row():
    """The common part only in rows after the first 8 (a batch mixing normalised and raw rows): judged on the
    first 8 rows, centring was skipped and ghost kept float32 at 10x the loop's error."""
    g = torch.Generator().manual_seed(1)
    d = 256

    def make(n):
        x = torch.randn(n, 4, d, generator=g, dtype=F64)
        x[8:] += 30.0
        return x, torch.randint(0, 3, (n,), generator=g)

    train, val = make(16), make(16)
    p64 = {"score": torch.randn(1, d, generator=g, dtype=F64) / d / 30, "head": torch.randn(3, d, generator=g,
                                                                                          dtype=F64) / d / 30}
    _ghost_pooled_as_close_as_the_loop(p64, train, val, 3)


@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_ghost_keeps_the_float32_digits_when_the_validation_rows_cancel(offset):
    """A zero-initialised linear head on class-balanced validation rows with un-centred features: the residuals
    cancel over the validation rows, so the mean validation gradient is tiny next to each row's own. The Gram
    kernel rounded every <g_i, g_v> at its own scale before the sum (2.4e-4 off at offset 100 where the loop is
    1.8e-6 off; compute_dtype bfloat16: 3.2); it recomputes such a parameter's reduced scores by contraction."""
    g = torch.Generator().manual_seed(2)
    classes, d = 10, 64

    def fn(p, batch):
        x, y = batch
        return F.cross_entropy(F.linear(x, p["W"]), y, reduction="none")

    def make(n):
        return offset + torch.randn(n, d, generator=g, dtype=F64), torch.arange(n) % classes

    train, val = make(32), make(200)
    p64 = {"W": torch.zeros(classes, d, dtype=F64)}
    p32 = {"W": p64["W"].float()}
    t32, v32 = (train[0].float(), train[1]), (val[0].float(), val[1])
    for val_reduce in ("mean", "sum"):
        truth = ghostfunc.reference_graddot(fn, p64, train, val, val_reduce=val_reduce)[0]
        loop = ghostfunc.reference_graddot(fn, p32, t32, v32, val_reduce=val_reduce)[0]
        bound = max(rel(loop.double(), truth), 1e-6)
        for policy in ("ghost", "2t2"):
            out = ghostfunc.graddot(fn, p32, t32, v32, val_reduce=val_reduce, policy=policy)
            assert out.plan.routes["W"].path == "ghost"
            assert rel(out.scores.double(), truth) < 5 * bound, (val_reduce, policy)
        low = ghostfunc.graddot(fn, p32, t32, v32, val_reduce=val_reduce, policy="ghost", compute_dtype=torch.bfloat16)
        assert rel(low.scores.double(), truth) < 2e-2, val_reduce
    full = ghostfunc.graddot(fn, p32, t32, v32, val_reduce=None, policy="ghost")  # nothing reduced: as it was
    truth = ghostfunc.reference_graddot(fn, p64, train, val, val_reduce=None)[0]
    assert rel(full.scores.double(), truth) < 1e-5


@pytest.mark.parametrize("offset", [0.0, 5.0], ids=["as drawn", "a common part"])
@pytest.mark.parametrize("block", [1 << 24, 7, 1], ids=["one block", "row and token blocks", "a pair per block"])
@pytest.mark.parametrize(("t", "s", "ids"), [(1, 1, False), (5, 3, False), (4, 1, False), (6, 2, True)])
def test_the_gram_kernel_equals_the_materialised_dot_products(block, t, s, ids, offset, monkeypatch):
    """``gram`` (with a common part, centred tokens and their mean; cut in blocks of at most GRAM_BLOCK elements,
    the mean tokens after the others) against the per-row gradients materialised:
    ``<Σ_t L_t ⊗ R_t, Σ_s L'_s ⊗ R'_s>``."""
    from ghostfunc import _kernels as K
    from ghostfunc._ops import Factored

    monkeypatch.setattr(K, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(t * 10 + s)
    n, m, p, d = 3, 2, 5, 4
    a = Factored(torch.randint(0, p, (n, t), generator=g) if ids else torch.randn(n, t, p, generator=g, dtype=F64),
                 offset + torch.randn(n, t, d, generator=g, dtype=F64), p)
    b = Factored(torch.randn(m, s, p, generator=g, dtype=F64), offset + torch.randn(m, s, d, generator=g, dtype=F64),
                 p)
    assert (K._centring(b) is not None) == (s > 1) or not offset  # centred where a common part dominates

    def rows(f):
        left = F.one_hot(f.left, p).to(F64) if f.ids else f.left
        return torch.einsum("ntp,ntd->npd", left, f.right).flatten(1)

    torch.testing.assert_close(K.gram(a, b), rows(a) @ rows(b).T, rtol=1e-12, atol=1e-12)


def test_small_ergonomics():
    """A DataValues compared with == (the dataclass compared its tensors and raised), the package's type hints
    visible to a type checker (py.typed), a version on the command line, inrun_shapley's lr as a one-element
    tensor (as sgd/adamw and torch.optim take it)."""
    import subprocess
    import sys
    from importlib import resources

    def three(p, x, y):
        return model_fn(p, (x, y))

    a = ghostfunc.DataValues.zeros(3)
    assert a == a and a != ghostfunc.DataValues.zeros(3)
    assert repr(ghostfunc.sgd(0.1, momentum=0.9)).startswith("sgd(lr=0.1 at step 0, momentum=0.9,")  # (not closures)
    assert resources.files("ghostfunc").joinpath("py.typed").is_file()
    run = subprocess.run([sys.executable, "-m", "ghostfunc", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"ghostfunc {ghostfunc.__version__}"
    model_fn, params, (x, y) = _mlp()
    pd = nn.ParameterDict({"w": nn.Parameter(torch.randn(3, 3, dtype=F64))})  # (refused: not a dict)

    def linear(p, batch):
        return F.cross_entropy(batch[0] @ p["w"], batch[1], reduction="none")

    assert torch.equal(ghostfunc.graddot(linear, pd, (x, y), (x, y)).scores,
                       ghostfunc.graddot(linear, dict(pd), (x, y), (x, y)).scores)
    assert set(ghostfunc.train_step(linear, ghostfunc.sgd(0.1)).init(pd).params) == {"w"}

    def injecting(fn):  # a decorator whose wrapper takes (params, batch): its signature is the wrapper's
        @functools.wraps(fn)
        def wrapper(p, batch):
            return fn(0.5, p, batch)
        return wrapper

    @injecting
    def scaled(scale, p, batch):
        return linear(p, batch) * scale

    torch.testing.assert_close(ghostfunc.graddot(scaled, pd, (x, y), (x, y)).scores,
                               0.25 * ghostfunc.graddot(linear, pd, (x, y), (x, y)).scores)
    got = ghostfunc.inrun_shapley(model_fn, params, (x, y), (x, y), lr=torch.tensor(0.1, dtype=F64))
    assert torch.equal(got, ghostfunc.inrun_shapley(model_fn, params, (x, y), (x, y), lr=0.1))
    with pytest.raises(TypeError, match="got an empty list"):
        ghostfunc.unroll(model_fn, ghostfunc.sgd(0.1), params, [], (x, y))
    with pytest.raises(TypeError, match=r"^graddot: model_fn must be callable as model_fn\(params, batch\).*its "
                                        r"signature is three\(p, x, y\)"):  # (a bare "missing 1 required ...")
        ghostfunc.graddot(three, params, (x, y), (x, y))
    def swapped(p, batch, extra):  # a model_fn whose signature a later cell of a notebook changes
        return model_fn(p, batch)

    for defaults in ((None,), None, (None,)):  # (its signature's check is kept: 2% of a small model's call)
        swapped.__defaults__ = defaults
        if defaults is None:
            with pytest.raises(TypeError, match=r"its signature is swapped\(p, batch, extra\)"):
                ghostfunc.graddot(swapped, params, (x, y), (x, y))
        else:
            ghostfunc.graddot(swapped, params, (x, y), (x, y))

    def keyword(p, batch, *, scale=1.0):  # its keyword-only default deleted in place (the same dict object)
        return model_fn(p, batch) * scale

    ghostfunc.graddot(keyword, params, (x, y), (x, y))
    del keyword.__kwdefaults__["scale"]
    with pytest.raises(TypeError, match=r"its signature is keyword\(p, batch, \*, scale\)"):
        ghostfunc.graddot(keyword, params, (x, y), (x, y))
    with pytest.raises(ValueError, match=r"^graddot: train\[0\] is on the meta device"):  # (not aten::equal's error)
        ghostfunc.graddot(model_fn, params, (x.to("meta"), y), (x, y))

    def fn(p, batch):
        return model_fn(p, (batch["x"], batch["y"]))

    batches = [{"x": x, "y": y, "index": torch.arange(4)}, {"x": x.flip(0), "y": y.flip(0), "index": torch.arange(4, 8)}]
    as_numpy = [{**b, "index": b["index"].numpy()} for b in batches]  # (DataValues.add takes them: unroll too)
    val = {"x": x, "y": y}
    want = ghostfunc.unroll(fn, ghostfunc.sgd(0.1), params, batches, val).total
    assert torch.equal(ghostfunc.unroll(fn, ghostfunc.sgd(0.1), params, as_numpy, val).total, want)


def test_a_float16_share_beyond_its_range_is_named_as_such() -> None:
    """A float16 regression with outputs near 1000: each per-sample gradient is finite, a parameter's share of a
    score is beyond float16's 65504 (the float16 loop's scores are inf too). Refused, naming float16's range and
    what to do (the message blamed a sqrt or a NaN gradient only, h64)."""
    g = torch.Generator().manual_seed(0)
    half = torch.float16
    w1 = (torch.randn(64, 16, generator=g) / 4).to(half)
    w2 = (torch.randn(4, 64, generator=g) * 1000 / 8).to(half)
    b2 = torch.full((4,), 1000.0, dtype=half)
    x = torch.randn(16, 16, generator=g).to(half)
    y = (torch.tanh(x.float() @ w1.float().T) @ w2.float().T + b2.float()).to(half)

    def model_fn(p, b):
        return ((F.linear(torch.tanh(F.linear(b["x"], p["w1"])), p["w2"], p["b2"]) - b["y"]) ** 2).mean(-1)

    train, val = {"x": x[:10], "y": y[:10] + 1}, {"x": x[10:], "y": y[10:] + 1}
    with pytest.raises(FloatingPointError, match=r"^graddot: the scores of train samples .* Params \['w1'\] are "
                                                 r"float16, whose range ends at 65504 .*scale the loss down, or use "
                                                 r"bfloat16$"):
        ghostfunc.graddot(model_fn, {"w1": w1, "w2": w2, "b2": b2}, train, val)
