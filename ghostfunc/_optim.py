"""Optimizers as pure ``(init, update)`` pairs, with torch.optim's exact formulas.

optax is the model (every optimizer a ``NamedTuple`` of pure functions, every
state its own small ``NamedTuple``), but optax is JAX-only and torchopt, its
PyTorch port, is no longer maintained; so ghostfunc writes the two optimizers it
needs. Each one reproduces the single-tensor code path of ``torch.optim.SGD`` /
``torch.optim.AdamW`` operation for operation (same order, same rounding), so a
training loop over :func:`ghostfunc.train_step` follows the same parameter
trajectory as an ordinary ``torch.optim`` loop.

Two departures from optax, both for exactness: ``update`` returns the *new
parameters* (not an increment to add, which would round once more), and an
optimizer knows its learning rate (``lr(state)``), which In-Run Data Shapley
needs. ``precondition`` is the diagonal preconditioner the next update applies
(identity for SGD, ``1 / (√v̂ + ε)`` for AdamW), for optimizer-aware values.

Parameters are a dict ``name -> Tensor``; nothing passed in is modified.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]
#: Gradients for ``update``: ``None`` for a parameter no gradient reached (torch.optim's ``.grad is None``):
#: the update leaves it, and its optimizer state, as they are.
Grads = Mapping[str, Tensor | None]
Schedule = float | Callable[[int], float]


class Optimizer(NamedTuple):
    """A pure optimizer: four functions, no hidden state.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(grads, state, params) -> (new_params, new_state)``; ``grads``
            is the mean loss gradient over the batch, shaped like ``params`` (``None`` for a
            parameter no gradient reached: left as it is, as torch.optim leaves a ``.grad`` of ``None``).
        lr: ``lr(state) -> float``, the learning rate the next ``update`` uses.
        precondition: ``precondition(direction, grads, state) -> direction'``, the
            diagonal preconditioner of the next ``update`` (the one that ``grads``
            would get) applied to ``direction``.
        name: for messages and reprs.
        settings: the hyperparameters besides the learning rate, ``(name, value)`` pairs (what the
            processes of a ``group=`` step must agree on).
    """

    init: Callable[[Params], Any]
    update: Callable[[Grads, Any, Params], tuple[Params, Any]]
    lr: Callable[[Any], float]
    precondition: Callable[[Params, Grads, Any], Params]
    name: str
    settings: tuple[tuple[str, Any], ...] = ()


class SGDState(NamedTuple):
    """``step`` updates done so far; ``momentum`` buffers (``None`` before the first update or without momentum;
    a parameter no gradient has reached yet has none)."""

    step: int
    momentum: Params | None


class AdamWState(NamedTuple):
    """``step`` updates done so far; ``mu`` and ``nu`` the first and second moment estimates; ``counts``
    the updates each parameter took part in (``None``: all of them, ``step``), which its bias
    corrections use (as torch.optim.AdamW's per-parameter ``step``)."""

    step: int
    mu: Params
    nu: Params
    counts: dict[str, int] | None = None


def _real(where: str, name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float: a real number (not a bool), finite, ``low <= value < high``.

    Raises:
        TypeError: not a real number (a string, a bool, ``None``, ...), naming ``name``.
        ValueError: NaN, infinite or out of range, naming ``name`` and the value.
    """
    want = "a finite float" + (f" in [{low:g}, {high:g})" if high < math.inf else f" >= {low:g}" if low > -math.inf else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be {want}; got {value!r} (a {type(value).__name__})")
    out = float(value)
    if not (math.isfinite(out) and low <= out < high):
        raise ValueError(f"{where}: {name} must be {want}; got {value!r}")
    return out


def _schedule(lr: Schedule, where: str) -> Callable[[int], float]:
    """``count -> lr``; a schedule's every value is checked when it is used (a finite float >= 0)."""
    if callable(lr):
        name = getattr(lr, "__qualname__", None) or repr(lr)

        def rate(count: int) -> float:
            value = lr(count)
            said = f"{where}: the lr schedule {name} returned {value!r} at count {count}; expected a finite float >= 0"
            try:  # a number, or a one-element tensor / numpy scalar
                if isinstance(value, (str, bytes, bool)):
                    raise TypeError(said)
                out = float(value)
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
                raise TypeError(said) from None
            if not (math.isfinite(out) and out >= 0):
                raise ValueError(said)
            return out

        return rate
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where}: lr must be a float >= 0 (finite) or a callable count -> lr; got {lr!r} "
                        f"(a {type(lr).__name__})")
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: lr must be a float >= 0 (finite) or a callable count -> lr; got {lr!r}")
    return lambda count: value


