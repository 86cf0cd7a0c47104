"""Summarise a py-spy raw (collapsed stacks) profile: self time and inclusive time per frame."""

from __future__ import annotations

import collections
import sys


def summarise(path: str, top: int = 40) -> str:
    """Top functions by self and by inclusive samples."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            count = int(n)
            total += count
            frames = stack.split(";")
            self_c[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
    out = [f"total samples {total}", "--- self"]
    out += [f"{100 * c / total:6.2f}%  {f}" for f, c in self_c.most_common(top)]
    out.append("--- inclusive")
    out += [f"{100 * c / total:6.2f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40))


def children(path: str, name: str, depth: int = 1) -> str:
    """Inclusive samples of the frames called from frames whose text contains ``name``."""
    c: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            idx = next((i for i, f in enumerate(frames) if name in f), None)
            if idx is None:
                continue
            total += int(n)
            key = ";".join(frames[idx + 1 : idx + 1 + depth]) or "<self>"
            c[key] += int(n)
    return "\n".join([f"{name}: {total}"] + [f"{v:6d} {k}" for k, v in c.most_common(25)])


def by_package(path: str) -> str:
    """Share of samples by the package of the innermost frame."""
    c: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            leaf = stack.split(";")[-1]
            loc = leaf[leaf.rfind("(") + 1 :]
            pkg = loc.split("/")[0] if "/" in loc else loc.split(".py")[0]
            if leaf.startswith("Runner.run"):
                pkg = "event loop (uvloop, C)"
            c[pkg] += int(n)
            total += int(n)
    return "\n".join(f"{100 * v / total:6.2f}%  {k}" for k, v in c.most_common(20))
