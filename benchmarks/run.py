"""Run the benchmarks and record their results.

Usage::

    python benchmarks/run.py                    # every benchmarks/bench_*.py
    python benchmarks/run.py kronecker --quick  # one benchmark, fewer repeats
    python benchmarks/run.py --json out.json    # choose where the JSON goes
    python benchmarks/run.py curvature --peers  # also time peer libraries

A benchmark is a module ``benchmarks/bench_<name>.py`` with a function
``run(quick: bool) -> list[dict]``; each dict is one row of results (plain numbers and
strings). The runner prints one table per benchmark and writes every row, tagged with
the benchmark's name, plus a description of the machine and the library versions, to a
JSON file (default ``benchmarks/results/<timestamp>.json``).

The allocator is held steady: unless ``--default-malloc`` is given, the runner restarts
itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` fixed
(arrays up to 32 MiB come from the heap, and freed memory stays there). With glibc's
adaptive defaults, whether a call hands its transient memory back to the kernel at the
end (and page-faults it in again on the next call) depends on the largest array freed
earlier in the process, so one product's ratio could move by 30 % with the order in which
the benchmarks ran; on virtual machines a page fault costs microseconds. The variables
reach the peers' processes too, so both sides are measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
VERSIONED = ("curvlinops", "numpy", "scipy", "array-api-compat", "torch", "jax", "cupy")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def discover(directory: Path = HERE) -> dict[str, Path]:
    """``{name: path}`` for every ``bench_<name>.py`` in ``directory``."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(directory.glob("bench_*.py"))}


def load(name: str, path: Path):
    """Import a benchmark module from its file (benchmarks/ is not a package)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # so that benchmarks can import _timing
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path} has no function run(quick: bool) -> list[dict].")
    return module


def environment() -> dict:
    """The machine and library versions the numbers were measured with."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
        "malloc": {name: os.environ[name] for name in STEADY_MALLOC if name in os.environ},
        "versions": versions,
    }


def format_table(rows: list[dict]) -> str:
    """Rows as a plain-text table; columns are the union of the rows' keys."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    for line in cells:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    return "\n".join(lines)


def _format_cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _restart_with_steady_malloc(argv: list[str] | None) -> bool:
    """Re-execute this script with :data:`STEADY_MALLOC` set, once (glibc reads the
    variables at start-up only)."""
    if platform.system() != "Linux" or all(
        os.environ.get(k) == v for k, v in STEADY_MALLOC.items()
    ):
        return False
    os.environ.update(STEADY_MALLOC)
    arguments = sys.argv[1:] if argv is None else list(argv)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *arguments])
    return True


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {sorted(available)})"
    )
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run peer libraries (each in a virtual environment of its own, created "
        "once under benchmarks/.peers/); same as CURVLINOPS_BENCH_PEERS=1",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's adaptive allocator thresholds (see the module docstring)",
    )
    args = parser.parse_args(argv)
    if not args.default_malloc and _restart_with_steady_malloc(argv):
        return 0  # not reached: the process was replaced
    if args.peers:
        os.environ["CURVLINOPS_BENCH_PEERS"] = "1"

    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(available)}")
    names = args.names or sorted(available)

    started = datetime.datetime.now(datetime.timezone.utc)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(
            f"Warning: load average {os.getloadavg()[0]:.1f} exceeds the {os.cpu_count()} CPUs; "
            "timings (even ratios) will be noisy. Run on a quiet machine."
        )
    all_rows = []
    for name in names:
        module = load(name, available[name])
        print(f"\n== {name}" + (" (quick)" if args.quick else ""))
        start = time.perf_counter()
        rows = module.run(quick=args.quick)
        print(format_table(rows))
        print(f"({time.perf_counter() - start:.1f} s)")
        all_rows.extend({"benchmark": name, **row} for row in rows)

    out = args.json or DEFAULT_RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "started": started.isoformat(),
        "quick": args.quick,
        "peers": os.environ.get("CURVLINOPS_BENCH_PEERS") == "1",
        "environment": environment(),
        "rows": all_rows,
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nResults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
