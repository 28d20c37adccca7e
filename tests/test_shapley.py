"""inrun_shapley: formula agreement with brute force (float64), exact Shapley by enumeration, errors."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import ghostfunc
from ghostfunc._reference import per_sample_grads

DT = torch.float64


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def flat_grads(model_fn, params, batch) -> Tensor:
    g, _ = per_sample_grads(model_fn, params, batch)
    return torch.cat([g[k].flatten(1) for k in params], 1)  # [B, P]


def unflatten(params: dict[str, Tensor], theta: Tensor) -> dict[str, Tensor]:
    sizes = [v.numel() for v in params.values()]
    return {k: t.reshape(v.shape) for (k, v), t in zip(params.items(), theta.split(sizes), strict=True)}


def theta_of(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.flatten() for v in params.values()])


# ---------------------------------------------------------------- models


def mlp_fn(p, batch):
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


def mlp(seed=0, n=6, m=4, d=3, hidden=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    params = {"w1": torch.randn(hidden, d, generator=g, dtype=DT), "b1": torch.randn(hidden, generator=g, dtype=DT),
              "w2": torch.randn(classes, hidden, generator=g, dtype=DT), "b2": torch.randn(classes, generator=g, dtype=DT)}

    def batch(k, off):
        return {"x": torch.randn(k, d, generator=g, dtype=DT), "y": torch.randint(0, classes, (k,), generator=g),
                "index": torch.arange(off, off + k)}  # a leaf the model ignores rides along

    return params, batch(n, 0), batch(m, 100)


def linreg_fn(p, batch):
    return 0.5 * (F.linear(batch["x"], p["w"], p["b"]) - batch["y"]).pow(2).sum(-1)


def attention_fn(p, ids):
    """A tiny causal transformer block: tied embedding, layer norm, SDPA, MLP."""
    x = F.embedding(ids, p["wte"]) + p["wpe"][: ids.shape[1]]  # [B, T, d]
    h = F.layer_norm(x, (x.shape[-1],), p["ln_w"], p["ln_b"])
    q, k, v = F.linear(h, p["qkv"]).chunk(3, -1)  # [B, T, d] each
    heads = 2
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  # [B, nh, T, hs]
    att = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    x = x + F.linear(att.transpose(1, 2).flatten(2), p["proj"])  # [B, T, d]
    x = x + F.linear(F.gelu(F.linear(x, p["fc"], p["fc_b"])), p["fc2"])
    logits = F.linear(x, p["wte"])[:, :-1]  # tied head: [B, T-1, V]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def attention_model(seed=0, n=4, m=3, t=6, vocab=11, d=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    params = {"wte": r(vocab, d), "wpe": r(t, d), "ln_w": 1 + r(d), "ln_b": r(d), "qkv": r(3 * d, d),
              "proj": r(d, d), "fc": r(2 * d, d), "fc_b": r(2 * d), "fc2": r(d, 2 * d)}
    return params, torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (m, t), generator=g)


def mha_fn(mha):
    """``nn.MultiheadAttention`` in its default sequence-first layout, then a linear head."""
    def fn(p, batch):
        x = batch["x"].transpose(0, 1)  # [T, B, d]
        sub = {k[4:]: v for k, v in p.items() if k.startswith("mha.")}
        out = torch.func.functional_call(mha, sub, (x, x, x), {"need_weights": False})[0]  # [T, B, d]
        pred = F.linear(out.mean(0), p["head"])  # [B, 1]
        return 0.5 * (pred[:, 0] - batch["y"]).pow(2)

    return fn


def _sdpa_unbatchable_fn(p, batch):
    """Attention through ``F.scaled_dot_product_attention`` behind a call ``vmap`` cannot batch
    (``unique_consecutive``, as Hugging Face's BART classification head checks its end tokens): the validation
    Hessian-vector product then runs one sample at a time."""
    x = batch["x"]  # [B, T, d]
    torch.unique_consecutive(x[..., 0].sign())  # (its value is not used)
    q, k, v = (x @ p[name] for name in ("wq", "wk", "wv"))
    out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))[:, 0]  # [B, T, d]
    return 0.5 * (out.mean(1) @ p["head"] - batch["y"]).pow(2)


def test_order2_fused_attention_one_sample_at_a_time():
    """The one-sample-at-a-time Hessian-vector product ran attention on the default (fused) backend, which has no
    double backward: ``RuntimeError: derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented`` (``BartForSequenceClassification``); it runs on the math backend, as the batched one."""
    g = torch.Generator().manual_seed(4)
    params = {name: torch.randn(5, 5, generator=g, dtype=DT) / 2 for name in ("wq", "wk", "wv")}
    params["head"] = torch.randn(5, generator=g, dtype=DT)
    train = {"x": torch.randn(4, 3, 5, generator=g, dtype=DT), "y": torch.randn(4, generator=g, dtype=DT)}
    val = {"x": torch.randn(3, 3, 5, generator=g, dtype=DT), "y": torch.randn(3, generator=g, dtype=DT)}
    got = ghostfunc.inrun_shapley(_sdpa_unbatchable_fn, params, train, val, lr=0.5, order=2)
    ref = reference_order2(_sdpa_unbatchable_fn, params, train, val, 0.5,
                           double_backward_hvp(_sdpa_unbatchable_fn, params, val))
    assert rel(got, ref) < 1e-10


# ---------------------------------------------------------------- brute-force references


def reference_order1(model_fn, params, train, val, lr):
    gt, gv = flat_grads(model_fn, params, train), flat_grads(model_fn, params, val)
    return -(lr / len(gt)) * gt @ gv.mean(0)


def reference_order2(model_fn, params, train, val, lr, hvp):
    """Order 2 with ``H_val G`` from ``hvp`` (a separate brute-force Hessian product)."""
    gt = flat_grads(model_fn, params, train)
    a = lr / len(gt)
    return reference_order1(model_fn, params, train, val, lr) + (a * a / 2) * gt @ hvp(gt.sum(0))


def full_hessian_hvp(model_fn, params, val):
    """``v -> H v`` with ``H`` the explicit Hessian of the mean val loss (torch.autograd.functional)."""
    h = torch.autograd.functional.hessian(lambda th: model_fn(unflatten(params, th), val).mean(), theta_of(params))
    return lambda v: h @ v


def double_backward_hvp(model_fn, params, val):
    """``v -> H v`` by reverse-over-reverse ``torch.autograd`` (math attention backend)."""
    def hvp(v):
        th = theta_of(params).clone().requires_grad_(True)
        with sdpa_kernel([SDPBackend.MATH]):
            loss = model_fn(unflatten(params, th), val).mean()
            (g,) = torch.autograd.grad(loss, th, create_graph=True)
            (hv,) = torch.autograd.grad(g @ v, th)
        return hv

    return hvp


def utility(model_fn, params, train, val, lr, subset) -> float:
    """``U(S) = L_val(θ − (lr/n)·Σ_{i∈S} g_i) − L_val(θ)``, by moving the parameters."""
    gt = flat_grads(model_fn, params, train)
    th = theta_of(params)
    step = gt[list(subset)].sum(0) if subset else torch.zeros_like(th)
    moved = unflatten(params, th - (lr / len(gt)) * step)
    with torch.no_grad():
        return (model_fn(moved, val).mean() - model_fn(params, val).mean()).item()


def exact_shapley(model_fn, params, train, val, lr) -> Tensor:
    """Shapley values of ``U`` by enumerating every subset (``n ≤ 6``)."""
    n = len(flat_grads(model_fn, params, train))
    u = {s: utility(model_fn, params, train, val, lr, s) for k in range(n + 1)
         for s in itertools.combinations(range(n), k)}
    phi = torch.zeros(n, dtype=DT)
    for i in range(n):
        for s, us in u.items():
            if i not in s:
                w = math.factorial(len(s)) * math.factorial(n - len(s) - 1) / math.factorial(n)
                phi[i] += w * (u[tuple(sorted((*s, i)))] - us)
    return phi


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("lr", [0.05, 1.0])
def test_order1_matches_per_sample_loop(lr):
    params, train, val = mlp()
    got = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=lr)
    assert got.shape == (6,) and got.dtype == DT
    assert rel(got, reference_order1(mlp_fn, params, train, val, lr)) < 1e-10


def test_order2_matches_explicit_hessian():
    params, train, val = mlp(seed=1)
    lr = 0.7
    got = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=lr, order=2)
    ref = reference_order2(mlp_fn, params, train, val, lr, full_hessian_hvp(mlp_fn, params, val))
    assert rel(got, ref) < 1e-10
    # the second-order term is really there (and not negligible at this lr)
    first = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=lr)
    assert (got - first).abs().max() > 1e-4 * first.abs().max()


def test_order2_attention_tied_embedding():
    """Attention, layer norm, tied embedding/head: the HVP is exact beyond linear layers."""
    params, train, val = attention_model()
    lr = 2.0
    got = ghostfunc.inrun_shapley(attention_fn, params, train, val, lr=lr, order=2)
    ref = reference_order2(attention_fn, params, train, val, lr, double_backward_hvp(attention_fn, params, val))
    assert rel(got, ref) < 1e-10
    assert rel(ghostfunc.inrun_shapley(attention_fn, params, train, val, lr=lr),
               reference_order1(attention_fn, params, train, val, lr)) < 1e-10


def test_order2_multihead_attention_sequence_first():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(6, 2, dtype=DT)
    params = {f"mha.{k}": v.detach() for k, v in mha.named_parameters()}
    params["head"] = torch.randn(1, 6, dtype=DT)
    g = torch.Generator().manual_seed(3)
    train = {"x": torch.randn(4, 5, 6, generator=g, dtype=DT), "y": torch.randn(4, generator=g, dtype=DT)}
    val = {"x": torch.randn(3, 5, 6, generator=g, dtype=DT), "y": torch.randn(3, generator=g, dtype=DT)}
    fn = mha_fn(mha)
    got = ghostfunc.inrun_shapley(fn, params, train, val, lr=0.5, order=2)
    ref = reference_order2(fn, params, train, val, 0.5, double_backward_hvp(fn, params, val))
    assert rel(got, ref) < 1e-10


def test_order2_is_exact_shapley_for_quadratic_loss():
    """Linear regression: U is exactly quadratic, so order 2 *is* the Shapley value (subset enumeration)."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(2, 3, generator=g, dtype=DT), "b": torch.randn(2, generator=g, dtype=DT)}
    train = {"x": torch.randn(5, 3, generator=g, dtype=DT), "y": torch.randn(5, 2, generator=g, dtype=DT)}
    val = {"x": torch.randn(4, 3, generator=g, dtype=DT), "y": torch.randn(4, 2, generator=g, dtype=DT)}
    lr = 0.8
    exact = exact_shapley(linreg_fn, params, train, val, lr)
    got = ghostfunc.inrun_shapley(linreg_fn, params, train, val, lr=lr, order=2)
    assert rel(got, exact) < 1e-10
    # efficiency: the values add up to the utility of the whole batch
    assert abs(got.sum().item() - utility(linreg_fn, params, train, val, lr, tuple(range(5)))) < 1e-12
    # and order 1 is off by the curvature term
    assert rel(ghostfunc.inrun_shapley(linreg_fn, params, train, val, lr=lr), exact) > 1e-3


def test_error_vs_exact_shapley_shrinks_with_order():
    """Nonlinear model: |φ_order − φ_exact| is O(lr²) at order 1 and O(lr³) at order 2."""
    params, train, val = mlp(seed=2, n=5, m=3)
    errs = {}
    for lr in (0.4, 0.04):
        exact = exact_shapley(mlp_fn, params, train, val, lr)
        for order in (1, 2):
            got = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=lr, order=order)
            errs[order, lr] = (got - exact).abs().max().item()
    assert errs[2, 0.4] < errs[1, 0.4] and errs[2, 0.04] < errs[1, 0.04]
    assert 10**1.7 < errs[1, 0.4] / errs[1, 0.04] < 10**2.3  # ~100x for 10x smaller lr
    assert 10**2.6 < errs[2, 0.4] / errs[2, 0.04] < 10**3.4  # ~1000x


