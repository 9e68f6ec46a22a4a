"""Serving test helpers: tiny models trained in-process and registered in a real MLflow store.

Each model is trained by the real training loop (``train_epochs`` with a LocalSession, no Ray
Train job: seconds instead of a job's fixed cost), logged to an MLflow run and registered, exactly
the artifact layout ``kiln train`` registers. ``VARIANTS`` lists the served variant kinds; every
serving test that compares HTTP with in-process predictions is parametrized over it.
"""

from __future__ import annotations

import base64
import io
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def free_port() -> int:
    """A port for a test's listener, picked as Kiln picks its own (kiln.local_ray.free_port)."""
    from kiln.local_ray import free_port as pick

    return pick()


def serve_args(ray_cluster: str, registry: Registry, *extra: str) -> list[str]:
    """``kiln serve start EXTRA`` on the test cluster, with the registry's run dir, --json."""
    return [
        "serve",
        "start",
        *extra,
        "--address",
        ray_cluster,
        "--run-dir",
        str(registry.run_dir),
        "--json",
    ]


def iris_parquet(path: Path) -> Path:
    """Iris as a user's tabular Parquet file: four float columns and a string label."""
    from sklearn.datasets import load_iris

    bunch = load_iris()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    table = pa.table(
        {
            **{n: bunch.data[:, i].astype(np.float64) for i, n in enumerate(names)},
            "species": [str(bunch.target_names[t]) for t in bunch.target],
        }
    )
    pq.write_table(table, path)
    return path


def train_and_register(
    run_dir: Path,
    name: str,
    data: dict[str, Any],
    model: dict[str, Any],
    epochs: int = 2,
    seed: int = 0,
) -> str:
    """Train ``model`` on ``data`` in-process, register it as a new version of ``name``; returns its
    URI."""
    from kiln.data.dataset import prepare_data
    from kiln.monitor.reference import write_reference
    from kiln.schema import validate_config
    from kiln.train.loop import train_epochs
    from kiln.train.session import LocalSession

    cfg = validate_config(
        {
            "experiment": {"name": name, "run_dir": str(run_dir)},
            "data": data,
            "model": model,
            "train": {
                "epochs": epochs,
                "batch_size": 64,
                "lr": 0.003,
                "seed": seed,
                "cpus_per_worker": 1,
            },
        }
    )
    prepared = prepare_data(cfg.data)
    with tempfile.TemporaryDirectory(prefix="kiln-test-ckpt-") as tmp:
        session = LocalSession(tmp)
        train_epochs(cfg, prepared, session)
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        for f in ("spec.json", "model.safetensors", "MLmodel"):
            shutil.copy2(session.latest_checkpoint() / f, model_dir / f)
        write_reference(model_dir, prepared)  # as kiln train does: the monitoring reference
        return register_artifact(run_dir, name, model_dir, "fp32")


def register_artifact(
    run_dir: Path, name: str, model_dir: Path, variant: str, tracking_uri: str | None = None
) -> str:
    """Log an artifact folder on a new run and register it as a version of ``name`` (in
    ``tracking_uri``, default: the run dir's store) through the library's one
    ``register_artifact``; returns its URI."""
    from kiln import tracking as trk
    from kiln.models.registration import register_artifact as register

    uri = tracking_uri or trk.default_tracking_uri(run_dir)
    exp = trk.ensure_experiment(uri, name, run_dir)
    run_id = trk.start_run(uri, exp, f"test-{name}", {trk.TAG_JOB: "test"})
    return register(
        uri, name, run_id, model_dir, tags={"kiln.variant": variant}, finish_run=True
    ).uri


def compress_and_register(
    reg: Registry, source_uri: str, name: str, kind: str, data: dict | None = None
) -> str:
    """A compressed variant of ``source_uri`` made by the compression steps' own functions,
    registered as ``name``: "int8" (static QDQ int8 ONNX) or "pruned" (structured channel pruning,
    no fine-tuning). ``data``: the source's data section (default: DIGITS), for the variant's own
    monitoring reference."""
    from kiln import tracking as trk
    from kiln.compress.config import PruneStep, QuantizeStep
    from kiln.data.config import DataConfig
    from kiln.data.dataset import prepare_data
    from kiln.models.artifact import build_model, load_torch_model, save_artifact
    from kiln.monitor.reference import write_reference

    model, spec = load_torch_model(trk.resolve_model_dir(source_uri, reg.tracking_uri))
    with tempfile.TemporaryDirectory(prefix="kiln-test-variant-") as tmp:
        out = Path(tmp) / "model"
        if kind == "int8":
            from kiln.compress.quantize import quantize_onnx
            from kiln.models.onnx_artifact import export_onnx_model, save_onnx_artifact

            calibration = (np.random.default_rng(0).random((64, *spec.input_shape)) * 2 - 1).astype(
                np.float32
            )
            step = QuantizeStep(kind="quantize", calibration_samples=64)
            spec.variant = {"name": name, "kind": "quantize"}
            save_onnx_artifact(
                quantize_onnx(export_onnx_model(model, spec.input_shape), step, calibration),
                spec,
                out,
            )
        else:
            from kiln.compress.prune import structured_prune
            from kiln.models.structure import record_structure

            pruned = structured_prune(
                model, spec.input_shape, PruneStep(kind="prune", ratio=0.5, epochs=0)
            )
            spec.variant = {"name": name, "kind": "prune"}
            spec.variant["structure"] = record_structure(pruned, build_model(spec))
            save_artifact(pruned, spec, out)
        write_reference(
            out, prepare_data(DataConfig.model_validate(data or DIGITS))
        )  # as kiln compress does
        return register_artifact(reg.run_dir, name, out, kind)


