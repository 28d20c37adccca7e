"""Shared machinery for the benchmarks: models from configs, contenders, timing, peak memory, output.

Method (the same in every script):

- **Time.** One process; every contender is warmed up, then ``rounds`` rounds run
  every contender once each, in an order rotated from round to round, so slow
  drifts of machine load spread over all of them. Medians are reported with the
  min and max; on CUDA every run is bracketed by ``torch.cuda.synchronize()``.
- **Ratios.** Each contender against its baseline: ``plain`` (forward + backward
  over the concatenated ``[train; val]`` batch, ordinary autograd) or, for
  contenders that include an optimizer update, ``plain+optim`` (the same plus a
  ``torch.optim`` step). The ratio is the median over rounds of the per-round
  ratio (both ran in the same round, so slow drifts of load cancel); the JSON also
  keeps the ratio of medians.
- **Peak memory.** Each contender in a separate process (``python -m benchmarks._common
  peak SPEC``): build the model and batch, record the baseline, run the contender
  twice, report the peak: the RSS high-water mark (``VmHWM``, reset before the
  runs where Linux allows) on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA. ``step`` memory is peak minus
  baseline (the model, batch and interpreter excluded); ratios use it.

Models are built from configs only (no downloads): GPT-2-shaped
(``GPT2LMHeadModel``), Llama-shaped (``LlamaForCausalLM``) and a token-wise MLP.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torch.utils import _pytree as pytree

import ghostfunc
from ghostfunc import _calibrate
from ghostfunc._compiled import load_inductor

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("2t2", "ghost", "materialize", "contract", "auto")
PEERS = ("naive loop", "vmap(grad)", "opacus")
#: ``train_step/2-secant``: the secant curvature, the state carried from call to call with one fixed
#: validation batch (its validation gradient is reused); ``-newval``: a different validation batch every call.
TRAIN = ("train_step/1", "train_step/2", "train_step/2-secant", "train_step/2-secant-newval")
BASELINES = ("plain", "plain+optim")

Step = Callable[[], Any]


# ----------------------------------------------------------------------------- shapes and models


@dataclass(frozen=True)
class Config:
    """One benchmark shape; JSON-serialisable (the peak-memory subprocess rebuilds it from this).

    ``model`` is ``"gpt2"``, ``"llama"`` or ``"mlp"`` (a token-wise MLP: ``d_in ->
    width -> width -> 1`` on ``[B, T, d_in]`` inputs, squared error per token).
    """

    model: str = "gpt2"
    T: int = 256
    width: int = 512
    layers: int = 4
    heads: int = 8
    vocab: int = 8192
    n_train: int = 8
    n_val: int = 8
    d_in: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def label(self) -> str:
        """A short description for tables."""
        if self.model == "mlp":
            return f"mlp d_in={self.d_in} width={self.width} T={self.T} n={self.n_train} m={self.n_val}"
        return (f"{self.model} L={self.layers} d={self.width} h={self.heads} V={self.vocab} "
                f"T={self.T} n={self.n_train} m={self.n_val}")


@dataclass
class Setup:
    """A built :class:`Config`: the module, ``params`` (name -> detached tensor), ``model_fn`` and batches.

    ``forward(call, batch) -> [B]`` gives per-sample losses given ``call``, something
    that runs the module (the module itself, a ``GradSampleModule``, or
    ``functional_call`` with explicit params); ``model_fn(params, batch)`` is
    ``forward`` over ``functional_call``, the function every ghostfunc contender gets.
    """

    config: Config
    model: nn.Module
    params: dict[str, Tensor]
    forward: Callable[[Callable[..., Any], Any], Tensor]
    model_fn: Callable[[dict[str, Tensor], Any], Tensor]
    train: Any
    val: Any
    both: Any  # [train; val] along the sample axis

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _lm_forward(call: Callable[..., Any], ids: Tensor) -> Tensor:
    """Causal-LM loss per sample: mean next-token cross-entropy ``[B]`` (explicit position ids)."""
    b, t = ids.shape
    position_ids = torch.arange(t, device=ids.device).expand(b, t)  # [B, T]: per-sample, as Opacus needs
    logits = call(ids, position_ids=position_ids, use_cache=False).logits[:, :-1]  # [B, T-1, V]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)  # [B]


def _mlp_forward(call: Callable[..., Any], batch: tuple[Tensor, Tensor]) -> Tensor:
    """Squared error per sample, averaged over its ``T`` tokens: ``[B]``."""
    x, y = batch  # [B, T, d_in], [B, T]
    return (call(x)[..., 0] - y).pow(2).mean(1)


def build(config: Config) -> Setup:
    """Build the model (from a config: nothing is downloaded), params and ``[train; val]`` batches."""
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    device = torch.device(config.device)
    n, m, t = config.n_train, config.n_val, config.T
    if config.model in ("gpt2", "llama"):
        model = _causal_lm(config)
        forward: Callable[[Callable[..., Any], Any], Tensor] = _lm_forward
        ids = torch.randint(0, config.vocab, (n + m, t), device=device)
        both: Any = ids
    elif config.model == "mlp":
        model = nn.Sequential(nn.Linear(config.d_in, config.width), nn.GELU(), nn.Linear(config.width, config.width),
                              nn.GELU(), nn.Linear(config.width, 1))
        forward = _mlp_forward
        both = (torch.randn(n + m, t, config.d_in, device=device, dtype=dtype),
                torch.randn(n + m, t, device=device, dtype=dtype))
    else:
        raise ValueError(f"unknown model {config.model!r}; expected gpt2, llama or mlp")
    model = model.to(device=device, dtype=dtype).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def model_fn(p: dict[str, Tensor], batch: Any) -> Tensor:
        return forward(lambda *a, **k: functional_call(model, p, a, k), batch)

    train = pytree.tree_map(lambda x: x[:n], both)
    val = pytree.tree_map(lambda x: x[n:], both)
    return Setup(config, model, params, forward, model_fn, train, val, both)


def _causal_lm(config: Config) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if config.model == "gpt2":
        gpt2 = GPT2Config(vocab_size=config.vocab, n_positions=config.T, n_embd=config.width, n_layer=config.layers,
                          n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0, pad_token_id=None)  # no pad id: no data-dependent check
        return GPT2LMHeadModel(gpt2)
    hidden = 64 * ((8 * config.width // 3 + 63) // 64)  # SwiGLU width, Llama's 8/3 rule rounded to 64
    llama = LlamaConfig(vocab_size=config.vocab, hidden_size=config.width, intermediate_size=hidden,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=max(1, config.heads // 2), max_position_embeddings=config.T,
                        attention_dropout=0.0, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return LlamaForCausalLM(llama)


# ----------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Options:
    """How contenders run: ``compute_dtype`` for graddot's kernels, the optimizer of the training steps."""

    compute_dtype: str | None = None
    optimizer: str = "sgd"
    lr: float = 1e-3


