"""Layer shapes that differ from what an architecture's builder makes (e.g. after channel pruning).

A structurally pruned network has other channel counts than its builder produces. Rather than
pickling the module, the spec records, per changed module, its size attributes and the shapes of
its own tensors; ``apply_structure`` resizes a freshly built model to match before weights load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Size attributes of the standard layers, kept in step with their tensors (repr, export, further
# pruning).
SIZE_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_channels",
    "embedding_dim",
    "groups",
)

Structure = dict[str, dict[str, Any]]


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {
        n: p for n, p in module.named_parameters(recurse=False) if p is not None
    }
    out.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return out


def record_structure(model: nn.Module, original: nn.Module) -> Structure:
    """``{module name: {"attributes": {...}, "tensors": {name: shape}}}`` for every module of
    ``model`` whose own tensors differ in shape from the same module in ``original`` (the builder's
    output)."""
    before = dict(original.named_modules())
    structure: Structure = {}
    for name, module in model.named_modules():
        tensors = _own_tensors(module)
        ref = _own_tensors(before[name]) if name in before else {}
        if all(n in ref and tuple(ref[n].shape) == tuple(t.shape) for n, t in tensors.items()):
            continue
        attrs = {
            a: getattr(module, a)
            for a in SIZE_ATTRIBUTES
            if isinstance(getattr(module, a, None), (int, tuple))
        }
        structure[name] = {
            "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
            "tensors": {n: list(t.shape) for n, t in tensors.items()},
        }
    return structure


def apply_structure(model: nn.Module, structure: Structure) -> nn.Module:
    """Resize the named modules of ``model`` in place (fresh, uninitialized tensors: load weights
    next).

    Raises ValueError when a named module or tensor does not exist in ``model``.
    """
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the architecture has no module '{name}' to resize")
        for attr, value in entry.get("attributes", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for tname, shape in entry.get("tensors", {}).items():
            current = getattr(module, tname, None)
            if not isinstance(current, torch.Tensor):
                raise ValueError(f"module '{name}' has no tensor '{tname}'")
            fresh = torch.zeros(shape, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(module, tname, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                module.register_buffer(tname, fresh)
    return model
