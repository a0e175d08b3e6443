"""AUTOMATIC1111 sampler and schedule names, and the diffusers schedulers that run them.

A1111 names a sampling method by two things: the sampler ("Euler a", "DPM++ 2M", ...) and, since
1.9, a schedule type ("Automatic", "Karras", ...). Older infotexts and API clients glue the two into
one name ("DPM++ 2M Karras"); `split_legacy_name` splits those. `SAMPLERS` and `SCHEDULES` are A1111's
full lists in its order (`modules/sd_samplers_*.py`, `modules/sd_schedulers.py`).

`choose` turns the names a request gives into a `SamplerChoice`, never failing on a name: as A1111's
`get_sampler_and_scheduler` does, an unknown sampler falls back to its first one (DPM++ 2M) and an
unknown schedule type to Automatic; a legacy name's schedule wins over the schedule type. Automatic
is the sampler's own default schedule (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, ...).
Where diffusers has no scheduler for A1111's algorithm, the nearest one runs instead (`Substitute`).
Every fallback and substitution is a `SamplerNote`, which generation writes into the infotext
(`Sampler substitution: ...`) and the API into `info["warnings"]`.

How the schedule reaches diffusers: A1111's k-diffusion samplers step through the sigmas their schedule
type picks (`nbkit.generation.schedules`, computed from the model's own training sigmas as A1111
computes them). The diffusers scheduler is built `from_config` of the model's scheduler config (the
betas, `prediction_type` (v-prediction for SD 2.x 768-v) and the rest stay the model's) and given
those sigmas: through its Karras hook where it has one (Euler, LMS, Heun, DPM2, DPM2 a, DPM++ 2M,
DPM++ SDE, ...), as its sigmas and timesteps after `set_timesteps` otherwise (Euler a), and as LCM's
timesteps for LCM. A1111's timestep samplers (DDIM, PLMS, UniPC) ignore the schedule type, in A1111
as here: they run A1111's timesteps through the diffusers scheduler's own spacing options.

A flow-matching family (`Family.flow_matching`: FLUX.1, Z-Image, FLUX.2) runs diffusers'
FlowMatchEulerDiscreteScheduler (`FLOW_SAMPLERS`: "Euler") with the schedule types of
`FLOW_SCHEDULES` ("Simple", which "Automatic" means, as Forge's default for these models, "Karras",
"Exponential", "Beta"). Forge runs its other samplers on such models too; nbkit runs them as Euler, and
its other schedule types as Simple, each with a substitution note. `sampler_tables` gives the tables a
family takes.

`list_samplers` and `list_schedulers` return what A1111's `/sdapi/v1/samplers` and
`/sdapi/v1/schedulers` return. Nothing here imports torch or diffusers until a scheduler is built, so
the infotext parser and the web UI's lists stay cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from typing import Any, Literal

from nbkit.families import Family
from nbkit.generation import schedules as a1111_schedules
from nbkit.generation.placement import as_family

# The sigma-schedule switches of diffusers' k-diffusion-style schedulers; every built scheduler sets
# all of them (those its class has), so a flag in the model's config never leaks into another schedule.
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# What DPM++ SDE runs when torchsde (its Brownian noise) is not installed.
SDE_WITHOUT_TORCHSDE = "DPM++ 2M SDE"


@dataclasses.dataclass(frozen=True)
class Substitute:
    """What runs for an A1111 sampler diffusers has no scheduler for.

    Args:
        reason: why A1111's algorithm cannot run, for the note.
        sampler: the A1111 sampler run in its place (the infotext then names it); None: the entry's
            own `scheduler_class` and `config` are the stand-in, and the infotext keeps A1111's name.
    """

    reason: str
    sampler: str | None = None


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One A1111 sampler and the diffusers scheduler that runs it.

    Args:
        name: A1111's name, e.g. "DPM++ 2M".
        scheduler_class: the diffusers class name.
        aliases: A1111's other names for it (`k_dpmpp_2m`).
        config: overrides applied on top of the model's scheduler config.
        default_schedule: the schedule label A1111's "Automatic" picks for it (None: Automatic's own
            evenly spaced timesteps).
        options: A1111's sampler options, as its API lists them.
        requires: a Python package the scheduler needs beyond diffusers.
        follows_schedule: False for the samplers A1111 runs on their own timesteps whatever the
            schedule type (DDIM, PLMS, UniPC, DPM fast, DPM adaptive).
        discard_penultimate: A1111 drops the next-to-last sigma of its schedule (DPM2, DPM2 a).
        substitute: what runs instead, where diffusers cannot run A1111's algorithm (None: it can).
    """

    name: str
    scheduler_class: str
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_schedule: str | None = None
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    requires: str | None = None
    follows_schedule: bool = True
    discard_penultimate: bool = False
    substitute: Substitute | None = None

    @property
    def available(self) -> bool:
        """False when the package the scheduler needs is not installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def describe(self) -> str:
        """The diffusers scheduler and settings it runs, e.g. `DPMSolverMultistepScheduler(solver_order=2)`."""
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"diffusers' {self.scheduler_class}({settings})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One A1111 schedule type.

    Args:
        name: A1111's internal name, e.g. "karras" (for the SD tables, a key of
            `nbkit.generation.schedules.SIGMA_FUNCTIONS`).
        label: the name A1111 shows and writes into infotexts, e.g. "Karras".
        aliases: other accepted spellings.
        config: the diffusers flags it sets (the flow-matching tables; the SD ones compute sigmas).
        default_rho: A1111's rho for it (-1 when it has none), listed by the API.
        need_inner_model: as A1111's API lists it.
        requires: a Python package computing it needs (Beta: scipy).
    """

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_rho: float = -1.0
    need_inner_model: bool = False
    requires: str | None = None

    @property
    def available(self) -> bool:
        """False when the package computing it needs is not installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


@dataclasses.dataclass(frozen=True)
class SamplerNote:
    """A fallback or substitution made for a request's sampler or schedule type.

    Args:
        kind: `fallback` (an unknown name, replaced as A1111 does) or `substitution` (a name A1111 has
            whose algorithm diffusers cannot run, run as the nearest one).
        field: `Sampler` or `Schedule type`, the infotext key it is about.
        text: what was asked and what ran instead.
    """

    kind: Literal["fallback", "substitution"]
    field: Literal["Sampler", "Schedule type"]
    text: str

    @property
    def key(self) -> str:
        """The infotext key it is written under, e.g. `Sampler substitution`."""
        return f"{self.field} {self.kind}"

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"


# DPM fast's and DPM adaptive's stand-in: diffusers' singlestep third-order DPM-Solver++ over the
# log-SNR range from the largest to the smallest training sigma.
_DPM_SOLVER_STAND_IN = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 3,
    "lower_order_final": True,
    "use_exponential_sigmas": True,
    "final_sigmas_type": "sigma_min",
}

# In A1111's order: k-diffusion samplers, then the timestep ones, then LCM.
SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler(
            "DPM++ 2M",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_2m",),
            config={"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
            default_schedule="Karras",
            options={"scheduler": "karras"},
        ),
        Sampler(
            "DPM++ SDE",
            "DPMSolverSDEScheduler",
            aliases=("k_dpmpp_sde",),
            default_schedule="Karras",
            options={"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
            requires="torchsde",
        ),
        Sampler(
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_2m_sde",),
            config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
            default_schedule="Exponential",
            options={"scheduler": "exponential", "brownian_noise": "True"},
        ),
        Sampler(
            "DPM++ 2M SDE Heun",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_2m_sde_heun",),
            config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
            default_schedule="Exponential",
            options={"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"},
        ),
        Sampler(
            "DPM++ 2S a",
            "KDPM2AncestralDiscreteScheduler",
            aliases=("k_dpmpp_2s_a",),
            default_schedule="Karras",
            options={"scheduler": "karras", "uses_ensd": "True", "second_order": "True"},
            substitute=Substitute(
                "diffusers has no ancestral DPM++ 2S; DPM2 a takes the same two-call ancestral steps",
                "DPM2 a",
            ),
        ),
        Sampler(
            "DPM++ 3M SDE",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_3m_sde",),
            default_schedule="Exponential",
            options={
                "scheduler": "exponential",
                "discard_next_to_last_sigma": "True",
                "brownian_noise": "True",
            },
            discard_penultimate=True,
            substitute=Substitute(
                "diffusers' third-order SDE DPM-Solver++ update (solver_order=3) has a wrong second-"
                "difference term, so it is less accurate than the second-order one",
                "DPM++ 2M SDE",
            ),
        ),
        Sampler(
            "Euler a",
            "EulerAncestralDiscreteScheduler",
            ("k_euler_a", "k_euler_ancestral"),
            options={"uses_ensd": "True"},
        ),
        Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
        Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
        Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",), options={"second_order": "True"}),
        Sampler(
            "DPM2",
            "KDPM2DiscreteScheduler",
            aliases=("k_dpm_2",),
            default_schedule="Karras",
            options={"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"},
            discard_penultimate=True,
        ),
        Sampler(
            "DPM2 a",
            "KDPM2AncestralDiscreteScheduler",
            aliases=("k_dpm_2_a",),
            default_schedule="Karras",
            options={
                "scheduler": "karras",
                "discard_next_to_last_sigma": "True",
                "uses_ensd": "True",
                "second_order": "True",
            },
            discard_penultimate=True,
        ),
        # DPM fast and DPM adaptive are the original (noise-prediction) DPM-Solver stepping in log-SNR
        # from the largest to the smallest training sigma, whatever the schedule type. diffusers
        # deprecates its noise-prediction variant ("dpmsolver"); the stand-in is DPM-Solver++.
        Sampler(
            "DPM fast",
            "DPMSolverSinglestepScheduler",
            aliases=("k_dpm_fast",),
            config=_DPM_SOLVER_STAND_IN,
            options={"uses_ensd": "True"},
            follows_schedule=False,
            substitute=Substitute(
                "diffusers has no DPM-Solver-fast; its singlestep third-order DPM-Solver++ takes the same "
                "log-SNR steps, without A1111's eta noise"
            ),
        ),
        Sampler(
            "DPM adaptive",
            "DPMSolverSinglestepScheduler",
            aliases=("k_dpm_ad",),
            config=_DPM_SOLVER_STAND_IN,
            options={"uses_ensd": "True"},
            follows_schedule=False,
            substitute=Substitute(
                "diffusers has no adaptive-step DPM-Solver; its singlestep third-order DPM-Solver++ runs "
                "the steps asked, over the same log-SNR range, without A1111's eta noise"
            ),
        ),
        Sampler(
            "Restart",
            "HeunDiscreteScheduler",
            aliases=("restart",),
            default_schedule="Karras",
            options={"scheduler": "karras", "second_order": "True"},
            substitute=Substitute(
                "diffusers has no Restart sampler; Heun is its inner solver (the same below 20 steps, "
                "where A1111 adds no restarts)",
                "Heun",
            ),
        ),
        # A1111's timestep samplers step through timesteps 1, 1 + s, ... (s = 1000 // steps): diffusers'
        # "leading" spacing with offset 1; the last step lands on the first training alpha.
        Sampler(
            "DDIM",
            "DDIMScheduler",
            aliases=("ddim",),
            config={"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
            follows_schedule=False,
        ),
        Sampler(
            "DDIM CFG++",
            "DDIMScheduler",
            aliases=("ddim_cfgpp",),
            follows_schedule=False,
            substitute=Substitute(
                "diffusers has no CFG++ guidance (the unconditional noise in the DDIM step, CFG divided "
                "by 12.5); plain DDIM runs at the CFG scale given",
                "DDIM",
            ),
        ),
        # PLMS is PNDM without its Runge-Kutta warm-up steps.
        Sampler(
            "PLMS",
            "PNDMScheduler",
            aliases=("plms",),
            config={
                "skip_prk_steps": True,
                "timestep_spacing": "leading",
                "steps_offset": 1,
                "set_alpha_to_one": False,
            },
            follows_schedule=False,
        ),
        # A1111's UniPC defaults: variant bh1, order 3 with lower orders at the end, timesteps evenly
        # spaced from the last to the first training timestep.
        Sampler(
            "UniPC",
            "UniPCMultistepScheduler",
            aliases=("unipc",),
            config={
                "solver_type": "bh1",
                "solver_order": 3,
                "lower_order_final": True,
                "predict_x0": True,
                "timestep_spacing": "linspace",
                "final_sigmas_type": "sigma_min",
            },
            follows_schedule=False,
        ),
        Sampler("LCM", "LCMScheduler", aliases=("k_lcm",)),
    )
}
FIRST_SAMPLER = next(iter(SAMPLERS))  # what A1111 falls back to for an unknown sampler

SCHEDULES: dict[str, Schedule] = {
    schedule.label: schedule
    for schedule in (
        Schedule("automatic", "Automatic"),
        Schedule("uniform", "Uniform", need_inner_model=True),
        Schedule("karras", "Karras", default_rho=7.0),
        Schedule("exponential", "Exponential"),
        Schedule("polyexponential", "Polyexponential", default_rho=1.0),
        Schedule("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
        Schedule("kl_optimal", "KL Optimal"),
        Schedule("align_your_steps", "Align Your Steps"),
        Schedule("simple", "Simple", need_inner_model=True),
        Schedule("normal", "Normal", need_inner_model=True),
        Schedule("ddim", "DDIM", need_inner_model=True),
        Schedule("beta", "Beta", need_inner_model=True, requires="scipy"),
    )
}

# diffusers class -> A1111 sampler, for schedulers a model ships with (the reverse of SAMPLERS).
SAMPLER_NAMES = {
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "FlowMatchEulerDiscreteScheduler": "Euler",
}

# The flow-matching samplers FluxPipeline runs. diffusers' FlowMatchHeunDiscreteScheduler is left out:
# it takes no custom sigmas, which FluxPipeline always passes, so it fails on the first step. Its
# FlowMatchEulerDiscreteScheduler with `stochastic_sampling` ("Euler a") is left out too: it draws its
# noise without the request's generator, so a seed would not give the same image twice.
FLOW_SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (Sampler("Euler", "FlowMatchEulerDiscreteScheduler", aliases=("k_euler", "flow_euler")),)
}
FLOW_SAMPLER = "Euler"
# "Simple" is the model's own shifted sigmas (Forge's default for Flux).
FLOW_SCHEDULES: dict[str, Schedule] = {
    schedule.label: schedule
    for schedule in (
        Schedule("automatic", "Automatic"),
        Schedule("simple", "Simple", need_inner_model=True),
        Schedule("karras", "Karras", config={"use_karras_sigmas": True}, default_rho=7.0),
        Schedule("exponential", "Exponential", config={"use_exponential_sigmas": True}),
        Schedule("beta", "Beta", config={"use_beta_sigmas": True}, requires="scipy"),
    )
}
FLOW_AUTOMATIC = "Simple"


def sampler_tables(family: Family | str | None) -> tuple[dict[str, Sampler], dict[str, Schedule]]:
    """The samplers and schedule types a family's models take (None: an SD family's).

    Args:
        family: the model's family, or its registry name.
    """
    if family is not None and as_family(family).flow_matching:
        return FLOW_SAMPLERS, FLOW_SCHEDULES
    return SAMPLERS, SCHEDULES


def _lookup(table: dict[str, Any], name: str, fields: tuple[str, ...]) -> Any:
    wanted = name.strip().casefold()
    for entry in table.values():
        names = [getattr(entry, field) for field in fields] + list(entry.aliases)
        if wanted in (candidate.casefold() for candidate in names):
            return entry
    return None


def find_sampler(name: str) -> Sampler | None:
    """The sampler called `name` (its A1111 name or an alias, any case), or None."""
    return _lookup(SAMPLERS, name, ("name",))


def find_schedule(name: str) -> Schedule | None:
    """The schedule called `name` (its label, name or an alias, any case), or None."""
    return _lookup(SCHEDULES, name, ("label", "name"))


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """Split a pre-1.9 A1111 sampler name into (sampler, schedule label), e.g. "DPM++ 2M Karras".

    A name that is a sampler as it stands, or has no schedule suffix, comes back with None. As A1111
    does, the suffix is split off whatever precedes it ("Foo Karras" gives ("Foo", "Karras")); unlike
    A1111, the longest matching suffix wins ("Euler SGM Uniform" is SGM Uniform, not Uniform).

    Args:
        name: the sampler name as written in an infotext or sent by an API client.
    """
    stripped = name.strip()
    if find_sampler(stripped) is not None:
        return stripped, None
    suffixes = [
        (option, schedule.label)
        for schedule in SCHEDULES.values()
        for option in (schedule.label, schedule.name, *schedule.aliases)
        if stripped.casefold().endswith(" " + option.casefold())
    ]
    if not suffixes:
        return stripped, None
    option, label = max(suffixes, key=lambda suffix: len(suffix[0]))
    return stripped[: -len(option) - 1].strip(), label


@dataclasses.dataclass(frozen=True)
class SamplerChoice:
    """The sampler and schedule a request runs, and the notes on how its names were read.

    Args:
        sampler: the A1111 sampler the infotext names: the one asked for, A1111's fallback for an
            unknown name, or the A1111 sampler that runs in its place (`Substitute.sampler`).
        schedule: the schedule type the infotext names ("Automatic" resolved to the sampler's
            default where it has one).
        notes: the fallbacks and substitutions made, in order.
        family: the model's family (None: an SD family).
    """

    sampler: Sampler
    schedule: Schedule
    notes: tuple[SamplerNote, ...] = ()
    family: Family | None = None

    @property
    def warnings(self) -> list[str]:
        """The notes as lines (`Sampler substitution: ...`), for an API response's `info`."""
        return [str(note) for note in self.notes]

    def infotext_pairs(self) -> dict[str, str]:
        """The notes as infotext `Key: value` pairs (`{"Sampler substitution": "..."}`)."""
        return {note.key: note.text for note in self.notes}

    def build(self, config: Any) -> Any:
        """A new diffusers scheduler running this choice, from a model's scheduler config.

        Args:
            config: the model's scheduler config (`pipeline.scheduler.config`) or the scheduler itself.
        """
        return _build(self, getattr(config, "config", config))


