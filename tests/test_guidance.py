"""Guidance and label dropout: the guided denoiser, its place in the stages' ids, the config's rules, and label
dropout's rate and determinism."""

import pytest
import torch

from cmt_core import conditioning
from cmt_core.data.datasets import TensorDataset
from cmt_core.data.sources import DatasetSource, LabelDropout
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.guidance import GuidedDenoiser, guided, unconditional
from cmt_core.presets import get_preset
from cmt_core.stages import plan
from cmt_core.teachers import ExactDenoiser

CLASSES = 4


class Linear(torch.nn.Module):
    """A denoiser whose output depends on its class: x * (1 + label index) (zero labels: x)."""

    def forward(self, x, t, cond=None):
        labels = (cond or {}).get("class_labels")
        scale = 1 + (labels * torch.arange(labels.shape[1])).sum(1) if labels is not None else torch.ones(len(x))
        return x * scale[:, None]


def inputs():
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    return x, torch.ones(8), conditioning.class_cond(torch.arange(8) % CLASSES, CLASSES)


def test_the_guided_denoiser_is_the_conditional_one_at_w_1_and_the_guide_at_w_0():
    x, t, cond = inputs()
    d, guide = Linear(), lambda x, t, cond=None: -x
    assert torch.equal(GuidedDenoiser(d, 1.0)(x, t, cond), d(x, t, cond))
    assert torch.equal(GuidedDenoiser(d, 0.0)(x, t, cond), d(x, t, unconditional(cond)))  # cfg: uncond branch
    assert torch.equal(GuidedDenoiser(d, 0.0, guide)(x, t, cond), guide(x, t, cond))  # autoguidance: the guide
    w = 2.5  # g + w (D - g)
    assert torch.allclose(GuidedDenoiser(d, w)(x, t, cond),
                          d(x, t, unconditional(cond)) + w * (d(x, t, cond) - d(x, t, unconditional(cond))))
    assert guided(d, "none", 3.0) is d and guided(d, "cfg", 1.0) is d
    with pytest.raises(ValueError, match="guide network"):
        guided(d, "autoguidance", 2.0)


def test_classifier_free_guidance_of_the_exact_mixture_extrapolates_from_its_unconditional_posterior():
    gmm = GaussianMixture(8, 2.0, 0.1, num_classes=CLASSES)
    x, t, cond = inputs()
    t = t.double() * 0.7
    teacher = guided(ExactDenoiser(gmm), "cfg", 3.0)
    cond_d, uncond_d = gmm.denoise(x.double(), t, cond), gmm.denoise(x.double(), t)
    assert torch.allclose(teacher(x.double(), t, cond), uncond_d + 3.0 * (cond_d - uncond_d), atol=1e-12)


def test_the_guidance_scale_changes_the_rollouts_id_and_not_the_teachers():
    base = get_preset("toy", ["data.num_classes=4", "guidance.kind=cfg"])
    guided_rollouts = get_preset("toy", ["data.num_classes=4", "guidance.kind=cfg", "guidance.rollout_scale=2"])
    a, b = plan(base).ids, plan(guided_rollouts).ids
    assert a["teacher"] == b["teacher"]
    assert {s for s in a if a[s] != b[s]} == {"rollouts", "midtrain", "posttrain", "evaluation"}
    # the teacher step's scale (ECD's) changes post-training and evaluation, not the rollouts
    step = plan(get_preset("toy", ["data.num_classes=4", "guidance.kind=cfg", "guidance.scale=2"])).ids
    assert {s for s in a if a[s] != step[s]} == {"posttrain", "evaluation"}
    # a method without a teacher step (ECT) is not changed by it; unguided rollouts do not depend on the kind
    ect = ["data.num_classes=4", "guidance.kind=cfg", "posttrain.method=ect"]
    assert plan(get_preset("toy", ect)).ids["posttrain"] == plan(get_preset("toy", [*ect, "guidance.scale=2"])).ids[
        "posttrain"]
    assert plan(get_preset("toy", ["data.num_classes=4"])).ids["rollouts"] == a["rollouts"]


def test_autoguidance_needs_the_guide_only_where_it_is_called():
    auto = ["data.num_classes=4", "guidance.kind=autoguidance"]
    assert "guide" not in plan(get_preset("toy", auto)).needed(["evaluation"])  # every scale is 1
    resolved = plan(get_preset("toy", [*auto, "guidance.scale=1.5"]))
    assert resolved.inputs["posttrain"]["guide"] == resolved.ids["guide"]  # ECD's step calls it
    assert "guide" in resolved.inputs["evaluation"] and "guide" not in resolved.inputs["rollouts"]
    other = plan(get_preset("toy", [*auto, "guidance.scale=1.5", "guidance.guide.width=32"]))
    assert {s for s in resolved.ids if resolved.ids[s] != other.ids[s]} == {"guide", "posttrain", "evaluation"}


@pytest.mark.parametrize("overrides, field", [
    (["guidance.kind=cfg"], "data.num_classes"),  # guidance on an unconditional teacher
    (["data.num_classes=4", "guidance.scale=2"], "guidance.kind"),
    (["teacher.train.label_dropout=0.1"], "label_dropout"),
])
def test_guidance_and_label_dropout_need_class_labels(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_preset("toy", overrides)


def test_classifier_free_guidance_needs_a_teacher_trained_with_label_dropout():
    with pytest.raises(ValueError, match="teacher.train.label_dropout"):
        get_preset("digits", ["data.num_classes=10", "guidance.kind=cfg"])
    get_preset("digits", ["data.num_classes=10", "guidance.kind=cfg", "teacher.train.label_dropout=0.1"])


def test_label_dropout_reaches_the_unconditional_class_at_its_rate_and_is_a_function_of_the_step():
    labels = torch.arange(1000) % CLASSES
    source = DatasetSource(TensorDataset(torch.randn(1000, 2), labels, CLASSES), seed=1, labels=True)
    dropped = LabelDropout(source, 0.2, seed=5)
    rows = torch.cat([dropped.batch(step, 250)["cond"]["class_labels"] for step in range(40)])
    zero = (rows.sum(1) == 0).float()
    assert abs(zero.mean().item() - 0.2) < 0.015  # 10,000 draws: std 0.004
    kept = rows[zero == 0]
    assert torch.equal(kept.sum(1), torch.ones(len(kept)))  # the others keep their one-hot label
    # the same samples are dropped for any number of ranks, and again on a rerun of the step
    whole = dropped.batch(7, 250)["cond"]["class_labels"]
    halves = torch.cat([dropped.batch(7, 250, rank, 2)["cond"]["class_labels"] for rank in range(2)])
    assert torch.equal(whole, halves) and torch.equal(whole, LabelDropout(source, 0.2, seed=5).batch(7, 250)["cond"][
        "class_labels"])
    assert torch.equal(LabelDropout(source, 0.0).batch(7, 250)["cond"]["class_labels"],
                       source.batch(7, 250)["cond"]["class_labels"])
