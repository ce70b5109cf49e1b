"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, section 3 and appendix C).

**Training progress.** ``t`` (and every ``ofs``, "offset") counts optimisation steps of the global batch: ``t = k``
once ``k`` steps have been taken, the weights after step ``k`` are ``theta_k`` (``theta_0`` the initial ones).
EDM2 counts images seen, ``B * t`` with a constant global batch ``B``: every quantity here is the same in either
unit (the EMA's decay depends on the ratio ``1 / t``, and the post-hoc coefficients solve a system whose two sides
both scale as ``1 / t``), so snapshots taken in steps reconstruct exactly as EDM2's taken in images.

**Profile.** A power-function EMA of exponent ``gamma > 0`` averages the training trajectory with weights
proportional to ``tau ** gamma`` over ``0 < tau <= t``, i.e. the density ``p_t(tau) = (gamma + 1) tau ** gamma /
t ** (gamma + 1)``; its width is stated as the relative standard deviation ``std`` of that density divided by
``t`` (``std = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``, independent of ``t``), which lies in
``(0, MAX_STD)`` for ``gamma > 0``. It is tracked by ``ema <- beta_t ema + (1 - beta_t) theta_t`` with
``beta_t = (1 - 1 / t) ** (gamma + 1)`` (``beta_1 = 0``: the initial weights never count). Unrolled, the EMA after
``t`` steps is exactly ``sum_k w_k theta_k`` with ``w_k = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) /
t ** (gamma + 1)`` for ``1 <= k <= t`` (``power_function_response``), which is the integral of ``p_t`` over
``(k - 1, k]``: the tracked EMA is the continuous power-function average of the trajectory that holds
``theta_k`` during step ``k``. That is why the continuous inner products of ``power_function_correlation`` are
the right ones for discrete training.

**Post-hoc reconstruction.** Given snapshots of tracked EMAs (``std_i`` at ``ofs_i``), the EMA of any other
``std`` at ``t`` is approximated by ``sum_i c_i snapshot_i`` with the ``c`` that minimise the L2 distance between
the profiles ``sum_i c_i p_i`` and ``p_target`` (``solve_posthoc_coefficients``: normal equations of the Gram
matrix of the snapshot profiles), rescaled to sum to 1 so that a constant trajectory is reproduced exactly;
``combine_state_dicts`` applies them to snapshot state dicts.

Plain values in, plain values out: numbers or numpy arrays for the maths, ``nn.Module`` / state dicts for the
EMA and the combination.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

DEFAULT_STDS = (0.050, 0.100)
MAX_STD = 12 ** -0.5  # gamma -> 0: the uniform average of the whole run, std 1 / sqrt(12)


# ----------------------------------------------------------------------------------------- std <-> exponent

def exponent_to_std(gamma):
    """The relative std of the power-function profile of exponent ``gamma`` (> -1; a scalar or an array)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exponent(std):
    """The exponent ``gamma > 0`` whose profile has relative std ``std`` (in ``(0, MAX_STD)``; a scalar or an
    array, returned in the same shape as float64).

    ``std ** -2 = (gamma + 2) ** 2 (gamma + 3) / (gamma + 1)`` is the cubic ``gamma^3 + 7 gamma^2 + (16 - q) gamma
    + 12 - q = 0`` in ``gamma`` with ``q = std ** -2 > 12``; it has three real roots and ``gamma`` is the largest
    (the only positive one), written here in its trigonometric closed form."""
    std = np.asarray(std, dtype=np.float64)
    if not np.all((std > 0) & (std < MAX_STD)):
        raise ValueError(f"relative std must be in (0, {MAX_STD:.6f}), got {str(std.tolist())[:200]}")
    q = std ** -2
    # gamma = x - 7/3 turns the cubic into x^3 + p x + r = 0 with p < 0
    p = -(1 + 3 * q) / 3
    r = (2 + 36 * q) / 27
    radius = np.sqrt(-p / 3)
    angle = np.arccos(np.clip(-r / (2 * radius ** 3), -1.0, 1.0)) / 3
    return 2 * radius * np.cos(angle) - 7 / 3


# ---------------------------------------------------------------------------------------------- profiles

def _beta(gamma: float, step) -> float:
    if not (isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 1):
        raise ValueError(f"step counts the optimisation steps taken, >= 1; got {step!r}")
    return (1.0 - 1.0 / int(step)) ** (gamma + 1.0)


def power_function_beta(std: float, step: int) -> float:
    """The decay of the update that completes step ``step`` (>= 1): ``(1 - 1 / step) ** (gamma + 1)`` (0 at step 1).

    In EDM2's images, ``(1 - B / (B * step)) ** (gamma + 1)``: the same number."""
    return _beta(float(std_to_exponent(std)), step)


