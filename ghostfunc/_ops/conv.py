"""Convolutions: ``F.conv1d`` and ``F.conv2d`` with stride, padding and dilation.

Unfolding the input into patches makes a conv a linear map shared over the output
positions: ``x [b, c_in, *spatial] -> patches [t, c_in·k]`` with ``t`` the output
positions, so ``g_W = Σ_t B[t] ⊗ patch[t]`` (factored, ``[c_out, c_in·k]``) and
``g_b = Σ_t B[t]`` (direct). Grouped convs and string padding take the fallback.
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
            if groups != 1 or isinstance(padding, str):
                return None
            roles = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            static = (_pair(stride, dims), _pair(padding, dims), _pair(dilation, dims), dims)
            return Match(roles, (input,), static)

        return bind(*args, **kwargs)

    return match


def _grad(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    (x,) = saved
    stride, padding, dilation, spatial = static  # spatial rank: the conv's, whatever the role's shape
    if x.dim() == spatial + 2:  # the model called the conv on one unbatched sample: x [n, c_in, *in_spatial]
        x, grad_out = x[:, None], grad_out[:, None]
    # x: [n, b, c_in, *in_spatial], grad_out: [n, b, c_out, *out_spatial]; b is the model's batch axis
    if role == "bias":
        return Direct(grad_out.flatten(3).sum(dim=(1, 3)))  # [n, c_out]
    kernel = tuple(shape[2:])
    if spatial == 1:  # conv1d: a height-1 conv2d
        x, grad_out = x[..., None, :], grad_out[..., None, :]
        stride, padding, dilation, kernel = (1, *stride), (0, *padding), (1, *dilation), (1, *kernel)
    n = x.shape[0]
    patches = F.unfold(x.flatten(0, 1), kernel, dilation=dilation, padding=padding, stride=stride)
    right = rearrange(patches, "(n b) k t -> n (b t) k", n=n)  # [n, t, c_in·kh·kw]
    left = rearrange(grad_out, "n b o h w -> n (b h w) o")  # [n, t, c_out]
    return Factored(left, right, shape[0])


CONV1D = Rule("conv1d", _matcher(1), _grad, frozenset({"weight"}))
CONV2D = Rule("conv2d", _matcher(2), _grad, frozenset({"weight"}))

TABLE: dict[Callable[..., Any], Rule] = {F.conv1d: CONV1D, F.conv2d: CONV2D}
