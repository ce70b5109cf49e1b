"""Scoring models on a fixed set of starting noises, during training and in the final table.

``Scorer`` draws ``x_T = sigma_max * z`` once (seeded by ``eval.seed`` and its seed set), samples a model with
``k`` steps (``cmt_core.samplers``) and scores the samples with the data's ``Evaluator`` (Frechet distance
under its extractor's name, or 2-D distances).
With an exact teacher it also reports ``flow_map_error``: the mean l2 distance between the model's
sample and the true ODE endpoint from the same noise (a fine DPM-Solver++(3M) solve of the exact ODE).
"""

from __future__ import annotations

import torch

from cmt_core.config import EvalConfig, SolverConfig
from cmt_core.evaluation.distances_2d import flow_map_error
from cmt_core.samplers import sample, sample_teacher
from cmt_core.solvers import solve_config
from cmt_core.teachers import ExactDenoiser

EXACT_REFERENCE = SolverConfig(name="dpm3m", steps=128, grid="karras", sigma_min=0.002)


class Scorer:
    """Scores models from ``eval_cfg.num_samples`` fixed noises at ``sigma_max``.

    ``sigma_min`` is the end of the few-step samplers' grids (the models' boundary time)."""

    def __init__(self, data, eval_cfg: EvalConfig, evaluator, device: torch.device, sigma_max: float,
                 sigma_min: float, seed_set: int = 0):
        self.cfg, self.evaluator, self.device = eval_cfg, evaluator, device
        self.sigma_max, self.sigma_min = sigma_max, sigma_min
        self.seed = eval_cfg.seed + 1000 * seed_set
        n = eval_cfg.num_samples
        g = torch.Generator().manual_seed(self.seed)
        self.x_T = torch.randn(n, *data.sample_shape, generator=g) * self.sigma_max
        self.exact = None
        if data.exact_denoiser is not None:
            ref = EXACT_REFERENCE.model_copy(update={"sigma_max": self.sigma_max})
            self.exact = solve_config(ExactDenoiser(data.distribution), self.x_T.double(), ref)[:, -1].float()

    @property
    def primary(self) -> str:
        """The metric that selects checkpoints (lower is better)."""
        return "flow_map_error" if self.exact is not None else self.evaluator.metric_name

    def _batched(self, fn) -> torch.Tensor:
        bs = self.cfg.batch_size
        return torch.cat([fn(self.x_T[i:i + bs].to(self.device)).float().cpu() for i in range(0, len(self.x_T), bs)])

    def metrics(self, samples: torch.Tensor) -> dict:
        out = dict(self.evaluator.score(samples))
        if self.exact is not None:
            out["flow_map_error"] = flow_map_error(samples, self.exact)
        return out

    @torch.no_grad()
    def few_step(self, kind: str, model, steps: int) -> tuple[dict, torch.Tensor]:
        """Metrics and samples of a ``consistency`` / ``flow_map`` model with ``steps`` network calls."""
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.seed + 1)
        samples = self._batched(lambda x: sample(kind, model, x, steps, self.sigma_max, self.sigma_min,
                                                 self.cfg.mid_sigma, g))
        model.train(was_training)
        return self.metrics(samples), samples

    @torch.no_grad()
    def teacher(self, denoiser, solver: SolverConfig) -> tuple[dict, torch.Tensor]:
        samples = self._batched(lambda x: sample_teacher(denoiser, x, solver))
        return self.metrics(samples), samples

    def training_evaluate(self, kind: str):
        """The ``evaluate`` hook of ``cmt_core.training.train``: 1-step metrics with a ``score``."""
        def evaluate(model) -> dict:
            metrics, _ = self.few_step(kind, model, 1)
            return {"score": metrics[self.primary], **metrics}
        return evaluate
