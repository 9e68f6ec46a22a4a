"""Submitting a Kiln job to a Ray cluster through the Ray Jobs API.

A job is ``jobs/JOB.py`` in the project folder. The project folder is shipped as the job's working
dir (configs/, jobs/ and any local code, without .git, virtualenvs and run outputs) and the kiln
package the submitter runs is shipped as a py_module, so the cluster runs the submitter's code and
needs no kiln installed (``with_deps`` also installs kiln's other requirements, for nodes that have
only ray and torch).
"""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

# Never shipped: version control, virtualenvs, caches and run outputs (gitignore syntax, as Ray
# reads it).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    "build",
    "dist",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "checkpoints",
    "ray_results",
    "bench/out",
    "/platform/kiln",  # a Kiln checkout's own package: shipped as a py_module instead
]
# Secrets that often sit in a project folder: never uploaded with the working dir unless asked
# (`kiln submit --include-secret-files`). Patterns as in .gitignore (Ray's excludes syntax).
SECRET_EXCLUDES = [
    ".env",
    ".env.*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.keystore",
    "id_rsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".pgpass",
    ".git-credentials",
    ".ssh",
    ".aws",
    ".gnupg",
    ".kube",
    ".docker",
    "credentials",
    "*credentials*.json",
    "auth_token",
]
# Already on every Ray node (or too large to install per job): never installed through the runtime
# env.
PROVIDED_BY_CLUSTER = {"ray", "torch", "torchvision"}


@dataclass
class JobSpec:
    """What to run on the cluster: ``python jobs/JOB.py CONFIG [overrides] --json`` in
    ``project``."""

    job: str
    config: str  # relative to project
    overrides: list[str] = field(default_factory=list)
    project: Path = field(default_factory=Path.cwd)
    python: str = "python"

    def entrypoint(self) -> str:
        """The shell command Ray runs on the head. ``--json`` makes the job's summary its last JSON
        line."""
        args = [self.python, f"jobs/{self.job}.py", self.config, *self.overrides, "--json"]
        return " ".join(shlex.quote(a) for a in args)


def available_jobs(project: Path) -> list[str]:
    return sorted(p.stem for p in (project / "jobs").glob("*.py") if not p.name.startswith("_"))


def job_spec(
    job: str,
    config: str,
    overrides: list[str],
    project: str | Path | None = None,
    python: str = "python",
) -> JobSpec:
    """Check that ``jobs/JOB.py`` exists in ``project`` and that CONFIG lies inside it (so it is
    shipped).

    Raises KilnError naming the problem.
    """
    root = Path(project or Path.cwd()).expanduser().resolve()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", job):
        raise KilnError(f"job name '{job}' is not a plain name (jobs are jobs/NAME.py)")
    if not (root / "jobs" / f"{job}.py").is_file():
        have = ", ".join(available_jobs(root)) or "none"
        raise KilnError(
            f"no job '{job}': {root}/jobs/{job}.py does not exist (jobs there: {have}; run from "
            "the project folder or pass --working-dir)"
        )
    path = Path(config).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise KilnError(f"config file not found: {config}")
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise KilnError(
            f"config {config} is outside the working dir {root}, so the cluster would not get it; "
            "move it under the project folder"
        ) from None
    return JobSpec(
        job=job, config=relative.as_posix(), overrides=list(overrides), project=root, python=python
    )


def kiln_requirements() -> list[str]:
    """kiln's own runtime requirements minus those a Ray node already has (ray, torch,
    torchvision)."""
    from importlib import metadata

    try:
        requires = metadata.requires("kiln") or []
    except metadata.PackageNotFoundError:
        raise KilnError(
            "--with-deps needs kiln installed (pip install -e .) to read its requirements"
        ) from None
    keep = []
    for req in requires:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()
        if name not in PROVIDED_BY_CLUSTER:
            keep.append(req.split(";")[0].strip())
    return keep


def build_runtime_env(
    spec: JobSpec,
    tracking_uri: str | None = None,
    with_deps: bool = False,
    env_vars: dict[str, str] | None = None,
    include_secret_files: bool = False,
) -> dict[str, Any]:
    """The job's runtime env: working dir (without ``SECRET_EXCLUDES`` unless
    ``include_secret_files``), the kiln package, env vars (tracking URI, code version, and
    ``JOB_WORKER_ENV`` under the caller's)."""
    from kiln.ray_connection import JOB_WORKER_ENV, KILN_PACKAGE_DIR
    from kiln.tracking import code_version

    variables = {**JOB_WORKER_ENV, "KILN_CODE_VERSION": code_version(), **(env_vars or {})}
    if tracking_uri:
        variables["MLFLOW_TRACKING_URI"] = tracking_uri
    env: dict[str, Any] = {
        "working_dir": str(spec.project),
        "py_modules": [str(Path(KILN_PACKAGE_DIR).resolve())],
        "excludes": WORKING_DIR_EXCLUDES + ([] if include_secret_files else SECRET_EXCLUDES),
        "env_vars": variables,
    }
    if with_deps:
        env["pip"] = kiln_requirements()
    return env


def new_submission_id(job: str) -> str:
    return f"kiln-{job}-{uuid.uuid4().hex[:8]}"


def submit(
    client, spec: JobSpec, runtime_env: dict[str, Any], submission_id: str | None = None
) -> str:
    """Submit ``spec`` through ``client`` (a JobSubmissionClient). Returns the submission id."""
    from kiln.cluster.jobs import api_errors

    if submission_id:
        taken = True
        try:
            client.get_job_info(submission_id)
        except RuntimeError:  # the SDK's "job does not exist"
            taken = False
        if taken:
            raise KilnError(
                f"--submission-id {submission_id}: the cluster has a job with that id already"
            )
    submission_id = submission_id or new_submission_id(spec.job)
    metadata = {"kiln.job": spec.job, "kiln.config": spec.config}
    with api_errors(client):
        return client.submit_job(
            entrypoint=spec.entrypoint(),
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata=metadata,
        )
