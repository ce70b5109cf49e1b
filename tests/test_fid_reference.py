"""``cmt fid`` and ``eval.reference_stats``: image sets (PNG folders, ``arr_0`` npz) and reference statistics read from
files (``cmt_core.evaluation.reference``), scored in-process (``cmt_core.cli.main``) and through ``.venv/bin/cmt``;
every bad input is one line on stderr naming it, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image

from cmt_core.cli import main as cmt
from cmt_core.config import DataConfig, EvalConfig
from cmt_core.data import load_data
from cmt_core.data.images import load_digits, to_model_range
from cmt_core.engine import ConfigView
from cmt_core.evaluation import DigitsClassifierFeatures, Evaluator, InceptionFeatures, extract_features
from cmt_core.evaluation import reference as reference_module
from cmt_core.evaluation.frechet import feature_stats, frechet_distance_from_stats, load_stats
from cmt_core.evaluation.inception import to_uint8_rgb
from cmt_core.evaluation.reference import read_images
from cmt_core.preflight import check_reference_stats
from cmt_core.presets import get_preset
from cmt_core.stages import STAGES, plan, stage_scorer
from tests.test_evaluation import StandInInception

# The stand-in Inception is scripted and saved with torch.jit, as clean-fid's real weights are.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
BATCH = 500  # cmt fid's default: direct computations batch alike, so their features are bit-identical


def write_png_folder(folder: Path, images: np.ndarray) -> Path:
    """uint8 ``(N, H, W, C)`` images as PNG files in EDM's layout, ``folder/000000/000000.png``, ...,
    ``folder/001000/001000.png``."""
    for i, img in enumerate(images):
        sub = folder / f"{i // 1000 * 1000:06d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(sub / f"{i:06d}.png")
    return folder


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [-1, 1], as the data sets read images."""
    return to_model_range(images.transpose(0, 3, 1, 2), 255.0)


