"""What `--resume` continues and what it refuses: a config file counts as the command line, a finished run
stays finished, the saved best model is what later epochs must beat, a run is not shortened, paths are
places, and the messages of runs that cannot go on say what to do."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from age_detect_resnet.cli import train as train_cli
from age_detect_resnet.cli.pipeline import main as pipeline_main
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import RegressionHead
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.training import state as training_state
from conftest import train_tiny

# The files whose bytes say what a run is; a resume that may change nothing leaves them as they were.
RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.safetensors", "best.json", "report.md")


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES}


def _epochs(run: Path) -> list[int]:
    return pd.read_csv(run / "metrics.csv")["epoch"].tolist()


def test_a_config_file_given_with_resume_counts_as_the_command_line(utkface_sample, tmp_path, caplog):
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1", "--norm-batches", "0")
    kept = _files(run)
    lr = tmp_path / "lr.toml"
    lr.write_text("[optim]\nlr = 0.01\n")
    with caplog.at_level(logging.ERROR):
        assert train_main(["--out", str(run), "--resume", "--config", str(lr)]) == 2
    assert "--lr 0.001 saved, 0.01 requested" in caplog.text and _files(run) == kept
    # The pipeline continues the run on the data its config.json names (no --data-root: no dataset
    # hunt, no recipe layered over the run), and a file's --epochs applies as the option's would.
    epochs = tmp_path / "epochs.toml"
    epochs.write_text("[train]\nepochs = 2\n")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert pipeline_main(["--out", str(run), "--resume", "--config", str(epochs), "--no-progress"]) == 0
    assert "download" not in caplog.text.lower() and "packaged recipe" not in caplog.text
    assert _epochs(run) == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_a_run_its_rule_stopped_is_finished_and_resume_only_completes_its_report(
    utkface_sample, tmp_path, caplog
):
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "5", "--min-delta", "1000")
    assert _epochs(run) == [1, 2]  # the validation loss always moves less than 1000: stopped after 2
    kept = _files(run)
    with caplog.at_level(logging.INFO):
        train_tiny(utkface_sample, run, "--resume", "--epochs", "5", "--min-delta", "1000")
    assert "is finished (stopped early after epoch 2" in caplog.text and "nothing was changed" in caplog.text
    assert _files(run) == kept
    # Interrupted after it stopped but before its report: the resume tests and reports its model, and
    # trains nothing.
    (run / "report.md").unlink()
    train_tiny(utkface_sample, run, "--resume", "--epochs", "5", "--min-delta", "1000")
    assert (run / "report.md").is_file() and "stopped early after epoch 2" in (run / "report.md").read_text()
    assert {name: (run / name).read_bytes() for name in RUN_FILES[1:5]} == {
        name: kept[name] for name in RUN_FILES[1:5]
    }
    # A run is not shortened: fewer epochs than it trained are refused, and nothing changes.
    kept = _files(run)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train_main(["--out", str(run), "--resume", "--epochs", "1"]) == 2
    assert "--epochs 1 is fewer than the 2 epochs" in caplog.text and _files(run) == kept


def test_a_continued_run_compares_its_epochs_with_the_saved_best_model(utkface_sample, tmp_path):
    """A kept batch-norm recompute makes the saved best model better than last.pt's best epoch: later
    epochs must beat the saved model. Here last.pt's best MAE is made huge and best.json's tiny."""
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1", "--norm-batches", "0")
    state = training_state.read_state(run / "last.pt")
    state["best_mae"] = 1e9
    training_state.write_state(run / "last.pt", state)
    metadata = json.loads((run / "best.json").read_text())
    metadata["val_mae"] = 1e-6
    (run / "best.json").write_text(json.dumps(metadata))
    best = (run / "best.safetensors").read_bytes()
    train_tiny(utkface_sample, run, "--resume", "--norm-batches", "0")
    assert _epochs(run) == [1, 2]
    assert (run / "best.safetensors").read_bytes() == best, "a worse epoch replaced the saved best model"
    assert training_state.read_state(run / "last.pt")["best_mae"] == 1e-6


def test_a_data_root_is_compared_as_the_folder_and_may_move_with_its_images(
    utkface_sample, tmp_path, monkeypatch, caplog
):
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1", "--norm-batches", "0")
    kept = _files(run)
    monkeypatch.chdir(tmp_path)
    for same in (f"{utkface_sample}/", os.path.relpath(utkface_sample)):  # the same folder: accepted
        assert train_main(["--out", str(run), "--resume", "--data-root", same]) == 0, same
        assert _files(run) == kept  # finished and reported: nothing to do
    # Moved, missing an image: refused, naming it.
    lacking = shutil.copytree(utkface_sample, tmp_path / "lacking")
    gone = sorted(lacking.iterdir())[0]
    gone.unlink()
    with caplog.at_level(logging.ERROR):
        assert train_main(["--out", str(run), "--resume", "--data-root", str(lacking)]) == 2
    assert f"'{lacking}' requested (it lacks 1 of the run's images in split.csv, e.g. {gone.name})" in (
        caplog.text
    )
    assert _files(run) == kept
    # Moved whole: the run goes on from there, and config.json says where its data now is.
    moved = utkface_sample.rename(tmp_path / "moved")
    train_tiny(moved, run, "--resume", "--norm-batches", "0")
    assert _epochs(run) == [1, 2]
    assert json.loads((run / "config.json").read_text())["data"]["data_root"] == str(moved)


def test_a_training_state_that_cannot_be_read_says_how_to_go_on(tmp_path):
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.ModelFileError) as caught:
        training_state.read_state(last)
    message = str(caught.value)
    assert "not a training state this project wrote" in message and "new --out" in message
    assert "move last.pt out of it" in message and "--init" not in message  # no best model to start from
    (last.parent / "best.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.ModelFileError, match=rf"--init {last.parent}.*last\.pt and best"):
        training_state.read_state(last)


def test_a_diverging_first_epoch_says_to_rerun_with_a_lower_lr(utkface_sample, tmp_path, monkeypatch, caplog):
    def nan_loss(self, outputs, ages, weights=None):
        return outputs.sum() * float("nan")

    monkeypatch.setattr(RegressionHead, "loss", nan_loss)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR), pytest.raises(AssertionError):
        train_tiny(utkface_sample, out, "--epochs", "1")
    assert "at epoch 1, step 0: no epoch had finished, so nothing was kept" in caplog.text
    assert "run the same command with a lower --lr" in caplog.text and "--init" not in caplog.text
    RunFolder(out).check_new()  # and that command may train into the same --out


def test_an_out_that_is_a_file_is_refused_in_one_line(utkface_sample, tmp_path, caplog):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    for out in (taken, taken / "run"):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert (
                train_main(["--dataset", "utkface", "--data-root", str(utkface_sample), "--out", str(out)])
                == 2
            )
        assert f"{taken} is a file, not a folder; choose another --out" in caplog.text
        assert "Errno" not in caplog.text
    assert taken.read_text() == "mine\n"


def _interrupt_with(monkeypatch, tmp_path, interrupt) -> list[str]:
    """Run `train` (replaced by `interrupt`) through the command line; its exit status and the log."""
    monkeypatch.setattr(train_cli, "train", lambda *args, **kwargs: interrupt())
    return ["--dataset", "utkface", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")]


def test_sigterm_is_an_interruption_with_its_own_exit_status(tmp_path, monkeypatch, caplog):
    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not interrupt training")

    before = signal.getsignal(signal.SIGTERM)
    args = _interrupt_with(monkeypatch, tmp_path, terminate)
    with caplog.at_level(logging.ERROR):
        assert train_main(args) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM before an epoch finished" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is put back"


def test_under_torchrun_only_rank_0_says_it_was_interrupted(tmp_path, monkeypatch, caplog):
    def ctrl_c():
        raise KeyboardInterrupt

    args = _interrupt_with(monkeypatch, tmp_path, ctrl_c)
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.ERROR):
        assert train_main(args) == 130
    assert "interrupted" not in caplog.text
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.ERROR):
        assert train_main(args) == 130
    assert "interrupted before an epoch finished" in caplog.text


def test_pipeline_resume_without_out_finds_the_run_as_a_new_run_does(utkface_sample, monkeypatch):
    """Without --out the run's folder is the default one of the dataset and recipe: `--resume` finds it
    as the first command did (dataset guessed, packaged recipe), not from bare defaults."""
    from age_detect_resnet.cli import pipeline

    seen = {}
    monkeypatch.setattr(pipeline.train_module, "run", lambda args, argv, prog: seen.update(vars(args)) or 0)
    assert pipeline_main(["--resume", "--data-root", str(utkface_sample)]) == 0
    assert seen["dataset"] == "utkface" and [str(c) for c in seen["config"]] in (["cpu"], ["gpu"])
