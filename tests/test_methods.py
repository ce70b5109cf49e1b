"""The method registry: every layer reads a method's declaration, and a method from outside is one file."""

import pytest
import torch

from cmt_core import methods
from cmt_core.comparison import training_nfe
from cmt_core.config import PipelineConfig
from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.samplers import FEW_STEP_SAMPLERS
from cmt_core.stages import method_of

SMALL = ["teacher.train.steps=30", "rollout.num_trajectories=256", "midtrain.train.steps=40",
         "midtrain.train.eval_every=20", "posttrain.train.steps=40", "posttrain.train.eval_every=20",
         "eval.num_samples=200", "eval.batch_size=200", "eval.mid_sigma_search=[0.5]"]


@pytest.fixture
def plugin():
    """The method declared in ``tests/plugin_method.py``, registered by importing that file; removed after."""
    from tests import plugin_method

    yield plugin_method.CD_EULER
    methods.METHODS.pop("cd_euler")


def test_the_config_offers_exactly_the_registered_methods_of_each_stage():
    schema = PipelineConfig.model_json_schema()["$defs"]
    assert schema["MidTrainConfig"]["properties"]["form"]["enum"] == list(methods.names("midtrain"))
    assert schema["PostTrainConfig"]["properties"]["method"]["enum"] == list(methods.names("posttrain"))
    assert methods.names("posttrain") == ("ect", "ecd", "meanflow") and methods.names("teacher") == ("edm",)
    for method in methods.METHODS.values():
        assert method.sampler is None or method.sampler in FEW_STEP_SAMPLERS
    with pytest.raises(ValueError, match=r"posttrain.method\n.*Input should be 'ect', 'ecd' or 'meanflow'"):
        get_preset("toy", ["posttrain.method=sct"])


def test_a_post_training_method_registered_from_its_own_file_trains_samples_and_is_counted(plugin, tmp_path):
    cfg = get_preset("toy", [*SMALL, "posttrain.method=cd_euler"], artifact_root=tmp_path)
    assert method_of(cfg, "posttrain") is plugin
    assert training_nfe(cfg, "posttrain") == 3  # the comparison counts it from its declaration
    results = run_pipeline(cfg, Runtime(torch.device("cpu")))
    assert results["posttrain"].metrics["score_1step"] is not None  # scored with its sampler during training
    rows = {row["model"] for row in results["evaluation"].metrics["rows"]}
    assert {"CD_EULER from cmt, 1-step", "CD_EULER from cmt, 2-step (sigma 0.5)"} <= rows
    # a method registered later is offered too; a name is registered once
    assert "cd_euler" in PipelineConfig.model_json_schema()["$defs"]["PostTrainConfig"]["properties"]["method"]["enum"]
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.Method("cd_euler", "posttrain", "consistency", None, plugin.build_loss,
                                        plugin.nfe, sampler="consistency"))


def test_a_declaration_must_name_a_sampler_that_exists():
    with pytest.raises(ValueError, match="no few-step sampler 'leapfrog'"):
        methods.register(methods.Method("x", "posttrain", "consistency", None, None, lambda cfg: 1,
                                        sampler="leapfrog"))
    with pytest.raises(ValueError, match="name its sampler"):
        methods.Method("x", "posttrain", "consistency", None, None, lambda cfg: 1)


def test_the_kind_rule_derives_from_the_declarations():
    with pytest.raises(ValueError, match=r"posttrain.method='meanflow' with init='cmt' trains a flow_map model: it "
                                         r"needs a midtrain.form that trains one \('mf', 'flow_map'\), not 'cm'"):
        get_preset("toy", ["posttrain.method=meanflow"])
    assert get_preset("toy", ["posttrain.method=meanflow", "posttrain.init=teacher"]).posttrain.method == "meanflow"
