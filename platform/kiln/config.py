"""Config base: the Section class, shared sections, YAML reading and dotted key=value overrides.

The full schema (every job's section) is composed in ``kiln.schema``.

Every section rejects unknown keys, and every validation error names the dotted key,
so a typo such as ``train.epoch`` fails before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import ConfigError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentConfig(Section):
    name: str = Field(
        "kiln-digits", description="Experiment name; also the registered model's name."
    )
    tracking_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI; default MLFLOW_TRACKING_URI, else a sqlite file in run_dir."
        ),
    )
    run_dir: str = Field(
        "runs", description="Folder for local run outputs: MLflow store, checkpoints, reports."
    )
    storage_path: str | None = Field(
        None,
        description=(
            "Where Ray Train keeps checkpoints (shared storage on a cluster); "
            "default run_dir/checkpoints."
        ),
    )


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML (``3``, ``0.1``, ``[1, 2]``, ``true``).

    Raises ConfigError for a string without ``=`` or with an empty key.
    """
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with the dotted overrides set (intermediate mappings created)."""
    import copy

    result = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        node = result
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. Raises ConfigError for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def load_config(
    path: str | Path | None, overrides: list[str] | None, schema: type[SchemaT]
) -> SchemaT:
    """Load, override and validate a config into ``schema`` (``kiln.schema.KilnConfig`` for a whole
    one).

    Raises ConfigError naming the dotted key of the first problem.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_config(data, schema)


def validate_config(data: dict[str, Any], schema: type[SchemaT]) -> SchemaT:
    """Validate plain data into ``schema``; raises ConfigError naming the dotted key."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, schema)) from None


def describe_validation_error(exc: ValidationError, schema: type[BaseModel]) -> str:
    """One line per problem (joined with '; '), each naming the dotted key."""
    messages = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) if loc else "(config)"
        if err["type"] == "extra_forbidden":
            hint = _suggest(schema, loc)
            messages.append(
                f"unknown config key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
            )
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            messages.append(f"config key '{key}': {msg}" if loc else msg)
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            messages.append(f"config key '{key}': {err['msg'].lower()}{got_txt}")
    return "; ".join(messages)


def _suggest(schema: type[BaseModel], loc: list[str]) -> str | None:
    """The closest valid dotted key for a mistyped one."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
        # An optional section (``X | None``): look inside X.
        model = next(
            (a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model
        )
    fields = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(loc[-1], fields, n=1)
    return ".".join([*loc[:-1], match[0]]) if match else None
