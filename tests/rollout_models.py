"""Bad model versions for the rollout tests, as custom ``module:factory`` architectures.

Each wraps the built-in CNN (same weights, same state dict) and misbehaves only in eval mode, as a
model that passed training could: ``faulty_cnn`` raises on inputs whose mean pixel is above the
normalized average (a share of real digits; an all-zero smoke input passes), ``slow_cnn`` takes
``delay_s`` longer per call. ``register_variant`` registers an existing version's weights under such
an architecture as a new registry version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from kiln.models.builders import build_cnn


def faulty_cnn(input_shape, num_classes, width: int = 32, dropout: float = 0.1):
    model = build_cnn(input_shape, num_classes, width=width, dropout=dropout)

    def fail_on_bright_inputs(module, args):
        x = args[0]
        if not module.training and bool((x.flatten(1).mean(1) > 0.0).any()):
            raise RuntimeError("faulty model version: cannot handle this input")

    model.register_forward_pre_hook(fail_on_bright_inputs)
    return model


def slow_cnn(
    input_shape, num_classes, width: int = 32, dropout: float = 0.1, delay_s: float = 0.25
):
    model = build_cnn(input_shape, num_classes, width=width, dropout=dropout)

    def wait(module, args):
        if not module.training:
            time.sleep(delay_s)

    model.register_forward_pre_hook(wait)
    return model


def register_variant(
    tracking_uri: str,
    run_dir: Path,
    base_uri: str,
    architecture: str,
    extra_kwargs: dict | None = None,
) -> str:
    """Register ``base_uri``'s weights under ``architecture`` as a new version of the same model
    (through served_models.register_artifact, i.e. the library's one ``register_artifact``)."""
    from kiln import tracking as trk

    # Imported here, not at the top: replicas import this module for its factories only.
    from served_models import register_artifact

    name = base_uri[len("models:/") :].split("/")[0]
    source = trk.resolve_model_dir(base_uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="kiln-test-variant-") as tmp:
        model_dir = Path(tmp) / "model"
        shutil.copytree(source, model_dir)
        spec_path = model_dir / "spec.json"
        spec = json.loads(spec_path.read_text())
        spec["architecture"] = architecture
        spec["kwargs"] = {**spec.get("kwargs", {}), **(extra_kwargs or {})}
        spec_path.write_text(json.dumps(spec))
        return register_artifact(run_dir, name, model_dir, architecture, tracking_uri)
