"""Per turn of the offline demo call: end of caller speech → committed transcript → first
agent audio sent → first agent audio heard (from marks), over a few demo runs."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from voice_runtime.demo import run_demo


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run the demo ``1`` (quick) or ``3`` times and summarise each stage across turns."""
    samples: dict[str, list[float]] = {
        "committed_ms": [],
        "first_sent_ms": [],
        "first_heard_ms": [],
    }
    for _ in range(1 if quick else 3):
        result = run_demo(engine="offline", out=None, record=None, timeout=60)
        for turn in result.turn_timings:
            for key, value in turn.items():
                if value is not None:
                    samples[key].append(value)
    labels = {
        "committed_ms": "caller stops -> transcript committed",
        "first_sent_ms": "caller stops -> first agent audio sent",
        "first_heard_ms": "caller stops -> first agent audio heard",
    }
    return [
        {
            "stage": labels[key],
            "n": len(values),
            "p50_ms": statistics.median(values) if values else None,
            "max_ms": max(values) if values else None,
        }
        for key, values in samples.items()
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a fixed-width text table."""
    header = f"{'stage (offline demo, per turn)':<44}{'n':>4}{'p50 ms':>10}{'max ms':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        p50 = "" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
        worst = "" if row["max_ms"] is None else f"{row['max_ms']:.0f}"
        lines.append(f"{row['stage']:<44}{row['n']:>4}{p50:>10}{worst:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one demo run instead of three")
    print(format_table(run(quick=parser.parse_args().quick)))
