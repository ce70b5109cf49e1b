"""Named pipeline presets and dotted overrides (``midtrain.train.lr=1e-4``).

* ``toy``: 2-D Gaussian mixture, exact teacher; the whole pipeline in about a minute on 2 CPU cores.
* ``digits``: scikit-learn's 8x8 digits with a teacher pre-trained here; the embedded default.
* ``cifar10``: the paper's CIFAR-10 recipe at GPU scale (DDPM++-size U-Net, 16-step DPM-Solver++
  rollouts from 80 to 0.002, CMT with RAdam 2e-4 / EMA 0.999, then ECT); reads a local CIFAR-10 copy.
* ``cifar10-tiny``: the same recipe with a tiny U-Net and a few steps, to exercise it on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cmt_core.config import PipelineConfig


def _toy() -> dict:
    fast = {"batch_size": 256, "log_every": 50, "checkpoint_every": 500}
    return {
        "cpu_threads": 1,
        "data": {"name": "gaussian_mixture", "num_modes": 8, "mode_radius": 2.0, "mode_std": 0.1},
        "network": {"kind": "mlp", "width": 128, "depth": 3, "emb_dim": 64, "sigma_data": 1.4},
        "teacher": {"source": "exact",
                    "train": {"steps": 1500, "lr": 2e-3, "optimizer": "adam", "lr_schedule": "cosine",
                              "ema_decay": 0.99, **fast}},
        "rollout": {"num_trajectories": 2048, "batch_size": 1024,
                    "solver": {"name": "dpm2m", "steps": 16, "grid": "log_uniform"},
                    "store": {"chunk_trajectories": 128, "shard_chunks": 4}},
        "midtrain": {"form": "cm", "train": {"steps": 2500, "lr": 2e-3, "ema_decay": 0.99, "eval_every": 500,
                                             "lr_schedule": "linear", **fast}},
        "posttrain": {"method": "ecd", "init": "cmt", "ecd_solver": "heun",
                      "ect": {"t_sampling": "log_uniform", "start_stage": 4, "stage_steps": 400},
                      "train": {"steps": 400, "lr": 2e-5, "ema_decay": 0.99, "eval_every": 100, **fast}},
        "eval": {"num_samples": 2000, "batch_size": 2000, "mid_sigma": 0.5},
    }


def _digits() -> dict:
    train = {"batch_size": 256, "log_every": 100, "checkpoint_every": 1000}
    return {
        "cpu_threads": 1,
        "data": {"name": "digits"},
        "network": {"kind": "mlp", "width": 256, "depth": 4, "emb_dim": 128, "dropout": 0.1, "sigma_data": 0.5},
        "teacher": {"source": "pretrain",
                    "train": {"steps": 8000, "lr": 1e-3, "optimizer": "adam", "lr_schedule": "cosine",
                              "ema_decay": 0.999, **train},
                    "sampler": {"name": "heun", "steps": 18, "grid": "karras", "to_zero": True}},
        "rollout": {"num_trajectories": 8192, "batch_size": 1024,
                    "solver": {"name": "dpm2m", "steps": 16, "grid": "log_uniform"}},
        "midtrain": {"form": "cm",
                     "train": {"steps": 4000, "lr": 5e-4, "ema_decay": 0.999, "eval_every": 1000, **train}},
        "posttrain": {"method": "ecd", "init": "cmt", "ecd_solver": "heun",
                      "ect": {"t_sampling": "log_uniform", "start_stage": 3, "stage_steps": 1000},
                      "train": {"steps": 2000, "lr": 5e-5, "ema_decay": 0.999, "eval_every": 500, **train}},
        "eval": {"num_samples": 2000, "batch_size": 1000, "mid_sigma": 0.8},
    }


CIFAR10_DIM = 3 * 32 * 32  # pseudo-Huber c is per sample: the per-dimension 0.03 times sqrt(dim)


def _cifar10(tiny: bool = False) -> dict:
    unet = {"kind": "unet", "width": 128, "channel_mult": [2, 2, 2], "depth": 4, "attention_resolutions": [16],
            "dropout": 0.2, "emb_dim": 512, "sigma_data": 0.5}
    cfg = {
        "data": {"name": "cifar10", "path": "data/cifar-10-batches-py", "heldout_fraction": 0.0},
        "network": unet,
        "teacher": {"source": "pretrain",
                    "train": {"steps": 390_000, "batch_size": 512, "lr": 1e-3, "optimizer": "adam",
                              "lr_schedule": "constant", "warmup_steps": 20_000, "ema_decay": 0.9999,
                              "checkpoint_every": 5000, "log_every": 500},
                    "sampler": {"name": "heun", "steps": 18, "grid": "karras", "to_zero": True}},
        "rollout": {"num_trajectories": 2_400_000, "batch_size": 1024,
                    "solver": {"name": "dpm2m", "steps": 16, "grid": "log_uniform", "sigma_min": 0.002,
                               "sigma_max": 80.0},
                    "store": {"dtype": "float16", "chunk_trajectories": 64, "shard_chunks": 64}},
        "midtrain": {"form": "cm", "distance": "pseudo_huber", "huber_c": 0.03 * CIFAR10_DIM**0.5,
                     "train": {"steps": 100_000, "batch_size": 128, "lr": 2e-4, "optimizer": "radam",
                               "lr_schedule": "linear", "ema_decay": 0.999, "checkpoint_every": 5000,
                               "log_every": 500, "eval_every": 10_000}},
        "posttrain": {"method": "ect", "init": "cmt",
                      "ect": {"p_mean": -1.1, "p_std": 2.0, "k": 8.0, "b": 1.0, "q": 2.0, "stage_steps": 25_000,
                              "huber_c": 0.03 * CIFAR10_DIM**0.5},
                      "train": {"steps": 300_000, "batch_size": 128, "lr": 1e-4, "optimizer": "radam",
                                "lr_schedule": "constant", "ema_decay": 0.9999, "checkpoint_every": 5000,
                                "log_every": 500, "eval_every": 10_000}},
        "eval": {"num_samples": 50_000, "batch_size": 500, "mid_sigma": 0.8},
    }
    if tiny:
        small = {"batch_size": 8, "checkpoint_every": 2, "log_every": 1}
        cfg["network"] = {**unet, "width": 16, "channel_mult": [1, 2], "depth": 1, "attention_resolutions": [16],
                          "emb_dim": 32}
        cfg["data"]["heldout_fraction"] = 0.2
        cfg["teacher"]["train"] = {**cfg["teacher"]["train"], **small, "steps": 3, "warmup_steps": 0}
        cfg["rollout"].update(num_trajectories=16, batch_size=8)
        cfg["rollout"]["solver"]["steps"] = 4
        cfg["rollout"]["store"] = {"dtype": "float16", "chunk_trajectories": 4, "shard_chunks": 2}
        cfg["midtrain"]["train"] = {**cfg["midtrain"]["train"], **small, "steps": 3, "eval_every": None}
        cfg["posttrain"]["train"] = {**cfg["posttrain"]["train"], **small, "steps": 3, "eval_every": None}
        cfg["eval"] = {"num_samples": 16, "batch_size": 8}
    return cfg


PRESETS = {"toy": _toy, "digits": _digits, "cifar10": _cifar10, "cifar10-tiny": lambda: _cifar10(tiny=True)}


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a raw config dict (values parsed as YAML: numbers, lists, null, ...)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config(preset: str = "digits", overrides=(), config: PipelineConfig | None = None,
                   artifact_root: str | Path | None = None) -> PipelineConfig:
    """``config`` (or the named ``preset``) with dotted ``overrides`` and ``artifact_root`` applied, validated.

    The one way every entry point (``cmt``, ``cmt-flow``, the Prefect flows) turns its inputs into a config."""
    if config is None:
        return get_preset(preset, overrides, artifact_root)
    raw = apply_overrides(config.model_dump(mode="json"), list(overrides))
    if artifact_root is not None:
        raw["artifact_root"] = str(artifact_root)
    return PipelineConfig.model_validate(raw)


def get_preset(name: str, overrides=(), artifact_root: str | Path | None = None) -> PipelineConfig:
    """The validated config of preset ``name`` with dotted ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    raw = apply_overrides(_merge(PipelineConfig().model_dump(mode="json"), {"preset": name, **PRESETS[name]()}),
                          list(overrides))
    if artifact_root is not None:
        raw["artifact_root"] = str(artifact_root)
    return PipelineConfig.model_validate(raw)
