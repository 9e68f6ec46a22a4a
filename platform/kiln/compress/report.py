"""The compression report: one row per model, as a terminal table, Markdown, JSON and a Pareto
plot."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.compress.evaluate import Metrics

INTERESTING_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass
class VariantReport:
    """One model in the report: the reference, an unregistered baseline, or a registered variant."""

    name: str
    kind: str  # reference | baseline | prune | unstructured_prune | quantize | distill | distill_ce
    input: str | None
    format: str
    metrics: Metrics
    step_seconds: float = 0.0
    model_uri: str | None = None
    version: str | None = None
    compared_to: str | None = None  # the fp32 model measured in the same runtime
    ratios: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the step's parameters
    extra: dict[str, float] = field(default_factory=dict)  # kind-specific numbers (e.g. sparsity)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "input": self.input,
            "format": self.format,
            "model_uri": self.model_uri,
            "version": self.version,
            "metrics": self.metrics.to_dict(),
            "step_seconds": round(self.step_seconds, 3),
            "compared_to": self.compared_to,
            "ratios": self.ratios,
            "params": self.params,
            "extra": self.extra,
            "notes": self.notes,
        }


def compare(variant: Metrics, base: Metrics) -> dict[str, float]:
    """Ratios against the fp32 model in the same runtime (> 1: the variant is better)."""

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else 0.0

    return {
        "size_reduction": ratio(base.size_bytes, variant.size_bytes),
        "param_reduction": ratio(base.params, variant.params),
        "throughput_speedup": ratio(variant.throughput, base.throughput),
        "latency_speedup": ratio(base.latency_p50_ms, variant.latency_p50_ms),
        "accuracy_drop_points": round(100 * (base.test_accuracy - variant.test_accuracy), 3),
    }


def machine_info() -> dict[str, Any]:
    """CPU model and the SIMD flags that decide int8 speed, plus library versions and threads."""
    import onnxruntime
    import torch

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import os

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "flags": [f for f in INTERESTING_FLAGS if f in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "gpu": torch.cuda.is_available(),
    }


COLUMNS = [
    ("name", "variant"),
    ("kind", "kind"),
    ("format", "format"),
    ("acc", "acc"),
    ("f1", "F1"),
    ("params", "params"),
    ("size", "size KB"),
    ("p50", "p50 ms"),
    ("p99", "p99 ms"),
    ("thr", "thr/s"),
    ("vs", "vs"),
    ("size_x", "size x"),
    ("thr_x", "thr x"),
    ("drop", "drop pt"),
    ("secs", "step s"),
]


def _row(r: VariantReport) -> dict[str, str]:
    m = r.metrics
    return {
        "name": r.name,
        "kind": r.kind,
        "format": r.format,
        "acc": f"{m.test_accuracy:.4f}",
        "f1": f"{m.test_f1_macro:.4f}",
        "params": f"{m.params:,}",
        "size": f"{m.size_bytes / 1024:.1f}",
        "p50": f"{m.latency_p50_ms:.3f}",
        "p99": f"{m.latency_p99_ms:.3f}",
        "thr": f"{m.throughput:,.0f}",
        "vs": r.compared_to or "-",
        "size_x": f"{r.ratios['size_reduction']:.2f}" if r.ratios else "-",
        "thr_x": f"{r.ratios['throughput_speedup']:.2f}" if r.ratios else "-",
        "drop": f"{r.ratios['accuracy_drop_points']:+.2f}" if r.ratios else "-",
        "secs": f"{r.step_seconds:.1f}" if r.step_seconds else "-",
    }


def format_table(rows: list[VariantReport]) -> str:
    """Aligned plain-text table of every model."""
    cells = [_row(r) for r in rows]
    widths = {k: max(len(h), *(len(c[k]) for c in cells)) for k, h in COLUMNS}
    lines = ["  ".join(h.ljust(widths[k]) for k, h in COLUMNS)]
    lines += ["  ".join(c[k].ljust(widths[k]) for k, _ in COLUMNS) for c in cells]
    return "\n".join(lines)


def markdown(summary: dict[str, Any], rows: list[VariantReport]) -> str:
    """The report as Markdown: what was compressed, on which machine, the table, notes and the
    selection."""
    info = summary["machine"]
    head = (
        "| "
        + " | ".join(h for _, h in COLUMNS)
        + " |\n|"
        + "|".join("---" for _ in COLUMNS)
        + "|\n"
    )
    body = "".join("| " + " | ".join(_row(r)[k] for k, _ in COLUMNS) + " |\n" for r in rows)
    notes = [f"- **{r.name}**: {n}" for r in rows for n in r.notes]
    return (
        f"# Compression report: {summary['source_model']}\n\n"
        f"Test split: {summary['test_rows']} rows (data hash {summary['dataset_hash']}). "
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, flags "
        f"{', '.join(info['flags']) or 'none of note'}; "
        f"torch {info['torch']} ({info['torch_threads']} threads), onnxruntime "
        f"{info['onnxruntime']}; "
        f"GPU: {'yes' if info['gpu'] else 'none'}.\n\n"
        f"Timings: batch-1 latency and batch-{summary['throughput_batch']} throughput, every model "
        "measured "
        f"in turn in each of {summary['rounds']} rounds, medians. Ratios (`size x`, `thr x`, `drop "
        "pt`) compare a "
        "variant with the fp32 model in the same runtime (`vs`). Size counts every file of the "
        "artifact "
        "(spec.json and weights, ONNX external data included).\n\n"
        + head
        + body
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
        + f"\n**Selection**: {summary['selection']['message']}\n"
    )


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both cost (lower) and accuracy (higher)."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
            if j != i
        ):
            front.append(i)
    return front


def pareto_png(rows: list[VariantReport], path: str | Path) -> Path:
    """Two panels: test accuracy against size and against batch-1 latency; the Pareto front is
    joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (label, cost) in zip(
        axes,
        [
            ("size (KB)", lambda m: m.size_bytes / 1024),
            ("batch-1 latency p50 (ms)", lambda m: m.latency_p50_ms),
        ],
        strict=True,
    ):
        pts = [(cost(r.metrics), 100 * r.metrics.test_accuracy) for r in rows]
        for r, (x, y) in zip(rows, pts, strict=True):
            marker = "s" if r.kind in ("reference", "baseline") else "o"
            ax.scatter([x], [y], marker=marker, s=50)
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = sorted((pts[i] for i in pareto_front(pts)), key=lambda p: p[0])
        ax.plot(
            [p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front"
        )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels of a log axis collide
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Accuracy against size and latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(
    directory: Path, summary: dict[str, Any], rows: list[VariantReport]
) -> dict[str, Path]:
    """report.md, report.json and pareto.png in ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": directory / "report.md",
        "json": directory / "report.json",
        "plot": directory / "pareto.png",
    }
    paths["markdown"].write_text(markdown(summary, rows))
    paths["json"].write_text(
        json.dumps({**summary, "models": [r.to_dict() for r in rows]}, indent=2, default=str)
    )
    pareto_png(rows, paths["plot"])
    return paths
