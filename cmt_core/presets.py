"""Named pipeline presets and dotted overrides (``midtrain.train.lr=1e-4``).

* ``toy``: 2-D Gaussian mixture, exact teacher; the whole pipeline in about a minute on 2 CPU cores.
* ``digits``: scikit-learn's 8x8 digits with a teacher pre-trained here; the embedded default.
* ``toy-meanflow``, ``digits-meanflow``: the same teachers and rollouts, then flow-map mid-training and Mean
  Flow post-training (``_meanflow``).
* ``cifar10``, ``ffhq64``, ``afhq64``: the paper's recipes at GPU scale, number for number as
  ``docs/recipes.md`` lists them with their sources (sony/cmt's scripts, NVlabs/edm for the teachers);
  ``tests/test_recipes.py`` fails on any difference. Mid-training 300k iterations at batch 128 (38.4 Mimg) on
  16-step third-order DPM-Solver++ rollouts, then ECT 100k iterations at batch 128 (12.8 Mimg) at one fixed
  small dt = 1/q. They read a local copy of the data (``data.path``).
* ``cifar10-tiny``: the ``cifar10`` recipe with a tiny U-Net and a few steps, to exercise it on a CPU.
* ``digits-cond``: ``digits`` made class-conditional, with classifier-free guidance (``_digits_cond``).
* ``digits-latent``: ``digits`` in the latent space of a small autoencoder trained here (``_digits_latent``).
* ``imagenet64``: class-conditional ImageNet-64 with an EDM2-S teacher, autoguided ECD (``_imagenet64``);
  ``imagenet64-tiny``: the same with tiny networks on a CPU.
* ``imagenet512``: the reference's ImageNet-512 recipe in SD-VAE latents, EDM2-XXL teacher, ELatentLPIPS
  mid-training, autoguided ECD (``_imagenet512``); ``imagenet512-tiny``: the same on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cmt_core.config import PipelineConfig, yaml_problem
from cmt_core.errors import brief


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
        "midtrain": {"form": "cm", "train": {"steps": 2500, "lr": 2e-3, "ema_decay": 0.99, "eval_every": 250,
                                             "lr_schedule": "linear", **fast}},
        "posttrain": {"method": "ecd", "init": "cmt", "ecd_solver": "heun",
                      "ect": {"t_sampling": "log_uniform", "start_stage": 4, "stage_steps": 400},
                      "train": {"steps": 400, "lr": 2e-5, "ema_decay": 0.99, "eval_every": 100, **fast}},
        "eval": {"num_samples": 2000, "batch_size": 2000},
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
                     # evaluated every 500 steps: the comparison's cost to quality is read at evaluations
                     "train": {"steps": 4000, "lr": 5e-4, "ema_decay": 0.999, "eval_every": 500, **train}},
        "posttrain": {"method": "ecd", "init": "cmt", "ecd_solver": "heun",
                      # pseudo-Huber with c = dim / 2: the squared loss this preset was tuned with, for its
                      # errors (||d|| << c); ECT's c = 0 (the l2 norm) measured 11.6 / 11.9 instead of 10.8 / 11.2
                      # the CMT boundary: below sigma 0.6 the target is the mid-trained map (seed 0, 4 noise sets,
                      # 1-step / 2-step FD-digits: 10.7 / 10.6 without it; anchor 0.3, 0.6, 1, 2: 10.0 / 9.5,
                      # 9.2 / 8.4, 9.8 / 8.7, 11.5 / 9.4)
                      "ect": {"t_sampling": "log_uniform", "start_stage": 3, "stage_steps": 1000, "huber_c": 32.0,
                              "anchor_sigma": 0.6},
                      "train": {"steps": 2000, "lr": 5e-5, "ema_decay": 0.999, "eval_every": 500, **train}},
        # FD-digits of 2,000 samples varies by about 0.6 between noise sets: the table averages four
        "eval": {"num_samples": 2000, "batch_size": 1000, "num_seed_sets": 4},
    }


def _digits_cond() -> dict:
    """``digits`` made class-conditional: the teacher learns D(x, t, c) with 10% of its labels dropped to the
    unconditional class, and is guided by classifier-free guidance at ``DIGITS_GUIDANCE``, in its rollouts (CMT
    mid-trains on the guided flow), ECD's teacher step and its own samples; the evaluation also scores the teacher
    at every scale of the sweep (FD against class accuracy). Every number beyond ``digits``' is our choice."""
    cfg = _merge(_digits(), {"data": {"num_classes": 10}, "teacher": {"train": {"label_dropout": 0.1}}})
    cfg["guidance"] = {"kind": "cfg", "scale": DIGITS_GUIDANCE, "rollout_scale": DIGITS_GUIDANCE,
                       "sweep": [1.0, 1.5, 2.0, 3.0, 4.0]}
    return cfg