def test_sign_helpful_sample_is_negative():
    """A training copy of the validation set lowers the validation loss: negative value."""
    params, train, val = mlp(seed=4, n=4, m=4)
    both = {k: torch.cat([val[k], train[k]]) for k in train}
    phi = ghostfunc.inrun_shapley(mlp_fn, params, both, val, lr=0.1)
    assert phi[:4].sum() < 0 and phi[:4].mean() < phi[4:].mean()


def test_inputs_not_modified_and_float32():
    params, train, val = mlp()
    p32 = {k: v.float() for k, v in params.items()}
    t32 = {k: v.float() if v.is_floating_point() else v for k, v in train.items()}
    v32 = {k: v.float() if v.is_floating_point() else v for k, v in val.items()}
    before = [t.clone() for t in (*p32.values(), *t32.values(), *v32.values())]
    versions = [t._version for t in (*p32.values(), *t32.values(), *v32.values())]
    got = ghostfunc.inrun_shapley(mlp_fn, p32, t32, v32, lr=0.5, order=2)
    after = [*p32.values(), *t32.values(), *v32.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert versions == [t._version for t in after]
    assert got.dtype == torch.float32
    ref = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.5, order=2)
    assert rel(got.double(), ref) < 1e-5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, r"^inrun_shapley: lr must be a finite float >= 0"),
    ({"lr": float("inf")}, r"^inrun_shapley: lr must be a finite float >= 0.*got inf"),
    ({"lr": float("nan")}, r"^inrun_shapley: lr must be a finite float >= 0.*got nan"),
    ({"lr": "0.1"}, r"^inrun_shapley: lr must be"),
    ({"lr": 0.1, "order": 3}, r"^inrun_shapley: order must be 1 or 2; got 3"),
    ({"lr": 0.1, "order": 2.0}, r"^inrun_shapley: order must be 1 or 2; got 2.0"),
    ({"lr": 0.1, "order": True}, r"^inrun_shapley: order must be 1 or 2; got True"),
])
def test_argument_errors(kwargs, match):
    params, train, val = mlp()
    with pytest.raises(ValueError, match=match):
        ghostfunc.inrun_shapley(mlp_fn, params, train, val, **kwargs)


