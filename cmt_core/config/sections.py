"""The sections of a pipeline config: one strict pydantic model per concern (data, network, solver, training loop,
teacher, guidance, rollouts, mid-training, post-training, evaluation, launch), each validating its own fields and
the rules among them. ``cmt_core.config.pipeline`` assembles them and states the rules across sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, PositiveFloat, model_validator

from cmt_core import methods
from cmt_core.data import DATA_NAMES, FILE_DATA, POINT_DATA
from cmt_core.solvers import SOLVERS
from cmt_core.teachers import SOURCES

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
SolverName = Literal[tuple(SOLVERS)]  # the registered solvers (``cmt_core.solvers.SOLVERS``)
DistanceName = Literal[methods.DISTANCES]  # the per-sample distances (``cmt_core.objectives.distances``)

def registered(stage: str):
    """The type of a field naming a method of ``stage``: checked against the registry when a config is made (a
    method registered later is accepted too), offered as a dropdown (an enum of the registered names)."""
    def check(name: str) -> str:
        known = methods.names(stage)
        if name not in known:
            listed = ", ".join(repr(n) for n in known[:-1]) + f" or {known[-1]!r}"
            raise ValueError(f"Input should be {listed} (the registered {stage} methods)")
        return name

    return Annotated[str, AfterValidator(check),
                     Field(json_schema_extra=lambda schema: schema.update(enum=list(methods.names(stage))))]


class StrictModel(BaseModel):
    """Base class: unknown fields are errors, assignment is validated, ``nan`` / ``inf`` are refused in every
    float field, configs are hashable data."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class AutoencoderTrainConfig(StrictModel):
    """A small KL autoencoder (``diffusers.AutoencoderKL``) trained here as a data set's latent encoder
    (``cmt_core.autoencoder``): Adam on the reconstruction's mean squared error plus ``kl_weight`` times the
    posterior's KL divergence, on the training split."""

    widths: tuple[int, ...] = Field((32, 64), min_length=2, max_length=4, description="channels per resolution; "
                                    "the latents are 2^(len - 1) times smaller per side")
    latent_channels: int = Field(4, ge=1, le=64)
    layers_per_block: int = Field(1, ge=1, le=4)
    norm_groups: int = Field(8, ge=1, le=64, description="GroupNorm groups (must divide every width)")
    kl_weight: float = Field(1e-4, ge=0.0, le=1.0)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: PositiveFloat = 1e-3
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _groups(self) -> AutoencoderTrainConfig:
        if any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"data.encoder.autoencoder.norm_groups={self.norm_groups} must divide every width "
                             f"{list(self.widths)}")
        return self


class EncoderConfig(StrictModel):
    """The encoder between the data's sample space and the model's space (``cmt_core.encoders``): ``identity``
    (pixels and 2-D points: one space); ``sd_vae``: EDM2's latent encoder, a diffusers ``AutoencoderKL`` in the
    local folder ``path`` (Stable Diffusion's ``sd-vae-ft-mse`` for ImageNet) with EDM2's whitening; ``trained``: a
    small ``AutoencoderKL`` trained here (``autoencoder``), whitened by its latents' measured per-channel mean and
    std."""

    kind: Literal["identity", "sd_vae", "trained"] = "identity"
    path: Path | None = Field(None, description="sd_vae: a local diffusers AutoencoderKL folder (config.json and "
                              "diffusion_pytorch_model.safetensors); nothing is downloaded")
    raw_mean: tuple[float, ...] | None = Field(None, description="the raw latents' assumed per-channel mean (None: "
                                               "EDM2's for sd_vae, measured for trained)")
    raw_std: tuple[PositiveFloat, ...] | None = Field(None, description="the raw latents' per-channel std (None: "
                                                      "EDM2's for sd_vae, measured for trained)")
    final_mean: float = Field(0.0, description="the whitened latents' mean (EDM2: 0)")
    final_std: PositiveFloat = Field(0.5, description="the whitened latents' std (EDM2: 0.5)")
    batch_size: int = Field(8, ge=1, le=4096, description="images per VAE call (EDM2: 8)")
    edm2_encoded: Path | None = Field(None, description="EDM2's encoded data set of these images (dataset_tool.py "
                                      "encode: a folder or zip of .npy moments and dataset.json), imported instead "
                                      "of encoding")
    autoencoder: AutoencoderTrainConfig = AutoencoderTrainConfig()

    @model_validator(mode="after")
    def _kind_fields(self) -> EncoderConfig:
        if self.kind == "sd_vae" and self.path is None:
            raise ValueError("data.encoder.path is required for data.encoder.kind='sd_vae': a local diffusers "
                             "AutoencoderKL folder")
        if self.kind != "sd_vae" and (self.path is not None or self.edm2_encoded is not None):
            raise ValueError(f"data.encoder.path / edm2_encoded are read only with kind='sd_vae' (kind="
                             f"{self.kind!r})")
        if (self.raw_mean is None) != (self.raw_std is None) or (
                self.raw_mean is not None and len(self.raw_mean) != len(self.raw_std)):
            raise ValueError("data.encoder.raw_mean and raw_std must be given together, one number per channel")
        if self.kind == "trained" and self.raw_mean is not None and len(self.raw_mean) != \
                self.autoencoder.latent_channels:
            raise ValueError(f"data.encoder.raw_mean has {len(self.raw_mean)} channels, the autoencoder "
                             f"{self.autoencoder.latent_channels}")
        return self


