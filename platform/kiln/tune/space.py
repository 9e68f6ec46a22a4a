"""The search space: ``{dotted.key: {kind: [...]}}`` in YAML -> checked dimensions -> Optuna
distributions.

Four kinds: ``loguniform: [low, high]``, ``uniform: [low, high]``, ``int: [low, high]`` (both
inclusive) and ``choice: [v1, v2, ...]``. A choice may hold any YAML value (e.g. a list of
layer widths); values Optuna cannot store are kept as their JSON text and decoded for the trial.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from kiln.errors import ConfigError
from kiln.models.config import ModelConfig

KINDS = ("loguniform", "uniform", "int", "choice")
# Set by the sweep itself, so they cannot be searched.
SWEEP_OWNED = {
    "train.epochs": "the sweep sets it from tune.max_epochs (ASHA decides how many a trial gets)",
    "train.workers": "the sweep sets it from tune.trial_workers",
    "train.cpus_per_worker": "the sweep sets it from tune.cpus_per_worker",
    "train.use_gpu": "the sweep sets it from tune.gpus_per_worker",
}
_OPTUNA_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def encoded_choices(self) -> tuple[Any, ...]:
        """Choices as Optuna stores them: scalars as they are, anything else as JSON text."""
        return tuple(c if isinstance(c, _OPTUNA_SCALARS) else json.dumps(c) for c in self.choices)

    def distribution(self):
        """The Optuna distribution of this dimension."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.encoded_choices)
        low, high = self.bounds()
        if self.kind == "int":
            return IntDistribution(int(low), int(high))
        return FloatDistribution(float(low), float(high), log=self.kind == "loguniform")

    def bounds(self) -> tuple[float | int, float | int]:
        """(low, high) of a numeric kind. Raises ValueError for ``choice``, which has none."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a '{self.kind}' dimension has no bounds")
        return self.low, self.high

    def decode(self, value: Any) -> Any:
        """The config value for a value Optuna suggested."""
        if self.kind == "choice":
            return self.choices[self.encoded_choices.index(value)]
        if self.kind == "int":
            return int(value)
        return float(value)

    def extremes(self) -> list[Any]:
        """Values that together show whether the config accepts the whole range: every choice, or
        both bounds (and, for float kinds, a value between them, which is never a whole number)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [self.low, self.high]
        low, high = (float(v) for v in self.bounds())
        inside = math.sqrt(low * high) if self.kind == "loguniform" else low + 0.377 * (high - low)
        return [
            low,
            high,
            inside if not float(inside).is_integer() else inside + 1e-3 * (high - low),
        ]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice {list(self.choices)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dimension(key: str, spec: Any) -> Dimension:
    """One ``{kind: values}`` mapping -> Dimension. Raises ConfigError naming
    ``tune.space.<key>``."""
    where = f"config key 'tune.space.{key}'"
    forms = (
        "{loguniform: [low, high]}, {uniform: [low, high]}, {int: [low, high]} or {choice: [...]}"
    )
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {forms}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        hint = difflib.get_close_matches(str(kind), KINDS, n=1)
        raise ConfigError(
            f"{where}: unknown distribution '{kind}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; use {forms}"
        )
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"{where}: choice lists a value twice ({values!r})")
        return Dimension(key, kind, choices=tuple(values))
    if not isinstance(values, list) or len(values) != 2 or not all(_is_number(v) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got [{low}, {high}]")
    if kind == "int":
        if not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{where}: int needs whole-number bounds, got [{low}, {high}]")
        low, high = int(low), int(high)
    return Dimension(key, kind, low=low, high=high)


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    """Every dimension of ``tune.space`` (form only). Raises ConfigError for an empty or malformed
    space."""
    if not space:
        raise ConfigError(
            "config key 'tune.space': the search space is empty; add e.g. "
            "train.lr: {loguniform: [1.0e-4, 1.0e-1]}"
        )
    dims = []
    for key, spec in space.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"config key 'tune.space': '{key}' is not a dotted config key such as train.lr"
            )
        dims.append(parse_dimension(key, spec))
    return dims


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for key ``a.b.c`` (intermediate mappings created)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _check_key_exists(key: str, schema: type[BaseModel]) -> None:
    """Raise ConfigError unless ``key`` names a value (not a section) of the train config."""

    where = f"config key 'tune.space.{key}'"
    parts = key.split(".")
    if parts[0] in ("tune", "experiment"):
        raise ConfigError(f"{where}: '{key}' is not a train-config key that a sweep can search")
    if key in SWEEP_OWNED:
        raise ConfigError(f"{where}: cannot be searched: {SWEEP_OWNED[key]}")
    model: Any = schema
    for i, part in enumerate(parts):
        if model is ModelConfig and i == len(parts) - 1:
            # builder keyword arguments: checked against the builder when values are validated
            return
        fields = getattr(model, "model_fields", {})
        if part not in fields or part == "tune":
            known = [f for f in fields if f not in ("tune", "experiment")]
            hint = difflib.get_close_matches(part, known, n=1)
            prefix = ".".join(parts[:i])
            suggestion = (
                f" (did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?)" if hint else ""
            )
            raise ConfigError(f"{where}: '{key}' is not a train-config key{suggestion}")
        annotation = fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        if model is None and i < len(parts) - 1:
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
    if model is not None and model is not ModelConfig:
        raise ConfigError(f"{where}: '{key}' is a section; search one of its keys instead")
    if model is ModelConfig:
        raise ConfigError(
            f"{where}: 'model' is a section; search one of its keys (e.g. model.width)"
        )


def check_space(cfg) -> list[Dimension]:
    """Check every dimension against the whole config: the key exists and takes every searched
    value.

    Returns the dimensions. Raises ConfigError naming ``tune.space.<key>``.
    """
    from kiln.config import validate_config

    dims = parse_space(cfg.require_tune().space)
    base = train_config_dict(cfg)
    for dim in dims:
        _check_key_exists(dim.key, type(cfg))
        for value in dim.extremes():
            data = copy.deepcopy(base)
            set_dotted(data, dim.key, value)
            try:
                validate_config(data, type(cfg))
            except ConfigError as exc:
                hint = (
                    "; use {int: [low, high]} for a whole-number key"
                    if dim.kind != "choice" and "valid integer" in str(exc)
                    else ""
                )
                raise ConfigError(
                    f"config key 'tune.space.{dim.key}': value {value!r} is not accepted "
                    f"({exc}){hint}"
                ) from None
    return dims


def train_config_dict(cfg) -> dict[str, Any]:
    """The config as plain data without its ``tune`` section (what one trial trains)."""
    data = cfg.to_dict()
    data.pop("tune", None)
    return data


def optuna_space(dims: list[Dimension]) -> dict[str, Any]:
    """``{key: optuna distribution}`` for OptunaSearch."""
    return {d.key: d.distribution() for d in dims}


def decode_params(dims: list[Dimension], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's suggested values -> config values, keyed by dotted key."""
    by_key = {d.key: d for d in dims}
    return {k: by_key[k].decode(v) if k in by_key else v for k, v in params.items()}


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config data with each dotted key of ``params`` set (values already decoded)."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    return data