def baseline_of(name: str) -> str:
    """The baseline a contender's ratio is taken against."""
    return "plain+optim" if name.startswith("train_step") or name == "plain+optim" else "plain"


def available(names: Iterable[str]) -> list[str]:
    """``names`` minus the contenders this installation cannot run (no ``train_step`` yet, no Opacus)."""
    out = []
    for name in names:
        if name.startswith("train_step") and not hasattr(ghostfunc, "train_step"):
            continue
        if name == "opacus":
            try:
                import opacus  # noqa: F401
            except ImportError:
                continue
        out.append(name)
    return out


def make(name: str, s: Setup, opts: Options) -> Step:
    """A zero-argument callable that runs contender ``name`` once on ``s`` (all set-up done here)."""
    n = s.config.n_train
    if name == "plain":
        params = {k: v.detach().requires_grad_(True) for k, v in s.params.items()}
        leaves = list(params.values())

        def plain() -> Any:
            return torch.autograd.grad(s.model_fn(params, s.both).sum(), leaves)

        return plain
    if name == "plain+optim":
        params = {k: v.detach().clone().requires_grad_(True) for k, v in s.params.items()}
        leaves = list(params.values())
        opt = (torch.optim.SGD(leaves, lr=opts.lr) if opts.optimizer == "sgd"
               else torch.optim.AdamW(leaves, lr=opts.lr))

        def plain_optim() -> None:
            opt.zero_grad(set_to_none=True)
            s.model_fn(params, s.both).mean().backward()
            opt.step()

        return plain_optim
    if name == "plain/compiled":  # the plain step with its forward (and so its backward) compiled
        params = {k: v.detach().requires_grad_(True) for k, v in s.params.items()}
        leaves = list(params.values())
        load_inductor()
        total = torch.compile(lambda p, b: s.model_fn(p, b).sum(), dynamic=False)

        def plain_compiled() -> Any:
            return torch.autograd.grad(total(params, s.both), leaves)

        return _warm(plain_compiled)
    if name == "graddot/compiled":  # compile=True; warmed up here, past the compilation (seconds)
        def graddot_compiled() -> Any:
            return ghostfunc.graddot(s.model_fn, s.params, s.train, s.val, compile=True)

        return _warm(graddot_compiled)
    if name.startswith("graddot/"):
        policy = name.split("/", 1)[1]
        dtype = getattr(torch, opts.compute_dtype) if opts.compute_dtype else None
        if policy == "auto-measured":  # auto with cost constants measured on this machine (GHOSTFUNC_COSTS=measure)
            return with_env("GHOSTFUNC_COSTS", "measure",
                            lambda: ghostfunc.graddot(s.model_fn, s.params, s.train, s.val, compute_dtype=dtype))

        def graddot() -> Any:
            return ghostfunc.graddot(s.model_fn, s.params, s.train, s.val, policy=policy, compute_dtype=dtype)

        return _settled(graddot, s) if policy == "auto" else graddot
    if name.startswith("train_step/"):
        optimizer = ghostfunc.sgd(opts.lr) if opts.optimizer == "sgd" else ghostfunc.adamw(opts.lr)
        spec = name.split("/", 1)[1]  # "1", "2", "2-secant", "2-secant-newval"
        if "secant" in spec:
            return _secant_step(s, optimizer, new_val=spec.endswith("newval"))
        step = ghostfunc.train_step(s.model_fn, optimizer, order=int(spec))
        state = step.init(s.params)  # pure: the same state every call, the same work every call

        def train_step() -> Any:
            return step(state, s.train, s.val)

        return train_step
    if name == "hand/contract":
        return _hand_contract(s)
    if name == "naive loop":
        def naive() -> Any:
            return ghostfunc.reference_graddot(s.model_fn, s.params, s.train, s.val)

        return naive
    if name == "vmap(grad)":
        def one(p: dict[str, Tensor], sample: Any) -> Tensor:
            return s.model_fn(p, pytree.tree_map(lambda x: x.unsqueeze(0), sample))[0]

        per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))

        def vmap_grad() -> Tensor:
            with warnings.catch_warnings():  # CPU flash attention has no batching rule: functorch loops
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return dots(per_sample(s.params, s.both), n)

        return vmap_grad
    if name == "opacus":
        from opacus import GradSampleModule

        module = copy.deepcopy(s.model).train()  # Opacus records activations in training mode (dropout is 0)
        for p in module.parameters():
            p.requires_grad_(True)
        gsm = GradSampleModule(module, loss_reduction="sum", batch_first=True)
        named = list(module.named_parameters())

        def opacus_() -> Tensor:
            for _, p in named:
                p.grad = None
                p.grad_sample = None  # type: ignore[attr-defined]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                s.forward(gsm, s.both).sum().backward()
            return dots({k: getattr(p, "grad_sample") for k, p in named}, n)  # noqa: B009

        return opacus_
    raise ValueError(f"unknown contender {name!r}")