class _CubeWithOwnBackward(torch.autograd.Function):  # x³ with a hand-written backward and a vmap rule, no jvp
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


def _cubed_fn(p, batch):
    h = _CubeWithOwnBackward.apply(torch.tanh(F.linear(batch["x"], p["w1"], p["b1"])))
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


def test_order_2_through_an_autograd_function_without_jvp():
    """functorch's forward mode asserts ('flat_bdims must not be None') on an autograd.Function without jvp; the
    Hessian-vector product falls back to reverse-over-reverse, exact, for inrun_shapley and train_step."""
    params, train, val = mlp(5)
    assert_order_2_exact(_cubed_fn, params, train, val, 0.3)


def assert_order_2_exact(model_fn, params, train, val, lr) -> None:
    """inrun_shapley and a train_step at order 2 equal the brute force (a double backward's H·v)."""
    want = reference_order2(model_fn, params, train, val, lr, double_backward_hvp(model_fn, params, val))
    assert rel(ghostfunc.inrun_shapley(model_fn, params, train, val, lr=lr, order=2), want) < 1e-10
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(lr), order=2)
    _, info = step(step.init(params), train, val)
    assert rel(info.values, want) < 1e-10


@pytest.mark.parametrize("call", ["torch.scatter_reduce", "Tensor.scatter_reduce", "by keywords", "in place"])
def test_order_2_through_a_product_scatter(call):
    """torch's forward-mode rule for the backward of ``scatter_reduce(..., "prod")`` is wrong (H·v 1.36 off a double
    backward on four elements): a GNN pooling its messages by product was scored 26% off the loop at order 2, nothing
    said (h70). Such a call takes the Hessian-vector product reverse-over-reverse; a sum beside it keeps forward
    mode's."""
    params, train, val = mlp(5)
    index = torch.tensor([0, 0, 1, 1, 2])  # five features into five slots (two stay 1)

    def model_fn(p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))  # [B, 5]
        ones = torch.ones(h.shape[0], 5, dtype=h.dtype)
        at = index.expand(h.shape[0], -1)
        if call == "torch.scatter_reduce":
            pooled = torch.scatter_reduce(ones, 1, at, h, "prod")
        elif call == "Tensor.scatter_reduce":
            pooled = ones.scatter_reduce(1, at, h, "prod", include_self=False)
        elif call == "by keywords":
            pooled = ones.scatter_reduce(dim=1, index=at, src=h, reduce="prod")
        else:
            pooled = ones.scatter_reduce_(1, at, h, "prod")
        pooled = pooled + ones.scatter_reduce(1, at, h, "sum")
        return F.cross_entropy(F.linear(pooled, p["w2"], p["b2"]), batch["y"], reduction="none")

    assert_order_2_exact(model_fn, params, train, val, 0.7)


