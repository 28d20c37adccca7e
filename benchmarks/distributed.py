"""Data-parallel ``train_step(order=1, group=...)`` against a DDP step, on processes that share nothing but gloo/NCCL.

Command (world size 2, one torch thread per process; a GPT-2-shaped model, by
default smaller than the headline's so it runs in a few minutes on 2 shared CPU
cores: 2 layers, width 256, 4 heads, T=128, vocab 4096, global n_train = n_val = 8)::

    python -m benchmarks.distributed                      # writes benchmarks/results/distributed.{json,md}
    python -m benchmarks.distributed --layers 4 --width 512 --heads 8 --T 256 --vocab 8192   # headline shape
    python -m benchmarks.distributed --device cuda       # NCCL, one GPU per rank
    python -m benchmarks.distributed --tiny --out /tmp/b   # the smoke test's run

Contenders, each on the same global batch split evenly by rank:

- ``ddp``: ``DistributedDataParallel`` + ``torch.optim.SGD``: forward and backward of the
  mean loss over the rank's training rows, all-reduce in DDP's gradient buckets, update;
- ``ddp [train; val]``: the same over the rank's training and validation rows (the
  work of the headline's ``plain+optim`` baseline, which ghostfunc's step also does:
  it needs the validation gradient);
- ``train_step/1``: ``ghostfunc.train_step(model_fn, sgd, order=1, group=WORLD)``.

Time: every round runs every contender once (rotated order), each call between two
barriers; the median over rounds of rank 0's wall time, and the median of the
per-round ratios. Bytes per step: what each contender hands to ``all_reduce``:
DDP's bucket sizes (every gradient once), ghostfunc's flat buffers (the validation
direction and the training gradient, each once) plus its one ``all_gather_object``
of the argument signature (its pickled size times the world size).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _common as C

DEFAULT = C.Config(model="gpt2", T=128, width=256, layers=2, heads=4, vocab=4096, n_train=8, n_val=8)
CONTENDERS = ("ddp", "ddp [train; val]", "train_step/1")
GOAL = 1.1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, DEFAULT, memory="none")
    parser.add_argument("--world", type=int, default=2, help="processes")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.tiny:
        C.tiny(args)
        args.n_train, args.n_val = 4, 2
    return args


def _rank_main(rank: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(args.threads or 1)
    device = C.resolve_device(args.device)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{folder}/rendezvous",
                            rank=rank, world_size=args.world)
    try:
        result = _measure(rank, args, device)
        if rank == 0:
            Path(folder, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import ghostfunc

    world = args.world
    cfg = C.config_from_args(args, device=f"cuda:{rank}" if device == "cuda" else "cpu")
    s = C.build(cfg)  # same seed on every rank: the same model and global batch

    def mine(batch: Any) -> Any:
        return torch.utils._pytree.tree_map(lambda x: x.tensor_split(world)[rank], batch)

    train, val = mine(s.train), mine(s.val)
    both = torch.utils._pytree.tree_map(lambda a, b: torch.cat([a, b]), train, val)
    group = dist.group.WORLD

    ddp = torch.nn.parallel.DistributedDataParallel(s.model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    def ddp_step(batch: Any) -> None:
        loss = s.forward(ddp, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = ghostfunc.train_step(s.model_fn, ghostfunc.sgd(args.lr), order=1, group=group)
    box = {"state": step.init(s.params)}

    def ghost_step() -> None:
        box["state"], _ = step(box["state"], train, val)

    fns = {"ddp": lambda: ddp_step(train), "ddp [train; val]": lambda: ddp_step(both), "train_step/1": ghost_step}
    dev = torch.device(cfg.device)

    def timed(fn: Any) -> float:
        dist.barrier()
        C.sync(dev)
        t0 = time.perf_counter()
        fn()
        C.sync(dev)
        dist.barrier()
        return time.perf_counter() - t0

    for name in CONTENDERS:
        for _ in range(args.warmup):
            timed(fns[name])
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]
        for name in order:
            times[name].append(timed(fns[name]))

    grad_bytes = sum(p.numel() * p.element_size() for p in s.model.parameters() if p.requires_grad)
    bucket_sizes = _ddp_bucket_bytes(ddp)
    signature = _signature_bytes(s, train, val, args.lr)
    return {
        "times": times,
        "bytes": {"ddp": bucket_sizes or grad_bytes, "ddp [train; val]": bucket_sizes or grad_bytes,
                  "train_step/1": 2 * grad_bytes + signature * world},
        "ddp_buckets": bucket_sizes, "grad_bytes": grad_bytes, "signature_bytes": signature,
        "params": sum(p.numel() for p in s.model.parameters()),
    }


def _ddp_bucket_bytes(ddp: torch.nn.parallel.DistributedDataParallel) -> int | None:
    """The bytes in DDP's gradient buckets (what its all-reduces send), from the reducer when it tells."""
    try:
        buckets = ddp._get_ddp_logging_data().get("bucket_sizes")
    except Exception:  # private API: fall back to the gradients' size
        return None
    if isinstance(buckets, str):
        buckets = [int(b) for b in buckets.split(",") if b.strip()]
    return int(sum(buckets)) if buckets else None


