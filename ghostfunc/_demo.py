"""``python -m ghostfunc demo``: find flipped labels with In-Run Data Shapley, on real data.

scikit-learn's bundled handwritten digits (1,797 8x8 images, shipped with the
package: nothing is downloaded). 10% of the training labels are flipped to
another digit; validation and test sets stay clean. A small MLP trains with the
stateless :func:`ghostfunc.train_step` (plain SGD, the setting In-Run Data
Shapley is defined for) at ``order=2``, and every step's first- and
second-order values are accumulated per dataset index with
:class:`ghostfunc.DataValues`.

It prints how well the values find the flipped samples (AUROC; a flipped label
raises the validation loss, so it should get a *high* ``φ``, i.e. a low data
value ``−φ``) next to the baseline that ranks by training loss, first against
second order, and the most harmful and most helpful samples; and it writes
``values.csv`` and ``values.png`` to ``--out`` (default ``runs/demo``).

Expected (about 10 s on 2 CPU cores, most of it imports): test accuracy ~0.95;
AUROC ~0.7 for order-1 values, ~0.9 for order 2, ~0.998 for the training loss.
Training loss is the stronger detector of flipped labels here: a flipped label
is hard to fit, while its harm to a validation set the model already fits shows
up mostly through curvature, which only the second-order term sees.

Data-parallel: ``torchrun --nproc-per-node 2 -m ghostfunc demo`` runs the same
training on 2 processes (gloo): every global batch and the validation set are
split across the ranks (rank order), each rank values its own rows
(``train_step(..., group=...)``), the values are summed across ranks at the end,
and rank 0 reports, writes the files, then trains once more in one process and
prints the largest difference between the two runs' values (float32 rounding).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import ghostfunc
from ghostfunc import _dist

Params = dict[str, Tensor]


def model_fn(p: Params, batch: dict[str, Tensor]) -> Tensor:
    """A one-hidden-layer MLP on flattened 8x8 images: per-sample cross-entropy ``[B]``."""
    h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))  # [B, hidden]
    logits = F.linear(h, p["w2"], p["b2"])  # [B, 10]
    return F.cross_entropy(logits, batch["y"], reduction="none")


def predict(p: Params, x: Tensor) -> Tensor:
    return F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"]).argmax(-1)


class Data:
    """The digits split into clean validation and test sets and a training set with flipped labels."""

    def __init__(self, seed: int, n_val: int, n_test: int, flip: float) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover - the demo extra has it
            sys.exit("python -m ghostfunc demo needs scikit-learn: pip install 'ghostfunc[demo]'")
        x, y = load_digits(return_X_y=True)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        x = torch.as_tensor(x, dtype=torch.float32)[perm] / 16.0  # [1797, 64] in [0, 1]
        y = torch.as_tensor(y, dtype=torch.int64)[perm]
        self.val = {"x": x[:n_val], "y": y[:n_val], "index": torch.arange(n_val)}
        self.test = (x[n_val:n_val + n_test], y[n_val:n_val + n_test])
        tx, self.true_y = x[n_val + n_test:], y[n_val + n_test:]
        self.n = len(tx)
        picked = torch.randperm(self.n, generator=g)[: round(flip * self.n)]
        given = self.true_y.clone()
        given[picked] = (given[picked] + torch.randint(1, 10, (len(picked),), generator=g)) % 10  # always another digit
        self.flipped = torch.zeros(self.n, dtype=torch.bool)
        self.flipped[picked] = True
        # the dataset index travels with every sample, so values land where they belong
        self.train = {"x": tx, "y": given, "index": torch.arange(self.n)}


def init_params(seed: int, hidden: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(hidden, 64, generator=g) / 8.0, "b1": torch.zeros(hidden),
            "w2": torch.randn(10, hidden, generator=g) / hidden**0.5, "b2": torch.zeros(10)}


def auroc(flagged: Tensor, score: Tensor) -> float:
    """Probability that a random flagged sample scores above a random other one (ties count half)."""
    ranks = _average_ranks(score.double())
    pos = int(flagged.sum())
    neg = len(flagged) - pos
    return float((ranks[flagged].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _average_ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    uniq, inverse = torch.unique(x, return_inverse=True)
    total = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inverse, ranks)
    count = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (total / count)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def ascii_digit(x: Tensor) -> list[str]:
    """An 8x8 image as 8 lines of 8 characters (darker = more ink)."""
    shades = " .:-=+*#"
    return ["".join(shades[min(7, int(v * 8))] for v in row) for row in x.reshape(8, 8).tolist()]


def train(data: Data, args: argparse.Namespace, group: Any = None
          ) -> tuple[Params, ghostfunc.DataValues, ghostfunc.DataValues, float, float]:
    """Train with the stateless step; accumulate values ``[N, 2]`` (orders 1, 2) and losses ``[N]``.

    Returns the final parameters, the values, the losses, the seconds spent and the
    validation loss before the first step. With ``group`` each rank takes its share
    of every batch and of the validation set (rank order), and the values and
    losses returned are the sums over the ranks.
    """
    from tqdm.auto import tqdm

    rank, size = _dist.rank_and_size(group)
    step = ghostfunc.train_step(model_fn, ghostfunc.sgd(args.lr), order=2, group=group)
    state = step.init(init_params(args.seed, args.hidden))
    val = {k: v.tensor_split(size)[rank] for k, v in data.val.items()}
    values = ghostfunc.DataValues.zeros(data.n, shape=(2,))
    losses = ghostfunc.DataValues.zeros(data.n)
    g = torch.Generator().manual_seed(args.seed + 1)
    per_epoch = data.n // args.batch_size
    t0 = time.perf_counter()
    val_loss_start = float("nan")
    if group is not None:  # info.val_loss holds this rank's rows only
        val_loss_start = model_fn(state.params, data.val).mean().item()
    with tqdm(total=args.epochs * per_epoch, desc="training", unit="step", file=sys.stderr,
              disable=args.quiet or rank != 0) as bar:
        for epoch in range(args.epochs):
            order = torch.randperm(data.n, generator=g)
            for b in range(per_epoch):
                rows = order[b * args.batch_size:(b + 1) * args.batch_size].tensor_split(size)[rank]
                batch = {k: v[rows] for k, v in data.train.items()}
                state, info = step(state, batch, val)
                if state.step == 1 and group is None:
                    val_loss_start = info.val_loss.mean().item()
                values = values.add(batch["index"], torch.stack([info.first_order, info.values], 1))
                losses = losses.add(batch["index"], info.train_loss)
                bar.update()
            acc = (predict(state.params, data.test[0]) == data.test[1]).float().mean().item()
            bar.set_postfix(epoch=epoch + 1, val_loss=f"{info.val_loss.mean().item():.3f}", test_acc=f"{acc:.3f}")
    if group is not None:
        values, losses = values.across(group), losses.across(group)
    return state.params, values, losses, time.perf_counter() - t0, val_loss_start


def report(data: Data, params: Params, values: ghostfunc.DataValues, losses: ghostfunc.DataValues,
           seconds: float, val_loss_start: float, args: argparse.Namespace) -> dict[str, Any]:
    """Print the figures; return them (for tests and notebooks)."""
    with torch.no_grad():
        final_loss = model_fn(params, data.train)  # [N]
        val_change = model_fn(params, data.val).mean().item() - val_loss_start
    phi1, phi2 = values.total[:, 0], values.total[:, 1]
    mean_loss = losses.mean.nan_to_num(0.0)
    flipped = data.flipped
    test_acc = (predict(params, data.test[0]) == data.test[1]).float().mean().item()
    figures = {
        "auroc_order1": auroc(flipped, phi1),
        "auroc_order2": auroc(flipped, phi2),
        "auroc_final_loss": auroc(flipped, final_loss),
        "auroc_mean_loss": auroc(flipped, mean_loss),
        "spearman_order1_order2": spearman(phi1, phi2),
        "val_loss_change": val_change,
        "sum_order1": phi1.sum().item(),
        "sum_order2": phi2.sum().item(),
        "test_acc": test_acc,
        "seconds": seconds,
    }
    k = int(flipped.sum())
    prec = {name: flipped[torch.argsort(s, descending=True)[:k]].float().mean().item()
            for name, s in (("order1", phi1), ("order2", phi2), ("loss", final_loss))}
    print(f"\nIn-Run Data Shapley on scikit-learn digits: {data.n} training images, {k} with flipped labels "
          f"({100 * k / data.n:.0f}%), {len(data.val['y'])} clean validation images.")
    print(f"MLP 64-{args.hidden}-10, SGD lr={args.lr}, batch {args.batch_size}, {args.epochs} epochs "
          f"({values.steps} steps) in {seconds:.1f} s; test accuracy {test_acc:.3f}.")
    print("Sign: φ is a sample's share of the validation-loss change, summed over its steps;\n"
          "      a flipped label should raise the validation loss (high φ, i.e. a low data value -φ).")
    print(f"\nFinding the flipped labels (AUROC, 0.5 = chance; precision = flipped among the top {k}):")
    rows = [("In-Run Data Shapley, order 1 (high φ first)", figures["auroc_order1"], prec["order1"]),
            ("In-Run Data Shapley, order 2 (high φ first)", figures["auroc_order2"], prec["order2"]),
            ("baseline: final training loss (high first)", figures["auroc_final_loss"], prec["loss"]),
            ("baseline: training loss, mean over steps", figures["auroc_mean_loss"], None)]
    for name, a, p in rows:
        print(f"  {name:<46} AUROC {a:.3f}" + ("" if p is None else f"   precision {p:.3f}"))
    diff = ((phi2 - phi1).norm() / phi1.norm()).item()
    print(f"\nFirst vs second order: Spearman {figures['spearman_order1_order2']:.3f}, "
          f"|φ2 − φ1| / |φ1| = {diff:.3f} (the curvature term (lr/n)²/2·g_iᵀH_val G).")
    print(f"Efficiency: the validation loss changed by {val_change:+.4f} over training; all values add up to\n"
          f"  {figures['sum_order1']:+.4f} (order 1), {figures['sum_order2']:+.4f} (order 2): each step's values sum to "
          f"that order's Taylor expansion\n  of the step's validation-loss change; the gap is the truncation.")
    for title, idx in (("Most harmful (highest φ, order 2)", torch.argsort(phi2, descending=True)[:6]),
                       ("Most helpful (lowest φ, order 2)", torch.argsort(phi2)[:6])):
        print(f"\n{title}:")
        print("   index  label  true  flipped      φ order 1      φ order 2   final loss")
        for i in idx.tolist():
            print(f"  {i:6d}  {int(data.train['y'][i]):5d}  {int(data.true_y[i]):4d}  {'yes' if flipped[i] else 'no':>7}"
                  f"  {phi1[i].item(): .6e}  {phi2[i].item(): .6e}  {final_loss[i].item():10.4f}")
        pics = [ascii_digit(data.train["x"][i]) for i in idx.tolist()]
        for line in zip(*pics, strict=True):
            print("   " + "   ".join(f"|{s}|" for s in line))
    return figures | {"phi1": phi1, "phi2": phi2, "final_loss": final_loss, "mean_loss": mean_loss}


def write_outputs(data: Data, out: dict[str, Any], values: ghostfunc.DataValues, folder: Path, plot: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "values.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "true_label", "flipped", "value_order1", "value_order2", "steps_seen",
                    "final_train_loss", "mean_train_loss"])
        for i in range(data.n):
            w.writerow([i, int(data.train["y"][i]), int(data.true_y[i]), int(data.flipped[i]),
                        f"{out['phi1'][i].item():.9e}", f"{out['phi2'][i].item():.9e}", int(values.count[i]),
                        f"{out['final_loss'][i].item():.6f}", f"{out['mean_loss'][i].item():.6f}"])
    written = [csv_path]
    if plot:
        written.append(plot_values(data.flipped, out, folder / "values.png"))
    return written


def plot_values(flipped: Tensor, out: dict[str, Any], path: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no backend to pick, no global figure state

    phi1, phi2, loss = out["phi1"].numpy(), out["phi2"].numpy(), out["final_loss"].numpy()
    f = flipped.numpy()
    fig = Figure(figsize=(15, 4.2))
    ax = fig.subplots(1, 3)
    bins = np.linspace(phi2.min(), phi2.max(), 60)
    ax[0].hist(phi2[~f], bins=bins, alpha=0.6, label="clean", density=True)
    ax[0].hist(phi2[f], bins=bins, alpha=0.6, label="flipped label", density=True)
    ax[0].set(xlabel="φ, order 2 (validation-loss change)", ylabel="density",
              title=f"values (AUROC {out['auroc_order2']:.3f})")
    ax[0].legend()
    ax[1].scatter(loss[~f], phi2[~f], s=4, alpha=0.5, label="clean")
    ax[1].scatter(loss[f], phi2[f], s=6, alpha=0.8, label="flipped label")
    ax[1].set(xscale="log", xlabel="final training loss", ylabel="φ, order 2",
              title=f"value vs loss (loss AUROC {out['auroc_final_loss']:.3f})")
    ax[1].legend()
    ax[2].scatter(phi1[~f], phi2[~f], s=4, alpha=0.5, label="clean")
    ax[2].scatter(phi1[f], phi2[f], s=6, alpha=0.8, label="flipped label")
    lo, hi = min(phi1.min(), phi2.min()), max(phi1.max(), phi2.max())
    ax[2].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax[2].set(xlabel="φ, order 1", ylabel="φ, order 2",
              title=f"first vs second order (AUROC {out['auroc_order1']:.3f} vs {out['auroc_order2']:.3f})")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ghostfunc demo", description=(__doc__ or "").replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for values.csv and values.png")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this small model)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo and return its figures (AUROCs, Spearman, test accuracy, seconds) and per-sample arrays."""
    from ._run.cli import Range, check_args

    p = parser()
    args = p.parse_args(argv)
    check_args(p, args, {"epochs": Range(1), "batch_size": Range(1), "lr": Range(0, open_low=True),
                         "hidden": Range(1), "flip": Range(0, 1, open_low=True, open_high=True),
                         "seed": Range(0, 2**32 - 1), "threads": Range(1)})
    from ._run.cli import check_writable
    from ._run.data import UsageError

    if args.out.exists() and not args.out.is_dir():  # (before the run, not after it)
        p.error(f"--out: expected a folder for values.csv and values.png; {str(args.out)!r} is a file")
    try:
        check_writable(args.out, "--out")
    except UsageError as exc:
        p.error(str(exc))
    data = Data(args.seed, n_val=300, n_test=300, flip=args.flip)
    if args.batch_size > data.n:
        p.error(f"--batch-size: expected at most the {data.n} training rows; got {args.batch_size}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny matrices: extra threads only wait on each other
    group = _torchrun_group()
    try:
        try:
            params, values, losses, seconds, val_loss_start = train(data, args, group)
        except FloatingPointError as exc:  # (a learning rate too large: one line, as ghostfunc train says it)
            first = str(exc).splitlines()[0]
            p.exit(2, f"{p.prog}: error: --lr: expected finite losses; the run diverged at --lr {args.lr:g} "
                      f"({first[:160]}); try a lower --lr\n")
        if group is not None:
            import torch.distributed as dist

            size = dist.get_world_size(group)
            if dist.get_rank(group) != 0:
                return {"rank": dist.get_rank(group)}
            print(f"data-parallel: {size} processes (gloo), each global batch of {args.batch_size} split by rank")
        out = report(data, params, values, losses, seconds, val_loss_start, args)
        written = write_outputs(data, out, values, args.out, plot=not args.no_plot)
        if group is not None:
            quiet = argparse.Namespace(**{**vars(args), "quiet": True})
            _, alone, _, _, _ = train(data, quiet)
            diff = (values.total - alone.total).abs().max().item()
            scale = alone.total.abs().max().item()
            print(f"\n{size} processes against one: largest difference of the values {diff:.2e} "
                  f"(largest value {scale:.2e}; float32 training, so rounding differs); "
                  f"counts equal: {torch.equal(values.count, alone.count)}")
            out["max_difference_from_one_process"] = diff
    finally:
        torch.set_num_threads(threads)
        if group is not None:
            import torch.distributed as dist

            try:
                dist.barrier()  # every rank's last collective is done before any tears gloo down
            finally:
                dist.destroy_process_group()
    print("\nwrote " + ", ".join(str(p) for p in written))
    return out | {"written": written, "flipped": data.flipped}


def _torchrun_group() -> Any:
    """The world group when started by ``torchrun`` with more than one process (gloo); else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ghostfunc demo [options]``; ``argv`` are the arguments after ``demo``."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
