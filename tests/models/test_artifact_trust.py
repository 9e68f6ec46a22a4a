"""An artifact never chooses code: ``spec.json``'s ``architecture`` resolves only to built-in
builders, builders installed packages declare (entry-point group ``kiln.builders``) or builders the
operator allows (``KILN_ALLOWED_BUILDERS``), on every load path; and every spec field is checked by
type and range before anything is built.

The hostile artifact names a factory in a module that, when imported, and when called, leaves a
file behind: on every refused path neither file may exist and the module may not be imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln.errors import KilnError, ModelError
from kiln.models.registry import ALLOW_ENV

EVIL_MODULE = "kiln_test_evil_builder"
EVIL = f"{EVIL_MODULE}:factory"

EVIL_SOURCE = """
from pathlib import Path
MARKS = Path({marks!r})
(MARKS / "imported").write_text("the module ran")


def factory(input_shape, num_classes, **kwargs):
    (MARKS / "called").write_text("the factory ran")
    from kiln.models.builders import build_mlp
    return build_mlp(input_shape, num_classes, hidden=[4])
"""


@pytest.fixture
def marks(tmp_path, monkeypatch) -> Path:
    """A folder the hostile module writes to; its module importable (as a registry might make it
    through an installed package), never imported yet."""
    marks = tmp_path / "marks"
    marks.mkdir()
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{EVIL_MODULE}.py").write_text(EVIL_SOURCE.format(marks=str(marks)))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    yield marks
    sys.modules.pop(EVIL_MODULE, None)


def nothing_ran(marks: Path) -> bool:
    return not any(marks.iterdir()) and EVIL_MODULE not in sys.modules


def mlp_artifact(directory: Path, architecture: object = "mlp", **fields) -> Path:
    """A real tabular artifact (tiny MLP) whose spec then names ``architecture``."""
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, save_artifact
    from kiln.models.spec import ModelSpec

    prep = Preprocessing(kind="tabular", feature_names=["a", "b"], mean=[0.0, 0.0], std=[1.0, 1.0])
    spec = ModelSpec("mlp", {"hidden": [4]}, [2], ["x", "y"], prep)
    save_artifact(build_model(spec), spec, directory)
    data = json.loads((directory / "spec.json").read_text())
    data.update(architecture=architecture, **fields)
    (directory / "spec.json").write_text(json.dumps(data))
    return directory


def load_paths(directory: Path) -> dict:
    """Every way Kiln loads an artifact from a folder (serving replicas and batch inference load
    through load_predictor; compression through load_torch_model and load_predictor)."""
    import kiln
    from kiln.models.artifact import build_model, load_spec, load_torch_model
    from kiln.models.pyfunc import _load_pyfunc
    from kiln.models.spec import check_allowed_builder

    return {
        "load_torch_model": lambda: load_torch_model(directory),
        "load_predictor": lambda: kiln.load_model(str(directory)),
        "mlflow pyfunc": lambda: _load_pyfunc(str(directory)),
        "build_model": lambda: build_model(load_spec(directory)),
        "serve/rollout check": lambda: check_allowed_builder(load_spec(directory), "x"),
    }


def test_an_artifact_naming_code_outside_the_allow_list_is_refused_on_every_path(tmp_path, marks):
    directory = mlp_artifact(tmp_path / "model", EVIL)
    for path, load in load_paths(directory).items():
        with pytest.raises(ModelError) as refused:
            load()
        message = str(refused.value)
        assert EVIL in message and ALLOW_ENV in message and "kiln.builders" in message, path
        assert nothing_ran(marks), f"{path} ran the artifact's code"


def test_the_serve_plan_and_rollouts_refuse_it_from_the_registry(tmp_path, marks):
    """`kiln serve start`'s plan and a rollout's candidate, loaded by the replicas in a child
    process (``load_isolated_predictor``), read the registry version."""
    from kiln import tracking as trk
    from kiln.models.predictor import load_isolated_predictor
    from kiln.models.registration import register_artifact
    from kiln.serve.config import ServeConfig
    from kiln.serve.plan import plan_serving

    directory = mlp_artifact(tmp_path / "model", EVIL)
    uri = trk.default_tracking_uri(tmp_path / "runs")
    exp = trk.ensure_experiment(uri, "evil", tmp_path / "runs")
    run_id = trk.start_run(uri, exp, "evil", {trk.TAG_JOB: "test"})
    version = register_artifact(uri, "evil", run_id, directory, tags={}, finish_run=True).uri
    with pytest.raises(ModelError, match=ALLOW_ENV):  # refused before a child process starts
        load_isolated_predictor(trk.resolve_model_dir(version, uri), version)
    cfg = ServeConfig.model_validate({"models": [version]})
    with pytest.raises(ModelError, match=f"{version}: model architecture '{EVIL}'"):
        plan_serving(cfg, uri)
    assert nothing_ran(marks)


def test_the_operator_allow_list_lets_it_load(tmp_path, marks, monkeypatch):
    """The same artifact loads once the operator allows its module (so the refusals above are the
    allow-list's doing), and builders keep their own names."""
    from kiln.models.artifact import load_torch_model

    directory = mlp_artifact(tmp_path / "model", EVIL)
    monkeypatch.setenv(ALLOW_ENV, f"some.other:thing, {EVIL_MODULE}")
    load_torch_model(directory)
    assert (marks / "called").is_file()


@pytest.mark.parametrize(
    "allow, allowed",
    [
        (EVIL, True),
        (EVIL_MODULE, True),
        (f"{EVIL_MODULE}:other", False),
        (EVIL_MODULE[:-1], False),  # a prefix of the name is not its package
        ("kiln", False),
    ],
)
def test_allow_list_entries_match_a_factory_or_a_module(monkeypatch, allow, allowed):
    from kiln.models.registry import artifact_builder_target

    monkeypatch.setenv(ALLOW_ENV, allow)
    if allowed:
        assert artifact_builder_target(EVIL) == EVIL
    else:
        with pytest.raises(ModelError):
            artifact_builder_target(EVIL)


def test_the_training_config_chooses_its_own_builder():
    """A training job's config (the operator's) may name any factory: build_model allows the name
    the job passes."""
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model
    from kiln.models.spec import ModelSpec

    prep = Preprocessing(kind="tabular", feature_names=["a"], mean=[0.0], std=[1.0])
    spec = ModelSpec("kiln.models.builders:build_mlp", {}, [1], [0, 1], prep)
    with pytest.raises(ModelError):
        build_model(spec)
    assert build_model(spec, ["kiln.models.builders:build_mlp"]) is not None


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"architecture": 7}, "architecture"),
        ({"input_shape": [2] * 4}, "input_shape"),
        ({"input_shape": [1 << 20]}, "input_shape"),
        ({"input_shape": [-2]}, "input_shape"),
        ({"input_shape": [True]}, "input_shape"),
        ({"labels": []}, "labels"),
        ({"labels": [{"a": 1}]}, "labels"),
        ({"files": ["../../etc/passwd"]}, "files"),
        ({"files": ["/etc/passwd"]}, "files"),
        ({"kwargs": []}, "kwargs"),
        ({"variant": 3}, "variant"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_spec_fields_are_checked_by_type_and_range(tmp_path, fields, complaint):
    from kiln.models.spec import load_spec

    directory = mlp_artifact(tmp_path / "model", **{"architecture": "mlp", **fields})
    with pytest.raises(ModelError, match=complaint):
        load_spec(directory)


@pytest.mark.parametrize(
    "kwargs, complaint",
    [
        ({"hidden": [1 << 30]}, "out of range"),
        ({"hidden": [float("nan")]}, "out of range"),
        ({"__class__": 1}, "takes no argument"),
        ({"hidden": [{"a": 1}]}, "holds dict"),
    ],
)
def test_builder_arguments_from_an_artifact_are_checked(tmp_path, kwargs, complaint):
    from kiln.models.artifact import load_torch_model

    directory = mlp_artifact(tmp_path / "model", "mlp", kwargs=kwargs)
    with pytest.raises(ModelError, match=complaint):
        load_torch_model(directory)


def test_a_spec_nested_too_deeply_is_a_model_error(tmp_path):
    from kiln.models.spec import load_spec

    directory = mlp_artifact(tmp_path / "model")
    (directory / "spec.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(KilnError):
        load_spec(directory)
