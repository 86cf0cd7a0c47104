"""Run every benchmark: print the tables, save PNG plots and the numbers as JSON.

    python benchmarks/run.py [--quick] [--out benchmarks/out] [--only calls,codec]

Each ``benchmarks/bench_*.py`` module with a ``run(quick)`` function takes part; a module
that cannot be imported (a missing extra, say) is reported and skipped. Baselines run in
the same invocation, so compare the ratios rather than the absolute times across machines.
Writes ``results.json`` (machine, every module's rows, errors), ``report.md`` (the machine
and the tables) and one PNG per plot into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Order: cheap and steady first; the live-call benchmark (minutes), then the attacks, last.
MODULES = [
    "codec",
    "transport",
    "offline",
    "endpointing",
    "providers",
    "realtime",
    "calls",
    "abuse",
]


def machine() -> dict[str, Any]:
    """What this machine is: cores, CPU model, memory, Python and key package versions."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            info["ram_gb"] = round(kb / 1024 / 1024, 1)
    except OSError:
        pass
    from importlib import metadata

    for dist in ("voice-runtime", "uvicorn", "websockets", "uvloop", "starlette", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _generic_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    lines = [" | ".join(keys)]
    for r in rows:
        lines.append(" | ".join(_cell(r.get(k)) for k in keys))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


# ------------------------------------------------------------------ plots


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append(path)

    calls = [r for r in results.get("calls", {}).get("rows", []) if r.get("table") == "calls"]
    if calls:
        n = [r["calls"] for r in calls]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label, style in (
            ("in_p50_ms", "caller → STT p50", "o-"),
            ("in_p99_ms", "caller → STT p99", "o--"),
            ("out_p50_ms", "agent → websocket p50", "s-"),
            ("out_p99_ms", "agent → websocket p99", "s--"),
        ):
            ax.plot(n, [max(r.get(key) or 0.0, 0.01) for r in calls], style, label=label)
        ax.axhline(20.0, color="red", lw=0.8, label="20 ms budget")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent paced calls")
        ax.set_ylabel("per-frame latency (ms)")
        ax.set_title("Frame latency in the server process")
        ax.legend(fontsize=8)
        save(fig, "calls_latency.png")

        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(n, [r["cpu_s_per_call_min"] for r in calls], "o-", label="CPU s per call-minute")
        ax1.set_xlabel("concurrent paced calls")
        ax1.set_ylabel("server CPU s per call-minute")
        ax2 = ax1.twinx()
        ax2.plot(n, [r["server_core_pct"] for r in calls], "s--", color="tab:orange")
        ax2.set_ylabel("server process, % of one core", color="tab:orange")
        ax1.set_title("Server CPU")
        save(fig, "calls_cpu.png")

    base = [r for r in results.get("calls", {}).get("rows", []) if r.get("table") == "baseline"]
    minute = [r for r in results.get("transport", {}).get("rows", []) if "ours_cpu_s" in r]
    if base or minute:
        labels, ours, theirs = [], [], []
        for r in base:
            if "ours_cpu_s_per_call_min" in r:
                name = r["name"]
                if name.startswith("floor"):
                    labels.append("live, 1 call:\nfloor (frames only)")
                elif name.startswith("duplex floor"):
                    calls = r["calls"]
                    labels.append(f"live, {calls} call{'s' * (calls > 1)}:\nduplex floor")
                else:
                    labels.append("live: " + name.split(", ", 1)[-1].replace(" (", "\n("))
                ours.append(r["ours_cpu_s_per_call_min"])
                theirs.append(r["cpu_s_per_call_min"])
        for r in minute:
            if r.get("baseline_cpu_s"):
                labels.append(r["name"].split(" CPU")[0] + "\n" + r["name"].split("(")[-1][:-1])
                ours.append(r["ours_cpu_s"])
                theirs.append(r["baseline_cpu_s"])
        if labels:
            fig, ax = plt.subplots(figsize=(9, 4.5))
            x = range(len(labels))
            ax.bar([i - 0.2 for i in x], ours, 0.4, label="voice-runtime (this)")
            ax.bar([i + 0.2 for i in x], theirs, 0.4, label="0.1.15 baseline / floor row")
            ax.set_xticks(list(x), labels, fontsize=7)
            ax.set_ylabel("CPU s per call-minute")
            ax.set_title("CPU per call-minute against the 0.1.15 baseline and the floor")
            ax.legend(fontsize=8)
            save(fig, "baseline_cpu.png")

    soak = next(
        (r for r in results.get("calls", {}).get("rows", []) if r.get("table") == "soak"), None
    )
    if soak and soak.get("curve"):
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [0] + [p["calls"] for p in soak["curve"]]
        rss = [soak["rss_before_mb"]] + [p["rss_mb"] for p in soak["curve"]]
        ax.plot(xs, rss, "o-")
        ax.set_xlabel("sequential calls")
        ax.set_ylabel("server RSS (MB)")
        ax.set_ylim(0, max(rss) * 1.25)
        ax.set_title("Server memory over sequential calls")
        save(fig, "soak_rss.png")

    codec = [r for r in results.get("codec", {}).get("rows", []) if r.get("ratio")]
    if codec:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.barh([r["name"] for r in codec], [r["ratio"] for r in codec])
        ax.axvline(1.0, color="red", lw=0.8)
        ax.set_xlabel("time ours / audioop (below 1 is faster)")
        ax.set_title("Codec and resampler against audioop")
        ax.tick_params(axis="y", labelsize=7)
        save(fig, "codec_ratio.png")
    return made


# ------------------------------------------------------------------ main


def _report(info: dict[str, Any], tables: dict[str, str]) -> str:
    lines = ["# Benchmark report", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    for name, table in tables.items():
        lines += ["", f"## {name}", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the benchmarks; exit 1 when one of them failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    parser.add_argument("--out", default=str(HERE / "out"), help="directory for JSON and PNGs")
    parser.add_argument("--only", help="comma-separated module names, e.g. calls,codec")
    parser.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the plots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        made = _plots(json.loads(Path(args.replot).read_text())["results"], out)
        print("wrote " + ", ".join(str(p) for p in made))
        return 0
    wanted = args.only.split(",") if args.only else MODULES
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results: dict[str, Any] = {}
    tables: dict[str, str] = {}
    errors: dict[str, str] = {}
    for name in wanted:
        try:
            module = importlib.import_module(f"bench_{name}")
        except ImportError as exc:
            errors[name] = f"skipped: {exc}"
            print(f"\n== {name}: skipped ({exc})", flush=True)
            continue
        if not hasattr(module, "run"):
            continue
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        try:
            rows = module.run(quick=args.quick)
        except Exception as exc:
            errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            print(f"FAILED: {errors[name]}", flush=True)
            traceback.print_exc()
            continue
        seconds = time.monotonic() - started
        fmt = getattr(module, "format_table", _generic_table)
        tables[name] = fmt(rows)
        results[name] = {"seconds": round(seconds, 1), "rows": rows}
        print(tables[name], flush=True)
        print(f"({seconds:.0f} s)", flush=True)
    doc = {"machine": info, "quick": args.quick, "results": results, "errors": errors}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "report.md").write_text(_report(info, tables))
    try:
        made = _plots(results, out)
    except ImportError as exc:
        made = []
        print(f"no plots: {exc}")
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}" + "".join(f", {p}" for p in made))
    failed = {k: v for k, v in errors.items() if not v.startswith("skipped")}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
