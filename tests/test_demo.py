"""``python -m ghostfunc demo``: runs with its defaults, writes values.csv and values.png, prints the figures."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from ghostfunc import _demo


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return _demo.run(["--out", str(out), "--quiet"]), out


def test_default_run_figures(default_run, capsys):
    figures, _ = default_run
    # seeded and single-threaded, so these are stable; the values must beat chance clearly,
    # and the second order (curvature) must add to the first
    assert figures["test_acc"] > 0.9
    assert figures["auroc_order1"] > 0.6
    assert figures["auroc_order2"] > figures["auroc_order1"] + 0.05
    assert figures["auroc_final_loss"] > 0.95
    assert 0 < figures["spearman_order1_order2"] < 1
    assert figures["seconds"] < 60
    # Shapley efficiency over training: the second-order values track the real validation-loss change better
    assert abs(figures["sum_order2"] - figures["val_loss_change"]) < abs(figures["sum_order1"] - figures["val_loss_change"])


def test_default_run_outputs(default_run):
    figures, out = default_run
    assert sorted(p.name for p in out.iterdir()) == ["values.csv", "values.png"]
    assert (out / "values.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "values.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(figures["phi1"]) == 1197
    assert list(rows[0]) == ["index", "label", "true_label", "flipped", "value_order1", "value_order2", "steps_seen",
                             "final_train_loss", "mean_train_loss"]
    assert [int(r["index"]) for r in rows] == list(range(1197))
    flipped = [r for r in rows if r["flipped"] == "1"]
    assert len(flipped) == 120 and all(r["label"] != r["true_label"] for r in flipped)
    assert all(r["label"] == r["true_label"] for r in rows if r["flipped"] == "0")
    torch.testing.assert_close(torch.tensor([float(r["value_order2"]) for r in rows], dtype=torch.float64),
                               figures["phi2"], rtol=1e-8, atol=0)


def test_auroc_and_spearman_match_sklearn_scipy():
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(200, generator=g) < 0.2
    score = torch.randint(0, 30, (200,), generator=g).double() + labels * 5.0  # ties included
    other = score + torch.randn(200, generator=g, dtype=torch.float64) * 10
    assert abs(_demo.auroc(labels, score) - roc_auc_score(labels.numpy(), score.numpy())) < 1e-12
    assert abs(_demo.spearman(score, other) - spearmanr(score.numpy(), other.numpy())[0]) < 1e-12


def test_command_line_entry(tmp_path):
    """The module entry point dispatches ``demo`` with its arguments (a short run)."""
    res = subprocess.run([sys.executable, "-m", "ghostfunc", "demo", "--epochs", "1", "--no-plot", "--quiet",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Finding the flipped labels (AUROC" in res.stdout and "Most harmful" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["values.csv"]


def test_torchrun_two_processes_equal_one(tmp_path):
    """``torchrun --nproc-per-node 2 -m ghostfunc demo``: every batch split over two gloo processes, values
    summed across them; rank 0 retrains in one process and prints the largest difference (float32 rounding)."""
    import os
    import re
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
                          "-m", "ghostfunc", "demo", "--epochs", "1", "--no-plot", "--quiet", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    found = re.search(r"2 processes against one: largest difference of the values (\S+) \(largest value (\S+);"
                      r".*counts equal: True", res.stdout)
    assert found, res.stdout
    diff, scale = float(found.group(1)), float(found.group(2))
    assert diff <= 1e-5 * scale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["values.csv"]


@pytest.mark.parametrize("extra, message", [
    (["--out", "{tmp}/afile"], "--out: expected a folder for values.csv and values.png; '{tmp}/afile' is a file"),
    (["--batch-size", "2000"], "--batch-size: expected at most the 1197 training rows; got 2000"),
    (["--lr", "1e30"], "--lr: expected finite losses; the run diverged at --lr 1e+30"),
])
def test_bad_options_are_one_line_before_or_during_the_run(extra, message, tmp_path, capsys):
    """An --out naming a file failed after the whole run (FileExistsError), a batch larger than the training rows
    raised UnboundLocalError, a learning rate that diverges a FloatingPointError traceback."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as info:
        _demo.run(["--epochs", "1", "--no-plot", "--quiet", "--out", str(tmp_path / "out"),
                   *[e.format(tmp=tmp_path) for e in extra]])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m ghostfunc demo: error: " + message.format(tmp=tmp_path)), last
    assert (tmp_path / "afile").read_text() == "x"