def _schedule_name(schedule: str | None) -> str:
    return schedule.strip() if isinstance(schedule, str) and schedule.strip() else "Automatic"


def _check_names(sampler: Any, schedule: Any) -> None:
    if not isinstance(sampler, str):
        raise ValueError(f"sampler must be a sampler name (a string), got {sampler!r}")
    if schedule is not None and not isinstance(schedule, str):
        raise ValueError(f"schedule must be a schedule type (a string) or None, got {schedule!r}")


def _legacy_schedule(
    sampler: str, suffix: str | None, asked: Schedule | None, asked_name: str
) -> tuple[str | None, list[SamplerNote]]:
    """The schedule label a legacy sampler name's suffix sets (it wins, as in A1111), with a note
    when it overrides a schedule type that was asked for."""
    if suffix is None:
        return None, []
    if asked is None or asked.label in ("Automatic", suffix):
        return suffix, []
    text = f"sampler {sampler!r} names the {suffix} schedule, which A1111 takes over schedule type {asked_name!r}"
    return suffix, [SamplerNote("fallback", "Schedule type", text)]


def _choose_sd(sampler: str, schedule: str | None) -> SamplerChoice:
    notes: list[SamplerNote] = []
    base, suffix = split_legacy_name(sampler)
    found = find_sampler(base) if base else SAMPLERS[FIRST_SAMPLER]
    if found is None:
        found = SAMPLERS[FIRST_SAMPLER]
        text = f"unknown sampler {base!r}; ran {found.name}, A1111's first sampler"
        notes.append(SamplerNote("fallback", "Sampler", text))
    asked_name = _schedule_name(schedule)
    asked = find_schedule(asked_name)
    if asked is None:
        notes.append(
            SamplerNote("fallback", "Schedule type", f"unknown schedule type {asked_name!r}; ran Automatic")
        )
    label, legacy_notes = _legacy_schedule(sampler.strip(), suffix, asked, asked_name)
    notes += legacy_notes
    chosen = SCHEDULES[label] if label else asked or SCHEDULES["Automatic"]
    if chosen.label == "Automatic" and found.default_schedule is not None:
        chosen = SCHEDULES[found.default_schedule]
    runs = found
    if found.substitute is not None:
        target = found.substitute.sampler
        runs = SAMPLERS[target] if target else found
        what = target or runs.describe()
        notes.append(
            SamplerNote("substitution", "Sampler", f"{found.name} ran as {what}: {found.substitute.reason}")
        )
    if not runs.available:
        text = (
            f"{runs.name} ran as {SDE_WITHOUT_TORCHSDE}: it needs the Python package {runs.requires}, "
            f"which is not installed (pip install {runs.requires})"
        )
        notes.append(SamplerNote("substitution", "Sampler", text))
        runs = SAMPLERS[SDE_WITHOUT_TORCHSDE]
    if not chosen.available:
        text = (
            f"{chosen.label} ran as Automatic: it needs the Python package {chosen.requires}, which is "
            f"not installed (pip install {chosen.requires})"
        )
        notes.append(SamplerNote("substitution", "Schedule type", text))
        default = runs.default_schedule or "Automatic"
        chosen = SCHEDULES[default]
    return SamplerChoice(runs, chosen, tuple(notes))


