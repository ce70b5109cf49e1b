"""The flow ``cmt-compare``: the paper's comparison of initialisations, run on one preset (``cmt_core.comparison``),
at one post-training budget or, with ``comparison.targets``, until a quality (``cmt_core.savings``).

Every arm is an ordinary pipeline run of the preset with ``posttrain.init`` and the seeds set, so its stages are
the same cached artifacts ``cmt-pipeline`` writes: the teacher and rollouts are computed once and shared by every
arm, a rerun after a failure computes only the missing arms, and ``workers`` processes run independent arms at
once. The run publishes the comparison's tables and plots as a markdown artifact and writes them (with
``init_comparison_<preset>.json``, or ``savings_<preset>.json`` in target mode) to ``comparison.out_dir``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

import tasks  # noqa: F401  (Prefect environment defaults before prefect is imported)
from cmt_core.comparison import CompareConfig, arm_config, run_comparison
from cmt_core.errors import config_message
from cmt_core.savings import run_savings
from flows.parameters import confine, confine_config
from tasks.reporting import artifact_key, embed_images

DEFAULT = CompareConfig()


@flow(name="cmt-compare")
def cmt_compare(comparison: CompareConfig = DEFAULT) -> dict:
    """Post-train from CMT, teacher (diffusion) and random weights (and vanilla ECT) at the same budget, seeds and
    evaluation cadence, and compare metric curves and costs; with targets, train every arm until it meets them or
    its cap, and report each path's cost to each target and the CMT path's savings.

    Args:
        comparison: The preset, methods (ect, meanflow), arms, number of seeds, an optional common post-training
            budget and evaluation cadence, quality targets (e.g. 2step<=1.1x) and the caps' factor, in target mode
            the seeds this run computes (run_seeds: the others' records are read from the results folder), dotted
            overrides for every arm, worker processes, the artifact root and the folder the results are written to.
    """
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    try:
        confine("comparison.out_dir", comparison.out_dir)
        for method in comparison.methods:  # every arm valid and confined before any runs
            for init in comparison.inits:
                confine_config(arm_config(comparison, method, init, 0))
    except ValueError as err:
        raise ValueError(config_message(err)) from None
    targeted = bool(comparison.targets)
    summary = (run_savings if targeted else run_comparison)(comparison, report=logger.info)
    name = "savings" if targeted else "init_comparison"
    md = comparison.out_dir / f"{name}_{comparison.preset}.md"
    create_markdown_artifact(embed_images(md.read_text(), comparison.out_dir),
                             key=artifact_key("cmt", comparison.preset, name.replace("_", "-")),
                             description=f"{'Savings at a target quality' if targeted else 'Initialisation comparison'}"
                                         f" ({comparison.preset})")
    logger.info("results: %s", md)
    return summary
