"""The rollout core: what a rollout is (spec), how a replica routes (routing), what it counts
(stats), where the state lives (store), and the replica's agent. Pure: no Ray Serve calls, and
nothing above it is imported, so the serving layer can use every module here."""
