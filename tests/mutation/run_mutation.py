"""Mutation testing of the core modules with mutmut (slow: outside CI).

What lives here: a driver around ``mutmut`` (configured in ``pyproject.toml`` under
``[tool.mutmut]``: the modules ``linalg``, ``solvers``, ``losses``, ``curvature`` and
``nn``, and the tests that exercise them). mutmut writes every mutant of those modules
into ``mutants/`` and runs, for each, only the tests that reach the mutated function.
A full run over the ~15 000 mutants takes many CPU hours, so by default this script
draws a seeded random sample of mutants per module (stratified), runs them, and
reports the kill rate with a 95 % confidence interval, excluding the survivors listed
in ``tests/mutation/equivalent.txt`` (mutants that cannot change behaviour, each with
the reason).

Usage (from the repository root, in an environment with the ``test`` extra and
``mutmut``)::

    python tests/mutation/run_mutation.py --per-module 80 --seed 0
    python tests/mutation/run_mutation.py --all            # every mutant (hours)
    python tests/mutation/run_mutation.py --report-only    # summarize the last run

May import: the standard library only (it drives mutmut as a subprocess).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.txt")
MODULES = ("linalg", "solvers", "losses", "curvature", "nn")
KILLED = {"killed", "timeout", "segfault", "suspicious"}
_LINE = re.compile(r"^\s*(curvlinops\.\S+): (.+)$")


def mutmut(*args: str) -> str:
    """Run ``mutmut`` in the repository root and return its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", *args], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout


def statuses() -> dict[str, str]:
    """Every generated mutant and its status (``not checked`` before it ran)."""
    found = {}
    for line in mutmut("results", "--all", "true").splitlines():
        match = _LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def module_of(name: str) -> str:
    """The core module (``linalg``, ``nn``, ...) a mutant's name belongs to."""
    return name.split(".")[1]


def equivalent() -> dict[str, str]:
    """The survivors judged equivalent: ``name  # reason`` lines of equivalent.txt."""
    if not EQUIVALENT.exists():
        return {}
    pairs = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            pairs[name.strip()] = reason.strip()
    return pairs


def sample(names: list[str], per_module: int, seed: int) -> list[str]:
    """A seeded random draw of ``per_module`` mutants from each core module."""
    by_module = defaultdict(list)
    for name in sorted(names):
        by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    chosen = []
    for module in MODULES:
        pool = by_module.get(module, [])
        chosen += rng.sample(pool, min(per_module, len(pool)))
    return chosen


def run(names: list[str], children: int, chunk: int = 5000) -> None:
    """Run the given mutants (each mutmut call first spends minutes collecting tests)."""
    for start in range(0, len(names), chunk):
        mutmut("run", "--max-children", str(children), *names[start : start + chunk])


def wilson(killed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a kill rate."""
    if total == 0:
        return (0.0, 1.0)
    p = killed / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def report(chosen: list[str]) -> int:
    """Print the kill rate per module and the survivors; 0 if at least 95 % are killed."""
    status = statuses()
    skip = equivalent()
    counts = defaultdict(Counter)
    survivors = []
    for name in chosen:
        state = status.get(name, "missing")
        if name in skip:
            state = "equivalent"
        counts[module_of(name)][state] += 1
        if state in {"survived", "no tests"}:
            survivors.append(name)
    killed = total = 0
    print(f"{'module':<10} {'killed':>7} {'alive':>6} {'equiv.':>6} {'other':>6}  kill rate")
    for module in MODULES:
        c = counts[module]
        k = sum(c[s] for s in KILLED)
        alive = c["survived"] + c["no tests"]
        other = sum(c.values()) - k - alive - c["equivalent"]
        killed, total = killed + k, total + k + alive
        rate = k / (k + alive) if k + alive else float("nan")
        print(f"{module:<10} {k:>7} {alive:>6} {c['equivalent']:>6} {other:>6}  {rate:.1%}")
    low, high = wilson(killed, total)
    rate = killed / total if total else float("nan")
    print(
        f"all: {killed}/{total} behaviour-changing mutants killed: {rate:.1%} "
        f"(95 % CI {low:.1%} to {high:.1%})"
    )
    for name in survivors:
        print("survived:", name)
    return 0 if total and rate >= 0.95 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all", action="store_true", help="every mutant, not a sample")
    parser.add_argument("--children", type=int, default=2, help="parallel mutant runs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    names = list(statuses())
    if not names:  # first call: let mutmut generate the mutants and collect test stats
        mutmut("run", "--max-children", str(args.children), "no-such-mutant*")
        names = list(statuses())
    chosen = sorted(names) if args.all else sample(names, args.per_module, args.seed)
    if not args.report_only:
        run(chosen, args.children)
    return report(chosen)


if __name__ == "__main__":
    sys.exit(main())