class DataConfig(StrictModel):
    """Which data distribution the pipeline learns.

    ``gaussian_mixture`` and ``checkerboard`` are 2-D and come with an exact denoiser; ``digits`` is
    scikit-learn's 8x8 digits (embedded); ``npz``, ``image_folder`` and ``cifar10`` read a local ``path``.
    """

    name: Literal[DATA_NAMES] = "digits"
    path: Path | None = Field(None, description="local file or folder for npz / image_folder (a folder, or EDM "
                              "dataset_tool's .zip) / cifar10")
    resolution: int | None = Field(None, ge=4, le=1024, description="resize images to this size (None: native)")
    num_modes: int = Field(8, ge=1, le=1024, description="gaussian_mixture: number of components on a circle")
    mode_radius: float = Field(2.0, gt=0, description="gaussian_mixture: radius of the circle of means")
    mode_std: float = Field(0.1, gt=0, description="gaussian_mixture: std of every component")
    checker_cells: int = Field(4, ge=2, le=64, description="checkerboard: cells per side")
    seed: int = Field(0, ge=0, description="seed of the train / held-out split")
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of images kept for evaluation")
    num_classes: int = Field(0, ge=0, le=100_000, description="class-conditional: the number of classes of the "
                             "data's labels (digits, cifar10: 10; gaussian_mixture: its modes dealt to this many "
                             "classes); every label must lie in [0, num_classes); 0: unconditional, labels unused")
    encoder: EncoderConfig = Field(EncoderConfig(), description="the model's space: the data's own (identity) or a "
                                   "latent space (cmt_core.encoders)")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.name in FILE_DATA and self.path is None:
            raise ValueError(f"data.path is required for data.name={self.name!r}")
        if self.encoder.kind != "identity" and self.name in POINT_DATA:
            raise ValueError(f"data.encoder.kind={self.encoder.kind!r} encodes images; {self.name!r} is 2-D point "
                             "data (use 'identity')")
        if self.name == "checkerboard" and self.num_classes:
            raise ValueError(f"data.num_classes={self.num_classes}: the checkerboard has no classes (use 0)")
        if self.name == "gaussian_mixture" and self.num_classes > self.num_modes:
            raise ValueError(f"data.num_classes={self.num_classes} exceeds data.num_modes={self.num_modes}: each "
                             "class needs a mode of the mixture")
        return self


