"""The one benchmark runner: every case of a workload in a fresh child process, interleaved.

A workload (a module of ``stress/workloads/``, contract in ``stress.workloads``) says what its
cases are and how to run one; this module does the rest for all of them:

- a fresh child process per case (``python -m stress.runner --child MODULE CASE_JSON``): per-case
  RSS and threads, no global state of a library leaking from one case into the next, and a case
  that hangs or crashes cannot take the run down;
- the setups of one label interleaved, their order rotated from label to label and repeat to
  repeat, so drift of a shared machine hits every setup alike;
- ``repeat`` repeats; a per-case timeout (the case's ``"timeout"``, else the run's default);
- a failure (exception, crash, timeout, missing result, a skip) recorded as data: the run goes
  on and the report shows it.

``stress.report`` turns the runs into medians, tables, JSON and plots.

    python -m stress.runner NAME [NAME ...] [--quick] [--repeat N] [--timeout S]
    python -m stress.runner --all [--quick]      # every workload, as `make bench` does
    python -m stress.runner --list
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
DEFAULT_TIMEOUT = 600.0
#: Extra seconds a child gets past its case's own bound, to report and clean up.
TIMEOUT_GRACE = 60.0

Case = dict[str, Any]
Result = dict[str, Any]
Launch = Callable[[str, Case, float], Result]


@dataclass
class CaseRuns:
    """One case of the plan and the result of each of its runs, in run order."""

    case: Case
    runs: list[Result] = field(default_factory=list)


# ------------------------------------------------------------------------------------ schedule


def groups(cases: Sequence[Case]) -> list[list[int]]:
    """Indices of ``cases`` grouped by label, in the order labels first appear."""
    by_label: dict[str, list[int]] = {}
    for index, case in enumerate(cases):
        by_label.setdefault(str(case["label"]), []).append(index)
    return list(by_label.values())


def schedule(cases: Sequence[Case], repeat: int) -> Iterator[tuple[int, int]]:
    """``(repeat, case index)`` in run order: label after label, the setups of a label one
    after the other, rotated by one place per label and per repeat."""
    grouped = groups(cases)
    for rep in range(repeat):
        for number, group in enumerate(grouped):
            shift = (rep + number) % len(group)
            for index in group[shift:] + group[:shift]:
                yield rep, index


# -------------------------------------------------------------------------------- child process


def child_main(module_name: str, case_json: str) -> None:
    """Run one case in this (fresh) process and print its result line; never returns.

    ``os._exit``: a broken case may leave non-daemon threads that would hang the exit.
    """
    try:
        from importlib import import_module

        result = dict(import_module(module_name).run_case(json.loads(case_json)))
        result.setdefault("ok", True)
    except BaseException as exc:  # noqa: BLE001 - a failed case is data
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-2000:]}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def outcome(returncode: int, stdout: str, stderr: str) -> Result:
    """The result a child printed (its last result line), or a failure saying what went wrong."""
    result: Result | None = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            with contextlib.suppress(ValueError):
                result = json.loads(line[len(RESULT_PREFIX):])
    if result is None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        return {"ok": False, "error": f"exit status {returncode}, no result", "stderr": tail}
    if returncode != 0 and result.get("ok", True):
        result["ok"] = False
        result.setdefault("error", f"exit status {returncode}")
    return result


def launch_child(module_name: str, case: Case, timeout: float) -> Result:
    """Run ``case`` of ``module_name`` in a fresh ``python -m stress.runner --child`` process."""
    cmd = [sys.executable, "-m", "stress.runner", "--child", module_name, json.dumps(case)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raw = exc.stderr or ""
        tail = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                "stderr": tail[-2000:], "wall": time.monotonic() - started}
    result = outcome(proc.returncode, proc.stdout, proc.stderr)
    result["wall"] = time.monotonic() - started
    return result


# ----------------------------------------------------------------------------------------- run


def case_timeout(case: Case, default: float) -> float:
    """How long the child of ``case`` may take: its own bound plus a grace, else ``default``."""
    own = case.get("timeout")
    return default if own is None else float(own) + TIMEOUT_GRACE


def execute(workload: ModuleType, cases: Sequence[Case], *, repeat: int,
            timeout: float = DEFAULT_TIMEOUT, launch: Launch = launch_child,
            progress: Callable[[str], None] | None = None) -> list[CaseRuns]:
    """Every case ``repeat`` times in the order of :func:`schedule`, inside the workload's
    optional ``session(cases)`` (whose dict is merged into every case a child gets)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat}")
    if not cases:
        raise ValueError(f"workload {workload.NAME!r} has no cases")
    for number, case in enumerate(cases):
        missing = [key for key in ("setup", "label") if key not in case]
        if missing:
            raise ValueError(f"case {number} of workload {workload.NAME!r} lacks "
                             f"{' and '.join(missing)}: {case}")
    plan = [CaseRuns(dict(case)) for case in cases]
    order = list(schedule(cases, repeat))
    skip = getattr(workload, "skip", None)
    session = getattr(workload, "session", None)
    started = time.monotonic()
    with session(list(cases)) if session else contextlib.nullcontext({}) as shared:
        for done, (rep, index) in enumerate(order, 1):
            case = plan[index].case
            why = skip(case) if skip else None
            if why:
                result: Result = {"ok": False, "skipped": True, "error": f"skipped: {why}"}
            else:
                result = launch(workload.__name__, {**case, **shared},
                                case_timeout(case, timeout))
            plan[index].runs.append(result)
            if progress is not None:
                progress(f"[{done}/{len(order)} {time.monotonic() - started:5.0f}s] "
                         f"rep {rep + 1} {case.get('setup')} {case['label']}: "
                         f"{summary_line(workload, result)}")
    return plan