def _wrong_forward_fn(kind):
    """An MLP through an op whose backward torch differentiates wrongly in forward mode (h75)."""
    def model_fn(p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))  # [B, 5]
        if kind == "prelu at zero":  # a zero-initialised residual branch: prelu's input is exactly 0
            h = h + F.prelu(F.linear(h, p["z"]), p["slope"])
        logits = F.linear(h, p["w2"], p["b2"])  # [B, 3]
        if kind == "prelu at zero":
            return F.cross_entropy(logits, batch["y"], reduction="none")
        factor = torch.tril(p["l"]) + 2 * torch.eye(3, dtype=DT)
        r = logits - F.one_hot(batch["y"], 3).to(DT)
        if kind == "cholesky_inverse":  # a learned precision: (r P r) per sample
            return ((r @ torch.cholesky_inverse(factor)) * r).sum(-1)
        per_sample = torch.tril(p["l"]) + (2 + h[:, :3].pow(2)).diag_embed()  # [B, 3, 3]: through the matrix
        return torch.triangular_solve(r[:, :, None], per_sample, upper=False).solution.pow(2).sum((1, 2))

    return model_fn


@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated")
@pytest.mark.parametrize("kind", ["prelu at zero", "cholesky_inverse", "triangular_solve"])
def test_order_2_through_ops_forward_mode_gets_wrong(kind):
    """``prelu`` at an input of exactly 0, ``cholesky_inverse`` and the deprecated ``triangular_solve`` have forward-mode
    rules for their backward that disagree with a double backward (and with finite differences): order 2 was
    0.32, 4.3e-2 and 2.4e-3 off the loop (h75). They take the Hessian-vector product reverse-over-reverse."""
    params, train, val = mlp(7)
    g = torch.Generator().manual_seed(8)
    params = {**params, "z": torch.zeros(5, 5, dtype=DT), "slope": torch.tensor([0.3], dtype=DT),
              "l": torch.randn(3, 3, generator=g, dtype=DT) * 0.3}
    model_fn = _wrong_forward_fn(kind)
    if kind != "prelu at zero":
        params = {k: v for k, v in params.items() if k not in ("z", "slope")}
    lr = 0.5
    want = reference_order2(model_fn, params, train, val, lr, double_backward_hvp(model_fn, params, val))
    first = reference_order1(model_fn, params, train, val, lr)
    assert (want - first).abs().max() > 1e-3 * want.abs().max()  # (a curvature term that counts)
    assert rel(ghostfunc.inrun_shapley(model_fn, params, train, val, lr=lr, order=2), want) < 1e-10


