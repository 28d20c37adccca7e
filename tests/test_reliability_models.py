"""Models the plain batched capture cannot run as one batch: exact against the single-sample loop.

Two mechanisms, each checked in float64 against :func:`ghostfunc.reference_graddot`
for every policy and ``val_reduce`` (scores, ``per_param``, ``train_grad``, losses):

- *split batches*: samples that take different data-dependent branches
  (``if h.sum() > 0``, ``.item()``, a Hugging Face causal LM with a 2-D mask where
  some rows are padded) run in groups that agree;
- *per-sample capture*: models ``vmap`` inside ``vjp`` cannot transform (``nn.LSTM``,
  ``nonzero`` routing, ``autograd.Function`` without ``setup_context``, checkpointing,
  ``torch.autograd.grad`` inside the model) run one
  sample at a time with ordinary autograd, taps kept.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor
from torch.func import functional_call

import ghostfunc
from ghostfunc import SamplesInteractError
from ghostfunc._reference import per_sample_grads
from tests._models import IdentityForward

F64 = torch.float64
POLICIES = ("auto", "2t2", "ghost", "materialize", "contract")
WORST: dict[str, float] = {}  # worst relative error per test family, for the report


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def check_all(name, model_fn, params, train, val, reference_fn=None, tol=1e-10, policies=POLICIES,
              reduces=("mean", "sum", None)):
    """Every policy and val_reduce against the loop; returns the plan of the last call.

    ``reference_fn``: the model the loop runs (default ``model_fn``), e.g. the same
    model without checkpointing where the loop itself cannot call ``torch.autograd.grad``.
    """
    ref_fn = reference_fn or model_fn
    gt, lt = per_sample_grads(ref_fn, params, train)
    gv, lv = per_sample_grads(ref_fn, params, val)
    plan = None
    for val_reduce in reduces:
        for policy in policies:
            if policy == "contract" and val_reduce is None:
                continue
            out = ghostfunc.graddot(model_fn, params, train, val, policy=policy, val_reduce=val_reduce)
            worst = 0.0
            total = 0
            for k in params:
                a, b = gt[k].flatten(1), gv[k].flatten(1)  # [n, P], [m, P]
                want = {"mean": a @ b.mean(0), "sum": a @ b.sum(0), None: a @ b.T}[val_reduce]
                total = total + want
                assert (out.per_param[k] - want).abs().max() <= tol * (1 + want.abs().max()), (k, out.plan)
                g = gt[k].mean(0)
                worst = max(worst, ((out.train_grad[k] - g).abs().max() / (1 + g.abs().max())).item())
            err = rel(out.scores, total)
            worst = max(worst, err)
            assert err < tol, (policy, val_reduce, err, out.plan)
            assert worst < tol, (policy, val_reduce, worst, out.plan)
            torch.testing.assert_close(out.train_loss, lt, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(out.val_loss, lv, rtol=1e-12, atol=1e-14)
            WORST[name] = max(WORST.get(name, 0.0), worst)
            plan = out.plan
    return plan


def notes(plan) -> str:
    return "\n".join(plan.notes)


# --------------------------------------------------------------------------- split batches


def _mlp(seed=0, d=3, h=4):
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(h, d, generator=g, dtype=F64) / 2, "b1": torch.randn(h, generator=g, dtype=F64) / 4,
            "W2": torch.randn(2, h, generator=g, dtype=F64) / 2}


def sign_branch(p, x):
    h = F.linear(x, p["W1"], p["b1"])
    if h.sum() > 0:
        return F.linear(torch.tanh(h), p["W2"]).pow(2).sum(1)
    return F.linear(h, p["W2"]).abs().sum(1) + p["b1"].pow(2).sum()


def nested_branches(p, x):
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))
    if x[:, 0].sum() > 0:
        if h[:, 1].sum() > 0:  # a branch point met only on the first path
            h = F.linear(h, p["W2"].T @ p["W2"]) + h  # W2 through an unrecognised matmul: fallback
        else:
            h = h * 2
    elif bool((x[:, 1] > 0).all()):
        h = F.linear(F.linear(h, p["W2"]), p["W2"].T)  # W2 used twice as a matrix
    return F.linear(h, p["W2"]).pow(2).sum(1)


def item_scale(p, x):
    h = F.linear(x, p["W1"], p["b1"])
    scale = x.abs().max().item()  # a different Python float per sample: every sample its own group
    return (torch.sin(h) * scale).sum(1) + F.linear(h, p["W2"]).pow(2).sum(1)


def nan_item(p, x):
    h = F.linear(x, p["W1"], p["b1"])
    s = x[:, 0].log().sum().item()  # nan for every negative x[:, 0]: those samples agree (nan != nan)
    if s != s:
        return F.linear(h, p["W2"]).pow(2).sum(1)
    return torch.sin(h).sum(1) * (s > 0)


def varying_length(p, batch):
    ids, x = batch
    h = F.embedding(ids, p["E"]) + x[..., None]  # [B, T, h]
    if x[:, 0].sum() > 0:
        h = h[:, :2]  # this path sees 2 tokens, the other all 5: factors of different T are merged
    return F.linear(torch.tanh(h), p["W2"]).pow(2).sum((1, 2))


def _split_data(seed, n=6, m=4, d=3):
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, d, generator=g, dtype=F64), torch.randn(m, d, generator=g, dtype=F64)
    return x, xv


@pytest.mark.parametrize("model_fn", [sign_branch, nested_branches, item_scale, nan_item], ids=lambda f: f.__name__)
def test_divergent_branches_split_the_batch(model_fn):
    p = _mlp()
    x, xv = _split_data(1)
    if model_fn is nan_item:
        x[:3, 0], xv[:2, 0] = -x[:3, 0].abs(), -xv[:2, 0].abs()
    plan = check_all("split " + model_fn.__name__, model_fn, p, x, xv)
    assert "train split into" in notes(plan)
    if model_fn is nested_branches:
        assert plan.routes["W2"].path == "fallback"  # one group uses it through matmul: fallback for all


def test_groups_with_different_token_counts_and_embedding_ids():
    g = torch.Generator().manual_seed(2)
    p = {"E": torch.randn(7, 4, generator=g, dtype=F64), "W2": torch.randn(2, 4, generator=g, dtype=F64)}
    train = (torch.randint(0, 7, (5, 5), generator=g), torch.randn(5, 5, generator=g, dtype=F64))
    val = (torch.randint(0, 7, (3, 5), generator=g), torch.randn(3, 5, generator=g, dtype=F64))
    plan = check_all("split varying T", varying_length, p, train, val)
    assert plan.routes["E"].path in ("ghost", "materialize", "contract")


def test_branch_that_depends_on_the_traced_sample():
    # the cached trace of the first call has sample 0 on one path; the second call, same shapes, has it on the other
    p = _mlp(3)
    x, xv = _split_data(4)
    first = torch.cat([x.abs() + 2, -x.abs() - 2])
    second = first.flip(0)
    for train in (first, second, first):
        check_all("split traced sample", sign_branch, p, train, xv, policies=("auto", "ghost"), reduces=("mean", None))


def test_all_samples_agree_is_one_batch():
    p = _mlp()
    x = torch.rand(4, 3, dtype=F64) + 1
    out = ghostfunc.graddot(lambda p, x: sign_branch(p, x), p, x, x)
    assert out.plan.notes == ()


def test_split_batch_plan_prints_and_names_the_groups():
    p = _mlp()
    x, xv = _split_data(1)
    out = ghostfunc.graddot(sign_branch, p, x, xv, val_reduce=None)
    text = str(out.plan)
    assert "note: train split into 2 groups at data-dependent branches" in text
    assert "note: val split into" in text and "one forward per group, one backward" in text
    out = ghostfunc.graddot(sign_branch, p, x, xv, policy="contract")
    assert "val split into" in notes(out.plan) and "one forward and backward per group" in notes(out.plan)


def test_nan_loss_in_a_group_names_the_sample():
    def model_fn(p, x):
        h = F.linear(x, p["W1"], p["b1"])
        if x[:, 1].sum() > 0:
            return h.pow(2).sum(1)
        return h.sum(1) * torch.log(x[:, 0])  # NaN for negative x[:, 0]

    p = _mlp()
    x = torch.tensor([[1.0, 1, 1], [-1, -1, 1], [2, 1, 1]], dtype=F64)  # sample 1 alone in its group
    for val_reduce in ("mean", None):
        with pytest.raises(FloatingPointError, match=r"^graddot: .*non-finite losses for train samples \[1\]"):
            ghostfunc.graddot(model_fn, p, x, x[:1], val_reduce=val_reduce)
        with pytest.raises(FloatingPointError, match=r"^graddot: .*non-finite losses for val samples \[1\]"):
            ghostfunc.graddot(model_fn, p, x[:1], x, val_reduce=val_reduce)


def test_inrun_shapley_and_train_step_on_a_split_batch():
    p = _mlp(5)
    x, xv = _split_data(6)
    gt, _ = per_sample_grads(sign_branch, p, x)
    gv, _ = per_sample_grads(sign_branch, p, xv)
    scores = sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)
    lr, n = 0.1, len(x)
    values = ghostfunc.inrun_shapley(sign_branch, p, x, xv, lr=lr)
    assert rel(values, -lr / n * scores) < 1e-10
    step = ghostfunc.train_step(sign_branch, ghostfunc.sgd(lr))
    state, info = step(step.init(p), x, xv)
    assert rel(info.values, -lr / n * scores) < 1e-10
    for k in p:
        torch.testing.assert_close(state.params[k], p[k] - lr * gt[k].mean(0), rtol=1e-12, atol=1e-14)
    v = 10 * p["W1"].sum(0, keepdim=True)  # h.sum() is large and positive for v, negative for -v
    mixed = torch.cat([v, -v, xv])
    assert rel(ghostfunc.inrun_shapley(sign_branch, p, x, mixed, lr=lr, order=2),
               order2(sign_branch, p, x, mixed, lr)) < 1e-10


def order2(model_fn, p, x, xv, lr):
    """In-Run Shapley order 2 by brute force: ``−a<g_i, ḡ_val> + (a²/2) g_iᵀ H_val G``, one sample at a time."""
    gt, _ = per_sample_grads(model_fn, p, x)
    gv, _ = per_sample_grads(model_fn, p, xv)
    a = lr / len(x)
    big_g = {k: gt[k].sum(0) for k in p}
    hg = {k: torch.zeros_like(v) for k, v in p.items()}
    for row in xv.split(1):
        def loss_j(*vals, row=row):
            return model_fn(dict(zip(p, vals, strict=True)), row).sum() / len(xv)

        _, hv = torch.autograd.functional.hvp(loss_j, tuple(p.values()), tuple(big_g[k] for k in p))
        for k, h in zip(p, hv, strict=True):
            hg[k] += h
    return sum(gt[k].flatten(1) @ (-a * gv[k].mean(0) + a * a / 2 * hg[k]).flatten() for k in p)


# --------------------------------------------------------------------------- Hugging Face, padded rows


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def _hf_model(hf, family):
    if family == "gpt2":
        cfg = hf.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=1,
                            eos_token_id=2, attn_implementation="sdpa")
    else:
        cfg = hf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return hf.AutoModelForCausalLM.from_config(cfg).to(F64).eval()


def _hf_causal(hf, family):
    model = _hf_model(hf, family)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def model_fn(p, b):
        out = functional_call(model, p, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        return ghostfunc.causal_lm_loss(out, b)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32, (6, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # sample 0 padded, 1 and 2 not, 3 padded
    mask[3, 3:] = 0
    mask[5, 5:] = 0
    train = {"input_ids": ids[:4], "attention_mask": mask[:4]}
    val = {"input_ids": ids[4:], "attention_mask": mask[4:]}
    return model_fn, params, train, val


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_causal_lm_with_a_2d_mask_and_mixed_padding(hf, family):
    model_fn, params, train, val = _hf_causal(hf, family)
    plan = check_all(f"split hf {family}", model_fn, params, train, val, policies=("auto", "ghost", "contract"),
                     reduces=("mean", None))
    assert "train split into 2 groups" in notes(plan) and "val split into 2 groups" in notes(plan)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("entry", ["graddot", "train_step"])
def test_hf_num_items_in_batch_over_mixed_padding_is_refused(hf, family, entry):
    """Hugging Face's num_items_in_batch (the batch's non-ignored tokens) over rows some of which are unpadded: those
    rows take ``mask.all()``'s other branch alone, the batch is split, and the whole-batch comparison skipped split
    batches: graddot gave another loss's per-sample numbers and train_step stepped 0.02 off torch.optim, silently.
    Each group of rows that take the same branches is compared instead. (Each row by its own count: no refusal.)"""
    model = _hf_model(hf, family)
    params = {k: v.detach() for k, v in model.named_parameters()}
    val = _hf_causal(hf, family)[3]
    mask = torch.ones(8, 6, dtype=torch.long)
    for i, keep in enumerate([6, 3, 6, 4, 5, 6, 2, 6]):
        mask[i, keep:] = 0
    g = torch.Generator().manual_seed(3)
    train = {"input_ids": torch.randint(3, 32, (8, 6), generator=g), "attention_mask": mask}

    def token_losses(p, b):
        out = functional_call(model, p, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        logits, labels = out.logits[:, :-1], b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none"), labels

    def num_items(p, b):
        token, labels = token_losses(p, b)
        return token.sum(1) * len(labels) / (labels != -100).sum()

    def own_count(p, b):
        token, labels = token_losses(p, b)
        return token.sum(1) / (labels != -100).sum(1)

    call = {"graddot": lambda f: ghostfunc.graddot(f, params, train, val),
            "train_step": lambda f: (lambda s: s(s.init(params), train, val))(ghostfunc.train_step(f, ghostfunc.sgd(
                0.1)))}[entry]
    # (on the first call's check, rows that take the same branches alone run together, h77; or, group by group)
    with pytest.raises(SamplesInteractError, match=rf"^{entry}: samples interact in model_fn: run on (a group of \d "
                                                   rf"train samples that take the same data-dependent branches|\d "
                                                   rf"distinct train samples \(rows [\d, ]+\) together)"):
        call(num_items)
    out = call(own_count)
    if entry == "graddot":
        assert "train split into 2 groups" in notes(out.plan)


def mask_all_shortcut(p, b, own=False):
    """A padding mask applied only when some row is padded (as Hugging Face's ``mask.all()`` drops it), each row's
    token losses normalised by the whole batch's count (``own``: by its own)."""
    mask = b["mask"]
    h = torch.tanh(F.linear(b["x"], p["W1"], p["b1"]))
    if not bool(mask.all()):
        h = h * mask[..., None]
    token = F.linear(h, p["W2"]).pow(2).sum(-1) * mask
    return token.sum(1) / mask.sum(1) if own else token.sum(1) * len(mask) / mask.sum()


def _mixed_padding():
    """Parameters, eight training rows of five tokens with mixed padding (rows 0, 2, 5, 7 unpadded: they take
    ``mask.all()``'s other branch alone) and three unpadded validation rows."""
    p = _mlp(5)
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(8, 5, dtype=F64)
    for i, keep in enumerate([5, 2, 5, 3, 4, 5, 1, 5]):
        mask[i, keep:] = 0
    train = {"x": torch.randn(8, 5, 3, generator=g, dtype=F64), "mask": mask}
    return p, train, {"x": torch.randn(3, 5, 3, generator=g, dtype=F64), "mask": torch.ones(3, 5, dtype=F64)}


def batch_std_branch(p, b):
    """A branch on a statistic of the batch (its spread): a group of samples together takes another branch than
    each alone, which is the loop's answer (nothing to refuse: no group takes its samples' own branches)."""
    h = torch.tanh(F.linear(b["x"], p["W1"], p["b1"])).sum(1)
    scale = 2.0 if bool(b["x"].std() > 1.0) else 1.0
    return F.linear(h, p["W2"]).pow(2).sum(-1) * scale


#: How the rows 1, 3, 4, 6 of ``_mixed_padding``'s batch (unpadded, each taking ``mask.all()``'s branch alone) are
#: refused: on the first call's check, run together as rows that branch alike alone (h77), or group by group.
SAME_BRANCHES = (r"4 distinct train samples \(rows 1, 3, 4, 6\) together|a group of 4 train samples that take the same "
                 r"data-dependent branches \(rows \[1, 3, 4, 6\]\)")


@pytest.mark.parametrize("draw", ["dropout", "noise", "numpy noise"])
@pytest.mark.parametrize("entry", ["graddot", "train_step"])
def test_a_coupling_in_a_split_batch_is_refused_group_by_group_behind_random_draws(entry, draw):
    """The same, in a model that draws (a fine-tuning run in training mode): such a model's first call compares
    its losses with a plain call's to choose how to draw, and the whole-batch comparison that follows gave up at
    the first sample whose branches were not the batch's (graddot 0.2-1.2 off torch's batch gradient, silently).
    Split batches are compared group by group there too; a NumPy draw's copies start from the batch's state."""
    p, train, val = _mixed_padding()

    def drawing(q, b, own=False):
        x = b["x"]
        x = (F.dropout(x, 0.1, True) if draw == "dropout" else x + 0.01 * torch.randn_like(x) if draw == "noise"
             else x + 0.01 * torch.from_numpy(np.random.randn(*x.shape)))
        return mask_all_shortcut(q, {**b, "x": x}, own)

    call = {"graddot": lambda f: ghostfunc.graddot(f, p, train, val),
            "train_step": lambda f: (lambda s: s(s.init(p), train, val))(ghostfunc.train_step(f, ghostfunc.sgd(0.1)))}
    with pytest.raises(SamplesInteractError, match=rf"^{entry}: samples interact in model_fn: run on ({SAME_BRANCHES})"):
        call[entry](drawing)
    call[entry](functools.partial(drawing, own=True))


@pytest.mark.parametrize("draw", [None, "dropout", "numpy noise"])
def test_a_coupling_in_a_split_validation_batch_is_refused_group_by_group(draw):
    """The same mixed padding in the validation batch, reduced to ``Σ_v w_v g_v`` by one backward per group
    (``val_reduce='mean'``): its groups were not handed to the comparison, which said nothing (with
    ``val_reduce=None`` it refused); and a valid model drawing NumPy noise per row was refused there, its group
    run from another generator state than the group's copies."""
    p, batch, few = _mixed_padding()
    train, val = {k: v[:3] for k, v in few.items()}, batch

    def drawing(q, b, own=False):
        x = b["x"]
        x = (x if draw is None else F.dropout(x, 0.1, True) if draw == "dropout"
             else x + 0.01 * torch.from_numpy(np.random.randn(*x.shape)))
        return mask_all_shortcut(q, {**b, "x": x}, own)

    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on a group of 4 "
                                                   r"val samples that take the same data-dependent branches"):
        ghostfunc.graddot(drawing, p, train, val, policy="contract")  # (no validation rows kept: one backward)
    out = ghostfunc.graddot(functools.partial(drawing, own=True), p, train, val, policy="contract")
    assert "val split into 2 groups" in notes(out.plan)


