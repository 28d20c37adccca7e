"""Data values accumulated per dataset index across training steps, saved atomically.

A sample's value is the sum of its per-step values over the steps whose batch
held it. Batches carry their dataset indices as an ordinary leaf (for example
``{"x": ..., "y": ..., "index": ...}``, ignored by ``model_fn``), so whatever
shuffles or splits the batch moves the indices with the samples; the step
hands back values in the batch's row order and :meth:`DataValues.add` scatters
them by those indices. Only ``[N]`` running sums are kept, never inputs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._optim import AdamWState, SGDState
from ._train import TrainState

FORMAT = "ghostfunc.DataValues/1"
#: Types that a saved state may hold and that load with ``weights_only=True``.
SAFE_TYPES: list[Any] = [TrainState, SGDState, AdamWState]


@dataclass(frozen=True)
class DataValues:
    """Per-dataset-index sums of step values (an immutable value: ``add`` returns a new one).

    Attributes:
        total: ``[N, *shape]`` float64, the sum of the values each sample got.
        count: ``[N]`` int64, how many times each sample was in a batch.
        steps: how many batches were added.
    """

    total: Tensor
    count: Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, n: int, shape: tuple[int, ...] = ()) -> DataValues:
        """No values yet for a dataset of ``n`` samples; each value is ``shape``-shaped (a scalar by default)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"DataValues.zeros: n must be a positive int (the dataset size); got {n!r}")
        return cls(torch.zeros(n, *shape, dtype=torch.float64), torch.zeros(n, dtype=torch.int64), 0)

    def __post_init__(self) -> None:
        if self.total.dim() < 1 or self.count.shape != self.total.shape[:1]:
            raise ValueError(f"DataValues: total must be [N, ...] and count [N]; "
                             f"got {tuple(self.total.shape)} and {tuple(self.count.shape)}")

    def __len__(self) -> int:
        return self.total.shape[0]

    def add(self, indices: Tensor, values: Tensor) -> DataValues:
        """Add one step's values: ``total[indices[b]] += values[b]``, ``count[indices[b]] += 1``.

        Args:
            indices: ``[B]`` integer dataset indices of the batch's rows, in row order.
            values: ``[B, *shape]`` the step's values (e.g. ``info.values``), same row order.

        Returns:
            A new :class:`DataValues`; ``self`` is unchanged. A repeated index adds twice.
        """
        where = "DataValues.add"
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            got = f"{indices.dtype} tensor of shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"{where}: indices must be a 1-D integer tensor [B] of dataset indices; got {got}")
        if not isinstance(values, Tensor) or values.shape != (indices.shape[0], *self.total.shape[1:]):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"{where}: values must have shape {(indices.shape[0], *self.total.shape[1:])} "
                             f"(one value per index); got {shape}")
        idx = indices.to(device="cpu", dtype=torch.int64)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"{where}: indices must lie in [0, {len(self)}); got min {int(idx.min())}, max {int(idx.max())}")
        vals = values.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(vals).all()):
            raise FloatingPointError(f"{where}: values contain non-finite entries at rows "
                                     f"{(~torch.isfinite(vals)).reshape(len(idx), -1).any(1).nonzero().flatten().tolist()}")
        total = self.total.index_add(0, idx, vals)
        count = self.count.index_add(0, idx, torch.ones_like(idx))
        return DataValues(total, count, self.steps + 1)

    @property
    def mean(self) -> Tensor:
        """``total / count`` (``[N, *shape]``); NaN for samples never seen."""
        count = self.count.reshape(-1, *([1] * (self.total.dim() - 1))).to(self.total.dtype)
        return self.total / count

    def save(self, path: str | os.PathLike, *, state: Any = None) -> None:
        """Write the values (and optionally a training ``state``) to ``path`` atomically.

        The file is written to a temporary file in the same folder, flushed to disk,
        then renamed over ``path`` (``os.replace``): a crash at any moment leaves
        either the old file or the new one, never a torn one. Saving the training
        state in the same file keeps the two in step for resuming.

        Args:
            path: the file to write.
            state: anything ``torch.save`` can write, e.g. a :class:`ghostfunc.TrainState`.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "total": self.total, "count": self.count, "steps": self.steps, "state": state}
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    @classmethod
    def load(cls, path: str | os.PathLike, *, with_state: bool = False) -> DataValues | tuple[DataValues, Any]:
        """Read a file written by :meth:`save`.

        Loads with ``weights_only=True`` (ghostfunc's state types are allowed); a
        state holding other classes needs them in ``torch.serialization.safe_globals``.

        Args:
            path: the file.
            with_state: return ``(values, state)`` instead of ``values``.
        """
        with torch.serialization.safe_globals(SAFE_TYPES):
            payload = torch.load(path, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"DataValues.load: {os.fspath(path)!r} is not a file written by DataValues.save")
        values = cls(payload["total"], payload["count"], int(payload["steps"]))
        return (values, payload["state"]) if with_state else values


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
