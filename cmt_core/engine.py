"""The engine that runs declared stages as cached, resumable artifacts; the stages themselves are in
``cmt_core.stages``.

A ``Stage`` declares the config fields it ``reads`` (they decide its output, so they are its identity), the
fields it only ``uses`` (batch sizes for speed, where files live, the dask cluster: they never change its output)
and the stages it ``needs``. From a set of declarations and a config:

* ``make_plan(cfg, stages)``: each stage's artifact id = hash(stage, its ``reads`` values, its inputs' ids,
  format), its input ids, in dependency order, and where each artifact lives; computed once per run and handed
  down (``Plan``), it also remembers the artifacts found complete during the run;
* a stage's body sees the config through a ``ConfigView`` restricted to ``reads + uses``: reading any other field
  raises ``UndeclaredRead``, so an id can never miss a field its stage reads;
* ``complete_result(plan, stage)`` is the one place that decides whether a stage is done (its manifest is written,
  of a manifest's shape, and every file it records is intact and sound: the stage's ``sound`` check);
  ``compute_stage(plan, stage, runtime)`` returns that artifact at once, or computes it in
  ``<artifact_root>/<stage>/<id>/`` (training stages resume from their checkpoints) under the artifact's lock,
  checks its outputs are sound, and writes the manifest last: nothing unsound is ever marked complete.
  A manifest's ``seconds`` is the wall time of every call that worked on the artifact (``CallTimer``): a call
  killed or failed before it finished counts up to its last heartbeat, and work it lost counts again when redone.

Entry points check their inputs first (``cmt_core.preflight``) and run stages through ``cmt_core.pipeline``.
A failure while a stage computes is raised as ``StageError`` naming the stage, its folder and the next step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cmt_core import object_storage as remote
from cmt_core.artifacts import (
    MANIFEST,
    STORE_DIR,
    ManifestError,
    artifact_dir,
    artifact_id,
    artifact_lock,
    read_call_seconds,
    read_manifest,
    verify_files,
    write_call_seconds,
    write_manifest,
)
from cmt_core.errors import InputFileError, StageError, describe
from cmt_core.runtime import Runtime, effective_precision
from cmt_core.training import Progress

log = logging.getLogger("cmt")


class UndeclaredRead(RuntimeError):
    """A stage read a config field that its declaration in ``cmt_core.stages`` does not list."""


class ConfigView:
    """Read-only view of a config restricted to dotted paths: a listed path gives the real value, a prefix
    of one gives a narrower view, anything else raises ``UndeclaredRead``."""

    __slots__ = ("_node", "_prefix", "_allowed", "_stage")

    def __init__(self, node, allowed: tuple[str, ...], stage: str, prefix: str = ""):
        self._node, self._allowed, self._stage, self._prefix = node, allowed, stage, prefix

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = self._prefix + name
        value = getattr(self._node, name)
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            return value
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(value, self._allowed, self._stage, path + ".")
        raise UndeclaredRead(f"stage {self._stage!r} reads the config field {path!r}, which its declaration in "
                             f"cmt_core/stages.py does not list (reads or uses)")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {self._prefix or '<root>'})"


@dataclass
class StageContext:
    """What a stage body gets: its config view, its artifact folder, its inputs' folders, where it runs.

    ``path`` and ``inputs`` are local folders holding the artifacts' files; ``location`` and ``input_locations``
    are where the artifacts are published, the same folders under a local root and URLs under an object-storage
    root (``cmt_core.object_storage``: the trajectory store is read and written there, in place)."""

    stage: str
    cfg: ConfigView
    path: Path
    inputs: dict[str, Path]
    runtime: Runtime
    location: Path | str
    input_locations: dict[str, Path | str]
    local_root: Path  # this machine's working root (feature caches)
    progress: Progress | None = None

    def input(self, stage: str) -> Path:
        return self.inputs[stage]

    def store(self, stage: str | None = None) -> Path | str:
        """The trajectory store of the input artifact ``stage``, or of this artifact (None)."""
        return remote.join(self.location if stage is None else self.input_locations[stage], STORE_DIR)


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # dotted config paths that decide the output: the stage's identity
    needs: Callable  # (config) -> the stages whose artifacts it reads
    work: Callable[[StageContext], dict]  # computes the artifact in ctx.path; returns the manifest's metrics
    uses: tuple[str, ...] = ()  # dotted config paths read that never change the output
    trains: bool = False  # a training loop (may run on several DDP processes)
    # (config) -> paths of ``reads``, or of fields inside them, that cannot change this config's output
    omit: Callable = lambda cfg: ()
    # (local folder, location, metrics) -> what makes the stage's outputs unsound (non-finite weights, a store that
    # does not verify), or None: checked before the manifest is written, and before a complete artifact is reused
    sound: Callable = lambda folder, location, metrics: None
    # (config) -> whether the body reads the data set's samples (preflight reads the data only for such stages)
    reads_samples: Callable = lambda cfg: True

    def declares(self, path: str) -> bool:
        """Whether the body may read ``path`` (it or a section above it is in ``reads`` or ``uses``)."""
        return any(path == r or path.startswith(r + ".") for r in self.reads + self.uses)


@dataclass
class StageResult:
    """A complete artifact: its files in the local folder ``path``; ``location``, where it is published (the same
    folder under a local root, a URL under an object-storage root)."""

    stage: str
    artifact_id: str
    path: Path
    manifest: dict
    cached: bool
    location: Path | str | None = None

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def _value(dumped: dict, path: str):
    for key in path.split("."):
        dumped = dumped[key]
    return dumped


def stage_config(cfg, stage: Stage) -> dict:
    """The values of the fields ``stage`` reads, by dotted path (what its id hashes besides its inputs);
    ``precision`` as the run will train in it ('auto' resolved on this machine, ``effective_precision``); the
    paths its ``omit`` names for this config left out (a read path, or a field inside a section read whole)."""
    dumped = cfg.model_dump(mode="json")
    dumped["precision"] = effective_precision(cfg.device, cfg.precision)
    left_out = set(stage.omit(cfg))
    out = {path: _value(dumped, path) for path in stage.reads if path not in left_out}
    for path in left_out:
        section = next((r for r in out if path.startswith(r + ".")), None)
        if section is not None:
            *parents, name = path[len(section) + 1:].split(".")
            inner = out[section]
            for key in parents:
                inner = inner[key]
            inner.pop(name)
    return out


@dataclass
class Plan:
    """One run's stage graph resolved for ``cfg``: ids, inputs, folders; and the complete artifacts met so far."""

    cfg: object  # the PipelineConfig
    stages: dict[str, Stage]
    ids: dict[str, str]  # stage -> artifact id
    inputs: dict[str, dict[str, str]]  # stage -> {needed stage: its artifact id}
    done: dict[str, StageResult] = field(default_factory=dict)  # complete artifacts found or made in this run
    refused: set[str] = field(default_factory=set)  # complete artifacts found unsound (named once, recomputed)

    def path(self, stage: str) -> Path:
        """The local folder of ``stage``'s artifact (under an object-storage root: its mirror)."""
        return artifact_dir(self.cfg.local_root, stage, self.ids[stage])

    def location(self, stage: str) -> Path | str:
        """Where ``stage``'s artifact is published: its folder, or its URL under an object-storage root."""
        return remote.join(self.cfg.artifact_root, stage, self.ids[stage])

    def needed(self, targets) -> list[str]:
        """``targets`` and every stage they need, transitively, in pipeline order."""
        needed, todo = set(), list(targets)
        while todo:
            stage = todo.pop()
            if stage not in needed:
                needed.add(stage)
                todo.extend(self.inputs[stage])
        return [s for s in self.stages if s in needed]

    def config(self, stage: str) -> dict:
        return stage_config(self.cfg, self.stages[stage])


