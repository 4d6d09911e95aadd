#!/usr/bin/env python3
"""Reading benchmark: pickle.load + extraction against our reader + the same extraction.

Generates task files at full Pi0 width (per step: VLM hidden_states and post_attn_embedding of
18x1x816x2048 float32, 10 action-expert entries of 18x1x51x1024, two camera images), 3
episodes x 2 steps at 1x, with 2x and 4x adding episodes the run does not ask for. Each run
extracts layer 5 at step_10 of episodes 0-2 (text_only, vlm or action tokens, mean-pooled)
with the program's own `walk_task_file` and `step_samples`; for pickle.load, its file reader is swapped for
`pickle.load`.
Every measurement is a fresh child process (the median of --repeats runs is reported): wall time of read +
extraction, peak resident memory added by it, and bytes read from storage (/proc/self/io read_bytes), with a warm page
cache and a cold one (the file evicted with posix_fadvise DONTNEED first). Ours is measured
twice: "first" parses the file and writes its index, "indexed" is every later run (index in
the cache directory). All three must give identical features.

    python benchmarks/benchmark_reader.py [--dir DIR] [--scales 1 2 4] [--experts text_only vlm action]
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAYER, STEP, EPISODES = 5, 10, 3  # what each run extracts
VLM_SHAPE, ACTION_SHAPE = (18, 1, 816, 2048), (18, 1, 51, 1024)
TIMES = [round(1.0 - 0.1 * k, 1) for k in range(10)]


def write_task_file(path: Path, episodes: int, steps=(10, 20)) -> None:
    """A task file in the collector's layout; array values differ per episode and step."""
    rng = np.random.default_rng(0)
    vlm_base = rng.standard_normal(VLM_SHAPE, dtype=np.float32)
    action_base = rng.standard_normal(ACTION_SHAPE, dtype=np.float32)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = {"task_name": "pick_up_the_milk", "task_id": 0, "task_description": "pick up the milk", "episodes": {}}
    for episode in range(episodes):
        rollout_steps = {}
        for step in steps:
            shift = np.float32(episode * 100 + step)
            entry = {
                "timestep": step,
                "action": [0.0] * 7,
                "vlm_layer_output": {
                    "hidden_states": vlm_base + shift,
                    "post_attn_embedding": vlm_base - shift,
                    "pre_attn_norm_scales": np.ones((18, 2048), np.float32),
                    "pre_mlp_norm_scales": np.ones((18, 2048), np.float32),
                },
                "observation": {"agentview_image": image, "wrist_image": image, "robot_state": [0.0, 0.0, 0.0]},
            }
            for time_value in TIMES:
                entry[f"action_expert_state_time{time_value:.1f}"] = {
                    "hidden_states": action_base + shift + np.float32(time_value),
                    "post_attn_embedding": action_base - shift,
                    "pre_attn_norm_scales": np.ones((18, 1024), np.float32),
                    "pre_mlp_norm_scales": np.ones((18, 1024), np.float32),
                }
            rollout_steps[f"step_{step}"] = entry
        data["episodes"][f"episode_{episode}"] = {
            "rollout_steps": rollout_steps,
            "metadata": {"success": True, "total_steps": 30},
        }
    with open(path, "wb") as file:
        pickle.dump(data, file)


