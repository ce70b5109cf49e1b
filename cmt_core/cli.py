"""The ``cmt`` command line (the library path: no Prefect needed).

    cmt run --preset digits [--set midtrain.train.lr=1e-4 ...] [--config cfg.yaml] [--artifact-root DIR]
    cmt stage midtrain --config cfg.yaml        # one stage (e.g. under torchrun for DDP)
    cmt launch midtrain --config cfg.yaml       # this node's torchrun agent for a stage (the config's launch)
    cmt config --preset toy > toy.yaml          # print a preset as YAML to edit (with its store size)
    cmt store verify PATH [--repair]            # check a trajectory store (a folder or s3://...); --repair: local
    cmt compare --preset toy --seeds 3          # CMT vs teacher vs random initialisation (cmt_core.comparison)
    cmt compare --preset toy --inits cmt teacher random ect --target '2step<=1.1x'   # cost to a quality (savings)
    cmt compare --preset toy --seeds 3 --run-seeds 1 --target '2step<=1.1x'   # one seed here, merged with the others
    cmt sample MODEL --out DIR -n 50000 --steps 2   # draw images from a trained generator (cmt_core.sampling)
    cmt export MODEL --out DIR                  # safetensors + generator.json, read by cmt_core.load_generator
    cmt fid SAMPLES --ref REF [--inception PATH]    # FID / FD-digits / FD-pixels against reference statistics
    cmt watch --preset digits                   # score the latest checkpoint of every training stage of a run

The terminal shows progress bars, this package's messages and other libraries' warnings; everything
(dask's INFO logs included) goes to the run's log file ``<artifact_root>/logs/<time>-<command>.log`` (under an
object-storage root ``s3://...``: in its local mirror, ``cache_root``).

Exit codes: 0 done; 2 bad input (a config value, a file, the device: one line naming the field, the value
and what is allowed, nothing written); 1 a failure while a stage computed (one line naming the stage, its
folder, the cause and the next step; the traceback in the log file, and on the terminal with ``--debug``).
``cmt-flow`` (``flows.cli``) shares the parser, the logging and the printing defined here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from cmt_core.artifacts import LATENTS_DIR, LOGS_DIR
from cmt_core.comparison import CompareConfig, arm_config, run_comparison
from cmt_core.config import load_yaml
from cmt_core.engine import compute_stage
from cmt_core.errors import (
    PreflightError,
    StageError,
    brief,
    config_error,
    config_message,
    describe,
    failure_exit,
)
from cmt_core.methods import names
from cmt_core.preflight import check_root, preflight
from cmt_core.presets import PRESETS, resolve_config
from cmt_core.runtime import Runtime, torchrun_command
from cmt_core.savings import run_savings
from cmt_core.stages import PIPELINE, STAGES, TRAINING_STAGES, plan


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the config options every command shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser)
    return parser


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--config", help="YAML pipeline config (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--artifact-root", help="where artifacts live (default: the config's artifact_root)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too")


def config_from_args(args):
    """The validated config of parsed ``add_config_args`` options (raises ``ValueError`` naming the field)."""
    return resolve_config(args.preset, args.set, load_yaml(args.config) if args.config else None, args.artifact_root)


class _ConsoleFilter(logging.Filter):
    """This package's INFO messages; WARNING and above from everyone else except Prefect's per-run loggers,
    whose lines (a failed task's traceback too) are in the log file and the Prefect UI."""

    RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "cmt":
            return True
        return record.levelno >= logging.WARNING and not record.name.startswith(self.RUN_LOGGERS)


class _ConsoleFormatter(logging.Formatter):
    """Messages without tracebacks: those go to the run's log file."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None}))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def console_logging() -> None:
    """This command's console (``_ConsoleFilter``, no tracebacks) as the only place log lines go: every command
    starts with it, so lines logged before a run's log file exists are shown as every other line is."""
    console = logging.StreamHandler()
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Prefect API request


def setup_logging(local_root: Path, command: str) -> Path:
    """Console: ``_ConsoleFilter``; the run's log file: everything at INFO. Returns the log file's path."""
    log_dir = Path(local_root) / LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    rank = f"-rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""  # torchrun
    log_file = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}{rank}.log"
    console_logging()
    file = logging.FileHandler(log_file)
    file.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(file)
    return log_file