class NetworkConfig(StrictModel):
    """Raw network wrapped by the EDM preconditioning (``cmt_core.preconditioning``)."""

    kind: Literal["mlp", "unet", "edm2", "dit"] = Field(
        "mlp", description="mlp; unet: EDM's DDPM++ U-Net; edm2: EDM2's magnitude-preserving U-Net; dit: a DiT / "
        "SiT transformer (cmt_core.networks.dit)")
    width: int = Field(256, ge=1, le=8192, description="mlp hidden width / unet base channels / dit hidden width")
    depth: int = Field(4, ge=1, le=64, description="mlp hidden layers / unet residual blocks per resolution / dit "
                       "transformer blocks")
    patch_size: int = Field(2, ge=1, le=32, description="dit: the patch size (DiT-XL/2: 2)")
    heads: int = Field(16, ge=1, le=256, description="dit: attention heads (DiT-XL: 16)")
    channel_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1, description="unet channel multipliers")
    attention_resolutions: tuple[int, ...] = Field((), description="unet resolutions with self-attention")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    emb_dim: int = Field(128, ge=8, le=4096, description="time-embedding width")
    sigma_data: float = Field(0.5, gt=0)
    consistency_boundary: Literal["always", "evaluation"] = Field(
        "always", description="consistency models: the boundary form f(x, sigma_min) = x in training too, or "
        "only at evaluation with EDM's scalings in training (ECT, the CMT reference)")

    @model_validator(mode="after")
    def _edm2_embedding(self) -> NetworkConfig:
        if self.kind == "dit" and (self.width % self.heads or self.width % 4):
            raise ValueError(f"network.width={self.width} must be a multiple of network.heads={self.heads} and of 4 "
                             "for network.kind='dit' (per-head width; 2-D sin-cos position embeddings)")
        if self.kind == "edm2" and self.emb_dim % self.width:
            raise ValueError(f"network.emb_dim={self.emb_dim} must be a multiple of network.width={self.width} for "
                             f"network.kind='edm2' (EDM2's embedding is width x channel_mult_emb wide; its default: "
                             f"width x max(channel_mult) = {self.width * max(self.channel_mult)})")
        return self


