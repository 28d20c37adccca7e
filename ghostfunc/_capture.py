"""Capture: every recognised op's input ``A`` and output gradient ``B`` in one backward.

``model_fn`` runs once per batch under ``vmap`` (so every op sees one sample and
the per-sample structure is exact, whatever the layout: flattened, broadcast,
sequence-first) inside a :class:`torch.overrides.TorchFunctionMode` that knows the
trainable parameters by identity. A recognised call records its saved inputs and
adds a zero *tap* to its output; ``torch.func.vjp`` with respect to the taps gives
every ``B``. Parameters used any other way are handed to the model as per-sample
copies (``p.expand(n, ...)``), so the same backward pass gives their exact
per-sample gradients (the ``vmap(grad)`` fallback, fused into the one pass). No
graph is built for the parameters themselves.

Tap shapes come from a *trace*: the same run on one sample under ``no_grad``,
cached by input signature; a real run that meets a different sequence of calls
raises :class:`_Stale` and is traced again, so a stale cache cannot give a wrong
number.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ._ops import TABLE, Direct, Factored, Rule, SamplesInteractError

ModelFn = Callable[[dict[str, Tensor], Any], Tensor]


class Site(NamedTuple):
    """One recognised call that touches trainable parameters (per-sample view)."""

    rule: Rule
    roles: tuple[tuple[str, str], ...]  # (role, parameter name)
    out_shape: torch.Size
    out_dtype: torch.dtype


class Trace(NamedTuple):
    sites: tuple[Site, ...]
    other_uses: dict[str, str]  # parameter name -> the unrecognised call that used it


class _Stale(Exception):
    """The run met a different sequence of calls than the trace: trace again."""


class Batch(NamedTuple):
    """A batch pytree split into its tensor leaves (sample axis first) and the rest."""

    tensors: list[Tensor]
    rebuild: Callable[[list[Tensor]], Any]
    size: int
    signature: tuple


def split_batch(batch: Any) -> Batch:
    leaves, spec = pytree.tree_flatten(batch)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    def rebuild(tensors: list[Tensor]) -> Any:
        out = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            out[i] = t
        return pytree.tree_unflatten(out, spec)

    tensors = [leaves[i] for i in where]
    sig = tuple(
        (tuple(leaf.shape[1:]), leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else _hashable(leaf)
        for leaf in leaves
    )
    return Batch(tensors, rebuild, tensors[0].shape[0] if tensors else 0, (str(spec), sig))


def _hashable(x: Any) -> Any:
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return (type(x), x)


class _Interceptor(TorchFunctionMode):
    """Recognises calls on trainable parameters; traces them, or taps them.

    With ``taps is None`` it traces: records every recognised call as a
    :class:`Site` and every other use of a parameter. Otherwise it expects the
    sites ``expect`` in order, adds ``taps[k]`` to the ``k``-th output and keeps
    the rule's saved tensors.
    """

    def __init__(self, names: dict[int, str], taps: tuple[Tensor, ...] | None = None,
                 expect: tuple[Site, ...] = ()) -> None:
        super().__init__()
        self.names = names
        self.taps = taps
        self.expect = expect
        self.sites: list[Site] = []
        self.other_uses: dict[str, str] = {}
        self.saved: list[Tensor] = []
        self.statics: list[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _TO_PYTHON and args and _batch_level_count(args[0]) == 1:
            return _agreed_value(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            func = _sdpa
        found = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor) and id(leaf) in self.names]
        if not found:
            return func(*args, **kwargs)
        rule = TABLE.get(func)
        match = rule.match(args, kwargs) if rule is not None else None
        roles: dict[str, str] = {}
        if match is not None:
            for role, t in match.roles.items():
                if id(t) in self.names:
                    roles[role] = self.names[id(t)]
                    hit = next((i for i, f in enumerate(found) if f is t), None)
                    if hit is not None:
                        del found[hit]
        out = func(*args, **kwargs)
        if found and _makes_tensor(out, found):
            if self.taps is not None:
                raise _Stale(f"{_name(func)} used {self.names[id(found[0])]}")
            for t in found:
                self.other_uses.setdefault(self.names[id(t)], _name(func))
        if not roles or match is None or rule is None:
            return out
        site = Site(rule, tuple(sorted(roles.items())), out.shape, out.dtype)
        if self.taps is None:
            self.sites.append(site)
            return out
        k = len(self.statics)
        if k >= len(self.expect) or self.expect[k] != site:
            raise _Stale(f"call {k} is {rule.kind} on {roles}, the trace expected {self.expect[k:k + 1]}")
        self.saved.extend(match.saved)
        self.statics.append((match.static, len(match.saved)))
        return out + self.taps[k]


#: Calls that turn a tensor into a Python value, i.e. data-dependent control flow.
_TO_PYTHON = {
    Tensor.__bool__, Tensor.item, Tensor.__int__, Tensor.__float__, Tensor.__index__,
    Tensor.__contains__, Tensor.tolist, Tensor.__format__,  # f"{tensor}" in an error message
}


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
          *args: Any, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` as it runs outside ``vmap``; two gaps under ``vjp(vmap)``.

    - Autocast: outside ``vmap`` it casts the floating inputs to the autocast dtype;
      under ``vmap`` it does not (mixed dtypes then fail), so the cast is done here.
    - A floating ``attn_mask`` carrying gradient (a learned bias, e.g. T5's position
      bias): the batched mask reports ``requires_grad=False`` (the gradient lives one
      functorch level down), so sdpa may pick a fused CPU kernel without a derivative
      for the mask; the composite math kernel runs instead.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)

        def cast(x: Any) -> Any:
            return x.to(low) if isinstance(x, Tensor) and x.is_floating_point() else x

        query, key, value, attn_mask = cast(query), cast(key), cast(value), cast(attn_mask)
    if _needs_grad(attn_mask):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)
    return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)


_sdpa.__name__ = _sdpa.__qualname__ = "scaled_dot_product_attention"


def _needs_grad(x: Any) -> bool:
    """A floating tensor that requires grad at some functorch level."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return False
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):
        if x.requires_grad:
            return True
        x = ft.get_unwrapped(x)
    return x.requires_grad