def _signature_bytes(s: C.Setup, train: Any, val: Any, lr: float) -> int:
    """The pickled size of one rank's argument signature (``ghostfunc._dist.agree``)."""
    from ghostfunc import _dist

    sig = {"signature": {"parameter names, shapes and dtypes": _dist.param_signature(s.params),
                         "parameter values (fingerprints)": _dist.param_checksum(s.params),
                         "train batch structure": _dist.batch_signature(train),
                         "val batch structure": _dist.batch_signature(val), "val_reduce": "mean", "policy": "auto",
                         "lr": lr, "order": 1, "precondition": False}, "rows": (1, 1), "error": None}
    return len(pickle.dumps(sig))


def run(args: argparse.Namespace) -> dict[str, Any]:
    before = C.machine() | {"torch_threads": args.threads or 1}  # per rank process
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_main, args=(args, folder), nprocs=args.world, start_method="spawn")
        result = json.loads(Path(folder, "result.json").read_text())
    after = C.machine()
    load = C.other_load(before, after)
    times = result["times"]
    rows = []
    for name in CONTENDERS:
        row: dict[str, Any] = {"contender": name, "median s": statistics.median(times[name]),
                               "min s": min(times[name]), "max s": max(times[name]),
                               "MiB sent per step": result["bytes"][name] / 2**20}
        for base in ("ddp", "ddp [train; val]"):
            ratios = [a / b for a, b in zip(times[name], times[base], strict=True)]
            row[f"x {base}"] = statistics.median(ratios)
        rows.append(row)
    cfg = C.config_from_args(args)
    measured = rows[2]["x ddp [train; val]"]
    payload = {"config": cfg.__dict__, "world": args.world, "threads_per_process": args.threads or 1,
               "machine": before | {"other_cores": load}, "provisional": bool(load and load > 0.25),
               "results": rows, "bytes": result["bytes"], "ddp_buckets": result["ddp_buckets"],
               "grad_bytes": result["grad_bytes"], "signature_bytes": result["signature_bytes"],
               "params": result["params"],
               "goal": {"what": "train_step/1 time / DDP [train; val] step time", "limit": GOAL,
                        "measured": measured, "met": measured <= GOAL}}
    text = (f"Data-parallel step, {args.world} processes ({'NCCL' if cfg.device == 'cuda' else 'gloo'}, "
            f"{args.threads or 1} torch thread each), {cfg.label()} (global batch, split evenly by rank); "
            f"{result['params']:,} parameters; medians of {args.rounds} rounds.\n"
            f"{C.describe_machine(payload['machine'], payload['provisional'])}\n\n"
            + C.markdown(rows, ["contender", "median s", "min s", "max s", "x ddp", "x ddp [train; val]",
                                "MiB sent per step"])
            + f"\n\ngoal: train_step/1 <= {GOAL}x the DDP step over [train; val]: {measured:.2f}x "
              f"({'met' if measured <= GOAL else 'not met'}). Bytes: DDP all-reduces every gradient once "
              f"(its buckets); ghostfunc the validation direction and the training gradient once each, plus a "
              f"{result['signature_bytes']} B signature per rank.")
    C.report("distributed", args.out, payload, text)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or 1))
    return run(args)


if __name__ == "__main__":
    main()
