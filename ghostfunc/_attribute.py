"""``python -m ghostfunc attribute --run DIR``: unrolled values of a recorded run, over the public API.

``DIR/trajectory/`` (or ``DIR`` itself) holds ``trajectory.pt`` and ``spec.json``
as :class:`ghostfunc.Trajectory` documents: the spec names a factory that rebuilds
``model_fn``, the dataset and the validation batch, and the optimizer's arguments
(or the factory returns the ``optimizer`` itself, e.g. one with a learning-rate
schedule, which a JSON spec cannot hold: ``ghostfunc train --record-every``).
The values (:class:`ghostfunc.DataValues`) go to ``DIR/trajectory/unrolled.pt``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ghostfunc

from ._values import RecordingError

OPTIMIZERS: dict[str, Callable[..., ghostfunc.Optimizer]] = {"sgd": ghostfunc.sgd, "adamw": ghostfunc.adamw}
#: The factory a ``ghostfunc train --record-every`` run names (``ghostfunc._run.loop.ATTRIBUTION_TASK``): its ``run``
#: argument is the folder ``--run`` names, not the one the spec recorded (a run moved or renamed since read another
#: run's data and validation set at the old path, silently).
CLI_TASK = "ghostfunc._run.attribution:task"


class SpecError(ValueError):
    """A recorded run's ``spec.json`` that cannot rebuild its run (the CLI: one line, exit code 2)."""


def load_spec(folder: Path) -> dict[str, Any]:
    """``spec.json`` of a recorded run, checked."""
    path = folder / "spec.json"
    if not path.exists():
        raise FileNotFoundError(f"attribute: {path} is missing; record the run with Trajectory.save(folder, spec=...)")
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"attribute: {path} must be a JSON object (Trajectory.save(folder, spec=...)); got text that "
                        f"is not JSON ({err})") from None
    if not isinstance(spec, dict) or "factory" not in spec:
        got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise SpecError(f"attribute: {path} needs a 'factory' entry (see ghostfunc.Trajectory); got {got}")
    opt = spec.get("optimizer", {"name": None})
    if "optimizer" in spec and (not isinstance(opt, dict) or opt.get("name") not in OPTIMIZERS):
        name = opt.get("name") if isinstance(opt, dict) else opt
        raise SpecError(f"attribute: {path}: optimizer name must be one of {sorted(OPTIMIZERS)}; got {name!r}")
    return spec


def _spec_optimizer(spec: dict[str, Any], path: Path, recorded: tuple | None) -> ghostfunc.Optimizer:
    """The optimizer ``spec["optimizer"]`` names with its arguments, of the kind the run recorded (its state's)."""
    opt_args = dict(spec["optimizer"])
    name = opt_args.pop("name")
    try:
        optimizer = OPTIMIZERS[name](**opt_args)
    except (TypeError, ValueError) as err:
        raise SpecError(f"attribute: {path}: the 'optimizer' entry {spec['optimizer']!r} does not make a "
                        f"ghostfunc.{name}: {err}") from None
    if recorded is not None and (made := type(optimizer.init(recorded[0]))) is not type(recorded[1]):
        raise SpecError(f"attribute: {path}: the 'optimizer' entry names {name}, whose state is {made.__name__}; "
                        f"the recorded run's optimizer state is {type(recorded[1]).__name__}")
    return optimizer