def _choose_flow(sampler: str, schedule: str | None, family: Family) -> SamplerChoice:
    title = family.title
    notes: list[SamplerNote] = []
    base, suffix = split_legacy_name(sampler)
    found = _lookup(FLOW_SAMPLERS, base, ("name",)) if base else FLOW_SAMPLERS[FLOW_SAMPLER]
    if found is None:
        found = FLOW_SAMPLERS[FLOW_SAMPLER]
        if find_sampler(base) is not None:
            reason = (
                f"nbkit runs {title} models (flow matching) with diffusers' flow-matching Euler "
                f"(FlowMatchEulerDiscreteScheduler) only"
            )
            notes.append(
                SamplerNote(
                    "substitution", "Sampler", f"{find_sampler(base).name} ran as {found.name}: {reason}"
                )
            )
        else:
            text = f"unknown sampler {base!r}; ran {found.name}, the sampler of {title} models"
            notes.append(SamplerNote("fallback", "Sampler", text))
    asked_name = _schedule_name(schedule)
    label, legacy_notes = _legacy_schedule(sampler.strip(), suffix, find_schedule(asked_name), asked_name)
    notes += legacy_notes
    wanted = label or asked_name
    chosen = _lookup(FLOW_SCHEDULES, wanted, ("label", "name"))
    if chosen is None or not chosen.available:
        known = find_schedule(wanted)
        chosen = FLOW_SCHEDULES[FLOW_AUTOMATIC]
        if known is None:
            text = f"unknown schedule type {wanted!r}; ran Automatic ({chosen.label})"
            notes.append(SamplerNote("fallback", "Schedule type", text))
        else:
            usable = ", ".join(label for label, other in FLOW_SCHEDULES.items() if other.available)
            text = f"{known.label} ran as {chosen.label}: {title} models take the schedule types {usable}"
            notes.append(SamplerNote("substitution", "Schedule type", text))
    if chosen.label == "Automatic":
        chosen = FLOW_SCHEDULES[FLOW_AUTOMATIC]
    return SamplerChoice(found, chosen, tuple(notes), family)


