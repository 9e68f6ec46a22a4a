"""Config schema: typed sections, unknown keys rejected with the dotted key, overrides, validate
CLI."""

from __future__ import annotations

import pytest

from conftest import REPO, run_kiln
from kiln.config import apply_overrides
from kiln.errors import ConfigError
from kiln.schema import KilnConfig, load_config

DEFAULT = REPO / "configs/train/digits_cnn.yaml"


def test_default_config_loads_with_expected_keys():
    cfg = load_config(DEFAULT)
    assert cfg.experiment.name == "digits-cnn"
    assert cfg.data.source == "digits" and cfg.data.image == "image" and cfg.data.label == "label"
    assert cfg.model.name == "cnn" and cfg.model.kwargs == {"width": 32, "dropout": 0.1}
    assert cfg.train.workers == 2 and cfg.train.class_weights == "none"
    assert (cfg.data.split.val, cfg.data.split.test, cfg.data.split.seed) == (0.15, 0.15, 0)


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = load_config(
        DEFAULT,
        [
            "train.epochs=3",
            "train.lr=0.01",
            "model.width=16",
            "train.use_gpu=false",
            "data.split.seed=7",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(0.01)
    assert cfg.model.kwargs["width"] == 16
    assert cfg.data.split.seed == 7 and cfg.train.use_gpu is False
    mlp = load_config(None, ["model.name=mlp", "model.hidden=[32, 16]"])
    assert mlp.model.name == "mlp" and mlp.model.kwargs == {"hidden": [32, 16]}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.lr=fast", "config key 'train.lr'"),
        ("train.epochs=0", "config key 'train.epochs'"),
        ("train.class_weights=balanced", "config key 'train.class_weights'"),
        ("data.split.val=0.6", "config key 'data.split': val + test must be below 1.0"),
        ("model.widht=8", "unknown config key 'model.widht' for model 'cnn'"),
        ("model.name=nosuch", "config key 'model.name': unknown model 'nosuch'"),
        (
            "model.name=nosuchpkg.mod:factory",
            "config key 'model.name': cannot import 'nosuchpkg.mod'",
        ),
        ("train.epochs.x=1", "config key 'train.epochs' is a value, not a section"),
        ("noequals", "not of the form dotted.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_dotted_key(override, message):
    overrides = (
        [override] if override != "data.split.val=0.6" else [override, "data.split.test=0.5"]
    )
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_resolved_config_round_trips():
    cfg = load_config(DEFAULT, ["train.epochs=2"])
    again = KilnConfig.model_validate(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_validate_cli_ok_and_error_exit_codes(tmp_path):
    ok = run_kiln("validate", str(DEFAULT), "train.epochs=2")
    assert ok.returncode == 0, ok.stderr
    bad = run_kiln("validate", str(DEFAULT), "train.epoch=2")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"
    )
    assert "Traceback" not in bad.stderr
    debug = run_kiln("--debug", "validate", str(DEFAULT), "train.epoch=2")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_help_imports_neither_torch_nor_ray():
    import subprocess
    import sys

    from conftest import kiln_env

    code = (
        "import sys; from kiln.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=kiln_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow  # nine CLI processes
@pytest.mark.parametrize(
    "command",
    [
        ("train", str(REPO / "configs/train/digits_cnn.yaml")),
        ("tune", str(REPO / "configs/tune/digits_cnn.yaml")),
        ("data", "profile", str(REPO / "configs/train/digits_cnn.yaml")),
    ],
    ids=["train", "tune", "data-profile"],
)
def test_data_mistakes_then_an_unreachable_address_are_refused_in_one_line(command, tmp_path):
    """Nothing listens at the address given: the data's own mistakes are named first, from the
    files' footers, before any Ray instance is joined or started; then the address."""
    unreachable = ("--address", "127.0.0.1:1", f"experiment.run_dir={tmp_path}")
    missing = run_kiln(*command, "data.source=/no/such/file.parquet", *unreachable)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr == "error: data.source: file not found: /no/such/file.parquet\n"
    wrong = run_kiln(*command, "data.label=digit", *unreachable)
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.startswith("error: data.label: column 'digit' not found")
    # and with the data right, the address is named at once (Ray's own connect retries for
    # minutes, logging warnings)
    unreached = run_kiln(*command, *unreachable)
    assert unreached.returncode == 2, unreached.stderr
    assert unreached.stderr.startswith("error: cannot reach Ray at 127.0.0.1:1: nothing answers")
    assert len(unreached.stderr.splitlines()) == 1, unreached.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded
