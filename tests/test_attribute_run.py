"""``ghostfunc train --record-every`` then ``ghostfunc attribute --run``: through the real CLI, against unroll and autograd."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import ghostfunc  # noqa: E402
from ghostfunc.__main__ import main  # noqa: E402
from ghostfunc._run import loop  # noqa: E402
from tests.test_unroll import autograd_unrolled, rel  # noqa: E402

#: Six steps of the tiny preset (AdamW with its warmup + cosine schedule), checkpoints every 2 steps, samples recurring.
ARGS = ["--seq-len", "16", "--batch-size", "4", "--val-batch-size", "2", "--eval-every", "6", "--warmup", "2",
        "--steps", "6", "--record-every", "2", "--no-progress", "--threads", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded run on a small corpus (13 training chunks: every chunk recurs within 6 steps of 4)."""
    root = tmp_path_factory.mktemp("attribute")
    (root / "train").mkdir()
    (root / "train" / "mail.py").write_text("def header(msg):\n    return msg['Subject']\n" * 3)
    (root / "train" / "prose.md").write_text("The quick brown fox jumps over the lazy dog. " * 2)
    (root / "val").mkdir()
    (root / "val" / "a.py").write_text("def subject(message):\n    return message['Subject']\n" * 2)
    out = root / "run"
    assert main(["train", "--train", str(root / "train"), "--val", str(root / "val"), "--out", str(out), *ARGS]) == 0
    return out


def test_attribute_of_a_recorded_run_is_unroll_on_its_trajectory(recorded: Path, capsys: pytest.CaptureFixture) -> None:
    """``attribute --run`` = ``ghostfunc.unroll`` on the recorded trajectory, the run's own batches, optimizer and validation set."""
    traj = ghostfunc.Trajectory.load(recorded / "trajectory")
    values, state = ghostfunc.DataValues.load(recorded / "values.pt", with_state=True)  # type: ignore[misc]
    assert traj.steps == 6 and sorted(traj.checkpoints) == [0, 2, 4] and traj.every == 2
    assert all(torch.equal(p, state["train"].params[k]) for k, p in traj.final.items())  # θ_T is the run's
    assert torch.equal(torch.bincount(torch.cat(traj.indices), minlength=len(values)), values.count)

    assert main(["attribute", "--run", str(recorded)]) == 0
    printed = capsys.readouterr().out
    assert "unrolled values of" in printed and f"({int((values.count > 0).sum())} drawn by the run)" in printed
    got = ghostfunc.DataValues.load(recorded / "trajectory" / "unrolled.pt")
    assert isinstance(got, ghostfunc.DataValues)
    ranked = [line for line in printed.splitlines() if line.startswith(("lowest-valued (helpful where negative):", "highest-valued (harmful where positive):"))]
    assert len(ranked) == 2, printed
    for line in ranked:  # only samples the run drew are ranked (unseen ones have no value)
        ids = [int(item.split(":")[0]) for item in line.split(": ", 1)[1].split(", ")]
        assert ids and all(int(got.count[i]) > 0 for i in ids), line

    cfg = json.loads((recorded / "config.json").read_text())  # the run rebuilt by hand, not by the spec's factory
    setup = loop.prepare(cfg)
    dataset = {"input_ids": setup.train.batch(torch.arange(len(setup.train)))}
    val = {"input_ids": setup.val.batch(torch.arange(len(setup.val)))}  # the whole validation set
    want = ghostfunc.unroll(setup.model_fn, loop.optimizer(cfg), traj, traj.batches(dataset), val, size=len(dataset["input_ids"]))
    assert torch.equal(got.count, values.count) and got.steps == 6
    torch.testing.assert_close(got.total, want.total, rtol=1e-6, atol=0)
    assert bool((got.total != 0).any())


def test_unrolled_values_of_the_cli_model_equal_autograd_through_the_run(recorded: Path) -> None:
    """The CLI's model and optimizer (schedule included) in float64: unroll = autograd through the 6-step loop, 1e-10."""
    cfg = json.loads((recorded / "config.json").read_text())
    setup = loop.prepare(cfg)
    model_fn, _ = ghostfunc.from_module(setup.model.double(), ghostfunc.causal_lm_loss)
    traj = ghostfunc.Trajectory.load(recorded / "trajectory")
    theta0 = {k: v.double() for k, v in traj.checkpoints[0][0].items()}
    dataset = {"input_ids": setup.train.batch(torch.arange(len(setup.train)))}
    batches = traj.batches(dataset)
    val = {"input_ids": setup.val.batch(torch.arange(len(setup.val)))}
    n = len(setup.train)
    got = ghostfunc.unroll(model_fn, loop.optimizer(cfg), theta0, batches, val, size=n, checkpoint_every=2).total
    with sdpa_kernel([SDPBackend.MATH]):
        want = autograd_unrolled(model_fn, loop.optimizer(cfg), theta0, batches, val, n)
    assert rel(got, want) < 1e-10 and bool((want != 0).any())