def _stopped_scale_fn(stop):
    """An MLP whose first layer's output is divided by a scale read through ``stop``: a constant to the gradient."""
    def model_fn(p, batch):
        x = batch["x"]
        if stop == "detach":
            s = F.linear(x, p["w1"]).pow(2).mean(-1, keepdim=True).detach()
        else:
            context = {"no_grad": torch.no_grad, "set_grad_enabled": lambda: torch.set_grad_enabled(False),
                       "inference_mode": torch.inference_mode}[stop]
            with context():
                s = F.linear(x, p["w1"]).pow(2).mean(-1, keepdim=True)
            s = s.clone() if stop == "inference_mode" else s  # (an inference tensor: a normal one to go on with)
        h = torch.tanh(F.linear(x, p["w1"], p["b1"]) / (1 + s))
        return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")

    return model_fn


@pytest.mark.parametrize("stop", ["detach", "no_grad", "set_grad_enabled", "inference_mode"])
def test_order_2_of_a_parameter_read_with_gradients_off(stop):
    """What a model computes under ``torch.no_grad()`` is a constant to its gradient, as a ``.detach()`` is, and so
    to the Hessian-vector product: forward mode (``jvp`` of ``grad``) ignores ``no_grad``, and the no-grad branch's
    curvature was in ``H·G`` (the second-order term 72% off the double backward's)."""
    params, train, val = mlp(6)
    lr = 0.5
    fn = _stopped_scale_fn(stop)
    want = reference_order2(fn, params, train, val, lr, double_backward_hvp(fn, params, val))
    first = reference_order1(fn, params, train, val, lr)
    assert (want - first).abs().max() > 1e-3 * first.abs().max()  # the second-order term is there
    assert rel(ghostfunc.inrun_shapley(fn, params, train, val, lr=lr, order=2), want) < 1e-10
    step = ghostfunc.train_step(fn, ghostfunc.sgd(lr), order=2)
    _, info = step(step.init(params), train, val)
    assert rel(info.values, want) < 1e-10


_FLOORS = {  # a learnable floor (or ceiling) on features masked to 0, where it starts at 0: ties
    "clamp min": lambda h, lo: torch.clamp(h, min=lo),
    "clamp max": lambda h, lo: torch.clamp(h, max=lo),
    "Tensor.clamp": lambda h, lo: h.clamp(lo),
    "clip both": lambda h, lo: torch.clip(h, lo, lo + 1.0),
    "fmax": lambda h, lo: torch.fmax(h, lo),
    "clamp by keywords": lambda h, lo: torch.clamp(input=h, min=lo),  # (h50: a TypeError in the rewrite)
    "fmax by keywords": lambda h, lo: torch.fmax(input=h, other=lo),
}