def _warm(fn: Step, calls: int = 4) -> Step:
    """``fn`` whose first call makes ``calls`` calls (a compiled contender compiles on one of its first calls):
    the compilation happens in the warm-up of :func:`measure`, in the contenders' order, so an ``auto`` race
    of the same model still runs where it would without this contender (in ``graddot/auto``'s warm-up)."""
    done = [False]

    def step() -> Any:
        if not done[0]:
            for _ in range(calls - 1):
                fn()
            done[0] = True
        return fn()

    return step


def _settled(fn: Step, s: Setup, most: int = 1000) -> Step:
    """``auto`` past its first-use tuning, as a training loop sees it after its first calls: the first call of
    ``fn`` races the routings and then calls on while the close ones take turns (a few dozen calls at most),
    so that the timed rounds see the routing kept. The plan's tuning line says what was timed."""
    done = [False]

    def step() -> Any:
        out = fn()
        calls = 0
        while not done[0] and _calibrate.TAKING_TURNS in ghostfunc.plan(s.model_fn, s.params, s.train, s.val).tuning:
            out, calls = fn(), calls + 1
            if calls > most:
                raise RuntimeError(f"auto still taking turns after {most} calls")
        done[0] = True
        return out

    return step


class _Linears(torch.overrides.TorchFunctionMode):
    """Records every ``F.linear``'s input, parameters and the gradient edge of its output (nothing else)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, Tensor | None, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            x, w, b = (*args, None)[:3] if len(args) >= 2 else (args[0], kwargs["weight"], kwargs.get("bias"))
            self.calls.append((x, w, b, torch.autograd.graph.get_gradient_edge(out)))
        return out


def _hand_contract(s: Setup) -> Step:
    """The token-wise MLP's ``graddot`` (val_reduce ``"mean"``) written by hand for this model alone: no
    checks, routing or verification, one forward over ``[train; val]`` under a mode that only notes the
    linear calls, one backward to their outputs, then per layer, on the rows flattened to ``[N·T, ·]``
    (plain matrix products, no graph, no batched ``matmul``), ``ḡ_val``, the train gradient and every
    row's ``Σ_t b_tᵀ ḡ_val a_t``: the floor of the interception method on this model (the same outputs
    as ``graddot``: scores, per-parameter scores, train gradient, losses)."""
    if s.config.model != "mlp":
        raise ValueError("hand/contract is written for the mlp model only")
    n, m = s.config.n_train, s.config.n_val
    leaves = {k: v.detach().requires_grad_(True) for k, v in s.params.items()}
    names = {id(v): k for k, v in leaves.items()}

    def hand() -> Any:
        mode = _Linears()
        with mode:
            losses = s.model_fn(leaves, s.both)
        outs = torch.autograd.grad(losses.sum(), [e for *_, e in mode.calls])
        per_param, train_grad = {}, {}
        for (x, w, b, _), g in zip(mode.calls, outs, strict=True):
            a, o = x.detach().flatten(0, -2), g.flatten(0, -2)  # [N·T, d], [N·T, p]
            k = a.shape[0] // (n + m) * n  # the training rows' tokens come first
            at, av, ot, ov = a[:k], a[k:], o[:k], o[k:]
            u = (ov.T @ av).div_(m)  # ḡ_val of the weight [p, d]
            train_grad[names[id(w)]] = (ot.T @ at).div_(n)
            per_param[names[id(w)]] = (ot @ u).mul_(at).sum(1).view(n, -1).sum(1)
            if b is not None:
                bt = ot.view(n, -1, ot.shape[-1]).sum(1)  # per-sample bias gradients [n, p]
                train_grad[names[id(b)]] = bt.mean(0)
                per_param[names[id(b)]] = bt @ ov.sum(0).div_(m)
        return torch.stack(list(per_param.values())).sum(0), per_param, train_grad, losses.detach()

    return hand


def with_env(name: str, value: str, fn: Step) -> Step:
    """``fn`` run with the environment variable ``name`` set to ``value``, the environment restored."""
    def step() -> Any:
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return step


def _secant_step(s: Setup, optimizer: Any, new_val: bool) -> Step:
    """``train_step(order=2, curvature="secant")`` as a training loop runs it: each call continues from
    the previous call's state, on the fixed validation batch or (``new_val``) alternating between two."""
    step = ghostfunc.train_step(s.model_fn, optimizer, order=2, curvature="secant")
    other = pytree.tree_map(lambda x: x.roll(1, 0) if x.shape[0] > 1 else x.flip(-1), s.val)  # other rows
    vals = [s.val, other] if new_val else [s.val]
    carried = [step.init(s.params), 0]

    def secant_step() -> Any:
        state, calls = carried
        carried[0], info = step(state, s.train, vals[calls % len(vals)])
        carried[1] = calls + 1
        return info

    return secant_step


