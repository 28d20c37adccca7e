"""Convolutions: ``F.conv1d`` and ``F.conv2d`` with stride, padding, dilation and groups.

Unfolding the input into patches makes a conv a linear map shared over the output
positions: ``x [b, c_in, *spatial] -> patches [t, c_in·k]`` with ``t`` the output
positions, so ``g_W = Σ_t B[t] ⊗ patch[t]`` (factored, ``[c_out, c_in·k]``) and
``g_b = Σ_t B[t]`` (direct). A grouped conv (``groups = G > 1``: depthwise convs too)
is ``G`` such maps side by side, each block of ``c_out/G`` output channels reading its
own ``c_in/G`` input channels, so its weight gradient is block-diagonal, not one
``Σ_t`` of outer products: it is kept whole (direct), ``[c_out, c_in/G·k]`` per sample
from one batched product over the groups, the multiply-adds an ordinary backward
pass spends on that weight's gradient. ``padding="valid"`` is 0 and ``"same"`` the
padding it stands for (an odd total puts the extra position on the high side, as
torch does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ._base import Direct, Factored, Grad, Match, Rule


def _pair(v: Any, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _matcher(dims: int):
    def match(args: tuple, kwargs: dict[str, Any]) -> Match | None:
        def bind(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Match | None:
            dilation = _pair(dilation, dims)
            pads = _padding(padding, tuple(weight.shape[2:]), dilation) if isinstance(padding, str) else \
                tuple((v, v) for v in _pair(padding, dims))
            if pads is None or not isinstance(groups, int):
                return None
            roles = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            static = (_pair(stride, dims), pads, dilation, dims, groups)
            return Match(roles, (input,), static, None if groups == 1 else GROUPED[dims])

        return bind(*args, **kwargs)

    return match


def _padding(padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """``(low, high)`` per spatial axis for ``padding="valid"`` or ``"same"`` (``None``: another string, which the
    call itself refuses)."""
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding != "same":
        return None
    total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    return tuple((v // 2, v - v // 2) for v in total)


def _grad(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    (x,) = saved
    stride, padding, dilation, spatial, groups = static  # spatial rank: the conv's, whatever the role's shape
    if x.dim() == spatial + 2:  # the model called the conv on one unbatched sample: x [n, c_in, *in_spatial]
        x, grad_out = x[:, None], grad_out[:, None]
    # x: [n, b, c_in, *in_spatial], grad_out: [n, b, c_out, *out_spatial]; b is the model's batch axis
    if role == "bias":
        return Direct(grad_out.flatten(3).sum(dim=(1, 3)))  # [n, c_out]
    kernel = tuple(shape[2:])
    if any(lo != hi for lo, hi in padding):  # "same" with an odd total: padded here, as torch pads it
        x = F.pad(x, [v for pair in reversed(padding) for v in pair])
        padding = ((0, 0),) * spatial
    padding = tuple(lo for lo, _ in padding)
    if spatial == 1:  # conv1d: a height-1 conv2d
        x, grad_out = x[..., None, :], grad_out[..., None, :]
        stride, padding, dilation, kernel = (1, *stride), (0, *padding), (1, *dilation), (1, *kernel)
    n = x.shape[0]
    patches = F.unfold(x.flatten(0, 1), kernel, dilation=dilation, padding=padding, stride=stride)
    if groups != 1:  # per group g: Σ over the model's batch axis and positions of B_g ⊗ patch_g, kept whole
        patch = rearrange(patches, "(n b) (g k) t -> n g (b t) k", n=n, g=groups)  # [n, G, t, c_in/G·kh·kw]
        out = rearrange(grad_out, "n b (g o) h w -> n g o (b h w)", g=groups)  # [n, G, c_out/G, t]
        return Direct((out @ patch).reshape(n, *shape))  # [n, G, c_out/G, c_in/G·kh·kw] -> [n, *weight shape]
    right = rearrange(patches, "(n b) k t -> n (b t) k", n=n)  # [n, t, c_in·kh·kw]
    left = rearrange(grad_out, "n b o h w -> n (b h w) o")  # [n, t, c_out]
    return Factored(left, right, shape[0])


CONV1D = Rule("conv1d", _matcher(1), _grad, frozenset({"weight"}))
CONV2D = Rule("conv2d", _matcher(2), _grad, frozenset({"weight"}))
#: Grouped convs (``groups > 1``): the same calls, the weight's per-sample gradient kept whole.
GROUPED = {1: Rule("conv1d (grouped)", CONV1D.match, _grad), 2: Rule("conv2d (grouped)", CONV2D.match, _grad)}

TABLE: dict[Callable[..., Any], Rule] = {F.conv1d: CONV1D, F.conv2d: CONV2D}
