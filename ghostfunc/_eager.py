"""The way out for models the batched capture cannot transform: one sample at a time, ordinary autograd.

The batched capture runs ``model_fn`` under ``vmap`` inside ``vjp``. Some models
cannot run there: ops without a batching rule (``nn.LSTM``), data-dependent shapes
(``nonzero`` in mixture-of-experts routing), ``autograd.Function`` without
``setup_context`` (re-entrant ``torch.utils.checkpoint``), saved-tensor hooks
(non-re-entrant checkpoint), ``requires_grad_`` / ``torch.autograd.grad`` inside
the model, a ``vmap`` inside the model. Every one of them runs in plain PyTorch,
and the single-sample loop defines the answer, so here each sample runs alone
with ordinary autograd:

- recognised calls on kernel parameters still get a tap (a zero leaf added to
  their output, created as the call happens) and keep their saved inputs, so
  those parameters keep their factored or direct per-sample gradients and every
  kernel still applies;
- every other parameter is a leaf that requires grad: its gradient is exact;
- a model that calls ``torch.autograd.grad`` (or ``backward``) itself also uses its
  parameters inside a backward graph, where no tap can see them: every parameter
  is then a leaf (the trace says so and the plan routes all of them to the fallback).

Checkpointed segments (re-entrant or not) run as if not checkpointed (exact, no
memory saving): see ``_capture._without_checkpoint`` and ``_capture._ReentrantAsPlain``.
Cost: one forward and one backward per sample (the loop's), exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ._capture import (
    CHECKPOINT_NOTE,
    GRAD_FN,
    REQUIRES_GRAD,
    Batch,
    Half,
    ModelFn,
    Site,
    Trace,
    _check_finite,
    _in_dtype,
    _Interceptor,
    _name,
    _one_loss,
    _rephrase,
    _Stale,
    cached_trace,
    dense,
    on_batch,
    reads_autograd_state,
    refuse_rewritten,
)
from ._draws import fork_rng
from ._groups import Part, merge_halves
from ._ops import Direct, Factored, Rule

#: Calls by which a model runs a backward pass of its own, or differentiates in forward mode (a dual tensor of
#: ``torch.autograd.forward_ad``: what a tapped call computes on its tangent, which also depends on the parameters,
#: no tap sees; an input-Jacobian penalty so was 0.78 off the loop).
_AUTOGRAD = (torch.autograd.grad, torch.autograd.backward, Tensor.backward, torch._make_dual)


def unbatchable(err: BaseException) -> bool:
    """Whether an error from the batched capture may be a limit of ``vmap``/``vjp`` (then the
    per-sample path runs; a genuine mistake in the model fails there too and is raised from there)."""
    return isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError)


def summary(err: BaseException) -> str:
    """The first line of an error, short enough for a plan."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 140 else text[:137] + "..."


