"""Atomic writes: all or nothing under the final name, with the permissions of any new file."""

from __future__ import annotations

import os
import stat

import pytest

from age_detect_resnet.atomic import atomic_path, write_text_atomic


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_any_new_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.md", "# report\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == mode


def test_a_model_saved_by_safetensors_gets_the_permissions_of_any_new_file(tmp_path):
    """safetensors' save_file replaces the temporary with a file of its own, 0600: a serving account or a
    colleague could not read best.safetensors though every other file of the run was readable."""
    from age_detect_resnet.modeling.checkpoint import save_model
    from age_detect_resnet.modeling.model import create_model

    previous = os.umask(0o022)
    try:
        model = create_model("mobilenet_v2", "regression", pretrained=False)
        save_model(model, tmp_path / "best.safetensors", {})
    finally:
        os.umask(previous)
    for name in ("best.safetensors", "best.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "best.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".best.json.") and tmp.suffix == ".json"
        tmp.write_text("half")
        raise RuntimeError("killed mid-save")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]
