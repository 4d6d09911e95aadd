#!/usr/bin/env python3
"""Byte-identity check between two checkouts of the program: the same demo commands, the same files.

Runs each command below with the program of --before and of --after (one shared demo dataset, separate output
and cache directories) and compares every results pickle (without its wall time and command line) and every summary
(without its wall-time line) byte for byte. The program's own digest (the third part of each result's fingerprint, and
made_with's "program") differs between any two checkouts by design: it is set aside, the options and data parts are
compared. A results file that differs only in the order of some dict's keys is
counted as identical, and the line says how many. Prints one line per command; exit 1 on any difference.

    python benchmarks/compare_results.py --before ../old-checkout [--after .] [--dir DIR]
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {  # name: options after --demo
    "single": [],
    "sweep": ["--expert", "vlm", "--layer", "0-5", "--rollout_step", "all"],
    "each": ["--expert", "action", "--layer", "2", "--inference_step", "each"],
    "ridge": ["--probe", "ridge", "--layer", "4,5"],
    "task split": ["--split", "task", "--permutations", "5", "--mdl"],
    "concepts": ["--target", "concepts", "--layer", "5"],
    "baseline": ["--expert", "vlm", "--baseline", "visual", "--layer", "5"],
}


def key_order_free(value):
    """The value with every dict's keys in one fixed order: the order of a dict's keys carries no meaning."""
    if isinstance(value, dict):
        return {key: key_order_free(value[key]) for key in sorted(value, key=repr)}
    if isinstance(value, (list, tuple)):
        return type(value)(key_order_free(item) for item in value)
    return value


def comparable_results(path: Path, ordered: bool = True) -> bytes:
    with open(path, "rb") as file:
        results = pickle.load(file)
    for key in ("wall_time_seconds", "command"):
        results.pop(key, None)
    config = results["config"]
    config["fingerprint"] = config["fingerprint"].rsplit("-", 1)[0]
    config["made_with"].pop("program")
    return pickle.dumps(results if ordered else key_order_free(results), protocol=4)


def comparable_summary(path: Path) -> bytes:
    text = re.sub(rb"(?m)^.*wall time.*$", b"", path.read_bytes())
    return re.sub(rb"(Made With: fingerprint [0-9a-f]{16}-[0-9a-f]{16})-[0-9a-f]{16}", rb"\1", text)


def verdict(before: Path, after: Path) -> str:
    """ "same", "reordered" (a results file equal once every dict's keys are put in one order) or "differ"."""
    if not after.is_file():
        return "differ"
    if before.suffix != ".pkl":
        return "same" if comparable_summary(before) == comparable_summary(after) else "differ"
    if comparable_results(before) == comparable_results(after):
        return "same"
    return "reordered" if comparable_results(before, False) == comparable_results(after, False) else "differ"


def run(checkout: Path, data: Path, output: Path, cache: Path, options: list[str]) -> None:
    command = [
        sys.executable,
        str(checkout / "linear_probing_inference.py"),
        "--demo",
        "--data_path",
        str(data),
        "--output_dir",
        str(output),
        "--cache_dir",
        str(cache),
        "--quiet",
        *options,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the checkout to compare against")
    parser.add_argument("--after", default=str(REPO), help="default: this checkout")
    parser.add_argument(
        "--dir", default=None, help="where data and outputs go (default: a temporary directory, removed)"
    )
    arguments = parser.parse_args()
    work = Path(arguments.dir or tempfile.mkdtemp(prefix="compare_results_"))
    differences = 0
    try:
        data = work / "demo"
        for name, options in COMMANDS.items():
            outputs = {}
            for side in ("before", "after"):
                outputs[side] = work / "out" / name.replace(" ", "_") / side
                shutil.rmtree(outputs[side], ignore_errors=True)
                run(
                    Path(getattr(arguments, side)).resolve(), data, outputs[side], work / "cache", options
                )  # one path: it is recorded
            files = sorted(path.name for path in outputs["before"].iterdir())
            verdicts = {
                file_name: verdict(outputs["before"] / file_name, outputs["after"] / file_name) for file_name in files
            }
            different = [file_name for file_name, one in verdicts.items() if one == "differ"]
            reordered = [file_name for file_name, one in verdicts.items() if one == "reordered"]
            extra = sorted(set(path.name for path in outputs["after"].iterdir()) - set(files))
            differences += len(different) + len(extra)
            line = "identical" if not different and not extra else f"DIFFER: {different + extra}"
            if reordered and not different and not extra:
                line += f" ({len(reordered)} results file(s) identical but for the order of dict keys)"
            print(f"{name:11s} {len(files):3d} files: {line}", flush=True)
    finally:
        if arguments.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
