"""One flow per stage: ``cmt-encode`` (a latent space's encoder and encoded data set), ``cmt-teacher``,
``cmt-guide``, ``cmt-rollouts``, ``cmt-midtrain``, ``cmt-posttrain``, ``cmt-evaluation``.

A stage flow runs its stage and, first, whatever the stage needs that is not complete yet (complete inputs
are reused at once), so each can be started on its own: e.g. mid-training on more DDP processes, or
evaluation with other settings, on artifacts an earlier pipeline run left.
"""

from __future__ import annotations

from flows.pipeline import stage_flow

cmt_encode = stage_flow("cmt-encode", ["encode"], "A latent space: the encoder (SD's VAE checked, or a small one "
                        "trained here) and the data set encoded once into a zarr store, sharded on dask "
                        "(`encode.cluster`).", "encode.cluster.workers=4")
cmt_teacher = stage_flow("cmt-teacher", ["teacher"], "The teacher: EDM pre-training (or a loaded / exact teacher).",
                         "teacher.train.steps=8000")
cmt_guide = stage_flow("cmt-guide", ["guide"], "The guide network of autoguidance: a smaller, shorter-trained "
                       "denoiser pre-trained here, or loaded.", "guidance.guide.train.steps=2000")
cmt_rollouts = stage_flow("cmt-rollouts", ["rollouts"],
                          "Teacher ODE rollouts on dask: a LocalCluster, or the scheduler at "
                          "`rollout.cluster.address`.",
                          "rollout.cluster.address=tcp://host:8786")
cmt_midtrain = stage_flow("cmt-midtrain", ["midtrain"],
                          "Consistency mid-training (CMT) on the teacher's rollouts, optionally on several DDP "
                          "processes.", "midtrain.train.lr=1e-4")
cmt_posttrain = stage_flow("cmt-posttrain", ["posttrain"],
                           "Post-training (ECT / ECD / Mean Flow) from the CMT, teacher or random initialisation.",
                           "posttrain.method=ecd")
cmt_evaluation = stage_flow("cmt-evaluation", ["evaluation"],
                            "Evaluation of the teacher, CMT and post-trained models: results table, sample grids, "
                            "curves.", "eval.num_samples=10000")
