"""The one benchmark reporter: medians per case, a markdown table, JSON and plots.

From the runs ``stress.runner`` collected for a workload it writes ``<stem>.md`` (title, the
command, one row per case, notes, the machine line), ``<stem>.json`` (every case with every
raw run) and, when the workload defines ``PLOTS``, ``<stem>-<suffix>.png``.

Per row: each ``COLUMNS`` figure is the median over the case's successful runs (``AGGREGATE``
may ask for ``"max"`` or ``"sum"`` over all its runs instead, e.g. peak connections or lost
messages); the ``HEADLINE`` figure also gets its min–max and its ratio to the baseline row of
the same label. A case none of whose runs succeeded shows FAILED (or skipped) and why.

Optional presentation attributes of a workload module:

- ``SETUP_LABELS: dict[str, str]``: how a setup is named in the table;
- ``FORMATS: dict[str, Callable[[Any], str]]``: how a figure is printed, over
  :data:`KEY_FORMATS` (the usual keys: ``rate``, latencies in s, bytes, µs) and :func:`number`;
- ``AGGREGATE: dict[str, str]``: ``"median"`` (default), ``"max"`` or ``"sum"`` per key;
- ``PLOTS: list[tuple[str, str, str, bool]]`` ``(file suffix, key, axis label, log scale)`` and
  ``PLOT_X`` (the case key on the x axis): one line per setup and case ``"series"``;
- ``notes(cases) -> list[str]`` and ``row_note(runs) -> str``: text under the table, in a row.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from stress.common import (
    fmt_mib,
    fmt_ms,
    fmt_rate,
    machine_line,
    markdown_table,
    short_error,
    write_result,
)
from stress.runner import CaseRuns, groups


@dataclass
class Row:
    """One case summarised over its runs."""

    case: dict[str, Any]
    runs: list[dict[str, Any]]
    values: dict[str, float | None]
    low_high: tuple[float, float] | None
    ratio: float | None

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("ok")]


# ---------------------------------------------------------------------------------- statistics


def _numbers(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The figures of ``key`` the runs have (ints stay ints: counts print as counts)."""
    return [r[key] for r in runs
            if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]


def aggregate(how: str, runs: Sequence[dict[str, Any]], key: str) -> float | None:
    """The figure of ``key`` for a row: median of the successful runs, or max/sum of all."""
    if how == "median":
        values = _numbers([r for r in runs if r.get("ok")], key)
        return statistics.median(values) if values else None
    values = _numbers(runs, key)
    if not values:
        return None
    if how == "max":
        return max(values)
    if how == "sum":
        return sum(values)
    raise ValueError(f"unknown aggregate {how!r} for {key!r} (median, max or sum)")


def baseline_index(cases: Sequence[dict[str, Any]], indices: Sequence[int]) -> int:
    """The baseline of a label's cases: the one marked ``"baseline": True``, else the first."""
    marked = [i for i in indices if cases[i].get("baseline")]
    return marked[0] if marked else indices[0]


def summarise(workload: ModuleType, results: Sequence[CaseRuns]) -> list[Row]:
    """One :class:`Row` per case, in plan order."""
    how = getattr(workload, "AGGREGATE", {})
    headline = workload.HEADLINE
    rows = []
    for item in results:
        values = {key: aggregate(how.get(key, "median"), item.runs, key)
                  for key, _ in workload.COLUMNS}
        ok_values = _numbers([r for r in item.runs if r.get("ok")], headline)
        rows.append(Row(item.case, item.runs, values,
                        (min(ok_values), max(ok_values)) if ok_values else None, None))
    cases = [item.case for item in results]
    for indices in groups(cases):
        base = rows[baseline_index(cases, indices)].values[headline]
        for i in indices:
            value = rows[i].values[headline]
            rows[i].ratio = value / base if value is not None and base else None
    return rows


# ---------------------------------------------------------------------------------- formatting


def number(value: Any) -> str:
    """A figure as a table shows it when its workload gives no format of its own."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


#: How the figures every workload names alike are printed: messages a second, latencies (p50,
#: p95, p99, max, in seconds), bytes, CPU microseconds per operation.
KEY_FORMATS: dict[str, Callable[[Any], str]] = {
    "rate": fmt_rate, "p50": fmt_ms, "p95": fmt_ms, "p99": fmt_ms, "max": fmt_ms,
    "peak_rss": fmt_mib, "rss": fmt_mib, "cpu_us": lambda v: f"{v:.0f} us",
}


def cell(workload: ModuleType, key: str, value: Any) -> str:
    fmt = getattr(workload, "FORMATS", {}).get(key) or KEY_FORMATS.get(key, number)
    return "—" if value is None else fmt(value)


def status(workload: ModuleType, row: Row) -> str:
    """The runs column: how many succeeded, the first failure, the workload's own note."""
    runs, ok = row.runs, row.ok
    if not runs:
        return "not run"
    if not ok:
        first = runs[0]
        word = "skipped" if first.get("skipped") else "FAILED"
        return f"{word} 0/{len(runs)}: {short_error(first, 160)}"
    text = f"{len(ok)}/{len(runs)} ok"
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        text += ": " + short_error(failed[0], 70)
    row_note = getattr(workload, "row_note", None)
    extra = row_note(runs) if row_note else ""
    return f"{text}; {extra}" if extra else text