def power_function_response(ofs, std, length: int) -> np.ndarray:
    """The weights of the tracked power-function EMA of relative std ``std`` after ``ofs`` steps, over the
    trajectory ``theta_0 .. theta_{length - 1}``: float64 array of shape ``broadcast(ofs, std).shape + (length,)``
    whose entry ``k`` is ``(min(k, ofs) ** (gamma + 1) - min(k - 1, ofs) ** (gamma + 1)) / ofs ** (gamma + 1)``
    for ``k >= 1`` and 0 for ``k = 0`` (exactly what ``PowerFunctionEMA`` computes; each row sums to 1 when
    ``length > ofs``). ``ofs``: integers >= 1."""
    ofs, std = np.broadcast_arrays(np.asarray(ofs), np.asarray(std, dtype=np.float64))
    if not np.all((ofs >= 1) & (ofs == np.floor(ofs))):
        raise ValueError(f"ofs counts optimisation steps: integers >= 1, got {str(ofs.tolist())[:200]}")
    ofs = ofs.astype(np.float64)[..., None]
    power = std_to_exponent(std)[..., None] + 1
    k = np.arange(length, dtype=np.float64)
    cumulative = (np.minimum(k, ofs) / ofs) ** power  # the share of the first k steps
    weights = np.diff(cumulative, axis=-1, prepend=0.0)
    return weights


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """The inner products ``integral p_a(tau) p_b(tau) dtau`` of power-function profiles ``a`` and ``b``
    (``p(tau) = (gamma + 1) tau ** gamma / ofs ** (gamma + 1)`` on ``(0, ofs]``), broadcast over the four
    arguments (offsets > 0 in steps, relative stds); float64 of the broadcast shape. In closed form:
    ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1) * m ** (g_a + g_b + 1) / (a_ofs ** (g_a + 1) b_ofs ** (g_b + 1))``
    with ``m = min(a_ofs, b_ofs)``, computed in logarithms."""
    a_ofs, b_ofs = np.asarray(a_ofs, dtype=np.float64), np.asarray(b_ofs, dtype=np.float64)
    ga, gb = std_to_exponent(a_std), std_to_exponent(b_std)
    shortest = np.minimum(a_ofs, b_ofs)
    log_value = (ga + gb + 1) * np.log(shortest) - (ga + 1) * np.log(a_ofs) - (gb + 1) * np.log(b_ofs)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log_value)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Least-squares coefficients that combine snapshots into other power-function EMAs.

    ``in_ofs`` / ``in_std`` (broadcast together, flattened to ``n_in`` entries): each snapshot's offset (steps
    taken, > 0) and the relative std of the EMA it holds; ``out_ofs`` / ``out_std`` (broadcast, ``n_out``
    entries): the EMAs wanted. Returns float64 ``[n_in, n_out]``: column ``j`` minimises ``|| sum_i c_ij p_i -
    p_j ||_2`` over profiles (normal equations ``A c = b`` with the Gram matrix ``A`` of the snapshots' profiles
    and ``b`` their correlations with the target), then is rescaled to sum to 1. Snapshots after ``out_ofs``
    carry weight on steps the target does not average; reconstruct at the offset of a snapshot (EDM2 does) or
    before. Every (offset, std) pair must be distinct (two equal snapshots make ``A`` singular)."""
    in_ofs, in_std = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(in_ofs, in_std))
    out_ofs, out_std = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(out_ofs, out_std))
    for name, ofs in (("in_ofs", in_ofs), ("out_ofs", out_ofs)):
        if not np.all(np.isfinite(ofs) & (ofs > 0)):
            raise ValueError(f"{name} must be offsets > 0 (steps taken), got {str(ofs.tolist())[:200]}")
    if in_ofs.size == 0:
        raise ValueError("no snapshots to reconstruct from")
    pairs = list(zip(in_ofs.tolist(), in_std.tolist()))
    if len(set(pairs)) != len(pairs):
        raise ValueError("snapshots repeat an (offset, std) pair: each must be given once")
    gram = power_function_correlation(in_ofs[:, None], in_std[:, None], in_ofs[None, :], in_std[None, :])
    target = power_function_correlation(in_ofs[:, None], in_std[:, None], out_ofs[None, :], out_std[None, :])
    coefficients = np.linalg.solve(gram, target)
    return coefficients / coefficients.sum(axis=0, keepdims=True)


# ------------------------------------------------------------------------------------- combining snapshots

@torch.no_grad()
def combine_state_dicts(state_dicts: Iterable[Mapping[str, torch.Tensor]], coefficients: Sequence[float],
                        copy_keys: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``sum_i coefficients[i] * state_dicts[i]``, key by key: one column of ``solve_posthoc_coefficients`` applied
    to the snapshots' state dicts, given in the same order (an iterable: files can be read one at a time).

    Floating-point tensors are accumulated in float64 and returned in the dtype and device of the first state
    dict's; tensors of ``copy_keys`` (buffers, which an EMA copies rather than averages) and tensors that are not
    floating point (counters) are taken from the last state dict. Every state dict must have the same keys and
    shapes."""
    coefficients = [float(c) for c in coefficients]
    copied = set(copy_keys)
    total: dict[str, torch.Tensor] = {}
    like: dict[str, torch.Tensor] = {}
    count = 0
    for count, state in enumerate(state_dicts, start=1):
        if count > len(coefficients):
            raise ValueError(f"more state dicts than the {len(coefficients)} coefficients")
        weight = coefficients[count - 1]
        if count == 1:
            like = {k: v for k, v in state.items()}
        elif set(state) != set(like):
            raise ValueError(f"state dict {count - 1} has other keys than the first: "
                             f"{sorted(set(state) ^ set(like))[:5]}")
        for key, value in state.items():
            if value.shape != like[key].shape:
                raise ValueError(f"state dict {count - 1}: {key} has shape {tuple(value.shape)}, the first "
                                 f"{tuple(like[key].shape)}")
            if key in copied or not value.is_floating_point():
                total[key] = value.detach()  # the last one's, cloned below
            elif key in total:
                total[key].add_(value.detach().to(torch.float64), alpha=weight)
            else:
                total[key] = value.detach().to(torch.float64) * weight
    if count != len(coefficients):
        raise ValueError(f"{count} state dicts for {len(coefficients)} coefficients")
    return {k: total[k].to(like[k].dtype) if k not in copied and like[k].is_floating_point() else total[k].clone()
            for k in like}


