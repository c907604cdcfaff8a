"""The results: per-variant medians (the JSON's ``variants``), the ratios, the markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from measure import PHASES, RESTORE_PHASES, RunResult

OVERHEAD_NAMES = ["overhead_tools_db_only", "overhead_import_only", "overhead_running_server",
                  "overhead_ephemeral_server", "overhead_ephemeral_first_run"]
# JSON key -> (ours, the reference it is compared with): ratios of median wall times.
RATIOS = {
    "backup_vs_reference_sequential": ("ours_running_server", "reference_sequential"),
    "backup_ephemeral_vs_reference_sequential": ("ours_ephemeral_server",
                                                 "reference_sequential"),
    "backup_vs_reference_streamed": ("ours_running_server", "reference_streamed"),
    "backup_vs_reference_streamed_parallel": ("ours_running_server",
                                              "reference_streamed_parallel"),
    "restore_vs_reference": ("restore_ours", "restore_reference"),
}


def _median(values: Iterable[float]) -> float:
    return round(statistics.median(values), 2)


def _median_by_key(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Per key (in order of first appearance), the median over the dicts that have it."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: _median(d[k] for d in dicts if k in d) for k in keys}


def _medians(good: list[RunResult], source_bytes: int | None) -> dict:
    walls = [r.wall_s for r in good]
    median = statistics.median(walls)
    return dict(
        wall_s_median=round(median, 3), wall_s=walls,
        throughput_mb_s=round(source_bytes / 1e6 / median, 1) if source_bytes else None,
        rss_mib_peak=max(r.rss_mib_tree for r in good),
        rss_mib_max_process=max(r.rss_mib_max_process for r in good),
        max_process=max(good, key=lambda r: r.rss_mib_max_process).max_process,
        rss_mib_servers_in_tree=max(r.rss_mib_servers_in_tree for r in good),
        rss_mib_at_peak=max(good, key=lambda r: r.rss_mib_tree).rss_mib_at_peak,
        timeline_median=_median_by_key([r.timeline for r in good]),
        cpu_s_median=_median(r.cpu_s for r in good),
        stored_mb_median=(round(statistics.median(r.stored_bytes for r in good) / 1e6, 3)
                          if good[0].stored_bytes else None),
        stored_files_mb_median=(
            round(statistics.median(r.stored_files_bytes for r in good) / 1e6, 3)
            if good[0].stored_files_bytes else None),
        kinds=sorted({r.kind for r in good if r.kind}),
        cpu_by_command_median=_median_by_key([r.cpu_by_command for r in good]),
        cpu_servers_s_median=_median_by_key([r.cpu_servers_s for r in good]),
        cpu_other_s_median=_median(r.cpu_other_s for r in good),
        cpu_softirq_s_median=_median(r.cpu_softirq_s for r in good),
    )


def summarize(results: dict[str, list[RunResult]], labels: dict[str, str],
              source_bytes: dict[str, int]) -> dict[str, dict]:
    """The JSON's ``variants``: medians over the successful runs, and every run."""
    out: dict[str, dict] = {}
    for name, runs in results.items():
        good = [r for r in runs if r.ok]
        entry: dict = {"label": labels[name], "runs": len(runs), "failed": len(runs) - len(good)}
        if good:
            entry.update(_medians(good, source_bytes.get(name)))
        entry["per_run"] = [{k: v for k, v in asdict(r).items() if k != "stdout"} for r in runs]
        out[name] = entry
    return out


def ratio(variants: dict[str, dict], a: str, b: str) -> float | None:
    x, y = variants.get(a, {}).get("wall_s_median"), variants.get(b, {}).get("wall_s_median")
    return round(x / y, 3) if x and y else None


def _of(variants: dict[str, dict], a: str, b: str, key: str) -> float | None:
    x, y = variants.get(a, {}).get(key), variants.get(b, {}).get(key)
    return round(x / y, 4) if x is not None and y else None


