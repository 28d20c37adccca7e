"""A token-wise MLP over a grid of sequence length ``T`` x width: where the 2T² rule flips, and what is fastest.

The MLP is ``d_in -> width -> width -> 1`` applied to every token of ``[B, T, d_in]``
inputs (``T = 1`` is an ordinary MLP), with a squared-error loss per token. Its
``width x width`` layer takes ghost under the 2T² rule iff ``2T² <= width²``, i.e.
``T <= width/√2``; the time-optimal choice (DESIGN.md §4) is ghost iff
``n·T·(p+d) < p·d`` against the fused materialise, a much smaller region.

Command (defaults: T in 1..256, width in 64..1024, n_train = n_val = 32; about
15 minutes on 2 CPU cores)::

    python -m benchmarks.mlp2d                      # writes benchmarks/results/mlp2d.{json,md,png}
    python -m benchmarks.mlp2d --tiny --out /tmp/b  # the smoke test's run

``hand/contract`` is the same computation written by hand for this model alone (no
checks, routing or verification): the floor of the eager interception method, for
scale. ``graddot/compiled`` is ``graddot(..., compile=True)`` past its compilation
and ``plain/compiled`` the plain step with its forward compiled (``torch.compile``);
both are timed against the eager plain step.
The figure shows, per cell, the fastest exact kernel (colour) and its time ratio
to the plain step, the ratio of ``auto`` and the 2T² boundary. ``auto`` races the
candidate routings on its first (warm-up) call (``ghostfunc._calibrate.race``), the close
ones take turns on the calls after it (``ghostfunc._calibrate.Turns``; still in the warm-up:
the warm-up calls on until they are done) and the rounds time the routing kept; ``auto (cost model)`` is the cost model alone
(``GHOSTFUNC_ROUTING=model``), what ``auto`` did before, timed in the same run.
Method: :mod:`benchmarks._common`; a sample here lasts at least 0.1 s (``--min-sample``; calls of under
a millisecond run back to back), so that the 5% comparisons of ``auto`` against the kernels are not decided by
a few milliseconds of another process's load.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
from pathlib import Path
from typing import Any

import torch

import ghostfunc

from . import _common as C

DEFAULT = C.Config(model="mlp", T=1, width=256, d_in=32, n_train=32, n_val=32)
KERNELS = ("graddot/ghost", "graddot/materialize", "graddot/contract")
#: The same numbers written by hand for this model alone (``benchmarks._common._hand_contract``): how close
#: ghostfunc gets to the interception method's floor, not a kernel ``auto`` could pick.
HAND = "hand/contract"
#: ``graddot(..., compile=True)`` past its compilation, and the plain step compiled the same way (for scale:
#: the ratios stay against the eager plain step).
COMPILED = ("graddot/compiled", "plain/compiled")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlp2d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, DEFAULT, memory="none")
    parser.add_argument("--Ts", default="1,4,16,64,256", help="sequence lengths (rows of the grid)")
    parser.add_argument("--widths", default="64,128,256,512,1024", help="widths (columns of the grid)")
    parser.add_argument("--d-in", type=int, default=DEFAULT.d_in)
    parser.set_defaults(rounds=5, model="mlp", min_sample=0.1)
    args = parser.parse_args(argv)
    if args.tiny:
        C.tiny(args)
        args.Ts, args.widths = "1,8", "16,32"
    args.Ts = [int(v) for v in args.Ts.split(",")]
    args.widths = [int(v) for v in args.widths.split(",")]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    C.setup_threads(args)
    before = C.machine()
    before["clock"] = args.clock
    opts = C.Options(args.compute_dtype)
    names = ["plain", *KERNELS, "graddot/2t2", "graddot/auto", "graddot/auto-model", HAND, *COMPILED]
    cells = []
    for t in args.Ts:
        for w in args.widths:
            config = C.config_from_args(args, model="mlp", T=t, width=w, d_in=args.d_in)
            torch._dynamo.reset()  # each cell compiles afresh (a shared code object would hit the recompile limit)
            s = C.build(config)
            fns = {k: C.make(k, s, opts) if k != "graddot/auto-model" else cost_model_only(C.make("graddot/auto", s, opts))
                   for k in names}
            times = C.measure(fns, s.device, **C.timing(args))
            tuning = ghostfunc.plan(s.model_fn, s.params, s.train, s.val).tuning
            del fns, s
            gc.collect()
            plain = C.summary(times["plain"])["median"]
            ratios = {k: C.paired_ratio(v, times["plain"]) for k, v in times.items()}
            best = min(KERNELS, key=ratios.__getitem__)
            rule = "ghost" if 2 * t * t <= w * w else "materialize"
            cells.append({"T": t, "width": w, "plain_s": plain, "ratios": ratios, "fastest": best.split("/")[1],
                          "rule_2t2": rule, "times": {k: C.summary(v) for k, v in times.items()},
                          "auto_routing": tuning})
            print(f"T={t} width={w}: fastest {best} {ratios[best]:.2f}x, auto {ratios['graddot/auto']:.2f}x, "
                  f"2t2 ({rule}) {ratios['graddot/2t2']:.2f}x", flush=True)
    after = C.machine()
    before["other_cores"] = C.other_load(before, after)
    return {"script": "mlp2d", "config": C.config_from_args(args, model="mlp", d_in=args.d_in).__dict__,
            "Ts": args.Ts, "widths": args.widths, "machine": before, "machine_after": after,
            "provisional": C.busy(before, after), "cells": cells}


def cost_model_only(fn: C.Step) -> C.Step:
    """``fn`` run with ``GHOSTFUNC_ROUTING=model`` (auto by the cost model alone, no race)."""
    return C.with_env("GHOSTFUNC_ROUTING", "model", fn)


def winner(tuning: str) -> str:
    """The routing auto kept, from the plan's ``tuning`` line: the race's winner, or the one kept after the close
    routings took turns (``"-"`` when it did not race)."""
    if ": " not in tuning or "measured" not in tuning:
        return "-"
    if "; kept " in tuning:
        return tuning.rsplit("; kept ", 1)[1]
    return re.split("[,;]", tuning.split(": ", 1)[1])[0].rsplit(" ", 2)[0]  # the fastest, less its time


def twin(cell: dict[str, Any]) -> str | None:
    """The whole-call kernel that routes exactly as the race's winner did in ``cell``, if one does."""
    labels = winner(cell.get("auto_routing", "")).split(" = ")
    return next((k for k in ("ghost", "materialize", "contract") if k in labels), None)