def print_stage(result) -> None:
    state = "cached" if result.cached else f"computed in {result.manifest.get('seconds', 0):.1f}s"
    print(f"[{result.stage}] {state}  {result.location or result.path}")
    metrics = result.metrics
    if result.stage == "evaluation" and "rows" in metrics:
        for row in metrics["rows"]:
            values = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"    {row['model']:<40} NFE={row['NFE']:<3} {values}")
    elif metrics:
        print("    " + json.dumps(metrics, default=str))


def print_results(results: dict) -> None:
    """Every stage (computed or cached, metrics) and the path of the report."""
    for result in results.values():
        print_stage(result)
    if "evaluation" in results:
        print(f"report: {results['evaluation'].path / 'report.md'}")


def print_config(cfg) -> None:
    """The config as YAML, headed by the training budget of each stage (Mimg = steps x batch / 1e6, the
    reference's unit) and the size of its trajectory store."""
    from cmt_core.stages import model_space
    from cmt_core.trajectories.layout import sizing

    stages = {"mid-training": cfg.midtrain.train, "post-training": cfg.posttrain.train}
    if cfg.teacher.source == "pretrain":
        stages = {"teacher": cfg.teacher.train, **stages}
    else:
        print(f"# teacher: not trained here (teacher.source={cfg.teacher.source})")
    mimg = {name: t.steps * t.batch_size / 1e6 for name, t in stages.items()}
    for name, t in stages.items():
        print(f"# {name + ':':<15}{mimg[name]:>10.4g} Mimg ({t.steps:,} steps x batch {t.batch_size})")
    print(f"# {'mid + post:':<15}{mimg['mid-training'] + mimg['post-training']:>10.4g} Mimg")
    r = cfg.rollout
    try:
        shape = model_space(cfg)[0]  # a latent space's from the config alone
    except (OSError, ValueError):  # e.g. a CIFAR-10 folder that is not on this machine: the shape it will have
        side = cfg.data.resolution or (32 if cfg.data.name == "cifar10" else None)
        shape = (3, side, side) if side and cfg.data.name in ("cifar10", "image_folder") else None
        if shape is not None and cfg.data.encoder.kind == "sd_vae":  # SD's VAE, its folder not here: 4 x (side / 8)^2
            shape = (4, side // 8, side // 8)
    if shape is not None:
        size = sizing(shape, r.solver.steps + 1, r.num_trajectories, r.store.dtype, r.store.keep_indices)
        print(f"# trajectory store: {r.num_trajectories:,} trajectories x {size['states']} states of "
              f"{tuple(shape)}, {size['total_bytes'] / 1e9:.4g} GB uncompressed ({r.store.dtype})")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _compare(args) -> int:
    try:
        cc = CompareConfig(preset=args.preset, methods=args.methods, inits=args.inits, seeds=args.seeds,
                           run_seeds=args.run_seeds,
                           posttrain_steps=args.posttrain_steps, eval_every=args.eval_every, overrides=args.set,
                           targets=args.target, cap_factor=args.cap_factor, workers=args.workers,
                           artifact_root=args.artifact_root, out_dir=args.out,
                           **({} if args.baseline_set is None else {"baseline_overrides": args.baseline_set}))
        for method in cc.methods:  # every arm's config is valid before any arm runs
            for init in cc.inits:
                arm_config(cc, method, init, 0)
    except ValueError as err:
        return config_error(err)
    log_file = None
    try:
        check_root(arm_config(cc, cc.methods[0], "cmt", 0))
        log_file = setup_logging(cc.artifact_root, "compare")
        # every arm is checked before any runs; finished arms stay cached after a failure
        (run_savings if cc.targets else run_comparison)(cc)
    except Exception as err:
        return failure_exit(err, log_file, args.debug)
    name = f"savings_{cc.preset}" if cc.targets else f"init_comparison_{cc.preset}"
    print(f"results: {cc.out_dir / f'{name}.md'}\nlog: {log_file}")
    return 0


def _launch(cfg, stage: str) -> int:
    """``cmt launch STAGE``: this node's ``torchrun`` agent of ``cmt stage STAGE`` with the config written to a
    file beside the run logs; the same command on every node forms the job. Exit code: torchrun's."""
    import subprocess

    from cmt_core.config import save_yaml

    try:
        preflight(plan(cfg), [stage])
        folder = cfg.local_root / LOGS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        config_file = folder / f"launch-{stage}-{cfg.launch.rdzv_id}-{os.getpid()}.yaml"
        save_yaml(cfg, config_file)
    except Exception as err:
        return failure_exit(err)
    command = torchrun_command(cfg.launch, stage, config_file)
    print(" ".join(command), flush=True)
    return subprocess.run(command).returncode


def _sample(args) -> int:
    """``cmt sample``: draw a generator's images to files (``cmt_core.sampling``); exit code 2 for a bad request or
    a folder that is not a generator, one line naming it."""
    from pydantic import ValidationError

    from cmt_core.sampling import SampleJob, check_job, run_sampling

    given = {"model": args.model, "out": args.out, "num_samples": args.num_samples, "steps": args.steps,
             "seed": args.seed, "class_label": args.class_label, "labels_file": args.labels, "format": args.format,
             "batch_size": args.batch_size, "artifact_root": args.artifact_root, "device": args.device}
    try:
        job = SampleJob(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        print(config_message(err).replace("invalid configuration", "invalid sampling request"), file=sys.stderr)
        return 2
    try:
        checked = check_job(job)  # nothing is written (nor logged) for a bad request
        runtime = Runtime.detect(job.device)
        summary = run_sampling(job, runtime, checked)
    except Exception as err:  # GeneratorError (bad model, steps, labels, out): exit 2; anything else: 1
        return failure_exit(err, None, args.debug)
    if runtime.is_main:
        rate = summary["images_per_s"]
        print(f"{job.num_samples} images ({job.steps} step{'s' if job.steps > 1 else ''}) in {job.out}: "
              f"{summary['drawn']} drawn now in {summary['seconds']:.1f}s"
              + (f" ({rate:.1f} images/s per process on {summary['device']})" if rate else "")
              + (f"; {summary['npz']}" if summary["npz"] else ""))
    return 0


def _export(args) -> int:
    """``cmt export``: write a generator as safetensors weights and a JSON description (``cmt_core.generator``)."""
    from cmt_core.generator import export_generator, open_generator

    try:
        folder = export_generator(open_generator(args.model, args.artifact_root), args.out)
    except Exception as err:  # GeneratorError (not a generator, out is a file): exit 2; anything else: 1
        return failure_exit(err, None, args.debug)
    print(f"exported generator: {folder} (load with cmt_core.load_generator({str(folder)!r}))")
    return 0


def _latent_vgg(args) -> int:
    """``cmt latent-vgg``: the latent VGG16 of ELatentLPIPS trained with the reference's recipe on the config's
    encoded data set (its training split; the ``encoder`` and ``encode`` stages are computed or reused first)."""
    from cmt_core.data import load_data
    from cmt_core.data.encoded import WhitenedMeans
    from cmt_core.objectives.latent_lpips import train_latent_vgg

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        return config_error(err)
    log_file = None
    try:
        if cfg.data.encoder.kind == "identity" or not cfg.data.num_classes:
            raise PreflightError(f"cmt latent-vgg trains a classifier of latents: the config needs a latent space "
                                 f"(data.encoder.kind={cfg.data.encoder.kind!r}) and classes (data.num_classes="
                                 f"{cfg.data.num_classes})")
        resolved = plan(cfg)
        targets = resolved.needed(["encode"])
        preflight(resolved, targets)
        log_file = setup_logging(cfg.local_root, "latent-vgg")
        runtime = Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
        for stage in targets:
            compute_stage(resolved, stage, runtime)
        data = load_data(cfg.data, resolved.path("encoder"), resolved.path("encode") / LATENTS_DIR)
        out = train_latent_vgg(WhitenedMeans(data.latents, data.encoder), args.out, cfg.data.num_classes,
                               epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden, seed=args.seed,
                               device=runtime.device)
    except Exception as err:
        return failure_exit(err, log_file, args.debug)
    print(f"latent VGG16 weights: {out} (midtrain.distance=elatent_lpips, midtrain.lpips_backbone={out})")
    return 0


def _watch(args) -> int:
    """``cmt watch``: each training stage of the run the options describe, scored from its latest checkpoint (its
    kept model when finished; ``cmt_core.watch``); one line per stage."""
    from cmt_core.watch import watch

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        return config_error(err)
    try:
        rows = watch(plan(cfg), Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads))
    except Exception as err:
        return failure_exit(err, None, args.debug)
    for row in rows:
        scores = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k.endswith(("_1step", "_2step", "_teacher")))
        where = f" ({row['scored']})" if "scored" in row else ""
        print(f"{row['stage']:<10} {row['state']:<12} step {row['step']}/{row['steps']}{where}  {scores}"
              + (f"  error: {row['error']}" if "error" in row else ""))
    return 0


