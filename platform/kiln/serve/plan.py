"""From the ``serve`` config to a plan: each served model, its registry versions and deployment
settings.

Aliases are resolved here, once (``models:/digits@champion`` is served as the version it named at
start), and every version is checked against the registry and the runtimes before anything is
deployed, so a typo fails in a second instead of inside a replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import tracking as trk
from kiln.errors import ConfigError, KilnError, ModelError
from kiln.models.spec import check_allowed_builder, load_spec
from kiln.monitor.live.config import MonitorConfig
from kiln.rollout.core.spec import options_for
from kiln.serve.config import (
    SERVED_NAME,
    BatchingConfig,
    DeploymentConfig,
    ServeConfig,
    ServedModelConfig,
)

if TYPE_CHECKING:
    from kiln.monitor.live.served import RetrainerFactory


@dataclass
class VersionSource:
    """A version to serve: its served number and the registry URI it loads from."""

    version: str
    uri: str


@dataclass
class ModelAppSpec:
    """Everything a ModelServer replica needs (picklable; the API key only as its sha256)."""

    model_name: str
    versions: list[VersionSource]
    default_version: str
    tracking_uri: str
    max_request_bytes: int
    api_key_sha256: str | None = None
    monitor: dict[str, Any] | None = None  # serve.monitor (a MonitorConfig's fields)
    run_dir: str | None = None  # the serving run dir (rollout state, audit log)
    # Builds each version's retraining loop; given from above serving (None: no retraining).
    # Pickled by reference: only replicas of a config with serve.monitor.retrain import it.
    retrainer: RetrainerFactory | None = None
    dashboard_url: str | None = None  # the serving cluster's Jobs API, captured by the driver
    limits: dict[str, Any] | None = None  # serve.limits (a LimitsConfig's fields)


@dataclass
class ModelPlan:
    """One served model: its versions (served under their registry version numbers) and how it
    runs."""

    name: str
    versions: list[VersionSource]
    default_version: str
    deployment: DeploymentConfig
    batching: BatchingConfig
    formats: dict[str, str] = field(default_factory=dict)  # version -> artifact format

    @property
    def min_cpus(self) -> float:
        return self.deployment.min_replicas * self.deployment.num_cpus


@dataclass
class ServePlan:
    models: list[ModelPlan]
    tracking_uri: str
    config: ServeConfig
    run_dir: str | None = None  # absolute; set by start_serving

    def describe(self) -> str:
        parts = [f"{m.name} v{', v'.join(v.version for v in m.versions)}" for m in self.models]
        return "; ".join(parts)


def absolute_tracking_uri(uri: str) -> str:
    """Replicas run in other working directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).expanduser().resolve())
    return uri


def plan_serving(cfg: ServeConfig, tracking_uri: str) -> ServePlan:
    """Resolve every ``serve.models`` entry in the registry. Raises ConfigError or ModelError."""
    from kiln.models.inference_runtime import RUNTIMES

    if not cfg.models:
        raise ConfigError(
            "nothing to serve: give models:/NAME/VERSION URIs or a config with serve.models"
        )
    tracking_uri = absolute_tracking_uri(tracking_uri)
    resolve_retrain(cfg.monitor)
    groups: dict[str, list[tuple[int, ServedModelConfig, VersionSource, str]]] = {}
    for i, entry in enumerate(cfg.models):
        mv = _registry_version(tracking_uri, entry.uri)
        name = entry.name or mv.name
        if not SERVED_NAME.match(name):
            raise ConfigError(
                f"config key 'serve.models.{i}': registered name '{mv.name}' cannot be part of a "
                "URL; "
                f"set serve.models.{i}.name"
            )
        version = str(mv.version)
        uri = f"models:/{mv.name}/{version}"
        for j, _, other, _ in groups.get(name, []):
            if other.version == version:
                raise ConfigError(
                    f"config key 'serve.models.{i}': {entry.uri} is version {version} of '{name}', "
                    f"already served by serve.models.{j} ({cfg.models[j].uri}); serve one of them "
                    "under another name"
                )
        spec = load_spec(trk.resolve_model_dir(uri, tracking_uri), entry.uri)
        if spec.format not in RUNTIMES:
            raise ModelError(
                f"{entry.uri}: no runtime for artifact format '{spec.format}' "
                f"(known: {', '.join(sorted(RUNTIMES))})"
            )
        check_allowed_builder(spec, entry.uri)
        groups.setdefault(name, []).append((i, entry, VersionSource(version, uri), spec.format))
    models = []
    for name, members in groups.items():
        defaults = [source.version for _, entry, source, _ in members if entry.default]
        if len(defaults) > 1:
            raise ConfigError(
                f"serve.models: model '{name}' marks versions {', '.join(defaults)} as default; "
                "mark one"
            )
        versions = [source for _, _, source, _ in members]
        default = (
            defaults[0]
            if defaults
            else max(versions, key=lambda s: _version_key(s.version)).version
        )
        entries = [entry for _, entry, _, _ in members]
        models.append(
            ModelPlan(
                name=name,
                versions=versions,
                default_version=default,
                deployment=cfg.deployment_for(entries),
                batching=cfg.batching_for(entries),
                formats={source.version: fmt for _, _, source, fmt in members},
            )
        )
    return ServePlan(models=models, tracking_uri=tracking_uri, config=cfg)


def resolve_retrain(cfg: MonitorConfig, cwd: str | None = None) -> None:
    """Pin ``serve.monitor.retrain.project`` to an absolute folder (replicas run elsewhere), check
    that the retraining config is a file in it and that the rollout policy makes sense. Raises
    ConfigError naming the key."""
    import os

    policy = cfg.retrain
    if policy is None:
        return
    project = Path(policy.project or cwd or os.getcwd()).expanduser().resolve()
    if not (project / "jobs" / "train.py").is_file():
        raise ConfigError(
            f"config key 'serve.monitor.retrain.project': {project} has no jobs/train.py "
            "(the retraining job); set it to the Kiln project folder"
        )
    config = Path(policy.config).expanduser()
    config = (config if config.is_absolute() else project / config).resolve()
    if not config.is_file():
        raise ConfigError(f"config key 'serve.monitor.retrain.config': {config} does not exist")
    try:
        relative = config.relative_to(project)
    except ValueError:
        raise ConfigError(
            f"config key 'serve.monitor.retrain.config': {config} is outside the project folder "
            f"{project}, so the job would not get it"
        ) from None
    policy.project, policy.config = str(project), relative.as_posix()
    if policy.rollout is not None:
        try:  # the policy's fields are options_for's parameters
            options_for(**policy.rollout.model_dump()).plan(policy.rollout.strategy)
        except KilnError as exc:
            raise ConfigError(f"config key 'serve.monitor.retrain.rollout': {exc}") from None


def _registry_version(tracking_uri: str, uri: str):
    """The ModelVersion behind a URI; ``models:/NAME/latest`` is the highest registered version."""
    name, _, version = uri[len("models:/") :].partition("/")
    if version != "latest":
        return trk.model_version_for(tracking_uri, uri)
    versions = list(trk.iter_model_versions(tracking_uri, name))
    if not versions:
        raise ModelError(
            f"unknown model '{uri}' in registry {tracking_uri} (no versions of '{name}')"
        )
    return max(versions, key=lambda mv: _version_key(str(mv.version)))


def _version_key(version: str) -> tuple[int, Any]:
    return (0, int(version)) if version.isdigit() else (1, version)
