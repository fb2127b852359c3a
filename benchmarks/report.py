"""Summaries, the stdout table, the targets check and the PNG plots of a benchmark session."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.scenarios import Scenario, Target


def summarise(side: dict[str, Any]) -> dict[str, Any]:
    """Median and min-max of a side's headline values over its successful runs."""
    values = [r["value"] for r in side["runs"] if r.get("ok")]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def ratio(scenario: dict[str, Any], peer: dict[str, Any]) -> float | None:
    """ours / peer of the medians."""
    ours = scenario["sides"][0]["summary"]["median"]
    theirs = peer["summary"]["median"]
    if ours is None or not theirs:
        return None
    return float(ours / theirs)


def check(target: Target, scenario: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether ``target`` holds in ``scenario`` (None: cannot tell), and the measured figure."""
    ours = scenario["sides"][0]
    if target.kind == "max":
        figures = [r[target.key] for r in ours["runs"] if r.get("ok") and target.key in r]
        if not figures:
            return None, "not measured"
        worst = max(figures)
        return worst < target.bound, f"worst run {worst:.2f}"
    if target.kind == "ref":
        median = ours["summary"]["median"]
        if median is None:
            return None, "not measured"
        r = median / float(target.key)
        return r >= target.bound, f"{r:.1f}x"
    peer = next((s for s in scenario["sides"] if s["label"] == target.key), None)
    r = None if peer is None else ratio(scenario, peer)
    if r is None:
        return None, "peer not measured"
    return r >= target.bound, f"{r:.1f}x"


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit.startswith("ms") or unit.startswith("MiB"):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def table(session: dict[str, Any]) -> str:
    """The human table: one line per side, ratio ours/peer, then the targets."""
    lines = [f"{'scenario':<13} {'side':<36} {'median':>10} {'min-max':>19} "
             f"{'ours/peer':>9} {'runs':>4} {'load':>5}  unit"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for sc in session["scenarios"]:
        for i, side in enumerate(sc["sides"]):
            name = sc["name"] if i == 0 else ""
            summ = side["summary"]
            if side.get("skipped") or not summ["n"]:
                why = side.get("skipped") or _first_error(side)
                lines.append(f"{name:<13} {side['label']:<36} not measured: {why}")
                continue
            spread = f"{_fmt(summ['min'], sc['unit'])}-{_fmt(summ['max'], sc['unit'])}"
            r = None if side["ours"] else ratio(sc, side)
            loads = [run["load"] for run in side["runs"] if "load" in run]
            load = f"{statistics.median(loads):.1f}" if loads else "-"
            lines.append(f"{name:<13} {side['label']:<36} {_fmt(summ['median'], sc['unit']):>10} "
                         f"{spread:>19} {(f'{r:.2f}x' if r else ''):>9} {summ['n']:>4} "
                         f"{load:>5}  {sc['unit']}")  # fmt: skip
        extra = _details(sc)
        if extra:
            lines.append(f"{'':<13} {extra}")
    lines.append("")
    lines.append("targets:")
    for sc in session["scenarios"]:
        for target in sc["targets"]:
            ok, figure = check(Target(**target), sc)
            mark = {True: "MET", False: "NOT MET", None: "UNKNOWN"}[ok]
            lines.append(f"  [{mark:>7}] {sc['name']}: {target['text']} (measured {figure})")
    return "\n".join(lines)


def _first_error(side: dict[str, Any]) -> str:
    errors = [r.get("error", "") for r in side["runs"] if not r.get("ok")]
    return errors[0][:200] if errors else "no run"


def _details(sc: dict[str, Any]) -> str:
    """Secondary figures worth a line: latency p99, memory idle/growth, CPU per task."""
    parts = []
    for side in sc["sides"]:
        runs = [r for r in side["runs"] if r.get("ok")]
        if not runs:
            continue
        if "p99_ms" in runs[0]:
            p99 = statistics.median(r["p99_ms"] for r in runs)
            parts.append(f"{side['label']} p99 {p99:.2f} ms")
        elif "growth_pct" in runs[0]:
            idle = statistics.median(r["idle_mib"] for r in runs)
            growth = max(r["growth_pct"] for r in runs)
            done = min(r["processed"] for r in runs)
            parts.append(f"{side['label']} idle {idle:.0f} MiB, growth {growth:.1f}% "
                         f"over {done:,} msgs")  # fmt: skip
        elif "cpu_us_per_task" in runs[0]:
            cpu = statistics.median(r["cpu_us_per_task"] for r in runs)
            parts.append(f"{side['label']} {cpu:.0f} us CPU/task")
    return "; ".join(parts)


def scenario_record(sc: Scenario) -> dict[str, Any]:
    return {"name": sc.name, "title": sc.title, "unit": sc.unit,
            "higher_is_better": sc.higher_is_better, "note": sc.note,
            "targets": [vars(t) for t in sc.targets],
            "sides": [{"label": s.label, "ours": s.ours, "runs": [], "skipped": None}
                      for s in sc.sides]}  # fmt: skip


# -- plots -----------------------------------------------------------------------------------


def plots(session: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png (bars, min-max whiskers), latency_cdf.png, memory.png, as data allows."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, draw in (("throughput.png", _throughput), ("latency_cdf.png", _latency),
                       ("memory.png", _memory)):  # fmt: skip
        path = out / name
        if draw(session, path):
            written.append(path)
    return written


def _throughput(session: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    scs = [sc for sc in session["scenarios"] if sc["higher_is_better"]
           and any(s["summary"]["n"] for s in sc["sides"])]  # fmt: skip
    if not scs:
        return False
    fig, axes = plt.subplots(
        len(scs),
        1,
        figsize=(9, 1.2 + 1.3 * sum(len(s["sides"]) for s in scs) / len(scs) * len(scs) / 1.6),
        squeeze=False,
    )
    for ax, sc in zip(axes[:, 0], scs, strict=True):
        sides = [s for s in sc["sides"] if s["summary"]["n"]]
        labels = [s["label"] for s in sides][::-1]
        med = [s["summary"]["median"] for s in sides][::-1]
        lo = [m - s["summary"]["min"] for m, s in zip(med, sides[::-1], strict=True)]
        hi = [s["summary"]["max"] - m for m, s in zip(med, sides[::-1], strict=True)]
        colors = ["#d95f02" if s["ours"] else "#7570b3" for s in sides][::-1]
        ax.barh(labels, med, xerr=[lo, hi], color=colors, capsize=4)
        for y, (m, s) in enumerate(zip(med, sides[::-1], strict=True)):
            r = "" if s["ours"] else f"  (ours is {ratio(sc, s) or 0:.1f}x)"
            ax.text(s["summary"]["max"], y, f"  {m:,.0f}{r}", va="center", fontsize=8)
        _target_lines(ax, sc)
        title = textwrap.fill(f"{sc['name']}: {sc['title']}", 110)
        ax.set_title(title, fontsize=8.5, loc="left")
        ax.set_xlabel(sc["unit"] + " (median of interleaved runs, whiskers: min-max)", fontsize=8)
        limit = max(
            [
                *med,
                *(
                    s["summary"]["median"] * t["bound"]
                    for t in sc["targets"]
                    for s in sides
                    if t["kind"] == "ratio" and s["label"] == t["key"]
                ),
            ]
        )
        ax.set_xlim(0, max(limit, *(s["summary"]["max"] for s in sides)) * 1.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _target_lines(ax: Any, sc: dict[str, Any]) -> None:
    """A dashed line where ours must reach for each ratio target against a measured peer."""
    for target in sc["targets"]:
        peer = next((s for s in sc["sides"] if s["label"] == target["key"]), None)
        if target["kind"] != "ratio" or peer is None or not peer["summary"]["n"]:
            continue
        x = peer["summary"]["median"] * target["bound"]
        ax.axvline(x, ls="--", color="#1b9e77", lw=1)
        ax.text(x, 0.04, f" {target['bound']:g}x {peer['label']} (target)", fontsize=7,
                color="#1b9e77", va="bottom", transform=ax.get_xaxis_transform())  # fmt: skip


def _latency(session: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sc = next((s for s in session["scenarios"] if s["name"] == "latency"), None)
    if sc is None or not any(s["summary"]["n"] for s in sc["sides"]):
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for side in sc["sides"]:
        samples = sorted(x for r in side["runs"] if r.get("ok") for x in r["samples_ms"])
        if not samples:
            continue
        ys = [(i + 1) / len(samples) for i in range(len(samples))]
        ax.step(
            samples,
            ys,
            where="post",
            label=f"{side['label']} (p50 {samples[len(samples) // 2]:.2f} ms)",
            color="#d95f02" if side["ours"] else None,
        )
    for bound, text in ((1.0, "p50 target"), (3.0, "p99 target")):
        ax.axvline(bound, ls=":", color="grey")
        ax.text(bound, 0.02, f" {text}", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("enqueue -> handler start (ms, log scale), paced 100 tasks/s")
    ax.set_ylabel("fraction of tasks")
    ax.set_title("Latency CDF", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _memory(session: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sc = next((s for s in session["scenarios"] if s["name"] == "memory"), None)
    if sc is None or not any(s["summary"]["n"] for s in sc["sides"]):
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for side in sc["sides"]:
        runs = [r for r in side["runs"] if r.get("ok")]
        if not runs:
            continue
        samples = runs[0]["samples"]
        ax.plot(
            [d for _, d, _ in samples],
            [m for _, _, m in samples],
            label=side["label"],
            color="#d95f02" if side["ours"] else None,
        )
    ax.set_xlabel("messages processed from the backlog")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title("Consumer memory (RSS) while draining the backlog", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
