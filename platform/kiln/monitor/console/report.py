"""``kiln monitor report``: one HTML page per served model with PNG plots of each version's live
window against its reference (numeric features as histograms, categories as bars), the drift table
and the alerts."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.profile_report import _img_tag, _plt, _table
from kiln.files import atomic_write_text


def plot_version(status: dict[str, Any], path: Path, max_panels: int = 24) -> Path | None:
    """Live window (orange) against reference (blue), one panel per monitored feature."""
    window, reference = status.get("window_rows"), status.get("reference")
    if not window or not reference or not window["rows"]:
        return None
    plt = _plt()
    rows = np.asarray(window["rows"], np.float64)
    drifted = set(status["drift"].get("drifted", []))
    panels = reference["features"][:max_panels]
    cols = min(4, len(panels))
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.3 * cols, 2.5 * n_rows), squeeze=False)
    for i, (ax, feature) in enumerate(zip(axes.flat, panels, strict=False)):  # spare axes: off
        live = rows[:, i]
        if feature["kind"] == "categorical":
            k = len(feature["proportions"])
            share = np.bincount(np.clip(live.astype(int), 0, k - 1), minlength=k) / max(
                len(live), 1
            )
            pos = np.arange(k)
            ax.bar(pos - 0.2, feature["proportions"], width=0.4, label="reference")
            ax.bar(pos + 0.2, share, width=0.4, label="live")
        else:
            ref = np.asarray(feature["sample"], np.float64)
            live = live[~np.isnan(live)]
            lo, hi = (
                min(ref.min(), live.min(initial=ref.min())),
                max(ref.max(), live.max(initial=ref.max())),
            )
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
            ax.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
            ax.hist(live, bins=bins, density=True, alpha=0.5, label="live")
        ax.set_title(
            feature["name"] + ("  DRIFT" if feature["name"] in drifted else ""),
            fontsize=9,
            color="#b00" if feature["name"] in drifted else "black",
        )
        if i == 0:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write monitor.json, one PNG per monitored version and monitor.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = report["model"]
    paths: dict[str, Path] = {"json": out / "monitor.json"}
    atomic_write_text(paths["json"], json.dumps(report, indent=1))
    sections = []
    for version, status in report["versions"].items():
        if not status.get("monitored"):
            sections.append(
                f"<h2>Version {html.escape(version)}</h2><p class=warn>not monitored: "
                f"{html.escape(status.get('reason', ''))}</p>"
            )
            continue
        png = plot_version(status, out / f"{model}-v{version}.png")
        if png:
            paths[f"v{version}"] = png
        drift, ood = status["drift"], status["ood"]
        score = "n/a (window below min_rows)" if drift["score"] is None else f"{drift['score']:.3f}"
        table = _table(
            [
                {
                    "feature": f["name"],
                    "psi": f["psi"],
                    "statistic": f["statistic"],
                    "p_value": f["p_value"],
                    "drifted": "yes" if f["drifted"] else "",
                }
                for f in drift.get("features", [])
            ],
            ["feature", "psi", "statistic", "p_value", "drifted"],
        )
        alerts = "".join(
            f"<li>{html.escape(time.strftime('%H:%M:%S', time.localtime(a['at'])))} {a['signal']} "
            f"{a['state']} ({a['value']:.3f}, threshold {a['threshold']:g})</li>"
            for a in status["alerts"]
        )
        rate = "n/a" if ood["window_rate"] is None else f"{ood['window_rate']:.3f}"
        sections.append(f"""<h2>Version {html.escape(version)}</h2>
<p>window {status["window"]["rows"]} / {status["window"]["capacity"]} rows ({status["window"]["seen"]} seen).
Drift score <b>{score}</b> (alert above {drift["threshold"]:g}){" <span class=warn>ALERT</span>" if drift["alerting"] else ""};
drifted: {html.escape(", ".join(drift.get("drifted", [])) or "none")}.
OOD rate <b>{rate}</b> (score {ood["score"]}{" + inputs" if ood.get("inputs") else ""}, threshold {ood["threshold"]:.4g},
calibrated to pass {ood["pass_rate"]:.0%} of validation rows; alert above {ood["alert_threshold"]:g}).</p>
{_img_tag(png)}{table}<h3>Alerts</h3><ul>{alerts or "<li>none</li>"}</ul>""")  # noqa: E501
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitoring {html.escape(model)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}.warn{{color:#b00;font-weight:bold}}</style></head><body>
<h1>Monitoring: {html.escape(model)}</h1>
<p>Live window of replica <code>{html.escape(str(report.get("replica")))}</code> (windows are per replica), against
each version's reference (inputs: train split; outputs and OOD calibration: validation split).</p>
{"".join(sections)}</body></html>"""  # noqa: E501
    paths["html"] = out / "monitor.html"
    atomic_write_text(paths["html"], page)
    return paths
