"""Recurrent layers as gate linears, so their weights get the factored kernels (as Opacus' DP-RNNs do).

``nn.LSTM``/``nn.GRU``/``nn.RNN`` call fused kernels (``torch.lstm``, ...) that
have no batching rule and hide their weights from the interceptor. Here each is
rewritten, for one call, as the same arithmetic in recognised calls:

- input projection of every step at once: ``F.linear(x, W_ih, b_ih)``, ``x`` ``[B, T, I]``
  (the weight sees ``T`` tokens per sample);
- recurrence, one step at a time: ``F.linear(h, W_hh, b_hh)`` ``[B, H]``;
- LSTM: ``i, f, g, o = σ, σ, tanh, σ`` of the gate sums; ``c' = f⊙c + i⊙g``;
  ``h' = o⊙tanh(c')`` (then ``F.linear(h', W_hr)`` with ``proj_size``);
- GRU: ``r, z = σ(x_r + h_r), σ(x_z + h_z)``; ``n = tanh(x_n + r⊙h_n)``;
  ``h' = (1 − z)⊙n + z⊙h``; RNN: ``h' = tanh or relu(x + h)``.

The interceptor runs the rewrite with itself active, so every ``F.linear`` is
tapped like any other. Packed sequences are not rewritten (their parameters
take the per-sample path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Cell = Callable[[Tensor, Any, Sequence[Any]], tuple[Tensor, Any]]  # (x_proj_t, state, weights) -> (out, state)


def _lstm_step(xp: Tensor, state: tuple[Tensor, Tensor], w: Sequence[Any]) -> tuple[Tensor, tuple]:
    """One LSTM step from the projected input ``xp`` ``[B, 4H]``; ``w``: (w_hh, b_hh or None, w_hr or None)."""
    h, c = state
    i, f, g, o = (xp + F.linear(h, w[0], w[1])).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w[2] is not None:
        h = F.linear(h, w[2])
    return h, (h, c)


def _gru_step(xp: Tensor, h: Tensor, w: Sequence[Any]) -> tuple[Tensor, Tensor]:
    xr, xz, xn = xp.chunk(3, -1)
    hr, hz, hn = F.linear(h, w[0], w[1]).chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h = (1 - z) * n + z * h
    return h, h


def _rnn_step(act: Callable[[Tensor], Tensor]) -> Cell:
    def step(xp: Tensor, h: Tensor, w: Sequence[Any]) -> tuple[Tensor, Tensor]:
        h = act(xp + F.linear(h, w[0], w[1]))
        return h, h

    return step


def _layers(step: Cell, lstm: bool) -> Callable[..., Any]:
    """The multi-layer, maybe bidirectional, unpacked call ``torch.lstm/gru/rnn_*(input, hx, params, ...)``."""

    def run(x: Tensor, hx: Any, params: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
            train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, ...]:
        dirs = 2 if bidirectional else 1
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, hx)  # c0 is read for LSTMs only
        per = len(params) // (num_layers * dirs)  # w_ih, w_hh, [b_ih, b_hh], [w_hr]
        seq = x.transpose(0, 1) if batch_first else x  # [T, B, I]
        h_n, c_n = [], []
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                w = list(params[k * per:(k + 1) * per])
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                w_hr = w[-1] if per in (3, 5) else None
                xs = seq.flip(0) if d == 1 else seq
                proj = F.linear(xs, w_ih, b_ih)  # [T, B, gates·H]: every step's input at once
                state: Any = (h0[k], c0[k]) if lstm else h0[k]
                ys = []
                for t in range(xs.shape[0]):
                    y, state = step(proj[t], state, (w_hh, b_hh, w_hr) if lstm else (w_hh, b_hh))
                    ys.append(y)
                out = torch.stack(ys)  # [T, B, H_out]
                outs.append(out.flip(0) if d == 1 else out)
                h_n.append(state[0] if lstm else state)
                if lstm:
                    c_n.append(state[1])
            seq = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if dropout and train and layer < num_layers - 1:
                seq = F.dropout(seq, dropout, training=True)
        output = seq.transpose(0, 1) if batch_first else seq
        if lstm:
            return output, torch.stack(h_n), torch.stack(c_n)
        return output, torch.stack(h_n)

    return run


def _cell(step: Cell, lstm: bool) -> Callable[..., Any]:
    """``torch.lstm_cell/gru_cell/rnn_*_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None)``."""

    def run(x: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
            b_hh: Tensor | None = None) -> Any:
        state = (hx[0], hx[1]) if lstm else hx
        _, state = step(F.linear(x, w_ih, b_ih), state, (w_hh, b_hh, None) if lstm else (w_hh, b_hh))
        return state

    return run


_LAYERS = {torch.lstm: _layers(_lstm_step, True), torch.gru: _layers(_gru_step, False),
           torch.rnn_tanh: _layers(_rnn_step(torch.tanh), False),
           torch.rnn_relu: _layers(_rnn_step(torch.relu), False)}
_CELLS = {torch.lstm_cell: _cell(_lstm_step, True), torch.gru_cell: _cell(_gru_step, False),
          torch.rnn_tanh_cell: _cell(_rnn_step(torch.tanh), False),
          torch.rnn_relu_cell: _cell(_rnn_step(torch.relu), False)}


def decompose(func: Any, args: tuple, kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """The recurrent call rewritten in recognised calls (run it with the interceptor active), or ``None``."""
    if func in _CELLS:
        return lambda: _CELLS[func](*args, **kwargs)
    if func in _LAYERS and not kwargs and len(args) == 9 and isinstance(args[3], bool):
        return lambda: _LAYERS[func](*args)  # unpacked (input, hx, params, has_biases, ...); packed has params at 3
    return None


#: The calls :func:`decompose` knows.
RECURRENT = frozenset({*_LAYERS, *_CELLS})
