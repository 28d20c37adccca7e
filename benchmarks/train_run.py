"""Throughput of ``ghostfunc train``: training tokens/s with values (order 1, order 2) against the same training without.

Contenders, all on the default run's setup (tiny GPT-2, stdlib corpus, batch 16 x 128
tokens, AdamW; validation batch 16 for the values):

- ``values none``: the update through ordinary autograd (``--values none``), the baseline;
- ``order 1``: ``ghostfunc.train_step`` with first-order values (``--order 1``);
- ``order 2``: second-order values (``--order 2``).

Goal: ``order 1`` at most 1.1x the baseline's time per step. The values step also
runs the validation batch (16 more rows) through the model, which the baseline does not.

Command (a few minutes on 2 CPU cores)::

    python -m benchmarks.train_run                      # writes benchmarks/results/train_run.{json,md}
    python -m benchmarks.train_run --tiny --out /tmp/b  # the smoke test's run

Method: ``rounds`` rounds, each running every contender (order rotated per round)
for ``steps`` steps of the real training loop (``ghostfunc._run.loop.run``); a
contender's tokens/s in a round is the median over its logged windows of 2 steps
after the first window (burn-in). Ratios are per round (baseline tokens/s over the
contender's, i.e. time per step relative to the baseline), median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ghostfunc._run import cli, loop

from . import _common as C

CONTENDERS = {"values none": {"values": "none"}, "order 1": {"order": 1}, "order 2": {"order": 2}}
GOAL = 1.1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per contender per round (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--tiny", action="store_true", help="smoke test: seq-len 32, batch 4, 4 steps, 1 round")
    parser.add_argument("--out", type=Path, default=C.RESULTS, help="where to write train_run.{json,md}")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.rounds = 4, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = {k: d for k, (d, _) in cli.TRAIN_OPTIONS.items()}
    base.update(steps=args.steps, eval_every=10**9, log_every=2, progress=False, val_limit=16, warmup=2)
    if args.tiny:
        base.update(seq_len=32, batch_size=4, val_batch_size=4)
    before = C.machine()
    tps: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        base["out"] = str(Path(tmp) / "run")
        setups = {name: loop.prepare({**base, **over}) for name, over in CONTENDERS.items()}
        names = list(CONTENDERS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                records: list[dict[str, Any]] = []
                loop.run(setups[name], loop.Dist(), quiet=True, log=records.append, save_values=False)
                windows = [m["tokens_per_s"] for m in records if "tokens_per_s" in m][1:]
                tps[name].append(statistics.median(windows))
    after = C.machine()
    other = C.other_load(before, after)
    after["other_cores"] = other
    ratios = {name: statistics.median(b / t for b, t in zip(tps["values none"], tps[name], strict=True))
              for name in CONTENDERS}
    rows = [{"contender": name, "tokens/s (median)": statistics.median(tps[name]),
             "min": min(tps[name]), "max": max(tps[name]), "time ratio vs none": ratios[name]} for name in CONTENDERS]
    shape = f"batch {base['batch_size']} x {base['seq_len']} tokens, validation batch {base['val_batch_size']}"
    text = (f"ghostfunc train throughput ({base['model']} {base['size']}, {shape}; {args.rounds} rounds x {args.steps} steps)\n"
            f"{C.describe_machine(after, C.busy(before, after))}\n\n"
            + C.markdown(rows, ["contender", "tokens/s (median)", "min", "max", "time ratio vs none"])
            + f"\n\ngoal: order 1 <= {GOAL}x the time per step of --values none: measured {ratios['order 1']:.2f}x "
            + ("(met)" if ratios["order 1"] <= GOAL else "(NOT met)"))
    payload = {"config": base | {"out": None}, "tokens_per_s": tps, "ratios": ratios, "rows": rows,
               "goal": {"limit": GOAL, "measured": ratios["order 1"], "met": ratios["order 1"] <= GOAL},
               "machine": {"before": before, "after": after}}
    C.report("train_run_tiny" if args.tiny else "train_run", args.out, payload, text)
    return payload


if __name__ == "__main__":
    main()
