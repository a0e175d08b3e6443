"""The result table of an image operation: one row per file with its status and the reason.

Returned to code, printed as text by the CLI, and shown as an HTML table in a notebook (Jupyter calls
`_repr_html_`), so one bad file among thirty is obvious and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import html
import shutil
import textwrap
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warning", "duplicate", "error"]
STATUSES: tuple[str, ...] = ("ok", "warning", "duplicate", "error")
_COLOURS = {"ok": "#1a7f37", "warning": "#9a6700", "duplicate": "#57606a", "error": "#cf222e"}


@dataclasses.dataclass
class ReportRow:
    """One file's outcome.

    Args:
        file: the file as the user named it (an upload name, a path, a zip member, a URL).
        status: `ok` and `warning` were imported; `duplicate` and `error` were skipped.
        reason: what happened, in a few words (notes of conversions for `ok`).
        fix: what to do about it, for `warning` and `error`.
        saved_as: the processed file, relative to the session folder, when there is one.
    """

    file: str
    status: Status
    reason: str = ""
    fix: str | None = None
    saved_as: str | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


@dataclasses.dataclass
class ImageReport:
    """The rows of one operation, warnings about the whole set, and the contact sheet if one was made.

    Args:
        title: a one-line heading, e.g. `Import into session "alice"`.
        rows: one per file.
        warnings: warnings about the set as a whole (e.g. the instance token is a common word).
        contact_sheet: the grid of crops written for review, if any.
        vision_flags: `nbkit vision check`'s flags per saved file; None reads them from the session
            of `contact_sheet` (`logs/vision_check.json`), if any.
    """

    title: str
    rows: list[ReportRow] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    contact_sheet: Path | None = None
    vision_flags: dict[str, list[str]] | None = None

    def add(self, file: str, status: Status, reason: str = "", **extra) -> ReportRow:
        row = ReportRow(file=file, status=status, reason=reason, **extra)
        self.rows.append(row)
        return row

    def by_status(self, *statuses: str) -> list[ReportRow]:
        return [row for row in self.rows if row.status in statuses]

    @property
    def imported(self) -> list[ReportRow]:
        """Rows of pictures that are now in the session (not caption files)."""
        return [row for row in self.by_status("ok", "warning") if row.saved_as]

    @property
    def skipped(self) -> list[ReportRow]:
        return self.by_status("duplicate", "error")

    @property
    def failed(self) -> bool:
        """True when at least one file was refused for an error."""
        return bool(self.by_status("error"))

    def row(self, file: str) -> ReportRow:
        """The row whose file is `file` or ends with `/file` (handy in tests and notebooks)."""
        for row in self.rows:
            if row.file == file or row.file.endswith(("/" + file, ":" + file)):
                return row
        raise KeyError(f"no row for {file!r}; rows: {[row.file for row in self.rows]}")

    def flags(self, row: ReportRow) -> list[str]:
        """The vision check's flags of `row`'s saved file (near-duplicate of X, off-subject?)."""
        if self.vision_flags is None:
            from nbkit.images.vision_flags import read_vision_flags

            self.vision_flags = read_vision_flags(self.contact_sheet.parent) if self.contact_sheet else {}
        return self.vision_flags.get(row.saved_as or "", [])

    def summary(self) -> str:
        counts = {status: len(self.by_status(status)) for status in STATUSES}
        return ", ".join(f"{count} {status}" for status, count in counts.items() if count) or "nothing to do"

    def __str__(self) -> str:
        width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
        name_width = min(40, max([4, *(len(row.file) for row in self.rows)]))
        lines = [f"{self.title}: {self.summary()}"]
        if self.rows:
            lines.append(f"  {'file':<{name_width}}  {'status':<9}  reason")
        indent = " " * (name_width + 15)
        for row in self.rows:
            name = "".join(char if char.isprintable() else "?" for char in row.file)
            name = name if len(name) <= name_width else "…" + name[-(name_width - 1) :]
            reason = row.reason + (f" (fix: {row.fix})" if row.fix else "")
            reason += "".join(f"; vision: {flag}" for flag in self.flags(row))
            wrapped = textwrap.wrap(reason, max(20, width - len(indent))) or [""]
            lines.append(f"  {name:<{name_width}}  {row.status:<9}  {wrapped[0]}")
            lines.extend(indent + more for more in wrapped[1:])
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        if self.contact_sheet:
            lines.append(f"  contact sheet: {self.contact_sheet}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        escape = html.escape
        cells = []
        for row in self.rows:
            colour = _COLOURS[row.status]
            fix = f"<br><small>How to fix: {escape(row.fix)}</small>" if row.fix else ""
            fix += "".join(f"<br><b>⚑ {escape(flag)}</b>" for flag in self.flags(row))
            cells.append(
                f"<tr><td style='text-align:left'>{escape(row.file)}</td>"
                f"<td style='text-align:left;color:{colour};font-weight:bold'>{row.status}</td>"
                f"<td style='text-align:left'>{escape(row.reason)}{fix}</td></tr>"
            )
        table = (
            "<table><thead><tr><th style='text-align:left'>file</th><th style='text-align:left'>status</th>"
            f"<th style='text-align:left'>reason</th></tr></thead><tbody>{''.join(cells)}</tbody></table>"
            if cells
            else ""
        )
        warnings = "".join(
            f"<p style='color:{_COLOURS['warning']}'>⚠ {escape(warning)}</p>" for warning in self.warnings
        )
        sheet = (
            f"<p>Contact sheet: <code>{escape(str(self.contact_sheet))}</code></p>"
            if self.contact_sheet
            else ""
        )
        return f"<div><b>{escape(self.title)}</b>: {escape(self.summary())}{table}{warnings}{sheet}</div>"
