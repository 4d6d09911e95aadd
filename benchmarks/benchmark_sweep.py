#!/usr/bin/env python3
"""Sweep benchmark: an 18-layer sweep in one process against 18 separate invocations (the bash loop).

Both run the same program on the same data and write the same files (checked: every results
file is identical but for its wall time and command line). Two data sizes: the demo's (width
16) and full Pi0 width (VLM 2048, action 1024; fewer tasks and episodes so that it fits on disk).
Labels come from a random-weight T5 of t5-small's embedding width (512; `--label_width 32` gives the demo's).
Two cache states: cold (fresh --cache_dir: T5 labels, task-file indexes and compiled programs
all made anew, so the first invocation of the loop imports torch) and warm (the same command
run once before). Each measurement is the wall time of whole processes, as a user sees it.

    python benchmarks/benchmark_sweep.py [--dir DIR] [--sizes demo full] [--expert vlm] [--label_width 512]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import linear_probing_inference as lpi  # noqa: E402

SIZES = {
    "demo": dict(num_tasks=10, num_episodes=6, steps=(10,), vlm_width=16, action_width=16),
    "full": dict(num_tasks=6, num_episodes=4, steps=(10,), vlm_width=2048, action_width=1024),
}


def program(data: Path, t5: Path, cache: Path, output: Path, expert: str, layers: str) -> list[str]:
    """The command line of one invocation."""
    tasks = str(len(list(data.glob("task_*.pkl"))))
    episodes = str(SIZES[data.name]["num_episodes"])
    return [
        sys.executable,
        str(REPO / "linear_probing_inference.py"),
        "--data_path",
        str(data),
        "--t5_model",
        str(t5),
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(output),
        "--rollout_step",
        "10",
        "--expert",
        expert,
        "--layer",
        layers,
        "--task_range",
        "0",
        tasks,
        "--episode_range",
        "0",
        episodes,
        "--quiet",
    ]


def timed(commands: list[list[str]]) -> float:
    """Run the commands one after another; wall seconds."""
    environment = dict(os.environ)  # JAX picks the accelerator if there is one
    start = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def comparable(path: Path) -> bytes:
    """A results file without what legitimately differs between the two ways (time, command line)."""
    with open(path, "rb") as file:
        results = pickle.load(file)
    results.pop("wall_time_seconds")
    results.pop("command")
    return pickle.dumps(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dir", default=None, help="where data and outputs go (default: a temporary directory, removed)"
    )
    parser.add_argument("--sizes", nargs="+", default=["demo", "full"], choices=list(SIZES))
    parser.add_argument("--expert", default="vlm", choices=lpi.EXPERTS)
    parser.add_argument("--caches", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument(
        "--label_width", type=int, default=512, help="the random-weight T5's embedding width (t5-small: 512)"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="sweep_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    t5 = work / f"t5_width{args.label_width}"
    if not t5.exists():
        lpi.build_tiny_t5(t5, lpi.DEMO_DESCRIPTIONS, d_model=args.label_width)
    rows = []
    try:
        for size in args.sizes:
            data = work / size
            if not data.exists():
                lpi.write_demo_dataset(data, **SIZES[size])
            gigabytes = sum(p.stat().st_size for p in data.glob("task_*.pkl")) / 1e9
            for cache_state in args.caches:
                figures = {}
                for way in ("loop", "sweep"):
                    cache, output = (
                        work / f"cache_{size}",
                        work / f"out_{size}_{way}",
                    )  # one cache path: it is recorded in the results
                    shutil.rmtree(cache, ignore_errors=True)
                    shutil.rmtree(output, ignore_errors=True)
                    commands = (
                        [program(data, t5, cache, output, args.expert, str(layer)) for layer in range(18)]
                        if way == "loop"
                        else [program(data, t5, cache, output, args.expert, "0-17")]
                    )
                    if cache_state == "warm":
                        timed(commands)  # fills the caches
                    figures[way] = timed(commands)
                loop_files = sorted((work / f"out_{size}_loop").glob("results_*.pkl"))
                assert len(loop_files) == 18
                for path in loop_files:
                    assert comparable(path) == comparable(work / f"out_{size}_sweep" / path.name), (
                        f"{path.name} differs"
                    )
                rows.append({"size": size, "gigabytes": gigabytes, "cache": cache_state, **figures})
                print(
                    f"{size:4s} ({gigabytes:5.2f} GB, --expert {args.expert}, {args.label_width}-dim labels) "
                    f"{cache_state} caches: 18 invocations {figures['loop']:6.1f} s, "
                    f"one 18-layer sweep {figures['sweep']:5.1f} s = {figures['loop'] / figures['sweep']:4.1f}x "
                    "faster; all 18 results identical",
                    flush=True,
                )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