def table(payload: dict[str, Any]) -> str:
    rows = []
    for c in payload["cells"]:
        r = c["ratios"]
        rows.append({"T": c["T"], "width": c["width"], "plain s": c["plain_s"], "ghost": r["graddot/ghost"],
                     "materialize": r["graddot/materialize"], "contract": r["graddot/contract"],
                     "fastest": c["fastest"], "2t2 picks": c["rule_2t2"], "2t2": r["graddot/2t2"],
                     "auto": r["graddot/auto"], "auto routes as": winner(c.get("auto_routing", "")),
                     "auto (cost model)": r.get("graddot/auto-model"), "by hand": r.get(HAND),
                     "compile=True": r.get(COMPILED[0]), "plain compiled": r.get(COMPILED[1])})
    cfg = payload["config"]
    head = (f"**token-wise MLP** d_in={cfg['d_in']}, n_train={cfg['n_train']}, n_val={cfg['n_val']}; time / plain "
            f"step; {C.describe_machine(payload['machine'], payload['provisional'])}\n\n")
    agree = sum(c["rule_2t2"] == c["fastest"] for c in payload["cells"])
    n = len(payload["cells"])
    lines = [f"The 2T² rule picks the fastest kernel in {agree}/{n} cells."]
    for name, label in (("graddot/auto", "auto (measured at first use, the default)"),
                        ("graddot/auto-model", "auto by the cost model alone (GHOSTFUNC_ROUTING=model)"),
                        ("graddot/auto-measured", "auto with constants measured on this machine (GHOSTFUNC_COSTS=measure)")):
        if all(name in c["ratios"] for c in payload["cells"]):
            within = [sum(c["ratios"][name] <= f * min(c["ratios"][k] for k in KERNELS) for c in payload["cells"])
                      for f in (1.05, 1.1)]
            lines.append(f"{label}: within 5% of the fastest kernel in {within[0]}/{n} cells, within 10% in "
                         f"{within[1]}/{n}.")
    twins = [twin(c) for c in payload["cells"]]
    if any(t is not None for t in twins):  # the same routing timed twice: the spread is the timing noise
        close = sum(c["ratios"]["graddot/" + t] <= 1.05 * min(c["ratios"][k] for k in KERNELS)
                    for c, t in zip(payload["cells"], twins, strict=True) if t is not None)
        noise = [abs(math.log(c["ratios"]["graddot/auto"] / c["ratios"]["graddot/" + t]))
                 for c, t in zip(payload["cells"], twins, strict=True) if t is not None]
        lines.append(f"Where auto routes as one whole-call kernel ({len(noise)}/{n} cells), that kernel's own timing is "
                     f"within 5% of the fastest in {close}/{len(noise)}; auto and that kernel, the same routing timed "
                     f"apart, differ by {100 * (math.exp(sorted(noise)[len(noise) // 2]) - 1):.0f}% (median) and "
                     f"{100 * (math.exp(max(noise)) - 1):.0f}% (worst): the timing noise of this run.")
    t1 = [c["ratios"]["graddot/auto"] for c in payload["cells"] if c["T"] == 1]
    if t1:
        worst = max((c for c in payload["cells"] if c["T"] == 1), key=lambda c: c["ratios"]["graddot/auto"])
        hand = worst["ratios"].get(HAND)
        lines.append(f"Worst auto cell at T=1: {max(t1):.2f}x the plain step (goal <= 1.5x)"
                     + (f"; the same numbers written by hand for this model ({HAND}) take {hand:.2f}x there." if hand
                        else "."))
        row = [c for c in payload["cells"] if c["T"] == 1 and COMPILED[0] in c["ratios"]]
        if row:
            worst = max(row, key=lambda c: c["ratios"][COMPILED[0]])
            lines.append(f"With compile=True (past its compilation): worst T=1 cell {worst['ratios'][COMPILED[0]]:.2f}x "
                         f"the plain step (width {worst['width']}); the plain step compiled the same way takes "
                         f"{worst['ratios'][COMPILED[1]]:.2f}x there.")
    return head + C.markdown(rows, list(rows[0])) + "\n\n" + "\n".join(lines)


