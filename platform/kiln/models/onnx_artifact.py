"""ONNX artifacts: export a torch model (dynamic batch), and run ONNX files with ONNX Runtime.

An ONNX artifact is ``spec.json`` + ``model.onnx`` (+ ``model.onnx.data`` when the weights are
stored outside the graph). Loading it executes no Python from the artifact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.errors import ModelError, first_line
from kiln.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from onnx import ModelProto

ONNX_FILE = "model.onnx"
ONNX_FORMAT = "onnx"
# Above this, weights go to an external data file (protobuf caps a message at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def strip_metadata(model: ModelProto) -> None:
    """Drop exporter debug metadata (source locations, per-node annotations): it is not part of the
    model."""
    del model.metadata_props[:]
    model.doc_string = ""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def save_onnx(model: ModelProto, directory: str | Path) -> list[str]:
    """Write ``model`` (an onnx.ModelProto) as model.onnx (+ external data if large). Returns the
    file names."""
    import onnx

    directory = Path(directory)
    strip_metadata(model)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(
        model,
        str(directory / ONNX_FILE),
        save_as_external_data=external,
        location=f"{ONNX_FILE}.data" if external else None,
    )
    return [ONNX_FILE, *([f"{ONNX_FILE}.data"] if external else [])]


def export_onnx_model(model: torch.nn.Module, input_shape: list[int]) -> ModelProto:
    """The torch module as an onnx.ModelProto with a dynamic batch axis (input 'input', output
    'logits')."""
    import torch

    model = model.eval()
    example = (torch.zeros(2, *input_shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
        )
    if program is None:  # only without dynamo, which is not the path taken here
        raise ModelError("torch.onnx.export returned no program")
    proto: ModelProto = program.model_proto
    return proto


def save_onnx_artifact(onnx_model: ModelProto, spec: ModelSpec, directory: str | Path) -> Path:
    """Write an ONNX artifact: model.onnx (+ data), spec.json (format 'onnx') and an MLmodel
    file."""
    from kiln.models.artifact import write_mlmodel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec.format = ONNX_FORMAT
    spec.files = save_onnx(onnx_model, directory)
    spec.save(directory)
    write_mlmodel(directory)
    return directory


def session_providers() -> list[str]:
    """CUDA first where ONNX Runtime has it and a GPU is present, else the CPU provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_runtime(directory: Path, spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Runtime factory for format 'onnx': an ONNX Runtime session over model.onnx."""
    import onnxruntime as ort

    path = Path(directory) / ONNX_FILE
    if not path.is_file():
        raise ModelError(f"artifact {directory} has no {ONNX_FILE}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle intra-op threads otherwise spin for a while after each call, taking cores from everything
    # else on the machine (other replicas, Ray, the next model in a side-by-side benchmark).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=session_providers())
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"cannot load {path}: {first_line(exc)}") from None
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        logits = session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(logits, dtype=np.float32)

    return run
