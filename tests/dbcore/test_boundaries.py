"""dbcore is plain database logic: it never imports Prefect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dbcore

DBCORE = Path(dbcore.__file__).parent


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
