"""Data values accumulated per dataset index across training steps, saved atomically.

A sample's value is the sum of its per-step values over the steps whose batch
held it. Batches carry their dataset indices as an ordinary leaf (for example
``{"x": ..., "y": ..., "index": ...}``, ignored by ``model_fn``), so whatever
shuffles or splits the batch moves the indices with the samples; the step
hands back values in the batch's row order and :meth:`DataValues.add` scatters
them by those indices. Only ``[N]`` running sums are kept, never inputs.

**Many processes** (``group=``): each rank adds its own rows' values. Saving is
collective: the file gets the sum over ranks and rank 0 writes it. To make any
sequence of saves, loads and adds count every value once, a :class:`DataValues`
remembers the part of it that is already global (``synced``: the values as of
its last collective save or load, identical on every rank); a save sums
``synced + Σ_ranks (self − synced)`` and returns those global values (with
``synced`` set to them), and a load with ``group`` gives every rank the file's
values with ``synced`` set. A rank's own values that were never saved have
``synced=None`` and count whole. Keep the value that :meth:`DataValues.save`
returns: a run resumed from the file then continues bit for bit as the run
that saved it.

A ``DistributedSampler`` (``drop_last=False``) pads the last round with repeated
samples so every rank gets the same count: pass ``keep`` =
:func:`ghostfunc.sampler_mask` (its slice for the batch) to :meth:`DataValues.add`
and those repeats are neither valued nor counted.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _dist
from ._optim import AdamWState, SGDState
from ._train import TrainState

FORMAT = "ghostfunc.DataValues/1"
#: Types that a saved state may hold and that load with ``weights_only=True``.
SAFE_TYPES: list[Any] = [TrainState, SGDState, AdamWState]


def is_indices(idx: Any) -> bool:
    """Whether ``idx`` is a 1-D integer tensor of dataset indices: a bool mask is not (its True/False would read as
    indices 1/0)."""
    return (isinstance(idx, Tensor) and idx.dim() == 1 and not idx.is_floating_point() and not idx.is_complex()
            and idx.dtype != torch.bool)


def as_tensor(x: Any) -> Any:
    """A NumPy array or a list or tuple of numbers as a tensor (a batch's NumPy index leaf rides through a training
    step as it came; an empty list: an empty int64 tensor); anything else as it is."""
    numpy = sys.modules.get("numpy")
    if isinstance(x, (list, tuple)) and not x:
        return torch.zeros(0, dtype=torch.int64)  # (an empty batch's indices)
    if isinstance(x, (list, tuple)) and all(isinstance(v, numbers.Real) for v in x):  # (NumPy scalars too)
        x = numpy.asarray(x) if numpy is not None else torch.tensor(x)
    if numpy is not None and isinstance(x, numpy.ndarray) and x.dtype.kind in "biuf":
        return torch.from_numpy(numpy.ascontiguousarray(x, dtype=x.dtype.newbyteorder("=")))
    return x


def tensor_kind(x: Any) -> str:
    """``x`` for a message: a tensor's dtype and shape, or the type of anything else."""
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


class RecordingError(ValueError):
    """A saved file or a recorded run that cannot be used as asked: a truncated or foreign file, a recording whose
    replay does not reach its checkpoints (another optimizer, learning rate or data than the run's). The command
    line reports it in one line (exit code 2), as it does other bad input."""


def read_saved(path: str | os.PathLike, where: str, writer: str) -> Any:
    """``torch.load(path, weights_only=True)`` with ghostfunc's state types allowed; a file that is not there or
    cannot be opened raises as it is, a truncated or foreign one a ``ValueError`` naming it, ``writer`` (what
    should have written it) and torch's reason."""
    try:
        torch.serialization.add_safe_globals(SAFE_TYPES)  # (a context manager's exit would remove them: they
        return torch.load(path, weights_only=True)  # stay allowed, as ghostfunc's import allows them)
    except IsADirectoryError:  # (a bare "[Errno 21] Is a directory" before, h91)
        raise IsADirectoryError(f"{where}: {os.fspath(path)!r} is a folder; expected a file written by "
                                f"{writer}") from None
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which, and what torch said
        said = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RecordingError(f"{where}: {os.fspath(path)!r} is not a file written by {writer} (torch.load: "
                         f"{type(err).__name__}: {said})") from err