def choose(
    sampler: str, schedule: str | None = "Automatic", family: Family | str | None = None
) -> SamplerChoice:
    """The sampler and schedule A1111 would run for these names, and how they were read.

    Never fails on a name: unknown ones fall back as A1111's do, names diffusers cannot run are
    substituted, each with a `SamplerNote`. Legacy combined names ("DPM++ 2M Karras") are split;
    "Automatic" (or None, or "") becomes the sampler's default schedule where A1111 gives it one (for
    a flow-matching model: "Simple").

    Args:
        sampler: an A1111 sampler name or alias, or a legacy combined name ("" : A1111's first sampler).
        schedule: an A1111 schedule type (label or name, any case); None means "Automatic".
        family: the model's family (or its name); a flow-matching one runs `FLOW_SAMPLERS`.

    Raises:
        ValueError: when `sampler` is not a string, or `schedule` neither a string nor None.
    """
    _check_names(sampler, schedule)
    if family is not None and as_family(family).flow_matching:
        return _choose_flow(sampler, schedule, as_family(family))
    choice = _choose_sd(sampler, schedule)
    return dataclasses.replace(choice, family=as_family(family) if family is not None else None)


def resolve(
    sampler: str, schedule: str | None = "Automatic", family: Family | str | None = None
) -> tuple[Sampler, Schedule]:
    """The sampler and concrete schedule the infotext names for these names (`choose`, without notes).

    Args:
        sampler: an A1111 sampler name or alias, or a legacy combined name.
        schedule: an A1111 schedule type (label or name, any case); None means "Automatic".
        family: the model's family (or its name).
    """
    choice = choose(sampler, schedule, family)
    return choice.sampler, choice.schedule


