"""The layers of dbcore import one way only, and dbcore never imports Prefect.

Layers, lowest first (docs/architecture.md): the core modules of ``dbcore/`` -> ``migrate/``,
``backup/``, ``lint/``, ``checks/`` -> ``deploy/`` -> ``cli/``. ``services/`` (the embedded
default and the tests' servers) is imported only by ``cli/``, ``flows/``, tests and benches.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dbcore

DBCORE = Path(dbcore.__file__).parent
REPO = DBCORE.parent
LAYERS = {"migrate": 1, "backup": 1, "lint": 1, "checks": 1, "deploy": 2, "advise": 2, "cli": 3, "services": 4}
MAY_IMPORT_SERVICES = ("dbcore.cli", "dbcore.services", "flows")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Return (module, imported names, line) for every import of dbcore in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dbcore":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "dbcore"]
    return found


def _is_module(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 and parts[0] == "dbcore" else 5


def _sources() -> list[Path]:
    return sorted(DBCORE.rglob("*.py")) + sorted((REPO / "flows").rglob("*.py"))


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for path in _sources():
        me = _module_name(path)
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names if _is_module(f"{module}.{n}")]
            for target in targets:
                if _layer(target) > _layer(me) and not target.startswith("dbcore.services"):
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, "a lower layer imports a higher one:\n" + "\n".join(wrong)


def test_only_cli_and_flows_import_the_services():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}"
             for path in _sources() for module, _, line in _imports(path)
             if module.startswith("dbcore.services") and not _module_name(path).startswith(MAY_IMPORT_SERVICES)]
    assert not wrong, "runtime code reaches into dbcore/services:\n" + "\n".join(wrong)


def test_no_private_name_crosses_a_module():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name} from {module}"
             for path in _sources() for module, names, line in _imports(path)
             for name in names if name.startswith("_")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in _sources():
        me = _module_name(path)
        graph[me] = set()
        for module, names, _ in _imports(path):
            graph[me].add(module)
            graph[me].update(f"{module}.{n}" for n in names if _is_module(f"{module}.{n}"))
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node not in graph or node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        visit(start, [])
    # a package's __init__ importing its own modules is no cycle; there are none such here
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_dbcore_never_imports_prefect():
    modules = sorted(
        "dbcore." + ".".join(p.relative_to(DBCORE).with_suffix("").parts)
        for p in DBCORE.rglob("*.py") if p.name != "__main__.py"
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"dbcore pulled in Prefect: {result.stdout}{result.stderr}"


def test_installed_into_an_app_nothing_shadows_the_apps_own_top_level_modules(tmp_path):
    """An app with its own `flows` package (common in Prefect projects) keeps it; our flow still runs."""
    app = tmp_path / "app"
    (app / "flows").mkdir(parents=True)
    (app / "flows" / "__init__.py").write_text("OWNER = 'the app'\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(app), "HOME": str(tmp_path)}
    mine = subprocess.run([sys.executable, "-c", "import flows, dbcore; print(flows.OWNER)"],
                          cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert mine.stdout.strip() == "the app", mine.stderr
    ours = subprocess.run([sys.executable, str(REPO / "flows" / "migrate.py"), "--help"],
                          cwd=app, env=env, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and "--env" in ours.stdout, ours.stderr


def test_each_prefect_task_stays_a_call_into_dbcore():
    """docs/architecture.md: a task is one to three calls; the decisions live in dbcore.deploy."""
    tree = ast.parse((REPO / "flows" / "tasks.py").read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 10]
    assert long == [], "move the logic into dbcore.deploy.steps: " + ", ".join(long)
