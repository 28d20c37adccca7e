"""Small models for the core tests: each returns ``(model_fn, params, make_batch)``.

``make_batch(n, t, generator)`` draws a batch of ``n`` samples (``t`` tokens where
the model has a sequence axis).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

Built = tuple[Callable, dict[str, torch.Tensor], Callable[[int, int, torch.Generator], Any]]


class IdentityForward(torch.autograd.Function):
    """An ``autograd.Function`` whose forward is the identity (a copy), for subclasses that give it a ``backward`` of
    their own (a gradient reversal, a gradient clip); ``setup_context`` style, with a generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}


def mlp(widths: list[int], bias: bool, dtype: torch.dtype, classes: int = 3) -> Built:
    """A 2-D MLP ``[B, d]`` with tanh, cross-entropy loss (the case GhostSuite crashed on)."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    layers.append(nn.Linear(widths[-1], classes, bias=bias))
    net = nn.Sequential(*layers).to(dtype)

    def model_fn(p: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    def make(n: int, t: int, g: torch.Generator) -> tuple:
        del t
        return torch.randn(n, widths[0], generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)

    return model_fn, _params(net), make


class SeqNet(nn.Module):
    """Embedding (+ positions broadcast as (1, T)) -> linear/norm blocks on [B, T, d] -> pooled head.

    ``tied`` reuses the token embedding as the output projection (cross terms);
    ``shared`` applies one linear layer twice in the forward.
    """

    def __init__(self, vocab: int, d: int, t_max: int, norm: str, bias: bool, padding_idx: int | None,
                 tied: bool, shared: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(t_max, d)
        self.fc = nn.Linear(d, d, bias=bias)
        self.norm: nn.Module = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d) if norm == "rms" else nn.Identity()
        self.tied, self.shared = tied, shared
        self.out = None if tied else nn.Linear(d, vocab, bias=bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t)[None])  # [B, T, d]; positions broadcast (1, T)
        h = torch.tanh(self.fc(h))
        if self.shared:
            h = torch.tanh(self.fc(h))
        h = self.norm(h)
        return F.linear(h, self.emb.weight) if self.tied else self.out(h)  # [B, T, V]


def seq(vocab: int, d: int, norm: str, bias: bool, padding_idx: int | None, tied: bool, shared: bool,
        dtype: torch.dtype, t_max: int = 8) -> Built:
    net = SeqNet(vocab, d, t_max, norm, bias, padding_idx, tied, shared).to(dtype)

    def model_fn(p: dict, ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, p, (ids,))  # [B, T, V]
        return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)  # [B]

    def make(n: int, t: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, vocab, (n, t), generator=g)

    return model_fn, _params(net), make


@contextlib.contextmanager
def _padded_copy_noted() -> Iterator[None]:
    """Without torch's note that ``padding="same"`` with an even kernel pads a copy of the input."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'")
        yield


def conv(dims: int, c: int, k: int, stride: int, padding: int | str, dilation: int, bias: bool, dtype: torch.dtype,
         size: int = 7, groups: int = 1) -> Built:
    """A conv (``2·groups`` input and ``c·groups`` output channels), tanh and a linear head."""
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    body = conv_cls(2 * groups, c * groups, k, stride=stride, padding=padding, dilation=dilation, bias=bias,
                    groups=groups)
    shape = (2 * groups,) + (size,) * dims
    with torch.no_grad(), _padded_copy_noted():
        out_numel = body(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(body, nn.Tanh(), nn.Flatten(), nn.Linear(out_numel, 3, bias=bias)).to(dtype)

    def model_fn(p: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        with _padded_copy_noted():
            return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    def make(n: int, t: int, g: torch.Generator) -> tuple:
        del t
        return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)

    return model_fn, _params(net), make