def paired(variants: dict[str, dict], a: str, b: str) -> float | None:
    """Median over the rounds where both succeeded of a's wall / b's in that round: on a
    shared machine whose speed drifts from round to round, steadier than a ratio of medians."""
    def walls(name: str) -> dict[int, float]:
        return {r["round"]: r["wall_s"] for r in variants.get(name, {}).get("per_run", [])
                if r["ok"]}
    x, y = walls(a), walls(b)
    pairs = [x[r] / y[r] for r in x if r in y and y[r]]
    return round(statistics.median(pairs), 3) if pairs else None


def ratios(variants: dict[str, dict]) -> dict:
    """Ratios of medians: ours against the references; the incrementals against their full;
    encrypted against plain."""
    out: dict = {key: ratio(variants, a, b) for key, (a, b) in RATIOS.items()}
    out["incremental_vs_full"] = {
        f"after_{pct}": {
            "wall": ratio(variants, f"incr_nightly_{pct}", "incr_full"),
            "stored": _of(variants, f"incr_nightly_{pct}", "incr_full", "stored_mb_median"),
            "stored_files": _of(variants, f"incr_nightly_{pct}", "incr_full",
                                "stored_files_mb_median")}
        for pct in ("0pct", "1pct")}
    out["chain_restore_vs_full_restore"] = ratio(variants, "restore_chain",
                                                 "restore_equivalent_full")
    out["encrypted_vs_plain"] = {
        "wall": ratio(variants, "ours_encrypted", "ours_running_server"),
        "wall_paired": paired(variants, "ours_encrypted", "ours_running_server"),
        "rss_peak": _of(variants, "ours_encrypted", "ours_running_server", "rss_mib_peak"),
        "cpu": _of(variants, "ours_encrypted", "ours_running_server", "cpu_s_median")}
    return out


def table(variants: dict[str, dict], names: list[str], ref: str | None) -> str:
    head = ("| variant | runs | wall median (s) | min–max (s) | MB/s | tree RSS peak (MiB) "
            "| max process (MiB) | CPU (s) | stored (MB) | vs ref |")
    lines = [head, "|" + "---|" * 10]
    for name in names:
        v = variants.get(name)
        if v is None:
            continue
        label = v["label"].replace("|", "\\|")  # pipes inside a markdown cell
        if "wall_s_median" not in v:
            lines.append(f"| {label} | {v['runs']} | failed | | | | | | | |")
            continue
        vs = ratio(variants, name, ref) if ref else None
        stored = f"{v['stored_mb_median']:.1f}" if v.get("stored_mb_median") else ""
        if stored and name.startswith("incr") and v.get("stored_files_mb_median"):
            stored += f" (files {v['stored_files_mb_median']:.1f})"
        lines.append(
            f"| {label} | {v['runs'] - v['failed']}/{v['runs']} | {v['wall_s_median']:.2f} "
            f"| {min(v['wall_s']):.2f}–{max(v['wall_s']):.2f} "
            f"| {v['throughput_mb_s'] or ''} | {v['rss_mib_peak']:.0f} "
            f"| {v['rss_mib_max_process']:.0f} ({v['max_process']}) | {v['cpu_s_median']:.1f} "
            f"| {stored} | {f'{vs:.2f}×' if vs else ''} |")
    return "\n".join(lines)


def _seconds(by_name: dict[str, float], most: int | None = None) -> str:
    """``name s, …`` of the names that took 50 ms or more."""
    return ", ".join(f"{k} {s:.1f}" for k, s in list(by_name.items())[:most] if s >= 0.05)


