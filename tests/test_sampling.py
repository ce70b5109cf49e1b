"""``cmt sample`` and ``cmt export`` on a small digits generator mid-trained here (``cmt_core.sampling``,
``cmt_core.generator``): images independent of batch size and process count, resume after a kill, an exported
generator reproducing the pipeline's samples in a fresh process, class labels, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmt_core.cli import main
from cmt_core.engine import compute_stage
from cmt_core.generator import (
    SPEC_FILE,
    WEIGHTS_FILE,
    Generator,
    GeneratorError,
    export_generator,
    load_generator,
)
from cmt_core.models import build_model
from cmt_core.presets import resolve_config
from cmt_core.runtime import Runtime
from cmt_core.sampling import SampleJob, png_path, run_sampling
from cmt_core.stages import plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ["cpu_threads=1", "teacher.train.steps=40", "rollout.num_trajectories=256", "midtrain.train.steps=40",
        "midtrain.train.eval_every=20", "eval.num_samples=300", "eval.mid_sigma_search=[0.8]"]
N = 2100  # three noise blocks: with two processes, rank 0 draws blocks 0 and 2, rank 1 block 1


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def stage_folder(tmp_path_factory) -> Path:
    """A complete digits mid-training artifact (tiny budget)."""
    cfg = resolve_config("digits", TINY, None, str(tmp_path_factory.mktemp("artifacts")))
    resolved = plan(cfg)
    runtime = Runtime.detect("cpu")
    for stage in ("teacher", "rollouts", "midtrain"):
        compute_stage(resolved, stage, runtime)
    return resolved.path("midtrain")


def _images(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(png_path(folder, i))) for i in range(n)])


@pytest.fixture(scope="module")
def reference(stage_folder, tmp_path_factory) -> Path:
    """N images at 2 steps, one process, batch 256."""
    out = tmp_path_factory.mktemp("reference")
    run_sampling(SampleJob(model=str(stage_folder), out=out, num_samples=N, steps=2, batch_size=256,
                           format="both"), Runtime.detect("cpu"))
    return out


def test_images_do_not_depend_on_the_batch_size(stage_folder, reference, tmp_path):
    run_sampling(SampleJob(model=str(stage_folder), out=tmp_path, num_samples=N, steps=2, batch_size=64),
                 Runtime.detect("cpu"))
    assert np.array_equal(_images(tmp_path, N), _images(reference, N))
    with np.load(reference / "samples.npz") as npz:
        assert npz["arr_0"].shape == (N, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
        assert np.array_equal(npz["arr_0"][..., 0], _images(reference, N))
    summary = json.loads((reference / "sampling.json").read_text())
    assert summary["drawn"] == N and summary["images_per_s"] > 0 and summary["generator"]["stage"] == "midtrain"
    assert (reference / "grid.png").is_file()


@pytest.mark.slow
def test_images_do_not_depend_on_the_number_of_processes(stage_folder, reference, tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           "-m", "cmt_core.cli", "sample", str(stage_folder), "--out", str(tmp_path), "-n", str(N),
                           "--steps", "2", "--batch-size", "128", "--device", "cpu", "--format", "both"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(_images(tmp_path, N), _images(reference, N))
    with np.load(tmp_path / "samples.npz") as a, np.load(reference / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.slow
def test_a_killed_run_resumes_and_writes_only_the_missing_images(stage_folder, reference, tmp_path):
    command = [sys.executable, "-m", "cmt_core.cli", "sample", str(stage_folder), "--out", str(tmp_path), "-n",
               str(N), "--steps", "2", "--batch-size", "64", "--device", "cpu"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*/*.png"))) < 200 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*.png")}
    assert 0 < len(before) < N, "the run was not interrupted part way"
    summary = run_sampling(SampleJob(model=str(stage_folder), out=tmp_path, num_samples=N, steps=2, batch_size=256),
                           Runtime.detect("cpu"))
    assert summary["drawn"] == N - len(before)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing written twice
    assert not list(tmp_path.glob("*/.*.tmp"))
    assert np.array_equal(_images(tmp_path, N), _images(reference, N))


def test_an_exported_generator_reproduces_the_pipelines_samples_in_a_fresh_process(stage_folder, reference,
                                                                                   tmp_path):
    assert main(["export", str(stage_folder), "--out", str(tmp_path / "gen")]) == 0
    spec = json.loads((tmp_path / "gen" / SPEC_FILE).read_text())
    assert spec["kind"] == "consistency" and spec["sampler"] == "consistency" and spec["num_classes"] == 0
    assert not list((tmp_path / "gen").glob("*.pt")) and not list((tmp_path / "gen").glob("*.pkl"))
    script = f"""
