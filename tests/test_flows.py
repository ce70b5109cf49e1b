"""The Prefect flows on the toy preset: what a rerun recomputes, resume after a failure, DDP mid-training.

"Computed" is read from the ``StageResult.cached`` flags the flow returns (a Prefect cache hit or a
complete artifact on disk both count as reused), never from timings. All runs share one artifact root
and one Prefect test server; a run with a new config computes only the stages that config changes.
"""

import json
import os
import shutil

import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import cmt_core.stages as stages  # noqa: E402
from cmt_core.presets import get_preset  # noqa: E402
from flows import cmt_midtrain, cmt_pipeline  # noqa: E402
from tasks.caching import RESULTS_ENV  # noqa: E402

pytestmark = pytest.mark.slow

STAGES = ["teacher", "rollouts", "midtrain", "posttrain", "evaluation"]
FAIL_AT = 50  # post-training dies right after its first checkpoint
SMALL = ["cpu_threads=1",  # 2 shared cores: one torch thread per process is several times faster than two
         "teacher.train.steps=100", "teacher.train.batch_size=128", "teacher.train.log_every=25",
         "rollout.num_trajectories=256",
         "midtrain.train.steps=100", "midtrain.train.batch_size=128", "midtrain.train.log_every=25",
         "midtrain.train.eval_every=50",
         "posttrain.train.steps=100", "posttrain.train.batch_size=128", "posttrain.train.log_every=25",
         "posttrain.train.eval_every=50", f"posttrain.train.checkpoint_every={FAIL_AT}",
         "eval.num_samples=500"]


@pytest.fixture(scope="session")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


def run_pipeline(root: Path, *extra: str):
    return cmt_pipeline(preset="toy", overrides=[*SMALL, *extra], artifact_root=str(root), return_state=True)


def computed(results: dict) -> list[str]:
    return [stage for stage, result in results.items() if not result.cached]


def task_state_names(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split("-")[0]: run.state.name for run in runs}


def artifacts_of(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def first_run(harness, root):
    state = run_pipeline(root)
    assert state.is_completed(), state.message
    return state


def test_first_run_computes_every_stage(first_run):
    assert computed(first_run.result()) == STAGES


def test_first_run_reports_progress_metrics_and_figures(first_run):
    artifacts = artifacts_of(first_run.state_details.flow_run_id)
    progress = [a for a in artifacts if a.type == "progress"]
    assert sorted(a.description.split()[0] for a in progress) == sorted(STAGES)
    assert all(a.data == 100.0 for a in progress)
    keyed = {a.key: a for a in artifacts if a.key}
    assert {"cmt-toy-metrics", "cmt-toy-report", "cmt-toy-stages"} <= set(keyed)
    rows = keyed["cmt-toy-metrics"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert rows[0]["model"].startswith("data") and len({tuple(row) for row in rows}) == 1  # same columns
    assert keyed["cmt-toy-report"].data.count("](data:image/png;base64,") >= 6  # sample grids and curves
    curves = [a for a in artifacts if a.type == "markdown" and not a.key]
    assert sorted(a.description.split()[0] for a in curves) == ["midtrain", "posttrain", "teacher"]


def test_rerun_with_the_same_parameters_computes_nothing(first_run, root):
    state = run_pipeline(root)
    assert computed(state.result()) == []
    assert set(task_state_names(state.state_details.flow_run_id).values()) == {"Cached"}


def test_without_prefects_cache_the_artifacts_on_disk_are_reused(first_run, root, tmp_path, monkeypatch):
    # A fresh Prefect cache (results elsewhere, as with a new server and database on the same artifact root):
    # every task runs, finds its complete artifact and returns at once.
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "fresh-results"))
    state = run_pipeline(root)
    assert computed(state.result()) == []
    assert set(task_state_names(state.state_details.flow_run_id).values()) == {"Completed"}


def test_deleted_artifact_is_recomputed_despite_prefects_cache(first_run, root):
    evaluation = first_run.result()["evaluation"].path
    shutil.rmtree(evaluation)
    state = run_pipeline(root)
    assert computed(state.result()) == ["evaluation"]
    assert (evaluation / "manifest.json").exists()


