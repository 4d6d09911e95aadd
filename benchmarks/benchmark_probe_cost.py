#!/usr/bin/env python3
"""Probe cost and memory at the widths users run: t5-small-wide labels (512) on full-width Pi0 features (2048).

Cases, each run in its own process (its peak resident memory is that process's VmHWM, read as it exits):

- sweep: an 18-layer sweep of pooled VLM-width features (10 tasks x 50 episodes, width 2048), labelled by a
  random-weight T5 of t5-small's width (512) and, side by side, of the demo's width (32); the program's own
  stages from the pooled features on (labels, folds, control, training, evaluation, bootstrap, files). The raw
  files behind these samples would be 60 GB (120 MB of hidden states per sample), so the features are made in
  memory with a planted task signal; reading is measured by benchmark_reader.py and the `steps` case.
- full: the 512-dim sweep with `--label_space full` (the guide's 512 outputs), once (minutes; not by default).
- scale: the same at LIBERO-90 size (90 tasks x 50 episodes), 512-dim labels.
- ridge: 10 tasks x 30 episodes, 18 layers at width 2048, 512-dim labels: the default (Adam) run, `--probe ridge`,
  `--probe ridge --split task` with 20 permuted assignments and one repeat, with its defaults (1000 permuted
  assignments, one deal of folds: a sweep-level claim) and with five deals; with `--against DIR`, the first three
  also by that checkout's program, the two side by side in this one run. Each runs four times in its process, and
  the best of the three warm runs is reported (all are printed).
- ridge90: the default (Adam) run, `--probe ridge` and `--probe ridge --split task` at LIBERO-90 size (90 tasks x 50
  episodes at width 2048, 512-dim labels), one layer each (`--layer 0`: a layer's cost, once).
- steps: whole commands on task files (the action expert, width 1024, 18 layers, 8 rollout steps): peak memory of
  `--rollout_step all` against one step.
- walk: the same files without a file index (an unwritable --cache_dir, as on a read-only cache or a first run):
  `--layer 5 --rollout_step all`, with the files in the page cache and evicted from it (cold). It shows how often
  a run parses each file.

Each 10 x 50 sweep runs twice in its process: the first pays for T5, XLA compilation and caches; the second is what
a warm run costs (the ridge cases: the best of three). The scale case runs once. Run on an idle machine (timings are
wall clock).

    python benchmarks/benchmark_probe_cost.py [--cases sweep full scale ridge ridge90 steps walk] [--repo DIR]
        [--against DIR] [--dir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAYERS = 18
WIDTH = 2048
STEP = 10
OBJECTS = ["bowl", "plate", "mug", "book", "cheese", "butter", "ketchup", "basket", "pot", "bottle"]
PLACES = ["stove", "cabinet", "rack", "tray", "shelf", "drawer", "table", "box", "caddy"]


def descriptions(count: int) -> list[str]:
    """Distinct LIBERO-like instructions."""
    return [
        f"put the {thing} on the {place}"
        for thing, place in itertools.islice(itertools.product(OBJECTS, PLACES), count)
    ]


def pooled_features(tasks: int, episodes: int, seed: int = 0) -> np.ndarray:
    """(layers, tasks * episodes, width): per-episode noise plus a per-task direction whose strength grows with depth
    (layer 3 carries none), like the demo's text tokens after mean pooling."""
    rng = np.random.default_rng(seed)
    gain = np.linspace(0.2, 2.0, LAYERS, dtype=np.float32)
    gain[3] = 0.0
    signature = rng.standard_normal((tasks, WIDTH), dtype=np.float32)
    task_of_sample = np.repeat(np.arange(tasks), episodes)
    features = rng.standard_normal((LAYERS, tasks * episodes, WIDTH), dtype=np.float32)
    features += gain[:, None, None] * signature[task_of_sample][None]
    return features


