"""The training loop of ``ghostfunc train``, over ghostfunc's public API only.

Per step ``s`` (0-based): the global batch is ``batch_size`` chunk indices drawn
without replacement epoch by epoch (epoch ``e``'s permutation comes from a
generator seeded with ``(seed, e)``, so the order is a pure function of the seed
and the step: resuming needs no random state); the validation batch is a fixed
one (the first ``val_batch_size`` validation chunks) or rotates through the
validation set. Rank ``r`` of ``W`` processes takes rows ``[r·B/W, (r+1)·B/W)`` of
each. ``ghostfunc.train_step`` updates the parameters with the training rows and
returns each row's In-Run Data Shapley value ``φ`` (negative = lowered the
validation loss); ``ghostfunc.DataValues`` sums ``[φ, φ first order, train loss]``
per chunk index. With ``values = "none"`` the same update runs through ordinary
autograd (the baseline the benchmark compares against).

Logs hold indices and figures only, never inputs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import ghostfunc
from ghostfunc._attribute import CLI_TASK

from . import cli, models
from . import data as data_mod
from .data import Corpus, UsageError

Params = dict[str, Tensor]
#: Columns of the per-chunk sums kept in ``values.pt`` (``DataValues.total[:, k]``).
COLUMNS = ("phi", "phi_first_order", "train_loss")
#: Options that do not change the trajectory: a resumed run may differ in these.
FREE_KEYS = frozenset({"out", "resume", "stop_at", "save_every", "progress", "config", "log_every", "eval_every",
                       "eval_batch_size", "threads"})
#: Options that may name a path (recorded absolute in ``config.json``: ``attribute``/``select`` work from any folder).
PATH_KEYS = ("train", "val", "test", "model")
#: The largest vocabulary taken from the data without ``--vocab-size`` (a larger id is most likely a wrong ``--token-dtype``).
VOCAB_CAP = 1 << 20


class Diverged(UsageError):
    """A non-finite loss or value during training (the CLI's one-line error names the step)."""


def is_path(key: str, value: str, base: Path) -> bool:
    """Option ``key``'s ``value`` names a file, folder or glob (not ``stdlib``, empty, or a preset model)."""
    if key == "model":
        return bool(value) and (Path(value).is_absolute() or (base / value).is_dir())
    return value not in ("stdlib", "")


def absolute(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """``cfg`` with the paths of ``PATH_KEYS`` made absolute against ``base`` (the folder the run starts in), and
    normal (``/x/tr/`` and ``/x/./tr`` are ``/x/tr``: ``--resume`` refused the same folder spelt another way)."""
    return {**cfg, **{k: os.path.abspath(base / cfg[k]) for k in PATH_KEYS if k in cfg and is_path(k, cfg[k], base)}}


def resolve_run(cfg: dict[str, Any], run: Path) -> dict[str, Any]:
    """A run's ``config.json`` options with absolute paths, whatever the current folder (``attribute``, ``select``).

    Runs record absolute paths; one from before that may hold relative ones, relative to
    the folder it was started in: that folder is ``run`` less the run's relative ``--out``.

    Raises:
        UsageError: a relative path whose starting folder cannot be told (``--out`` absolute or with ``..``).
    """
    run_abs = Path(os.path.abspath(run))
    out = Path(os.path.normpath(cfg.get("out", "")))
    base = None
    if out.parts and not out.is_absolute() and ".." not in out.parts and run_abs.parts[-len(out.parts):] == out.parts:
        base = Path(*run_abs.parts[:-len(out.parts)])
    for k in PATH_KEYS:
        value = cfg.get(k, "")
        relative = value not in ("stdlib", "") and not os.path.isabs(value)
        if k == "model":  # a preset's name, unless the starting folder held a folder of that name
            relative = relative and (value not in models.FAMILIES or (base is not None and (base / value).is_dir()))
        if relative and base is None:
            raise UsageError(f"--run: its --{k} {value!r} is relative to the folder the run was started in, which its "
                             f"--out {cfg.get('out')!r} does not tell; write the absolute path into "
                             f"{str(run_abs / 'config.json')!r}")
    return absolute(cfg, base) if base is not None else cfg


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` data-parallel processes (``group`` is ``None`` for one process)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def rows(self, index: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch's indices, in rank order (sizes differ by at most one
        when the batch does not divide: ``graddot``/``train_step`` with ``group=`` take uneven rows)."""
        n = len(index)
        return index[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the processes (``x`` itself for one)."""
        if self.group is not None:
            x = x.clone()
            dist.all_reduce(x, group=self.group)
        return x


@contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); always destroy it on the way out."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def schedule(cfg: dict[str, Any]) -> Callable[[int], float]:
    """``count -> lr``: linear warmup over ``warmup`` steps to ``lr``, then cosine down to ``lr · min_lr_ratio`` at ``steps``."""
    lr, warmup, steps, floor = cfg["lr"], cfg["warmup"], cfg["steps"], cfg["lr"] * cfg["min_lr_ratio"]

    def rate(count: int) -> float:
        if count < warmup:
            return lr * (count + 1) / warmup
        frac = min(1.0, (count - warmup) / max(1, steps - warmup))
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * frac))

    return rate


def optimizer(cfg: dict[str, Any]) -> ghostfunc.Optimizer:
    """``ghostfunc.adamw`` or ``ghostfunc.sgd`` with the schedule of :func:`schedule`."""
    rate = schedule(cfg)
    if cfg["optimizer"] == "adamw":
        return ghostfunc.adamw(rate, betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    return ghostfunc.sgd(rate, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def batch_indices(n: int, batch: int, seed: int, step: int, pool: Tensor | None = None) -> Tensor:
    """The global training batch of step ``step``: ``[batch]`` chunk indices, epoch-wise without replacement.

    Args:
        n: chunks to draw from (``len(pool)`` when a pool is given).
        batch: rows per step.
        seed: the run's seed.
        step: 0-based step.
        pool: ``[n]`` chunk indices to draw from instead of ``0..n-1`` (``ghostfunc select``).
    """
    pos = step * batch + torch.arange(batch)
    out = torch.empty(batch, dtype=torch.int64)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        here = pos.div(n, rounding_mode="floor") == epoch
        out[here] = perm[pos[here] % n]
    return out if pool is None else pool[out]


def val_indices(n: int, batch: int, step: int, rotate: bool) -> Tensor:
    """The validation batch of step ``step``: the first ``batch`` chunks, or the next ``batch`` in rotation."""
    start = step * batch if rotate else 0
    return (start + torch.arange(batch)) % n


@dataclass
class Setup:
    """Everything a run builds from its options before the first step."""

    cfg: dict[str, Any]
    train: Corpus
    val: Corpus
    test: Corpus | None
    model: torch.nn.Module
    model_fn: Callable[[Params, Any], Tensor]
    params: Params
    opt: ghostfunc.Optimizer
    device: torch.device

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """``{"train", "val", "test"}``: :func:`ghostfunc._run.data.fingerprint` of each split (computed once)."""
        return {"train": data_mod.fingerprint(self.train), "val": data_mod.fingerprint(self.val),
                "test": data_mod.fingerprint(self.test) if self.test is not None else None}

    def check_data(self, saved: dict[str, Any] | None, chunks: int, where: str) -> None:
        """Refuse data other than the run's: ``saved`` is its :attr:`data` (``None`` for an older run: the chunk count only).

        Args:
            saved: the fingerprints recorded with the run's ``values.pt``.
            chunks: the run's number of training chunks (``len`` of its values).
            where: the run folder, for the message.
        """
        mine = self.data if saved is not None else {"train": {"chunks": len(self.train)}}
        recorded = saved if saved is not None else {"train": {"chunks": chunks}}
        for split in ("train", "val", "test"):
            if recorded.get(split) != mine.get(split):
                old, new = recorded.get(split) or {}, mine.get(split) or {}
                option = f"--{split}" if self.cfg[split] not in ("stdlib", "") else "--train/--target (stdlib)"
                raise UsageError(f"{option}: expected the data the run in {where!r} was made with ({old.get('chunks')} "
                                 f"chunks, sha256 {str(old.get('sha256'))[:12]}); {self.cfg[split] or 'it'!r} now gives "
                                 f"{new.get('chunks')} chunks, sha256 {str(new.get('sha256'))[:12]}")


def prepare(cfg: dict[str, Any]) -> Setup:
    """Read the corpus and build the model and optimizer, checking every option; writes nothing to ``out``.

    Raises:
        UsageError: any option that does not fit (see the CLI's ``--help``).
    """
    cli.check_ranges(cfg, cli.TRAIN_OPTIONS, cli.TRAIN_RANGES)  # a config.json or a dict not read by cli.options
    if cfg["order"] not in (1, 2):
        raise UsageError(f"--order: expected 1 or 2; got {cfg['order']}")
    if cfg["precondition"] and cfg["order"] != 1:
        raise UsageError(f"--precondition: expected --order 1 (optimizer-aware values are first order); got --order {cfg['order']}")
    param_dtype = models.dtype(cfg["dtype"], "--dtype", models.DTYPES)
    autocast = models.dtype(cfg["autocast"], "--autocast", models.AUTOCAST)
    if param_dtype == torch.float16 and cfg["optimizer"] == "adamw":
        raise UsageError("--dtype: float16 parameters need --optimizer sgd (AdamW's eps 1e-8 is 0 in float16 and its "
                         "squared gradients underflow: the second step divides by zero); for AdamW use --dtype bfloat16, "
                         "or --autocast float16 with float32 parameters")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: expected a machine with CUDA (torch.cuda.is_available() is False here); "
                         "use --device cpu or auto")
    device = torch.device(cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if cfg["token_dtype"] not in data_mod.TOKEN_DTYPES:
        raise UsageError(f"--token-dtype: expected one of {', '.join(data_mod.TOKEN_DTYPES)}; got {cfg['token_dtype']!r}")
    cache = cache_folder(Path(cfg["out"]))
    seq_len = cfg["seq_len"]
    models.check_seq_len(models.config_of(cfg["model"], cfg["size"]), seq_len)  # before reading any data
    if cfg["train"] == "stdlib":
        if cfg["val"] not in ("stdlib", ""):
            raise UsageError(f"--val: expected 'stdlib' with --train stdlib (the --target package); got {cfg['val']!r}")
        train, val, held = data_mod.load_stdlib(cfg["target"], seq_len=seq_len, cache=cache)
        test: Corpus | None = held
    else:
        if cfg["val"] in ("stdlib", ""):
            raise UsageError("--val: expected a token file, folder, glob or text file to score against (with your own --train)")
        train = data_mod.load(cfg["train"], option="--train", seq_len=seq_len, cache=cache, token_dtype=cfg["token_dtype"])
        val = data_mod.load(cfg["val"], option="--val", seq_len=seq_len, cache=cache, token_dtype=cfg["token_dtype"])
        test = None
    if cfg["test"]:  # an explicit test set replaces the target's held-out half
        test = data_mod.load(cfg["test"], option="--test", seq_len=seq_len, cache=cache, token_dtype=cfg["token_dtype"])
    val = data_mod.evenly(val, cfg["val_limit"])
    test = data_mod.evenly(test, cfg["val_limit"]) if test is not None else None
    for name, c in (("--val", val), ("--test", test)):  # token ids of one vocabulary, or bytes, everywhere
        if c is not None and c.byte_level != train.byte_level:
            kinds = ("text (byte-level tokens)", "a token file")
            raise UsageError(f"{name}: expected {kinds[0] if train.byte_level else kinds[1]}, as --train is; got "
                             f"{kinds[0] if c.byte_level else kinds[1]}: the ids of a token file and the bytes of text "
                             f"are unrelated vocabularies")
    if len(train) < cfg["batch_size"]:
        raise UsageError(f"--batch-size: expected at most the training chunks ({len(train)}); got {cfg['batch_size']}")
    if len(val) < cfg["val_batch_size"]:
        limited = (f", --val-limit {cfg['val_limit']} of them" if cfg["val_limit"] and len(val) == cfg["val_limit"]
                   else "")  # (the limit that made them few, named: h72)
        raise UsageError(f"--val-batch-size: expected at most the validation chunks ({len(val)}{limited}); got "
                         f"{cfg['val_batch_size']}")
    needs = {name: c.vocab_needed() for name, c in (("--train", train), ("--val", val), ("--test", test)) if c is not None}
    need = max(needs.values())
    worst = max(needs, key=lambda k: needs[k])
    if not cfg["vocab_size"] and need > VOCAB_CAP:
        raise UsageError(f"{worst}: expected token ids below {VOCAB_CAP:,} (the largest vocabulary taken from the data; "
                         f"--vocab-size sets a larger one); it holds id {need - 1:,}: is --token-dtype "
                         f"{cfg['token_dtype']} the dtype the file was written with?")
    vocab = cfg["vocab_size"] or (need if train.byte_level else -(-need // 64) * 64)
    if vocab < need:
        bad = "--vocab-size" if cfg["vocab_size"] else worst
        raise UsageError(f"{bad}: expected token ids below the model's vocabulary {vocab}; the data holds id {need - 1}")
    net = models.build(cfg["model"], cfg["size"], vocab=vocab, seq_len=seq_len, param_dtype=param_dtype, seed=cfg["seed"],
                       need=need, vocab_option=bool(cfg["vocab_size"]))
    net = net.to(device)
    model_fn, params = ghostfunc.from_module(net, ghostfunc.causal_lm_loss, autocast=autocast)
    return Setup(cfg, train, val, test, net, model_fn, params, optimizer(cfg), device)


def evaluate(setup: Setup, params: Params, corpus: Corpus, par: Dist) -> float:
    """Mean loss over every chunk of ``corpus`` (the processes share the chunks and sum)."""
    idx = torch.arange(len(corpus))[par.rank::par.world]
    total = torch.zeros((), dtype=torch.float64, device=setup.device)
    with torch.no_grad():
        for b in idx.split(setup.cfg["eval_batch_size"]):
            ids = corpus.batch(b).to(setup.device)
            total += setup.model_fn(params, {"input_ids": ids}).double().sum()
    return float(par.sum(total)) / len(corpus)


def plain_step(setup: Setup, state: ghostfunc.TrainState, train: dict[str, Tensor], par: Dist) -> tuple[ghostfunc.TrainState, Tensor]:
    """The same update as ``train_step``, through ordinary autograd and no values: ``(state, losses [n])``."""
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    losses = setup.model_fn(dict(params), train)  # a copy: the leaves differentiated stay ours
    # this rank's share of the global mean (its rows may be one more or fewer than another rank's), summed
    share = losses.mean() if par.group is None else losses.sum() / setup.cfg["batch_size"]
    grads = torch.autograd.grad(share, list(params.values()), allow_unused=True)
    mean = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads, strict=True)}
    if par.group is not None:
        mean = {k: par.sum(g) for k, g in mean.items()}
    new, opt_state = setup.opt.update(mean, state.opt_state, state.params)
    return ghostfunc.TrainState(new, opt_state, state.step + 1), losses.detach()


def fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The options that fix the trajectory (what ``--resume`` must match)."""
    return {k: v for k, v in sorted(cfg.items()) if k not in FREE_KEYS}


def check_recording(cfg: dict[str, Any], recorded: dict[str, Any], run: str,
                    what: str = "the recording in {run!r} (trajectory/) was", noun: str = "recording") -> None:
    """Refuse a recording (its ``spec.json``'s options, :func:`fingerprint`), or saved values (``values.pt``'s), made
    by a run with other trajectory-fixing options than the run in ``run`` (``cfg``, its ``config.json``)."""
    # (recorded resolved: a preset's name, gpt2, taken against the current folder was a path where that folder held a
    # gpt2/, h92; its fingerprint: options saved by a version that counted them, --eval-batch-size, are free now;
    # and an older run's relative paths taken from the folder it started in, as config.json's are, h103)
    theirs = fingerprint(resolve_run({**recorded, "out": cfg.get("out", "")}, Path(run)))
    mine, theirs = _resolved(fingerprint(cfg)), _resolved(theirs)
    if (k := _differing(mine, theirs)) is not None:
        raise UsageError(f"--run: {what.format(run=run)} made by a run with --{k.replace('_', '-')} "
                         f"{theirs.get(k)!r}; this run has {mine.get(k)!r}: it is another run's {noun}")


def check_values(cfg: dict[str, Any], saved: dict[str, Any], run: str) -> None:
    """Refuse a ``values.pt`` another run saved (copied into this one: ``select`` ranked chunks by that run's values
    and retrained with this run's options, h102), as :func:`check_recording` refuses a recording."""
    if isinstance(saved.get("config"), dict):
        check_recording(cfg, saved["config"], run, "the values in {run!r} (values.pt) were", "values")


def read_config(folder: Path) -> dict[str, Any]:
    """A run's ``config.json`` as written by the training CLI; a missing, torn or foreign one is the ``--run``
    :class:`UsageError` (one line; ``select`` raised a traceback, h102)."""
    path = folder / "config.json"
    try:  # (a missing or torn config.json was a traceback, h91)
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--run: expected the run's config.json in {str(folder)!r} (the training CLI writes it); "
                         f"there is none") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--run: {str(path)!r} is not the JSON the training CLI writes ({err})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--run: {str(path)!r} must hold the run's options as a JSON object; got "
                         f"{type(raw).__name__}")
    missing = [k for k in ("values", "steps", "seed") if k not in raw]
    if missing:
        raise UsageError(f"--run: {str(path)!r} is not the options the training CLI writes: it has no "
                         f"{', '.join(missing)}")
    return raw


def _differing(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first option (by name) whose value differs between two runs' options, or ``None``."""
    return next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), None)


def check_resume(cfg: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse to resume a run made with other trajectory-fixing options.

    A run from before paths were recorded absolute holds relative ones: they are
    taken relative to the current folder, as that run took them.
    """
    mine = _resolved(fingerprint(cfg))
    saved = _resolved(fingerprint(absolute(saved, Path.cwd())))  # (an option free now, saved by an older version)
    if (k := _differing(mine, saved)) is not None:
        raise UsageError(f"--resume: expected the options of the run in {cfg['out']}; it has --{k.replace('_', '-')} "
                         f"{saved.get(k)!r}, this run {mine.get(k)!r}")


def _resolved(cfg: dict[str, Any]) -> dict[str, Any]:
    """``--device auto`` as the device it picks here (``auto`` against ``cpu`` on a machine without CUDA is one run),
    and the paths with their links resolved (the same folder reached through a symbolic link is the same data)."""
    out = {**cfg, **{k: os.path.realpath(cfg[k]) for k in PATH_KEYS
                     if k in cfg and is_path(k, cfg[k], Path.cwd()) and os.path.isabs(cfg[k])}}
    if out.get("device") == "auto":
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return out


def cache_folder(out: Path) -> Path:
    """Where the tokenized corpus is kept: beside ``out`` (``out/../.ghostfunc-cache``), or where that parent
    cannot be written (a volume mounted as ``--out``, a folder made for you) in the system's temporary folder
    (a ``PermissionError`` traceback before)."""
    beside = out.resolve().parent / ".ghostfunc-cache"
    try:
        beside.mkdir(parents=True, exist_ok=True)
        if os.access(beside, os.W_OK | os.X_OK):
            return beside
    except OSError:
        pass
    import tempfile

    return Path(tempfile.gettempdir()) / f"ghostfunc-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 through a temporary file and a rename (never a torn file). A file name
    that is not UTF-8 (a latin-1 ``café.py``, legal on Linux: read back as escapes) is written escaped, ``\\udce9``
    (it raised ``UnicodeEncodeError`` after training, and no report was written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: The task factory ``spec.json`` names (``ghostfunc attribute --run`` calls it with the folder ``--run`` names).
ATTRIBUTION_TASK = CLI_TASK


def recording(out: Path, every: int, state: ghostfunc.TrainState) -> ghostfunc.Trajectory:
    """``--record-every K``: the :class:`ghostfunc.Trajectory` this run appends to (from ``state``, or resumed).

    Saved as ``out/trajectory/trajectory.pt`` with a ``spec.json`` naming
    :func:`ghostfunc._run.attribution.task` (what ``ghostfunc attribute --run``
    replays), each time ``values.pt`` is saved. Resuming at step ``s`` keeps the
    recorded steps ``< s`` and the checkpoints up to ``s``: the recording then
    equals an uninterrupted run's.

    Raises:
        UsageError: resuming without the trajectory, or with another ``--record-every``.
    """
    if state.step == 0:
        return ghostfunc.Trajectory.start(state, every)
    folder = out / "trajectory"
    if not (folder / "trajectory.pt").is_file():
        raise UsageError(f"--record-every: expected the trajectory of the run in {str(out)!r} to resume "
                         f"({folder / 'trajectory.pt'}); there is none")
    old = ghostfunc.Trajectory.load(folder)
    if old.every != every or old.steps < state.step:
        raise UsageError(f"--record-every: expected the recording of the run in {str(out)!r} (every {every}, at least "
                         f"{state.step} steps); it has every {old.every}, {old.steps} steps")
    params = {k: v.detach() for k, v in state.params.items()}
    kept = {t: c for t, c in old.checkpoints.items() if t < state.step}
    if state.step % every == 0:  # Trajectory.save leaves out the checkpoint at the last step: it is this state
        kept[state.step] = (params, state.opt_state)
    return ghostfunc.Trajectory(every, kept, old.indices[:state.step], params)


def save_trajectory(trajectory: ghostfunc.Trajectory | None, out: Path, cfg: dict[str, Any] | None = None,
                    grew: bool = True) -> None:
    """Write the recording and the ``spec.json`` that ``ghostfunc attribute --run out`` reads (atomically), with the
    run's trajectory-fixing options (:func:`fingerprint`: a recording copied into another run is refused). An
    ``unrolled.pt`` that ``attribute`` made of the recording before it ``grew`` (a run stopped with ``--stop-at``,
    then resumed) goes: its values are of fewer steps than the recording now holds. A finished run resumed trains
    nothing, and keeps it (it was deleted, h102)."""
    if trajectory is not None:
        kwargs: dict[str, Any] = {"run": str(out.resolve())}
        if cfg is not None:
            kwargs["config"] = fingerprint(cfg)
        trajectory.save(out / "trajectory", spec={"factory": ATTRIBUTION_TASK, "kwargs": kwargs, "index": "index"})
        if grew:
            (out / "trajectory" / "unrolled.pt").unlink(missing_ok=True)  # (made of the recording before it grew)


def save(values: ghostfunc.DataValues, path: Path, state: ghostfunc.TrainState, cfg: dict[str, Any],
         par: Dist, data: dict[str, Any] | None = None) -> ghostfunc.DataValues:
    """``values.pt`` with the training state, the trajectory-fixing options and the data's fingerprints; returns the values to keep.

    With many processes the save is collective: the file holds the sum over ranks and
    ``DataValues.save`` returns those global values (keep them: each value then counts once).
    """
    payload = {"train": state, "config": fingerprint(cfg), "data": data}
    return values.save(path, state=payload, group=par.group)


def load(path: Path, par: Dist) -> tuple[ghostfunc.DataValues, dict[str, Any]]:
    """``(values, payload)`` from ``values.pt`` (with many processes a collective: every rank gets the file's values)."""
    return saved_run(path, par.group, "--resume")


def saved_run(path: Path, group: Any = None, option: str = "--run") -> tuple[ghostfunc.DataValues, dict[str, Any]]:
    """A run's ``values.pt`` and its saved state; a file that is not one (truncated, foreign) is the run's
    :class:`UsageError` naming ``option`` (one line, exit code 2), not a traceback."""
    try:
        return ghostfunc.DataValues.load(path, with_state=True, group=group)  # type: ignore[return-value]
    except ValueError as exc:
        raise UsageError(f"{option}: expected the run's saved values whole (resume, select and attribute need "
                         f"them); {exc}") from None


def run(setup: Setup, par: Dist, *, pool: Tensor | None = None, quiet: bool = False,
        log: Callable[[dict[str, Any]], None] | None = None, save_values: bool = True) -> tuple[ghostfunc.TrainState, ghostfunc.DataValues]:
    """Train for ``cfg["steps"]`` steps (or until ``cfg["stop_at"]``), logging and saving into ``cfg["out"]``.

    Args:
        setup: from :func:`prepare`.
        par: the process's place among data-parallel processes.
        pool: draw the training batches from these chunk indices only (``ghostfunc select``); ``None``: all.
        quiet: no progress bar.
        log: called with each metrics record (rank 0); ``None`` appends to ``out/metrics.jsonl``.
        save_values: write ``out/values.pt`` every ``save_every`` steps and at the end (and resume from it).

    Returns:
        the final training state and the per-chunk sums (``COLUMNS``).
    """
    cfg = setup.cfg
    out = Path(cfg["out"])
    values_path = out / "values.pt"
    step_fn = None
    if cfg["values"] == "shapley":
        kwargs: dict[str, Any] = {"order": cfg["order"], "precondition": cfg["precondition"]}
        if par.group is not None:
            kwargs["group"] = par.group
        step_fn = ghostfunc.train_step(setup.model_fn, setup.opt, **kwargs)
    state = ghostfunc.TrainState({k: v.detach().clone() for k, v in setup.params.items()}, setup.opt.init(setup.params), 0)
    values = ghostfunc.DataValues.zeros(len(setup.train), (len(COLUMNS),))
    saved_at = None
    if save_values and cfg["resume"] and values_path.is_file():
        values, payload = load(values_path, par)
        check_resume(cfg, payload["config"])
        setup.check_data(payload.get("data"), len(values), str(out))
        state = payload["train"]
        saved_at = state.step
    keep_trajectory = bool(cfg["record_every"]) and par.rank == 0 and save_values
    trajectory = recording(out, cfg["record_every"], state) if keep_trajectory else None
    elapsed = 0.0  # the seconds the steps kept took before a resume (h72: a resumed run's clock began at 0)
    if log is None:
        metrics = out / "metrics.jsonl"
        if par.rank == 0:
            kept = [(ln, rec) for ln in (metrics.read_text().splitlines() if metrics.is_file() else [])
                    if (rec := _record(ln)) is not None and rec["step"] <= state.step]  # drop what was logged
            # after the last save, and a line torn by a kill during its append (a traceback on --resume, h102)
            write_atomic(metrics, "".join(f"{ln}\n" for ln, _ in kept))
            elapsed = max((float(rec.get("seconds", 0.0)) for _, rec in kept), default=0.0)

        def log(record: dict[str, Any]) -> None:
            with metrics.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    stop = min(cfg["steps"], cfg["stop_at"] or cfg["steps"])
    n_pool = len(pool) if pool is not None else len(setup.train)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    bar = None
    if not quiet and par.rank == 0 and cfg["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=cfg["steps"], initial=state.step, unit="step", desc="train", dynamic_ncols=True)

    def evals() -> dict[str, float]:  # the losses of the current parameters on the held-out sets
        got = {"val_loss": evaluate(setup, state.params, setup.val, par)}
        if setup.test is not None:
            got["test_loss"] = evaluate(setup, state.params, setup.test, par)
        return got

    def diverged(step: int, what: str) -> NoReturn:
        last = (f"{values_path} holds step {saved_at}" if saved_at is not None and save_values
                else "no values.pt saved yet")
        raise Diverged(f"--lr: expected finite losses; the run diverged at step {step} ({what}); try a lower --lr "
                       f"({last})")

    if state.step == 0:
        first = evals()
        if par.rank == 0:
            log({"step": 0, **first, "seconds": 0.0})
    t_run, t_win, seen_loss, n_win = time.perf_counter() - elapsed, time.perf_counter(), 0.0, 0
    try:
        while state.step < stop:
            s = state.step
            every = batch_indices(n_pool, cfg["batch_size"], cfg["seed"], s, pool)
            every_val = val_indices(len(setup.val), cfg["val_batch_size"], s, cfg["val_batch"] == "rotating")
            rows, vrows = par.rows(every), par.rows(every_val)
            train = {"input_ids": setup.train.batch(rows).to(setup.device)}
            lr = setup.opt.lr(state.opt_state)
            try:
                if step_fn is not None:
                    val = {"input_ids": setup.val.batch(vrows).to(setup.device)}
                    state, info = step_fn(state, train, val)
                    losses = info.train_loss.detach()
                    cols = torch.stack([info.values, info.first_order, losses], 1)
                else:
                    state, losses = plain_step(setup, state, train, par)
                    cols = torch.stack([torch.zeros_like(losses), torch.zeros_like(losses), losses], 1)
                cols = cols.double().cpu()
                finite = bool(torch.isfinite(cols).all())
            except FloatingPointError:  # train_step refuses non-finite losses
                finite = False
            if not finite:
                diverged(s + 1, f"non-finite training loss or values at lr {lr:.3g}")
            values = values.add(rows, cols)
            seen_loss += float(par.sum(losses.double().sum())) / cfg["batch_size"]
            n_win += 1
            done = state.step
            eval_now = done % cfg["eval_every"] == 0 or done == cfg["steps"]
            if done % cfg["log_every"] == 0 or eval_now or done == stop:
                now = time.perf_counter()
                record: dict[str, Any] = {"step": done, "train_loss": seen_loss / n_win, "lr": lr,
                                          "tokens_per_s": tokens_per_step * n_win / (now - t_win),
                                          "seconds": now - t_run}
                if eval_now:
                    record.update(evals())
                    if not all(math.isfinite(v) for k, v in record.items() if k.endswith("_loss")):
                        diverged(done, f"non-finite held-out loss after the update at lr {lr:.3g}")
                if par.rank == 0:
                    log(record)
                if bar is not None:
                    post = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                    if "val_loss" in record:
                        post["val"] = f"{record['val_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                t_win, seen_loss, n_win = time.perf_counter(), 0.0, 0
            if bar is not None:
                bar.update(1)
            if trajectory is not None:
                trajectory.record(every, state)
            if save_values and cfg["save_every"] and done % cfg["save_every"] == 0 and done < stop:
                save_trajectory(trajectory, out, cfg)  # before values.pt: a resume finds at least its steps
                values = save(values, values_path, state, cfg, par, setup.data)
                saved_at = done
    finally:
        if bar is not None:
            bar.close()
    if not bool(torch.stack([torch.isfinite(p).all() for p in state.params.values()]).all()):
        diverged(state.step, "the last update made the parameters non-finite")  # (no later step's losses show it)
    if save_values:  # (both saved again when nothing trained: they name the options as config.json now spells them)
        save_trajectory(trajectory, out, cfg, grew=state.step != saved_at)
        values = save(values, values_path, state, cfg, par, setup.data)
    return state, values


def _record(line: str) -> dict[str, Any] | None:
    """One ``metrics.jsonl`` record, or ``None`` for a line that is not one (torn, blank)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def chunk_table(setup: Setup, values: ghostfunc.DataValues) -> dict[str, np.ndarray]:
    """Per chunk: ``value`` (``−Σφ``, positive = lowered the validation loss), ``times_seen``, ``mean_loss``, ``source``."""
    total = values.total.numpy()
    count = values.count.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_loss = np.where(count > 0, total[:, 2] / np.maximum(count, 1), np.nan)
    return {"value": 0.0 - total[:, 0], "value_first_order": 0.0 - total[:, 1], "times_seen": count,  # (no -0.0)
            "mean_loss": mean_loss,
            "source": setup.train.source}
