"""Split batches: samples that take different data-dependent branches run in separate groups.

The single-sample loop defines every answer, and in it each sample takes the
branch its own values pick (``if h.sum() > 0``, ``mask.all()``, ``.item()``).
Under ``vmap`` a batch runs one sequence of Python calls; when its samples give
different values at such a point (:class:`ghostfunc._capture._Diverged`), the
batch is cut into *parts* by those values and each part, whose samples agree
there, runs on its own (and may be cut again at a later branch point). The
parts' results are put back together in the original sample order:

- per-sample losses and per-sample gradients are scattered back by index
  (:func:`merge_halves`); a factored parameter's uses are concatenated along the
  token axis within a part and zero-padded to a common length across parts (a
  zero right factor adds nothing), so every kernel sees one ``[n, T, ·]`` layout;
- reduced quantities (``Σ_v w_v g_v``) are summed over the parts (:func:`split_sum`).

A batch whose samples all agree is one part and costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._capture import Batch, Half, _Diverged
from ._ops import Direct, Factored


class Part(NamedTuple):
    """Some samples of a batch that agree at every data-dependent branch met so far.

    ``rows``: their positions in the whole batch (``None``: the whole batch);
    ``key``: the branch values that define the part, ``((ordinal, call, value), ...)``
    (``()`` for the whole batch); it keys the part's trace.
    """

    rows: Tensor | None
    key: tuple


WHOLE = (Part(None, ()),)


def subset(batch: Batch, part: Part) -> Batch:
    """The samples of ``part`` as a batch of their own (the batch itself for the whole)."""
    if part.rows is None:
        return batch
    idx = part.rows.to(batch.tensors[0].device) if batch.tensors else part.rows
    return Batch([t[idx] for t in batch.tensors], batch.rebuild, len(part.rows), (batch.signature, part.key))


def refine(parts: Sequence[Part], err: _Diverged, at: Part) -> tuple[Part, ...]:
    """``parts`` with ``at`` cut by the per-sample values of ``err`` (first appearance order)."""
    index = torch.arange(len(err.values)) if at.rows is None else at.rows
    if len(err.values) != len(index):
        raise AssertionError(f"{len(err.values)} branch values for a part of {len(index)} samples")
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(err.values):
        groups.setdefault(repr(v), []).append(i)
    if len(groups) < 2:
        raise AssertionError(f"a branch point that diverged gave one value: {err}")
    new = [Part(index[torch.tensor(rows)], (*at.key, (err.ordinal, err.call, value)))
           for value, rows in groups.items()]
    out: list[Part] = []
    for p in parts:
        out.extend(new if p.key == at.key else [p])
    return tuple(out)


def split(notes: Sequence[str], label: str) -> bool:
    """Whether a plan's ``notes`` say the ``label`` batch was split at data-dependent branches (:func:`describe`)."""
    return any(note.startswith(f"{label} split into ") for note in notes)


def describe(parts: Sequence[Part], label: str, passes: str = "one forward per group, one backward") -> str | None:
    """One line for the plan: how a batch was split and what it cost, or ``None`` when it was not split."""
    if len(parts) <= 1:
        return None
    sizes = ", ".join(f"{_branches(p.key)}: {len(p.rows) if p.rows is not None else '?'}" for p in parts[:6])
    more = f", ... ({len(parts)} in all)" if len(parts) > 6 else ""
    return f"{label} split into {len(parts)} groups at data-dependent branches ({sizes}{more}); {passes}"


def _branches(key: tuple) -> str:
    return " & ".join(f"{call}={value}" for _, call, value in key) or "all"


