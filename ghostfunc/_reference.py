"""The obviously correct slow thing: a loop of single-sample backward passes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._capture import checkpoints_as_plain, on_batch, split_batch
from ._checks import check_model_fn, check_options, check_pair, check_params
from ._draws import fork_rng
from ._interact import LossShapeError, ParamsUnusedError, eager_stance, in_one_call


def _check_losses(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str, where: str) -> None:
    """Raise as :func:`ghostfunc.graddot` does if ``model_fn`` on the whole ``batch`` does not return one
    floating loss per sample (a loss reduced over the batch looks like one sample's when run on one). A model that
    cannot run the whole batch (a ``view`` of a non-contiguous batch) is left to the loop."""
    split = split_batch(batch)
    device = next(iter(params.values())).device
    try:
        with fork_rng([device.index or 0] if device.type == "cuda" else []):  # draws undone
            losses = model_fn({k: v.detach().clone() for k, v in params.items()}, batch)  # as the loop: copies
    except Exception:  # noqa: BLE001 - a model that runs one sample at a time only: the loop below is the judge
        return
    if not isinstance(losses, Tensor) or losses.shape != (split.size,) or not losses.is_floating_point():
        got = (f"a {losses.dtype} tensor of shape {tuple(losses.shape)}" if isinstance(losses, Tensor)
               else type(losses).__name__)
        hint = " (a loss reduced over the batch? use reduction='none')" if isinstance(losses, Tensor) and \
            losses.numel() == 1 and split.size > 1 else ""
        raise LossShapeError(f"{where}: model_fn(params, batch) must return one floating-point loss per sample, a "
                             f"tensor of shape [B]; for {split.size} {label} samples it returned {got}{hint}")


def per_sample_grads(model_fn: Callable, params: Mapping[str, Tensor], batch: Any, label: str = "train",
                     where: str = "reference_graddot") -> tuple[dict[str, Tensor], Tensor]:
    """``{name: [B, *shape]}`` and losses ``[B]``, one ordinary backward pass per sample. A non-finite loss, or
    one without an autograd path to ``params``, is refused naming the sample. A ``torch.utils.checkpoint``
    segment, re-entrant or not, runs as a plain call (the re-entrant form refuses ``torch.autograd.grad``; both
    recompute inside the backward with a module's own weights, not ``params``: zero or wrong scores); the
    values and gradients are those of the model without checkpointing."""
    split = split_batch(batch)  # tensor leaves, sample axis first (a transformers.BatchEncoding too)
    grads: dict[str, list[Tensor]] = {k: [] for k in params}
    losses = []
    for i in range(split.size):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        # compiled code runs eagerly here (dynamo cannot trace the mode's look at the saved-tensor hooks)
        with on_batch(where, f"{label} sample {i} (run alone)"), eager_stance(), checkpoints_as_plain():
            # a copy of the dict: a model_fn that rebinds an entry (functional_call writes back a module tensor
            # its forward reassigned, e.g. a pruning pre-hook's) must not change which leaves are differentiated
            loss = model_fn(dict(p), split.rebuild([t[i:i + 1] for t in split.tensors]))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise LossShapeError(f"{where}: model_fn(params, batch) must return one loss per sample, a tensor of "
                                 f"shape [B]; for {label} sample {i} alone (a batch of 1) it returned {got}")
        loss = loss.reshape(())
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"{where}: model_fn returned a non-finite loss for {label} sample {i} "
                                     f"({loss.item()}); its gradient is undefined")
        if not loss.requires_grad:
            raise ParamsUnusedError(f"{where}: the loss of {label} sample {i} has no autograd path to params "
                                    f"(computed under torch.no_grad(), .detach()-ed, or an integer); return the "
                                    f"losses as computed from params")
        gs = [g.to_dense() if g is not None and g.is_sparse else g
              for g in torch.autograd.grad(loss, list(p.values()), allow_unused=True)]
        bad = [k for k, g in zip(p, gs, strict=True) if g is not None and not bool(torch.isfinite(g).all())]
        if bad:  # (as graddot refuses it: a NaN score was returned silently)
            raise FloatingPointError(f"{where}: the gradient of {label} sample {i}'s loss ({loss.item():.6g}) is not "
                                     f"finite in params[{bad[0]!r}]" + (f" and {len(bad) - 1} more" if len(bad) > 1
                                                                        else "") + "; its scores would be NaN")
        for (k, v), g in zip(p.items(), gs, strict=True):
            grads[k].append(torch.zeros_like(v) if g is None else g)
        losses.append(loss.detach())
    return {k: torch.stack(v) for k, v in grads.items()}, torch.stack(losses)


@in_one_call
def reference_graddot(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    train: Any,
    val: Any,
    *,
    val_reduce: str | None = "mean",
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Reference for :func:`ghostfunc.graddot`: ``(scores, per_param, train_grad)``.

    Uses one ``torch.autograd.grad`` call per sample; cost ``(n + m)`` backward
    passes and ``(n + m)`` model-sized vectors. For tests and benchmarks. In bfloat16
    or float16 each sample's backward rounds in that dtype (a loop in bfloat16 can be
    further from the float64 answer than ``graddot`` is): for a ground truth, run both on
    a float64 copy of the model.
    """
    where = "reference_graddot"
    check_model_fn(model_fn, where)
    check_options(where, val_reduce=val_reduce)
    params = check_params(params, where)
    check_pair(train, val, where)  # the messages graddot gives, naming the argument
    _check_losses(model_fn, params, train, "train", where)
    _check_losses(model_fn, params, val, "val", where)
    gt, _ = per_sample_grads(model_fn, params, train, "train", where)
    gv, _ = per_sample_grads(model_fn, params, val, "val", where)
    per_param = {}
    for k in params:
        a, b = gt[k].reshape(len(gt[k]), -1), gv[k].reshape(len(gv[k]), -1)  # [n, P], [m, P]
        if val_reduce == "mean":
            per_param[k] = a @ b.mean(0)
        elif val_reduce == "sum":
            per_param[k] = a @ b.sum(0)
        else:
            per_param[k] = a @ b.T
    scores = torch.stack(list(per_param.values())).sum(0)
    return scores, per_param, {k: v.mean(0) for k, v in gt.items()}