class SolverConfig(StrictModel):
    """A deterministic probability-flow ODE solver on a time grid (``cmt_core.solvers``)."""

    name: SolverName = "dpm2m"
    steps: int = Field(16, ge=1, le=4096, description="number of solver steps (the grid has steps + 1 points)")
    grid: Literal["karras", "log_uniform"] = "log_uniform"
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0, description="karras grid exponent")
    to_zero: bool = Field(False, description="the last step goes to sigma = 0 (EDM's Heun: 18 steps = 35 NFE)")
    lower_order_final: bool = Field(
        False, description="multistep DPM-Solver++: lower orders at the last steps, as the reference's rollouts")

    @model_validator(mode="after")
    def _sigma_order(self) -> SolverConfig:
        if self.lower_order_final and "lower_order_final" not in SOLVERS[self.name].options:
            takes = sorted(n for n, s in SOLVERS.items() if "lower_order_final" in s.options)
            raise ValueError(f"lower_order_final=true needs a multistep solver ({', '.join(takes)}), "
                             f"not name={self.name!r}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        return self


class TrainConfig(StrictModel):
    """The shared training loop (``cmt_core.training``)."""

    steps: int = Field(1000, ge=0, description="optimisation steps")
    batch_size: int = Field(128, ge=1, description="global batch size (split over DDP ranks)")
    lr: float = Field(2e-4, gt=0, le=1.0)
    optimizer: Literal["adam", "radam"] = "radam"
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam's moment decays, each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "linear", "cosine", "rsqrt"] = Field(
        "linear", description="after the warm-up: constant, linear or cosine decay to final_lr_fraction * lr, or "
        "rsqrt: lr / sqrt(max(step / lr_decay_steps, 1)) (EDM2's inverse square root decay)")
    lr_decay_steps: int | None = Field(None, ge=1, description="lr_schedule='rsqrt': the step where the decay "
                                       "starts (EDM2's ref_batches)")
    warmup_steps: int = Field(0, ge=0)
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="lr at the end of linear / cosine decay")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm (None: no clipping)")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    eval_every: int | None = Field(None, ge=1, description="evaluate the EMA model every N steps at 1 and 2 steps "
                                   "(keeps the best, see keep); None: keep the last")
    keep: Literal["one_step", "two_step", "both"] = Field(
        "both", description="the evaluated EMA model kept: best 1-step score, best 2-step score, or 'both': the lowest "
        "sum of the two scores relative to step 0 among those no worse than step 0 on either")
    keep_tolerance: float = Field(0.05, ge=0.0, le=1.0, description="keep='both': 'no worse than step 0' allows this "
                                  "relative excess, the evaluation's own noise (FD of 2,000 samples: about 5%)")
    until_below: dict[Annotated[str, Field(pattern=r"^[\w-]+_[12]step$")], FiniteFloat] = Field(
        {}, description="end the run early, at the first evaluation by which every named score has been at or "
        "below its bound (at that evaluation or an earlier one), e.g. {FD-digits_2step: 9.8}: a score the "
        "evaluation returns (score_1step, score_2step, <data metric>_1step, <data metric>_2step); `cmt compare`'s "
        "target-quality mode; needs eval_every; {}: run every step")
    seed: int = Field(0, ge=0)
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="class-conditional data: the fraction of each "
                                 "batch's labels replaced by the unconditional class (an all-zero row), as EDM / "
                                 "EDM2 train a network for classifier-free guidance; 0: none")
    # a power-function EMA's relative std lies in (0, 1 / sqrt(12)) (``cmt_core.phema.MAX_STD``)
    ema_stds: tuple[Annotated[float, Field(gt=0.0, lt=12 ** -0.5)], ...] = Field(
        (), max_length=16, description="EDM2's power-function EMAs of these relative stds (each in (0, 0.2887), "
        "e.g. [0.05, 0.1]) instead of ema_decay's exponential EMA; the first is the one scored and kept (unless "
        "posthoc_std); empty: the exponential EMA")
    ema_snapshot_every: int | None = Field(
        None, ge=1, description="with ema_stds: write every tracked EMA every N steps (and at the last) to "
        "<run>/train/phema/ for post-hoc reconstruction; None: no snapshots")
    posthoc_std: float | None = Field(
        None, gt=0.0, lt=12 ** -0.5, description="with ema_stds and ema_snapshot_every: the EMA scored, kept and "
        "returned is the power-function EMA of this relative std reconstructed from the snapshots; None: the first "
        "of ema_stds")

    @model_validator(mode="after")
    def _ema_options(self) -> TrainConfig:
        if (self.lr_schedule == "rsqrt") != (self.lr_decay_steps is not None):
            raise ValueError(f"lr_decay_steps={self.lr_decay_steps} goes with lr_schedule='rsqrt' and only with it "
                             f"(lr_schedule={self.lr_schedule!r})")
        if self.until_below and self.eval_every is None:
            raise ValueError(f"until_below={self.until_below} is checked at evaluations: it needs eval_every")
        if len(set(self.ema_stds)) != len(self.ema_stds):
            raise ValueError(f"ema_stds must be distinct relative stds, got {list(self.ema_stds)}")
        if self.ema_snapshot_every is not None and not self.ema_stds:
            raise ValueError(f"ema_snapshot_every={self.ema_snapshot_every} snapshots power-function EMAs: it needs "
                             "ema_stds (e.g. [0.05, 0.1])")
        if self.posthoc_std is not None and (not self.ema_stds or self.ema_snapshot_every is None):
            raise ValueError(f"posthoc_std={self.posthoc_std} is reconstructed from snapshots of power-function "
                             "EMAs: it needs ema_stds and ema_snapshot_every")
        if self.posthoc_std is not None and self.eval_every is not None \
                and self.eval_every % self.ema_snapshot_every != 0:
            raise ValueError(f"eval_every={self.eval_every} must be a multiple of ema_snapshot_every="
                             f"{self.ema_snapshot_every} with posthoc_std: the post-hoc EMA is evaluated at snapshots")
        return self


