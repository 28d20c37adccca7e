"""Property tests: graddot equals a loop of single-sample backward passes.

Hypothesis draws architectures and shapes (batch of one, sequence of one, no bias,
tied and shared weights, padding); every policy and every ``val_reduce`` is
compared with :func:`ghostfunc.reference_graddot` in float64 (1e-10 relative).
Float32 models are compared with the same loop run on their float64 twin (1e-5).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ghostfunc

from . import _models

POLICIES = ["auto", "2t2", "ghost", "materialize", "contract"]
REDUCE = ["mean", "sum", None]
F64 = torch.float64


#: Worst relative score error seen per dtype; printed in pytest's terminal summary (conftest.py).
WORST: dict[str, float] = {}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_exact(built, n: int, m: int, t: int, s: int, seed: int, tol: float = 1e-10,
                 policies=POLICIES, reduces=REDUCE, twin=None) -> float:
    """Compare every policy x reduction; return the worst relative error seen.

    ``twin``: the same model in float64, for a float32 ``built``. Then scores,
    per-parameter parts and gradients are compared with the float64 truth, and may
    be off by ``tol`` or by twice the float32 loop's own error, whichever is larger
    (an ill-conditioned case, e.g. a LayerNorm over 2 features, puts the float32 loop
    itself 3e-5 from the truth; two correct float32 computations then differ by that).
    """
    model_fn, params, make = built
    g = torch.Generator().manual_seed(seed)
    train, val = make(n, t, g), make(m, s, g)
    worst = 0.0
    for val_reduce in reduces:
        ref, ref_pp, ref_grad = ghostfunc.reference_graddot(model_fn, params, train, val, val_reduce=val_reduce)
        bound = tol
        if twin is not None:  # the float32 loop's own error against float64 sets the bar when it is larger
            up = _to64(train), _to64(val)
            truth = ghostfunc.reference_graddot(twin[0], twin[1], *up, val_reduce=val_reduce)
            loop_err = _errors((ref, ref_pp, ref_grad), truth)
            ref, ref_pp, ref_grad = truth
            bound = max(tol, 2 * loop_err)
        for policy in policies:
            if policy == "contract" and val_reduce is None:
                continue
            out = ghostfunc.graddot(model_fn, params, train, val, val_reduce=val_reduce, policy=policy)
            assert out.scores.shape == ref.shape
            err = _errors((out.scores, out.per_param, out.train_grad), (ref, ref_pp, ref_grad))
            assert err < bound, (policy, val_reduce, err, bound, str(out.plan))
            total = torch.stack(list(out.per_param.values())).sum(0)
            assert rel(total, out.scores) < 1e-12
            worst = max(worst, rel(out.scores, ref))
    key = str(built[1][next(iter(built[1]))].dtype).removeprefix("torch.")
    WORST[key] = max(WORST.get(key, 0.0), worst)
    return worst


sizes = st.integers(1, 4)


@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), bias=st.booleans(),
       n=sizes, m=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_mlp_2d(widths, bias, n, m, seed):
    torch.manual_seed(seed)
    assert_exact(_models.mlp(widths, bias, F64), n, m, 1, 1, seed)


@given(d=st.integers(1, 6), norm=st.sampled_from(["layer", "rms", "none"]), bias=st.booleans(),
       padding=st.sampled_from([None, 0, 2]), tied=st.booleans(), shared=st.booleans(),
       n=sizes, m=st.integers(1, 3), t=st.integers(1, 5), s=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sequence_models(d, norm, bias, padding, tied, shared, n, m, t, s, seed):
    torch.manual_seed(seed)
    built = _models.seq(7, d, norm, bias, padding, tied, shared, F64)
    assert_exact(built, n, m, t, s, seed)


@given(dims=st.sampled_from([1, 2]), c=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "valid", "same"]), dilation=st.integers(1, 2), bias=st.booleans(),
       groups=st.sampled_from([1, 2]), n=sizes, m=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(dims=2, c=1, k=2, stride=1, padding="same", dilation=1, bias=True, groups=2, n=2, m=2, seed=0)
def test_convnets(dims, c, k, stride, padding, dilation, bias, groups, n, m, seed):
    """Convs with strides, dilations, padding (numbers, "valid", "same": an even kernel pads one side more)
    and groups (a grouped conv's weight gradient is kept whole per sample)."""
    torch.manual_seed(seed)
    stride = 1 if padding == "same" else stride  # torch allows "same" with stride 1 only
    built = _models.conv(dims, c, k, stride, padding, dilation, bias, F64, groups=groups)
    assert_exact(built, n, m, 1, 1, seed)
    if groups > 1:  # recognised, not the fallback
        one = built[2](1, 1, torch.Generator())
        assert ghostfunc.plan(built[0], built[1], one, one).routes["0.weight"].path == "direct"


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gpt2(tied):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=31, n_positions=8, n_embd=8, n_layer=2, n_head=2, tie_word_embeddings=tied,
                     bos_token_id=0, eos_token_id=0)
    net = GPT2LMHeadModel(cfg).to(F64).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def model_fn(p, ids):
        out = torch.func.functional_call(net, p, (ids,), {"attention_mask": torch.ones_like(ids), "use_cache": False})
        logits = out.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    def make(n, t, g):
        return torch.randint(0, 31, (n, t), generator=g)

    assert_exact((model_fn, params, make), 3, 2, 6, 4, seed=1)
    plan = ghostfunc.plan(model_fn, params, make(3, 6, torch.Generator()), make(2, 4, torch.Generator()))
    assert plan.routes["transformer.wte.weight"].uses == (("embedding", "linear") if tied else ("embedding",))
    assert "fallback" not in plan.counts()


