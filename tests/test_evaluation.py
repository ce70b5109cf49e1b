"""Evaluation: Frechet distances via clean-fid, honestly named feature spaces, 2-D distances and the report."""

import base64
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image
from torch import nn

from cmt_core.config import DataConfig, EvalConfig
from cmt_core.data import load_data
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.evaluation import (
    DigitsClassifierFeatures,
    Evaluator,
    InceptionFeatures,
    energy_distance,
    feature_extractor,
    flow_map_error,
    frechet_distance,
    load_digits_split,
    png_data_url,
    sliced_wasserstein,
    write_report,
)
from cmt_core.evaluation.inception import pytorch_fid_inception_architecture, to_uint8_rgb
from cmt_core.evaluation.scoring import Scorer

# The stand-in Inception is scripted and saved with torch.jit, as clean-fid's real weights are.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return DigitsClassifierFeatures(cache_dir)


# --- Frechet distance -------------------------------------------------------------------------------------------

def test_frechet_distance_of_a_feature_set_with_itself_is_zero(classifier, digits):
    feats = classifier(digits.heldout.all())
    scale = np.trace(np.cov(feats, rowvar=False))  # ~420: sqrtm's round-off is relative to it
    assert abs(frechet_distance(feats, feats)) < 1e-8 * scale


def test_frechet_distance_equals_cleanfid_on_the_same_features(classifier, digits):
    a, b = classifier(digits.heldout.all()), classifier(digits.train.all())
    ours = frechet_distance(a, b)
    assert ours == cleanfid_fid.fid_from_feats(a, b)
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (a, b)]
    assert ours == cleanfid_fid.frechet_distance(*stats[0], *stats[1])
    assert ours > 0


def test_fd_digits_grows_monotonically_with_image_noise(digits, cache_dir, classifier):
    evaluator = Evaluator(digits, EvalConfig(), cache_dir)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(digits.heldout), *digits.sample_shape, generator=g)
    scores = [evaluator.score(digits.heldout.all() + s * noise)["FD-digits"] for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert scores[0] < 1e-6
    assert all(lo < hi for lo, hi in zip(scores, scores[1:])), scores


def test_image_floor_is_heldout_vs_train_and_reference_stats_are_cached(digits, cache_dir, classifier):
    floor = Evaluator(digits, EvalConfig(), cache_dir).floor()
    expected = frechet_distance(classifier(digits.heldout.all()), classifier(digits.train.all()))
    assert floor == {"FD-digits": pytest.approx(expected, rel=1e-5)}
    cached = sorted(cache_dir.glob("fd_stats_*.npz"))
    assert len(cached) == 2  # held-out and train statistics
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert Evaluator(digits, EvalConfig(), cache_dir).floor() == floor
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


# --- digits classifier --------------------------------------------------------------------------------------------

def test_digits_split_is_the_split_of_load_data(digits):
    train_x, train_y, held_x, held_y = load_digits_split(seed=0, heldout_fraction=0.2)
    assert torch.equal(train_x, digits.train.all()) and torch.equal(held_x, digits.heldout.all())
    assert len(train_y) == len(train_x) and set(held_y.tolist()) == set(range(10))


def test_digits_classifier_is_accurate_on_heldout_and_cached(classifier, cache_dir):
    assert classifier.heldout_accuracy > 0.95
    assert classifier.name == "FD-digits"
    mtime = classifier.weights_path.stat().st_mtime_ns
    again = DigitsClassifierFeatures(cache_dir)
    assert not again.trained_now
    assert again.heldout_accuracy == classifier.heldout_accuracy
    assert classifier.weights_path.stat().st_mtime_ns == mtime
    assert json.loads(classifier.meta_path.read_text())["heldout_accuracy"] > 0.95


def test_evaluator_refuses_a_classifier_that_saw_the_heldout_split(cache_dir, classifier):
    other_split = load_data(DataConfig(name="digits", seed=1))
    with pytest.raises(ValueError, match="held-out split"):
        Evaluator(other_split, EvalConfig(), cache_dir)


# --- Inception through a TorchScript stand-in -----------------------------------------------------------------------

class StandInInceptionLayers(nn.Module):
    """Normalised 299 x 299 input -> (N, 2048, 1, 1), like the real model's ``layers``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 8).flatten(1)))[:, :, None, None]


class StandInInception(nn.Module):
    """Same call interface as clean-fid's ``inception-2015-12-05.pt``: 0..255 images, resized inside."""

    def __init__(self):
        super().__init__()
        self.layers = StandInInceptionLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).flatten(1)
        return features if return_features else self.output(features)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StandInInception()), str(path))
    return path


