"""Smoke test: every benchmark script runs on a tiny shape and writes its outputs (no timed assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

# Opacus installs an unrelated top-level package named ``benchmarks``: make sure ours is the one imported.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not str(getattr(sys.modules.get("benchmarks"), "__file__", ROOT)).startswith(str(ROOT)):
    del sys.modules["benchmarks"]

from benchmarks import _common, headline, longseq, mlp2d, sweep  # noqa: E402


def _outputs(out: Path, stem: str, png: bool = True) -> dict:
    for ext in ("json", "md", *(("png",) if png else ())):
        assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext} missing"
    return json.loads((out / f"{stem}.json").read_text())


def test_headline_tiny(tmp_path: Path) -> None:
    payload = headline.main(["--tiny", "--out", str(tmp_path)])
    got = _outputs(tmp_path, "headline")
    assert set(got["results"]) >= {"plain", "plain+optim", *(f"graddot/{p}" for p in _common.POLICIES),
                                   "naive loop", "vmap(grad)"}
    assert got["results"]["graddot/auto"]["memory"].get("step_mib") is not None  # the peak subprocess ran
    assert [g["goal"] for g in payload["goals"]][0].startswith("graddot")


def test_headline_llama_tiny(tmp_path: Path) -> None:
    headline.main(["--tiny", "--model", "llama", "--memory", "none", "--contenders", "graddot/auto",
                   "--out", str(tmp_path)])
    assert "graddot/auto" in _outputs(tmp_path, "headline_llama")["results"]


def test_sweep_tiny(tmp_path: Path) -> None:
    got = sweep.main(["--tiny", "--peers", "--out", str(tmp_path)])
    assert len(got["points"]) == 2 and "graddot/contract" in got["points"][0]["results"]
    _outputs(tmp_path, "sweep_gpt2_T")


def test_mlp2d_tiny(tmp_path: Path) -> None:
    got = mlp2d.main(["--tiny", "--out", str(tmp_path)])
    assert len(got["cells"]) == 4
    assert all(mlp2d.HAND in c["ratios"] and all(k in c["ratios"] for k in mlp2d.COMPILED) for c in got["cells"])
    _outputs(tmp_path, "mlp2d")


def test_hand_written_floor_gives_graddots_numbers() -> None:
    """The mlp2d floor (the same computation by hand for the token-wise MLP) is graddot, number for number."""
    import ghostfunc

    for t in (1, 3):
        s = _common.build(_common.Config(model="mlp", T=t, width=8, d_in=5, n_train=4, n_val=3, dtype="float64"))
        scores, per_param, train_grad, losses = _common.make(mlp2d.HAND, s, _common.Options())()
        ref = ghostfunc.graddot(s.model_fn, s.params, s.train, s.val)
        assert (scores - ref.scores).abs().max() <= 1e-12 * ref.scores.abs().max()
        for k in s.params:
            assert (per_param[k] - ref.per_param[k]).abs().max() <= 1e-12 * ref.scores.abs().max(), k
            assert (train_grad[k] - ref.train_grad[k]).abs().max() <= 1e-12 * ref.train_grad[k].abs().max(), k
        assert (losses[:4] - ref.train_loss).abs().max() <= 1e-12


def test_longseq_tiny(tmp_path: Path) -> None:
    got = longseq.main(["--tiny", "--memory", "none", "--out", str(tmp_path)])
    assert got["goal"]["measured"] is None  # no memory measured in this run
    _outputs(tmp_path, "longseq", png=False)


def test_dots_match_the_reference() -> None:
    """The peers' dot products (``_common.dots``) agree with ghostfunc's reference."""
    import torch

    import ghostfunc

    s = _common.build(_common.Config(model="mlp", T=3, width=8, d_in=4, n_train=3, n_val=2, dtype="float64"))
    for name in ("vmap(grad)", "opacus"):
        if name not in _common.available([name]):
            continue
        ref, _, _ = ghostfunc.reference_graddot(s.model_fn, s.params, s.train, s.val)
        got = _common.make(name, s, _common.Options())()
        torch.testing.assert_close(got, ref)
