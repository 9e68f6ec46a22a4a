"""Name -> builder lookup. A builder is ``f(input_shape, num_classes, **kwargs) -> nn.Module``.

Built-in names map to functions in ``kiln.models.builders``; any other name must be
``package.module:factory`` with the same signature.

Two ways in, two levels of trust:
- ``resolve_builder``: a name from the operator's own config (``model.name`` of a training job):
  any ``package.module:factory`` the config names.
- ``resolve_artifact_builder``: a name read from an artifact (``spec.json``'s ``architecture``), on
  every load path (serving, rollouts, compression, prediction, ``kiln.load_model``). An artifact
  never chooses code: its name resolves only to a built-in builder, a builder an installed package
  declares in the entry-point group ``kiln.builders``, or one the operator allows in
  ``KILN_ALLOWED_BUILDERS`` (read from this process's environment). Anything else is refused
  before its module is imported (importing runs code).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from kiln.errors import ConfigError, ModelError

BUILTIN = {
    "mlp": "kiln.models.builders:build_mlp",
    "cnn": "kiln.models.builders:build_cnn",
    "resnet18": "kiln.models.builders:build_resnet18",
}
# Entry-point group through which an installed package declares builders artifacts may name.
ENTRY_POINT_GROUP = "kiln.builders"
# Operator allow-list: comma-separated ``package.module:factory`` (that factory) or ``package`` /
# ``package.module`` (every factory in it or below it).
ALLOW_ENV = "KILN_ALLOWED_BUILDERS"


def _split(name: str, key: str) -> tuple[str, str]:
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(
            f"{key}: unknown model '{name}' (built in: {known}; or package.module:factory)"
        )
    return module_name, attr


def _import_builder(target: str, key: str) -> Callable[..., Any]:
    module_name, attr = _split(target, key)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import '{module_name}' ({exc})") from None
    builder: object = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"{key}: '{module_name}' has no callable '{attr}'")
    return builder


def resolve_builder(name: str) -> Callable[..., Any]:
    """Return the builder for ``name`` from the operator's config. Raises ConfigError naming
    ``model.name``."""
    return _import_builder(BUILTIN.get(name, name), "config key 'model.name'")


def allowed_builders(environ: Mapping[str, str] | None = None) -> list[str]:
    """The operator's allow-list from ``KILN_ALLOWED_BUILDERS`` (of ``environ``, default this
    process's environment): its non-empty entries."""
    env = os.environ if environ is None else environ
    return [e.strip() for e in env.get(ALLOW_ENV, "").split(",") if e.strip()]


def declared_builders() -> dict[str, str]:
    """Builders installed packages declare in the ``kiln.builders`` entry-point group:
    {name: "package.module:factory"}."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _allowed_by(target: str, allow: Iterable[str]) -> bool:
    module_name = target.partition(":")[0]
    for entry in allow:
        if ":" in entry:
            if entry == target:
                return True
        elif module_name == entry or module_name.startswith(entry + "."):
            return True
    return False


def artifact_builder_target(name: Any, extra_allowed: Iterable[str] = ()) -> str:
    """The ``package.module:factory`` an artifact's ``architecture`` resolves to, without importing
    anything. ``extra_allowed``: allow-list entries on top of ``KILN_ALLOWED_BUILDERS`` (a training
    job allows its own config's ``model.name``). Raises ModelError naming the builder and how to
    allow it."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"model spec: 'architecture' must be a builder name, got {name!r}")
    if name in BUILTIN:
        return BUILTIN[name]
    declared = declared_builders()
    if name in declared:
        return declared[name]
    if name in declared.values() or _allowed_by(name, [*allowed_builders(), *extra_allowed]):
        return name
    known = ", ".join(sorted([*BUILTIN, *declared]))
    raise ModelError(
        f"model architecture '{name}' is not an allowed builder (allowed: {known}); an artifact "
        f"never chooses code: to trust it, set {ALLOW_ENV}={name.partition(':')[0]} (comma-"
        f"separated modules or module:factory) or declare it in the '{ENTRY_POINT_GROUP}' entry "
        "points of an installed package"
    )


def resolve_artifact_builder(name: Any, extra_allowed: Iterable[str] = ()) -> Callable[..., Any]:
    """The builder an artifact's ``architecture`` names, if it is allowed
    (``artifact_builder_target``); its module is imported only then. Raises ModelError."""
    target = artifact_builder_target(name, extra_allowed)
    try:
        return _import_builder(target, f"model architecture '{name}'")
    except ConfigError as exc:
        raise ModelError(str(exc)) from None


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


# Largest integer an artifact may pass to a builder (widths, depths): beyond it a builder would
# allocate more than any served model needs before a weight is read.
MAX_BUILDER_INT = 1 << 16


def check_artifact_kwargs(name: str, builder: Callable[..., Any], kwargs: Any) -> None:
    """Builder arguments read from an artifact: an object of JSON scalars or lists of them that the
    builder's signature accepts, integers within ``MAX_BUILDER_INT``. Raises ModelError."""
    where = f"model architecture '{name}'"
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}: 'kwargs' must be an object, got {type(kwargs).__name__}")
    params = inspect.signature(builder).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = list(params)[2:]
    for key, value in kwargs.items():
        if not open_ended and key not in accepted:
            raise ModelError(f"{where} takes no argument '{key}' (accepted: {accepted})")
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not isinstance(item, (bool, int, float, str)):
                raise ModelError(f"{where}: argument '{key}' holds {type(item).__name__}")
            if isinstance(item, (int, float)) and not abs(item) <= MAX_BUILDER_INT:
                raise ModelError(
                    f"{where}: argument '{key}' = {item!r} is out of range (|x| <= "
                    f"{MAX_BUILDER_INT})"
                )