def test_clamp_and_fmax_as_where_give_torchs_values():
    """The rewrites order 2 runs (:func:`ghostfunc._shapley._clamp_routed`) give torch's values: NaN in the input or a
    bound (h50: a NaN bound was dropped, a NaN loss became finite), infinities, ties, a bound above the other,
    broadcasting, dtype promotion."""
    from ghostfunc._shapley import _clamp_routed, _fmax_routed

    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1.0, -inf, 0.0, 2.0, -0.0], [0.5, inf, 3.0, -2.0, nan, 1.0]], dtype=DT)
    lo = torch.tensor([0.0, nan, 0.0, 0.0, 1.0, 0.0], dtype=torch.float32)
    hi = torch.tensor([1.0, 2.0, nan, -1.0, 2.0, inf], dtype=DT)
    for got, want in [(_clamp_routed(x, lo), torch.clamp(x, lo)), (_clamp_routed(x, max=hi), torch.clamp(x, max=hi)),
                      (_clamp_routed(x, lo, hi), torch.clamp(x, lo, hi)), (_clamp_routed(x, hi, lo), x.clamp(hi, lo)),
                      (_clamp_routed(input=x, min=lo), torch.clamp(x, min=lo)), (_fmax_routed(x, hi), torch.fmax(x, hi)),
                      (_fmax_routed(input=hi, other=x), torch.fmax(hi, x))]:
        assert got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert _clamp_routed(x, lo, out=torch.empty_like(x)) is NotImplemented and _clamp_routed(x, 0.0) is NotImplemented


@pytest.mark.parametrize("floor", list(_FLOORS))
def test_order_2_at_ties_of_clamp_and_fmax(floor):
    """At a tie, torch's forward-mode rule for ``clamp`` with a tensor bound (and ``fmax``) takes the bound's tangent,
    where the backward gives the gradient to the input: ``jvp`` of ``grad`` was not the double backward's ``H·v``
    (h49: 1.8e-2 off, one value 2x the loop's). They run as the ``where`` their gradient routes by."""
    g = torch.Generator().manual_seed(8)
    params = {"w1": torch.randn(8, 4, generator=g, dtype=DT), "lo": torch.zeros(8, dtype=DT),
              "w2": torch.randn(3, 8, generator=g, dtype=DT) / 2}

    def fn(p, batch):
        h = _FLOORS[floor](F.linear(batch["x"], p["w1"]) * batch["mask"], p["lo"])
        return F.cross_entropy(F.linear(h, p["w2"]), batch["y"], reduction="none")

    def batch(n):
        return {"x": torch.randn(n, 4, generator=g, dtype=DT), "y": torch.randint(0, 3, (n,), generator=g),
                "mask": (torch.rand(n, 8, generator=g) > 0.4).to(DT)}

    train, val = batch(6), batch(5)
    want = reference_order2(fn, params, train, val, 0.5, double_backward_hvp(fn, params, val))
    assert (want - reference_order1(fn, params, train, val, 0.5)).abs().max() > 1e-4 * want.abs().max()
    assert rel(ghostfunc.inrun_shapley(fn, params, train, val, lr=0.5, order=2), want) < 1e-10


def _seeded_projection_fn(p, batch):
    """A deterministic model that draws one projection from a generator it seeds in the call (a draw no sample owns)."""
    proj = torch.randn(5, 5, generator=torch.Generator().manual_seed(11), dtype=DT)
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"])) @ proj
    return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


@pytest.mark.parametrize("how", ["order 2", "secant", "precondition"])
def test_a_draw_no_sample_owns_is_refused_where_rows_are_captured_per_sample(how):
    """A seeded generator's projection drawn in the forward: graddot and order 1 draw it once for the batch, as the
    loop does; order 2, the secant and precondition=True capture the training rows with a draw per sample (87% off),
    and the difference from a plain run was reported as samples that interact (h49). It is refused as a draw."""
    params, train, val = mlp(9)
    ref, _, _ = ghostfunc.reference_graddot(_seeded_projection_fn, params, train, val)
    got = ghostfunc.graddot(_seeded_projection_fn, params, train, val).scores
    assert rel(got, ref) < 1e-10
    fn = functools.partial(_seeded_projection_fn)  # (a model_fn of its own: nothing known of it yet)
    if how == "precondition":
        step = ghostfunc.train_step(fn, ghostfunc.adamw(0.05), precondition=True)
        with pytest.raises(ValueError, match=r"^train_step: precondition=True captures the training rows with a draw"):
            step(step.init(params), train, val)
    else:
        with pytest.raises(ValueError, match=r"^inrun_shapley: (order=2|curvature='secant') needs a deterministic"):
            ghostfunc.inrun_shapley(fn, params, train, val, lr=0.3, order=2,
                                    curvature="secant" if how == "secant" else "exact")