class _EagerInterceptor(_Interceptor):
    """The interceptor outside ``vmap``: taps are created as recognised calls happen.

    ``made`` holds the taps in order; ``autograd_calls`` names the model's own backward calls.
    """

    follow_branches = False  # no vmap: each sample takes its own branch
    batched = False  # reads of requires_grad and gradient hooks act as in a plain run (below)

    def __init__(self, names: dict[int, str], tracing: bool) -> None:
        super().__init__(names, None if tracing else ())
        self.made: list[Tensor] = []
        self.autograd_calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in _AUTOGRAD:
            self.autograd_calls.append("torch.autograd.forward_ad.make_dual" if func is torch._make_dual else _name(func))
        elif getattr(func, "__self__", None) is GRAD_FN and args and id(args[0]) not in self.names:
            # an activation's autograd node (a hook on it, a branch on its kind): a tapped call's output would
            # show the tap's addition instead, so no call is tapped (every parameter a leaf, as plainly)
            self.autograd_calls.append("Tensor.grad_fn")
        elif reads_autograd_state(func) and args and id(args[0]) in self.names:
            name = self.names[id(args[0])]
            if self.taps is None:  # tracing: the parameter (a leaf here) takes the leaf path in the capture too,
                self.other_uses.setdefault(name, _name(func))  # hooks and all
            elif func is Tensor.register_hook:  # a sample the trace did not show hooks a recognised parameter
                raise _Stale(f"a gradient hook on {name} for a sample other than the first (traced) one")
            elif getattr(func, "__self__", None) is REQUIRES_GRAD:  # a recognised parameter is no leaf in the
                return True  # capture: it reads as the trace's leaf did (grad_fn and is_leaf read as a leaf's)
        return super().__torch_function__(func, types, args, kwargs)

    def _rule(self, func: Any) -> Rule | None:
        """No rule inside a transform the model runs itself (its saved inputs would not outlive it), nor with
        gradients off (the capture turns them on): inside an ``autograd.Function``'s ``forward``, whose own
        ``backward`` gives the parameter its gradient and never reaches a tap, or a ``no_grad`` block; nor
        under saved-tensor hooks of the model's or the caller's (``saved_tensors_hooks`` that compress or change
        what the backward reads, ``allow_mutation_on_saved_tensors``: a kernel would read the forward's
        tensors instead). The parameter is then used by an unrecognised call: the exact leaf path."""
        if torch._C._functorch.maybe_current_level() is not None or not torch.is_grad_enabled() \
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return None
        return super()._rule(func)

    def _tap(self, site: Site, out: Tensor) -> Tensor:
        tap = torch.zeros(out.shape, dtype=out.dtype, device=out.device, requires_grad=True)
        self.made.append(tap)
        self.sites.append(site)
        return tap


def trace_eager(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, where: str, fresh: bool) -> Trace:
    """The trace of the first sample run alone, without ``vmap`` (gradients on, as the model may need them).

    A model that runs a backward pass of its own has every parameter marked as
    used by that call (so all take the exact leaf path).
    """

    def compute() -> Trace:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}  # a model may differentiate them
        mode = _EagerInterceptor({id(v): k for k, v in leaves.items()}, tracing=True)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with fork_rng(devices), torch.enable_grad(), _rephrase(where), mode:
            _one_loss(model_fn(dict(leaves), batch.rebuild([t[:1] for t in batch.tensors])), where)
        other = dict(mode.other_uses)
        if mode.autograd_calls:
            call = f"{mode.autograd_calls[0]} inside model_fn (taps cannot see a backward graph)"
            other = dict.fromkeys(params, call)
        return Trace(tuple(mode.sites), other, CHECKPOINT_NOTE if mode.lifted_checkpoint else ())

    return cached_trace(model_fn, params, batch, "eager", fresh, compute)


def capture_eager(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, kernel: set[str], where: str,
                  label: str) -> Half:
    """Every sample of ``batch`` alone: a forward and an ordinary backward each, merged in order."""
    halves = []
    for i in range(batch.size):
        with on_batch(where, f"{label} sample {i} (run alone)"):
            halves.append(_capture_sample(model_fn, params, batch, i, kernel, where))
    parts = [Part(torch.tensor([i]), (i,)) for i in range(batch.size)]
    merged = merge_halves(halves, parts, batch.size)
    _check_finite(merged.loss, label, where)
    return merged


