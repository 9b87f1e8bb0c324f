"""Long loops report how far they are when no terminal shows a bar (a log file, CI)."""

from __future__ import annotations

import logging

from age_detect_resnet import progress as progress_module
from age_detect_resnet.progress import duration, progress


def test_without_a_terminal_a_long_loop_logs_how_far_it_is_and_when_it_ended(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="age_detect_resnet.progress"):
        items = list(progress(iter(range(5)), total=5, desc="aligning faces", unit="img", interval=0.0))
    assert items == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("aligning faces: 1 of 5 (20%),") and "img/s, about" in lines[0]
    assert len(lines) == 5 and lines[-1].startswith("aligning faces: 5 done in ")


def test_a_short_loop_says_nothing_and_a_terminal_gets_a_bar(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="age_detect_resnet.progress"):
        assert list(progress([1, 2], total=2, desc="x", interval=3600.0)) == [1, 2]
    assert not caplog.records
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: True)
    bar = progress([1, 2], total=2, desc="x")
    assert type(bar).__name__ == "tqdm" and list(bar) == [1, 2]


def test_durations_read_as_seconds_minutes_or_hours():
    assert (duration(42), duration(720), duration(3 * 3600)) == ("42 s", "12 min", "3.0 h")