def test_clean_inception_features_equal_cleanfid_folder_pipeline(inception_path, digits, tmp_path):
    images = digits.heldout.all()[:6]
    for i, img in enumerate(to_uint8_rgb(images)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    reference_model = InceptionV3W(str(inception_path.parent), download=False, resize_inside=False).eval()
    expected = cleanfid_fid.get_folder_features(str(tmp_path), reference_model, num_workers=0, batch_size=4,
                                                device=torch.device("cpu"), mode="clean", verbose=False)
    ours = InceptionFeatures(inception_path, "clean")(images)
    assert ours.shape == (6, 2048)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_legacy_tensorflow_inception_is_called_with_return_features(inception_path, digits):
    images = digits.heldout.all()[:4]
    reference_model = InceptionV3W(str(inception_path.parent), download=False, resize_inside=True).eval()
    with torch.no_grad():
        expected = reference_model(to_uint8_rgb(images).float()).numpy()
    np.testing.assert_allclose(InceptionFeatures(inception_path, "legacy_tensorflow")(images), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*weights.*:UserWarning")  # clean-fid's own InceptionV3 passes pretrained=
def test_legacy_pytorch_inception_loads_a_local_pytorch_fid_state_dict(tmp_path, digits, monkeypatch):
    from cleanfid import inception_pytorch
    from cleanfid.resize import build_resizer

    torch.manual_seed(0)
    state = pytorch_fid_inception_architecture().state_dict()
    torch.save(state, tmp_path / "pt_inception.pth")
    images = digits.heldout.all()[:1]
    ours = InceptionFeatures(tmp_path / "pt_inception.pth", "legacy_pytorch")(images)

    monkeypatch.setattr(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: state)
    reference_model = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False).eval()
    resize = build_resizer("legacy_pytorch")
    resized = np.stack([resize(img.permute(1, 2, 0).numpy().astype(np.float32)) for img in to_uint8_rgb(images)])
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(resized).permute(0, 3, 1, 2) / 255)[0].flatten(1).numpy()
    assert ours.shape == (1, 2048)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_metric_is_named_fid_only_with_inception_weights(inception_path, digits, cache_dir, classifier):
    with_weights = Evaluator(digits, EvalConfig(inception_path=inception_path), cache_dir)
    assert with_weights.metric_name == "FID (clean)"
    assert with_weights.info()["extractor"] == "FID (clean)"
    offline = Evaluator(digits, EvalConfig(), cache_dir)
    assert offline.metric_name == "FD-digits" and offline.info()["heldout_accuracy"] > 0.95
    other_images = feature_extractor("cifar10", EvalConfig(), cache_dir)
    assert other_images.name == "FD-pixels"
    assert "FID" not in offline.metric_name + other_images.name
    with pytest.raises(FileNotFoundError):
        InceptionFeatures(inception_path.parent / "missing.pt")


# --- 2-D distances --------------------------------------------------------------------------------------------------

def test_point_distances_are_zero_for_same_samples_and_grow_with_shift():
    points = GaussianMixture().sample(1000, torch.Generator().manual_seed(0))
    assert sliced_wasserstein(points, points) == 0.0
    assert energy_distance(points, points) == 0.0
    shifts = [0.1, 0.5, 1.0]
    sw = [sliced_wasserstein(points, points + s) for s in shifts]
    ed = [energy_distance(points, points + s) for s in shifts]
    assert 0 < sw[0] < sw[1] < sw[2] and 0 < ed[0] < ed[1] < ed[2]


def test_sliced_wasserstein_handles_unequal_sizes_exactly():
    a, b = torch.randn(20, 2), torch.randn(30, 2) + 0.3
    equal_size = sliced_wasserstein(a.repeat_interleave(3, 0), b.repeat_interleave(2, 0))
    assert sliced_wasserstein(a, b) == pytest.approx(equal_size, rel=1e-12)


def test_energy_distance_matches_scipy_in_one_dimension():
    from scipy.stats import energy_distance as scipy_energy

    a, b = torch.randn(50, 1), 2 * torch.randn(70, 1)
    assert energy_distance(a, b) == pytest.approx(scipy_energy(a[:, 0], b[:, 0]) ** 2, rel=1e-10)


def test_flow_map_error_is_mean_l2_norm():
    exact = torch.randn(10, 2)
    assert flow_map_error(exact + torch.tensor([3.0, 4.0]), exact) == pytest.approx(5.0)


