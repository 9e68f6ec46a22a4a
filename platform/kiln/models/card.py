"""Model cards: what a registry version is, where it came from and how well it does, as Markdown.

``version_facts`` reads one version's facts from the registry (tags, run, artifact spec);
``model_card`` renders them with its lineage: the training run's data (source, hash, split, class
balance, preprocessing) and per-class metrics, the sweep and trial of a tuned model, and for a
compressed variant its parent, the compression steps from the reference and its measured size and
accuracy against the reference. ``register_artifact`` stores the card of every version it
registers as an MLflow artifact of the version's run (``model_card/NAME-vVERSION.md``); ``kiln
model card URI`` renders it again (aliases move). Torch-free: the console's replica uses it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.errors import KilnError, ModelError
from kiln.models.spec import SPEC_FILE, load_spec

CARD_ARTIFACT_DIR = "model_card"
REPORT_ARTIFACT = "classification_report.json"  # per-class metrics a training run logs
PROFILE_ARTIFACT = "reference_profile.json"  # the data profile a training run (or trial) logs
MAX_BALANCE_CLASSES = 50  # class balance per split in the card: one row per class up to this
MAX_STEPS = 32  # a variant chain longer than this is a loop in the tags, not a real chain


def card_artifact_name(name: str, version: str) -> str:
    """The card's file name among the run's artifacts (a run may register several versions)."""
    return f"{name}-v{version}.md"


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def version_facts(tracking_uri: str, uri: str) -> dict[str, Any]:
    """One registry version's facts: aliases, variant, format, architecture, size, test accuracy,
    parent, dataset hash, the run and its metrics. Raises ModelError when the version is unknown."""
    mv = trk.model_version_for(tracking_uri, uri)
    tags = dict(mv.tags or {})
    name, version = mv.name, str(mv.version)
    spec = None
    size = _float(tags.get("size_bytes"))
    try:
        directory = trk.resolve_model_dir(f"models:/{name}/{version}", tracking_uri)
        spec = load_spec(directory, uri)
        if size is None:  # spec.json and the weight files it names (artifact_size, torch-free)
            size = float(sum((directory / f).stat().st_size for f in [SPEC_FILE, *spec.files]))
    except (ModelError, OSError):
        pass
    run = None
    if mv.run_id:
        try:
            run = trk.get_run(tracking_uri, mv.run_id)
        except KilnError:
            run = None
    params = tags.get("kiln.params")
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "registered_at": (mv.creation_timestamp or 0) / 1000.0,
        "description": mv.description or "",
        "variant": tags.get("kiln.variant") or ((spec.variant or {}).get("kind") if spec else None),
        "variant_name": tags.get("kiln.variant_name"),
        "format": tags.get("kiln.format") or (spec.format if spec else None),
        "architecture": tags.get("kiln.architecture") or (spec.architecture if spec else None),
        "input_shape": list(spec.input_shape) if spec else None,
        "labels": [str(label) for label in spec.labels] if spec else None,
        "preprocessing": spec.preprocessing.kind if spec else None,
        "preprocessing_detail": describe_preprocessing(spec.preprocessing) if spec else None,
        "size_bytes": size,
        "test_accuracy": _float(tags.get("test_accuracy")),
        "parent_version": tags.get("kiln.parent_version"),
        "params": json.loads(params) if params else {},
        "compress_run": tags.get("kiln.compress_run"),
        "dataset_hash": tags.get(trk.TAG_DATASET_HASH),
        "run_id": mv.run_id,
        "run_tags": dict(run.data.tags) if run is not None else {},
        "metrics": dict(run.data.metrics) if run is not None else {},
        "experiment_id": run.info.experiment_id if run is not None else None,
    }


def _numbers(values: list[float], most: int = 8) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:most])
    return f"[{shown}{', ...' if len(values) > most else ''}]"


def describe_preprocessing(prep: Any) -> str:
    """One line on how raw inputs become model inputs (``kiln.data.preprocess.Preprocessing``),
    with the statistics fitted on the train split."""
    if prep.kind == "image":
        size = "x".join(str(int(n)) for n in prep.image_size or [])
        return (
            f"image: {prep.channels} channel(s) at {size}, pixels scaled to [0, 1], then per "
            f"channel (x - mean) / std with mean {_numbers(prep.mean)} and std "
            f"{_numbers(prep.std)} fitted on the train split"
        )
    names = list(prep.feature_names)
    listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (
        f"tabular: {len(names)} feature(s) ({listed}); missing values -> the train mean, then "
        f"(x - mean) / std with mean "
        f"{_numbers(prep.mean)} and std {_numbers(prep.std)} fitted on the train split"
    )


def _lineage(tracking_uri: str, facts: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain from the reference to ``facts``' version: the reference first, then one entry
    per compression step (each a version whose tags name its parent)."""
    chain = [facts]
    seen = {facts["version"]}
    while chain[0].get("parent_version") and len(chain) <= MAX_STEPS:
        parent = chain[0]["parent_version"]
        if parent in seen:
            break
        seen.add(parent)
        chain.insert(0, version_facts(tracking_uri, f"models:/{facts['name']}/{parent}"))
    return chain


