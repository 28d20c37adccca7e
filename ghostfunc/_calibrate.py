"""The cost model's memory-traffic constants, and a way to measure them on the device in use.

:func:`ghostfunc._plan.costs` counts each kernel in multiply-add equivalents. The
GEMMs are counted exactly; two terms are memory traffic, whose price in
multiply-adds depends on the machine (cache sizes, bandwidth against FLOPs):

- ``materialise``: per element of a materialised per-row gradient block
  (written by a ``bmm``, read to dot it and to sum it);
- ``gram``: per (train token, val token) pair of the Gram kernel.

The environment variable ``GHOSTFUNC_COSTS`` chooses them: unset or ``"default"``,
the constants fitted on a 2-core CPU (:data:`DEFAULT`); ``"measure"``, measured once
per process and ``(device, dtype)`` by :func:`measure` (a few tens of milliseconds:
the real kernels :func:`ghostfunc._kernels.materialise_dots` and
:func:`ghostfunc._kernels.gram` on small synthetic factors against a GEMM of known
size, the fastest of a few repeats; kept for the process, nothing written to disk);
``"materialise=96,gram=32"``, given values.

Measuring is opt-in because, on the machine it was tried on, it routed worse than
the fixed constants (``benchmarks/mlp2d.py``, both in the same run: auto within 5% of
the fastest kernel in 14/25 cells measured, 17/25 fixed): synthetic factors in an
otherwise idle cache understate the block traffic of a real capture.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _kernels as K
from ._ops import Factored

ENV = "GHOSTFUNC_COSTS"


class Constants(NamedTuple):
    """Multiply-add equivalents of one materialised block element and of one Gram token pair.

    ``source``: ``"default"``, ``"env"`` or ``"measured"``.
    """

    materialise: float
    gram: float
    source: str


#: Fitted once on a 2-core CPU (``benchmarks/mlp2d.py``): materialise 50-180, gram 25-65.
DEFAULT = Constants(96.0, 32.0, "default")
#: Measured figures are clipped to this range (a timer glitch must not send every call one way).
LIMITS = (1.0, 2000.0)

_MEASURED: dict[tuple, Constants] = {}


def constants(device: torch.device, dtype: torch.dtype) -> Constants:
    """The constants for kernels on ``device`` in ``dtype`` as ``GHOSTFUNC_COSTS`` says (default: :data:`DEFAULT`)."""
    setting = os.environ.get(ENV, "default").strip()
    if setting != "measure":
        return parse(setting)
    key = (device.type, device.index, dtype, torch.__version__)
    if key not in _MEASURED:
        _MEASURED[key] = measure(device, dtype)
    return _MEASURED[key]


def parse(text: str) -> Constants:
    """``"default"`` or ``"materialise=<float>,gram=<float>"`` (either may be left out)."""
    if text.strip() in ("default", ""):
        return DEFAULT
    values = {"materialise": DEFAULT.materialise, "gram": DEFAULT.gram}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in values:
            raise ValueError(f"{ENV}: expected 'default', 'measure' or 'materialise=<float>,gram=<float>'; "
                             f"got {text!r}")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{ENV}: {name.strip()} must be a number; got {value!r}") from None
    return Constants(values["materialise"], values["gram"], "env")


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls (after one warm-up), synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device: torch.device, dtype: torch.dtype) -> Constants:
    """Time a GEMM, the fused materialise and the Gram kernel on small factors; express the last two
    in multiply-adds of the first, minus their own GEMM work (a few milliseconds on a CPU)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    big = 4 if device.type == "cuda" else 1  # GPUs need larger problems to leave the launch-bound regime
    k = 192 * big
    a, b = rand(k, k), rand(k, k)
    _seconds(lambda: a @ b, device)  # wake the thread pool
    per_mac = _seconds(lambda: a @ b, device, repeats=5) / k**3

    n, p, d = 8 * big, 256, 256  # materialise at T = 1: the block traffic dominates
    rows = Factored(rand(n, 1, p), rand(n, 1, d), p)
    u = rand(p, d)
    spent = _seconds(lambda: K.materialise_dots([rows], u, n), device) / per_mac
    materialise = (spent - n * p * d) / (n * p * d)

    n, t, p, d = 8 * big, 16, 64, 64  # Gram at short sequences and narrow layers: the pair traffic dominates
    left, right = Factored(rand(n, t, p), rand(n, t, d), p), Factored(rand(n, t, p), rand(n, t, d), p)
    spent = _seconds(lambda: K.gram(left, right), device) / per_mac
    gram = spent / (n * n * t * t) - p - d

    def clip(x: float) -> float:
        return min(max(x, LIMITS[0]), LIMITS[1])

    return Constants(clip(materialise), clip(gram), "measured")