def test_2d_evaluator_scores_against_heldout_and_floor_is_two_fresh_samples(tmp_path):
    data = load_data(DataConfig(name="gaussian_mixture"))
    evaluator = Evaluator(data, EvalConfig(num_samples=1000), tmp_path)
    assert evaluator.metric_name == "sliced_wasserstein"
    floor = evaluator.floor()
    good = evaluator.score(data.distribution.sample(1000, torch.Generator().manual_seed(7)))
    bad = evaluator.score(data.distribution.sample(1000, torch.Generator().manual_seed(7)) * 1.5)
    assert set(floor) == set(good) == {"sliced_wasserstein", "energy_distance"}
    for key in floor:
        assert good[key] < 3 * floor[key] and bad[key] > 5 * good[key]


class SharpOnlyAt(nn.Module):
    """A consistency model that lands on the data from ``good_sigma`` only: from any other sigma it returns its
    input scaled down (a blurred sample); from sigma_max it returns its input scaled to the data's size."""

    def __init__(self, data, good_sigma: float):
        super().__init__()
        self.data, self.good_sigma = data, good_sigma

    def forward(self, x, t, cond=None):
        t = float(torch.as_tensor(t).flatten()[0])
        if abs(t - self.good_sigma) < 1e-6:
            return self.data.distribution.sample(len(x), torch.Generator().manual_seed(len(self.data.train)))
        return x / 80.0 if t > 10 else 0.3 * x


def test_the_2step_sigma_is_searched_on_noises_of_its_own(tmp_path):
    data = load_data(DataConfig(name="gaussian_mixture"))
    cfg = EvalConfig(num_samples=500, mid_sigma_search=(0.3, 0.45, 0.7))
    scorer = Scorer(data, cfg, Evaluator(data, cfg, tmp_path), torch.device("cpu"), 80.0, 0.002)
    assert scorer.mid_sigma_for("consistency", SharpOnlyAt(data, 0.45)) == 0.45
    assert not torch.equal(scorer._search.x_T, scorer.x_T) and scorer._search.seed != scorer.seed
    assert Scorer(data, cfg.model_copy(update={"mid_sigma_search": ()}), scorer.evaluator, torch.device("cpu"), 80.0,
                  0.002).mid_sigma_for("consistency", SharpOnlyAt(data, 0.45)) == cfg.mid_sigma
    metrics = scorer.training_evaluate("consistency")(SharpOnlyAt(data, 0.45))
    assert metrics["mid_sigma"] == 0.45 and metrics["score_2step"] == metrics["sliced_wasserstein_2step"]
    assert metrics["score_1step"] == metrics["flow_map_error_1step"]  # the exact teacher's 1-step primary


# --- report ---------------------------------------------------------------------------------------------------------

def _markdown_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.split("## Results", 1)[1].splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_report_writes_figures_and_the_same_numbers_as_metrics_json(tmp_path, digits):
    rows = [
        {"model": "data floor (held-out vs train)", "NFE": None, "FD-digits": 0.123456789},
        {"model": "teacher (Heun, 35 NFE)", "NFE": 35, "FD-digits": 1.23456789},
        {"model": "CMT + ECT", "NFE": 1, "FD-digits": 12345.6789, "seconds": 2.0 / 3.0},
    ]
    grids = {"teacher": digits.heldout.all()[:16], "2-D teacher": torch.randn(500, 2)}
    log = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(0, 201, 10)]
    for row in log[::5]:
        row["eval_FD-digits"] = 5.0 - row["step"] / 50
    curves = {"midtrain": log}
    info = {"device": "cpu", "num_samples": 2000, "extractor": "FD-digits", "seconds_per_stage": {"teacher": 12.345678}}
    metrics = write_report(tmp_path, rows, grids, curves, info)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    figures = [*metrics["figures"]["samples"].values(), *metrics["figures"]["curves"].values()]
    assert len(figures) == 3
    report = (tmp_path / "report.md").read_text()
    for name in figures:
        with Image.open(tmp_path / name) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) > 50
        assert f"]({name})" in report

    table = _markdown_table(report)
    assert len(table) == len(rows)
    for md_row, json_row in zip(table, metrics["rows"]):
        for key, value in json_row.items():
            if isinstance(value, float):
                assert float(md_row[key]) == value
            else:
                assert md_row[key] == ("n/a" if value is None else str(value))
    assert metrics["rows"][1]["FD-digits"] == 1.235 and metrics["rows"][2]["FD-digits"] == 12350.0
    assert "12.35" in report and "- device: cpu" in report

    url = png_data_url(tmp_path / figures[0])
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / figures[0]).read_bytes()
