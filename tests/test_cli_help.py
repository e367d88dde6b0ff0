"""The command line a new user meets: `--version`, bare `kvrouter`, errors in a command's own
usage, and every flag of every command with help text that shows the code's default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvrouter.cli import COMMANDS, _parser, main, version


def _options(command: str) -> list[argparse.Action]:
    _top, subparsers = _parser(command)
    return [a for a in subparsers[command]._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_showing_its_default(command: str) -> None:
    for action in _options(command):
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"kvrouter {command} {flag}: no help"
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS):
            continue  # no value to show, or the help names where the value comes from
        # Help must take the default from the code (argparse fills in %(default)s), so the
        # two cannot disagree as `demo --kv-blocks` once did (help 1200, code 4000).
        assert "%(default)s" in action.help, f"kvrouter {command} {flag}: default not shown"


def test_demo_help_shows_the_kv_blocks_the_code_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from kvrouter.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).kv_blocks == 4000
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 4000)" in text and "(default 1200)" not in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvrouter {version()}"
    assert version()[0].isdigit()


def test_bare_kvrouter_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's status for a missing command (2), with the whole help instead of one line.
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: kvrouter") and all(name in out for name in COMMANDS)


def test_unknown_flag_prints_the_commands_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvrouter.cli", "serve", "--bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: kvrouter serve"), proc.stderr
    assert "kvrouter serve: error: unrecognized arguments: --bogus" in proc.stderr
