"""``evaluate``: do data values predict retraining? LDS, noisy labels and removal curves on scikit-learn's digits.

Protocol (DESIGN §7, issue 13), per model (an MLP and logistic regression) and seed:

1. **Run.** ``n_train`` rows of digits (features / 16), full-batch gradient descent
   (``ghostfunc.sgd(lr)``) for ``steps`` steps through :func:`ghostfunc.train_step`
   at order 2 (In-Run Data Shapley of both orders come with the run), recorded
   in a :class:`ghostfunc.Trajectory` (checkpoints every ``⌈√steps⌉`` steps).
2. **Values** ``φ`` (positive = raised the validation loss) of every method:
   ``graddot`` (Grad-Dot at the final parameters, ``−(η/n)·<g_i, ḡ_val>``),
   ``tracin`` (the same summed over the recorded checkpoints, times the steps
   between them), ``inrun1``/``inrun2`` (In-Run Shapley over every step),
   ``unrolled`` (:func:`ghostfunc.unroll`, the exact ``∂L_val(θ_T)/∂w_i``) and the
   ``loss`` baseline (the final training loss: high = suspicious).
3. **LDS.** ``retrains`` random half-subsets ``S`` are retrained from the same
   initial parameters (one ``torch.func.vmap`` over the subsets' per-sample
   weights); the group LDS is the Spearman correlation, over subsets, of
   ``Σ_{i∈S} φ_i`` with the retrained model's mean validation loss; the
   per-validation-point LDS the same for each of ``per_val`` validation rows
   (with each method's values for that row), averaged.
4. **Noisy labels.** The same run with ``noise`` of the training labels replaced
   by another class: AUROC of ``φ`` for finding them.
5. **Removal.** Remove the ``k%`` highest-``φ`` (lowest-valued) training rows,
   retrain, test accuracy; against removing ``k%`` at random (``random_draws``
   draws), on the clean and the noisy run.

Cost of the replay: the CPU time of :func:`ghostfunc.unroll` from the recording
against the CPU time of the training run (both a plain ``ghostfunc.sgd`` loop and
the ``train_step`` loop with its order-2 values), measured in the same process
(CPU time, the smaller of repeats: wall time on a shared machine mostly measures
the other processes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import ghostfunc

Params = dict[str, Tensor]
METHODS = ("graddot", "tracin", "inrun1", "inrun2", "unrolled", "loss")
MODELS = ("mlp", "logreg")
DT = torch.float64


# ---------------------------------------------------------------- task


def model_fn(p: Params, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy per row of an MLP (``w1``/``b1`` present: one tanh hidden layer) or logistic regression."""
    x = batch["x"]
    if "w1" in p:
        x = torch.tanh(F.linear(x, p["w1"], p["b1"]))
    return F.cross_entropy(F.linear(x, p["w"], p["b"]), batch["y"], reduction="none")


def init_params(model: str, seed: int, hidden: int = 32) -> Params:
    """``nn.Linear``'s uniform initialisation, seeded; logistic regression starts at zero."""
    g = torch.Generator().manual_seed(seed)
    if model == "logreg":
        return {"w": torch.zeros(10, 64, dtype=DT), "b": torch.zeros(10, dtype=DT)}

    def uniform(*shape: int, fan_in: int) -> Tensor:
        return (torch.rand(*shape, generator=g, dtype=DT) * 2 - 1) / math.sqrt(fan_in)

    return {"w1": uniform(hidden, 64, fan_in=64), "b1": uniform(hidden, fan_in=64),
            "w": uniform(10, hidden, fan_in=hidden), "b": uniform(10, fan_in=hidden)}


@dataclass
class Digits:
    """One split of digits: training rows (with ``index``), validation and test batches, the flipped rows."""

    train: dict[str, Tensor]
    val: dict[str, Tensor]
    test: dict[str, Tensor]
    noisy: Tensor  # [n] bool: label replaced