def dots(per_sample: Mapping[str, Tensor], n: int) -> Tensor:
    """``<g_i, mean_v g_v>`` from per-sample gradients ``{name: [n + m, *shape]}``: ``[n]``."""
    out = None
    for g in per_sample.values():
        flat = g.flatten(1)  # [n + m, P]
        part = flat[:n] @ flat[n:].mean(0)
        out = part if out is None else out + part
    assert out is not None
    return out


def per_sample_bytes(s: Setup) -> int:
    """Memory that per-sample gradients of every row would take (vmap(grad), Opacus)."""
    rows = s.config.n_train + s.config.n_val
    return rows * sum(v.numel() * v.element_size() for v in s.params.values())


def fits(name: str, s: Setup, budget: float) -> bool:
    """Whether a per-sample-gradient peer's gradients fit in ``budget`` bytes (others always fit)."""
    return name not in ("vmap(grad)", "opacus") or 2 * per_sample_bytes(s) < budget


def memory_budget(device: torch.device) -> float:
    """Bytes a contender may use: free device memory (CUDA) or available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``--clock``: wall-clock seconds, or this process's CPU seconds (``time.process_time``, with one torch
#: thread), which other processes' load disturbs far less: the clock for kernel choices on a shared machine.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Step, device: torch.device, clock: Callable[[], float] = time.perf_counter, repeat: int = 1) -> float:
    """Seconds one call takes, averaged over ``repeat`` back-to-back calls (synchronised on CUDA; no garbage
    collection inside)."""
    gc.collect()
    sync(device)
    t0 = clock()
    for _ in range(repeat):
        fn()
    sync(device)
    return (clock() - t0) / repeat


#: A timed sample lasts at least this long: shorter steps run back to back, as in a training loop
#: (one cold call after a garbage collection measures cache misses, not the step).
MIN_SAMPLE_S = 0.02


def measure(fns: Mapping[str, Step], device: torch.device, *, warmup: int = 1, rounds: int = 5,
            max_seconds: float = 60.0, clock: str = "wall", min_sample: float = MIN_SAMPLE_S) -> dict[str, list[float]]:
    """Warm every contender up, then run ``rounds`` rounds in rotated order; seconds per run.

    A contender faster than ``min_sample`` seconds runs that long back to back in each round (per-call mean).

    A contender whose warm-up call took longer than ``max_seconds`` runs once more only.
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    once = set()
    repeat = dict.fromkeys(names, 1)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for k in names:
            for _ in range(warmup):
                if timed(fns[k], device, CLOCKS[clock]) > max_seconds:
                    once.add(k)
                    break
            else:  # a warm call sets how many calls a sample takes (the first may have paid one-time costs)
                took = timed(fns[k], device, CLOCKS[clock])
                repeat[k] = max(1, min(1000, int(min_sample / max(took, 1e-7))))
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                if k in once and times[k]:
                    continue
                times[k].append(timed(fns[k], device, CLOCKS[clock], repeat[k]))
    finally:
        if enabled:
            gc.enable()
    return times


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure`'s options from :func:`add_common_args`'s arguments."""
    return dict(warmup=args.warmup, rounds=args.rounds, max_seconds=args.max_seconds, clock=args.clock,
                min_sample=args.min_sample)


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / base[r]``: each pair ran in the same round, close in time,
    so a drift of machine load cancels (the ratio of medians when a contender ran once)."""
    if len(times) != len(base):
        return statistics.median(times) / statistics.median(base)
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def paired_range(times: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """Min and max over rounds of ``times[r] / base[r]`` (the spread behind :func:`paired_ratio`)."""
    if len(times) != len(base):
        r = statistics.median(times) / statistics.median(base)
        return r, r
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    return min(ratios), max(ratios)


def summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times),
            "times": list(times)}


# ----------------------------------------------------------------------------- peak memory


def peak_here(fn: Step, device: torch.device) -> dict[str, float]:
    """Peak memory (MiB) of two calls of ``fn`` in this process, and the baseline before them."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import psutil

        base = psutil.Process().memory_info().rss
        _reset_peak_rss()
        fn()
        fn()
        peak = _peak_rss()
    mib = 1 << 20
    return {"base_mib": base / mib, "peak_mib": peak / mib, "step_mib": (peak - base) / mib}


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """This process's RSS high-water mark in bytes.

    ``VmHWM`` from ``/proc/self/status`` belongs to this process's own address space;
    ``ru_maxrss`` (the fallback off Linux) also counts the parent's RSS at ``fork``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(name: str, config: Config, opts: Options, *, threads: int | None = None,
                timeout: float = 1800.0) -> dict[str, Any]:
    """Peak memory of contender ``name`` measured in a fresh process (see :func:`peak_here`)."""
    spec = json.dumps({"config": dataclasses.asdict(config), "options": dataclasses.asdict(opts),
                       "contender": name, "threads": threads})
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks._common", "peak", spec], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def _peak_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    s = build(Config(**spec["config"]))
    fn = make(spec["contender"], s, Options(**spec["options"]))
    print(json.dumps(peak_here(fn, s.device)))


# ----------------------------------------------------------------------------- command line and output


def add_common_args(parser: argparse.ArgumentParser, defaults: Config, memory: str = "all") -> None:
    """Arguments every script takes; defaults from ``defaults`` (the script's headline shape)."""
    g = parser.add_argument_group("shape")
    g.add_argument("--model", default=defaults.model, choices=("gpt2", "llama", "mlp"))
    g.add_argument("--T", type=int, default=defaults.T, help="tokens per sample")
    g.add_argument("--width", type=int, default=defaults.width)
    g.add_argument("--layers", type=int, default=defaults.layers)
    g.add_argument("--heads", type=int, default=defaults.heads)
    g.add_argument("--vocab", type=int, default=defaults.vocab)
    g.add_argument("--n-train", type=int, default=defaults.n_train)
    g.add_argument("--n-val", type=int, default=defaults.n_val)
    g.add_argument("--seed", type=int, default=defaults.seed)
    r = parser.add_argument_group("run")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
                   help="dtype of the model and data (bfloat16 is meant for CUDA)")
    r.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float16"),
                   help="graddot's opt-in lower-precision kernel products (default: exact, the params' dtype)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="wall: elapsed seconds; cpu: this process's CPU seconds on one torch thread (far less "
                        "disturbed by other processes on a shared machine)")
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--min-sample", type=float, default=MIN_SAMPLE_S,
                   help="a contender faster than this many seconds per call runs back to back for about this "
                        "long in each round (one sample: the mean per call)")
    r.add_argument("--max-seconds", type=float, default=60.0,
                   help="a contender slower than this per call runs once after its warm-up")
    r.add_argument("--memory", default=memory, choices=("all", "key", "none"),
                   help="peak memory (one subprocess per contender) of all contenders, of the key ones "
                        "(plain and graddot/auto) or of none")
    r.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON, markdown and PNG")
    r.add_argument("--tiny", action="store_true", help="a tiny shape, one round: the smoke test")


def config_from_args(args: argparse.Namespace, **override: Any) -> Config:
    """The :class:`Config` the arguments describe (``override`` wins)."""
    fields = dict(model=args.model, T=args.T, width=args.width, layers=args.layers, heads=args.heads,
                  vocab=args.vocab, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                  device=resolve_device(args.device), dtype=args.dtype)
    fields.update(override)
    return Config(**fields)


def tiny(args: argparse.Namespace) -> None:
    """Shrink the run for ``--tiny``: a small shape, one warm-up call, one round, key memory only."""
    args.T, args.width, args.layers, args.heads, args.vocab = min(args.T, 16), 32, 1, 2, 64
    args.n_train, args.n_val = min(args.n_train, 3), min(args.n_val, 2)
    args.warmup, args.rounds = 1, 1
    args.min_sample = min(args.min_sample, MIN_SAMPLE_S)
    if args.memory == "all":
        args.memory = "key"


def memory_of(names: Sequence[str], which: str) -> list[str]:
    """The contenders whose peak memory ``--memory which`` asks for."""
    if which == "none":
        return []
    return list(names) if which == "all" else [k for k in names if k in ("plain", "graddot/auto")]


def setup_threads(args: argparse.Namespace) -> None:
    if getattr(args, "clock", "wall") == "cpu":
        if args.device not in ("cpu", "auto") or resolve_device(args.device) != "cpu":
            raise SystemExit("--clock cpu times CPU runs only")
        args.threads = 1  # process time of one thread: what the call itself spent
    if args.threads:
        torch.set_num_threads(args.threads)


def machine() -> dict[str, Any]:
    """Where the numbers came from, with the load at the time (a busy machine makes them provisional)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None, "cpu_seconds": _cpu_seconds(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the whole machine and by this process (with its finished children)."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return {"machine": sum(t) - idle, "own": own.user + own.system + own.children_user + own.children_system,
            "wall": time.time()}


def other_load(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Cores that other processes kept busy on average between two :func:`machine` snapshots."""
    a, b = before.get("cpu_seconds"), after.get("cpu_seconds")
    if not a or not b or b["wall"] <= a["wall"]:
        return None
    return max(0.0, ((b["machine"] - a["machine"]) - (b["own"] - a["own"])) / (b["wall"] - a["wall"]))


def busy(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether other processes competed for the CPU: on average more than a quarter of a core
    between the two snapshots (this process and its peak-memory subprocesses excluded)."""
    load = other_load(before, after)
    return load is not None and load > 0.25


def describe_machine(info: dict[str, Any], provisional: bool) -> str:
    """One line for a table caption."""
    dev = info.get("cuda_device") or f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    if info.get("clock") == "cpu":
        dev += ", CPU-time clock (process_time)"
    note = (" — PROVISIONAL: other processes kept the CPU busy during the run "
            f"({info.get('other_cores') or 0:.2f} cores on average)") if provisional else ""
    return f"{dev}; torch {info['torch']}{note}"


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) with ``columns`` in order; floats get 3 significant digits
    (whole numbers from 100 up)."""
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(stem: str, out: Path, payload: dict[str, Any], table: str) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths[1].write_text(table + "\n")
    return paths


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, save (PNG, 120 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(stem: str, out: Path, payload: dict[str, Any], text: str,
           figure: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """Print the table, write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` with ``figure``)
    under ``out``, and say where."""
    print(text)
    paths = write(stem, out, payload, text)
    if figure is not None:
        paths.append(out / f"{stem}.png")
        figure(payload, paths[-1])
    print("\nwrote", ", ".join(str(p) for p in paths))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


if __name__ == "__main__":  # python -m benchmarks._common peak SPEC: the peak-memory subprocess
    if len(sys.argv) == 3 and sys.argv[1] == "peak":
        _peak_main(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks._common peak '<json spec>'")
