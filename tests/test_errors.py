"""The one-line views of an error that Kiln shows users."""

from __future__ import annotations

from kiln.errors import first_line, telling_line


def test_first_line_skips_blank_lines_and_names_the_type_of_an_empty_message():
    assert first_line(ValueError("\n  bad key 'x'\nmore")) == "bad key 'x'"
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_telling_line_is_the_last_line_naming_an_error_in_a_ray_traceback():
    message = (
        "Deploying app 'digits' failed with exception:\n"
        "Traceback (most recent call last):\n"
        '  File "/x/replica.py", line 10, in __init__\n'
        "    raise ModelError(...)\n"
        "kiln.errors.ModelError: cannot download model 'models:/m/9'\n"
        "\n"
    )
    assert telling_line(message) == "kiln.errors.ModelError: cannot download model 'models:/m/9'"
    assert telling_line("first\nlast") == "last"
    assert telling_line("") == "no message"
    assert len(telling_line("Error " + "x" * 1000)) == 400