@dataclass(frozen=True, eq=False)  # (compared by identity: the dataclass's == compared tensors, and raised)
class DataValues:
    """Per-dataset-index sums of step values (an immutable value: ``add`` returns a new one).

    Attributes:
        total: ``[N, *shape]`` float64, the sum of the values each sample got.
        count: ``[N]`` int64, how many times each sample was in a batch.
        steps: how many batches were added.
        synced: the part that is already the sum over every rank (after a save
            or load with ``group``; ``None`` otherwise; see the module docstring).
        loaded: read by :meth:`load` without ``group`` (a file's totals, perhaps already
            summed over ranks): a collective save refuses them (each rank would add them again).
    """

    total: Tensor
    count: Tensor
    steps: int = 0
    synced: DataValues | None = None
    loaded: bool = False

    @classmethod
    def zeros(cls, n: int, shape: tuple[int, ...] = ()) -> DataValues:
        """No values yet for a dataset of ``n`` samples; each value is ``shape``-shaped (a scalar by default)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"DataValues.zeros: n must be a positive int (the dataset size); got {n!r}")
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise TypeError(f"DataValues.zeros: shape must be a tuple of ints >= 0 (one value's shape, () for a "
                            f"number); got {shape!r}")
        return cls(torch.zeros(int(n), *shape, dtype=torch.float64), torch.zeros(int(n), dtype=torch.int64), 0)

    def __post_init__(self) -> None:
        if not isinstance(self.total, Tensor) or not isinstance(self.count, Tensor):
            raise TypeError(f"DataValues: total and count must be tensors; got {type(self.total).__name__} and "
                            f"{type(self.count).__name__}")
        if self.total.dim() < 1 or self.count.shape != self.total.shape[:1]:
            raise ValueError(f"DataValues: total must be [N, ...] and count [N]; "
                             f"got {tuple(self.total.shape)} and {tuple(self.count.shape)}")
        if self.total.dtype != torch.float64 or self.count.dtype != torch.int64:
            raise TypeError(f"DataValues: total must be float64 and count int64 (what add sums into); got "
                            f"{self.total.dtype} and {self.count.dtype}")
        # what load refuses is refused here, where it is made: else save writes a file that cannot be read back
        for name, t in (("total", self.total), ("count", self.count)):
            if t.device.type == "meta":
                raise ValueError(f"DataValues: {name} must be a tensor that holds values (on the CPU or an "
                                 f"accelerator); got one on the meta device")
        # screened by a sum and a min (NaN and inf survive a sum; a few ms at 10^7 samples, where a full isfinite
        # would double the cost of every add), located row by row only when the screen fails
        if not math.isfinite(float(self.total.sum())) and not bool(torch.isfinite(self.total).all()):
            rows = (~torch.isfinite(self.total)).reshape(len(self.total), -1).any(1).nonzero().flatten()
            raise ValueError(f"DataValues: total must be finite (sums of finite values); got NaN or inf at rows "
                             f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")
        if self.count.numel() and int(self.count.min()) < 0:
            rows = (self.count < 0).nonzero().flatten()
            raise ValueError(f"DataValues: count must be >= 0 (how many times each sample was in a batch); got "
                             f"negative counts at rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")
        said = f"DataValues: steps must be an int >= 0 (how many batches were added); got {self.steps!r}"
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"{said} (a {type(self.steps).__name__})")
        if self.steps < 0:
            raise ValueError(said)
        object.__setattr__(self, "steps", int(self.steps))  # a numpy integer is saved as the int load reads
        if self.synced is not None and (not isinstance(self.synced, DataValues)
                                        or self.synced.total.shape != self.total.shape):
            got = (f"values of shape {tuple(self.synced.total.shape)}" if isinstance(self.synced, DataValues)
                   else f"a {type(self.synced).__name__}")
            raise TypeError(f"DataValues: synced must be None or DataValues shaped like total "
                            f"{tuple(self.total.shape)} (the part already summed over ranks); got {got}")

    def __len__(self) -> int:
        return self.total.shape[0]

    def add(self, indices: Tensor, values: Tensor, *, keep: Tensor | None = None) -> DataValues:
        """Add one step's values: ``total[indices[b]] += values[b]``, ``count[indices[b]] += 1``.

        Args:
            indices: ``[B]`` integer dataset indices of the batch's rows, in row order (a tensor, or a
                NumPy array or list of ints, taken as one).
            values: ``[B, *shape]`` the step's values (e.g. ``info.values``), same row order.
            keep: ``[B]`` bool, or ``None`` (all): only rows with ``keep[b]`` are added
                (e.g. :func:`ghostfunc.sampler_mask`, to skip a sampler's padding repeats).

        Returns:
            A new :class:`DataValues`; ``self`` is unchanged. A repeated index adds twice.
        """
        where = "DataValues.add"
        indices, values, keep = (as_tensor(x) for x in (indices, values, keep))
        if not is_indices(indices):  # (a mask is not indices: pass it as keep=)
            raise TypeError(f"{where}: indices must be a 1-D integer tensor [B] of dataset indices; got "
                            f"{tensor_kind(indices)}")
        if isinstance(values, Tensor) and (values.is_complex() or values.dtype == torch.bool):
            raise TypeError(f"{where}: values must be real numbers (a float or integer tensor); got {values.dtype}")
        if not isinstance(values, Tensor):
            raise TypeError(f"{where}: values must be a tensor [B, ...] (e.g. info.values); got {type(values).__name__}")
        if values.shape != (indices.shape[0], *self.total.shape[1:]):
            shape = tuple(values.shape)
            raise ValueError(f"{where}: values must have shape {(indices.shape[0], *self.total.shape[1:])} "
                             f"(one value per index); got {shape}")
        for name, t in (("indices", indices), ("values", values), ("keep", keep)):
            if isinstance(t, Tensor) and t.device.type == "meta":
                raise ValueError(f"{where}: {name} must be a tensor that holds values (on the CPU or an accelerator); "
                                 f"got one on the meta device")
        if keep is not None:
            if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != indices.shape:
                got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
                raise TypeError(f"{where}: keep must be None or a bool tensor shaped like indices "
                                f"{tuple(indices.shape)}; got {got}")
            indices, values = indices[keep.to(indices.device)], values[keep.to(values.device)]
        idx = indices.to(device="cpu", dtype=torch.int64)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            given = indices.tolist()  # (as given: a uint64 index past int64's range wraps in idx, and torch has no
            raise IndexError(f"{where}: indices must lie in [0, {len(self)}); got min {min(given)}, "  # uint64 max)
                             f"max {max(given)}")
        vals = values.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(vals).all()):
            raise FloatingPointError(f"{where}: values contain non-finite entries at rows "
                                     f"{(~torch.isfinite(vals)).reshape(len(idx), -1).any(1).nonzero().flatten().tolist()}")
        total = self.total.index_add(0, idx, vals)
        count = self.count.index_add(0, idx, torch.ones_like(idx))
        return DataValues(total, count, self.steps + 1, self.synced, self.loaded)

    @property
    def mean(self) -> Tensor:
        """``total / count`` (``[N, *shape]``); NaN for samples never seen."""
        count = self.count.reshape(-1, *([1] * (self.total.dim() - 1))).to(self.total.dtype)
        return self.total / count

    def save(self, path: str | os.PathLike, *, state: Any = None, group: Any = None) -> DataValues:
        """Write the values (and optionally a training ``state``) to ``path`` atomically; return what was written.

        The file is written to a temporary file in the same folder, flushed to disk,
        then renamed over ``path`` (``os.replace``): a crash at any moment leaves
        either the old file or the new one, never a torn one. Saving the training
        state in the same file keeps the two in step for resuming.

        Args:
            path: the file to write.
            state: what :meth:`load` can read back (``weights_only=True``): tensors, numbers,
                strings, lists, dicts, a :class:`ghostfunc.TrainState`; anything else is refused
                (``TypeError``) before the file is written.
            group: ``None`` (one process), or a ``torch.distributed`` process group:
                then every rank must call ``save`` (a collective); the file holds the
                sum over ranks (each value counted once, see the module docstring),
                rank 0's ``state`` (identical on every rank under ``train_step``), and
                is written by rank 0; every rank returns once it is on disk. If rank 0 cannot write it,
                every rank raises (rank 0 its own error, the others a ``RuntimeError`` that quotes it).

        Returns:
            The values written: ``self`` for one process; with ``group`` the global
            values (with ``synced`` set), the same on every rank. Keep them.
        """
        if group is not None:
            everything = self.across(group, "DataValues.save", path=os.fspath(path))
            # the status exchange is the barrier: every rank returns once the file is on disk, or raises if rank 0
            # could not write it (rank 0 its own error, the others a RuntimeError with its message), none waits
            with _dist.collectively("DataValues.save", group):
                if _dist.rank_and_size(group)[0] == 0:
                    everything.save(path, state=state)
            return everything
        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"DataValues.save: path {os.fspath(path)!r} is a folder; expected the file to "
                                    f"write, e.g. {os.fspath(target / 'values.pt')!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # the secant's cached validation gradient (and its copy of the validation batch) is a by-product: a
        # resumed step recomputes it, with the same numbers; dropped wherever a TrainState sits in the state
        state = _without_val_grad(state)
        _check_loadable(state)
        payload = {"format": FORMAT, "total": self.total, "count": self.count, "steps": self.steps, "state": state}
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a saved file gets the usual mode
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return self

    def across(self, group: Any, where: str = "DataValues.across", *, path: str | None = None) -> DataValues:
        """The sum over the ranks of ``group`` (collective): ``synced + Σ_ranks (self − synced)``; ``path`` (for
        :meth:`save`) must be the same on every rank (rank 0 writes it for all: another rank's was never written).

        ``steps`` is ``synced.steps`` plus the most any rank added since (each rank
        adds its share of the same global batches). Returns values with ``synced``
        set to themselves, identical on every rank.
        """
        _dist.check_group(group, where)
        import torch.distributed as dist

        base = self.synced
        if base is not None and (base.total.shape != self.total.shape):
            raise AssertionError(f"{where}: synced part has another shape")
        rank, size = _dist.rank_and_size(group)
        mine = (tuple(self.total.shape), None if base is None else base.steps, self.steps,
                self.loaded and base is None, where, path)
        every: list[Any] = [None] * size
        dist.all_gather_object(every, mine, group=group)
        _dist.refuse_other_calls(where, [other[4] if isinstance(other, tuple) and len(other) == 6 else None
                                         for other in every])  # (a rank in another collective: every rank raises)
        if len({other[5] for other in every}) > 1:
            raise ValueError(f"{where}: every rank must pass the same path (rank 0 writes the file for all); "
                             + ", ".join(f"rank {r}: {other[5]!r}" for r, other in enumerate(every)))
        plain = [r for r, other in enumerate(every) if other[3]]
        if plain and size > 1:  # every rank sees the same list: every rank raises
            raise ValueError(f"{where}: rank(s) {plain} hold values read by DataValues.load without group=: a "
                             f"file's totals, which every rank would add to the sum again ({size} times over); "
                             f"read them with DataValues.load(path, group=group), which marks them as global")
        for r, other in enumerate(every):
            if other[:2] != mine[:2]:
                raise ValueError(f"{where}: every rank must hold values of the same shape and the same synced "
                                 f"part (the same earlier save or load); rank {r} has shape {other[0]} synced at "
                                 f"step {other[1]}, rank {rank} has shape {mine[0]} synced at step {mine[1]}")
        base_steps = 0 if base is None else base.steps
        delta = {"total": self.total if base is None else self.total - base.total,
                 "count": self.count if base is None else self.count - base.count}
        summed = _dist.allreduce_sum(delta, group)
        total = summed["total"] if base is None else base.total + summed["total"]
        count = summed["count"] if base is None else base.count + summed["count"]
        steps = base_steps + max(other[2] - base_steps for other in every)
        out = DataValues(total, count, steps)
        return DataValues(total, count, steps, out)

    @classmethod
    def load(cls, path: str | os.PathLike, *, with_state: bool = False,
             group: Any = None) -> DataValues | tuple[DataValues, Any]:
        """Read a file written by :meth:`save`.

        Loads with ``weights_only=True`` (ghostfunc's state types are allowed); a
        state holding other classes needs them in ``torch.serialization.safe_globals``.

        Args:
            path: the file.
            with_state: return ``(values, state)`` instead of ``values``.
            group: ``None`` (one process), or a ``torch.distributed`` process group:
                collective; rank 0 reads the file and every rank gets the same
                values (marked as synced, see the module docstring) and state.
        """
        if group is not None:
            _dist.check_group(group, "DataValues.load")
            import torch.distributed as dist

            rank, size = _dist.rank_and_size(group)
            every: list[Any] = [None] * size
            dist.all_gather_object(every, ("DataValues.load", os.fspath(path)), group=group)
            _dist.refuse_other_calls("DataValues.load", [e[0] if isinstance(e, tuple) and len(e) == 2 else None
                                                         for e in every])
            if len({e[1] for e in every}) > 1:  # (every rank sees the list: every rank raises)
                raise ValueError("DataValues.load: every rank must pass the same path (rank 0 reads the file for "
                                 "all); " + ", ".join(f"rank {r}: {e[1]!r}" for r, e in enumerate(every)))
            box: list[Any] = [None]
            if rank == 0:
                try:
                    box[0] = cls.load(path, with_state=True)
                except Exception as err:  # every rank raises, none waits
                    box[0] = err
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
            if isinstance(box[0], Exception):
                raise ValueError(f"DataValues.load: rank 0 could not read {os.fspath(path)!r}: {box[0]}")
            values, state = box[0]
            values = DataValues(values.total, values.count, values.steps, DataValues(values.total, values.count,
                                                                                     values.steps))
            return (values, state) if with_state else values
        where, name = "DataValues.load", repr(os.fspath(path))
        payload = read_saved(path, where, "DataValues.save")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise RecordingError(f"{where}: {name} is not a file written by DataValues.save")
        missing = [k for k in ("total", "count", "steps", "state") if k not in payload]
        if missing:
            raise RecordingError(f"{where}: {name} lacks {missing} (written by another version of DataValues.save?)")
        total, count, steps = payload["total"], payload["count"], payload["steps"]
        if not isinstance(total, Tensor) or not isinstance(count, Tensor) or total.dtype != torch.float64 \
                or count.dtype != torch.int64:
            raise RecordingError(f"{where}: {name} holds total and count that are not float64 and int64 tensors")
        if not bool(torch.isfinite(total).all()) or bool((count < 0).any()) or isinstance(steps, bool) \
                or not isinstance(steps, int) or steps < 0:
            raise RecordingError(f"{where}: {name} holds non-finite totals, negative counts or a step count that is "
                             f"not an int >= 0: not what DataValues.save writes")
        try:
            values = cls(total, count, steps, loaded=True)
        except ValueError as err:  # (total and count of other lengths: the file named, not only the class)
            raise RecordingError(f"{where}: {name} is not what DataValues.save writes: "
                             f"{str(err).removeprefix('DataValues: ')}") from None
        return (values, payload["state"]) if with_state else values


_PLAIN_ATOMS = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.Size)


def _plain(state: Any) -> bool:
    """Whether ``state`` is built only of what ``torch.load(weights_only=True)`` always reads: tensors, numbers,
    strings, ``None``, dicts, lists, tuples and ghostfunc's state types (a fast walk; anything else is tried)."""
    kind = type(state)
    if isinstance(state, Tensor) or kind in _PLAIN_ATOMS:
        return True
    if kind is dict:
        return all(_plain(k) and _plain(v) for k, v in state.items())
    if kind in (list, tuple) or kind in SAFE_TYPES:
        return all(_plain(v) for v in state)
    return False


def _check_loadable(state: Any) -> None:
    """Refuse (``TypeError``, before anything is written) a ``state`` that :meth:`DataValues.load` could not read
    back: it loads with ``weights_only=True``, which refuses e.g. numpy arrays, ``pathlib`` paths and other
    classes not in ``torch.serialization``'s safe globals. A state of plain parts is not tried."""
    if _plain(state):
        return
    import io

    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
    except Exception as err:  # noqa: BLE001 - pickle's own error (a lambda, a lock): AttributeError, TypeError, ...
        raise TypeError(
            f"DataValues.save: state holds what cannot be saved at all (torch.save: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). Store tensors, numbers, strings, "
            f"lists and dicts instead (a function or a lock is not data: leave it out)") from None
    buffer.seek(0)
    try:
        torch.serialization.add_safe_globals(SAFE_TYPES)
        torch.load(buffer, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's reason, first line
        reason = str(err).strip().splitlines()
        why = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line),
                   reason[0] if reason else type(err).__name__).split(" Please use")[0].rstrip(". ")
        raise TypeError(
            f"DataValues.save: state holds what DataValues.load cannot read back (it loads with "
            f"weights_only=True): {why}. Store tensors, numbers, strings, lists and dicts instead (numpy arrays: "
            f"torch.from_numpy(a); paths: str(p); a generator: gen.get_state()), or allow the class with "
            f"torch.serialization.add_safe_globals([...]) before saving and loading") from None


def _without_val_grad(state: Any) -> Any:
    """``state`` with every :class:`TrainState`'s ``val_grad`` dropped: the state itself, or inside dicts, lists
    and tuples (``{"train": state, ...}``); anything else as it is."""
    if isinstance(state, TrainState):
        return state._replace(val_grad=None) if state.val_grad is not None else state
    if type(state) is dict:
        return {k: _without_val_grad(v) for k, v in state.items()}
    if type(state) in (list, tuple):
        return type(state)(_without_val_grad(v) for v in state)
    return state


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


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
