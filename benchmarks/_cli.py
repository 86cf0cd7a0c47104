"""The command line every single-table benchmark shares: ``[--quick]``, run, print."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def bench_main(
    doc: str | None,
    run: Callable[..., list[dict[str, Any]]],
    show: Callable[[list[dict[str, Any]]], str | None],
    quick_help: str = "a shorter run",
) -> None:
    """Parse ``--quick``, run the benchmark and print what ``show`` makes of its rows."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    text = show(run(quick=args.quick))
    if text is not None:
        print(text)