def test_failed_posttrain_reruns_only_posttrain_from_its_checkpoint(first_run, root, monkeypatch):
    new_posttrain = "posttrain.train.seed=1"  # a post-training artifact that is not on disk yet
    real_train = stages.train

    def killed_after_first_checkpoint(*args, **kwargs):
        if kwargs.get("desc") == "post-training":
            real_train(*args, **{**kwargs, "until": FAIL_AT})
            raise RuntimeError("post-training killed after its first checkpoint")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages, "train", killed_after_first_checkpoint)
    failed = run_pipeline(root, new_posttrain)
    assert failed.is_failed()
    states = task_state_names(failed.state_details.flow_run_id)
    assert states == {"teacher": "Cached", "rollouts": "Cached", "midtrain": "Cached", "posttrain": "Failed"}
    posttrain_dir = stages.plan(get_preset("toy", [*SMALL, new_posttrain], root)).path("posttrain")
    assert checkpoint_step(posttrain_dir / "train" / "checkpoint.pt") == FAIL_AT
    assert not (posttrain_dir / "manifest.json").exists()

    resumed_from = []

    def recording_resume(model, objective, source, cfg, run_dir, *args, **kwargs):
        if kwargs.get("desc") == "post-training":
            resumed_from.append(checkpoint_step(Path(run_dir) / "checkpoint.pt"))
        return real_train(model, objective, source, cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(stages, "train", recording_resume)
    results = run_pipeline(root, new_posttrain).result()
    assert computed(results) == ["posttrain", "evaluation"]
    assert resumed_from == [FAIL_AT]
    logged = [json.loads(line)["step"] for line in (posttrain_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 25, 50, 75, 100]


def test_changed_midtrain_parameter_recomputes_midtrain_and_what_follows(first_run, root):
    results = run_pipeline(root, "midtrain.train.lr=0.001").result()
    assert computed(results) == ["midtrain", "posttrain", "evaluation"]
    first = first_run.result()
    assert [results[s].artifact_id == first[s].artifact_id for s in STAGES] == [True, True, False, False, False]


def test_midtrain_flow_runs_ddp_processes_under_torchrun(first_run, root):
    state = cmt_midtrain(preset="toy", overrides=[*SMALL, "midtrain.train.seed=3"], artifact_root=str(root),
                         ddp_processes=2, return_state=True)
    results = state.result()
    assert list(results) == ["teacher", "rollouts", "midtrain"] and computed(results) == ["midtrain"]
    assert (results["midtrain"].path / stages.MODEL_FILE).exists()
    run_logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=run_logs)
    assert any("ranks: 2" in log.message for log in logs)


def test_invalid_override_fails_before_any_stage(harness, tmp_path):
    state = cmt_pipeline(preset="toy", overrides=["midtrain.train.steps=-1"], artifact_root=str(tmp_path),
                         return_state=True)
    assert state.is_failed() and "midtrain.train.steps" in state.message
    assert list(tmp_path.iterdir()) == []


def test_compare_flow_shares_teacher_and_rollouts_and_writes_the_results(harness, root, tmp_path):
    """``cmt-compare`` on toy at tiny size: every arm trained, the teacher and rollouts computed once per seed and
    shared by both methods, the results contract written and published; a rerun computes nothing."""
    from cmt_core.comparison import CompareConfig, arm_config
    from flows import cmt_compare

    out = tmp_path / "results"
    cc = CompareConfig(preset="toy", seeds=2, overrides=tuple(SMALL), workers=1, artifact_root=root, out_dir=out)
    state = cmt_compare(comparison=cc, return_state=True)
    summary = state.result()
    published = [a for a in artifacts_of(state.state_details.flow_run_id) if a.type == "markdown"]
    assert any("Initialisation comparison" in a.data and "data:image/png;base64," in a.data for a in published)
    data = json.loads((out / "init_comparison_toy.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert {"metric_name", "seeds", "teacher", "mid_trained", "methods"} <= set(data)
    for method in ("ect", "meanflow"):
        entry = data["methods"][method]
        assert set(entry["inits"]) == {"cmt", "diffusion", "random"}
        assert "cost_ratio_cmt_vs_diffusion" in entry
        for arm in entry["inits"].values():
            assert [p["iter"] for p in arm["curve"]] == [0, 50, 100]
            assert {"metric_1step", "metric_2step", "metric_1step_std", "metric_2step_std"} <= set(arm["curve"][0])
            assert set(arm) >= {"iters_to_diffusion_final_2step", "cost_to_quality"}
        diffusion = entry["inits"]["diffusion"]
        assert diffusion["iters_to_diffusion_final_2step"] is not None  # it reaches its own final metric
    for seed in range(2):
        ids = {stages.plan(arm_config(cc, method, init, seed)).ids[s] for method in ("ect", "meanflow")
               for init in ("cmt", "teacher", "random") for s in ("teacher", "rollouts")}
        assert len(ids) == 2  # one teacher and one rollouts artifact per seed, for all six arms
    assert {p.name for p in out.iterdir()} >= {"init_comparison_toy.md", "init_comparison_toy_ect.png",
                                               "init_comparison_toy_meanflow.png", "init_comparison_toy_cost.png"}
    manifests = {p: p.stat().st_mtime_ns for p in Path(root).rglob("manifest.json")}
    again = cmt_compare(comparison=cc)
    assert {p: p.stat().st_mtime_ns for p in Path(root).rglob("manifest.json")} == manifests  # nothing recomputed
    assert again["methods"]["ect"]["inits"] == summary["methods"]["ect"]["inits"]
