"""Every contender on one shape, against the plain training step: time, peak memory, and the issue's goals.

Command (the issue's headline shape: GPT-2-like, 4 layers, width 512, 8 heads,
T=256, vocab 8192, n_train = n_val = 8; about 5 minutes on 2 CPU cores)::

    python -m benchmarks.headline                    # writes benchmarks/results/headline.{json,md,png}
    python -m benchmarks.headline --model llama      # the same shape, Llama-shaped
    python -m benchmarks.headline --device cuda --dtype bfloat16
    python -m benchmarks.headline --tiny --out /tmp/b  # the smoke test's run

Contenders: ``graddot`` under each policy, the first- and second-order
``train_step`` (against ``plain+optim``: the plain step plus a ``torch.optim``
update), a naive loop of single-sample backward passes, ``torch.func.vmap(grad)``
per-sample gradients then dot products, and Opacus ``GradSampleModule`` then dot
products. Method: :mod:`benchmarks._common`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import ghostfunc

from . import _common as C

DEFAULT = C.Config(model="gpt2", T=256, width=512, layers=4, heads=8, vocab=8192, n_train=8, n_val=8)

#: (what, contender, baseline metric, limit): the issue's goals on this shape.
GOALS = (
    ("graddot (exact, default policy) time", "graddot/auto", "time", 1.0),
    ("first-order training step time", "train_step/1", "time", 1.05),
    ("second-order training step time (exact curvature)", "train_step/2", "time", 2.5),
    ("second-order step, secant curvature, fixed validation batch", "train_step/2-secant", "time", 1.1),
    ("second-order step, secant curvature, new validation batch every step", "train_step/2-secant-newval",
     "time", 1.6),
    ("graddot peak memory", "graddot/auto", "memory", 1.1),
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, DEFAULT)
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset (default: all; the baselines are always run)")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.tiny:
        C.tiny(args)
    return args


def contenders(args: argparse.Namespace) -> list[str]:
    names = [*C.BASELINES, *(f"graddot/{p}" for p in C.POLICIES), *C.TRAIN, *C.PEERS]
    if args.contenders:
        wanted = {w.strip() for w in args.contenders.split(",")}
        names = [k for k in names if k in wanted or k in C.BASELINES]
    return C.available(names)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every contender; returns the JSON payload."""
    C.setup_threads(args)
    before = C.machine()
    before["clock"] = args.clock
    config = C.config_from_args(args)
    opts = C.Options(args.compute_dtype, args.optimizer, args.lr)
    s = C.build(config)
    budget = C.memory_budget(s.device)
    names = contenders(args)
    skipped = {k: "per-sample gradients do not fit in memory" for k in names if not C.fits(k, s, budget)}
    names = [k for k in names if k not in skipped]
    fns = {k: C.make(k, s, opts) for k in names}
    times = C.measure(fns, s.device, **C.timing(args))
    plan = ghostfunc.plan(s.model_fn, s.params, s.train, s.val)
    del fns
    memory = {k: C.peak_memory(k, config, opts, threads=args.threads) for k in C.memory_of(names, args.memory)}
    after = C.machine()
    before["other_cores"] = C.other_load(before, after)
    results = {}
    for k in names:
        base = C.baseline_of(k)
        t, b = C.summary(times[k]), C.summary(times[base])
        mem, bmem = memory.get(k, {}), memory.get(base, {})
        results[k] = {"baseline": base, "time": t, "time_ratio": C.paired_ratio(times[k], times[base]),
                      "time_ratio_range": C.paired_range(times[k], times[base]),
                      "ratio_of_medians": t["median"] / b["median"], "memory": mem,
                      "memory_ratio": C.ratio(mem.get("step_mib"), bmem.get("step_mib"))}
    return {"script": "headline", "config": config.__dict__, "options": opts.__dict__, "machine": before,
            "machine_after": after, "provisional": C.busy(before, after), "results": results, "skipped": skipped,
            "plan": {"policy": "auto", "paths": plan.counts()}, "goals": goals(results)}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its measured ratio (``None`` when its contender did not run)."""
    out = []
    for what, name, metric, limit in GOALS:
        r = results.get(name)
        value = None if r is None else r["time_ratio"] if metric == "time" else r["memory_ratio"]
        out.append({"goal": what, "contender": name, "limit": f"<= {limit}x", "measured": value,
                    "met": None if value is None else value <= limit})
    peer, ours = results.get("opacus"), results.get("graddot/auto")
    speed = None if peer is None or ours is None else peer["time"]["median"] / ours["time"]["median"]
    out.append({"goal": "speed-up over Opacus + dot products", "contender": "opacus / graddot/auto",
                "limit": ">= 2x", "measured": speed, "met": None if speed is None else speed >= 2})
    return out


def table(payload: dict[str, Any]) -> str:
    rows = []
    for k, r in payload["results"].items():
        lo, hi = r.get("time_ratio_range") or (None, None)
        rows.append({"contender": k, "vs": r["baseline"], "median s": r["time"]["median"], "min s": r["time"]["min"],
                     "max s": r["time"]["max"], "runs": r["time"]["runs"], "time ratio": r["time_ratio"],
                     "ratio min–max": None if lo is None else f"{lo:.2f}–{hi:.2f}",
                     "step MiB": r["memory"].get("step_mib"), "peak MiB": r["memory"].get("peak_mib"),
                     "memory ratio": r["memory_ratio"]})
    for k, why in payload["skipped"].items():
        rows.append({"contender": k, "vs": f"skipped: {why}"})
    head = (f"**{C.Config(**payload['config']).label()}**, {payload['config']['device']}, "
            f"{payload['config']['dtype']}; {C.describe_machine(payload['machine'], payload['provisional'])}\n\n")
    cols = ["contender", "vs", "median s", "min s", "max s", "runs", "time ratio", "ratio min–max", "step MiB",
            "peak MiB", "memory ratio"]
    goal_rows = [{**g, "met": {True: "yes", False: "NO", None: "–"}[g["met"]]} for g in payload["goals"]]
    return (head + C.markdown(rows, cols) + "\n\nGoals:\n\n"
            + C.markdown(goal_rows, ["goal", "contender", "limit", "measured", "met"])
            + f"\n\nauto plan: {payload['plan']['paths']}")


def figure(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["results"])[::-1]
    ratios = [payload["results"][k]["time_ratio"] for k in names]
    spread = [payload["results"][k].get("time_ratio_range") or (r, r) for k, r in zip(names, ratios, strict=True)]
    err = [[r - lo for r, (lo, _) in zip(ratios, spread, strict=True)],
           [hi - r for r, (_, hi) in zip(ratios, spread, strict=True)]]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    ax.barh(names, ratios, xerr=err, capsize=3,
            color=["C2" if k.startswith(("graddot", "train")) else "C7" for k in names])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time / baseline (plain fwd+bwd on [train; val], or plain + optimizer); "
                  "bars: median, whiskers: min-max over rounds", fontsize=8)
    ax.set_title(C.Config(**payload["config"]).label(), fontsize=9)
    C.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    payload = run(args)
    stem = "headline" if args.model == DEFAULT.model else f"headline_{args.model}"
    C.report(stem, args.out, payload, table(payload), figure)
    return payload


if __name__ == "__main__":
    main()