def _store(args) -> int:
    """``cmt store verify PATH [--repair]``: the store's report; exit code 0 when it is sound (after a repair)."""
    from cmt_core.trajectories.verify import verify_store

    report = verify_store(args.path)
    print(report.summary())
    if report.ok or not args.repair:
        return 0 if report.ok else 1
    from cmt_core.repair import repair_store

    try:
        shards = repair_store(args.path)
    except (ValueError, StageError) as err:  # nothing was changed (cmt_core.repair)
        print(f"cannot repair: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except Exception as err:  # the store and its manifest are as they were; the cause, on one line
        print(f"cannot repair: {describe(err)}", file=sys.stderr)
        return 1
    report = verify_store(args.path)
    print(f"recomputed {len(shards)} shards {shards[:20]}\n{report.summary()}")
    return 0 if report.ok else 1


def _fid(args) -> int:
    """``cmt fid SAMPLES --ref REF``: the Frechet distance between an image set and reference statistics
    (``cmt_core.evaluation.reference``) in the feature space of ``--inception`` weights (``FID (<mode>)``) or, without
    them, of the offline extractor for the images (``FD-digits`` for 8x8 grey images, else ``FD-pixels``); one line
    and a JSON line on stdout. Every input is checked before anything is computed or written: a bad one is one line on
    stderr naming it, exit code 2."""
    from cmt_core.artifacts import FEATURES_DIR
    from cmt_core.config import EvalConfig, PipelineConfig
    from cmt_core.evaluation.features import extractor_kind, feature_extractor
    from cmt_core.evaluation.frechet import feature_stats, frechet_distance_from_stats, save_stats
    from cmt_core.evaluation.reference import data_name, image_features, open_reference, read_images, reference_stats
    from cmt_core.preflight import check_path
    from cmt_core.runtime import uses_cuda

    def _path_kind(path: str) -> str:
        """What ``check_path`` requires a path to be: the folder it is, else a regular file."""
        return "dir" if os.path.isdir(path) else "file"

    try:
        cfg = PipelineConfig(**({"artifact_root": args.artifact_root} if args.artifact_root else {}))
        eval_cfg = EvalConfig(inception_path=args.inception, fid_mode=args.mode or "clean")
    except ValueError as err:
        return config_error(err)
    try:
        for flag, value in (("--num", args.num), ("--batch-size", args.batch_size)):
            if value is not None and value < 1:
                raise PreflightError(f"{flag}={value}: give a positive number of images")
        if args.mode is not None and args.inception is None:
            raise PreflightError(f"--mode={args.mode} says how Inception weights run; give them with --inception PATH")
        if args.device == "cuda" and not uses_cuda("auto"):
            raise PreflightError("--device=cuda but this machine has no usable CUDA device; use --device auto or cpu")
        samples = read_images(check_path("SAMPLES", args.samples, _path_kind(args.samples)), "SAMPLES")
        n = len(samples) if args.num is None else args.num
        if n > len(samples):
            raise PreflightError(f"--num={n}, but SAMPLES={brief(args.samples)} holds {len(samples)} images")
        if n < 2:
            what = f"--num={n}" if args.num is not None else f"SAMPLES={brief(args.samples)} holds 1 image"
            raise PreflightError(f"{what}: a Frechet distance needs at least 2 samples")
        samples = samples.subset(range(n)) if n < len(samples) else samples
        if args.inception is not None:
            check_path("--inception", args.inception, "file")
        data = data_name(samples.sample_shape)
        ref = check_path("--ref", args.ref, _path_kind(args.ref))
        open_reference(ref, "--ref", extractor_kind(data, eval_cfg), samples.sample_shape)
        check_root(cfg)
        out = None if args.save_ref is None else check_path("--save-ref", args.save_ref)
        if out is not None and out.is_dir():
            raise PreflightError(f"--save-ref={brief(args.save_ref)} is a folder; give the .npz file to write")
        device = "cuda" if uses_cuda(args.device) else "cpu"
        try:
            extractor = feature_extractor(data, eval_cfg, cfg.local_root / FEATURES_DIR, device)
        except Exception as err:
            if args.inception is None:
                raise
            raise PreflightError(f"--inception={brief(args.inception)} is not usable Inception weights for --mode "
                                 f"{eval_cfg.fid_mode}: {describe(err)}") from err
        batch = args.batch_size or eval_cfg.batch_size
        stats = feature_stats(image_features(samples, extractor, batch, "SAMPLES", args.samples))
        reference = reference_stats(ref, "--ref", extractor, samples.sample_shape, cfg.local_root / FEATURES_DIR,
                                    batch)
        value = frechet_distance_from_stats(stats, reference.stats)
        if out is not None:
            save_stats(out, reference.stats)
    except Exception as err:  # bad input (PreflightError, InputFileError): exit 2; anything else: 1
        return failure_exit(err, None, args.debug)
    info = extractor.info()
    details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                        if k != "extractor")
    print(f"{extractor.name}: {value:.6g} ({n} samples vs reference {args.ref} ({reference.source}), extractor "
          f"{details}, device {device})")
    print(json.dumps({"metric": extractor.name, "value": value, "num_samples": n,
                      "samples": str(Path(args.samples).resolve()), "reference": str(ref),
                      "reference_source": reference.source,
                      "reference_cache": None if reference.cache is None else str(reference.cache),
                      "saved_reference": None if out is None else str(out), "device": device, **info}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmt", description="Consistency mid-training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_args(sub.add_parser("run", help="run the whole pipeline"))
    add_config_args(stage := sub.add_parser("stage", help="run one stage"))
    stage.add_argument("name", choices=list(STAGES))
    add_config_args(launch := sub.add_parser("launch", help="run a training stage under this node's torchrun agent "
                                             "(launch.nodes, procs_per_node, rdzv_endpoint, rdzv_id)"))
    launch.add_argument("name", choices=list(TRAINING_STAGES))
    add_config_args(sub.add_parser("config", help="print the resolved config as YAML"))
    store = sub.add_parser("store", help="trajectory store tools")
    store.add_argument("action", choices=["verify"])
    store.add_argument("path")
    store.add_argument("--repair", action="store_true", help="recompute bad or missing shards from their seeds "
                       "(the store of a rollouts artifact), then verify again")
    fid = sub.add_parser("fid", help="Frechet distance of an image set to reference statistics: FID with Inception "
                         "weights (--inception), else FD-digits (8x8 grey images) or FD-pixels")
    fid.add_argument("samples", help="a folder of PNG images (EDM's layout: searched recursively) or an .npz whose "
                     "arr_0 is uint8 (N, H, W, C)")
    fid.add_argument("--ref", required=True, help="a mu/sigma .npz (EDM's fid-refs), or images as SAMPLES, whose "
                     "statistics are cached in the artifact root's features folder")
    fid.add_argument("--inception", help="local clean-fid Inception weights (inception-2015-12-05.pt; for "
                     "legacy_pytorch pytorch-fid's .pth): the metric is FID")
    fid.add_argument("--mode", choices=["clean", "legacy_tensorflow", "legacy_pytorch"],
                     help="how the --inception weights run, as clean-fid's modes (default clean)")
    fid.add_argument("--num", type=int, help="score the first N samples (default: all)")
    fid.add_argument("--batch-size", type=int, help="images per feature batch (default 500)")
    fid.add_argument("--artifact-root", help="where reference statistics and the digits classifier are cached "
                     "(its features folder; default artifacts)")
    fid.add_argument("--save-ref", metavar="OUT.npz", help="also write the reference statistics as a mu/sigma .npz")
    fid.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    fid.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too")
    add_config_args(sub.add_parser("watch", help="score the latest checkpoint of every training stage of a run "
                                   "(the kept model when finished); starts nothing"))
    sample = sub.add_parser("sample", help="draw N images from a trained generator to PNG files and/or an .npz "
                            "(under torchrun: sharded over the processes)")
    sample.add_argument("model", help="an exported generator's folder, a midtrain / posttrain artifact folder, or "
                        "the artifact id of one under --artifact-root")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("-n", "--num-samples", type=int, help="images 0 .. N-1 (default 50000)")
    sample.add_argument("--steps", type=int, help="network calls per image (default 1)")
    sample.add_argument("--seed", type=int, help="noise seed (default 0): image i's noise depends on (seed, i) only")
    sample.add_argument("--class", dest="class_label", type=int, help="class-conditional: every image this class")
    sample.add_argument("--labels", help="class-conditional: a .npy or text file of one class per image")
    sample.add_argument("--format", choices=["png", "npz", "both"], help="PNG folder (EDM's layout), samples.npz "
                        "(uint8 NHWC, the ADM evaluator's format) or both (default png)")
    sample.add_argument("--batch-size", type=int, help="images per network call (default 256; multiples of 64)")
    sample.add_argument("--artifact-root", help="where artifact ids are looked up (default artifacts)")
    sample.add_argument("--device", choices=["auto", "cpu", "cuda"])
    sample.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too")
    export = sub.add_parser("export", help="write a trained generator as safetensors weights + generator.json")
    export.add_argument("model", help="a midtrain / posttrain artifact folder, its artifact id, or an exported "
                        "generator")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--artifact-root", default="artifacts", help="where artifact ids are looked up")
    export.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too")
    add_config_args(vgg := sub.add_parser("latent-vgg", help="train ELatentLPIPS's latent VGG16 as a classifier of "
                                          "the config's encoded data set (the reference's recipe); writes the file "
                                          "midtrain.lpips_backbone names"))
    vgg.add_argument("--out", required=True, help="the weights file to write (.safetensors or a torch state dict)")
    vgg.add_argument("--epochs", type=int, default=100, help="passes over the training split (reference: 100)")
    vgg.add_argument("--batch-size", type=int, default=256, help="reference: 256")
    vgg.add_argument("--hidden", type=int, default=4096, help="the classifier head's width (reference: 4096)")
    vgg.add_argument("--seed", type=int, default=0)
    compare = sub.add_parser("compare", help="post-train from CMT, teacher and random weights (and vanilla ECT) and "
                             "compare, at one budget or (--target) until a quality")
    defaults = {name: field.default for name, field in CompareConfig.model_fields.items()}
    compare.add_argument("--preset", default=defaults["preset"], choices=sorted(PRESETS))
    compare.add_argument("--methods", nargs="+", default=list(defaults["methods"]), choices=names("posttrain"),
                         help="post-training methods: each arm's preset is <preset>-<method> when that preset "
                         "exists, else <preset>")
    compare.add_argument("--inits", nargs="+", default=list(defaults["inits"]))
    compare.add_argument("--seeds", type=int, default=defaults["seeds"])
    compare.add_argument("--run-seeds", type=int, nargs="+", metavar="SEED",
                         help="target mode: compute only these of seeds 0 .. --seeds - 1 (e.g. one per machine); "
                         "the summary also reads the other seeds' records from --out")
    compare.add_argument("--posttrain-steps", type=int, help="post-training steps of every arm (default: preset's)")
    compare.add_argument("--eval-every", type=int, help="evaluation cadence of every arm (default: preset's)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    compare.add_argument("--baseline-set", action="append", metavar="KEY=VALUE",
                         help="override for the teacher- and random-initialised arms only, repeatable (default: "
                         "posttrain.ect.start_stage=0, ECT's schedule from its first stage)")
    compare.add_argument("--target", action="append", default=[], metavar="SPEC",
                         help="target-quality mode, repeatable: every arm trains until it meets each target or its "
                         "cap, e.g. --target '2step<=1.1x' (1.1 times the teacher's score) --target '1step<=13'")
    compare.add_argument("--cap-factor", type=float, default=defaults["cap_factor"],
                         help="target mode: the other arms' caps are at least this many times the CMT path's cost")
    compare.add_argument("--workers", type=int, default=defaults["workers"],
                         help="processes running independent arms at once")
    compare.add_argument("--artifact-root", default=defaults["artifact_root"])
    compare.add_argument("--out", default=defaults["out_dir"], help="folder of the tables, plots and JSON")
    compare.add_argument("--debug", action="store_true", help="print the traceback of a failure on the terminal too")
    args = parser.parse_args(argv)
    console_logging()

    if args.command == "compare":
        return _compare(args)
    if args.command == "store":
        return _store(args)
    if args.command == "fid":
        return _fid(args)
    if args.command == "sample":
        return _sample(args)
    if args.command == "watch":
        return _watch(args)
    if args.command == "export":
        return _export(args)
    if args.command == "latent-vgg":
        return _latent_vgg(args)
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # pydantic's ValidationError is a ValueError: name the bad fields
        return config_error(err)
    if args.command == "config":
        try:
            print_config(cfg)
        except BrokenPipeError:  # `cmt config ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    if args.command == "launch":
        return _launch(cfg, args.name)
    log_file = None  # every path is handled below, where a failure is one line and an exit code
    try:
        resolved = plan(cfg)  # once for the run, handed to every stage
        targets = [args.name] if args.command == "stage" else resolved.needed(PIPELINE)
        preflight(resolved, targets)  # nothing is written for bad input, not even a log file
        log_file = setup_logging(cfg.local_root, args.command)
        runtime = Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
        results = {stage: compute_stage(resolved, stage, runtime) for stage in targets}
    except Exception as err:  # bad input, a stage that failed (StageError), inputs that are not complete
        return failure_exit(err, log_file, args.debug)
    if runtime.is_main:
        print_results(results)
        print(f"log: {log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
