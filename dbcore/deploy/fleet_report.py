"""What a fleet run shows: the plan the approver reads, and the table of what happened to each database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dbcore.deploy.fleet import DatabasePlan, Fleet, fleet_fingerprint
from dbcore.deploy.verdict import size_text

Outcome = Literal["applied", "up to date", "failed", "not started", "dry run"]
#: outcomes a fleet run may end with and still exit 0
SUCCESSFUL = ("applied", "up to date", "dry run")


@dataclass(frozen=True)
class FleetPlan:
    """Every database's plan, the canary rehearsal's results (name -> message) and the fingerprint."""

    env: str
    fleet: Fleet
    databases: tuple[DatabasePlan, ...]
    rehearsals: tuple[tuple[str, bool, str], ...] = ()  # (database, passed, message)

    @property
    def fingerprint(self) -> str:
        return fleet_fingerprint(list(self.databases))

    @property
    def pending(self) -> int:
        return sum(1 for p in self.databases if p.migrations)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.databases) and all(passed for _, passed, _ in self.rehearsals)

    def problems(self) -> list[str]:
        """Return one line per database that cannot go ahead (unplannable, lint, rehearsal)."""
        lines = [f"{p.name}: {p.error}" for p in self.databases if p.error]
        lines += [f"{p.name}: lint: {p.lint_summary}" for p in self.databases
                  if not p.error and not p.lint_ok]
        lines += [f"{name}: rehearsal: {message}" for name, passed, message in self.rehearsals
                  if not passed]
        return lines

    def headline(self) -> str:
        waves = len(self.fleet.waves())
        return (f"fleet of {len(self.databases)} on {self.env}: {self.pending} with pending migrations, "
                f"canary {self.fleet.canary}, then waves of {self.fleet.concurrency} ({waves} waves)")

    def to_markdown(self) -> str:
        """Return the plan as the approver reads it (the fingerprint the approval covers first)."""
        rehearsed = {name: (passed, message) for name, passed, message in self.rehearsals}
        canaries = {t.name for t in self.fleet.databases[:self.fleet.canary]}
        lines = [f"**{self.headline()}**", "",
                 f"Fleet plan fingerprint: `{self.fingerprint}`", "",
                 "| database | variable | pending migrations | size | lint | rehearsal |",
                 "|---|---|---|---|---|---|"]
        for p in self.databases:
            pending = ", ".join(f"`{name}` ({sha[:8]})" for name, sha in p.migrations) or "up to date"
            if p.error:
                pending = f"cannot plan: {p.error}"
            if p.name in rehearsed:
                passed, message = rehearsed[p.name]
                rehearsal = ("passed" if passed else "FAILED") + f": {message}"
            else:
                rehearsal = "canary, not rehearsed" if p.name in canaries else "-"
            lint = p.lint_summary or "-"
            lines.append(f"| {p.name}{' (canary)' if p.name in canaries else ''} | `{p.url_env}` | "
                         f"{pending} | {size_text(p.size_bytes)} | {lint} | {rehearsal} |")
        lines += ["", "Approving applies exactly these migrations (names and file sha256s) to these "
                      "databases: a database whose plan differs when its turn comes refuses and "
                      "changes nothing."]
        return "\n".join(lines)


@dataclass(frozen=True)
class DatabaseOutcome:
    """What happened to one database of a fleet run."""

    name: str
    state: Outcome
    applied: tuple[str, ...] = ()
    seconds: float = 0.0
    backup_key: str = ""
    message: str = ""

    def row(self) -> dict:
        """Return the database's row of the fleet's table artifact."""
        return {"database": self.name, "state": self.state,
                "migrations applied": ", ".join(self.applied) or "-",
                "duration": f"{self.seconds:.1f}s" if self.seconds else "-",
                "backup key": self.backup_key or "-", "message": self.message}


def not_started(names: list[str]) -> list[DatabaseOutcome]:
    """Return the outcomes of databases a failure kept from starting (left untouched)."""
    return [DatabaseOutcome(name, "not started", message="an earlier failure stopped the fleet")
            for name in names]


def final_line(outcomes: list[DatabaseOutcome]) -> str:
    """Return the run's one-line result: how many applied, were up to date, failed, were not started."""
    count = {state: sum(1 for o in outcomes if o.state == state)
             for state in ("applied", "up to date", "failed", "not started", "dry run")}
    parts = [f"{count['applied']} applied", f"{count['up to date']} up to date",
             f"{count['failed']} failed", f"{count['not started']} not started"]
    if count["dry run"]:
        parts = [f"dry run of {count['dry run']}: nothing changed"] + parts[1:]
    failed = [o for o in outcomes if o.state == "failed"]
    why = f"; {failed[0].name}: {failed[0].message}" if failed else ""
    return ", ".join(parts) + why


def all_succeeded(outcomes: list[DatabaseOutcome]) -> bool:
    """Return True if every database applied, was up to date, or was dry-run."""
    return all(o.state in SUCCESSFUL for o in outcomes)
