"""Versioned rollouts of a served model: canary, linear ramp-up, blue-green, shadow; gated, audited.

Two layers (arrows point down only):
- ``kiln.rollout.core``: spec, routing, stats, store and the replica agent; pure (no Ray Serve
  calls), so the serving layer may use it;
- ``kiln.rollout.control``: the controller actor and the driver API, above serving.

Where things run:
- routing: in each ModelServer replica (``core.replica.RolloutAgent``), which co-hosts the
  versions, so the choice adds no hop; new versions are loaded into running replicas, no redeploy;
- decisions: one detached, restartable controller actor per model
  (``control.controller.RolloutController``, 0 CPU), which evaluates the gates every interval on
  the per-version statistics replicas report;
- state: ``RUN_DIR/serve/rollouts/MODEL.json`` (record) and ``MODEL.audit.jsonl`` (audit log).

Python entry points (``kiln.rollout.control.api``; the CLI is ``kiln rollout``)::

    start_rollout(run_dir, address, model, to_version, strategy, options: RolloutOptions,
                  trigger="user") -> RolloutRecord     # trigger is recorded in the audit log
    rollout_command(run_dir, address, model, "promote" | "rollback" | "pause" | "resume",
                    trigger="user")
    rollout_status(run_dir, address, model) -> RolloutStatus
    rollout_history(run_dir, model) -> list[dict]

Gates (``core.spec.parse_gate``): ``NAME<X``, ``NAME>X`` (also <=, >=) on error_rate, p50_ms,
p99_ms, agreement (shadow only) and the quality signals drift, ood_rate (reported by
``ModelServer.quality_signals``). A gate without data in an interval holds the step (never passes
it); a failed gate rolls back at once.
"""
