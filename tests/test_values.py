"""DataValues: accumulation by dataset index, indices that match the samples, atomic save, crash and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ghostfunc
from ghostfunc._values import RecordingError

DT = torch.float64


def test_add_accumulates_by_index():
    dv = ghostfunc.DataValues.zeros(5)
    dv2 = dv.add(torch.tensor([3, 0, 3]), torch.tensor([1.0, 2.0, 4.0]))
    assert dv.steps == 0 and dv.total.abs().sum() == 0  # immutable
    assert dv2.total.tolist() == [2.0, 0, 0, 5.0, 0] and dv2.count.tolist() == [1, 0, 0, 2, 0] and dv2.steps == 1
    dv3 = dv2.add(torch.tensor([1]), torch.tensor([-1.5], dtype=torch.float32))
    assert dv3.total.dtype == DT and dv3.total.tolist() == [2.0, -1.5, 0, 5.0, 0]
    mean = dv3.mean
    assert mean[3] == 2.5 and mean[1] == -1.5 and torch.isnan(mean[2])
    assert len(dv3) == 5


def test_vector_values():
    dv = ghostfunc.DataValues.zeros(3, shape=(2,)).add(torch.tensor([2, 2]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert dv.total.tolist() == [[0, 0], [0, 0], [4.0, 6.0]] and dv.mean[2].tolist() == [2.0, 3.0]


def test_add_takes_numpy_and_list_indices_and_values():
    """A batch's NumPy index leaf rides through a training step as it came: ``add(batch["index"], info.values)``
    takes it (and NumPy values, a list of ints) as the tensor it stands for; a bool mask is still refused."""
    import numpy as np

    want = ghostfunc.DataValues.zeros(5).add(torch.tensor([0, 3, 3]), torch.tensor([0.5, 0.25, 1.0], dtype=DT))
    for indices, values in ((np.array([0, 3, 3]), np.array([0.5, 0.25, 1.0])), ([0, 3, 3], [0.5, 0.25, 1.0]),
                            (np.array([0, 3, 3], dtype=np.int32), torch.tensor([0.5, 0.25, 1.0]))):
        got = ghostfunc.DataValues.zeros(5).add(indices, values)
        assert torch.equal(got.total, want.total) and torch.equal(got.count, want.count)
    with pytest.raises(TypeError, match=r"^DataValues.add: indices must be a 1-D integer tensor.*torch.bool"):
        ghostfunc.DataValues.zeros(5).add(np.array([True, False, True]), torch.zeros(3))
    with pytest.raises(TypeError, match=r"^DataValues.add: values must be a tensor \[B, \.\.\.\] \(e.g. info.values\); "
                                        r"got str"):
        ghostfunc.DataValues.zeros(5).add([0], "0.5")


def test_add_errors():
    dv = ghostfunc.DataValues.zeros(4)
    with pytest.raises(TypeError, match=r"^DataValues.add: indices must be a 1-D integer tensor"):
        dv.add(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"^DataValues.add: values must have shape \(2,\) \(one value per index\); got \(3,\)"):
        dv.add(torch.tensor([0, 1]), torch.zeros(3))
    with pytest.raises(IndexError, match=r"^DataValues.add: indices must lie in \[0, 4\); got min 0, max 4"):
        dv.add(torch.tensor([0, 4]), torch.zeros(2))
    with pytest.raises(IndexError, match=r"got min 1, max 9223372036854775808$"):  # (as given: int64 wraps it, h57)
        dv.add(np.array([2**63, 1], dtype=np.uint64), torch.zeros(2))
    with pytest.raises(FloatingPointError, match=r"^DataValues.add: values contain non-finite entries at rows \[1\]"):
        dv.add(torch.tensor([0, 1]), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"^DataValues.zeros: n must be a positive int"):
        ghostfunc.DataValues.zeros(0)
    with pytest.raises(TypeError, match=r"^DataValues.zeros: shape must be a tuple of ints >= 0 .*; got 3$"):
        ghostfunc.DataValues.zeros(5, shape=3)  # type: ignore[arg-type]
    for bad in (torch.tensor([1 + 2j, 3j]), torch.tensor([True, False])):  # the imaginary part was dropped
        with pytest.raises(TypeError, match=rf"^DataValues.add: values must be real numbers .*; got {bad.dtype}$"):
            dv.add(torch.tensor([0, 1]), bad)


def test_save_drops_the_secant_cache_wherever_the_train_state_sits(tmp_path):
    """A state holding a secant TrainState inside a dict (``{"train": state, ...}``) saves as the TrainState itself
    does: its cached validation gradient (which holds the model_fn, not picklable) is left out."""
    step = ghostfunc.train_step(linear_fn, ghostfunc.sgd(0.1), order=2, curvature="secant")
    batch = {"x": torch.randn(3, 2, dtype=torch.float64)}
    state, _ = step(step.init({"w": torch.zeros(2, dtype=torch.float64)}), batch, batch)
    assert state.val_grad is not None
    dv = ghostfunc.DataValues.zeros(3)
    dv.save(tmp_path / "v.pt", state={"train": state, "epoch": [state, 2]})
    _, back = ghostfunc.DataValues.load(tmp_path / "v.pt", with_state=True)
    assert back["train"].val_grad is None and back["epoch"][0].val_grad is None and back["epoch"][1] == 2
    torch.testing.assert_close(back["train"].params["w"], state.params["w"], rtol=0, atol=0)


def linear_fn(p, batch):
    """Loss linear in the parameters: g_i = x_i at every θ, so each value is known in closed form."""
    return batch["x"] @ p["w"]


def test_indices_match_samples_through_a_shuffling_loader():
    """Values land on the index of the sample that earned them (GhostSuite's indices did not match).

    With ``ℓ(θ; z) = <x, θ>`` and SGD, ``φ_i = −(lr/n)·<x_i, x̄_val>`` at every step, so
    after training sample ``i`` holds ``count_i`` times its own closed-form value.
    """
    g = torch.Generator().manual_seed(0)
    n_data, d, bs, lr = 37, 5, 4, 0.1
    x = torch.randn(n_data, d, generator=g, dtype=DT)
    val = {"x": torch.randn(6, d, generator=g, dtype=DT), "index": torch.arange(6)}
    dataset = torch.utils.data.TensorDataset(x, torch.arange(n_data))
    loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(1))
    step = ghostfunc.train_step(linear_fn, ghostfunc.sgd(lr))
    state = step.init({"w": torch.zeros(d, dtype=DT)})
    values = ghostfunc.DataValues.zeros(n_data)
    for _ in range(3):
        for xb, idx in loader:
            state, info = step(state, {"x": xb, "index": idx}, val)
            values = values.add(idx, info.values)
    expected = -(lr / bs) * (x @ val["x"].mean(0)) * values.count.to(DT)
    torch.testing.assert_close(values.total, expected, rtol=1e-12, atol=1e-15)
    assert values.count.sum() == 3 * (n_data // bs) * bs and values.steps == 3 * (n_data // bs)
    assert len(set(values.count.tolist())) > 1  # drop_last makes counts differ: a permutation would be caught


def test_save_load_roundtrip_with_state(tmp_path):
    params = {"w": torch.randn(3, 2, dtype=DT), "b": torch.zeros(2, dtype=DT)}
    opt = ghostfunc.adamw(0.1)
    state = ghostfunc.TrainState(params, opt.init(params), 7)
    dv = ghostfunc.DataValues.zeros(4).add(torch.tensor([1, 2]), torch.tensor([0.5, -0.25]))
    path = tmp_path / "sub" / "values.pt"
    dv.save(path, state=state)
    back = ghostfunc.DataValues.load(path)
    assert torch.equal(back.total, dv.total) and torch.equal(back.count, dv.count) and back.steps == 1
    back2, st = ghostfunc.DataValues.load(path, with_state=True)
    assert isinstance(st, ghostfunc.TrainState) and isinstance(st.opt_state, ghostfunc.AdamWState)
    assert st.step == 7 and all(torch.equal(st.params[k], params[k]) for k in params)
    assert sorted(os.listdir(path.parent)) == ["values.pt"]  # no temporary files left


def test_save_refuses_a_state_load_could_not_read_back(tmp_path):
    """load reads with weights_only=True: a state holding a numpy array, a Path or a class of its own was written
    and then refused as "not a file written by DataValues.save". save refuses it first, writing nothing, and
    says what to store instead; a state the user allowed by add_safe_globals round-trips."""
    import argparse
    import collections

    import numpy as np

    dv = ghostfunc.DataValues.zeros(4).add(torch.tensor([1]), torch.tensor([0.5]))
    path = tmp_path / "values.pt"
    for bad in ({"perm": np.arange(4)}, {"where": Path("runs")}, [argparse.Namespace(epoch=3)]):
        with pytest.raises(TypeError, match=r"^DataValues.save: state holds what DataValues.load cannot read back "
                                            r"\(it loads with weights_only=True\): .*GLOBAL .*torch.from_numpy"):
            dv.save(path, state=bad)
        assert not path.exists() and not os.listdir(tmp_path)
    fine = {"epoch": 3, "order": torch.randperm(4), "rng": torch.get_rng_state(), "names": ["a", None],
            "nested": ({"lr": 0.1},), "dtype": torch.float32, "ordered": collections.OrderedDict(a=1)}
    dv.save(path, state=fine)
    _, state = ghostfunc.DataValues.load(path, with_state=True)
    assert state["epoch"] == 3 and torch.equal(state["order"], fine["order"]) and state["ordered"] == {"a": 1}
    with pytest.raises(IsADirectoryError, match=r"^DataValues.save: path .* is a folder; expected the file"):
        dv.save(tmp_path)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "values.pt"
    ghostfunc.DataValues.zeros(3).add(torch.tensor([0]), torch.tensor([1.0])).save(path)
    before = path.read_bytes()

    def torn(obj, fh, *args, **kwargs):
        fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        ghostfunc.DataValues.zeros(3).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["values.pt"]


def test_load_rejects_other_files(tmp_path):
    torch.save({"total": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(RecordingError, match=r"^DataValues.load: .* is not a file written by "
                                                      r"DataValues.save"):  # (as a truncated one: h83)
        ghostfunc.DataValues.load(tmp_path / "x.pt")


def test_add_keeps_no_inputs():
    """Only the [N] sums are kept: nothing of a batch survives an add."""
    dv = ghostfunc.DataValues.zeros(10)
    for _ in range(20):
        dv = dv.add(torch.randint(0, 10, (4,)), torch.randn(4))
    assert set(vars(dv)) == {"total", "count", "steps", "synced", "loaded"} and dv.synced is None  # synced: [N] sums too
    assert dv.loaded is False  # a flag: whether load() read it without group=
    assert dv.total.shape == (10,) and dv.count.shape == (10,)


# ---------------------------------------------------------------- crash and resume

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    import ghostfunc

    torch.set_num_threads(1)
    ckpt, out, steps, every, pause = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

    def model_fn(p, batch):
        h = torch.tanh(F.linear(batch["x"], p["w1"], p["b1"]))
        return F.cross_entropy(F.linear(h, p["w2"]), batch["y"], reduction="none")

    g = torch.Generator().manual_seed(0)
    n, bs = 40, 8
    data = {"x": torch.randn(n, 4, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (n,), generator=g),
            "index": torch.arange(n)}
    val = {"x": torch.randn(6, 4, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (6,), generator=g),
           "index": torch.arange(6)}
    params = {"w1": torch.randn(5, 4, generator=g, dtype=torch.float64), "b1": torch.zeros(5, dtype=torch.float64),
              "w2": torch.randn(3, 5, generator=g, dtype=torch.float64)}
    step = ghostfunc.train_step(model_fn, ghostfunc.adamw(0.05), order=2)

    if ckpt.exists():
        values, state = ghostfunc.DataValues.load(ckpt, with_state=True)
        print(f"resumed {state.step}", flush=True)
    else:
        values, state = ghostfunc.DataValues.zeros(n), step.init(params)

    def batch_indices(t):  # a pure function of the step: the batch order survives a restart
        per_epoch = n // bs
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + t // per_epoch))
        return order[(t % per_epoch) * bs:(t % per_epoch + 1) * bs]

    while state.step < steps:
        batch = {k: v[batch_indices(state.step)] for k, v in data.items()}
        state, info = step(state, batch, val)
        values = values.add(batch["index"], info.values)
        if state.step % every == 0:
            values.save(ckpt, state=state)
            print(f"saved {state.step}", flush=True)
        time.sleep(pause)
    values.save(out, state=state)
    print("done", flush=True)
""")