def _scheduler_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def _runs(choice: SamplerChoice) -> Sampler:
    """The table entry whose diffusers scheduler and settings run (a stand-in keeps A1111's name)."""
    substitute = choice.sampler.substitute
    return (
        choice.sampler if substitute is None or substitute.sampler is None else SAMPLERS[substitute.sampler]
    )


def _build(choice: SamplerChoice, config: Any) -> Any:
    runs = _runs(choice)
    cls = _scheduler_class(runs.scheduler_class)
    accepted = inspect.signature(cls.__init__).parameters
    overrides: dict[str, Any] = {flag: False for flag in SIGMA_FLAGS if flag in accepted}
    overrides.update(runs.config)
    if choice.family is not None and choice.family.flow_matching:
        overrides.update(choice.schedule.config)
        return cls.from_config(config, **overrides)
    if not runs.follows_schedule:
        return cls.from_config(config, **overrides)
    hooked = "use_karras_sigmas" in accepted
    if hooked:
        overrides["use_karras_sigmas"] = True  # the Karras hook is where A1111's sigmas go in
    if choice.schedule.name == "kl_optimal" and "final_sigmas_type" in accepted:
        overrides["final_sigmas_type"] = "sigma_min"  # it ends at the smallest sigma, not at 0
    scheduler = cls.from_config(config, **overrides)
    sigmas = _SigmaSource(choice.schedule.name, choice.family, runs.discard_penultimate)
    if hooked:
        _install_through_karras_hook(scheduler, sigmas)
    elif "original_inference_steps" in scheduler.config:
        _install_as_lcm_timesteps(scheduler, sigmas)
    else:
        _install_after_set_timesteps(scheduler, sigmas)
    return scheduler