@pytest.fixture(scope="module")
def digits_u8() -> np.ndarray:
    """The 1,797 digits quantised as EDM saves samples (``to_uint8_rgb``): uint8 ``(N, 8, 8, 1)``."""
    images, _ = load_digits()
    return to_uint8_rgb(images)[:, :1].permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def sets(tmp_path_factory, digits_u8) -> SimpleNamespace:
    """The digits as a PNG folder and as an ``arr_0`` npz, a brightened copy, and statistics files."""
    folder = tmp_path_factory.mktemp("sets")
    np.savez(folder / "digits.npz", digits_u8)
    bright = np.clip(digits_u8.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    np.savez(folder / "bright.npz", bright)
    return SimpleNamespace(folder=folder, png=write_png_folder(folder / "png", digits_u8), npz=folder / "digits.npz",
                           bright=folder / "bright.npz", bright_u8=bright)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An artifact root shared by the module: the digits classifier is trained once, into its features folder."""
    return tmp_path_factory.mktemp("root") / "artifacts"


@pytest.fixture(scope="module")
def classifier(root) -> DigitsClassifierFeatures:
    return DigitsClassifierFeatures(root / "features")


def fid(capsys, samples, ref, *extra) -> dict:
    """``cmt fid`` in-process: its JSON line, after checking the one-line summary above it."""
    assert cmt(["fid", str(samples), "--ref", str(ref), *map(str, extra)]) == 0
    line, payload = capsys.readouterr().out.strip().splitlines()[-2:]
    result = json.loads(payload)
    assert line.startswith(f"{result['metric']}: ") and f"{result['num_samples']} samples vs reference" in line
    assert f"device {result['device']}" in line
    return result


def test_uint8_images_round_trip_exactly_through_the_extractors_quantisation(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    rgb = np.stack([np.arange(256).reshape(16, 16), np.arange(256).reshape(16, 16).T,
                    255 - np.arange(256).reshape(16, 16)], -1).astype(np.uint8)[None]
    for name, images in (("grey", grey), ("rgb", rgb)):
        np.savez(tmp_path / f"{name}.npz", images)
        for path in (write_png_folder(tmp_path / name, images), tmp_path / f"{name}.npz"):
            x = read_images(path, "SAMPLES").all()
            assert x.dtype == torch.float32 and x.shape == (1, images.shape[-1], 16, 16)
            assert x.min() >= -1 and x.max() <= 1
            assert torch.equal(x, as_float(images))
            assert torch.equal(to_uint8_rgb(x), torch.from_numpy(images).permute(0, 3, 1, 2).expand(1, 3, 16, 16))


def test_a_set_scored_against_statistics_of_itself_is_zero(capsys, sets, root):
    result = fid(capsys, sets.png, sets.npz, "--artifact-root", root)
    assert result["metric"] == "FD-digits" and result["num_samples"] == 1797 and result["device"] == "cpu"
    assert result["reference_source"] == "1797 images"
    scale = np.trace(load_stats(result["reference_cache"])[1])
    assert abs(result["value"]) < 1e-6 * scale


def test_a_brightened_set_scores_as_cleanfid_on_the_same_features(capsys, sets, root, classifier, digits_u8):
    result = fid(capsys, sets.bright, sets.png, "--artifact-root", root)
    a = extract_features(classifier, as_float(sets.bright_u8), BATCH)
    b = extract_features(classifier, as_float(digits_u8), BATCH)
    expected = cleanfid_fid.frechet_distance(np.mean(a, axis=0), np.cov(a, rowvar=False),
                                             np.mean(b, axis=0), np.cov(b, rowvar=False))
    assert expected > 1.0
    assert result["value"] == pytest.approx(expected, rel=1e-9)


def test_folder_and_npz_of_the_same_images_give_identical_statistics(capsys, sets, root, tmp_path):
    saved = []
    for ref in (sets.png, sets.npz):
        fid(capsys, sets.npz, ref, "--num", 100, "--artifact-root", root, "--save-ref", tmp_path / f"{ref.name}.npz")
        saved.append(load_stats(tmp_path / f"{ref.name}.npz"))
    assert np.array_equal(saved[0][0], saved[1][0]) and np.array_equal(saved[0][1], saved[1][1])
    folder, npz = read_images(sets.png, "SAMPLES"), read_images(sets.npz, "SAMPLES")
    assert len(folder) == len(npz) == 1797 and torch.equal(folder[1500:1510], npz[1500:1510])  # 001000/ sorted in


def test_a_mu_sigma_reference_scores_as_the_images_it_was_saved_from(capsys, sets, root, tmp_path):
    from_images = fid(capsys, sets.bright, sets.png, "--artifact-root", root, "--save-ref", tmp_path / "ref.npz")
    assert from_images["saved_reference"] == str(tmp_path / "ref.npz")
    from_stats = fid(capsys, sets.bright, tmp_path / "ref.npz", "--artifact-root", root)
    assert from_stats["reference_source"] == "mu/sigma statistics" and from_stats["reference_cache"] is None
    assert from_stats["value"] == from_images["value"]
    mu, sigma = load_stats(tmp_path / "ref.npz")
    np.savez(tmp_path / "edm_style.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # EDM's fid-refs
    assert fid(capsys, sets.bright, tmp_path / "edm_style.npz", "--artifact-root", root)["value"] == pytest.approx(
        from_images["value"], rel=1e-5)


def test_reference_statistics_of_images_are_computed_once(capsys, sets, tmp_path, classifier, monkeypatch):
    other_root = tmp_path / "artifacts"  # a root without cached statistics
    (other_root / "features").mkdir(parents=True)
    for file in (classifier.weights_path, classifier.meta_path):  # the classifier, trained once for the module
        (other_root / "features" / file.name).write_bytes(file.read_bytes())
    real, counted = reference_module.image_features, []

    def counting(images, *args, **kwargs):
        counted.append(len(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(reference_module, "image_features", counting)
    first = fid(capsys, sets.bright, sets.png, "--num", 50, "--artifact-root", other_root)
    cache = Path(first["reference_cache"])
    assert cache.parent == other_root / "features" and counted == [50, 1797]  # the samples, then the reference
    mtime = cache.stat().st_mtime_ns
    again = fid(capsys, sets.bright, sets.png, "--num", 50, "--artifact-root", other_root)
    assert counted == [50, 1797, 50]  # the samples only: the reference's statistics come from the cache
    assert cache.stat().st_mtime_ns == mtime and again == first


def test_the_command_line_exit_codes_through_a_subprocess(sets, root):
    command = [str(Path(sys.executable).with_name("cmt")), "fid", str(sets.npz), "--ref", str(sets.png),
               "--artifact-root", str(root)]
    done = subprocess.run([*command, "--num", "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("FD-digits: ") and json.loads(done.stdout.splitlines()[1])["num_samples"] == 20
    bad = subprocess.run([*command, "--num", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["invalid input: --num=0: give a positive number of images"]


# --- the evaluation stage ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_data():
    return load_data(DataConfig(name="digits"))


def test_the_evaluation_scores_against_eval_reference_stats_when_set(capsys, sets, root, digits_data, tmp_path):
    ref = tmp_path / "ref.npz"
    fid(capsys, sets.npz, sets.png, "--num", 10, "--artifact-root", root, "--save-ref", ref)
    cfg = EvalConfig(reference_stats=ref)
    held = digits_data.heldout.all()
    default = Evaluator(digits_data, EvalConfig(), root / "features")
    with_ref = Evaluator(digits_data, cfg, root / "features", reference_stats=cfg.reference_stats)
    feats = default.features(held)
    assert with_ref.score(held) == {"FD-digits": frechet_distance_from_stats(feature_stats(feats), load_stats(ref))}
    assert default.score(held) == {"FD-digits": frechet_distance_from_stats(feature_stats(feats),
                                                                            default._split_stats("heldout"))}
    assert with_ref.info()["reference"] == f"eval.reference_stats {ref} (mu/sigma statistics)"
    assert default.info()["reference"] == f"held-out split ({len(held)} samples)"
    assert with_ref.floor() == pytest.approx(with_ref.score(held), rel=1e-12)  # the held-out split vs the statistics
    assert with_ref.floor_label == "data (held-out split vs reference statistics)"
    assert default.floor_label == "data (held-out vs train)"
    images = Evaluator(digits_data, cfg, root / "features", reference_stats=sets.png)  # images: their statistics
    assert images.score(held)["FD-digits"] == pytest.approx(with_ref.score(held)["FD-digits"], rel=1e-12)
    assert images.info()["reference"] == f"eval.reference_stats {sets.png} (1797 images)"


def test_only_the_evaluation_stage_reads_eval_reference_stats(sets, root):
    base = get_preset("digits")
    other = get_preset("digits", [f"eval.reference_stats={sets.npz}"])
    data = load_data(other.data)
    ids, new = plan(base).ids, plan(other).ids
    assert {s for s in ids if ids[s] != new[s]} == {"evaluation"}  # training stages choose checkpoints as before

    def view(stage):
        return ConfigView(other, STAGES[stage].reads + STAGES[stage].uses, stage)

    cpu = torch.device("cpu")
    evaluation = view("evaluation")
    assert stage_scorer(evaluation, root, cpu, data, evaluation.eval.reference_stats).evaluator.reference_path \
        == sets.npz
    assert stage_scorer(view("midtrain"), root, cpu, data).evaluator.reference_path is None  # reads no such field


def test_preflight_accepts_a_reference_of_the_datas_shape(sets):
    cfg = get_preset("digits", [f"eval.reference_stats={sets.png}"])
    check_reference_stats(cfg, ["evaluation"], (1, 8, 8))


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory, digits_u8) -> Path:
    """The bad files the cases point at."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    (folder / "not_a_zip.npz").write_bytes(b"not a zip archive at all")
    np.savez(folder / "no_arr_0.npz", images=digits_u8)
    np.savez(folder / "float.npz", digits_u8.astype(np.float32))
    np.savez(folder / "nhw.npz", digits_u8[..., 0])
    np.savez(folder / "one.npz", digits_u8[:1])
    np.savez(folder / "ok.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "mu_2d.npz", mu=np.zeros((8, 8)), sigma=np.eye(64))
    np.savez(folder / "sigma_rect.npz", mu=np.zeros(64), sigma=np.zeros((64, 63)))
    np.savez(folder / "dim_32.npz", mu=np.zeros(32), sigma=np.eye(32))
    np.savez(folder / "nan.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
    np.savez(folder / "mu_only.npz", mu=np.zeros(64))
    with zipfile.ZipFile(folder / "huge.npz", "w") as archive:  # headers claiming 8 TB of statistics, and no data
        for name, shape in (("mu", (10**6,)), ("sigma", (10**6, 10**6))):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": shape})
    big = np.repeat(np.repeat(digits_u8[:20], 2, axis=1), 2, axis=2)  # 16x16 digits
    write_png_folder(folder / "digits16", big)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(folder / "rgb16.npz", rgb)
    np.savez(folder / "rgb12.npz", rgb[:, :12, :12])
    np.savez(folder / "pixels_dim.npz", mu=np.zeros(64), sigma=np.eye(64))  # FD-pixels of 3x16x16: 768 dimensions
    (folder / "a_folder").mkdir()
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(StandInInception()), str(folder / "inception.pt"))
    return folder


S, R = "{samples}", "{ref}"  # the digits npz and a valid 64-d statistics file
FID_CASES = {
    "samples that do not exist": (["{bad}/absent", "--ref", R], "SAMPLES='{bad}/absent' does not exist"),
    "samples folder without images": (["{bad}/empty", "--ref", R], "no PNG / JPEG images"),
    "samples npz without arr_0": (["{bad}/no_arr_0.npz", "--ref", R], "holds the arrays ['images'], not images"),
    "samples npz of float images": (["{bad}/float.npz", "--ref", R], "arr_0 must be uint8 images (N, H, W, C)"),
    "samples npz not NHWC": (["{bad}/nhw.npz", "--ref", R], "(N, H, W, C) with C = 1 or 3"),
    "samples npz that is no zip": (["{bad}/not_a_zip.npz", "--ref", R], "SAMPLES='{bad}/not_a_zip.npz' is not an .npz"),
    "samples that are statistics": ([R, "--ref", R], "holds statistics (mu, sigma), not images"),
    "one sample": (["{bad}/one.npz", "--ref", R], "holds 1 image: a Frechet distance needs at least 2"),
    "N = 0": ([S, "--ref", R, "--num", "0"], "--num=0: give a positive number"),
    "N negative": ([S, "--ref", R, "--num", "-5"], "--num=-5: give a positive number"),
    "N above the samples": ([S, "--ref", R, "--num", "5000"], "--num=5000, but SAMPLES="),
    "batch size 0": ([S, "--ref", R, "--batch-size", "0"], "--batch-size=0"),
    "reference that does not exist": ([S, "--ref", "{bad}/absent.npz"], "--ref='{bad}/absent.npz' does not exist"),
    "reference that is no zip": ([S, "--ref", "{bad}/not_a_zip.npz"], "--ref='{bad}/not_a_zip.npz' is not an .npz"),
    "mu not 1-D": ([S, "--ref", "{bad}/mu_2d.npz"], "mu has shape (8, 8), not (D,)"),
    "sigma not D x D": ([S, "--ref", "{bad}/sigma_rect.npz"], "sigma has shape (64, 63), not (64, 64)"),
    "statistics of another dimension": ([S, "--ref", "{bad}/dim_32.npz"],
                                        "--ref='{bad}/dim_32.npz' holds statistics of 32-dimensional features, but "
                                        "FD-digits features have 64 dimensions"),
    "statistics claiming 8 TB": ([S, "--ref", "{bad}/huge.npz"], "holds statistics of 1000000-dimensional features"),
    "non-finite statistics": ([S, "--ref", "{bad}/nan.npz"], "mu or sigma holds inf or NaN"),
    "reference of one image": ([S, "--ref", "{bad}/one.npz"], "--ref='{bad}/one.npz' holds 1 image: statistics need"),
    "statistics without sigma": ([S, "--ref", "{bad}/mu_only.npz"], "holds mu but no sigma"),
    "FD-digits reference of another size": ([S, "--ref", "{bad}/digits16"],
                                            "holds images of shape (1, 16, 16), the samples are (1, 8, 8): FD-digits"),
    "FD-pixels reference of another size": (["{bad}/rgb16.npz", "--ref", "{bad}/rgb12.npz"],
                                            "holds images of shape (3, 12, 12), the samples are (3, 16, 16): "
                                            "FD-pixels"),
    "FD-pixels statistics of another dimension": (["{bad}/rgb16.npz", "--ref", "{bad}/pixels_dim.npz"],
                                                  "64-dimensional features, but FD-pixels features have 768"),
    "Inception with FD-digits statistics": ([S, "--ref", R, "--inception", "{bad}/inception.pt"],
                                            "64-dimensional features, but Inception features have 2048"),
    "Inception weights that do not exist": ([S, "--ref", R, "--inception", "{bad}/absent.pt"],
                                            "--inception='{bad}/absent.pt' does not exist"),
    "Inception weights that are garbage": ([S, "--ref", "{bad}/digits16", "--inception", "{bad}/not_a_zip.npz"],
                                           "--inception='{bad}/not_a_zip.npz' is not usable Inception weights"),
    "mode without Inception weights": ([S, "--ref", R, "--mode", "legacy_tensorflow"], "--mode=legacy_tensorflow"),
    "save-ref into a folder": ([S, "--ref", R, "--save-ref", "{bad}/a_folder"], "--save-ref="),
}


@pytest.mark.parametrize("case", list(FID_CASES))
def test_bad_input_to_cmt_fid_is_one_line_and_writes_nothing(case, bad, sets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "artifacts"
    args, words = FID_CASES[case]
    fill = {"{samples}": str(sets.npz), "{ref}": str(bad / "ok.npz"), "{bad}": str(bad)}
    for key, value in fill.items():
        args, words = [a.replace(key, value) for a in args], words.replace(key, value)
    assert cmt(["fid", *args, "--artifact-root", str(root)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid input: ") and "Traceback" not in captured.err, lines
    assert words in lines[0], lines[0]
    assert captured.out == "" and not root.exists() and not any(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize("value,words", [
    ("{bad}/dim_32.npz", "eval.reference_stats='{bad}/dim_32.npz' holds statistics of 32-dimensional features, but "
                         "FD-digits features have 64 dimensions"),
    ("{bad}/digits16", "holds images of shape (1, 16, 16), the samples are (1, 8, 8)"),
    ("{bad}/absent.npz", "eval.reference_stats='{bad}/absent.npz' does not exist"),
    ("{bad}/no_arr_0.npz", "not images"),
], ids=["statistics of another dimension", "images of another shape", "missing", "an npz of neither"])
def test_bad_eval_reference_stats_is_refused_by_preflight(value, words, bad, tmp_path, capsys):
    value, words = value.replace("{bad}", str(bad)), words.replace("{bad}", str(bad))
    root = tmp_path / "artifacts"
    assert cmt(["run", "--preset", "digits", "--artifact-root", str(root), "--set",
                f"eval.reference_stats={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not root.exists()


# --- Inception ------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # one 2048 x 2048 matrix square root: ~40 s on 2 busy cores
@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_fid_with_inception_weights_compares_images_of_any_size(capsys, bad, sets, tmp_path):
    weights = bad / "inception.pt"
    result = fid(capsys, sets.npz, bad / "digits16", "--num", 30, "--inception", weights, "--mode",
                 "legacy_tensorflow", "--artifact-root", tmp_path / "artifacts", "--save-ref", tmp_path / "ref.npz")
    assert result["metric"] == "FID (legacy_tensorflow)" and result["feature_dim"] == 2048
    assert result["weights"] == str(weights) and result["reference_source"] == "20 images"
    inception = InceptionFeatures(weights, "legacy_tensorflow")
    reference = extract_features(inception, read_images(bad / "digits16", "REF").all(), BATCH)
    mu, sigma = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, reference.mean(0)) and np.array_equal(sigma, np.cov(reference, rowvar=False))
    assert np.isfinite(result["value"]) and result["value"] > 0
