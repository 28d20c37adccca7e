"""In-Run Data Shapley (Wang et al., "Data Shapley in One Training Run", ICLR 2025).

One SGD step with the mean update moves ``θ`` to ``θ − (η/n)·Σ_i g_i``. The utility
of a subset ``S`` of the ``n`` training rows is the change of the mean validation
loss that its part of the step causes:

    U(S) = L_val(θ − (η/n)·Σ_{i∈S} g_i) − L_val(θ).

Taylor-expanding ``U`` to second order makes it a sum of single and pairwise
terms, whose Shapley values are closed-form (with ``a = η/n``):

    φ_i = −a·<g_i, ḡ_val>                                (order 1)
        + (a²/2)·g_iᵀ H_val G,   G = Σ_j g_j             (order 2)

(the quadratic term ``(a²/2)·Σ_{i,j∈S} g_iᵀ H g_j`` gives each pair's share
half-and-half and each diagonal term to its row). Both orders are the single
contraction ``φ_i = <g_i, u>`` against the fixed direction

    u = −a·ḡ_val + (a²/2)·H_val G,

where ``ḡ_val`` comes from the same tap backward as the ``g_i`` and ``H_val G``
is one exact Hessian-vector product on the validation batch (``torch.func.jvp``
of ``torch.func.grad``). By Shapley efficiency, ``Σ_i φ_i`` equals the Taylor
expansion of ``U`` (all rows) to the chosen order.

**Sign convention** (everywhere in ghostfunc): values are ``φ``, the Shapley
value of the *change of validation loss*. A sample that helps (its step lowers
the validation loss) has a **negative** value; a harmful one (a mislabelled
sample, say) a positive one. ``−φ`` is the usual "higher is better" data value.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _kernels as K
from ._graddot import _prepare, run, val_grad, val_weights
from ._ops import Direct, Factored
from ._plan import Plan, make_plan

Params = dict[str, Tensor]
ORDERS = (1, 2)


class Values(NamedTuple):
    """One step's values and by-products (internal; :func:`train_step` and :func:`inrun_shapley` use it).

    ``values`` ``[n]`` of the requested order, ``first_order`` ``[n]`` (the order-1
    part; the same tensor when ``order=1``), ``train_grad`` the mean training
    gradient (name -> shaped like the parameter), losses ``[n]`` and ``[m]``.
    """

    values: Tensor
    first_order: Tensor | None
    train_grad: Params
    train_loss: Tensor
    val_loss: Tensor
    plan: Plan


def _direct(uses: list[Factored | Direct], n: int, param: Tensor) -> Tensor:
    """Per-sample gradients of a direct/fallback parameter: ``[n, P]``."""
    grads = [u.grad for u in uses if isinstance(u, Direct)]
    if len(grads) != len(uses):  # the plan routes mixed use to the fallback
        raise AssertionError("a direct/fallback parameter has a factored use")
    total = torch.stack(grads).sum(0) if grads else param.new_zeros(n, *param.shape)
    return total.reshape(n, -1)


def _factored(uses: list[Factored | Direct]) -> list[Factored]:
    out = [u for u in uses if isinstance(u, Factored)]
    if len(out) != len(uses):  # the plan routes mixed use to the fallback
        raise AssertionError("a factored parameter has a direct use")
    return out


def _train_mean(path: str, uses: list[Factored | Direct], n: int, param: Tensor) -> Tensor:
    """``mean_i g_i`` over the training rows, shaped like ``param``."""
    if path in ("direct", "fallback"):
        return _direct(uses, n, param).mean(0).reshape(param.shape)
    p = param.shape[0]
    total = param.new_zeros(p, param.numel() // p)
    for f in _factored(uses):
        total = total + K.weight_sum(f)  # [p, d]
    return (total / n).reshape(param.shape)


def _contract(path: str, uses: list[Factored | Direct], u: Tensor, n: int, param: Tensor) -> Tensor:
    """``<g_i, u>`` for every training row ``i``: ``[n]`` (``u`` shaped like ``param``)."""
    if path in ("direct", "fallback"):
        return _direct(uses, n, param) @ u.reshape(-1)  # [n, P] @ [P]
    u2 = u.reshape(param.shape[0], -1)  # [p, d]
    out = param.new_zeros(n)
    for f in _factored(uses):
        out = out + K.contract(f, u2)  # Σ_t L[i,t]ᵀ U R[i,t]
    return out


def _import_jvp_decompositions() -> None:
    """``torch.func.jvp`` imports its decompositions on first use, which calls ``torch.jit.script``
    and so warns that TorchScript is deprecated (torch's own code, nothing the caller can fix):
    import them once here with that warning silenced."""
    if "torch._decomp.decompositions_for_jvp" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def val_hvp(model_fn: Callable[[Params, Any], Tensor], params: Params, val: Any, vector: Params) -> Params:
    """``H_val · v``: the exact Hessian of the mean validation loss times ``vector``.

    Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), about the cost
    of two backward passes on the validation batch. Fused attention kernels have
    no forward-mode derivative on every backend, so ``scaled_dot_product_attention``
    runs on its math backend here (the same function); an op with no forward-mode
    rule at all falls back to reverse-over-reverse (``vjp`` of ``grad``, exact as well).
    """

    def loss(p: Params) -> Tensor:
        return model_fn(p, val).mean()

    _import_jvp_decompositions()
    with sdpa_kernel([SDPBackend.MATH]):
        try:
            return torch.func.jvp(torch.func.grad(loss), (params,), (vector,))[1]
        except NotImplementedError as err:
            if "forward AD" not in str(err):
                raise
        pullback = torch.func.vjp(torch.func.grad(loss), params)[1]
        return pullback(vector)[0]  # H symmetric: vᵀH = (Hv)ᵀ


def compute_values(
    where: str,
    model_fn: Callable[[Params, Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    lr: float,
    order: int,
    precondition: Callable[[Params, Params], Params] | None = None,
    first_order: bool = True,
) -> Values:
    """One capture, then the values against ``u = −a·P(ḡ_val) + (a²/2)·H_val G`` (``a = lr/n``).

    ``precondition(direction, train_grad) -> direction`` (``P``, order 1 only) is
    the optimizer's diagonal preconditioner; ``None`` is the identity. At order 2,
    ``first_order=False`` skips the extra contraction that reports the order-1 part
    (``Values.first_order`` is then ``None``).
    """
    check_lr_order(where, lr, order)
    if precondition is not None and order != 1:
        raise ValueError(f"{where}: optimizer-aware (preconditioned) values are first order only; got order={order}")
    params, tb, vb = _prepare(where, model_fn, params, train, val, val_reduce="mean", policy="contract")
    n, m = tb.size, vb.size
    cap, use = run(model_fn, params, tb, vb, where)
    plan = make_plan(params, use, "contract", n, m, "mean")
    g_val, g_train = {}, {}
    for k, route in plan.routes.items():
        tr, va = cap.grads[k]
        weights = val_weights("mean", m, params[k])
        assert weights is not None
        g_val[k] = val_grad(route.path, va, weights, params[k])  # ḡ_val
        g_train[k] = _train_mean(route.path, tr, n, params[k])
    a = lr / n
    if precondition is not None:
        g_val = precondition(g_val, g_train)
    u1 = {k: g.mul(-a) for k, g in g_val.items()}

    def contract_all(u: Params) -> Tensor:
        acc = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
        parts = [_contract(r.path, cap.grads[k][0], u[k], n, params[k]).to(acc) for k, r in plan.routes.items()]
        return torch.stack(parts).sum(0)

    if order == 1:
        values = contract_all(u1)
        return Values(values, values, g_train, cap.train_loss, cap.val_loss, plan)
    hg = val_hvp(model_fn, params, val, {k: g.mul(n) for k, g in g_train.items()})  # H_val G, G = Σ_j g_j
    u = {k: u1[k] + hg[k].to(u1[k].dtype).mul(a * a / 2) for k in u1}
    first = contract_all(u1) if first_order else None
    return Values(contract_all(u), first, g_train, cap.train_loss, cap.val_loss, plan)


def check_lr_order(where: str, lr: Any, order: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"{where}: lr must be a float >= 0 (the step's learning rate); got {lr!r}")
    if order not in ORDERS:
        raise ValueError(f"{where}: order must be 1 or 2; got {order!r}")


def inrun_shapley(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    lr: float,
    order: int = 1,
) -> Tensor:
    """In-Run Data Shapley values of one SGD step (mean update) over the training batch.

    With ``a = lr / n`` and ``L_val`` the mean validation loss, the utility of a
    subset ``S`` of the ``n`` training rows is
    ``U(S) = L_val(θ − a·Σ_{i∈S} g_i) − L_val(θ)`` and the values are

    - ``order=1``: ``φ_i = −a·<g_i, ḡ_val>``;
    - ``order=2``: ``φ_i = −a·<g_i, ḡ_val> + (a²/2)·g_iᵀ H_val Σ_j g_j``,

    the exact Shapley values of ``U``'s Taylor expansion to that order (so
    ``Σ_i φ_i`` is that expansion of ``U(all rows)``). ``H_val`` is the exact
    Hessian of ``L_val`` (a ``torch.func`` Hessian-vector product, any
    architecture). Both orders are one contraction of the per-sample gradients
    against ``u = −a·ḡ_val + (a²/2)·H_val G``.

    **Sign:** this returns ``φ``, the share of the validation-loss *change*. A
    sample that lowers the validation loss gets a **negative** value; ``−φ`` is
    the "higher is better" value.

    Args:
        model_fn: ``model_fn(params, batch) -> losses`` ``[B]``, samples independent
            (for ``order=2`` also deterministic: no dropout).
        params: name -> trainable tensor ``θ``; not modified.
        train: batch pytree, sample axis first (``n`` rows).
        val: batch pytree with the same structure (``m`` rows).
        lr: the step's learning rate ``η`` (the per-sample weight of the mean update is ``η / n``).
        order: 1 or 2.

    Returns:
        ``φ``: ``[n]``, in the parameters' dtype (at least float32).
    """
    return compute_values("inrun_shapley", model_fn, params, train, val, lr=lr, order=order, first_order=False).values
