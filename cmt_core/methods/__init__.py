"""The training methods, each declared once (``registry.Method``) and registered by importing its module:

* ``edm`` (``methods.edm``): the teacher's EDM denoising objective;
* ``cm``, ``mf``, ``flow_map`` (``methods.cmt``): consistency mid-training's forms;
* ``ect``, ``ecd`` (``methods.ect``): easy consistency tuning and distillation;
* ``meanflow`` (``methods.meanflow``): Mean Flow.

A new method is a module that calls ``register(Method(...))``; importing it makes it selectable in configs
(``midtrain.form`` / ``posttrain.method``), trainable by its stage, sampled and scored by the evaluation and
counted by the comparison. ``DISTANCES`` names the per-sample distances the mid-training section may choose.
"""

from cmt_core.methods import cmt, ect, edm, meanflow  # noqa: F401  (registers the built-in methods)
from cmt_core.methods.registry import METHODS, LossInputs, Method, get_method, names, register, section_of
from cmt_core.objectives.distances import DISTANCES

__all__ = ["DISTANCES", "METHODS", "LossInputs", "Method", "get_method", "names", "register", "section_of"]
