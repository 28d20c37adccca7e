"""One size varied (``T``, ``n``, ``n_train``, ``n_val`` or ``width``): time ratio to the plain step per kernel.

Commands (defaults: GPT-2-like, 4 layers, width 512, 8 heads, vocab 8192,
n_train = n_val = 8, T from 64 to 1024; roughly 10-15 minutes each on 2 CPU cores)::

    python -m benchmarks.sweep                               # T sweep, GPT-2-shaped -> sweep_gpt2_T.{json,md,png}
    python -m benchmarks.sweep --model llama                 # T sweep, Llama-shaped
    python -m benchmarks.sweep --vary n --values 2,4,8,16,32 --T 128
    python -m benchmarks.sweep --vary width --values 128,256,512,1024
    python -m benchmarks.sweep --peers                       # add naive loop, vmap(grad), Opacus
    python -m benchmarks.sweep --tiny --out /tmp/b           # the smoke test's run

The figure plots, per kernel, time / plain step against the varied size, so the
points where ghost, materialise and contract cross over can be read off; ``auto``
(raced at its first call, see ``ghostfunc._calibrate.race``) should track the lowest of
the three; ``graddot/auto-model`` is the cost model alone (``GHOSTFUNC_ROUTING=model``,
what ``auto`` did before), timed in the same run. Method: :mod:`benchmarks._common`.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import ghostfunc

from . import _common as C
from .mlp2d import cost_model_only, winner

DEFAULT = C.Config(model="gpt2", T=256, width=512, layers=4, heads=8, vocab=8192, n_train=8, n_val=8)
VALUES = {"T": "64,128,256,512,1024", "n": "2,4,8,16,32", "n_train": "2,4,8,16,32", "n_val": "1,2,4,8,16,32",
          "width": "128,256,512,1024"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, DEFAULT, memory="none")
    parser.add_argument("--vary", default="T", choices=tuple(VALUES))
    parser.add_argument("--values", default=None, help="comma-separated values (default depends on --vary)")
    parser.add_argument("--policies", default=",".join(C.POLICIES), help="graddot policies to run")
    parser.add_argument("--peers", action="store_true", help="also run the naive loop, vmap(grad) and Opacus")
    parser.set_defaults(rounds=3)
    args = parser.parse_args(argv)
    args.values = [int(v) for v in (args.values or VALUES[args.vary]).split(",")]
    if args.tiny:
        C.tiny(args)
        args.values = args.values[:2] if args.vary != "T" else [8, 16]
    return args


def point(args: argparse.Namespace, value: int) -> C.Config:
    """The config of one sweep point."""
    if args.vary == "n":
        return C.config_from_args(args, n_train=value, n_val=value)
    return C.config_from_args(args, **{args.vary: value})


def run(args: argparse.Namespace) -> dict[str, Any]:
    C.setup_threads(args)
    before = C.machine()
    before["clock"] = args.clock
    opts = C.Options(args.compute_dtype)
    names = ["plain", *(f"graddot/{p.strip()}" for p in args.policies.split(","))]
    if "graddot/auto" in names:
        names.append("graddot/auto-model")
    if args.peers:
        names += C.available(C.PEERS)
    points = []
    for value in args.values:
        config = point(args, value)
        s = C.build(config)
        budget = C.memory_budget(s.device)
        here = [k for k in names if C.fits(k, s, budget)]
        fns = {k: C.make(k, s, opts) if k != "graddot/auto-model" else cost_model_only(C.make("graddot/auto", s, opts))
               for k in here}
        times = C.measure(fns, s.device, **C.timing(args))
        plan = ghostfunc.plan(s.model_fn, s.params, s.train, s.val)
        del fns, s
        gc.collect()
        memory = {k: C.peak_memory(k, config, opts, threads=args.threads) for k in C.memory_of([k for k in here if k != "graddot/auto-model"], args.memory)}
        rows = {k: {"time": C.summary(v), "time_ratio": C.paired_ratio(v, times["plain"]),
                    "memory": memory.get(k, {})} for k, v in times.items()}
        points.append({"value": value, "config": config.__dict__, "results": rows,
                       "skipped": [k for k in names if k not in here], "auto_paths": plan.counts(),
                       "auto_routing": plan.tuning})
        print(f"{args.vary}={value}: " + ", ".join(f"{k} {r['time_ratio']:.2f}x" for k, r in rows.items()), flush=True)
    after = C.machine()
    before["other_cores"] = C.other_load(before, after)
    return {"script": "sweep", "vary": args.vary, "model": args.model, "options": opts.__dict__, "machine": before,
            "machine_after": after, "provisional": C.busy(before, after), "contenders": names, "points": points,
            "crossovers": crossovers(points, args.vary)}


def crossovers(points: list[dict[str, Any]], vary: str) -> list[str]:
    """Where the fastest of ghost / materialize / contract changes along the sweep."""
    out, last = [], None
    for pt in points:
        kernels = {k: r["time_ratio"] for k, r in pt["results"].items()
                   if k in ("graddot/ghost", "graddot/materialize", "graddot/contract")}
        if not kernels:
            continue
        best = min(kernels, key=kernels.__getitem__)
        if last is not None and best != last[1]:
            out.append(f"{last[1]} -> {best} between {vary}={last[0]} and {vary}={pt['value']}")
        last = (pt["value"], best)
    return out


def table(payload: dict[str, Any]) -> str:
    names = payload["contenders"]
    rows = []
    for pt in payload["points"]:
        row: dict[str, Any] = {payload["vary"]: pt["value"], "plain s": pt["results"]["plain"]["time"]["median"]}
        for k in names[1:]:
            r = pt["results"].get(k)
            row[k] = None if r is None else r["time_ratio"]
        row["auto paths"] = ", ".join(f"{k} {v}" for k, v in pt["auto_paths"].items())
        row["auto routes as"] = winner(pt.get("auto_routing", ""))
        rows.append(row)
    first = C.Config(**payload["points"][0]["config"])
    head = (f"**{payload['model']} sweep over {payload['vary']}** (first point: {first.label()}), time / plain step; "
            f"{C.describe_machine(payload['machine'], payload['provisional'])}\n\n")
    cross = "\n".join(f"- {c}" for c in payload["crossovers"]) or "- none in this range"
    return head + C.markdown(rows, [payload["vary"], "plain s", *names[1:], "auto paths", "auto routes as"]) + \
        "\n\nFastest kernel changes:\n\n" + cross


def figure(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [pt["value"] for pt in payload["points"]]
    style: dict[str, dict[str, Any]] = {"graddot/auto": dict(color="k", lw=2.2, marker="o"), "graddot/ghost": dict(color="C0", marker="s"),
             "graddot/materialize": dict(color="C1", marker="^"), "graddot/contract": dict(color="C2", marker="v"),
             "graddot/2t2": dict(color="C4", ls="--", marker="x")}
    for k in payload["contenders"][1:]:
        pts = [(x, pt["results"][k]["time_ratio"]) for x, pt in zip(xs, payload["points"], strict=True)
               if k in pt["results"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k, **style.get(k, dict(ls=":", marker=".")))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(payload["vary"])
    ax.set_ylabel("time / plain fwd+bwd on [train; val]")
    first = C.Config(**payload["points"][0]["config"])
    ax.set_title(f"{payload['model']}: time ratio vs {payload['vary']} ({first.label()})", fontsize=8)
    ax.legend(fontsize=8)
    C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    payload = run(args)
    stem = f"sweep_{args.model}_{args.vary}"
    C.report(stem, args.out, payload, table(payload), figure)
    return payload


if __name__ == "__main__":
    main()
