"""Interrupted training: a run stopped by Ctrl-C or SIGTERM or killed outright continues with --resume to
the same result as an uninterrupted run; saves are atomic; a diverging run stops and keeps its last good
checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from age_detect_resnet.atomic import write_text_atomic
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import RegressionHead
from age_detect_resnet.modeling.model import create_model
from age_detect_resnet.training import run as training_run
from age_detect_resnet.training import state as training_state
from conftest import UTKFACE, require

EPOCHS = 3
# The columns that must not depend on whether the run was interrupted (time and speed do).
COMPARED = ["epoch", "train_loss", "train_mae", "val_loss", "val_mae", "lr"]


def _train_args(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    """30 images at 32 px: 3 steps of 8 per epoch, about a second each on a CPU. Random augmentation, so
    that a resumed run only matches if the random number generators are restored too."""
    fixed = shlex.split(
        "--dataset utkface --limit 30 --backbone mobilenet_v2 --no-pretrained --image-size 32 --batch-size 8 "
        "--num-workers 0 --lr 1e-3 --augment light --no-progress --grid-size 0 --no-tensorboard "
        "--deterministic --precision fp32"
    )
    return [*fixed, "--epochs", str(epochs), "--data-root", str(data), "--out", str(out), *extra]


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "age_detect_resnet.train", *_train_args(data, out, *extra)]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    # No face detector: measuring the crop framing has nothing to do with resuming and costs seconds.
    # One thread: no OpenMP threads spinning against each other on a busy 2-core CI machine.
    env = {**os.environ, "AGE_DETECT_YUNET_MODEL": str(log.parent / "no-detector.onnx")}
    env["OMP_NUM_THREADS"] = "1"
    with log.open("ab") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, preexec_fn=_default_ctrl_c
        )


def _default_ctrl_c() -> None:
    """In the child, before it starts: SIGINT raises KeyboardInterrupt again. A test run started in the
    background (`cmd &` in a script, nohup) inherits SIGINT ignored, and Python then keeps it ignored,
    so the Ctrl-C below would do nothing and the run would finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finished_epochs(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def _wait_for_epochs(process: subprocess.Popen, run: Path, epochs: int, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while _finished_epochs(run) < epochs:
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before epoch {epochs}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"epoch {epochs} did not finish within {timeout} s")
        time.sleep(0.05)


def _run_to_end(command: list[str], log: Path) -> None:
    process = _start(command, log)
    assert process.wait(timeout=600) == 0, log.read_text()


def _assert_saved_state_is_usable(run: Path) -> int:
    """The latest checkpoint and model load; returns the epoch the checkpoint holds."""
    state = training_state.read_state(run / "last.pt")
    assert len(state["history"]) == state["epoch"]
    checkpoint.load_model(run / "best.safetensors")
    assert _finished_epochs(run) >= state["epoch"]
    return state["epoch"]


@pytest.fixture(scope="module")
def utkface_data(tmp_path_factory) -> Path:
    source = require(UTKFACE)
    names = sorted(p.name for p in source.glob("*.jpg") if 10 <= int(p.name.split("_")[0]) <= 75)
    folder = tmp_path_factory.mktemp("utkface")
    for name in names[:: max(1, len(names) // 60)][:60]:
        shutil.copy(source / name, folder / name)
    return folder


def test_interrupted_and_killed_run_resumes_to_the_uninterrupted_result(utkface_data, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    log = tmp_path / "resumed.log"
    _run_to_end(_train_command(utkface_data, reference), tmp_path / "reference.log")

    # Ctrl-C during epoch 2: exit code 130 and a hint to resume; the saved state is complete.
    process = _start(_train_command(utkface_data, resumed), log)
    _wait_for_epochs(process, resumed, 1, log)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, log.read_text()
    assert f"the last finished epoch is saved in {resumed / 'last.pt'}" in log.read_text()
    assert "--resume" in log.read_text()
    interrupted_at = _assert_saved_state_is_usable(resumed)
    assert not list(resumed.glob("*.tmp")) and not list(resumed.glob(".*.tmp")), "Ctrl-C leaves no temp files"

    # Killed outright (SIGKILL: no clean-up at all) during the next epoch of the resumed run.
    process = _start(_train_command(utkface_data, resumed, "--resume"), log)
    _wait_for_epochs(process, resumed, interrupted_at + 1, log)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = _assert_saved_state_is_usable(resumed)
    assert interrupted_at < killed_at < EPOCHS, "the kill must land before the last epoch to test anything"

    _run_to_end(_train_command(utkface_data, resumed, "--resume"), log)
    text = log.read_text()
    assert f"resuming {resumed} after epoch {interrupted_at}" in text
    assert f"resuming {resumed} after epoch {killed_at}" in text

    expected, got = pd.read_csv(reference / "metrics.csv"), pd.read_csv(resumed / "metrics.csv")
    assert list(got["epoch"]) == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(got[COMPARED], expected[COMPARED], rtol=1e-4)
    first = training_state.read_state(reference / "last.pt")
    second = training_state.read_state(resumed / "last.pt")
    for name, tensor in first["model"].items():
        torch.testing.assert_close(second["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key, slot in first["optimizer"]["state"].items():
        for name, value in slot.items():
            torch.testing.assert_close(second["optimizer"]["state"][key][name], value, rtol=1e-4, atol=1e-6)
    reference_mae = json.loads((reference / "evaluation.json").read_text())["metrics"]["mae"]
    resumed_mae = json.loads((resumed / "evaluation.json").read_text())["metrics"]["mae"]
    assert math.isclose(resumed_mae, reference_mae, abs_tol=0.01), (resumed_mae, reference_mae)


def test_a_kill_during_a_checkpoint_save_never_leaves_a_broken_latest_file(tmp_path):
    """SIGKILL while torch.save is writing a 40 MB state: last.pt stays the previous, complete state."""
    target = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import torch
        from age_detect_resnet.training import state as training_state
        for i in range(1_000_000):
            state = {{"epoch": i, "weights": torch.full((10_000_000,), float(i))}}
            training_state.write_state({str(target)!r}, state)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not target.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the saving child did not start"
            time.sleep(0.01)
        # Saves now run back to back; catch one in progress (its temp file exists), or give up after 5 s.
        deadline = time.monotonic() + 5
        while not list(tmp_path.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    state = training_state.read_state(target)
    assert state["epoch"] >= 0 and bool((state["weights"] == state["epoch"]).all()), "last.pt mixes two saves"


def test_ctrl_c_during_a_save_keeps_the_previous_file_and_removes_the_temp(tmp_path, monkeypatch):
    report = tmp_path / "report.md"
    write_text_atomic(report, "# finished report\n")
    state_file = tmp_path / "last.pt"
    training_state.write_state(state_file, {"epoch": 1})

    def interrupted_write(self, text, *args, **kwargs):
        with self.open("w") as handle:
            handle.write(text[:3])
        raise KeyboardInterrupt

    def interrupted_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted_write)
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(report, "# half-written report that must never appear\n")
    with pytest.raises(KeyboardInterrupt):
        training_state.write_state(state_file, {"epoch": 2})
    monkeypatch.undo()

    assert report.read_text() == "# finished report\n"
    assert training_state.read_state(state_file) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "report.md"]


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(
    utkface_sample, tmp_path, monkeypatch, caplog
):
    """The loss turns NaN at the third step of epoch 2: exit code 2, epoch 1's files are intact."""
    real_loss = RegressionHead.loss
    seen = {"validations": 0, "steps_after": 0}

    def loss_turning_nan(self, outputs, ages, weights=None):
        loss = real_loss(self, outputs, ages, weights)
        if not self.training:
            seen["validations"] += 1
            return loss
        if seen["validations"]:
            seen["steps_after"] += 1
            if seen["steps_after"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(RegressionHead, "loss", loss_turning_nan)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert train_main(_train_args(utkface_sample, out)) == 2

    assert any("at epoch 2, step 2" in r.getMessage() and "--lr" in r.getMessage() for r in caplog.records), (
        caplog.text
    )
    # --resume keeps the run's --lr: a lower one is a new run, which may start from the kept best model.
    assert f"kept in {out / 'last.pt'}" in caplog.text and "--resume keeps the run's --lr" in caplog.text
    assert f"train into a new --out with a lower --lr, from this run's best model with --init {out}" in (
        caplog.text
    )
    state = training_state.read_state(out / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    model = checkpoint.load_model(out / "best.safetensors")
    assert model.metadata["epoch"] == 1
    assert len(pd.read_csv(out / "metrics.csv")) == 1
    assert not list(out.glob(".*.tmp"))


def test_sigterm_mid_epoch_keeps_the_last_finished_epoch_as_ctrl_c_does(
    utkface_sample, tmp_path, monkeypatch, caplog
):
    """A cluster scheduler ends a job with SIGTERM: during epoch 2 here. Exit status 143, epoch 1 kept,
    and the message says how to continue."""
    real_epoch = training_run.train_one_epoch

    def terminated_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(training_run, "train_one_epoch", terminated_in_epoch_2)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert train_main(_train_args(utkface_sample, out, epochs=2)) == 128 + signal.SIGTERM
    assert f"interrupted by SIGTERM; the last finished epoch is saved in {out / 'last.pt'}" in caplog.text
    assert "the same command plus --resume" in caplog.text
    assert _assert_saved_state_is_usable(out) == 1
    assert not list(out.glob(".*.tmp"))


def test_resume_without_a_checkpoint_says_how_to_start(utkface_sample, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert train_main(_train_args(utkface_sample, tmp_path / "run", "--resume", epochs=1)) == 2
    assert "nothing to resume" in caplog.text and "start without --resume" in caplog.text
    assert not (tmp_path / "run").exists(), "a refused resume creates nothing"
    # A training state without the settings it was trained with cannot be continued as they were.
    bare = tmp_path / "bare"
    bare.mkdir()
    training_state.write_state(bare / "last.pt", {"epoch": 1})
    assert train_main(_train_args(utkface_sample, bare, "--resume", epochs=1)) == 2
    assert f"{bare / 'config.json'} does not exist" in caplog.text and "a new --out" in caplog.text
    assert [p.name for p in bare.iterdir()] == ["last.pt"]


def test_ctrl_c_before_the_first_epoch_finished_says_there_is_nothing_to_resume(
    utkface_sample, tmp_path, monkeypatch, caplog
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "train_one_epoch", interrupted)
    args = _train_args(utkface_sample, tmp_path / "run", epochs=1)
    with caplog.at_level(logging.ERROR):
        assert train_main(args) == 130
    assert "nothing was saved to resume; run the same command again" in caplog.text
    assert "plus --resume" not in caplog.text
    monkeypatch.undo()
    assert train_main(args) == 0, "the same command again trains the run"


def test_a_training_state_of_another_model_is_refused_by_name(tmp_path):
    """A last.pt that does not fit the run's settings (config.json edited) is named, with no traceback."""

    def training_state_of(head: str) -> training_state.TrainingState:
        model = create_model("mobilenet_v2", head, pretrained=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return training_state.TrainingState(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer))

    path = tmp_path / "last.pt"
    training_state_of("regression").save(path)
    with pytest.raises(checkpoint.ModelFileError, match=r"last\.pt does not fit .*size mismatch for head"):
        training_state_of("distribution").restore(path)


def test_model_state_round_trips_through_the_training_state(tmp_path):
    """What --resume restores is exactly what was saved (weights, optimizer moments, RNG streams)."""
    model = create_model("mobilenet_v2", "regression", pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 3, 40, 40)).sum().backward()
    optimizer.step()
    torch.manual_seed(123)
    path = tmp_path / "last.pt"
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": training_state.rng_state(),
    }
    training_state.write_state(path, state)
    expected_draw = torch.rand(3)

    state = training_state.read_state(path)
    training_state.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name
    saved = optimizer.state_dict()["state"]
    for key, slot in saved.items():
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg"], slot["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temp file is left behind"