def _kb(size: float | None) -> str:
    return "not recorded" if size is None else f"{size / 1024:.1f} KB"


def _acc(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.4f}"


def public_uri(uri: str) -> str:
    """``uri`` without the user and password an HTTP tracking URI may carry (a card is shared)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _run_link(tracking_uri: str, facts: dict[str, Any]) -> str:
    tracking_uri = public_uri(tracking_uri)
    run = f"`{facts['run_id']}`"
    if tracking_uri.startswith(("http://", "https://")) and facts.get("experiment_id"):
        base = tracking_uri.rstrip("/")
        link = f"{base}/#/experiments/{facts['experiment_id']}/runs/{facts['run_id']}"
        return f"[{facts['run_id']}]({link})"
    return f"{run} in `{tracking_uri}`"


def _run_json(tracking_uri: str, run_id: str | None, artifact: str) -> Any:
    """The JSON artifact ``artifact`` of run ``run_id``, None when there is none."""
    if not run_id:
        return None
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="kiln-card-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=artifact,
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            return json.loads(Path(path).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def _report_rows(tracking_uri: str, run_id: str | None) -> list[dict[str, Any]]:
    """The training run's per-class report (label, precision, recall, f1, support), [] if none."""
    rows = _run_json(tracking_uri, run_id, REPORT_ARTIFACT)
    return list(rows) if isinstance(rows, list) else []


SPLIT_NAMES = ("train", "val", "test")


def split_lines(profile: dict[str, Any] | None, split: dict[str, Any]) -> list[str]:
    """The card's lines on the split: rows per split and class balance per split (counts and
    shares) from the training run's data profile (``kiln.data.profile``), the configured
    fractions beside them; only the fractions when the run logged no profile."""
    fractions = ", ".join(f"{k} {v}" for k, v in split.items()) if split else ""
    profile = profile or {}
    rows = profile.get("rows") or {}
    if not rows:
        return ["- Split: " + (f"fractions {fractions}" if fractions else "not recorded")]
    lines = [
        "- Rows per split: "
        + ", ".join(f"{s} {int(rows.get(s, 0)):,}" for s in SPLIT_NAMES)
        + f" (total {int(rows.get('total', sum(int(rows.get(s, 0)) for s in SPLIT_NAMES))):,}"
        + (f"; configured fractions {fractions}" if fractions else "")
        + ")"
    ]
    labels = [str(label) for label in profile.get("labels") or []]
    counts = profile.get("class_counts") or {}
    if not labels or not all(len(counts.get(s) or []) == len(labels) for s in SPLIT_NAMES):
        return lines
    lines += [
        "- Class balance per split (rows, share of the split)"
        + (
            f"; the {MAX_BALANCE_CLASSES} largest classes of {len(labels)}:"
            if len(labels) > MAX_BALANCE_CLASSES
            else ":"
        ),
        "",
        "| class | " + " | ".join(SPLIT_NAMES) + " |",
        "|---|" + "---|" * len(SPLIT_NAMES),
    ]
    order = sorted(range(len(labels)), key=lambda i: -sum(counts[s][i] for s in SPLIT_NAMES))
    for i in sorted(order[:MAX_BALANCE_CLASSES]):
        cells = []
        for s in SPLIT_NAMES:
            total = int(rows.get(s, 0)) or 1
            cells.append(f"{int(counts[s][i]):,} ({int(counts[s][i]) / total:.1%})")
        lines.append(f"| {labels[i]} | " + " | ".join(cells) + " |")
    if profile.get("imbalance_ratio") is not None:
        lines += [
            "",
            f"- Imbalance ratio (largest / smallest class): {profile['imbalance_ratio']:.3g}",
        ]
    return lines