def cpu_table(variants: dict[str, dict], names: list[str]) -> str:
    lines = ["| variant | CPU by command in the tree (s, median) | servers (s) | softirq (s) "
             "| foreign load (s) |", "|---|---|---|---|---|"]
    for name in names:
        v = variants.get(name)
        if not v or "cpu_by_command_median" not in v:
            continue
        top = dict(sorted(v["cpu_by_command_median"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {_seconds(top, 6)} | {_seconds(v['cpu_servers_s_median'])} "
                     f"| {v['cpu_softirq_s_median']:.1f} | {v['cpu_other_s_median']:.1f} |")
    return "\n".join(lines)


def timeline_table(variants: dict[str, dict], names: list[str],
                   phases: tuple[tuple[str, str], ...] = PHASES) -> str:
    """When each phase of our flow was reached, in seconds since the process started."""
    cols = [p for p, _ in phases] + ["process_exited"]
    lines = ["| variant | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name in names:
        t = variants.get(name, {}).get("timeline_median")
        if t:
            lines.append(f"| {name} | " + " | ".join(
                f"{t[c]:.2f}" if c in t else "" for c in cols) + " |")
    return "\n".join(lines)


def memory_table(variants: dict[str, dict], names: list[str]) -> str:
    lines = ["| variant | tree RSS at its peak, by command (MiB) | servers inside (MiB) |",
             "|---|---|---|"]
    for name in names:
        v = variants.get(name)
        if not v or "rss_mib_at_peak" not in v:
            continue
        parts = ", ".join(f"{k} {mib:.0f}" for k, mib in v["rss_mib_at_peak"].items()
                          if mib >= 1)
        lines.append(f"| {name} | {parts} | {v['rss_mib_servers_in_tree'] or ''} |")
    return "\n".join(lines)


def _heading(report: dict) -> list[str]:
    segments = (f"{report['segment_mib']} MiB segments" if report["segment_mib"] else
                "64 MiB segments for the reference, our own choice for ours")
    lines = [f"\n## undercloud-backup benchmark, scale {report['scale']}, {report['runs']} "
             f"run(s) each, {segments}"]
    data = report.get("data")
    if data:
        lines.append(f"source: {data['files_bytes'] / 1e6:.0f} MB of files "
                     f"({data['file_entries']} entries) + {data['dump_bytes'] / 1e6:.0f} MB "
                     f"dump = {data['source_bytes'] / 1e6:.0f} MB\n")
    return lines


def _ratio_text(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_ratio_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def render(report: dict, names: list[str], logs: Path, chain: list[str] = ()) -> str:
    """The markdown the benchmark prints: ``names`` are the backups' and restores',
    ``chain`` the incremental sequence's."""
    variants = report["variants"]
    ours = [n for n in names if n.startswith(("ref", "ours"))]
    out = [*_heading(report), table(variants, ours, "reference_sequential"), "",
           table(variants, ["restore_reference", "restore_ours"], "restore_reference")]
    if "restore_ours" not in variants:
        out.append(f"\nrestore, {report['restore_ours']}")
    if any(n in variants for n in chain):
        out += ["", table(variants, [n for n in chain if n.startswith("incr")], "incr_full"),
                "", table(variants, [n for n in chain if n.startswith("restore")],
                          "restore_equivalent_full")]
    else:
        out.append(f"\nincremental: {report.get('incremental', 'not run')}")
    if "ours_encrypted" not in variants:
        out.append(f"encrypted: {report.get('encrypted', 'not run')}")
    if any(n in variants for n in OVERHEAD_NAMES):
        out += ["", table(variants, OVERHEAD_NAMES, "overhead_tools_db_only")]
    everything = names + list(chain) + OVERHEAD_NAMES
    out += ["", cpu_table(variants, everything), "", memory_table(variants, everything),
            "\nour flow's timeline (s since start, median):\n",
            timeline_table(variants, [n for n in everything if not n.startswith("restore")])]
    if "restore_ours" in variants:
        out += ["", timeline_table(variants, ["restore_ours"], RESTORE_PHASES)]
    out += ["\nratios: " + ", ".join(f"{k} = {_ratio_text(v)}"
                                    for k, v in report["ratios"].items()),
            f"total {report['total_s']:.0f} s; logs in {logs}"]
    return "\n".join(out)