def figure(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ts, ws = payload["Ts"], payload["widths"]
    colour = {"ghost": "#9ecae1", "materialize": "#fdae6b", "contract": "#a1d99b"}
    fig, ax = plt.subplots(figsize=(1.5 * len(ws) + 1.5, 0.9 * len(ts) + 1.6))
    for c in payload["cells"]:
        i, j = ts.index(c["T"]), ws.index(c["width"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color=colour[c["fastest"]]))
        best = c["ratios"]["graddot/" + c["fastest"]]
        ax.text(j, i, f"{best:.2f}x\nauto {c['ratios']['graddot/auto']:.2f}x", ha="center", va="center", fontsize=7)
    # 2T² = width²: T = width/√2, drawn between grid cells in index coordinates (log-spaced axes)
    line = []
    for j, w in enumerate(ws):
        b = w / math.sqrt(2)
        below = [i for i, t in enumerate(ts) if t <= b]
        line.append((j, (max(below) + 0.5) if below else -0.5))
    xs = [x for j, y in line for x in (j - 0.5, j + 0.5)]
    ys = [y for j, y in line for _ in (0, 1)]
    ax.plot(xs, ys, color="k", lw=2, ls="--", label="2T² = width² (ghost below)")
    ax.set_xticks(range(len(ws)), [str(w) for w in ws])
    ax.set_yticks(range(len(ts)), [str(t) for t in ts])
    ax.set_xlim(-0.5, len(ws) - 0.5)
    ax.set_ylim(-0.5, len(ts) - 0.5)
    ax.set_xlabel("width")
    ax.set_ylabel("T (tokens per sample)")
    cfg = payload["config"]
    ax.set_title(f"fastest exact kernel, time / plain step (n={cfg['n_train']}, m={cfg['n_val']})", fontsize=9)
    handles: list[Any] = [Patch(color=v, label=k) for k, v in colour.items()]
    handles.append(plt.Line2D([], [], color="k", ls="--", label="2T² rule: ghost below the line"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    payload = run(args)
    stem = "mlp2d"
    C.report(stem, args.out, payload, table(payload), figure)
    return payload


if __name__ == "__main__":
    main()