def summary_line(workload: ModuleType, result: Result) -> str:
    """One run in a progress line: its columns, or why it failed."""
    from stress import report
    from stress.common import short_error

    if not result.get("ok"):
        return short_error(result, 300)
    return ", ".join(f"{title} {report.cell(workload, key, result.get(key))}"
                     for key, title in workload.COLUMNS)


def run(workload: ModuleType, cases: Sequence[Case], *, quick: bool, command: str,
        repeat: int | None = None, output: str | Path | None = None, name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT, title: str | None = None) -> int:
    """Run, write the report, print the table. ``repeat`` defaults to 3 (quick: 1), ``output``
    to ``<results_dir(quick)>/<name or NAME>.md`` (.json and plots beside it).

    Exit status 1 when a run failed (a skip is not a failure), else 0.
    """
    from stress import report

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    repeat = repeat or (1 if quick else 3)
    path = Path(output) if output else results_dir(quick) / f"{name or workload.NAME}.md"
    results = execute(workload, cases, repeat=repeat, timeout=timeout, progress=progress)
    text, written = report.write(workload, results, output=path, command=command,
                                 repeat=repeat, title=title)
    print(text)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    failed = [r for runs in results for r in runs.runs if not r.get("ok") and not r.get("skipped")]
    return 1 if failed else 0


def run_options(workload: ModuleType, args: argparse.Namespace, *, command: str,
                **kwargs: Any) -> int:
    """:func:`run` for a workload's own command line, whose options are named as the keywords
    of its ``cases()``; ``quick``, ``repeat`` and ``output`` are the runner's."""
    mine = {"quick": args.quick, "repeat": args.repeat, "output": getattr(args, "output", None)}
    options = {k: v for k, v in vars(args).items() if k not in mine}
    return run(workload, workload.cases(args.quick, **options), command=command, **mine,
               **kwargs)


# ----------------------------------------------------------------------------------------- CLI


def results_dir(quick: bool) -> Path:
    """Where reports go: ``stress/results``, or ``stress/results/quick`` (not committed) for
    smoke runs, so a quick run never overwrites the measured figures."""
    base = REPO_ROOT / "stress" / "results"
    return base / "quick" if quick else base


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        if len(argv) != 3:
            raise SystemExit("usage: python -m stress.runner --child MODULE CASE_JSON")
        child_main(argv[1], argv[2])
    from stress import workloads

    parser = argparse.ArgumentParser(prog="python -m stress.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="workloads to run (--list)")
    parser.add_argument("--all", action="store_true", help="every workload")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the workloads' quick cases, one repeat, reports in "
                             "stress/results/quick/")
    parser.add_argument("--repeat", type=int, default=None, help="repeats (default 3; quick 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per case without a bound of its own "
                             f"(default {DEFAULT_TIMEOUT:g})")
    args = parser.parse_args(argv)
    known = workloads.discover()
    if args.list:
        for name, module in known.items():
            print(f"{name:24} {module.TITLE}")
        return 0
    if args.all == bool(args.names):
        parser.error("name one or more workloads, or give --all")
    chosen = list(known.values()) if args.all else [workloads.load(n) for n in args.names]
    status = 0
    for module in chosen:
        print(f"== {module.NAME}: {module.TITLE}", file=sys.stderr, flush=True)
        command = " ".join(["python -m stress.runner", module.NAME]
                           + (["--quick"] if args.quick else [])
                           + ([f"--repeat {args.repeat}"] if args.repeat else []))
        status |= run(module, module.cases(args.quick), quick=args.quick, repeat=args.repeat,
                      command=command, timeout=args.timeout)
    return status


if __name__ == "__main__":
    sys.exit(main())