def _to64(batch):
    if isinstance(batch, tuple):
        return tuple(_to64(x) for x in batch)
    return batch.double() if batch.is_floating_point() else batch


def _errors(got, want) -> float:
    """Worst relative error of (scores, per_param, train_grad) against ``want``: scores and
    parts relative to the largest score or per-parameter part, whichever is larger (a score is the sum
    of its parts: where they cancel, its rounding is that of the parts; float32 found a one-sample MLP
    whose two parts, 0.0198 and -0.0185, sum to 0.0013, each correct to 1e-6 of itself), gradients
    relative to the largest gradient entry."""
    scores, pp, grad = got
    w_scores, w_pp, w_grad = want
    scale = max([w_scores.abs().max(), *(v.abs().max() for v in w_pp.values())]).clamp_min(1e-300)
    gscale = max(v.abs().max() for v in w_grad.values()).clamp_min(1e-300)
    errs = [((scores.double() - w_scores.double()).abs().max() / scale).item()]
    errs += [((pp[k].double() - w_pp[k].double()).abs().max() / scale).item() for k in w_pp]
    errs += [((grad[k].double() - w_grad[k].double()).abs().max() / gscale).item() for k in w_grad]
    return max(errs)


@given(widths=st.lists(st.integers(2, 6), min_size=1, max_size=2), n=sizes, m=st.integers(1, 3),
       seq_len=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(widths=[3], n=1, m=2, seq_len=1, seed=1725)  # parts that cancel 15x (see _errors)
def test_float32_within_1e5(widths, n, m, seq_len, seed):
    # A LayerNorm over 2 features maps every input to about ±1: its Jacobian is ~0, so the gradients upstream
    # of it are pure rounding noise (float64 keeps that noise ~1e-16 of the scores; float32 does not).
    d = max(3, widths[0])
    for build, t in ((lambda dtype: _models.seq(7, d, "layer", True, None, True, False, dtype), seq_len),
                     (lambda dtype: _models.mlp(widths, True, dtype), 1)):
        torch.manual_seed(seed)
        built = build(torch.float32)
        torch.manual_seed(seed)  # the same initial weights, built in float32 and cast up
        twin = build(F64)
        assert all(torch.equal(twin[1][k], v.double()) for k, v in built[1].items())
        assert_exact(built, n, m, t, t, seed, tol=1e-5, reduces=["mean", None], twin=twin)
