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


# What Ray Serve raised in CI when HAProxy's frontend port was taken (ports and paths shortened):
# the notices and warnings come first, the cause is the first alert.
HAPROXY_CRASH = """HAProxy crashed during startup: [NOTICE]   (11772) : haproxy version is 2.8.25
[WARNING]  (11772) : config : parsing [/tmp/khap/haproxy.cfg:138] : content-type \
'application/grpc' ignored by the http reply because neither errorfile nor payload defined.
[ALERT]    (11772) : Binding [/tmp/khap/haproxy.cfg:56] for frontend http_frontend: cannot bind \
socket (Address already in use) for [127.0.0.1:38587]
[ALERT]    (11772) : [haproxy.main()] Some protocols failed to start their listeners! Exiting.
"""


def test_telling_line_of_haproxy_output_is_its_first_alert_not_a_warning_naming_errorfile():
    assert "cannot bind socket (Address already in use)" in telling_line(HAPROXY_CRASH)
    warning_only = HAPROXY_CRASH.split("[ALERT]")[0]
    assert telling_line(warning_only).startswith("HAProxy crashed during startup")
