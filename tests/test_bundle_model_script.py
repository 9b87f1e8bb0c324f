"""scripts/bundle_model.py: the shipped bundle is replaced only by one that was checked, and a run that
cannot be bundled is refused in one line (exit status 2) with the bundle left as it was. Every bundle
here is written into tmp_path (--out), never into the package's assets."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from age_detect_resnet.modeling import bundled, checkpoint
from conftest import load_script


@pytest.fixture
def script():
    return load_script("scripts/bundle_model.py")


@pytest.fixture
def shipped(tmp_path) -> Path:
    """A stand-in for the shipped bundle: its three files, with bytes a replacement would change."""
    out = tmp_path / "assets" / "age_model.safetensors"
    out.parent.mkdir()
    for path in (out, out.with_suffix(".json"), bundled.split_file_of(out)):
        path.write_bytes(b"shipped " + path.name.encode())
    return out


def _untouched(out: Path) -> bool:
    """The bundle's files hold what they held, and no temporary file was left beside them."""
    names = {out.name, out.with_suffix(".json").name, bundled.split_file_of(out).name}
    return {p.name for p in out.parent.iterdir()} == names and all(
        (out.parent / name).read_bytes() == b"shipped " + name.encode() for name in names
    )


def test_bundle_model_has_usage_and_help(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main([])
    assert exit_.value.code == 2 and "usage: bundle_model.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0 and "--data-root" in capsys.readouterr().out


def test_a_run_that_cannot_be_bundled_leaves_the_bundle(script, shipped, tiny_run, tmp_path, caplog):
    only_last = shutil.copytree(tiny_run, tmp_path / "only-last")
    for name in ("best.safetensors", "best.json"):
        (only_last / name).unlink()
    moved = shutil.copytree(tiny_run, tmp_path / "data-moved")
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data_root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    cases = {
        tmp_path / "missing": "missing does not exist; pass a run folder",
        only_last: "only-last/best.safetensors does not exist; pass a run folder",
        moved: f"none of the val images of {moved} are in {tmp_path / 'gone'}",
    }
    for run, message in cases.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert script.main([str(run), "--out", str(shipped)]) == 2, run
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
        assert _untouched(shipped), run
    assert "pass --data-root with the folder of its utkface images" in errors[0]


def test_a_bundle_that_fails_its_check_replaces_nothing(script, shipped, tiny_run, monkeypatch, caplog):
    monkeypatch.setattr(script, "TOLERANCE_YEARS", 0.0)  # no bundle passes
    with caplog.at_level(logging.ERROR):
        assert script.main([str(tiny_run), "--out", str(shipped)]) == 1
    assert f"{shipped} was not changed" in caplog.text and _untouched(shipped)


def test_a_checked_bundle_replaces_the_shipped_files(
    script, shipped, tiny_run, tmp_path, monkeypatch, capsys
):
    """With the run's data moved (--data-root): fp16 moves this tiny 40 px model's ages by ~0.2 years, so
    the limit is widened here; the real bundle is held to TOLERANCE_YEARS."""
    monkeypatch.setattr(script, "TOLERANCE_YEARS", 5.0)
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    moved = shutil.copytree(tiny_run, tmp_path / "data-moved")
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data_root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    assert script.main([str(moved), "--out", str(shipped), "--data-root", root]) == 0
    printed = capsys.readouterr().out
    model = checkpoint.load_model(shipped)
    assert model.metadata["bundled_from"]["run"] == "data-moved"
    assert f"sha256 {model.metadata['sha256']}" in printed and "validation faces" in printed
    assert bundled.split_file_of(shipped).read_bytes()[:2] == b"\x1f\x8b"  # the split, gzipped
    assert sorted(p.name for p in shipped.parent.iterdir()) == sorted(
        [shipped.name, shipped.with_suffix(".json").name, bundled.split_file_of(shipped).name]
    )