def _digits_latent() -> dict:
    """``digits`` in a latent space: a small KL autoencoder (``AutoencoderKL``, widths 32 and 64, 4 latent
    channels: latents 4x4x4) trained here as the encoder stage, whitened as EDM2 whitens SD's latents (to std
    0.5); then the teacher, rollouts, CMT and ECD of ``digits`` on its latents, scored by FD-digits on decoded
    samples. Every number beyond ``digits``' is our choice (``docs/recipes.md``)."""
    return _merge(_digits(), {"data": {"encoder": {"kind": "trained",
                                                   "autoencoder": {"widths": [32, 64], "latent_channels": 4,
                                                                   "steps": 3000, "batch_size": 128, "lr": 1e-3,
                                                                   "kl_weight": 1e-4}}}})


# digits-cond's guidance scale: the teacher's lowest FD-digits on a first sweep (seed 0, 4 noise sets: 6.92, 5.34,
# 5.51, 7.13, 9.54 at w = 1, 1.5, 2, 3, 4; class accuracy 96.8, 99.7, 100, 100, 100)
DIGITS_GUIDANCE = 1.5


def _meanflow(base: dict, midtrain: dict, posttrain: dict) -> dict:
    """``base`` (``toy`` / ``digits``) with flow-map mid-training, then Mean Flow post-training from it: the same
    teacher and rollouts (shared artifacts), a ``FlowMap`` mid-trained on d(f(x_t, t, s), x_s) (the ``mf`` form's
    velocity distance weights the long jumps that 1-step sampling makes about 1 / (t - s)^2 less, see
    ``cmt_core.objectives.cmt``), and py-meanflow's loss in its own time (``posttrain.meanflow.time=tau``, its
    adaptive power 0.75), with the Mean Flow paper's times (logit-normal (-0.4, 1.0), 25% of pairs r != t)."""
    cfg = dict(base)
    cfg["midtrain"] = _merge(base["midtrain"], {"form": "flow_map", **midtrain})
    cfg["posttrain"] = {"method": "meanflow", "init": "cmt",
                        "meanflow": {"time": "tau", "p_mean": -0.4, "p_std": 1.0, "equal_fraction": 0.75,
                                     "adaptive_p": 0.75, "norm_eps": 1e-3},
                        **posttrain}
    return cfg


def _digits_meanflow() -> dict:
    """``digits``' teacher and rollouts; flow-map CMT 6,000 steps (the ``cm`` form's 1-step FD-digits in 4,000,
    13.9); Mean Flow 2,000 steps at lr 5e-5."""
    train = {"batch_size": 256, "log_every": 100, "checkpoint_every": 1000}
    return _meanflow(_digits(), {"train": {"steps": 6000}},
                     {"train": {"steps": 2000, "lr": 5e-5, "ema_decay": 0.999, "eval_every": 500, **train}})


