"""Dropout under ``vmap`` with the masks of a plain call.

The capture runs ``model_fn`` under ``vmap(randomness="different")``, where a random
op draws one tensor shaped ``[n, *per-sample shape]`` and gives each sample its row. A
plain call ``model_fn(params, batch)`` draws in the memory order of the tensor it drops:
the same masks only when that memory holds the samples one after another. Dropped
sequence-first inside the model, or as a transposed view (``nn.MultiheadAttention``'s
output with ``batch_first=True``), the masks are other draws.

So where a signature's ``vmap`` masks are found not to be the plain call's
(:func:`ghostfunc._graddot.as_plain_draws` compares the losses on its first call), each
batch first runs plainly, without gradients, under :class:`_Record`: every dropout call (:data:`DROPOUTS`) draws its mask as
the plain call does (the op itself on a tensor of ones shaped, strided and typed like its
input), keeps it (one byte per element) and the generator state after it. The capture then
runs under ``vmap`` with :class:`Replay`: the ``k``-th dropout call multiplies by the
``k``-th recorded mask, each sample's slice of it taken along the axis where the plain
tensor has the ``n`` samples and the per-sample one has its own (a mask of a tensor without
a sample axis, such as a dropped parameter, is one mask for all samples, as in the plain
call), and the generator is set to the state the plain call left there, so that random
draws other than dropout (attention's ``dropout_p``) start where the plain call's did.
``F.dropout(x)`` is ``x`` times ``bernoulli(1 - p) / (1 - p)``, so the products are the
plain call's bit for bit. A dropout call the replay cannot map (the samples flattened into
another axis, an axis it cannot tell) raises :class:`NoReplay`, and the capture runs again
as ``vmap`` draws (the plan then says the masks differ: ``ghostfunc._graddot.MASKS_DIFFER``).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

#: Dropout calls whose output is their input times a mask scaled by ``1 / (1 - p)`` (elementwise, or by channel).
DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d})


#: Calls that draw random numbers besides the dropout family, as functions and as tensor methods.
RANDOM = frozenset({
    F.rrelu, torch.rrelu, F.rrelu_, torch.rrelu_, F.gumbel_softmax, torch._standard_gamma, torch._sample_dirichlet,
    torch.binomial, F.fractional_max_pool2d, F.fractional_max_pool3d, F.fractional_max_pool2d_with_indices,
    F.fractional_max_pool3d_with_indices, torch.bernoulli, Tensor.bernoulli, Tensor.bernoulli_, torch.rand,
    torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.normal,
    Tensor.normal_, Tensor.uniform_, Tensor.exponential_, Tensor.geometric_, Tensor.log_normal_, Tensor.cauchy_,
    Tensor.random_, torch.multinomial, Tensor.multinomial, torch.poisson,
    *(getattr(torch.nn.init, name) for name in (
        "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
        "kaiming_normal_", "orthogonal_", "sparse_")),
})


#: The dropout family: each draws only in training mode with ``p > 0`` (:func:`draws`).
ALL_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                          torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
                          torch.native_dropout})

#: The keyword of each dropout's training flag (``F.dropout(..., training=)``, ``torch.dropout(..., train=)``),
#: looked up at import: inside a traced graph a string method of ``func.__module__`` breaks the graph.
_TRAIN_FLAG = {f: "training" if f.__module__.startswith("torch.nn") else "train" for f in ALL_DROPOUTS}


def draws(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call of :data:`ALL_DROPOUTS` or :data:`RANDOM` draws: a dropout only when training with ``p > 0``
    (``nn.Dropout`` in eval mode calls ``F.dropout(x, p, False)``); ``rrelu`` only when training; the rest always."""
    if func in ALL_DROPOUTS:  # F.dropout(input, p=0.5, training=True, ...); torch.dropout(input, p, train)
        flag = _TRAIN_FLAG[func]
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get(flag, True)
        return bool(training) and p > 0
    if func in _RRELU:
        training = args[3] if len(args) > 3 else kwargs.get("training", False)
        return bool(training)
    if func in _FRACTIONAL:  # (regions given: nothing drawn)
        return kwargs.get("_random_samples") is None
    return True


