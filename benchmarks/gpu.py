"""What each stage of the ``cifar10`` recipe costs on this machine's accelerator, measured (CPU at tiny sizes too).

Writes ``benchmarks/results/gpu.json``: the device, torch / CUDA versions, and for the recipe's DDPM++ U-Net at
32x32 on data of CIFAR-10's shape (random images and random weights: no data set or weights file is needed, the
timings do not depend on them):

* ``training``: images/s and peak memory of one training step of each objective, run as
  ``cmt_core.training.train`` runs it (per-step torch seed, batch to the device, ``StepRandom``, autocast,
  ``loss.float().mean()``, backward, gradient clipping, the stage's optimizer, EMA, one loss sync per step):
  EDM teacher pre-training, CMT mid-training fed by ``StorePairs`` from a zarr store (LPIPS with a randomly
  initialised VGG16 trunk, the recipe's distance), ECT, ECD (with its teacher's Heun step) and Mean Flow (a JVP).
  Variants: fp32 (TF32 off: the reference), TF32 and bf16 autocast each with and without channels_last, and
  torch.compile (of the raw U-Net, in place: ``nn.Module.compile``) at each objective's fastest correct eager
  setting and the preset's (``--compile all``: at every setting; the quick run: the fp32 EDM step only). A variant
  is *correct* when every loss it computed is finite and its check loss (the objective at step 0's batch, times
  and noises and the initial weights, the same for every variant; Mean Flow's without its adaptive weight, which
  maps every loss to about 1) agrees with the fp32 reference's within ``RTOL[precision]`` relative plus 3 standard
  deviations of the reference's over other dropout masks (variants may draw other masks: compiled graphs use
  inductor's RNG, channels_last lays them out differently).
  The weights are the library's initialisation re-drawn at Xavier scale 1 (``trained_scale``), so that every
  layer changes the loss as in a trained network (the library's residual branches start at 1e-5 of that, which
  would hide any numerical error). ``recommended_cuda_default``: the fastest correct setting per objective, and for
  the preset the setting that minimises its projected mid- + post-training GPU-hours.
* ``rollouts``: trajectories/s of the recipe's 16-step DPM-Solver++ (``rollout.solver``) on the teacher (EDM's
  VP preconditioning, as the released teacher) at several batch sizes, then at the best: solving only, solving
  and writing each shard to a zarr store in turn (the GPU idles while a shard is compressed and written:
  ``idle_fraction``), and writing shard k in a background thread while shard k + 1 is solved.
* ``sampling``: 1- and 2-step consistency sampling (``cmt_core.samplers.sample``); ``inception``: pool features of
  clean-fid's FID Inception (the real architecture, random weights) through ``InceptionFeatures``, projected to
  50,000 samples.
* ``projection``: the paper's CIFAR-10 budget (rollouts, 38.4 Mimg mid-training, 12.8 Mimg post-training) in
  GPU-hours from the measured rates, beside the reference's online solving (8 trajectories of 16 solver steps
  solved inside every step of batch 128) at the same budget.

Peak memory is ``torch.cuda.max_memory_allocated`` per variant on CUDA; on CPU it is the process's RSS high-water
mark (``resource.getrusage``) after the variant, which never decreases during the run (``memory_kind``).
The file is rewritten after every section (``complete`` is false until the end), so a run cut short keeps what
it measured.

    .venv/bin/python benchmarks/gpu.py            # on a GPU; sized for about 8 min on an H200 (not yet run on one)
    .venv/bin/python benchmarks/gpu.py --quick    # tiny U-Net and batch (the test; CPU is fine)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmt_core.artifacts import package_versions  # noqa: E402
from cmt_core.config import StoreConfig, TrainConfig  # noqa: E402
from cmt_core.data.datasets import TensorDataset  # noqa: E402
from cmt_core.data.sources import DatasetSource, move_batch  # noqa: E402
from cmt_core.ema import EMA  # noqa: E402
from cmt_core.evaluation.features import extract_features  # noqa: E402
from cmt_core.evaluation.inception import InceptionFeatures, pytorch_fid_inception_architecture  # noqa: E402
from cmt_core.methods import LossInputs, get_method  # noqa: E402
from cmt_core.models import build_model  # noqa: E402
from cmt_core.objectives.base import StepRandom  # noqa: E402
from cmt_core.presets import get_preset  # noqa: E402
from cmt_core.rng import Stream, seed_of  # noqa: E402
from cmt_core.runtime import Runtime, uses_cuda  # noqa: E402
from cmt_core.samplers import sample  # noqa: E402
from cmt_core.solvers import function_evaluations  # noqa: E402
from cmt_core.time_grids import make_grid  # noqa: E402
from cmt_core.training import make_optimizer, train_step  # noqa: E402
from cmt_core.trajectories.pairs import StorePairs  # noqa: E402
from cmt_core.trajectories.rollout import rollout_batch, trajectory_seeds  # noqa: E402
from cmt_core.trajectories.store import create_store, mark_complete, write_shard  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "gpu.json"
PRESET = "cifar10"
SAMPLE_SHAPE = (3, 32, 32)  # CIFAR-10
FID_SAMPLES = 50_000
ONLINE_TRAJECTORIES = 8  # the reference's online solving: 8 trajectories x 16 points = a batch of 128 pairs
RTOL = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 3e-2}  # check loss vs the fp32 reference's, relative
DROPOUT_SIGMAS = 3.0  # plus this many standard deviations of the reference loss over other dropout masks
IDLE_TARGET = 0.10  # overlap writing with solving when the GPU idles more than this while shards are written
OBJECTIVES = ("edm_teacher", "cmt_midtrain", "ect", "ecd", "meanflow")
COMPILE_POLICIES = {"best": "each objective's fastest correct eager setting, and the preset's",
                    "all": "every eager setting", "fp32": "the fp32 reference setting", "none": "nothing"}
RECIPE_STAGES = ("cmt_midtrain", "ect")  # the training stages the cifar10 recipe runs (its teacher is EDM's release)


@dataclass(frozen=True)
class Sizes:
    network: tuple[str, ...]  # overrides of the cifar10 recipe's network
    batch: int  # training batch (the recipe's mid- and post-training batch: 128)
    data_images: int  # random images of CIFAR-10's shape the data-fed objectives draw from
    warmup: int  # untimed steps (compilation happens here)
    steps: int  # timed steps
    dropout_probes: int  # reference losses over other dropout masks (the tolerance)
    rollout_batches: tuple[int, ...]
    rollout_shards: int  # shards per store arm
    store: StoreConfig
    online_reps: int
    sample_batch: int
    sample_reps: int
    inception_images: int
    inception_batch: int


FULL = Sizes(network=(), batch=128, data_images=8192, warmup=3, steps=15, dropout_probes=4,
             rollout_batches=(256, 512, 1024), rollout_shards=2,
             # the recipe's chunks (64 trajectories, float16); 16 chunks a shard instead of 64: the write time per
             # trajectory, and so the idle fraction, does not depend on the shard's size
             store=StoreConfig(dtype="float16", chunk_trajectories=64, shard_chunks=16),
             online_reps=5, sample_batch=500, sample_reps=5, inception_images=5000, inception_batch=500)
# cifar10-tiny's U-Net at one resolution (torch.compile on a CPU pays about 2 s of C++ compilation per kernel)
QUICK = Sizes(network=("network.width=16", "network.depth=1", "network.channel_mult=[1]",
                       "network.attention_resolutions=[]", "network.emb_dim=32"),
              batch=4, data_images=16, warmup=1, steps=2, dropout_probes=2, rollout_batches=(2, 4), rollout_shards=2,
              store=StoreConfig(dtype="float16", chunk_trajectories=2, shard_chunks=2),
              online_reps=1, sample_batch=8, sample_reps=2, inception_images=8, inception_batch=4)


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | tf32 | bf16
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return self.precision + ("-channels_last" if self.channels_last else "") + ("-compile" if self.compile else "")

    def describe(self) -> dict:
        return {"precision": self.precision, "tf32": self.precision == "tf32", "autocast": self.precision == "bf16",
                "channels_last": self.channels_last, "compile": self.compile}


REFERENCE = Variant("fp32")
EAGER = (REFERENCE, Variant("tf32"), Variant("tf32", True), Variant("bf16"), Variant("bf16", True))


@dataclass
class Objective:
    name: str
    stage: str
    kind: str  # the model kind trained (cmt_core.models)
    train: TrainConfig  # the stage's optimizer and EMA
    budget_images: float  # images (pairs) the recipe trains this stage on
    make_loss: Callable  # teacher (or None) -> objective
    source: Callable  # () -> a fresh BatchSource
    teacher: bool = False
    make_check_loss: Callable | None = None  # the loss the correctness check compares (None: make_loss's)


# ------------------------------------------------------------------------------------------ helpers
def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 1500 else text[:1500] + " ..."


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _tf32_settings() -> dict:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        return {"matmul": torch.backends.cuda.matmul.fp32_precision,
                "cudnn_conv": torch.backends.cudnn.conv.fp32_precision}
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


@contextlib.contextmanager
def fp32_math(precision: str, device: torch.device):
    """On CUDA: TF32 for fp32 matmuls and convolutions when ``precision == 'tf32'``, IEEE fp32 otherwise (torch's
    default runs convolutions in TF32, so the fp32 reference turns that off). Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    mode = "tf32" if precision == "tf32" else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = mode
        try:
            yield
        finally:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trained_scale(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every weight matrix / kernel Xavier-uniform at gain 1 (biases and norms stay): random weights whose
    every layer changes the output, as a trained network's do (the library's initialisation starts the residual
    branches and the output at 1e-5 of that, where the loss hardly depends on the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                nn.init.xavier_uniform_(p, generator=g)
    return model


class DropoutProbe(StepRandom):
    """The step's random numbers with another dropout seed: ``seed()`` (ECT / ECD's shared dropout masks) returns
    ``dropout_seed`` without drawing, so t, r and the noises stay those of the step."""

    def __init__(self, *args, dropout_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout_seed = dropout_seed

    def seed(self) -> int:
        return self.dropout_seed


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """``move_batch``, with image tensors in channels-last memory format when asked."""
    out = move_batch(batch, device)
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if k != "cond" and v.ndim == 4 else v
               for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------ context
class Bench:
    def __init__(self, args, sizes: Sizes, device: torch.device, tmp: Path):
        self.args, self.sizes, self.device, self.tmp = args, sizes, device, tmp
        self.cfg = get_preset(PRESET, list(sizes.network))
        self.cuda = device.type == "cuda"
        solver = self.cfg.rollout.solver
        self.sigma_min, self.sigma_max = solver.sigma_min, solver.sigma_max
        net = self.cfg.network.model_dump(mode="json")
        torch.manual_seed(0)  # every random weight of the run from a seed: identical runs compute identical losses
        base = {"denoiser": build_model("denoiser", net, SAMPLE_SHAPE),
                "teacher": build_model("denoiser", net, SAMPLE_SHAPE, preconditioning={"name": "vp"}),
                "consistency": build_model("consistency", net, SAMPLE_SHAPE, self.sigma_min),
                "flow_map": build_model("flow_map", net, SAMPLE_SHAPE, self.sigma_min)}
        self.base = {k: trained_scale(m, seed) for seed, (k, m) in enumerate(base.items())}
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(sizes.data_images, *SAMPLE_SHAPE, generator=g) * 2 - 1
        self.store_path: Path | None = None
        self.device_name = str(device)

    def random_vgg16(self) -> Path:
        """torchvision's VGG16 ``features`` with random weights, written once to a temporary file: the recipe's
        LPIPS distance reads its trunk from a file."""
        path = self.tmp / "vgg16-random.pth"
        if not path.exists():
            from torchvision.models.vgg import cfgs, make_layers

            torch.manual_seed(4)
            trunk = make_layers(cfgs["D"])
            torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
        return path

    def objectives(self) -> dict[str, Objective]:
        """Each objective as its method declares it (``cmt_core.methods``), built from the recipe's config."""
        c = self.cfg
        mid, post, teach = c.midtrain.train, c.posttrain.train, c.teacher.train
        post_images = float(post.steps * post.batch_size)
        data = lambda: DatasetSource(TensorDataset(self.images), seed=0)
        form = get_method(c.midtrain.form)
        store = lambda: StorePairs(self.store_path, to_end=form.batches == "trajectory_ends", seed=0)
        inputs = LossInputs(self.sigma_min, self.sigma_max, c.network.sigma_data)
        lpips = lambda: c.model_copy(update={"midtrain": c.midtrain.model_copy(
            update={"lpips_backbone": self.random_vgg16()})}) if c.midtrain.distance == "lpips" else c
        # the adaptive weight err / (err + eps)^p maps every loss to about 1 at p = 1: the check compares err
        unweighted = c.model_copy(update={"posttrain": c.posttrain.model_copy(update={"meanflow": (
            c.posttrain.meanflow.model_copy(update={"adaptive_p": 0.0}))})})
        edm, ect, ecd, meanflow = (get_method(name) for name in ("edm", "ect", "ecd", "meanflow"))
        objs = [
            Objective("edm_teacher", "teacher (EDM pre-training)", edm.kind, teach,
                      float(teach.steps * teach.batch_size), lambda _: edm.build_loss(c, inputs), data),
            Objective("cmt_midtrain", f"mid-training (CMT {c.midtrain.form}, {c.midtrain.distance}, from the store)",
                      form.kind, mid, float(mid.steps * mid.batch_size), lambda _: form.build_loss(lpips(), inputs),
                      store),
            Objective("ect", "post-training (ECT, the recipe's)", ect.kind, post, post_images,
                      lambda _: ect.build_loss(c, inputs), data),
            Objective("ecd", f"post-training (ECD, teacher {c.posttrain.ecd_solver} step)", ecd.kind, post,
                      post_images, lambda teacher: ecd.build_loss(c, dataclasses.replace(inputs, teacher=teacher)),
                      data, teacher=True),
            Objective("meanflow", "post-training (Mean Flow, JVP)", meanflow.kind, post, post_images,
                      lambda _: meanflow.build_loss(c, inputs), data,
                      make_check_loss=lambda _: meanflow.build_loss(unweighted, inputs)),
        ]
        return {o.name: o for o in objs if o.name in self.args.objectives}


# ------------------------------------------------------------------------------------------ training
def check_loss(model, objective, source, train_cfg: TrainConfig, runtime: Runtime, batch: int, channels_last: bool,
               dropout_seed: int | None = None) -> float:
    """The objective's loss of step 0's batch, times and noises at the current weights, in the variant's setting
    (grad mode on, no backward: a compiled model runs the graph it trains with). ``dropout_seed``: other dropout
    masks (``DropoutProbe``)."""
    data = to_device(source.batch(0, batch), runtime.device, channels_last)
    if dropout_seed is None:
        torch.manual_seed(seed_of(Stream.STEP_TORCH, train_cfg.seed, 0, 0))
        rng = StepRandom(train_cfg.seed, 0, batch, device=runtime.device)
    else:
        torch.manual_seed(dropout_seed)
        rng = DropoutProbe(train_cfg.seed, 0, batch, device=runtime.device, dropout_seed=dropout_seed + 1)
    with runtime.autocast():
        return objective(model, data, rng).float().mean().item()


def measure_variant(bench: Bench, obj: Objective, variant: Variant, reference: dict | None) -> dict:
    s, device = bench.sizes, bench.device
    entry = {**variant.describe(), "status": "ok"}
    model = teacher = source = None
    try:
        model = copy.deepcopy(bench.base[obj.kind]).to(device).train()
        if obj.teacher:
            teacher = copy.deepcopy(bench.base["teacher"]).to(device).eval().requires_grad_(False)
        for m in (model, teacher):
            if m is not None and variant.channels_last:
                m.to(memory_format=torch.channels_last)
            if m is not None and variant.compile:
                m.raw.compile()  # in place: every path (forward, denoise, the teacher's step) runs compiled
        objective = obj.make_loss(teacher)
        checked = obj.make_check_loss(teacher) if obj.make_check_loss else objective
        source = obj.source()
        opt = make_optimizer(obj.train, model.parameters())
        ema = EMA(model, obj.train.ema_decay)
        step_cfg = obj.train.model_copy(update={"batch_size": s.batch})
        runtime = Runtime(device, precision="bf16" if variant.precision == "bf16" else "fp32")
        with fp32_math(variant.precision, device):
            if variant == REFERENCE:
                entry["dropout_probe_losses"] = [
                    check_loss(model, checked, source, obj.train, runtime, s.batch, False, 10_000 + 2 * k)
                    for k in range(s.dropout_probes)]
            reset_peak(device)
            warm, t0 = 0.0, now()  # the warm-up time includes the check's forward pass (and compilation)
            losses = [check_loss(model, checked, source, obj.train, runtime, s.batch, variant.channels_last)]
            for step in range(s.warmup + s.steps):
                if step == s.warmup:
                    sync(device)
                    warm = now() - t0
                    t0 = now()
                # one step of ``cmt_core.training.train`` on one process (it synchronises on the loss, as the loop)
                batch = to_device(source.batch(step, s.batch), device, variant.channels_last)
                losses.append(train_step(model, objective, batch, step_cfg, step, opt, ema, runtime)[0])
            sync(device)
            timed = now() - t0
        entry.update(images_per_s=s.steps * s.batch / timed, step_ms=1e3 * timed / s.steps, warmup_s=warm,
                     warmup_steps=s.warmup, timed_steps=s.steps, peak_memory_bytes=peak_memory(device),
                     check_loss=losses[0], first_loss=losses[1], losses_finite=all(math.isfinite(v) for v in losses))
    except Exception as err:  # an out-of-memory, a compiler failure: recorded, the run goes on
        entry.update(status="error", error=short_error(err), traceback=traceback.format_exc(limit=-3)[-3000:])
    finally:
        if source is not None and hasattr(source, "close"):
            source.close()
        del model, teacher, source
        if variant.compile:
            torch.compiler.reset()
        release(device)
    if entry["status"] == "ok":
        entry["check"] = check(entry, variant, reference if variant != REFERENCE else entry)
    return entry


def check(entry: dict, variant: Variant, reference: dict | None) -> dict:
    """Finite losses, and the first loss within the stated tolerance of the fp32 reference's."""
    if reference is None or reference.get("status") != "ok":
        return {"correct": False, "reason": "the fp32 reference did not run", "finite": entry["losses_finite"]}
    ref = reference["check_loss"]
    probes = reference["dropout_probe_losses"]
    spread = statistics.stdev(probes) if len(probes) > 1 else 0.0
    tolerance = RTOL[variant.precision] * abs(ref) + DROPOUT_SIGMAS * spread
    diff = abs(entry["check_loss"] - ref)
    correct = bool(entry["losses_finite"] and math.isfinite(diff) and diff <= tolerance)
    return {"loss": entry["check_loss"], "reference_loss": ref, "abs_diff": diff,
            "rel_diff": diff / abs(ref) if ref else None, "tolerance": tolerance, "rtol": RTOL[variant.precision],
            "dropout_std": spread, "finite": entry["losses_finite"], "correct": correct}


def skipped(variant: Variant, reason: str) -> dict:
    return {**variant.describe(), "status": "skipped", "reason": reason}


def fastest_correct(variants: dict) -> str | None:
    ok = {k: v for k, v in variants.items() if v["status"] == "ok" and v["check"]["correct"]}
    return max(ok, key=lambda k: ok[k]["images_per_s"]) if ok else None


def bench_eager(bench: Bench, obj: Objective, log) -> dict:
    """The objective's eager variants (the fp32 reference first)."""
    variants: dict[str, dict] = {}
    for variant in EAGER:
        if variant.precision == "tf32" and not bench.cuda:
            variants[variant.name] = skipped(variant, "TF32 is a CUDA tensor-core mode: not applicable on CPU")
            continue
        variants[variant.name] = measure_variant(bench, obj, variant, variants.get(REFERENCE.name))
        log(f"{obj.name} {variant.name}: {summary(variants[variant.name])}")
    return {"stage": obj.stage, "model_kind": obj.kind, "batch_size": bench.sizes.batch,
            "recipe_batch_size": obj.train.batch_size, "optimizer": obj.train.optimizer,
            "budget_images": obj.budget_images, "source": "StorePairs (zarr store)" if obj.name == "cmt_midtrain"
            else "DatasetSource (random images in memory)", "variants": variants,
            "fastest_correct_eager": fastest_correct(variants)}


def compile_targets(bench: Bench, name: str, entry: dict, preset_eager: str | None) -> set[str]:
    """The eager settings to compile: ``--compile best``: the objective's fastest correct one (the fastest one when
    none is correct) and, for the preset's training stages, the preset's best eager setting; ``all``: every one;
    ``fp32``: the reference setting only (the quick run's default: the same graph every run, so inductor's cache
    serves later runs)."""
    measured = [v.name for v in EAGER if entry["variants"][v.name]["status"] == "ok"]
    if name not in bench.args.compile_objectives or bench.args.compile == "none" or not measured:
        return set()
    if bench.args.compile == "all":
        return set(measured)
    if bench.args.compile == "fp32":
        return {REFERENCE.name} & set(measured)
    best = entry["fastest_correct_eager"] or max(measured, key=lambda k: entry["variants"][k]["images_per_s"])
    extra = {preset_eager} if name in RECIPE_STAGES and preset_eager in measured else set()
    return {best} | extra


def bench_compiled(bench: Bench, obj: Objective, entry: dict, targets: set[str], log) -> None:
    variants = entry["variants"]
    for variant in EAGER:
        compiled = Variant(variant.precision, variant.channels_last, True)
        if variants[variant.name]["status"] == "skipped":
            variants[compiled.name] = skipped(compiled, variants[variant.name]["reason"])
        elif variant.name in targets:
            variants[compiled.name] = measure_variant(bench, obj, compiled, variants[REFERENCE.name])
            log(f"{obj.name} {compiled.name}: {summary(variants[compiled.name])}")
        elif obj.name not in bench.args.compile_objectives or bench.args.compile == "none":
            variants[compiled.name] = skipped(compiled, f"torch.compile not run for {obj.name} (--compile none or "
                                                        "--compile-objectives)")
        else:
            variants[compiled.name] = skipped(compiled, f"--compile {bench.args.compile} compiles "
                                                        f"{COMPILE_POLICIES[bench.args.compile]} (--compile all: every "
                                                        "setting)")
    entry["fastest_correct"] = fastest_correct(variants)


def summary(entry: dict) -> str:
    if entry["status"] != "ok":
        return entry["status"] + ": " + entry.get("error", entry.get("reason", ""))[:200]
    c = entry["check"]
    return (f"{entry['images_per_s']:.1f} img/s, warm-up {entry['warmup_s']:.1f} s, peak "
            f"{entry['peak_memory_bytes'] / 2**30:.2f} GiB, check loss {c['loss']:.5g} vs {c['reference_loss']:.5g} "
            f"({'correct' if c['correct'] else 'NOT correct'})")


def recommend(training: dict, budgets: dict, cuda: bool) -> dict:
    per = {name: t["fastest_correct"] for name, t in training.items()}
    out = {"is_cuda_measurement": cuda, "per_objective": per,
           "rule": "per objective: the correct variant with the most images/s; for the preset: the setting correct for "
                   "both of its training stages (cmt_midtrain, ect) with the fewest projected GPU-hours "
                   "budget_mid / rate_mid + budget_post / rate_post"}
    if not cuda:
        out["note"] = "measured on CPU at tiny sizes: not a CUDA measurement; rerun on a GPU for the CUDA default"
    stages = RECIPE_STAGES
    preset = None
    if all(s in training for s in stages):
        hours = {}
        for name in training[stages[0]]["variants"]:
            entries = [training[s]["variants"].get(name) for s in stages]
            if all(e and e["status"] == "ok" and e["check"]["correct"] for e in entries):
                hours[name] = sum(budgets[s] / e["images_per_s"] for s, e in zip(stages, entries)) / 3600
        if hours:
            best = min(hours, key=hours.get)
            v = training[stages[0]]["variants"][best]
            preset = {"setting": best, "precision": v["precision"], "tf32": v["tf32"],
                      "channels_last": v["channels_last"], "compile": v["compile"],
                      "projected_training_gpu_hours": hours[best],
                      "candidates_gpu_hours": hours,
                      "config": {"precision": "bf16" if v["precision"] == "bf16" else "fp32"},
                      "not_in_config": [k for k in ("tf32", "channels_last", "compile") if v[k]]}
    out["preset"] = preset
    return out


# ------------------------------------------------------------------------------------------ rollouts
def solve_shard(teacher, start: int, stop: int, batch: int, solver, device) -> torch.Tensor:
    """The trajectories [start, stop) solved ``batch`` at a time (``rollout_shard``'s body before its write)."""
    return torch.cat([rollout_batch(teacher, 0, range(b, min(b + batch, stop)), SAMPLE_SHAPE, solver, device)
                      for b in range(start, stop, batch)])


def bench_rollouts(bench: Bench, log) -> dict:
    s, device, solver = bench.sizes, bench.device, bench.cfg.rollout.solver
    teacher = copy.deepcopy(bench.base["teacher"]).to(device).eval().requires_grad_(False)
    nfe = function_evaluations(solver.name, make_grid(solver))
    out = {"solver": solver.model_dump(mode="json"), "denoiser_calls_per_trajectory": nfe,
           "teacher": "VP-preconditioned DDPM++ (EDM's released CIFAR-10 network's form), random weights",
           "precision": "as the rollouts stage runs: fp32 without autocast, torch's default TF32 settings",
           "tf32_settings": _tf32_settings() if bench.cuda else None}
    with torch.no_grad():
        rollout_batch(teacher, 0, range(min(s.rollout_batches)), SAMPLE_SHAPE, solver, device)  # warm-up
        sweep = {}
        for b in s.rollout_batches:
            reset_peak(device)
            t0 = now()
            rollout_batch(teacher, 0, range(b), SAMPLE_SHAPE, solver, device)
            sweep[str(b)] = {"trajectories_per_s": b / (now() - t0), "peak_memory_bytes": peak_memory(device)}
            log(f"rollouts batch {b}: {sweep[str(b)]['trajectories_per_s']:.1f} traj/s")
        best = int(max(sweep, key=lambda k: sweep[k]["trajectories_per_s"]))
        out.update(batch_sweep=sweep, best_batch=best, recipe_batch=bench.cfg.rollout.batch_size)

        layout = s.store
        shard = layout.chunk_trajectories * layout.shard_chunks
        num = shard * s.rollout_shards
        grid, seeds = make_grid(solver), trajectory_seeds(0, num)
        out["store"] = {**layout.model_dump(mode="json"), "trajectories_per_shard": shard, "shards": s.rollout_shards,
                        "recipe_shard_chunks": bench.cfg.rollout.store.shard_chunks}

        t0 = now()
        for k in range(s.rollout_shards):
            solve_shard(teacher, k * shard, (k + 1) * shard, best, solver, device)
        bare = now() - t0
        out["solve_only"] = {"seconds": bare, "trajectories_per_s": num / bare}

        path = bench.tmp / "rollouts.zarr"
        t0 = now()
        store = create_store(path, num, SAMPLE_SHAPE, grid, layout, {"benchmark": "gpu"}, seeds=seeds)
        create_s = now() - t0
        solve_s = write_s = 0.0
        for k in range(s.rollout_shards):
            t0 = now()
            states = solve_shard(teacher, *store.shard_range(k), best, solver, device)
            t1 = now()
            write_shard(store, k, states)
            solve_s, write_s = solve_s + t1 - t0, write_s + now() - t1
        t0 = now()
        mark_complete(path)
        complete_s = now() - t0
        bench.store_path = path  # mid-training reads these trajectories
        idle = write_s / (solve_s + write_s)
        bytes_on_disk = sum(f.stat().st_size for f in (path / "states").rglob("*") if f.is_file())
        out["sequential_store"] = {
            "seconds": solve_s + write_s, "solve_seconds": solve_s, "write_seconds": write_s,
            "create_seconds": create_s, "mark_complete_seconds": complete_s,
            "trajectories_per_s": num / (solve_s + write_s), "idle_fraction": idle,
            "bytes_per_trajectory": bytes_on_disk / num}
        log(f"rollouts with the store: idle fraction {idle:.3f}")

        path2 = bench.tmp / "rollouts-overlapped.zarr"
        store2 = create_store(path2, num, SAMPLE_SHAPE, grid, layout, {"benchmark": "gpu"}, seeds=seeds)
        waited = 0.0
        t0 = now()
        with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as pool:
            pending = None
            for k in range(s.rollout_shards):
                states = solve_shard(teacher, *store2.shard_range(k), best, solver, device)
                if pending is not None:
                    t1 = now()
                    pending.result()
                    waited += now() - t1
                pending = pool.submit(write_shard, store2, k, states)
            t1 = now()
            pending.result()
            waited += now() - t1
        total = now() - t0
        mark_complete(path2)
        out["overlapped_store"] = {
            "seconds": total, "trajectories_per_s": num / total, "idle_fraction": waited / total,
            "how": "shard k is written by a background thread while shard k + 1 is solved"}
        out["idle_target"] = IDLE_TARGET
        out["overlap_needed"] = idle > IDLE_TARGET
        out["best_with_store"] = "overlapped_store" if num / total > num / (solve_s + write_s) else "sequential_store"

        reps = []  # the teacher is warm: it has solved every batch size above
        for k in range(s.online_reps):
            t0 = now()
            rollout_batch(teacher, 0, range(k * ONLINE_TRAJECTORIES, (k + 1) * ONLINE_TRAJECTORIES), SAMPLE_SHAPE,
                          solver, device)
            reps.append(now() - t0)
        out["online_solve"] = {"trajectories": ONLINE_TRAJECTORIES, "seconds_per_batch": statistics.median(reps),
                               "repeats": reps}
    del teacher
    release(device)
    return out


# ------------------------------------------------------------------------------------------ sampling, features
def bench_sampling(bench: Bench) -> dict:
    s, device, c = bench.sizes, bench.device, bench.cfg
    model = copy.deepcopy(bench.base["consistency"]).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x_T = (torch.randn(s.sample_batch, *SAMPLE_SHAPE, generator=g) * bench.sigma_max).to(device)
    out = {"model_kind": "consistency", "batch_size": s.sample_batch, "mid_sigma": c.eval.mid_sigma,
           "precision": "fp32 without autocast (as the evaluation runs)"}
    for steps in (1, 2):
        sample("consistency", model, x_T, steps, bench.sigma_max, bench.sigma_min, c.eval.mid_sigma)  # warm-up
        sync(device)
        t0 = now()
        for _ in range(s.sample_reps):
            sample("consistency", model, x_T, steps, bench.sigma_max, bench.sigma_min, c.eval.mid_sigma)
        sync(device)
        rate = s.sample_reps * s.sample_batch / (now() - t0)
        out[f"{steps}_step"] = {"images_per_s": rate, "seconds_for_50000": FID_SAMPLES / rate,
                                "network_calls": steps}
    del model
    release(device)
    return out


def bench_inception(bench: Bench) -> dict:
    s, device = bench.sizes, bench.device
    path = bench.tmp / "fid-inception-random.pth"
    torch.manual_seed(2)
    torch.save(pytorch_fid_inception_architecture().state_dict(), path)
    extractor = InceptionFeatures(path, mode="legacy_pytorch", device=device)
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(s.inception_images, *SAMPLE_SHAPE, generator=g) * 2 - 1).to(device)
    extract_features(extractor, images[: s.inception_batch], s.inception_batch)  # warm-up
    sync(device)
    t0 = now()
    feats = extract_features(extractor, images, s.inception_batch)
    sync(device)
    rate = len(images) / (now() - t0)
    del extractor
    release(device)
    return {"network": "clean-fid's FID Inception-V3 (pytorch-fid's blocks), random weights, 2048-d pool features",
            "mode": "legacy_pytorch (bilinear resize to 299 on the device; the recipe's legacy_tensorflow runs the "
                    "same architecture from its TorchScript file, which is not here)",
            "recipe_fid_mode": bench.cfg.eval.fid_mode, "images": len(images), "batch_size": s.inception_batch,
            "feature_dim": int(feats.shape[1]), "images_per_s": rate, "seconds_for_50000": FID_SAMPLES / rate}


# ------------------------------------------------------------------------------------------ projection
def rate_of(training: dict, name: str, setting: str | None) -> tuple[float | None, str | None]:
    """images/s of objective ``name`` at ``setting`` (its fastest correct one when None or not correct there)."""
    if name not in training:
        return None, None
    variants = training[name]["variants"]
    v = variants.get(setting) if setting else None
    if not (v and v["status"] == "ok" and v["check"]["correct"]):
        setting = training[name]["fastest_correct"]
        v = variants.get(setting) if setting else None
    return (v["images_per_s"], setting) if v else (None, None)


def project(bench: Bench, training: dict, rollouts: dict | None, recommended: dict) -> dict:
    c = bench.cfg
    mid_images = float(c.midtrain.train.steps * c.midtrain.train.batch_size)
    post_images = float(c.posttrain.train.steps * c.posttrain.train.batch_size)
    trajectories = float(c.rollout.num_trajectories)
    setting = (recommended.get("preset") or {}).get("setting")
    hours = lambda n, rate: n / rate / 3600 if rate else None
    mid_rate, mid_setting = rate_of(training, "cmt_midtrain", setting)
    post = {}
    for name in ("ect", "ecd", "meanflow"):
        rate, used = rate_of(training, name, setting)
        post[name] = {"images_per_s": rate, "setting": used, "gpu_hours": hours(post_images, rate)}
    out = {"gpu": bench.device_name, "is_cuda_measurement": bench.cuda,
           "budget": {"midtrain_images": mid_images, "posttrain_images": post_images,
                      "rollout_trajectories": trajectories, "batch_size": c.midtrain.train.batch_size,
                      "solver_steps": c.rollout.solver.steps, "online_trajectories_per_batch": ONLINE_TRAJECTORIES},
           "midtrain": {"images_per_s": mid_rate, "setting": mid_setting, "gpu_hours": hours(mid_images, mid_rate)},
           "posttrain": post, "recipe_posttrain": c.posttrain.method,
           "formulas": {
               "gpu_hours": "images / (images/s) / 3600",
               "rollouts_gpu_hours": "rollout_trajectories / (trajectories/s with the store, the better of sequential "
                                     "and overlapped) / 3600",
               "store_path_total": "rollouts + midtrain + posttrain[recipe_posttrain]",
               "online_step_s": "batch_size / midtrain images/s + the measured solve of 8 trajectories x 16 steps "
                                "(one batch of 128 pairs)",
               "online_midtrain_gpu_hours": "midtrain_images / batch_size * online_step_s / 3600",
               "online_total": "online_midtrain + posttrain[recipe_posttrain] (no rollouts stage)"}}
    if not bench.cuda:
        out["note"] = "rates measured on CPU at tiny sizes: the hours are not a GPU projection"
    if "edm_teacher" in training:
        rate, used = rate_of(training, "edm_teacher", setting)
        teach = c.teacher.train
        out["teacher_pretraining"] = {"images": float(teach.steps * teach.batch_size), "images_per_s": rate,
                                      "setting": used, "gpu_hours": hours(teach.steps * teach.batch_size, rate),
                                      "note": "not part of the budget: the recipe loads EDM's released teacher"}
    post_hours = post.get(c.posttrain.method, {}).get("gpu_hours")
    if rollouts:
        best = rollouts[rollouts["best_with_store"]]
        roll_hours = trajectories / best["trajectories_per_s"] / 3600
        out["rollouts"] = {"trajectories_per_s": best["trajectories_per_s"], "arm": rollouts["best_with_store"],
                           "gpu_hours": roll_hours}
        if mid_rate and post_hours is not None:
            store_total = roll_hours + out["midtrain"]["gpu_hours"] + post_hours
            batch = c.midtrain.train.batch_size
            solve_s = rollouts["online_solve"]["seconds_per_batch"]
            step_s = batch / mid_rate + solve_s
            online_mid = mid_images / batch * step_s / 3600
            out["store_path_total_gpu_hours"] = store_total
            out["online"] = {"solve_seconds_per_batch": solve_s, "step_seconds": step_s,
                             "midtrain_gpu_hours": online_mid, "total_gpu_hours": online_mid + post_hours}
            out["online_over_store_path"] = (online_mid + post_hours) / store_total
    return out


# ------------------------------------------------------------------------------------------ main
def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), count=torch.cuda.device_count(),
                    capability=list(torch.cuda.get_device_capability(device)), total_memory_bytes=props.total_memory,
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info["name"] = f"CPU: {info['cpu']}"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny U-Net and sizes (what the test runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output JSON (default {OUT.relative_to(ROOT)}; with --quick a temporary file)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", choices=tuple(COMPILE_POLICIES), default=None,
                        help="torch.compile: " + "; ".join(f"{k}: {v}" for k, v in COMPILE_POLICIES.items())
                        + " (default: best; with --quick: fp32)")
    parser.add_argument("--compile-objectives", nargs="+", choices=OBJECTIVES, default=None,
                        help="objectives to compile (default: all; with --quick: edm_teacher)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = "fp32" if args.quick else "best"
    if args.compile_objectives is None:
        args.compile_objectives = ["edm_teacher"] if args.quick else list(OBJECTIVES)
    if uses_cuda(args.device) and not torch.cuda.is_available():
        print("--device cuda: no GPU is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if uses_cuda(args.device) else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not args.quick and device.type != "cuda":
        print("full sizes need a GPU (the cifar10 U-Net at batch 128); use --quick on a CPU", file=sys.stderr)
        return 2
    threads = args.cpu_threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out_path = args.out or (Path(tempfile.gettempdir()) / "cmt-gpu-quick.json" if args.quick else OUT)
    sizes = QUICK if args.quick else FULL
    started = now()
    result = {"benchmark": "gpu", "quick": args.quick, "complete": False, "device": device_info(device),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "python": platform.python_version(),
                           "packages": package_versions(("cmt", "torch", "torchvision", "triton", "zarr", "numcodecs",
                                                         "numpy", "lpips", "clean-fid"))},
              "tf32_defaults": _tf32_settings() if device.type == "cuda" else None,
              "memory_kind": "cuda_max_memory_allocated (per variant, reset before it)" if device.type == "cuda" else
                             "cpu_process_rss_high_water (ru_maxrss after the variant; never decreases during the run)",
              "correctness": {"reference": REFERENCE.name + " eager (TF32 off)", "rtol": RTOL,
                              "dropout_sigmas": DROPOUT_SIGMAS,
                              "rule": "every loss finite and |check loss - reference's| <= rtol[precision] * "
                                      "|reference's| + dropout_sigmas * std(reference's check loss over other dropout "
                                      "masks); the check loss is the objective's loss of step 0's batch, times and "
                                      "noises at the initial weights (Mean Flow: without its adaptive weight, which "
                                      "maps every loss to about 1)"},
              "compile": {"policy": args.compile, "objectives": args.compile_objectives,
                          "what": "nn.Module.compile() of the raw U-Net (and of ECD's teacher), inductor, default "
                                  "mode; the preconditioning, loss and optimizer run eagerly"}}

    def write(**extra) -> None:
        result.update(extra, seconds=now() - started, written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    def log(text: str) -> None:
        print(f"[{now() - started:7.1f} s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="cmt-gpu-bench-") as tmp:
        bench = Bench(args, sizes, device, Path(tmp))
        bench.device_name = result["device"]["name"]
        params = sum(p.numel() for p in bench.base["consistency"].parameters())
        result["config"] = {"preset": PRESET, "network_overrides": list(sizes.network),
                            "network": bench.cfg.network.model_dump(mode="json"), "sample_shape": list(SAMPLE_SHAPE),
                            "parameters": params, "sizes": {k: v for k, v in sizes.__dict__.items() if k != "store"},
                            "weights": "random: the library's initialisation re-drawn at Xavier scale 1 "
                                       "(trained_scale)"}
        log(f"{bench.device_name}: {params:,} parameters; rollouts")
        failed = []

        def section(name: str, fn, describe=None) -> None:
            """``result[name] = fn()``; a failure is recorded there and the run goes on."""
            t0 = now()
            try:
                result[name] = fn()
                if describe:
                    log(f"{name}: {describe(result[name])}")
            except Exception as err:
                failed.append(name)
                result[name] = {"error": short_error(err), "traceback": traceback.format_exc(limit=-4)[-4000:]}
                log(f"{name} failed: {short_error(err)[:300]}")
            result[name]["section_seconds"] = now() - t0
            write()

        section("rollouts", lambda: bench_rollouts(bench, log))
        training, objectives = {}, bench.objectives()
        budgets = {n: o.budget_images for n, o in objectives.items()}
        for name, obj in objectives.items():
            t0 = now()
            training[name] = bench_eager(bench, obj, log)
            training[name]["fastest_correct"] = training[name]["fastest_correct_eager"]
            training[name]["eager_seconds"] = now() - t0
            write(training=training)
        preset_eager = (recommend(training, budgets, bench.cuda)["preset"] or {}).get("setting")
        for name, obj in objectives.items():
            t0 = now()
            bench_compiled(bench, obj, training[name], compile_targets(bench, name, training[name], preset_eager), log)
            training[name]["compile_seconds"] = now() - t0
            write(training=training)
        result["recommended_cuda_default"] = recommend(training, budgets, bench.cuda)
        log(f"recommended for the preset: {result['recommended_cuda_default']['preset']}")
        write()
        section("sampling", lambda: bench_sampling(bench),
                lambda r: f"{r['1_step']['images_per_s']:.1f} / {r['2_step']['images_per_s']:.1f} img/s at 1 / 2 steps")
        section("inception", lambda: bench_inception(bench), lambda r: f"{r['images_per_s']:.1f} img/s")
        rollouts = result["rollouts"] if "error" not in result["rollouts"] else None
        section("projection", lambda: project(bench, training, rollouts, result["recommended_cuda_default"]))
    result["load_average_end"] = os.getloadavg()
    write(complete=True, failed_sections=failed)
    log(f"wrote {out_path}" + (f"; failed sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
