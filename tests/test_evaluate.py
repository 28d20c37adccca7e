"""evaluate (tiny setting: it runs, the parts are consistent) and the attribute CLI on a recorded run."""

from __future__ import annotations

import json

import pytest
import torch

import ghostfunc
from ghostfunc import _evaluate as E
from ghostfunc.__main__ import main


def test_per_val_beyond_the_validation_rows_takes_them_all(tmp_path):
    """``--n-val 10`` with the default ``--per-val 50`` raised a shape error after training: every row is taken."""
    result = E.evaluate(models=("logreg",), seeds=(0,), retrains=3, n_train=40, n_val=6, steps=2, per_val=50,
                        random_draws=1, removal=(0.2,), out=tmp_path, log=None)
    assert result.config["per_val"] == 6
    assert all(-1 <= row["lds_per_val"] <= 1 for m, row in result.rows["logreg"].items() if m != "inrun2")


def test_evaluate_runs_tiny(tmp_path):
    result = E.evaluate(models=("mlp", "logreg"), seeds=(0, 1), retrains=4, n_train=60, n_val=30, steps=4, per_val=3,
                        random_draws=1, removal=(0.1, 0.2), out=tmp_path, log=None)
    for model in ("mlp", "logreg"):
        assert set(result.rows[model]) == set(E.METHODS)
        for method, row in result.rows[model].items():
            assert -1 <= row["lds"] <= 1 and 0 <= row["auroc"] <= 1
            assert (method == "inrun2") == (row["lds_per_val"] != row["lds_per_val"])  # NaN only for order 2
        assert set(result.removal[model]) == {f"{s}/{m}" for s in ("clean", "noisy")
                                              for m in ("test_acc", "test_loss", "val_loss")}
        assert set(result.removal[model]["noisy/test_acc"]) == {*E.METHODS, "random", "none"}
        assert result.timing[model]["replay"] > 0
    def strict(token: str) -> None:
        raise AssertionError(f"evaluation.json holds {token}, which strict JSON parsers refuse")

    saved = json.loads((tmp_path / "evaluation.json").read_text(), parse_constant=strict)  # (one seed: no spread,
    assert saved["rows"]["mlp"]["inrun2"]["lds_per_val"] is None and saved["config"]["retrains"] == 4  # null, h56)
    assert (tmp_path / "evaluation.png").stat().st_size > 0
    assert "group LDS" in result.table() and "replay" in result.table()
    assert (tmp_path / "evaluation.md").read_text() == result.table() + "\n"  # (the README names it; h67)


def test_retrain_with_unit_weights_is_the_training_run():
    data = E.digits(0, n_train=40, n_val=10)
    params = E.init_params("mlp", 0)
    opt = ghostfunc.sgd(0.5)
    p, s = params, opt.init(params)
    for _ in range(3):
        g = torch.func.grad(lambda q: E.model_fn(q, data.train).mean())(p)
        p, s = opt.update(g, s, p)
    stacked = E.retrain(params, data.train, torch.ones(2, 40, dtype=E.DT), 3, 0.5)
    assert all(torch.allclose(stacked[k][1], p[k], rtol=0, atol=1e-13) for k in p)


def test_metrics_match_scipy_and_sklearn():
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, generator=g, dtype=E.DT), torch.randn(30, generator=g, dtype=E.DT)
    assert E.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    pos = torch.rand(30, generator=g) < 0.3
    assert E.auroc(a, pos) == pytest.approx(roc_auc_score(pos.numpy(), a.numpy()), abs=1e-12)
    w = E.subset_weights(10, 3, g)
    assert torch.equal((w > 0).sum(1), torch.full((3,), 5)) and torch.allclose(w.sum(1), torch.full((3,), 10.0, dtype=E.DT))


