"""Secrets stay secret (no Ray): a token planted in the alert webhook URL appears in no monitor
response, log line, logged config (MLflow params, tags, the config artifact); the API key's variable
is not in the environment of the local serving head (every Ray process inherits it); Ray's token
file is made owner-only when Kiln uses it; `kiln submit` leaves secret files out of the upload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import zipfile

import pytest

TOKEN = "s3cr3t-t0ken-4242"
WEBHOOK = f"https://alerts:{TOKEN}@hooks.example.invalid/services/{TOKEN}?token={TOKEN}"


def test_the_webhook_url_is_in_no_logged_config_and_no_monitor_report():
    from kiln import tracking as trk
    from kiln.monitor.live.served import ReplicaMonitors
    from kiln.schema import KilnConfig

    cfg = KilnConfig.model_validate({"serve": {"monitor": {"webhook_url": WEBHOOK}}})
    assert cfg.serve is not None and cfg.serve.monitor.webhook == WEBHOOK  # the call gets it
    logged = [
        json.dumps(cfg.to_dict(), sort_keys=True),  # the kiln.config_json tag
        json.dumps(trk.flatten(cfg.to_dict())),  # the run's params
        cfg.to_yaml(),  # the config artifact
        repr(cfg),
        str(cfg.serve.monitor),
    ]
    for text in logged:
        assert TOKEN not in text
    # what a replica gets (pickled) still calls the webhook; what it answers never shows it
    replica_cfg = type(cfg.serve.monitor).model_validate(cfg.serve.monitor.model_dump())
    assert replica_cfg.webhook == WEBHOOK
    report = asyncio.run(ReplicaMonitors("m", replica_cfg).report([], window=True))
    assert TOKEN not in json.dumps(report)


def test_a_failing_webhook_is_logged_without_its_url_secrets(caplog):
    from kiln.monitor.live.alerts import post_webhook

    with caplog.at_level(logging.WARNING):
        ok = post_webhook(WEBHOOK.replace("hooks.example.invalid", "127.0.0.1:9"), {}, 2.0)
    assert not ok
    assert "webhook https://127.0.0.1:9 failed" in caplog.text
    assert TOKEN not in caplog.text


def test_the_api_key_variable_never_reaches_the_local_serving_head(monkeypatch):
    from kiln.serve.instance import local_head_env

    monkeypatch.setenv("KILN_TEST_SERVE_KEY", TOKEN)
    env = local_head_env(["KILN_TEST_SERVE_KEY"])
    assert "KILN_TEST_SERVE_KEY" not in env and TOKEN not in json.dumps(env)
    assert local_head_env()["KILN_TEST_SERVE_KEY"] == TOKEN  # removed only when named


def test_the_ray_token_file_is_made_owner_only(tmp_path, monkeypatch):
    from kiln.ray_connection import secure_token_file

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".ray"
    folder.mkdir(mode=0o755)
    (folder / "auth_token").write_text("x")
    (folder / "auth_token").chmod(0o644)
    assert secure_token_file() == folder / "auth_token"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "auth_token").stat().st_mode) == 0o600


@pytest.mark.parametrize("include", [False, True])
def test_submit_leaves_secret_files_out_of_the_upload_unless_asked(tmp_path, include):
    from ray._private.runtime_env.packaging import create_package

    from kiln.cluster.submit import build_runtime_env, job_spec

    project = tmp_path / "proj"
    secrets = [".env", ".env.local", "deploy/key.pem", "id_ed25519", ".aws/credentials", ".netrc"]
    for rel in ["configs/train/a.yaml", "jobs/train.py", *secrets]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    spec = job_spec("train", str(project / "configs/train/a.yaml"), [], project)
    env = build_runtime_env(spec, include_secret_files=include)
    target = tmp_path / "pkg.zip"
    create_package(str(project), target, include_gitignore=False, excludes=env["excludes"])
    shipped = sorted(n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/"))
    expected = ["configs/train/a.yaml", "jobs/train.py"]
    assert shipped == (sorted(expected + secrets) if include else expected)
