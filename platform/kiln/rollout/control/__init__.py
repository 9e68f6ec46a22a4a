"""The rollout control plane: the per-model controller actor and the driver API (start, steer,
status, history). It sits above serving: it reads the serving state file and plan, and the commands
layer wires it into ``kiln serve start | stop`` as hooks."""