def _batch_level_count(x: Any) -> int:
    count = 0
    while isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
        count += int(torch._C._functorch.is_batchedtensor(x))
        x = torch._C._functorch.get_unwrapped(x)
    return count


def _per_sample(x: Tensor) -> Tensor:
    """The plain tensor under the (single) vmap level, sample axis first."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):
        x = ft.get_unwrapped(x).movedim(ft.maybe_get_bdim(x), 0) if ft.is_batchedtensor(x) else ft.get_unwrapped(x)
    return x


class DivergentBranchError(ValueError):
    """``model_fn`` branches on tensor values and the samples of a batch disagree."""


def _agreed_value(func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Data-dependent control flow under vmap: the answer if every sample gives the same one.

    Each sample alone (the single-sample reference) would take the branch its own
    value picks; when all agree, that branch is exact for the whole batch.
    """
    if any(_batch_level_count(a) for a in pytree.tree_leaves((args[1:], kwargs))):
        return func(*args, **kwargs)  # let functorch raise its own error
    values = [func(row, *args[1:], **kwargs) for row in _per_sample(args[0])]
    if any(v != values[0] for v in values[1:]):
        raise DivergentBranchError(
            f"model_fn turns a tensor into a Python value ({_name(func)}) and the samples of the batch "
            f"disagree (values {values[:8]}{'...' if len(values) > 8 else ''}); ghostfunc runs every sample "
            f"through the same sequence of calls, so it cannot follow per-sample branches. Compute the "
            f"branch with tensor ops (torch.where) or pass inputs that avoid it"
        )
    return values[0]


def _makes_tensor(out: Any, found: list[Tensor]) -> bool:
    return any(isinstance(o, Tensor) and not any(o is f for f in found) for o in pytree.tree_leaves(out))


def _name(func: Any) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None) or ""
    return f"{mod}.{qual}" if mod and not qual.startswith(mod) else qual


def _one_loss(losses: Any, where: str) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (1,):
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{where}: model_fn(params, batch) must return one loss per sample, a tensor of shape [B]; "
            f"for a batch of 1 sample it returned {got}"
        )
    if not losses.is_floating_point():
        raise ValueError(f"{where}: model_fn must return floating-point losses, got {losses.dtype}")
    return losses[0]


def _unsqueeze_all(tensors: list[Tensor]) -> list[Tensor]:
    return [t.unsqueeze(0) for t in tensors]


_TRACES: weakref.WeakKeyDictionary[Any, dict[tuple, Trace]] = weakref.WeakKeyDictionary()


def trace(model_fn: ModelFn, params: Mapping[str, Tensor], batch: Batch, where: str, *, fresh: bool = False) -> Trace:
    """Run ``model_fn`` on the first sample of ``batch`` and record its parametrised calls."""
    key = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in params.items()), batch.signature)
    try:
        cache = _TRACES.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable: trace every call
        cache = {}
    if not fresh and key in cache:
        return cache[key]
    names = {id(v): k for k, v in params.items()}
    mode = _Interceptor(names)

    def one(tensors: list[Tensor]) -> Tensor:
        with mode:
            losses = model_fn(dict(params), batch.rebuild(_unsqueeze_all(tensors)))
        return _one_loss(losses, where)

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _rephrase(where):
        torch.func.vmap(one, randomness="different")([t[:1] for t in batch.tensors])
    result = Trace(tuple(mode.sites), mode.other_uses)
    if len(cache) > 16:
        cache.clear()
    cache[key] = result
    return result