import sys, numpy as np, torch
import cmt_core
gen = cmt_core.load_generator({str(tmp_path / 'gen')!r})
x = gen.sample(300, steps=2, batch_size=100)
np.save({str(tmp_path / 'x.npy')!r}, x.numpy())
loaded = sorted(m.split('.')[0] for m in sys.modules)
assert not set(loaded) & {{'flows', 'tasks', 'prefect', 'dask', 'distributed'}}, loaded
"""
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.from_numpy(np.load(tmp_path / "x.npy"))
    assert torch.equal(fresh, Generator.from_stage(stage_folder).sample(300, steps=2))  # bit for bit
    quantised = (fresh * 127.5 + 128).clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    assert np.array_equal(quantised, _images(reference, 300))  # the PNG files of `cmt sample`


def _conditional(tmp_path: Path) -> Path:
    """An exported class-conditional flow map (10 classes, random weights)."""
    torch.manual_seed(0)
    network = {"kind": "mlp", "width": 32, "depth": 2, "emb_dim": 16, "sigma_data": 0.5, "label_dim": 10}
    model = build_model("flow_map", network, (1, 8, 8), 0.002)
    return export_generator(Generator(model, "flow_map", network, (1, 8, 8), 80.0, 0.8), tmp_path / "cond")


def test_class_labels_uniform_given_and_per_image(tmp_path):
    gen = load_generator(_conditional(tmp_path))
    uniform = gen.uniform_labels(seed=3, n=1500)
    assert uniform.shape == (1500,) and set(uniform.tolist()) == set(range(10))
    out = tmp_path / "uniform"
    run_sampling(SampleJob(model=str(tmp_path / "cond"), out=out, num_samples=1500, seed=3, format="both"),
                 Runtime.detect("cpu"))
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels[1234] == ["001000/001234.png", int(uniform[1234])]
    with np.load(out / "samples.npz") as npz:
        assert np.array_equal(npz["arr_1"], uniform.numpy())
    np.save(tmp_path / "labels.npy", np.arange(1500) % 10)
    per_image = tmp_path / "per-image"
    run_sampling(SampleJob(model=str(tmp_path / "cond"), out=per_image, num_samples=1500, seed=3,
                           labels_file=tmp_path / "labels.npy"), Runtime.detect("cpu"))
    labels = json.loads((per_image / "dataset.json").read_text())["labels"]
    assert [c for _, c in labels[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    sevens = gen.sample(20, labels=7)
    assert not torch.equal(sevens, gen.sample(20, labels=3))  # the label reaches the network
    assert torch.equal(sevens, gen.sample(20, labels=torch.full((20,), 7)))


def test_an_exported_dit_flow_map_reloads_as_the_same_generator(tmp_path):
    torch.manual_seed(0)
    network = {"kind": "dit", "width": 64, "depth": 2, "heads": 4, "patch_size": 2, "sigma_data": 1.0,
               "label_dim": 10}
    model = build_model("flow_map", network, (4, 8, 8), 0.002)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = Generator(model, "flow_map", network, (4, 8, 8), 80.0, 1.0)
    loaded = load_generator(export_generator(gen, tmp_path / "dit"))
    assert loaded.network["kind"] == "dit" and loaded.num_classes == 10
    for steps in (1, 2):
        want = gen.sample(6, steps=steps, labels=3, seed=1)
        assert torch.equal(loaded.sample(6, steps=steps, labels=3, seed=1), want)


def _one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_requests_are_one_line_naming_what_is_wrong(stage_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"not a folder")
    cond = _conditional(tmp_path)
    sample = ["sample", str(stage_folder), "--out", str(tmp_path / "out")]
    assert "no manifest.json" in _one_line(capsys, ["sample", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "is not an exported generator" in _one_line(capsys, ["sample", "0123456789abcdef", "--out",
                                                                str(tmp_path / "o"), "--artifact-root",
                                                                str(tmp_path)])
    assert "steps" in _one_line(capsys, [*sample, "--steps", "0"])
    assert "steps" in _one_line(capsys, [*sample, "--steps", "65"])
    assert "num_samples" in _one_line(capsys, [*sample, "-n", "0"])
    assert "is a file" in _one_line(capsys, ["sample", str(stage_folder), "--out", str(tmp_path / "file.png")])
    assert "unconditional" in _one_line(capsys, [*sample, "--class", "3"])
    assert "[0, 10)" in _one_line(capsys, ["sample", str(cond), "--out", str(tmp_path / "o"), "--class", "10"])
    np.save(tmp_path / "short.npy", np.arange(5))
    assert "labels_file" in _one_line(capsys, ["sample", str(cond), "--out", str(tmp_path / "o"), "-n", "10",
                                               "--labels", str(tmp_path / "short.npy")])
    assert "is a file" in _one_line(capsys, ["export", str(stage_folder), "--out", str(tmp_path / "file.png")])
    teacher = stage_folder.parent.parent / "teacher"
    assert "'teacher' artifact" in _one_line(capsys, ["sample", str(next(p for p in teacher.iterdir()
                                                                            if p.is_dir())), "--out", "o"])
    points = {"kind": "mlp", "width": 16, "depth": 1, "emb_dim": 8, "sigma_data": 0.5}  # a 2-D generator
    export_generator(Generator(build_model("flow_map", points, (2,), 0.002), "flow_map", points, (2,), 80.0, 0.8),
                     tmp_path / "points")
    assert "writes images" in _one_line(capsys, ["sample", str(tmp_path / "points"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
    done = subprocess.run([sys.executable, "-m", "cmt_core.cli", "sample", str(stage_folder), "--out",
                           str(tmp_path / "out"), "-n", "0"], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "invalid sampling request: num_samples: Input should be greater than or equal to 1 (got 0)"]


def test_a_damaged_or_foreign_export_is_one_error_naming_the_file(tmp_path):
    folder = _conditional(tmp_path)
    spec = json.loads((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "num_classes": 3}))
    with pytest.raises(GeneratorError, match="num_classes"):
        load_generator(folder)
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "version": 7}))
    with pytest.raises(GeneratorError, match="version"):
        load_generator(folder)
    (folder / SPEC_FILE).write_text("{not json")
    with pytest.raises(GeneratorError, match=SPEC_FILE):
        load_generator(folder)
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "encoder": {"encoder": "sd-vae"}}))
    with pytest.raises(GeneratorError, match="encoder"):
        load_generator(folder)
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    weights = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(weights[:-100])
    with pytest.raises(GeneratorError, match="sha256"):
        load_generator(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"\x80\x04pickled")  # a pickle where the weights should be
    import hashlib

    (folder / SPEC_FILE).write_text(json.dumps({**spec, "weights_sha256": hashlib.sha256(
        (folder / WEIGHTS_FILE).read_bytes()).hexdigest()}))
    with pytest.raises(GeneratorError, match="not a safetensors file"):
        load_generator(folder)


@pytest.mark.slow
def test_the_sample_flow_writes_the_images_and_publishes_a_summary(stage_folder, reference, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.sample import cmt_sample

    with prefect_test_harness(server_startup_timeout=120):
        summary = cmt_sample(SampleJob(model=str(stage_folder), out=tmp_path, num_samples=300, steps=2))
        with get_client(sync_client=True) as client:
            key = ArtifactFilterKey(any_=["cmt-sample"])
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert summary["drawn"] == 300 and artifacts and artifacts[0].type == "table"
    assert np.array_equal(_images(tmp_path, 300), _images(reference, 300))
