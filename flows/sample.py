"""The flow ``cmt-sample``: draw N images from a trained generator to files (``cmt_core.sampling``).

Its one parameter is a ``SampleJob`` (the UI shows it as a form: the model, the output folder, the number of images,
steps, seed, class labels, format, batch size). The model and output paths are confined to the allowed roots
(``flows.parameters.confine``). A rerun with the same parameters writes only the images still missing, so a failed
or cancelled run is resumed by running it again. The run publishes a summary table and a grid of the first images.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

import tasks  # noqa: F401  (Prefect environment defaults before prefect is imported)
from cmt_core.errors import config_message
from cmt_core.runtime import Runtime
from cmt_core.sampling import GRID_FILE, SampleJob, run_sampling
from flows.parameters import confine
from tasks.reporting import artifact_key, brief, library_logs_to


@task(name="sample")
def sample_task(job: SampleJob) -> dict:
    """Draw and write the images (every image already on disk is kept)."""
    with library_logs_to(get_run_logger()):
        return run_sampling(job, Runtime.detect(job.device))


@flow(name="cmt-sample")
def cmt_sample(job: SampleJob) -> dict:
    """Draw `num_samples` images from a trained generator (an exported one, or a mid-/post-training artifact folder
    or id) with `steps` network calls, to PNG files in EDM's layout and/or one `.npz` (uint8 NHWC).

    Args:
        job: The model, the output folder, the number of images, steps, seed, class labels, output format, batch
            size, artifact root (for artifact ids) and device.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    try:
        for field in ("out", "artifact_root", "labels_file"):
            if getattr(job, field) is not None:
                confine(field, getattr(job, field))
        if Path(job.model).exists():  # a folder; otherwise an artifact id, looked up under artifact_root
            confine("model", job.model)
    except ValueError as err:
        raise ValueError(config_message(err)) from None
    summary = sample_task(job)
    get_run_logger().info("sampled: %s", brief({k: v for k, v in summary.items() if k != "generator"}))
    create_table_artifact([{k: summary[k] for k in ("num_samples", "steps", "seed", "drawn", "seconds",
                                                    "images_per_s", "device", "out", "npz")}],
                          key=artifact_key("cmt", "sample"), description=f"cmt-sample: {job.model}")
    grid = job.out / GRID_FILE
    if grid.is_file():
        from cmt_core.evaluation.report import png_data_url

        create_markdown_artifact(f"![first images]({png_data_url(grid)})", description="first images")
    return summary