def bare_task() -> dict:
    """A factory that returns no optimizer (for the test below)."""
    return {"model_fn": lambda p, b: (b["x"] @ p["w"]) ** 2, "dataset": {"x": torch.eye(2, dtype=torch.float64)},
            "val": {"x": torch.eye(2, dtype=torch.float64)}}


def test_attribute_needs_an_optimizer_from_the_spec_or_the_factory(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from ghostfunc._attribute import SpecError, attribute

    traj = ghostfunc.Trajectory.start(({"w": torch.zeros(2, dtype=torch.float64)}, None), every=1)
    traj.save(tmp_path, spec={"factory": "tests.test_attribute_run:bare_task"})
    message = f"{tmp_path / 'spec.json'} needs an 'optimizer' entry, or its factory"
    with pytest.raises(SpecError, match=f"^attribute: {re.escape(message)}"):  # a ValueError, from the API
        attribute(tmp_path)
    with pytest.raises(SystemExit) as info:  # one line from the command line
        main(["attribute", "--run", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"python -m ghostfunc attribute: error: {message}")


def test_a_folder_without_a_recorded_run_is_a_usage_error(tmp_path, capsys):
    from ghostfunc._attribute import main

    with pytest.raises(SystemExit) as info:
        main(["--run", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m ghostfunc attribute: error: --run: expected a run folder")


def test_attribute_and_select_read_the_runs_own_data_from_any_folder(recorded: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A run made with relative paths records them absolute; an older run's are taken relative to where it started."""
    import shutil

    from ghostfunc._attribute import attribute

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(recorded.parent / "train", work / "train")
    shutil.copytree(recorded.parent / "val", work / "val")
    (elsewhere / "train").mkdir(parents=True)  # same relative names, other data
    (elsewhere / "train" / "other.txt").write_text("something else entirely " * 20)
    monkeypatch.chdir(work)
    assert main(["train", "--train", "train", "--val", "val", "--out", "runs/rel", *ARGS]) == 0
    run = work / "runs" / "rel"
    assert json.loads((run / "config.json").read_text())["train"] == str(work / "train")
    want, _, _ = attribute(recorded, out=tmp_path / "want.pt")  # the same data and options, absolute paths
    monkeypatch.chdir(elsewhere)
    assert main(["attribute", "--run", str(run), "--out", str(tmp_path / "u.pt")]) == 0
    got = ghostfunc.DataValues.load(tmp_path / "u.pt")
    assert isinstance(got, ghostfunc.DataValues) and torch.equal(got.total, want.total)
    assert main(["select", "--run", str(run), "--seeds", "1", "--steps", "1", "--no-progress", "--threads", "1"]) == 0
    assert (run / "select" / "select.json").is_file() and sorted(p.name for p in elsewhere.iterdir()) == ["train"]
    assert (work / "runs" / ".ghostfunc-cache").is_dir()  # the cache stays beside the run

    cfg = json.loads((run / "config.json").read_text())  # a run from before: relative paths and --out
    (run / "config.json").write_text(json.dumps({**cfg, "train": "train", "val": "val", "out": "runs/rel"}))
    assert main(["attribute", "--run", str(run), "--out", str(tmp_path / "u2.pt")]) == 0
    assert torch.equal(ghostfunc.DataValues.load(tmp_path / "u2.pt").total, want.total)  # type: ignore[union-attr]
    (run / "config.json").write_text(json.dumps({**cfg, "train": "train", "val": "val", "out": "/somewhere/else"}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(run), "--out", str(tmp_path / "u3.pt")])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ghostfunc attribute: error: --run: its --train 'train' is relative to the folder the run was started "
        f"in, which its --out '/somewhere/else' does not tell; write the absolute path into {str(run / 'config.json')!r}")
    (run / "config.json").write_text(json.dumps(cfg))
    (work / "train" / "prose.md").write_text("The quick brown fox jumps over the lazy cat. " * 2)  # same size, other text
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(run), "--out", str(tmp_path / "u4.pt")])
    assert info.value.code == 2 and "error: --train: expected the data the run in" in capsys.readouterr().err
    assert main(["select", "--run", str(run), "--out", str(tmp_path / "sel"), "--seeds", "1", "--steps", "1"]) == 2
    assert "ghostfunc select: error: --train: expected the data the run in" in capsys.readouterr().err
    assert not (tmp_path / "u3.pt").exists() and not (tmp_path / "u4.pt").exists() and not (tmp_path / "sel").exists()


@pytest.mark.parametrize("extra, message", [
    (["--top", "-3"], "--top: expected an integer >= 0; got -3"),
    (["--out", "{tmp}/afile/u.pt"], "--out: expected a folder it can write; '{tmp}/afile' is a file"),
    (["--out", "{tmp}"], "--out: expected a file path for the values; '{tmp}' is a folder"),
    # the run's own files: its values.pt was overwritten (select, --resume and attribute then failed on it)
    (["--out", "{run}/values.pt"], "--out: expected a path outside the run's own files; '{run}/values.pt' is one of "
                                   "them (it would be overwritten: its state, values or recording)"),
    (["--out", "{run}/trajectory/trajectory.pt"], "--out: expected a path outside the run's own files; "
                                                  "'{run}/trajectory/trajectory.pt' is one of them (it would be "
                                                  "overwritten: its state, values or recording)"),
])
def test_attribute_bad_options_are_one_line(extra: list[str], message: str, recorded: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    before = (recorded / "values.pt").read_bytes()
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(recorded), *[e.format(tmp=tmp_path, run=recorded) for e in extra]])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ghostfunc attribute: error: {message.format(tmp=tmp_path, run=recorded)}")
    assert (recorded / "values.pt").read_bytes() == before


def test_attribute_of_a_moved_run_reads_its_own_folder(recorded: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A run moved or renamed after training: its spec.json names the old folder, where another run may now be
    (the same options, another validation set): attribute read that run's data and validation set, exit 0, values
    0.28 off; with nothing there, a raw FileNotFoundError. It reads the folder --run names."""
    from ghostfunc._attribute import attribute

    want, _, _ = attribute(recorded, out=tmp_path / "want.pt")
    moved = tmp_path / "moved"
    shutil.copytree(recorded, moved)
    spec_path = moved / "trajectory" / "spec.json"
    spec = json.loads(spec_path.read_text())
    assert spec["kwargs"]["run"] == str(recorded.resolve())
    spec["kwargs"]["run"] = str(tmp_path / "gone")  # where it was trained: nothing there now
    spec_path.write_text(json.dumps(spec))
    got, _, _ = attribute(moved, out=tmp_path / "got.pt")
    assert torch.equal(got.total, want.total)


def _saved_recording(folder: Path, optimizer: object = None) -> None:
    """A few SGD steps of logistic regression on the digits, saved with Trajectory.save(folder, spec=...)."""
    from ghostfunc import _evaluate as E

    task = E.digits_task(model="logreg", seed=0, n_train=30, n_val=10)
    step = ghostfunc.train_step(task["model_fn"], ghostfunc.sgd(0.3))
    state = step.init(E.init_params("logreg", 0))
    traj = ghostfunc.Trajectory.start(state, every=2)
    for t in range(3):
        i = torch.arange(8) + 8 * t
        state, _ = step(state, {**{k: v[i] for k, v in task["dataset"].items()}, "index": i},
                        {**task["val"], "index": torch.arange(10)})
        traj.record(i, state)
    traj.save(folder, spec={"factory": "ghostfunc._evaluate:digits_task",
                            "optimizer": optimizer or {"name": "sgd", "lr": 0.3},
                            "kwargs": {"model": "logreg", "seed": 0, "n_train": 30, "n_val": 10}})


@pytest.mark.parametrize("name", ["trajectory.pt", "spec.json"])
def test_attribute_out_never_names_the_recording_it_reads(name: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A recording saved with Trajectory.save(folder, spec=...) holds trajectory.pt and spec.json in the folder
    --run names: --out naming either was written over with the values (exit 0, the recording gone); refused in
    one line, the files as they were."""
    folder = tmp_path / "rec"
    _saved_recording(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(folder), "--out", str(folder / name)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ghostfunc attribute: error: --out: expected a path outside the run's own files; "
        f"{str(folder / name)!r} is one of them (it would be overwritten: its state, values or recording)")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert main(["attribute", "--run", str(folder), "--out", str(folder / "unrolled.pt")]) == 0


@pytest.mark.parametrize("entry, message", [
    ({"name": "sgd"}, "the 'optimizer' entry {'name': 'sgd'} does not make a ghostfunc.sgd: sgd() missing 1 "
                      "required positional argument: 'lr'"),
    ({"name": "sgd", "lr": 0.3, "mom": 0.9}, "the 'optimizer' entry {'name': 'sgd', 'lr': 0.3, 'mom': 0.9} does not "
                                             "make a ghostfunc.sgd: sgd() got an unexpected keyword argument 'mom'"),
    ({"name": "adamw", "lr": 0.3}, "the 'optimizer' entry names adamw, whose state is AdamWState; the recorded run's "
                                   "optimizer state is SGDState"),
    ({"name": "adam", "lr": 0.3}, "optimizer name must be one of ['adamw', 'sgd']; got 'adam'"),
])
def test_attribute_names_a_spec_that_cannot_rebuild_its_run(entry: dict, message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A spec.json whose optimizer entry misses an argument, has an unknown one, or names another optimizer than
    the run's ended in a traceback (exit 1) that named neither the file nor the entry: one line, exit code 2."""
    folder = tmp_path / "rec"
    _saved_recording(folder, entry)
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(folder)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ghostfunc attribute: error: {folder / 'spec.json'}: {message}")


@pytest.mark.parametrize("how, said", [
    ("another learning rate", r"unroll: replaying the run's steps does not reach the recorded parameters of step \d+ "),
    ("truncated", r"Trajectory.load: '.*trajectory.pt' is not a file written by Trajectory.save \(torch.load: "),
])
def test_attribute_refuses_a_recording_it_cannot_replay_in_one_line(how: str, said: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A spec whose optimizer is not the run's (another learning rate), or a truncated trajectory.pt: the library's
    message was right, but it came as a traceback (exit code 1) where the command line says other bad input in one
    line (exit code 2; h74)."""
    folder = tmp_path / "rec"
    _saved_recording(folder, {"name": "sgd", "lr": 0.5} if how == "another learning rate" else None)
    if how == "truncated":
        data = (folder / "trajectory.pt").read_bytes()
        (folder / "trajectory.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(folder)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match(rf"python -m ghostfunc attribute: error: {said}", err.splitlines()[-1])


@pytest.mark.parametrize("how, said", [
    ("another run's recording", r"--run: the recording in '.*' \(trajectory/\) was made by a run with --seed 1; this "
                                r"run has 0: it is another run's recording"),
    ("trajectory.pt a folder", r"Trajectory.load: '.*trajectory.pt' is a folder; expected a file written by "
                               r"Trajectory.save"),
    ("config.json missing", r"--run: expected the run's config.json in '.*' \(the training CLI writes it\); there is "
                            r"none"),
    ("config.json torn", r"--run: '.*config.json' is not the JSON the training CLI writes"),
])
def test_attribute_refuses_what_is_not_the_runs_own_recording_in_one_line(how: str, said: str, recorded: Path,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A recording copied in from another run (another seed) was replayed and its values written as this run's; a
    folder in place of trajectory.pt, and a missing or torn config.json, were tracebacks (h91). One line each, exit
    code 2; the spec names the options of the run that recorded it."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    (run / "trajectory" / "unrolled.pt").unlink(missing_ok=True)  # (another test's attribution of the run)
    spec_path = run / "trajectory" / "spec.json"
    spec = json.loads(spec_path.read_text())
    assert spec["kwargs"]["config"]["seed"] == 0  # (the recording names its run's options)
    if how == "another run's recording":
        spec["kwargs"]["config"]["seed"] = 1
        spec_path.write_text(json.dumps(spec))
    elif how == "trajectory.pt a folder":
        (run / "trajectory" / "trajectory.pt").unlink()
        (run / "trajectory" / "trajectory.pt").mkdir()
    elif how == "config.json missing":
        (run / "config.json").unlink()
    else:
        (run / "config.json").write_text((run / "config.json").read_text()[:20])
    with pytest.raises(SystemExit) as info:
        main(["attribute", "--run", str(run)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match(rf"python -m ghostfunc attribute: error: {said}", err.splitlines()[-1]), err.splitlines()[-1]
    assert not (run / "trajectory" / "unrolled.pt").exists()


def test_a_recordings_options_are_not_read_against_the_current_folder(recorded: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The options a recording names are its run's, resolved when it ran: read again against the current folder, a
    preset's name (``gpt2``) was a path where that folder held a ``gpt2/``, and the run's own recording was refused
    as another run's (h92)."""
    cfg = loop.resolve_run(json.loads((recorded / "config.json").read_text()), recorded)
    spec = json.loads((recorded / "trajectory" / "spec.json").read_text())
    (tmp_path / cfg["model"]).mkdir()
    monkeypatch.chdir(tmp_path)
    loop.check_recording(cfg, spec["kwargs"]["config"], str(recorded))
    with pytest.raises(ghostfunc._run.data.UsageError, match=r"--run: the recording in .* --seed 1; this run has 0"):
        loop.check_recording(cfg, {**spec["kwargs"]["config"], "seed": 1}, str(recorded))