# ------------------------------------------------------------------------------------------ the EMA itself

class PowerFunctionEMA:
    """Power-function EMAs of ``model`` at each relative std of ``stds`` (default ``DEFAULT_STDS``), frozen copies
    in eval mode (``models``, in the order of ``stds``; ``model`` is the first).

    ``update(model, step)`` after optimisation step ``step`` (>= 1, the number of steps taken): each parameter
    ``ema <- beta ema + (1 - beta) param`` with ``power_function_beta(std, step)``; buffers are copied as they
    are. The EMA is a function of the trajectory alone, so ``state_dict`` (the stds and every EMA's state dict)
    plus the step resumes it exactly; ``load_state_dict`` refuses a state of other stds (``ValueError``)."""

    def __init__(self, model: nn.Module, stds: Sequence[float] = DEFAULT_STDS):
        stds = tuple(float(s) for s in stds)
        if not stds:
            raise ValueError("a power-function EMA tracks at least one std")
        if len(set(stds)) != len(stds):
            raise ValueError(f"stds must be distinct, got {list(stds)}")
        self.stds = stds
        self.exponents = tuple(float(g) for g in std_to_exponent(np.array(stds)))
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in stds]

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        params, buffers = [p.detach() for p in model.parameters()], list(model.buffers())
        for gamma, ema in zip(self.exponents, self.models):
            beta = _beta(gamma, step)
            for e, p in zip(ema.parameters(), params):
                e.lerp_(p, 1.0 - beta)
            for e, b in zip(ema.buffers(), buffers):
                e.copy_(b)

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "emas": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict) -> None:
        stds = state.get("stds") if isinstance(state, dict) else None
        emas = state.get("emas") if isinstance(state, dict) else None
        if not isinstance(stds, list) or not isinstance(emas, list) or len(emas) != len(stds):
            raise ValueError("not a power-function EMA state (stds and one EMA per std)")
        if not all(isinstance(s, float) and math.isfinite(s) for s in stds) or tuple(stds) != self.stds:
            raise ValueError(f"the state tracks stds {str(stds)[:80]}, this EMA {list(self.stds)}")
        for ema, sd in zip(self.models, emas):
            ema.load_state_dict(sd)
