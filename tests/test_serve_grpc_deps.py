"""The gRPC client set the dev extra installs works with Ray Serve: ``tritonclient[grpc]`` declares
``protobuf<7``, and resolving it with Ray downgrades protobuf until ``import ray.serve`` fails
(Ray Serve 2.60's gRPC code needs protobuf 7.35 or newer). Kiln installs ``tritonclient[http]``
plus ``grpcio`` instead; this test fails on the broken combination."""

from __future__ import annotations

import importlib.metadata


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version(name).split(".")[:2])


def test_tritonclient_grpc_and_ray_serve_import_together():
    import ray.serve  # noqa: F401  (fails on protobuf older than Ray Serve's gRPC code needs)
    import tritonclient.grpc  # noqa: F401
    from ray.serve.generated import serve_pb2  # noqa: F401

    assert _version("protobuf") >= (7, 35), importlib.metadata.version("protobuf")


def test_no_dependency_list_asks_for_the_tritonclient_grpc_extra():
    """``tritonclient[grpc]`` would pull protobuf<7 on the next resolve."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    lists = [
        project["project"]["dependencies"],
        *project["project"]["optional-dependencies"].values(),
    ]
    requirements = [r.replace(" ", "") for deps in lists for r in deps]
    assert any(r.startswith("tritonclient[") for r in requirements)  # the check looks somewhere
    assert not [r for r in requirements if r.startswith("tritonclient[") and "grpc" in r]
