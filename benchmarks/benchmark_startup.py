#!/usr/bin/env python3
"""Start-up benchmark: one whole small run of the program against importing its libraries.

Users run one invocation per layer from bash loops, so what a single small run costs beyond
`python -c "import jax, flax.linen, optax"` is paid once per layer. Measured side by side, alternating, each a fresh
process timed from outside (wall time, as a user sees it):
  (a) python -c "import jax, flax.linen, optax"
  (b) the program on the demo's data: 3 task files, one layer, one rollout step, labels from a local tiny T5, with
      warm caches (labels, task-file indexes, compiled programs: one untimed run first); each timed run writes to a
      fresh output directory, so nothing is skipped.
Prints the median and min of each and the ratio of the medians, (b)/(a).

    python benchmarks/benchmark_startup.py [--repeats 7] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import linear_probing_inference as lpi  # noqa: E402

IMPORTS = [sys.executable, "-c", "import jax, flax.linen, optax"]


def program(work: Path) -> list[str]:
    """The command line of the small run, writing to a fresh output directory."""
    output = tempfile.mkdtemp(dir=work, prefix="out_")
    return [
        sys.executable,
        str(REPO / "linear_probing_inference.py"),
        *("--data_path", str(work / "data"), "--t5_model", str(work / "t5"), "--cache_dir", str(work / "cache")),
        *("--output_dir", output, "--task_range", "0", "3", "--episode_range", "0", "6"),
        *("--expert", "vlm", "--rollout_step", "10", "--layer", "5", "--quiet"),
    ]


def timed(command: list[str]) -> float:
    """Wall seconds of one process."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (default: %(default)s)")
    parser.add_argument(
        "--dir", default=None, help="where data and outputs go (default: a temporary directory, removed)"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="startup_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "data").exists():
            lpi.write_demo_dataset(work / "data")
        if not (work / "t5").exists():
            lpi.build_tiny_t5(work / "t5", lpi.DEMO_DESCRIPTIONS)
        timed(program(work))  # fills the label, index and compile caches
        times = {"imports": [], "run": []}
        for _ in range(args.repeats):
            times["imports"].append(timed(IMPORTS))
            times["run"].append(timed(program(work)))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, label in (("imports", "import jax, flax.linen, optax"), ("run", "one small run, warm caches")):
        print(f"{label:30s}: median {medians[name]:5.2f} s, min {min(times[name]):5.2f} s")
    print(f"ratio of medians (run / imports): {medians['run'] / medians['imports']:.2f} (goal: <= 1.4)")


if __name__ == "__main__":
    main()