class TeacherConfig(StrictModel):
    """Where the teacher denoiser D(x, sigma) comes from (``cmt_core.teachers``).

    ``exact``: closed-form denoiser of a 2-D synthetic distribution. ``pretrain``: EDM training here.
    ``checkpoint``: a checkpoint of ours; ``edm_pickle``: an EDM network pickle, read without running its code
    and stored once as our checkpoint; ``sit``: a SiT flow-matching checkpoint (a velocity DiT, ``path``), read as
    tensors only and stored once as our checkpoint; ``torchscript``: a scripted ``D(x, sigma)``;
    ``callable``: ``module:function`` returning a denoiser module, imported and run only with ``allow_code``.
    """

    source: Literal[SOURCES] = "pretrain"
    path: Path | None = None
    target: str | None = Field(None, pattern=r"^[\w.]+:[\w.]+$", description="module:callable")
    allow_code: bool = Field(False, description="source='callable' imports and runs teacher.target with this "
                             "process's rights: only with allow_code=true, for code you trust")
    p_mean: float = Field(-1.2, description="EDM: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = Field(1.2, gt=0)
    train: TrainConfig = TrainConfig(steps=4000, lr=1e-3, optimizer="adam", ema_decay=0.999)
    sampler: SolverConfig = SolverConfig(name="heun", steps=18, grid="karras", to_zero=True)

    @model_validator(mode="after")
    def _source_args(self) -> TeacherConfig:
        if self.source in ("checkpoint", "edm_pickle", "sit", "torchscript") and self.path is None:
            raise ValueError(f"teacher.path is required for teacher.source={self.source!r}")
        if self.source == "callable" and self.target is None:
            raise ValueError("teacher.target ('module:callable') is required for teacher.source='callable'")
        if self.source == "callable" and not self.allow_code:
            raise ValueError(f"teacher.source='callable' imports and runs teacher.target={self.target!r} with this "
                             "process's rights; set teacher.allow_code=true to allow it, for code you trust")
        return self


class GuideConfig(StrictModel):
    """The guide network ``g`` of autoguidance: a denoiser of the same data and classes, weaker than the teacher
    (EDM2's recipe: a smaller network trained for a shorter time), pre-trained here with the teacher's objective
    or loaded like the teacher (our model file, or an EDM / EDM2 network pickle read without running its code)."""

    source: Literal["pretrain", "checkpoint", "edm_pickle"] = "pretrain"
    path: Path | None = Field(None, description="source='checkpoint' / 'edm_pickle': the guide's file")
    width: int | None = Field(None, ge=1, le=8192, description="pretrain: the guide's network.width (None: the "
                              "teacher's)")
    depth: int | None = Field(None, ge=1, le=64, description="pretrain: the guide's network.depth (None: the "
                              "teacher's)")
    train: TrainConfig = TrainConfig(steps=1000, lr=1e-3, optimizer="adam", ema_decay=0.999)

    @model_validator(mode="after")
    def _path_needed(self) -> GuideConfig:
        if self.source != "pretrain" and self.path is None:
            raise ValueError(f"guidance.guide.path is required for guidance.guide.source={self.source!r}")
        return self


class GuidanceConfig(StrictModel):
    """Guidance of a class-conditional teacher (``cmt_core.guidance``): D_w(x) = g(x).lerp(D(x), w), with ``g`` the
    teacher's unconditional branch (``cfg``: classifier-free guidance, the teacher trained with label dropout) or
    a separate guide network (``autoguidance``, ``guide``). One definition wherever the teacher is used: its
    rollouts (``rollout_scale``), ECD's teacher step and the teacher's own sampling in the evaluation (``scale``)."""

    kind: Literal["none", "cfg", "autoguidance"] = "none"
    scale: float = Field(1.0, ge=0.0, le=100.0, description="w of ECD's teacher step and of the teacher's samples "
                         "in the evaluation; 1: unguided (D itself)")
    rollout_scale: float = Field(1.0, ge=0.0, le=100.0, description="w of the rollouts' teacher (the reference's "
                                 "ImageNet rollouts: 1, unguided)")
    sweep: tuple[Annotated[float, Field(ge=0.0, le=100.0)], ...] = Field(
        (), max_length=32, description="evaluation: the teacher also scored at each of these w (FD against class "
        "accuracy)")
    guide: GuideConfig = GuideConfig()


class StoreConfig(StrictModel):
    """Layout of a trajectory store on disk (``cmt_core.trajectories.store``)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    codec: Literal["zstd", "blosc", "none"] = "zstd"
    level: int = Field(3, ge=0, le=22, description="compression level")
    chunk_trajectories: int = Field(256, ge=1, description="trajectories per chunk (a chunk holds all their states)")
    shard_chunks: int = Field(4, ge=1, description="chunks per shard file; a rollout task owns whole shards")
    keep_indices: tuple[int, ...] | None = Field(None, description="store only these time indices (None: all)")


class ClusterConfig(StrictModel):
    """The dask cluster that runs rollouts: a LocalCluster for the run, or an existing scheduler."""

    address: str | None = Field(None, description="scheduler address, e.g. tcp://10.0.0.5:8786 (None: LocalCluster)")
    workers: int = Field(2, ge=1, le=4096, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, le=256)
    gpu_resource: bool = Field(False, description="ask each rollout task for the dask resource GPU=1")


class EncodeConfig(StrictModel):
    """The encoding stage (``cmt_core.data.encoded``): a latent data set's store and the dask cluster it is
    sharded over."""

    chunk_images: int = Field(64, ge=1, le=1 << 20, description="images per zarr chunk")
    shard_chunks: int = Field(16, ge=1, le=1 << 16, description="chunks per shard file (the unit of a dask task)")
    cluster: ClusterConfig = ClusterConfig()


class RolloutConfig(StrictModel):
    """Teacher ODE trajectories from x_T = sigma_max * z (``cmt_core.trajectories``)."""

    solver: SolverConfig = SolverConfig()
    num_trajectories: int = Field(4096, ge=1)
    batch_size: int = Field(512, ge=1, description="trajectories solved together")
    seed: int = Field(0, ge=0, description="trajectory k uses noise seeded by (seed, k)")
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _kept_states(self) -> RolloutConfig:
        keep, points = self.store.keep_indices, self.solver.steps + 1
        if keep is not None and (list(keep) != sorted(set(keep)) or len(keep) < 2 or keep[0] < 0 or keep[-1] >= points):
            raise ValueError(f"store.keep_indices must be at least 2 increasing indices into the solver's {points} "
                             f"grid points (0 .. {points - 1}), got {list(keep)}")
        return self


class MidTrainConfig(StrictModel):
    """Consistency mid-training on teacher trajectories (``cmt_core.methods.cmt``).

    ``form``, a mid-training method of the registry: ``cm``: f(x_ti, t_i) -> x_t0 (clean end); ``flow_map``:
    f(x_ti, t_i, t_j) -> x_tj; ``mf``: u(x_ti, t_j, t_i) -> (x_ti - x_tj) / (t_i - t_j).
    """

    form: registered("midtrain") = "cm"
    distance: DistanceName = Field(
        "squared_l2", description="per-sample d over all dimensions (cmt_core.objectives.distances): squared_l2 "
        "||.||^2, l2_norm ||.||, pseudo_huber sqrt(||.||^2 + c^2) - c, lpips (the reference's default; cm / "
        "flow_map forms, RGB or grey images), elatent_lpips (the reference's ImageNet-512 distance on latents, not "
        "decoded; cm / flow_map forms)")
    huber_c: float = Field(0.0, ge=0.0, description="pseudo-Huber c per sample, as ECT's -c (a per-dimension "
                           "constant c' is c' * sqrt(dim)); required > 0 with distance='pseudo_huber'")
    lpips_backbone: Path | None = Field(None, description="the weights file of the distance's network, local, "
                                        "read without running code: distance='lpips': torchvision's VGG16 state "
                                        "dict (e.g. vgg16-397923af.pth); distance='elatent_lpips': the latent VGG16 "
                                        "state dict of cmt_core.objectives.latent_lpips.train_latent_vgg")
    init: Literal["teacher", "random"] = "teacher"
    train: TrainConfig = TrainConfig(steps=2000, lr=2e-4)

    @model_validator(mode="after")
    def _distance_args(self) -> MidTrainConfig:
        if self.distance == "pseudo_huber" and self.huber_c == 0:
            raise ValueError("midtrain.huber_c must be > 0 for midtrain.distance='pseudo_huber' "
                             "(c = 0 is distance='l2_norm')")
        if self.distance == "lpips" and self.lpips_backbone is None:
            raise ValueError("midtrain.lpips_backbone is required for midtrain.distance='lpips': a local "
                             "file with torchvision's VGG16 weights")
        if self.distance == "elatent_lpips" and self.lpips_backbone is None:
            raise ValueError("midtrain.lpips_backbone is required for midtrain.distance='elatent_lpips': a local "
                             "file with the latent VGG16's weights (cmt_core.objectives.latent_lpips)")
        return self


class ECTConfig(StrictModel):
    """Easy consistency tuning: r = t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)), clamped at 0,
    with stage = start_stage + step // stage_steps."""

    t_sampling: Literal["lognormal", "log_uniform"] = Field(
        "lognormal", description="ln t ~ N(p_mean, p_std^2), or uniform in ln t over [sigma_min, sigma_max] "
        "(the mid-training grid's coverage: keeps the 1-step time sigma_max trained)")
    p_mean: float = -1.1
    p_std: float = Field(2.0, gt=0)
    k: float = Field(8.0, ge=0)
    b: float = Field(1.0, ge=0)
    q: float = Field(2.0, gt=1.0)
    stage_steps: int = Field(1000, ge=1, description="steps per dt-halving stage")
    start_stage: int = Field(0, ge=0, le=30, description="first stage; > 0 starts at a small dt (for CMT weights)")
    huber_c: float = Field(0.0, ge=0.0, description="per sample, ECT's -c: loss = (sqrt(||d||^2 + c^2) - c) / "
                           "(t - r) over all dimensions (a per-dimension c' is c' * sqrt(dim)); 0: ||d|| / (t - r)")
    anchor_sigma: float = Field(0.0, ge=0.0, description="CMT boundary (a deviation from ECT, for init='cmt'): "
                                "for t <= anchor_sigma the target is the mid-trained model's own f(x_t, t) (a frozen "
                                "copy), so post-training keeps the map mid-training learned there and tunes above "
                                "it; 0: ECT / ECD as published (the boundary f(x, sigma_min) = x alone)")
    weighting: Literal["inverse_dt", "snr_plus_k"] = Field(
        "inverse_dt", description="the loss weight: 1 / (t - r) (ECT's, the reference's CIFAR-10 / FFHQ / AFHQ "
        "loss) or snr_plus_k (t^2 + sigma_data^2) / (t sigma_data)^2 = 1 / t^2 + 1 / sigma_data^2 (the "
        "reference's ImageNet-512 ECT / ECD loss, its wt='snrpk')")