def in_process_sweep(lpi, work: Path, tasks: int, episodes: int, t5: Path, extra: list[str], runs: int) -> dict:
    """The program's stages from pooled features on, `runs` times; seconds of each and the results' accuracy."""
    lpi.log.setLevel("WARNING")
    texts = descriptions(tasks)
    features = pooled_features(tasks, episodes)
    samples = lpi.Samples(
        features,
        np.repeat(np.arange(tasks), episodes),
        np.tile(np.arange(episodes), tasks),
        np.full(tasks * episodes, STEP),
        np.full(tasks * episodes, np.nan),
        np.zeros(tasks * episodes, int),
    )
    report = lpi.ReadReport(files={t: f"task_{t}.pkl" for t in range(tasks)}, layer_count=LAYERS, steps_seen={STEP})
    seconds, accuracy = [], None
    for run in range(runs):
        output = work / f"out_{tasks}x{episodes}_{t5.name}_{run}_{os.getpid()}"
        args = lpi.parse_arguments(
            [
                "--data_path",
                str(work),
                "--rollout_step",
                str(STEP),
                "--expert",
                "vlm",
                "--layer",
                "all",
                "--task_range",
                "0",
                str(tasks),
                "--episode_range",
                "0",
                str(episodes),
                "--t5_model",
                str(t5),
                "--cache_dir",
                str(work / f"cache_{os.getpid()}"),
                "--output_dir",
                str(output),
                "--quiet",
                *extra,
            ]
        )
        base, labels, training = lpi.configs_from_arguments(args)
        items = lpi.sweep_items(base, args.layer, [STEP], "all", report)
        start = time.perf_counter()
        if hasattr(lpi, "Dataset"):  # this version: the walked files carry the descriptions
            files = [lpi.TaskFile(t, Path(f"task_{t}.pkl"), None, text, [], {}) for t, text in enumerate(texts)]
            if "made_with" in lpi.Destination._fields:  # what made each result, recorded in it
                made_with = lpi.run_made_with(base, labels, training)
                counted = [lpi.Progress()] if "progress" in lpi.Destination._fields else []  # what was written
                destination = lpi.Destination(output, False, start, [], made_with, False, *counted)
            else:
                destination = lpi.Destination(output, False, start, [], {})
            dataset = lpi.Dataset(base, files, report)
            written = list(lpi.run_sweep(items, dataset, samples, list(range(LAYERS)), labels, training, destination))
        elif hasattr(lpi, "Destination"):  # earlier versions, for before/after tables: one step's samples
            report.descriptions = dict(enumerate(texts))
            destination = lpi.Destination(output, False, start, [])
            written = lpi.run_sweep(items, report, samples, list(range(LAYERS)), labels, training, destination)
        else:
            report.descriptions = dict(enumerate(texts))
            written = lpi.run_sweep(
                items, report, {STEP: samples}, list(range(LAYERS)), labels, training, output, False, start, []
            )
        seconds.append(time.perf_counter() - start)
        accuracy = [round(float(results["metrics"]["accuracy"]), 3) for results, *_ in written]
        shutil.rmtree(output, ignore_errors=True)
    warm = {"warm_s": min(seconds[1:]), "warm_runs_s": seconds[1:]} if runs > 1 else {}  # the best: least disturbed
    return {"first_s": seconds[0], **warm, "accuracy_by_layer": accuracy}


def child(arguments: argparse.Namespace) -> None:
    """One case in this process; its figures as one JSON line."""
    sys.path.insert(0, str(Path(arguments.repo).resolve()))
    lpi = importlib.import_module("linear_probing_inference")
    case = json.loads(arguments.child)
    figures = in_process_sweep(
        lpi, Path(arguments.dir), case["tasks"], case["episodes"], Path(case["t5"]), case["extra"], case["runs"]
    )
    print(json.dumps(figures))