def render(workload: ModuleType, rows: Sequence[Row], *, command: str, repeat: int,
           title: str | None = None) -> str:
    """The markdown report."""
    headline_title = dict(workload.COLUMNS)[workload.HEADLINE]
    setups = getattr(workload, "SETUP_LABELS", {})
    table_rows = []
    for row in rows:
        cells = [str(row.case["label"]), setups.get(row.case["setup"], row.case["setup"])]
        for key, _ in workload.COLUMNS:
            cells.append(cell(workload, key, row.values[key]))
            if key == workload.HEADLINE:
                cells.append("—" if row.low_high is None else
                             "–".join(cell(workload, key, v) for v in row.low_high))
        cells.append("—" if row.ratio is None else f"{row.ratio:.2f}x")
        cells.append(status(workload, row))
        table_rows.append(cells)
    headers = ["case", "setup"]
    for key, column in workload.COLUMNS:
        headers.append(column)
        if key == workload.HEADLINE:
            headers.append(f"{column} min–max")
    headers += ["vs baseline", "runs"]
    notes_of = getattr(workload, "notes", None)
    notes = list(notes_of([row.case for row in rows])) if notes_of else []
    better = "higher" if workload.HIGHER_IS_BETTER else "lower"
    notes.append(
        f"Medians of {repeat} repeat(s) over the successful runs; every case in a fresh "
        "process, the setups of a case interleaved. vs baseline = the row's "
        f"{headline_title} over that of the first setup of its case ({better} is better).")
    notes.append(f"Machine (shared and noisy, RabbitMQ on the same cores): {machine_line()}.")
    return (f"# {title or workload.TITLE}\n\n`{command}`\n\n"
            + markdown_table(headers, table_rows) + "\n\n"
            + "\n".join(f"- {note}" for note in notes) + "\n")


def to_json(workload: ModuleType, results: Sequence[CaseRuns], *, command: str) -> str:
    return json.dumps({
        "name": workload.NAME, "title": workload.TITLE, "command": command,
        "machine": machine_line(),
        "cases": [{"case": item.case, "runs": item.runs} for item in results],
    }, indent=1, default=str)


# --------------------------------------------------------------------------------------- plots


def plot(workload: ModuleType, rows: Sequence[Row], stem: Path) -> list[Path]:
    """One PNG per ``PLOTS`` entry: the median per x with min–max bars, a line per setup and
    series; an x where a line has no successful run is marked with a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = workload.PLOT_X
    setups = getattr(workload, "SETUP_LABELS", {})
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        lines.setdefault((row.case["setup"], str(row.case.get("series", ""))), []).append(row)
    ticks = sorted({row.case[x_key] for row in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    setup_color = {s: colors[i % len(colors)]
                   for i, s in enumerate(dict.fromkeys(r.case["setup"] for r in rows))}
    markers = "os^Dv<>"
    series_marker = {s: markers[i % len(markers)]
                     for i, s in enumerate(dict.fromkeys(k[1] for k in lines))}
    written = []
    for suffix, key, label, log_y in workload.PLOTS:
        fig, ax = plt.subplots(figsize=(8, 5))
        for (setup, series), line_rows in lines.items():
            xs, ys, lo, hi = [], [], [], []
            for row in sorted(line_rows, key=lambda r: r.case[x_key]):
                values = _numbers(row.ok, key)
                if not values:
                    if not row.ok:
                        ax.axvline(row.case[x_key], color=setup_color[setup], alpha=0.25,
                                   linestyle=":")
                    continue
                med = statistics.median(values)
                xs.append(row.case[x_key])
                ys.append(med)
                lo.append(med - min(values))
                hi.append(max(values) - med)
            if xs:
                name = setups.get(setup, setup) + (f", {series}" if series else "")
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=series_marker[series] + "-",
                            color=setup_color[setup], label=name, capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs {x_key} (median, min–max bars; dotted: no successful run)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(workload: ModuleType, results: Sequence[CaseRuns], *, output: Path, command: str,
          repeat: int, title: str | None = None) -> tuple[str, list[Path]]:
    """Write ``output`` (markdown), its ``.json`` and the plots; the text and the paths."""
    rows = summarise(workload, results)
    text = render(workload, rows, command=command, repeat=repeat, title=title)
    write_result(output, text)
    raw = output.with_suffix(".json")
    write_result(raw, to_json(workload, results, command=command))
    written = [output, raw]
    if getattr(workload, "PLOTS", None):
        try:
            written += plot(workload, rows, output.with_suffix(""))
        except Exception as exc:  # noqa: BLE001 - the table is the main output
            print(f"warning: plots failed: {exc}", file=sys.stderr)
    return text, written