#: ``rrelu``, which draws its slopes only when training, and its in-place forms.
_RRELU = frozenset({F.rrelu, torch.rrelu, F.rrelu_, torch.rrelu_})


#: Calls that draw only through a dropout probability argument: (position, keyword) of that argument.
_DROPOUT_P = {F.scaled_dot_product_attention: (4, "dropout_p"), F.multi_head_attention_forward: (10, "dropout_p")}
#: Those of them that draw only when training: (position, keyword) of that flag (``nn.MultiheadAttention`` in eval
#: mode passes its dropout with ``training=False``: no draw).
_DROPOUT_P_TRAINING = {F.multi_head_attention_forward: (13, "training")}


def undrawn(func: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """The arguments of ``func`` made to run without drawing, as in eval mode: a drawing dropout call (and
    ``rrelu``) with its training flag off, attention with ``dropout_p = 0``; ``None`` where ``func`` draws nothing
    that way. What the checks that compare a batch with its samples alone run a model in training mode with:
    the same deterministic function of each sample, its draws left out (:func:`ghostfunc._interact.check_model`)."""
    if func in ALL_DROPOUTS or func in _RRELU:
        if not draws(func, args, kwargs):
            return None
        if func in ALL_DROPOUTS and (args[1] if len(args) > 1 else kwargs.get("p", 0.5)) >= 1:
            return None  # (p = 1 zeroes its input without drawing: run as it is, not as the identity)
        at, flag = (3, "training") if func in _RRELU else (2, _TRAIN_FLAG[func])
    elif func in _DROPOUT_P:
        at, flag = _DROPOUT_P[func]
        if not (args[at] if len(args) > at else kwargs.get(flag, 0.0)):
            return None
        if (trains := _DROPOUT_P_TRAINING.get(func)) is not None and not (
                args[trains[0]] if len(args) > trains[0] else kwargs.get(trains[1], True)):
            return None
    else:
        return None
    off = False if flag != "dropout_p" else 0.0
    if len(args) > at:
        return (*args[:at], off, *args[at + 1:]), kwargs
    return args, {**kwargs, flag: off}


def _size(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(size, the other keywords)`` of a factory call ``torch.rand(2, 3)``, ``torch.rand((2, 3))`` or
    ``torch.rand(size=(2, 3))``; its generator dropped."""
    rest = {k: v for k, v in kwargs.items() if k not in ("size", "generator")}
    if "size" in kwargs:
        return tuple(kwargs["size"]), rest
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0]), rest
    return tuple(args), rest


#: Where :func:`fixed_draw` puts a continuous draw: this many standard deviations above a normal's mean, this
#: quantile of a uniform range. Not the mean: a zero stand-in for ``torch.randn`` hid couplings it multiplies
#: (``h + torch.randn_like(h) * h.mean(0)`` is ``h``) and made unit-norm noise 0/0, NaN batched and alone alike.
NORMAL_AT, UNIFORM_AT = 0.5, 0.25


def _gumbel_fixed(logits: Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10,
                  dim: int = -1) -> Tensor:
    """``F.gumbel_softmax`` without its noise: the softmax at temperature ``tau`` (``hard``: its argmax one-hot,
    with the softmax's gradient, as torch's straight-through)."""
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    at = soft.argmax(dim, keepdim=True)
    return torch.zeros_like(logits).scatter_(dim, at, 1.0) - soft.detach() + soft


def _normal_fixed(mean: Any, std: Any = 1.0, size: Any = None, **kwargs: Any) -> Tensor:
    """``torch.normal`` without its noise: ``mean + NORMAL_AT * std``, shaped as the draw would be."""
    if size is not None:
        return torch.full(tuple(size), float(mean) + NORMAL_AT * float(std), **kwargs)
    like = torch.broadcast_tensors(*(t for t in (mean, std) if isinstance(t, Tensor)))[0]
    return (torch.zeros_like(like) + mean + NORMAL_AT * std).to(like.dtype)


def _multinomial_top(input: Tensor, num_samples: int, replacement: bool = False) -> Tensor:
    """``torch.multinomial`` without its noise: the most probable categories (the likeliest, repeated, with
    ``replacement``)."""
    if replacement:
        at = input.argmax(-1, keepdim=True)
        return at.expand(*at.shape[:-1], num_samples).contiguous()
    return input.topk(num_samples, -1).indices


def _randint_low(*args: Any, **kw: Any) -> tuple[Any, tuple, dict[str, Any]]:
    """``(low, size, other keywords)`` of ``torch.randint(high, size)`` or ``torch.randint(low, high, size)``."""
    ints = [a for a in args if not isinstance(a, (tuple, list, torch.Size))]
    sizes = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
    low = kw.pop("low", ints[0] if len(ints) > 1 else 0)
    kw.pop("high", None)
    return low, tuple(kw.pop("size", sizes[0] if sizes else ())), kw


def _fixed(func: Any, args: tuple, kw: dict[str, Any]) -> Callable[[], Any] | None:
    """:func:`fixed_draw` of a call, its ``generator`` and ``out`` taken out of ``kw``."""
    if func in (torch.randn, torch.rand):
        size, rest = _size(args, kw)
        value = NORMAL_AT if func is torch.randn else UNIFORM_AT
        return lambda: torch.full(size, value, **rest)
    if func in (torch.randn_like, torch.rand_like):
        x = args[0] if args else kw.pop("input")
        value = NORMAL_AT if func is torch.randn_like else UNIFORM_AT
        return lambda: torch.full_like(x, value, **kw)
    if func is torch.randint:
        low, size, rest = _randint_low(*args, **kw)
        return lambda: torch.full(size, low, **{"dtype": torch.int64, **rest})
    if func is torch.randint_like:  # randint_like(x, high) or randint_like(x, low, high)
        x, more = (args[0], args[1:]) if args else (kw.pop("input"), ())
        low = kw.pop("low", more[0] if len(more) > 1 else 0)
        kw.pop("high", None)
        return lambda: torch.full_like(x, low, **kw)
    if func is torch.randperm:  # reversed: a permutation of the batch's rows (mixup's partners) still mixes them
        n, *_ = args or (kw.pop("n"),)
        return lambda: torch.arange(n - 1, -1, -1, **{"dtype": torch.int64, **kw})
    if func is torch.normal:
        return lambda: _normal_fixed(*args, **kw)
    if func in (torch.bernoulli, Tensor.bernoulli):  # bernoulli(probs) or bernoulli(x, p): 1 where UNIFORM_AT < p
        x = args[0] if args else kw["input"]
        p = args[1] if len(args) > 1 else kw.get("p")
        return (lambda: (x.detach() > UNIFORM_AT).to(x.dtype)) if p is None else (
            lambda: torch.full_like(x, float(float(p) > UNIFORM_AT)))
    if func is torch.poisson:  # the rate, rounded (a count: in the support, where log_prob checks it)
        return lambda: (args[0] if args else kw["input"]).detach().round()
    if func is torch._standard_gamma:  # the mean: the concentration
        return lambda: (args[0] if args else kw["input"]).detach().clone()
    if func is torch._sample_dirichlet:  # the mean (Beta's and Dirichlet's sample)
        return lambda: (lambda c: c / c.sum(-1, keepdim=True))((args[0] if args else kw["input"]).detach())
    if func is torch.binomial:  # the mean: count * prob
        count = args[0] if args else kw["count"]
        prob = args[1] if len(args) > 1 else kw["prob"]
        return lambda: (count * prob).round().to(count.dtype)
    if func in (torch.multinomial, Tensor.multinomial):
        return lambda: _multinomial_top(*args, **kw)
    if func is F.gumbel_softmax:
        return lambda: _gumbel_fixed(*args, **kw)
    if func in _FRACTIONAL:  # pooling regions at fixed offsets: each sample's from its own row
        x = args[0] if args else kw["input"]
        samples = torch.full((x.shape[0] if x.dim() == _FRACTIONAL[func] + 2 else 1, x.shape[-_FRACTIONAL[func] - 1],
                              _FRACTIONAL[func]), UNIFORM_AT, dtype=x.dtype, device=x.device)
        return lambda: func(*args, **{**kw, "_random_samples": samples})
    fill = _FILLS.get(func)
    if fill is None or not args or not isinstance(args[0], Tensor):
        return None
    value = fill(*args[1:], **kw)
    return lambda: args[0].copy_(value) if isinstance(value, Tensor) else args[0].fill_(value)


def fixed_draw(func: Any, args: tuple, kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """A call of :data:`RANDOM` that draws, made to run without drawing: a thunk giving one fixed draw in the shape,
    dtype and device the call would give (in place, or into ``out=``, where the call writes so): normal draws
    :data:`NORMAL_AT` standard deviations above their mean, uniform ones at the :data:`UNIFORM_AT` quantile,
    Bernoulli draws 1 where their probability exceeds it (``rand() < p`` as well), counts (Poisson, binomial)
    their mean rounded (in the support: a ``torch.distributions`` ``log_prob`` validates it), a Gamma's or
    Dirichlet's mean, and for draws of indices a fixed choice (``low``, ``randperm`` reversed, the likeliest
    categories); ``None`` for other calls (and ``nn.init``'s, which draw into parameters at construction, not in
    a forward). With :func:`undrawn`, what the checks comparing a batch with its samples alone run random calls
    as: every draw then the same function of each sample, whatever the batch (``h + 0.1 * torch.randn_like(h)``
    is ``h + 0.05``)."""
    kw = {k: v for k, v in kwargs.items() if k not in ("generator", "out")}
    thunk = _fixed(func, args, kw)
    out = kwargs.get("out")
    if thunk is None or not isinstance(out, Tensor):
        return thunk
    return lambda: (lambda v: out.resize_(v.shape).copy_(v))(thunk())


#: Fractional max pooling, which draws its pooling regions unless given ``_random_samples``: its spatial dims.
_FRACTIONAL = {F.fractional_max_pool2d: 2, F.fractional_max_pool3d: 3, F.fractional_max_pool2d_with_indices: 2,
               F.fractional_max_pool3d_with_indices: 3}

#: The in-place draws' fixed values (as :func:`fixed_draw`), from their arguments after the tensor (torch's
#: defaults).
_FILLS: dict[Any, Callable[..., Any]] = {
    Tensor.normal_: lambda mean=0.0, std=1.0: mean + NORMAL_AT * std,
    Tensor.uniform_: lambda a=0.0, b=1.0, **k: k.get("from", a) + UNIFORM_AT * (k.get("to", b) - k.get("from", a)),
    Tensor.exponential_: lambda lambd=1.0: 1.0 / lambd,
    Tensor.geometric_: lambda p: 1.0 / p,
    Tensor.log_normal_: lambda mean=1.0, std=2.0: math.exp(mean + NORMAL_AT * std),
    Tensor.cauchy_: lambda median=0.0, sigma=1.0: median + NORMAL_AT * sigma,
    Tensor.random_: lambda *a, **k: k.get("from", a[0] if len(a) > 1 else 0),
    Tensor.bernoulli_: lambda p=0.5: (p > UNIFORM_AT).to(p.dtype) if isinstance(p, Tensor) else float(p > UNIFORM_AT),
}


class _Once(threading.local):
    """Whether calls :func:`draws_once` finds draw once (``on``, set by :func:`ghostfunc._graddot.as_plain_draws`
    for a signature where that gives a plain call's losses), and how many such calls the capture met (``seen``)."""

    on = False
    seen = 0


ONCE = _Once()


_VMAP_MODE = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)


def draws_once(func: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call under the capture's ``vmap`` draws random numbers from inputs no sample owns: a random op
    or a call given a ``torch.Generator``, none of whose tensors is batched (``torch.randn(d, d)``, a fill of a
    fresh unbatched tensor, dropout of a parameter). ``vmap(randomness="different")`` gives every sample its own
    draw, which is a plain call's where the per-sample shape stands for the batch's (``torch.rand(x.shape[0], 1)``,
    stochastic depth: each sample its row) and not where the draw is one for the whole batch (``torch.randn(d,
    d)``, a projection from a seeded generator): which one a model means, the comparison with a plain run tells
    (:func:`ghostfunc._graddot.as_plain_draws`)."""
    if func in RANDOM or func in ALL_DROPOUTS:
        if not draws(func, args, kwargs):
            return False  # (eval mode, p = 0: no draw)
    elif kwargs.get("generator") is None:  # (keyword-only in torch's random calls: nothing built per call)
        return False
    ft = torch._C._functorch
    if ft.maybe_current_level() is None:
        return False
    for t in pytree.tree_leaves((args, kwargs)):
        while isinstance(t, Tensor) and ft.is_functorch_wrapped_tensor(t):
            if ft.is_batchedtensor(t):
                return False
            t = ft.get_unwrapped(t)
    return True


def draw_once(func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` drawing as a plain call does (:func:`draws_once`): one draw, not one per sample
    (``vmap``'s random-op handling left out for this call; its generator advances as in the plain call)."""
    with torch._C._ExcludeDispatchKeyGuard(_VMAP_MODE):
        return func(*args, **kwargs)


class NoReplay(Exception):
    """A dropout call of the capture cannot take the plain call's mask: draw as ``vmap`` does instead."""


def host_states() -> tuple[Any, ...]:
    """The states of Python's and (where the program imported it) NumPy's global generators: a model may draw from
    them in its forward (Hugging Face's SpecAugment masks in Wav2Vec2 and HuBERT draw with ``np.random``)."""
    np = sys.modules.get("numpy")
    return (random.getstate(), np.random.get_state() if np is not None else None)


def same_host_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :func:`host_states` are the same (no draw between them)."""
    if a[0] != b[0] or (a[1] is None) != (b[1] is None):
        return False
    if a[1] is None:
        return True
    (kind, key, pos, gauss, cached), (kind2, key2, pos2, gauss2, cached2) = a[1], b[1]
    return (kind, pos, gauss, cached) == (kind2, pos2, gauss2, cached2) and bool((key == key2).all())


@contextlib.contextmanager
def fork_rng(devices: list[int]) -> Iterator[None]:
    """``torch.random.fork_rng(devices)``, Python's and NumPy's global generators forked too: what a check runs
    draws nothing from a run the caller makes (a model drawing from ``np.random`` would otherwise see other
    numbers in a training loop with the checks than without)."""
    host = host_states()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        set_host_states(host)


def set_host_states(host: tuple[Any, ...]) -> None:
    """Put Python's and NumPy's global generators back to :func:`host_states` ``host``."""
    random.setstate(host[0])
    np = sys.modules.get("numpy")
    if np is not None and host[1] is not None:
        np.random.set_state(host[1])


def rng_state(device: torch.device) -> tuple[Tensor, ...]:
    """The global generator states a model's random draws advance (CPU, and the device's)."""
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return (torch.get_rng_state(),)


def set_rng_state(device: torch.device, state: tuple[Tensor, ...]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _bind(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> tuple[Any, float, bool, bool]:
    return input, p, training, inplace


def _drawn(args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, float, bool] | None:
    """``(input, p, inplace)`` of a dropout call that draws (training, ``0 < p < 1``, not empty), else ``None``."""
    x, p, training, inplace = _bind(*args, **kwargs)
    if not training or not isinstance(x, Tensor) or not 0.0 < float(p) < 1.0 or x.numel() == 0:
        return None
    return x, float(p), bool(inplace)


def _scaled(mask: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """The dropout noise ``bernoulli(1 - p) / (1 - p)`` from its kept-or-not mask, as torch computes it."""
    return mask.to(dtype).div_(1.0 - p)


class Mask(NamedTuple):
    """One dropout call of a plain run: which elements it kept (the input's shape), ``p``, the state after."""

    kept: Tensor
    p: float
    after: tuple[Tensor, ...]


class Recorded(NamedTuple):
    """A plain run of one batch: the generator states (of ``device``'s generators) before and after it, and its
    dropout masks in order."""

    start: tuple[Tensor, ...]
    masks: tuple[Mask, ...]
    end: tuple[Tensor, ...]
    device: torch.device


class _Record(TorchFunctionMode):
    """Runs dropout calls as the plain call does, keeping their masks (:class:`Mask`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.masks: list[Mask] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        drawn = _drawn(args, kwargs) if func in DROPOUTS else None
        if drawn is None:
            return func(*args, **kwargs)
        x, p, inplace = drawn
        kept = func(torch.ones_like(x), p, True, False) != 0  # the draws of func(x): same shape, strides, dtype
        self.masks.append(Mask(kept, p, rng_state(self.device)))
        noise = _scaled(kept, p, x.dtype)
        return x.mul_(noise) if inplace else x * noise


def record(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, device: torch.device,
           guard: Callable[[], Any]) -> Recorded | None:
    """``model_fn(params, batch)`` run plainly without gradients (under ``guard()``, a context manager),
    recording its dropout masks; the generator is left where the run left it. ``None`` (and the generator as
    it was) when the run raises: the capture draws as ``vmap`` does, and explains its own errors."""
    start = rng_state(device)
    mode = _Record(device)
    try:
        with torch.no_grad(), guard(), mode:
            model_fn(dict(params), batch.rebuild(list(batch.tensors)))
    except Exception:  # noqa: BLE001 - a model that runs only under vmap, or a mistake the capture names
        set_rng_state(device, start)
        return None
    return Recorded(start, tuple(mode.masks), rng_state(device), device)


class Replay:
    """The recorded masks of one batch of ``n`` samples, taken in order by the capture's dropout calls."""

    def __init__(self, recorded: Recorded, n: int) -> None:
        self.recorded, self.n = recorded, n
        self.k = 0

    def __call__(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        drawn = _drawn(args, kwargs)
        if drawn is None:
            return func(*args, **kwargs)
        x, p, inplace = drawn
        if self.k >= len(self.recorded.masks) or self.recorded.masks[self.k].p != p:
            raise NoReplay(f"dropout call {self.k} is not the plain run's")
        mask = self.recorded.masks[self.k]
        self.k += 1
        noise = self._per_sample(_scaled(mask.kept, p, x.dtype), tuple(x.shape))
        set_rng_state(self.recorded.device, mask.after)
        return x.mul_(noise) if inplace else x * noise

    def _per_sample(self, noise: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``noise`` (the plain tensor's shape) as the per-sample tensor shaped ``shape`` sees it: the same for
        every sample when the shapes agree, else each sample's slice along the plain tensor's sample axis."""
        plain = tuple(noise.shape)
        if plain == shape:
            return noise  # no sample axis: one mask for all samples, as in the plain call
        n = self.n
        slot = [i for i in range(len(plain)) if len(shape) == len(plain) and plain[i] == n and shape[i] == 1
                and plain[:i] + plain[i + 1:] == shape[:i] + shape[i + 1:]]
        gone = [i for i in range(len(plain)) if len(shape) + 1 == len(plain) and plain[i] == n
                and plain[:i] + plain[i + 1:] == shape]
        if len(slot) + len(gone) != 1:
            raise NoReplay(f"no single sample axis between the plain shape {list(plain)} and {list(shape)}")
        ft = torch._C._functorch
        level = ft.maybe_current_level()
        if level is None:
            raise NoReplay("not under vmap")
        i = (slot or gone)[0]
        batched = ft._add_batch_dim(noise, i, level)  # per sample: the plain tensor less its sample axis
        return batched.unsqueeze(i) if slot else batched
