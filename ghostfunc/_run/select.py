"""``python -m ghostfunc select --run DIR``: is training on the top-valued half better? Measured, not asserted.

From a finished ``ghostfunc train`` run: the pool is every training chunk the run
saw. Four retrainings from scratch, each for the run's number of steps with its
options (model, batch size, schedule), plain training (no values), per seed:

- ``top-valued``: the ``fraction`` of the pool with the highest value (−Σφ);
- ``random``: a random ``fraction`` of the pool (a new draw per seed);
- ``low-loss``: the ``fraction`` with the lowest mean training loss in the run;
- ``all seen``: the whole pool (for scale).

Each seed changes the initialisation and the batch order. Reported: the loss on
the target domain's **test** split (files held out from valuing and training)
and on the validation split the values were computed against, mean ± std over
seeds. ``select.json`` and ``select.md`` go to ``RUN/select`` (or ``--out``).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ghostfunc

from . import cli, loop
from .data import UsageError, would_read

ARMS = ("top-valued", "random", "low-loss", "all seen")


def pools(table: dict[str, np.ndarray], fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Chunk indices of each arm (``ARMS``) for ``seed``."""
    seen = np.flatnonzero(table["times_seen"] > 0)
    k = max(1, round(fraction * len(seen)))
    by_value = seen[np.argsort(-table["value"][seen], kind="stable")]
    by_loss = seen[np.argsort(table["mean_loss"][seen], kind="stable")]
    rand = seen[np.random.default_rng(seed).permutation(len(seen))]
    return {"top-valued": torch.from_numpy(np.sort(by_value[:k])), "random": torch.from_numpy(np.sort(rand[:k])),
            "low-loss": torch.from_numpy(np.sort(by_loss[:k])), "all seen": torch.from_numpy(seen)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ghostfunc select``; return the exit code (2 for bad input)."""
    prog = "ghostfunc select"
    try:
        opts = cli.options(prog, cli.SELECT_OPTIONS, __doc__ or "", sys.argv[1:] if argv is None else argv,
                           cli.SELECT_RANGES)
        run_dir = Path(opts["run"])
        if not (run_dir / "config.json").is_file() or not (run_dir / "values.pt").is_file():
            raise UsageError(f"--run: expected the folder of a finished 'ghostfunc train' run (config.json, values.pt); "
                             f"{str(run_dir)!r} has none")
        out = Path(opts["out"] or run_dir / "select")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: expected a folder for select.json and select.md; {str(out)!r} is a file")
        cli.check_writable(out, "--out")
        if opts["threads"]:
            torch.set_num_threads(opts["threads"])
        cfg = loop.read_config(run_dir)
        if cfg["values"] != "shapley":
            raise UsageError(f"--run: expected a run with values (--values shapley); {str(run_dir)!r} ran --values {cfg['values']}")
        values, saved = loop.saved_run(run_dir / "values.pt")
        assert isinstance(values, ghostfunc.DataValues)
        loop.check_values(loop.resolve_run(cfg, run_dir), saved, str(run_dir))  # (not another run's values.pt copied
        # in, h102; before the steps: finishing another run's values is no advice, h103)
        if values.steps < cfg["steps"]:  # stopped (--stop-at, interrupted): its values cover part of the run
            raise UsageError(f"--run: expected a finished run; {str(run_dir)!r} saved step {values.steps} of "
                             f"{cfg['steps']} (finish it with 'ghostfunc train --resume --out {run_dir}')")
        cfg = loop.resolve_run(cfg, run_dir)  # the run's own data, whatever the current folder
        for key in ("train", "val", "test"):  # as train refuses it: select.* would become the run's data
            if cfg.get(key) and would_read(cfg[key], out):
                raise UsageError(f"--out: expected a folder outside the run's --{key} {cfg[key]!r}; select.json and "
                                 f"select.md there would change the data every later select and --resume reads")
        # the token cache beside the run, as the run made it (never in the current folder)
        cfg.update(resume=False, stop_at=0, values="none", progress=False, out=str(run_dir.resolve()))
        if opts["steps"]:
            cfg["steps"] = opts["steps"]
        cfg["eval_every"] = cfg["steps"]  # only the final losses matter here
        setup = loop.prepare(cfg)
        setup.check_data(saved.get("data"), len(values), str(run_dir))
        table = loop.chunk_table(setup, values)
        results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
        runs = [(seed, arm) for seed in range(opts["seeds"]) for arm in ARMS]
        for n, (seed, arm) in enumerate(runs):
            pool = pools(table, opts["fraction"], seed)[arm]
            # a fresh initialisation per seed (past the largest seed, counting on from 0)
            sub = loop.prepare({**cfg, "seed": (cfg["seed"] + 1 + seed) % 2**32})
            got: dict[str, Any] = {}
            loop.run(sub, loop.Dist(), pool=pool, quiet=True, log=got.update, save_values=False)
            res = {"val_loss": got["val_loss"], **({"test_loss": got["test_loss"]} if "test_loss" in got else {})}
            results[arm].append(res)
            if opts["progress"]:
                print(f"{prog}: [{n + 1}/{len(runs)}] seed {seed} {arm:10s} ({len(pool)} chunks): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), file=sys.stderr)
        summary = summarize(results)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"run": str(run_dir), "steps": cfg["steps"], "fraction": opts["fraction"], "seeds": opts["seeds"],
                   "pool": int((table["times_seen"] > 0).sum()), "results": results, "summary": summary}
        loop.write_atomic(out / "select.json", json.dumps(payload, indent=1) + "\n")
        text = markdown(payload, cfg)
        loop.write_atomic(out / "select.md", text)
        print(text)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds of each arm's losses."""
    out = {}
    for arm, runs in results.items():
        row = {}
        for key in runs[0]:
            xs = [r[key] for r in runs]
            row[f"{key}_mean"] = statistics.fmean(xs)
            row[f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out[arm] = row
    return out


def markdown(payload: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The table of ``select.md``."""
    target = cfg["target"] if cfg["train"] == "stdlib" else cfg["val"]
    keys = [k for k in ("test_loss", "val_loss") if f"{k}_mean" in payload["summary"]["all seen"]]
    one = payload["seeds"] == 1
    spread = "one seed (no spread)" if one else f"{payload['seeds']} seeds (initialisation and batch order), mean ± std"
    test = (" The test split was never scored against (the run's values came from its validation split)."
            if "test_loss" in keys else " The run has no test split: the losses are on the validation split the "
            "values were scored against, so they favour the selection.")
    lines = [f"# ghostfunc select: retraining on {payload['fraction']:.0%} of {payload['pool']:,} seen chunks ({target})",
             "",
             f"{payload['steps']} steps from scratch per run, keeping {payload['fraction']:.0%} of the pool; "
             f"{spread}. Loss in nats/token; lower is better.{test}", "",
             "| kept | " + " | ".join(k.replace("_", " ") for k in keys) + " | per seed (" + keys[0].replace("_", " ") + ") |",
             "|---|" + "---:|" * len(keys) + "---|"]
    for arm in ARMS:
        s = payload["summary"][arm]
        per = ", ".join(f"{r[keys[0]]:.4f}" for r in payload["results"][arm])
        lines.append(f"| {arm} | " + " | ".join(f"{s[k + '_mean']:.4f}" + ("" if one else f" ± {s[k + '_std']:.4f}")
                                                for k in keys) + f" | {per} |")
    return "\n".join(lines) + "\n"
