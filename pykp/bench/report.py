"""From raw samples to figures: medians with spreads, per-round ratios, the issue's targets.

Every figure is the median over rounds with its range (min-max). Ratios compare pykp with
a baseline measured in the same run: computed per round (pykp's sample of round r over the
baseline's of round r, taken minutes apart at most) and summarised the same way. A ratio
is always pykp / baseline; for times (latency, CPU, programming, propagation) lower is
better, so a target "100x faster" is a ratio <= 0.01.

A metric may be compared with another metric of the baselines (`Metric.compare`): pykp fed
through the Kubernetes source (``kube_*``) against kube-proxy's rule sets loaded from a
file, which have no Kubernetes source here: its EndpointSlice-change p50 and p99 over their
`propagation`, its start over their `program`. Some targets bound a figure itself (a
latency in seconds) rather than a ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["METRICS", "Metric", "plot", "render", "summarize"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    source: str  # the sample list it comes from
    extract: Callable[[dict[str, Any]], float | None]
    unit: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"
    compare: str | None = None  # the baselines' metric it is divided by (default: itself)


def _lat(field: str, q: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda s: s[field][q] / 1000.0 if s.get("ok") else None


METRICS: tuple[Metric, ...] = (
    Metric(
        "conns_end", "new conn/s, last service", "conns_end", lambda s: s["conns_per_s"], "/s", True
    ),
    Metric(
        "conns_random",
        "new conn/s, random services",
        "conns_random",
        lambda s: s["conns_per_s"],
        "/s",
        True,
    ),
    Metric(
        "lat_p50",
        "connect p50 at fixed rate",
        "rate_end",
        _lat("connect_us", "p50"),
        "ms",
        False,
        "{:.3f}",
    ),
    Metric(
        "lat_p90",
        "connect p90 at fixed rate",
        "rate_end",
        _lat("connect_us", "p90"),
        "ms",
        False,
        "{:.3f}",
    ),
    Metric(
        "lat_p99",
        "connect p99 at fixed rate",
        "rate_end",
        _lat("connect_us", "p99"),
        "ms",
        False,
        "{:.3f}",
    ),
    Metric(
        "req_p99",
        "request p99 at fixed rate",
        "rate_end",
        _lat("total_us", "p99"),
        "ms",
        False,
        "{:.3f}",
    ),
    Metric(
        "sat_p99",
        "connect p99, saturated (last svc)",
        "conns_end",
        _lat("connect_us", "p99"),
        "ms",
        False,
        "{:.3f}",
    ),
    Metric(
        "cpu",
        "CPU s per 1000 conns (fixed rate, less background)",
        "rate_end",
        lambda s: s["cpu"]["per_1000_net"],
        "s",
        False,
        "{:.4f}",
    ),
    Metric(
        "cpu_machine",
        "CPU s per 1000 conns (fixed rate, whole machine)",
        "rate_end",
        lambda s: s["cpu"]["per_1000"],
        "s",
        False,
        "{:.4f}",
    ),
    Metric(
        "cpu_sat",
        "CPU s per 1000 conns (saturated)",
        "conns_end",
        lambda s: s["cpu"]["per_1000"],
        "s",
        False,
        "{:.4f}",
    ),
    Metric(
        "tput_1",
        "throughput, 1 stream",
        "tput_1",
        lambda s: s["bits_per_second"] / 1e9,
        "Gbit/s",
        True,
        "{:.2f}",
    ),
    Metric(
        "tput_2",
        "throughput, 2 streams",
        "tput_2",
        lambda s: s["bits_per_second"] / 1e9,
        "Gbit/s",
        True,
        "{:.2f}",
    ),
    Metric(
        "tput_4",
        "throughput, 4 streams",
        "tput_4",
        lambda s: s["bits_per_second"] / 1e9,
        "Gbit/s",
        True,
        "{:.2f}",
    ),
    Metric(
        "tput_8",
        "throughput, 8 streams",
        "tput_8",
        lambda s: s["bits_per_second"] / 1e9,
        "Gbit/s",
        True,
        "{:.2f}",
    ),
    Metric(
        "program", "program all services", "program", lambda s: s["seconds"], "s", False, "{:.3f}"
    ),
    Metric(
        "propagation",
        "endpoint change -> first conn",
        "propagation",
        lambda s: s["seconds"],
        "s",
        False,
        "{:.3f}",
    ),
    Metric(
        "kube_start",
        "kube: agent start -> last service answers",
        "kube_start",
        lambda s: s["seconds"],
        "s",
        False,
        "{:.3f}",
        "program",
    ),
    Metric(
        "kube_synced",
        "kube: agent start -> first sync done",
        "kube_start",
        lambda s: s["synced_seconds"] if s.get("syncs") == 1 else None,
        "s",
        False,
        "{:.3f}",
    ),
    Metric(
        "kube_sync",
        "kube: the first sync's own duration",
        "kube_start",
        lambda s: s["sync_seconds"],
        "s",
        False,
        "{:.3f}",
    ),
    Metric(
        "kube_rss",
        "kube: agent RSS after the first sync",
        "kube_start",
        lambda s: s["rss_kib"] / 1024,
        "MiB",
        False,
        "{:.1f}",
    ),
    Metric(
        "kube_change_p50",
        "kube: EndpointSlice change -> first conn, p50",
        "kube_change",
        lambda s: s["p50"],
        "s",
        False,
        "{:.4f}",
        "propagation",
    ),
    Metric(
        "kube_change_p99",
        "kube: EndpointSlice change -> first conn, p99",
        "kube_change",
        lambda s: s["p99"],
        "s",
        False,
        "{:.4f}",
        "propagation",
    ),
    Metric(
        "kube_new",
        "kube: new Service -> first conn",
        "kube_new",
        lambda s: s["seconds"],
        "s",
        False,
        "{:.4f}",
    ),
    Metric(
        "fault_kill",
        "failed conns, agent killed + restarted",
        "fault_kill",
        lambda s: s["failed"],
        "",
        False,
    ),
    Metric(
        "fault_kill_gap",
        "longest gap, agent killed + restarted",
        "fault_kill",
        lambda s: s["max_gap_us"] / 1000,
        "ms",
        False,
        "{:.1f}",
    ),
    Metric(
        "fault_stop",
        "failed conns, agent stopped 5 s",
        "fault_stop",
        lambda s: s["failed"],
        "",
        False,
    ),
    Metric(
        "fault_stop_gap",
        "longest gap, agent stopped 5 s",
        "fault_stop",
        lambda s: s["max_gap_us"] / 1000,
        "ms",
        False,
        "{:.1f}",
    ),
    Metric(
        "fault_flush",
        "failed conns, nft flush ruleset",
        "fault_flush",
        lambda s: s["failed"],
        "",
        False,
    ),
    Metric(
        "fault_flush_gap",
        "longest gap, nft flush ruleset",
        "fault_flush",
        lambda s: s["max_gap_us"] / 1000,
        "ms",
        False,
        "{:.1f}",
    ),
)
_BY_KEY = {m.key: m for m in METRICS}
BASELINES = ("iptables", "nftables", "direct")


def _values(samples: list[dict[str, Any]], metric: Metric) -> dict[int, float]:
    """round -> value (rounds whose sample has no value are left out)."""
    out: dict[int, float] = {}
    for sample in samples:
        try:
            value = metric.extract(sample)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[int(sample.get("round", len(out)))] = float(value)
    return out


def _stats(values: Iterable[float]) -> dict[str, Any] | None:
    vals = sorted(values)
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """{"figures": scale -> metric -> contender -> stats, "ratios": ..., "targets": [...]}"""
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for scale, per_contender in doc["samples"].items():
        figures[scale] = {}
        ratios[scale] = {}
        values: dict[str, dict[str, dict[int, float]]] = {}
        for metric in METRICS:
            row: dict[str, Any] = {}
            for contender, samples in per_contender.items():
                v = _values(samples.get(metric.source, []), metric)
                values.setdefault(metric.key, {})[contender] = v
                st = _stats(v.values())
                if st is not None:
                    row[contender] = st
            if row:
                figures[scale][metric.key] = row
        for contender in per_contender:
            if not contender.startswith("pykp"):
                continue
            table: dict[str, dict[str, Any]] = {}
            for metric in METRICS:
                mine = values.get(metric.key, {}).get(contender, {})
                for base in BASELINES:
                    theirs = values.get(metric.compare or metric.key, {}).get(base, {})
                    per_round = [mine[r] / theirs[r] for r in mine if r in theirs and theirs[r] > 0]
                    st = _stats(per_round)
                    if st is not None:
                        table.setdefault(metric.key, {})[base] = st
            ratios[scale][contender] = table
    return {"figures": figures, "ratios": ratios, "targets": _targets(doc, ratios, figures)}


# (description, metric, baseline (None: the figure itself), scale (None: the first one
# measured), op, bound)
_TARGETS: tuple[tuple[str, str, str | None, int | None, str, float], ...] = (
    ("established throughput, 1 stream, vs iptables", "tput_1", "iptables", None, ">=", 0.98),
    ("established throughput, 1 stream, vs direct", "tput_1", "direct", None, ">=", 0.95),
    ("established throughput, most streams, vs iptables", "tput_max", "iptables", None, ">=", 0.98),
    ("established throughput, most streams, vs direct", "tput_max", "direct", None, ">=", 0.95),
    ("new conn/s at 1 service vs iptables", "conns_end", "iptables", 1, ">=", 0.9),
    ("new conn/s at 10,000 services vs iptables", "conns_end", "iptables", 10000, ">=", 3.0),
    ("connect p99 at 10,000 services vs iptables", "lat_p99", "iptables", 10000, "<=", 0.5),
    ("new conn/s at 10,000 services vs nftables", "conns_end", "nftables", 10000, ">=", 1.0),
    (
        "propagation at 10,000 services vs iptables (100x faster)",
        "propagation",
        "iptables",
        10000,
        "<=",
        0.01,
    ),
    (
        "propagation at 10,000 services vs nftables (faster)",
        "propagation",
        "nftables",
        10000,
        "<",
        1.0,
    ),
    (
        "services file: one entry edited -> new backend at 10,000 services <= 50 ms",
        "propagation",
        None,
        10000,
        "<=",
        0.050,
    ),
    (
        "kube: slice change p50 at 10,000 services <= 15 ms",
        "kube_change_p50",
        None,
        10000,
        "<=",
        0.015,
    ),
    (
        "kube: slice change p99 at 10,000 services <= 50 ms",
        "kube_change_p99",
        None,
        10000,
        "<=",
        0.050,
    ),
    (
        "kube: slice change p50 at 10,000 vs iptables propagation (100x faster)",
        "kube_change_p50",
        "iptables",
        10000,
        "<=",
        0.01,
    ),
    (
        "kube: slice change p50 at 10,000 vs nftables propagation (25x faster)",
        "kube_change_p50",
        "nftables",
        10000,
        "<=",
        0.04,
    ),
    (
        "kube: new Service -> first conn at 10,000 services <= 30 ms",
        "kube_new",
        None,
        10000,
        "<=",
        0.030,
    ),
    (
        "kube: agent start -> 10,000 services programmed <= 2 s",
        "kube_start",
        None,
        10000,
        "<=",
        2.0,
    ),
    (
        "kube: agent start -> 30,000 services programmed <= 6 s",
        "kube_start",
        None,
        30000,
        "<=",
        6.0,
    ),
)


def _targets(
    doc: dict[str, Any], ratios: dict[str, Any], figures: dict[str, Any]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    scales = list(doc["samples"])
    streams = doc.get("settings", {}).get("streams", [1])
    for desc, key, base, scale, op, bound in _TARGETS:
        if key == "tput_max":
            key = f"tput_{max(streams)}"
        where = str(scale) if scale is not None else (scales[0] if scales else None)
        if where is None:
            continue
        if base is None:  # the figure itself, of every pykp contender that has it
            found = [
                (c, st)
                for c, st in figures.get(where, {}).get(key, {}).items()
                if c.startswith("pykp/")
            ]
        else:
            found = [
                (c, table[key][base])
                for c, table in ratios.get(where, {}).items()
                if base in table.get(key, {})
            ]
        for contender, st in found:
            value = st["median"]
            met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            if met:
                gap = ""
            elif op == ">=":
                gap = f"missed: {value / bound:.2f} of the target ({bound / value:.2f}x short)"
            else:
                gap = f"missed: {value / bound:.2f}x the bound"
            is_ratio = base is not None
            out.append(
                {
                    "target": desc,
                    "contender": contender,
                    "scale": int(where),
                    "metric": key,
                    "baseline": base,
                    "kind": "ratio" if is_ratio else "value",
                    "unit": "" if is_ratio else _BY_KEY[key].unit,
                    "value": value,
                    "value_min": st["min"],
                    "value_max": st["max"],
                    "ratio": value if is_ratio else None,
                    "ratio_min": st["min"] if is_ratio else None,
                    "ratio_max": st["max"] if is_ratio else None,
                    "op": op,
                    "bound": bound,
                    "met": met,
                    "note": gap,
                }
            )
    return out


def _target_value(t: dict[str, Any]) -> str:
    unit = f" {t['unit']}" if t.get("unit") else ""
    return f"{t['value']:.3f}{unit} ({t['value_min']:.3f}-{t['value_max']:.3f})"


# --- rendering --------------------------------------------------------------------------------


def _cell(metric: Metric, st: dict[str, Any] | None, *, markup: bool = True) -> str:
    """Median with its range over rounds; `markup` dims the range for the terminal."""
    if st is None:
        return "-"
    med = metric.fmt.format(st["median"])
    if st["n"] < 2:
        return med
    spread = f"({metric.fmt.format(st['min'])}-{metric.fmt.format(st['max'])})"
    return f"{med} [dim]{spread}[/dim]" if markup else f"{med} {spread}"


def _ratio_cell(st: dict[str, Any] | None) -> str:
    if st is None:
        return "-"
    if st["n"] < 2:
        return f"{st['median']:.3f}"
    return f"{st['median']:.3f} [dim]({st['min']:.3f}-{st['max']:.3f})[/dim]"


def render(doc: dict[str, Any], summary: dict[str, Any], console: Console) -> None:
    contenders = list(doc["contenders"])
    for scale, rows in summary["figures"].items():
        table = Table(
            title=f"{int(scale):,} service(s): median over rounds (min-max)",
            title_justify="left",
        )
        table.add_column("metric")
        table.add_column("unit")
        for c in contenders:
            table.add_column(c, justify="right")
        for metric in METRICS:
            if metric.key not in rows:
                continue
            table.add_row(
                metric.label,
                metric.unit,
                *(_cell(metric, rows[metric.key].get(c)) for c in contenders),
            )
        console.print(table)
        for contender, ratio_rows in summary["ratios"].get(scale, {}).items():
            if not ratio_rows:
                continue
            rt = Table(
                title=f"{int(scale):,} service(s): {contender} / baseline, per round: median (min-max)",
                title_justify="left",
            )
            rt.add_column("metric")
            for base in BASELINES:
                rt.add_column(f"/ {base}", justify="right")
            for metric in METRICS:
                if metric.key in ratio_rows:
                    better = "higher" if metric.higher_is_better else "lower"
                    rt.add_row(
                        f"{metric.label} ({better} is better)",
                        *(_ratio_cell(ratio_rows[metric.key].get(b)) for b in BASELINES),
                    )
            console.print(rt)
    if summary["targets"]:
        tt = Table(
            title="issue 5 targets (ratio = pykp / baseline, or the figure itself)",
            title_justify="left",
        )
        for col in ("target", "contender", "ratio or value (min-max)", "bound", "result"):
            tt.add_column(col)
        for t in summary["targets"]:
            tt.add_row(
                t["target"],
                t["contender"],
                _target_value(t),
                f"{t['op']} {t['bound']}",
                "[green]met[/green]" if t["met"] else f"[red]{t['note']}[/red]",
            )
        console.print(tt)
    failures = served_failures(doc)
    if failures:
        console.print("[red]connections not served:[/red] " + "; ".join(failures))


def served_failures(doc: dict[str, Any]) -> list[str]:
    """Every run in which some attempted connection was not served (empty: all served)."""
    out = []
    for scale, per in doc["samples"].items():
        for contender, samples in per.items():
            for source in ("conns_end", "conns_random", "rate_end"):
                for s in samples.get(source, []):
                    if s["failed"] or s["ok"] != s["attempted"]:
                        out.append(
                            f"{scale} svc {contender} {source} round {s.get('round')}: "
                            f"{s['ok']}/{s['attempted']} ({s['errors']})"
                        )
            for source in ("program", "propagation", "kube_start", "kube_new"):
                for s in samples.get(source, []):
                    if not s.get("found"):
                        out.append(
                            f"{scale} svc {contender} {source} round {s.get('round')}: not seen"
                        )
            for s in samples.get("kube_change", []):
                if not s.get("found"):
                    out.append(
                        f"{scale} svc {contender} kube_change round {s.get('round')}: "
                        f"{s.get('missed')} of {s.get('changes')} changes not seen"
                    )
    return out


# --- plot ---------------------------------------------------------------------------------------


def plot(doc: dict[str, Any], summary: dict[str, Any], path: Path) -> str | None:
    """Write a PNG; returns None, or why it was skipped (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pykp[bench]' or pip install matplotlib)"
    contenders = list(doc["contenders"])
    scales = list(summary["figures"])
    panels = [
        ("conns_end", False),
        ("conns_random", False),
        ("lat_p99", False),
        ("cpu", False),
        ("program", True),
        ("propagation", True),
        ("kube_start", True),
        ("kube_change_p50", True),
        ("kube_change_p99", True),
        ("kube_new", True),
        ("kube_rss", False),
        ("tput_1", False),
        (f"tput_{max(doc['settings'].get('streams', [1]))}", False),
    ]
    panels = [(k, log) for k, log in panels if any(k in summary["figures"][s] for s in scales)]
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False)
    width = 0.8 / max(1, len(contenders))
    for ax, (key, log) in zip(axes.flat, panels):
        metric = _BY_KEY[key]
        for i, c in enumerate(contenders):
            xs, meds, lo, hi = [], [], [], []
            for j, s in enumerate(scales):
                st = summary["figures"][s].get(key, {}).get(c)
                if st is None and metric.compare and c in BASELINES:
                    # The baselines' figure this one is compared with (their file-based one).
                    st = summary["figures"][s].get(metric.compare, {}).get(c)
                if st is None:
                    continue
                xs.append(j + (i - (len(contenders) - 1) / 2) * width)
                meds.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            if xs:
                ax.bar(xs, meds, width, yerr=[lo, hi], label=c, capsize=2, color=f"C{i % 10}")
        ax.set_xlim(-0.5, len(scales) - 0.5)
        ax.set_xticks(range(len(scales)))
        ax.set_xticklabels([f"{int(s):,} svc" for s in scales])
        title = f"{metric.label} ({metric.unit})"
        if metric.compare:
            title += f"\nbaselines: their {_BY_KEY[metric.compare].label}"
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{i % 10}", label=c) for i, c in enumerate(contenders)]
    fig.legend(handles=handles, loc="upper center", ncol=len(contenders), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- markdown (for benches/README.md) -------------------------------------------------------


def markdown(doc: dict[str, Any], summary: dict[str, Any]) -> str:
    """The tables of `render` as GitHub markdown."""
    contenders = list(doc["contenders"])
    out: list[str] = []
    for scale, rows in summary["figures"].items():
        out.append(f"\n**{int(scale):,} service(s)**: median over rounds (min-max)\n")
        out.append("| metric | unit | " + " | ".join(contenders) + " |")
        out.append("| --- | --- |" + " ---: |" * len(contenders))
        for metric in METRICS:
            if metric.key in rows:
                cells = [_cell(metric, rows[metric.key].get(c), markup=False) for c in contenders]
                out.append(f"| {metric.label} | {metric.unit} | " + " | ".join(cells) + " |")
        for contender, ratio_rows in summary["ratios"].get(scale, {}).items():
            if not ratio_rows:
                continue
            out.append(
                f"\n{int(scale):,} service(s), **{contender} / baseline** per round: median (min-max)\n"
            )
            out.append("| metric | / iptables | / nftables | / direct |")
            out.append("| --- | ---: | ---: | ---: |")
            for metric in METRICS:
                if metric.key in ratio_rows:
                    cells = []
                    for b in BASELINES:
                        st = ratio_rows[metric.key].get(b)
                        cells.append(
                            "-"
                            if st is None
                            else f"{st['median']:.2f} ({st['min']:.2f}-{st['max']:.2f})"
                        )
                    better = "higher" if metric.higher_is_better else "lower"
                    out.append(
                        f"| {metric.label} ({better} is better) | " + " | ".join(cells) + " |"
                    )
    if summary["targets"]:
        out.append(
            "\n**Issue 5 targets** (ratio = pykp / baseline, median of per-round ratios; "
            "or the figure itself, median over rounds)\n"
        )
        out.append("| target | contender | ratio or value (min-max) | bound | result |")
        out.append("| --- | --- | ---: | --- | --- |")
        for t in summary["targets"]:
            result = "met" if t["met"] else t["note"]
            out.append(
                f"| {t['target']} | {t['contender']} | {_target_value(t)} "
                f"| {t['op']} {t['bound']} | {result} |"
            )
    return "\n".join(out) + "\n"
