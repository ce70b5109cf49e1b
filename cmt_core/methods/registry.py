"""The method registry: one declaration per training objective, read by every layer that needs to know a method.

A ``Method`` says, in one place, what the pipeline needs to run it: its name (the config value that selects it),
the stage that trains it, the model kind it trains (``cmt_core.models``), the config section holding its
hyper-parameters, how its loss is built from that section, the batches it trains on, its few-step sampler
(``cmt_core.samplers``), its network evaluations per training sample, what else its loss is built with (the
teacher, a frozen mid-trained model) and the rules it sets on a whole config. The stage bodies
(``cmt_core.stages``), the config's choices and rules (``cmt_core.config``), the comparison, the command line, the
report and ``benchmarks/gpu.py`` read it; adding a method is one file that calls ``register``.

Loss builders take the pipeline config (a ``ConfigView`` of it inside a stage: the method reads its section) and
a ``LossInputs``, and turn them into a loss object built from plain values (``objective(model, batch, rng) ->
(B,)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cmt_core.encoders import IDENTITY, Encoder
from cmt_core.samplers import FEW_STEP_SAMPLERS

STAGES = ("teacher", "midtrain", "posttrain")  # the stages that train a method
KINDS = ("denoiser", "consistency", "flow_map")  # cmt_core.models
BATCHES = ("data", "trajectory_ends", "trajectory_pairs")  # data samples; (x_ti, x_t0); (x_ti, x_tj), j > i


@dataclass
class LossInputs:
    """What a stage hands a loss builder besides the method's section."""

    sigma_min: float  # the trajectories' clean end: the few-step models' boundary time
    sigma_max: float
    sigma_data: float
    teacher: nn.Module | None = None  # the teacher denoiser, for a method that ``needs`` "teacher"
    midtrained: Callable[[], nn.Module] | None = None  # loads a frozen copy of the mid-trained model (init='cmt')
    encoder: Encoder = field(default=IDENTITY)  # model space -> sample space, for distances that compare samples


def no_rules(cfg) -> None:
    """A method that sets no rule on the config."""


@dataclass(frozen=True)
class Method:
    name: str  # the config value that selects it (``midtrain.form``, ``posttrain.method``; ``edm``: the teacher)
    stage: str  # one of ``STAGES``
    kind: str  # the model kind it trains, one of ``KINDS``
    section: str | None  # the dotted config section of its hyper-parameters (part of its stage's identity)
    build_loss: Callable[[Any, LossInputs], Any]  # (config, inputs) -> objective(model, batch, rng) -> (B,)
    nfe: Callable[[Any], int]  # forward network evaluations per training sample, from the pipeline config
    batches: str = "data"  # what it trains on, one of ``BATCHES``
    sampler: str | None = None  # its few-step sampler (``cmt_core.samplers``); None: sampled by an ODE solver
    needs: tuple[str, ...] = ()  # "teacher": the teacher denoiser at training time; "midtrained": (maybe) the
    #                              mid-trained model (``LossInputs``)
    rules: Callable[[Any], None] = no_rules  # (pipeline config) -> None, raising ValueError naming the field

    def __post_init__(self):
        if self.stage not in STAGES or self.kind not in KINDS or self.batches not in BATCHES:
            raise ValueError(f"method {self.name!r}: stage {self.stage!r} / kind {self.kind!r} / batches "
                             f"{self.batches!r} must be one of {STAGES} / {KINDS} / {BATCHES}")
        if self.stage != "teacher" and self.sampler is None:
            raise ValueError(f"method {self.name!r} trains a few-step model: name its sampler")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name is registered once); returns it."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    if method.sampler is not None and method.sampler not in FEW_STEP_SAMPLERS:
        raise ValueError(f"method {method.name!r}: no few-step sampler {method.sampler!r} "
                         f"(registered: {sorted(FEW_STEP_SAMPLERS)})")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def names(stage: str) -> tuple[str, ...]:
    """The methods registered for ``stage``, in registration order."""
    return tuple(name for name, m in METHODS.items() if m.stage == stage)


def section_of(cfg, method: Method):
    """The config section of ``method`` in ``cfg`` (a config or a ``ConfigView``); None without one."""
    if method.section is None:
        return None
    for key in method.section.split("."):
        cfg = getattr(cfg, key)
    return cfg