def _digits_cond_meanflow() -> dict:
    """``digits-cond``'s guided teacher and rollouts (shared artifacts) with ``digits-meanflow``'s flow-map CMT and
    Mean Flow, and classifier-free guidance folded into Mean Flow's target: omega 0.75, kappa 0.5 over the whole
    interval, whose fixed point is the conditional velocity guided at omega / (1 - kappa) = 1.5, the scale the
    teacher and its rollouts are guided at (``DIGITS_GUIDANCE``); 10% of post-training's labels dropped to train the
    unconditional branch the target reads. The 1-step sampler is unguided (one network call). No guidance sweep of
    the teacher (``digits-cond`` has it). Every number beyond ``digits-cond``'s and ``digits-meanflow``'s is our
    choice (``docs/recipes.md``)."""
    cfg = _merge(_digits_meanflow(), {"data": {"num_classes": 10}, "teacher": {"train": {"label_dropout": 0.1}}})
    cfg["guidance"] = {**_digits_cond()["guidance"], "sweep": []}
    cfg["posttrain"]["meanflow"]["guidance"] = {"omega": 0.75, "kappa": 0.5, "t_start": 0.0, "t_end": 1.0}
    cfg["posttrain"]["train"]["label_dropout"] = 0.1
    return cfg


def _toy_meanflow() -> dict:
    """``toy``'s exact teacher and rollouts; flow-map CMT 4,000 steps (1-step flow-map error 0.054, the ``cm``
    form's 0.064 in 2,500), then Mean Flow 400 steps at ``toy``'s post-training settings. With the exact
    teacher the CMT map is already close to exact and Mean Flow on data drifts from it (0.054 -> 0.069 in
    400 steps; the stage keeps its best checkpoint, here the CMT weights).

    Mid-training keeps the checkpoint of least 1-step flow-map error (``keep="one_step"``): the 2-step sliced
    Wasserstein distance that ``keep="both"`` also weighs is, from about 1,000 steps on, below the held-out data's
    own distance (0.13 on 2,000 samples), so its differences are sampling noise; weighed in, they kept step 1,250
    (flow-map error 0.118) over step 4,000 (0.054)."""
    fast = {"batch_size": 256, "log_every": 50, "checkpoint_every": 500}
    return _meanflow(_toy(), {"train": {"steps": 4000, "keep": "one_step"}},
                     {"train": {"steps": 400, "lr": 2e-5, "ema_decay": 0.99, "eval_every": 100, **fast}})


# The training loops of the recipes (sony/cmt's cmt_training_loop.py and ct_training_loop.py): betas
# (0.9, 0.999), no weight decay, lr decayed linearly to 0 over the run, no warm-up, no gradient clipping.
_REFERENCE_LOOP = {"optimizer": "radam", "betas": [0.9, 0.999], "weight_decay": 0.0, "lr_schedule": "linear",
                   "final_lr_fraction": 0.0, "warmup_steps": 0, "grad_clip": None}
_BOOKKEEPING = {"checkpoint_every": 5000, "log_every": 500}  # ours; no effect on the result


