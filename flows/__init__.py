"""Prefect flows: ``cmt-pipeline`` (all stages), one flow per stage (``flows.stages``), ``cmt-compare``
(``flows.compare``: the comparison of initialisations), ``cmt-sample`` (``flows.sample``: images from a trained
generator) and ``cmt-watch`` (``flows.watch``: a run's progress, scored from its checkpoints).

Deployments of every flow are declared in ``prefect.yaml`` at the repository root.
"""

import tasks  # noqa: F401  (sets Prefect's environment defaults before prefect is imported)
from flows.compare import cmt_compare  # noqa: E402
from flows.pipeline import cmt_pipeline, run_stages  # noqa: E402
from flows.sample import cmt_sample  # noqa: E402
from flows.stages import (  # noqa: E402
    cmt_encode,
    cmt_evaluation,
    cmt_guide,
    cmt_midtrain,
    cmt_posttrain,
    cmt_rollouts,
    cmt_teacher,
)
from flows.watch import cmt_watch  # noqa: E402

FLOWS = {"pipeline": cmt_pipeline, "encode": cmt_encode, "teacher": cmt_teacher, "guide": cmt_guide,
         "rollouts": cmt_rollouts, "midtrain": cmt_midtrain, "posttrain": cmt_posttrain, "evaluation": cmt_evaluation,
         "compare": cmt_compare, "sample": cmt_sample, "watch": cmt_watch}

__all__ = ["FLOWS", "cmt_compare", "cmt_encode", "cmt_evaluation", "cmt_guide", "cmt_midtrain", "cmt_pipeline",
           "cmt_posttrain", "cmt_rollouts", "cmt_sample", "cmt_teacher", "cmt_watch", "run_stages"]