class _rephrase:
    """Turn errors from inside the model into ones that name the public function.

    Also silences functorch's notice that an op has no batching rule (it then
    loops over samples: slower, still exact), e.g. CPU flash attention.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        self._warnings.__exit__(None, None, None)
        for kind in (SamplesInteractError, DivergentBranchError):
            if isinstance(err, kind) and not str(err).startswith(self.where):
                raise kind(f"{self.where}: {err}") from None
        if isinstance(err, RuntimeError) and "vmap" in str(err) and ("inplace" in str(err) or "in-place" in str(err)):
            raise SamplesInteractError(
                f"{self.where}: the model writes batch-dependent values into a tensor shared by all "
                f"samples (for example BatchNorm running statistics), so samples interact; "
                f"put such layers in eval mode. The underlying error was: {err}"
            ) from err
        return None


class Captured(NamedTuple):
    """Everything one backward pass gives, split by train and val rows.

    ``grads[name] = (train_uses, val_uses)``: lists of :class:`Factored` or
    :class:`Direct` per-sample gradients, one per use of the parameter.
    """

    train_loss: Tensor
    val_loss: Tensor
    grads: dict[str, tuple[list[Factored | Direct], list[Factored | Direct]]]


def capture(model_fn: ModelFn, params: Mapping[str, Tensor], train: Batch, val: Batch,
            traces: tuple[Trace, Trace], kernel: set[str], where: str) -> Captured:
    """One forward over train and val (each under ``vmap``) and one tap backward."""
    names = {id(params[k]): k for k in kernel}
    fallback = [k for k in params if k not in kernel]
    expect = tuple(_keep(traces[0].sites, kernel)), tuple(_keep(traces[1].sites, kernel))
    statics: list[list[Any]] = [[], []]

    def per_sample(which: int) -> Callable:
        def f(taps: tuple[Tensor, ...], fb: tuple[Tensor, ...], tensors: list[Tensor]) -> tuple[Tensor, tuple]:
            mode = _Interceptor(names, taps, expect[which])
            with mode:
                losses = model_fn({**params, **dict(zip(fallback, fb, strict=True))},
                                  (train, val)[which].rebuild(_unsqueeze_all(tensors)))
            if len(mode.statics) != len(expect[which]):
                raise _Stale(f"{len(mode.statics)} recognised calls, the trace had {len(expect[which])}")
            statics[which] = mode.statics
            return _one_loss(losses, where), tuple(mode.saved)

        return f

    def run(taps_t: tuple, taps_v: tuple, fb_t: tuple, fb_v: tuple) -> tuple:
        lt, st = torch.func.vmap(per_sample(0), randomness="different")(taps_t, fb_t, train.tensors)
        lv, sv = torch.func.vmap(per_sample(1), randomness="different")(taps_v, fb_v, val.tensors)
        return (lt, lv), (st, sv)

    def zeros(sites: tuple[Site, ...], n: int) -> tuple[Tensor, ...]:
        device = next(iter(params.values())).device
        return tuple(torch.zeros((), dtype=s.out_dtype, device=device).expand(n, *s.out_shape) for s in sites)

    def copies(n: int) -> tuple[Tensor, ...]:
        return tuple(params[k].expand(n, *params[k].shape) for k in fallback)

    primals = (zeros(expect[0], train.size), zeros(expect[1], val.size), copies(train.size), copies(val.size))
    with _rephrase(where):
        (lt, lv), pullback, (st, sv) = torch.func.vjp(run, *primals, has_aux=True)  # type: ignore[misc]
    _check_finite(lt, "train", where)
    _check_finite(lv, "val", where)
    # One backward: free each saved activation once used (as an ordinary backward does) and record no
    # graph of the backward itself; otherwise every activation lives until the end (~1.3x peak memory).
    b_t, b_v, fb_t, fb_v = pullback((torch.ones_like(lt), torch.ones_like(lv)), retain_graph=False,
                                    create_graph=False)
    del pullback
    grads: dict[str, tuple[list, list]] = {k: ([], []) for k in params}
    for which, (sites, saved, outs, fbs) in enumerate(((expect[0], st, b_t, fb_t), (expect[1], sv, b_v, fb_v))):
        at = 0
        for site, (static, count), out in zip(sites, statics[which], outs, strict=True):
            mine, at = saved[at:at + count], at + count
            for role, name in site.roles:
                shape = params[name].shape
                g = site.rule.grad(static, mine, out, role, shape)
                grads[name][which].append(_in_dtype(g, params[name].dtype))
        for k, g in zip(fallback, fbs, strict=True):
            grads[k][which].append(Direct(g))
    return Captured(lt.detach(), lv.detach(), grads)


def _in_dtype(g: Factored | Direct, dtype: torch.dtype) -> Factored | Direct:
    """A per-sample gradient in its parameter's dtype.

    Under autocast an op's saved input and output gradient can differ (a float32
    input, a bfloat16 output gradient); autograd returns a float32 parameter's
    gradient in float32, and so do the kernels.
    """

    def cast(x: Tensor) -> Tensor:
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    if isinstance(g, Direct):
        return Direct(cast(g.grad))
    return g._replace(left=cast(g.left), right=cast(g.right))


def _keep(sites: tuple[Site, ...], kernel: set[str]) -> list[Site]:
    kept = []
    for s in sites:
        roles = tuple((r, n) for r, n in s.roles if n in kernel)
        if roles:
            kept.append(s._replace(roles=roles))
    return kept


def _check_finite(losses: Tensor, which: str, where: str) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"{where}: model_fn returned non-finite losses for {which} samples {idx} "
            f"(values {losses[bad].tolist()}); per-sample gradients of those samples are undefined"
        )