def make_plan(cfg, stages: dict[str, Stage]) -> Plan:
    """Every stage's artifact id and input ids, resolved in dependency order (``stages`` is ordered)."""
    ids, inputs = {}, {}
    for name, stage in stages.items():
        inputs[name] = {n: ids[n] for n in stage.needs(cfg)}
        ids[name] = artifact_id(name, stage_config(cfg, stage), inputs[name])
    return Plan(cfg, stages, ids, inputs)


def complete_result(plan: Plan, stage: str) -> StageResult | None:
    """The complete artifact of ``stage`` (its manifest is written and every file it records is intact), or
    None; an artifact that fails verification is named in a warning and will be recomputed. Under an
    object-storage root the check is made at the URL (sizes from one listing; the sha256 of each file is checked
    when it is fetched) and the files are not fetched (``reuse``). A complete artifact is remembered in the plan."""
    if stage in plan.done:
        return plan.done[stage]
    if stage in plan.refused:
        return None
    path, location, cfg = plan.path(stage), plan.location(stage), plan.cfg
    try:
        manifest = read_manifest(path) if cfg.remote_root is None else remote.remote_manifest(location)
    except ManifestError as err:
        log.warning("%s: %s; the artifact will be recomputed", stage, err)
        plan.refused.add(stage)
        return None
    if manifest is None:
        return None
    if cfg.remote_root is None:  # the files are here: their sizes, hashes, and soundness
        problem = verify_files(path, manifest) or plan.stages[stage].sound(path, location, manifest["metrics"])
    else:  # the files are fetched (and their hashes checked) when reused
        problem = remote.verify_remote(location, manifest)
    if problem is not None:
        log.warning("%s: the complete artifact %s fails verification (%s); it will be recomputed", stage, location,
                    problem)
        plan.refused.add(stage)
        return None
    plan.done[stage] = StageResult(stage, plan.ids[stage], path, manifest, cached=True, location=location)
    return plan.done[stage]