def _capture_sample(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, i: int, kernel: set[str],
                    where: str) -> Half:
    names = {id(params[k]): k for k in kernel}
    leaves = {k: params[k].detach().requires_grad_() for k in params if k not in kernel}
    mode = _EagerInterceptor(names, tracing=False)
    with torch.enable_grad(), _rephrase(where), mode:
        loss = _one_loss(model_fn({**params, **leaves}, batch.rebuild([t[i:i + 1] for t in batch.tensors])), where)
        refuse_rewritten(mode.versions, where)
        if mode.autograd_calls and kernel:
            raise _Stale(f"{mode.autograd_calls[0]} inside model_fn")
        if not torch.isfinite(loss):  # named by the caller
            return Half(loss.detach().reshape(1), {k: [] for k in params})
        grads, taps = _backward(loss, mode, list(leaves.values()))
    tap_grads, leaf_grads = grads[:len(taps)], grads[len(taps):]
    out: dict[str, list[Factored | Direct]] = {k: [] for k in params}
    at = 0
    for site, (static, count), tap, g in zip(mode.sites, mode.statics, taps, tap_grads, strict=False):
        saved = tuple(s.detach().unsqueeze(0) for s in mode.saved[at:at + count])  # [1, ...] per sample
        at += count
        b = (torch.zeros_like(tap) if g is None else g).unsqueeze(0)
        for role, name in site.roles:
            out[name].append(_in_dtype(site.rule.grad(static, saved, b, role, params[name].shape), params[name].dtype))
    for (k, leaf), g in zip(leaves.items(), leaf_grads, strict=True):
        out[k].append(Direct((torch.zeros_like(leaf) if g is None else dense(g)).unsqueeze(0)))
    return Half(loss.detach().reshape(1), out)


def _backward(loss: Tensor, mode: _EagerInterceptor, leaves: list[Tensor]) -> tuple[list, list[Tensor]]:
    """Gradients of ``loss`` for the taps made so far and ``leaves`` (``None`` where none flowed).

    Returns ``(grads, taps)``: the gradients of ``taps`` then of ``leaves``.
    """
    taps = list(mode.made)
    if not taps and not leaves:
        return [], []
    return list(torch.autograd.grad(loss, [*taps, *leaves], allow_unused=True)), taps


def _each_sample(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, where: str,
                 label: str) -> Iterator[tuple[int, dict[str, Tensor], Tensor]]:
    """``(i, leaves, loss)`` per sample: fresh leaf params and the sample's loss, computed with
    gradients on (the interceptor active); the caller's backward runs inside."""
    for i in range(batch.size):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        mode = _EagerInterceptor({}, tracing=True)
        with torch.enable_grad(), _rephrase(where), mode:
            with on_batch(where, f"{label} sample {i} (run alone)"):
                loss = _one_loss(model_fn(dict(leaves), batch.rebuild([t[i:i + 1] for t in batch.tensors])), where)
            yield i, leaves, loss


def weighted_grad_eager(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, weights: Tensor,
                        where: str, label: str) -> tuple[dict[str, Tensor], Tensor]:
    """``Σ_v w_v g_v`` and the losses ``[B]``, one sample at a time with ordinary autograd."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = []
    for i, leaves, loss in _each_sample(model_fn, params, batch, where, label):
        losses.append(loss.detach())
        if torch.isfinite(loss):
            grads = torch.autograd.grad(loss * weights[i].to(loss.dtype), list(leaves.values()), allow_unused=True)
            for k, g in zip(leaves, grads, strict=True):
                if g is not None:
                    total[k] += g
    out = torch.stack(losses)
    _check_finite(out, label, where)
    return total, out


def val_grad_hvp_eager(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, weights: Tensor,
                       vector: Mapping[str, Tensor], where: str) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """``Σ_v w_v g_v``, ``H·vector`` (``H`` the Hessian of ``Σ_v w_v ℓ_v``) and the losses ``[B]``,
    one sample at a time: a backward with ``create_graph`` and a second backward of ``<g_v, vector>``."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    hv_total = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = []
    for i, leaves, loss in _each_sample(model_fn, params, batch, where, "val"):
        losses.append(loss.detach())
        if not torch.isfinite(loss):
            continue
        grads = torch.autograd.grad(loss * weights[i].to(loss.dtype), list(leaves.values()), create_graph=True,
                                    allow_unused=True)
        dot = sum(((g * vector[k].to(g.dtype)).sum() for k, g in zip(leaves, grads, strict=True) if g is not None),
                  loss.new_zeros(()))
        hvs = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True) if dot.requires_grad else None
        for j, (k, g) in enumerate(zip(leaves, grads, strict=True)):
            if g is not None:
                total[k] += g.detach()
            if hvs is not None and hvs[j] is not None:
                hv_total[k] += hvs[j]
    out = torch.stack(losses)
    _check_finite(out, "val", where)
    return total, hv_total, out