CHILD = (
    r"""
import json, pickle, sys, time
import numpy as np
import linear_probing_inference as lpi

def storage_bytes_read():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(fields["read_bytes"])

def peak_rss():  # VmHWM belongs to this process image; ru_maxrss would inherit the parent's peak
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

mode, path, expert, out, index_dir = sys.argv[1:6]
config = lpi.Source(data_path="", task_range=(0, 1), episode_range=(0, EPISODES), expert=expert, index_dir=index_dir)
if mode == "pickle":  # the obvious alternative: load everything, then the same extraction
    lpi.read_task_file = lambda path, trust, index_dir: pickle.load(open(path, "rb"))
read_before, rss_before = storage_bytes_read(), peak_rss()
start = time.perf_counter()
report = lpi.ReadReport()
walked = lpi.walk_task_file(lpi.Path(path), 0, config, [STEP], LAYER, report)
samples = lpi.step_samples(lpi.Dataset(config, [walked], report), [LAYER], STEP)
seconds = time.perf_counter() - start
np.save(out, samples.features[0])
added = max(peak_rss() - rss_before, 0)
print(json.dumps({"seconds": seconds, "peak_rss_added": added, "read_bytes": storage_bytes_read() - read_before}))
""".replace("EPISODES", str(EPISODES))
    .replace("STEP", str(STEP))
    .replace("LAYER", str(LAYER))
)


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (works without privileges)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(mode: str, path: Path, expert: str, cold: bool, work: Path, index_dir: Path) -> tuple[dict, np.ndarray]:
    """One child process: read + extract; returns its figures and the features."""
    if cold:
        evict(path)
    else:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    out = work / f"{mode}.npy"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", CHILD, mode, str(path), expert, str(out), str(index_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def requested_bytes(expert: str) -> int:
    """Bytes of the array slices the extraction asks for."""
    tokens, width, entries = {"text_only": (48, 2048, 1), "vlm": (816, 2048, 1), "action": (51, 1024, len(TIMES))}[
        expert
    ]
    return EPISODES * entries * tokens * width * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dir", default=None, help="where the generated files go and stay (default: a temporary directory, removed)"
    )
    parser.add_argument(
        "--scales", nargs="+", type=int, default=[1, 2, 4], help="file sizes, as multiples of 3 episodes x 2 steps"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median time is reported")
    parser.add_argument(
        "--experts", nargs="+", default=["text_only", "vlm", "action"], choices=["text_only", "vlm", "action"]
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="reader_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for scale in args.scales:
            path = work / f"task_0_scale{scale}.pkl"
            if not path.exists():
                write_task_file(path, episodes=EPISODES * scale)
            size = path.stat().st_size
            for expert in args.experts:
                for cache in ("warm", "cold"):
                    index_dir = Path(tempfile.mkdtemp(dir=work, prefix="index_"))  # empty: "first" builds it
                    figures = {}
                    reference = None  # pickle.load's features, the first mode of each repeat
                    for _ in range(args.repeats):  # the median run of each mode is reported
                        for mode in ("pickle", "first", "indexed"):
                            if mode == "first":
                                shutil.rmtree(index_dir)  # "first" parses the file and writes the index anew
                            result, features = measure(mode, path, expert, cache == "cold", work, index_dir)
                            figures.setdefault(mode, []).append(result)
                            reference = features if mode == "pickle" else reference
                            assert np.array_equal(features, reference), f"{mode} disagrees with pickle.load"
                    figures = {
                        mode: sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] for mode, runs in figures.items()
                    }
                    shutil.rmtree(index_dir)
                    requested = requested_bytes(expert)
                    rows.append(
                        {
                            "scale": scale,
                            "file_bytes": size,
                            "expert": expert,
                            "cache": cache,
                            "requested_bytes": requested,
                            **figures,
                        }
                    )
                    loaded = figures["pickle"]
                    for mode in ("first", "indexed"):
                        ours = figures[mode]
                        print(
                            f"{scale}x {size / 1e9:4.2f} GB {expert:9s} {cache} {mode:7s}: "
                            f"time {loaded['seconds']:6.3f} s vs {ours['seconds']:6.4f} s = "
                            f"{loaded['seconds'] / ours['seconds']:5.0f}x | "
                            f"peak RSS +{loaded['peak_rss_added'] / 1e6:5.0f} MB vs "
                            f"+{ours['peak_rss_added'] / 1e6:5.1f} MB = "
                            f"{loaded['peak_rss_added'] / max(ours['peak_rss_added'], 1):4.0f}x | "
                            f"storage read {loaded['read_bytes'] / 1e6:5.0f} MB vs {ours['read_bytes'] / 1e6:6.2f} MB "
                            f"= {ours['read_bytes'] / requested:4.2f}x the {requested / 1e6:5.2f} MB requested",
                            flush=True,
                        )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
