"""Compression pieces without Ray or MLflow: config checks, the pruned-structure spec, selection,
Pareto front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.compress.config import PruneStep, SelectionConfig, UnstructuredPruneStep
from kiln.compress.evaluate import Metrics
from kiln.compress.report import pareto_front
from kiln.compress.select import select_variant
from kiln.errors import ConfigError
from kiln.schema import validate_config


def steps_config(steps, **compress):
    return validate_config({"compress": {"model": "models:/m/1", "steps": steps, **compress}})


def test_steps_get_default_names_and_chain_by_input():
    cfg = steps_config(
        [
            {"kind": "distill", "student": {"name": "cnn", "width": 8}},
            {"kind": "prune", "input": "distilled"},
            {"kind": "quantize", "input": "pruned"},
            {"kind": "quantize", "mode": "dynamic", "input": "distilled_ce"},
        ]
    )
    assert [(s.name, s.input) for s in cfg.compress.steps] == [
        ("distilled", "reference"),
        ("pruned", "distilled"),
        ("int8_static", "pruned"),
        ("int8_dynamic", "distilled_ce"),
    ]


@pytest.mark.parametrize(
    "steps, message",
    [
        (
            [{"kind": "prune", "input": "later"}, {"kind": "quantize", "name": "later"}],
            "steps[0].input 'later' is neither",
        ),
        ([{"kind": "quantize"}, {"kind": "quantize"}], "'int8_static' is used twice"),
        ([{"kind": "prune", "ratio": 1.5}], "compress.steps.0.prune.ratio"),
        ([{"kind": "prune", "ratoi": 0.3}], "unknown config key 'compress.steps.0.prune.ratoi'"),
        ([{"kind": "shrink"}], "does not match any of the expected tags"),
        ([{"kind": "prune", "layer_ratios": {"3": 1.0}}], "layer_ratios['3'] must be in [0, 1)"),
        (
            [{"kind": "distill", "student": {"name": "cnn", "depth": 3}}],
            "unknown key 'student.depth' for model 'cnn'",
        ),
        ([{"kind": "distill", "student": {"name": "nope"}}], "unknown model 'nope'"),
    ],
)
def test_bad_step_configs_name_the_key(steps, message):
    with pytest.raises(ConfigError) as err:
        steps_config(steps)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "builder, shape, scope",
    [("cnn", [1, 28, 28], "layer"), ("cnn", [1, 28, 28], "global"), ("mlp", [64], "layer")],
)
def test_pruned_network_rebuilds_from_its_spec(builder, shape, scope, tmp_path):
    """Structured pruning shrinks the network; spec.json (layer shapes) + safetensors rebuild it
    exactly."""
    from kiln.compress.prune import structured_prune
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, load_torch_model, save_artifact
    from kiln.models.builders import count_parameters
    from kiln.models.spec import ModelSpec
    from kiln.models.structure import record_structure

    prep = Preprocessing(
        kind="image" if len(shape) == 3 else "tabular",
        mean=[0.0] * (shape[0] if len(shape) == 3 else shape[0]),
        std=[1.0] * shape[0],
        channels=shape[0] if len(shape) == 3 else None,
        image_size=shape[1:] if len(shape) == 3 else None,
        feature_names=[] if len(shape) == 3 else [f"f{i}" for i in range(shape[0])],
    )
    spec = ModelSpec(builder, {}, shape, list(range(10)), prep)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    pruned = structured_prune(model, shape, PruneStep(kind="prune", ratio=0.5, scope=scope))
    # Halving the channels of consecutive layers quarters their weights; an MLP's input width stays.
    assert count_parameters(pruned) * (2 if builder == "mlp" else 3) <= count_parameters(model)
    spec.variant = {"structure": record_structure(pruned, build_model(spec))}
    save_artifact(pruned, spec, tmp_path)
    loaded, _ = load_torch_model(tmp_path)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-6)
        assert loaded(x).shape == (4, 10)  # the classifier keeps every class


def test_per_layer_ratios_and_unstructured_sparsity():
    from kiln.compress.prune import structured_prune, unstructured_prune
    from kiln.models.builders import build_cnn

    model = build_cnn([1, 8, 8], 10, width=16).eval()
    pruned = structured_prune(
        model, [1, 8, 8], PruneStep(kind="prune", ratio=0.01, layer_ratios={"3": 0.5})
    )
    assert pruned[3].out_channels == 8 and pruned[0].out_channels > 8
    sparse, sparsity = unstructured_prune(
        model, UnstructuredPruneStep(kind="unstructured_prune", amount=0.7)
    )
    assert sparsity.fraction == pytest.approx(0.7, abs=0.01)
    assert sum(p.numel() for p in sparse.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="no Conv/Linear layer 'fc'"):
        structured_prune(model, [1, 8, 8], PruneStep(kind="prune", layer_ratios={"fc": 0.5}))


def metrics(acc, size, p50=1.0, thr=100.0):
    return Metrics(
        test_accuracy=acc,
        test_f1_macro=acc,
        params=1,
        size_bytes=size,
        latency_p50_ms=p50,
        latency_p99_ms=p50,
        throughput=thr,
    )


def test_selection_picks_smallest_or_fastest_within_tolerance():
    ref = metrics(0.98, 1000)
    variants = {
        "a": metrics(0.975, 300, p50=0.5, thr=900),
        "b": metrics(0.95, 100, p50=0.1, thr=5000),
        "c": metrics(0.978, 500, p50=0.2, thr=1000),
    }
    rule = SelectionConfig(max_accuracy_drop=0.01)
    assert select_variant(ref, variants, rule).name == "a"
    assert (
        select_variant(
            ref, variants, SelectionConfig(max_accuracy_drop=0.01, objective="latency")
        ).name
        == "c"
    )
    assert (
        select_variant(
            ref, variants, SelectionConfig(max_accuracy_drop=0.05, objective="throughput")
        ).name
        == "b"
    )
    none = select_variant(ref, variants, SelectionConfig(max_accuracy_drop=0.001, objective="size"))
    assert (
        none.name is None
        and "closest: c" in none.message
        and "no variant is within" in none.message
    )
    assert select_variant(ref, variants, SelectionConfig()).name is None  # no rule: no pick


def test_pareto_front():
    points = [(100.0, 0.99), (50.0, 0.98), (60.0, 0.97), (10.0, 0.90), (10.0, 0.80)]
    assert pareto_front(points) == [0, 1, 3]


def test_calibration_rows_checks_the_split():
    from kiln.compress.quantize import calibration_rows

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    rows = calibration_rows(x, 4, seed=0, where="compress.steps.0")
    assert rows.shape == (4, 2) and len({tuple(r) for r in rows}) == 4
    with pytest.raises(
        ConfigError, match="11 calibration samples requested, but the train split has only 10 rows"
    ):
        calibration_rows(x, 11, seed=0, where="compress.steps.0")
    # a train split larger than the driver's sample names the knob that bounds the sample
    with pytest.raises(ConfigError, match="driver keeps a sample of 10 train rows"):
        calibration_rows(x, 11, seed=0, where="compress.steps.0", split_rows=10_000)