def model_card(tracking_uri: str, uri: str) -> str:
    """The Markdown model card of ``uri`` (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``).
    Raises ModelError when the version is unknown."""
    facts = version_facts(tracking_uri, uri)
    chain = _lineage(tracking_uri, facts)
    reference = chain[0]
    train = reference  # the version whose run trained the weights
    config = json.loads(train["run_tags"].get("kiln.config_json", "{}") or "{}")
    source = train["run_tags"].get(trk.TAG_DATA_SOURCE) or (config.get("data") or {}).get(
        "source", "not recorded"
    )
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(facts["registered_at"]))
    lines = [
        f"# Model card: {facts['name']} v{facts['version']}",
        "",
        f"`{facts['uri']}`, registered {when}"
        + (f"; aliases: {', '.join(facts['aliases'])}" if facts["aliases"] else "; no alias"),
    ]
    if facts["description"]:
        lines += ["", facts["description"]]
    lines += [
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        f"| variant | {facts['variant'] or 'not recorded'}"
        + (f" ('{facts['variant_name']}')" if facts["variant_name"] else "")
        + " |",
        f"| format | {facts['format'] or 'not recorded'} |",
        f"| architecture | {facts['architecture'] or 'not recorded'} |",
        f"| input shape | {facts['input_shape']} |",
        f"| classes | {len(facts['labels'] or [])} |",
        f"| size | {_kb(facts['size_bytes'])} |",
        f"| test accuracy | {_acc(facts['test_accuracy'])} |",
        "",
        "## Lineage",
        "",
        f"- MLflow run: {_run_link(tracking_uri, facts)}"
        + (
            f" (job: {facts['run_tags'].get(trk.TAG_JOB)})"
            if facts["run_tags"].get(trk.TAG_JOB)
            else ""
        ),
        f"- Data: source `{source}`, "
        f"dataset hash `{facts['dataset_hash'] or train['dataset_hash'] or 'not recorded'}`",
    ]
    tags = train["run_tags"]
    sweep = tags.get("mlflow.parentRunId") if tags.get("kiln.tune.trial") else None
    if sweep:
        lines.append(
            f"- Tuned: sweep run `{sweep}`, trial {tags['kiln.tune.trial']}"
            + "".join(
                f"; {k[len('kiln.tune.') :]} {v}"
                for k, v in sorted(tags.items())
                if k.startswith("kiln.tune.") and k != "kiln.tune.trial"
            )
        )
    if len(chain) > 1:
        parent = chain[-2]
        lines += [
            f"- Parent: `{parent['uri']}` ({parent['variant'] or 'reference'})",
            f"- Reference: `{reference['uri']}` ({reference['variant'] or 'fp32'})",
            "- Compression steps, from the reference:",
        ]
        for i, step in enumerate(chain[1:], 1):
            params = ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items()))
            lines.append(
                f"  {i}. {step['variant']} '{step['variant_name'] or '?'}'"
                + (f" ({params})" if params else "")
                + f" -> v{step['version']}"
            )
        lines += ["", "## Against the reference", "", *_against(facts, reference)]
    lines += ["", "## Data", ""]
    data = config.get("data") or {}
    split = data.get("split") or {}
    profile = _run_json(tracking_uri, train["run_id"], PROFILE_ARTIFACT)
    lines += split_lines(profile if isinstance(profile, dict) else None, split)
    lines.append(
        "- Preprocessing: "
        + (train.get("preprocessing_detail") or train["preprocessing"] or "not recorded")
    )
    rows = _report_rows(tracking_uri, train["run_id"])
    if rows and not (isinstance(profile, dict) and profile.get("class_counts")):
        total = sum(int(r.get("support", 0)) for r in rows) or 1
        lines.append(
            "- Class balance (test split): "
            + ", ".join(f"{r['label']} {int(r['support']) / total:.1%}" for r in rows)
        )
    metrics = {k: v for k, v in sorted(facts["metrics"].items()) if not k.startswith("val_")}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    if rows and train is facts:
        lines += [
            "",
            "## Per class (test split)",
            "",
            "| class | precision | recall | f1 | support |",
        ]
        lines += ["|---|---|---|---|---|"]
        lines += [
            f"| {r['label']} | {r['precision']} | {r['recall']} | {r['f1']} | {r['support']} |"
            for r in rows
        ]
    if config:
        import yaml

        lines += [
            "",
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _against(facts: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Measured size and accuracy of a variant against its reference, as Markdown lines."""
    out = []
    size, ref_size = facts["size_bytes"], reference["size_bytes"]
    if size is not None and ref_size:
        out.append(f"- Size: {_kb(size)} against {_kb(ref_size)} ({ref_size / size:.2f}x smaller)")
    else:
        out.append(f"- Size: {_kb(size)} (reference: {_kb(ref_size)})")
    acc, ref_acc = facts["test_accuracy"], reference["test_accuracy"]
    if acc is not None and ref_acc is not None:
        out.append(
            f"- Test accuracy: {_acc(acc)} against {_acc(ref_acc)} "
            f"({100 * (acc - ref_acc):+.2f} points)"
        )
    else:
        out.append(f"- Test accuracy: {_acc(acc)} (reference: {_acc(ref_acc)})")
    m = facts["metrics"]
    for key, label in (
        ("latency_p50_ms", "Latency p50"),
        ("latency_speedup", "Latency speedup (same runtime)"),
        ("throughput_speedup", "Throughput speedup (same runtime)"),
    ):
        if key in m:
            unit = " ms" if key.endswith("_ms") else "x"
            out.append(f"- {label}: {m[key]:.3g}{unit}")
    return out


def store_card(tracking_uri: str, name: str, version: str, run_id: str) -> str:
    """Render the card of ``models:/NAME/VERSION`` and log it on ``run_id`` under
    ``model_card/``. Returns the card. Raises ModelError or MLflow's errors."""
    text = model_card(tracking_uri, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory(prefix="kiln-card-") as tmp:
        path = Path(tmp) / card_artifact_name(name, version)
        path.write_text(text)
        trk.log_artifact(tracking_uri, run_id, path, CARD_ARTIFACT_DIR)
    return text
