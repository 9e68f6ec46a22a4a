"""The ``serve`` config section: what to serve, where, and how each model's deployment runs."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.config import Section
from kiln.monitor.live.config import MonitorConfig
from kiln.serve.limits import LimitsConfig
from kiln.train.config import TrainingJobConfig

SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class BatchingConfig(Section):
    enabled: bool = Field(
        True, description="Dynamic batching (@serve.batch) of concurrent requests per version."
    )
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Most requests run in one model call."
    )
    wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=10_000.0,
        description="How long a batch waits for more requests once it has one; 0 batches only "
        "what has queued while the previous batch ran (no added latency when idle).",
    )


class AutoscalingConfig(Section):
    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas (0 lets the model scale to zero)."
    )
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica to aim for."
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentConfig(Section):
    replicas: int = Field(
        1, ge=1, description="Replicas of the model's deployment (ignored with autoscaling)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Autoscale between min and max replicas."
    )
    num_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved per replica (fractions let several fit on 2 CPUs)."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at a time.")
    threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of the model runtime per replica; default: Ray's (1 per "
        "reserved CPU).",
    )
    graceful_shutdown_s: float = Field(
        5.0, gt=0, description="How long a stopping replica waits for the requests it is answering."
    )

    @property
    def min_replicas(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling else self.replicas


class DeploymentOverrides(Section):
    """Per-model changes to ``serve.deployment``; keys left out keep the global value."""

    replicas: int | None = Field(None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float | None = Field(None, gt=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    graceful_shutdown_s: float | None = Field(None, gt=0)


class BatchingOverrides(Section):
    """Per-model changes to ``serve.batching``; keys left out keep the global value."""

    enabled: bool | None = None
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    wait_ms: float | None = Field(None, ge=0.0, le=10_000.0)


class ServedModelConfig(Section):
    uri: str = Field(description="Registered model: models:/NAME/VERSION or models:/NAME@ALIAS.")
    name: str | None = Field(
        None, description="Name it is served under; default: the registered model's name."
    )
    default: bool = Field(
        False, description="Unversioned requests go to this version (default: the highest served)."
    )
    deployment: DeploymentOverrides | None = Field(
        None, description="This model's deployment settings."
    )
    batching: BatchingOverrides | None = Field(None, description="This model's batching settings.")

    @field_validator("uri")
    @classmethod
    def _registry_uri(cls, value: str) -> str:
        body = value[len("models:/") :] if value.startswith("models:/") else ""
        if not body or ("/" not in body and "@" not in body):
            raise ValueError(
                f"'{value}' is not a registry URI (models:/NAME/VERSION or models:/NAME@ALIAS)"
            )
        return value

    @field_validator("name")
    @classmethod
    def _url_safe_name(cls, value: str | None) -> str | None:
        if value is not None and not SERVED_NAME.match(value):
            raise ValueError(
                f"served name '{value}' must be letters, digits, '_', '.' or '-' (it is part of "
                "URLs)"
            )
        return value


class ServeConfig(Section):
    """``kiln serve start``: models from the MLflow registry behind the Open Inference Protocol."""

    host: str = Field(
        "127.0.0.1", description="Interface the HTTP endpoint binds to (0.0.0.0 exposes it)."
    )
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    grpc: bool = Field(
        True,
        description="Serve the Open Inference Protocol over gRPC too (KServe v2 "
        "GRPCInferenceService, on the same host as HTTP).",
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="gRPC port; default (or 0): a free one, reported as grpc_url by start and "
        "status.",
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "haproxy",
        description="'haproxy' (default): Ray Serve's HAProxy ingress, forwarding straight to the "
        "replicas, every listener on loopback unless host says otherwise. 'proxy': Ray Serve's "
        "Python proxy (slower; for clusters whose nodes lack HAProxy; see README).",
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding an API key; when set, infer endpoints require it "
        "(header 'X-API-Key: KEY' or 'Authorization: Bearer KEY').",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    start_timeout_s: float = Field(
        180.0,
        gt=0,
        description="Fail `kiln serve start` if the models are not "
        "running by then (e.g. replicas cannot be placed).",
    )
    num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs of the local Ray instance Kiln starts "
        "(default: all); ignored with --address.",
    )
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    models: list[ServedModelConfig] = Field(default_factory=list, description="What to serve.")
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="Live monitoring of served versions."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="Per-request budgets (413 above one): dimensions, elements, rows, strings, "
        "JSON depth and numbers, image pixels, record keys.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _uri_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"uri": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _one_override_per_model(self) -> ServeConfig:
        seen: dict[str, int] = {}
        for entry in self.models:
            if entry.deployment is None and entry.batching is None:
                continue
            key = entry.name or entry.uri[len("models:/") :].split("/")[0].split("@")[0]
            if key in seen:
                raise ValueError(
                    f"models {seen[key]} and {self.models.index(entry)} both set "
                    "deployment/batching "
                    f"for '{key}'; set them on one entry of that model"
                )
            seen[key] = self.models.index(entry)
        return self

    def deployment_for(self, entries: list[ServedModelConfig]) -> DeploymentConfig:
        """The global deployment settings with any override among ``entries`` applied."""
        return _merged(self.deployment, [e.deployment for e in entries])

    def batching_for(self, entries: list[ServedModelConfig]) -> BatchingConfig:
        return _merged(self.batching, [e.batching for e in entries])


def _merged(base: Section, overrides: list[Section | None]):
    data = base.model_dump()
    for override in overrides:
        if override is not None:
            data.update(override.model_dump(exclude_none=True))
    return type(base).model_validate(data)


class ServeJobConfig(TrainingJobConfig):
    """The sections ``kiln serve start`` reads: the training sections (experiment) and ``serve``."""

    serve: ServeConfig | None = Field(
        None, description="Models to serve over HTTP (kiln serve start)."
    )
