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

import inspect
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeGuard

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
        check_state: ``check_state(state, params, where)`` raises, the message starting with ``where``, where
            ``state`` is not this optimizer's state for ``params`` (its type, its step count, its per-parameter
            tensors' keys, shapes, dtypes and devices); ``update`` runs it, and :func:`ghostfunc.train_step` before the
            step's passes. ``None``: not checked (an optimizer written by hand).
    """

    init: Callable[[Params], Any]
    update: Callable[[Grads, Any, Params], tuple[Params, Any]]
    lr: Callable[[Any], float]
    precondition: Callable[[Params, Grads, Any], Params]
    name: str
    settings: tuple[tuple[str, Any], ...] = ()
    check_state: Callable[[Any, Params, str], None] | None = None

    def __repr__(self) -> str:
        """``sgd(lr=0.1 at step 0, momentum=0.9, ...)``: the settings, not the functions."""
        try:
            start = self.init({})
            lr = f"lr={self.lr(start):g} at step 0"
        except Exception:  # noqa: BLE001 - a hand-written optimizer whose init needs parameters
            lr = "lr=?"
        return f"{self.name}({', '.join([lr, *(f'{k}={v!r}' for k, v in self.settings)])})"


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


def one_element(x: Any) -> TypeGuard[Tensor]:
    """Whether ``x`` is a one-element real tensor, a learning rate as torch.optim takes it (``lr=torch.tensor(0.1)``)."""
    return isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool


def _schedule(lr: Schedule, where: str) -> Callable[[int], float]:
    """``count -> lr``; a schedule's every value is checked when it is used (a finite float >= 0)."""
    if callable(lr):
        name = getattr(lr, "__qualname__", None) or repr(lr)
        if (signature := _takes_no_count(lr)) is not None:  # refused where it is given, not at the first update
            raise TypeError(f"{where}: lr must be a float >= 0 or a callable count -> lr (count: the updates "
                            f"done so far); got {name}{signature}, which cannot be called with one count")

        def rate(count: int) -> float:
            try:
                value = lr(count)
            except TypeError as err:  # (a callable object whose __call__ takes no count is judged here)
                raise TypeError(f"{where}: the lr schedule {name} raised at count {count} ({type(err).__name__}: "
                                f"{err}); lr must be a float >= 0 or a callable count -> lr (count: the updates "
                                f"done so far)") from err
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
    said = f"{where}: lr must be a float >= 0 (finite) or a callable count -> lr"
    if one_element(lr):
        tensor = lr  # a one-element tensor, as torch.optim takes it: read at every update, as torch.optim reads it

        def read(count: int) -> float:  # (a decay written into it in place, a torch scheduler's fill_)
            value = tensor.item()
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{said}; the lr tensor holds {value!r} at count {count}")
            return value

        read(0)
        return read
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{said}; got {lr!r} (a {type(lr).__name__})")
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{said}; got {lr!r}")
    return lambda count: value


def _takes_no_count(lr: Callable) -> inspect.Signature | None:
    """``lr``'s signature where it plainly cannot take one positional count, else ``None``. Read as called (a
    decorator's ``__wrapped__`` is not followed: ``functools.wraps`` over a function of ``(step, total)`` that
    binds ``total`` takes one count) and only where it is a plain function or method: inspect misreads some
    callables (a class whose ``__call__`` is a ``staticmethod``), and those are judged by their first call."""
    if not isinstance(lr, (types.FunctionType, types.MethodType)):
        return None
    try:
        signature = inspect.signature(lr, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read
        return None
    try:
        signature.bind(0)
    except TypeError:
        return signature
    return None


def _check_params(params: Any, where: str) -> None:
    """A dict name -> floating-point tensor (what ``init`` and ``update`` read; the names key the state)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: params must be a dict name -> floating-point tensor; got {type(params).__name__}")
    for k, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            got = f"a {p.dtype} tensor" if isinstance(p, Tensor) else f"{p!r} (a {type(p).__name__})"
            raise TypeError(f"{where}: params[{k!r}] must be a floating-point tensor; got {got}")


def _check_grads(grads: Grads, params: Params, where: str) -> Grads:
    """``grads`` checked against ``params`` (keys, shapes), in the parameters' dtypes: a float64 gradient of a
    float32 parameter would otherwise promote the updated parameter to float64."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"{where}: grads must be a dict name -> tensor (or None), like params; got "
                        f"{type(grads).__name__}")
    if set(grads) != set(params):
        raise ValueError(f"{where}: grads and params must have the same keys; "
                         f"got grads {sorted(grads)} and params {sorted(params)}")
    for k, g in grads.items():
        if g is not None and not isinstance(g, Tensor):
            raise TypeError(f"{where}: grads[{k!r}] must be a tensor shaped like params[{k!r}] (or None: no "
                            f"gradient reached it); got {g!r} (a {type(g).__name__})")
        if g is not None and g.shape != params[k].shape:
            raise ValueError(f"{where}: grads[{k!r}] has shape {tuple(g.shape)}, params[{k!r}] {tuple(params[k].shape)}")
    return {k: g if g is None or g.dtype == params[k].dtype else g.to(params[k].dtype) for k, g in grads.items()}


