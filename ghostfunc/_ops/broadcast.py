"""A parameter broadcast to a larger shape: ``w.expand(*sizes)``, ``torch.broadcast_to(w, shape)``.

Learned tokens are used this way (ViT's ``cls_token.expand(B, -1, -1)``, CLIP's
``class_embedding.expand(B, 1, -1)``). ``y = expand(w)`` copies ``w`` along the
new and the size-1 axes, so ``g_w = sum_to(B, w.shape)``: direct.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import Direct, Grad, Match, Rule, sum_to


def _match(args: tuple, kwargs: dict[str, Any]) -> Match | None:
    if not args or not isinstance(args[0], Tensor):
        return None
    return Match({"weight": args[0]}, (), None)


def _grad(static: Any, saved: tuple[Tensor, ...], grad_out: Tensor, role: str, shape: torch.Size) -> Grad:
    del static, saved, role
    return Direct(sum_to(grad_out, shape))


BROADCAST = Rule("expand", _match, _grad)

TABLE: dict[Callable[..., Any], Rule] = {
    Tensor.expand: BROADCAST,
    Tensor.expand_as: BROADCAST,
    torch.broadcast_to: BROADCAST,
}
