"""`pip install .` leaves out the optional parts (web page, exporter, HEIC, TensorBoard): a command that
needs one names the extra and how to install it, with exit status 2, instead of a traceback."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from age_detect_resnet.cli import main
from age_detect_resnet.extras import EXTRA_OF_MODULE, missing_extra, missing_extra_message

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def hide(monkeypatch: pytest.MonkeyPatch, module: str, *importers: str) -> None:
    """Make `import module` fail as if it were not installed, and forget the modules that import it, so
    that they import it again (also as their package's attribute, which `from package import name`
    would otherwise find first)."""
    monkeypatch.setitem(sys.modules, module, None)
    for name in importers:
        monkeypatch.delitem(sys.modules, name, raising=False)
        package, _, attribute = name.rpartition(".")
        if package in sys.modules:
            monkeypatch.delattr(sys.modules[package], attribute, raising=False)


def test_serve_without_the_web_extra_says_how_to_install_it(monkeypatch, caplog):
    hide(monkeypatch, "anyio", "age_detect_resnet.cli.serve", "age_detect_resnet.web.app")
    with caplog.at_level(logging.ERROR):
        assert main(["serve"]) == 2
    assert "age-detect serve needs the 'web' extra (anyio is not installed)" in caplog.text
    assert "pip install 'age-detect-resnet[web]'" in caplog.text


def test_export_without_the_exporter_says_how_to_install_it(tiny_run: Path, tmp_path, monkeypatch, caplog):
    hide(monkeypatch, "onnx")
    out = tmp_path / "age.onnx"
    with caplog.at_level(logging.ERROR):
        assert main(["export", "--model", str(tiny_run), "--out", str(out)]) == 2
    assert "pip install 'age-detect-resnet[export]'" in caplog.text
    assert not out.exists()


def test_an_import_error_of_anything_else_is_not_taken_for_a_missing_extra():
    assert missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None
    assert missing_extra_message(ImportError("cannot import name 'x'"), "age-detect serve") is None
    assert missing_extra(ModuleNotFoundError("...", name="onnx.reference")) == "export"


def test_every_extra_named_is_one_that_pyproject_declares():
    text = PYPROJECT.read_text()
    for extra in set(EXTRA_OF_MODULE.values()):
        assert f"\n{extra} = [" in text, extra
