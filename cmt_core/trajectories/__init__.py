"""Teacher trajectories: solved once, stored in a zarr store, streamed as training pairs.

Dependencies point one way: the producers write the store, the loader reads it, the store knows neither.

* ``rollout``: deterministic ODE trajectories from per-trajectory seeded noise (in memory);
* ``dask_rollouts``: the same, one whole store shard per task, on a dask cluster (or in process without dask);
* ``store``: the zarr v3 trajectory store (layout, shards, checksums, completion, verification);
* ``pairs``: CMT training pairs (x_t, t, x_s, s), in memory (``TrajectoryPairs``) or streamed from a
  store (``StorePairs``), each a deterministic function of the step.
"""