def test_evaluate_bad_input():
    with pytest.raises(ValueError, match="evaluate: models must be a non-empty subset"):
        E.evaluate(models=("cnn",), log=None)
    with pytest.raises(ValueError, match="evaluate: retrains must be >= 3"):
        E.evaluate(retrains=2, log=None)
    # no label flipped (0.01 of 40 rounds to 0): every noisy-label AUROC was NaN, shown as "-" without a word
    with pytest.raises(ValueError, match=r"^evaluate: noise must flip at least one training label and leave one: "
                                         r"round\(noise \* n_train\) in \[1, 39\]; got noise=0.01 of n_train=40, "
                                         r"0 flipped"):
        E.evaluate(noise=0.01, n_train=40, log=None)


def test_attribute_cli_on_a_recorded_run(tmp_path, capsys):
    """Record a minibatch run of the digits MLP with train_step, save it, attribute it from the command line."""
    kwargs = {"model": "mlp", "seed": 1, "n_train": 30, "n_val": 10}
    task = E.digits_task(**kwargs)
    params, opt = E.init_params("mlp", 1), ghostfunc.sgd(0.3, 0.9)
    step = ghostfunc.train_step(task["model_fn"], opt)
    state = step.init(params)
    traj = ghostfunc.Trajectory.start(state, every=2)
    g = torch.Generator().manual_seed(2)
    idx = [torch.randint(0, 30, (8,), generator=g) for _ in range(5)]  # rows recur across steps
    val = {**task["val"], "index": torch.arange(10)}
    for i in idx:
        batch = {**{k: v[i] for k, v in task["dataset"].items()}, "index": i}
        state, _ = step(state, batch, val)
        traj.record(i, state)
    spec = {"factory": "ghostfunc._evaluate:digits_task", "kwargs": kwargs,
            "optimizer": {"name": "sgd", "lr": 0.3, "momentum": 0.9}}
    traj.save(tmp_path / "run" / "trajectory", spec=spec)
    assert main(["attribute", "--run", str(tmp_path / "run")]) == 0
    assert "highest-valued (harmful where positive):" in capsys.readouterr().out
    saved = ghostfunc.DataValues.load(tmp_path / "run" / "trajectory" / "unrolled.pt")
    direct = ghostfunc.unroll(task["model_fn"], opt, params, traj.batches(task["dataset"]), task["val"], size=30)
    assert torch.allclose(saved.total, direct.total, rtol=1e-10, atol=1e-15)
    assert torch.equal(saved.count, direct.count)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--seeds", "0"], "--seeds: expected an integer >= 1; got 0"),
    (["evaluate", "--n-train", "0"], "--n-train: expected an integer >= 2; got 0"),
    (["evaluate", "--retrains", "2"], "--retrains: expected an integer >= 3; got 2"),
    (["evaluate", "--noise", "1"], "--noise: expected a finite number in (0, 1); got 1.0"),
    (["evaluate", "--lr", "nan"], "--lr: expected a finite number > 0; got nan"),
    (["evaluate", "--n-train", "1700"], "--n-train/--n-val: n_train + n_val must leave test rows out"),
    (["demo", "--batch-size", "0"], "--batch-size: expected an integer >= 1; got 0"),
    (["demo", "--lr", "-1"], "--lr: expected a finite number > 0; got -1.0"),
    (["demo", "--hidden", "0"], "--hidden: expected an integer >= 1; got 0"),
    (["demo", "--epochs", "0"], "--epochs: expected an integer >= 1; got 0"),
    (["demo", "--flip", "1"], "--flip: expected a finite number in (0, 1); got 1.0"),
])
def test_cli_numbers_out_of_range_are_one_line_errors(args, message, capsys, tmp_path):
    """A flag outside its range is argparse's one-line error naming it (exit code 2), not a traceback from deep
    inside (an IndexError for --seeds 0, a ZeroDivisionError for --batch-size 0), and nothing is written."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_the_computation(tmp_path, capsys) -> None:
    """``--out`` naming a file failed with a traceback after the whole computation, and its results were lost."""
    import pytest

    from ghostfunc._evaluate import main

    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["--models", "mlp", "--seeds", "1", "--retrains", "3", "--out", str(taken)])
    assert stop.value.code == 2
    assert f"--out: expected a folder it can write; {str(taken)!r} is a file" in capsys.readouterr().err
