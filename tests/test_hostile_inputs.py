"""Hostile and careless inputs, by class (RELIABILITY.md): paths that are not what they seem, values that validate
but cannot run, files read by late stages, metadata that lies, repairs that cannot be done, worker failures.

Each case runs through the command line (``cmt run``, ``cmt store verify [--repair]``) and asserts its exit code,
one line on the terminal naming the field or the file, no traceback, nothing marked complete that is not sound, no
code run from a file, and an answer within 60 s; the cases expressible as flow parameters run again through the
Prefect API (a ``cmt-pipeline`` flow run that fails with the same line)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmt_core.artifacts import MANIFEST, file_records, read_manifest
from cmt_core.cli import main as cmt
from cmt_core.presets import get_preset
from cmt_core.trajectories.store import open_store
from cmt_core.trajectories.verify import VERIFIED
from tests.test_bad_inputs import MARKER, RunsCode
from tests.test_config import write_fake_cifar10
from tests.test_distances import write_random_vgg16
from tests.test_edm2 import tiny, trained_looking, write_edm2_pickle
from tests.test_edm_pickle import install_edm_module_stand_ins

TOY = ["teacher.train.steps=20", "rollout.num_trajectories=128", "rollout.batch_size=64",
       "rollout.store.chunk_trajectories=16", "rollout.store.shard_chunks=2", "rollout.cluster.workers=1",
       "midtrain.train.steps=20", "midtrain.train.eval_every=10", "posttrain.train.steps=20",
       "posttrain.train.eval_every=10", "eval.num_samples=100", "eval.batch_size=100", "eval.mid_sigma_search=[0.5]"]
DIGITS = ["teacher.train.steps=5", "rollout.num_trajectories=64", "midtrain.train.steps=5", "posttrain.train.steps=5",
          "eval.num_samples=50", "eval.num_seed_sets=1", "eval.mid_sigma_search=[0.5]"]
LONG = "n" * 300  # a name over every common file system's limit of 255 bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The odd files and folders the cases point at."""
    folder = tmp_path_factory.mktemp("hostile")
    os.mkfifo(folder / "fifo")
    (folder / "loop1").symlink_to(folder / "loop2")
    (folder / "loop2").symlink_to(folder / "loop1")
    np.savez(folder / "zero.npz", images=np.zeros((0, 8, 8, 1), dtype=np.uint8))
    np.savez(folder / "one.npz", images=np.zeros((1, 8, 8, 1), dtype=np.uint8))
    np.savez(folder / "unlabelled.npz", images=np.zeros((20, 8, 8, 1), dtype=np.uint8))  # digits-like, no labels
    np.savez(folder / "labels9.npz", images=np.zeros((20, 8, 8, 1), dtype=np.uint8), labels=np.arange(20) % 10)
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": RunsCode()}, folder / "runs_code.pt")
    torch.save({"classifier.0.weight": torch.zeros(3)}, folder / "not_vgg.pth")
    write_random_vgg16(folder / "vgg16.pth")
    (folder / "pipe_images").mkdir()
    os.mkfifo(folder / "pipe_images" / "x.png")
    (folder / "a_folder").mkdir()
    write_fake_cifar10(folder)
    with pytest.MonkeyPatch.context() as patch:  # an EDM2 snapshot of 3x8x8 images with 5 classes
        write_edm2_pickle(folder / "edm2_8px.pkl", trained_looking(tiny()), install_edm_module_stand_ins(patch))
    for name, change in (("bogus_kind", {"kind": "bogus"}), ("huge_shape", {"sample_shape": [10**9]}),
                         ("wrong_width", {"network": {"width": 32}})):
        blob = torch.load(_teacher_file(folder), weights_only=True)
        if "network" in change:
            change = {"network": {**blob["network"], **change["network"]}}
        torch.save({**blob, **change}, folder / f"{name}.pt")
    return folder


def _teacher_file(folder: Path) -> Path:
    """A model file of ours for the toy data (written once)."""
    from cmt_core.config import NetworkConfig
    from cmt_core.models import build_model, save_model

    path = folder / "teacher.pt"
    if not path.exists():
        network = NetworkConfig(kind="mlp", width=16, depth=1, emb_dim=16).model_dump(mode="json")
        save_model(path, build_model("denoiser", network, (2,)), "denoiser", network, (2,))
    return path


def _checkpoint_teacher(name: str) -> list[str]:
    return ["teacher.source=checkpoint", f"teacher.path={{files}}/{name}", "network.width=16", "network.depth=1",
            "network.emb_dim=16"]


