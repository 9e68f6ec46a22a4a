"""Saving and loading model artifacts without unpickling anything.

An artifact is a folder: ``spec.json`` (architecture, preprocessing, labels, format) plus the
weight files it names (``model.safetensors`` for the state dict of a built architecture). An
``MLmodel`` file makes it a python_function model whose loader is ``kiln.models.pyfunc``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kiln.errors import ModelError
from kiln.models.registry import check_artifact_kwargs, resolve_artifact_builder
from kiln.models.spec import SPEC_FILE, ModelSpec

WEIGHTS_FILE = "model.safetensors"


def build_model(spec: ModelSpec, allowed: Iterable[str] = ()) -> torch.nn.Module:
    """Instantiate the spec's architecture with fresh weights, resized to
    ``spec.variant["structure"]`` when the spec records changed layer shapes (a structurally pruned
    network). The architecture must be allowed (``resolve_artifact_builder``): built in, declared
    by an installed package, in ``KILN_ALLOWED_BUILDERS``, or in ``allowed`` (a job passes the name
    its own config chose). Raises ModelError."""
    from kiln.models.structure import apply_structure

    builder = resolve_artifact_builder(spec.architecture, allowed)
    check_artifact_kwargs(spec.architecture, builder, spec.kwargs)
    model: torch.nn.Module = builder(spec.input_shape, spec.num_classes, **spec.kwargs)
    structure = (spec.variant or {}).get("structure")
    if structure:
        try:
            apply_structure(model, structure)
        except ValueError as exc:
            raise ModelError(
                f"model spec does not fit architecture '{spec.architecture}': {exc}"
            ) from None
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def state_dict_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies of the state dict (what safetensors requires)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def save_weights(model: torch.nn.Module, directory: str | Path) -> Path:
    path = Path(directory) / WEIGHTS_FILE
    save_file(state_dict_tensors(model), str(path))
    return path


def load_weights(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    unwrap(model).load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model


def save_artifact(model: torch.nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """Write spec.json, the safetensors weights and an MLmodel file into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec.format, spec.files = "safetensors", [WEIGHTS_FILE]
    save_weights(model, directory)
    spec.save(directory)
    write_mlmodel(directory)
    return directory


def write_mlmodel(directory: str | Path) -> None:
    """An MLmodel file so that ``mlflow.pyfunc.load_model`` loads the artifact through Kiln's
    loader."""
    from kiln.version import __version__ as kiln_version

    (Path(directory) / "MLmodel").write_text(
        "flavors:\n"
        "  python_function:\n"
        "    loader_module: kiln.models.pyfunc\n"
        "    data: .\n"
        "    env: {}\n"
        f"    kiln_version: {kiln_version}\n"
    )


def artifact_files(directory: str | Path) -> list[Path]:
    """Every file of an artifact that counts toward its size: spec.json and the files it names."""
    directory = Path(directory)
    spec = ModelSpec.load(directory)
    return [directory / SPEC_FILE, *(directory / f for f in spec.files)]


def artifact_size(directory: str | Path) -> int:
    """Serialized size in bytes: spec.json plus every weight file."""
    return sum(p.stat().st_size for p in artifact_files(directory))


def load_spec(directory: str | Path) -> ModelSpec:
    """The artifact's spec (``kiln.models.spec.load_spec``, the one torch-free loader). Raises
    ModelError."""
    from kiln.models.spec import load_spec as load

    return load(directory)


def load_torch_model(directory: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the architecture and load safetensors weights. Raises ModelError."""
    spec = load_spec(directory)
    if spec.format != "safetensors":
        raise ModelError(
            f"artifact {directory} is in format '{spec.format}', not a torch state dict"
        )
    model = build_model(spec)
    load_weights(model, directory)
    return model.eval(), spec


def describe(spec: ModelSpec) -> dict[str, Any]:
    return {
        "architecture": spec.architecture,
        "format": spec.format,
        "input_shape": spec.input_shape,
        "classes": len(spec.labels),
    }
