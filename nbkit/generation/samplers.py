"""AUTOMATIC1111 sampler and schedule names, and the diffusers schedulers they stand for.

A1111 names a sampling method by two things: the sampler ("Euler a", "DPM++ 2M", ...) and, since
1.9, a schedule type ("Automatic", "Karras", ...). Older infotexts and API clients glue the two into
one name ("DPM++ 2M Karras"); `resolve` splits those. `build_scheduler` makes the diffusers scheduler
`from_config` of the model's own scheduler config, so the betas, `prediction_type` (v-prediction for
SD 2.x 768-v), `steps_offset` and the rest stay the model's, and only the algorithm and the sigma
schedule change. "Automatic" is what A1111 means by it: the sampler's own default schedule (Karras
for DPM++ 2M and DPM++ SDE, Exponential for DPM++ 2M SDE), otherwise the model's plain schedule.

A flow-matching family (`Family.flow_matching`, FLUX.1) takes only the flow-matching samplers
(`FLOW_SAMPLERS`: "Euler", diffusers' FlowMatchEulerDiscreteScheduler) and their schedule types
(`FLOW_SCHEDULES`: "Simple", which "Automatic" means, as Forge's default for Flux, plus "Karras",
"Exponential" and "Beta" sigmas); pass the model's family to `resolve` and `build_scheduler`. An SD
sampler on such a model is a ValueError that lists the ones that work. `sampler_tables` gives the
tables a family takes.

`list_samplers` and `list_schedulers` return what A1111's `/sdapi/v1/samplers` and
`/sdapi/v1/schedulers` return. This module imports neither torch nor diffusers until a scheduler is
built, so the infotext parser and the web UI's lists stay cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from typing import Any

from nbkit.errors import NbkitError
from nbkit.families import Family
from nbkit.generation.placement import as_family

# The sigma-schedule switches of diffusers' k-diffusion-style schedulers; a schedule sets all of them
# (those the class has) so a flag in the model's config never leaks into another schedule.
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One A1111 sampler and the diffusers scheduler that implements it.

    Args:
        name: A1111's name, e.g. "DPM++ 2M".
        scheduler_class: the diffusers class name.
        aliases: A1111's other names for it (`k_dpmpp_2m`).
        config: overrides applied on top of the model's scheduler config.
        default_schedule: the schedule A1111's "Automatic" picks for it (None: the model's own).
        options: A1111's sampler options, as its API lists them.
        requires: a Python package the scheduler needs beyond diffusers.
    """

    name: str
    scheduler_class: str
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_schedule: str | None = None
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    requires: str | None = None

    @property
    def available(self) -> bool:
        """False when the package the scheduler needs is not installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One A1111 schedule type and the diffusers config it sets.

    Args:
        name: A1111's internal name, e.g. "karras".
        label: the name A1111 shows and writes into infotexts, e.g. "Karras".
        aliases: other accepted spellings.
        config: the flags it sets; `SIGMA_FLAGS` it does not name are switched off.
        default_rho: A1111's rho for it (-1 when it has none), listed by the API.
        need_inner_model: as A1111's API lists it.
    """

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_rho: float = -1.0
    need_inner_model: bool = False


# In A1111's order (k-diffusion samplers first, then the timestep ones).
SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler(
            "DPM++ 2M",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_2m",),
            config={"algorithm_type": "dpmsolver++", "solver_order": 2},
            default_schedule="Karras",
            options={"scheduler": "karras"},
        ),
        Sampler(
            "DPM++ SDE",
            "DPMSolverSDEScheduler",
            aliases=("k_dpmpp_sde",),
            default_schedule="Karras",
            options={"second_order": "True", "brownian_noise": "True", "scheduler": "karras"},
            requires="torchsde",
        ),
        Sampler(
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            aliases=("k_dpmpp_2m_sde",),
            config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            default_schedule="Exponential",
            options={"brownian_noise": "True", "scheduler": "exponential"},
        ),
        Sampler(
            "Euler a",
            "EulerAncestralDiscreteScheduler",
            aliases=("k_euler_a", "k_euler_ancestral"),
            options={"uses_ensd": "True"},
        ),
        Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
        Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
        Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",), options={"second_order": "True"}),
        Sampler(
            "DPM2",
            "KDPM2DiscreteScheduler",
            aliases=("k_dpm_2",),
            options={"discard_next_to_last_sigma": "True", "second_order": "True"},
        ),
        Sampler(
            "DPM2 a",
            "KDPM2AncestralDiscreteScheduler",
            aliases=("k_dpm_2_a",),
            options={"discard_next_to_last_sigma": "True", "uses_ensd": "True", "second_order": "True"},
        ),
        Sampler("DDIM", "DDIMScheduler", aliases=("ddim",)),
        # PLMS is PNDM without its Runge-Kutta warm-up steps.
        Sampler("PLMS", "PNDMScheduler", aliases=("plms",), config={"skip_prk_steps": True}),
        Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
        Sampler("LCM", "LCMScheduler", aliases=("k_lcm",)),
    )
}

