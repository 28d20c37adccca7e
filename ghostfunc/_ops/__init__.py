"""The dispatch table: every torch call ghostfunc recognises, and its rule.

One file per kernel family; this is the only place they are gathered. A call not
in this table that touches a trainable parameter sends that parameter to the
exact per-sample fallback.
"""

from __future__ import annotations

from collections.abc import Callable

from . import broadcast, conv, embedding, linear, norm
from ._base import Direct, Factored, Grad, Match, Rule, recognise, sum_to
from .norm import SamplesInteractError

EXACT: dict[Callable, Callable] = {**embedding.EXACT, **norm.EXACT}
TABLE: dict[Callable, Rule] = {**linear.TABLE, **embedding.TABLE, **norm.TABLE, **conv.TABLE, **broadcast.TABLE}

__all__ = ["EXACT", "TABLE", "Direct", "Factored", "Grad", "Match", "Rule", "SamplesInteractError", "recognise",
           "sum_to"]
