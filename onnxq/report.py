"""Report writers (JSON, Markdown, JUnit XML, self-contained HTML) for plain report dicts."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from onnxq.io import atomic_write

__all__ = [
    "Sections",
    "Table",
    "find_section",
    "json_safe",
    "render_html",
    "render_junit",
    "render_markdown",
    "render_text",
    "sections",
    "tables",
    "write_html",
    "write_json",
    "write_junit",
    "write_markdown",
]

logger = logging.getLogger(__name__)

# Report dicts may nest the results of other commands under these keys (a gate report holds
# its "eval" and "bench" reports, a compile report its verification).
_NESTED = ("eval", "bench", "verification")
# Per-layer charts and tables show the worst tensors only; the JSON keeps them all.
PER_LAYER_SHOWN = 30
# Op histograms in the model table show the most frequent op types only.
OPS_SHOWN = 8


def find_section(report: Mapping, key: str) -> Any:
    """Returns ``report[key]``, else the first ``report[nested][key]`` (None when absent)."""
    if report.get(key) is not None:
        return report[key]
    for nested in _NESTED:
        sub = report.get(nested)
        if isinstance(sub, Mapping) and sub.get(key) is not None:
            return sub[key]
    return None


@dataclasses.dataclass(frozen=True)
class Sections:
    """The parts of a report the writers render, each where its kind of report keeps it.

    Read once by ``sections`` (the one place that knows that a gate report nests its
    ``eval`` and ``bench`` reports); the tables and plots only read these fields.

    Attributes:
        checks: Gate checks (``name``, ``status``, ``value``, ``threshold``, ...).
        accuracy: Top-1/top-5 of reference and candidate (eval).
        fidelity: Per-output error metrics (eval; a compile report's ``outputs``), or None
            when unchecked.
        results: Latency results (bench).
        model_info: Per-model size, memory and optimized-op histogram (bench).
        passes: Per-pass records (compile).
        coverage: Op type -> ``{quantized, total}`` (compile).
        per_layer: Per-tensor errors, worst first (eval).
        criteria: The fidelity criteria checked, one per output view (compile).
        precision: The mixed-precision decision: status, fp32 islands, reason (compile).
        latency: Batch-1 timings of the input, optimised fp32 and int8 (compile).
        placement: The latency step: model written and why, units reverted, CPU (compile).
        comparison: One row per model: size, parameters, MACs, accuracy, fidelity, latency
            and Pareto fronts (compare).
        fleet: One entry per model: status, reason, compile and gate reports (fleet).
    """

    checks: list[Mapping] | None = None
    accuracy: Mapping | None = None
    fidelity: Mapping | None = None
    results: list[Mapping] | None = None
    model_info: list[Mapping] | None = None
    passes: list[Mapping] | None = None
    coverage: Mapping | None = None
    per_layer: list[Mapping] | None = None
    criteria: list[Mapping] | None = None
    precision: Mapping | None = None
    latency: Mapping | None = None
    placement: Mapping | None = None
    comparison: list[Mapping] | None = None
    fleet: list[Mapping] | None = None


def sections(report: Mapping) -> Sections:
    """Reads the renderable sections of any onnxq report (compile, eval, bench, gate)."""
    fidelity = find_section(report, "fidelity")
    criteria = fidelity.get("checks") if isinstance(fidelity, Mapping) else None
    if fidelity and "outputs" in fidelity:  # a compile report: per-output metrics under it
        fidelity = fidelity["outputs"]
    if fidelity and fidelity.get("checked") is False:
        fidelity = None
    return Sections(
        checks=report.get("checks") or None,
        **{
            f.name: find_section(report, f.name) or None
            for f in dataclasses.fields(Sections)
            if f.name not in ("checks", "fidelity", "criteria", "fleet")
        },
        fidelity=fidelity or None,
        criteria=criteria or None,
        # A bench report's "models" are paths: only a fleet report's are entries.
        fleet=report.get("models") if report.get("kind") == "fleet" else None,
    )


def json_safe(value: Any) -> Any:
    """Makes a report strictly JSON-compatible: non-finite floats become "inf"/"-inf"/"nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def write_json(report: Mapping, path: str | os.PathLike) -> None:
    """Writes a report as indented, strict JSON, atomically."""
    text = json.dumps(json_safe(report), indent=2, allow_nan=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    logger.info("Wrote %s", path)


# ----------------------------------------------------------------------------- tables


class Table:
    """A titled table: the common form of every report section the writers render.

    Attributes:
        title: Section heading.
        headers: Column names.
        rows: Cell texts, one list per row.
    """

    def __init__(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.title = title
        self.headers = list(headers)
        self.rows = [list(r) for r in rows]


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(pair: Sequence | None, digits: int = 3) -> str:
    return f"[{_num(pair[0], digits)}, {_num(pair[1], digits)}]" if pair else "-"


def _ms(value: float | str | None) -> str:
    # Significant digits, not decimals: latencies range from microseconds to seconds.
    return f"{value:.4g}" if isinstance(value, (int, float)) else _num(value)


def _ms_ci(value: float, pair: Sequence) -> str:
    return f"{_ms(value)} [{_ms(pair[0])}, {_ms(pair[1])}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} KB"


def _rows_table(
    title: str,
    headers: Sequence[str],
    items: Sequence[Mapping] | None,
    row: Callable[[Mapping], list[str]],
) -> Table | None:
    """A table of ``row(item)`` per item; None (no section) when there are no items."""
    return Table(title, headers, [row(i) for i in items]) if items else None


def _checks_table(found: Sections) -> Table | None:
    headers = ["check", "status", "value", "threshold", "95% CI", "P(holds)", "detail"]
    return _rows_table(
        "Gate checks",
        headers,
        found.checks,
        lambda c: [
            c["name"],
            c["status"].upper(),
            _num(c.get("value")),
            _num(c.get("threshold")),
            _ci(c.get("ci95")),
            _num(c.get("probability")),
            c.get("message", ""),
        ],
    )


def _bench_table(found: Sections) -> Table | None:
    results = found.results
    if not results:
        return None
    rows = [
        [
            r["provider"],
            os.path.basename(r["model"]),
            str(r["batch"]),
            _ms_ci(r["p50_ms"], r["p50_ci95_ms"]),
            _ms(r["p90_ms"]),
            _ms(r["p99_ms"]),
            _num(r["throughput_per_s"], 1),
            f"{_num(r['ratio_vs_first'])} {_ci(r['ratio_ci95'])}",
            f"{_num(r['speedup_vs_first'], 2)}x {_ci(r['speedup_ci95'], 2)}",
            str(r["runs"]),
        ]
        for r in results
    ]
    headers = [
        "provider",
        "model",
        "batch",
        "p50 ms [95% CI]",
        "p90 ms",
        "p99 ms",
        "samples/s",
        "ratio vs first [95% CI]",
        "speedup vs first [95% CI]",
        "runs",
    ]
    return Table("Latency", headers, rows)


def _model_info_table(found: Sections) -> Table | None:
    infos = found.model_info
    if not infos:
        return None
    rows = []
    for i in infos:
        mem = i.get("peak_rss_delta_bytes")
        ops = _op_list(i.get("op_histogram", {}))
        rows.append(
            [
                i["provider"],
                os.path.basename(i["path"]),
                f"{i['size_bytes'] / 1e6:.3f}",
                "-" if mem is None else f"{mem / 1e6:.1f}",
                ops or "-",
                "; ".join(i.get("warnings") or []) or "-",
            ]
        )
    headers = ["provider", "model", "size MB", "peak RSS delta MB", "optimized ops", "warnings"]
    return Table("Models", headers, rows)


def _op_list(histogram: Mapping[str, int]) -> str:
    """The most frequent ops, and how many more there are (the JSON keeps them all)."""
    items = list(histogram.items())
    shown = ", ".join(f"{op}:{n}" for op, n in items[:OPS_SHOWN])
    return shown + (f", +{len(items) - OPS_SHOWN} more" if len(items) > OPS_SHOWN else "")


def _accuracy_table(found: Sections) -> Table | None:
    acc = found.accuracy
    if not acc:
        return None
    rows = [
        [who, _pct(acc[who]["top1"]), _pct(acc[who]["top5"]), str(acc[who]["samples"])]
        for who in ("reference", "candidate")
    ]
    rows.append(["top-1 drop (points)", _num(acc.get("top1_drop_points")), "", ""])
    return Table("Accuracy", ["model", "top-1", "top-5", "samples"], rows)


def _fidelity_table(found: Sections) -> Table | None:
    fid = found.fidelity
    if not fid:
        return None
    rows = [
        [
            name,
            _num(f["sqnr_db"], 2),
            _num(f["cosine"], 6),
            _num(f["max_abs_error"], 6),
            _pct(f.get("top1_agreement")),
        ]
        for name, f in fid.items()
    ]
    return Table(
        "Fidelity", ["output", "SQNR dB", "cosine", "max abs error", "top-1 agreement"], rows
    )


def _per_layer_table(found: Sections) -> Table | None:
    layers = found.per_layer
    if not layers:
        return None
    rows = [
        [r["tensor"], _num(r["sqnr_db"], 2), _num(r["cosine"], 6), _num(r["max_abs_error"], 6)]
        for r in layers[:PER_LAYER_SHOWN]
    ]
    title = f"Per-layer error (worst {len(rows)} of {len(layers)})"
    return Table(title, ["tensor", "SQNR dB", "cosine", "max abs error"], rows)


def _passes_table(found: Sections) -> Table | None:
    headers = ["pass", "modified", "seconds", "nodes before", "nodes after", "why"]
    return _rows_table(
        "Passes",
        headers,
        found.passes,
        lambda p: [
            p["name"],
            "yes" if p.get("modified") else "no",
            _num(p.get("seconds"), 4),
            _num(p.get("nodes_before")),
            _num(p.get("nodes_after")),
            p.get("why") or "-",
        ],
    )


def _coverage_table(found: Sections) -> Table | None:
    cov = found.coverage
    if not cov:
        return None
    rows = [
        [
            op,
            str(c["quantized"]),
            str(c["total"]),
            _pct(c["quantized"] / c["total"] if c["total"] else None),
        ]
        for op, c in cov.items()
    ]
    return Table("Quantized-node coverage", ["op", "quantized", "total", "coverage"], rows)


def _criteria_table(found: Sections) -> Table | None:
    return _rows_table(
        "Fidelity criteria",
        ["output (part)", "check", "value", "floor", ""],
        found.criteria,
        lambda c: [
            c["view"],
            c["kind"],
            _num(c.get("value"), 4),
            _num(c.get("floor")),
            "PASS" if c["passed"] else "FAIL",
        ],
    )


def _precision_table(found: Sections) -> Table | None:
    """The fp32 islands the accuracy search kept, or why the model stayed fp32."""
    precision = found.precision
    if not precision or precision.get("status") == "int8":
        return None
    if precision["status"] == "fp32":
        return Table("Precision: fp32 written, not int8", ["reason"], [[precision["reason"]]])
    islands = precision["fp32_islands"]
    rows = [
        [
            i["unit"],
            ", ".join(i["nodes"]),
            _num(i["cost_db"], 1),
            _num(i.get("gain_sqnr_db"), 1),
            _num(i.get("gain_agreement_points"), 2),
        ]
        for i in islands
    ]
    title = (
        f"Mixed precision: {len(islands)} of {precision['units']} int8 ranges kept fp32 "
        f"({len(precision['trials'])} trials, {_num(precision['seconds'], 1)} s)"
    )
    headers = ["range", "nodes kept fp32", "local cost dB", "gain dB", "gain agreement pts"]
    return Table(title, headers, rows)


def _latency_table(found: Sections) -> Table | None:
    """int8 against the input and against onnxq's optimised fp32 at batch 1; what shipped."""
    latency, placement = found.latency, found.placement
    if not latency or not placement:
        return None
    rows = [
        ["input (as given)", _ms(latency["input_p50_ms"]), "", ""],
        ["optimised fp32", _ms(latency["fp32_p50_ms"]), "", ""],
        [
            "int8",
            _ms(latency["int8_p50_ms"]),
            f"{_num(latency['speedup'], 2)}x {_ci(latency['speedup_ci95'], 2)}",
            f"{_num(latency['speedup_vs_fp32'], 2)}x {_ci(latency['speedup_vs_fp32_ci95'], 2)}",
        ],
    ]
    cpu = placement.get("cpu", {})
    reverted = ", ".join(placement.get("reverted", {})) or "none"
    title = (
        f"Latency at batch 1: wrote {placement['emitted']} ({placement['reason']}); "
        f"kept fp32 for latency: {reverted}; CPU {cpu.get('model')} "
        f"({' '.join(cpu.get('isa', []))})"
    )
    return Table(title, ["model", "p50 ms", "int8 speedup vs input", "vs optimised fp32"], rows)


def _comparison_table(found: Sections) -> Table | None:
    """One row per compared model; latency columns per batch size, speedups vs the first."""
    rows = found.comparison
    if not rows:
        return None
    batches = list(rows[0]["latency"])
    headers = ["model", "size", "zipped", "params", "MACs", "top-1 [95% CI]", "SQNR dB"]
    headers += ["agreement"]
    for b in batches:
        headers += [f"p50 ms b{b} [95% CI]", f"speedup b{b} [95% CI]"]
    headers.append("Pareto")
    cells = []
    for r in rows:
        acc, fid = r.get("accuracy"), r.get("fidelity")
        row = [
            os.path.basename(r["model"]),
            _size(r["size_bytes"]),
            _size(r["zipped_bytes"]),
            f"{r['parameters']:,}",
            "-" if r.get("macs") is None else f"{r['macs']:,}",
            f"{_pct(acc['top1'])} {_ci([100 * v for v in acc['top1_ci95']], 2)}" if acc else "-",
            _num(fid["sqnr_db"], 2) if fid else "reference",
            _pct(fid["top1_agreement"]) if fid else "reference",
        ]
        for b in batches:
            lat = r["latency"].get(b)
            row += (
                [
                    _ms_ci(lat["p50_ms"], lat["p50_ci95_ms"]),
                    f"{_num(lat['speedup'], 2)}x {_ci(lat['speedup_ci95'], 2)}",
                ]
                if lat
                else ["-", "-"]
            )
        row.append(", ".join(r.get("pareto") or []) or "-")
        cells.append(row)
    return Table("Compression evaluation", headers, cells)


def _fleet_table(found: Sections) -> Table | None:
    """One row per fleet model: its outcome, what was written, its gate and why it failed."""

    def row(e: Mapping) -> list[str]:
        compiled, gate = e.get("compile"), e.get("gate")
        return [
            e["name"],
            e["status"].upper(),
            os.path.basename(e["output"]) if e.get("written") else "not written",
            f"{_size(compiled['size_before'])} -> {_size(compiled['size_after'])}"
            if compiled
            else "-",
            gate["summary"] if gate else "-",
            _num(e.get("seconds"), 1),
            e.get("worker") or "-",
            e.get("reason") or "",
        ]

    headers = ["model", "status", "output", "size", "gate", "seconds", "worker", "reason"]
    return _rows_table("Fleet", headers, found.fleet, row)


_TABLES: tuple[Callable[[Sections], Table | None], ...] = (
    _fleet_table,
    _comparison_table,
    _checks_table,
    _accuracy_table,
    _precision_table,
    _latency_table,
    _criteria_table,
    _fidelity_table,
    _bench_table,
    _model_info_table,
    _passes_table,
    _coverage_table,
    _per_layer_table,
)


def tables(report: Mapping) -> list[Table]:
    """Returns the tables of every known section present in the report, in display order."""
    found = sections(report)
    return [t for make in _TABLES if (t := make(found)) is not None]


def _title(report: Mapping) -> str:
    status = report.get("status")
    kind = report.get("kind", "onnxq")
    return f"onnxq {kind} report" + (f": {status.upper()}" if status else "")


# ----------------------------------------------------------------------------- text


def render_text(report: Mapping) -> str:
    """Renders the report's tables as aligned plain text, for a terminal."""
    blocks = []
    for table in tables(report):
        grid = [table.headers, *table.rows]
        widths = [max(len(row[i]) for row in grid) for i in range(len(table.headers))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in grid
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append(f"{table.title}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Mapping) -> str:
    """Renders a report as a Markdown summary with one table per section."""
    lines = [f"# {_title(report)}", ""]
    if report.get("summary"):
        lines += [report["summary"], ""]
    for table in tables(report):
        lines += [
            f"## {table.title}",
            "",
            "| " + " | ".join(table.headers) + " |",
            "|" + "---|" * len(table.headers),
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        lines.append("")
    return "\n".join(lines)


def write_markdown(report: Mapping, path: str | os.PathLike) -> None:
    """Writes ``render_markdown(report)`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(render_markdown(report))
    logger.info("Wrote %s", path)


# ----------------------------------------------------------------------------- junit


def _junit_cases(report: Mapping) -> tuple[str, list[tuple[Mapping, str, str]]]:
    """The suite name and ``(detail, status, message)`` per test case of a report.

    A gate report has one case per threshold, a fleet report one per model (its detail
    without the nested compile and gate reports, which the JSON report holds).
    """
    if report.get("kind") == "fleet":
        cases = [
            ({k: v for k, v in e.items() if k not in ("compile", "gate")}, e["status"], e["reason"])
            for e in report.get("models") or []
        ]
        return "onnxq.fleet", cases
    checks = report.get("checks") or []
    return "onnxq.gate", [(c, c["status"], c.get("message", c["status"])) for c in checks]


def render_junit(report: Mapping, suite: str | None = None) -> str:
    """Renders a gate report's checks or a fleet report's models as JUnit XML.

    A gate check whose status is not ``pass`` (``fail`` or ``inconclusive``) is a failure
    whose message says why; so is a fleet model whose gate failed, while a model that did
    not compile is an error.
    """
    default_suite, cases = _junit_cases(report)
    suite = suite or default_suite
    errors = sum(status == "error" for _, status, _ in cases)
    failures = sum(status not in ("pass", "error") for _, status, _ in cases)
    root = ET.Element("testsuites", name="onnxq", tests=str(len(cases)), failures=str(failures))
    if errors:
        root.set("errors", str(errors))
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
    )
    for detail, status, message in cases:
        case = ET.SubElement(ts, "testcase", classname=suite, name=detail["name"])
        if status != "pass":
            tag = "error" if status == "error" else "failure"
            failure = ET.SubElement(case, tag, message=message or status, type=status)
            failure.text = json.dumps(json_safe(detail), indent=2)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(report: Mapping, path: str | os.PathLike) -> None:
    """Writes ``render_junit(report)`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(render_junit(report))
    logger.info("Wrote %s", path)


# ----------------------------------------------------------------------------- html


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;font-size:14px}th{background:#f3f3f3}.PASS{color:#080}.FAIL{color:#b00}
.INCONCLUSIVE{color:#b60}img{max-width:100%}.note{color:#666;font-style:italic}"""


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{html.escape(c)}">{html.escape(c)}</td>' for c in row)
        + "</tr>"
        for row in table.rows
    )
    return f"<h2>{html.escape(table.title)}</h2><table><tr>{head}</tr>{body}</table>"


def _figure_png(draw: Callable[[Any], None], height: float = 3.5) -> str:
    from matplotlib.figure import Figure  # Figure without pyplot: no global state or GUI

    fig = Figure(figsize=(9, height), layout="tight")
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_timeline(passes: Sequence[Mapping]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        start = 0.0
        for i, p in enumerate(passes):
            secs = float(p.get("seconds") or 0.0)
            ax.barh(i, secs, left=start, color="tab:orange" if p.get("modified") else "tab:gray")
            start += secs
        ax.set_yticks(range(len(passes)), [p["name"] for p in passes])
        ax.invert_yaxis()
        ax.set_xlabel("seconds (orange: pass modified the graph)")

    return draw


def _plot_coverage(cov: Mapping[str, Mapping]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        ops = list(cov)
        ax.bar(ops, [cov[o]["total"] for o in ops], color="lightgray", label="total")
        ax.bar(ops, [cov[o]["quantized"] for o in ops], color="tab:blue", label="quantized")
        ax.tick_params(axis="x", rotation=45)
        ax.set_ylabel("nodes")
        ax.legend()

    return draw


def _plot_latency(results: Sequence[Mapping]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        labels = [f"{os.path.basename(r['model'])}\n{r['provider']} b{r['batch']}" for r in results]
        data = [r["samples_ms"] for r in results]
        try:
            ax.boxplot(data, orientation="horizontal", showfliers=False)
        except TypeError:  # matplotlib < 3.10 names it vert=False
            ax.boxplot(data, vert=False, showfliers=False)
        ax.set_yticks(range(1, len(results) + 1), labels)
        ax.set_xlabel("latency ms (box: quartiles, whiskers: 1.5 IQR)")

    return draw


def _plot_per_layer(layers: Sequence[Mapping]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        # Identical tensors have infinite SQNR; draw them at a visible cap instead.
        values = [min(float(r["sqnr_db"]), 100.0) for r in layers]
        ax.barh(range(len(layers)), values, color="tab:red")
        ax.set_yticks(range(len(layers)), [r["tensor"] for r in layers], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR dB (worst first; capped at 100)")

    return draw


def _plot_tradeoff(
    rows: Sequence[Mapping],
    cost: Callable[[Mapping], tuple[float, float, float] | None],
    front: str,
) -> Callable[[Any], None]:
    """Quality (top-1 or agreement) against a cost, with CIs; the Pareto front joined."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        points = []
        for r in rows:
            c, q = cost(r), r.get("quality")
            if c is None or q is None:
                continue
            acc = r.get("accuracy")
            lo, hi = acc["top1_ci95"] if acc else (q, q)
            on_front = front in (r.get("pareto") or [])
            ax.errorbar(
                c[0],
                100 * q,
                xerr=[[c[0] - c[1]], [c[2] - c[0]]],
                yerr=[[100 * (q - lo)], [100 * (hi - q)]],
                fmt="o",
                color="tab:red" if on_front else "tab:blue",
                capsize=3,
            )
            ax.annotate(
                os.path.basename(r["model"]),
                (c[0], 100 * q),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
            if on_front:
                points.append((c[0], 100 * q))
        if len(points) > 1:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, color="tab:red", linestyle="--", label="Pareto front")
            ax.legend()
        ax.set_xlabel(_COST_LABELS[front])
        ax.set_ylabel("top-1 % (without labels: agreement %)")
        ax.set_title("red: on the Pareto front; bars: 95% CIs", fontsize=9)

    return draw


_COST_LABELS = {"latency": "p50 latency ms (95% CI)", "size": "size on disk, bytes"}


def _plots(found: Sections) -> Iterator[tuple[str, Callable[[Any], None], float]]:
    if rows := found.comparison:
        batch = next(iter(rows[0]["latency"]), None)

        def latency(r: Mapping) -> tuple[float, float, float] | None:
            lat = r["latency"].get(batch)
            return (lat["p50_ms"], *lat["p50_ci95_ms"]) if lat else None

        def size(r: Mapping) -> tuple[float, float, float]:
            return (r["size_bytes"],) * 3

        yield f"Accuracy vs latency (batch {batch})", _plot_tradeoff(rows, latency, "latency"), 4
        yield "Accuracy vs size", _plot_tradeoff(rows, size, "size"), 4
    if passes := found.passes:
        yield "Pass timeline", _plot_timeline(passes), 0.8 + 0.3 * len(passes)
    if cov := found.coverage:
        yield "Quantized-node coverage", _plot_coverage(cov), 3.5
    results = [r for r in found.results or [] if r.get("samples_ms")]
    if results:
        yield "Latency distributions", _plot_latency(results), 1.0 + 0.5 * len(results)
    if layers := found.per_layer:
        shown = layers[:PER_LAYER_SHOWN]
        yield "Per-layer error", _plot_per_layer(shown), 1.0 + 0.2 * len(shown)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_html(report: Mapping) -> str:
    """Renders a self-contained HTML page: tables, plus plots when matplotlib is importable.

    Sections appear for what the report holds: ``checks`` (gate), ``passes`` (list of
    ``{name, modified, seconds, nodes_before, nodes_after}``), ``coverage`` (op type ->
    ``{quantized, total}``), bench ``results`` (latency distributions from ``samples_ms``),
    and ``per_layer`` errors; each may also sit under a nested ``eval``/``bench`` report.
    """
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(_title(report))}"
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(_title(report))}</h1>"
    ]
    if report.get("summary"):
        parts.append(f"<p>{html.escape(report['summary'])}</p>")
    if _matplotlib_available():
        for title, draw, height in _plots(sections(report)):
            parts.append(
                f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                f"src='{_figure_png(draw, height)}'>"
            )
    else:
        parts.append(
            "<p class='note'>matplotlib is not installed: plots are left out, "
            "tables only (pip install onnxq[plot]).</p>"
        )
    parts.extend(_html_table(t) for t in tables(report))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: Mapping, path: str | os.PathLike) -> None:
    """Writes ``render_html(report)`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(render_html(report))
    logger.info("Wrote %s", path)
