"""The cost model's constants: fixed by default, measured once per device on request (GHOSTFUNC_COSTS), never changing a number."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ghostfunc
from ghostfunc import _calibrate, _plan

F64 = torch.float64


def test_override_parses_and_skips_the_measurement(monkeypatch):
    monkeypatch.delenv(_calibrate.ENV, raising=False)
    assert _calibrate.constants(torch.device("cpu"), F64) == _calibrate.DEFAULT
    monkeypatch.setenv(_calibrate.ENV, "default")
    assert _calibrate.constants(torch.device("cpu"), F64) == _calibrate.DEFAULT
    monkeypatch.setenv(_calibrate.ENV, "materialise=50, gram=7.5")
    assert _calibrate.constants(torch.device("cpu"), F64) == (50.0, 7.5, "env")
    monkeypatch.setenv(_calibrate.ENV, "gram=3")
    assert _calibrate.constants(torch.device("cpu"), F64) == (_calibrate.DEFAULT.materialise, 3.0, "env")


@pytest.mark.parametrize(("text", "match"), [("speed=3", r"^GHOSTFUNC_COSTS: expected 'default', 'measure' or"),
                                             ("gram=fast", r"^GHOSTFUNC_COSTS: gram must be a number; got 'fast'")])
def test_override_errors(text, match):
    with pytest.raises(ValueError, match=match):
        _calibrate.parse(text)


def test_measured_once_per_process_and_in_range(monkeypatch):
    monkeypatch.setenv(_calibrate.ENV, "measure")
    monkeypatch.setattr(_calibrate, "_MEASURED", {})
    first = _calibrate.constants(torch.device("cpu"), torch.float32)
    assert first.source == "measured"
    assert all(math.isfinite(v) and _calibrate.LIMITS[0] <= v <= _calibrate.LIMITS[1] for v in first[:2])
    assert _calibrate.constants(torch.device("cpu"), torch.float32) is first  # cached, not re-measured


def test_costs_without_constants_use_the_fixed_ones():
    fixed = _plan.costs(4, 3, 5, 6, 7, 8, False, True)
    assert fixed == _plan.costs(4, 3, 5, 6, 7, 8, False, True, _calibrate.DEFAULT)
    assert fixed != _plan.costs(4, 3, 5, 6, 7, 8, False, True, _calibrate.Constants(1.0, 1.0, "env"))


def test_constants_move_the_route_never_the_scores(monkeypatch):
    """A cheap Gram makes auto's cost model pick ghost, a cheap materialisation picks materialise; same scores."""
    monkeypatch.setenv(_calibrate.ROUTING_ENV, "model")  # the cost model alone, not the race at first use
    g = torch.Generator().manual_seed(0)
    params = {"W": torch.randn(16, 16, generator=g, dtype=F64)}

    def model_fn(p, x):
        return F.linear(x, p["W"]).tanh().pow(2).sum((1, 2))

    train, val = torch.randn(3, 4, 16, generator=g, dtype=F64), torch.randn(2, 4, 16, generator=g, dtype=F64)
    out = {}
    for text in ("materialise=2000,gram=1", "materialise=1,gram=2000"):
        monkeypatch.setenv(_calibrate.ENV, text)
        out[text] = ghostfunc.graddot(model_fn, params, train, val)
    paths = [o.plan.routes["W"].path for o in out.values()]
    assert paths == ["ghost", "materialize"]
    a, b = out.values()
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=0)