def _check_grads(grads: Grads, params: Params, where: str) -> Grads:
    """``grads`` checked against ``params`` (keys, shapes), in the parameters' dtypes: a float64 gradient of a
    float32 parameter would otherwise promote the updated parameter to float64."""
    if set(grads) != set(params):
        raise ValueError(f"{where}: grads and params must have the same keys; "
                         f"got grads {sorted(grads)} and params {sorted(params)}")
    for k, g in grads.items():
        if g is not None and g.shape != params[k].shape:
            raise ValueError(f"{where}: grads[{k!r}] has shape {tuple(g.shape)}, params[{k!r}] {tuple(params[k].shape)}")
    return {k: g if g is None or g.dtype == params[k].dtype else g.to(params[k].dtype) for k, g in grads.items()}


def _check_state(state: Any, kind: type, where: str) -> None:
    """Refuse another optimizer's state (a state saved by, or a trajectory recorded with, another optimizer)."""
    if not isinstance(state, kind):
        raise TypeError(f"{where}: the optimizer state must be the {kind.__name__} that {where}(...).init made; got "
                        f"{type(state).__name__} (from another optimizer?)")


def sgd(lr: Schedule, momentum: float = 0.0, *, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> Optimizer:
    """Stochastic gradient descent, exactly as ``torch.optim.SGD`` (same arguments, same defaults).

    With ``d = g + weight_decay·θ``: the buffer is ``b = d`` on the first update and
    ``b = momentum·b + (1 − dampening)·d`` after it; the step is ``θ − lr·b``
    (``θ − lr·(d + momentum·b)`` with ``nesterov``). The preconditioner is the identity.

    Args:
        lr: learning rate, or a schedule ``count -> lr`` (``count`` = updates done so far).
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient (coupled, as in torch).
        nesterov: Nesterov momentum.
    """
    where = "sgd"
    rate = _schedule(lr, where)
    momentum = _real(where, "momentum", momentum, low=0)
    dampening = _real(where, "dampening", dampening)  # any finite value, as torch.optim.SGD
    weight_decay = _real(where, "weight_decay", weight_decay, low=0)
    if nesterov not in (True, False):  # numpy's bools and 0/1 too; not a string
        raise TypeError(f"{where}: nesterov must be True or False; got {nesterov!r}")
    nesterov = bool(nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening = 0; got {momentum}, {dampening}")

    def init(params: Params) -> SGDState:
        del params
        return SGDState(0, None)

    def update(grads: Grads, state: SGDState, params: Params) -> tuple[Params, SGDState]:
        _check_state(state, SGDState, where)
        grads = _check_grads(grads, params, where)
        step_lr = rate(state.step)
        new_params, bufs = {}, {}
        for k, p in params.items():
            d = grads[k]
            if d is None:  # no gradient reached it: untouched, its buffer kept (torch.optim skips it)
                new_params[k] = p
                if state.momentum is not None and k in state.momentum:
                    bufs[k] = state.momentum[k]
                continue
            if weight_decay != 0:
                d = d.add(p, alpha=weight_decay)
            if momentum != 0:
                if state.momentum is None or k not in state.momentum:
                    buf = d.clone()  # not detached: the replay (ghostfunc.unroll) differentiates through it
                else:
                    buf = state.momentum[k].mul(momentum).add_(d, alpha=1 - dampening)
                bufs[k] = buf
                d = d.add(buf, alpha=momentum) if nesterov else buf
            new_params[k] = p.add(d, alpha=-step_lr)
        return new_params, SGDState(state.step + 1, bufs if momentum != 0 else None)

    def precondition(direction: Params, grads: Grads, state: SGDState) -> Params:
        del grads, state
        return dict(direction)

    return Optimizer(init, update, lambda state: rate(state.step), precondition, "sgd",
                     (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay),
                      ("nesterov", bool(nesterov))))


def _sqrt0(x: Tensor) -> Tensor:
    """``√x`` (the same values, bit for bit) whose derivative at ``x = 0`` is 0 instead of ``inf``.

    Where AdamW's second moment is exactly 0 the first moment is 0 too, so the
    update's true derivative through ``√v`` vanishes there; autograd's ``inf · 0``
    would make it NaN (what :func:`ghostfunc.unroll` differentiates).
    """
    if not (x.requires_grad and torch.is_grad_enabled()):  # an ordinary step: nothing differentiates it
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def adamw(lr: Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """AdamW, exactly as ``torch.optim.AdamW`` (same arguments, same defaults; no amsgrad).

    Update ``t`` (from 1): ``θ ← θ·(1 − lr·wd)``; ``m ← lerp(m, g, 1 − β1)``;
    ``v ← β2·v + (1 − β2)·g²``; ``θ ← θ − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)``.
    The preconditioner is ``1 / (√v̂ₜ + ε)`` with ``v̂ₜ = vₜ / (1 − β2ᵗ)``, the
    second moment *after* this update's gradient: the denominator that update divides by.

    Args:
        lr: learning rate, or a schedule ``count -> lr`` (``count`` = updates done so far).
        betas: ``(β1, β2)``.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
    """
    where = "adamw"
    rate = _schedule(lr, where)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2) of floats in [0, 1); got {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2) of floats in [0, 1); got {betas!r}")
    beta1, beta2 = (_real(where, f"betas[{i}]", b) for i, b in enumerate(betas))
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"{where}: need 0 <= betas < 1; got betas={tuple(betas)!r}")
    eps = _real(where, "eps", eps, low=0)
    weight_decay = _real(where, "weight_decay", weight_decay, low=0)

    def init(params: Params) -> AdamWState:
        zeros = {k: p.detach().new_zeros(p.shape) for k, p in params.items()}
        return AdamWState(0, zeros, {k: z.clone() for k, z in zeros.items()})

    def _nu(g: Tensor, nu: Tensor) -> Tensor:
        return nu.mul(beta2).addcmul_(g, g, value=1 - beta2)

    def counts_of(state: AdamWState, grads: Grads) -> dict[str, int] | None:
        """Per-parameter update counts, kept only once a parameter has missed an update."""
        if state.counts is None and all(g is not None for g in grads.values()):
            return None
        return dict(state.counts) if state.counts is not None else dict.fromkeys(grads, state.step)

    def update(grads: Grads, state: AdamWState, params: Params) -> tuple[Params, AdamWState]:
        _check_state(state, AdamWState, where)
        grads = _check_grads(grads, params, where)
        step_lr = rate(state.step)
        counts = counts_of(state, grads)
        new_params, mu, nu = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if g is None:  # no gradient reached it: untouched, moments and count kept (torch.optim skips it)
                new_params[k], mu[k], nu[k] = p, state.mu[k], state.nu[k]
                continue
            t = (state.step if counts is None else counts[k]) + 1
            if counts is not None:
                counts[k] = t
            bias2_sqrt = (1 - beta2**t) ** 0.5
            step_size = step_lr / (1 - beta1**t)
            if weight_decay != 0:
                p = p.mul(1 - step_lr * weight_decay)
            mu[k] = state.mu[k].lerp(g, 1 - beta1)
            nu[k] = _nu(g, state.nu[k])
            denom = (_sqrt0(nu[k]) / bias2_sqrt).add_(eps)
            new_params[k] = p.addcdiv(mu[k], denom, value=-step_size)
        return new_params, AdamWState(state.step + 1, mu, nu, counts)

    def precondition(direction: Params, grads: Grads, state: AdamWState) -> Params:
        _check_state(state, AdamWState, where)
        out = {}
        for k, u in direction.items():
            g = grads[k]
            if g is None:  # no update divides it (and its per-sample gradients are 0)
                out[k] = u
                continue
            t = (state.step if state.counts is None else state.counts[k]) + 1
            out[k] = u / (_nu(g, state.nu[k]).sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
        return out

    return Optimizer(init, update, lambda state: rate(state.step), precondition, "adamw",
                     (("betas", tuple(betas)), ("eps", eps), ("weight_decay", weight_decay)))