def merge_halves(halves: Sequence[Half], parts: Sequence[Part], n: int) -> Half:
    """One :class:`Half` for the whole batch from the halves of its parts, in sample order.

    Per parameter: a :class:`Direct` gradient is summed over its uses and scattered
    into ``[n, *shape]`` (zeros where a part never used it); :class:`Factored` uses
    are concatenated along the token axis (dense and id uses kept apart), padded
    with zeros to the longest part and scattered into ``[n, T, p]``, ``[n, T, d]``.
    """
    if len(halves) == 1 and parts[0].rows is None:
        return halves[0]
    ref = halves[0].loss
    loss = ref.new_zeros(n)
    for h, p in zip(halves, parts, strict=True):
        loss[_rows(p, n, ref.device)] = h.loss
    grads: dict[str, list[Factored | Direct]] = {}
    for k in halves[0].grads:
        uses = [h.grads[k] for h in halves]
        direct = [u for us in uses for u in us if isinstance(u, Direct)]
        factored = [u for us in uses for u in us if isinstance(u, Factored)]
        if direct and factored:
            raise AssertionError(f"{k}: direct and factored uses across groups")
        if direct or not factored:
            grads[k] = _merge_direct(uses, parts, n) if direct else []
        else:
            grads[k] = [f for ids in (False, True) if (f := _merge_factored(uses, parts, n, ids)) is not None]
    return Half(loss, grads)


def _rows(part: Part, n: int, device: torch.device) -> Tensor:
    return (torch.arange(n) if part.rows is None else part.rows).to(device)


def _merge_direct(uses: Sequence[list], parts: Sequence[Part], n: int) -> list[Factored | Direct]:
    like = next(u.grad for us in uses for u in us)
    out = like.new_zeros(n, *like.shape[1:])
    for us, p in zip(uses, parts, strict=True):
        if us:
            total = us[0].grad
            for u in us[1:]:
                total = total + u.grad
            out[_rows(p, n, like.device)] = total
    return [Direct(out)]


def _merge_factored(uses: Sequence[list], parts: Sequence[Part], n: int, ids: bool) -> Factored | None:
    joined = []  # per part: (left [n_g, t_g, ...], right [n_g, t_g, d]) or None
    for us in uses:
        mine = [u for u in us if isinstance(u, Factored) and u.ids == ids]
        joined.append((torch.cat([u.left for u in mine], 1), torch.cat([u.right for u in mine], 1)) if mine else None)
    present = [j for j in joined if j is not None]
    if not present:
        return None
    p_rows = next(u.p for us in uses for u in us if isinstance(u, Factored))
    t = max(j[0].shape[1] for j in present)
    left0, right0 = present[0]
    left = left0.new_zeros(n, t, *left0.shape[2:])  # [n, T] ids (0 with a zero right factor) or [n, T, p]
    right = right0.new_zeros(n, t, right0.shape[2])  # [n, T, d]
    for j, p in zip(joined, parts, strict=True):
        if j is not None:
            rows = _rows(p, n, left.device)
            left[rows, :j[0].shape[1]] = j[0]
            right[rows, :j[1].shape[1]] = j[1]
    return Factored(left, right, p_rows)


def split_sum(run: Callable[[Batch, Part], tuple[Any, Tensor]], batch: Batch) -> tuple[Any, Tensor, tuple[Part, ...]]:
    """``run(part_batch, part) -> (tree, losses)`` over the parts a batch splits into; trees summed.

    Starts with the whole batch; a part whose samples diverge at a branch is cut
    (:func:`refine`) and its parts run instead. Returns the summed tree, the losses
    ``[B]`` in sample order, and the parts.
    """
    parts: tuple[Part, ...] = WHOLE
    done: dict[tuple, tuple[Any, Tensor]] = {}
    while True:
        todo = [p for p in parts if p.key not in done]
        if not todo:
            break
        for p in todo:
            try:
                done[p.key] = run(subset(batch, p), p)
            except _Diverged as err:
                parts = refine(parts, err, p)
                break
    trees = [done[p.key][0] for p in parts]
    total = trees[0] if len(trees) == 1 else pytree.tree_map(lambda *xs: _sum(xs), *trees)
    first = done[parts[0].key][1]
    losses = first if parts[0].rows is None else first.new_zeros(batch.size)
    if parts[0].rows is not None:
        for p in parts:
            losses[_rows(p, batch.size, losses.device)] = done[p.key][1]
    return total, losses, parts


def _sum(xs: Sequence[Tensor]) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out