# --------------------------------------------------------------------------------------------- cases of `cmt run`
# id: (class, preset, overrides, words), refused with exit code 2 before anything is written; {files}: the fixture,
# {tmp}: the case's own folder; an override artifact_root=... replaces the case's root
RUN_CASES = {
    "root is a link loop": ("paths", "toy", ["artifact_root={files}/loop1"], "artifact_root"),
    "root name over the limit": ("paths", "toy", [f"artifact_root={{tmp}}/{LONG}"], "over the file system's limit"),
    "root under /proc": ("paths", "toy", ["artifact_root=/proc/cmt-artifacts"], "kernel's proc file system"),
    "a file named logs in the root": ("paths", "toy", ["artifact_root={tmp}/with_logs"], "named 'logs'"),
    "a file named features in the root": ("paths", "toy", ["artifact_root={tmp}/with_features"], "named 'features'"),
    "a file where a stage's folder goes": ("paths", "toy", ["artifact_root={tmp}/with_teacher"], "named 'teacher'"),
    "data file is a FIFO": ("paths", "digits", ["data.name=npz", "data.path={files}/fifo"], "FIFO"),
    "data file is a device": ("paths", "digits", ["data.name=npz", "data.path=/dev/zero"], "character device"),
    "data file under /proc": ("paths", "digits", ["data.name=npz", "data.path=/proc/self/environ"], "proc"),
    "data file is a link loop": ("paths", "digits", ["data.name=npz", "data.path={files}/loop1"], "data.path"),
    "data file name over the limit": ("paths", "digits", ["data.name=npz", f"data.path={{files}}/{LONG}.npz"],
                                      "over the file system's limit"),
    "image folder holding a FIFO only": ("paths", "digits", ["data.name=image_folder",
                                                            "data.path={files}/pipe_images"], "no PNG / JPEG"),
    "image folder path that is a plain file": ("paths", "digits", ["data.name=image_folder",
                                                                  "data.path={files}/garbage.pt"],
                                               "not a folder or a .zip archive"),
    "image folder path that is a FIFO": ("paths", "digits", ["data.name=image_folder", "data.path={files}/fifo"],
                                         "FIFO (named pipe), not a folder or a .zip archive"),
    "teacher file is a FIFO": ("paths", "toy", _checkpoint_teacher("fifo"), "teacher.path"),
    "teacher file is a folder": ("paths", "toy", _checkpoint_teacher("a_folder"), "not a regular file"),
    "LPIPS backbone is a FIFO": ("paths", "cifar10-tiny", ["data.path={files}/cifar-10-batches-py",
                                                          "midtrain.distance=lpips",
                                                          "midtrain.lpips_backbone={files}/fifo"], "FIFO"),
    "sigma_max overflows float32": ("values", "toy", ["rollout.solver.sigma_max=1e300"], "rollout.solver"),
    "sigma_max squared overflows float32": ("values", "toy", ["rollout.solver.sigma_max=1e20"], "squares overflow"),
    "sigma_min rounds to 0": ("values", "toy", ["rollout.solver.sigma_min=1e-300"], "round to 0"),
    "grid points coincide in float32": ("values", "toy", ["rollout.solver.sigma_min=79.9999",
                                                          "rollout.solver.steps=64"], "coincide"),
    "teacher sampler reaching 0 in float32": ("values", "toy", ["teacher.sampler.sigma_min=1e-50"], "teacher.sampler"),
    "2-step sigma overflows float32": ("values", "toy", ["eval.mid_sigma_search=[1e30]"], "eval.mid_sigma_search[0]"),
    "ECT step below float32's resolution": ("values", "toy", ["posttrain.ect.q=1e30"], "posttrain.ect"),
    "ECT stage past float32's resolution": ("values", "toy", ["posttrain.ect.start_stage=30"], "posttrain.ect"),
    "held-out fraction leaving no training data": ("values", "digits", ["data.heldout_fraction=0.9999"],
                                                   "leaving none to train on"),
    "held-out fraction leaving no held-out data": ("values", "digits", ["data.heldout_fraction=0.0001"],
                                                   "scoring needs at least 2"),
    "data file with no images": ("values", "digits", ["data.name=npz", "data.path={files}/zero.npz"], "no samples"),
    "data file with one image": ("values", "digits", ["data.name=npz", "data.path={files}/one.npz"],
                                 "data.heldout_fraction"),
    "class labels beyond data.num_classes": ("values", "digits", ["data.name=npz", "data.path={files}/labels9.npz",
                                                                  "data.num_classes=5"],
                                             "data.num_classes=5, but the labels of"),
    "class labels asked of data without them": ("values", "digits", ["data.name=npz",
                                                                     "data.path={files}/unlabelled.npz",
                                                                     "data.num_classes=10"],
                                                "data.num_classes=10 asks for class labels, but the npz file"),
    "the conditional preset on data without labels": ("values", "digits-cond", ["data.name=npz",
                                                                                 "data.path={files}/unlabelled.npz"],
                                                      "data.num_classes=10 asks for class labels, but the npz file"),
    "guidance of an unconditional teacher": ("values", "digits", ["guidance.kind=cfg"],
                                             "guidance.kind='cfg' guides a class-conditional teacher"),
    "an unconditional teacher file for class-conditional data": ("values", "toy", [*_checkpoint_teacher("teacher.pt"),
                                                                                   "data.num_classes=4"],
                                                                 "is unconditional, but data.num_classes=4"),
    "an EDM2 pickle of another resolution": ("values", "cifar10-tiny", ["data.path={files}/cifar-10-batches-py",
                                                                        "teacher.source=edm_pickle",
                                                                        "teacher.path={files}/edm2_8px.pkl"],
                                             "denoises samples of shape (3, 8, 8), the data has shape (3, 32, 32)"),
    "store chunks larger than memory": ("values", "toy", ["rollout.store.chunk_trajectories=1000000000",
                                                          "rollout.num_trajectories=1000000000"],
                                        "rollout.store.chunk_trajectories"),
    "rollout batch larger than memory": ("values", "toy", ["rollout.batch_size=100000000000"], "rollout.batch_size"),
    "evaluation samples larger than memory": ("values", "toy", ["eval.num_samples=100000000000"], "eval.num_samples"),
    "network larger than memory": ("values", "toy", ["network.width=8192", "network.depth=64"], "network"),
    "LPIPS backbone that is garbage": ("late files", "cifar10-tiny", ["data.path={files}/cifar-10-batches-py",
                                                                     "midtrain.distance=lpips",
                                                                     "midtrain.lpips_backbone={files}/garbage.pt"],
                                       "midtrain.lpips_backbone"),
    "LPIPS backbone that runs code": ("late files", "cifar10-tiny", ["data.path={files}/cifar-10-batches-py",
                                                                    "midtrain.distance=lpips",
                                                                    "midtrain.lpips_backbone={files}/runs_code.pt"],
                                      "midtrain.lpips_backbone"),
    "LPIPS backbone of another network": ("late files", "cifar10-tiny", ["data.path={files}/cifar-10-batches-py",
                                                                        "midtrain.distance=lpips",
                                                                        "midtrain.lpips_backbone={files}/not_vgg.pth"],
                                          "features."),
    "Inception weights that are garbage": ("late files", "toy", ["eval.inception_path={files}/garbage.pt"],
                                           "eval.inception_path"),
    "Inception weights that run code": ("late files", "toy", ["eval.inception_path={files}/runs_code.pt",
                                                              "eval.fid_mode=legacy_pytorch"], "eval.inception_path"),
    "a teacher file of an unknown kind": ("metadata", "toy", _checkpoint_teacher("bogus_kind.pt"), "kind='bogus'"),
    "a teacher file claiming a huge sample": ("metadata", "toy", _checkpoint_teacher("huge_shape.pt"), "sample_shape"),
    "a teacher file whose network does not fit its weights": ("metadata", "toy", _checkpoint_teacher("wrong_width.pt"),
                                                              "network values do not fit"),
    "a huge value echoed": ("values", "toy", ["midtrain.train.lr=" + "x" * 100_000], "midtrain.train.lr"),
}