SCHEDULES: dict[str, Schedule] = {
    schedule.label: schedule
    for schedule in (
        Schedule("automatic", "Automatic"),
        Schedule("karras", "Karras", config={"use_karras_sigmas": True}, default_rho=7.0),
        Schedule("exponential", "Exponential", config={"use_exponential_sigmas": True}),
        Schedule(
            "sgm_uniform",
            "SGM Uniform",
            ("SGMUniform",),
            {"timestep_spacing": "trailing"},
            need_inner_model=True,
        ),
        Schedule("simple", "Simple", config={"timestep_spacing": "trailing"}, need_inner_model=True),
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
# "Simple" is the model's own shifted sigmas (Forge's default for Flux).
FLOW_SCHEDULES: dict[str, Schedule] = {
    schedule.label: schedule
    for schedule in (
        Schedule("automatic", "Automatic"),
        Schedule("simple", "Simple", need_inner_model=True),
        Schedule("karras", "Karras", config={"use_karras_sigmas": True}, default_rho=7.0),
        Schedule("exponential", "Exponential", config={"use_exponential_sigmas": True}),
        Schedule("beta", "Beta", config={"use_beta_sigmas": True}),
    )
}


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


def _valid_samplers() -> str:
    return ", ".join(SAMPLERS)


def _valid_schedules() -> str:
    return ", ".join(SCHEDULES)


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """Split a pre-1.9 A1111 sampler name into (sampler, schedule label), e.g. "DPM++ 2M Karras".

    A name that is a sampler as it stands, or has no schedule suffix, comes back with None.

    Args:
        name: the sampler name as written in an infotext or sent by an API client.
    """
    if find_sampler(name) is not None:
        return name.strip(), None
    stripped = name.strip()
    for schedule in SCHEDULES.values():
        for option in (schedule.label, schedule.name, *schedule.aliases):
            if stripped.casefold().endswith(" " + option.casefold()):
                return stripped[: -len(option) - 1].strip(), schedule.label
    return stripped, None


def _resolve_flow(sampler: str, schedule: str | None, family: Family) -> tuple[Sampler, Schedule]:
    title = family.title
    valid = ", ".join(FLOW_SAMPLERS)
    base, suffix = split_legacy_name(sampler)
    found = _lookup(FLOW_SAMPLERS, base, ("name",))
    if found is None:
        kind = "an SD sampler" if find_sampler(base) is not None else "not a sampler nbkit knows"
        raise ValueError(
            f"sampler {sampler!r} is {kind} and does not work with {title} models (flow matching); "
            f"samplers for {title}: {valid}"
        )
    wanted = suffix or (schedule if schedule is not None else "Automatic")
    chosen = _lookup(FLOW_SCHEDULES, wanted, ("label", "name"))
    if chosen is None or (
        suffix is not None
        and schedule is not None
        and schedule.strip().casefold() not in ("automatic", suffix.casefold())
    ):
        raise ValueError(
            f"schedule type {wanted!r} does not work with {title} models; schedule types for "
            f"{title}: {', '.join(FLOW_SCHEDULES)}"
        )
    if chosen.label == "Automatic":
        chosen = FLOW_SCHEDULES["Simple"]
    return found, chosen


def resolve(
    sampler: str, schedule: str | None = "Automatic", family: Family | str | None = None
) -> tuple[Sampler, Schedule]:
    """The sampler and concrete schedule A1111 would use for these names.

    Legacy combined names ("DPM++ 2M Karras") are split; "Automatic" (or None) becomes the sampler's
    default schedule where A1111 gives it one (for FLUX.1: "Simple").

    Args:
        sampler: an A1111 sampler name or alias, or a legacy combined name.
        schedule: an A1111 schedule type (label or name, any case); None means "Automatic".
        family: the model's family (or its name); a flow-matching one takes `FLOW_SAMPLERS` only.

    Raises:
        ValueError: for an unknown name, an SD sampler on a flow-matching model, or a legacy suffix
            that contradicts `schedule`; the message lists the valid names.
    """
    if sampler_tables(family)[0] is FLOW_SAMPLERS and isinstance(sampler, str) and sampler.strip():
        return _resolve_flow(sampler, schedule, as_family(family))
    if not isinstance(sampler, str) or not sampler.strip():
        raise ValueError(
            f"sampler must be a sampler name, got {sampler!r}; valid samplers: {_valid_samplers()}"
        )
    base, suffix = split_legacy_name(sampler)
    found = find_sampler(base)
    if found is None:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {_valid_samplers()}")
    chosen = find_schedule(schedule) if schedule is not None else SCHEDULES["Automatic"]
    if chosen is None:
        raise ValueError(f"unknown schedule type {schedule!r}; valid schedule types: {_valid_schedules()}")
    if suffix is not None:
        if chosen.label not in ("Automatic", suffix):
            raise ValueError(
                f"sampler {sampler!r} names the {suffix} schedule but schedule type {chosen.label!r} "
                f"was asked for; give sampler {base!r} with schedule type {chosen.label!r} instead"
            )
        chosen = SCHEDULES[suffix]
    if chosen.label == "Automatic" and found.default_schedule is not None:
        chosen = SCHEDULES[found.default_schedule]
    return found, chosen


def _scheduler_class(sampler: Sampler) -> type:
    if not sampler.available:
        raise NbkitError(
            f"the {sampler.name} sampler needs the Python package {sampler.requires}, which is not installed",
            fix=f"pip install {sampler.requires} (then restart the kernel), or pick another sampler, "
            "e.g. DPM++ 2M SDE",
        )
    import diffusers

    return getattr(diffusers, sampler.scheduler_class)


def build_scheduler(
    config: Any, sampler: str, schedule: str | None = "Automatic", family: Family | str | None = None
) -> Any:
    """A new diffusers scheduler for an A1111 sampler, built from a model's scheduler config.

    Args:
        config: the model's scheduler config (`pipeline.scheduler.config`) or the scheduler itself.
        sampler: an A1111 sampler name or alias, or a legacy combined name ("DPM++ 2M Karras").
        schedule: an A1111 schedule type; "Automatic" (or None) as A1111 means it.
        family: the model's family or its name (a flow-matching one takes the flow-matching samplers only).

    Raises:
        ValueError: for an unknown name, or a schedule this diffusers scheduler cannot follow.
        NbkitError: when the sampler needs a package that is not installed (DPM++ SDE: torchsde).
    """
    found, chosen = resolve(sampler, schedule, family)
    cls = _scheduler_class(found)
    config = getattr(config, "config", config)
    accepted = inspect.signature(cls.__init__).parameters
    missing = [key for key in chosen.config if key not in accepted]
    if missing:
        table = sampler_tables(family)[1]
        usable = [label for label, other in table.items() if all(key in accepted for key in other.config)]
        raise ValueError(
            f"schedule type {chosen.label!r} is not available for sampler {found.name!r} "
            f"(diffusers' {cls.__name__} has no {missing[0]}); valid schedule types for it: {', '.join(usable)}"
        )
    overrides = {flag: False for flag in SIGMA_FLAGS if flag in accepted}
    overrides.update(found.config)
    overrides.update(chosen.config)
    return cls.from_config(config, **overrides)


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
    """The A1111 schedule type a diffusers scheduler follows, or None for the model's plain schedule.

    Args:
        scheduler: a diffusers scheduler instance.
    """
    config = scheduler.config
    if config.get("use_karras_sigmas"):
        return "Karras"
    if config.get("use_exponential_sigmas"):
        return "Exponential"
    if config.get("timestep_spacing") == "trailing":
        return "SGM Uniform"
    return None


def list_samplers() -> list[dict[str, Any]]:
    """The samplers as A1111's `GET /sdapi/v1/samplers` lists them: `{name, aliases, options}`.

    Samplers whose package is missing (`Sampler.available`) are listed too, as A1111 does; choosing
    one raises an `NbkitError` that says what to install.
    """
    return [
        {"name": sampler.name, "aliases": list(sampler.aliases), "options": dict(sampler.options)}
        for sampler in SAMPLERS.values()
    ]


def list_schedulers() -> list[dict[str, Any]]:
    """The schedule types as A1111's `GET /sdapi/v1/schedulers` lists them."""
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
