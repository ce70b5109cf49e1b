"""Scoring conditional samples by class: the per-class Frechet distance, the digits classifier's class accuracy,
and their place in the results table and report."""

import pytest
import torch
from PIL import Image

from cmt_core.config import DataConfig, EvalConfig, SolverConfig
from cmt_core.data import Data, load_data
from cmt_core.data.datasets import TensorDataset
from cmt_core.evaluation import Evaluator
from cmt_core.evaluation.report import save_curve_figure
from cmt_core.evaluation.scoring import Scorer
from cmt_core.evaluation.table import results_table

PER_CLASS = "FD-digits per class"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class_metrics_cache")


@pytest.fixture(scope="module")
def data_cfg():
    return DataConfig(name="digits", num_classes=10)


@pytest.fixture(scope="module")
def digits(data_cfg):
    return load_data(data_cfg)


@pytest.fixture(scope="module")
def evaluator(digits, data_cfg, cache_dir):
    return Evaluator(digits, EvalConfig(), cache_dir, data_cfg=data_cfg)


@pytest.fixture(scope="module")
def heldout(digits):
    """The held-out images ``(N, 1, 8, 8)`` and their labels ``(N,)``: a perfect conditional generator."""
    return digits.heldout.all(), digits.heldout.labels(slice(None))


def test_a_perfect_generator_is_accurate_and_close_to_each_class(evaluator, heldout):
    images, labels = heldout
    metrics = evaluator.score(images, labels)
    assert list(metrics) == ["FD-digits", PER_CLASS, "class_accuracy"]
    assert metrics["class_accuracy"] > 90
    # ~36 held-out images per class: the reference of each class is its training images, and the held-out images
    # of a class against them are exactly the per-class floor.
    assert evaluator.class_reference_split == "train"
    assert metrics[PER_CLASS] == pytest.approx(evaluator.floor(by_class=True)[PER_CLASS], rel=1e-6)
    assert 0 < metrics[PER_CLASS] < 20


def test_shuffled_labels_drop_the_accuracy_to_chance_and_raise_the_per_class_distance(evaluator, heldout):
    images, labels = heldout
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    right, wrong = evaluator.score(images, labels), evaluator.score(images, shuffled)
    assert 3 < wrong["class_accuracy"] < 20  # chance: 10
    assert wrong[PER_CLASS] > 10 * right[PER_CLASS]
    assert wrong["FD-digits"] == right["FD-digits"]  # the unconditional distance does not see the labels


def test_unconditional_scores_keep_their_keys_and_numbers(evaluator, heldout, digits):
    images, labels = heldout
    noisy = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    plain = evaluator.score(noisy)
    assert list(plain) == ["FD-digits"]
    assert plain["FD-digits"] == evaluator.score(noisy, labels)["FD-digits"]
    assert list(evaluator.floor()) == ["FD-digits"]
    assert PER_CLASS not in evaluator.info() and "class_accuracy" not in evaluator.info()
    assert set(evaluator.info(by_class=True)) >= {PER_CLASS, "class_accuracy"}


