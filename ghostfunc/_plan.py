"""Which path every trainable parameter takes, and why.

A parameter is *factored* when every call that uses it is a recognised matrix op
(linear, Conv1D, embedding, conv), *direct* when every use is a recognised
elementwise op (biases, norm weights, scales), and *fallback* otherwise (an
unrecognised call used it, no recognised call did, or it was used both ways).

Factored parameters then take a kernel by policy, decided per call from the
shapes of that call:

- ``"2t2"``: ghost iff ``2·T² ≤ p·d`` (mixed ghost clipping's rule; it minimises
  memory, not time), else materialise;
- ``"ghost"``, ``"materialize"``, ``"contract"``: that kernel everywhere
  (``"contract"`` needs a reduced validation gradient);
- ``"auto"``: the fastest whole call, timed at first use per call signature
  (:func:`ghostfunc._calibrate.race` over :data:`CANDIDATES`, cached); until then, and
  with ``GHOSTFUNC_ROUTING=model``, the cheapest by the multiply-add counts of :func:`costs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ._calibrate import Candidate, Choice, Constants, constants, routing_mode
from ._capture import Trace

POLICIES = ("auto", "2t2", "ghost", "materialize", "contract")
#: Internal policy: ``"auto"`` without the ghost kernel, for rows scored against one reduced direction
#: (``graddot_direction``, and the all-reduced validation direction under ``group=``).
DIRECTION = "direction"
#: Internal policy: the cost model alone (what ``"auto"`` routes by before, or without, a measurement).
MODEL = "model"


def candidate_policies(val_reduce: str | None) -> tuple[tuple[str, str], ...]:
    """The routings ``auto`` races at first use: (label, policy). Contracting needs a reduced validation gradient."""
    every = (("cost model", MODEL), ("ghost", "ghost"), ("materialize", "materialize"))
    if val_reduce is None:
        return every
    return (*every, ("cost model without ghost", DIRECTION), ("contract", "contract"))


class Route(NamedTuple):
    """One trainable parameter's path.

    ``tokens`` and ``val_tokens`` (``T``, ``S``) count the positions per sample
    that share the parameter, summed over its uses; ``p``, ``d`` are its
    matrix shape (factored parameters only).
    """

    name: str
    shape: tuple[int, ...]
    path: str  # "ghost" | "materialize" | "contract" | "direct" | "fallback"
    reason: str
    uses: tuple[str, ...]
    tokens: int = 0
    val_tokens: int = 0
    p: int = 0
    d: int = 0

    @property
    def factored(self) -> bool:
        return self.path in ("ghost", "materialize", "contract")


class Plan(NamedTuple):
    """The path of every trainable parameter for one call; prints as a table.

    ``notes``: how the batches ran when not as one batched capture each (split
    into groups at data-dependent branches, or one sample at a time and why);
    ``tuning``: for ``policy="auto"``, how the routes were chosen (measured or the cost model).
    """

    routes: dict[str, Route]
    policy: str
    n_train: int
    n_val: int
    val_reduce: str | None
    notes: tuple[str, ...] = ()
    tuning: str = ""

    def counts(self) -> dict[str, int]:
        """How many parameters take each path."""
        out: dict[str, int] = {}
        for r in self.routes.values():
            out[r.path] = out.get(r.path, 0) + 1
        return out

    def __str__(self) -> str:
        head = ("parameter", "shape", "path", "T", "S", "p", "d", "uses", "why")
        rows = [head] + [
            (r.name, "x".join(map(str, r.shape)) or "()", r.path,
             *(str(v) if r.factored else "-" for v in (r.tokens, r.val_tokens, r.p, r.d)),
             ",".join(dict.fromkeys(r.uses)) or "-", r.reason)
            for r in self.routes.values()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = [
            f"plan: policy={self.policy!r}, n_train={self.n_train}, n_val={self.n_val}, "
            f"val_reduce={self.val_reduce!r}; " + ", ".join(f"{k}: {v}" for k, v in self.counts().items())
        ]
        lines.extend([f"routing: {self.tuning}"] if self.tuning else [])
        lines.extend(f"note: {note}" for note in self.notes)
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        return "\n".join(lines)

    def _repr_pretty_(self, p: object, cycle: bool) -> None:  # IPython
        del cycle
        p.text(str(self))  # type: ignore[attr-defined]


class Usage(NamedTuple):
    """What the traces say about one parameter."""

    form: str | None  # "factored" | "direct" | None (fallback)
    reason: str
    uses: tuple[str, ...]
    tokens: int
    val_tokens: int


def usages(params: Mapping[str, Tensor], traces: tuple[Trace, Trace]) -> dict[str, Usage]:
    """Classify every parameter from the train and val traces."""
    forms: dict[str, set[str]] = {k: set() for k in params}
    kinds: dict[str, list[str]] = {k: [] for k in params}  # the calls one train sample makes
    toks = [{k: 0 for k in params}, {k: 0 for k in params}]
    for which, tr in enumerate(traces):
        for site in tr.sites:
            for role, name in site.roles:
                factored = role in site.rule.factored_roles
                forms[name].add("factored" if factored else "direct")
                if which == 0:
                    kinds[name].append(site.rule.kind)
                if factored:
                    width = params[name].shape[site.rule.out_axis]
                    toks[which][name] += int(torch.Size(site.out_shape).numel()) // width if width else 0
    other = {**traces[1].other_uses, **traces[0].other_uses}
    out = {}
    for k in params:
        uses = tuple(kinds[k])
        if params[k].numel() == 0:  # nothing to factor (its per-sample gradients are empty): the leaf path
            out[k] = Usage(None, "zero-size", uses, 0, 0)
        elif k in other:
            out[k] = Usage(None, f"used by {other[k]}", uses, 0, 0)
        elif not forms[k]:
            out[k] = Usage(None, "no recognised call uses it", uses, 0, 0)
        elif len(forms[k]) > 1:
            out[k] = Usage(None, "used both as a matrix and elementwise", uses, 0, 0)
        else:
            form = forms[k].pop()
            out[k] = Usage(form, "", uses, toks[0][k], toks[1][k])
    return out


#: Multiply-add equivalents per element of a materialised per-row gradient block: it is written by a
#: ``bmm``, then read to dot it and to sum it. Memory traffic, not arithmetic: measured 50-180 on a
#: 2-core CPU (``benchmarks/mlp2d.py``); it makes ``materialize`` lose to ``contract`` below ``T ≈ κ``.
MATERIALISE_PER_ELEMENT = 96
#: The same per (train token, val token) pair of the Gram kernel: two ``[c, t, m, s]`` blocks are
#: written, multiplied in place and summed; measured 25-65.
GRAM_PER_PAIR = 32


def costs(n: int, m: int, t: int, s: int, p: int, d: int, ids: bool, reduced: bool,
          constants: Constants | None = None) -> dict[str, float]:
    """Multiply-adds of each kernel for one factored parameter, ``train_grad`` included.

    ``n``/``m`` train/val rows with ``t``/``s`` tokens each; ``ids`` for an
    embedding (one-hot left factor, so a row of ``p·d`` work costs ``d``). Memory
    passes are counted in multiply-add equivalents (:data:`MATERIALISE_PER_ELEMENT`,
    :data:`GRAM_PER_PAIR`), since at short sequences they, not the GEMMs, set the time;
    ``constants`` (:func:`ghostfunc._calibrate.constants`, measured on the device) replace them.
    """
    per_element, per_pair = (MATERIALISE_PER_ELEMENT, GRAM_PER_PAIR) if constants is None else constants[:2]
    row = d if ids else p * d  # one token's outer product
    train_sum = n * t * row  # Σ_n g_n, what an optimizer step needs
    val_sum = m * s * row
    blocks = per_element * p * d  # one row's materialised [p, d] block, written and read
    out = {"ghost": n * m * t * s * ((1 if ids else p) + d + per_pair) + train_sum}
    if reduced:
        # Σ_n g_n comes free; id uses gather rows of U and scatter into the sum (no block)
        out["materialize"] = val_sum + n * t * row + (train_sum if ids else n * blocks)
        out["contract"] = val_sum + n * t * row + train_sum
    else:  # both sides materialised block by block, then one [n, m] product per block
        out["materialize"] = val_sum + n * t * row + (n + m) * blocks + n * m * p * d
    return {k: float(v) for k, v in out.items()}


def direction_kernel(n: int, t: int, p: int, d: int, ids: bool, k: int, constants: Constants | None = None) -> str:
    """``"materialize"`` or ``"contract"``: the cheaper way to dot every training row's gradient with
    ``k`` fixed directions once ``Σ_n g_n`` is known (what the secant curvature needs, ``k = 2``).

    Contracting costs ``k·n·T·row``; materialising costs ``n·T·row`` once, then ``k·p·d``
    per row plus the block traffic (:data:`MATERIALISE_PER_ELEMENT`). Id uses always contract.
    """
    per_element = MATERIALISE_PER_ELEMENT if constants is None else constants.materialise
    row = d if ids else p * d
    contract_cost = k * n * t * row
    materialise_cost = n * t * row + n * (k + per_element) * p * d
    return "contract" if ids or contract_cost <= materialise_cost else "materialize"


def choose(policy: str, n: int, m: int, t: int, s: int, p: int, d: int, ids: bool, reduced: bool,
           constants: Constants | None = None) -> tuple[str, str]:
    """The kernel for one factored parameter under ``policy``, and why."""
    if policy in ("ghost", "materialize", "contract"):
        return policy, f"policy {policy!r}"
    if policy == MODEL:
        policy = "auto"
    if policy == DIRECTION:  # scored against one reduced direction: no second batch's factors, so no ghost
        c = costs(n, m, t, s, p, d, ids, True, constants)
        del c["ghost"]
        best = min(c, key=c.__getitem__)
        return best, "against one direction: cost " + " ".join(
            f"{k}={v:.2g}" for k, v in sorted(c.items(), key=lambda kv: kv[1]))
    if policy == "2t2":
        big_t = max(t, s)
        if 2 * big_t * big_t <= p * d:
            return "ghost", f"2T²={2 * big_t * big_t} <= pd={p * d}"
        return "materialize", f"2T²={2 * big_t * big_t} > pd={p * d}"
    c = costs(n, m, t, s, p, d, ids, reduced, constants)
    best = min(c, key=c.__getitem__)
    return best, "cost " + " ".join(f"{k}={v:.2g}" for k, v in sorted(c.items(), key=lambda kv: kv[1]))


def make_plan(params: Mapping[str, Tensor], use: Mapping[str, Usage], policy: str, n: int, m: int,
              val_reduce: str | None, tuned: Choice | None = None) -> Plan:
    """Route every parameter; under ``"auto"``, by ``tuned`` (the measured choice) when given, else the cost model."""
    routes = {}
    first = next(iter(params.values()))
    measured = constants(first.device, first.dtype) if policy in ("auto", MODEL, DIRECTION) else None
    for k, u in use.items():
        shape = tuple(params[k].shape)
        if u.form is None:
            routes[k] = Route(k, shape, "fallback", u.reason, u.uses)
        elif u.form == "direct":
            what = "grouped conv" if any(kind.endswith("(grouped)") for kind in u.uses) else "elementwise"
            routes[k] = Route(k, shape, "direct", f"{what}: per-sample gradient kept whole", u.uses)
        else:
            p = shape[0]
            d = params[k].numel() // max(p, 1)
            ids = all(kind == "embedding" for kind in u.uses)
            path, why = choose(policy, n, m, u.tokens, u.val_tokens, p, d, ids, val_reduce is not None, measured)
            if policy == "auto" and tuned is not None and k in tuned.paths:
                path, why = tuned.paths[k], f"measured: {tuned.label} {tuned.state}"
            routes[k] = Route(k, shape, path, why, u.uses, u.tokens, u.val_tokens, p, d)
    tuning = ""
    if policy == "auto":
        tuning = tuned.why if tuned is not None else (
            "cost model (GHOSTFUNC_ROUTING=model)" if routing_mode() == "model" else
            "cost model; the first graddot call with these shapes times the candidate routings and keeps the fastest")
    return Plan(routes, policy, n, m, val_reduce, tuning=tuning)


def estimate(plan: Plan, consts: Constants | None = None) -> float:
    """The cost model's multiply-adds for ``plan``'s factored parameters: their kernels (:func:`costs`) plus the
    forward and input-gradient products every route shares (``(n·T + m·S)·row`` each)."""
    total = 0.0
    for r in plan.routes.values():
        if not r.factored:
            continue
        ids = all(kind == "embedding" for kind in r.uses)
        row = r.d if ids else r.p * r.d
        c = costs(plan.n_train, plan.n_val, r.tokens, r.val_tokens, r.p, r.d, ids, plan.val_reduce is not None, consts)
        total += c.get(r.path, min(c.values())) + 2 * (plan.n_train * r.tokens + plan.n_val * r.val_tokens) * row
    return total


def contenders(plans: list[tuple[str, Plan]], like: Tensor) -> list[Candidate]:
    """The race's candidates from each candidate policy's plan: label, factored paths, :func:`estimate`
    (with the constants for ``like``'s device and dtype)."""
    consts = constants(like.device, like.dtype)
    return [Candidate(label, {k: r.path for k, r in p.routes.items() if r.factored}, estimate(p, consts))
            for label, p in plans]