def run_to_completion(script: Path, ckpt: Path, out: Path, steps: int) -> list[str]:
    res = subprocess.run([sys.executable, str(script), str(ckpt), str(out), str(steps), "4", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split("\n")


def test_kill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    steps = 22

    # an uninterrupted run
    run_to_completion(script, tmp_path / "a.ckpt", tmp_path / "a.out", steps)

    # a run killed (SIGKILL: no clean-up) between two saves, after the second one
    ckpt, out = tmp_path / "b.ckpt", tmp_path / "b.out"
    seen = []
    with subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), str(steps), "4", "0.05"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.startswith("saved 8"):
                os.kill(proc.pid, signal.SIGKILL)
                break
        err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, (seen, err)
    assert not out.exists() and ckpt.exists()
    killed_at, state_8 = ghostfunc.DataValues.load(ckpt, with_state=True)
    assert killed_at.steps == 8 and state_8.step == 8 and state_8.opt_state.step == 8

    lines = run_to_completion(script, ckpt, out, steps)
    assert lines[0] == "resumed 8" and "done" in lines

    a, state_a = ghostfunc.DataValues.load(tmp_path / "a.out", with_state=True)
    b, state_b = ghostfunc.DataValues.load(out, with_state=True)
    assert a.steps == b.steps == steps
    assert torch.equal(a.total, b.total) and torch.equal(a.count, b.count)
    assert all(torch.equal(state_a.params[k], state_b.params[k]) for k in state_a.params)
    assert a.total.abs().min() > 0  # every sample got a value
    assert max((state_b.params[k] - state_8.params[k]).abs().max() for k in state_8.params) > 1e-3  # it trained



def test_load_refuses_files_add_could_not_use_and_names_the_file(tmp_path):
    """A file must hold what save writes: float64 totals, int64 counts >= 0, finite values, an int step
    count; anything else (another version, a hand-made or truncated file) is refused naming the file."""
    import numpy as np

    from ghostfunc._values import FORMAT

    good = {"format": FORMAT, "total": torch.zeros(3, dtype=torch.float64), "count": torch.zeros(3, dtype=torch.int64),
            "steps": 0, "state": None}
    bad = {"float32 total": {**good, "total": torch.zeros(3)}, "float count": {**good, "count": torch.zeros(3)},
           "nan total": {**good, "total": torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)},
           "negative count": {**good, "count": torch.tensor([0, -1, 0])},
           "no steps": {k: v for k, v in good.items() if k != "steps"}}
    for name, payload in bad.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        with pytest.raises(ValueError, match=r"^DataValues.load: '.*\.pt' (holds|lacks)"):
            ghostfunc.DataValues.load(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^DataValues.load: '.*garbage.pt' is not a file written by DataValues.save"):
        ghostfunc.DataValues.load(garbage)
    with pytest.raises(TypeError, match="total must be float64 and count int64"):
        ghostfunc.DataValues(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    assert len(ghostfunc.DataValues.zeros(np.int64(3))) == 3


def test_add_refuses_a_mask_as_indices_and_save_gives_the_usual_file_mode(tmp_path):
    values = ghostfunc.DataValues.zeros(3)
    with pytest.raises(TypeError, match="indices must be a 1-D integer tensor.*torch.bool"):
        values.add(torch.tensor([True, False]), torch.tensor([1.0, 2.0]))
    mask = os.umask(0o22)
    try:
        values.save(tmp_path / "v.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "v.pt").stat().st_mode & 0o777 == 0o644


def test_constructor_refuses_what_load_would_refuse_naming_the_field(tmp_path):
    """Totals, counts and a step count that load refuses are refused where the values are made (save wrote them
    and the file could not be read back at resume time); the message names the field, what it must be and what
    came."""
    total, count = torch.zeros(2, dtype=DT), torch.zeros(2, dtype=torch.int64)
    bad = [({"total": torch.tensor([1.0, float("nan")], dtype=DT)}, ValueError,
            r"^DataValues: total must be finite .*; got NaN or inf at rows \[1\]$"),
           ({"total": torch.tensor([float("inf"), 0.0], dtype=DT)}, ValueError, r"^DataValues: total must be finite"),
           ({"count": torch.tensor([0, -1])}, ValueError, r"^DataValues: count must be >= 0 .*at rows \[1\]$"),
           ({"steps": -1}, ValueError, r"^DataValues: steps must be an int >= 0 .*; got -1$"),
           ({"steps": "a"}, TypeError, r"^DataValues: steps must be an int >= 0 .*; got 'a' \(a str\)$"),
           ({"steps": 2.0}, TypeError, r"^DataValues: steps must be an int >= 0 .*; got 2.0 \(a float\)$"),
           ({"steps": True}, TypeError, r"^DataValues: steps must be an int >= 0 .*; got True \(a bool\)$"),
           ({"synced": 5}, TypeError, r"^DataValues: synced must be None or DataValues shaped like total \(2,\).*"
                                      r"got a int$"),
           ({"total": torch.zeros(2, dtype=DT, device="meta")}, ValueError,
            r"^DataValues: total must be a tensor that holds values .*; got one on the meta device$")]
    for change, error, message in bad:
        fields = {"total": total, "count": count, "steps": 0, **change}
        with pytest.raises(error, match=message):
            ghostfunc.DataValues(**fields)
    import numpy as np

    made = ghostfunc.DataValues(total, count, np.int64(3))
    assert type(made.steps) is int and made.steps == 3
    made.save(tmp_path / "v.pt")
    assert ghostfunc.DataValues.load(tmp_path / "v.pt").steps == 3


def test_save_refuses_a_state_that_cannot_be_pickled_with_a_type_error_and_writes_nothing(tmp_path):
    """A lambda or a lock in the state: pickle's own AttributeError / TypeError came out of save; the README
    promises a TypeError naming the problem, before anything is written."""
    import threading

    for state in ({"schedule": lambda count: 0.1}, {"lock": threading.Lock()}):
        with pytest.raises(TypeError, match=r"^DataValues.save: state holds what cannot be saved at all "
                                            r"\(torch.save: \w+: .*(pickle|lock)"):
            ghostfunc.DataValues.zeros(2).save(tmp_path / "v.pt", state=state)
    assert list(tmp_path.iterdir()) == []


def test_add_refuses_meta_tensors_naming_the_argument():
    values = ghostfunc.DataValues.zeros(3)
    with pytest.raises(ValueError, match=r"^DataValues.add: indices must be a tensor that holds values .*; got one on the meta device"):
        values.add(torch.tensor([0, 1], device="meta"), torch.ones(2))
    with pytest.raises(ValueError, match=r"^DataValues.add: values must be a tensor that holds values .*; got one on the meta device"):
        values.add(torch.tensor([0, 1]), torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"^DataValues.add: keep must be a tensor that holds values .*; got one on the meta device"):
        values.add(torch.tensor([0, 1]), torch.ones(2), keep=torch.ones(2, dtype=torch.bool, device="meta"))