def digits(seed: int, n_train: int = 1000, n_val: int = 300, noise: float = 0.0) -> Digits:
    """A seeded split of scikit-learn's digits (features / 16); ``noise`` of the training labels replaced."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    if n_train + n_val >= len(y):
        raise ValueError(f"evaluate: n_train + n_val must leave test rows out of digits' {len(y)}; "
                         f"got {n_train} + {n_val}")
    xs, ys = torch.tensor(x, dtype=DT)[perm] / 16, torch.tensor(y)[perm]
    y_train = ys[:n_train].clone()
    noisy = torch.zeros(n_train, dtype=torch.bool)
    flip = torch.randperm(n_train, generator=g)[: int(round(noise * n_train))]
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    noisy[flip] = True
    cut = n_train + n_val
    return Digits({"x": xs[:n_train], "y": y_train, "index": torch.arange(n_train)},
                  {"x": xs[n_train:cut], "y": ys[n_train:cut]}, {"x": xs[cut:], "y": ys[cut:]}, noisy)


def digits_task(model: str = "mlp", seed: int = 0, n_train: int = 1000, n_val: int = 300,
                noise: float = 0.0) -> dict[str, Any]:
    """The factory a recorded digits run names in its ``spec.json`` (see :class:`ghostfunc.Trajectory`)."""
    del model  # the parameters' names say which model
    d = digits(seed, n_train, n_val, noise)
    return {"model_fn": model_fn, "dataset": {k: v for k, v in d.train.items() if k != "index"}, "val": d.val}


# ---------------------------------------------------------------- retraining many subsets at once


def retrain(params: Params, train: dict[str, Tensor], weights: Tensor, steps: int, lr: float) -> Params:
    """Full-batch GD from ``params`` with per-sample weights ``[R, n]``, all ``R`` runs under one ``vmap``.

    Step loss ``(1/n)·Σ_i w_i·ℓ_i``: ``w = (n/|S|)·1[i ∈ S]`` is training on the subset ``S``.
    Returns the final parameters stacked ``[R, ...]``.
    """
    opt = ghostfunc.sgd(lr)
    batch = {"x": train["x"], "y": train["y"]}

    def one(w: Tensor) -> Params:
        p, state = params, opt.init(params)
        for _ in range(steps):
            g = torch.func.grad(lambda q: (w * model_fn(q, batch)).mean())(p)
            p, state = opt.update(g, state, p)
        return p

    return torch.func.vmap(one)(weights)


def batched_losses(stacked: Params, batch: dict[str, Tensor]) -> Tensor:
    """``[R, m]`` per-row losses of ``R`` stacked models."""
    return torch.func.vmap(lambda p: model_fn(p, batch))(stacked)


def batched_accuracy(stacked: Params, batch: dict[str, Tensor]) -> Tensor:
    """``[R]`` accuracy of ``R`` stacked models."""

    def acc(p: Params) -> Tensor:
        x = batch["x"]
        if "w1" in p:
            x = torch.tanh(F.linear(x, p["w1"], p["b1"]))
        return (F.linear(x, p["w"], p["b"]).argmax(-1) == batch["y"]).to(DT).mean()

    return torch.func.vmap(acc)(stacked)


def subset_weights(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``[count, n]`` weights of random half-subsets: ``2`` on the subset, ``0`` off it."""
    order = torch.rand(count, n, generator=generator).argsort(1)
    mask = torch.zeros(count, n, dtype=DT).scatter_(1, order[:, : n // 2], 1.0)
    return mask * (n / (n // 2))


def removal_weights(n: int, drop: Tensor) -> Tensor:
    """Weights ``[n]`` of training on everything but the rows ``drop``."""
    w = torch.ones(n, dtype=DT)
    w[drop] = 0.0
    return w * (n / (n - len(drop)))


# ---------------------------------------------------------------- metrics


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ``[R]`` vectors (ties broken by order: continuous values)."""
    ra, rb = (v.argsort().argsort().to(DT) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score`` for finding ``positive`` rows (Mann-Whitney, average ranks on ties)."""
    from scipy.stats import rankdata

    ranks = torch.tensor(rankdata(score.numpy()), dtype=DT)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------- one run and its values


@dataclass
class Run:
    """One recorded training run and every method's values ``φ`` (``[n]``; per validation row ``[n, k]``)."""

    params0: Params
    final: Params
    values: dict[str, Tensor]
    per_val: dict[str, Tensor]
    seconds: dict[str, float] = field(default_factory=dict)


def attribute_run(model: str, data: Digits, seed: int, steps: int, lr: float, per_val: int) -> Run:
    """Train (recording the trajectory) and compute every method's values."""
    params0 = init_params(model, seed)
    opt = ghostfunc.sgd(lr)
    train, val = data.train, data.val
    n = len(train["y"])
    val_i = {**val, "index": torch.arange(len(val["y"]))}  # train_step wants val shaped like train
    pv = {k: v[:per_val] for k, v in val.items()}
    pv_i = {k: v[:per_val] for k, v in val_i.items()}
    batches = [train] * steps
    every = max(1, math.ceil(math.sqrt(steps)))

    plain = min(_plain_run(params0, opt, train, steps) for _ in range(3))  # the first run warms up

    step = ghostfunc.train_step(model_fn, opt, order=2)
    state = step.init(params0)
    traj = ghostfunc.Trajectory.start(state, every=every)
    inrun1, inrun2 = ghostfunc.DataValues.zeros(n), ghostfunc.DataValues.zeros(n)
    tracin_pv = torch.zeros(n, per_val, dtype=DT)
    inrun1_pv = torch.zeros(n, per_val, dtype=DT)
    shapley_time = 0.0
    for t in range(steps):
        if per_val:  # order-1 In-Run Shapley per validation row (not part of the timed run)
            dots = ghostfunc.graddot(model_fn, state.params, train, pv_i, val_reduce=None).scores
            inrun1_pv -= (lr / n) * dots
            if t % every == 0:
                tracin_pv -= (lr * min(every, steps - t) / n) * dots
        t0 = time.process_time()
        state, info = step(state, train, val_i)
        traj.record(train["index"], state)
        shapley_time += time.process_time() - t0
        inrun1 = inrun1.add(train["index"], info.first_order)
        inrun2 = inrun2.add(train["index"], info.values)

    few = {k: v[:8] for k, v in train.items()}
    ghostfunc.unroll(model_fn, opt, params0, [few, few], val)  # warm-up: first-call costs out of the timing
    replays = []
    for _ in range(2):  # CPU seconds, the smaller of two: the machine may be shared
        t0 = time.process_time()
        unrolled = ghostfunc.unroll(model_fn, opt, traj, batches, val).total
        replays.append(time.process_time() - t0)
    replay = min(replays)
    unrolled_pv = ghostfunc.unroll(model_fn, opt, traj, batches, pv, val_reduce=None).total if per_val else None

    final = state.params
    tracin = torch.zeros(n, dtype=DT)
    for c, (params_c, _) in sorted(traj.checkpoints.items()):
        scores = ghostfunc.graddot(model_fn, params_c, train, val_i).scores
        tracin -= (lr * min(every, steps - c) / n) * scores
    out = ghostfunc.graddot(model_fn, final, train, val_i, val_reduce=None)
    values = {"graddot": -(lr / n) * out.scores.mean(1), "tracin": tracin, "inrun1": inrun1.total,
              "inrun2": inrun2.total, "unrolled": unrolled, "loss": out.train_loss}
    pvs: dict[str, Tensor] = {}
    if per_val:
        assert unrolled_pv is not None
        pvs = {"graddot": -(lr / n) * out.scores[:, :per_val], "tracin": tracin_pv, "inrun1": inrun1_pv,
               "unrolled": unrolled_pv, "loss": out.train_loss[:, None].expand(n, per_val)}
    return Run(params0, final, values, pvs, {"train_plain": plain, "train_step_order2": shapley_time,
                                             "replay": replay})


def _plain_run(params0: Params, opt: ghostfunc.Optimizer, train: dict[str, Tensor], steps: int) -> float:
    """CPU seconds of the plain training run: the mean loss's gradient and the update, nothing else."""
    t0 = time.process_time()
    p, s = params0, opt.init(params0)
    for _ in range(steps):
        q = {k: v.detach().requires_grad_() for k, v in p.items()}
        grads = torch.autograd.grad(model_fn(q, train).mean(), list(q.values()))
        p, s = opt.update(dict(zip(q, grads, strict=True)), s, {k: v.detach() for k, v in q.items()})
    return time.process_time() - t0


# ---------------------------------------------------------------- the evaluation


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: ``rows[model][method]`` -> metric -> value (mean over seeds)."""

    config: dict[str, Any]
    rows: dict[str, dict[str, dict[str, float]]]
    #: model -> "clean/test_acc" (split/metric: test_acc, test_loss, val_loss) -> method|"random"|"none" -> per fraction
    removal: dict[str, dict[str, dict[str, list[float]]]]
    timing: dict[str, dict[str, float]]

    def table(self) -> str:
        """The results as a plain-text table (removal columns: after removing the 10% lowest-valued rows)."""
        cols = [("lds", "group LDS"), ("lds_sd", "±sd"), ("lds_per_val", "per-val LDS"), ("auroc", "noisy AUROC")]
        cols += [(f"remove10 {split}/{metric}", f"-10% {label} {split}") for split in ("clean", "noisy")
                 for metric, label in (("test_acc", "test acc"), ("test_loss", "test loss"), ("val_loss", "val loss"))]
        head = ("model", "method", *(label for _, label in cols))
        lines = []
        k10 = self.config["removal"].index(0.1) if 0.1 in self.config["removal"] else None
        for model, methods in self.rows.items():
            for method, m in methods.items():
                lines.append((model, method, *(_fmt(m.get(k)) for k, _ in cols)))
            if k10 is not None:
                for base in ("random", "none"):
                    lines.append((model, base if base == "random" else "(nothing removed)", "", "", "", "",
                                  *(_fmt(self.removal[model][k.split(" ", 1)[1]][base][k10]) for k, _ in cols[4:])))
        widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
        out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *lines]]
        for model, tm in self.timing.items():
            out.append(f"{model}: replay {tm['replay']:.2f} CPU s = {tm['replay'] / tm['train_plain']:.2f}x the plain "
                       f"training run ({tm['train_plain']:.2f} CPU s), {tm['replay'] / tm['train_step_order2']:.2f}x "
                       f"the train_step(order=2) run ({tm['train_step_order2']:.2f} CPU s)")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "rows": self.rows, "removal": self.removal, "timing": self.timing}


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def evaluate(
    *,
    models: Sequence[str] = MODELS,
    seeds: Sequence[int] = (0, 1, 2),
    retrains: int = 40,
    n_train: int = 1000,
    n_val: int = 300,
    steps: int = 150,
    lr: float | None = None,
    noise: float = 0.1,
    removal: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    random_draws: int = 5,
    per_val: int = 50,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = lambda line: print(line, flush=True),
) -> Evaluation:
    """Evaluate every ghostfunc attribution method against retraining on digits (see the module docstring).

    Args:
        models: ``"mlp"`` (64-32-10, tanh) and/or ``"logreg"``.
        seeds: one full evaluation per seed (split, initialisation, subsets, noise); figures are means.
        retrains: random half-subsets retrained for the LDS.
        n_train: training rows (the rest of digits' 1797 minus ``n_val`` is the test set).
        n_val: validation rows (the attribution target and the LDS's loss).
        steps: full-batch gradient steps.
        lr: learning rate; ``None`` is 0.5 for the MLP, 1.0 for logistic regression.
        noise: fraction of training labels replaced for the noisy-label run.
        removal: fractions removed for the removal curves.
        random_draws: random removals averaged per fraction.
        per_val: validation rows for the per-validation-point LDS (0: skip it; at most ``n_val``).
        out: a folder for ``evaluation.json``, ``evaluation.md`` (the table) and ``evaluation.png``; ``None``
            writes nothing.
        log: progress lines go here (``None``: silent).

    Returns:
        :class:`Evaluation`; ``str(result.table())`` is the printed table.
    """
    where = "evaluate"
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"{where}: models must be a non-empty subset of {MODELS}; got {list(models)}")
    if retrains < 3:
        raise ValueError(f"{where}: retrains must be >= 3 for a rank correlation; got {retrains}")
    if not 0 < noise < 1 or any(not 0 < k < 1 for k in removal):
        raise ValueError(f"{where}: noise and removal fractions must lie in (0, 1); got {noise}, {list(removal)}")
    if not 1 <= round(noise * n_train) < n_train:  # (none flipped: no noisy row to find, every AUROC NaN)
        raise ValueError(f"{where}: noise must flip at least one training label and leave one: round(noise * "
                         f"n_train) in [1, {n_train - 1}]; got noise={noise} of n_train={n_train}, "
                         f"{round(noise * n_train)} flipped")
    say = log or (lambda s: None)
    per_val = min(per_val, n_val)  # (every validation row, where there are fewer: --n-val 10 raised a shape error)
    config = {"models": list(models), "seeds": list(seeds), "retrains": retrains, "n_train": n_train, "n_val": n_val,
              "steps": steps, "lr": lr, "noise": noise, "removal": list(removal), "random_draws": random_draws,
              "per_val": per_val}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    timing: dict[str, dict[str, float]] = {}
    for model in models:
        step_lr = lr if lr is not None else (0.5 if model == "mlp" else 1.0)
        per_seed: list[dict[str, dict[str, float]]] = []
        seed_curves: list[dict[str, dict[str, list[float]]]] = []
        seed_times: list[dict[str, float]] = []
        for seed in seeds:
            t0 = time.perf_counter()
            m, c, tm = _one_seed(model, seed, retrains, n_train, n_val, steps, step_lr, noise, removal,
                                 random_draws, per_val)
            per_seed.append(m)
            seed_curves.append(c)
            seed_times.append(tm)
            say(f"{model} seed {seed}: " + ", ".join(f"{k} LDS {v['lds']:.3f}" for k, v in m.items())
                + f" ({time.perf_counter() - t0:.0f} s)")
        rows[model] = {meth: _mean_rows([s[meth] for s in per_seed]) for meth in METHODS}
        for meth in METHODS:
            ldss = [s[meth]["lds"] for s in per_seed]
            rows[model][meth]["lds_sd"] = float(torch.tensor(ldss).std()) if len(ldss) > 1 else float("nan")
        curves[model] = {key: {k: [sum(c[key][k][j] for c in seed_curves) / len(seed_curves)
                                   for j in range(len(removal))] for k in seed_curves[0][key]}
                         for key in seed_curves[0]}
        timing[model] = {k: sum(t[k] for t in seed_times) / len(seed_times) for k in seed_times[0]}
    result = Evaluation(config, rows, curves, timing)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        # strict JSON: an undefined number (one seed's spread) is null, not a bare NaN (h56)
        (folder / "evaluation.json").write_text(json.dumps(_nulls(result.to_json()), indent=1, allow_nan=False))
        (folder / "evaluation.md").write_text(result.table() + "\n")
        plot(result, folder / "evaluation.png")
    return result


def _nulls(tree: Any) -> Any:
    """``tree`` (dicts, lists, numbers) with every non-finite float as ``None``."""
    if isinstance(tree, dict):
        return {k: _nulls(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_nulls(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _one_seed(model: str, seed: int, retrains: int, n_train: int, n_val: int, steps: int, lr: float, noise: float,
              removal: Sequence[float], random_draws: int, per_val: int
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]], dict[str, float]]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    clean = digits(seed, n_train, n_val)
    noisy = digits(seed, n_train, n_val, noise)
    t0 = time.perf_counter()
    run = attribute_run(model, clean, seed, steps, lr, per_val)
    run_noisy = attribute_run(model, noisy, seed, steps, lr, 0)
    t_attribute = time.perf_counter() - t0

    # group and per-validation-point LDS over random half-subsets
    weights = subset_weights(n_train, retrains, gen)
    stacked = retrain(run.params0, clean.train, weights, steps, lr)
    val_losses = batched_losses(stacked, clean.val)  # [R, m]
    member = (weights > 0).to(DT)  # [R, n]
    metrics: dict[str, dict[str, float]] = {}
    for meth in METHODS:
        pred = member @ run.values[meth]
        row = {"lds": spearman(pred, val_losses.mean(1))}
        if meth in run.per_val:
            pv = member @ run.per_val[meth]  # [R, k]
            row["lds_per_val"] = sum(spearman(pv[:, j], val_losses[:, j]) for j in range(per_val)) / per_val
        else:
            row["lds_per_val"] = float("nan")
        row["auroc"] = auroc(run_noisy.values[meth], noisy.noisy)
        metrics[meth] = row

    t_lds = time.perf_counter() - t0 - t_attribute
    # removal curves: every method's k% highest φ against k% at random
    curves: dict[str, dict[str, list[float]]] = {}
    for split, r, data in (("clean", run, clean), ("noisy", run_noisy, noisy)):
        ws, labels = [torch.ones(n_train, dtype=DT)], [("none", -1)]
        for j, frac in enumerate(removal):
            k = int(round(frac * n_train))
            for meth in METHODS:
                ws.append(removal_weights(n_train, r.values[meth].argsort(descending=True)[:k]))
                labels.append((meth, j))
            for _ in range(random_draws):
                ws.append(removal_weights(n_train, torch.randperm(n_train, generator=gen)[:k]))
                labels.append(("random", j))
        stacked = retrain(r.params0, data.train, torch.stack(ws), steps, lr)
        measured = {"test_acc": batched_accuracy(stacked, data.test),
                    "test_loss": batched_losses(stacked, data.test).mean(1),
                    "val_loss": batched_losses(stacked, data.val).mean(1)}
        for name, values in measured.items():
            table: dict[str, list[float]] = {m: [0.0] * len(removal) for m in (*METHODS, "random")}
            for (meth, j), v in zip(labels[1:], values[1:].tolist(), strict=True):
                table[meth][j] += v / (random_draws if meth == "random" else 1)
            table["none"] = [float(values[0])] * len(removal)  # nothing removed
            curves[f"{split}/{name}"] = table
    k10 = [j for j, f in enumerate(removal) if abs(f - 0.1) < 1e-9]
    for meth in METHODS:
        for key, table in curves.items():
            metrics[meth][f"remove10 {key}"] = table[meth][k10[0]] if k10 else float("nan")
    phases = {"phase_attribute": t_attribute, "phase_lds_retrains": t_lds,
              "phase_removal_retrains": time.perf_counter() - t0 - t_attribute - t_lds}
    return metrics, curves, {**run.seconds, **phases}


def plot(result: Evaluation, path: str | Path) -> None:
    """Group LDS bars and removal curves (test accuracy and loss against the fraction removed), a row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.rows)
    panels = [(f"{split}/{metric}", split, metric) for metric in ("test_acc", "test_loss") for split in ("clean", "noisy")]
    fig, axes = plt.subplots(len(models), 1 + len(panels), figsize=(5 * (1 + len(panels)), 4 * len(models)),
                             squeeze=False)
    fracs = [100 * f for f in result.config["removal"]]
    for i, model in enumerate(models):
        ax = axes[i][0]
        ax.bar(METHODS, [result.rows[model][m]["lds"] for m in METHODS], color=["C0", "C1", "C2", "C3", "C4", "C7"])
        ax.set_title(f"{model}: group LDS\n({result.config['retrains']} retrains, seeds {result.config['seeds']})")
        ax.axhline(0, color="k", lw=0.5)
        ax.tick_params(axis="x", rotation=30)
        for j, (key, split, metric) in enumerate(panels):
            ax = axes[i][1 + j]
            for m, curve in result.removal[model][key].items():
                if m == "none":
                    ax.axhline(curve[0], color="grey", lw=0.8, ls=":", label="nothing removed")
                    continue
                ax.plot(fracs, curve, "--" if m == "random" else "-", marker="o", label=m,
                        color="k" if m == "random" else None)
            ax.set_title(f"{model}, {split} labels: remove the k% lowest-valued")
            ax.set_xlabel("% of training rows removed")
            ax.set_ylabel(metric.replace("_", " ") + " after retraining")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ghostfunc evaluate``: the table on stdout, JSON and PNG in ``--out``."""
    import argparse

    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module's docstring as written, and every option's default (as ``train --help`` shows them)."""

    parser = argparse.ArgumentParser(prog="python -m ghostfunc evaluate", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=Help)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to evaluate")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--retrains", type=int, default=40, help="random half-subsets retrained for the LDS")
    parser.add_argument("--n-train", type=int, default=1000, help="training rows of digits")
    parser.add_argument("--n-val", type=int, default=300, help="validation rows (the attribution target)")
    parser.add_argument("--steps", type=int, default=150, help="full-batch gradient steps")
    parser.add_argument("--lr", type=float, default=None, help="learning rate; None: 0.5 for the MLP, 1.0 for logreg")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of labels replaced in the noisy run")
    parser.add_argument("--per-val", type=int, default=50, help="validation rows of the per-val LDS (0: skip)")
    parser.add_argument("--random-draws", type=int, default=5, help="random removals averaged per fraction")
    parser.add_argument("--out", default="evaluation", help="folder for evaluation.json, .md and .png")
    args = parser.parse_args(argv)
    from ._run.cli import Range, check_args

    check_args(parser, args, {"seeds": Range(1), "retrains": Range(3), "n_train": Range(2), "n_val": Range(1),
                              "steps": Range(1), "lr": Range(0, open_low=True),
                              "noise": Range(0, 1, open_low=True, open_high=True), "per_val": Range(0),
                              "random_draws": Range(1)})
    from ._run.cli import check_writable
    from ._run.data import UsageError

    try:  # before the computation, not after it (an --out naming a file lost the results)
        check_writable(Path(args.out), "--out")
    except UsageError as err:
        parser.error(str(err))
    torch.set_num_threads(1)  # tiny models: one thread is faster, and CPU-time ratios are not inflated by spinning
    t0 = time.perf_counter()
    try:
        result = evaluate(models=args.models, seeds=tuple(range(args.seeds)), retrains=args.retrains,
                          n_train=args.n_train, n_val=args.n_val, steps=args.steps, lr=args.lr, noise=args.noise,
                          per_val=args.per_val, random_draws=args.random_draws, out=args.out)
    except ValueError as err:
        for start, option in (("evaluate: n_train + n_val", "--n-train/--n-val"), ("evaluate: noise must flip",
                                                                                    "--noise/--n-train")):
            if str(err).startswith(start):  # the checks that need the data set's size, or two options together
                parser.error(f"{option}: {str(err).removeprefix('evaluate: ')}")
        raise
    print(result.table())
    print(f"written {args.out}/evaluation.json, .md and .png ({time.perf_counter() - t0:.0f} s)")
    return 0
