"""Pruning: structured channel pruning (Torch-Pruning's DepGraph) and unstructured magnitude
pruning.

Structured pruning removes whole channels and every tensor slice that depends on them, so the
network is physically smaller and faster; the new layer shapes go into the spec
(``kiln.models.structure``). Unstructured pruning only zeroes weights: a dense model stays the
same size and speed, which the report says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from kiln.compress.config import PruneStep, UnstructuredPruneStep
from kiln.errors import ConfigError, first_line
from kiln.models.builders import count_parameters

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The last Conv/Linear layer to run in a forward pass: the classifier, whose outputs are the
    classes."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if isinstance(m, PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def check_layer_names(model: nn.Module, names: list[str], where: str) -> dict[str, nn.Module]:
    """Modules by name; ConfigError naming ``where`` for a name that is not a prunable layer."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, PRUNABLE):
            layers = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
            raise ConfigError(
                f"config key '{where}': no Conv/Linear layer '{name}' (layers: {', '.join(layers)})"
            )
        found[name] = module
    return found


def structured_prune(
    model: nn.Module, input_shape: list[int], step: PruneStep, where: str = "compress.steps"
) -> nn.Module:
    """A pruned copy of ``model``: ``step.ratio`` of the channels removed (per layer or globally),
    the classifier's outputs kept. Raises ConfigError when nothing in the architecture can be
    pruned."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    example = torch.zeros(1, *input_shape)
    per_layer = check_layer_names(pruned, list(step.layer_ratios), f"{where}.layer_ratios")
    ignored = output_layers(pruned, example)
    importance = tp.importance.GroupMagnitudeImportance(p=1 if step.importance == "l1" else 2)
    before = count_parameters(pruned)
    try:
        pruner = tp.pruner.BasePruner(
            pruned,
            example,
            importance=importance,
            global_pruning=step.scope == "global",
            pruning_ratio=step.ratio,
            pruning_ratio_dict={m: step.layer_ratios[n] for n, m in per_layer.items()} or None,
            ignored_layers=ignored,
            round_to=step.round_to,
            max_pruning_ratio=0.95,
        )
        pruner.step()
    except Exception as exc:  # DepGraph cannot trace or group this architecture
        raise ConfigError(
            f"config key '{where}': structured pruning does not apply to this model "
            f"({type(exc).__name__}: {first_line(exc) if str(exc) else ''})"
        ) from None
    if count_parameters(pruned) >= before:
        raise ConfigError(
            f"config key '{where}': structured pruning does not apply to this model "
            "(no prunable channel group besides the classifier)"
        )
    return pruned


@dataclass
class Sparsity:
    zeros: int
    total: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def weight_sparsity(model: nn.Module) -> Sparsity:
    """Zero weights among all Conv/Linear weights."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    return Sparsity(
        zeros=int(sum(int((w == 0).sum()) for w in weights)),
        total=int(sum(w.numel() for w in weights)),
    )


def unstructured_prune(
    model: nn.Module, step: UnstructuredPruneStep, where: str = "compress.steps"
) -> tuple[nn.Module, Sparsity]:
    """A copy of ``model`` with ``step.amount`` of its Conv/Linear weights (smallest |w|) set to
    zero, the pruning made permanent (plain dense tensors). Raises ConfigError when it has no such
    layers."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model).eval()
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNABLE)]
    if not targets:
        raise ConfigError(
            f"config key '{where}': magnitude pruning does not apply to this model (no Conv/Linear "
            "layers)"
        )
    if step.scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=step.amount)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=step.amount)
    for module, name in targets:
        prune.remove(module, name)
    return pruned, weight_sparsity(pruned)
