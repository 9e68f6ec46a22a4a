"""Name -> builder lookup. A builder is ``f(input_shape, num_classes, **kwargs) -> nn.Module``.

Built-in names map to functions in ``kiln.models.builders``; any other name must be
``package.module:factory`` with the same signature.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from kiln.errors import ConfigError

BUILTIN = {
    "mlp": "kiln.models.builders:build_mlp",
    "cnn": "kiln.models.builders:build_cnn",
    "resnet18": "kiln.models.builders:build_resnet18",
}


def resolve_builder(name: str) -> Callable[..., Any]:
    """Return the builder for ``name``. Raises ConfigError naming ``model.name``."""
    target = BUILTIN.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(
            f"config key 'model.name': unknown model '{name}' (built in: {known}; or "
            "package.module:factory)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"config key 'model.name': cannot import '{module_name}' ({exc})"
        ) from None
    builder: object = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"config key 'model.name': '{module_name}' has no callable '{attr}'")
    return builder


def check_builder_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError naming ``model.<key>`` for a key the builder does not accept."""
    builder = resolve_builder(name)
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in list(params)[2:]]
    for key in kwargs:
        if key not in allowed:
            hint = f" (accepted: {', '.join(allowed)})" if allowed else " (it accepts none)"
            raise ConfigError(f"unknown config key 'model.{key}' for model '{name}'{hint}")
