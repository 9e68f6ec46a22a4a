"""The second streaming pass: rows are split by their keys, decoded, and summarized in Ray Data
tasks; the driver merges the partials.

Statistics are exact and independent of how rows are grouped: pixel sums are integers, and a
tabular feature's sums are kept as integer mantissa sums per binary exponent (float32 values are
``m * 2**e`` with a 24-bit ``m``), so a table in one file or seven gives the same mean and std to
the last bit. Quantiles, histograms of features and the leakage check come from deterministic
samples chosen by a seeded per-row key (the same rows whatever the layout); their sizes are
recorded in the profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np

from kiln.data.decode import decode_images
from kiln.data.rows import RowLayout, key_rows, salted
from kiln.data.scan import run_pass
from kiln.data.source import Fragment, read_fragment
from kiln.data.split import SPLITS, TRAIN, SplitCuts

LEAK_SALT = 0x7F4A_7C15_9E37_79B9
_SUMMED = ("counts", "pixel_sum", "pixel_sq", "pixels", "pixel_hist", "moments", "missing")
_EXP_MIN, _EXP_SPAN = -160, 300  # float32 exponents (frexp) lie in [-148, 129]


@dataclass(frozen=True)
class FitSpec:
    """What pass 2 needs besides the rows: classes, cuts, image layout, sample sizes."""

    layout: RowLayout
    labels: tuple[Any, ...]
    cuts: SplitCuts
    channels: int | None
    image_size: tuple[int, int] | None
    sample_rows: tuple[int, int, int]  # per split (train, val, test)
    leak_cut: int  # inputs whose leak key is below this are in the leakage sample


def class_indices(labels: tuple[Any, ...], values: np.ndarray) -> np.ndarray:
    """Index of each label value among the sorted ``labels``."""
    table = np.asarray(labels, dtype=values.dtype)
    return np.searchsorted(table, values).astype(np.int64)


def raw_inputs(rows_x: Any, spec: FitSpec, first_row: int) -> np.ndarray:
    """uint8 images [N, C, H, W] at the fitted size, or the float32 feature matrix."""
    if spec.layout.kind != "image":
        return np.asarray(rows_x, np.float32)
    x, _, _ = decode_images(rows_x, channels=spec.channels, size=spec.image_size)
    return x


def exact_moments(x: np.ndarray) -> np.ndarray:
    """Per feature and exponent, integer sums of mantissas and of their squares' parts.

    Returns int64 [F, EXP_SPAN, 4]: (sum m, sum hi*hi, sum hi*lo, sum lo*lo) where
    ``m = hi * 4096 + lo`` is the 24-bit mantissa of a finite value and ``value = m * 2**(e-24)``.
    Non-finite values are left out (missing)."""
    n, f = x.shape
    out = np.zeros((f, _EXP_SPAN, 4), np.int64)
    if n == 0:
        return out
    v = x.astype(np.float64)
    finite = np.isfinite(v)
    m, e = np.frexp(np.where(finite, v, 0.0))
    mi = (m * (1 << 24)).astype(np.int64)
    hi, lo = mi >> 12, mi & 4095
    idx = (np.arange(f)[None, :] * _EXP_SPAN + (e - _EXP_MIN)).astype(np.int64)
    idx, keep = idx[finite], finite
    for k, part in enumerate((mi, hi * hi, hi * lo, lo * lo)):
        # float64 bincount is exact here: every term is below 2**25 and a fragment below 2**28
        sums = np.bincount(idx, weights=part[keep].astype(np.float64), minlength=f * _EXP_SPAN)
        out[:, :, k] = sums.reshape(f, _EXP_SPAN).round().astype(np.int64)
    return out


def moments_to_fractions(moments: np.ndarray) -> list[tuple[Fraction, Fraction]]:
    """Exact (sum, sum of squares) per feature from ``exact_moments`` partials (summed)."""
    out = []
    for f in range(moments.shape[0]):
        s1, s2 = Fraction(0), Fraction(0)
        for j in np.flatnonzero(moments[f].any(axis=1)):
            e = int(j) + _EXP_MIN
            a, hh, hl, ll = (int(v) for v in moments[f, j])
            s1 += Fraction(a) * Fraction(2) ** (e - 24)
            sq = (hh << 24) + (hl << 13) + ll  # m^2 = hi^2 2^24 + 2 hi lo 2^12 + lo^2
            s2 += Fraction(sq) * Fraction(2) ** (2 * e - 48)
        out.append((s1, s2))
    return out


def _take_sample(keys: np.ndarray, limit: int) -> np.ndarray:
    if len(keys) <= limit:
        return np.arange(len(keys))
    return np.argpartition(keys, limit - 1)[:limit]


def fit_fragment(i: int, fragments: list[Fragment], spec: FitSpec) -> dict[str, Any]:
    """Pass 2 over fragment ``i``: split counts, train statistics, sample candidates, leak
    records."""
    frag = fragments[i]
    rows = key_rows(read_fragment(frag, spec.layout.columns), spec.layout, frag.offset)
    classes = class_indices(spec.labels, rows.labels)
    split = spec.cuts.assign(classes, rows.split_key)
    n_classes = len(spec.labels)
    counts = np.zeros((3, n_classes), np.int64)
    np.add.at(counts, (split.astype(np.int64), classes), 1)
    x = raw_inputs(rows.x, spec, frag.offset)
    train = split == TRAIN
    out: dict[str, Any] = {"counts": counts}
    xt = x[train]
    if spec.layout.kind == "image":
        xi = xt.astype(np.int64)
        out["pixel_sum"] = xi.sum(axis=(0, 2, 3))
        out["pixel_sq"] = (xi * xi).sum(axis=(0, 2, 3))
        out["pixels"] = int(xt.shape[0] * xt.shape[2] * xt.shape[3])
        out["pixel_hist"] = np.bincount((xt >> 3).reshape(-1), minlength=32)
    else:
        out["moments"] = exact_moments(xt)
        out["missing"] = np.isnan(xt).sum(axis=0) if len(xt) else np.zeros(x.shape[1], np.int64)
        with np.errstate(all="ignore"):
            present = np.where(np.isfinite(xt), xt, np.nan)
            out["min"] = np.nanmin(present, axis=0) if len(xt) else np.full(x.shape[1], np.nan)
            out["max"] = np.nanmax(present, axis=0) if len(xt) else np.full(x.shape[1], np.nan)
    samples = {}
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        pick = idx[_take_sample(rows.sample_key[idx], spec.sample_rows[s])]
        samples[name] = (rows.sample_key[pick], x[pick], classes[pick])
    out["samples"] = samples
    leak_key = salted(rows.input_digest, LEAK_SALT)
    in_leak = leak_key < np.uint64(spec.leak_cut)
    out["leak"] = (rows.input_digest[in_leak], split[in_leak])
    return out


@dataclass
class FitResult:
    """What pass 2 found: split counts per class, train statistics, samples and leak records."""

    class_counts: np.ndarray  # [3, num_classes]: train, val, test
    samples: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (raw x, class index), by key
    stats: dict[str, Any] = field(default_factory=dict)
    leak_digests: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    leak_splits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))


def _merge_sample(
    held: tuple[np.ndarray, ...] | None, new: tuple[np.ndarray, ...], limit: int
) -> tuple[np.ndarray, ...]:
    if held is None:
        merged = new
    else:
        merged = tuple(np.concatenate([a, b]) for a, b in zip(held, new, strict=True))
    keep = _take_sample(merged[0], limit)
    return tuple(part[keep] for part in merged)


def fit(fragments: list[Fragment], spec: FitSpec) -> FitResult:
    """Run pass 2 and merge it (bounded: samples are cut back to their size after every
    partial)."""
    totals: dict[str, Any] = {}
    samples: dict[str, tuple[np.ndarray, ...] | None] = {name: None for name in SPLITS}
    leak_d, leak_s = [], []
    work = partial(fit_fragment, fragments=fragments, spec=spec)
    for part in run_pass(len(fragments), work, "fit"):
        for key in (
            "counts",
            "pixel_sum",
            "pixel_sq",
            "pixels",
            "pixel_hist",
            "moments",
            "missing",
        ):
            if key in part:
                totals[key] = totals[key] + part[key] if key in totals else part[key]
        for key, pick in (("min", np.fmin), ("max", np.fmax)):
            if key in part:
                totals[key] = pick(totals[key], part[key]) if key in totals else part[key]
        for s, name in enumerate(SPLITS):
            samples[name] = _merge_sample(samples[name], part["samples"][name], spec.sample_rows[s])
        leak_d.append(part["leak"][0])
        leak_s.append(part["leak"][1])
    ordered: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, held in samples.items():
        assert held is not None
        keys, x, y = held
        order = np.argsort(keys, kind="stable")
        ordered[name] = (x[order], y[order])
    return FitResult(
        class_counts=totals.pop("counts"),
        samples=ordered,
        stats=totals,
        leak_digests=np.concatenate(leak_d) if leak_d else np.zeros(0, np.uint64),
        leak_splits=np.concatenate(leak_s) if leak_s else np.zeros(0, np.int8),
    )
