"""``benchmarks/gpu.py`` at its tiny size on whatever device is here (a CPU in CI): it runs and writes every field.

The real ``benchmarks/results/gpu.json`` comes from a GPU; this test only keeps the script working. It is slow
because of torch.compile: on a CPU inductor compiles each kernel with the C++ compiler (about 35-90 s for the tiny
U-Net's training step on 2 cores the first time; later runs read inductor's on-disk cache)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("edm_teacher", "cmt_midtrain", "ect", "ecd", "meanflow")
SETTINGS = ("fp32", "tf32", "tf32-channels_last", "bf16", "bf16-channels_last")
VARIANTS = SETTINGS + tuple(f"{s}-compile" for s in SETTINGS)


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_run_records_its_device_versions_and_settings(result):
    assert result["benchmark"] == "gpu" and result["quick"] is True and result["complete"] is True
    assert result["failed_sections"] == []
    assert result["written_at"] and positive(result["seconds"])
    device = result["device"]
    assert device["type"] in ("cpu", "cuda") and device["name"]
    versions = result["versions"]
    assert versions["torch"] and versions["python"] and "cuda" in versions and versions["packages"]["zarr"]
    if device["type"] == "cuda":
        assert versions["cuda"] and positive(device["total_memory_bytes"])
    kind = result["memory_kind"]
    assert kind.startswith("cuda_max_memory_allocated" if device["type"] == "cuda" else "cpu_process_rss_high_water")
    assert result["correctness"]["rtol"] == {"fp32": 1e-3, "tf32": 1e-2, "bf16": 3e-2}
    assert result["config"]["preset"] == "cifar10" and result["config"]["sample_shape"] == [3, 32, 32]
    assert result["compile"]["policy"] == "fp32" and result["compile"]["objectives"] == ["edm_teacher"]


@pytest.mark.slow
def test_every_objective_has_every_variant_timed_checked_or_skipped_with_a_reason(result):
    cpu = result["device"]["type"] == "cpu"
    training = result["training"]
    assert set(training) == set(OBJECTIVES)
    for name, entry in training.items():
        assert entry["batch_size"] == 4 and positive(entry["budget_images"]), name
        variants = entry["variants"]
        assert set(variants) == set(VARIANTS), name
        for vname, v in variants.items():
            assert v["status"] in ("ok", "skipped", "error"), (name, vname)
            assert {"precision", "tf32", "autocast", "channels_last", "compile"} <= set(v)
            if v["status"] == "ok":
                for field in ("images_per_s", "step_ms", "warmup_s", "peak_memory_bytes"):
                    assert positive(v[field]), (name, vname, field)
                check = v["check"]
                assert isinstance(check["correct"], bool) and check["tolerance"] >= 0, (name, vname)
                assert math.isfinite(check["reference_loss"]) and isinstance(check["finite"], bool)
            elif v["status"] == "skipped":
                assert v["reason"], (name, vname)
            else:
                assert v["error"], (name, vname)
        reference = variants["fp32"]
        assert reference["status"] == "ok" and reference["check"]["correct"], name
        assert len(reference["dropout_probe_losses"]) == 2
        assert any(variants[s]["status"] == "ok" for s in ("bf16", "bf16-channels_last")), name
        if cpu:
            assert all(variants[s]["status"] == "skipped" and "CPU" in variants[s]["reason"]
                       for s in VARIANTS if s.startswith("tf32")), name
        assert entry["fastest_correct"] in variants and variants[entry["fastest_correct"]]["check"]["correct"]
    compiled = training["edm_teacher"]["variants"]["fp32-compile"]
    assert compiled["status"] in ("ok", "error")  # an inductor that cannot build here is recorded, not fatal
    if compiled["status"] == "ok":
        assert compiled["compile"] is True and compiled["check"]["correct"]


@pytest.mark.slow
def test_the_recommended_default_names_a_measured_correct_setting(result):
    rec = result["recommended_cuda_default"]
    assert rec["is_cuda_measurement"] is (result["device"]["type"] == "cuda")
    if not rec["is_cuda_measurement"]:
        assert "not a CUDA measurement" in rec["note"]
    assert set(rec["per_objective"]) == set(OBJECTIVES)
    preset = rec["preset"]
    assert preset["setting"] in VARIANTS and positive(preset["projected_training_gpu_hours"])
    assert preset["config"]["precision"] in ("fp32", "bf16")
    for stage in ("cmt_midtrain", "ect"):
        assert result["training"][stage]["variants"][preset["setting"]]["check"]["correct"]


@pytest.mark.slow
def test_rollouts_sampling_and_inception_throughputs(result):
    r = result["rollouts"]
    assert r["solver"]["steps"] == 16 and r["denoiser_calls_per_trajectory"] == 16
    assert r["batch_sweep"] and all(positive(v["trajectories_per_s"]) for v in r["batch_sweep"].values())
    assert str(r["best_batch"]) in r["batch_sweep"]
    for arm in ("solve_only", "sequential_store", "overlapped_store"):
        assert positive(r[arm]["trajectories_per_s"]) and positive(r[arm]["seconds"]), arm
    seq = r["sequential_store"]
    assert 0 < seq["idle_fraction"] < 1 and positive(seq["write_seconds"]) and positive(seq["bytes_per_trajectory"])
    assert 0 <= r["overlapped_store"]["idle_fraction"] < 1
    assert r["overlap_needed"] is (seq["idle_fraction"] > r["idle_target"])
    assert r["online_solve"]["trajectories"] == 8 and positive(r["online_solve"]["seconds_per_batch"])
    for steps in ("1_step", "2_step"):
        assert positive(result["sampling"][steps]["images_per_s"]), steps
        assert positive(result["sampling"][steps]["seconds_for_50000"]), steps
    inception = result["inception"]
    assert inception["feature_dim"] == 2048 and positive(inception["images_per_s"])
    assert positive(inception["seconds_for_50000"])


@pytest.mark.slow
def test_the_projection_covers_the_papers_budget_and_the_online_alternative(result):
    p = result["projection"]
    assert p["budget"]["midtrain_images"] == 38.4e6 and p["budget"]["posttrain_images"] == 12.8e6
    assert p["budget"]["rollout_trajectories"] == 2.4e6 and p["budget"]["online_trajectories_per_batch"] == 8
    assert positive(p["midtrain"]["gpu_hours"]) and positive(p["rollouts"]["gpu_hours"])
    assert all(positive(p["posttrain"][m]["gpu_hours"]) for m in ("ect", "ecd", "meanflow"))
    assert positive(p["store_path_total_gpu_hours"]) and positive(p["online"]["total_gpu_hours"])
    assert positive(p["online"]["step_seconds"]) and positive(p["online_over_store_path"])
    assert {"gpu_hours", "online_step_s", "online_midtrain_gpu_hours"} <= set(p["formulas"])
    assert p["is_cuda_measurement"] is (result["device"]["type"] == "cuda")


def test_full_sizes_refuse_to_run_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--quick" in done.stderr and not out.exists()