def _fill(text: str, files: Path, tmp: Path) -> str:
    return text.replace("{files}", str(files)).replace("{tmp}", str(tmp))


def _prepare_roots(tmp: Path) -> None:
    for name, inside in (("with_logs", "logs"), ("with_features", "features"), ("with_teacher", "teacher")):
        (tmp / name).mkdir()
        (tmp / name / inside).write_text("not a folder")


def _terminal_lines(text: str) -> list[str]:
    """What a person reads on the terminal about a problem: the lines of ``text`` but progress bars and the run's
    INFO lines (the device it runs on, ...)."""
    return [line for line in text.splitlines() if line.strip() and "%|" not in line and " INFO " not in line]


def _assert_one_line(text: str, words: str) -> str:
    lines = _terminal_lines(text)
    assert len(lines) == 1, text
    assert words in lines[0] and "Traceback" not in text and "weights_only" not in text, lines[0]
    assert len(lines[0]) < 1000, f"{len(lines[0])} characters"
    return lines[0]


def _nothing_complete(root: Path) -> None:
    assert not list(root.rglob(MANIFEST)), "nothing is marked complete"


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_refused_through_the_command_line(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file whose loading ran code would leave MARKER here
    _prepare_roots(tmp_path)
    klass, preset, overrides, words = RUN_CASES[case]
    sets = [_fill(o, files, tmp_path) for o in [*(TOY if preset == "toy" else DIGITS if preset == "digits" else []),
                                                  *overrides]]
    args = ["run", "--preset", preset, *sum((["--set", o] for o in sets), [])]
    if not any(o.startswith("artifact_root=") for o in sets):
        args += ["--artifact-root", str(tmp_path / "artifacts")]
    started = time.monotonic()
    assert cmt(args) == 2, case
    assert time.monotonic() - started < 60
    _assert_one_line(capsys.readouterr().err, words)
    _nothing_complete(tmp_path)
    assert not (tmp_path / MARKER).exists(), "no code ran from a file"


def _yaml_with(tmp: Path, **values) -> Path:
    raw = get_preset("toy", TOY).model_dump(mode="json")
    for dotted, value in values.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("field,value,words", [
    ("artifact_root", "runs\x00here", "NUL byte"),
    ("data.path", "im\x00ages.npz", "NUL byte"),
], ids=["root with a NUL byte", "data path with a NUL byte"])
def test_a_nul_byte_in_a_path_is_refused(field, value, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = {"data.name": "npz", "teacher.source": "pretrain"} if field == "data.path" else {}
    config = _yaml_with(tmp_path, **{field: value}, **extra)
    assert cmt(["run", "--config", str(config)]) == 2
    _assert_one_line(capsys.readouterr().err, words)


@pytest.mark.parametrize("what,words", [("fifo", "not a regular file"), ("a_folder", "not a regular file")],
                         ids=["config is a FIFO", "config is a folder"])
def test_a_config_that_is_no_regular_file_is_not_read(what, words, files, capsys):
    assert cmt(["run", "--config", str(files / what)]) == 2
    _assert_one_line(capsys.readouterr().err, words)


# ------------------------------------------------------------------------------------- a complete root, doctored
@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A complete tiny ``toy`` root (every stage published), copied by each case that doctors it."""
    root = tmp_path_factory.mktemp("complete") / "artifacts"
    assert cmt(["run", "--preset", "toy", "--artifact-root", str(root), *sum((["--set", o] for o in TOY), [])]) == 0
    return root


def _copy(complete: Path, tmp: Path) -> Path:
    root = tmp / "artifacts"
    shutil.copytree(complete, root, symlinks=True)
    return root


def _folder(root: Path, stage: str) -> Path:
    (folder,) = [p for p in (root / stage).iterdir() if p.is_dir()]
    return folder


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def _set_attr(field: str, value):
    def change(meta):
        if value is _MISSING:
            meta["attributes"].pop(field)
        else:
            meta["attributes"][field] = value
        return meta
    return change


_MISSING = object()


def _store(root: Path) -> Path:
    return _folder(root, "rollouts") / "store.zarr"


# (how the store is doctored, words of the one line `cmt store verify` prints): exit code 1
LYING_STORES = {
    "zero trajectories a chunk": (lambda s: _edit_json(s / "zarr.json", _set_attr("chunk_trajectories", 0)),
                                  "chunk_trajectories=0"),
    "no chunk size": (lambda s: _edit_json(s / "zarr.json", _set_attr("chunk_trajectories", _MISSING)),
                      "chunk_trajectories=None"),
    "10^13 trajectories claimed": (lambda s: _edit_json(s / "zarr.json", _set_attr("num_trajectories", 10**13)),
                                   "num_trajectories"),
    "an array claiming 10^13 trajectories": (
        lambda s: _edit_json(s / "states" / "zarr.json", lambda m: {**m, "shape": [10**13, *m["shape"][1:]]}),
        "states/zarr.json: shape"),
    "negative chunks a shard": (lambda s: _edit_json(s / "zarr.json", _set_attr("shard_chunks", -1)), "shard_chunks"),
    "an unknown dtype": (lambda s: _edit_json(s / "zarr.json", _set_attr("dtype", "float8")), "dtype"),
    "a grid that is not decreasing": (lambda s: _edit_json(s / "zarr.json", _set_attr("grid", [1.0] * 17)), "grid"),
    "zarr.json that is not JSON": (lambda s: (s / "zarr.json").write_text("{not json"), "zarr.json"),
    "zarr.json that is a list": (lambda s: (s / "zarr.json").write_text("[1, 2]"), "zarr"),
    "another format": (lambda s: _edit_json(s / "zarr.json", _set_attr("format", "other/1")), "format"),
}


@pytest.mark.parametrize("case", list(LYING_STORES))
def test_a_store_whose_metadata_lies_is_named_by_verify(case, complete, tmp_path, capsys):
    store = _store(_copy(complete, tmp_path))
    LYING_STORES[case][0](store)
    started = time.monotonic()
    assert cmt(["store", "verify", str(store)]) == 1
    assert time.monotonic() - started < 60
    line = _assert_one_line(capsys.readouterr().out, LYING_STORES[case][1])
    assert line.startswith(f"{store}: BAD")


def _refresh_records(folder: Path) -> None:
    """Rewrite the manifest's file records from the files as they are now: the artifact passes the size and hash
    checks, as one published unsound by older code would."""
    _edit_json(folder / MANIFEST, lambda m: {**m, "files": file_records(folder)})


def _nan_weights(folder: Path) -> None:
    blob = torch.load(folder / "model.pt", weights_only=True)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name] = torch.full_like(blob["state_dict"][name], float("nan"))
    torch.save(blob, folder / "model.pt")
    _refresh_records(folder)


def _nan_chunk(folder: Path) -> None:
    store = open_store(folder / "store.zarr", partial=True)
    store.states.with_config({"write_empty_chunks": True})[0:16] = np.full(store.states[0:16].shape, np.nan,
                                                                          dtype=np.float32)
    attrs = dict(store.attrs)
    attrs.pop(VERIFIED)
    store.group.attrs.put(attrs)
    _refresh_records(folder)


# (stage, how its complete artifact is doctored, words of the warning): the rerun recomputes the stage, exit code 0
UNSOUND_ARTIFACTS = {
    "a manifest that is a JSON list": ("teacher", lambda f: (f / MANIFEST).write_text("[]"), "holds a JSON list"),
    "a manifest that is not JSON": ("posttrain", lambda f: (f / MANIFEST).write_text("{"), "is not JSON"),
    "a negative file size recorded": ("midtrain", lambda f: _edit_json(
        f / MANIFEST, lambda m: {**m, "files": {**m["files"], "model.pt": {"bytes": -1}}}), "files['model.pt'].bytes"),
    "a recorded file outside the artifact": ("posttrain", lambda f: _edit_json(
        f / MANIFEST, lambda m: {**m, "files": {"../../../../etc/passwd": {"bytes": 1}}}), "not a path inside"),
    "a 2-step sigma that is no number": ("midtrain", lambda f: _edit_json(
        f / MANIFEST, lambda m: {**m, "metrics": {**m["metrics"], "mid_sigma": "abc"}}), "metrics.mid_sigma='abc'"),
    "weights that are NaN": ("posttrain", _nan_weights, "hold inf or NaN"),
    "a store chunk of NaN, published before stores were verified": ("rollouts", _nan_chunk, "non-finite values"),
}


@pytest.mark.parametrize("case", list(UNSOUND_ARTIFACTS))
def test_a_complete_artifact_found_unsound_is_named_and_recomputed(case, complete, tmp_path, capsys):
    root = _copy(complete, tmp_path)
    stage, doctor, words = UNSOUND_ARTIFACTS[case]
    folder = _folder(root, stage)
    doctor(folder)
    started = time.monotonic()
    assert cmt(["run", "--preset", "toy", "--artifact-root", str(root), *sum((["--set", o] for o in TOY), [])]) == 0
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    warnings = [line for line in _terminal_lines(err) if "WARNING" in line]
    assert warnings and words in warnings[0] and "Traceback" not in err, err[-3000:]
    assert read_manifest(folder) is not None  # published again, sound
    if stage == "rollouts":
        assert open_store(folder / "store.zarr").attrs[VERIFIED] and torch.isfinite(
            open_store(folder / "store.zarr").read(range(16))).all()
    if stage in ("midtrain", "posttrain"):
        weights = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_checkpoint_whose_step_lies_is_named_and_the_stage_starts_over(complete, tmp_path, capsys):
    root = _copy(complete, tmp_path)
    folder = _folder(root, "midtrain")
    (folder / MANIFEST).unlink()  # the stage is computed again, from its checkpoint if it can be trusted
    blob = torch.load(folder / "train" / "checkpoint.pt", weights_only=True)
    torch.save({**blob, "step": -5}, folder / "train" / "checkpoint.pt")
    (folder / "train" / "checkpoint.prev.pt").unlink(missing_ok=True)
    assert cmt(["run", "--preset", "toy", "--artifact-root", str(root), *sum((["--set", o] for o in TOY), [])]) == 0
    err = capsys.readouterr().err
    assert "field step=-5 is not a step of this run" in err and "Traceback" not in err
    assert read_manifest(folder) is not None


# ---------------------------------------------------------------------------------------------------- repairs
def _damage_a_shard(store: Path) -> None:
    chunk = next(p for p in (store / "states" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\0" * chunk.stat().st_size)


@pytest.mark.parametrize("case,doctor,words", [
    ("its teacher cannot be built", lambda root: _edit_json(_folder(root, "rollouts") / MANIFEST, lambda m: {
        **m, "config": {**m["config"], "teacher.source": "checkpoint",
                        "teacher.path": str(_folder(root, "teacher") / "manifest.json")}}), "its teacher"),
    ("the teacher artifact is gone", lambda root: shutil.rmtree(_folder(root, "teacher")), "teacher artifact"),
    ("the rollouts manifest is a list", lambda root: (_folder(root, "rollouts") / MANIFEST).write_text("[]"),
     "holds a JSON list"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_repair_that_cannot_be_done_leaves_what_it_found(case, doctor, words, complete, tmp_path, capsys):
    root = _copy(complete, tmp_path)
    store = _store(root)
    _damage_a_shard(store)
    doctor(root)
    before = {p: p.read_bytes() for p in store.parent.rglob("*") if p.is_file()}
    assert cmt(["store", "verify", "--repair", str(store)]) == 1
    out, err = capsys.readouterr()
    _assert_one_line(err, words)
    assert err.startswith("cannot repair:")
    assert {p: p.read_bytes() for p in store.parent.rglob("*") if p.is_file()} == before  # as it was


# ------------------------------------------------------------------------------------------------ a worker fails
def test_rollouts_made_non_finite_by_the_teacher_are_never_marked_complete(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "artifacts"
    sets = [*TOY, "rollout.cluster.workers=2", "teacher.source=callable", "teacher.allow_code=true",
            "teacher.target=tests.faulty_teachers:nan_at_high_noise", "midtrain.init=random"]
    started = time.monotonic()
    assert cmt(["run", "--preset", "toy", "--artifact-root", str(root), *sum((["--set", o] for o in sets), [])]) == 1
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    line = _assert_one_line(err, "NonFiniteStatesError")
    assert "the rollouts stage failed" in line and "the teacher's ODE diverged" in line
    assert not list((root / "rollouts").rglob(MANIFEST)), "an unsound store is never marked complete"
    assert "distributed" not in err  # the workers' own lines stay off the terminal


# ----------------------------------------------------------------------------------------- through the Prefect API
@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_refused_through_the_prefect_api(prefect_api, files, tmp_path, monkeypatch):
    """Every case of ``RUN_CASES`` as a ``cmt-pipeline`` flow run, refused with the same line (paths outside the
    allowed roots are refused for that first)."""
    from flows.pipeline import cmt_pipeline

    monkeypatch.chdir(tmp_path)
    _prepare_roots(tmp_path)
    monkeypatch.setenv("CMT_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path), str(files), "/dev", "/proc"]))
    for case, (_, preset, overrides, words) in RUN_CASES.items():
        sets = [_fill(o, files, tmp_path) for o in [*(TOY if preset == "toy" else DIGITS if preset == "digits"
                                                      else []), *overrides]]
        root = next((s.split("=", 1)[1] for s in sets if s.startswith("artifact_root=")), str(tmp_path / "artifacts"))
        sets = [s for s in sets if not s.startswith("artifact_root=")]
        started = time.monotonic()
        state = cmt_pipeline(preset=preset, overrides=sets, artifact_root=root, return_state=True)
        assert state.is_failed(), case
        assert time.monotonic() - started < 60, case
        message = state.message.split(": ", 1)[1]  # after Prefect's "Flow run encountered an exception"
        assert "\n" not in message.strip() and (words in message or "outside the allowed roots" in message), \
            f"{case}: {state.message}"
    _nothing_complete(tmp_path)
    assert not (tmp_path / MARKER).exists()


