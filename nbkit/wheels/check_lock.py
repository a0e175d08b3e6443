"""`python -m nbkit.wheels.check_lock [LOCK]`: exit 1 and list the problems when a lock no longer covers
`pyproject.toml` (`nbkit.wheels.lockfile.check_lock`)."""

from __future__ import annotations

import sys
from pathlib import Path

from nbkit.wheels.lockfile import DEV_LOCK, check_lock, read_lock


def main(argv: list[str] | None = None) -> int:
    """`python -m nbkit.wheels.lockfile [LOCK]`: exit 1 and list the problems when the lock is stale."""
    root = Path(__file__).resolve().parents[2]  # the checkout: nbkit/wheels/ -> ..
    lock = Path(argv[0]) if argv else root / DEV_LOCK
    problems = check_lock(lock, root / "pyproject.toml")
    for problem in problems:
        print(f"{lock}: {problem}", file=sys.stderr)
    if problems:
        print("Refresh the lock as README.md's 'Dependencies' section says.", file=sys.stderr)
        return 1
    print(f"{lock}: covers pyproject.toml for this Python ({len(read_lock(lock))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
