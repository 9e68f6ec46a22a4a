"""What the CLI prints where: under --json, stdout holds the result line and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

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
