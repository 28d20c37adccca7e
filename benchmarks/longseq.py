"""Long sequences: peak memory (and time) of graddot against the plain step at ``T = 4096``, small width.

At long ``T`` the Gram kernel's ``[T, S]`` blocks and per-token factors are what
could blow memory up; the goal is graddot within 1.2x the plain step's peak.

Command (defaults: GPT-2-like, 2 layers, width 128, 4 heads, vocab 1024,
n_train = n_val = 4, T = 4096; a few minutes on 2 CPU cores)::

    python -m benchmarks.longseq                      # writes benchmarks/results/longseq.{json,md}
    python -m benchmarks.longseq --model llama --T 8192
    python -m benchmarks.longseq --tiny --out /tmp/b  # the smoke test's run

Method: :mod:`benchmarks._common`.
"""

from __future__ import annotations

import argparse
from typing import Any

import ghostfunc

from . import _common as C

DEFAULT = C.Config(model="gpt2", T=4096, width=128, layers=2, heads=4, vocab=1024, n_train=4, n_val=4)
LIMIT = 1.2


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, DEFAULT, memory="all")
    parser.add_argument("--policies", default=",".join(C.POLICIES), help="graddot policies to run")
    parser.set_defaults(rounds=3)
    args = parser.parse_args(argv)
    if args.tiny:
        C.tiny(args)
        args.T = 64
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    C.setup_threads(args)
    before = C.machine()
    before["clock"] = args.clock
    config = C.config_from_args(args)
    opts = C.Options(args.compute_dtype)
    names = ["plain", *(f"graddot/{p.strip()}" for p in args.policies.split(","))]
    s = C.build(config)
    fns = {k: C.make(k, s, opts) for k in names}
    times = C.measure(fns, s.device, **C.timing(args))
    plan = ghostfunc.plan(s.model_fn, s.params, s.train, s.val)
    del fns, s
    memory = {k: C.peak_memory(k, config, opts, threads=args.threads) for k in C.memory_of(names, args.memory)}
    after = C.machine()
    before["other_cores"] = C.other_load(before, after)
    plain_m = memory.get("plain", {}).get("step_mib")
    results: dict[str, dict[str, Any]] = {
        k: {"time": C.summary(times[k]), "time_ratio": C.paired_ratio(times[k], times["plain"]),
            "memory": memory.get(k, {}), "memory_ratio": C.ratio(memory.get(k, {}).get("step_mib"), plain_m)}
        for k in names}
    auto = results.get("graddot/auto", {}).get("memory_ratio")
    goal = {"goal": f"graddot peak memory at T={config.T}", "limit": f"<= {LIMIT}x", "measured": auto,
            "met": None if auto is None else auto <= LIMIT}
    return {"script": "longseq", "config": config.__dict__, "machine": before, "machine_after": after,
            "provisional": C.busy(before, after), "results": results, "goal": goal, "auto_paths": plan.counts()}


def table(payload: dict[str, Any]) -> str:
    rows = [{"contender": k, "median s": r["time"]["median"], "min s": r["time"]["min"], "max s": r["time"]["max"],
             "time ratio": r["time_ratio"], "step MiB": r["memory"].get("step_mib"),
             "peak MiB": r["memory"].get("peak_mib"), "memory ratio": r["memory_ratio"],
             "error": r["memory"].get("error")} for k, r in payload["results"].items()]
    head = (f"**{C.Config(**payload['config']).label()}**, {payload['config']['device']}; "
            f"{C.describe_machine(payload['machine'], payload['provisional'])}\n\n")
    g = payload["goal"]
    met = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
    measured = "–" if g["measured"] is None else f"{g['measured']:.3g}x"
    cols = ["contender", "median s", "min s", "max s", "time ratio", "step MiB", "peak MiB", "memory ratio"]
    if any(r["error"] for r in rows):
        cols.append("error")
    return (head + C.markdown(rows, cols) + f"\n\nGoal: {g['goal']} {g['limit']} the plain step: {measured} "
            f"({met}). auto plan: {payload['auto_paths']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    payload = run(args)
    stem = "longseq" if args.model == DEFAULT.model else f"longseq_{args.model}"
    C.report(stem, args.out, payload, table(payload))
    return payload


if __name__ == "__main__":
    main()
