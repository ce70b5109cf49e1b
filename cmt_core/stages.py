"""The stage graph, declared once: teacher -> rollouts -> mid-training -> post-training -> evaluation.

Each ``Stage`` (``cmt_core.engine``) declares the config fields it ``reads`` (its identity: they decide its
output), the fields it only ``uses``, the stages it ``needs`` and its body; ``plan(cfg)`` resolves the graph for a
config (ids, inputs, folders). The bodies are written against the method registry (``cmt_core.methods``): a
training stage builds the model kind its method trains, the loss its method builds from its section, the batches
its method trains on, and scores it with its method's sampler; no body names a method.

* ``teacher``: the teacher's weights (``model.pt``): EDM pre-training (the ``edm`` method), a checkpoint, or an
  EDM pickle converted once; TorchScript and callable teachers have none of ours.
* ``rollouts``: the teacher's ODE trajectories in a zarr store, solved shard by shard (dask when installed).
* ``midtrain``: consistency mid-training (``midtrain.form``) on the rollouts.
* ``posttrain``: the post-training method (``posttrain.method``) from CMT, teacher or random weights.
* ``evaluation``: the results table and report.

Training stages keep the EMA model ``train.keep`` selects and record its scores and its 2-step sigma; each writes
its TensorBoard event log into ``<its folder>/tensorboard`` (``cmt_core.events``: losses, evaluations and, for
images, the 1-step and 2-step sample grids of each evaluation). Each stage
says what makes its outputs unsound (``Stage.sound``: inf or NaN weights, a store that does not verify, scores that
are not finite): the engine checks it before marking the stage complete and before reusing it.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
from pathlib import Path

import torch

from cmt_core import object_storage as remote
from cmt_core.artifacts import (
    ENCODER_FILE,
    EVENTS_DIR,
    FEATURES_DIR,
    LATENTS_DIR,
    MODEL_FILE,
    STORE_DIR,
    VAE_DIR,
    read_manifest,
)
from cmt_core.autoencoder import train_autoencoder
from cmt_core.checkpoint import CheckpointError, load_file, read_training_log
from cmt_core.config import NetworkConfig, TrainConfig
from cmt_core.data import POINT_DATA, Data, load_data, load_images
from cmt_core.data.encoded import (
    EDM2Latents,
    LatentStoreError,
    PixelMoments,
    StoredMoments,
    encode_dataset,
    open_latents,
)
from cmt_core.data.images import load_image_dataset, pixel_shape
from cmt_core.encoders import encoder_settings, load_encoder, model_shape_of, snapshot_encoder_problem
from cmt_core.engine import Plan, Stage, StageContext, make_plan
from cmt_core.errors import InputFileError, brief, describe
from cmt_core.evaluation.evaluator import Evaluator
from cmt_core.evaluation.report import MAX_GRID_IMAGES, grid_cells
from cmt_core.evaluation.scoring import Scorer
from cmt_core.evaluation.table import ScoredModel, results_table
from cmt_core.events import EventLog
from cmt_core.methods import LossInputs, Method, get_method
from cmt_core.models import build_model, init_from, label_dim_of, load_model, save_model
from cmt_core.networks.build import DIT_ONLY
from cmt_core.sit_checkpoint import sit_teacher
from cmt_core.teachers import LOADED, PROGRAMS, edm_teacher, load_teacher, teacher_denoiser
from cmt_core.training import train
from cmt_core.trajectories.dask_rollouts import run_rollouts
from cmt_core.trajectories.pairs import StorePairs
from cmt_core.trajectories.verify import mark_verified, reset_bad_shards, store_problem

TEACHER_METHOD = "edm"  # the objective of a teacher pre-trained here


def method_of(cfg, stage: str) -> Method:
    """The method the training stage ``stage`` trains under ``cfg`` (a teacher pre-trained here: EDM's)."""
    chosen = {"teacher": lambda: TEACHER_METHOD, "midtrain": lambda: cfg.midtrain.form,
              "posttrain": lambda: cfg.posttrain.method}
    return get_method(chosen[stage]())

# ------------------------------------------------------------------------------------------- shared pieces


def stage_scorer(cfg, local_root: Path, device, data: Data, reference_stats: Path | None = None,
                 kind: type[Scorer] = Scorer) -> Scorer:
    """The scorer (a ``kind``) of a stage of ``cfg`` whose artifact root is ``local_root`` (feature statistics are
    cached in its ``features`` folder); ``reference_stats``: what the evaluation stage measures the overall distance
    against (``eval.reference_stats``), None for training stages, whose checkpoints are chosen against the held-out
    split."""
    evaluator = Evaluator(data, cfg.eval, local_root / FEATURES_DIR, cfg.data, reference_stats=reference_stats)
    return kind(data, cfg.eval, evaluator, device, cfg.rollout.solver.sigma_max, cfg.rollout.solver.sigma_min,
                num_classes=data.num_classes)


class _GridScorer(Scorer):
    """A ``Scorer`` that also keeps, for image data, the grid cells of its last few-step evaluation at each number of
    steps (``grids["1step"]``, ``grids["2step"]``: ``(n, C, H', W')`` in [0, 1]): its first ``MAX_GRID_IMAGES``
    samples decoded to the sample space, as the report's grids draw them (``report.grid_cells``), framed in white; a
    training stage's event log tiles them. Keeping them changes no score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grids: dict[str, torch.Tensor] = {}

    def few_step(self, sampler: str, model, steps: int, mid_sigma: float | None = None) -> tuple[dict, torch.Tensor]:
        metrics, samples = super().few_step(sampler, model, steps, mid_sigma)
        images = self.data.encoder.decode(samples[:MAX_GRID_IMAGES])
        if images.ndim == 4:
            cells, scale = grid_cells(images)
            self.grids[f"{steps}step"] = torch.nn.functional.pad(cells, [max(1, scale // 2)] * 4, value=1.0)
        return metrics, samples


def _events(ctx: StageContext, images: dict[str, torch.Tensor] | None = None) -> EventLog:
    """The stage's TensorBoard event log, ``<its folder>/tensorboard``, written by the main process."""
    return EventLog(ctx.path / EVENTS_DIR, ctx.runtime.is_main, images)


def _teacher_weights(ctx: StageContext) -> torch.nn.Module:
    path = ctx.input("teacher") / MODEL_FILE
    if not path.exists():
        raise ValueError(f"teacher.source={ctx.cfg.teacher.source!r} has no network weights to initialise from; "
                         "use init='random' or a checkpoint teacher")
    return load_model(path)


def network_values(network: dict, num_classes: int) -> dict:
    """A model file's ``network`` mapping: the ``NetworkConfig`` fields of ``network`` (a dict of network values,
    a config's or a loaded network's) dumped as JSON values, plus ``label_dim`` for a class-conditional model (the
    key is absent from unconditional models' files; the DiT's ``patch_size`` and ``heads`` only in a DiT's)."""
    values = NetworkConfig(**{k: v for k, v in network.items() if k in NetworkConfig.model_fields})
    left_out = () if values.kind == "dit" else DIT_ONLY
    return {**values.model_dump(mode="json", exclude=set(left_out)),
            **({"label_dim": num_classes} if num_classes else {})}


def few_step_network(c) -> dict:
    """The network values of the few-step models' files."""
    return network_values(c.network.model_dump(mode="json"), c.data.num_classes)


def denoiser_network(c, width: int | None = None, depth: int | None = None) -> dict:
    """The network values of a denoiser's model file (the teacher's; a guide's with its own ``width`` and
    ``depth``), from the network fields a denoiser reads."""
    fields = {f: getattr(c.network, f) for f in (path.split(".")[1] for path in DENOISER_NETWORK)}
    fields.update({k: v for k, v in (("width", width), ("depth", depth)) if v is not None})
    return network_values(fields, c.data.num_classes)


def _guide_weights(c, inputs: dict[str, Path], scale: float) -> Path | None:
    """The guide's model file when guidance at ``scale`` calls a guide network (autoguidance, ``scale`` != 1)."""
    return inputs["guide"] / MODEL_FILE if uses_guide(c, scale) else None


def uses_guide(c, scale: float) -> bool:
    """Whether a teacher guided at ``scale`` under ``c`` calls the guide network."""
    return c.guidance.kind == "autoguidance" and scale != 1.0


def _teacher_of(c, data: Data, inputs: dict[str, Path], scale: float = 1.0) -> torch.nn.Module:
    """The denoiser that solves the ODE, from the input artifact folders ``inputs`` (the teacher's, the guide's),
    guided at ``scale`` by ``guidance.kind`` (``teacher_denoiser``)."""
    t = c.teacher
    return teacher_denoiser(t.source, t.path, t.target, data.distribution, inputs["teacher"] / MODEL_FILE,
                            c.guidance.kind, scale, _guide_weights(c, inputs, scale))


def teacher_score(c, resolved: Plan, device) -> tuple[str, float]:
    """(the data metric's name, the teacher's score) on the training stages' evaluation noises, which the
    few-step scores ``train.until_below`` bounds are read on: its ODE solved with ``teacher.sampler`` from
    ``resolved``'s complete teacher (and guide)."""
    inputs = {s: resolved.path(s) for s in ("teacher", *_guide_of(c, c.guidance.scale), *_latent(c, "encoder"))}
    data = stage_data(c, inputs)
    scorer = stage_scorer(c, c.local_root, device, data)
    teacher = _teacher_of(c, data, inputs, c.guidance.scale).to(device).eval()
    metrics, _ = scorer.teacher(teacher, c.teacher.sampler.model_copy(update={"sigma_max": c.rollout.solver.sigma_max}))
    return scorer.primary_2step, metrics[scorer.primary_2step]


def stage_data(c, inputs: dict[str, Path]) -> Data:
    """The data of a stage of ``c`` whose input artifact folders are ``inputs``: for latent data, with the encoder
    (``encoder``) and, when the stage trains on data, the encoded data set (``encode``)."""
    if c.data.encoder.kind == "identity":
        return load_data(c.data)
    latents = inputs["encode"] / LATENTS_DIR if "encode" in inputs else None
    return load_data(c.data, inputs["encoder"], latents)


def model_space(c) -> tuple[tuple[int, ...], int]:
    """(the model's sample shape, the number of classes) of ``c``; for latent data from the config alone, without
    reading the data set (data-free rollouts, as the reference's ImageNet-512 script runs them)."""
    if c.data.encoder.kind == "identity":
        data = load_data(c.data)
        return data.model_shape, data.num_classes
    return model_shape_of(c.data.encoder, pixel_shape(c.data)), c.data.num_classes


def _batches(method: Method, ctx: StageContext, data: Data, seed: int):
    """The batch source ``method`` trains on: data samples, or pairs of the rollouts' trajectories."""
    if method.batches == "data":
        return data.source(seed)
    return StorePairs(ctx.store("rollouts"), to_end=method.batches == "trajectory_ends", seed=seed)


def _loss_inputs(ctx: StageContext, data: Data, **extra) -> LossInputs:
    c = ctx.cfg
    return LossInputs(c.rollout.solver.sigma_min, c.rollout.solver.sigma_max, c.network.sigma_data,
                      encoder=data.encoder, **extra)


# ------------------------------------------------------------------------------------------- stage bodies


def _encoder(ctx: StageContext) -> dict:
    """The latent encoder (``encoder.json``, ``cmt_core.encoders``): SD's VAE in its local folder, loaded once to
    check it, with EDM2's whitening; or a small autoencoder trained here on the training images (``vae/``, in
    diffusers' format), whitened by its latents' measured per-channel mean and std."""
    c = ctx.cfg
    e = c.data.encoder
    measured = {}
    if e.kind == "trained":
        if ctx.runtime.is_main:
            progress = None if ctx.progress is None else ctx.progress
            measured = train_autoencoder(e.autoencoder, load_images(c.data).train, ctx.path / VAE_DIR, progress)
        settings = encoder_settings(e, VAE_DIR, measured)
    else:
        settings = encoder_settings(e)
    if ctx.runtime.is_main:
        (ctx.path / ENCODER_FILE).write_text(json.dumps(settings, indent=1))
        load_encoder(ctx.path)  # loads as later stages will
    return {**settings, **measured}


def _encode(ctx: StageContext) -> dict:
    """The encoded data set (``latents.zarr``, ``cmt_core.data.encoded``): every image of the data set (both
    splits, in the data set's order) encoded to the encoder's posterior moments, shard by shard (dask when
    installed); or EDM2's encoded data set (``data.encoder.edm2_encoded``) imported."""
    c = ctx.cfg
    d, e = c.data, c.data.encoder
    if not ctx.runtime.is_main:
        return {}
    if e.edm2_encoded is not None:
        moments_of = StoredMoments(functools.partial(EDM2Latents, e.edm2_encoded, d.num_classes))
        try:
            num, source = len(EDM2Latents(e.edm2_encoded, d.num_classes)), {"edm2_encoded": str(e.edm2_encoded)}
        except LatentStoreError as err:
            raise InputFileError(f"data.encoder.edm2_encoded={str(e.edm2_encoded)!r}: {err}") from err
    else:
        images = functools.partial(load_image_dataset, d.name, d.path and str(d.path), d.resolution, d.num_classes)
        moments_of = PixelMoments(images, functools.partial(load_encoder, ctx.input("encoder")), e.batch_size)
        num, source = len(images()), {"data": d.name, "path": d.path and str(d.path), "resolution": d.resolution}
    shape = model_shape_of(e, pixel_shape(d))
    progress = None if ctx.progress is None else (lambda done, total: ctx.progress(done, total, {}))
    attrs = {"encoder_id": ctx.input("encoder").name, "source": source}
    path = encode_dataset(moments_of, ctx.path / LATENTS_DIR, num, shape, d.num_classes > 0, c.encode, attrs, progress)
    store = open_latents(path)
    return {"num_images": len(store), "model_shape": list(store.model_shape), "latents": LATENTS_DIR}


def _teacher(ctx: StageContext) -> dict:
    """The teacher's network weights (``model.pt``): EDM pre-training, a loaded checkpoint, or an EDM / EDM2
    network pickle converted once (later stages load ``model.pt``, never the pickle).

    With the exact 2-D teacher, rollouts use the closed-form denoiser and the weights pre-trained here are
    what 'teacher initialisation' starts from. TorchScript / callable teachers have no weights of ours."""
    c = ctx.cfg
    if c.teacher.source in PROGRAMS:
        return {"weights": False}
    return _denoiser(ctx, "teacher", c.teacher.source, c.teacher.path, denoiser_network(c), c.teacher.train)


def _guide(ctx: StageContext) -> dict:
    """The guide network of autoguidance (``model.pt``): a smaller, shorter-trained denoiser pre-trained here with
    the teacher's objective (``guidance.guide``: its width, depth and training), or loaded as the teacher is."""
    g, c = ctx.cfg.guidance.guide, ctx.cfg
    return _denoiser(ctx, "guidance.guide", g.source, g.path, denoiser_network(c, g.width, g.depth), g.train)


def _denoiser(ctx: StageContext, section: str, source: str, path, network: dict, train_cfg) -> dict:
    """A denoiser's model file: loaded from ``path`` (``source`` 'checkpoint', 'edm_pickle' or 'sit') or pre-trained
    here with EDM's objective on ``network`` and ``train_cfg``; ``section`` names the config section in errors."""
    c, runtime = ctx.cfg, ctx.runtime
    if source == "checkpoint":
        shape, num_classes = model_space(c)
        model = load_teacher("checkpoint", path)
        _check_classes(section, path, label_dim_of(model), num_classes)
        if runtime.is_main:
            save_model(ctx.path / MODEL_FILE, model, "denoiser", network, shape)
        return {"weights": True}
    if source == "sit":
        shape, num_classes = model_space(c)
        try:
            sit = sit_teacher(path, shape, num_classes)
        except (pickle.UnpicklingError, ValueError, OSError, EOFError, RuntimeError) as err:
            raise InputFileError(f"{section}.path={str(path)!r} is not a usable SiT checkpoint: {describe(err)}") \
                from err
        if runtime.is_main:
            save_model(ctx.path / MODEL_FILE, sit.model, "denoiser", network_values(sit.network, num_classes),
                       sit.sample_shape)
        return {"weights": True, "parametrisation": "linear_velocity"}
    if source == "edm_pickle":
        shape, num_classes = model_space(c)
        try:
            edm = edm_teacher(path, shape)
        except (pickle.UnpicklingError, ValueError, OSError, EOFError) as err:
            raise InputFileError(f"{section}.path={str(path)!r} is not a usable EDM / EDM2 network pickle: "
                                 f"{describe(err)}") from err
        _check_classes(section, path, edm.network.get("label_dim", 0), num_classes)
        problem = snapshot_encoder_problem(getattr(edm, "encoder", None), c.data.encoder)
        if problem:
            raise InputFileError(f"{section}.path={str(path)!r}: the network {problem}")
        if runtime.is_main:
            save_model(ctx.path / MODEL_FILE, edm.model, "denoiser", network_values(edm.network, num_classes),
                       edm.sample_shape)
        return {"weights": True, "edm_class": edm.precond_class}
    data = stage_data(c, ctx.inputs)
    method = method_of(c, "teacher")
    torch.manual_seed(train_cfg.seed)  # the initial weights, like every other random number, from a seed
    model = build_model(method.kind, network, data.model_shape)
    loss = method.build_loss(c, LossInputs(None, None, c.network.sigma_data, encoder=data.encoder))
    result = train(model, loss, data.source(train_cfg.seed), train_cfg, ctx.path / "train", runtime,
                   desc=section.split(".")[-1], progress=ctx.progress, events=_events(ctx))
    if runtime.is_main:
        save_model(ctx.path / MODEL_FILE, result.model, method.kind, network, data.model_shape)
    return {"weights": True, "final_loss": result.history[-1]["loss"] if result.history else None}


def _check_classes(section: str, path, label_dim: int, num_classes: int) -> None:
    """A loaded denoiser must take the data's classes: as many, or none for unconditional data."""
    if label_dim != num_classes:
        what = f"is conditioned on {label_dim} classes" if label_dim else "is unconditional"
        raise InputFileError(f"{section}.path={str(path)!r}: the network {what}, but data.num_classes="
                             f"{num_classes}")


def rollout_teacher(c, inputs: dict[str, Path]) -> functools.partial:
    """The picklable factory of the denoiser that solves the rollouts of ``c`` (a config or a ``ConfigView``), from
    the input artifact folders ``inputs`` (the teacher's; the guide's when the rollouts are autoguided), guided at
    ``guidance.rollout_scale``: each rollout worker builds the teacher where it runs."""
    t, scale = c.teacher, c.guidance.rollout_scale
    guide = _guide_weights(c, inputs, scale)
    distribution = load_data(c.data).distribution if c.data.name in POINT_DATA else None
    return functools.partial(teacher_denoiser, t.source, t.path and str(t.path), t.target, distribution,
                             inputs["teacher"] / MODEL_FILE, c.guidance.kind, scale, guide)


def solve_rollouts(c, store, inputs: dict[str, Path], progress=None) -> None:
    """Fill (or finish) the store at ``store`` with the trajectories ``c`` describes, solved by the teacher of the
    input artifact folders ``inputs`` (``rollout_teacher``); a class-conditional teacher solves each trajectory for
    a uniformly drawn class."""
    (shape, num_classes), r = model_space(c), c.rollout
    run_rollouts(rollout_teacher(c, inputs), store, r.num_trajectories, shape, r, teacher_id=inputs["teacher"].name,
                 progress=progress, num_classes=num_classes)


def _rollouts(ctx: StageContext) -> dict:
    """Teacher ODE trajectories in a zarr store (``store.zarr``, at the artifact's location: in place at a URL),
    solved shard by shard (dask when installed). A store that was complete but fails verification (the stage is
    recomputed) has its bad shards recomputed."""
    c = ctx.cfg
    if ctx.runtime.is_main:
        progress = None if ctx.progress is None else (lambda done, total: ctx.progress(done, total, {}))
        reset_bad_shards(ctx.store())
        solve_rollouts(c, ctx.store(), ctx.inputs, progress)
        report = mark_verified(ctx.store())  # every chunk read back before the store is published
        if not report.ok:
            raise ValueError(f"the store does not verify after its rollouts: {report.summary().splitlines()[-1]}")
    return {"num_trajectories": c.rollout.num_trajectories, "time_points": c.rollout.solver.steps + 1,
            "store": STORE_DIR}


def _midtrain(ctx: StageContext) -> dict:
    """Consistency mid-training (the ``midtrain.form`` method) on the rollouts; keeps the EMA model
    ``train.keep`` selects (``model.pt``)."""
    c = ctx.cfg
    data, method = stage_data(c, ctx.inputs), method_of(c, "midtrain")
    torch.manual_seed(c.midtrain.train.seed)
    model = build_model(method.kind, few_step_network(c), data.model_shape, c.rollout.solver.sigma_min)
    if c.midtrain.init == "teacher":
        init_from(model, _teacher_weights(ctx))
    source = _batches(method, ctx, data, c.midtrain.train.seed)
    loss = method.build_loss(c, _loss_inputs(ctx, data))
    return _train_few_step(ctx, data, model, method, loss, source, c.midtrain.train, "mid-training")


def _train_few_step(ctx: StageContext, data: Data, model, method: Method, loss, source, train_cfg, desc: str) -> dict:
    """Train a few-step model, scored at 1 and 2 steps every ``train_cfg.eval_every`` steps with its method's
    sampler, and save the EMA model ``train_cfg.keep`` selects; the manifest records its scores and its 2-step
    sigma (``mid_sigma``)."""
    scorer = stage_scorer(ctx.cfg, ctx.local_root, ctx.runtime.device, data, kind=_GridScorer)
    result = train(model, loss, source, train_cfg, ctx.path / "train", ctx.runtime,
                   evaluate=scorer.training_evaluate(method.sampler) if train_cfg.eval_every else None,
                   desc=desc, progress=ctx.progress, events=_events(ctx, scorer.grids))
    if ctx.runtime.is_main:
        save_model(ctx.path / MODEL_FILE, result.model, method.kind, few_step_network(ctx.cfg),
                   data.model_shape)
    kept = result.best_metrics
    mid_sigma = kept["mid_sigma"] if "mid_sigma" in kept else scorer.mid_sigma_for(method.sampler, result.model)
    return {"best_step": result.best_step, "keep": train_cfg.keep if train_cfg.eval_every else "last",
            "score_names": [scorer.primary, scorer.primary_2step], "score_1step": kept.get("score_1step"),
            "score_2step": kept.get("score_2step"), "mid_sigma": mid_sigma}


def _posttrain(ctx: StageContext) -> dict:
    """The post-training method (``posttrain.method``) from the chosen initialisation; keeps the EMA model
    ``train.keep`` selects."""
    c, runtime = ctx.cfg, ctx.runtime
    p, data, method = c.posttrain, stage_data(c, ctx.inputs), method_of(c, "posttrain")
    torch.manual_seed(p.train.seed)
    if p.init == "cmt":
        model = load_model(ctx.input("midtrain") / MODEL_FILE).train()
    else:
        model = build_model(method.kind, few_step_network(c), data.model_shape, c.rollout.solver.sigma_min)
        if p.init == "teacher":
            init_from(model, _teacher_weights(ctx))
    teacher = None
    if "teacher" in method.needs:
        teacher = _teacher_of(c, data, ctx.inputs, c.guidance.scale).to(runtime.device).eval()
    midtrained = None
    if p.init == "cmt" and "midtrained" in method.needs:  # a frozen copy, loaded if the loss asks for it
        midtrained = lambda: load_model(ctx.input("midtrain") / MODEL_FILE).to(runtime.device)
    loss = method.build_loss(c, _loss_inputs(ctx, data, teacher=teacher, midtrained=midtrained))
    return _train_few_step(ctx, data, model, method, loss, _batches(method, ctx, data, p.train.seed), p.train,
                           "post-training")


def _evaluation(ctx: StageContext) -> dict:
    """The results table: data floor, teacher at its NFE (guided at ``guidance.scale``, and at each scale of
    ``guidance.sweep``), CMT and post-trained models at 1 and 2 steps."""
    c, runtime = ctx.cfg, ctx.runtime
    if not runtime.is_main:
        return {}
    data = stage_data(c, ctx.inputs)
    smin, smax = c.rollout.solver.sigma_min, c.rollout.solver.sigma_max
    first = stage_scorer(c, ctx.local_root, runtime.device, data, c.eval.reference_stats)
    scorers = [first] + [Scorer(data, c.eval, first.evaluator, runtime.device, smax, smin, seed_set=k,
                                num_classes=data.num_classes) for k in range(1, c.eval.num_seed_sets)]
    weights = ctx.input("teacher") / MODEL_FILE
    teacher = _teacher_of(c, data, ctx.inputs, c.guidance.scale).to(runtime.device).eval()
    solver = c.teacher.sampler.model_copy(update={"sigma_max": smax})
    mid, post = method_of(c, "midtrain"), method_of(c, "posttrain")
    baseline = None
    if weights.exists():
        untrained = init_from(build_model(mid.kind, few_step_network(c), data.model_shape, smin),
                              load_model(weights))
        baseline = ScoredModel("teacher-initialised, untrained", "baseline", mid.sampler, untrained.to(runtime.device))

    def kept(stage: str) -> tuple[torch.nn.Module, float]:
        """A training stage's model and its 2-step sigma (chosen by the stage, ``_train_few_step``)."""
        model = load_model(ctx.input(stage) / MODEL_FILE).to(runtime.device)
        return model, read_manifest(ctx.input(stage))["metrics"]["mid_sigma"]

    trained = [ScoredModel("CMT (mid-trained)", "midtrain", mid.sampler, *kept("midtrain")),
               ScoredModel(f"{post.name.upper()} from {c.posttrain.init}", "posttrain", post.sampler,
                           *kept("posttrain"))]
    curves = {s: read_training_log(ctx.input(s)) for s in TRAINING_STAGES if s in ctx.inputs}
    seconds = {s: (read_manifest(folder) or {}).get("seconds") for s, folder in ctx.inputs.items()}
    g = c.guidance
    sweep = {w: _teacher_of(c, data, ctx.inputs, w).to(runtime.device).eval() for w in g.sweep if w != g.scale}
    return results_table(ctx.path, scorers, teacher, solver, baseline, trained, curves,
                         {"preset": c.preset, "device": str(runtime.device)}, seconds, g.kind, g.scale, sweep)


# --------------------------------------------------------------------------------------------- soundness


def _unsound_model(folder: Path) -> str | None:
    """What is wrong with the model file in ``folder``: unreadable, or a tensor with inf or NaN."""
    file = folder / MODEL_FILE
    try:
        state = load_file(file)["state_dict"]
    except (CheckpointError, OSError, KeyError, TypeError) as err:
        return f"{file} cannot be used: {describe(err)}"
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    return f"{file}: {len(bad)} weight tensors hold inf or NaN (first: {bad[0]})" if bad else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sound_encoder(folder: Path, location, metrics: dict) -> str | None:
    return None if (folder / ENCODER_FILE).is_file() else f"{folder / ENCODER_FILE} is missing"


def _sound_latents(folder: Path, location, metrics: dict) -> str | None:
    try:
        store = open_latents(folder / LATENTS_DIR)
    except (LatentStoreError, OSError, ValueError) as err:
        return describe(err)
    return None if len(store) == metrics.get("num_images") else f"{folder / LATENTS_DIR} has {len(store)} images"


def _sound_teacher(folder: Path, location, metrics: dict) -> str | None:
    return _unsound_model(folder) if metrics.get("weights") else None


def _sound_rollouts(folder: Path, location, metrics: dict) -> str | None:
    """The store verified (every chunk finite, every checksum right) and its metadata what it claims."""
    return store_problem(remote.join(location, STORE_DIR))


def _sound_training(folder: Path, location, metrics: dict) -> str | None:
    """Finite weights, finite scores, and the positive 2-step sigma the evaluation samples with."""
    for key in ("score_1step", "score_2step"):
        if metrics.get(key) is not None and not _number(metrics[key]):
            return f"metrics.{key}={brief(metrics[key])} is not a finite number"
    if not (_number(metrics.get("mid_sigma")) and metrics["mid_sigma"] > 0):
        return f"metrics.mid_sigma={brief(metrics.get('mid_sigma'))} is not a positive number"
    return _unsound_model(folder)


# ---------------------------------------------------------------------------------------------- the graph

TEACHER = ("teacher.source", "teacher.path", "teacher.target")  # which teacher the ODE uses
# the teacher is a denoiser: the consistency models' boundary setting is not its concern
DENOISER_NETWORK = tuple(f"network.{f}" for f in NetworkConfig.model_fields if f != "consistency_boundary")
SCORING = ("eval.num_samples", "eval.seed", "eval.mid_sigma", "eval.mid_sigma_search", "eval.inception_path",
           "eval.fid_mode")
SIGMAS = ("rollout.solver.sigma_min", "rollout.solver.sigma_max")
# the teacher trains without evaluations: the fields that only steer them are not its concern
EVALUATION_ONLY = ("eval_every", "keep", "keep_tolerance", "until_below")
TEACHER_TRAINING = tuple(f"teacher.train.{f}" for f in TrainConfig.model_fields if f not in EVALUATION_ONLY)
TRAINING_USES = ("eval.batch_size",)
PRECISION = ("precision",)  # bf16 autocast changes what a training stage computes (ids hold the effective one)
GUIDE_TRAINING = tuple(f"guidance.guide.train.{f}" for f in TrainConfig.model_fields if f not in EVALUATION_ONLY)
GUIDE = ("guidance.guide.source", "guidance.guide.path", "guidance.guide.width", "guidance.guide.depth")
ROLLOUT_GUIDANCE = ("guidance.kind", "guidance.rollout_scale")
TEACHER_GUIDANCE = ("guidance.kind", "guidance.scale")


def _loaded_precision(cfg) -> tuple[str, ...]:
    """A teacher read from outside (``LOADED``) is the same file in any precision."""
    return PRECISION if cfg.teacher.source in LOADED else ()


def _loaded_guide(cfg) -> tuple[str, ...]:
    """A guide read from a file is the same in any precision and with any training settings."""
    return (*PRECISION, *GUIDE_TRAINING) if cfg.guidance.guide.source != "pretrain" else ()


def _unguided_rollouts(cfg) -> tuple[str, ...]:
    """Rollouts at scale 1 are the teacher's own, whatever the kind of guidance."""
    return ROLLOUT_GUIDANCE if cfg.guidance.rollout_scale == 1.0 else ()


def _teacher_step(cfg) -> bool:
    """Whether post-training calls the teacher (ECD's teacher step)."""
    return "teacher" in method_of(cfg, "posttrain").needs


def _unguided_posttrain(cfg) -> tuple[str, ...]:
    """Guidance changes post-training only through a teacher step at a scale other than 1."""
    return TEACHER_GUIDANCE if not _teacher_step(cfg) or cfg.guidance.scale == 1.0 else ()


def _runs_every_step(stage: str):
    """A training stage without ``train.until_below`` runs every step: the field is left out of its id (the ids
    of runs from before the field existed are kept)."""
    return lambda cfg: () if getattr(cfg, stage).train.until_below else (f"{stage}.train.until_below",)


def _posttrain_omits(cfg) -> tuple[str, ...]:
    return (*_unguided_posttrain(cfg), *_runs_every_step("posttrain")(cfg))


def _latent(cfg, *stages: str) -> tuple[str, ...]:
    """``stages`` for latent data (the encoder's stages), nothing in the data's own space."""
    return stages if cfg.data.encoder.kind != "identity" else ()


def _in_data_space(cfg) -> bool:
    """Whether the model works in the data's own space (pixels, 2-D points): its sample shape is read from the
    data; a latent space's comes from the config (``model_space``)."""
    return not _latent(cfg, "encoder")


def _unused_fields(cfg) -> tuple[str, ...]:
    """The sections a config leaves at their inert values that came after artifact ids existed: ``data.encoder``
    while it is the identity, the DiT's ``network.patch_size`` and ``network.heads`` for other networks, Mean Flow's
    guidance in the target while it is off; left out of ids, so runs that do not use them keep their ids."""
    return (*(() if _latent(cfg, "encoder") else ("data.encoder",)),
            *(() if cfg.network.kind == "dit" else tuple(f"network.{f}" for f in DIT_ONLY)),
            *(() if cfg.posttrain.meanflow.guidance.active else ("posttrain.meanflow.guidance",)))


def _without_unused(omit):
    """A stage's ``omit`` plus the fields this config does not use (``_unused_fields``)."""
    return lambda cfg: (*omit(cfg), *_unused_fields(cfg))


def _trains_on_data(cfg) -> bool:
    return method_of(cfg, "posttrain").batches == "data"


def _guide_of(cfg, *scales: float) -> tuple[str, ...]:
    """("guide",) when a teacher guided at any of ``scales`` calls the guide network."""
    return ("guide",) if any(uses_guide(cfg, w) for w in scales) else ()


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("encoder", reads=("data",), needs=lambda cfg: (), work=_encoder, trains=False, sound=_sound_encoder,
          reads_samples=lambda cfg: cfg.data.encoder.kind == "trained"),
    Stage("encode", reads=("data", "encode.chunk_images", "encode.shard_chunks"), needs=lambda cfg: ("encoder",),
          work=_encode, uses=("encode.cluster",), omit=lambda cfg: ("data.seed", "data.heldout_fraction"),
          sound=_sound_latents),
    Stage("teacher", reads=("data", *DENOISER_NETWORK, *TEACHER, "teacher.p_mean", "teacher.p_std", *TEACHER_TRAINING,
                            *PRECISION),
          needs=lambda cfg: _latent(cfg, "encoder", "encode") if cfg.teacher.source == "pretrain" else (),
          work=_teacher, trains=True, omit=_without_unused(_loaded_precision), sound=_sound_teacher,
          reads_samples=lambda cfg: _in_data_space(cfg) or cfg.teacher.source == "pretrain"),
    Stage("guide", reads=("data", *DENOISER_NETWORK, *GUIDE, "teacher.p_mean", "teacher.p_std", *GUIDE_TRAINING,
                          *PRECISION),
          needs=lambda cfg: _latent(cfg, "encoder", "encode") if cfg.guidance.guide.source == "pretrain" else (),
          work=_guide, trains=True, omit=_without_unused(_loaded_guide), sound=_sound_teacher,
          reads_samples=lambda cfg: _in_data_space(cfg) or cfg.guidance.guide.source == "pretrain"),
    Stage("rollouts", reads=("data", *TEACHER, *ROLLOUT_GUIDANCE, "rollout.solver", "rollout.num_trajectories",
                             "rollout.batch_size", "rollout.seed", "rollout.store"),
          needs=lambda cfg: ("teacher", *_guide_of(cfg, cfg.guidance.rollout_scale)), work=_rollouts,
          uses=("rollout.cluster",), omit=_without_unused(_unguided_rollouts), sound=_sound_rollouts,
          reads_samples=_in_data_space),
    Stage("midtrain", reads=("data", "network", *SIGMAS, "midtrain", *SCORING, *PRECISION),
          needs=lambda cfg: ("teacher", "rollouts", *_latent(cfg, "encoder")), work=_midtrain, uses=TRAINING_USES,
          trains=True, omit=_without_unused(_runs_every_step("midtrain")), sound=_sound_training),
    Stage("posttrain", reads=("data", "network", *TEACHER, *TEACHER_GUIDANCE, *SIGMAS, "posttrain", *SCORING,
                              *PRECISION),
          needs=lambda cfg: ("teacher", *(("midtrain",) if cfg.posttrain.init == "cmt" else ()),
                             *(_guide_of(cfg, cfg.guidance.scale) if _teacher_step(cfg) else ()),
                             *_latent(cfg, "encoder", *(("encode",) if _trains_on_data(cfg) else ()))),
          work=_posttrain, uses=TRAINING_USES, trains=True, omit=_without_unused(_posttrain_omits),
          sound=_sound_training),
    Stage("evaluation", reads=("data", "network", *TEACHER, *TEACHER_GUIDANCE, "guidance.sweep", "teacher.sampler",
                               *SIGMAS, "midtrain.form", "posttrain.method", "posttrain.init", "eval"),
          needs=lambda cfg: ("teacher", "rollouts", "midtrain", "posttrain",
                             *_guide_of(cfg, cfg.guidance.scale, *cfg.guidance.sweep), *_latent(cfg, "encoder")),
          work=_evaluation, uses=("preset",), omit=_without_unused(lambda cfg: ())),
)}
TRAINING_STAGES = tuple(name for name, s in STAGES.items() if s.trains)
PIPELINE = ("evaluation",)  # a whole run: the evaluation and the stages it needs (the guide only when used)


def plan(cfg) -> Plan:
    """The pipeline's stage graph resolved for ``cfg`` (``cmt_core.engine.make_plan`` over ``STAGES``)."""
    return make_plan(cfg, STAGES)
