"""Scoring models on a fixed set of starting noises, during training and in the final table.

``Scorer`` draws ``x_T = sigma_max * z`` once (seeded by ``eval.seed`` and its seed set), and for a conditional
run (``num_classes`` > 0) a uniform class label per sample from the same seed, samples a model with ``k`` steps
(its method's few-step sampler, ``cmt_core.samplers``), decodes the samples to the sample space
(``data.encoder``) and scores them with the data's ``Evaluator`` (Frechet distance under its extractor's name,
or 2-D distances; a conditional run's samples also by the class they were drawn for: the per-class Frechet
distance and, on digits, ``class_accuracy``).
With an exact teacher it also reports ``flow_map_error``: the mean l2 distance between the model's
sample and the true ODE endpoint from the same noise (a fine DPM-Solver++(3M) solve of the exact ODE).

2-step sampling re-noises to an intermediate sigma. ``mid_sigma_for`` chooses it per model among
``eval.mid_sigma_search`` by the 2-step score on noises of their own (seed set ``SEARCH_SEED_SET``, which no
results table uses), so the figure a model is reported with is not the one its sigma was picked on.
"""

from __future__ import annotations

import torch

from cmt_core import conditioning
from cmt_core.evaluation.distances_2d import flow_map_error
from cmt_core.samplers import sample, sample_teacher
from cmt_core.solvers import solve
from cmt_core.teachers import ExactDenoiser
from cmt_core.time_grids import karras_grid

EXACT_REFERENCE = ("dpm3m", 128, 0.002)  # the true ODE endpoint: DPM-Solver++(3M), 128 Karras steps to sigma 0.002
SEARCH_SEED_SET = 16  # the tables use seed sets 0 .. eval.num_seed_sets - 1 <= 15


class Scorer:
    """Scores models from ``eval_cfg.num_samples`` fixed noises at ``sigma_max`` (``eval_cfg``: an ``EvalConfig``).

    ``sigma_min`` is the end of the few-step samplers' grids (the models' boundary time); ``num_classes`` > 0: a
    conditional run, each noise with a uniform class label (``labels``: ``(N,)`` int64, None unconditional; ``cond``:
    their one-hot rows)."""

    def __init__(self, data, eval_cfg, evaluator, device: torch.device, sigma_max: float, sigma_min: float,
                 seed_set: int = 0, num_classes: int = 0):
        self.cfg, self.evaluator, self.device = eval_cfg, evaluator, device
        self.data, self.sigma_max, self.sigma_min, self.num_classes = data, sigma_max, sigma_min, num_classes
        self.seed = eval_cfg.seed + 1000 * seed_set
        self._search: Scorer | None = None
        n = eval_cfg.num_samples
        g = torch.Generator().manual_seed(self.seed)
        self.x_T = torch.randn(n, *data.model_shape, generator=g) * self.sigma_max
        self.labels = torch.randint(num_classes, (n,), generator=g) if num_classes else None
        self.cond = conditioning.class_cond(self.labels, num_classes)
        self.exact = None
        if data.exact_denoiser is not None:
            name, steps, end = EXACT_REFERENCE
            grid = karras_grid(steps, end, self.sigma_max)
            exact = solve(ExactDenoiser(data.distribution), self.x_T.double(), grid, name, self.cond)
            self.exact = exact[:, -1].float()

    @property
    def primary(self) -> str:
        """The 1-step metric that selects checkpoints (lower is better): with an exact teacher the error against
        the ODE endpoint, else the evaluator's distance to the data."""
        return "flow_map_error" if self.exact is not None else self.evaluator.metric_name

    @property
    def primary_2step(self) -> str:
        """The 2-step one: always the distance to the data, since multistep consistency sampling draws fresh
        noise and does not aim at the ODE endpoint of its starting noise."""
        return self.evaluator.metric_name

    def _batched(self, fn) -> torch.Tensor:
        """``fn(x_T rows, their cond)`` over the noises, ``eval.batch_size`` at a time, on the device."""
        bs = self.cfg.batch_size
        return torch.cat([fn(self.x_T[i:i + bs].to(self.device),
                             conditioning.to_device(conditioning.select(self.cond, slice(i, i + bs)), self.device))
                          .float().cpu() for i in range(0, len(self.x_T), bs)])

    def metrics(self, samples: torch.Tensor) -> dict:
        """Metrics of model-space ``samples`` (one per noise, in order): scored decoded (``data.encoder``) and, in a
        conditional run, by the classes of their noises; the flow-map error in the model's space."""
        out = dict(self.evaluator.score(self.data.encoder.decode(samples), self.labels))
        if self.exact is not None:
            out["flow_map_error"] = flow_map_error(samples, self.exact)
        return out

    @torch.no_grad()
    def few_step(self, sampler: str, model, steps: int, mid_sigma: float | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics and model-space samples of a few-step model with the sampler ``sampler``
        (``cmt_core.samplers``) and ``steps`` network calls, re-noising to ``mid_sigma`` (default
        ``eval.mid_sigma``) when ``steps > 1``."""
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.seed + 1)
        mid = self.cfg.mid_sigma if mid_sigma is None else mid_sigma
        samples = self._batched(lambda x, cond: sample(sampler, model, x, steps, self.sigma_max, self.sigma_min, mid,
                                                       g, cond))
        model.train(was_training)
        return self.metrics(samples), samples

    @torch.no_grad()
    def teacher(self, denoiser, solver) -> tuple[dict, torch.Tensor]:
        """Metrics and samples of the teacher's ODE solve on the grid of ``solver`` (a ``SolverConfig``)."""
        samples = self._batched(lambda x, cond: sample_teacher(denoiser, x, solver, cond))
        return self.metrics(samples), samples

    def mid_sigma_for(self, sampler: str, model) -> float:
        """The 2-step intermediate sigma of ``model``: ``eval.mid_sigma`` without candidates, else the candidate
        of ``eval.mid_sigma_search`` with the lowest 2-step score (``primary_2step``) on the search noises."""
        if not self.cfg.mid_sigma_search:
            return self.cfg.mid_sigma
        if self._search is None:
            self._search = Scorer(self.data, self.cfg, self.evaluator, self.device, self.sigma_max, self.sigma_min,
                                  seed_set=SEARCH_SEED_SET, num_classes=self.num_classes)
        scores = {s: self._search.few_step(sampler, model, 2, s)[0][self.primary_2step]
                  for s in self.cfg.mid_sigma_search}
        return min(scores, key=scores.get)

    def training_evaluate(self, sampler: str):
        """The ``evaluate`` hook of ``cmt_core.training.train``: the 1-step and 2-step metrics (``<name>_1step``,
        ``<name>_2step``), ``primary`` and ``primary_2step`` again as ``score_1step`` and ``score_2step``, and the
        2-step sigma ``mid_sigma`` (``mid_sigma_for``)."""
        def evaluate(model) -> dict:
            mid = self.mid_sigma_for(sampler, model)
            one, _ = self.few_step(sampler, model, 1)
            two, _ = self.few_step(sampler, model, 2, mid)
            return {"score_1step": one[self.primary], "score_2step": two[self.primary_2step], "mid_sigma": mid,
                    **{f"{k}_1step": v for k, v in one.items()}, **{f"{k}_2step": v for k, v in two.items()}}
        return evaluate
