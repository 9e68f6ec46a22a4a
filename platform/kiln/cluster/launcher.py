"""Checking a Ray cluster-launcher config (``cluster.yaml``, what ``ray up`` takes) offline, with
Ray's own validator: defaults of the provider filled in (``prepare_config``), then Ray's JSON schema
and checks (``validate_config``). Nothing is contacted: no cloud credentials are needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, first_line


@dataclass
class NodeType:
    name: str
    min_workers: int
    max_workers: int
    resources: dict[str, Any]
    node_config: dict[str, Any]


@dataclass
class ClusterConfigSummary:
    """A valid cluster config, in brief."""

    path: str
    cluster_name: str
    provider: str
    head_node_type: str
    max_workers: int
    node_types: list[NodeType] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_cluster_config(path: str | Path, verbose: bool = False) -> ClusterConfigSummary:
    """Validate a cluster-launcher YAML as ``ray up`` would before launching anything.

    Returns a summary; raises ConfigError naming the file and the first problem. Ray's log lines
    about the defaults it fills in are shown only when ``verbose`` (its warnings always are).
    """
    import logging

    from kiln.config import read_yaml

    raw = read_yaml(path)
    import jsonschema

    from kiln.compat import validate_cluster_launcher_config

    if not verbose:
        logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)
    try:
        prepared = validate_cluster_launcher_config(raw)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {exc.message}") from None
    except KeyError as exc:
        raise ConfigError(f"{path}: missing required field {exc}") from None
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"{path}: {first_line(exc)}") from None
    types = prepared.get("available_node_types", {})
    return ClusterConfigSummary(
        path=str(path),
        cluster_name=prepared["cluster_name"],
        provider=prepared["provider"]["type"],
        head_node_type=prepared["head_node_type"],
        max_workers=int(prepared["max_workers"]),
        node_types=[
            NodeType(
                name=name,
                min_workers=int(t.get("min_workers", 0)),
                max_workers=int(t.get("max_workers", 0)),
                resources=dict(t.get("resources", {})),
                node_config=dict(t.get("node_config", {})),
            )
            for name, t in types.items()
        ],
    )
