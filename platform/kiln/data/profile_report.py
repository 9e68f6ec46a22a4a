"""Rendering a DataProfile: JSON, PNG plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import itertools
import json
from pathlib import Path
from typing import Any

from kiln.data.profile import DataProfile


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_class_balance(profile: DataProfile, path: Path) -> Path:
    import numpy as np

    plt = _plt()
    labels = [str(label) for label in profile.labels]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) + 2), 3.5))
    pos = np.arange(len(labels))
    for i, split in enumerate(("train", "val", "test")):
        ax.bar(pos + (i - 1) * 0.27, profile.class_counts[split], width=0.27, label=split)
    ax.set_xticks(pos, labels, rotation=45 if len(labels) > 10 else 0)
    ax.set_ylabel("rows")
    ax.set_title(f"Class balance (train imbalance ratio {profile.imbalance_ratio:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_histograms(profile: DataProfile, path: Path, max_panels: int = 24) -> Path | None:
    plt = _plt()
    if profile.kind == "tabular":
        panels = [(f["name"], f["histogram"]) for f in profile.features if "histogram" in f][
            :max_panels
        ]
    else:
        panels = [
            ("pixel intensity", profile.images["pixel_histogram"]),
            ("image brightness", profile.images["image_brightness"]["histogram"]),
        ]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, hist) in zip(axes.flat, panels, strict=False):  # spare axes stay empty
        edges, counts = hist["edges"], hist["counts"]
        ax.bar(
            edges[:-1], counts, width=[b - a for a, b in itertools.pairwise(edges)], align="edge"
        )
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _img_tag(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(profile: DataProfile, out_dir: str | Path) -> dict[str, Path]:
    """Write profile.json, class_balance.png, histograms.png and profile.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json"}
    paths["json"].write_text(json.dumps(profile.to_dict(), indent=2))
    paths["class_balance"] = plot_class_balance(profile, out / "class_balance.png")
    hist = plot_histograms(profile, out / "histograms.png")
    if hist:
        paths["histograms"] = hist
    leak = profile.leakage
    leak_rows = [{"check": k.replace("_", " "), "rows": v} for k, v in leak.items()]
    classes = [
        {"label": label, **{s: profile.class_counts[s][i] for s in ("train", "val", "test")}}
        for i, label in enumerate(profile.labels)
    ]
    if profile.kind == "tabular":
        details = _table(
            [
                {k: f.get(k, "") for k in ("name", "missing", "mean", "std", "min", "max")}
                | {"p50": f["quantiles"][50] if "quantiles" in f else ""}
                for f in profile.features
            ],
            ["name", "missing", "mean", "std", "min", "max", "p50"],
        )
    else:
        im = profile.images
        details = _table(
            [
                {
                    "channels": im["channels"],
                    "height": im["height"],
                    "width": im["width"],
                    "channel mean": ", ".join(f"{v:.3f}" for v in im["channel_mean"]),
                    "channel std": ", ".join(f"{v:.3f}" for v in im["channel_std"]),
                }
            ],
            ["channels", "height", "width", "channel mean", "channel std"],
        )
    warning = (
        '<p class="warn">Leakage: identical inputs appear in more than one split.</p>'
        if profile.has_leak
        else "<p>No identical inputs shared between splits.</p>"
    )
    source = html.escape(profile.source)
    images = (
        "Features (train split, raw values)"
        if profile.kind == "tabular"
        else "Images (train split)"
    )
    balance = _img_tag(paths["class_balance"])
    page = "\n".join(
        [
            '<!doctype html><html><head><meta charset="utf-8">'
            f"<title>Data profile {source}</title>",
            "<style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse;margin:1em 0}",
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            ".warn{color:#b00;font-weight:bold}</style></head><body>",
            "<h1>Data profile</h1>",
            f"<p>source <code>{source}</code>, {profile.kind}, "
            f"dataset hash <code>{profile.dataset_hash}</code></p>",
            _table([profile.rows], ["total", "train", "val", "test"]),
            f"<h2>Classes</h2>{_table(classes, ['label', 'train', 'val', 'test'])}",
            "<p>train imbalance ratio (largest / smallest class): "
            f"{profile.imbalance_ratio:.2f}</p>{balance}",
            f"<h2>{images}</h2>",
            f"{details}{_img_tag(hist)}",
            f"<h2>Leakage</h2>{warning}{_table(leak_rows, ['check', 'rows'])}",
            "</body></html>",
        ]
    )
    paths["html"] = out / "profile.html"
    paths["html"].write_text(page)
    return paths
