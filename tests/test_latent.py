"""Latent space: EDM2's VAE encoder on a diffusers folder, the encoding stage's zarr store (resume, dask workers,
EDM2's own layout), latent training batches, data-free rollouts and ``digits-latent`` end to end.

The VAE is a tiny ``diffusers.AutoencoderKL`` with random weights, written by diffusers' own ``save_pretrained``
(SD's ``sd-vae-ft-mse`` has the same format and cannot be downloaded here)."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cmt_core.config import ClusterConfig, EncodeConfig, EncoderConfig
from cmt_core.data.datasets import TensorDataset
from cmt_core.data.encoded import (
    EDM2Latents,
    EncodedDataset,
    LatentSource,
    LatentStore,
    LatentStoreError,
    PixelMoments,
    StoredMoments,
    encode_dataset,
    open_latents,
)
from cmt_core.encoders import (
    EDM2_RAW_MEAN,
    EDM2_RAW_STD,
    StabilityVAE,
    load_vae,
    model_shape_of,
    whitening,
)
from cmt_core.errors import InputFileError

diffusers = pytest.importorskip("diffusers")

NUM, RES = 37, 16  # images of the latent store tests; 3x16x16 -> latents 4x8x8
CFG = EncodeConfig(chunk_images=4, shard_chunks=2, cluster=ClusterConfig(workers=1))  # shards of 8: 5 shards
NUM_SHARDS = 5


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A random ``AutoencoderKL`` (3 -> 4 latent channels, downsampling 2) in diffusers' format at ``folder``."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def images(num: int = NUM, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(num, 3, RES, RES, generator=g) * 2 - 1, torch.arange(num) % 3, 3)


# dask workers import these: module-level factories
def vae_encoder(path: str):
    return StabilityVAE(Path(path), batch_size=3)


class SlowEncoder:
    def __init__(self, path: str, delay: float):
        self.vae, self.delay = vae_encoder(path), delay

    def moments(self, x):
        time.sleep(self.delay)
        return self.vae.moments(x)


def slow_encoder(path: str, delay: float):
    return SlowEncoder(path, delay)


def pixel_moments(vae_path: Path, encoder=vae_encoder, **kwargs) -> PixelMoments:
    return PixelMoments(images, functools.partial(encoder, str(vae_path), **kwargs), batch=3)


def encode(path: Path, vae_path: Path, cfg=CFG, **kwargs) -> Path:
    return encode_dataset(pixel_moments(vae_path), path, NUM, (4, RES // 2, RES // 2), True, cfg,
                          {"encoder_id": "tiny", "source": {"data": "random"}}, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir) -> LatentStore:
    return open_latents(encode(tmp_path_factory.mktemp("latents") / "latents.zarr", vae_dir, in_process=True))


def assert_same_store(path: Path, reference: LatentStore) -> None:
    store = open_latents(path)
    assert np.array_equal(store.moments[:], reference.moments[:])  # bit-identical
    assert np.array_equal(store.labels[:], reference.labels[:])


# ------------------------------------------------------------------------------------------------ the encoder


def test_decode_of_encode_equals_diffusers_own_round_trip(vae_dir):
    ours, vae = StabilityVAE(vae_dir), load_vae(vae_dir)
    x = images(4).all()
    noise = torch.randn(4, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = vae.encode((x + 1) / 2).latent_dist  # EDM2 feeds the VAE pixels / 255
        expected = vae.decode(posterior.mean + noise * posterior.std).sample.clamp(0, 1) * 2 - 1
    moments = ours.moments(x)
    assert torch.allclose(moments, torch.cat([posterior.mean, posterior.std], dim=1), atol=1e-6)
    decoded = ours.decode(ours.latents(moments, noise))
    assert decoded.shape == x.shape and torch.allclose(decoded, expected, atol=1e-5)


def test_edm2_whitening_constants_are_applied_both_ways(vae_dir):
    enc = StabilityVAE(vae_dir)
    scale, bias = whitening(EDM2_RAW_MEAN, EDM2_RAW_STD)
    assert torch.allclose(scale, 0.5 / torch.tensor(EDM2_RAW_STD)) and torch.allclose(
        bias, -torch.tensor(EDM2_RAW_MEAN) * scale)
    mean = torch.randn(2, 4, 3, 3) * 4 + torch.tensor(EDM2_RAW_MEAN)[:, None, None]
    std, noise = torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    z = enc.latents(torch.cat([mean, std], dim=1), noise)
    assert torch.allclose(z, (mean + noise * std) * scale[:, None, None] + bias[:, None, None])
    with torch.no_grad():  # decode undoes the whitening before the VAE's decoder
        expected = enc.vae.decode(mean + noise * std).sample.clamp(0, 1) * 2 - 1
    assert torch.allclose(enc.decode(z), expected, atol=1e-5)
    cfg = EncoderConfig(kind="sd_vae", path=vae_dir)
    assert model_shape_of(cfg, (3, RES, RES)) == enc.model_shape((3, RES, RES)) == (4, RES // 2, RES // 2)


def test_a_vae_folder_without_weights_is_refused_naming_the_field(tmp_path, vae_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(InputFileError, match=r"data.encoder.path=.*has no weights: diffusion_pytorch_model"):
        load_vae(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"a pickle is never read")
    with pytest.raises(InputFileError, match="never read"):
        load_vae(folder)
    with pytest.raises(InputFileError, match="no config.json"):
        load_vae(tmp_path)


def test_a_vae_folder_without_weights_exits_2_with_one_line(tmp_path, vae_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "run", "--preset", "digits", "--artifact-root",
                           str(tmp_path / "a"), "--set", "data.encoder.kind=sd_vae", "--set",
                           f"data.encoder.path={folder}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.encoder.path=" in lines[0] and "has no weights" in lines[0]


# ------------------------------------------------------------------------------------------- the latent store


def test_store_holds_each_images_moments_and_label(reference, vae_dir):
    assert len(reference) == NUM and reference.model_shape == (4, RES // 2, RES // 2)
    assert reference.num_shards == NUM_SHARDS and reference.complete
    data = images()
    expected = StabilityVAE(vae_dir, batch_size=3).moments(data.read(slice(8, 16)))
    assert torch.equal(torch.from_numpy(reference.moments[8:16]), expected)
    assert torch.equal(torch.from_numpy(reference.labels[:]), data.class_labels)
    ds = EncodedDataset(reference.path, num_classes=3)
    assert torch.equal(ds.read([20, 3, 20]), torch.from_numpy(reference.moments[[20, 3, 20]]))
    assert torch.equal(ds.labels([5]), torch.tensor([2]))


def test_one_and_two_dask_workers_give_bit_identical_stores(tmp_path, reference, vae_dir):
    for workers in (1, 2):
        cfg = CFG.model_copy(update={"cluster": ClusterConfig(workers=workers)})
        path = encode(tmp_path / f"w{workers}", vae_dir, cfg)
        assert_same_store(path, reference)
        assert LatentStore(path).attrs["encode_runs"][-1]["cluster"] == f"LocalCluster({workers} workers)"


def test_a_complete_store_returns_at_once_and_a_different_one_refuses_to_resume(reference, vae_dir):
    before = reference.attrs["encode_runs"]
    encode(reference.path, vae_dir, in_process=True)
    assert LatentStore(reference.path).attrs["encode_runs"] == before
    with pytest.raises(LatentStoreError, match="encoder_id"):
        encode_dataset(pixel_moments(vae_dir), reference.path, NUM, (4, 8, 8), True, CFG,
                       {"encoder_id": "other", "source": {"data": "random"}})


@pytest.mark.slow
def test_killed_encoding_resumes_the_missing_shards_only(tmp_path, reference, vae_dir):
    path = tmp_path / "latents.zarr"
    script = (
        "from test_latent import *\n"
        "torch.set_num_threads(1)\n"  # as the test process: a convolution's bits depend on the thread count
        f"encode_dataset(pixel_moments(Path({str(vae_dir)!r}), slow_encoder, delay=0.3), Path({str(path)!r}), NUM, "
        "(4, 8, 8), True, CFG, {'encoder_id': 'tiny', 'source': {'data': 'random'}}, in_process=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ((path / "zarr.json").exists() and len(LatentStore(path).missing_shards()) <= NUM_SHARDS - 2):
            assert proc.poll() is None, f"encoding ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    missing = LatentStore(path).missing_shards()
    assert 0 < len(missing) <= NUM_SHARDS - 2 and not LatentStore(path).complete
    with pytest.raises(LatentStoreError, match="incomplete"):
        open_latents(path)
    encode(path, vae_dir, in_process=True)
    assert [r["shards_computed"] for r in LatentStore(path).attrs["encode_runs"]] == [len(missing)]
    assert_same_store(path, reference)


@pytest.mark.parametrize("archive", [False, True])
def test_edm2s_encoded_layout_is_imported_as_it_is(tmp_path, reference, archive):
    """``dataset_tool.py encode``'s output: ``NNNNN/img-mean-std-NNNNNNNN.npy`` (float32 (8, h, w)) and
    ``dataset.json`` with ``[[file, label], ...]``."""
    files, labels = {}, []
    for k in range(NUM):
        name = f"{k // 1000:05d}/img-mean-std-{k:08d}.npy"
        buffer = io.BytesIO()
        np.save(buffer, reference.moments[k])
        files[name] = buffer.getvalue()
        labels.append([name, int(reference.labels[k])])
    files["dataset.json"] = json.dumps({"labels": labels}).encode()
    source = tmp_path / ("edm2.zip" if archive else "edm2")
    if archive:
        with zipfile.ZipFile(source, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    ds = EDM2Latents(source, num_classes=3)
    assert len(ds) == NUM and ds.sample_shape == (8, 8, 8)
    path = encode_dataset(StoredMoments(functools.partial(EDM2Latents, source, 3)), tmp_path / "s", NUM, (4, 8, 8),
                          True, CFG, {"source": {"edm2_encoded": str(source)}}, in_process=True)
    assert_same_store(path, reference)


def test_a_folder_of_pixels_is_no_encoded_data_set(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(LatentStoreError, match="no .npy files"):
        EDM2Latents(tmp_path / "img")


def test_latent_batches_are_a_function_of_the_step_and_split_across_ranks(reference, vae_dir):
    enc = StabilityVAE(vae_dir)
    source = LatentSource(EncodedDataset(reference.path, 3), enc, seed=5, labels=True)
    a, b = source.batch(3, 8), source.batch(3, 8)
    assert torch.equal(a["x"], b["x"]) and a["x"].shape == (8, 4, 8, 8)
    assert not torch.equal(source.batch(4, 8)["x"], a["x"])  # a fresh posterior draw and batch every step
    halves = [source.batch(3, 8, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([h["x"] for h in halves]), a["x"])
    assert torch.equal(torch.cat([h["cond"]["class_labels"] for h in halves]), a["cond"]["class_labels"])


# ------------------------------------------------------------------------------------------ stages, end to end

TINY = ["data.encoder.autoencoder.steps=30", "data.encoder.autoencoder.batch_size=64", "teacher.train.steps=60",
        "rollout.num_trajectories=256", "rollout.batch_size=256", "midtrain.train.steps=40",
        "midtrain.train.eval_every=20", "posttrain.train.steps=20", "posttrain.train.eval_every=10",
        "eval.num_samples=200", "eval.batch_size=200", "eval.num_seed_sets=1"]


@pytest.mark.slow
def test_digits_latent_runs_end_to_end_and_its_generator_decodes_to_digits(tmp_path):
    from cmt_core.generator import Generator, export_generator, load_generator
    from cmt_core.pipeline import run_pipeline
    from cmt_core.presets import get_preset

    cfg = get_preset("digits-latent", TINY, artifact_root=tmp_path / "a")
    results = run_pipeline(cfg)
    assert list(results) == ["encoder", "encode", "teacher", "rollouts", "midtrain", "posttrain", "evaluation"]
    encoder = results["encoder"].metrics
    assert encoder["encoder"] == "trained" and len(encoder["raw_mean"]) == 4 and encoder["path"] == "vae"
    assert results["encode"].metrics == {"num_images": 1797, "model_shape": [4, 4, 4], "latents": "latents.zarr"}
    rows = results["evaluation"].metrics["by_key"]
    assert all(np.isfinite(row["FD-digits"]) for row in rows.values())
    assert rows["data_encoded"]["NFE"] == 0  # the latent space's own floor: training digits encoded and decoded
    assert open_latents(results["encode"].path / "latents.zarr").labels is None  # digits-latent is unconditional

    gen = Generator.from_stage(results["posttrain"].path)
    assert gen.sample_shape == (4, 4, 4) and gen.encoder.name == "trained"
    images = gen.sample(70, steps=2)
    assert images.shape == (70, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    folder = export_generator(gen, tmp_path / "export")
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert torch.equal(load_generator(folder).sample(70, steps=2), images)  # the VAE travels with it
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"replaced")
    with pytest.raises(Exception, match="sha256"):
        load_generator(folder)
    assert all(r.cached for r in run_pipeline(cfg).values())  # a rerun reuses every stage
    from cmt_core.runtime import Runtime
    from cmt_core.stages import plan
    from cmt_core.watch import watch

    rows = {row["stage"]: row for row in watch(plan(cfg), Runtime(torch.device("cpu")))}
    assert np.isfinite(rows["posttrain"]["FD-digits_2step"]) and np.isfinite(rows["teacher"]["FD-digits_teacher"])


def latent_teacher(path: Path, shape=(4, 8, 8), num_classes: int = 3) -> Path:
    """A random denoiser of ours (MLP) on latents of ``shape`` for ``num_classes`` classes, as a model file."""
    from cmt_core.models import build_model, save_model
    from cmt_core.stages import network_values

    values = network_values({"kind": "mlp", "width": 32, "depth": 2, "emb_dim": 16}, num_classes)
    torch.manual_seed(0)
    save_model(path, build_model("denoiser", values, shape), "denoiser", values, shape)
    return path


def latent_config(tmp_path: Path, vae_dir: Path, teacher: Path, *extra: str):
    from cmt_core.presets import get_preset

    return get_preset("digits", [
        "data.name=image_folder", f"data.path={tmp_path / 'no-images-here'}", "data.resolution=16",
        "data.num_classes=3", "data.encoder.kind=sd_vae", f"data.encoder.path={vae_dir}",
        "network.width=32", "network.depth=2", "network.emb_dim=16", "network.dropout=0",
        "teacher.source=checkpoint", f"teacher.path={teacher}", "rollout.num_trajectories=64",
        "rollout.batch_size=32", "rollout.store.chunk_trajectories=16", "rollout.store.shard_chunks=2",
        "rollout.solver.steps=4", *extra], artifact_root=tmp_path / "a")


@pytest.mark.slow
def test_data_free_rollouts_read_no_data_file(tmp_path, vae_dir, monkeypatch):
    """The reference's ImageNet-512 rollouts: no data set, uniformly drawn class labels, x_T = 80 z; the data's
    folder does not even exist, and reading any image would raise."""
    from cmt_core.data import images as image_module
    from cmt_core.pipeline import run_pipeline
    from cmt_core.trajectories.store import open_store

    def no_reading(*args, **kwargs):
        raise AssertionError("a data file was read")

    monkeypatch.setattr(image_module, "load_image_dataset", no_reading)
    monkeypatch.setattr(image_module.ImageFolderDataset, "__init__", no_reading)
    cfg = latent_config(tmp_path, vae_dir, latent_teacher(tmp_path / "teacher.pt"))
    results = run_pipeline(cfg, targets=("rollouts",))
    assert set(results) == {"teacher", "rollouts"}  # neither the encoder nor the data set is needed
    store = open_store(results["rollouts"].path / "store.zarr")
    assert store.sample_shape == (4, 8, 8) and len(store) == 64
    labels = torch.from_numpy(store.group["cond/class_labels"][:]).argmax(1)
    assert set(labels.tolist()) == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["latents of the wrong channel count", "a pixel data set as EDM2 latents"])
def test_bad_latent_inputs_exit_2_with_one_line(tmp_path, vae_dir, case):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(12):
        Image.fromarray(np.full((16, 16, 3), 20 * k, np.uint8)).save(folder / f"{k}.png")
    if case == "latents of the wrong channel count":  # a teacher of 3-channel samples for 4-channel latents
        teacher, extra, expected = latent_teacher(tmp_path / "t.pt", (3, 8, 8), 0), [], "(4, 8, 8)"
    else:
        teacher, extra, expected = (latent_teacher(tmp_path / "t.pt", num_classes=0),
                                    [f"data.encoder.edm2_encoded={folder}"], "no .npy files")
    cfg = latent_config(tmp_path, vae_dir, teacher, f"data.path={folder}", "data.num_classes=0", *extra)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "run", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


@pytest.mark.slow
def test_cmt_latent_vgg_trains_the_elatent_lpips_network_on_the_encoded_data(tmp_path):
    from cmt_core.objectives.distances import make_distance

    out = tmp_path / "vgg.safetensors"
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "latent-vgg", "--preset", "digits-latent", "--set",
                           "data.num_classes=10", "--set", "data.heldout_fraction=0.9", "--set",
                           "data.encoder.autoencoder.steps=5", "--artifact-root", str(tmp_path / "a"), "--out",
                           str(out), "--epochs", "1", "--batch-size", "64", "--hidden", "16"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "midtrain.lpips_backbone=" in proc.stdout
    distance = make_distance("elatent_lpips", lpips_backbone=out)
    x = torch.randn(3, 4, 24, 24)  # augmentation needs sides of at least 22
    assert torch.equal(distance(x, x), torch.zeros(3)) and (distance(x, x.flip(0)) > 0).any()
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "latent-vgg", "--preset", "digits", "--out",
                           str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "data.encoder.kind='identity'" in proc.stderr


def test_encoding_data_in_its_own_space_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "stage", "encode", "--preset", "digits",
                           "--artifact-root", str(tmp_path / "a")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "data.encoder.kind='identity'" in proc.stderr and not (tmp_path / "a").exists()


def test_an_edm2_snapshot_must_work_in_the_configs_space():
    from cmt_core.encoders import snapshot_encoder_problem

    scale = 0.5 / torch.tensor(EDM2_RAW_STD)
    vae = {"class_name": "StabilityVAEEncoder", "scale": scale.tolist(),
           "bias": (-torch.tensor(EDM2_RAW_MEAN) * scale).tolist()}
    pixels, latents = EncoderConfig(), EncoderConfig(kind="sd_vae", path="vae")
    assert snapshot_encoder_problem(vae, latents) is None and snapshot_encoder_problem(None, pixels) is None
    assert "set data.encoder.kind='sd_vae'" in snapshot_encoder_problem(vae, pixels)
    assert "works in pixels" in snapshot_encoder_problem({"class_name": "StandardRGBEncoder"}, latents)
    other = EncoderConfig(kind="sd_vae", path="vae", final_std=1.0)
    assert "data.encoder.raw_mean" in snapshot_encoder_problem(vae, other)


@pytest.mark.slow
def test_a_latent_edm2_teacher_for_pixel_data_exits_2_naming_the_encoder(tmp_path, monkeypatch):
    from tests.test_edm2 import CLASSES, tiny, trained_looking, write_edm2_pickle
    from tests.test_edm_pickle import install_edm_module_stand_ins
    from tests.test_imagenet64 import write_imagenet_zip

    write_edm2_pickle(tmp_path / "xxl.pkl", trained_looking(tiny()), install_edm_module_stand_ins(monkeypatch),
                      encoder="StabilityVAEEncoder")
    proc = subprocess.run([sys.executable, "-m", "cmt_core.cli", "run", "--preset", "imagenet64-tiny", "--set",
                           f"data.path={write_imagenet_zip(tmp_path)}", "--set", "data.resolution=8", "--set",
                           f"data.num_classes={CLASSES}", "--set", "network.width=32", "--set", "network.emb_dim=64",
                           "--set", "teacher.source=edm_pickle", "--set", f"teacher.path={tmp_path / 'xxl.pkl'}",
                           "--artifact-root", str(tmp_path / "a")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Stable Diffusion's VAE latents" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