def attribute(run: str | Path, *, per_step: bool = False, out: str | Path | None = None) -> tuple[ghostfunc.DataValues, Path, float]:
    """Replay the run recorded under ``run`` backward; returns the values, where they were saved, and the seconds."""
    folder = Path(run)
    if (folder / "trajectory").is_dir():
        folder = folder / "trajectory"
    spec = load_spec(folder)
    traj = ghostfunc.Trajectory.load(folder)
    module, _, name = spec["factory"].partition(":")
    kwargs = dict(spec.get("kwargs", {}))
    if spec["factory"] == CLI_TASK:  # the training CLI's run: the folder given, wherever it has moved since
        kwargs["run"] = str(folder.parent.resolve() if folder.name == "trajectory" else folder.resolve())
    task = getattr(importlib.import_module(module), name)(**kwargs)
    optimizer = task.get("optimizer")
    if optimizer is None:  # the spec's arguments
        if "optimizer" not in spec:
            raise SpecError(f"attribute: {folder / 'spec.json'} needs an 'optimizer' entry, or its factory "
                             f"{spec['factory']!r} must return one; got neither")
        optimizer = _spec_optimizer(spec, folder / "spec.json", traj.checkpoints.get(0))
    index = spec.get("index", "index")
    batches = traj.batches(task["dataset"], index)
    t0 = time.perf_counter()
    values = ghostfunc.unroll(task["model_fn"], optimizer, traj, batches, task["val"], index=index, per_step=per_step,
                              size=len(next(iter(task["dataset"].values()))))
    seconds = time.perf_counter() - t0
    target = Path(out) if out is not None else folder / "unrolled.pt"
    values.save(target)
    return values, target, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghostfunc attribute", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (holding trajectory/)")
    parser.add_argument("--per-step", action="store_true", help="keep every step's share ([N, T])")
    parser.add_argument("--out", default=None, help="where to save the values (default RUN/trajectory/unrolled.pt)")
    parser.add_argument("--top", type=int, default=10, help="print this many lowest- and highest-valued rows")
    args = parser.parse_args(argv)
    if not (Path(args.run) / "spec.json").is_file() and not (Path(args.run) / "trajectory" / "spec.json").is_file():
        parser.error(f"--run: expected a run folder with a recorded trajectory (spec.json, trajectory.pt: the "
                     f"training CLI's --record-every, or Trajectory.save(folder, spec=...)); got {args.run!r}")
    if args.top < 0:
        parser.error(f"--top: expected an integer >= 0; got {args.top}")
    from ._run.cli import check_writable
    from ._run.data import RUN_FILES, UsageError

    try:
        if args.out is not None:  # before the replay, which can take long
            if Path(args.out).is_dir():
                raise UsageError(f"--out: expected a file path for the values; {args.out!r} is a folder")
            run_dir = Path(args.run).parent if Path(args.run).name == "trajectory" else Path(args.run)
            read = Path(args.run) if (Path(args.run) / "spec.json").is_file() else Path(args.run) / "trajectory"
            own = [run_dir / name for name in RUN_FILES if name != "trajectory/unrolled.pt"]
            own += [read / "trajectory.pt", read / "spec.json"]  # the recording read (Trajectory.save(folder))
            if any(Path(args.out).resolve() == path.resolve() for path in own):
                raise UsageError(f"--out: expected a path outside the run's own files; {args.out!r} is one of them "
                                 f"(it would be overwritten: its state, values or recording)")
            check_writable(Path(args.out).parent, "--out")
        values, target, seconds = attribute(args.run, per_step=args.per_step, out=args.out)
    except UsageError as exc:  # the run's factory refused its data or options (one line, exit code 2)
        parser.error(str(exc))
    except SpecError as exc:  # its spec.json cannot rebuild the run
        parser.error(str(exc).removeprefix("attribute: "))
    except RecordingError as exc:  # a truncated recording, or one the spec's run does not replay (h74: tracebacks)
        parser.error(str(exc))
    except IsADirectoryError as exc:  # a folder where the recording's file belongs (a traceback before, h91)
        parser.error(str(exc))
    total = values.total.sum(1) if args.per_step else values.total
    seen = values.count.nonzero().flatten()  # samples the run drew (the others have no value, not a value of 0)
    k = min(args.top, len(seen))
    print(f"unrolled values of {len(total)} samples ({len(seen)} drawn by the run) over {values.steps} steps in "
          f"{seconds:.1f} s -> {target}")
    print("sign as φ: negative = up-weighting the sample lowers the final validation loss")
    order = seen[total[seen].argsort()].tolist()
    print("lowest-valued (helpful where negative):", ", ".join(f"{i}: {total[i]:.3e}" for i in order[:k]))
    print("highest-valued (harmful where positive):", ", ".join(f"{i}: {total[i]:.3e}" for i in order[::-1][:k]))
    return 0