def test_per_class_reference_statistics_are_cached(evaluator, heldout, digits, data_cfg, cache_dir):
    evaluator.score(*heldout)
    cached = sorted(cache_dir.glob("fd_stats_*_train_class*.npz"))
    assert len(cached) == 10
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = Evaluator(digits, EvalConfig(), cache_dir, data_cfg=data_cfg).score(*heldout)
    assert again == evaluator.score(*heldout)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_labels_must_fit_the_samples_and_the_data(evaluator, heldout, cache_dir):
    images, labels = heldout
    with pytest.raises(ValueError, match="shape"):
        evaluator.score(images, labels[:-1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        evaluator.score(images, labels + 1)
    unlabelled = load_data(DataConfig(name="digits"))
    with pytest.raises(ValueError, match="no class labels"):
        Evaluator(unlabelled, EvalConfig(), cache_dir).score(images, labels)


def test_without_a_classifier_only_the_per_class_distance_is_reported(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    images = (labels.float()[:, None, None, None] / 2 - 0.75 + 0.1 * torch.randn(400, 1, 4, 4, generator=g))
    data = Data("npz", TensorDataset(images[:300], labels[:300], 4), TensorDataset(images[300:], labels[300:], 4))
    evaluator = Evaluator(data, EvalConfig(), tmp_path)
    metrics = evaluator.score(images[300:], labels[300:])
    assert list(metrics) == ["FD-pixels", "FD-pixels per class"]
    # 25 held-out images per class but 16 features: each class is scored against its own held-out images
    assert evaluator.class_reference_split == "heldout"
    assert metrics["FD-pixels per class"] < 1e-6
    assert evaluator.score(images[300:], (labels[300:] + 1) % 4)["FD-pixels per class"] > 0.1


def test_data_of_more_than_a_hundred_classes_reports_the_overall_distance_only(tmp_path):
    # ImageNet's 1,000 classes: no meaningful per-class distance from 50 samples a class, and 1,000 square roots
    labels = torch.arange(404) % 101
    images = torch.randn(404, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    data = Data("npz", TensorDataset(images[:300], labels[:300], 101), TensorDataset(images[300:], labels[300:], 101))
    evaluator = Evaluator(data, EvalConfig(), tmp_path)
    assert not evaluator.scores_by_class
    assert list(evaluator.score(images[300:], labels[300:])) == ["FD-pixels"]
    with pytest.raises(ValueError, match=r"\[0, 101\)"):  # the labels are still checked
        evaluator.score(images[300:], labels[300:] + 101)


def _class_means(digits):
    """A teacher that denoises every noise to the mean training image of its class (all-zero rows: the mean)."""
    images, labels = digits.train.all(), digits.train.labels(slice(None))
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])

    def denoiser(x, t, cond=None):
        if not cond:
            return images.mean(0).expand_as(x)
        return torch.einsum("bk,kchw->bchw", cond["class_labels"], means)
    return denoiser


def test_scorer_passes_its_labels_only_in_a_conditional_run(evaluator, digits, heldout):
    cfg = EvalConfig(num_samples=300)
    conditional = Scorer(digits, cfg, evaluator, torch.device("cpu"), 80.0, 0.002, num_classes=10)
    assert torch.equal(conditional.labels, conditional.cond["class_labels"].argmax(1))
    images, labels = heldout
    drawn = torch.stack([images[labels == c][i % int((labels == c).sum())]
                         for i, c in enumerate(conditional.labels.tolist())])
    assert conditional.metrics(drawn)["class_accuracy"] > 90
    unconditional = Scorer(digits, cfg, evaluator, torch.device("cpu"), 80.0, 0.002)
    assert unconditional.labels is None
    assert list(unconditional.metrics(drawn)) == ["FD-digits"]


def test_conditional_tables_show_the_class_metrics_beside_the_distance(evaluator, digits, tmp_path):
    cfg, solver = EvalConfig(num_samples=200), SolverConfig(name="euler", steps=1)
    tables = {}
    for num_classes in (10, 0):
        scorer = Scorer(digits, cfg, evaluator, torch.device("cpu"), 80.0, 0.002, num_classes=num_classes)
        out = tmp_path / str(num_classes)
        tables[num_classes] = results_table(out, [scorer], _class_means(digits), solver, None, [], {}, {}, {})
        header = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| model"))
        tables[num_classes]["header"] = [c.strip() for c in header.strip("|").split("|")]
    assert tables[10]["header"] == ["model", "NFE", "FD-digits", PER_CLASS, "class_accuracy"]
    assert tables[0]["header"] == ["model", "NFE", "FD-digits"]
    data_row, teacher_row = tables[10]["by_key"]["data"], tables[10]["by_key"]["teacher"]
    assert data_row["class_accuracy"] > 90 and teacher_row["class_accuracy"] > 90  # class means are classified right
    assert "class_accuracy" in tables[10]["info"] and "class_accuracy" not in tables[0]["info"]


def test_curves_draw_the_class_accuracy_apart_from_the_distances(tmp_path):
    rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(0, 101, 10)]
    for row in rows[::5]:
        row.update({"eval_FD-digits_1step": 5.0 - row["step"] / 50, "eval_FD-digits per class_1step": 9.0,
                    "eval_class_accuracy_1step": 50 + row["step"] / 4, "eval_score_1step": 1.0})
    paths = {}
    for name, log in (("conditional", rows), ("unconditional", [{k: v for k, v in r.items() if "class" not in k}
                                                                for r in rows])):
        paths[name] = tmp_path / f"{name}.png"
        save_curve_figure(paths[name], log, name)
    widths = {}
    for name, path in paths.items():
        with Image.open(path) as img:
            widths[name] = img.size[0]
    assert widths["conditional"] > 1.3 * widths["unconditional"]  # three panels against two