@pytest.mark.parametrize("entry", ["graddot", "inrun_shapley order 2", "secant", "train_step"])
def test_a_coupling_in_a_split_batch_is_refused_group_by_group(entry):
    p, train, val = _mixed_padding()
    call = {"graddot": lambda f: ghostfunc.graddot(f, p, train, val),
            "inrun_shapley order 2": lambda f: ghostfunc.inrun_shapley(f, p, train, val, lr=0.1, order=2),
            "secant": lambda f: ghostfunc.inrun_shapley(f, p, train, val, lr=0.1, order=2, curvature="secant"),
            "train_step": lambda f: (lambda s: s(s.init(p), train, val))(ghostfunc.train_step(f, ghostfunc.sgd(0.1)))}
    where = entry.split()[0].replace("secant", "inrun_shapley")
    with pytest.raises(SamplesInteractError, match=rf"^{where}: samples interact in model_fn: run on ({SAME_BRANCHES})"):
        call[entry](mask_all_shortcut)
    call[entry](functools.partial(mask_all_shortcut, own=True))
    if entry == "graddot":  # its numbers: the loop's
        own = functools.partial(mask_all_shortcut, own=True)
        assert "train split into 2 groups" in notes(check_all("mask.all own", own, p, train, val,
                                                              policies=("auto",), reduces=("mean",)))
        x = torch.cat([train["x"][:4] * 3, train["x"][4:] / 3])  # samples of both spreads
        check_all("batch std branch", batch_std_branch, p, {"x": x}, {"x": val["x"]}, policies=("auto",),
                  reduces=("mean",))


