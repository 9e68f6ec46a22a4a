"""Building the Ray Serve applications of a plan: a root app at ``/`` and one app per served model.

One application per model (route prefix ``/v2/models/{name}``) lets each model have its own
replicas, CPUs and autoscaling, and lets one model be redeployed without touching the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from kiln.models.registry import ALLOW_ENV, allowed_builders

if TYPE_CHECKING:
    from kiln.monitor.live.served import RetrainerFactory
    from kiln.serve.plan import ModelPlan, ServePlan
    from kiln.serve.root_server import ConsoleFactory

ROOT_APP = "kiln"
# Ray Serve 2.60's switch (ray.serve._private.constants) between a user-code event loop in a thread
# of its own ("1", its default) and the replica's own loop ("0").
SEPARATE_USER_LOOP_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
MODEL_APP_PREFIX = "kiln-"


def model_app_name(model: str) -> str:
    """The Serve application of a served model."""
    return f"{MODEL_APP_PREFIX}{model}"


def is_kiln_app(name: str) -> bool:
    """Whether a Serve application is one of Kiln's (the root app or a model's)."""
    return name == ROOT_APP or name.startswith(MODEL_APP_PREFIX)


def model_route(model: str) -> str:
    """A served model's route prefix."""
    return f"/v2/models/{model}"


def deployment_options(model: ModelPlan, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``serve.deployment(...).options`` for a model: replicas or autoscaling, CPUs, batching
    (user_config); ``extra_env`` joins the replicas' environment."""
    d = model.deployment
    actor: dict[str, Any] = {"num_cpus": d.num_cpus}
    # Ray Serve runs a replica's user code on an event loop of its own thread by default: each
    # request then crosses threads twice (the replica's HTTP loop hands it to the user loop and
    # the answer back), and the two loops take turns at the GIL. Kiln's handler keeps its loop
    # free by itself (model calls on the version's thread, large bodies parsed off the loop), so
    # the replica runs it on its own loop: the same answers, with the digits CNN at concurrency 32
    # 0.8 instead of 1.6-1.8 ms of the replica's CPU per request batched, 1.2 instead of 1.5-1.6
    # unbatched (issue 15).
    env_vars: dict[str, str] = {SEPARATE_USER_LOOP_ENV: "0", **(extra_env or {})}
    if d.threads:
        env_vars["OMP_NUM_THREADS"] = str(d.threads)
    # The operator's builder allow-list reaches the replicas that load (and roll out) versions.
    allowed = allowed_builders()
    if allowed:
        env_vars[ALLOW_ENV] = ",".join(allowed)
    if env_vars:
        actor["runtime_env"] = {"env_vars": env_vars}
    options: dict[str, Any] = {
        "name": "ModelServer",
        "ray_actor_options": actor,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_s,
        "max_ongoing_requests": d.max_ongoing_requests,
        "user_config": {"batching": model.batching.model_dump()},
    }
    if d.autoscaling:
        a = d.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = d.replicas
    return options


def build_applications(
    plan: ServePlan,
    api_key_sha256: str | None,
    retrainer: RetrainerFactory | None = None,
    dashboard_url: str | None = None,
    console: ConsoleFactory | None = None,
    replica_env: dict[str, str] | None = None,
) -> list[Any]:
    """The ``RunTarget``s to deploy: the root app first, then one per model. ``retrainer`` builds
    the replicas' retraining loops (passed only when ``serve.monitor.retrain`` is set); they submit
    jobs to ``dashboard_url`` unless the policy names a Jobs API. ``console`` builds the root app's
    handler of ``/console/`` (with the run dir and the API key's digest). ``replica_env`` joins
    the model replicas' environment (Kiln's setup hook, the gRPC host and message bound)."""
    from ray import serve
    from ray.serve import Deployment, RunTarget

    from kiln.serve.model_server import ModelServer
    from kiln.serve.plan import ModelAppSpec
    from kiln.serve.root_server import RootServer
    from kiln.version import __version__ as kiln_version

    cfg = plan.config
    listing = {
        m.name: {"versions": [v.version for v in m.versions], "default_version": m.default_version}
        for m in plan.models
    }
    names = [model_app_name(m.name) for m in plan.models]
    # serve.deployment(cls) is a Deployment; its typed overloads only know the decorator forms.
    root = cast(Deployment, serve.deployment(RootServer)).options(
        name="RootServer",
        num_replicas=1,
        # No runtime_env of its own: it inherits the Serve controller's environment (Kiln's setup
        # hook, the gRPC host and message bound; tests/test_serve_local.py sees its gRPC port on
        # loopback), and a replica with its own needs a dedicated worker, slower to start.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=256,
    )
    bound = root.bind(
        listing,
        names,
        kiln_version,
        console,
        plan.run_dir,
        api_key_sha256,
        {m.name: model_app_name(m.name) for m in plan.models},
    )
    targets = [RunTarget(bound, name=ROOT_APP, route_prefix="/")]
    for model in plan.models:
        spec = ModelAppSpec(
            model_name=model.name,
            versions=model.versions,
            default_version=model.default_version,
            tracking_uri=plan.tracking_uri,
            max_request_bytes=cfg.max_request_bytes,
            api_key_sha256=api_key_sha256,
            monitor=cfg.monitor.model_dump(),
            run_dir=plan.run_dir,
            retrainer=retrainer if cfg.monitor.retrain is not None else None,
            dashboard_url=dashboard_url,
            limits=cfg.limits.model_dump(),
        )
        deployment = cast(Deployment, serve.deployment(ModelServer)).options(
            **deployment_options(model, replica_env)
        )
        targets.append(
            RunTarget(
                deployment.bind(spec),
                name=model_app_name(model.name),
                route_prefix=model_route(model.name),
            )
        )
    return targets