# Runs a Python script (argv[2:]) and, as it exits, writes its peak resident memory (VmHWM) to argv[1]. VmHWM belongs
# to the process image; wait4's ru_maxrss would also count this benchmark's own peak, which a child inherits.
PEAK_WRAPPER = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def write_peak():
    status = open("/proc/self/status").read().splitlines()
    open(peak_file, "w").write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(write_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def measured(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident MB and stdout of one Python process (command: [sys.executable, script, ...])."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        start = time.perf_counter()
        wrapped = [command[0], "-c", PEAK_WRAPPER, peak.name, *command[1:]]
        result = subprocess.run(wrapped, stdout=subprocess.PIPE, env={**os.environ, "PYTHONHASHSEED": "0"})
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")
        return seconds, int(Path(peak.name).read_text()) / 1024, result.stdout.decode()


RIDGE_CLAIM = ["--probe", "ridge", "--split", "task"]  # a sweep-level claim's defaults: 1000 permutations, one deal
RIDGE_CASES = (  # options, and whether --against measures them too (1000 permutations of per-copy ridge: not)
    ([], True),
    (["--probe", "ridge"], True),
    (["--probe", "ridge", "--split", "task", "--permutations", "20", "--repeats", "1"], True),
    (RIDGE_CLAIM, False),
    ([*RIDGE_CLAIM, "--repeats", "5"], False),  # five deals of folds
)
RIDGE_RUNS = 4  # the first pays for T5 and compilation; the best of the three warm runs is reported


def tiny_t5(lpi, work: Path, width: int, tasks: int) -> Path:
    """A random-weight T5 of the given embedding width, vocabulary from the case's descriptions."""
    directory = work / f"t5_width{width}_tasks{tasks}"
    if not directory.exists():
        lpi.build_tiny_t5(directory, descriptions(tasks), d_model=width)
    return directory


def sweep_case(
    arguments, work: Path, lpi, tasks: int, episodes: int, width: int, extra: list[str], runs: int = 2, repo=None
) -> dict:
    """One in-process sweep case in its own process."""
    case = {
        "tasks": tasks,
        "episodes": episodes,
        "t5": str(tiny_t5(lpi, work, width, tasks)),
        "extra": extra,
        "runs": runs,
    }
    repo = repo or arguments.repo
    command = [sys.executable, __file__, "--repo", repo, "--dir", str(work), "--child", json.dumps(case)]
    wall, peak, output = measured(command)
    figures = json.loads(output.strip().splitlines()[-1])
    checkout = "" if repo == arguments.repo else f" [{Path(repo).name}]"
    return {
        "case": f"{tasks}x{episodes}, labels {width}-dim {' '.join(extra)}{checkout}".strip(),
        "process_s": wall,
        "peak_mb": peak,
        **figures,
    }


def steps_data(work: Path, lpi) -> Path:
    """Task files of the action expert at width 1024, 18 layers, 8 rollout steps (10 tasks x 3 episodes, 9 GB)."""
    data = work / "steps_data"
    if not data.exists():
        lpi.write_demo_dataset(
            data, num_tasks=10, num_episodes=3, steps=tuple(range(10, 90, 10)), vlm_width=16, action_width=1024
        )
    return data


def files_command(arguments, work: Path, lpi, cache: Path, output: Path, options: list[str]) -> list[str]:
    """A whole command of the measured checkout on the steps case's files."""
    shutil.rmtree(output, ignore_errors=True)
    return [
        sys.executable,
        str(Path(arguments.repo) / "linear_probing_inference.py"),
        "--data_path",
        str(steps_data(work, lpi)),
        "--t5_model",
        str(tiny_t5(lpi, work, 512, 10)),
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(output),
        "--expert",
        "action",
        "--task_range",
        "0",
        "10",
        "--episode_range",
        "0",
        "3",
        "--quiet",
        *options,
    ]


def steps_case(arguments, work: Path, lpi) -> list[dict]:
    """Peak memory of a whole command over 1 and over 8 rollout steps (files written once)."""
    rows = []
    for steps in ("10", "all"):
        output = work / f"steps_out_{steps}"
        options = ["--layer", "all", "--rollout_step", steps]
        command = files_command(arguments, work, lpi, work / "steps_cache", output, options)
        rows.append(files_row(f"files, --expert action --layer all --rollout_step {steps}", command, output))
    return rows


def files_row(case: str, command: list[str], output: Path) -> dict:
    """One whole command measured: its time, peak memory and how many results it wrote."""
    wall, peak, _ = measured(command)
    return {"case": case, "process_s": wall, "peak_mb": peak, "results": len(list(output.glob("results_*.pkl")))}


def page_cache(paths: list[Path], keep: bool) -> None:
    """Read the files into the page cache (keep) or drop them from it (works without privileges)."""
    for path in paths:
        if keep:
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def walk_case(arguments, work: Path, lpi) -> list[dict]:
    """One layer over 8 rollout steps without a file index, warm and cold."""
    unwritable = work / "cache_is_a_file"
    unwritable.write_text("")
    files = sorted(steps_data(work, lpi).glob("task_*.pkl"))
    rows = []
    for cache in ("warm", "cold"):
        page_cache(files, keep=cache == "warm")
        output = work / f"walk_out_{cache}"
        options = ["--layer", "5", "--rollout_step", "all"]
        command = files_command(arguments, work, lpi, unwritable, output, options)
        rows.append(files_row(f"files, no index, --layer 5 --rollout_step all, {cache}", command, output))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["sweep", "scale", "steps", "walk"],
        choices=["sweep", "full", "scale", "ridge", "ridge90", "steps", "walk"],
    )
    parser.add_argument("--against", default=None, help="ridge: also measure this checkout, case by case")
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose program is measured (default: this one)")
    parser.add_argument(
        "--dir", default=None, help="where data and outputs go (default: a temporary directory, removed)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        return child(arguments)
    sys.path.insert(0, str(REPO))
    import linear_probing_inference as lpi  # the T5 and data writers of this checkout

    temporary = arguments.dir is None
    work = Path(arguments.dir or tempfile.mkdtemp(prefix="probe_cost_"))
    arguments.dir = str(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if "sweep" in arguments.cases:
            for width in (512, 32):
                rows.append(sweep_case(arguments, work, lpi, 10, 50, width, []))
                print(json.dumps(rows[-1]), flush=True)
        if "full" in arguments.cases:
            rows.append(sweep_case(arguments, work, lpi, 10, 50, 512, ["--label_space", "full"], runs=1))
            print(json.dumps(rows[-1]), flush=True)
        if "scale" in arguments.cases:
            rows.append(sweep_case(arguments, work, lpi, 90, 50, 512, [], runs=1))  # minutes: once
            print(json.dumps(rows[-1]), flush=True)
        if "ridge" in arguments.cases:
            for extra, against in RIDGE_CASES:
                for repo in [arguments.repo, *([arguments.against] if arguments.against and against else [])]:
                    rows.append(sweep_case(arguments, work, lpi, 10, 30, 512, extra, runs=RIDGE_RUNS, repo=repo))
                    print(json.dumps(rows[-1]), flush=True)
        if "ridge90" in arguments.cases:  # LIBERO-90 size, one layer (the last --layer wins), once each
            for extra in ([], ["--probe", "ridge"], RIDGE_CLAIM):
                rows.append(sweep_case(arguments, work, lpi, 90, 50, 512, [*extra, "--layer", "0"], runs=1))
                print(json.dumps(rows[-1]), flush=True)
        for name, case in (("steps", steps_case), ("walk", walk_case)):
            for row in case(arguments, work, lpi) if name in arguments.cases else []:
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':58s} {'first s':>8s} {'warm s':>7s} {'process s':>9s} {'peak MB':>8s}")
    for row in rows:
        first = f"{row['first_s']:8.1f}" if "first_s" in row else f"{'':8s}"
        warm = f"{row['warm_s']:7.1f}" if "warm_s" in row else f"{'':7s}"
        print(f"{row['case']:58s} {first} {warm} {row['process_s']:9.1f} {row['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