# --------------------------------------------------------------------------- per-sample capture


def _module_fn(module, head="sum"):
    params = {k: v.detach() for k, v in module.named_parameters()}

    def model_fn(p, x):
        out = functional_call(module, p, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return out.pow(2).flatten(1).sum(1) if head == "sum" else out.flatten(1).sin().sum(1)

    return model_fn, params


def _seq(seed, n=4, m=3, t=5, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=F64), torch.randn(m, t, d, generator=g, dtype=F64)


@pytest.mark.parametrize("kind", ["lstm", "lstm2-bi-dropout-eval", "lstm-seq-first", "gru2-bi", "rnn-relu",
                                  "rnn-tanh-nobias", "lstm-proj"])
def test_recurrent_layers_are_exact_with_kernels(kind):
    torch.manual_seed(0)
    module = {
        "lstm": lambda: nn.LSTM(3, 4, batch_first=True),
        "lstm2-bi-dropout-eval": lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.5,
                                                 batch_first=True).eval(),
        "lstm-seq-first": lambda: nn.LSTM(3, 4),  # each sample is [T, 1, I]: x[:, :, None] below
        "gru2-bi": lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True),
        "rnn-relu": lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
        "rnn-tanh-nobias": lambda: nn.RNN(3, 4, bias=False, batch_first=True),
        "lstm-proj": lambda: nn.LSTM(3, 4, proj_size=2, batch_first=True),
    }[kind]().double()
    model_fn, params = _module_fn(module, "sin")
    x, xv = _seq(1)
    if kind == "lstm-seq-first":

        def model_fn(p, x):  # [B, T, I] -> the module sees [T, B, I]
            return functional_call(module, p, (x.transpose(0, 1),))[0].transpose(0, 1).sin().flatten(1).sum(1)
    plan = check_all(f"rnn {kind}", model_fn, params, x, xv)
    assert plan.notes == () and all(r.path != "fallback" for r in plan.routes.values()), plan  # gate linears


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_cell_loops(kind):
    torch.manual_seed(0)
    cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](3, 4).double()
    head = nn.Linear(4, 2).double()
    params = {**{f"cell.{k}": v.detach() for k, v in cell.named_parameters()},
              **{f"head.{k}": v.detach() for k, v in head.named_parameters()}}

    def model_fn(p, x):
        cp_ = {k[5:]: v for k, v in p.items() if k.startswith("cell.")}
        h = c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            if kind == "lstm":
                h, c = functional_call(cell, cp_, (x[:, t], (h, c)))
            else:
                h = functional_call(cell, cp_, (x[:, t], h))
        return F.linear(h, p["head.weight"], p["head.bias"]).pow(2).sum(1)

    x, xv = _seq(2)
    plan = check_all(f"rnn {kind}cell", model_fn, params, x, xv)
    assert plan.notes == () and all(r.path != "fallback" for r in plan.routes.values()), plan


def test_packed_sequence_lstm_runs_sample_by_sample():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    params = {k: v.detach() for k, v in lstm.named_parameters()}

    def model_fn(p, batch):
        x, lengths = batch
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = functional_call(lstm, p, (packed,))
        return h[-1].pow(2).sum(1)

    x, xv = _seq(3)
    train, val = (x, torch.tensor([5, 3, 4, 1])), (xv, torch.tensor([2, 5, 4]))
    plan = check_all("rnn packed", model_fn, params, train, val, policies=("auto", "ghost"))
    assert "per-sample capture" in notes(plan)


class _Double(torch.autograd.Function):  # old style: no setup_context
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2 + x.pow(3)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (2 + 3 * x.pow(2))


def old_function(p, x):
    return F.linear(_Double.apply(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def input_grad_penalty(p, x):
    x = x.clone().requires_grad_()
    y = F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"]).sum(1)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return y.pow(2) + gx.pow(2).sum(1)


def inner_vmap(p, x):
    h = torch.vmap(lambda r: torch.tanh(F.linear(r, p["W1"], p["b1"])))(x)
    return F.linear(h, p["W2"]).pow(2).sum(1)


def moe_nonzero(p, x):
    """Top-1 routing with data-dependent shapes: each expert runs on the rows routed to it."""
    h = F.linear(x, p["W1"], p["b1"])  # [B, 4]
    choice = h[:, :2].argmax(1)  # router
    out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
    for e in range(2):
        rows = (choice == e).nonzero().flatten()
        out = out.index_add(0, rows, F.linear(torch.tanh(h[rows]), p["W2"] * (e + 1)))
    return out.pow(2).sum(1)


def moe_where(p, x):
    h = F.linear(x, p["W1"], p["b1"])
    rows, cols = torch.where(h > 0)  # data-dependent shapes
    picked = h[rows, cols]
    score = torch.zeros(x.shape[0], dtype=x.dtype).index_add(0, rows, picked.pow(2))
    return score + F.linear(h, p["W2"]).pow(2).sum(1)


def jvp_penalty(p, x):
    """A Jacobian-vector penalty by torch.func.jvp of a layer: its calls run inside the model's own transform."""
    out, tangent = torch.func.jvp(lambda z: torch.tanh(F.linear(z, p["W1"], p["b1"])), (x,), (torch.ones_like(x),))
    return F.linear(out, p["W2"]).pow(2).sum(1) + 0.1 * tangent.pow(2).sum(1)


def maml_inner_step(p, x):
    """One inner gradient step on each sample's own context (a row of its own: the batch's summed inner loss
    gives each row its own gradient), then the outer loss: second order through the params."""
    context = torch.zeros(len(x), p["W1"].shape[0], dtype=x.dtype, requires_grad=True)

    def inner(c):
        return F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"]) + c), p["W2"]).pow(2).sum()

    (g,) = torch.autograd.grad(inner(context), [context], create_graph=True)
    return F.linear(torch.tanh(F.linear(x.flip(1), p["W1"], p["b1"]) - 0.1 * g), p["W2"]).sin().sum(1)


def maml_batch_inner_step(p, x):
    """One inner gradient step on the params from the whole batch's loss: every sample's outer loss moves with
    every other sample (the interaction check could not run it, and it passed as per-sample)."""
    def inner(q):
        return F.linear(torch.tanh(F.linear(x, q["W1"], q["b1"])), q["W2"]).pow(2).sum()

    grads = torch.autograd.grad(inner(p), list(p.values()), create_graph=True)
    q = {k: v - 0.1 * g for (k, v), g in zip(p.items(), grads, strict=True)}
    return F.linear(torch.tanh(F.linear(x.flip(1), q["W1"], q["b1"])), q["W2"]).sin().sum(1)


def tensor_hook(p, x):
    """A gradient-scaling hook on an activation, put where it requires grad (the usual guard)."""
    h = F.linear(x, p["W1"], p["b1"]) * 1
    if h.requires_grad:
        h.register_hook(lambda g: g * 2)
    return F.linear(torch.tanh(h), p["W2"]).pow(2).sum(1)


_SCALED = nn.Tanh()  # a module whose full backward hook triples the gradient it passes back
_SCALED.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 3,))


