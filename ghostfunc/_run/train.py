"""``python -m ghostfunc train``: train a language model and value every training chunk for a target domain.

With no options: a tiny GPT-2 trains for 300 steps on Python's standard library
(byte-level tokens, chunks of 128) and values every chunk it sees against a
held-out package (``--target email``); about two minutes on 2 CPU cores. See
README "Valuing a training run"; every option below can also come from
``--config FILE`` (TOML).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import ghostfunc

from . import cli, data, loop, report


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ghostfunc train``; return the exit code (2 for bad input)."""
    prog = "ghostfunc train"
    out: Path | None = None
    held: Any = None  # the lock on --out (cli.hold_out), let go when the run ends
    try:
        cfg = cli.options(prog, cli.TRAIN_OPTIONS, __doc__ or "", sys.argv[1:] if argv is None else argv,
                          cli.TRAIN_RANGES)
        for key in ("train", "val"):  # (an unset shell variable: the current folder, the run's own files, read)
            if not cfg[key].strip():
                raise data.UsageError(f"--{key}: expected 'stdlib', a token file *.bin, a folder, a glob or a text "
                                      f"file; got an empty string")
        cfg = loop.absolute(cfg, Path.cwd())  # config.json records absolute paths: attribute/select work from anywhere
        out = Path(cfg["out"])
        stale = cli.check_out(out, cfg["resume"])
        for key in ("train", "val", "test"):
            if data.would_read(cfg[key], out):
                raise data.UsageError(f"--out: expected a folder outside --{key} {cfg[key]!r}; the run's own files "
                                      f"({', '.join(data.RUN_FILES[:3])}, ...) would become its data")
        if cfg["resume"] and cfg["record_every"] and not (out / "trajectory" / "trajectory.pt").is_file():
            raise data.UsageError(f"--record-every: expected the trajectory of the run in {str(out)!r} to resume "
                                  f"({out / 'trajectory' / 'trajectory.pt'}); there is none")  # on every process
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        setup = loop.prepare(cfg)
        if cfg["resume"]:  # refuse a different configuration or other data before anything runs
            values, payload = loop.saved_run(out / "values.pt", option="--resume")
            loop.check_resume(cfg, payload["config"])
            setup.check_data(payload.get("data"), len(values), str(out))
        with loop.distributed(setup.device) as par:
            for key in ("batch_size", "val_batch_size"):
                if cfg[key] < par.world:
                    raise data.UsageError(f"--{key.replace('_', '-')}: expected at least one chunk for each of the "
                                          f"{par.world} processes; got {cfg[key]}")
            refused: data.UsageError | None = None
            if par.rank == 0:
                try:
                    held = cli.hold_out(out)  # before anything is written into it
                    stale = cli.check_out(out, cfg["resume"])  # again, holding it: another run may have written
                except data.UsageError as exc:  # (told to every process below, so none waits in the run)
                    refused = exc
                if stale and refused is None:
                    print(f"{prog}: --out {str(out)!r} held a run that stopped before its first save "
                          f"({', '.join(p.name for p in stale)}, no values.pt): starting it afresh", file=sys.stderr)
                    for p in stale:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            _told(par, refused)
            if par.rank == 0:
                print(f"{prog}: train {data.describe(setup.train)}; validation {data.describe(setup.val)}"
                      + (f"; test {data.describe(setup.test)}" if setup.test is not None else ""), file=sys.stderr)
                out.mkdir(parents=True, exist_ok=True)
                loop.write_atomic(out / "config.json", json.dumps(cfg, indent=1) + "\n")
            try:
                state, values = loop.run(setup, par)
            except KeyboardInterrupt:
                if par.rank == 0:
                    print(f"{prog}: interrupted; {_saved(out)}", file=sys.stderr)
                return 130
            if par.rank == 0:
                print(report.write(out, cfg, setup.train, loop.chunk_table(setup, values)))
    except data.UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while reading the data, building the model or writing the report
        print(f"{prog}: interrupted; " + (_saved(out) if out is not None else "nothing written"), file=sys.stderr)
        return 130
    finally:
        if held is not None:
            held.close()
    return 0


def _told(par: loop.Dist, refused: data.UsageError | None) -> None:
    """Raise rank 0's refusal of ``--out`` (another run holds it) on every process: the others went on into the
    run's first collective and died there with gloo's "connection reset"."""
    if par.group is not None:
        said = [None if refused is None else str(refused)]
        torch.distributed.broadcast_object_list(said, src=0, group=par.group)
        if said[0] is not None:
            raise data.UsageError(said[0])
    if refused is not None:
        raise refused


def _saved(out: Path) -> str:
    """What an interrupted run leaves in ``out``: its last save, to ``--resume`` from, or none."""
    try:
        saved = ghostfunc.DataValues.load(out / "values.pt")
    except (OSError, ValueError):
        return f"no values.pt saved yet: the same command starts the run afresh in {str(out)!r}"
    return f"{out / 'values.pt'} holds the run's last save, step {saved.steps}: continue with --resume"  # type: ignore[union-attr]