def _edm_teacher(released: str, batch_size: int, lr: float, ema_decay: float, sampler_steps: int) -> dict:
    """EDM's released network ``weights/<released>`` (an EDM pickle, read without running its code), as the
    reference transfers it; ``train`` is EDM's own pre-training of it (NVlabs/edm train.py: 200 Mimg, Adam, lr
    ramped up over 10 Mimg; ``ema_decay`` is its EMA half-life of 0.5 Mimg as a per-step rate,
    0.5^(batch_size / 500,000)), used with ``teacher.source=pretrain``. Heun on Karras' grid to sigma = 0."""
    train = {"steps": 200_000_000 // batch_size, "batch_size": batch_size, "lr": lr, "optimizer": "adam",
             "betas": [0.9, 0.999], "weight_decay": 0.0, "lr_schedule": "constant",
             "warmup_steps": 10_000_000 // batch_size, "ema_decay": ema_decay, "grad_clip": None, **_BOOKKEEPING}
    sampler = {"name": "heun", "steps": sampler_steps, "grid": "karras", "sigma_min": 0.002, "sigma_max": 80.0,
               "rho": 7.0, "to_zero": True}
    return {"source": "edm_pickle", "path": f"weights/{released}", "p_mean": -1.2, "p_std": 1.2, "train": train,
            "sampler": sampler}


def _cmt_recipe(data: dict, channel_mult: list[int], teacher: dict, q: float) -> dict:
    """CMT then ECT as sony/cmt's ``run_cmt_*.sh`` and ``run_cmt+ecm_*.sh`` run them on a DDPM++ U-Net.

    The ECT stage never advances (``stage_steps`` is the reference's ``--double`` of 1M iterations), so
    r = t (1 - (1 + k sigmoid(-b t)) / q) throughout: dt = 1/q at large t."""
    return {
        "data": {**data, "heldout_fraction": 0.0},
        "network": {"kind": "unet", "width": 128, "channel_mult": channel_mult, "depth": 4,
                    "attention_resolutions": [16], "dropout": 0.2, "emb_dim": 512, "sigma_data": 0.5},
        "teacher": teacher,
        "rollout": {"num_trajectories": 2_400_000, "batch_size": 1024,
                    "solver": {"name": "dpm3m_lu", "lower_order_final": True, "steps": 16, "grid": "log_uniform",
                               "sigma_min": 0.002, "sigma_max": 80.0},
                    "store": {"dtype": "float16", "chunk_trajectories": 64, "shard_chunks": 64}},
        "midtrain": {"form": "cm", "init": "teacher", "distance": "lpips", "lpips_backbone": VGG16_WEIGHTS,
                     "train": {**_REFERENCE_LOOP, **_BOOKKEEPING, "steps": 300_000, "batch_size": 128, "lr": 2e-4,
                               "ema_decay": 0.999, "eval_every": 50_000}},
        "posttrain": {"method": "ect", "init": "cmt",
                      "ect": {"t_sampling": "lognormal", "p_mean": -1.1, "p_std": 2.0, "k": 8.0, "b": 1.0, "q": q,
                              "start_stage": 0, "stage_steps": 1_000_000, "huber_c": 0.0},
                      "train": {**_REFERENCE_LOOP, **_BOOKKEEPING, "steps": 100_000, "batch_size": 128, "lr": 1e-4,
                                "ema_decay": 0.9999, "eval_every": 5000}},
        "eval": {"num_samples": 50_000, "batch_size": 500, "mid_sigma": 0.77569, "mid_sigma_search": [],
                 "fid_mode": "legacy_tensorflow"},
    }


TINY_TRAINING = {"batch_size": 8, "checkpoint_every": 2, "log_every": 1}  # the tiny presets' training loops


def _tiny_stages(cfg: dict, dim: int) -> None:
    """A recipe's rollouts, mid- and post-training and evaluation cut to a few steps on a CPU (in place), with an
    offline stand-in for LPIPS (no VGG16 weights here): pseudo-Huber with iCT's c = 0.00054 sqrt(dim)."""
    cfg["rollout"].update(num_trajectories=16, batch_size=8)
    cfg["rollout"]["solver"]["steps"] = 4
    cfg["rollout"]["store"] = {"dtype": "float16", "chunk_trajectories": 4, "shard_chunks": 2}
    cfg["midtrain"]["train"].update(TINY_TRAINING, steps=3, eval_every=None)
    cfg["midtrain"].update(distance="pseudo_huber", huber_c=0.00054 * dim**0.5, lpips_backbone=None)
    cfg["posttrain"]["train"].update(TINY_TRAINING, steps=3, eval_every=None)
    cfg["eval"].update(num_samples=16, batch_size=8)


# torchvision's ImageNet VGG16 weights, LPIPS's backbone: a local file (nothing is downloaded)
VGG16_WEIGHTS = "weights/vgg16-397923af.pth"
# ELatentLPIPS's latent VGG16, which the reference does not release: trained with `cmt latent-vgg` (its recipe)
ELATENT_VGG16_WEIGHTS = "weights/elatent-lpips-vgg16.safetensors"


def _cifar10(tiny: bool = False) -> dict:
    cfg = _cmt_recipe({"name": "cifar10", "path": "data/cifar-10-batches-py"}, [2, 2, 2],
                      _edm_teacher("edm-cifar10-32x32-uncond-vp.pkl", batch_size=512, lr=1e-3,
                                   ema_decay=0.99929, sampler_steps=18), q=4096.0)
    if tiny:
        cfg["network"].update(width=16, channel_mult=[1, 2], depth=1, emb_dim=32)
        cfg["data"]["heldout_fraction"] = 0.2
        cfg["teacher"].update(source="pretrain", path=None)  # offline: a tiny teacher pre-trained here
        cfg["teacher"]["train"].update(TINY_TRAINING, steps=3, warmup_steps=0)
        _tiny_stages(cfg, 3 * 32 * 32)
    return cfg


def _faces64(name: str, q: float) -> dict:
    """FFHQ-64 / AFHQv2-64: EDM's 64x64 DDPM++ (channel_mult 1, 2, 2, 2) and teacher, the CIFAR-10 recipe's
    mid-training, ECT at dt = 1/q. ``name`` is the folder of PNGs under ``data/``."""
    return _cmt_recipe({"name": "image_folder", "path": f"data/{name}", "resolution": 64}, [1, 2, 2, 2],
                       _edm_teacher(f"edm-{name}-uncond-vp.pkl", batch_size=256, lr=2e-4, ema_decay=0.999645,
                                    sampler_steps=40), q=q)


def _edm2_training(steps: int, lr: float, posthoc_std: float, decay: int = 35000) -> dict:
    """EDM2's training loop for a network it released (NVlabs/edm2 ``train_edm2.py`` presets ``edm2-img64-*``,
    ``edm2-img512-*``, ``training/training_loop.py``): batch 2048, Adam (0.9, 0.99), lr ``lr`` ramped up over 10 Mimg
    then decayed as 1 / sqrt(step / ``decay``) (35,000 at 64x64, 70,000 at 512x512), power-function EMAs of stds
    0.05 and 0.10 snapshotted every 8 Mi images, the released network their post-hoc reconstruction at
    ``posthoc_std`` after ``steps`` steps."""
    return {"steps": steps, "batch_size": 2048, "lr": lr, "optimizer": "adam", "betas": [0.9, 0.99],
            "weight_decay": 0.0, "lr_schedule": "rsqrt", "lr_decay_steps": decay, "warmup_steps": 4883,
            "ema_stds": [0.05, 0.1], "ema_snapshot_every": 4096, "posthoc_std": posthoc_std, "grad_clip": None,
            **_BOOKKEEPING}


def _tiny_edm2_guided(cfg: dict) -> None:
    """An EDM2 recipe with autoguidance at tiny size (in place): tiny networks, teacher and guide pre-trained here
    for a few steps (offline), a 4-step teacher sampler."""
    cfg["network"].update(width=16, channel_mult=[1, 2], depth=1, attention_resolutions=[], emb_dim=32)
    for section in (cfg["teacher"], cfg["guidance"]["guide"]):
        section.update(source="pretrain", path=None)
        section["train"].update(TINY_TRAINING, steps=4, warmup_steps=0, lr_decay_steps=2, ema_snapshot_every=2)
    cfg["guidance"]["guide"]["width"] = 8
    cfg["teacher"]["sampler"]["steps"] = 4


def _imagenet64(tiny: bool = False) -> dict:
    """ImageNet-64, class-conditional, with EDM2-S as the teacher: no CMT code for it is public, so the recipe is
    built from the reference's ImageNet-512 CMT and ECD scripts (sony/cmt ``imagenet512/``), ECT's ImageNet-64
    template (locuslab/ect ``run_imgnet_ecm.sh``) and EDM2's autoguided ImageNet-64 preset; ``docs/recipes.md``
    lists every number with its source and marks those that are our choice. ``tiny``: the same recipe with tiny
    networks, teacher and guide pre-trained here, 16x16 images and a few steps, to exercise it on a CPU."""
    cfg = {
        "data": {"name": "image_folder", "path": "data/imagenet-64x64.zip", "resolution": 64, "num_classes": 1000,
                 "heldout_fraction": 0.0},
        "network": {"kind": "edm2", "width": 192, "depth": 3, "channel_mult": [1, 2, 3, 4],
                    "attention_resolutions": [16, 8], "dropout": 0.0, "emb_dim": 768, "sigma_data": 0.5,
                    "consistency_boundary": "evaluation"},
        "teacher": {"source": "edm_pickle", "path": "weights/edm2-img64-s-1073741-0.075.pkl", "p_mean": -0.8,
                    "p_std": 1.6, "train": _edm2_training(524288, 0.01, 0.075),
                    "sampler": {"name": "heun", "steps": 32, "grid": "karras", "sigma_min": 0.002,
                                "sigma_max": 80.0, "rho": 7.0, "to_zero": True}},
        "guidance": {"kind": "autoguidance", "scale": 1.7, "rollout_scale": 1.0,
                     "guide": {"source": "edm_pickle", "path": "weights/edm2-img64-xs-0134217-0.110.pkl",
                               "width": 128, "train": _edm2_training(65536, 0.012, 0.11)}},
        "rollout": {"num_trajectories": 800_000, "batch_size": 1024,
                    "solver": {"name": "dpm3m_lu", "lower_order_final": True, "steps": 16, "grid": "log_uniform",
                               "sigma_min": 0.002, "sigma_max": 80.0},
                    "store": {"dtype": "float16", "chunk_trajectories": 64, "shard_chunks": 64}},
        "midtrain": {"form": "cm", "init": "teacher", "distance": "lpips", "lpips_backbone": VGG16_WEIGHTS,
                     "train": {"steps": 100_000, "batch_size": 128, "lr": 2e-4, "optimizer": "adam",
                               "betas": [0.9, 0.999], "weight_decay": 0.0, "lr_schedule": "linear",
                               "final_lr_fraction": 0.0, "warmup_steps": 0, "ema_decay": 0.999, "grad_clip": None,
                               "eval_every": 100_000, **_BOOKKEEPING}},
        "posttrain": {"method": "ecd", "init": "cmt", "ecd_solver": "heun",
                      "ect": {"t_sampling": "lognormal", "p_mean": -0.8, "p_std": 1.6, "k": 8.0, "b": 1.0,
                              "q": 1024.0, "start_stage": 0, "stage_steps": 2_500_000, "huber_c": 0.06,
                              "weighting": "snr_plus_k"},
                      "train": {"steps": 125_000, "batch_size": 128, "lr": 1e-6, "optimizer": "adam",
                                "betas": [0.9, 0.99], "weight_decay": 0.0, "lr_schedule": "constant",
                                "warmup_steps": 0, "ema_decay": 0.9999, "grad_clip": None, "eval_every": 12500,
                                **_BOOKKEEPING}},
        "eval": {"num_samples": 50_000, "batch_size": 500, "mid_sigma": 1.526, "mid_sigma_search": [],
                 "fid_mode": "legacy_tensorflow"},
    }
    if tiny:
        cfg["data"]["resolution"] = 16
        _tiny_edm2_guided(cfg)
        _tiny_stages(cfg, 3 * 16 * 16)
        cfg["eval"]["fid_mode"] = "clean"
    return cfg


def _imagenet512(tiny: bool = False) -> dict:
    """ImageNet-512, class-conditional, in the latent space of Stable Diffusion's VAE with EDM2-XXL as the teacher:
    the reference's own ImageNet-512 recipe (sony/cmt ``imagenet512/``: ``run_cmt_512.sh``, ``run_ecd_512.sh``,
    ``training/loss.py``), the paper's 2-step FID 1.84. Rollouts are data-free (uniformly drawn classes, x_T = 80 z),
    mid-training regresses onto their ends in ELatentLPIPS, ECD's teacher step is autoguided by EDM2-M at 2.05
    (EDM2's ``edm2-img512-xxl-autog-fid`` pair). ``imagenet64``'s post-training, budget and evaluation are this
    recipe's; ``docs/recipes.md`` lists every number with its source. ``tiny``: the same recipe on a CPU: 64x64
    images through a VAE the test writes (``data.encoder.path``), latents 4x32x32 (ELatentLPIPS' augmentation
    needs sides of 22), tiny EDM2 teacher and guide pre-trained here on the encoded images, a few steps."""
    cfg = _imagenet64()
    cfg["data"] = {"name": "image_folder", "path": "data/img512.zip", "resolution": 512, "num_classes": 1000,
                   "heldout_fraction": 0.0,
                   "encoder": {"kind": "sd_vae", "path": "weights/sd-vae-ft-mse", "edm2_encoded": "data/img512-sd.zip"}}
    cfg["network"].update(width=448, emb_dim=1792)
    cfg["teacher"].update(path="weights/edm2-img512-xxl-0939524-0.070.pkl", p_mean=-0.4, p_std=1.0,
                          train=_edm2_training(458752, 0.0065, 0.070, decay=70000))
    cfg["guidance"].update(scale=2.05, guide={"source": "edm_pickle", "path": "weights/edm2-img512-m-0268435-0.155.pkl",
                                              "width": 256, "train": _edm2_training(131072, 0.009, 0.155, decay=70000)})
    cfg["midtrain"].update(distance="elatent_lpips", lpips_backbone=ELATENT_VGG16_WEIGHTS)
    if tiny:
        cfg["data"].update(path="data/img64.zip", resolution=64)
        cfg["data"]["encoder"].update(path="weights/tiny-vae", edm2_encoded=None)
        _tiny_edm2_guided(cfg)
        lpips = cfg["midtrain"]["lpips_backbone"]
        _tiny_stages(cfg, 4 * 32 * 32)
        cfg["midtrain"].update(distance="elatent_lpips", lpips_backbone=lpips, huber_c=0.0)
        cfg["eval"]["fid_mode"] = "clean"
    return cfg


def _imagenet256_meanflow(tiny: bool = False) -> dict:
    """ImageNet-256, class-conditional, in SD-VAE latents (4x32x32) with a DiT-XL/2 flow map: the paper's Mean Flow
    result (1-step FID 3.34). No CMT code for it is public: the teacher is SiT-XL/2 (willisma/SiT, a flow-matching
    velocity model, ``teacher.source='sit'``) guided by classifier-free guidance in its rollouts and evaluation; the
    student a DiT-XL/2 flow map, mid-trained from random weights (the teacher's are a velocity model's) on the
    rollouts' flow map, then post-trained with Mean Flow and guidance in its target at the Mean Flow papers'
    settings. Latents are SiT's: SD's VAE posterior sample times 0.18215. ``docs/recipes.md`` lists every number
    with its source and marks those that are our choice. ``tiny``: the same recipe on a CPU: 16x16 images through
    a VAE the test writes (latents 4x8x8), a tiny DiT and a tiny SiT teacher file the test writes, a few steps."""
    mf_train = {"batch_size": 1024, "lr": 1e-4, "optimizer": "adam", "betas": [0.9, 0.95], "weight_decay": 0.0,
                "lr_schedule": "constant", "warmup_steps": 0, "ema_decay": 0.9999, "grad_clip": None,
                **_BOOKKEEPING}
    cfg = {
        "data": {"name": "image_folder", "path": "data/imagenet-256x256.zip", "resolution": 256, "num_classes": 1000,
                 "heldout_fraction": 0.0,
                 "encoder": {"kind": "sd_vae", "path": "weights/sd-vae-ft-mse", "raw_mean": [0.0] * 4,
                             "raw_std": [1.0] * 4, "final_mean": 0.0, "final_std": 0.18215}},
        "network": {"kind": "dit", "width": 1152, "depth": 28, "heads": 16, "patch_size": 2, "dropout": 0.0,
                    "sigma_data": 1.0},
        "teacher": {"source": "sit", "path": "weights/SiT-XL-2-256.pt",
                    "train": {"steps": 7_005_600, "batch_size": 256, "lr": 1e-4, "optimizer": "adam",
                              "betas": [0.9, 0.999], "weight_decay": 0.0, "lr_schedule": "constant",
                              "warmup_steps": 0, "ema_decay": 0.9999, "grad_clip": None, "label_dropout": 0.1,
                              **_BOOKKEEPING},
                    "sampler": {"name": "heun", "steps": 32, "grid": "karras", "sigma_min": 0.002,
                                "sigma_max": 80.0, "rho": 7.0, "to_zero": True}},
        "guidance": {"kind": "cfg", "scale": 1.5, "rollout_scale": 2.5},
        "rollout": {"num_trajectories": 1_281_167, "batch_size": 1024,
                    "solver": {"name": "dpm3m_lu", "lower_order_final": True, "steps": 16, "grid": "log_uniform",
                               "sigma_min": 0.002, "sigma_max": 80.0},
                    "store": {"dtype": "float16", "chunk_trajectories": 64, "shard_chunks": 64}},
        "midtrain": {"form": "flow_map", "init": "random", "distance": "squared_l2",
                     "train": {"steps": 60_000, **mf_train, "label_dropout": 0.1, "eval_every": 60_000}},
        "posttrain": {"method": "meanflow", "init": "cmt",
                      "meanflow": {"time": "tau", "p_mean": -0.4, "p_std": 1.0, "equal_fraction": 0.75,
                                   "adaptive_p": 1.0, "norm_eps": 1e-3,
                                   "guidance": {"omega": 0.2, "kappa": 0.92, "t_start": 0.0, "t_end": 0.75}},
                      "train": {"steps": 90_000, **mf_train, "label_dropout": 0.1, "eval_every": 10_000}},
        "eval": {"num_samples": 50_000, "batch_size": 250, "mid_sigma": 1.0, "mid_sigma_search": [],
                 "fid_mode": "legacy_tensorflow", "reference_stats": "data/VIRTUAL_imagenet256_labeled.npz"},
    }
    if tiny:
        cfg["data"].update(path="data/img16.zip", resolution=16)
        cfg["data"]["encoder"]["path"] = "weights/tiny-vae"
        cfg["network"].update(width=64, depth=2, heads=4)
        cfg["teacher"]["path"] = "weights/tiny-sit.pt"
        cfg["teacher"]["sampler"]["steps"] = 4
        _tiny_stages(cfg, 4 * 8 * 8)
        cfg["midtrain"].update(distance="squared_l2", huber_c=0.0)
        cfg["eval"].update(fid_mode="clean", reference_stats=None)
    return cfg


PRESETS = {"toy": _toy, "digits": _digits, "digits-cond": _digits_cond, "toy-meanflow": _toy_meanflow,
           "digits-latent": _digits_latent,
           "digits-meanflow": _digits_meanflow, "digits-cond-meanflow": _digits_cond_meanflow,
           "cifar10": _cifar10, "cifar10-tiny": lambda: _cifar10(tiny=True),
           "ffhq64": lambda: _faces64("ffhq-64x64", q=512.0), "afhq64": lambda: _faces64("afhqv2-64x64", q=1024.0),
           "imagenet64": _imagenet64, "imagenet64-tiny": lambda: _imagenet64(tiny=True),
           "imagenet512": _imagenet512, "imagenet512-tiny": lambda: _imagenet512(tiny=True),
           "imagenet256-meanflow": _imagenet256_meanflow,
           "imagenet256-meanflow-tiny": lambda: _imagenet256_meanflow(tiny=True)}


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ValueError(f"override {brief(text)} is not of the form key.path=value")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {brief(text)}: {brief(key.strip())} is not a dotted key path such as "
                         "midtrain.train.lr")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"override {brief(text)}: the value is not valid YAML ({yaml_problem(err)})") from None
    except RecursionError:
        raise ValueError(f"override {brief(text)}: the value nests deeper than any config value") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a raw config dict (values parsed as YAML: numbers, lists, null, ...)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {brief(text)}: {'.'.join(keys[:depth + 1])} is a value, not a section")
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