def module_backward_hook(p, x):
    return F.linear(_SCALED(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def frozen_unless_trainable(p, x):
    """A branch on a parameter's requires_grad: in a plain run the parameter is a leaf that requires grad."""
    w1 = p["W1"] if p["W1"].requires_grad else p["W1"].detach()
    return F.linear(torch.tanh(F.linear(x, w1, p["b1"])), p["W2"]).pow(2).sum(1)


def parameter_hook(p, x):
    """A hook on a parameter itself: it changes that parameter's gradient."""
    if p["W2"].requires_grad:
        p["W2"].register_hook(lambda g: g * 0.5)
    return F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def grad_fn_branch(p, x):
    """A branch on an activation's grad_fn (under vmap it has none)."""
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))
    if h.grad_fn is not None and not h.is_leaf:
        h = h * 2
    return F.linear(h, p["W2"]).pow(2).sum(1)


def node_hook(p, x):
    """A hook on an activation's autograd node (what the older ``Module.register_backward_hook`` puts there)."""
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))
    if h.grad_fn is not None:
        h.grad_fn.register_prehook(lambda grad_out: (grad_out[0] * 2,))
    return F.linear(h, p["W2"]).pow(2).sum(1)


AUTOGRAD_STATE = [tensor_hook, module_backward_hook, frozen_unless_trainable, parameter_hook, grad_fn_branch,
                  node_hook]


def test_a_hook_put_on_a_parameter_for_some_samples_only_is_named():
    """The per-sample path traces the first sample: a hook on a parameter that only a later sample puts there
    cannot act on it (no leaf there), and the error says so instead of torch's "doesn't require gradient"."""
    p = _mlp(3)
    x, xv = _split_data(4, n=5, m=3)
    x[0, 0], x[1, 0] = -1.0, 1.0

    def some_samples(q, x):
        if bool(x[0, 0] > 0):
            q["W2"].register_hook(lambda g: g * 0.5)
        return tensor_hook(q, x)

    with pytest.raises(RuntimeError, match=r"^graddot: .*a gradient hook on W2 for a sample other than the first"):
        ghostfunc.graddot(some_samples, p, x, xv)


@pytest.mark.parametrize("model_fn", [old_function, input_grad_penalty, moe_nonzero, moe_where,
                                      maml_inner_step, *AUTOGRAD_STATE],
                         ids=lambda f: f.__name__)
def test_untransformable_models_run_sample_by_sample(model_fn):
    """Models vmap cannot run, and models that read autograd state (requires_grad, gradient hooks, a module's
    backward hooks), which tensors under vmap do not show as a plain run does: one sample at a time."""
    p = _mlp(7)
    x, xv = _split_data(8, n=5, m=3)
    plan = check_all("per-sample " + model_fn.__name__, model_fn, p, x, xv)
    assert "per-sample capture" in notes(plan)
    if model_fn in (input_grad_penalty, maml_inner_step):  # params also enter the model's own backward: leaves
        assert all(r.path == "fallback" and "autograd.grad" in r.reason for r in plan.routes.values())
    elif model_fn in (grad_fn_branch, node_hook, module_backward_hook):  # an activation's node read (a full
        # backward hook reads its output's): a tap would be the node it reads
        assert all(r.path == "fallback" and "Tensor.grad_fn" in r.reason for r in plan.routes.values())
    elif model_fn in (frozen_unless_trainable, parameter_hook):  # the parameter read or hooked: a leaf, as plainly
        read = "W1" if model_fn is frozen_unless_trainable else "W2"
        assert plan.routes[read].path == "fallback" and "requires_grad" in plan.routes[read].reason
        assert plan.routes["b1"].path == "direct"
    else:
        assert plan.routes["W1"].path in ("ghost", "materialize", "contract")  # taps kept


def test_an_inner_step_on_the_whole_batch_is_refused():
    """A model taking an inner gradient step on the params from the whole batch's loss couples every sample
    with every other: its batch's losses are not its samples' own (the first call compares them)."""
    p = _mlp(7)
    x, xv = _split_data(8, n=5, m=3)
    with pytest.raises(SamplesInteractError, match=r"^graddot: samples interact in model_fn: run on the whole "
                                                   r"train batch \(5 samples\) together"):
        ghostfunc.graddot(maml_batch_inner_step, p, x, xv)


class _OwnLinear(torch.autograd.Function):  # old style: a hand-written linear with its own backward
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.T @ x, g.sum(0)


