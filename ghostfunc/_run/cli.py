"""Options of ``ghostfunc train`` / ``ghostfunc select``: one table, read from the command line and ``--config FILE`` (TOML).

Precedence: command line > config file > default. A config file holds the same
keys as the options (``batch-size`` or ``batch_size``); an unknown key or a value
of the wrong type is an error naming the key; a number outside its range (``TRAIN_RANGES``,
``SELECT_RANGES``: NaN and inf never pass) is an error naming the option. Every error about input is one line
``ghostfunc <command>: error: ...`` on stderr and exit code 2, before anything is
written to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .data import UsageError

#: name -> (default, help). The type of the default is the option's type.
TRAIN_OPTIONS: dict[str, tuple[Any, str]] = {
    "config": ("", "TOML file with any of these options (dashes or underscores); the command line wins"),
    "out": ("runs/train", "output folder: values.pt, metrics.jsonl, values.csv, sources.csv, report.md, report.png"),
    "resume": (False, "continue the run in --out from its values.pt (same options required)"),
    "train": ("stdlib", "training data: 'stdlib' (Python's standard library), a token file *.bin, a folder, a glob or a text file"),
    "val": ("stdlib", "validation data (scored against): 'stdlib' (the --target package) or as --train"),
    "test": ("", "held-out data for the curves and 'ghostfunc select'; default with stdlib: the other half of --target"),
    "target": ("email", "with stdlib data: the standard-library package held out as the target domain (email, asyncio, ...)"),
    "token_dtype": ("uint16", "dtype of *.bin token files: uint16 or uint32"),
    "vocab_size": (0, "model vocabulary; 0: from the data (256 for text, the largest id + 1 rounded up to 64 for token files, "
                      "at most 2**20 unless given here)"),
    "val_limit": (256, "at most this many validation (and test) chunks, spread evenly; 0: all"),
    "seq_len": (128, "tokens per chunk (one chunk = one sample = one value; at least 2: a token and the next to predict)"),
    "model": ("gpt2", "gpt2, llama, neox, or a local Hugging Face folder (loaded offline)"),
    "size": ("tiny", "preset size: tiny, mini, small (small = GPT-2 small / Pythia-160M / SmolLM-135M shapes)"),
    "dtype": ("float32", "parameter dtype: float32, bfloat16, float16 (float16 only with --optimizer sgd)"),
    "autocast": ("none", "forward under torch.autocast: none, bfloat16, float16"),
    "device": ("auto", "auto (cuda if available), cpu, cuda"),
    "seed": (0, "seeds the initialisation and the batch order"),
    "steps": (300, "training steps"),
    "batch_size": (16, "training chunks per step (all processes together)"),
    "val_batch_size": (16, "validation chunks per step the values are computed against"),
    "val_batch": ("rotating", "fixed (the same first chunks every step) or rotating (through the validation set)"),
    "eval_every": (50, "evaluate the loss on the whole validation (and test) set every this many steps"),
    "eval_batch_size": (64, "chunks per forward when evaluating"),
    "log_every": (10, "write a metrics.jsonl record every this many steps"),
    "save_every": (100, "save values.pt (values + training state, atomically) every this many steps; 0: at the end only"),
    "stop_at": (0, "stop after this step as if interrupted (resume later with --resume); 0: run all --steps"),
    "optimizer": ("adamw", "adamw or sgd"),
    "lr": (2e-3, "peak learning rate"),
    "min_lr_ratio": (0.1, "the cosine schedule ends at lr * this"),
    "warmup": (20, "linear warmup steps"),
    "weight_decay": (0.1, "weight decay (decoupled for adamw)"),
    "momentum": (0.0, "sgd momentum, in [0, 1] (above 1 the velocity grows without bound)"),
    "values": ("shapley", "shapley (In-Run Data Shapley per chunk) or none (plain training, the throughput baseline)"),
    "order": (1, "order of the values: 1 or 2"),
    "precondition": (False, "optimizer-aware first-order values (Adam's preconditioner)"),
    "progress": (True, "show a progress bar"),
    "threads": (0, "torch.set_num_threads; 0: torch's default"),
    "record_every": (0, "record a ghostfunc.Trajectory (the training state every this many steps, each step's batch "
                        "indices) in OUT/trajectory/ for 'ghostfunc attribute --run OUT'; 0: off"),
}
CHOICES = {"token_dtype": ("uint16", "uint32"), "size": ("tiny", "mini", "small"), "dtype": ("float32", "bfloat16", "float16"),
           "autocast": ("none", "bfloat16", "float16"), "device": ("auto", "cpu", "cuda"), "val_batch": ("fixed", "rotating"),
           "optimizer": ("adamw", "sgd"), "values": ("shapley", "none"), "order": (1, 2)}

SELECT_OPTIONS: dict[str, tuple[Any, str]] = {
    "config": ("", "TOML file with any of these options"),
    "run": ("runs/train", "the folder of a finished 'ghostfunc train' run"),
    "out": ("", "where to write select.json and select.md; default: RUN/select"),
    "seeds": (3, "retrain each half with this many seeds"),
    "fraction": (0.5, "the share of the run's seen chunks each retraining keeps"),
    "steps": (0, "retraining steps; 0: the run's own"),
    "progress": (True, "show a progress bar"),
    "threads": (0, "torch.set_num_threads; 0: torch's default"),
}



class Range(NamedTuple):
    """The values a numeric option accepts: finite, ``low <= v <= high`` (``low < v`` with ``open_low``)."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        """``value`` is finite and within the range."""
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below

    def expected(self, integer: bool) -> str:
        """``"an integer >= 1"``, ``"a finite number in [0, 1]"``, ...: what the messages say is expected."""
        what = "an integer" if integer else "a finite number"
        if self.high == math.inf:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        return f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


#: The range of every numeric option of ``TRAIN_OPTIONS`` (checked before anything is written; NaN/inf never pass).
TRAIN_RANGES: dict[str, Range] = {
    "vocab_size": Range(0), "val_limit": Range(0), "seq_len": Range(2), "seed": Range(0, 2**32 - 1), "steps": Range(1),
    "batch_size": Range(1), "val_batch_size": Range(1), "eval_every": Range(1), "eval_batch_size": Range(1),
    "log_every": Range(1), "save_every": Range(0), "stop_at": Range(0), "lr": Range(0), "min_lr_ratio": Range(0, 1),
    "warmup": Range(0), "weight_decay": Range(0), "momentum": Range(0, 1), "threads": Range(0),
    "record_every": Range(0),
}
#: The same for ``SELECT_OPTIONS``.
SELECT_RANGES: dict[str, Range] = {"seeds": Range(1), "fraction": Range(0, 1, open_low=True), "steps": Range(0),
                                   "threads": Range(0)}


def check_ranges(cfg: Mapping[str, Any], table: dict[str, tuple[Any, str]], ranges: Mapping[str, Range]) -> None:
    """Refuse a numeric option of ``cfg`` outside its range (or of the wrong type): a :class:`UsageError` naming it.

    ``table`` (``TRAIN_OPTIONS`` or ``SELECT_OPTIONS``) gives each option's type;
    options missing from ``cfg`` are skipped.
    """
    for name, rng in ranges.items():
        if name not in cfg:
            continue
        value, integer = cfg[name], isinstance(table[name][0], int)
        number = isinstance(value, int | float) and not isinstance(value, bool) and (isinstance(value, int) or not integer)
        if not (number and rng.holds(value)):
            raise UsageError(f"--{name.replace('_', '-')}: expected {rng.expected(integer)}; got {value!r}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, ranges: Mapping[str, Range]) -> None:
    """``parser.error`` (one line, exit code 2) for a parsed numeric flag outside its range; ``None`` passes."""
    for name, rng in ranges.items():
        value = getattr(args, name)
        if value is not None and not rng.holds(value):
            parser.error(f"--{name.replace('_', '-')}: expected {rng.expected(isinstance(value, int))}; "
                         f"got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit code 2 (argparse's own convention)
        raise UsageError(message)


def parser(prog: str, options: dict[str, tuple[Any, str]], doc: str) -> argparse.ArgumentParser:
    """An argparse parser for ``options`` whose ``--help`` shows every default; unset options stay unset."""
    p = _Parser(prog=prog, description=doc.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    for name, (default, text) in options.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{text} (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, type=type(default), choices=CHOICES.get(name), help=help_text, metavar=name.upper())
    return p


def _toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config: expected an existing TOML file; {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--config: expected a TOML file; {path!r} is a folder") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config: expected a UTF-8 TOML file; {path!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config: expected TOML; {path!r}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--config: expected a readable TOML file; {path!r}: {exc.strerror or exc}") from None


def options(prog: str, table: dict[str, tuple[Any, str]], doc: str, argv: Sequence[str],
            ranges: Mapping[str, Range]) -> dict[str, Any]:
    """Defaults, then ``--config`` keys, then the command line: every option of ``table`` by its underscore name.

    Numeric options are checked against ``ranges`` (:func:`check_ranges`) before anything else happens.
    """
    given = vars(parser(prog, table, doc).parse_args(list(argv)))
    cfg = {k: d for k, (d, _) in table.items()}
    path = given.get("config", "")
    if path:
        spelled: dict[str, str] = {}
        for key, value in _toml(path).items():
            name = key.replace("-", "_")
            if name not in table or name == "config":
                raise UsageError(f"--config: {path!r} has an unknown key {key!r}; expected one of the options of --help")
            if name in spelled:
                raise UsageError(f"--config: {path!r} sets {spelled[name]!r} and {key!r}, the same option; keep one")
            spelled[name] = key
            default = table[name][0]
            ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
            ok = ok or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
            if not ok or (name in CHOICES and value not in CHOICES[name]):
                want = f"one of {CHOICES[name]}" if name in CHOICES else type(default).__name__
                raise UsageError(f"--config: key {key!r} expected {want}; got {value!r}")
            cfg[name] = float(value) if isinstance(default, float) else value
    cfg.update(given)
    cfg["config"] = path
    check_ranges(cfg, table, ranges)
    return cfg


#: What a run writes before its first ``values.pt``: a folder holding only these is a run that stopped (diverged,
#: interrupted, killed) before it saved anything, which a new run may start over.
UNFINISHED = frozenset({"config.json", "metrics.jsonl"})
#: The folder a ``--record-every`` run saves its recording in just before its first ``values.pt``, and what it holds.
RECORDING = ("trajectory", frozenset({"trajectory.pt", "spec.json"}))


def _unfinished(p: Path) -> bool:
    """Whether ``p`` is a file of a run that stopped before its first save: its config and metrics, or a recording
    saved just before it (a Ctrl-C there left a folder neither the same command nor ``--resume`` would take)."""
    if p.is_file():  # (or the first values.pt's save cut short: its temporary file, h56)
        return p.name in UNFINISHED or (p.name.startswith(".values.pt.") and p.name.endswith(".tmp"))
    name, files = RECORDING
    return p.is_dir() and p.name == name and all(  # (and a save cut short: its temporary file)
        q.is_file() and (q.name in files or q.name.startswith(".") or q.name.endswith(".tmp")) for q in p.iterdir())


def check_out(out: Path, resume: bool) -> list[Path]:
    """A fresh run needs an empty or new ``--out`` it can write; ``--resume`` needs a run there.

    Returns the files of a run that stopped before its first save (:data:`UNFINISHED`), which a fresh run
    removes before it starts (nothing else is ever removed).
    """
    has_run = (out / "values.pt").is_file()
    held = sorted(p for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    unfinished = bool(held) and not has_run and all(_unfinished(p) for p in held)
    if resume and not has_run:
        why = (f"{str(out)!r} is a file" if out.is_file() else "its values.pt is a folder" if
               (out / "values.pt").is_dir() else "there is none")  # (each said "there is none" before, h91)
        raise UsageError(f"--resume: expected a run in --out {str(out)!r} (its values.pt); {why}"
                         + (" (the run there stopped before its first save: start it again without --resume)"
                            if unfinished else ""))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: expected a new or empty folder (or --resume); {str(out)!r} is a file")
    if not resume and out.exists() and held and not unfinished:
        names = [p.name for p in held if not _unfinished(p)]
        raise UsageError(f"--out: expected a new or empty folder (or --resume); {str(out)!r} already holds files "
                         f"({', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''})")
    check_writable(out, "--out")
    return held if unfinished and not resume else []


#: The file a run holds a lock on in its ``--out`` while it runs (:func:`hold_out`).
LOCK = ".ghostfunc-run.lock"


def hold_out(out: Path) -> Any:
    """Hold ``out`` for this run (made here, once the data are read and the model built): an advisory lock on
    ``out/.ghostfunc-run.lock``, let go by the system when the process ends, however it ends. A second run started into the same ``--out`` meanwhile is refused (both were
    accepted, and wrote one interleaved ``metrics.jsonl`` and one run's config beside the other's values). Returns
    the open file, to keep for the run; ``None`` where the system has no such locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK, "a")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"--out: another run is writing into {str(out)!r} now; wait for it to end, or pick another "
                         f"folder") from None
    return handle


def check_writable(folder: Path, option: str) -> None:
    """Refuse a ``folder`` that cannot be made or written: probe with a temporary folder, removed at once.

    The probe goes into ``folder`` when it exists, else into its nearest existing
    parent (which must be a folder); nothing stays behind.
    """
    import tempfile

    here = Path(os.path.abspath(folder))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise UsageError(f"{option}: expected a folder it can write; {str(here)!r} is a file"
                         + (f" (a parent of {str(folder)!r})" if here != Path(os.path.abspath(folder)) else ""))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ghostfunc-probe-", dir=here))
    except OSError as exc:
        raise UsageError(f"{option}: expected a folder it can write; cannot write in {str(here)!r}: "
                         f"{exc.strerror or exc}") from None
