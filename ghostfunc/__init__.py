"""ghostfunc: exact per-sample gradient dot products in one backward pass, over torch.func."""

from ._graddot import GradDot, graddot, plan
from ._plan import Plan, Route
from ._reference import reference_graddot

__all__ = ["GradDot", "Plan", "Route", "graddot", "plan", "reference_graddot"]
__version__ = "0.1.0"
