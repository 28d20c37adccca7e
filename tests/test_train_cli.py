"""``ghostfunc train`` / ``ghostfunc select`` through the real CLI: a CI-sized run, resume, bad input, many processes."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import ghostfunc  # noqa: E402
from ghostfunc.__main__ import main  # noqa: E402
from ghostfunc._run import cli, data, loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: A few steps of the tiny preset on a small corpus (what every test here runs).
SMALL = ["--seq-len", "32", "--batch-size", "4", "--val-batch-size", "4", "--eval-every", "4", "--log-every", "2",
         "--eval-batch-size", "16", "--warmup", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Training files (three sources of different kinds), a validation folder, a test file, and token files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "train" / "sub").mkdir(parents=True)
    (root / "train" / "mail.py").write_text("def header(msg):\n    return msg['Subject'].lower()\n" * 12)
    (root / "train" / "sub" / "numbers.txt").write_text(" ".join(str(i * 7919 % 1000) for i in range(120)))
    (root / "train" / "prose.md").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (root / "train" / "blob.dat").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    (root / "val").mkdir()
    (root / "val" / "a.py").write_text("def subject(message):\n    return message['Subject']\n" * 4)
    (root / "test.py").write_text("def sender(message):\n    return message['From']\n" * 4)
    np.arange(2000, dtype=np.uint16).__mod__(200).astype(np.uint16).tofile(root / "train.bin")
    np.arange(400, dtype=np.uint16).__mod__(150).astype(np.uint16).tofile(root / "val.bin")
    return {"train": root / "train", "val": root / "val", "test": root / "test.py",
            "train_bin": root / "train.bin", "val_bin": root / "val.bin", "root": root}


def _args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--train", str(corpus["train"]), "--val", str(corpus["val"]), "--test", str(corpus["test"]),
            "--out", str(out), *SMALL, *extra]


def test_run_writes_values_metrics_and_report(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.toml"
    config.write_text('steps = 6\nlr = 3e-3\n"save-every" = 3\n')  # the same keys as the options, either spelling
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--config", str(config))) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "most helpful sources" in printed
    assert "(1 file skipped: 1 binary)" in captured.err  # blob.dat is not dropped silently
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 6 and saved["lr"] == 3e-3 and saved["save_every"] == 3
    values, state = ghostfunc.DataValues.load(out / "values.pt", with_state=True)  # type: ignore[misc]
    assert state["train"].step == 6 and values.steps == 6
    assert int(values.count.sum()) == 6 * 4  # every row of every step landed on its chunk
    train = data.load(str(corpus["train"]), seq_len=32, cache=tmp_path / ".ghostfunc-cache", option="--train")
    assert train.sources == ("mail.py", "prose.md", "sub/numbers.txt") and len(values) == len(train)
    rows = list(csv.DictReader((out / "values.csv").read_text().splitlines()))
    assert len(rows) == int((values.count > 0).sum())
    for r in rows:  # value = −Σφ; the source is the chunk's file
        i = int(r["chunk"])
        assert float(r["value"]) == pytest.approx(-float(values.total[i, 0]), rel=1e-12)
        assert int(r["times_seen"]) == int(values.count[i]) and r["source"] == train.sources[train.source[i]]
    sources = list(csv.DictReader((out / "sources.csv").read_text().splitlines()))
    assert sum(int(s["chunks_seen"]) for s in sources) == len(rows)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 4, 6]
    assert all(set(m) <= {"step", "train_loss", "val_loss", "test_loss", "lr", "tokens_per_s", "seconds"} for m in metrics)
    assert "val_loss" in metrics[-1] and "test_loss" in metrics[-1] and metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert all(isinstance(v, float | int) for m in metrics for v in m.values())  # figures only, never inputs
    report = (out / "report.md").read_text()
    assert "## Most helpful chunks" in report and "report.png" in report and "(1 file skipped: 1 binary)" in report
    assert (out / "report.png").stat().st_size > 10_000

    sel = tmp_path / "sel"
    assert main(["select", "--run", str(out), "--out", str(sel), "--seeds", "2", "--steps", "2", "--no-progress",
                 "--threads", "1"]) == 0
    got = json.loads((sel / "select.json").read_text())
    assert set(got["results"]) == {"top-valued", "random", "low-loss", "all seen"}
    assert all(len(v) == 2 and "test_loss" in v[0] for v in got["results"].values())
    assert "| top-valued |" in (sel / "select.md").read_text()



def test_select_report_says_which_split_and_how_many_seeds() -> None:
    """``select.md`` of a run without a test split said the test split was never scored against (the losses were on
    the validation split the values came from), and one seed showed "± 0.0000", a spread it does not have."""
    from ghostfunc._run import select

    def payload(seeds: int, test: bool) -> dict:
        keys = ("test_loss", "val_loss") if test else ("val_loss",)
        results = {arm: [{k: 2.0 + 0.1 * s for k in keys} for s in range(seeds)] for arm in select.ARMS}
        return {"pool": 8, "steps": 2, "fraction": 0.5, "seeds": seeds, "results": results,
                "summary": select.summarize(results)}

    cfg = {"train": "corpus", "val": "val/", "target": "x"}
    both = select.markdown(payload(2, True), cfg)
    assert "The test split was never scored against" in both and " ± " in both and "2 seeds" in both
    alone = select.markdown(payload(1, False), cfg)
    assert "no test split" in alone and "favour the selection" in alone and "never scored" not in alone
    assert " ± " not in alone and "one seed (no spread)" in alone and "| val loss |" in alone
    quarter = select.markdown({**payload(1, False), "fraction": 0.25}, cfg)
    assert quarter.startswith("# ghostfunc select: retraining on 25% of 8 seen chunks")  # ("halves", h72)

def test_a_run_stopped_early_says_so(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Stopped with --stop-at between evaluations, the summary read as a finished run's, its last validation loss an
    earlier step's without saying which (h72)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "3", "--eval-every", "2")) == 0
    said = capsys.readouterr().out
    assert "ghostfunc train: 3 of 4 steps (stopped early) in " in said and " (at step 2) on " in said, said
    assert "3 of 4 steps (stopped early)" in (out / "report.md").read_text()


def test_resume_equals_uninterrupted(corpus: dict[str, Path], tmp_path: Path) -> None:
    """A run stopped after step 8 and resumed to 12 ends with the values and parameters of a 12-step run."""
    common = ("--steps", "12", "--save-every", "5", "--order", "2", "--record-every", "4")
    assert main(_args(corpus, tmp_path / "whole", *common)) == 0
    assert main(_args(corpus, tmp_path / "cut", *common, "--stop-at", "8")) == 0
    _, mid = ghostfunc.DataValues.load(tmp_path / "cut" / "values.pt", with_state=True)  # type: ignore[misc]
    assert mid["train"].step == 8
    assert main(_args(corpus, tmp_path / "cut", *common, "--resume")) == 0
    a, sa = ghostfunc.DataValues.load(tmp_path / "whole" / "values.pt", with_state=True)  # type: ignore[misc]
    b, sb = ghostfunc.DataValues.load(tmp_path / "cut" / "values.pt", with_state=True)  # type: ignore[misc]
    assert torch.equal(a.total, b.total) and torch.equal(a.count, b.count) and a.steps == b.steps == 12
    assert sa["train"].step == sb["train"].step == 12
    for k, p in sa["train"].params.items():
        assert torch.equal(p, sb["train"].params[k]), k
    logged = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in logged]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # nothing logged twice
    seconds = [m["seconds"] for m in logged]
    assert seconds == sorted(seconds)  # the clock goes on across the resume (h72: it began at 0 again)
    ta, tb = (ghostfunc.Trajectory.load(tmp_path / d / "trajectory") for d in ("whole", "cut"))  # what attribute replays
    assert ta.steps == tb.steps == 12 and ta.every == tb.every == 4
    assert all(torch.equal(x, y) for x, y in zip(ta.indices, tb.indices, strict=True))
    assert torch.equal(torch.bincount(torch.cat(ta.indices), minlength=len(a)), a.count)
    assert sorted(ta.checkpoints) == sorted(tb.checkpoints) == [0, 4, 8]
    for t, (pa, sta) in ta.checkpoints.items():  # params and AdamW state before step t, the same either way
        pb, stb = tb.checkpoints[t]
        assert all(torch.equal(v, pb[k]) for k, v in pa.items()), t
        leaves = zip(torch.utils._pytree.tree_leaves(sta), torch.utils._pytree.tree_leaves(stb), strict=True)
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in leaves), t
    assert all(torch.equal(v, mid["train"].params[k]) for k, v in tb.checkpoints[8][0].items())  # the interrupted run's
    assert all(torch.equal(v, sa["train"].params[k]) for k, v in tb.final.items())
    spec = json.loads((tmp_path / "cut" / "trajectory" / "spec.json").read_text())
    assert spec["factory"] == "ghostfunc._run.attribution:task" and spec["kwargs"]["run"] == str((tmp_path / "cut").resolve())
    assert spec["kwargs"]["config"] == loop.fingerprint(json.loads((tmp_path / "cut" / "config.json").read_text()))


def _bad_inputs(c: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.bin").write_bytes(b"")
    (tmp / "odd.bin").write_bytes(b"\1\2\3")
    (tmp / "emptydir").mkdir()
    (tmp / "emptydir.bin").mkdir()
    (tmp / "latin1.toml").write_bytes("steps = 2 # d\xe9j\xe0\n".encode("latin-1"))
    (tmp / "twice.toml").write_text('batch-size = 4\nbatch_size = 8\n')
    huge = np.arange(400, dtype=np.uint32)
    huge[7] = 4_000_000_000
    huge.tofile(tmp / "huge32.bin")
    (tmp / "afile").write_text("a file, not a folder")
    t, v = ["--train", str(c["train"])], ["--val", str(c["val"])]
    return [
        (["--train", str(tmp / "missing.bin"), *v], "--train: expected an existing token file"),
        (["--train", str(tmp / "empty.bin"), *v], "--train: expected a non-empty token file"),
        (["--train", str(tmp / "odd.bin"), *v], "--train: expected a flat uint16 token file"),
        (["--train", str(tmp / "emptydir"), *v], "--train: expected a token file"),
        (["--train", str(c["train_bin"]), "--val", str(c["val_bin"]), "--vocab-size", "100"],
         "--vocab-size: expected token ids below the model's vocabulary 100"),
        ([*t, *v, "--model", str(c["root"])], "--model: expected a local Hugging Face causal-LM folder"),
        ([*t, *v, "--model", "pythia"], "--model: expected one of gpt2, llama, neox"),
        ([*t, *v, "--seq-len", "4096", "--val-batch-size", "1", "--batch-size", "1"], "--seq-len: expected at most 1024"),
        ([*t, *v, "--batch-size", "500"], "--batch-size: expected at most the training chunks"),
        ([*t, *v, "--dtype", "bf16"], "argument --dtype: invalid choice"),
        ([*t, *v, "--precondition", "--order", "2"], "--precondition: expected --order 1"),
        ([*t, *v, "--config", str(tmp / "nope.toml")], "--config: expected an existing TOML file"),
        (["--target", "no_such_package"], "--target: expected a package or module of the standard library"),
        (["--target", "/etc"], "--target: expected the name of a package or module of the standard library"),
        (["--target", ""], "--target: expected the name of a package or module of the standard library"),
        ([*t, *v, "--seq-len", "1"], "--seq-len: expected an integer >= 2; got 1"),
        ([*t, *v, "--dtype", "float16"], "--dtype: float16 parameters need --optimizer sgd"),  # AdamW: NaN at step 2
        ([*t, *v, "--config", str(tmp)], f"--config: expected a TOML file; {str(tmp)!r} is a folder"),
        ([*t, *v, "--config", str(tmp / "latin1.toml")], "--config: expected a UTF-8 TOML file"),
        ([*t, *v, "--config", str(tmp / "twice.toml")], "sets 'batch-size' and 'batch_size', the same option; keep one"),
        (["--train", str(tmp / "huge32.bin"), "--val", str(c["val_bin"]), "--token-dtype", "uint32"],
         "--train: expected token ids below 1,048,576 (the largest vocabulary taken from the data; --vocab-size sets a "
         "larger one); it holds id 4,000,000,000: is --token-dtype uint32 the dtype the file was written with?"),
        (["--train", str(c["train_bin"]), "--val", str(c["val_bin"]), "--token-dtype", "uint32"],  # uint16 read as uint32
         "--train: expected token ids below 1,048,576"),
        ([*t, *v, "--out", str(tmp / "afile" / "run")], f"--out: expected a folder it can write; {str(tmp / 'afile')!r} is a file"),
        ([*t, *v, "--out", str(tmp / "afile")], f"--out: expected a new or empty folder (or --resume); "
                                                f"{str(tmp / 'afile')!r} is a file"),  # ("already holds files" before)
        ([*t, *v, "--out", str(c["train"] / "run")], "--out: expected a folder outside --train"),  # its files become data
        (["--train", "", *v], "--train: expected 'stdlib', a token file *.bin, a folder, a glob or a text file; got an "
                              "empty string"),  # (an unset shell variable: the current folder was read)
        (["--train", str(tmp / "emptydir.bin"), *v], f"--train: expected an existing token file; "
                                                     f"{str(tmp / 'emptydir.bin')!r} is a folder"),
        ([*t, "--val", str(c["root"] / "val"), "--out", str(c["root"] / "val" / "sub" / "run")], "--out: expected a folder outside --val"),
        (["--train", str(c["train"] / "**" / "*.json"), *v, "--out", str(c["train"] / "sub" / "run")],
         "--out: expected a folder outside --train"),  # a glob that would take config.json
        *([] if torch.cuda.is_available() else [([*t, *v, "--device", "cuda"], "--device: expected a machine with CUDA")]),
        ([*t, *v, "--val-limit", "1", "--val-batch-size", "2"],  # (the limit that made the chunks few, named: h72)
         "--val-batch-size: expected at most the validation chunks (1, --val-limit 1 of them); got 2"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(corpus: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    for extra, message in _bad_inputs(corpus, tmp_path):
        out = tmp_path / "out"
        argv = ["train", "--out", str(out), *SMALL, *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ghostfunc train: error: ") and message in err[-1], (extra, err)
        assert not out.exists() and not (corpus["train"] / "run").exists(), extra


#: Out-of-range numeric options (train): (extra arguments, the one-line message after ``ghostfunc train: error: ``).
BAD_NUMBERS = [
    (["--lr", "-1"], "--lr: expected a finite number >= 0; got -1.0"),  # the value given, not the warm-up-scaled one
    (["--lr", "nan"], "--lr: expected a finite number >= 0; got nan"),
    (["--lr", "inf"], "--lr: expected a finite number >= 0; got inf"),
    (["--lr", "1e400"], "--lr: expected a finite number >= 0; got inf"),
    (["--optimizer", "sgd", "--momentum", "-1"], "--momentum: expected a finite number in [0, 1]; got -1.0"),
    (["--optimizer", "sgd", "--momentum", "1.5"], "--momentum: expected a finite number in [0, 1]; got 1.5"),  # diverges
    (["--momentum", "nan"], "--momentum: expected a finite number in [0, 1]; got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay: expected a finite number >= 0; got -0.1"),
    (["--weight-decay", "inf"], "--weight-decay: expected a finite number >= 0; got inf"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio: expected a finite number in [0, 1]; got 2.0"),
    (["--min-lr-ratio", "-0.5"], "--min-lr-ratio: expected a finite number in [0, 1]; got -0.5"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio: expected a finite number in [0, 1]; got nan"),
    (["--warmup", "-3"], "--warmup: expected an integer >= 0; got -3"),
    (["--val-limit", "-1"], "--val-limit: expected an integer >= 0; got -1"),
    (["--save-every", "-1"], "--save-every: expected an integer >= 0; got -1"),
    (["--steps", "0"], "--steps: expected an integer >= 1; got 0"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1; got 0"),
    (["--val-batch-size", "-4"], "--val-batch-size: expected an integer >= 1; got -4"),
    (["--eval-every", "0"], "--eval-every: expected an integer >= 1; got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size: expected an integer >= 1; got 0"),
    (["--log-every", "0"], "--log-every: expected an integer >= 1; got 0"),
    (["--seq-len", "0"], "--seq-len: expected an integer >= 2; got 0"),
    (["--seq-len", "1"], "--seq-len: expected an integer >= 2; got 1"),  # no next token to predict: every loss 0
    (["--vocab-size", "-1"], "--vocab-size: expected an integer >= 0; got -1"),
    (["--stop-at", "-2"], "--stop-at: expected an integer >= 0; got -2"),
    (["--record-every", "-1"], "--record-every: expected an integer >= 0; got -1"),
    (["--threads", "-1"], "--threads: expected an integer >= 0; got -1"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]; got -1"),
    (["--seed", str(2**64)], f"--seed: expected an integer in [0, 4294967295]; got {2**64}"),
]


@pytest.mark.parametrize("extra, message", BAD_NUMBERS, ids=[" ".join(e) for e, _ in BAD_NUMBERS])
def test_bad_numbers_one_line_exit_2_nothing_written(extra: list[str], message: str, corpus: dict[str, Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(_args(corpus, out, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"ghostfunc train: error: {message}"] and captured.out == ""
    assert not out.exists()
    out.mkdir()  # an empty --out stays empty
    assert main(_args(corpus, out, *extra)) == 2
    assert capsys.readouterr().err.splitlines() == [f"ghostfunc train: error: {message}"]
    assert list(out.iterdir()) == []


def test_bad_numbers_from_a_config_file_and_every_numeric_option_has_a_range(corpus: dict[str, Path], tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.toml"
    for text, message in [("lr = nan\n", "--lr: expected a finite number >= 0; got nan"),
                          ("min_lr_ratio = 1.5\n", "--min-lr-ratio: expected a finite number in [0, 1]; got 1.5"),
                          ("weight-decay = -inf\n", "--weight-decay: expected a finite number >= 0; got -inf"),
                          ("val-limit = -1\n", "--val-limit: expected an integer >= 0; got -1")]:  # not in SMALL
        config.write_text(text)
        assert main(_args(corpus, tmp_path / "out", "--config", str(config))) == 2, text
        assert capsys.readouterr().err.splitlines() == [f"ghostfunc train: error: {message}"]
        assert not (tmp_path / "out").exists()
    for table, ranges in ((cli.TRAIN_OPTIONS, cli.TRAIN_RANGES), (cli.SELECT_OPTIONS, cli.SELECT_RANGES)):
        numeric = {k for k, (d, _) in table.items() if isinstance(d, int | float) and not isinstance(d, bool)}
        assert numeric - set(cli.CHOICES) == set(ranges), numeric ^ set(ranges)
        for name, rng in ranges.items():  # every default is in its own range
            assert rng.holds(table[name][0]), name
    from ghostfunc._run import loop

    cfg = {k: d for k, (d, _) in cli.TRAIN_OPTIONS.items()}  # a dict that did not come through the CLI
    with pytest.raises(data.UsageError, match=r"^--warmup: expected an integer >= 0; got -1$"):
        loop.prepare({**cfg, "warmup": -1, "out": str(tmp_path / "p")})
    with pytest.raises(data.UsageError, match=r"^--lr: expected a finite number >= 0; got 'fast'$"):
        loop.prepare({**cfg, "lr": "fast", "out": str(tmp_path / "p")})
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0"], "--seeds: expected an integer >= 1; got 0"),
    (["--fraction", "0"], "--fraction: expected a finite number in (0, 1]; got 0.0"),
    (["--fraction", "1.5"], "--fraction: expected a finite number in (0, 1]; got 1.5"),
    (["--fraction", "nan"], "--fraction: expected a finite number in (0, 1]; got nan"),
    (["--steps", "-1"], "--steps: expected an integer >= 0; got -1"),
    (["--threads", "-2"], "--threads: expected an integer >= 0; got -2"),
])
def test_select_bad_numbers(extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sel"
    assert main(["select", "--run", str(tmp_path / "nothing"), "--out", str(out), *extra]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ghostfunc select: error: {message}"]
    assert not out.exists()


def test_config_and_resume_mismatch(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 4\n")
    assert main(_args(corpus, tmp_path / "x", "--config", str(bad))) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "x").exists()
    bad.write_text('steps = "many"\n')
    assert main(_args(corpus, tmp_path / "x", "--config", str(bad))) == 2
    assert "key 'steps' expected int" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(_args(corpus, out, "--steps", "4", "--lr", "0.01", "--resume")) == 2
    assert "--resume: expected the options of the run" in capsys.readouterr().err
    assert main(_args(corpus, out, "--steps", "4")) == 2  # a fresh run refuses a used folder
    assert "--out: expected a new or empty folder" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_resume_takes_the_same_run_spelt_another_way(corpus: dict[str, Path], tmp_path: Path) -> None:
    """--resume refused the run it continues when a path was spelt another way (a trailing slash, through a symbolic
    link), --device auto against the cpu it picked, or another --eval-batch-size (which moves no step)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "1", "--device", "auto")) == 0
    train = str(corpus["train"])
    link = tmp_path / "link"
    link.symlink_to(Path(train).parent, target_is_directory=True)
    for stop, extra in ((2, ["--train", train + "/"]), (3, ["--train", str(link / "train")]),
                        (4, ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--eval-batch-size", "3"])):
        args = _args(corpus, out, "--steps", "4", "--stop-at", str(stop), "--device", "auto", "--resume")
        assert main(args + extra) == 0, extra


def test_stdlib_corpus_holds_the_target_out() -> None:
    train, val, test = data.stdlib_files("email")
    target = data.stdlib_root() / "email"
    assert val and test and not set(val) & set(test)
    assert all(p.is_relative_to(target) for p in val + test)
    assert not any(p.is_relative_to(target) for p in train)
    assert not any({"site-packages", "test", "tests"} & set(p.relative_to(data.stdlib_root()).parts) for p in train)
    assert any(p.name == "argparse.py" for p in train)


def test_help_lists_every_option_with_its_default() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, "-m", "ghostfunc", "train", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert got.returncode == 0
    text = " ".join(got.stdout.split())
    for name, (default, _) in cli.TRAIN_OPTIONS.items():
        assert f"--{name.replace('_', '-')}" in text and f"(default: {default!r})" in text, name
    bad = subprocess.run([sys.executable, "-m", "ghostfunc", "train", "--order", "3"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("ghostfunc train: error: ")


def test_torchrun_two_processes_equal_one(corpus: dict[str, Path], tmp_path: Path) -> None:
    """2 gloo processes, stopped after step 2 and resumed to 4, end where one uninterrupted process does."""
    # SGD: Adam divides by √v, which turns float32 rounding of near-zero gradients into lr-sized differences
    args = ["--train", str(corpus["train"]), "--val", str(corpus["val"]), *SMALL, "--steps", "4", "--optimizer", "sgd",
            "--lr", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ghostfunc", "train", "--out", str(tmp_path / "one"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    for extra in (["--stop-at", "2"], ["--resume"]):  # interrupted after step 2, then resumed: each value counts once
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
                              "-m", "ghostfunc", "train", "--out", str(tmp_path / "two"), *args, *extra],
                             capture_output=True, text=True, env=env, timeout=300)
        assert two.returncode == 0, two.stderr
    a, sa = ghostfunc.DataValues.load(tmp_path / "one" / "values.pt", with_state=True)  # type: ignore[misc]
    b, sb = ghostfunc.DataValues.load(tmp_path / "two" / "values.pt", with_state=True)  # type: ignore[misc]
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(b.total, a.total, rtol=1e-6, atol=1e-9)  # float32 rounding of the sums
    for k, p in sa["train"].params.items():
        _close_float32(sb["train"].params[k], p)
    assert (tmp_path / "two" / "report.md").is_file()


def _close_float32(got: torch.Tensor, want: torch.Tensor) -> None:
    """Parameters after a few float32 steps, many processes against one: the gradient sums run in another
    order, so the rounding is float32's relative to the tensor's scale (1e-5, the project's float32 bound),
    not to each entry (an entry near zero keeps the absolute rounding of its larger neighbours)."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5 * float(want.abs().max()))


def _torchrun(nproc: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", port, "-m", "ghostfunc", "train", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("values", ["shapley", "none"])
def test_torchrun_uneven_slices_equal_one(values: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    """3 processes on batches that do not divide by 3 (5 training chunks: 1, 2, 2 per rank; 4 validation
    chunks: 1, 1, 2) end where one process does: the global mean gradient and every chunk's value."""
    args = ["--train", str(corpus["train"]), "--val", str(corpus["val"]), *SMALL, "--steps", "3", "--optimizer", "sgd",
            "--lr", "0.5", "--batch-size", "5", "--val-batch-size", "4", "--values", values]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ghostfunc", "train", "--out", str(tmp_path / "one"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    three = _torchrun(3, ["--out", str(tmp_path / "three"), *args], env)
    assert three.returncode == 0, three.stderr
    a, sa = ghostfunc.DataValues.load(tmp_path / "one" / "values.pt", with_state=True)  # type: ignore[misc]
    b, sb = ghostfunc.DataValues.load(tmp_path / "three" / "values.pt", with_state=True)  # type: ignore[misc]
    assert torch.equal(a.count, b.count) and int(a.count.sum()) == 15
    torch.testing.assert_close(b.total, a.total, rtol=1e-6, atol=1e-9)
    if values == "shapley":
        assert bool(a.total[:, 0].ne(0).any())
    for k, p in sa["train"].params.items():
        _close_float32(sb["train"].params[k], p)


def test_a_batch_smaller_than_the_processes_is_refused(corpus: dict[str, Path], tmp_path: Path) -> None:
    args = ["--train", str(corpus["train"]), "--val", str(corpus["val"]), *SMALL, "--steps", "1",
            "--batch-size", "1", "--out", str(tmp_path / "two")]
    two = _torchrun(2, args, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert two.returncode != 0
    assert "ghostfunc train: error: --batch-size: expected at least one chunk for each of the 2 processes; got 1" \
        in two.stderr
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_other_families_train(family: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    assert main(_args(corpus, tmp_path / family, "--model", family, "--steps", "2", "--seq-len", "16")) == 0
    values = ghostfunc.DataValues.load(tmp_path / family / "values.pt")
    assert isinstance(values, ghostfunc.DataValues) and int(values.count.sum()) == 8
    assert bool(torch.isfinite(values.total).all())


def test_small_presets_are_the_real_small_shapes() -> None:
    import transformers

    from ghostfunc._run import models

    def count(family: str, vocab: int) -> int:
        with torch.device("meta"):
            net = transformers.AutoModelForCausalLM.from_config(models.preset_config(family, "small", vocab))
        return sum(p.numel() for p in net.parameters())

    assert count("gpt2", 50257) == 124_439_808  # GPT-2 small
    assert count("neox", 50304) == 162_322_944  # Pythia-160M
    assert count("llama", 49152) == 134_515_008  # SmolLM-135M


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_presets_have_no_padding_row(family: str) -> None:
    """The runs never pad a sequence and id 0 is text: no embedding row may be a ``padding_idx`` (Llama's
    ``pad_token_id=0`` made row 0 one, which torch's backward holds constant in every lookup while the tied head
    trains it: ``attribute``'s unrolled values were 17% off finite differences)."""
    import transformers

    from ghostfunc._run import models

    with torch.device("meta"):
        net = transformers.AutoModelForCausalLM.from_config(models.preset_config(family, "tiny", 256))
    assert all(m.padding_idx is None for m in net.modules() if isinstance(m, torch.nn.Embedding))


def test_benchmark_tiny(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    if not str(getattr(sys.modules.get("benchmarks"), "__file__", ROOT)).startswith(str(ROOT)):
        del sys.modules["benchmarks"]  # opacus installs an unrelated top-level ``benchmarks``
    from benchmarks import train_run

    got = train_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path)])
    assert set(got["ratios"]) == {"values none", "order 1", "order 2"} and got["ratios"]["values none"] == 1.0
    assert (tmp_path / "train_run_tiny.json").is_file() and (tmp_path / "train_run_tiny.md").is_file()


def test_token_files_train(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bin"
    assert main(["train", "--train", str(corpus["train_bin"]), "--val", str(corpus["val_bin"]), "--out", str(out),
                 *SMALL, "--steps", "2"]) == 0
    values = ghostfunc.DataValues.load(out / "values.pt")
    assert isinstance(values, ghostfunc.DataValues) and len(values) == 2000 // 32  # chunk i = tokens [32i, 32i + 32)
    rows = list(csv.DictReader((out / "values.csv").read_text().splitlines()))
    assert {r["source"] for r in rows} == {"train.bin"} and len(rows) == 8
    assert "chunk" in (out / "report.md").read_text()  # token ids stand in for text


def test_chunk_index_is_the_sample_and_knows_its_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    """Chunk ``i`` is the ``k``-th whole window of ``T`` bytes of its own source file, and ``batch`` returns exactly it."""
    train = data.load(str(corpus["train"]), seq_len=32, cache=tmp_path / "cache", option="--train")
    seen: dict[int, int] = {}
    for i in range(len(train)):
        src = int(train.source[i])
        k = seen.get(src, 0)
        seen[src] = k + 1
        raw = (corpus["train"] / train.sources[src]).read_bytes()
        assert train.text(i).encode() == raw[32 * k:32 * (k + 1)]
        assert train.batch(torch.tensor([i])).tolist() == [list(raw[32 * k:32 * (k + 1)])]
    assert seen == {k: len((corpus["train"] / s).read_bytes()) // 32 for k, s in enumerate(train.sources)}
    again = data.load(str(corpus["train"]), seq_len=32, cache=tmp_path / "cache", option="--train")  # from the cache
    assert np.array_equal(again.starts, train.starts) and again.sources == train.sources


def test_local_hugging_face_folder(corpus: dict[str, Path], tmp_path: Path) -> None:
    """``--model DIR`` loads a saved model offline and trains it; its weights are where training starts."""
    import transformers

    from ghostfunc._run import models

    folder = tmp_path / "hf"
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(models.preset_config("gpt2", "tiny", 256)).save_pretrained(folder)
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--model", str(folder), "--steps", "1", "--lr", "0")) == 0
    _, state = ghostfunc.DataValues.load(out / "values.pt", with_state=True)  # type: ignore[misc]
    saved = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ref = dict(saved.named_parameters())
    assert all(torch.equal(p, ref[k]) for k, p in state["train"].params.items())  # lr 0: the loaded weights, unchanged


def test_select_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["select", "--run", str(tmp_path / "nothing")]) == 2
    assert "--run: expected the folder of a finished 'ghostfunc train' run" in capsys.readouterr().err
    assert main(["select", "--seeds", "two"]) == 2
    assert capsys.readouterr().err.startswith("ghostfunc select: error: argument --seeds")


def test_resume_refuses_other_data(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The prepared chunks are fingerprinted (count + hash of their tokens): a resume on changed data is one line."""
    import shutil

    train, val = tmp_path / "train", tmp_path / "val"
    shutil.copytree(corpus["train"], train)
    shutil.copytree(corpus["val"], val)
    out = tmp_path / "run"
    args = ["train", "--train", str(train), "--val", str(val), "--out", str(out), *SMALL, "--steps", "4",
            "--record-every", "2"]
    assert main([*args, "--stop-at", "2"]) == 0
    _, payload = ghostfunc.DataValues.load(out / "values.pt", with_state=True)  # type: ignore[misc]
    assert payload["data"]["train"]["chunks"] == 61 and len(payload["data"]["train"]["sha256"]) == 64
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    prose = (train / "prose.md").read_text()
    (train / "prose.md").write_text(prose.replace("quick", "QUICK"))  # same size, same chunk count, other tokens
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ghostfunc train: error: --train: expected the data the run in {str(out)!r} "
                                                f"was made with (61 chunks, sha256 ")
    (train / "prose.md").write_text(prose)
    (train / "more.txt").write_text("an added file " * 10)  # more chunks: was an IndexError
    assert main([*args, "--resume"]) == 2
    assert "now gives 65 chunks" in capsys.readouterr().err
    (train / "more.txt").unlink()
    (val / "a.py").write_text((val / "a.py").read_text().upper())
    assert main([*args, "--resume"]) == 2
    assert "error: --val: expected the data the run in" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    (out / "trajectory" / "trajectory.pt").unlink()  # checked on every process, before the corpus is read
    assert main([*args, "--resume"]) == 2
    assert "error: --record-every: expected the trajectory of the run" in capsys.readouterr().err


@pytest.mark.parametrize("values", ["shapley", "none"])
def test_a_diverging_run_ends_with_one_line_naming_the_step(values: str, corpus: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--lr", "1e6", "--steps", "6", "--save-every", "1", "--values", values)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("ghostfunc train: error: --lr: expected finite losses; the run diverged at step "), err
    step = int(err[-1].split("diverged at step ")[1].split()[0])
    assert 1 < step <= 6 and f"try a lower --lr ({out / 'values.pt'} holds step {step - 1})" in err[-1]
    values_pt, state = ghostfunc.DataValues.load(out / "values.pt", with_state=True)  # type: ignore[misc]
    assert state["train"].step == step - 1 and bool(torch.isfinite(values_pt.total).all())  # the last good save
    assert not (out / "report.md").exists()


def test_a_run_stopped_before_its_first_save_can_be_started_again(corpus: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A run that diverges (or is interrupted, or killed) before its first save leaves config.json and
    metrics.jsonl only: neither a new run nor --resume took that folder, so it had to be deleted by hand. Now
    --resume says why it cannot, and the same command starts the run afresh there (those two files replaced)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--lr", "1e30", "--warmup", "0", "--optimizer", "sgd", "--steps", "5")) == 2
    assert "(no values.pt saved yet)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name != cli.LOCK) == ["config.json", "metrics.jsonl"]
    (out / ".values.pt.k1ll3d.tmp").write_bytes(b"cut short")  # (a kill inside the first save leaves it, h56)
    assert main(_args(corpus, out, "--steps", "2", "--resume")) == 2
    assert capsys.readouterr().err.strip().endswith(
        "there is none (the run there stopped before its first save: start it again without --resume)")
    assert main(_args(corpus, out, "--steps", "2")) == 0
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} held a run that stopped before its first save (.values.pt.k1ll3d.tmp, config.json, " \
           f"metrics.jsonl, no values.pt): starting it afresh" in err
    assert not (out / ".values.pt.k1ll3d.tmp").exists()
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0  # the stale records are gone
    (out / "values.pt").unlink()
    (out / "notes.txt").write_text("a file the run did not write")
    assert main(_args(corpus, out, "--steps", "2")) == 2  # anything else in the folder: refused, nothing removed
    assert "already holds files ('notes.txt', 'report.md'" in capsys.readouterr().err and (out / "config.json").exists()


def test_an_interrupted_run_ends_with_one_line(corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during the run: one line saying what is on disk and how to go on (exit code 130), not a traceback."""
    from ghostfunc._run import loop

    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    capsys.readouterr()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", interrupted)
    assert main(_args(corpus, out, "--steps", "4", "--resume")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ghostfunc train: interrupted; {out / 'values.pt'} holds the run's last save, step 2: continue with --resume")
    fresh = tmp_path / "fresh"
    assert main(_args(corpus, fresh, "--steps", "4")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ghostfunc train: interrupted; no values.pt saved yet: the same command starts the run afresh in {str(fresh)!r}")


def test_out_reached_through_a_symbolic_link_into_the_corpus_is_refused(corpus: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    import shutil

    train = tmp_path / "train"
    shutil.copytree(corpus["train"], train)
    (train / "runs").mkdir()
    (tmp_path / "link").symlink_to(train / "runs")  # --out looks outside the corpus, but lands inside it
    args = ["train", "--train", str(train), "--val", str(corpus["val"]), *SMALL, "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "link")]) == 2
    assert "ghostfunc train: error: --out: expected a folder outside --train" in capsys.readouterr().err
    (tmp_path / "train_link").symlink_to(train)  # the corpus through a link, --out inside it
    assert main([*args[:2], str(tmp_path / "train_link"), *args[3:], "--out", str(train / "runs" / "r")]) == 2
    assert "ghostfunc train: error: --out: expected a folder outside --train" in capsys.readouterr().err
    assert not any((train / "runs").iterdir())
    other = tmp_path / "other"  # a glob that reaches --out through a link inside the corpus (it ran, and its own
    other.mkdir()  # files were the data of every later --resume, select and attribute, which refused them, h56)
    (train / "shared").symlink_to(other, target_is_directory=True)
    for spec in (train / "**" / "*", train / "**"):  # (corpus/** walks the link as a folder of its own, h59)
        assert main([*args[:2], str(spec), *args[3:], "--out", str(other / "run")]) == 2
        assert "ghostfunc train: error: --out: expected a folder outside --train" in capsys.readouterr().err
        assert not (other / "run").exists()


def test_a_run_without_values_ranks_nothing(corpus: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(_args(corpus, tmp_path / "run", "--steps", "1", "--values", "none")) == 0
    printed = capsys.readouterr().out
    assert "no values (--values none)" in printed and "most helpful sources" not in printed


def test_select_refuses_a_run_that_stopped_early(corpus: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "2")) == 0
    capsys.readouterr()
    assert main(["select", "--run", str(out), "--steps", "2", "--seeds", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--run: expected a finished run; {str(out)!r} saved step 2 of 4 (finish it with 'ghostfunc train --resume "
        f"--out {out}')")


def test_text_files_skipped_are_counted_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.txt").write_text("plain text " * 10)
    (tmp_path / "t" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (tmp_path / "t" / "empty.txt").write_text("")
    (tmp_path / "t" / "blob.bin.dat").write_bytes(b"\0" * 64)
    for _ in range(2):  # tokenized, then from the cache
        got = data.load(str(tmp_path / "t"), seq_len=8, cache=tmp_path / "cache", option="--train")
        assert got.sources == ("ok.txt",)
        assert sorted(got.skipped) == [("blob.bin.dat", "binary"), ("empty.txt", "empty"), ("latin1.txt", "not UTF-8")]
        assert data.describe(got).endswith("(3 files skipped: 1 binary, 1 empty, 1 not UTF-8)")
    (tmp_path / "t" / "short.txt").write_text("tiny")  # a source that gives no chunk of 8 tokens is told
    got = data.load(str(tmp_path / "t"), seq_len=8, cache=tmp_path / "cache", option="--train")
    assert data.describe(got).startswith(f"{len(got)} chunks of 8 tokens from 1 of 2 sources (3 files skipped")


def test_local_hugging_face_vocabulary_that_exactly_fits(corpus: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Token ids 0..199 need 200 tokens: a model with 200 trains (the rounding to 64 is for presets only); 150 does not."""
    import transformers

    from ghostfunc._run import models

    for vocab in (200, 150):
        transformers.AutoModelForCausalLM.from_config(models.preset_config("gpt2", "tiny", vocab)).save_pretrained(tmp_path / f"hf{vocab}")
    args = ["train", "--train", str(corpus["train_bin"]), "--val", str(corpus["val_bin"]), *SMALL, "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "fits"), "--model", str(tmp_path / "hf200")]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "small"), "--model", str(tmp_path / "hf150")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"--model: expected a vocabulary of at least 200 tokens (the data's largest id + 1); {str(tmp_path / 'hf150')!r} has 150")
    assert main([*args, "--out", str(tmp_path / "other"), "--model", str(tmp_path / "hf200"), "--vocab-size", "256"]) == 2
    assert "--vocab-size: expected 0 or the vocabulary of --model" in capsys.readouterr().err


def test_select_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "values.pt").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    assert main(["select", "--run", str(run), "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ghostfunc select: error: --out: expected a folder for select.json and select.md; {str(tmp_path / 'afile')!r} is a file"]
    assert main(["select", "--run", str(run), "--out", str(tmp_path / "afile" / "sel")]) == 2
    assert "--out: expected a folder it can write" in capsys.readouterr().err
    bad = tmp_path / "cfg"
    bad.mkdir()
    assert main(["select", "--run", str(run), "--config", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ghostfunc select: error: --config: expected a TOML file; {str(bad)!r} is a folder"]


def test_a_divergence_on_the_last_step_is_caught(corpus: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The last update made the parameters NaN: no later step's losses show it, so the run ended with exit 0 and
    'validation loss ... -> nan'. The held-out losses of the final evaluation (and the parameters) are checked."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--optimizer", "sgd", "--lr", "1e20", "--steps", "1", "--warmup", "0")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("ghostfunc train: error: --lr: expected finite losses; the run diverged at step 1 "), err
    assert not (out / "report.md").exists()


def test_ctrl_c_before_the_run_starts_ends_with_one_line(corpus: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C while the data are read or the model is built: one line (exit 130), not a 64-line traceback."""
    from ghostfunc._run import loop

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "prepare", interrupted)
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ghostfunc train: interrupted; no values.pt saved yet: the same command starts the run afresh in {str(out)!r}")


def test_an_edited_file_with_its_old_size_and_time_is_read_again(tmp_path: Path) -> None:
    """The token cache was keyed by path, size and modification time: a same-size edit with the old time set back
    (cp -p, rsync -t, an unpacked tar) trained on the old text. Its change time and inode are in the key too."""
    import os

    folder = tmp_path / "corpus"
    folder.mkdir()
    f = folder / "a.txt"
    f.write_text("loss train quick brown fox " * 20)
    before = f.stat()
    first, _, _ = data.tokenize([f], folder, tmp_path / "cache", "--train")
    f.write_text("LOSS TRAIN QUICK BROWN FOX " * 20)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    second, _, _ = data.tokenize([f], folder, tmp_path / "cache", "--train")
    assert bytes(second[:4]) == b"LOSS" and bytes(first[:4]) == b"loss"


def test_token_file_and_text_are_not_mixed(corpus: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """A .bin of token ids for training and text (bytes) for validation: unrelated vocabularies, refused."""
    out = tmp_path / "mixed"
    assert main(["train", "--train", str(corpus["train_bin"]), "--val", str(corpus["val"]), "--out", str(out),
                 *SMALL, "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--val: expected a token file, as --train is; got text (byte-level tokens): the ids of a token file and the "
        "bytes of text are unrelated vocabularies")
    assert not out.exists()


def test_select_out_inside_the_runs_corpus_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``select --out`` in the run's training folder: select.json and select.md became the run's data, and every
    later select or --resume of the run was refused. Refused up front, as train refuses such an --out."""
    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    (root / "train" / "a.py").write_text("def header(msg):\n    return msg['Subject'].lower()\n" * 30)
    (root / "val").mkdir()
    (root / "val" / "b.py").write_text("def subject(message):\n    return message['Subject']\n" * 6)
    run = tmp_path / "run"
    assert main(["train", "--train", str(root / "train"), "--val", str(root / "val"), "--out", str(run), *SMALL,
                 "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["select", "--run", str(run), "--steps", "2", "--seeds", "1", "--out", str(root / "train" / "sel")]) == 2
    assert "--out: expected a folder outside the run's --train" in capsys.readouterr().err
    assert not (root / "train" / "sel").exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(corpus: dict[str, Path], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Two runs started into one new --out were both accepted: one interleaved metrics.jsonl, one run's config beside
    the other's values. The first holds a lock on the folder while it runs (here: held by this process)."""
    out = tmp_path / "run"
    first = cli.hold_out(out)
    try:
        assert main(_args(corpus, out, "--steps", "2")) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"ghostfunc train: error: --out: another run is writing into {str(out)!r} now; wait for it to end, or pick "
            f"another folder")
        assert [p.name for p in out.iterdir()] == [cli.LOCK]
    finally:
        first.close()
    assert main(_args(corpus, out, "--steps", "2")) == 0  # (the lock file left behind is no run's file)


def test_a_held_out_folder_is_refused_on_every_process(corpus: dict[str, Path], tmp_path: Path) -> None:
    """Under torchrun, --out held by another run was refused on rank 0 only; rank 1 went on into the run's first
    collective and died with gloo's "connection reset" traceback. Every process gives the one line."""
    out = tmp_path / "run"
    first = cli.hold_out(out)
    try:
        args = ["--train", str(corpus["train"]), "--val", str(corpus["val"]), *SMALL, "--steps", "1",
                "--batch-size", "2", "--val-batch-size", "2", "--out", str(out)]
        two = _torchrun(2, args, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    finally:
        first.close()
    line = f"ghostfunc train: error: --out: another run is writing into {str(out)!r} now"
    assert two.returncode != 0
    assert two.stderr.count(line) == 2, two.stderr[-2000:]
    assert "[rank1]:" not in two.stderr and "Connection reset" not in two.stderr, two.stderr[-2000:]


def test_a_torn_values_file_is_one_line(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated values.pt raised a ValueError traceback from --resume, select and attribute."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2")) == 0
    (out / "values.pt").write_bytes((out / "values.pt").read_bytes()[:100])
    capsys.readouterr()
    for argv, option in ((_args(corpus, out, "--steps", "2", "--resume"), "--resume"),
                         (["select", "--run", str(out), "--seeds", "1"], "--run")):
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: {option}: expected the run's saved values whole" in last, last  # (the option named, h102)
        assert "is not a file written by DataValues.save" in last, last


def test_select_and_attribute_refuse_another_runs_values(corpus: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A values.pt copied from a run with another --lr: select ranked chunks by that run's values and retrained with
    this run's options, exit 0 (h102); refused as --resume refuses it, naming the option."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(corpus, one, "--steps", "2", "--lr", "2e-3")) == 0
    assert main(_args(corpus, two, "--steps", "2", "--lr", "4e-3", "--record-every", "1")) == 0
    (two / "values.pt").write_bytes((one / "values.pt").read_bytes())
    capsys.readouterr()
    for argv in (["select", "--run", str(two), "--seeds", "1"], ["attribute", "--run", str(two)]):
        assert _code(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--run: the values in" in last and "--lr 0.002" in last and "another run's values" in last, last


def _code(argv: list[str]) -> int:
    """The exit code of a subcommand, whether it returns it or exits (attribute reports through argparse)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_a_finished_run_resumed_keeps_what_attribute_made(corpus: dict[str, Path], tmp_path: Path) -> None:
    """--resume on a finished run trains nothing; it rewrote the recording and deleted trajectory/unrolled.pt,
    attribute's output (5x the training's time on the default run, h102)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1")) == 0
    unrolled = out / "trajectory" / "unrolled.pt"
    unrolled.write_bytes(b"attribute's output")
    before = (out / "values.pt").read_bytes()
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1", "--resume")) == 0
    assert unrolled.read_bytes() == b"attribute's output" and (out / "values.pt").read_bytes() == before


def test_a_torn_metrics_line_is_dropped_on_resume(corpus: dict[str, Path], tmp_path: Path) -> None:
    """A kill during a metrics.jsonl append leaves a torn line (and blank ones): --resume raised a JSONDecodeError
    traceback (h102). The torn line goes; the run resumes, and its metrics are the uninterrupted run's steps."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "2", "--save-every", "2")) == 0
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "train_l\n\n')
    assert main(_args(corpus, out, "--steps", "4", "--save-every", "2", "--resume")) == 0
    assert main(_args(corpus, whole, "--steps", "4", "--save-every", "2")) == 0
    steps = [[json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, whole)]
    assert steps[0] == steps[1], steps


@pytest.mark.parametrize("config", ['{"steps": 2, "val', '[1, 2]', '{"lr": 0.1}'])
def test_select_with_a_torn_or_foreign_config_is_one_line(corpus: dict[str, Path], tmp_path: Path, config: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    """select read config.json without a guard: a torn one was a JSONDecodeError traceback, one without the run's
    options a KeyError (h102); attribute said one line. Both say one line, naming --run."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1")) == 0
    (out / "config.json").write_text(config)
    capsys.readouterr()
    for argv in (["select", "--run", str(out), "--seeds", "1"], ["attribute", "--run", str(out)]):
        assert _code(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error: --run:" in err.splitlines()[-1], err
        assert "config.json" in err.splitlines()[-1], err


def test_the_token_cache_names_files_from_the_root_given(tmp_path: Path) -> None:
    """The same files read as --train base/c and as --train base/c/sub are named sub/x.py and x.py: the cache gave the
    second run the first one's names (into values.csv and the data's fingerprint)."""
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "c" / "sub" / "x.py").write_text("print('hello')\n" * 20)
    cache = tmp_path / "cache"
    files = [tmp_path / "c" / "sub" / "x.py"]
    names = [data.tokenize(files, root, cache, "--train")[1][0][0] for root in (tmp_path / "c", tmp_path / "c" / "sub")]
    assert names == [str(Path("sub") / "x.py"), "x.py"]


def test_select_on_a_run_with_the_largest_seed(corpus: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A run trained with --seed 4294967295 (accepted) could not be selected from: the retrainings' seed + 1 + k was
    refused as an out-of-range --seed, an option select does not have. They count on from 0."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2", "--seed", str(2**32 - 1))) == 0
    assert main(["select", "--run", str(out), "--seeds", "1", "--steps", "1", "--no-progress", "--threads", "1"]) == 0


def test_odd_corpus_files_are_read_or_skipped_and_the_report_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file name that is not UTF-8 (latin-1 ``café.py``, legal on Linux) raised UnicodeEncodeError after training
    and no report was written; a file that cannot be read (EINVAL from /proc, a chmod 000 file) raised a traceback
    instead of being skipped with its reason; a glob over a folder holding a link to itself read every file about
    40 times (the folder form once); a link beside its file was read twice by the folder form (once by a glob)."""
    root = tmp_path / "c"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    text = "def header(msg):\n    return msg['Subject'].lower()\n" * 12
    (root / "train" / "mail.py").write_text(text)
    name = os.fsdecode(b"caf\xe9.py")  # (a surrogate where the byte is not UTF-8)
    (root / "train" / name).write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (root / "train" / "unreadable.txt").symlink_to("/proc/self/clear_refs")  # (read fails, even as root)
    (root / "train" / "loop").symlink_to(".")
    (root / "train" / "mail_link.py").symlink_to("mail.py")  # (read once, as the glob reads it: h56)
    (root / "val" / "a.py").write_text(text[:200] * 2)
    out = tmp_path / "run"
    assert main(["train", "--train", str(root / "train"), "--val", str(root / "val"), "--out", str(out), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "1 file skipped: 1 unreadable (" in err, err
    values = (out / "values.csv").read_text(encoding="utf-8")
    assert "caf\\udce9.py" in values and (out / "report.md").is_file() and (out / "report.png").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    glob_out = tmp_path / "globbed"
    assert main(["train", "--train", str(root / "train" / "**" / "*"), "--val", str(root / "val"),
                 "--out", str(glob_out), *SMALL]) == 0
    folder_line, glob_line = (re.search(r"train (\d+ chunks of \d+ tokens from \d+ sources)", e).group(1)
                              for e in (err, capsys.readouterr().err))
    assert glob_line == folder_line


def test_a_run_interrupted_in_its_first_save_of_a_recording_starts_again(
        corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--record-every saves the recording just before the first values.pt: interrupted between the two, the
    folder (config, metrics, trajectory/) was taken by neither the same command ("already holds files") nor
    --resume ("there is none"), though the message said the same command starts afresh."""
    out = tmp_path / "run"
    real = ghostfunc.DataValues.save

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ghostfunc.DataValues, "save", interrupted)
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1")) == 130
    assert (out / "trajectory" / "trajectory.pt").is_file() and not (out / "values.pt").exists()
    (out / "trajectory" / "trajectory.pt.tmp").write_bytes(b"")  # (a kill in the recording's own save leaves it)
    monkeypatch.setattr(ghostfunc.DataValues, "save", real)
    capsys.readouterr()
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1")) == 0
    assert "held a run that stopped before its first save (config.json, metrics.jsonl, trajectory" in \
        capsys.readouterr().err
    assert ghostfunc.Trajectory.load(out / "trajectory").steps == 2


def test_a_resumed_recording_drops_an_unrolled_pt_of_fewer_steps(corpus: dict[str, Path], tmp_path: Path) -> None:
    """attribute on a run stopped with --stop-at writes trajectory/unrolled.pt; --resume then grew the recording
    and left the old values beside it, of fewer steps, without a word."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "4", "--stop-at", "2", "--record-every", "1")) == 0
    assert main(["attribute", "--run", str(out)]) == 0
    assert (out / "trajectory" / "unrolled.pt").is_file()
    assert main(_args(corpus, out, "--steps", "4", "--record-every", "1", "--resume")) == 0
    assert not (out / "trajectory" / "unrolled.pt").exists()
    assert ghostfunc.Trajectory.load(out / "trajectory").steps == 4


@pytest.mark.parametrize("how", ["--out a file", "values.pt a folder"])
def test_resume_says_why_it_finds_no_run(how: str, corpus: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """--out naming a file, or a folder in place of values.pt: --resume said "there is none" for both (h91)."""
    out = tmp_path / "run"
    if how == "--out a file":
        out.write_text("a file")
    else:
        (out / "values.pt").mkdir(parents=True)
    assert main(_args(corpus, out, "--steps", "2", "--resume")) == 2
    said = f"{str(out)!r} is a file" if how == "--out a file" else "its values.pt is a folder"
    assert capsys.readouterr().err.strip().endswith(f"--resume: expected a run in --out {str(out)!r} (its values.pt); "
                                                    f"{said}")


def test_the_summary_lists_no_source_as_both_most_helpful_and_lowest(corpus: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """With fewer than 10 sources seen, the five most helpful and the five lowest-valued overlapped: one source was
    listed both ways (h102). The three sources here: two most helpful, one lowest."""
    assert main(_args(corpus, tmp_path / "run", "--steps", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    named = [re.findall(r"(\S+) \([+-]", next(ln for ln in lines if ln.strip().startswith(start)))
             for start in ("most helpful sources", "lowest-valued sources")]
    assert named[0] and named[1] and not set(named[0]) & set(named[1]), named
    report = (tmp_path / "run" / "report.md").read_text()
    helpful, lowest = (re.findall(r"\*\*chunk (\d+)\*\*", part) for part in report.split("## Lowest-valued chunks"))
    assert not set(helpful) & set(lowest), (helpful, lowest)


@pytest.mark.parametrize("older", ["relative paths", "a then counted option"])
def test_a_runs_own_values_saved_by_an_older_version_are_its_own(corpus: dict[str, Path], tmp_path: Path,
                                                                  older: str) -> None:
    """values.pt's options as an older version saved them: relative paths (read from the folder the run started in,
    as config.json's are) and --eval-batch-size (trajectory-fixing then, free now). select refused the run's own
    values as another run's (h103)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2")) == 0
    values, payload = ghostfunc.DataValues.load(out / "values.pt", with_state=True)
    cfg = loop.read_config(out)
    if older == "relative paths":  # started in tmp_path with --out run and --train/--val/--test relative to it
        raw = {**cfg, "out": "run", **{k: os.path.relpath(cfg[k], tmp_path) for k in ("train", "val", "test")}}
        (out / "config.json").write_text(json.dumps(raw))
        payload["config"] = {**payload["config"], **{k: raw[k] for k in ("train", "val", "test")}}
    else:
        payload["config"] = {**payload["config"], "eval_batch_size": 64}
    loop.check_values(loop.resolve_run(loop.read_config(out), out), payload, str(out))
    payload["config"]["seed"] = 5  # (another run's still refused)
    with pytest.raises(data.UsageError, match=r"--run: the values in .* --seed 5; this run has 0"):
        loop.check_values(loop.resolve_run(loop.read_config(out), out), payload, str(out))


def test_a_finished_run_resumed_saves_its_options_as_config_json_spells_them(corpus: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """--device auto, then --resume --device cpu on the finished run: config.json was rewritten and values.pt (not
    saved again) kept auto, which a machine with a GPU reads as cuda (select then refused the run's own values,
    h103). Both name cpu; the recording too, and attribute's unrolled.pt stays (the recording did not grow)."""
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1", "--device", "auto")) == 0
    (out / "trajectory" / "unrolled.pt").write_bytes(b"attribute's output")
    assert main(_args(corpus, out, "--steps", "2", "--record-every", "1", "--device", "cpu", "--resume")) == 0
    _, payload = ghostfunc.DataValues.load(out / "values.pt", with_state=True)
    spec = json.loads((out / "trajectory" / "spec.json").read_text())
    assert loop.read_config(out)["device"] == payload["config"]["device"] == spec["kwargs"]["config"]["device"] == "cpu"
    assert (out / "trajectory" / "unrolled.pt").read_bytes() == b"attribute's output"


def test_select_names_another_runs_values_before_asking_to_finish_them(corpus: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Another run's unfinished values.pt copied in: select said "finish it with --resume", which --resume then
    refused (h103). It says first that they are another run's."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(corpus, one, "--steps", "4", "--stop-at", "2", "--seed", "5")) == 0
    assert main(_args(corpus, two, "--steps", "4")) == 0
    (two / "values.pt").write_bytes((one / "values.pt").read_bytes())
    capsys.readouterr()
    assert main(["select", "--run", str(two), "--seeds", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "another run's values" in last and "--seed 5" in last and "finish it" not in last, last


def test_a_run_of_one_source_lists_no_empty_lowest_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One source seen: the summary printed an empty "lowest-valued sources" line (h103)."""
    (tmp_path / "tr").mkdir()
    (tmp_path / "tr" / "only.py").write_text("def f(x):\n    return x * 2\n" * 40)
    (tmp_path / "va").mkdir()
    (tmp_path / "va" / "v.py").write_text("def g(y):\n    return y + 1\n" * 8)
    assert main(["train", "--train", str(tmp_path / "tr"), "--val", str(tmp_path / "va"), "--out",
                 str(tmp_path / "run"), *SMALL, "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("most helpful sources" in ln and "only.py" in ln for ln in lines), lines
    assert not any("lowest-valued sources" in ln for ln in lines), lines
