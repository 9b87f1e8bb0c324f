"""What every command shares (cli/common.py): its --help, with the defaults and the examples."""

from __future__ import annotations

import pytest

from age_detect_resnet.cli import average, ensemble, evaluate, export, predict, serve


def help_text(command, capsys) -> str:
    with pytest.raises(SystemExit):
        command.main(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_commands_help_shows_the_defaults_and_the_examples_its_description_introduces(capsys):
    """`serve --help` showed no port or limits; `ensemble --help` ended on a colon before its examples."""
    text = help_text(serve, capsys)
    assert "--port PORT port to listen on (default: 8000)" in text
    assert "larger uploads get 413 (default: 10.0)" in text
    assert "--device {auto,cpu,cuda} where the model runs; auto: a CUDA GPU" in text
    assert "skip larger photos (default: 50)" in help_text(predict, capsys)
    assert "age-detect ensemble runs/resnet runs/mobilenet --out runs/ensemble" in help_text(ensemble, capsys)
    for command in (serve, predict, evaluate, average, ensemble, export):
        text = help_text(command, capsys)
        # an option without a default says nothing of one; one that states its own is not told twice
        assert "(default: )" not in text and "(default: None)" not in text and "(default: False)" not in text
        assert "(default: all) (default:" not in text
