"""The whole pipeline's config (``PipelineConfig``): its sections, the rules across them, and YAML in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from cmt_core import methods
from cmt_core.config.sections import (
    DataConfig,
    EncodeConfig,
    EvalConfig,
    GuidanceConfig,
    LaunchConfig,
    MidTrainConfig,
    NetworkConfig,
    PostTrainConfig,
    RolloutConfig,
    StrictModel,
    TeacherConfig,
)
from cmt_core.data import POINT_DATA
from cmt_core.object_storage import default_mirror, is_url, location
from cmt_core.teachers import PROGRAMS, VELOCITY

# the file and folder fields: what ``preflight`` checks (None: a file or a folder, as ``data.name`` reads it) and
# what flows confine to their allowed roots, beside the artifact root and its mirror
INPUT_FILES = {"data.path": None, "data.encoder.path": "dir", "data.encoder.edm2_encoded": None,
               "teacher.path": "file", "guidance.guide.path": "file", "midtrain.lpips_backbone": "file",
               "eval.inception_path": "file"}
# eval.reference_stats: a file or a folder, checked by preflight.check_reference_stats
PATH_FIELDS = ("artifact_root", "cache_root", *INPUT_FILES, "eval.reference_stats")
DATA_PATH_KIND = {"npz": "file", "image_folder": None, "cifar10": "dir"}  # None: a folder or a .zip archive



class PipelineConfig(StrictModel):
    """The whole pipeline: teacher -> rollouts -> mid-training -> post-training -> evaluation."""

    preset: str = "custom"
    data: DataConfig = DataConfig()
    encode: EncodeConfig = EncodeConfig()
    network: NetworkConfig = NetworkConfig()
    teacher: TeacherConfig = TeacherConfig()
    rollout: RolloutConfig = RolloutConfig()
    midtrain: MidTrainConfig = MidTrainConfig()
    posttrain: PostTrainConfig = PostTrainConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    eval: EvalConfig = EvalConfig()
    launch: LaunchConfig = LaunchConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    cpu_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads per process (None: torch's "
                                    "default); 1 avoids spin-wait stalls when other processes share the cores")
    artifact_root: str | Path = Field(Path("artifacts"), union_mode="left_to_right",
                                      description="a folder, or a URL on object storage (s3://bucket/prefix, "
                                      "cmt_core.object_storage)")
    cache_root: Path | None = Field(None, description="local mirror of a URL artifact_root (None: ~/.cache/cmt/...)")

    @field_validator("artifact_root")
    @classmethod
    def _root(cls, value):
        """A URL stays a string (``s3://bucket/prefix``), anything else is a local ``Path``. Text is tried first
        (``union_mode``): read as a ``Path`` it would lose a URL's ``//``, and the field must parse from JSON (the
        form worker processes receive configs in)."""
        return location(value)

    @property
    def remote_root(self) -> str | None:
        """The artifact root's URL, or None when it is a local folder."""
        return self.artifact_root if is_url(self.artifact_root) else None

    @property
    def local_root(self) -> Path:
        """Where this machine works: the artifact root itself, or the local mirror of a URL root (run logs,
        feature caches, checkpoints and the files of artifacts live there)."""
        if self.remote_root is None:
            return Path(self.artifact_root)
        return self.cache_root if self.cache_root is not None else default_mirror(self.remote_root)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.teacher.source == "exact" and self.data.name not in POINT_DATA:
            raise ValueError(f"teacher.source='exact' needs 2-D synthetic data, not data.name={self.data.name!r}")
        if self.network.kind != "mlp" and self.data.name in POINT_DATA:
            raise ValueError(f"network.kind={self.network.kind!r} needs image data; use 'mlp' for 2-D data")
        if self.teacher.source in PROGRAMS + VELOCITY:
            what = "none of ours" if self.teacher.source in PROGRAMS else "velocity-parametrised ones, in SiT time"
            for field, init in (("midtrain.init", self.midtrain.init), ("posttrain.init", self.posttrain.init)):
                if init == "teacher":
                    raise ValueError(f"{field}='teacher' needs the teacher's network weights as an EDM denoiser's, "
                                     f"and teacher.source={self.teacher.source!r} has {what}; use init='random' or a "
                                     "checkpoint / edm_pickle / pretrain teacher")
        self._conditioning()
        for rules in dict.fromkeys(m.rules for m in methods.METHODS.values()):  # each rule once, in order
            rules(self)
        mid, post = methods.get_method(self.midtrain.form), methods.get_method(self.posttrain.method)
        if self.posttrain.init == "cmt" and mid.kind != post.kind:
            forms = [n for n in methods.names("midtrain") if methods.get_method(n).kind == post.kind]
            raise ValueError(f"posttrain.method={post.name!r} with init='cmt' trains a {post.kind} model: it needs a "
                             f"midtrain.form that trains one ({', '.join(repr(f) for f in forms)}), not "
                             f"{mid.name!r}")
        return self


    def _conditioning(self) -> None:
        """Labels, label dropout and guidance fit together: guidance and label dropout need class labels, a scale
        needs a kind of guidance, classifier-free guidance a teacher with an unconditional branch."""
        g, classes = self.guidance, self.data.num_classes
        if classes and self.teacher.source in PROGRAMS:
            raise ValueError(f"data.num_classes={classes}: a teacher.source={self.teacher.source!r} teacher is "
                             "unconditional (it takes no class labels); use data.num_classes=0")
        for section in ("teacher", "midtrain", "posttrain"):
            rate = getattr(self, section).train.label_dropout
            if rate and not classes:
                raise ValueError(f"{section}.train.label_dropout={rate} drops class labels: it needs class-conditional "
                                 "data (data.num_classes > 0)")
        if g.kind == "none":
            for field, value, neutral in (("scale", g.scale, 1.0), ("rollout_scale", g.rollout_scale, 1.0),
                                          ("sweep", list(g.sweep), [])):
                if value != neutral:
                    raise ValueError(f"guidance.{field}={value} guides the teacher: it needs guidance.kind 'cfg' or "
                                     "'autoguidance'")
            return
        if not classes:
            raise ValueError(f"guidance.kind={g.kind!r} guides a class-conditional teacher: it needs "
                             "data.num_classes > 0 (the data's classes)")
        if g.kind == "cfg" and self.teacher.source == "pretrain" and not self.teacher.train.label_dropout:
            raise ValueError("guidance.kind='cfg' guides with the teacher's unconditional branch: a teacher "
                             "pre-trained here needs teacher.train.label_dropout > 0 (EDM trains it with 0.1)")


def save_yaml(cfg: PipelineConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (paths and tuples as plain YAML scalars / lists)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error as one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


MAX_CONFIG_BYTES = 1 << 20


def load_yaml(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config written by ``save_yaml`` (or by hand). A file that is missing, is
    not YAML or not a mapping raises ``ValueError`` naming it; bad fields raise pydantic's ``ValidationError``."""
    try:
        if not Path(path).is_file():  # a FIFO or a device would block or never end: not read
            raise ValueError(f"--config {str(path)[:200]!r} is not a regular file") from None
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"--config {str(path)[:200]!r} holds over {MAX_CONFIG_BYTES} bytes: not a config")
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--config {str(path)[:200]!r} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {str(path)[:200]!r} is not text") from None
    except RecursionError:
        raise ValueError(f"--config {str(path)[:200]!r} nests deeper than any config") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of config sections, got "
                         f"{type(raw).__name__}")
    return PipelineConfig.model_validate(raw)
