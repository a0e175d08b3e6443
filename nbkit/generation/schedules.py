"""AUTOMATIC1111's schedule types as sigma sequences, computed the way A1111 computes them.

A1111's k-diffusion samplers (Euler, DPM++ 2M, ...) step through a list of noise levels (sigmas) that
its schedule type picks from the model's own table of training sigmas, `sqrt((1 - a) / a)` for each
training timestep's cumulative alpha `a`. `schedule_sigmas` gives that list for a schedule's internal
name, from the table of the model at hand: `steps + 1` sigmas from the highest down, the last one 0
(KL Optimal ends at the smallest training sigma instead, as A1111's does).

Between table entries a timestep's sigma is interpolated in log space, as k-diffusion's
`DiscreteSchedule.t_to_sigma` does. "Automatic", "Uniform" and "Normal" are the same list for these
models (k-diffusion's default `get_sigmas`: timesteps evenly spaced from the last to the first); the
Beta schedule uses A1111's default distribution (alpha = beta = 0.6) and needs scipy. Align Your Steps
takes NVIDIA's published SD 1.5 sigmas, or SDXL's for a family whose models are 1024-pixel ones (A1111
picks SDXL's for SDXL models).

`nbkit.generation.samplers` hands the list to the diffusers scheduler; nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# NVIDIA's Align Your Steps noise levels (A1111 steps through all 11 for 11 steps and interpolates them in
# log space for other step counts).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
AYS_SDXL_RESOLUTION = 1024  # families whose native resolution reaches this take the SDXL list
BETA_ALPHA = BETA_BETA = 0.6  # A1111's `beta_dist_alpha` and `beta_dist_beta` defaults
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0


def training_sigmas(alphas_cumprod: Any) -> np.ndarray:
    """The model's sigma for each training timestep (ascending, index = timestep).

    Args:
        alphas_cumprod: the cumulative alphas of the model's noise schedule (a diffusers scheduler's
            `alphas_cumprod`, tensor or array).
    """
    alphas = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1 - alphas) / alphas)


def t_to_sigma(table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Sigmas at (fractional) timesteps, interpolated in log space as k-diffusion does."""
    return np.exp(np.interp(timesteps, np.arange(len(table)), np.log(table)))


def _with_zero(sigmas: Any) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def uniform(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """Timesteps evenly spaced from the last to the first (A1111's Automatic, Uniform and Normal)."""
    return _with_zero(t_to_sigma(table, np.linspace(len(table) - 1, 0, steps)))


def sgm_uniform(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """`steps + 1` evenly spaced timesteps without the last (SGM's "trailing" spacing)."""
    return _with_zero(t_to_sigma(table, np.linspace(len(table) - 1, 0, steps + 1)[:-1]))


def simple(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """Every `len(table) / steps`-th training sigma from the top (ComfyUI's "simple")."""
    stride = len(table) / steps
    return _with_zero([table[-(1 + int(index * stride))] for index in range(steps)])


def ddim(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """Training sigmas 1, 1 + s, 1 + 2s, ... (s = `len(table) // steps`), from the top.

    A1111's list is longer than `steps` when `steps` does not divide the table (30 steps: 31 sigmas);
    the highest `steps` are kept so the request runs the steps it asked for.
    """
    stride = max(len(table) // steps, 1)
    picked = table[1::stride][::-1][:steps]
    return _with_zero(picked)


def karras(table: np.ndarray, steps: int, family: Any = None, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al.'s schedule between the smallest and largest training sigma."""
    low, high = table[0] ** (1 / rho), table[-1] ** (1 / rho)
    return _with_zero((high + np.linspace(0, 1, steps) * (low - high)) ** rho)


def exponential(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """Sigmas evenly spaced in log space (evenly spaced log-SNR)."""
    return _with_zero(np.exp(np.linspace(math.log(table[-1]), math.log(table[0]), steps)))


def polyexponential(
    table: np.ndarray, steps: int, family: Any = None, rho: float = POLYEXPONENTIAL_RHO
) -> np.ndarray:
    """k-diffusion's polyexponential schedule (at A1111's default rho 1 it is the exponential one)."""
    ramp = np.linspace(1, 0, steps) ** rho
    low, high = math.log(table[0]), math.log(table[-1])
    return _with_zero(np.exp(ramp * (high - low) + low))


def kl_optimal(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """The KL-optimal schedule (evenly spaced in arctan(sigma)); ends at the smallest sigma, not 0."""
    low, high = math.atan(table[0]), math.atan(table[-1])
    fraction = np.arange(steps + 1) / steps
    return np.tan(fraction * low + (1 - fraction) * high)


def align_your_steps(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """NVIDIA's Align Your Steps sigmas for the family, interpolated in log space to `steps`."""
    resolution = getattr(family, "native_resolution", 0) or 0
    published = np.asarray(AYS_SDXL if resolution >= AYS_SDXL_RESOLUTION else AYS_SD15)
    if steps == len(published):
        return _with_zero(published)
    spots = np.linspace(0, 1, steps)
    log_sigmas = np.interp(spots, np.linspace(0, 1, len(published)), np.log(published[::-1]))
    return _with_zero(np.exp(log_sigmas)[::-1])


def beta(table: np.ndarray, steps: int, family: Any = None) -> np.ndarray:
    """Lee et al.'s Beta schedule: sigmas at the quantiles of a Beta(0.6, 0.6) distribution."""
    from scipy import stats

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), BETA_ALPHA, BETA_BETA)
    return _with_zero(table[0] + quantiles * (table[-1] - table[0]))


# A1111's schedule names (`modules/sd_schedulers.py`) -> how it computes their sigmas.
SIGMA_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "automatic": uniform,
    "uniform": uniform,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "simple": simple,
    "normal": uniform,
    "ddim": ddim,
    "beta": beta,
}


def schedule_sigmas(
    name: str, table: np.ndarray, steps: int, family: Any = None, *, discard_penultimate: bool = False
) -> np.ndarray:
    """The sigmas A1111 steps through for a schedule type: `steps + 1` values, from the highest.

    Args:
        name: the schedule's internal name ("karras", "sgm_uniform", ...; a key of `SIGMA_FUNCTIONS`).
        table: the model's training sigmas (`training_sigmas`), ascending.
        steps: sampling steps.
        family: the model's family (Align Your Steps picks its list by it); None: SD 1.5's.
        discard_penultimate: make `steps + 1` steps' sigmas and drop the next-to-last one, as A1111 does
            for DPM2 and DPM2 a (`discard_next_to_last_sigma`).

    Raises:
        ValueError: for a name A1111 does not have, or fewer than one step.
    """
    if name not in SIGMA_FUNCTIONS:
        raise ValueError(f"unknown schedule {name!r}; schedules: {', '.join(SIGMA_FUNCTIONS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    function = SIGMA_FUNCTIONS[name]
    if not discard_penultimate:
        return function(table, steps, family)
    longer = function(table, steps + 1, family)
    return np.concatenate([longer[:-2], longer[-1:]])


def sigma_to_t(table: np.ndarray, sigmas: Any) -> np.ndarray:
    """The (fractional) timesteps of sigmas, the inverse of `t_to_sigma` (log-space interpolation)."""
    return np.interp(np.log(np.asarray(sigmas, dtype=np.float64)), np.log(table), np.arange(len(table)))