@dataclasses.dataclass(frozen=True)
class _SigmaSource:
    """A1111's sigmas for a schedule (`nbkit.generation.schedules.schedule_sigmas`)."""

    name: str
    family: Family | None
    discard_penultimate: bool

    def __call__(self, table: Any, steps: int) -> Any:
        return a1111_schedules.schedule_sigmas(
            self.name, table, steps, self.family, discard_penultimate=self.discard_penultimate
        )


def _install_through_karras_hook(scheduler: Any, sigmas: _SigmaSource) -> None:
    """Give A1111's sigmas to a scheduler with diffusers' Karras option: its `set_timesteps` asks
    `_convert_to_karras` for the step sigmas and derives its timesteps and inner state from them."""
    table = a1111_schedules.training_sigmas(scheduler.alphas_cumprod)

    def convert(in_sigmas: Any = None, num_inference_steps: int | None = None) -> Any:
        steps = num_inference_steps or scheduler.num_inference_steps
        return sigmas(table, steps)[:-1]  # the scheduler appends the final sigma itself

    scheduler._convert_to_karras = convert


def _install_after_set_timesteps(scheduler: Any, sigmas: _SigmaSource) -> None:
    """Give A1111's sigmas to a scheduler without a Karras option (Euler a): after its own
    `set_timesteps`, its sigmas and timesteps are replaced (all its steps read)."""
    import numpy as np
    import torch

    table = a1111_schedules.training_sigmas(scheduler.alphas_cumprod)
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device: Any = None, **kwargs: Any) -> None:
        original(num_inference_steps, device=device, **kwargs)
        values = sigmas(table, num_inference_steps)
        timesteps = a1111_schedules.sigma_to_t(table, values[:-1])
        scheduler.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device)
        scheduler.sigmas = torch.from_numpy(values.astype(np.float32))

    scheduler.set_timesteps = set_timesteps


