"""``unroll``: the exact derivative of the final validation loss with respect to every training sample's weight.

A run ``θ_{t+1}, s_{t+1} = update(g_t, s_t, θ_t)`` with the step-``t`` batch loss
``(1/n)·Σ_i w_i·ℓ(θ_t; z_i)`` (so ``g_t = (1/n)·Σ_i w_i·g_i(θ_t)``, all ``w_i = 1``)
ends at ``θ_T``; the value of sample ``i`` is ``∂L_val(θ_T)/∂w_i``, summed over the
steps whose batch held it. Reverse-mode through the run, one step at a time: with
the adjoint ``λ_θ_T = ∇L_val(θ_T)``, ``λ_s_T = 0`` and, going back,

    (ḡ, s̄, θ̄) = vjp of update at (g_t, s_t, θ_t) applied to (λ_θ_{t+1}, λ_s_{t+1})
    value_i  += (1/n)·<g_i(θ_t), ḡ>                       (a row's share of the step)
    λ_θ_t     = θ̄ + H_t·ḡ,   λ_s_t = s̄                    (H_t: Hessian of step t's batch loss)

This is exact for any optimizer whose ``update`` torch.func can differentiate:
SGD (momentum, dampening, Nesterov, weight decay) and AdamW, including the
preconditioner's dependence on the gradient. For plain SGD ``ḡ = −η·λ_θ_{t+1}`` and
the recursion is DESIGN §7's ``v_t = v_{t+1} − η·H_t v_{t+1}``.

Per step, ``H_t·ḡ`` and every row's share come from **one double backward**:
with ``G(θ, w) = ∇_θ (1/n)·Σ_i w_i·ℓ_i(θ)`` (the step's gradient, computed with its
graph kept when the segment is recomputed), the vjp of ``G`` along ``ḡ`` is
``(H_t·ḡ, [(1/n)·<g_i, ḡ>]_i)``: the Hessian-vector product and all the rows'
gradient dot products with ``ḡ``, with no per-sample gradient formed
(``via="hvp"``, the default). ``via="kernels"`` takes the rows' ``<g_i, ḡ>`` from
:func:`ghostfunc.graddot_direction` instead (a tap capture and the
contract/materialise kernels): the same numbers, one more pass per step.
(A forward-over-reverse ``jvp`` gives the same two at once, but ran slower here on
CPU: torch's forward-mode rules for backward ops go through Python decompositions.)

Memory: parameters and optimizer state are kept every ``k`` steps (checkpointing
over training); going backward, each segment of ``k`` steps is recomputed from its
checkpoint, so a run of ``T`` steps holds ``O(T/k + k)`` parameter copies, not
``T``, plus the recomputed segment's ``k`` gradient graphs (activations).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from ._capture import Batch, _check_finite, _rephrase, dense, per_sample_losses, second_derivative, tensor_leaves
from ._checks import check_batch, check_model_fn, check_params, describe_batch, keys_sorted
from ._direction import graddot_direction
from ._graddot import score_dtype
from ._interact import check_model, check_state_writes, grads_on
from ._optim import Grads, Optimizer
from ._train import TrainState
from ._values import DataValues, RecordingError, as_tensor, is_indices, read_saved, tensor_kind

Params = dict[str, Tensor]
VIAS = ("hvp", "kernels")


class Step(NamedTuple):
    """The primal of one step, recomputed in the backward sweep: ``θ_t``, ``s_t`` and the mean gradient ``g_t``
    (``None`` for a parameter the batch's loss does not reach: the update leaves it, as in the run)."""

    params: Params
    state: Any
    grad: Grads


# ---------------------------------------------------------------- one step, forward and backward


def mean_and_losses(losses_of: Callable[[Params], Tensor]) -> Callable[[Params], tuple[Tensor, Tensor]]:
    """``θ -> (mean_i ℓ_i(θ), ℓ(θ))``: the batch loss, with the per-sample losses as auxiliary output."""

    def mean_loss(p: Params) -> tuple[Tensor, Tensor]:
        losses = losses_of(p)
        return losses.mean(), losses

    return mean_loss


def batch_losses(model_fn: Callable, batch: Batch, where: str) -> Callable[[Params], Tensor]:
    """``θ -> model_fn(θ, batch)``, checked to be ``[B]``: the rows' losses as the step's batch loss sees them."""
    whole = batch.rebuild(batch.tensors)

    def losses(p: Params) -> Tensor:
        out = model_fn(dict(p), whole)
        if not isinstance(out, Tensor) or out.shape != (batch.size,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{where}: model_fn must return one loss per row, shape ({batch.size},); got {got}")
        if not out.is_floating_point():  # (as graddot: a mean or a gradient of integers has no meaning)
            raise ValueError(f"{where}: model_fn must return floating-point losses, got {out.dtype}")
        return out

    return losses


def mean_grad(model_fn: Callable, params: Params, batch: Batch, where: str) -> Grads:
    """``∇ mean_i ℓ_i(θ)``: the gradient step ``t``'s update uses (one ordinary backward over the batch);
    ``None`` for a parameter the loss does not reach (torch.optim's ``.grad is None``: the update, as
    :func:`ghostfunc.train_step`'s, leaves it)."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad(), _rephrase(where):
        losses = batch_losses(model_fn, batch, where)(leaves)
        _check_finite(losses.detach(), "train", where)
        grads = torch.autograd.grad(losses.mean(), list(leaves.values()), allow_unused=True)
    return {k: None if g is None else dense(g) for k, g in zip(leaves, grads, strict=True)}


def grad_pullback(model_fn: Callable, params: Params, batch: Batch,
                  where: str) -> tuple[Grads, Callable[[Params], tuple[Params, Tensor]]]:
    """``g = ∇_θ (1/n)·Σ_i w_i·ℓ_i(θ)`` at ``w = 1``, and its pullback ``v -> (H·v, [(1/n)·<g_i, v>]_i)``.

    The gradient by one backward with its graph kept (what the step's update needs;
    plain autograd, measured a third cheaper than ``torch.func.vjp`` here), then, per
    direction ``v`` (also under ``vmap``), one double backward that gives the Hessian-vector product (``∂<g, v>/∂θ``, ``H`` the
    Hessian of the batch's mean loss) and every row's share of the step
    (``∂<g, v>/∂w_i = (1/n)·<g_i, v>``, ``g_i`` row ``i``'s gradient as the batch
    computes it: exact for the weighted batch loss even where rows interact).
    """
    losses_of = batch_losses(model_fn, batch, where)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    ref = next(iter(params.values()))  # (the rows' shares in the widest dtype: the first one's rounded them)
    w = torch.ones(batch.size, dtype=score_dtype(params), device=ref.device, requires_grad=True)
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), _rephrase(where):
        losses = losses_of(leaves)
        _check_finite(losses.detach(), "train", where)
        grads = torch.autograd.grad((w * losses).mean(), list(leaves.values()), create_graph=True,
                                    allow_unused=True)  # None: the loss does not reach it (left by the update)
    g = dict(zip(leaves, grads, strict=True))
    # a gradient that does not depend on θ or w adds nothing
    live = [k for k in leaves if (x := g[k]) is not None and x.requires_grad]

    def pullback(v: Params) -> tuple[Params, Tensor]:
        with second_derivative(where, "the replay differentiates each step's gradient (a Hessian-vector product per "
                                      "step)", "build the model without that call (F.embedding_bag: "
                                               "F.embedding and a sum or mean over the bag)"):
            out = torch.autograd.grad([g[k] for k in live], [*leaves.values(), w],
                                      grad_outputs=[v[k] for k in live], retain_graph=True, materialize_grads=True)
        return dict(zip(leaves, out[:-1], strict=True)), out[-1]

    return {k: None if x is None else x.detach() for k, x in g.items()}, pullback


def _state_tensors(state: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensor leaves of an optimizer state and a function that puts new ones back."""
    return tensor_leaves(*pytree.tree_flatten(state))


def update_vjp(optimizer: Optimizer, step: Step) -> tuple[Params, list[Tensor], Callable]:
    """``θ_{t+1}``, the tensors of ``s_{t+1}``, and the pullback ``(λ_θ, λ_s) -> (ḡ, s̄, θ̄)`` of the update
    (``ḡ`` is 0 for a parameter the batch's loss does not reach: the update did not read a gradient there)."""
    tensors, rebuild = _state_tensors(step.state)
    present = {k: g for k, g in step.grad.items() if g is not None}

    def update(g: Params, s: list[Tensor], p: Params) -> tuple[Params, list[Tensor]]:
        new_params, new_state = optimizer.update({k: g.get(k) for k in step.grad}, rebuild(s), p)
        return new_params, _state_tensors(new_state)[0]

    (new_params, new_state), pull = torch.func.vjp(update, present, tensors, step.params)  # type: ignore[misc]
    if len(present) == len(step.grad):
        return new_params, new_state, pull

    def pullback(cotangents: Any) -> tuple[Params, Any, Params]:
        g_bar, s_bar, p_bar = pull(cotangents)
        return {k: g_bar[k] if k in g_bar else torch.zeros_like(p_bar[k]) for k in step.grad}, s_bar, p_bar

    return new_params, new_state, pullback


def check_differentiable(optimizer: Optimizer, step: Step, where: str) -> None:
    """Every floating tensor ``update`` returns must depend on its inputs (no ``detach``, no ``no_grad``).

    Each new parameter must reach its gradient, each new state tensor something. And an output whose value
    moves with the parameters, or with the old state tensors that carry gradients (a momentum buffer: its new
    value reaches the gradients; not a step counter), must have an autograd path to them: a ``detach`` of one
    input only (``m.detach() * mu + g``, ``x.detach() - lr * b``) kept the values moving and cut their
    adjoint (0.83-0.89 off). Judged by inputs taken together (the parameters; those state tensors), each
    moved once: a detach of some of them next to a path to others is not seen."""
    tensors, rebuild = _state_tensors(step.state)
    leaf = lambda t: t.detach().requires_grad_() if t.is_floating_point() else t  # noqa: E731
    grads = {k: None if v is None else leaf(v) for k, v in step.grad.items()}
    state_in = [leaf(t) for t in tensors]
    params_in = {k: leaf(v) for k, v in step.params.items()}

    def refuse(what: str, inputs: str) -> None:
        raise TypeError(f"{where}: optimizer {optimizer.name!r} cannot be differentiated through: its update "
                        f"returns {what} detached from {inputs} (a .detach() or torch.no_grad() inside "
                        "update); the replay needs an update differentiable in grads, state and params")

    with torch.enable_grad():
        new_params, new_state = optimizer.update(grads, rebuild(state_in), params_in)
        new_tensors = _state_tensors(new_state)[0]
        outs = [(f"new params[{k!r}]", v) for k, v in new_params.items()]
        outs += [(f"new state leaf {i}", t) for i, t in enumerate(new_tensors)]
        for k, t in new_params.items():
            g = grads.get(k)
            if t.is_floating_point() and g is not None and not _reaches(t, [g]):
                refuse(f"new params[{k!r}]", "its inputs")
        for i, t in enumerate(new_tensors):
            if t.is_floating_point() and not t.requires_grad:
                refuse(f"new state leaf {i}", "its inputs")
        given = [g for g in grads.values() if g is not None and g.is_floating_point()]
        carry = [i for i, (a, b) in enumerate(zip(tensors, new_tensors, strict=False))
                 if a.is_floating_point() and a.shape == b.shape and _reaches(b, given)]
        groups = [("the parameters", [k for k, v in params_in.items() if v.is_floating_point()], []),
                  ("the old optimizer state", [], carry)]
        for inputs, names, slots in groups:
            if not names and not slots:
                continue
            moved_p = {k: _nudged(v) if k in names else v.detach() for k, v in params_in.items()}
            moved_s = [_nudged(t) if i in slots else t.detach() for i, t in enumerate(state_in)]
            with torch.no_grad():
                p2, s2 = optimizer.update({k: None if g is None else g.detach() for k, g in grads.items()},
                                          rebuild(moved_s), moved_p)
            after = [*p2.values(), *_state_tensors(s2)[0]]
            sources = [params_in[k] for k in names] + [state_in[i] for i in slots]
            for (what, t), a in zip(outs, after, strict=False):
                if (t.is_floating_point() and a.shape == t.shape and bool(torch.isfinite(a).all())
                        and not torch.equal(a, t.detach()) and not _reaches(t, sources)):
                    refuse(what, inputs)


def _reaches(t: Tensor, inputs: list[Tensor]) -> bool:
    """Whether ``t`` has an autograd path to any of ``inputs``."""
    if not t.requires_grad or not inputs:
        return False
    return any(g is not None for g in torch.autograd.grad(t.sum(), inputs, allow_unused=True, retain_graph=True))


def _nudged(t: Tensor) -> Tensor:
    """``t`` moved by a quarter of itself and a little more (a non-negative state stays non-negative)."""
    return t.detach() * 1.25 + 1e-3 if t.is_floating_point() else t


def _add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def _finite(lam: Params, t: int, where: str) -> None:
    bad = [k for k, v in lam.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(
            f"{where}: the adjoint became non-finite at step {t} in {bad}: the run diverged, or the loss or the "
            "optimizer's update is not differentiable there")


# ---------------------------------------------------------------- the replay


class Replay(NamedTuple):
    """What the backward sweep needs about the run."""

    model_fn: Callable
    optimizer: Optimizer
    batches: list[Batch]
    indices: list[Tensor]
    checkpoints: dict[int, tuple[Params, Any]]  # step -> (θ, s), at 0, k, 2k, ...
    every: int
    final: Params  # θ_T


def forward(model_fn: Callable, optimizer: Optimizer, params: Params, state: Any, batches: Sequence[Batch],
            where: str, keep: Callable[[int], bool] = lambda t: False,
            on_step: Callable[[int, Step], None] | None = None) -> tuple[Params, Any, dict[int, tuple[Params, Any]]]:
    """Train over ``batches`` from ``(params, state)``; keep ``(θ_t, s_t)`` where ``keep(t)``; ``on_step(t, step)``."""
    kept = {}
    for t, batch in enumerate(batches):
        if keep(t):
            kept[t] = (params, state)
        check_model(model_fn, params, (batch,), where, ("train",))  # cached: again once a zero parameter moved
        try:
            g = mean_grad(model_fn, params, batch, where)
        except FloatingPointError as err:  # name the step (a step before it may have made the parameters NaN)
            raise FloatingPointError(f"{err} [batches[{t}], step {t} of the replay]") from None
        given = [(k, v) for k, v in g.items() if v is not None]
        if given and not bool(torch.stack([torch.isfinite(v).all() for _, v in given]).all()):
            bad = [k for k, v in given if not bool(torch.isfinite(v).all())]
            raise FloatingPointError(
                f"{where}: the gradient of batches[{t}] (step {t} of the replay) is not finite though its losses "
                f"are: params {bad[:6]}{'...' if len(bad) > 6 else ''} hold NaN or inf, and the step would write "
                f"them into the parameters. A backward through sqrt or a norm at 0, a division by 0, or "
                f"torch.where with a non-finite branch does this; torch.autograd.set_detect_anomaly(True) and a "
                f"plain backward of model_fn(params, batch).sum() find the call")
        if on_step is not None:
            on_step(t, Step(params, state, g))
        params, state = optimizer.update(g, state, params)
        params = {k: v.detach() for k, v in params.items()}
    return params, state, kept


def backward(r: Replay, lam: Params, n_data: int, per_step: bool, via: str, batched: bool, where: str) -> Tensor:
    """The values ``[N]`` (``[N, T]`` with ``per_step``; a trailing ``[m]`` when ``batched``) from ``λ_θ_T``."""
    T = len(r.batches)
    extra = (next(iter(lam.values())).shape[0],) if batched else ()
    total = torch.zeros(n_data, *((T,) if per_step else ()), *extra, dtype=torch.float64)
    lam_state: list[Tensor] | None = None  # zero at T
    for start in reversed(range(0, T, r.every)):
        params, state = r.checkpoints[start]
        segment: list[tuple[Step, Callable]] = []  # the segment's steps, each with its gradient's pullback
        for t in range(start, min(start + r.every, T)):
            g, pull_grad = grad_pullback(r.model_fn, params, r.batches[t], where)
            segment.append((Step(params, state, g), pull_grad))
            params, state = r.optimizer.update(g, state, params)
            params = {k: v.detach() for k, v in params.items()}
        end = start + len(segment)
        _check_lands(params, r.final if end == T else r.checkpoints.get(end, (None,))[0], end, where,
                     r.checkpoints[start][0])
        for t in reversed(range(start, start + len(segment))):
            step, pull_grad = segment.pop()
            _, new_state, pullback = update_vjp(r.optimizer, step)
            if lam_state is None:
                lam_state = [torch.zeros((*extra, *s.shape), dtype=s.dtype, device=s.device) for s in new_state]
            batch = r.batches[t]

            def back(lam_p: Params, lam_s: list[Tensor], step: Step = step, pullback: Callable = pullback,
                     pull_grad: Callable = pull_grad, batch: Batch = batch) -> tuple[Tensor, Params, list[Tensor]]:
                g_bar, s_bar, p_bar = pullback((lam_p, lam_s))
                hv, shares = pull_grad(g_bar)
                if via == "kernels":
                    direction = {k: v.detach() for k, v in g_bar.items()}
                    dots = graddot_direction(r.model_fn, step.params, batch.rebuild(batch.tensors), direction).scores
                    shares = dots / batch.size
                return shares, _add(p_bar, hv), list(s_bar)

            if batched:
                dots, lam, lam_state = torch.func.vmap(back)(lam, lam_state)
                dots = dots.T  # [m, n] -> [n, m]
            else:
                dots, lam, lam_state = back(lam, lam_state)
            _finite(lam, t, where)
            rows = r.indices[t]
            if per_step:
                total.index_put_((rows, torch.full_like(rows, t)), dots.detach().to(torch.float64), accumulate=True)
            else:
                total.index_add_(0, rows, dots.detach().to(torch.float64))
    return total


# ---------------------------------------------------------------- checks and the public function


def _check_lands(params: Params, recorded: Params | None, step: int, where: str, begun: Params) -> None:
    """The replayed segment must end on the parameters the run had there (a recording's next checkpoint).

    The replay differentiates ``model_fn`` on each whole batch; a run whose steps
    took other numbers (a model whose samples branch differently alone, which
    :func:`ghostfunc.train_step` runs per sample, or batches that are not the run's)
    would otherwise be attributed as a different run without a word. Each parameter
    must land within ``sqrt(eps)`` of its size, or move as the run moved it from the
    segment's start (``begun``) up to ``eps^(1/4)`` of that move in norm: AdamW's
    first steps divide gradients of about its ``eps`` by themselves, where float32
    rounding of the replay's own gradient path moved single entries by 3.9e-4
    (lr 0.01), a difference of rounding, not of the run.
    """
    if recorded is None:
        return
    for k, v in params.items():
        ref = recorded[k].to(v.dtype)
        eps = torch.finfo(v.dtype).eps
        tol = eps ** 0.5 * max(1.0, ref.abs().max().item())
        gap = (v - ref).abs().max().item() if v.numel() else 0.0
        if not gap <= tol and not torch.linalg.vector_norm(v - ref).item() <= eps ** 0.25 * \
                torch.linalg.vector_norm(ref - begun[k].to(v.dtype)).item():
            raise RecordingError(
                f"{where}: replaying the run's steps does not reach the recorded parameters of step {step} "
                f"({k!r} differs by {gap:.3g}, rounding allows {tol:.3g}): the replay differentiates model_fn "
                f"on each whole batch, and this run's steps took other numbers (a model_fn whose samples take "
                f"other branches when run alone, a model that draws random numbers, or other batches or "
                f"optimizer than the run's, a learning rate among them: a tensor lr the run decayed in place replays "
                f"at its value now, so pass an optimizer whose schedule count -> lr gives the run's rates; or the "
                f"recorded tensors were changed in place after recording, as a "
                f"loop updating its parameters in place does: record keeps the states it is given, not copies)"
            )


def check_batches(batches: Any, index: str, where: str) -> tuple[list[Batch], list[Tensor]]:
    """Every batch a dict holding a ``[B]`` integer ``index`` leaf; split, with the indices."""
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Sequence) or not batches:
        got = "an empty list" if isinstance(batches, Sequence) and not batches else type(batches).__name__
        raise TypeError(f"{where}: batches must be a non-empty list of batch dicts (one per step); got {got}")
    splits, indices = [], []
    for t, b in enumerate(batches):
        if not isinstance(b, Mapping) or index not in b:
            got = f"keys {sorted(b)}" if isinstance(b, Mapping) else type(b).__name__
            raise ValueError(f"{where}: batches[{t}] must be a dict holding the rows' dataset indices under "
                             f"index={index!r}; got {got}")
        split = check_batch(b, f"batches[{t}]", where)
        idx = as_tensor(b[index])  # (a NumPy array or a list of ints, as DataValues.add takes them)
        if not is_indices(idx) or idx.shape[0] != split.size:
            mask = " (a bool mask is not indices)" if idx.dtype == torch.bool else ""
            raise ValueError(f"{where}: batches[{t}][{index!r}] must be a 1-D integer tensor of the {split.size} "
                             f"rows' dataset indices{mask}; got {tensor_kind(idx)}")
        if int(idx.min()) < 0:
            raise ValueError(f"{where}: batches[{t}][{index!r}] holds a negative dataset index {int(idx.min())}")
        splits.append(split)
        indices.append(idx.to(device="cpu", dtype=torch.int64))
    return splits, indices


def check_val(val: Any, batches: Sequence[Any], index: str, where: str) -> Batch:
    """``val`` with the structure of the training batches (the ``index`` leaf may be left out)."""
    like = batches[0]
    keys = set(like) - {index}
    if not isinstance(val, Mapping) or set(val) - {index} != keys:
        got = f"keys {sorted(val)}" if isinstance(val, Mapping) else type(val).__name__
        raise ValueError(f"{where}: val must be a batch dict with the keys of the training batches "
                         f"{sorted(keys)} (the {index!r} leaf optional); got {got}")
    for k in sorted(keys, key=repr):  # (dicts' keys in another order, a BatchEncoding beside a dict: the same)
        if pytree.tree_structure(keys_sorted(like[k])) != pytree.tree_structure(keys_sorted(val[k])):
            raise ValueError(f"{where}: val must have the structure of the training batches under every key; under "
                             f"{k!r} the training batch holds {describe_batch(like[k])}, val {describe_batch(val[k])}")
    return check_batch(val, "val", where)


def val_adjoint(model_fn: Callable, params: Params, val: Batch, val_reduce: str | None,
                where: str) -> tuple[Params, Tensor]:
    """``∇ mean_v L_v(θ_T)`` (or every ``∇L_v`` stacked ``[m, ...]`` when ``val_reduce`` is None) and the losses."""
    losses_of = per_sample_losses(model_fn, val, where)
    with _rephrase(where):
        if val_reduce is None:
            lam = torch.func.jacrev(losses_of)(params)
            losses = losses_of(params)
        else:
            lam, losses = torch.func.grad(mean_and_losses(losses_of), has_aux=True)(params)
    _check_finite(losses.detach(), "val", where)
    return {k: v.detach() for k, v in lam.items()}, losses.detach()


def default_every(steps: int) -> int:
    """``⌈√T⌉``: about ``2√T`` parameter copies held at once."""
    return max(1, math.ceil(math.sqrt(steps)))


def check_common(where: str, model_fn: Any, optimizer: Any, every: Any, val_reduce: Any, via: Any,
                 per_step: Any) -> None:
    check_model_fn(model_fn, where)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{where}: optimizer must be a ghostfunc.Optimizer (ghostfunc.sgd(...), ghostfunc.adamw(...), "
                        f"or your own pure (init, update) pair); got {type(optimizer).__name__}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"{where}: checkpoint_every must be a positive int or None (⌈√T⌉); got {every!r}")
    if val_reduce not in ("mean", None):
        raise ValueError(f"{where}: val_reduce must be 'mean' (L_val the mean validation loss) or None "
                         f"(one value per validation row); got {val_reduce!r}")
    if via not in VIAS:
        raise ValueError(f"{where}: via must be one of {VIAS}; got {via!r}")
    if via == "kernels" and val_reduce is None:
        raise ValueError(f"{where}: via='kernels' scores against one direction; val_reduce=None needs via='hvp'")
    if not isinstance(per_step, bool):
        raise TypeError(f"{where}: per_step must be a bool; got {type(per_step).__name__}")


@grads_on
def unroll(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    optimizer: Optimizer,
    params: Mapping[str, Tensor] | Trajectory,
    batches: Sequence[Mapping[str, Any]],
    val: Mapping[str, Any],
    *,
    index: str = "index",
    checkpoint_every: int | None = None,
    per_step: bool = False,
    val_reduce: str | None = "mean",
    size: int | None = None,
    via: str = "hvp",
) -> DataValues:
    """Exact unrolled data values: ``∂L_val(θ_T)/∂w_i`` through the whole training run.

    Replays the run ``θ_{t+1} = optimizer.update(∇L_t(θ_t), s_t, θ_t)`` over
    ``batches`` from ``params`` (the mean loss of each batch, as
    :func:`ghostfunc.train_step` trains), then sweeps it backward (see the module
    docstring for the recursion). Per step: one mean-gradient recomputation, one
    vjp of ``optimizer.update``, one double backward over the batch (the rows' shares and ``H·ḡ`` together).

    **Sign** as ``φ`` everywhere in ghostfunc: ``total[i] < 0`` means up-weighting
    sample ``i`` lowers the final validation loss (it helps). To first order,
    training on a subset ``S`` (weights ``w``) changes ``L_val(θ_T)`` by
    ``Σ_i (w_i − 1)·total[i]``. So removing sample ``i`` is predicted as ``w_i = 0`` in
    each batch that held it with the batch's ``1/n`` kept (a change of ``−total[i]``), not
    as dropping the row and averaging the batch over the ``n − 1`` others.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` ``[B]``, samples
            independent (refused otherwise: :class:`ghostfunc.SamplesInteractError`,
            as :func:`ghostfunc.graddot`); it ignores the ``index`` leaf.
        optimizer: :func:`ghostfunc.sgd` or :func:`ghostfunc.adamw` (or any
            :class:`ghostfunc.Optimizer` whose ``update`` is differentiable).
        params: the initial parameters ``θ_0`` (not modified), or a recorded
            :class:`ghostfunc.Trajectory` of this run (its checkpoints are used:
            no forward pass over the run first).
        batches: one batch dict per step (``T`` of them), each holding the rows'
            dataset indices ``[B]`` under ``index``; a sample may recur.
        val: the validation batch dict (the same keys; ``index`` optional).
        index: the key of the dataset indices.
        checkpoint_every: keep ``(θ, s)`` every ``k`` steps and recompute within
            segments: ``O(T/k + k)`` copies; ``None`` is ``⌈√T⌉``.
        per_step: also keep which step contributed what: ``total`` is ``[N, T]``
            (column ``t``: step ``t``'s share; ``total.sum(1)`` the value).
        val_reduce: ``"mean"`` (``L_val`` the mean validation loss) or ``None``
            (a value per validation row: a trailing ``[m]`` axis; the adjoints of all
            rows are carried together under ``vmap``).
        size: ``N``, the dataset size; ``None`` is the largest index + 1.
        via: ``"hvp"`` (the rows' shares from the Hessian-vector product's double
            backward) or ``"kernels"`` (the shares by :func:`ghostfunc.graddot_direction`:
            a tap capture and the contract/materialise kernels; one more pass per step).

    Returns:
        :class:`ghostfunc.DataValues` with ``total`` ``[N]`` (``[N, T]``, ``[N, m]``
        or ``[N, T, m]``), float64, and ``count[i]`` the number of rows sample ``i`` had.

    Example:
        >>> import torch, ghostfunc
        >>> def model_fn(p, batch):
        ...     return 0.5 * (batch["x"] @ p["w"] - batch["y"]) ** 2
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> batch = {"x": x, "y": y, "index": torch.arange(2)}
        >>> p = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> ghostfunc.unroll(model_fn, ghostfunc.sgd(0.5), p, [batch], {"x": x, "y": y}).total
        tensor([-0.0938, -0.0938], dtype=torch.float64)
    """
    where = "unroll"
    check_common(where, model_fn, optimizer, checkpoint_every, val_reduce, via, per_step)
    splits, indices = check_batches(batches, index, where)
    vb = check_val(val, batches, index, where)
    n_data = _size(size, indices, where)
    if isinstance(params, Trajectory):
        if checkpoint_every is not None and checkpoint_every != params.every:
            raise ValueError(f"{where}: checkpoint_every comes from the trajectory ({params.every}); got {checkpoint_every}")
        check_state_writes(model_fn, params.final, splits[0], where)
        check_samples(model_fn, params.final, splits, vb, where)
        replay = trajectory_replay(model_fn, optimizer, params, splits, indices, where)
        return replay_values(replay, vb, n_data, per_step, val_reduce, via, where)
    theta0 = check_params(params, where)
    check_state_writes(model_fn, theta0, splits[0], where)  # the replay runs the model many times
    check_samples(model_fn, theta0, splits, vb, where)
    every = checkpoint_every or default_every(len(splits))
    state0 = optimizer.init(theta0)

    def check_early(t: int, step: Step) -> None:  # the first update (no momentum buffer yet) and a later one
        if t < 2:
            check_differentiable(optimizer, step, where)

    final, _, checkpoints = forward(model_fn, optimizer, theta0, state0, splits, where,
                                    keep=lambda t: t % every == 0, on_step=check_early)
    replay = Replay(model_fn, optimizer, splits, indices, checkpoints, every, final)
    return replay_values(replay, vb, n_data, per_step, val_reduce, via, where)


def replay_values(r: Replay, val: Batch, n_data: int, per_step: bool, val_reduce: str | None, via: str,
                  where: str) -> DataValues:
    """Sweep a replay backward from ``∇L_val(θ_T)`` and package the values."""
    check_model(r.model_fn, r.final, (val,), where, ("val",))  # val_adjoint runs each validation row alone
    lam, _ = val_adjoint(r.model_fn, r.final, val, val_reduce, where)
    total = backward(r, lam, n_data, per_step, via, val_reduce is None, where)
    count = torch.zeros(n_data, dtype=torch.int64)
    for rows in r.indices:
        count.index_add_(0, rows, torch.ones_like(rows))
    return DataValues(total, count, len(r.batches))


def check_samples(model_fn: Callable, params: Params, splits: list[Batch], val: Batch, where: str) -> None:
    """Refuse, before the run is replayed, a ``model_fn`` whose samples interact or whose losses do not reach
    ``params`` (:func:`ghostfunc._interact.check_model`, cached per batch signature, as ``graddot`` runs it).

    The replay differentiates each whole batch, but the validation adjoint runs each row alone (under
    ``vmap``): a batch statistic there (``h - h.mean(0)``) gave every value as 0 without a word. A parameter
    zero at the start (a zero-initialised gate) may hide a coupling until training moves it: checked again at
    every step of :func:`forward` and on ``θ_T`` for ``val`` (a recording is checked at its ``θ_T``).
    """
    check_model(model_fn, params, (*splits, val), where, ("train",) * len(splits) + ("val",))


def _size(size: int | None, indices: list[Tensor], where: str) -> int:
    largest = max(int(i.max()) for i in indices)
    if size is None:
        return largest + 1
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= largest:  # (NumPy's ints too)
        raise ValueError(f"{where}: size must be an int larger than every dataset index ({largest}); got {size!r}")
    return int(size)


# ---------------------------------------------------------------- a recorded run


@dataclass
class Trajectory:
    """A training run recorded for a later :func:`unroll`: checkpoints every ``every`` steps and every step's indices.

    Record while training with :func:`ghostfunc.train_step` (or any loop whose
    update is ``optimizer.update`` on the mean gradient of each batch)::

        traj = ghostfunc.Trajectory.start(state, every=10)   # state = step.init(params)
        for batch in batches:
            state, info = step(state, batch, val)
            traj.record(batch["index"], state)                # appends (mutates traj)
        values = ghostfunc.unroll(model_fn, optimizer, traj, batches, val)

    The replay then starts from the recorded checkpoints: no forward pass over the
    whole run first. Memory: ``T/every`` parameter-and-state copies plus ``T``
    index tensors (no inputs).

    Saved with :meth:`save` as ``DIR/trajectory.pt`` (``torch.save`` of a dict:
    ``format`` = ``"ghostfunc.Trajectory/1"``, ``every``, ``indices`` (a list of
    ``[B]`` int64 tensors, one per step), ``checkpoints`` (step ``t`` -> ``(params,
    opt_state)`` for ``t = 0, every, 2·every, … < T``), ``final`` (``θ_T``)) and,
    optionally, ``DIR/spec.json`` telling ``python -m ghostfunc attribute`` how to
    rebuild the task: ``{"factory": "package.module:function", "kwargs": {...},
    "optimizer": {"name": "sgd" | "adamw", ...keyword arguments}, "index": "index"}``,
    where ``function(**kwargs)`` returns ``{"model_fn": ..., "dataset": {key: [N, ...]
    tensor}, "val": batch dict}`` (and optionally ``"optimizer"``, used instead of the spec's
    entry, which may then be left out: e.g. one with a learning-rate schedule) and step
    ``t``'s batch is ``{key: dataset[key][indices[t]]}`` plus the indices under ``index``.

    Attributes:
        every: steps between checkpoints.
        checkpoints: step -> ``(params, opt_state)`` before that step.
        indices: per step, the batch's dataset indices ``[B]``.
        final: the parameters after the last recorded step.
    """

    every: int
    checkpoints: dict[int, tuple[Params, Any]]
    indices: list[Tensor]
    final: Params

    @classmethod
    def start(cls, state: Any, every: int) -> Trajectory:
        """An empty recording from ``state`` (a :class:`ghostfunc.TrainState`, or ``(params, opt_state)``)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Trajectory.start: every must be a positive int; got {every!r}")
        params, opt_state = _params_state(state, "Trajectory.start")
        return cls(every, {0: (params, opt_state)}, [], params)

    @property
    def steps(self) -> int:
        """``T``, the steps recorded."""
        return len(self.indices)

    def record(self, indices: Tensor, state: Any) -> None:
        """Append one step: the batch's dataset ``indices`` ``[B]`` and the ``state`` *after* the update."""
        where = "Trajectory.record"
        indices = as_tensor(indices)  # (a NumPy index leaf, as train_step and unroll take it)
        if not is_indices(indices):
            raise TypeError(f"{where}: indices must be the batch's 1-D integer tensor of dataset indices (a bool "
                            f"mask is not indices); got {tensor_kind(indices)}")
        params, opt_state = _params_state(state, where)
        self.indices.append(indices.detach().to(device="cpu", dtype=torch.int64).clone())
        self.final = params
        if self.steps % self.every == 0:
            self.checkpoints[self.steps] = (params, opt_state)

    def batches(self, dataset: Mapping[str, Tensor], index: str = "index") -> list[dict[str, Tensor]]:
        """Every step's batch dict, ``{key: dataset[key][indices[t]]}`` plus the indices under ``index``."""
        rows = {k: len(v) for k, v in dataset.items()}
        for t, idx in enumerate(self.indices):
            short = [k for k, n in rows.items() if len(idx) and int(idx.max()) >= n]
            if short:
                raise IndexError(f"Trajectory.batches: step {t} recorded dataset index {int(idx.max())}, but "
                                 f"dataset[{short[0]!r}] holds {rows[short[0]]} rows; expected the dataset the run "
                                 f"drew its batches from")
        return [{**{k: v[idx.to(v.device)] for k, v in dataset.items()}, index: idx} for idx in self.indices]

    def save(self, folder: str | os.PathLike, spec: Mapping[str, Any] | None = None) -> Path:
        """Write ``folder/trajectory.pt`` (and ``folder/spec.json`` when ``spec`` is given); returns the ``.pt`` path."""
        where = "Trajectory.save"
        target = Path(folder) / "trajectory.pt"
        try:  # (the spec checked before anything is written: a bare TypeError and an empty folder before, h91)
            text = None if spec is None else json.dumps(dict(spec), indent=1)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{where}: spec must be a dict of JSON values (the task factory's name, its kwargs, the "
                            f"optimizer's options); {err}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": TRAJECTORY_FORMAT, "every": self.every, "indices": self.indices,
                   "checkpoints": {t: tuple(v) for t, v in self.checkpoints.items() if t < self.steps},
                   "final": self.final}
        tmp = target.with_suffix(".pt.tmp")
        try:
            torch.save(payload, tmp)
        except Exception as err:  # (an optimizer state holding a lambda: no half-written file left behind, h91)
            tmp.unlink(missing_ok=True)
            err.add_note(f"{where}: could not write {os.fspath(target)!r} (nothing was written; a recording kept "
                         f"there before is as it was)")
            raise
        if text is not None:  # the spec with the recording it describes, once that is written
            (target.parent / "spec.json").write_text(text)
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Trajectory:
        """Read ``folder/trajectory.pt`` written by :meth:`save`."""
        where = "Trajectory.load"
        if Path(folder).is_file():
            raise NotADirectoryError(f"{where}: {os.fspath(folder)!r} is a file; pass the folder Trajectory.save "
                                     f"wrote (it holds trajectory.pt)")
        path = Path(folder) / "trajectory.pt"
        name = repr(os.fspath(path))
        payload = read_saved(path, where, "Trajectory.save")
        if not isinstance(payload, dict) or payload.get("format") != TRAJECTORY_FORMAT:
            raise RecordingError(f"{where}: {name} is not a file written by Trajectory.save")
        missing = [k for k in ("every", "indices", "checkpoints", "final") if k not in payload]
        if missing:
            raise RecordingError(f"{where}: {name} lacks {missing} (expected every, indices, checkpoints and "
                                 f"final, as Trajectory.save writes)")
        every, indices, checkpoints, final = (payload[k] for k in ("every", "indices", "checkpoints", "final"))
        if (isinstance(every, bool) or not isinstance(every, int) or every < 1 or not isinstance(indices, list)
                or not all(is_indices(i) for i in indices) or not isinstance(checkpoints, dict)
                or not all(isinstance(v, tuple) and len(v) == 2 for v in checkpoints.values())
                or not isinstance(final, dict)):
            raise RecordingError(f"{where}: {name} holds entries of other kinds than Trajectory.save writes "
                                 f"(expected every a positive int, indices a list of 1-D integer tensors, checkpoints "
                                 f"a dict of (params, opt_state), final a dict of tensors)")
        return cls(every, {int(t): tuple(v) for t, v in checkpoints.items()}, list(indices), final)  # type: ignore[misc]


TRAJECTORY_FORMAT = "ghostfunc.Trajectory/1"


def _params_state(state: Any, where: str) -> tuple[Params, Any]:
    if isinstance(state, TrainState):
        params, opt_state = state.params, state.opt_state
    elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], Mapping):
        params, opt_state = state
    else:
        raise TypeError(f"{where}: state must be a ghostfunc.TrainState or (params, opt_state); "
                        f"got {type(state).__name__}")
    return {k: v.detach() for k, v in params.items()}, opt_state


def trajectory_replay(model_fn: Callable, optimizer: Optimizer, traj: Trajectory, splits: list[Batch],
                      indices: list[Tensor], where: str) -> Replay:
    """A :class:`Replay` from a recording, after checking that ``batches`` are the recorded ones."""
    if len(splits) != traj.steps:
        raise RecordingError(f"{where}: batches must be the {traj.steps} batches the trajectory recorded; got "
                             f"{len(splits)}")
    for t, (a, b) in enumerate(zip(indices, traj.indices, strict=True)):
        if not torch.equal(a, b):
            raise RecordingError(f"{where}: batches[{t}] holds other dataset indices than the trajectory "
                                 f"recorded for step {t}")
    missing = [t for t in range(0, traj.steps, traj.every) if t not in traj.checkpoints]
    if missing:
        raise RecordingError(f"{where}: the trajectory lacks the checkpoints of steps {missing}")
    for t in sorted(traj.checkpoints)[:2]:  # the initial update (no momentum buffer yet) and a later one
        if t < traj.steps:
            params, state = traj.checkpoints[t]
            check_differentiable(optimizer, Step(params, state, mean_grad(model_fn, params, splits[t], where)), where)
    return Replay(model_fn, optimizer, splits, indices, traj.checkpoints, traj.every, traj.final)
