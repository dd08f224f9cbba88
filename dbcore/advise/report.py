"""The proposal table (terminal and markdown) and the migration ``--write`` makes of it."""

from __future__ import annotations

from pathlib import Path

from dbcore.advise.prove import Advice, Proposal
from dbcore.errors import ConfigError
from dbcore.migrate.files import discover, slugify


def _size(size: int) -> str:
    n = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _share(value: float | None) -> str:
    return "no timing" if value is None else f"{100 * value:.1f}%"


def index_name(p: Proposal) -> str:
    """The name the migration gives the index (PostgreSQL's 63 bytes)."""
    return p.candidate.name


def create_statement(p: Proposal, concurrently: bool = True) -> str:
    cols = p.candidate.definition.split(" ON ", 1)[1]
    how = "CONCURRENTLY " if concurrently else ""
    return f"CREATE INDEX {how}{index_name(p)} ON {cols}"


def _helped_lines(p: Proposal) -> list[str]:
    return [f"{h.query.short(70)} [{h.query.source}; "
            f"{_share(h.share)}{' of time' if h.share is not None else ''}]: cost "
            f"{h.before:,.0f} -> {h.after:,.0f} (-{100 * h.saving:.1f}%)" for h in p.helped]


def text(advice: Advice, margin: float) -> str:
    """Return the terminal rendering of the proposals."""
    lines = [f"{advice.queries} queries read, {advice.planned} planned on the copy, "
             f"{advice.candidates} candidate indexes tried; margin: a query's cost must drop "
             f"by {100 * margin:.0f}%"]
    if not advice.proposals:
        lines.append("no index to propose: none lowers any query's cost by the margin")
    for n, p in enumerate(advice.proposals, 1):
        lines.append("")
        lines.append(f"{n}. {create_statement(p)}")
        lines.append(f"   helps {len(p.helped)} quer{'y' if len(p.helped) == 1 else 'ies'} "
                     f"({_share(p.share)} of recorded time); estimated size {_size(p.size_bytes)}")
        if p.writes:
            lines.append(f"   write cost: {p.candidate.table}: {p.writes}")
        lines += [f"   - {line}" for line in _helped_lines(p)]
    if advice.skipped_existing:
        lines.append("")
        lines.append("already indexed (not proposed again):")
        lines += [f"  {s}" for s in advice.skipped_existing]
    lines += [f"note: {n}" for n in advice.notes]
    return "\n".join(lines)


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(advice: Advice, margin: float, where: str = "") -> str:
    """Return the proposals as a markdown table (the flow's artifact)."""
    parts = [f"# Index proposals{f' for {where}' if where else ''}", "",
             f"{advice.queries} queries read, {advice.planned} planned on a copy, "
             f"{advice.candidates} candidates tried with HypoPG; proposed only when a query's "
             f"cost drops by {100 * margin:.0f}% or more. Check them with the team before "
             "committing a migration (`dbmigrate suggest-indexes --write`).", ""]
    if not advice.proposals:
        parts.append("**No index to propose.**")
    else:
        parts += ["| index | queries helped (share of time) | cost before -> after | est. size | write cost |",
                  "|---|---|---|---|---|"]
        for p in advice.proposals:
            queries = "<br>".join(_cell(f"`{h.query.short(60)}` ({_share(h.share)})") for h in p.helped)
            costs = "<br>".join(f"{h.before:,.0f} -> {h.after:,.0f}" for h in p.helped)
            parts.append(f"| `{_cell(create_statement(p))}` | {queries} | {costs} | "
                         f"{_size(p.size_bytes)} | {_cell(p.writes)} |")
    if advice.skipped_existing:
        parts += ["", "Already indexed (not proposed again):", ""]
        parts += [f"- `{s}`" for s in advice.skipped_existing]
    if advice.notes:
        parts += [""] + [f"- {n}" for n in advice.notes]
    return "\n".join(parts)


MIGRATION = '''\
"""{number:03d}: {title} (proposed by `dbmigrate suggest-indexes`: check it with the team first).

{proposal}

Built with CREATE INDEX CONCURRENTLY (no write is blocked), so this migration runs alone,
outside the batch's transaction (``atomic = False``, see docs/migrations.md). A failed build
leaves an INVALID index: each build drops a leftover first, so a rerun builds it again.
"""

atomic = False


def migrate(migrator, database, *, fake=False):
    """{title}."""
{creates}


def rollback(migrator, database, *, fake=False):
    """Undo {title}."""
{drops}
'''


def write_migration(advice: Advice, migrations_dir: Path, margin: float) -> Path:
    """Write the next ``NNN_add_index_....py`` with every proposal; return its path; raise ConfigError."""
    if not advice.proposals:
        raise ConfigError("no index to propose, so no migration was written")
    migrations_dir = Path(migrations_dir)
    if not migrations_dir.is_dir():
        raise ConfigError(f"{migrations_dir} is not a folder: pass --migrations-dir")
    number = max((f.number for f in discover(migrations_dir)), default=0) + 1
    if number > 999:
        raise ConfigError("migration numbers are three digits and 999 is taken: squash old migrations")
    names = [index_name(p) for p in advice.proposals]
    slug = slugify("add_index_" + "_".join(names))[:60].rstrip("_")
    path = migrations_dir / f"{number:03d}_{slug}.py"
    if path.exists():
        raise ConfigError(f"{path} already exists")
    title = "add index " + ", ".join(names)
    proposal = "\n".join(line.rstrip() for line in text(advice, margin).splitlines())
    creates = "\n".join(
        f"    migrator.sql({f'DROP INDEX CONCURRENTLY IF EXISTS {n}'!r})\n"
        f"    migrator.sql({create_statement(p)!r})" for p, n in zip(advice.proposals, names))
    drops = "\n".join(f"    migrator.sql({f'DROP INDEX CONCURRENTLY IF EXISTS {n}'!r})" for n in names)
    path.write_text(MIGRATION.format(number=number, title=title, proposal=proposal.replace('"""', "'''"),
                                     creates=creates, drops=drops), encoding="utf-8")
    return path