class _OwnScale(torch.autograd.Function):  # new style with a vmap rule: x * w, its own backward
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def own_linear_function(p, x):
    """A parameter's recognised call inside an autograd.Function's forward: its own backward gives the gradient."""
    return F.linear(torch.tanh(_OwnLinear.apply(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def own_scale_function_per_sample(p, x):
    """The same with a vmap rule, run sample by sample (a hook elsewhere needs the per-sample path)."""
    h = torch.tanh(F.linear(x, p["W1"]))
    if h.requires_grad:
        h.register_hook(lambda g: g * 2)
    return F.linear(_OwnScale.apply(h, p["b1"]), p["W2"]).pow(2).sum(1)


def no_grad_use_per_sample(p, x):
    """A parameter also used under no_grad (a target computed without gradients), sample by sample."""
    with torch.no_grad():
        target = F.linear(x, p["W1"], p["b1"]).tanh()
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))
    if h.requires_grad:
        h.register_hook(lambda g: g * 0.5)
    return (F.linear(h, p["W2"]).pow(2).sum(1) + (h - target).pow(2).sum(1))


@pytest.mark.parametrize("model_fn", [own_linear_function, own_scale_function_per_sample, no_grad_use_per_sample],
                         ids=lambda f: f.__name__)
def test_a_parameter_used_with_gradients_off_takes_the_leaf_path(model_fn):
    """On the per-sample path a call with gradients off (inside an autograd.Function's forward, a no_grad block)
    is no tap: the Function's own backward never reaches one (the parameter got 0), and a no_grad use adds
    nothing. Such a parameter takes the exact leaf path."""
    p = _mlp(11)
    x, xv = _split_data(12, n=5, m=3)
    plan = check_all("gradients off " + model_fn.__name__, model_fn, p, x, xv)
    assert "per-sample capture" in notes(plan)
    inside = {"own_linear_function": ("W1", "b1"), "own_scale_function_per_sample": ("b1",),
              "no_grad_use_per_sample": ("W1", "b1")}[model_fn.__name__]
    assert all(plan.routes[k].path == "fallback" for k in inside), plan
    assert plan.routes["W2"].path != "fallback"


@pytest.mark.parametrize("segment_input", ["the batch", "a cast of the batch"])
def test_a_reentrant_checkpoint_whose_inputs_need_no_gradient_is_refused(segment_input):
    """torch gives the parameters inside such a segment no gradient (and warns); the capture runs segments as
    plain calls and would give them theirs: refused by name, at every entry point."""
    p = _mlp(13)
    x, xv = _split_data(14, n=5, m=3)

    def model_fn(p, x):
        z = x if segment_input == "the batch" else x.float().double()
        h = cp.checkpoint(lambda z: torch.tanh(F.linear(z, p["W1"], p["b1"])), z, use_reentrant=True)
        return F.linear(h, p["W2"]).pow(2).sum(1)

    from ghostfunc._interact import CheckpointWithoutGradError

    with pytest.raises(CheckpointWithoutGradError, match=r"^graddot: .*use_reentrant=True .* inputs do not require "
                                                         r"grad.*use_reentrant=False"):
        ghostfunc.graddot(model_fn, p, x, xv)
    with pytest.raises(CheckpointWithoutGradError, match=r"^inrun_shapley: "):
        ghostfunc.inrun_shapley(model_fn, p, x, xv, lr=0.1)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    with pytest.raises(CheckpointWithoutGradError):
        step(step.init(p), x, xv)
    with pytest.raises(CheckpointWithoutGradError, match=r"^graddot_direction: "):
        ghostfunc.graddot_direction(model_fn, p, x, {k: torch.ones_like(v) for k, v in p.items()})


@pytest.mark.parametrize("segment", ["no parameter", "a frozen layer outside params"])
def test_a_reentrant_checkpoint_of_no_trained_parameter_on_the_batch_is_not_refused(segment):
    """torch warns that the segment's inputs need no gradient, but no parameter of params is used inside: every
    gradient is as without checkpointing (torch's and the capture's), so nothing is refused."""
    p = _mlp(21)
    x, xv = _split_data(22, n=5, m=3)
    frozen = torch.randn(3, 3, generator=torch.Generator().manual_seed(23), dtype=F64)

    def inside(z):
        return torch.tanh(z) * 2 if segment == "no parameter" else torch.tanh(F.linear(z, frozen))

    def model_fn(p, x):
        z = cp.checkpoint(inside, x, use_reentrant=True)
        return F.linear(torch.tanh(F.linear(z, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)

    def plain(p, x):
        return F.linear(torch.tanh(F.linear(inside(x), p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)

    check_all("reentrant checkpoint of no parameter", model_fn, p, x, xv, reference_fn=plain, policies=("auto",))
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    step(step.init(p), x, xv)


def _halved_on_grad_fn(p, x):
    """A hook on a linear's own node that halves the gradient to its first input (the bias)."""
    h = F.linear(x, p["W1"], p["b1"])
    if h.grad_fn is not None:
        h.grad_fn.register_hook(lambda gi, go: tuple(None if g is None else g * 0.5 if k == 0 else g
                                                     for k, g in enumerate(gi)))
    return F.linear(torch.tanh(h), p["W2"]).pow(2).sum(1)


def _branch_on_node_name(p, x):
    h = F.linear(x, p["W1"], p["b1"])
    scale = 2.0 if h.grad_fn is not None and "Addmm" in h.grad_fn.name() else 1.0
    return F.linear(torch.tanh(h) * scale, p["W2"]).pow(2).sum(1)


def _bf16_saved(p, x):
    """Saved tensors kept in bfloat16 (activation compression): the backward reads rounded activations."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.to(torch.bfloat16), lambda t: t.to(F64)):
        return F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def _doubled_saved(p, x):
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t * 2):
        return F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


def _mutated_after_saving(p, x):
    """Under allow_mutation_on_saved_tensors (the caller's): the backward reads h as the linear saw it."""
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))
    out = F.linear(h, p["W2"])
    h.mul_(2)
    return out.pow(2).sum(1) + h.sum(1)


@pytest.mark.parametrize("model_fn", [_halved_on_grad_fn, _branch_on_node_name, _bf16_saved, _doubled_saved],
                         ids=lambda f: f.__name__.strip("_"))
def test_what_the_backward_reads_is_what_a_plain_run_reads(model_fn):
    """On the per-sample path a tap is an addition after the recognised call, and a kernel reads the forward's
    activations: a model that reads an activation's autograd node, or runs under saved-tensor hooks that change
    what the backward reads (compression, allow_mutation_on_saved_tensors), saw another graph than a plain run
    (0.13 to 3.5 off). Such a model takes the leaf path: the loop's numbers."""
    p = _mlp(15)
    x, xv = _split_data(16, n=4, m=3)
    plan = check_all("backward reads " + model_fn.__name__, model_fn, p, x, xv, policies=("auto", "ghost"))
    assert all(r.path == "fallback" for r in plan.routes.values()), plan


def test_saved_tensor_hooks_set_by_the_caller_reach_the_per_sample_path():
    p = _mlp(17)
    x, xv = _split_data(18, n=4, m=3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t * 2):
        plan = check_all("caller's saved-tensor hooks", _two_layer, p, x, xv, policies=("auto",))
    assert all(r.path == "fallback" for r in plan.routes.values()), plan
    with torch.autograd.graph.allow_mutation_on_saved_tensors():  # an activation written after a call saved it
        plan = check_all("allow_mutation_on_saved_tensors", _mutated_after_saving, p, x, xv, policies=("auto",))
    assert all(r.path == "fallback" for r in plan.routes.values()), plan


@pytest.mark.parametrize("model_fn", [jvp_penalty, inner_vmap], ids=lambda f: f.__name__)
def test_calls_inside_a_transform_the_model_runs_are_not_tapped(model_fn):
    """torch.func.jvp (or vmap) of a layer inside model_fn: its linear's saved input was that transform's own
    wrapper, dead once it returned (jvp: every policy raised functorch's "tensor may have escaped"; vmap: the
    per-sample path). The parameters used in there take the leaf path, in the batched capture; the rest keep
    their kernels."""
    p = _mlp(19)
    x, xv = _split_data(20, n=5, m=3)
    plan = check_all("inside a transform " + model_fn.__name__, model_fn, p, x, xv)
    assert "per-sample capture" not in notes(plan)
    assert plan.routes["W1"].path == "fallback" and plan.routes["b1"].path == "fallback", plan
    assert plan.routes["W2"].path != "fallback", plan


def _two_layer(p, x, reentrant=None):
    h = torch.tanh(F.linear(x, p["W1"], p["b1"]))  # the checkpointed segment's input requires grad

    def segment(z):
        return torch.tanh(F.linear(z, p["W2"].T @ p["W2"] + torch.eye(4, dtype=z.dtype), p["b1"]))

    h = segment(h) if reentrant is None else cp.checkpoint(segment, h, use_reentrant=reentrant)
    return F.linear(h, p["W2"]).pow(2).sum(1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint(reentrant):
    p = _mlp(9)
    x, xv = _split_data(10, n=4, m=3)

    def model_fn(p, x):
        return _two_layer(p, x, reentrant)

    plan = check_all("checkpoint", model_fn, p, x, xv, reference_fn=_two_layer)
    assert "runs as if not checkpointed: exact, without its memory saving" in notes(plan)
    from torch.utils.checkpoint import CheckpointFunction

    assert "apply" not in CheckpointFunction.__dict__  # the capture's plain-call stand-in is gone again
    import torch.utils.checkpoint as checkpointing  # (and the non-re-entrant form's: torch's own generator again)

    assert checkpointing._checkpoint_without_reentrant_generator.__module__ == "torch.utils.checkpoint"


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_module_under_functional_call(reentrant):
    # a recompute would run after functional_call has put the module's own weights back: none happens
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    params = {k: v.detach() * 2 for k, v in layer.named_parameters()}  # not the module's own values

    def model_fn(p, x):
        h = F.linear(x, p["weight"])  # the segment's input requires grad
        return cp.checkpoint(lambda z: functional_call(layer, p, (z,)), h, use_reentrant=reentrant).pow(2).sum(1)

    def plain(p, x):
        return functional_call(layer, p, (F.linear(x, p["weight"]),)).pow(2).sum(1)

    x, xv = torch.randn(4, 3, dtype=F64), torch.randn(3, 3, dtype=F64)
    check_all("checkpoint functional_call", model_fn, params, x, xv, reference_fn=plain)
    assert all(q.grad is None for q in layer.parameters())  # nothing written on the module
    # the loop itself runs the segment as a plain call: torch's re-entrant form refuses .grad(), the other one
    # recomputed in the backward with the module's own weights (a silent wrong answer: 0.9 off on a Llama)
    got, want = (ghostfunc.reference_graddot(fn, params, x, xv)[0] for fn in (model_fn, plain))
    assert rel(got, want) < 1e-12
    assert all(q.grad is None for q in layer.parameters())


@pytest.mark.parametrize("reentrant", [None, False])
def test_captures_in_threads_with_a_module_each(reentrant):
    """Three threads call graddot at once, each on a module of its own (checkpointed or not) while a fourth
    checkpoints a plain layer: every call is the single-sample loop's (the README's Threads)."""
    import copy
    import threading

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def make():
        own = copy.deepcopy(net)

        def model_fn(p, b):
            def run(x):
                return functional_call(own, p, (x,))

            h = run(b[0]) if reentrant is None else cp.checkpoint(run, b[0], use_reentrant=reentrant)
            return F.cross_entropy(h, b[1], reduction="none")
        return model_fn

    data = [((torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))),
             (torch.randn(3, 6, dtype=F64), torch.randint(0, 3, (3,)))) for _ in range(2)]
    want = [ghostfunc.reference_graddot(make(), params, *d)[0] for d in data]
    errors: list[float | str] = []
    stop = threading.Event()

    def worker(j):
        fn = make()
        for _ in range(6):
            try:
                errors.append(rel(ghostfunc.graddot(fn, params, *data[j]).scores, want[j]))
            except Exception as e:  # noqa: BLE001 (reported below, in the main thread)
                errors.append(repr(e))

    def plain():
        layer = nn.Linear(4, 4)
        while not stop.is_set():
            x = torch.randn(2, 4, requires_grad=True)
            cp.checkpoint(lambda z: torch.tanh(layer(z)), x, use_reentrant=False).sum().backward()

    threads = [threading.Thread(target=worker, args=(j % 2,)) for j in range(3)]
    side = threading.Thread(target=plain)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    side.join()
    assert len(errors) == 18 and all(isinstance(e, float) and e < 1e-12 for e in errors), errors


def assert_steps_are_torch_optims(model_fn, plain_loss, params, optimizer, torch_optimizer, batches, val, seed=None,
                                  notes_ok=lambda notes: True, tol=1e-12):
    """``train_step(model_fn, optimizer)`` over ``batches`` against ``torch_optimizer`` stepping on the mean of
    ``plain_loss(params, batch)`` (``[B]``), the RNG seeded alike for both before each step where ``seed`` is given;
    each step's notes pass ``notes_ok``, and the parameters agree at the end."""
    step = ghostfunc.train_step(model_fn, optimizer)
    state = step.init(params)
    plain = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optim = torch_optimizer(list(plain.values()))
    for i, batch in enumerate(batches):
        if seed is not None:
            torch.manual_seed(seed + i)
        state, info = step(state, batch, val)
        assert notes_ok(info.notes), info.notes
        if seed is not None:
            torch.manual_seed(seed + i)  # (the same draws as the step's training rows)
        optim.zero_grad()
        plain_loss(plain, batch).mean().backward()
        optim.step()
    for k in params:
        assert rel(state.params[k], plain[k].detach()) < tol, k


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_training_step_of_a_checkpointed_module_whose_params_moved(reentrant):
    """``train_step`` compares its gradient with the batch's by ordinary autograd on each new signature: there a
    checkpointed segment was recomputed in the backward with the module's own weights, and once the state's
    parameters had moved from them a valid step was refused as samples that interact (h49). The trajectory is
    ``torch.optim``'s on the same model without checkpointing."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def block(self, h):
            return torch.tanh(self.l2(h)) * h

        def forward(self, x, checkpointed=True):
            h = torch.tanh(self.l1(x))
            return self.l3(cp.checkpoint(self.block, h, use_reentrant=reentrant) if checkpointed else self.block(h))

    net = Net().double()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1], reduction="none")

    g = torch.Generator().manual_seed(1)
    val = (torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    batches = [(torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
               for n in (8, 8, 8, 6)]  # (the last a new signature, checked at moved parameters)
    assert_steps_are_torch_optims(
        model_fn, lambda p, b: F.cross_entropy(functional_call(net, p, (b[0],), {"checkpointed": False}), b[1],
                                               reduction="none"),
        params, ghostfunc.sgd(0.5), lambda ps: torch.optim.SGD(ps, lr=0.5), batches, val)
    assert all(q.grad is None for q in net.parameters())


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_hf_gradient_checkpointing_in_train_mode(hf, reentrant):
    cfg = hf.GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = hf.GPT2LMHeadModel(cfg).to(F64)
    plain_fn, params = ghostfunc.from_module(model, ghostfunc.causal_lm_loss)
    model.gradient_checkpointing_enable(None if reentrant is None else {"use_reentrant": reentrant})
    model.train()
    model_fn, _ = ghostfunc.from_module(model, ghostfunc.causal_lm_loss)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32, (5, 6), generator=g)
    train, val = {"input_ids": ids[:3]}, {"input_ids": ids[3:]}
    def reference(p, batch):  # HF checkpoints in training mode only (dropout is 0): the loop runs it unchecked,
        model.eval()  # since a re-entrant checkpoint refuses torch.autograd.grad
        try:
            return plain_fn(p, batch)
        finally:
            model.train()

    plan = check_all("checkpoint hf gpt2", model_fn, params, train, val, reference_fn=reference, policies=("auto",),
                     reduces=("mean", None))
    assert "runs as if not checkpointed" in notes(plan)
    moved = {k: v * 1.1 for k, v in params.items()}  # params that are not the module's own weights (a step later)
    got, want = (ghostfunc.reference_graddot(fn, moved, train, val)[0] for fn in (model_fn, reference))
    assert rel(got, want) < 1e-12


@pytest.mark.parametrize(("experts", "dtype"), [("eager", F64), ("batched_mm", F64), ("grouped_mm", torch.float32)])
def test_hf_mixtral_routing(hf, experts, dtype):
    cfg = hf.MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._experts_implementation = experts
    torch.manual_seed(0)
    model_fn, params = ghostfunc.from_module(hf.MixtralForCausalLM(cfg).to(dtype).eval(), ghostfunc.causal_lm_loss)
    ids = torch.randint(3, 32, (5, 6), generator=torch.Generator().manual_seed(1))
    train, val = {"input_ids": ids[:3]}, {"input_ids": ids[3:]}
    if dtype == F64:
        plan = check_all(f"moe mixtral {experts}", model_fn, params, train, val, policies=("auto",),
                         reduces=("mean", None))
    else:  # grouped_mm has no float64 kernel: float32 against the float32 loop
        out = ghostfunc.graddot(model_fn, params, train, val)
        ref, _, _ = ghostfunc.reference_graddot(model_fn, params, train, val)
        assert rel(out.scores, ref) < 1e-5
        plan = out.plan
    assert ("per-sample capture" in notes(plan)) == (experts == "eager")  # nonzero routing: sample by sample


@pytest.mark.parametrize("model_fn", [moe_nonzero, tensor_hook, module_backward_hook], ids=lambda f: f.__name__)
def test_inrun_shapley_and_train_step_on_the_per_sample_path(model_fn):
    p = _mlp(11)
    x, xv = _split_data(12, n=4, m=3)
    gt, _ = per_sample_grads(model_fn, p, x)
    gv, _ = per_sample_grads(model_fn, p, xv)
    scores = sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)
    lr, n = 0.1, len(x)
    assert rel(ghostfunc.inrun_shapley(model_fn, p, x, xv, lr=lr), -lr / n * scores) < 1e-10
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(lr))
    state, info = step(step.init(p), x, xv)
    assert rel(info.values, -lr / n * scores) < 1e-10
    for k in p:
        torch.testing.assert_close(state.params[k], p[k] - lr * gt[k].mean(0), rtol=1e-12, atol=1e-14)
    # order 2: the validation gradient and Hessian-vector product also go sample by sample
    assert rel(ghostfunc.inrun_shapley(model_fn, p, x, xv, lr=lr, order=2), order2(model_fn, p, x, xv, lr)) < 1e-10


def normalising_hook(p, x):
    """A hook that normalises the gradient over the whole tensor it sees: the batch's, or one sample's."""
    h = F.linear(x, p["W1"], p["b1"])
    if h.requires_grad:
        h.register_hook(lambda g: g / g.norm())
    return F.linear(torch.tanh(h), p["W2"]).pow(2).sum(1)


class _RowMixing(torch.autograd.Function):
    """The identity forward; a backward that takes out half of the rows' mean gradient."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g - 0.5 * g.mean(0, keepdim=True)


def row_mixing_function(p, x):
    return F.linear(torch.tanh(_RowMixing.apply(F.linear(x, p["W1"], p["b1"]))), p["W2"]).pow(2).sum(1)


def clipping_parameter_hook(p, x):
    """A hook on a parameter that clips its gradient's norm (nonlinear: the clip of a sum is not the sum of clips)."""
    if p["W2"].requires_grad:
        p["W2"].register_hook(lambda g: g * torch.clamp(0.1 / g.norm(), max=1.0))
    return F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"]).pow(2).sum(1)


class _ClampGrad(IdentityForward):  # a gradient-clipping layer: row-wise, but not linear in its gradient
    @staticmethod
    def backward(ctx, g):
        return g.clamp(-0.05, 0.05)


def clamped_gradient_function(p, x):
    """Each row's gradient clamped in the backward: the batch mean's 1/B reaches the clamp, a row alone does
    not, so torch.optim's step (on the mean loss) is not the mean of the rows' own gradients."""
    return F.linear(torch.tanh(_ClampGrad.apply(F.linear(x, p["W1"], p["b1"]))), p["W2"]).pow(2).sum(1)


@pytest.mark.parametrize("model_fn", [normalising_hook, row_mixing_function, clipping_parameter_hook,
                                      clamped_gradient_function], ids=lambda f: f.__name__)
def test_samples_that_interact_in_the_backward_only_are_refused_by_train_step(model_fn):
    """The losses agree together and alone, the gradients do not: graddot and inrun_shapley give the loop's
    per-sample numbers; train_step, which claims torch.optim's trajectory (the batch gradient), refuses by name."""
    p = _mlp(13)
    x, xv = _split_data(14, n=4, m=3)
    gt, _ = per_sample_grads(model_fn, p, x)
    gv, _ = per_sample_grads(model_fn, p, xv)
    scores = sum(gt[k].flatten(1) @ gv[k].flatten(1).mean(0) for k in p)
    assert rel(ghostfunc.graddot(model_fn, p, x, xv).scores, scores) < 1e-10
    assert rel(ghostfunc.inrun_shapley(model_fn, p, x, xv, lr=0.1), -0.1 / len(x) * scores) < 1e-10
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    model_fn(leaves, x).mean().backward()  # what torch.optim steps with
    assert any(not torch.allclose(leaves[k].grad, gt[k].mean(0)) for k in p)  # the interaction is real
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    with pytest.raises(SamplesInteractError, match=r"^train_step: samples interact in model_fn's backward: on the "
                                                   r"first 3 training samples.*params\['(W1|b1|W2)'\]"):
        step(step.init(p), x, xv)


@pytest.mark.parametrize("draw", ["dropout", "noise"])
@pytest.mark.parametrize("model_fn", [normalising_hook, clamped_gradient_function], ids=lambda f: f.__name__)
def test_samples_that_interact_in_the_backward_are_refused_behind_random_draws(model_fn, draw):
    """The same couplings in a model that draws (dropout in training mode, noise of its own): the backward
    check compared nothing for a model that draws, and train_step stepped with the mean of the samples' own
    gradients, not torch.optim's. It runs dropout drawing nothing and other draws as their means."""
    p = _mlp(13)
    x, xv = _split_data(14, n=4, m=3)

    def drawing(q, x):
        x = F.dropout(x, 0.2, True) if draw == "dropout" else x + 0.1 * torch.randn_like(x)
        return model_fn(q, x)

    step = ghostfunc.train_step(drawing, ghostfunc.sgd(0.1))
    with pytest.raises(SamplesInteractError, match=r"^train_step: samples interact in model_fn's backward"):
        step(step.init(p), x, xv)


def two_row_biases(p, x):
    """Two ``[1, d]`` biases: for one row autograd may hand back one gradient tensor for both."""
    return F.linear(torch.tanh(F.linear(x, p["W1"]) + p["b1"][None] + p["c1"][None]), p["W2"]).pow(2).sum(1)


def bfloat16_autocast(p, x):
    """float32 parameters, the forward under bfloat16 autocast: the backward rounds in bfloat16."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.linear(torch.tanh(F.linear(x, p["W1"], p["b1"])), p["W2"])
    return h.float().pow(2).sum(1)


@pytest.mark.parametrize("model_fn", [two_row_biases, bfloat16_autocast], ids=lambda f: f.__name__)
def test_train_steps_of_independent_samples_are_not_refused(model_fn):
    """The backward check compares without aliasing one row's gradients, at the rounding of the dtype the model
    computed in: these trained as torch.optim does (both were refused once, 1e3x and 9x past rounding)."""
    p = {k: v.float() for k, v in _mlp(15, d=8, h=32).items()}
    p["c1"] = torch.zeros_like(p["b1"])
    if model_fn is bfloat16_autocast:
        del p["c1"]
    x, xv = (t.float() for t in _split_data(16, n=16, m=8, d=8))
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1))
    state, _ = step(step.init(p), x, xv)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    model_fn(leaves, x).mean().backward()
    rounding = 2e-2 if model_fn is bfloat16_autocast else 1e-5  # of the gradient's scale: bfloat16 keeps 3 digits
    for k in p:
        grad = leaves[k].grad
        torch.testing.assert_close((p[k] - state.params[k]) / 0.1, grad, rtol=0, atol=rounding * float(grad.abs().max()))


# --------------------------------------------------------------------------- what is not swallowed


def test_a_real_mistake_in_the_model_is_raised_not_hidden():
    def bad(p, x):
        return F.linear(x, p["W1"].T).sum(1)  # [B, 3] @ [4, 3]^T^T: wrong shapes in any mode

    p = _mlp()
    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ghostfunc.graddot(bad, p, x, x)


def test_per_sample_path_nan_names_the_sample():
    def model_fn(p, x):
        h = F.linear(x, p["W1"], p["b1"])
        rows = (h[:, 0] > 0).nonzero().flatten()  # forces the per-sample path
        return h.sum(1) * torch.log(x[:, 0]) + 0 * rows.numel()  # (a count over the batch would couple samples)

    p = _mlp()
    x = torch.tensor([[1.0, 1, 1], [-1, 1, 1], [2, 1, 1]], dtype=F64)
    with pytest.raises(FloatingPointError, match=r"^graddot: .*non-finite losses for train samples \[1\]"):
        ghostfunc.graddot(model_fn, p, x, x[:1])


def test_public_plan_says_which_path():
    p = _mlp(7)
    x, xv = _split_data(8)
    text = str(ghostfunc.plan(moe_nonzero, p, x, xv))
    assert "note: per-sample capture" in text and "nonzero" in text


@pytest.mark.parametrize("model_fn", [sign_branch, moe_nonzero], ids=lambda f: f.__name__)
def test_weighted_validation_gradient_split_and_per_sample(model_fn):
    # Σ_v w_v g_v as the optimizer-aware values need it: groups summed, or sample by sample
    from ghostfunc._capture import split_batch, weighted_grad

    p = _mlp(13)
    v = 10 * p["W1"].sum(0, keepdim=True)
    xv = torch.cat([v, -v, _split_data(14, m=3)[1]])
    w = torch.linspace(0.5, 2, len(xv), dtype=F64)
    gv, lv = per_sample_grads(model_fn, p, xv)
    grads, losses = weighted_grad(model_fn, p, split_batch(xv), w, "test", "val")
    for k in p:
        torch.testing.assert_close(grads[k], torch.einsum("v,v...->...", w, gv[k]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses, lv, rtol=1e-12, atol=1e-14)


def test_a_model_found_unbatchable_goes_straight_to_the_per_sample_path_next_time():
    calls = []

    def model_fn(p, x):
        calls.append(x.shape[0])
        return old_function(p, x)  # fails in the batched capture, not in its trace

    p = _mlp(15)
    x, xv = _split_data(16, n=4, m=3)
    first = ghostfunc.graddot(model_fn, p, x, xv)
    n_first, calls[:] = len(calls), []
    second = ghostfunc.graddot(model_fn, p, x, xv)
    assert len(calls) < n_first and "per-sample capture" in notes(second.plan)
    torch.testing.assert_close(second.scores, first.scores, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- parametrizations' cache


def _orthogonal_model(inner_cache: bool):
    """An orthogonal layer (a parametrization) and its weight used twice; ``inner_cache``: the model computes it once
    per run under ``parametrize.cached()`` itself, as torch's documentation shows."""
    import torch.nn.utils.parametrizations as pz
    import torch.nn.utils.parametrize as pr

    torch.manual_seed(3)
    net = nn.Sequential(pz.orthogonal(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, batch):
        x, y = batch
        with pr.cached() if inner_cache else contextlib.nullcontext():
            h = functional_call(net, p, (x,))
            again = functional_call(net[0], {"bias": p["0.bias"], "parametrizations.weight.original":
                                             p["0.parametrizations.weight.original"]}, (torch.tanh(x),))
        return F.cross_entropy(h + 0.1 * again[:, :3], y, reduction="none")

    g = torch.Generator().manual_seed(4)
    train = (torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    val = (torch.randn(3, 5, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g))
    return model_fn, params, train, val


@pytest.mark.parametrize("inner_cache", [False, True])
def test_a_call_inside_parametrize_cached_evaluates_the_weights_afresh(inner_cache):
    """Inside ``torch.nn.utils.parametrize.cached()`` the first of ghostfunc's runs of ``model_fn`` cached the
    orthogonal weight, and the later runs (the capture under other transforms) reused it, unconnected to their
    parameters: scores 0.23 off, the layer's gradient 1.0 off, a training step refused as samples that interact.
    The caller's cache comes back as it was."""
    import torch.nn.utils.parametrize as pr

    model_fn, params, train, val = _orthogonal_model(inner_cache)
    check_all("parametrize.cached", model_fn, params, train, val, policies=("auto", "ghost"), reduces=("mean",))
    want = ghostfunc.graddot(model_fn, params, train, val)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(0.1), order=2)
    want_state, want_info = step(step.init(params), train, val)
    with pr.cached():
        kept = pr._cache
        pr._cache[("the caller's", "entry")] = torch.zeros(1)
        got = ghostfunc.graddot(model_fn, params, train, val, policy="ghost")
        ref, _, ref_grad = ghostfunc.reference_graddot(model_fn, params, train, val)
        state, info = step(step.init(params), train, val)
        assert pr._cache_enabled == 1 and pr._cache is kept and ("the caller's", "entry") in kept
    assert pr._cache_enabled == 0
    assert rel(got.scores, want.scores) < 1e-10 and rel(ref, want.scores) < 1e-10
    for k in params:
        assert rel(got.train_grad[k], want.train_grad[k]) < 1e-10 and rel(ref_grad[k], want.train_grad[k]) < 1e-10
        assert rel(state.params[k], want_state.params[k]) < 1e-12
    assert rel(info.values, want_info.values) < 1e-10


# ---------------------------------------------------------------- forward-mode AD inside the model


def forward_ad_penalty_fn(p, batch):
    """An input-Jacobian penalty by ``torch.autograd.forward_ad``: the features' directional derivative along 1."""
    import torch.autograd.forward_ad as fwad

    x, y = batch

    def feats(x):
        return torch.tanh(F.linear(x, p["w1"], p["b1"])) * p["s"]

    with fwad.dual_level():
        tangent = fwad.unpack_dual(feats(fwad.make_dual(x, torch.ones_like(x)))).tangent.sum(-1)
    return F.cross_entropy(F.linear(feats(x), p["w2"]), y, reduction="none") + 0.3 * tangent ** 2


def forward_ad_model():
    g = torch.Generator().manual_seed(7)
    params = {"w1": torch.randn(6, 4, generator=g, dtype=F64) / 2, "b1": torch.randn(6, generator=g, dtype=F64),
              "w2": torch.randn(3, 6, generator=g, dtype=F64) / 2, "s": torch.randn(6, generator=g, dtype=F64)}
    train = (torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g))
    val = (torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    return params, train, val


def test_forward_mode_ad_inside_the_model_makes_every_parameter_a_leaf():
    """A model that differentiates in forward mode (``make_dual``): a tapped call's tangent also depends on the
    parameters, which no tap sees; the per-sample capture kept the taps and was 0.78 off the loop (h49). Every
    parameter now takes the leaf path, as for a backward the model runs itself."""
    params, train, val = forward_ad_model()
    plan = check_all("forward-mode AD", forward_ad_penalty_fn, params, train, val, policies=("auto",))
    assert "torch.autograd.forward_ad.make_dual inside model_fn" in str(plan), plan
    from tests.test_shapley import double_backward_hvp, reference_order2

    want = reference_order2(forward_ad_penalty_fn, params, train, val, 0.5,
                            double_backward_hvp(forward_ad_penalty_fn, params, val))
    assert rel(ghostfunc.inrun_shapley(forward_ad_penalty_fn, params, train, val, lr=0.5, order=2), want) < 1e-10


def test_an_activation_made_to_require_grad_keeps_the_batched_capture():
    """Hugging Face's ``enable_input_require_grads`` (with gradient checkpointing) hooks the embeddings to call
    ``requires_grad_()`` on their output: under ``vmap`` that raised, every sample ran alone, and with dropout the
    per-sample masks left ``torch.optim``'s trajectory (0.05-0.35 over 5 steps, h51). No parameter's gradient
    changes with it: the batched capture takes it as the plain run does, and the step is ``torch.optim``'s."""
    torch.manual_seed(0)
    emb, drop, head = nn.Embedding(12, 6).double(), nn.Dropout(0.3), nn.Linear(6, 3).double()
    emb.weight.requires_grad_(False)  # (a frozen base: its output needs requires_grad_ for re-entrant checkpoints)
    emb.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    params = {k: v.detach().clone() for k, v in head.named_parameters()}

    def model_fn(p, batch):
        h = drop(emb(batch[0])).mean(1)
        return F.cross_entropy(functional_call(head, p, (h,)), batch[1], reduction="none")

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 12, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    val = (torch.randint(0, 12, (4, 4), generator=g), torch.randint(0, 3, (4,), generator=g))
    assert_steps_are_torch_optims(model_fn, model_fn, params, ghostfunc.sgd(0.5), lambda ps: torch.optim.SGD(ps, lr=0.5),
                                  batches, val, seed=10,
                                  notes_ok=lambda notes: not any("per-sample capture" in n for n in notes))


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_lora_step_of_a_checkpointed_model_is_torch_optims(reentrant):
    """A LoRA ``B`` at zero gives its ``A`` an exactly zero gradient, and a step asks whether the loss has an autograd
    path to ``A`` (``torch.optim`` leaves a parameter without one alone, and decays one with one): that plain run
    recomputed the checkpointed segment in the backward and raised (``CheckpointError``, or re-entrant's refusal of
    ``.grad()``), or hid ``A``'s path, which then went undecayed (9e-3 off AdamW after 3 steps, h51). It runs the
    segments as plain calls, as the capture does."""
    torch.manual_seed(0)

    class Lora(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.base, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.base.requires_grad_(False)
            self.A, self.B = nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.zeros(6, 2))

        def block(self, h):
            return torch.tanh(self.base(h) + h @ self.A.T @ self.B.T)

        def forward(self, x, checkpointed=True):
            h = torch.tanh(self.inp(x))
            return self.out(cp.checkpoint(self.block, h, use_reentrant=reentrant) if checkpointed else self.block(h))

    net = Lora().double()
    params = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}

    def model_fn(p, batch):
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1], reduction="none")

    g = torch.Generator().manual_seed(2)
    val = (torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    batches = [(torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    assert_steps_are_torch_optims(
        model_fn, lambda p, b: F.cross_entropy(functional_call(net, p, (b[0],), {"checkpointed": False}), b[1],
                                               reduction="none"),
        params, ghostfunc.adamw(0.05, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1), batches, val, tol=1e-10)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_model_with_dropout_keeps_the_batched_capture(reentrant):
    """A checkpointed segment with dropout in training mode (Hugging Face's default checkpointing is non-re-entrant):
    the non-re-entrant form set saved-tensor hooks, which torch.func refuses, so every sample ran alone (the loop's
    cost) with dropout masks of its own, and the step left torch.optim's trajectory (0.34-0.38 over 4 steps, h52).
    Both forms now run as plain calls in the batched capture: the plain step's masks, torch.optim's trajectory."""
    torch.manual_seed(0)
    inp, mid, out, drop = nn.Linear(4, 6).double(), nn.Linear(6, 6).double(), nn.Linear(6, 3).double(), nn.Dropout(0.3)
    params = {f"{n}.{k}": v.detach().clone() for n, m in (("inp", inp), ("mid", mid), ("out", out))
              for k, v in m.named_parameters()}

    def forward(p, x, checkpointed):
        h = torch.tanh(F.linear(x, p["inp.weight"], p["inp.bias"]))

        def block(h):
            return drop(torch.tanh(F.linear(h, p["mid.weight"], p["mid.bias"])))

        return F.linear(cp.checkpoint(block, h, use_reentrant=reentrant) if checkpointed else block(h),
                        p["out.weight"], p["out.bias"])

    def model_fn(p, batch):
        return F.cross_entropy(forward(p, batch[0], True), batch[1], reduction="none")

    g = torch.Generator().manual_seed(3)
    val = (torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    batches = [(torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    assert_steps_are_torch_optims(
        model_fn, lambda p, b: F.cross_entropy(forward(p, b[0], False), b[1], reduction="none"), params,
        ghostfunc.sgd(0.5, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), batches, val, seed=20,
        notes_ok=lambda notes: not any("per-sample capture" in n for n in notes)
        and any("runs as if not checkpointed" in n for n in notes))


_SEGMENT_SCALE = [1.0]


@contextlib.contextmanager
def _scaled(by):
    """A forward context that a checkpointed segment reads (as an autocast would change how it computes)."""
    before, _SEGMENT_SCALE[0] = _SEGMENT_SCALE[0], by
    try:
        yield
    finally:
        _SEGMENT_SCALE[0] = before


def test_a_non_reentrant_checkpoints_forward_context_is_kept():
    """``checkpoint(..., use_reentrant=False, context_fn=...)`` runs the segment under the context's forward part;
    run as a plain call in the capture, the segment ran without it (0.56 off, the reference loop too: h53)."""
    torch.manual_seed(0)
    p = {"w1": torch.randn(6, 4, dtype=F64), "w2": torch.randn(3, 6, dtype=F64)}

    def segment(p, x):
        return torch.tanh(F.linear(x, p["w1"]) * _SEGMENT_SCALE[0])

    def model_fn(p, batch):
        h = cp.checkpoint(segment, p, batch[0], use_reentrant=False,
                          context_fn=lambda: (_scaled(3.0), contextlib.nullcontext()))
        return F.cross_entropy(F.linear(h, p["w2"]), batch[1], reduction="none")

    def plain(p, batch):
        with _scaled(3.0):
            h = segment(p, batch[0])
        return F.cross_entropy(F.linear(h, p["w2"]), batch[1], reduction="none")

    g = torch.Generator().manual_seed(4)
    train = (torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    val = (torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g))
    check_all("checkpoint context_fn", model_fn, p, train, val, reference_fn=plain, policies=("auto",),
              reduces=("mean",))
