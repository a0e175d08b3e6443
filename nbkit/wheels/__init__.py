"""Precompiled wheels: a verified wheelhouse on the storage root, installed offline in seconds.

`install(sets=[...])` is the notebook's first cell; `nbkit wheels lock|build|install|verify|prune|status`
is the command line. Nothing here imports torch: it runs before the optional packages exist.
"""

from nbkit.wheels.house import default_wheelhouse, prune, verify
from nbkit.wheels.install import InstallReport, install
from nbkit.wheels.profiles import (
    Profile,
    RuntimeSpec,
    get_profile,
    load_profiles,
    probe_runtime,
    select_profile,
)

__all__ = [
    "InstallReport",
    "Profile",
    "RuntimeSpec",
    "default_wheelhouse",
    "get_profile",
    "install",
    "load_profiles",
    "probe_runtime",
    "prune",
    "select_profile",
    "verify",
]