def _install_as_lcm_timesteps(scheduler: Any, sigmas: _SigmaSource) -> None:
    """Give A1111's sigmas to LCMScheduler: A1111's LCM takes them from the 50 timesteps LCM was
    distilled on (19, 39, ..., 999) and calls the model at the nearest of those; here they become
    LCMScheduler's custom timesteps."""
    import numpy as np

    config = scheduler.config
    stride = config.num_train_timesteps // config.original_inference_steps
    grid = np.arange(1, config.original_inference_steps + 1) * stride - 1
    table = a1111_schedules.training_sigmas(scheduler.alphas_cumprod)[grid]
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        values = sigmas(table, num_inference_steps)[:-1]
        nearest = np.abs(np.log(values)[:, None] - np.log(table)[None, :]).argmin(axis=1)
        # More steps than LCM's 50 timesteps would repeat some; LCMScheduler takes each once.
        timesteps = [int(t) for t in np.unique(grid[nearest])[::-1]]
        original(device=device, timesteps=timesteps, **kwargs)

    scheduler.set_timesteps = set_timesteps


def build_scheduler(
    config: Any, sampler: str, schedule: str | None = "Automatic", family: Family | str | None = None
) -> Any:
    """A new diffusers scheduler for A1111 names, built from a model's scheduler config (`choose`, then
    `SamplerChoice.build`).

    Args:
        config: the model's scheduler config (`pipeline.scheduler.config`) or the scheduler itself.
        sampler: an A1111 sampler name or alias, or a legacy combined name ("DPM++ 2M Karras").
        schedule: an A1111 schedule type; "Automatic" (or None) as A1111 means it.
        family: the model's family or its name (a flow-matching one runs the flow-matching samplers).
    """
    return choose(sampler, schedule, family).build(config)


