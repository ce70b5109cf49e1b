"""CMT: Consistency Mid-Training for consistency, Mean Flow and flow-map models.

Conventions used throughout the library (see the module docstrings for details):

* Time is the EDM noise level ``sigma`` (written ``t``, ``s`` or ``r``): data lives at ``sigma = 0``,
  a noisy sample is ``x_t = x_0 + t * eps`` and the probability-flow ODE is ``dx/dt = (x - D(x, t)) / t``.
  Mean Flow's average velocity ``u(x_t, r, t) = (x_t - x_r) / (t - r)`` is written in the same time;
  the rectified-flow time ``tau`` of the Mean Flow paper maps to it by ``t = tau / (1 - tau)``
  (see ``objectives.meanflow``).
* Every random number comes from a named stream of ``rng`` keyed by (seed, step, rank, ...).
* The stage graph (what each stage reads, needs and computes) is declared once, in ``stages``.
* Trajectories are ordered along the solver: index 0 is the noise end (``sigma_max``), index -1 the clean end.
* Images are float tensors in ``[-1, 1]``, shape ``(B, C, H, W)``; vector data is ``(B, D)``.

A trained generator, exported with ``cmt export``, is used without this pipeline's artifacts::

    import cmt_core
    gen = cmt_core.load_generator("my-generator")      # generator.json + model.safetensors
    images = gen.sample(16, steps=2, labels=None)      # (16, C, H, W) in [-1, 1]
"""

__version__ = "0.1.0"
__all__ = ["load_generator"]


def __getattr__(name: str):
    """``cmt_core.load_generator(folder)``: an exported generator (``cmt_core.generator``), imported on first use
    so that ``import cmt_core.<module>`` stays light."""
    if name == "load_generator":
        from cmt_core.generator import load_generator

        return load_generator
    raise AttributeError(f"module 'cmt_core' has no attribute {name!r}")
