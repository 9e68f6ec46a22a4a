"""kiln compress end to end: a real reference trained on Ray, real MLflow registry, the CLI as a
user runs it.

The reference (a CNN on the built-in digits) is trained once for the module. One compress run
makes every kind of variant (static and dynamic int8, structured pruning with fine-tuning on Ray
Train, magnitude pruning, distillation beside a cross-entropy student, and composed chains);
the tests then check what it registered and reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, last_json, run_kiln

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(210)]

MODEL = "compress-test"
METRIC_KEYS = {
    "test_accuracy",
    "test_f1_macro",
    "params",
    "size_bytes",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput",
}


def write_config(
    path: Path, run_dir: Path, model_uri: str, steps: list[dict], selection: dict | None = None
) -> Path:
    cfg = {
        "experiment": {"name": MODEL, "run_dir": str(run_dir)},
        "data": {
            "source": "digits",
            "image": "image",
            "split": {"val": 0.15, "test": 0.15, "seed": 0},
        },
        "train": {
            "epochs": 20,
            "batch_size": 64,
            "lr": 0.003,
            "workers": 1,
            "cpus_per_worker": 1,
            "seed": 0,
        },
        "compress": {
            "model": model_uri,
            "steps": steps,
            "selection": selection or {},
            "benchmark": {"rounds": 2, "latency_runs": 20, "throughput_runs": 2},
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """A CNN trained to convergence on digits through ``run_training`` (Ray Train), registered as
    version 1."""
    from kiln.schema import validate_config
    from kiln.train.run import run_training

    run_dir = tmp_path_factory.mktemp("compress") / "runs"
    cfg = validate_config(
        {
            "experiment": {"name": MODEL, "run_dir": str(run_dir)},
            "data": {
                "source": "digits",
                "image": "image",
                "split": {"val": 0.15, "test": 0.15, "seed": 0},
            },
            "model": {"name": "cnn", "width": 48},
            "train": {
                "epochs": 12,
                "batch_size": 64,
                "lr": 0.003,
                "workers": 1,
                "cpus_per_worker": 1,
                "seed": 0,
            },
        }
    )
    result = run_training(cfg, address=ray_cluster)
    assert result.metrics["test_accuracy"] >= 0.97
    return {
        "run_dir": run_dir,
        "uri": result.model_uri,
        "run_id": result.run_id,
        "tracking_uri": result.tracking_uri,
        "address": ray_cluster,
        "accuracy": result.metrics["test_accuracy"],
    }


def client(reference):
    from kiln.tracking import client as make_client

    return make_client(reference["tracking_uri"])


def versions(reference) -> dict[str, object]:
    return {str(v.version): v for v in client(reference).search_model_versions(f"name='{MODEL}'")}


def alias_version(reference, alias: str = "candidate") -> str | None:
    try:
        return str(client(reference).get_model_version_by_alias(MODEL, alias).version)
    except Exception:
        return None


ALL_STEPS = [
    {"kind": "quantize", "mode": "static", "calibration_samples": 256},
    {"kind": "quantize", "mode": "dynamic"},
    {"kind": "prune", "ratio": 0.5, "scope": "layer", "epochs": 8, "lr": 0.002},
    {"kind": "unstructured_prune", "amount": 0.5},
    {"kind": "distill", "student": {"name": "cnn", "width": 12}, "temperature": 4.0, "alpha": 0.5},
    {"kind": "quantize", "name": "pruned_int8", "input": "pruned"},
    # distill, then prune, then quantize
    {
        "kind": "prune",
        "name": "distilled_pruned",
        "input": "distilled",
        "ratio": 0.25,
        "scope": "global",
        "epochs": 0,
    },
    {"kind": "quantize", "name": "distilled_pruned_int8", "input": "distilled_pruned"},
]


@pytest.fixture(scope="module")
def compressed(reference, tmp_path_factory):
    """One ``kiln compress --json`` run making every kind of variant; returns its JSON and the
    registry before it."""
    config = write_config(
        tmp_path_factory.mktemp("cfg") / "compress.yaml",
        reference["run_dir"],
        reference["uri"],
        ALL_STEPS,
        {"max_accuracy_drop": 0.01, "objective": "size"},
    )
    before = set(versions(reference))
    proc = run_kiln(
        "compress", str(config), "--address", reference["address"], "--json", timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    return {
        "out": out,
        "before": before,
        # the registry right after this run: other tests of the module register more versions
        "after": versions(reference),
        "stderr": proc.stderr,
        "by_name": {v["name"]: v for v in out["variants"]},
    }


def test_every_step_makes_a_variant_that_loads_and_predicts(compressed, reference):
    from kiln.data.dataset import prepare_data
    from kiln.models.predictor import load_predictor
    from kiln.schema import validate_config

    out, by_name = compressed["out"], compressed["by_name"]
    assert set(by_name) == {
        "int8_static",
        "int8_dynamic",
        "pruned",
        "sparse",
        "distilled",
        "distilled_ce",
        "pruned_int8",
        "distilled_pruned",
        "distilled_pruned_int8",
    }
    for entry in [out["reference"], *out["variants"]]:
        assert {"name", "kind", "model_uri", "metrics"} <= set(entry)
        assert set(entry["metrics"]) >= METRIC_KEYS
        assert entry["model_uri"].startswith(f"models:/{MODEL}/")
    assert out["reference"]["model_uri"] == reference["uri"]
    formats = {n: v["format"] for n, v in by_name.items()}
    assert formats["int8_static"] == formats["int8_dynamic"] == formats["pruned_int8"] == "onnx"
    assert formats["pruned"] == formats["distilled"] == formats["sparse"] == "safetensors"

    data = prepare_data(validate_config({"data": {"source": "digits", "image": "image"}}).data)
    assert data.sample_is_whole("test")
    raw, test_y = data.samples["test"]  # raw uint8 test images, as a user hands them over
    for name, entry in by_name.items():
        predictor = load_predictor(entry["model_uri"], tracking_uri=reference["tracking_uri"])
        labels = predictor.predict(raw)  # raw uint8 images, as a user hands them over
        accuracy = float(np.mean(np.asarray(labels) == np.asarray(data.labels)[test_y]))
        # The predict API gives the accuracy the harness reported (same runtime, same test rows).
        assert accuracy == pytest.approx(entry["metrics"]["test_accuracy"], abs=1e-9), name
        proba = predictor.predict_proba(raw[:5])
        assert proba.shape == (5, 10) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        # Each variant is registered with its own monitoring reference (its outputs, its OOD
        # threshold).
        from kiln.monitor.reference import load_reference
        from kiln.tracking import resolve_model_dir

        monitor_ref = load_reference(
            resolve_model_dir(entry["model_uri"], reference["tracking_uri"])
        )
        assert monitor_ref is not None and monitor_ref.rows["output"] == len(data.y_val), name


def test_size_reductions_hold(compressed):
    out, v = compressed["out"], compressed["by_name"]
    ref = out["reference"]["metrics"]
    onnx_ref = {b["name"]: b for b in out["baselines"]}["reference_onnx"]["metrics"]
    # int8 static: at least 3.5x smaller than fp32, in the same runtime and against the registered
    # reference.
    assert v["int8_static"]["metrics"]["size_bytes"] * 3.5 <= onnx_ref["size_bytes"]
    assert v["int8_static"]["metrics"]["size_bytes"] * 3.5 <= ref["size_bytes"]
    assert v["int8_static"]["compared_to"] == "reference_onnx"
    assert (
        v["int8_static"]["metrics"]["params"] == ref["params"]
    )  # quantization keeps every parameter
    # dynamic int8 only touches the Linear head: smaller, but not by much.
    assert v["int8_dynamic"]["metrics"]["size_bytes"] < onnx_ref["size_bytes"]
    # 50% structured pruning: at least 3x fewer parameters, and the file shrinks with them.
    assert v["pruned"]["metrics"]["params"] * 3 <= ref["params"]
    assert v["pruned"]["metrics"]["size_bytes"] * 3 <= ref["size_bytes"]
    # distilled student: at least 8x fewer parameters; the CE student is the same architecture.
    assert v["distilled"]["metrics"]["params"] * 8 <= ref["params"]
    assert v["distilled_ce"]["metrics"]["params"] == v["distilled"]["metrics"]["params"]
    # composed chains shrink further.
    assert v["pruned_int8"]["metrics"]["size_bytes"] < v["pruned"]["metrics"]["size_bytes"] / 3
    assert v["distilled_pruned"]["metrics"]["params"] < v["distilled"]["metrics"]["params"]
    assert (
        v["distilled_pruned_int8"]["metrics"]["size_bytes"]
        < v["distilled_pruned"]["metrics"]["size_bytes"]
    )
    # magnitude pruning is reported honestly: half the weights are zero, the dense file is just as
    # big.
    assert v["sparse"]["extra"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert v["sparse"]["metrics"]["size_bytes"] == pytest.approx(ref["size_bytes"], rel=0.01)
    assert any("no size or speed gain" in n for n in v["sparse"]["notes"])


def test_accuracy_within_bounds_on_test_data(compressed):
    v = compressed["by_name"]
    ref_acc = compressed["out"]["reference"]["metrics"]["test_accuracy"]

    def acc(name):
        return v[name]["metrics"]["test_accuracy"]

    assert acc("int8_static") >= ref_acc - 0.005  # at most 0.5 point
    assert acc("pruned") >= ref_acc - 0.01  # at most 1 point after fine-tuning
    assert acc("distilled") >= acc("distilled_ce")  # distillation adds something over labels alone
    assert acc("distilled") >= ref_acc - 0.02  # within 2 points of the teacher
    assert v["int8_static"]["ratios"]["accuracy_drop_points"] <= 0.5


def test_registry_versions_tags_and_candidate_alias(compressed, reference):
    out, by_name = compressed["out"], compressed["by_name"]
    after = compressed["after"]
    new = set(after) - compressed["before"]
    assert new == {
        v["version"] for v in out["variants"]
    }  # one new version per variant, nothing else
    ref_version = reference["uri"].rsplit("/", 1)[1]
    for name, entry in by_name.items():
        tags = after[entry["version"]].tags
        assert tags["kiln.variant"] == entry["kind"]
        assert tags["kiln.variant_name"] == name
        parent = (
            ref_version if entry["input"] == "reference" else by_name[entry["input"]]["version"]
        )
        assert tags["kiln.parent_version"] == parent, name
        assert json.loads(tags["kiln.params"]) == entry["params"]
        assert tags["kiln.format"] == entry["format"]
    assert after[by_name["pruned"]["version"]].tags["kiln.param.ratio"] == "0.5"
    assert after[by_name["distilled"]["version"]].tags["kiln.param.temperature"] == "4.0"
    assert after[by_name["int8_static"]["version"]].tags["kiln.param.calibration_samples"] == "256"
    # the candidate: the smallest variant within 1 point of the reference
    ref_acc = out["reference"]["metrics"]["test_accuracy"]
    qualifying = [
        v for v in out["variants"] if ref_acc - v["metrics"]["test_accuracy"] <= 0.01 + 1e-12
    ]
    assert qualifying
    expected = min(
        qualifying, key=lambda v: (v["metrics"]["size_bytes"], -v["metrics"]["test_accuracy"])
    )
    assert out["selected"] == expected["model_uri"]
    assert alias_version(reference) == expected["version"]
    # the report: Markdown, JSON and the Pareto plot, also logged to MLflow
    for key in ("markdown", "json", "plot"):
        assert Path(out["report"][key]).is_file()
    assert Path(out["report"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    logged = {a.path for a in client(reference).list_artifacts(out["run_id"], "report")}
    assert logged == {"report/report.md", "report/report.json", "report/pareto.png"}
    assert "| int8_static |" in Path(out["report"]["markdown"]).read_text()


def test_none_qualifies_sets_no_alias(reference, compressed, tmp_path):
    """Through the library (the CLI path is covered above), naming the model by its train run id:
    a 97%-sparse net is far from the reference, so no variant qualifies."""
    from kiln.compress.run import run_compression
    from kiln.schema import load_config

    before_alias = alias_version(reference)
    config = write_config(
        tmp_path / "c.yaml",
        reference["run_dir"],
        reference["run_id"],
        [{"kind": "unstructured_prune", "name": "very_sparse", "amount": 0.97}],
        {"max_accuracy_drop": 0.0, "objective": "latency"},
    )
    result = run_compression(load_config(config))
    out = result.to_dict()
    assert (
        out["reference"]["model_uri"] == reference["uri"]
    )  # the run id resolved to its registered version
    assert out["selected"] is None
    assert "no variant is within" in out["selection"] and "not set" in out["selection"]
    assert (
        out["variants"][0]["metrics"]["test_accuracy"]
        < out["reference"]["metrics"]["test_accuracy"]
    )
    assert alias_version(reference) == before_alias  # the earlier candidate stays; nothing was set
    assert out["variants"][0]["model_uri"] in {
        f"models:/{MODEL}/{v}" for v in versions(reference)
    }  # still registered


@pytest.mark.parametrize("case", ["unknown_model", "step_does_not_apply", "calibration_too_large"])
def test_bad_inputs_fail_clearly_and_register_nothing(reference, tmp_path, case):
    steps = [{"kind": "quantize", "mode": "static"}]
    model_uri = reference["uri"]
    expect = ""
    if case == "unknown_model":
        model_uri, expect = "models:/no-such-model/3", "unknown model 'models:/no-such-model/3'"
    elif case == "step_does_not_apply":
        steps = [{"kind": "quantize"}, {"kind": "prune", "input": "int8_static"}]
        expect = "prune does not apply to 'int8_static', a onnx model"
    elif case == "calibration_too_large":
        steps = [{"kind": "quantize", "mode": "static", "calibration_samples": 100000}]
        expect = "100000 calibration samples requested, but the train split has only"
    config = write_config(
        tmp_path / "c.yaml", reference["run_dir"], model_uri, steps, {"max_accuracy_drop": 0.5}
    )
    before, alias_before = set(versions(reference)), alias_version(reference)
    if case == "calibration_too_large":  # the job entrypoint behaves as the CLI
        import subprocess

        from conftest import kiln_env

        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "compress.py"), str(config)],
            # the data is read in Ray Data tasks: on the session's instance, not a new one
            env=kiln_env({"RAY_ADDRESS": reference["address"]}),
            capture_output=True,
            text=True,
            timeout=300,
        )
    else:
        proc = run_kiln("compress", str(config), "--address", reference["address"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert set(versions(reference)) == before and alias_version(reference) == alias_before


def test_model_card_of_a_compressed_variant(compressed, reference):
    """The card stored at registration, and `kiln model card`, name the variant's parent, its
    steps from the reference, and its measured size and accuracy against the reference."""
    out, by_name = compressed["out"], compressed["by_name"]
    entry, parent = by_name["pruned_int8"], by_name["pruned"]
    mv = compressed["after"][entry["version"]]
    logged = {a.path for a in client(reference).list_artifacts(mv.run_id, "model_card")}
    assert logged == {f"model_card/{MODEL}-v{entry['version']}.md"}
    proc = run_kiln(
        "model", "card", entry["model_uri"], "--tracking-uri", reference["tracking_uri"]
    )
    assert proc.returncode == 0, proc.stderr
    card = proc.stdout
    assert card.startswith(f"# Model card: {MODEL} v{entry['version']}")
    assert f"- Parent: `{parent['model_uri']}` (prune)" in card
    assert f"- Reference: `{reference['uri']}` (fp32)" in card
    assert "1. prune 'pruned' (" in card and f"-> v{parent['version']}" in card
    assert "2. quantize 'pruned_int8'" in card and f"-> v{entry['version']}" in card
    size, ref_size = entry["metrics"]["size_bytes"], out["reference"]["metrics"]["size_bytes"]
    assert (
        f"- Size: {size / 1024:.1f} KB against {ref_size / 1024:.1f} KB "
        f"({ref_size / size:.2f}x smaller)" in card
    )
    acc = float(mv.tags["test_accuracy"])
    ref_acc = float(compressed["after"][reference["uri"].rsplit("/", 1)[1]].tags["test_accuracy"])
    assert (
        f"- Test accuracy: {acc:.4f} against {ref_acc:.4f} ({100 * (acc - ref_acc):+.2f} points)"
        in (card)
    )
    # the data it was trained on, from the reference's run: rows and class balance per split
    assert "- Rows per split: train 1,2" in card and "total 1,797" in card
    assert "| class | train | val | test |" in card
    assert "- Preprocessing: image: 1 channel(s) at 8x8, pixels scaled to [0, 1]" in card
    proc = run_kiln(
        "model", "card", f"models:/{MODEL}/999", "--tracking-uri", reference["tracking_uri"]
    )
    assert proc.returncode == 2 and "error: unknown model" in proc.stderr


def test_compress_without_a_data_section_uses_the_models_own_data(ray_cluster, tmp_path):
    """A model trained on a user's Parquet file records its data section; a compress config with
    no data section compresses it and evaluates on that model's own test split (before, the
    default data section was refused with a data-hash mismatch)."""
    from kiln.compress.run import run_compression
    from kiln.schema import load_config, validate_config
    from kiln.train.run import run_training
    from synthetic import tabular_parquet

    source = tabular_parquet(tmp_path / "animals.parquet", rows=600)
    run_dir = tmp_path / "runs"
    trained = run_training(
        validate_config(
            {
                "experiment": {"name": "held-in", "run_dir": str(run_dir)},
                "data": {"source": str(source), "label": "species"},
                "model": {"name": "mlp", "hidden": [16], "dropout": 0.0},
                "train": {"epochs": 3, "workers": 1, "cpus_per_worker": 1, "lr": 0.01},
            }
        ),
        address=ray_cluster,
    )
    config = tmp_path / "compress.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": {"name": "held-in", "run_dir": str(run_dir)},
                "compress": {
                    "model": trained.model_uri,
                    "steps": [{"kind": "quantize", "mode": "dynamic"}],
                    "selection": {"max_accuracy_drop": 0.5},
                    "benchmark": {"rounds": 1, "latency_runs": 5, "throughput_runs": 1},
                },
            }
        )
    )
    out = run_compression(load_config(config), address=ray_cluster).to_dict()
    from kiln import tracking as trk

    tags = trk.get_run(out["tracking_uri"], out["run_id"]).data.tags
    assert tags[trk.TAG_DATASET_HASH] == trained.dataset_hash  # the model's own data and split
    assert out["reference"]["metrics"]["test_accuracy"] == pytest.approx(
        trained.metrics["test_accuracy"], abs=1e-9
    )