class MeanFlowGuidanceConfig(StrictModel):
    """Classifier-free guidance folded into Mean Flow's training target (the Mean Flow paper's guided velocity;
    NVlabs/FastGen ``MeanFlowModel._get_velocity``): for a sample with a class and tau_t in [t_start, t_end] the
    velocity v of the target and of the JVP's tangent is omega v + kappa u(z, t, t | c) + (1 - omega - kappa)
    u(z, t, t | no class), the model's own instantaneous velocities without gradients; the 1-step sampler is
    unchanged (the guidance is inside the model). omega = 1, kappa = 0: unguided."""

    omega: float = Field(1.0, ge=0.0, le=100.0, description="weight of the sample's own velocity v (MeanFlow's "
                         "guidance scale; 1 with kappa 0: no guidance)")
    kappa: float = Field(0.0, ge=0.0, le=1.0, description="weight of the model's conditional velocity (FastGen's "
                         "guidance_mixture_ratio)")
    t_start: float = Field(0.0, ge=0.0, le=1.0, description="the interval's start in tau = sigma / (1 + sigma)")
    t_end: float = Field(1.0, ge=0.0, le=1.0, description="the interval's end in tau (one public configuration: "
                         "0.75)")

    @property
    def active(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    @model_validator(mode="after")
    def _interval(self) -> MeanFlowGuidanceConfig:
        if self.t_start > self.t_end:
            raise ValueError(f"posttrain.meanflow.guidance.t_start={self.t_start} must be <= t_end={self.t_end}")
        return self


class MeanFlowConfig(StrictModel):
    """Mean Flow: u_tgt = v - (t - r) du/dt, adaptive weight (loss + norm_eps)^-p (``cmt_core.objectives.meanflow``).

    ``time=tau`` is py-meanflow's loss in its time tau = sigma / (1 + sigma), converted at the edges; ``sigma``
    writes it in sigma time (per-dimension mean), where the errors at large sigma fall below ``norm_eps`` and
    those samples are barely trained."""

    p_mean: float = -0.4
    p_std: float = Field(1.0, gt=0)
    equal_fraction: float = Field(0.75, ge=0.0, le=1.0, description="fraction of pairs with r = t (paper: 25% r != t)")
    adaptive_p: float = Field(1.0, ge=0.0, le=2.0)
    norm_eps: float = Field(1e-3, gt=0.0, description="adaptive weight (loss + norm_eps)^-p")
    time: Literal["sigma", "tau"] = Field(
        "tau", description="the time the loss is written in: sigma (EDM, per-dimension mean) or tau = sigma / "
        "(1 + sigma) in [0, 1), py-meanflow's convention (sum over dimensions), converted at the edges")
    guidance: MeanFlowGuidanceConfig = MeanFlowGuidanceConfig()


class PostTrainConfig(StrictModel):
    """Post-training of a few-step model: ``method``, a post-training method of the registry (``cmt_core.methods``:
    ``ect``, ``ecd``, ``meanflow``, ...), reading its section (``ect``, ``meanflow``)."""

    method: registered("posttrain") = "ect"
    init: Literal["cmt", "teacher", "random"] = "cmt"
    ect: ECTConfig = ECTConfig()
    meanflow: MeanFlowConfig = MeanFlowConfig()
    ecd_solver: SolverName = Field("heun", description="ECD: teacher step x_t -> x_r")
    train: TrainConfig = TrainConfig(steps=2000, lr=1e-4)


class EvalConfig(StrictModel):
    """Evaluation of the teacher and the few-step models (``cmt_core.evaluation``)."""

    num_samples: int = Field(2000, ge=2)
    batch_size: int = Field(500, ge=1)
    seed: int = Field(12345, ge=0)
    mid_sigma: float = Field(0.8, gt=0, description="2-step sampling: the intermediate sigma, when "
                             "mid_sigma_search is empty")
    mid_sigma_search: tuple[PositiveFloat, ...] = Field(
        (0.2, 0.3, 0.45, 0.6, 0.7, 0.85, 1.0, 1.5), description="2-step sampling: candidate intermediate sigmas; "
        "each model uses the one with the best 2-step score on noises of its own (not those it is reported on); "
        "empty: mid_sigma")
    num_seed_sets: int = Field(1, ge=1, le=16)
    inception_path: Path | None = Field(None, description="local inception-2015-12-05.pt (FID); None: offline")
    fid_mode: Literal["clean", "legacy_pytorch", "legacy_tensorflow"] = "clean"
    reference_stats: Path | None = Field(None, description="what the evaluation's overall distance is measured "
                                         "against instead of the held-out split: a mu/sigma .npz (EDM's fid-refs) "
                                         "or images (a folder of PNGs, an .npz whose arr_0 is uint8 NHWC), "
                                         "cmt_core.evaluation.reference; None: the held-out split")


class LaunchConfig(StrictModel):
    """How training stages run on several processes and machines: ``torchrun`` agents, one per node, meeting at a
    c10d rendezvous (``cmt_core.runtime.torchrun_command``). Never part of an artifact id: every random number of
    a step is drawn for the global batch, so any layout computes the same update."""

    nodes: int = Field(1, ge=1, le=4096, description="machines; > 1 needs rdzv_endpoint")
    procs_per_node: int = Field(1, ge=1, le=1024, description="training processes per machine (one per GPU)")
    rdzv_endpoint: str | None = Field(None, pattern=r"^[\w.\-]+:\d{1,5}$", description="host:port of the c10d "
                                      "rendezvous, reachable from every node (e.g. the first node's address)")
    rdzv_id: str = Field("cmt", pattern=r"^[\w.\-]+$", description="names one job's rendezvous: agents with the "
                         "same id and endpoint form a job")
    max_restarts: int = Field(0, ge=0, le=100, description="torchrun restarts of a failed worker group")

    @model_validator(mode="after")
    def _endpoint(self) -> LaunchConfig:
        if self.nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"launch.rdzv_endpoint (host:port reachable from every node) is required for "
                             f"launch.nodes={self.nodes}")
        return self