def reuse(result: StageResult) -> StageResult:
    """``result`` with its files in its local folder: under an object-storage root they are fetched into the
    mirror (the store stays at the URL); a no-op under a local root."""
    if remote.is_url(result.location):
        remote.fetch_artifact(result.location, result.path)
    return result


HEARTBEAT_S = 10.0  # how often a working call writes its seconds so far: a SIGKILL loses at most this much


class CallTimer:
    """Times one call's work on the unfinished artifact at ``path`` into its ledger (``SECONDS_LEDGER``) beside
    the earlier calls' (killed and failed ones included): written when the call starts, every ``heartbeat``
    seconds by a daemon thread, and when it ends, however it ends. ``calls()``: every call's seconds so far,
    this one's last (fixed when it ends). A ledger that cannot be written (a full disk) only costs the figure."""

    def __init__(self, path: Path, heartbeat: float = HEARTBEAT_S):
        self.path, self.heartbeat = Path(path), heartbeat
        self.before = read_call_seconds(self.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cmt-call-timer", daemon=True)
        self.t0 = self.end = None

    def calls(self) -> list[float]:
        return [*self.before, (self.end or time.perf_counter()) - self.t0]

    def _write(self) -> None:
        try:
            write_call_seconds(self.path, self.calls())
        except OSError as err:
            log.warning("could not write the seconds ledger of %s: %s", self.path, describe(err))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self._write()

    def __enter__(self) -> CallTimer:
        self.t0 = time.perf_counter()
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = time.perf_counter()
        self._write()


def compute_stage(plan: Plan, stage: str, runtime: Runtime, progress: Progress | None = None) -> StageResult:
    """Return the complete artifact of ``stage``, or compute it (its inputs must be complete).

    The main process holds the artifact's lock while it computes: a second run of the same stage waits, then
    finds the artifact complete and reuses it. A failure while computing raises ``StageError``
    (``InputFileError`` for an input file found unusable) and marks nothing complete."""
    done = complete_result(plan, stage)
    if done is not None:
        log.info("%s: complete artifact %s, nothing to do", stage, done.location)
        return reuse(done)
    cfg = plan.cfg
    needed = {n: complete_result(plan, n) for n in plan.inputs[stage]}
    missing = [n for n, result in needed.items() if result is None]
    if missing:
        raise RuntimeError(f"stage {stage!r} needs the complete artifacts of {missing}; run them first "
                           f"(run_pipeline, or `cmt stage {missing[0]}`)")
    inputs = {n: reuse(result).path for n, result in needed.items()}
    declared = plan.stages[stage]
    path, location = plan.path(stage), plan.location(stage)
    waiting = f"{stage}: another run is computing {path}; waiting for it, then reusing its result"
    with artifact_lock(path, waiting) if runtime.is_main else contextlib.nullcontext():
        runtime.barrier()
        done = complete_result(plan, stage)
        if done is not None:
            log.info("%s: computed by another run meanwhile, reusing %s", stage, done.location)
            return reuse(done)
        if runtime.is_main:
            (path / MANIFEST).unlink(missing_ok=True)  # a manifest that failed verification: recompute
            if cfg.remote_root is not None:
                remote.remove_manifest(location)
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.rglob(".*.tmp"):  # left by a killed writer (``publish``); we hold the lock
                stale.unlink()
        runtime.barrier()
        view = ConfigView(cfg, declared.reads + declared.uses, stage)
        locations = {n: result.location for n, result in needed.items()}
        with CallTimer(path) if runtime.is_main else contextlib.nullcontext() as timer:
            try:
                metrics = declared.work(StageContext(stage, view, path, inputs, runtime, location, locations,
                                                     cfg.local_root, progress))
            except (InputFileError, StageError):
                raise
            except Exception as err:
                raise StageError(f"the {stage} stage failed in {path}: {describe(err)}. "
                                 f"Nothing was marked complete; remove the cause and rerun: the stage resumes from "
                                 f"its last checkpoint") from err
            runtime.barrier()
            problem = declared.sound(path, location, metrics)  # every rank decides alike
            if problem is not None:
                raise StageError(f"the {stage} stage produced unsound output in {path}: {problem}. Nothing was "
                                 "marked complete; remove the cause (a setting, a damaged input) and rerun")
        if runtime.is_main:
            in_place = remote.store_records(location) if cfg.remote_root is not None else None
            write_manifest(path, stage, plan.ids[stage], plan.config(stage), plan.inputs[stage], metrics,
                           timer.calls(), device=str(runtime.device), elsewhere=in_place)
            if cfg.remote_root is not None:
                remote.publish_artifact(path, location)
        runtime.barrier()
    result = StageResult(stage, plan.ids[stage], path, read_manifest(path), cached=False, location=location)
    plan.done[stage] = result
    return result