def _check_state(state: Any, kind: type, where: str, name: str | None = None) -> None:
    """Refuse another optimizer's state (a state saved by, or a trajectory recorded with, another optimizer), and a
    step count that is not an int >= 0. ``name``: the optimizer's (``where`` by default)."""
    if not isinstance(state, kind):
        raise TypeError(f"{where}: the optimizer state must be the {kind.__name__} that {name or where}(...).init "
                        f"made; got {type(state).__name__} (from another optimizer?)")
    step = getattr(state, "step", None)
    said = f"{where}: the optimizer state's step must be an int >= 0 (the updates done); got {step!r}"
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{said} (a {type(step).__name__})")
    if step < 0:
        raise ValueError(said)


def _check_fits(tensors: Any, params: Params, what: str, where: str, every: bool) -> None:
    """The per-parameter tensors ``tensors`` (``what``: e.g. ``"momentum"``) of a state against ``params``: a dict
    whose keys are ``params``' (``every``) or some of them, each tensor of its parameter's shape and dtype. A state
    made for other parameters (another model, a state edited by hand) is refused naming the keys, not by a
    ``KeyError`` or a broadcasting error inside the update."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{where}: the optimizer state's {what} must be a dict name -> tensor, one per parameter; "
                        f"got {type(tensors).__name__}")
    extra = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors)) if every else []
    if extra or missing:
        raise ValueError(f"{where}: the optimizer state's {what} must have {'the' if every else 'some of the'} keys "
                         f"of params {sorted(params)} (a state made for these parameters); got {sorted(tensors)}"
                         + (f": {extra} not in params" if extra else "")
                         + (f"{' and' if extra else ':'} {missing} missing" if missing else ""))
    for k, t in tensors.items():
        p = params[k]
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            got = (f"{t.dtype}, shape {tuple(t.shape)}, on {t.device}" if isinstance(t, Tensor)
                   else f"a {type(t).__name__}")
            raise ValueError(f"{where}: the optimizer state's {what}[{k!r}] must match params[{k!r}] ({p.dtype}, "
                             f"shape {tuple(p.shape)}, on {p.device}); got {got} (a state made for other parameters?)")


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
        _check_params(params, f"{where}.init")
        return SGDState(0, None)

    def check_state(state: SGDState, params: Params, at: str) -> None:
        _check_state(state, SGDState, at, where)
        if state.momentum is not None:  # a parameter no gradient has reached yet has no buffer
            _check_fits(state.momentum, params, "momentum", at, every=False)

    def lr_of(state: SGDState) -> float:
        _check_state(state, SGDState, where)
        return rate(state.step)

    def update(grads: Grads, state: SGDState, params: Params) -> tuple[Params, SGDState]:
        _check_params(params, where)
        check_state(state, params, where)
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

    return Optimizer(init, update, lr_of, precondition, "sgd",
                     (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay),
                      ("nesterov", bool(nesterov))), check_state)


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
        _check_params(params, f"{where}.init")
        zeros = {k: p.detach().new_zeros(p.shape) for k, p in params.items()}
        return AdamWState(0, zeros, {k: z.clone() for k, z in zeros.items()})

    def _nu(g: Tensor, nu: Tensor) -> Tensor:
        return nu.mul(beta2).addcmul_(g, g, value=1 - beta2)

    def counts_of(state: AdamWState, grads: Grads) -> dict[str, int] | None:
        """Per-parameter update counts, kept only once a parameter has missed an update."""
        if state.counts is None and all(g is not None for g in grads.values()):
            return None
        return dict(state.counts) if state.counts is not None else dict.fromkeys(grads, state.step)

    def check_state(state: AdamWState, params: Params, at: str) -> None:
        _check_state(state, AdamWState, at, where)
        _check_fits(state.mu, params, "mu", at, every=True)
        _check_fits(state.nu, params, "nu", at, every=True)
        counts = state.counts
        if counts is not None and (not isinstance(counts, Mapping) or set(counts) != set(params) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in counts.values())):
            raise ValueError(f"{at}: the optimizer state's counts must be None or a dict with the keys of params "
                             f"{sorted(params)}, each an int >= 0 (the updates that parameter took part in); got "
                             f"{state.counts!r}")

    def lr_of(state: AdamWState) -> float:
        _check_state(state, AdamWState, where)
        return rate(state.step)

    def update(grads: Grads, state: AdamWState, params: Params) -> tuple[Params, AdamWState]:
        _check_params(params, where)
        check_state(state, params, where)
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

    return Optimizer(init, update, lr_of, precondition, "adamw",
                     (("betas", tuple(betas)), ("eps", eps), ("weight_decay", weight_decay)), check_state)
