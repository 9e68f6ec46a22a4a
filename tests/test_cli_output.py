"""What the CLI prints where: under --json, stdout holds the result line and nothing else."""

from __future__ import annotations

import json

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
