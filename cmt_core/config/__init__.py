"""Validated configuration of every stage and of the whole pipeline.

Every model is a strict pydantic v2 model: unknown keys and out-of-range values fail with an error that
names the field and the allowed range. A ``PipelineConfig`` round-trips through YAML
(``save_yaml`` / ``load_yaml``); named presets live in ``cmt_core.presets``. The section models are in
``cmt_core.config.sections``, the whole config in ``cmt_core.config.pipeline``; import them from here.

The schema sits above the code it configures: the choices it offers come from the registries of what exists
(solvers, data sets, teacher sources, and the methods of ``cmt_core.methods``, whose declarations also state the
rules a method sets on a whole config), and nothing below it reads a config type: the stage layer
(``cmt_core.stages``) turns sections into the plain values that losses, networks and samplers take.
"""

from cmt_core.config.pipeline import (
    DATA_PATH_KIND,
    INPUT_FILES,
    MAX_CONFIG_BYTES,
    PATH_FIELDS,
    PipelineConfig,
    load_yaml,
    save_yaml,
    yaml_problem,
)
from cmt_core.config.sections import (
    Beta,
    ClusterConfig,
    DataConfig,
    DistanceName,
    ECTConfig,
    EncodeConfig,
    EncoderConfig,
    EvalConfig,
    GuidanceConfig,
    GuideConfig,
    LaunchConfig,
    MeanFlowConfig,
    MidTrainConfig,
    NetworkConfig,
    PostTrainConfig,
    RolloutConfig,
    SolverConfig,
    SolverName,
    StoreConfig,
    StrictModel,
    TeacherConfig,
    TrainConfig,
    registered,
)

__all__ = [
    "Beta", "ClusterConfig", "DATA_PATH_KIND", "DataConfig", "DistanceName", "ECTConfig", "EncodeConfig",
    "EncoderConfig", "EvalConfig",
    "GuidanceConfig", "GuideConfig", "INPUT_FILES", "LaunchConfig", "MAX_CONFIG_BYTES", "MeanFlowConfig",
    "MidTrainConfig", "NetworkConfig", "PATH_FIELDS", "PipelineConfig", "PostTrainConfig", "RolloutConfig",
    "SolverConfig", "SolverName", "StoreConfig", "StrictModel", "TeacherConfig", "TrainConfig", "load_yaml",
    "registered", "save_yaml", "yaml_problem",
]
