"""ghostfunc: exact per-sample gradient dot products in one backward pass, over torch.func."""

import torch

from ._capture import DivergentBranchError
from ._direction import DirectionScores, graddot_direction
from ._dist import sampler_mask
from ._graddot import GradDot, graddot, plan
from ._hf import causal_lm_loss, classification_loss, from_module, seq2seq_loss
from ._interact import StateWrittenError
from ._ops import SamplesInteractError
from ._optim import AdamWState, Optimizer, SGDState, adamw, sgd
from ._plan import Plan, Route
from ._reference import reference_graddot
from ._shapley import inrun_shapley
from ._train import StepInfo, TrainState, TrainStep, train_step
from ._unroll import Trajectory, unroll
from ._values import DataValues

__all__ = [
    "DivergentBranchError",
    "GradDot",
    "Plan",
    "Route",
    "SamplesInteractError",
    "StateWrittenError",
    "graddot",
    "plan",
    "reference_graddot",
    "AdamWState",
    "DataValues",
    "Optimizer",
    "SGDState",
    "StepInfo",
    "TrainState",
    "TrainStep",
    "adamw",
    "inrun_shapley",
    "sgd",
    "train_step",
    "from_module",
    "causal_lm_loss",
    "classification_loss",
    "seq2seq_loss",
    "sampler_mask",
    "DirectionScores",
    "graddot_direction",
    "unroll",
    "Trajectory",
   ]
__version__ = "0.1.0"


def _allow_loading() -> None:
    """``torch.load`` (``weights_only=True``, torch's default) reads back what ghostfunc returns and a training
    loop checkpoints: its result and state types are plain containers of tensors and numbers."""
    from ._plan import Route

    torch.serialization.add_safe_globals([GradDot, Plan, Route, DirectionScores, TrainState, StepInfo, SGDState,
                                          AdamWState, DataValues, Trajectory])


_allow_loading()