class _SlottedLoss:
    """A loss object with ``__slots__``: not weak-referenceable, so nothing can be kept for it."""

    __slots__ = ("drop",)

    def __init__(self, drop: torch.nn.Module) -> None:
        self.drop = drop

    def __call__(self, p, batch):
        h = self.drop(torch.tanh(F.linear(batch["x"], p["w1"], p["b1"])))
        return F.cross_entropy(F.linear(h, p["w2"], p["b2"]), batch["y"], reduction="none")


@pytest.mark.parametrize("how", ["switched to eval mode", "not weak-referenceable"])
def test_order_2_of_a_model_that_draws_nothing_now(how):
    """Seen drawing once (dropout in train mode, through graddot), a model_fn was refused at order 2 for good,
    switched to eval mode too; one that cannot be weak-referenced was taken as one that draws and always refused
    (h71). The verdict is kept under the modules' flags and settings, and not at all for the second: each call finds
    out, and one that draws is refused."""
    params, train, val = mlp(3)
    drop = torch.nn.Dropout(0.3)
    fn = _SlottedLoss(drop)
    model_fn = fn if how == "not weak-referenceable" else functools.partial(fn.__call__)
    ghostfunc.graddot(model_fn, params, train, val)  # (train mode: draws)
    with pytest.raises(ValueError, match=r"^inrun_shapley: order=2 needs a deterministic"):
        ghostfunc.inrun_shapley(model_fn, params, train, val, lr=0.3, order=2)
    drop.eval()
    want = reference_order2(model_fn, params, train, val, 0.3, double_backward_hvp(model_fn, params, val))
    assert rel(ghostfunc.inrun_shapley(model_fn, params, train, val, lr=0.3, order=2), want) < 1e-10
    for curvature in ("exact", "secant"):
        step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.3), order=2, curvature=curvature)
        _, info = step(step.init(params), train, val)
        assert torch.isfinite(info.values).all()
        if curvature == "exact":
            assert rel(info.values, want) < 1e-10
    drop.train()
    with pytest.raises(ValueError, match=r"^train_step: order=2 needs a deterministic"):
        step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.3), order=2)
        step(step.init(params), train, val)


def _stochastic_depth_fn(p, batch):
    """A draw shaped by the batch (each sample its row: stochastic depth), which vmap draws as a plain call does."""
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
    keep = (torch.rand(batch["x"].shape[0], 1, dtype=DT) > 0.3).to(h.dtype) / 0.7
    return F.cross_entropy(F.linear(h * keep, p["w2"], p["b2"]), batch["y"], reduction="none")


def test_a_draw_shaped_by_the_batch_is_not_refused_with_precondition():
    """``torch.rand(x.shape[0], 1)`` draws no sample owns in vmap's eyes, but per sample it is the plain call's draw:
    refused with precondition=True after the first fix (h50); the step takes the plain call's losses."""
    params, train, val = mlp(10)
    step = ghostfunc.train_step(_stochastic_depth_fn, ghostfunc.adamw(0.01), precondition=True)
    torch.manual_seed(1)
    _, info = step(step.init(params), train, val)
    torch.manual_seed(1)
    assert torch.equal(info.train_loss, _stochastic_depth_fn(params, train).detach())


def test_a_numpy_learning_rate_is_a_number():
    """lr read from a numpy array or config (np.float32, np.float64): what sgd takes, inrun_shapley takes too."""
    import numpy as np

    params, train, val = mlp()
    want = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=float(np.float32(0.1)))
    assert torch.equal(ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=np.float32(0.1)), want)
    assert torch.equal(ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=np.float64(0.5), order=2),
                       ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.5, order=2))


