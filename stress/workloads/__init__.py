"""Benchmark workloads: one small module each, found by its ``NAME``.

The contract (stress/README.md, "Writing a workload"): a module here defines ``NAME`` (the
report is ``stress/results/<NAME>.md`` and ``.json``; ``python -m stress.runner NAME``),
``TITLE``, ``COLUMNS`` (``[(result key, column title), ...]``), ``HEADLINE`` (the key the
"vs baseline" ratio is taken on), ``HIGHER_IS_BETTER``, ``cases(quick)`` (JSON-able dicts with
at least ``"setup"`` and ``"label"``) and ``run_case(case)`` (runs one case in a fresh child
process, returns JSON-able figures, raises on failure). ``stress.runner`` runs the cases and
``stress.report`` writes the report.

Optional, for the runner: a case's ``"timeout"`` (seconds its child may take, plus a grace),
``session(cases)`` (a context manager around all the cases whose dict is merged into every case
a child gets: one vhost or a TLS endpoint for the whole run) and ``skip(case)`` (a reason not to
run a case, shown as skipped). Optional, for the report: ``SETUP_LABELS``, ``FORMATS``,
``AGGREGATE``, ``PLOTS`` with ``PLOT_X`` and a case's ``"series"``, ``notes(cases)`` and
``row_note(runs)`` (see ``stress.report``).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from types import ModuleType
from typing import Any

REQUIRED = ("NAME", "TITLE", "COLUMNS", "HEADLINE", "HIGHER_IS_BETTER", "cases", "run_case")


def check(module: ModuleType) -> ModuleType:
    """``module`` if it has what the contract asks; else a ValueError naming what is missing."""
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise ValueError(f"workload module {module.__name__} lacks {', '.join(missing)}")
    keys = [key for key, _ in module.COLUMNS]
    if module.HEADLINE not in keys:
        raise ValueError(f"workload {module.NAME!r}: HEADLINE {module.HEADLINE!r} is not one "
                         f"of its COLUMNS keys {keys}")
    return module


def discover() -> dict[str, ModuleType]:
    """Every workload module of this package, by NAME, in module name order."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = check(import_module(f"{__name__}.{info.name}"))
        if module.NAME in found:
            raise ValueError(f"two workloads are called {module.NAME!r}: "
                             f"{found[module.NAME].__name__} and {module.__name__}")
        found[module.NAME] = module
    return found


def load(name: str) -> ModuleType:
    """The workload called ``name``; a ValueError listing the known names if there is none."""
    known = discover()
    if name not in known:
        raise ValueError(f"no workload called {name!r}; known: {', '.join(known) or 'none'}")
    return known[name]


def sizes(defaults: dict[str, tuple[Any, Any]], quick: bool,
          given: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``defaults`` (``name: (quick, full)``), those ``given`` not None over
    them; a ValueError naming an option ``defaults`` does not know."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {', '.join(defaults)}")
    return {name: pair[0 if quick else 1] if given.get(name) is None else given[name]
            for name, pair in defaults.items()}
