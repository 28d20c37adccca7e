"""The task factory a ``ghostfunc train --record-every K`` run names in its ``spec.json``.

``python -m ghostfunc attribute --run DIR`` reads ``DIR/trajectory/trajectory.pt``
(a :class:`ghostfunc.Trajectory`: the training state every ``K`` steps and every
step's global batch of chunk indices) and calls :func:`task` with the run folder;
:func:`task` rebuilds, from ``DIR/config.json``, exactly what the run trained with:

- ``model_fn``: the run's model (``--model``, ``--size``, ``--dtype``,
  ``--autocast``, ``--seq-len``) through ``ghostfunc.from_module`` and
  ``ghostfunc.causal_lm_loss``; a batch is ``{"input_ids": [B, T]}``;
- ``dataset``: ``{"input_ids": Chunks}``, the training chunks ``[N, T]`` indexed by
  chunk index (the sample index of ``values.pt``), read lazily: only the rows a
  step's batch names are materialised;
- ``val``: the batch the final loss ``L_val(θ_T)`` is measured on: **the whole
  validation set as the run evaluates it** (``val_loss`` in ``metrics.jsonl``:
  at most ``--val-limit`` chunks, 256 by default, spread evenly), not the per-step
  validation batches the In-Run values were computed against;
- ``optimizer``: the run's own (``--optimizer`` with its warmup + cosine
  ``lr`` schedule, a callable a JSON spec cannot hold).

Relative paths of a run made before ``config.json`` recorded them absolute are
resolved against the folder the run was started in (:func:`loop.resolve_run`);
data that no longer matches the run's fingerprint is refused (``UsageError``).

The unrolled value of chunk ``i`` is then ``∂L_val(θ_T)/∂w_i`` through the whole
run (sign as ``φ``: negative = up-weighting chunk ``i`` lowers the final
validation loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import loop
from .data import Corpus


class Chunks:
    """A corpus as a lazy ``[N, T]`` int64 tensor: ``chunks[index]`` (``index`` ``[B]``) -> ``[B, T]`` token ids."""

    def __init__(self, corpus: Corpus, device: torch.device) -> None:
        self.corpus, self.device = corpus, device

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: Tensor) -> Tensor:
        return self.corpus.batch(index.cpu()).to(self.device)


def task(run: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"model_fn", "dataset", "val", "optimizer"}`` of the recorded run in ``run`` (see the module docstring).
    ``config``: the trajectory-fixing options of the run that made the recording (its ``spec.json``; a recording
    of another run, copied into this one, is refused: its values were written as this run's, h91)."""
    folder = Path(run)
    cfg = loop.resolve_run(loop.read_config(folder), folder)  # its own data, from any folder
    if config is not None:
        loop.check_recording(cfg, config, str(folder))
    cfg["out"] = str(folder)  # the token cache lies beside the run, wherever it was started from
    setup = loop.prepare(cfg)
    if (folder / "values.pt").is_file():  # the chunks the run trained on, not whatever the paths hold now
        values, saved = loop.saved_run(folder / "values.pt")
        loop.check_values(cfg, saved, str(folder))
        setup.check_data(saved.get("data"), len(values), str(folder))
    val = {"input_ids": setup.val.batch(torch.arange(len(setup.val))).to(setup.device)}
    return {"model_fn": setup.model_fn, "dataset": {"input_ids": Chunks(setup.train, setup.device)}, "val": val,
            "optimizer": setup.opt}