def sampler_name(scheduler: Any) -> str:
    """The A1111 sampler name for a diffusers scheduler (its class name when A1111 has none).

    Args:
        scheduler: a diffusers scheduler instance.
    """
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler" and "sde" in str(scheduler.config.get("algorithm_type", "")):
        return "DPM++ 2M SDE"
    return SAMPLER_NAMES.get(name, name)


def schedule_label(scheduler: Any) -> str | None:
    """The A1111 schedule type a model's own diffusers scheduler follows, or None for its plain one.

    Args:
        scheduler: a diffusers scheduler instance (as a model ships it, not one `build_scheduler` made).
    """
    config = scheduler.config
    if config.get("use_karras_sigmas"):
        return "Karras"
    if config.get("use_exponential_sigmas"):
        return "Exponential"
    if config.get("use_beta_sigmas"):
        return "Beta"
    if config.get("timestep_spacing") == "trailing":
        return "SGM Uniform"
    return None


def list_samplers() -> list[dict[str, Any]]:
    """The samplers as A1111's `GET /sdapi/v1/samplers` lists them: `{name, aliases, options}`, all of
    A1111's in its order (those that run substituted too, as `choose` notes)."""
    return [
        {"name": sampler.name, "aliases": list(sampler.aliases), "options": dict(sampler.options)}
        for sampler in SAMPLERS.values()
    ]


def list_schedulers() -> list[dict[str, Any]]:
    """The schedule types as A1111's `GET /sdapi/v1/schedulers` lists them, in its order."""
    return [
        {
            "name": schedule.name,
            "label": schedule.label,
            "aliases": list(schedule.aliases) or None,
            "default_rho": schedule.default_rho,
            "need_inner_model": schedule.need_inner_model,
        }
        for schedule in SCHEDULES.values()
    ]
