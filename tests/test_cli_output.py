"""What the CLI prints where: under --json, stdout holds the result line and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import kiln_env
from kiln.commands.common import emit_json, json_stdout


def test_json_mode_keeps_stdout_for_the_result_line(capsys):
    with json_stdout(True):
        print("(raylet) WARNING: 8 PYTHON worker processes have been started")  # a library's line
        emit_json({"run_id": "abc", "metrics": {"test_accuracy": 0.99}})
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"run_id": "abc", "metrics": {"test_accuracy": 0.99}}
    ]
    assert "worker processes have been started" in err


def test_without_json_mode_stdout_is_untouched(capsys):
    with json_stdout(False):
        print("a table for people")
        emit_json({"ok": True})
    out, err = capsys.readouterr()
    assert out.splitlines() == ["a table for people", '{"ok": true}'] and err == ""


def test_the_cli_process_keeps_file_descriptor_1_for_the_result_line():
    """Writes that bypass sys.stdout (a C extension, a child process inheriting fd 1) go to stderr
    too, in the CLI's own mode (to_exit)."""
    script = (
        "import os, subprocess, sys\n"
        "from kiln.commands.common import emit_json, json_stdout\n"
        "with json_stdout(True, to_exit=True):\n"
        "    os.write(1, b'written to fd 1\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"from a child\")'], check=True)\n"
        "    print('printed')\n"
        "    emit_json({'ok': True})\n"
        "os.write(1, b'after the command\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=kiln_env(), capture_output=True, text=True, check=True
    )
    assert proc.stdout.splitlines() == ['{"ok": true}']
    assert all(
        line in proc.stderr.splitlines()
        for line in ("written to fd 1", "from a child", "printed", "after the command")
    )


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (["train", "c.yaml", "--json", "train.epochs=3"], "overrides", ["train.epochs=3"]),
        (
            ["serve", "start", "models:/m/1", "--port", "0", "serve.deployment.replicas=2"],
            "targets",
            ["models:/m/1", "serve.deployment.replicas=2"],
        ),
        (
            ["submit", "train", "c.yaml", "--follow", "a=1", "--address", "http://h:8265", "b=2"],
            "overrides",
            ["a=1", "b=2"],
        ),
    ],
)
def test_overrides_are_accepted_anywhere_among_the_options(argv, dest, expected):
    from kiln.cli import build_parser, parse_command_line

    assert getattr(parse_command_line(build_parser(), argv), dest) == expected


def test_an_unknown_option_is_still_refused_with_exit_2(capsys):
    from kiln.cli import build_parser, parse_command_line

    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(build_parser(), ["train", "c.yaml", "--bogus", "a=1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus a=1" in capsys.readouterr().err