def digits_raw(n: int = 24) -> np.ndarray:
    """Raw uint8 digit images [n, 1, 8, 8], as a client would send them."""
    from kiln.data.builtin import load_builtin
    from kiln.data.decode import decode_images

    table = load_builtin("digits")
    x, _, _ = decode_images([cell["bytes"] for cell in table.column("image").to_pylist()])
    return x[:: max(1, len(x) // n)][:n]


def uint8_batch_body(images: np.ndarray) -> dict:
    """The Open Inference Protocol request asking for a batch of raw uint8 images
    (``[N, C, H, W]``), as a JSON-ready dict."""
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ]
    }


def uint8_infer_body(image: np.ndarray) -> str:
    """The Open Inference Protocol JSON body asking for one raw uint8 image (``[C, H, W]``)."""
    import json

    return json.dumps(uint8_batch_body(image[None]))


def iris_rows(source: Path, n: int = 12) -> tuple[np.ndarray, list[dict[str, float]]]:
    table = pq.read_table(source)
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    x = np.stack([table.column(c).to_numpy() for c in names], axis=1).astype(np.float32)
    idx = np.linspace(0, len(x) - 1, n).astype(int)
    return x[idx], [dict(zip(names, map(float, row), strict=True)) for row in x[idx]]


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.reshape(image.shape[-2:]), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Variant:
    """A served variant kind: how to register it, and the raw inputs it takes."""

    served_name: str  # the registry name; served under it
    kind: str  # "image" | "tabular"
    register: Callable[[Registry], str]


@dataclass
class Registry:
    run_dir: Path
    tracking_uri: str
    iris: Path
    uris: dict[str, str] = field(default_factory=dict)  # variant id -> models:/NAME/VERSION


DIGITS = {"source": "digits", "image": "image", "label": "label"}
CNN = {"name": "cnn", "width": 8, "dropout": 0.0}


def _fp32_cnn(reg: Registry) -> str:
    return train_and_register(reg.run_dir, "digits", DIGITS, CNN, epochs=2, seed=0)


def _fp32_mlp(reg: Registry) -> str:
    return train_and_register(
        reg.run_dir,
        "iris",
        {"source": str(reg.iris), "label": "species"},
        {"name": "mlp", "hidden": [16], "dropout": 0.0},
        epochs=3,
        seed=0,
    )


def _int8_cnn(reg: Registry) -> str:
    return compress_and_register(reg, reg.uris["fp32-cnn"], "digits-int8", "int8")


def _pruned_cnn(reg: Registry) -> str:
    return compress_and_register(reg, reg.uris["fp32-cnn"], "digits-pruned", "pruned")


# Variant kinds served in the HTTP tests, each a register function producing a registry version of
# that kind, served under its own name (in this order: the compressed kinds start from the fp32
# CNN). A distilled student is an fp32 CNN of another width: the fp32 kind covers its serving path.
VARIANTS: dict[str, Variant] = {
    "fp32-cnn": Variant("digits", "image", _fp32_cnn),
    "fp32-mlp": Variant("iris", "tabular", _fp32_mlp),
    "int8-onnx-cnn": Variant("digits-int8", "image", _int8_cnn),
    "pruned-cnn": Variant("digits-pruned", "image", _pruned_cnn),
}


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> Registry:
    """Every variant of VARIANTS registered in a sqlite MLflow store (trained once per session; the
    data is read in Ray Data tasks on the session's Ray instance)."""
    from kiln import tracking as trk

    run_dir = tmp_path_factory.mktemp("serve-runs")
    reg = Registry(
        run_dir=run_dir,
        tracking_uri=trk.default_tracking_uri(run_dir),
        iris=iris_parquet(run_dir / "iris.parquet"),
    )
    for variant_id, variant in VARIANTS.items():
        reg.uris[variant_id] = variant.register(reg)
    return reg


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` grey pixels, with a tiny (wrong) IDAT: only its
    header may be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A real, valid PNG of ``side`` x ``side`` black pixels, compressed a row at a time (never
    held decoded here): tens of KB that decode to side*side bytes."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def status_and_content_type(resp: Any) -> tuple[int, str]:
    return resp.status_code, resp.headers.get("content-type", "")


@dataclass
class InferLoad:
    """``clients`` threads posting unversioned OIP infer requests of ``images`` to ``model`` (one
    requests.Session each) until stopped. ``answers`` gets ``answer(response)`` for each request,
    or (0, the exception's name) when none came."""

    url: str
    model: str
    images: np.ndarray
    clients: int = 4
    answer: Callable[[Any], tuple[int, str]] = status_and_content_type
    answers: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def threads(self) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._client, args=(c,), daemon=True)
            for c in range(self.clients)
        ]

    def __enter__(self) -> InferLoad:
        self._threads = self.threads()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _client(self, client: int) -> None:
        import requests

        session, i = requests.Session(), client
        while not self._stop.is_set():
            i += self.clients
            body = uint8_infer_body(self.images[i % len(self.images)])
            try:
                resp = session.post(
                    f"{self.url}/v2/models/{self.model}/infer", data=body, timeout=60
                )
                answer = self.answer(resp)
            except (requests.RequestException, ValueError) as exc:
                answer = (0, type(exc).__name__)
            self.answers.append(answer)