def test_boundary_errors_name_the_function():
    params, train, val = mlp()
    with pytest.raises(TypeError, match=r"^inrun_shapley: params must be a dict"):
        ghostfunc.inrun_shapley(mlp_fn, [params["w1"]], train, val, lr=0.1)
    with pytest.raises(ValueError, match=r"^inrun_shapley: model_fn\(params, batch\) must return one loss per sample"):
        ghostfunc.inrun_shapley(lambda p, b: mlp_fn(p, b).sum(), params, train, val, lr=0.1)


def test_order2_hf_gpt2():
    """A Hugging Face GPT-2 (attention with a mask, tied embeddings, Conv1D): order 2 against double backward."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t = 8
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=t, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, ids):
        kwargs = {"attention_mask": torch.ones_like(ids), "use_cache": False}
        logits = torch.func.functional_call(model, p, (ids,), kwargs).logits[:, :-1]  # [B, T-1, V]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(1, 32, (3, t), generator=g), torch.randint(1, 32, (2, t), generator=g)
    got = ghostfunc.inrun_shapley(fn, params, train, val, lr=1.0, order=2)
    assert rel(got, reference_order2(fn, params, train, val, 1.0, double_backward_hvp(fn, params, val))) < 1e-10


def test_hvp_falls_back_to_reverse_over_reverse(monkeypatch):
    """An op without a forward-mode rule: the Hessian product comes from ``vjp`` of ``grad`` instead."""
    params, train, val = mlp(seed=1)
    want = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.7, order=2)

    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it")

    monkeypatch.setattr(torch.func, "jvp", no_forward_ad)
    got = ghostfunc.inrun_shapley(mlp_fn, params, train, val, lr=0.7, order=2)
    assert rel(got, want) < 1e-12


def test_order_2_values_are_detached_from_a_validation_batch_that_requires_grad():
    """Validation features computed with gradients on (an upstream encoder's output): order 2 (exact) gave
    values attached to the encoder's graph (a training step's info kept it alive); they come detached, as at
    order 1 and with the secant, and equal to those on the detached features."""
    params, train, val = mlp(seed=7)
    enc = torch.nn.Linear(3, 3, dtype=DT)
    attached = {**val, "x": enc(val["x"])}
    assert attached["x"].requires_grad
    detached = {**attached, "x": attached["x"].detach()}
    values = ghostfunc.inrun_shapley(mlp_fn, params, train, attached, lr=0.1, order=2)
    assert not values.requires_grad
    torch.testing.assert_close(values, ghostfunc.inrun_shapley(mlp_fn, params, train, detached, lr=0.1, order=2),
                               rtol=0, atol=0)
    step = ghostfunc.train_step(mlp_fn, ghostfunc.sgd(0.1), order=2)
    _, info = step(step.init(params), train, attached)
    assert not (info.values.requires_grad or info.first_order.requires_grad or info.val_loss.requires_grad)


def test_order_2_of_a_model_that_differentiates_with_respect_to_its_inputs():
    """A loss with an input-gradient penalty (``autograd.grad(out.sum(), x, create_graph=True)``) on batches whose
    ``x`` requires grad: the validation batch's tensors are detached for the Hessian-vector product but keep
    requiring grad (detached plainly, the penalty raised torch's "does not require grad"); the values equal
    ``-a·<g_i, ḡ_val> + (a²/2)·g_iᵀ H_val G`` by hand, and come detached."""
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(4, 3, generator=g, dtype=DT), "v": torch.randn(3, generator=g, dtype=DT)}

    def fn(p, batch):
        x, y = batch
        out = torch.tanh(x @ p["w"]) @ p["v"]
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return (out - y) ** 2 + 0.1 * (gx ** 2).sum(1)

    def rows(n):
        return torch.randn(n, 4, generator=g, dtype=DT).requires_grad_(), torch.randn(n, generator=g, dtype=DT)

    train, val = rows(6), rows(3)
    names = list(params)

    def grad_of(x, y, create=False):
        q = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(fn(q, (x.detach().requires_grad_(), y)).mean(), [q[k] for k in names],
                                    create_graph=create)
        return torch.cat([t.reshape(-1) for t in grads]), q

    gt = torch.stack([grad_of(train[0][i:i + 1], train[1][i:i + 1])[0] for i in range(6)])
    gv, q = grad_of(*val, create=True)
    hv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(gv @ gt.sum(0), [q[k] for k in names])])
    a = 0.1 / 6
    want = -a * (gt @ gv.detach()) + a * a / 2 * (gt @ hv)
    got = ghostfunc.inrun_shapley(fn, params, train, val, lr=0.1, order=2)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
