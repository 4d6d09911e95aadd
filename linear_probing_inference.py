#!/usr/bin/env python3
"""Linear probing of Pi0 inference latents.

Does this layer, of this expert, at this rollout step, still carry the language
instruction? A linear probe maps the layer's token-pooled hidden state onto the T5
embedding of the task description; we report how well it does on episodes it never saw.

Sections, in the order the data flows (each section's entry function in parentheses):
  Configuration        Source, LabelConfig, TrainingConfig: what a run reads, predicts and trains
  Features             task files -> expert entry -> layer -> token positions -> pooled vector (read_dataset,
                       step_samples)
  Labels and concepts  the T5 mean over each description's real tokens, cached (t5_labels); or the words that vary
  Folds and design     whole episodes (or tasks) held out, permuted assignments, label spaces (make_design)
  Probe and training   every probe of a run in one jitted program, early stopping; or ridge (fit_items)
  Evaluation           held-out predictions scored among the analyzed tasks: one HeldOut record per item
                       (probe_group; probe_features runs it on features already in memory)
  Output               the results file, the summary and what made them, written atomically (results_record,
                       format_summary, write_results)
  Sweep                layers, denoising and rollout steps, shards and resume (run_sweep)
  Generalization       --generalize: each cell's probe tested at the sweep's other steps (generalized_sweep)
  Report and figures   a results directory as sweep.csv, curves and heatmaps (write_report)
  Command line, main   options from the configs' fields, one line for every fault (main)
Appendix A is the restricted, memory-mapped pickle reader the features come through (read_task_file); appendix B the
demo generator (`--demo` writes synthetic data in the real layout). Every number of a summary is read from the
HeldOut record that Evaluation returns.

Design notes: ../shared/spec/linear_probing_guide.md and ../shared/pi0-latents.md.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import csv
import ctypes
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib.metadata
import io
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import platform
import re
import signal
import stat
import struct
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

# JAX grabs 75% of a GPU at start-up; a probe needs megabytes and GPUs are shared.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while the libraries load (seconds, before main): one line, as everywhere else (see main)."""
    with contextlib.suppress(OSError):
        os.write(2, f"{Path(sys.argv[0]).name}: interrupted while starting; nothing was written\n".encode())
    os._exit(130)


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (`cmd &`)
        signal.signal(signal.SIGINT, interrupted_while_starting)
    for standard in (0, 1, 2):  # started with one closed (`2>&-`): /dev/null there, before any file takes its number
        try:
            os.fstat(standard)
        except OSError:
            os.open(os.devnull, os.O_RDWR)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

# -----------------------------------------------------------------------------
# Configuration: what a run reads, predicts and trains (Source, LabelConfig, TrainingConfig)
# -----------------------------------------------------------------------------

log = logging.getLogger("linear_probing")


# Token positions in the Pi0 prefix (PaliGemma expert): each camera's SigLIP patches (base, left wrist, right wrist),
# then the prompt's tokens. The action expert's own tokens come after the prefix; "visual" is SigLIP's own output per
# camera (vision_latents), one camera's patches. The summary and --expert's help say these positions from here.
CAMERAS, PATCHES_PER_CAMERA, PROMPT_TOKENS = 3, 256, 48
IMAGE_TOKENS = slice(0, CAMERAS * PATCHES_PER_CAMERA)
TEXT_TOKENS = slice(IMAGE_TOKENS.stop, IMAGE_TOKENS.stop + PROMPT_TOKENS)
PREFIX_TOKEN_COUNT = TEXT_TOKENS.stop
EXPERT_TOKENS = {"vlm": slice(0, PREFIX_TOKEN_COUNT), "text_only": TEXT_TOKENS, "image": IMAGE_TOKENS}
PROMPT_EXPERTS = ("text_only", "vlm")  # --tokens prompt: the experts whose positions end with the prompt's text


def positions_text(positions: slice) -> str:
    """Token positions as people write them, both ends included: 768-815."""
    return f"{positions.start}-{positions.stop - 1}"


EXPERT_TOKEN_CONTENTS = {  # what each prefix expert's positions hold
    "vlm": f"images {positions_text(IMAGE_TOKENS)} and text {positions_text(TEXT_TOKENS)}",
    "text_only": "prompt text",
    "image": f"{CAMERAS} cameras x {PATCHES_PER_CAMERA} SigLIP patches",
}


def prefix_tokens_text(expert: str) -> str:
    """A prefix expert's token positions in words: "VLM prefix tokens 768-815 (prompt text)"."""
    return f"VLM prefix tokens {positions_text(EXPERT_TOKENS[expert])} ({EXPERT_TOKEN_CONTENTS[expert]})"


EXPERTS = ("vlm", "text_only", "image", "action", "visual")
EPSILON = 1e-8  # as in the guide's cosine
DEFAULT_TASK_SPLIT_PERMUTATIONS = 20  # the permutation null of --split task: trained probes
# Ridge scores a permuted assignment for a small matrix product (the fit of the class indicators times the permuted
# table), so under --split task its null is large enough for a family-wise correction over a sweep
RIDGE_TASK_SPLIT_PERMUTATIONS = 1000
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linear_probing"
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
MOST_IDS = 10_000  # task ids and episode indices: an id absent from the files is listed in every result
MOST_SEED = 2**31 - 2**16  # the seed is an int32 in the compiled program, plus repeats and MDL blocks
# --labels: what names a sample's class, its task or the prompt its step ran under; or both, compared
LABEL_SOURCES = ("task", "prompt", "task,prompt")


class Option(NamedTuple):
    """A field's command-line option: its help (written only here) and what argparse needs. It is --<field> with the
    field's default; for a bool field, a switch (--no_<field>, helped as such, when the field is on by default)."""

    help: str
    type: object = None  # parses the option's text (None: the text itself); int and float: within the bounds below
    at_least: float | None = None
    above: float | None = None
    below: float | None = None
    at_most: float | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | None = None
    flags: tuple[str, ...] = ()  # the option's names, when not --<field>
    derived: bool = False  # not given, the field is derived from other options (the parser's default is None)


def option(help: str, default=dataclasses.MISSING, **argparse_needs) -> dataclasses.Field:
    """A configuration field set by its option (see Option); without a default the field is required."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **argparse_needs)})


def label_source(text: str) -> str:
    """argparse type of --labels: the two sources in either order name one comparison, written task,prompt."""
    names = text.split(",")
    return "task,prompt" if sorted(names) == ["prompt", "task"] else text


def baseline_value(text: str) -> tuple[str, int | str]:
    """argparse type: EXPERT:LAYER (vlm:0, image:5, text_only:0, action:3) or visual[:CAMERA]."""
    expert, _, where = text.partition(":")
    if expert not in EXPERTS:
        raise argparse.ArgumentTypeError(
            f"expected EXPERT:LAYER or visual[:CAMERA] with EXPERT one of {', '.join(EXPERTS)}; got {text!r}"
        )
    if expert == "visual":
        return expert, where or "base_0_rgb"
    if not re.fullmatch(r"[0-9]+", where):
        raise argparse.ArgumentTypeError(
            f"--baseline {expert} needs a layer number (0 or more): {expert}:LAYER, e.g. {expert}:0; got {text!r}"
        )
    return expert, int(where)


def baseline_spec_text(baseline: tuple[str, int | str]) -> str:
    """--baseline as the user writes it."""
    return f"{baseline[0]}:{baseline[1]}"


@dataclasses.dataclass(frozen=True)
class Source:
    """How a run reads its samples: which files and episodes, and how each sample becomes one feature vector."""

    data_path: str = option("directory of task_{id}_{name}.pkl files")
    task_range: tuple[int, int] = option(
        "task ids START..END-1 (end-exclusive: '0 10' is ten tasks)",
        type=int,
        at_least=0,
        at_most=MOST_IDS,
        nargs=2,
        metavar=("START", "END"),
    )
    episode_range: tuple[int, int] = option(
        "episodes START..END-1 of each task (end-exclusive)",
        type=int,
        at_least=0,
        at_most=MOST_IDS,
        nargs=2,
        metavar=("START", "END"),
    )
    expert: str = option(
        "; ".join(f"{expert}: {prefix_tokens_text(expert)}" for expert in EXPERT_TOKENS)
        + "; action: the action expert's own tokens, after the prefix; visual: SigLIP output of --camera",
        choices=EXPERTS,
    )
    feature_type: str = option(
        "key of the expert entry to probe: hidden_states, post_attn_embedding, ... (default: hidden_states; "
        "pre_logits for visual)",
        default="hidden_states",
        derived=True,
    )
    token_range: tuple[int, int] | None = option(
        "pool token positions START..END-1 instead of the expert's",
        default=None,
        type=int,
        at_least=0,
        nargs=2,
        metavar=("START", "END"),
    )
    pooling: str = option(
        "over the token positions (default: %(default)s)", default="mean", choices=("mean", "max", "last")
    )
    tokens: str = option(
        "text_only and vlm: all = every text position, padding included (default); prompt = only the prompt's own "
        "tokens, the padding found from the layer-0 embeddings (a padded position attends to every token, images "
        "included)",
        default="all",
        choices=("all", "prompt"),
    )
    camera: str = option("--expert visual: which vision_latents camera (default: %(default)s)", default="base_0_rgb")
    trust_pickle: bool = option(
        "UNSAFE: let task files name any Python global, which runs code from the file; only for files you made, with "
        "custom classes",
        default=False,
    )
    strict: bool = option(
        "stop at the first unreadable or malformed task file instead of skipping it with a warning", default=False
    )
    index_dir: str | None = None  # where each task file's structure is cached (None: no cache); under --cache_dir
    baseline: tuple[str, int | str | None] | None = option(  # (expert, layer or camera), read in the same walk
        "conditional probing: also train on this baseline's features alone and joined with the layer's, and report "
        "what the layer adds (e.g. visual, visual:left_wrist_0_rgb, image:5, text_only:0, vlm:0)",
        default=None,
        type=baseline_value,
        metavar="EXPERT:LAYER",
    )


class Item(NamedTuple):
    """What one result is about: a layer (or camera) at one rollout step, and one denoising step or all of them."""

    rollout_step: int  # the N of the key "step_N", never a position
    layer: int | None  # None for "visual" (SigLIP output has no layer axis)
    inference_step: int | None = None  # action expert: position in denoising order; None = every entry, pooled


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """What the probe predicts: the T5 embedding of the description (how it is made), or its concepts."""

    target: str = option(
        "t5: the description's T5 embedding (default); concepts: one logistic probe per word that varies between the "
        "analyzed tasks (or per --concepts attribute), on held-out tasks by default",
        default="t5",
        choices=("t5", "concepts"),
    )
    label_by: str = option(
        "task: a sample's class is its task's description (default); prompt: the prompt its step ran under "
        "(step['prompt']; an empty prompt is a class of its own); task,prompt: both probes on the same features, "
        "folds and budget, compared on the samples whose prompt differs from their task's",
        default="task",
        type=label_source,
        choices=LABEL_SOURCES,
        metavar="{task|prompt|task,prompt}",
        flags=("--labels",),
    )
    concepts_file: str | None = option(
        "--target concepts: a TSV of task_id, attribute, value giving the concepts instead of the words",
        default=None,
        metavar="FILE",
        flags=("--concepts",),
    )
    t5_model: str = option(
        "T5 hub name or local directory with config, weights and tokenizer (default: %(default)s)", default="t5-small"
    )
    center_labels: bool = option(
        "train on raw T5 embeddings (the guide's exact recipe) instead of subtracting the mean training-task embedding",
        default=True,
    )
    label_space: str = option(
        "span: the probe predicts coordinates in the span of the training tasks' embeddings (at most tasks - 1 "
        "directions; exact for the loss and retrieval, and as many times cheaper as T5 is wider); full: all of T5's "
        "axes, the guide's recipe literally (512 outputs for t5-small: about 15x the training time) (default: "
        "%(default)s)",
        default="span",
        choices=("span", "full"),
    )
    label_dim: int | None = option(
        "project the T5 embeddings on the training tasks' top K principal directions (default: off)",
        default=None,
        type=int,
        at_least=1,
    )
    cache_dir: str = option(
        "where T5 labels, task-file indexes and compiled JAX programs are cached (default: %(default)s)",
        default=str(DEFAULT_CACHE_DIR),
    )


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Probe optimisation and how samples are held out."""

    learning_rate: float = option("Adam learning rate (default: %(default)s)", default=0.001, type=float, above=0)
    num_epochs: int = option(
        "at most this many epochs; early stopping usually ends sooner (default: %(default)s)",
        default=100,
        type=int,
        at_least=1,
        at_most=100_000,  # the loss history is (copies, epochs) per item
    )
    batch_size: int = option("minibatch size (default: %(default)s)", default=32, type=int, at_least=1)
    seed: int = option(
        "seeds the folds, initialisation, shuffling, control labels and bootstrap (default: %(default)s)",
        default=42,
        type=int,
        at_least=0,  # numpy's generators take no negative seed
        at_most=MOST_SEED,
    )
    patience: int = option(
        "epochs without validation improvement before stopping (default: %(default)s)",
        default=10,
        type=int,
        at_least=1,
        at_most=100_000,
    )
    min_steps_per_epoch: int = 25  # small sample counts: an epoch is at least this many updates
    cv_folds: int = option(
        "cross-validation folds, grouped by episode (or task); fewer when there are fewer episodes (default: "
        "%(default)s)",
        default=5,
        type=int,
        at_least=1,
    )
    split: str = option(
        "episode: hold out episodes of every task; task: hold out whole tasks, whose embeddings the probe never sees "
        "(default: episode; task with --target concepts)",
        default="episode",
        choices=("episode", "task"),
        derived=True,
    )
    validation_fraction: float = option(
        "share of each fold's training episodes (tasks, with --split task) used for early stopping (default: "
        "%(default)s)",
        default=0.2,
        type=float,
        above=0,
        below=1,
    )
    standardize: bool = option("do not standardize features with training-set statistics", default=True)
    control: bool = option(
        "skip the control task and the permutation null (probes trained on task -> embedding assignments permuted "
        "across tasks)",
        default=True,
    )
    permutations: int | None = option(
        "permuted assignments trained like the probe; the first is the control; with several, a permutation p-value "
        f"(default: with --split task {DEFAULT_TASK_SPLIT_PERMUTATIONS}, {RIDGE_TASK_SPLIT_PERMUTATIONS} with --probe "
        "ridge; else 1)",
        default=None,
        type=int,
        at_least=1,
        at_most=100_000,
        metavar="N",
    )
    repeats: int = option(
        "seeds of folds and initialisation; metrics are their mean, intervals widened by their spread (default: "
        "%(default)s)",
        default=1,
        type=int,
        at_least=1,
        at_most=1_000,
        metavar="K",
    )
    mdl: bool = option(
        "also the online (prequential) codelength of the task labels, over blocks of whole episodes (tasks with "
        "--split task)",
        default=False,
    )
    bootstrap: int = option(
        "BCa resamples of whole episodes (tasks with --split task) for 95%% intervals; 0 for none (default: "
        "%(default)s)",
        default=1000,
        type=int,
        at_least=0,
        at_most=100_000,  # every resample is drawn at once: (resamples, units)
    )
    probe: str = option(
        "linear: trained Dense layer; ridge: the same map in closed form, penalty by inner cross-validation (default: "
        "%(default)s)",
        default="linear",
        choices=("linear", "ridge"),
    )
    loss: str = option(
        "cosine: 1 - cos (the guide's); contrastive: InfoNCE over the analyzed tasks' embeddings (default: "
        "%(default)s)",
        default="cosine",
        choices=("cosine", "mse", "contrastive"),
    )
    generalize: bool = option(
        "a sweep over several rollout steps, or denoising steps (--inference_step each), or both: also test each "
        "cell's probe on the same layer's samples at every other step (train at one step, test at another); folds "
        "are then dealt over the episodes of all the sweep's steps, so an episode is held out by the same fold in "
        "every cell",
        default=False,
    )

    @property
    def null_size(self) -> int:
        """How many permuted assignments are trained: 0 without the control."""
        if not self.control:
            return 0
        if self.permutations is not None:
            return self.permutations
        if self.split != "task":
            return 1
        return RIDGE_TASK_SPLIT_PERMUTATIONS if self.probe == "ridge" else DEFAULT_TASK_SPLIT_PERMUTATIONS


class ProbeError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""

    exit_code = 1


class OptionError(ProbeError):
    """An option that does not fit the data: printed as one line, exit status 2."""

    exit_code = 2


def bound_problem(value, spec: Option) -> str | None:
    """What is wrong with a number for its option's bounds ("must be >= 1"), or None."""
    low_ok = (spec.at_least is None or value >= spec.at_least) and (spec.above is None or value > spec.above)
    high_ok = (spec.below is None or value < spec.below) and (spec.at_most is None or value <= spec.at_most)
    finite = spec.type is not float or math.isfinite(value)  # an int of any size is finite (isfinite overflows)
    if finite and low_ok and high_ok:
        return None
    limits = [
        f">= {spec.at_least}" if spec.at_least is not None else None,
        f"> {spec.above}" if spec.above is not None else None,
        f"< {spec.below}" if spec.below is not None else None,
        f"<= {spec.at_most}" if spec.at_most is not None else None,
    ]
    return f"must be {' and '.join(limit for limit in limits if limit)}"


def check_configs(labels: LabelConfig, training: TrainingConfig) -> None:
    """What the options are checked for, on the configs themselves (the command line's and probe_features'): each
    field's type, bounds and choices, then the combinations that cannot run. OptionError names the option."""
    for config in (labels, training):
        for field in dataclasses.fields(config):
            spec, value = field.metadata.get("option"), getattr(config, field.name)
            if spec is None or value is None:
                continue
            kinds = {int: (int,), float: (int, float)}.get(spec.type)
            if kinds and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise OptionError(f"--{field.name} {value!r}: must be a number ({spec.type.__name__})")
            problem = bound_problem(value, spec) if kinds else None
            if spec.choices and value not in spec.choices:
                problem = f"must be one of {', '.join(spec.choices)}"
            if problem:
                raise OptionError(f"--{field.name} {value!r}: {problem}")
    if training.cv_folds < 2:
        raise OptionError(f"--cv_folds {training.cv_folds}: at least 2 folds are needed to hold anything out")
    if labels.concepts_file and labels.target != "concepts":
        raise OptionError("--concepts applies to --target concepts")
    concept_misfits = training.probe != "linear" or training.mdl or training.repeats > 1 or training.permutations
    if labels.target == "concepts" and concept_misfits:
        raise OptionError(
            "--target concepts trains softmax probes on its own: --probe ridge, --mdl, --repeats and --permutations "
            "apply to --target t5"
        )
    if labels.target == "concepts" and labels.label_by != "task":
        raise OptionError(f"--labels {labels.label_by} applies to --target t5; concepts are the description's words")
    if labels.label_by == "task,prompt" and training.split != "episode":
        raise OptionError("--labels task,prompt compares two probes on the same folds: it needs --split episode")
    if not training.control and training.permutations is not None:
        raise OptionError("--permutations needs the control: drop --no_control")
    if training.mdl and labels.label_dim:
        raise OptionError(
            "--mdl codes blocks with probes trained on a few tasks, fewer than --label_dim needs: use one or the other"
        )
    if training.probe == "ridge" and training.loss != "cosine":
        raise OptionError("--loss applies to --probe linear; ridge fits squared error in closed form")


# -----------------------------------------------------------------------------
# Features: task files -> expert entry -> layer -> token positions -> pooled vector (read_dataset, step_samples)
# -----------------------------------------------------------------------------


def progress_disabled() -> bool | None:
    """tqdm's `disable`: off under --quiet; None lets tqdm switch itself off when stderr is not a terminal."""
    return None if log.isEnabledFor(logging.INFO) else True


TASK_FILE_PATTERN = re.compile(r"^task_([0-9]+)_.*\.pkl$")  # ASCII digits: int() reads "٣" as 3


def find_task_files(data_path: Path, task_range: tuple[int, int]) -> tuple[dict[int, Path], list[int]]:
    """Map each task id in the range to its file; also return the ids with no file. A name that is not a regular file
    (a directory, a FIFO, a link to a device) is kept: reading it says what it is, and skips it."""
    if not data_path.is_dir():
        raise ProbeError(f"--data_path {data_path}: not a directory")
    files_by_task: dict[int, list[Path]] = {}
    try:
        names = sorted(data_path.iterdir())
    except OSError as error:
        raise ProbeError(f"--data_path {data_path}: cannot list it ({error.strerror})") from None
    for path in names:
        match = TASK_FILE_PATTERN.match(path.name)
        if match:
            files_by_task.setdefault(int(match.group(1)), []).append(path)
    found, missing = {}, []
    for task_id in range(*task_range):
        paths = files_by_task.get(task_id, [])
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise ProbeError(f"{data_path}: task {task_id} has {len(paths)} files ({names}); keep one file per task id")
        if paths:
            found[task_id] = paths[0]
        else:
            missing.append(task_id)
    return found, missing


def id_runs(ids: list[int]) -> str:
    """Ascending ids in words, three or more in a row as a range: 1, 2, 5-9."""
    runs: list[list[int]] = []
    for one in ids:
        if runs and one == runs[-1][-1] + 1:
            runs[-1].append(one)
        else:
            runs.append([one])
    words = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return ", ".join(words)


def step_number(key: str) -> int | None:
    """The N of a rollout-step key "step_N", or None for other keys."""
    match = re.fullmatch(r"step_([0-9]+)", key)
    return int(match.group(1)) if match else None


def denoising_time(key: str) -> float:
    """Flow-matching time written at the end of an action-expert key."""
    match = re.search(r"([0-9]+(?:\.[0-9]+)?)$", key)
    if not match:
        raise ProbeError(f"action-expert key {key!r} does not end with its denoising time")
    return float(match.group(1))


def action_expert_keys(step_data: dict) -> list[str]:
    """Action-expert entries of a step, in denoising order (time descending: t=1.0 first)."""
    keys = [key for key, value in step_data.items() if key.startswith("action_expert") and isinstance(value, dict)]
    return sorted(keys, key=denoising_time, reverse=True)


def token_positions(source: Source, token_count: int) -> slice:
    """Token positions pooled for the expert (or --token_range), given the length of the token axis."""
    if source.token_range is not None:
        start, end = source.token_range
        if end > token_count:
            raise OptionError(
                f"--token_range {start} {end} is past the {token_count} tokens of feature {source.feature_type!r}"
            )
        return slice(start, end)
    if source.expert in EXPERT_TOKENS:
        positions = EXPERT_TOKENS[source.expert]
        if token_count < positions.stop:
            raise ProbeError(
                f"feature {source.feature_type!r} has {token_count} tokens; --expert {source.expert} needs the "
                f"{PREFIX_TOKEN_COUNT}-token VLM prefix"
            )
        return positions
    if source.expert == "action" and token_count > PREFIX_TOKEN_COUNT:  # an entry holding the whole sequence
        return slice(PREFIX_TOKEN_COUNT, None)
    return slice(0, None)


def pool_tokens(tokens: np.ndarray, pooling: str) -> np.ndarray:
    """Pool a (tokens, width) view to (width,) float32; a (width,) vector is returned as it is."""
    values = np.asarray(tokens, dtype=np.float32)
    if values.ndim == 1:
        return values
    if pooling == "mean":
        pooled = values.mean(axis=0, dtype=np.float64)
    elif pooling == "max":
        pooled = values.max(axis=0)
    elif pooling == "last":
        pooled = values[-1]
    else:
        raise OptionError(f"unknown pooling {pooling!r}")
    return np.asarray(pooled, dtype=np.float32)


def feature_array(entry: dict, source: Source) -> np.ndarray:
    """The entry's array for --feature_type, checked to be an array."""
    if source.feature_type not in entry:
        available = ", ".join(sorted(entry)) or "none"
        raise OptionError(f"--feature_type {source.feature_type!r} is not in the expert entry (it has: {available})")
    array = entry[source.feature_type]
    if not hasattr(array, "ndim") or array.ndim < 1:
        raise ProbeError(f"feature {source.feature_type!r} is not an array")
    if array.dtype.kind not in "biuf" and array.dtype.type.__module__ != "ml_dtypes":
        raise ProbeError(f"feature {source.feature_type!r} has dtype {array.dtype}, not real numbers")
    return array


def layer_tokens(array: np.ndarray, source: Source, layer: int, option: str | None = None) -> np.ndarray:
    """One layer of an entry's feature array cut to the token positions: (tokens, width), or (width,) for a per-layer
    vector. Indexing only: nothing of a mapped array is read. An error names `option` (default --layer)."""
    if source.expert == "visual":  # vision_latents[camera][feature]: ([batch,] patch, width), no layers
        layer_array = array
    else:
        if array.ndim < 2:
            raise ProbeError(f"feature {source.feature_type!r} is not a (layer, ...) array")
        if not 0 <= layer < array.shape[0]:
            option = option or f"--layer {layer}"
            raise OptionError(
                f"{option} is out of range: the data has {array.shape[0]} layers (0-{array.shape[0] - 1})"
            )
        layer_array = array[layer]
    if layer_array.ndim == 3:  # (batch, token, width): the batch axis is optional in the files
        layer_array = layer_array[0]
    if layer_array.ndim == 1:  # a per-layer vector (e.g. norm scales): no tokens to choose
        if (
            source.expert in ("text_only", "image") or source.token_range is not None
        ):  # a part of the tokens was asked for
            raise OptionError(f"--expert {source.expert} needs a token axis; feature {source.feature_type!r} has none")
        return layer_array
    if layer_array.ndim != 2:
        raise ProbeError(
            f"feature {source.feature_type!r} has shape {array.shape}; expected ([layer,] [batch,] token, width)"
        )
    return layer_array[token_positions(source, layer_array.shape[0])]


def expert_entries(step_data: dict, source: Source, option: str | None = None) -> list[tuple[float, dict]]:
    """(denoising time, entry) pairs a step contributes: each denoising entry, in order, for the action expert; one
    entry, time NaN, for the others. An error names `option` (default --camera)."""
    if source.expert == "visual":
        cameras = step_data.get("vision_latents")
        if not isinstance(cameras, dict):
            raise ProbeError("step has no 'vision_latents' dict (written by newer collectors only)")
        if not isinstance(cameras.get(source.camera), dict):
            option = option or f"--camera {source.camera}"
            raise OptionError(
                f"{option}: no such camera in vision_latents (it has: {', '.join(sorted(cameras)) or 'none'})"
            )
        return [(math.nan, cameras[source.camera])]
    if source.expert != "action":
        entry = step_data.get("vlm_layer_output")
        if not isinstance(entry, dict):
            raise ProbeError("step has no 'vlm_layer_output' dict")
        return [(math.nan, entry)]
    keys = action_expert_keys(step_data)
    if not keys:
        raise ProbeError("step has no action-expert entries (keys starting with 'action_expert')")
    return [(denoising_time(key), step_data[key]) for key in keys]


@dataclasses.dataclass
class Samples:
    """Pooled features of one rollout step, every requested layer, with the identity of each sample."""

    features: np.ndarray  # (layers, samples, width) float32, layers as requested
    task_id: np.ndarray  # (samples,) int
    episode: np.ndarray  # (samples,) int, the i of "episode_i"
    step: np.ndarray  # (samples,) int, the rollout step N
    inference_time: np.ndarray  # (samples,) float, NaN but for the action expert
    inference_index: np.ndarray  # (samples,) int: position in denoising order (0 = t 1.0); 0 but for the action expert
    baseline: np.ndarray | None = None  # (samples, width) pooled features of --baseline, the same samples
    prompt: np.ndarray | None = None  # (samples,) object: the prompt each sample's step ran under (None: it has none)
    prompt_length: np.ndarray | None = None  # (samples,) int: --tokens prompt, the text positions kept (padding out)

    def select(self, rows: np.ndarray, layer_position: int) -> Samples:
        """The given rows of one layer, as a one-layer Samples (views, not copies, when the rows are all, in order)."""
        if len(rows) == len(self.task_id) and np.array_equal(rows, np.arange(len(rows))):
            rows = slice(None)
        baseline = None if self.baseline is None else self.baseline[rows]
        return Samples(
            self.features[layer_position : layer_position + 1, rows],
            self.task_id[rows],
            self.episode[rows],
            self.step[rows],
            self.inference_time[rows],
            self.inference_index[rows],
            baseline,
            None if self.prompt is None else self.prompt[rows],
            None if self.prompt_length is None else self.prompt_length[rows],
        )


class SampleRow(NamedTuple):
    """One sample as read: who it is, and its views (indexing only; pooled once every slice was announced)."""

    task_id: int
    episode: int
    inference_time: float
    inference_index: int
    layers: list  # the token view of each requested layer (pooled: (layers, width) float32)
    baseline: object = None  # the --baseline token view (pooled: (width,)), or None
    prompt_length: int = PROMPT_TOKENS  # the text positions kept (--tokens prompt drops the padding)


class TextEnd(NamedTuple):
    """How a sample's text positions end in the layer-0 hidden states (the token embeddings), where every padded
    position holds one vector, the pad token's embedding: what --tokens prompt finds the padding from."""

    last: bytes  # digest of the vector at the last text position
    run: int  # how many positions at the end hold that same vector


def text_end(embeddings: np.ndarray) -> TextEnd:
    """The TextEnd of a (text positions, width) view of the layer-0 hidden states; vectors compared bit for bit."""
    rows = np.ascontiguousarray(embeddings).view(np.uint8).reshape(len(embeddings), -1)
    same = (rows == rows[-1]).all(axis=1)
    run = len(same) if same.all() else int(np.argmin(same[::-1]))
    return TextEnd(hashlib.sha256(rows[-1].tobytes()).digest()[:16], run)


@dataclasses.dataclass
class ReadReport:
    """What the reader found, skipped and missed: written to the summary."""

    files: dict[int, str] = dataclasses.field(default_factory=dict)
    missing_tasks: list[int] = dataclasses.field(default_factory=list)
    skipped_files: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why
    skipped_steps: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)  # step -> path -> why
    missing_episodes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (task, episode) not in the file
    episodes_without_step: dict[int, list[tuple[int, int]]] = dataclasses.field(
        default_factory=dict
    )  # step -> (task, episode)
    steps_seen: set[int] = dataclasses.field(default_factory=set)  # rollout steps present in the episodes read
    step_episodes: dict[int, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)  # step -> (task, episode)
    without_baseline: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (task, episode, step)
    layer_count: int = 0  # layers of the feature (from the first entry read)
    # step -> its entries' denoising times, in denoising order (the file with the fewest, when files differ)
    inference_times: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    uneven_steps: set[int] = dataclasses.field(default_factory=set)  # steps whose episodes' denoising entries differ
    # step -> (task, episode) -> the prompt that step ran under (None: the step holds no 'prompt' string)
    prompts: dict[int, dict[tuple[int, int], str | None]] = dataclasses.field(default_factory=dict)
    # step -> (task, episode) -> how its text ends in the layer-0 embeddings (--tokens prompt only)
    text_ends: dict[int, dict[tuple[int, int], TextEnd]] = dataclasses.field(default_factory=dict)

    def skipped_at(self, step: int) -> dict[str, str]:
        """The files a step's results list as skipped: unreadable ones, and those whose step is malformed."""
        return {**self.skipped_files, **self.skipped_steps.get(step, {})}


VIEW_BATCH_BYTES = 256 * 2**20  # mapped slices touched at once: read ahead together, let go once pooled


def pooled_rows(rows: list[SampleRow], pooling: str) -> list[SampleRow]:
    """The rows with their views pooled: layers (layers, width), baseline (width,), VIEW_BATCH_BYTES at a time."""
    # A batch's slices are announced together, so cold reads overlap instead of queueing, and let go once pooled: a
    # file's touched pages otherwise all count against this process (18 layers of 50 episodes' prefixes are 6 GB).
    pooled, batch, size = [], [], 0
    for position, row in enumerate(rows):
        batch.append(row)
        size += sum(view.nbytes for view in row.layers) + (0 if row.baseline is None else row.baseline.nbytes)
        if size < VIEW_BATCH_BYTES and position < len(rows) - 1:
            continue
        views = [
            view
            for sample in batch
            for view in [*sample.layers, *([] if sample.baseline is None else [sample.baseline])]
        ]
        for view in views:
            advise(view, mmap.MADV_WILLNEED)
        pooled += [
            sample._replace(
                layers=np.stack([pool_tokens(view, pooling) for view in sample.layers]),
                baseline=None if sample.baseline is None else pool_tokens(sample.baseline, pooling),
            )
            for sample in batch
        ]
        for view in views:
            advise(view, mmap.MADV_DONTNEED)
        batch, size = [], 0
    return pooled


class StepArrays(NamedTuple):
    """One episode's asked rollout step as read: each sample's feature array (whole; one per denoising entry for the
    action expert, in denoising order) and its --baseline token view. Views of the file: nothing is read yet."""

    times: list[float]  # each entry's denoising time (NaN but for the action expert)
    arrays: list[np.ndarray]  # each entry's --feature_type array: ([layer,] [batch,] token, width)
    baselines: list | None  # each sample's --baseline token view ([None, ...] without one); None: the step lacks it
    prompt: str | None = None  # step['prompt'], the instruction the model saw (None: the step holds no string)
    text_end: TextEnd | None = None  # --tokens prompt: how the text ends in the layer-0 embeddings


class FileVersion(NamedTuple):
    """What changes when a file is written. The change time cannot be set back by a writer, as mtime can."""

    size: int
    modified_ns: int
    changed_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileVersion:
        return cls(status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev)


def file_version(path: Path) -> FileVersion | None:
    """A file's version now (None: there is no file)."""
    try:
        return FileVersion.of(os.stat(path))
    except OSError:
        return None


class TaskFile(NamedTuple):
    """A readable task file, walked once: its description, its episodes in the range, and each asked rollout step's
    arrays. A file that cannot be mapped (protocols 0-2) holds none: it is read again when a step is trained."""

    task_id: int
    path: Path
    version: FileVersion | None  # before the walk: a file that changes after it is not read again
    description: str
    episodes: list[int]  # the episodes of the range that the file has
    steps: dict[int, dict[int, StepArrays | None]]  # step N -> episode -> its arrays (None in a file not mapped)


class Dataset(NamedTuple):
    """The run's task files, each walked once, and what the walk found: every rollout step's samples come from it."""

    source: Source
    files: list[TaskFile]
    report: ReadReport

    @property
    def descriptions(self) -> dict[int, str]:
        """Each readable task's description: what its T5 label embeds."""
        return {file.task_id: file.description for file in self.files}


def episode_steps(task_data: dict, path: Path, task_id: int, source: Source, found: ReadReport) -> dict[int, dict]:
    """episode -> {step N: (key, the step's dict)} for the episodes of the range the file has (the others are noted)."""
    episodes = {}
    for episode in range(*source.episode_range):
        episode_data = task_data["episodes"].get(f"episode_{episode}")
        if episode_data is None:
            found.missing_episodes.append((task_id, episode))
            continue
        steps = episode_data.get("rollout_steps") if isinstance(episode_data, dict) else None
        if not isinstance(steps, dict):
            raise BadFileError(f"{path}: episode_{episode} has no 'rollout_steps' dict")
        numbered = ((step_number(key), key) for key in steps)
        episodes[episode] = {number: (key, steps[key]) for number, key in numbered if number is not None}
    return episodes


def baseline_source(source: Source) -> tuple[Source, int | None]:
    """How the --baseline features are read: its expert, the default feature, all its tokens; and its layer (None for
    SigLIP's output, where the camera names it)."""
    expert, where = source.baseline
    baseline = dataclasses.replace(
        source,
        expert=expert,
        baseline=None,
        token_range=None,
        camera=where if expert == "visual" else source.camera,
        feature_type="pre_logits" if expert == "visual" else "hidden_states",
    )
    return baseline, None if expert == "visual" else where


def baseline_views(step_data: dict, source: Source, entry_count: int) -> list | None:
    """The --baseline token view for each of the step's samples (one per denoising entry for the action expert, the
    step's own view repeated otherwise); [None] * count without a baseline; None when the step lacks its entry."""
    if source.baseline is None:
        return [None] * entry_count
    baseline, layer = baseline_source(source)
    option = f"--baseline {baseline_spec_text(source.baseline)}"
    try:
        entries = expert_entries(step_data, baseline, option)
    except OptionError:
        raise
    except ProbeError:
        return None
    views = [layer_tokens(feature_array(entry, baseline), baseline, layer, option) for _, entry in entries]
    if baseline.expert == "action":
        return views if len(views) == entry_count else None
    return views * entry_count


def step_arrays(where: str, step_data, source: Source, layer: int | None) -> StepArrays:
    """A rollout step's entries for the expert, checked: each has the feature, and the asked slices can be cut from
    it (indexing only: nothing is read); with --baseline, the baseline's views (None when the step lacks its entry)."""
    if not isinstance(step_data, dict):
        raise BadFileError(f"{where} is a {type(step_data).__name__}, not a dict")
    try:
        entries = expert_entries(step_data, source)
        arrays = [feature_array(entry, source) for _, entry in entries]
        for array in arrays:
            layer_tokens(array, source, 0 if layer is None else layer)
        baselines = baseline_views(step_data, source, len(entries))
    except OptionError:
        raise
    except ProbeError as error:
        raise BadFileError(f"{where}: {error}") from None
    prompt = step_data.get("prompt")
    end = step_text_end(where, step_data, source, arrays, layer) if source.tokens == "prompt" else None
    return StepArrays(
        [time for time, _ in entries], arrays, baselines, prompt if isinstance(prompt, str) else None, end
    )


def step_text_end(where: str, step_data: dict, source: Source, arrays: list, layer: int | None) -> TextEnd:
    """--tokens prompt: how the step's text ends in its layer-0 hidden states (the token embeddings), read now (48
    vectors); a step without them stops the run: its padding cannot be found."""
    if layer_tokens(arrays[0], source, 0 if layer is None else layer).ndim != 2:
        raise OptionError(f"--tokens prompt needs a token axis; feature {source.feature_type!r} has none")
    entry = step_data.get("vlm_layer_output")
    array = entry.get("hidden_states") if isinstance(entry, dict) else None
    if not hasattr(array, "ndim") or array.ndim < 3 or array.shape[0] == 0:
        raise ProbeError(
            f"{where}: no layer-0 token embeddings (vlm_layer_output['hidden_states'][0]), which --tokens prompt finds "
            "the padding from"
        )
    text = dataclasses.replace(source, expert="text_only", feature_type="hidden_states", token_range=None)
    try:
        return text_end(layer_tokens(array, text, 0))
    except ProbeError as error:
        raise ProbeError(f"{where}: --tokens prompt: {error}") from None


def file_step(
    path: Path, episodes: dict[int, dict], step: int, source: Source, layer: int | None
) -> dict[int, StepArrays]:
    """The arrays of one rollout step in each episode that has it; BadFileError when any is malformed."""
    arrays = {}
    for episode, steps in episodes.items():
        if step in steps:
            key, step_data = steps[step]
            arrays[episode] = step_arrays(f"{path}: episode_{episode}/{key}", step_data, source, layer)
    return arrays


def note_denoising_times(report: ReadReport, step: int, times: list[float]) -> None:
    """Keep a step's fewest denoising entries (their times); a step seen with other times or another count is uneven."""
    known = report.inference_times.get(step)
    if known is not None and not np.array_equal(known, times, equal_nan=True):
        report.uneven_steps.add(step)
    if known is None or len(times) < len(known):
        report.inference_times[step] = times


def record_step(found: ReadReport, task_id: int, step: int, arrays: dict[int, StepArrays], source: Source) -> None:
    """Note one file's step in its report: its episodes, those lacking the --baseline's entry, the layers and
    denoising entries (the fewest seen)."""
    found.step_episodes[step] = [(task_id, episode) for episode in arrays]
    found.without_baseline += [(task_id, e, step) for e, one in arrays.items() if one.baselines is None]
    found.prompts[step] = {(task_id, e): one.prompt for e, one in arrays.items()}
    if source.tokens == "prompt":
        found.text_ends[step] = {(task_id, e): one.text_end for e, one in arrays.items()}
    for one in arrays.values():
        found.layer_count = found.layer_count or (1 if source.expert == "visual" else one.arrays[0].shape[0])
        note_denoising_times(found, step, one.times)


def add_to_report(report: ReadReport, found: ReadReport) -> None:
    """Add what one file's walk found to the run's report."""
    report.missing_episodes += found.missing_episodes
    report.without_baseline += found.without_baseline
    for step, pairs in found.step_episodes.items():
        report.step_episodes.setdefault(step, []).extend(pairs)
    for step, skipped in found.skipped_steps.items():
        report.skipped_steps.setdefault(step, {}).update(skipped)
    for step, prompts in found.prompts.items():
        report.prompts.setdefault(step, {}).update(prompts)
    for step, ends in found.text_ends.items():
        report.text_ends.setdefault(step, {}).update(ends)
    report.steps_seen |= found.steps_seen
    report.layer_count = report.layer_count or found.layer_count
    report.uneven_steps |= found.uneven_steps
    for step, times in found.inference_times.items():
        note_denoising_times(report, step, times)


def warn_about_gaps(report: ReadReport, source: Source) -> None:
    """Warn about episodes missing from their files, or lacking a step or the --baseline's entry."""
    if report.missing_episodes:
        log.warning("%d episode(s) in --episode_range are not in their files", len(report.missing_episodes))
    for step, pairs in report.episodes_without_step.items():
        log.warning("%d episode(s) have no step_%d and were skipped for it", len(pairs), step)
    for step in sorted(report.uneven_steps):  # "inference step K" is a position (pi0-latents.md), not a time
        log.warning(
            "step_%d: the episodes' denoising entries differ (times or count); --inference_step K takes each one's "
            "K-th entry in denoising order, and 'each' stops at the fewest",
            step,
        )
    if report.without_baseline:
        steps_lacking = ", ".join(f"step_{step}" for step in sorted({step for *_, step in report.without_baseline}))
        log.warning(
            "%d episode step(s) (%s) have no %s entry for --baseline; their samples are dropped",
            len(report.without_baseline),
            steps_lacking,
            source.baseline[0],
        )


def walk_task_file(
    path: Path, task_id: int, source: Source, steps: str | list[int | range], layer: int | None, found: ReadReport
) -> TaskFile:
    """One task file: its description, its episodes in the range, and each asked rollout step's arrays, checked (see
    step_arrays). A malformed step skips the file for that step only, as a run of that step alone would."""
    version = file_version(path)
    held_in_memory = version is not None and version.size > 0 and not mappable(path)
    if held_in_memory:  # said before the read: reading a big file whole takes minutes
        log.warning("%s: a pickle protocol below 3 stores bytes as text and cannot be mapped; reading it whole", path)
    task_data = read_task_file(path, source.trust_pickle, source.index_dir)
    description = task_data.get("task_description")
    if not isinstance(description, str) or not description.strip():
        raise BadFileError(f"{path}: no 'task_description' string")
    episodes = episode_steps(task_data, path, task_id, source, found)
    present = {step for steps_of_episode in episodes.values() for step in steps_of_episode}
    found.steps_seen |= present
    asked = sorted(present)
    if steps != "all":  # --rollout_step: the steps it names, and those inside its ranges
        spans = [range(one, one + 1) if isinstance(one, int) else one for one in steps]
        asked = [step for step in asked if any(step in span for span in spans)]
    held = {}
    for step in asked:
        try:
            held[step] = file_step(path, episodes, step, source, layer)
        except BadFileError as error:
            if source.strict:
                raise
            log.warning("skipping step_%d of %s (--strict makes this fatal)", step, error)
            found.skipped_steps[step] = {str(path): str(error)}
            continue
        record_step(found, task_id, step, held[step], source)
        if held_in_memory:  # not kept: memory stays one file's, and the file is read again for each step
            held[step] = dict.fromkeys(held[step])
    return TaskFile(task_id, path, version, description, list(episodes), held)


def steps_asked(steps: str | list[int | range], steps_seen: set[int]) -> list[int]:
    """--rollout_step resolved: "all" present steps; or steps named one by one, then those present in each range asked
    for (an empty range is an error)."""
    if steps == "all":
        return sorted(steps_seen)
    chosen = [step for step in steps if isinstance(step, int)]
    for span in (step for step in steps if isinstance(step, range)):
        present = [step for step in sorted(steps_seen) if step in span]
        if not present:
            seen = ", ".join(map(str, sorted(steps_seen))) or "none"
            raise ProbeError(
                f"--rollout_step {span.start}-{span.stop - 1}: no rollout step in that range; present: {seen}"
            )
        chosen += [step for step in present if step not in chosen]
    return chosen


def read_dataset(source: Source, steps: str | list[int | range], layer: int | None) -> Dataset:
    """Walk every task file of the range once, skipping unreadable ones unless --strict, and warn about what it missed.
    steps: --rollout_step; layer: the highest asked, checked to exist (None for "all")."""
    paths, missing_tasks = find_task_files(Path(source.data_path), source.task_range)
    if len(missing_tasks) == 1:
        log.warning("task %d: no file task_%d_*.pkl in %s", missing_tasks[0], missing_tasks[0], source.data_path)
    elif missing_tasks:  # one line, however wide --task_range is
        log.warning("tasks %s: no file task_<id>_*.pkl in %s", id_runs(missing_tasks), source.data_path)
    if not paths:
        raise ProbeError(
            f"--data_path {source.data_path}: no task_*.pkl files for tasks "
            f"{source.task_range[0]}-{source.task_range[1] - 1}"
        )
    report = ReadReport(files={t: str(p) for t, p in paths.items()}, missing_tasks=missing_tasks)
    files = []
    for task_id, path in tqdm(paths.items(), desc="task files", unit="file", disable=progress_disabled(), leave=False):
        found = ReadReport()  # this file's, added to the report once walked whole: a skipped file leaves only its skip
        try:
            files.append(walk_task_file(path, task_id, source, steps, layer, found))
        except BadFileError as error:
            if source.strict:
                raise
            log.warning("skipping %s (--strict makes this fatal)", error)
            report.skipped_files[str(path)] = str(error)
            continue
        add_to_report(report, found)
    if not files:
        raise ProbeError(f"no samples: all {len(paths)} task file(s) were skipped as unreadable")
    for step in steps_asked(steps, report.steps_seen):
        skipped = report.skipped_steps.get(step, {})
        walked = [(file.task_id, e) for file in files if str(file.path) not in skipped for e in file.episodes]
        having = set(report.step_episodes.get(step, []))
        if len(having) < len(walked):
            report.episodes_without_step[step] = [pair for pair in walked if pair not in having]
    warn_about_gaps(report, source)
    return Dataset(source, files, report)


def no_samples(step: int, report: ReadReport) -> ProbeError:
    """The error for a requested rollout step that gives no sample: the steps that exist, or why it has none."""
    if step not in report.steps_seen:
        existing = ", ".join(map(str, sorted(report.steps_seen))) or "none"
        return ProbeError(f"no samples: no episode in the ranges has step_{step}; rollout steps present: {existing}")
    return ProbeError(
        f"no samples at step_{step}: each episode that has it is in a file skipped for it or lacks the --baseline entry"
    )


def check_unchanged(file: TaskFile, step: int) -> None:
    """Stop when a task file changed since the walk: its mapped pages would hold other bytes, or none (SIGBUS)."""
    if file_version(file.path) != file.version:
        raise ProbeError(
            f"{file.path}: changed while this run was reading it (at step_{step}); rerun once it is written"
        )


def read_step_again(file: TaskFile, source: Source, step: int) -> dict[int, StepArrays]:
    """One step's arrays of a file that cannot be mapped, from the file read again (let go once the step is pooled)."""
    task_data = read_task_file(file.path, source.trust_pickle, source.index_dir)
    episodes = episode_steps(task_data, file.path, file.task_id, source, ReadReport())
    return file_step(file.path, episodes, step, source, None)


def sample_views(
    arrays: StepArrays, task_id: int, episode: int, layers: list, source: Source, padding: int = 0
) -> list[SampleRow]:
    """The samples of one rollout step of one episode, as token views not yet pooled, less `padding` positions at the
    end (--tokens prompt: the text ends every such expert's positions); none when the step lacks the --baseline's
    entry."""
    if arrays.baselines is None:
        return []
    kept = PROMPT_TOKENS - padding
    return [
        SampleRow(
            task_id,
            episode,
            time,
            index,
            [without_padding(layer_tokens(array, source, layer), padding) for layer in layers],
            baseline,
            kept,
        )
        for index, (time, array, baseline) in enumerate(zip(arrays.times, arrays.arrays, arrays.baselines))
    ]


def without_padding(view: np.ndarray, padding: int) -> np.ndarray:
    """A (tokens, width) view less its last `padding` positions (a view still: nothing is read)."""
    return view if padding == 0 else view[: view.shape[0] - padding]


def prompt_padding(dataset: Dataset, step: int) -> dict[tuple[int, int], int]:
    """--tokens prompt: how many padded positions end each episode's text at a step, from the layer-0 embeddings.

    Every padded position holds one vector, the pad token's embedding, repeated at the end of the text: it is the
    vector that ends a run of two or more positions in some sample (one vector: two different ones leave no common
    padding vector). A sample whose text ends in another vector keeps every position, and so does every sample when
    no text ends in a run: a prompt that fills all 48 positions ends once, in its newline."""
    ends = dataset.report.text_ends.get(step, {})
    repeated = {end.last for end in ends.values() if end.run >= 2}
    if len(repeated) > 1:
        raise ProbeError(
            f"--tokens prompt: no common padding vector at step_{step}: the samples' text ends in {len(repeated)} "
            "different repeated vectors in the layer-0 embeddings"
        )
    padding = {pair: end.run if end.last in repeated else 0 for pair, end in ends.items()}
    for (task, episode), count in padding.items():
        if count >= PROMPT_TOKENS:
            raise ProbeError(
                f"{dataset.report.files[task]}: episode_{episode}/step_{step}: --tokens prompt leaves no text token "
                f"(all {PROMPT_TOKENS} text positions hold the padding vector)"
            )
    return padding


def file_rows(
    file: TaskFile, source: Source, layers: list, step: int, padding: dict[tuple[int, int], int] | None = None
) -> list[SampleRow]:
    """One file's samples of a step, pooled; then every page of the file this process mapped is let go (and a file
    read again is let go with this function's locals)."""
    check_unchanged(file, step)
    episodes = file.steps.get(step, {})
    if any(arrays is None for arrays in episodes.values()):  # a file that cannot be mapped
        episodes = read_step_again(file, source, step)
    padding = padding or {}
    views = [
        view
        for e, arrays in episodes.items()
        for view in sample_views(arrays, file.task_id, e, layers, source, padding.get((file.task_id, e), 0))
    ]
    rows = pooled_rows(views, source.pooling)
    if views:
        let_go_of_file(views[0].layers[0])
    check_unchanged(file, step)  # not changed while its slices were read either
    return rows


def step_samples(dataset: Dataset, layers: list, step: int) -> Samples:
    """One rollout step's samples from the walked files: one pooled feature vector per sample and asked layer (this
    reads the step's slices, and only them, but for a file that cannot be mapped: see read_step_again)."""
    source, rows = dataset.source, []
    padding = prompt_padding(dataset, step) if source.tokens == "prompt" else None
    files = tqdm(dataset.files, desc=f"step_{step} files", unit="file", disable=progress_disabled(), leave=False)
    for file in files:  # file by file: the pages touched at once are one file's slices (see pooled_rows)
        rows += file_rows(file, source, layers, step, padding)
    if not rows:
        raise no_samples(step, dataset.report)
    for name in ("layers", "baseline"):
        widths = {np.shape(getattr(row, name)) for row in rows}
        if len(widths) > 1:
            raise ProbeError(f"feature widths differ between files: {sorted(widths)}")
    features = np.empty((len(layers), len(rows), rows[0].layers.shape[-1]), dtype=np.float32)
    for column, row in enumerate(rows):  # each row let go once copied: one copy of the features at the peak
        features[:, column] = row.layers
        rows[column] = row._replace(layers=None)
    return Samples(
        features=features,
        task_id=np.array([row.task_id for row in rows], dtype=np.int64),
        episode=np.array([row.episode for row in rows], dtype=np.int64),
        step=np.full(len(rows), step, dtype=np.int64),
        inference_time=np.array([row.inference_time for row in rows], dtype=np.float64),
        inference_index=np.array([row.inference_index for row in rows], dtype=np.int64),
        baseline=None if source.baseline is None else np.stack([row.baseline for row in rows]),
        prompt=step_prompts(dataset.report, step, [(row.task_id, row.episode) for row in rows]),
        prompt_length=None if padding is None else np.array([row.prompt_length for row in rows], dtype=np.int64),
    )


def step_prompts(report: ReadReport, step: int, pairs: list) -> np.ndarray:
    """(samples,) object: the prompt the step of each (task, episode) ran under (None where it holds none)."""
    prompts = report.prompts.get(step, {})
    chosen = np.empty(len(pairs), dtype=object)
    chosen[:] = [prompts.get(tuple(pair)) for pair in pairs]
    return chosen


# -----------------------------------------------------------------------------
# Labels and concepts: T5 mean over the real tokens, cached on disk; or the words that vary (t5_labels)
# -----------------------------------------------------------------------------


def model_identity(model_name: str) -> str:
    """What the model's weights are: a local directory's files as file_identity gives them (a model saved again is
    another; a copy that keeps the files' times is the same), or the hub name."""
    path = Path(model_name)
    if not path.is_dir():
        return f"hub {model_name}"
    files = sorted(file_identity(file) for file in path.iterdir() if file.is_file())
    return f"local files {hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}"


def missing_model_directory(model_name: str) -> str | None:
    """The error for a --t5_model that can only be a local directory (hub ids are 'name' or 'owner/name') and is
    not one; None otherwise. Said first, before the hub library's complaint about repo ids."""
    if not (model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1) or os.path.isdir(model_name):
        return None
    problem = "not a directory" if os.path.exists(model_name) else "no such directory"
    return (
        f"--t5_model {model_name}: {problem}. Point --t5_model at a local directory holding a T5 checkpoint and "
        "its tokenizer (saved with save_pretrained), or at a hub name such as t5-small"
    )


def encode_descriptions(descriptions: list[str], model_name: str) -> np.ndarray:
    """T5 encoder last hidden state, mean over real tokens (EOS in, padding out): (n, d) float32."""
    import torch  # imported only when the label cache misses: it costs seconds
    import transformers
    from transformers import AutoTokenizer, T5EncoderModel

    transformers.utils.logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = T5EncoderModel.from_pretrained(model_name)
    except Exception as error:  # transformers raises OSError, ValueError, HTTP errors...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if missing_model_directory(model_name):
            raise ProbeError(missing_model_directory(model_name)) from None
        raise ProbeError(
            f"cannot load T5 model {model_name!r} ({reason}). Point --t5_model at a local directory holding a "
            "T5 checkpoint and its tokenizer (saved with save_pretrained), or set HF_HUB_OFFLINE=1 to use a copy "
            "already in the Hugging Face cache"
        ) from None
    model.eval()
    with torch.no_grad():
        inputs = tokenizer(descriptions, return_tensors="pt", padding=True, truncation=True, max_length=512)
        hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return pooled.numpy().astype(np.float32)


def cached_labels(cache_file: Path, descriptions: list[str]) -> np.ndarray | None:
    """The embeddings a label cache file holds for these descriptions; None when it has none. A file that cannot be
    read (cut short by a full disk, garbled) is a miss with a warning: it is encoded again and written anew."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as cached:
            embeddings, cached_descriptions = cached["embeddings"], list(cached["descriptions"])
        usable = embeddings.ndim == 2 and len(embeddings) == len(descriptions) and np.isfinite(embeddings).all()
    except Exception as error:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError...: numpy's own mix
        log.warning("the label cache %s cannot be read (%s); encoding the descriptions again", cache_file, error)
        return None
    if cached_descriptions != descriptions:
        return None
    if not usable:
        log.warning("the label cache %s holds no usable embeddings; encoding the descriptions again", cache_file)
        return None
    return embeddings


def t5_labels(descriptions: list[str], config: LabelConfig) -> np.ndarray:
    """T5 embedding per description, from the on-disk cache when this model and text were seen."""
    key_source = json.dumps(
        {"model": model_identity(config.t5_model), "descriptions": descriptions, "pooling": "mean-real-tokens-v2"}
    )
    cache_file = Path(config.cache_dir) / "t5_labels" / f"{hashlib.sha256(key_source.encode()).hexdigest()}.npz"
    cached = cached_labels(cache_file, descriptions)
    if cached is not None:
        log.info("T5 labels from cache %s", cache_file)
        return cached
    log.info("encoding %d task descriptions with T5 %s", len(descriptions), config.t5_model)
    embeddings = encode_descriptions(descriptions, config.t5_model)
    if unwritable_reason(cache_file.parent):  # main has warned once about --cache_dir
        return embeddings
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, descriptions=np.array(descriptions))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, buffer.getvalue())
    except OSError as error:  # a read-only cache costs time, not correctness
        log.warning("could not write the label cache %s: %s", cache_file, error)
    return embeddings


STOP_WORDS = frozenset(
    "a an the and or of in on onto into to it its at from with up down over under by for then".split()
)
NO_VALUE = "(none)"  # --concepts FILE: the value of a task that has no row for an attribute


@dataclasses.dataclass(frozen=True)
class Concept:
    """A function of the task: which value of it each class (unique description) has."""

    name: str  # the word, or the attribute of --concepts
    values: list[str]  # value names; a word's are ["without", "with"]
    value_of_class: np.ndarray  # (C,) index into values


def word_concepts(descriptions: list[str]) -> list[Concept]:
    """A binary concept per lower-cased word present in some of the descriptions and absent from others (stop words
    and words every description has are dropped), named by the word."""
    words = [set(re.findall(r"[a-z0-9]+", description.lower())) for description in descriptions]
    concepts = []
    for word in sorted(set().union(*words) - STOP_WORDS):
        has = np.array([word in described for described in words])
        if 0 < has.sum() < len(words):
            concepts.append(Concept(word, ["without", "with"], has.astype(np.int64)))
    return concepts


def concepts_text(path: str) -> str:
    """The text of a --concepts file, a regular file only (a FIFO would block); OptionError when it cannot be read."""
    try:
        with open_regular(Path(path)) as file:
            return file.read().decode("utf-8-sig")  # a byte-order mark before the header is no field
    except BadFileError as error:
        raise OptionError(f"--concepts {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise OptionError(f"--concepts {path}: cannot read it ({error})") from None


def read_concepts_file(path: str) -> dict[str, dict[int, str]]:
    """attribute -> {task id: value} from a TSV of task_id, attribute, value (a header line and # comments allowed)."""
    lines = concepts_text(path).split("\n")  # newlines only: a value may hold U+2028 or a form feed
    attributes: dict[str, dict[int, str]] = {}
    line_of: dict[tuple[str, int], int] = {}  # (attribute, task) -> the line that gave its value
    for number, line in enumerate(lines, 1):
        fields = [field.strip() for field in line.split("\t")]
        if not line.strip() or line.startswith("#") or (number == 1 and fields[0] == "task_id"):
            continue
        if len(fields) != 3 or not re.fullmatch(r"[0-9]+", fields[0]) or not fields[1] or not fields[2]:
            raise OptionError(
                f"--concepts {path}, line {number}: expected task_id<TAB>attribute<TAB>value (task_id in ASCII "
                f"digits), got {line!r}"
            )
        task, attribute, value = int(fields[0]), fields[1], fields[2]
        known = attributes.setdefault(attribute, {}).setdefault(task, value)
        if known != value:
            raise OptionError(
                f"--concepts {path}: lines {line_of[attribute, task]} and {number} give task {task} two values of "
                f"{attribute!r} ({known!r} and {value!r})"
            )
        line_of.setdefault((attribute, task), number)
    return attributes


def file_concepts(path: str, class_of_task: dict[int, int], classes: int) -> list[Concept]:
    """A concept per attribute of --concepts with at least two values among the analyzed tasks."""
    concepts = []
    for attribute, value_of_task in sorted(read_concepts_file(path).items()):
        value_of_class: dict[int, str] = {}
        for task, class_index in class_of_task.items():
            value = value_of_task.get(task, NO_VALUE)
            if value_of_class.setdefault(class_index, value) != value:
                raise OptionError(f"--concepts {path}: tasks with one description have different {attribute!r} values")
        names = sorted(set(value_of_class.values()))
        if len(names) > 1:
            concepts.append(
                Concept(attribute, names, np.array([names.index(value_of_class[c]) for c in range(classes)]))
            )
    return concepts


# -----------------------------------------------------------------------------
# Folds and design: whole episodes (or tasks) held out, permuted assignments, label spaces (make_design)
# -----------------------------------------------------------------------------


def assign_folds(task_id: np.ndarray, episode: np.ndarray, config: TrainingConfig) -> tuple[np.ndarray, int]:
    """Test fold of every sample, and the number of folds.

    split "episode": each task's episodes are dealt round the folds, so every fold trains on
    every task. split "task": whole tasks (here their classes, see dealt_units) are dealt round the folds.
    """
    rng = np.random.default_rng(config.seed)
    tasks = np.unique(task_id)
    if config.split == "task":
        if len(tasks) < 3:
            raise ProbeError(
                f"--split task needs at least 3 tasks with distinct descriptions (it holds out whole tasks, those that "
                f"share one together); the range has {len(tasks)}"
            )
        folds = min(config.cv_folds, len(tasks))
        fold_of_task = dict(zip(rng.permutation(tasks), np.arange(len(tasks)) % folds))
        return np.array([fold_of_task[t] for t in task_id]), folds
    episodes_of_task = {t: np.unique(episode[task_id == t]) for t in tasks}
    for task, episodes in episodes_of_task.items():
        if len(episodes) < 2:
            raise ProbeError(
                f"task {task} has {len(episodes)} episode(s) with samples; every task needs at least 2 so that it is "
                "both trained on and held out: widen --episode_range"
            )
    folds = min(config.cv_folds, max(len(e) for e in episodes_of_task.values()))
    fold_of_episode, next_fold = {}, 0
    for task, episodes in episodes_of_task.items():
        for position, one_episode in enumerate(rng.permutation(episodes)):
            fold_of_episode[(task, one_episode)] = (next_fold + position) % folds
        next_fold = (next_fold + len(episodes)) % folds  # balance fold sizes across tasks
    return np.array([fold_of_episode[(t, e)] for t, e in zip(task_id, episode)]), folds


def dealt_units(task_id: np.ndarray, sample_class: np.ndarray, split: str) -> np.ndarray:
    """What assign_folds deals, per sample: the task, or under split "task" its class. Tasks that share a description
    share a target: one held out while the other is trained on would not be an unseen instruction."""
    return sample_class if split == "task" else task_id


@dataclasses.dataclass(frozen=True)
class SweepFolds:
    """--generalize: the test fold of every (task, episode) of a sweep in each repeat, dealt once over the episodes of
    all its rollout steps as assign_folds deals one step's. An episode is then held out by the same fold in every cell
    whichever steps it has, so a probe tested at another step is tested only on episodes it never saw."""

    position: dict[tuple[int, int], int]  # (task, episode) -> its column in `fold`
    fold: np.ndarray  # (repeats, episodes)
    folds: int

    def of(self, task_id: np.ndarray, episode: np.ndarray) -> np.ndarray:
        """(repeats, n) the test fold of each sample in each repeat."""
        columns = [self.position[pair] for pair in zip(task_id.tolist(), episode.tolist())]
        return self.fold[:, np.array(columns, dtype=np.int64)]


def sweep_folds(
    pairs: list[tuple[int, int]], descriptions_by_task: dict[int, str], training: TrainingConfig
) -> SweepFolds:
    """Folds of every repeat dealt over a sweep's (task, episode) pairs, under split "task" over their classes (tasks
    numbered by description as design_for numbers them): on one step's episodes, the folds assign_folds gives."""
    pairs = sorted(set(pairs))
    task_id = np.array([task for task, _ in pairs], dtype=np.int64)
    episode = np.array([one for _, one in pairs], dtype=np.int64)
    descriptions = list(dict.fromkeys(descriptions_by_task[t] for t in sorted(set(task_id.tolist()))))
    sample_class = np.array([descriptions.index(descriptions_by_task[t]) for t in task_id.tolist()], dtype=np.int64)
    dealt = dealt_units(task_id, sample_class, training.split)
    fold_sets = [
        assign_folds(dealt, episode, dataclasses.replace(training, seed=training.seed + r))
        for r in range(training.repeats)
    ]
    return SweepFolds({pair: i for i, pair in enumerate(pairs)}, np.stack([f for f, _ in fold_sets]), fold_sets[0][1])


def validation_count(units: int, fraction: float, fewest: int) -> int:
    """How many of `units` whole units validate: the fraction, at least one, none when fewer than `fewest` remain."""
    return max(1, round(units * fraction)) if units >= fewest else 0


def validation_masks(
    task_id: np.ndarray, episode: np.ndarray, fold: np.ndarray, folds: int, config: TrainingConfig
) -> np.ndarray:
    """(folds, samples) mask of the early-stopping samples, carved from each fold's training side only."""
    rng = np.random.default_rng([config.seed, 1])
    masks = np.zeros((folds, len(fold)), dtype=bool)
    for f in range(folds):
        training = fold != f
        if config.split == "task":  # validate on whole training tasks: early stopping then rewards transfer
            tasks = rng.permutation(np.unique(task_id[training]))
            masks[f] = training & np.isin(task_id, tasks[: validation_count(len(tasks), config.validation_fraction, 3)])
            continue
        for task in np.unique(task_id[training]):
            episodes = rng.permutation(np.unique(episode[training & (task_id == task)]))
            count = validation_count(len(episodes), config.validation_fraction, 2)
            masks[f] |= training & (task_id == task) & np.isin(episode, episodes[:count])
    return masks


def derangement(count: int, seed: int, index: int = 0) -> np.ndarray:
    """The index-th seeded permutation of range(count) that keeps no element in place (a permuted assignment)."""
    rng = np.random.default_rng([seed, 2, index])
    while True:
        permutation = rng.permutation(count)
        if count < 2 or not np.any(permutation == np.arange(count)):
            return permutation


def resampling_units(task_id: np.ndarray, episode: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The unit held-out results are correlated within, and the strata units are resampled in.

    Split "task": whole tasks (a held-out task's samples share one probe and one target). Split "episode": whole
    episodes, resampled within their task so that every resample keeps the task mix.
    """
    if split == "task":
        return task_id.copy(), None
    return task_id * 1_000_000 + episode, task_id.copy()


# Online code (Voita & Titov 2020): blocks end at these shares of the units, each coded by a probe trained on all
# before it. Their doubling blocks start at 0.1%; a few dozen episodes allow five.
MDL_BLOCK_ENDS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def mdl_blocks(unit: np.ndarray, stratum: np.ndarray | None, seed: int) -> np.ndarray:
    """Block of every sample for the online code: units in a seeded order (tasks taking turns under split "episode",
    so every prefix covers the tasks evenly), cut at MDL_BLOCK_ENDS. The first block holds at least 2 units, and under
    split "episode" an episode of every task: a later block then holds no task the code has never seen."""
    rng = np.random.default_rng([seed, 4])
    if stratum is None:
        order = list(rng.permutation(np.unique(unit)))
    else:
        queues = [list(rng.permutation(np.unique(unit[stratum == s]))) for s in rng.permutation(np.unique(stratum))]
        order = [u for turn in itertools.zip_longest(*queues) for u in turn if u is not None]
    smallest = 2 if stratum is None else max(2, len(np.unique(stratum)))
    ends = sorted({max(smallest, math.ceil(share * len(order))) for share in MDL_BLOCK_ENDS})
    block_of_unit = {}
    for block, (start, end) in enumerate(zip([0, *ends], ends)):
        block_of_unit.update({u: block for u in order[start:end]})
    return np.array([block_of_unit[u] for u in unit])


def prefix_validation(unit: np.ndarray, prefix: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Early-stopping samples of an MDL probe: a seeded share of the whole units in its training prefix."""
    units = np.random.default_rng([seed, 5]).permutation(np.unique(unit[prefix]))
    return prefix & np.isin(unit, units[: validation_count(len(units), fraction, 3)])


@dataclasses.dataclass(frozen=True)
class Copies:
    """Every probe trained on one set of samples, side by side in one compiled program. Axis 0 is the copy: the
    cross-validation folds of each (repeat, assignment), then the MDL block probes."""

    repeat: np.ndarray  # (M,) seed offset of the copy's folds and initialisation
    assignment: np.ndarray  # (M,) 0: every task's own embedding; p >= 1: the p-th permuted assignment
    fold: np.ndarray  # (M,) the test fold the copy never saw; -1 for an MDL block probe
    block: np.ndarray  # (M,) MDL: the block the copy codes, trained on the blocks before it; -1 for a fold probe
    classes: np.ndarray  # (M, C, d) each class's target in the copy's label space (row j: class j's samples')
    known: np.ndarray  # (M, C) classes the copy fits (the contrastive loss's candidates)
    train: np.ndarray  # (M, n) samples fitted
    validation: np.ndarray  # (M, n) samples for early stopping and the softmax temperature
    label_mean: np.ndarray  # (M, D) the training tasks' mean embedding; subtracted when centering
    label_basis: np.ndarray  # (M, d, D) label-space coordinates = (raw [- label_mean]) @ label_basis.T
    # (M, C) the norm of each class's target in T5's axes: its embedding (minus label_mean when centering), whole, not
    # its projection on the copy's span; None for concept probes
    target_norm: np.ndarray | None = None
    # (M,) resampling units among the validation samples: what a copy's softmax calibration counts (a unit's samples,
    # the ten denoising entries of an episode under --inference_step all, are not ten independent checks)
    validation_units: np.ndarray | None = None
    concept: np.ndarray | None = None  # (M,) the concept a concept probe predicts (--target concepts); None: T5 probes

    def fold_copies(self, repeat: int, assignment: int, concept: int | None = None) -> np.ndarray:
        """Indices of one (repeat, assignment)'s fold probes (of one concept's, for concept probes), in fold order."""
        chosen = (self.repeat == repeat) & (self.assignment == assignment) & (self.fold >= 0)
        if concept is not None:
            chosen &= self.concept == concept
        return np.flatnonzero(chosen)[np.argsort(self.fold[chosen])]

    def kept(self) -> np.ndarray:
        """The copies whose weights a results file keeps: the first repeat's fold probes, then the control's (the
        permutation null's are not kept)."""
        return np.concatenate([self.fold_copies(0, 0), self.fold_copies(0, 1)])

    def identity(self) -> np.ndarray:
        """(M, 5) integers naming each copy; its initialisation key is derived from them, not from its position."""
        concept = np.full(len(self.fold), -1) if self.concept is None else self.concept
        return np.stack([self.repeat, self.assignment, self.fold, self.block, concept], axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Design:
    """How one set of samples is labelled and held out; shared by every item (layer) with these samples."""

    task_ids: list[int]
    descriptions: list[str]  # one class per unique description: two task ids with one instruction share a target
    sample_class: np.ndarray  # (n,) class of every sample
    unit: np.ndarray  # (n,) resampling unit: a (task, episode) id, or the task id under split "task"
    stratum: np.ndarray | None  # (n,) task under split "episode": units are resampled within it
    fold: np.ndarray  # (repeats, n) test fold of every sample in each repeat
    folds: int
    raw: np.ndarray | None  # (C, D) T5 embedding of every class; None for concept probes
    assignments: np.ndarray  # (1 + null, C): row 0 the identity, then the permuted task -> embedding assignments
    mdl_block: np.ndarray | None  # (n,) block of the online code, when --mdl
    copies: Copies
    concepts: list[Concept] | None = None  # --target concepts: what each copy's softmax predicts (Copies.concept)


class CopySpec(NamedTuple):
    """One probe to train: who it is and which samples it fits, stops on, and takes its label space from."""

    repeat: int
    assignment: int
    fold: int
    block: int
    train: np.ndarray  # (n,) bool
    validation: np.ndarray  # (n,) bool
    training_side: np.ndarray  # (n,) bool: train and validation, the samples whose classes define the label space


def pad_axis(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    """`array` with zeros appended along `axis` up to `width`."""
    padding = [(0, 0)] * array.ndim
    padding[axis] = (0, width - array.shape[axis])
    return np.pad(array, padding)


class LabelSpaces(NamedTuple):
    """The label space of each of a set of copies."""

    mean: np.ndarray  # (copies, D) the training tasks' mean embedding
    basis: np.ndarray  # (copies, k, D) orthonormal rows (zero rows where a copy's span has fewer directions)
    classes: np.ndarray  # (copies, C, k) every class's coordinates


def spreading_rotation(size: int) -> np.ndarray:
    """An orthonormal (size, size) matrix (DCT-II) whose rows mix all principal directions, as T5's own axes do."""
    # Adam scales each output coordinate's step by its own gradients: in principal coordinates it would fit the last
    # (the smallest differences between tasks) as fast as the first. Planted random-direction tasks, 6 seeds: held-out
    # accuracy 0.89 in principal coordinates, 0.95 rotated, 0.96 full width.
    row, column = np.arange(size)[:, None], np.arange(size)[None, :]
    rotation = np.sqrt(2.0 / max(size, 1)) * np.cos(np.pi * (2 * column + 1) * row / (2 * max(size, 1)))
    rotation[:1] /= np.sqrt(2.0)
    return rotation


def label_spaces(raw: np.ndarray, train_classes: list[np.ndarray], labels: LabelConfig) -> LabelSpaces:
    """Per copy (given the classes on its training side): the label mean, basis and class coordinates. "span": the
    training tasks' embeddings' span, exact for retrieval at k/512 of the cost (README, "What the numbers mean")."""
    means, bases = [], []
    for known in train_classes:
        mean = raw[known].mean(axis=0)
        if labels.label_space == "full" and not labels.label_dim:
            basis = np.eye(raw.shape[1], dtype=raw.dtype)
        else:  # by SVD, numerically zero directions dropped: at most C - 1 directions (C uncentered) for C tasks
            spanned = (raw[known] - mean if labels.center_labels else raw[known]).astype(np.float64)
            singular, components = np.linalg.svd(spanned, full_matrices=False)[1:]
            tolerance = singular.max(initial=0.0) * max(spanned.shape) * np.finfo(np.float32).eps
            basis = components[singular > tolerance]
            if labels.label_dim and len(basis) < labels.label_dim:
                raise OptionError(
                    f"--label_dim {labels.label_dim}: only {len(known)} training tasks, so at most {len(basis)} "
                    "directions"
                )
            basis = (spreading_rotation(len(basis[: labels.label_dim])) @ basis[: labels.label_dim]).astype(raw.dtype)
        means.append(mean)
        bases.append(basis)
    # One shape for every fold (and for every table of permuted labels with the same training classes): the most
    # directions a fold's training tasks can span. A fold whose span has fewer gets zero rows at the end of its basis;
    # such a coordinate is 0 for every class and maps to nothing in T5 space.
    if labels.label_dim:
        width = labels.label_dim
    elif labels.label_space == "full":
        width = raw.shape[1]
    else:
        width = min(max(max(len(known) - int(labels.center_labels) for known in train_classes), 1), raw.shape[1])
    bases = [np.concatenate([basis, np.zeros((width - len(basis), raw.shape[1]), raw.dtype)]) for basis in bases]
    spaces = [(raw - mean if labels.center_labels else raw) @ basis.T for mean, basis in zip(means, bases)]
    return LabelSpaces(np.stack(means), np.stack(bases), np.stack(spaces).astype(np.float32))


def copies_for(
    specs: list[CopySpec],
    raw: np.ndarray,
    assignments: np.ndarray,
    sample_class: np.ndarray,
    unit: np.ndarray,
    labels: LabelConfig,
) -> Copies:
    """Stack the copies; each assignment's label spaces come from its own (permuted) embedding table and the classes on
    the copy's training side, exactly as for the probe."""
    classes = np.arange(len(raw))
    spaces, norms = {}, {}
    for assignment in sorted({spec.assignment for spec in specs}):
        members = [i for i, spec in enumerate(specs) if spec.assignment == assignment]
        known = [np.flatnonzero(np.isin(classes, sample_class[specs[i].training_side])) for i in members]
        table = raw[assignments[assignment]]
        space = label_spaces(table, known, labels)
        spaces.update({i: (space.mean[k], space.basis[k], space.classes[k]) for k, i in enumerate(members)})
        for k, i in enumerate(members):
            whole = table - space.mean[k] if labels.center_labels else table
            norms[i] = np.linalg.norm(whole.astype(np.float64), axis=1)
    width = max(basis.shape[0] for _, basis, _ in spaces.values())  # label spaces of lower rank: zero directions added
    ordered = [spaces[i] for i in range(len(specs))]
    return Copies(
        repeat=np.array([spec.repeat for spec in specs]),
        assignment=np.array([spec.assignment for spec in specs]),
        fold=np.array([spec.fold for spec in specs]),
        block=np.array([spec.block for spec in specs]),
        classes=np.stack([pad_axis(targets, 1, width) for _, _, targets in ordered]).astype(np.float32),
        known=np.stack([np.isin(classes, sample_class[spec.train]) for spec in specs]),
        train=np.stack([spec.train for spec in specs]),
        validation=np.stack([spec.validation for spec in specs]),
        label_mean=np.stack([mean for mean, _, _ in ordered]),
        label_basis=np.stack([pad_axis(basis, 0, width) for _, basis, _ in ordered]),
        target_norm=np.stack([norms[i] for i in range(len(specs))]),
        validation_units=np.array([len(np.unique(unit[spec.validation])) for spec in specs]),
    )


def class_texts(
    samples: Samples, descriptions_by_task: dict[int, str], labels: LabelConfig
) -> tuple[list[str], np.ndarray]:
    """The classes (one per distinct text) and each sample's class: by its task's description, or under --labels
    prompt by the prompt its step ran under, classes in the order they first appear by task and episode."""
    if labels.label_by != "prompt":  # "task,prompt": the task's are the headline, compared with the prompt's
        descriptions = list(dict.fromkeys(descriptions_by_task[t] for t in sorted(set(samples.task_id.tolist()))))
        classes = [descriptions.index(descriptions_by_task[t]) for t in samples.task_id]
        return descriptions, np.array(classes, dtype=np.int64)
    if samples.prompt is None or any(prompt is None for prompt in samples.prompt):
        raise ProbeError("--labels prompt: some samples carry no prompt (step['prompt'])")
    order = np.lexsort((samples.episode, samples.task_id))
    descriptions = list(dict.fromkeys(samples.prompt[order].tolist()))
    position = {text: number for number, text in enumerate(descriptions)}
    return descriptions, np.array([position[prompt] for prompt in samples.prompt], dtype=np.int64)


def design_for(
    samples: Samples,
    descriptions_by_task: dict[int, str],
    labels: LabelConfig,
    training: TrainingConfig,
    folds_given: SweepFolds | None = None,
) -> Design:
    """Classes, folds of every repeat (`folds_given`: a --generalize sweep's), permuted assignments, MDL blocks and the
    copies they imply."""
    task_ids = sorted(set(samples.task_id.tolist()))
    descriptions, sample_class = class_texts(samples, descriptions_by_task, labels)
    if len(descriptions) < 2:
        raise ProbeError(f"the analyzed tasks have one description ({descriptions[0]!r}): nothing to tell apart")
    dealt = dealt_units(samples.task_id, sample_class, training.split)
    # Under --labels prompt and split "task" a held-out unit is a prompt class, whose samples come from several tasks.
    unit, stratum = resampling_units(
        samples.task_id if labels.label_by != "prompt" else dealt, samples.episode, training.split
    )
    repeats = [dataclasses.replace(training, seed=training.seed + r) for r in range(training.repeats)]
    if folds_given is None:
        fold_sets = [assign_folds(dealt, samples.episode, repeat) for repeat in repeats]
    else:
        fold_sets = [(fold, folds_given.folds) for fold in folds_given.of(samples.task_id, samples.episode)]
    folds = fold_sets[0][1]
    validation = [validation_masks(dealt, samples.episode, f, folds, r) for (f, _), r in zip(fold_sets, repeats)]
    assignments = np.stack(
        [np.arange(len(descriptions))]
        + [derangement(len(descriptions), training.seed, index) for index in range(training.null_size)]
    )
    blocks = mdl_blocks(unit, stratum, training.seed) if training.mdl else None
    specs = []
    for repeat, assignment in [(r, 0) for r in range(training.repeats)] + [(0, a) for a in range(1, len(assignments))]:
        fold = fold_sets[repeat][0]
        for f in range(folds):
            held = validation[repeat][f]
            specs.append(CopySpec(repeat, assignment, f, -1, (fold != f) & ~held, held, fold != f))
    for assignment in range(min(len(assignments), 2) if blocks is not None else 0):  # the probe, and the control
        for block in range(1, blocks.max() + 1):
            prefix = blocks < block
            held = prefix_validation(unit, prefix, training.validation_fraction, training.seed + block)
            specs.append(CopySpec(0, assignment, -1, block, prefix & ~held, held, prefix))
    raw = t5_labels(descriptions, labels)
    return Design(
        task_ids,
        descriptions,
        sample_class,
        unit,
        stratum,
        np.stack([f for f, _ in fold_sets]),
        folds,
        raw,
        assignments,
        blocks,
        copies_for(specs, raw, assignments, sample_class, unit, labels),
    )


def concept_design(
    samples: Samples, descriptions_by_task: dict[int, str], labels: LabelConfig, training: TrainingConfig
) -> Design:
    """Concepts of the analyzed tasks, folds (whole tasks by default) and a softmax probe copy per concept and fold."""
    task_ids = sorted(set(samples.task_id.tolist()))
    descriptions = list(dict.fromkeys(descriptions_by_task[t] for t in task_ids))
    class_of_task = {t: descriptions.index(descriptions_by_task[t]) for t in task_ids}
    sample_class = np.array([class_of_task[t] for t in samples.task_id], dtype=np.int64)
    if labels.concepts_file:
        concepts = file_concepts(labels.concepts_file, class_of_task, len(descriptions))
    else:
        concepts = word_concepts(descriptions)
    if not concepts:
        raise ProbeError("no concepts: no word (or --concepts attribute) varies between the analyzed tasks")
    unit, stratum = resampling_units(samples.task_id, samples.episode, training.split)
    dealt = dealt_units(samples.task_id, sample_class, training.split)
    fold, folds = assign_folds(dealt, samples.episode, training)
    validation = validation_masks(dealt, samples.episode, fold, folds, training)
    width = max(len(concept.values) for concept in concepts)
    chosen = [(c, f) for c in range(len(concepts)) for f in range(folds)]
    train = np.stack([(fold != f) & ~validation[f] for _, f in chosen])
    one_hot = np.stack([np.eye(width, dtype=np.float32)[concepts[c].value_of_class] for c, _ in chosen])
    copies = Copies(
        repeat=np.zeros(len(chosen), int),
        assignment=np.zeros(len(chosen), int),
        fold=np.array([f for _, f in chosen]),
        block=np.full(len(chosen), -1),
        classes=one_hot,
        known=np.stack([np.isin(np.arange(len(descriptions)), sample_class[t]) for t in train]),
        train=train,
        validation=np.stack([validation[f] for _, f in chosen]),
        validation_units=np.array([len(np.unique(unit[validation[f]])) for _, f in chosen]),
        label_mean=np.zeros((len(chosen), 1)),
        label_basis=np.zeros((len(chosen), width, 1)),
        concept=np.array([c for c, _ in chosen]),
    )
    identity = np.arange(len(descriptions))[None]
    return Design(
        task_ids, descriptions, sample_class, unit, stratum, fold[None], folds, None, identity, None, copies, concepts
    )


def concept_values(design: Design, copy: int) -> tuple[np.ndarray, np.ndarray]:
    """A concept probe's target: each sample's value of its concept, and the values its training samples have."""
    concept = design.concepts[design.copies.concept[copy]]
    value = concept.value_of_class[design.sample_class]
    return value, np.bincount(value[design.copies.train[copy]], minlength=len(concept.values)) > 0


def make_design(
    samples: Samples,
    descriptions_by_task: dict[int, str],
    labels: LabelConfig,
    training: TrainingConfig,
    folds_given: SweepFolds | None = None,
) -> Design:
    """The design of the target asked for: T5 embeddings or concepts (`folds_given`: a --generalize sweep's folds)."""
    if labels.target == "concepts":
        return concept_design(samples, descriptions_by_task, labels, training)
    return design_for(samples, descriptions_by_task, labels, training, folds_given)


# -----------------------------------------------------------------------------
# Probe and training: every probe of a run (folds x assignments x repeats, MDL blocks) in one program (fit_items)
# -----------------------------------------------------------------------------

CONTRASTIVE_TEMPERATURE = 0.1  # InfoNCE over cosine similarities to the tasks' embeddings


class LinearProbe(nn.Module):
    """One Dense layer: pooled hidden state -> label space."""

    output_dim: int

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        return nn.Dense(features=self.output_dim)(features)


def cosine_similarity(predictions: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Cosine along the last axis, with the guide's epsilon (broadcasts like `*`)."""
    predictions = predictions / (jnp.linalg.norm(predictions, axis=-1, keepdims=True) + EPSILON)
    targets = targets / (jnp.linalg.norm(targets, axis=-1, keepdims=True) + EPSILON)
    return jnp.sum(predictions * targets, axis=-1)


RELATIVE_STD_FLOOR = 1e-5  # a feature whose spread is below this share of the widest one's counts as constant


def usable_std(std):
    """Feature std to divide by: constant features (relative to the layer's widest spread, whatever its units or
    dtype) get 1, so they stay near zero instead of blowing up rounding noise. numpy or JAX arrays alike."""
    constant = std <= RELATIVE_STD_FLOOR * std.max()
    return std * ~constant + constant


def sample_losses(
    predictions: jnp.ndarray, own_class: jnp.ndarray, classes: jnp.ndarray, known_classes: jnp.ndarray, loss: str
) -> jnp.ndarray:
    """Per-sample loss: `cosine` 1 - cos (the guide's), `mse`, `contrastive` (InfoNCE over the known tasks), or
    `softmax` (a concept probe: classes holds each task's one-hot concept value; the logits are the predictions)."""
    targets = classes[own_class]
    if loss == "softmax":
        present = jnp.any(classes * known_classes[:, None], axis=0)  # values some fitted task has
        logits = jnp.where(present[None, :], predictions, -jnp.inf)
        value = jnp.argmax(targets, axis=-1)
        cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), value[:, None], axis=-1)[:, 0]
        return jnp.where(present[value], cross_entropy, 0.0)  # a value the copy never fitted cannot be learned by it
    if loss == "cosine":
        return 1.0 - cosine_similarity(predictions, targets)
    if loss == "mse":
        return jnp.mean((predictions - targets) ** 2, axis=-1)
    logits = cosine_similarity(predictions[:, None, :], classes[None, :, :]) / CONTRASTIVE_TEMPERATURE
    # Negatives are the fitted tasks only (a held-out task's embedding is never seen); a validation sample's own task
    # is its candidate too, so that early stopping can score it.
    candidates = known_classes[None, :] | (jnp.arange(classes.shape[0])[None, :] == own_class[:, None])
    logits = jnp.where(candidates, logits, -jnp.inf)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), own_class[:, None], axis=-1)[:, 0]


class ClassFit(NamedTuple):
    """Ridge's fit of every copy of one item. A copy's targets are rows of its class table (Copies.classes), so its
    map is the table applied to the map fitted to the class indicators on its training side: one indicator fit per
    (training side, penalty) serves the probe, the control and every permuted assignment (train_ridge_probes)."""

    predictions: np.ndarray  # (fits, n, C) each indicator fit's prediction of every sample
    # (copies,) the indicator fit each copy's predictions are (times its table); -1: the copy is scored with its kept
    # weights instead, as --generalize applies them at other steps (the true assignment's fold probes)
    fit: np.ndarray
    tables: np.ndarray  # (copies, C, d) = Copies.classes


class ProbeFit(NamedTuple):
    """Fitted probes, one per copy (from the trainers, one set per item first): a Dense kernel and bias on features
    standardized with the copy's training statistics, whether it failed, and how its training went. Ridge keeps the
    weights of the probe's fold copies and the control's only (`mapped`); its predictions come from `class_fit`."""

    kernel: np.ndarray  # ([items,] copies, width, outputs)
    bias: np.ndarray  # ([items,] copies, outputs)
    feature_mean: np.ndarray  # ([items,] copies, width): the copy's training-set statistics
    feature_std: np.ndarray  # ([items,] copies, width)
    failed: np.ndarray  # ([items,] copies) bool: never improved on validation (a non-finite loss from the start)
    history: dict[str, np.ndarray]  # per copy: epochs and losses (trained), or the chosen penalty (ridge)
    mapped: np.ndarray | None = None  # the copies whose weights the four arrays above hold, in order; None: every copy
    class_fit: ClassFit | None = None  # ridge: every copy's predictions (one item's)

    def item(self, position: int) -> ProbeFit:
        """One item's copies (of a trained fit: ridge fits one item at a time)."""
        history = {key: value[position] for key, value in self.history.items()}
        parts = (self.kernel, self.bias, self.feature_mean, self.feature_std, self.failed)
        return ProbeFit(*(part[position] for part in parts), history)

    def weights(self, copies: np.ndarray) -> tuple[np.ndarray, ...]:
        """Kernel, bias, feature mean and feature std of the given copies."""
        rows = copies if self.mapped is None else np.array([np.flatnonzero(self.mapped == c)[0] for c in copies])
        return tuple(part[rows] for part in (self.kernel, self.bias, self.feature_mean, self.feature_std))


class TrainState(NamedTuple):
    """The epoch loop's state for one copy (a pytree the while_loop carries)."""

    epoch: jnp.ndarray  # epochs run
    params: dict
    optimizer_state: tuple
    best_params: dict  # the parameters of the best validation epoch so far
    best_loss: jnp.ndarray
    best_epoch: jnp.ndarray  # 0-based; -1 before any improvement
    train_loss: jnp.ndarray  # (num_epochs,) NaN where not run
    validation_loss: jnp.ndarray  # (num_epochs,) NaN where not run or without validation samples


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss",
        "learning_rate",
        "num_epochs",
        "batch_size",
        "patience",
        "steps_per_epoch",
        "standardize",
        "copies_in_sequence",
    ),
)
def fit_probes(
    features: jnp.ndarray,
    sample_class: jnp.ndarray,
    class_embeddings: jnp.ndarray,
    known_classes: jnp.ndarray,
    train_mask: jnp.ndarray,
    validation_mask: jnp.ndarray,
    seed: jnp.ndarray,
    copy_identity: jnp.ndarray,
    *,
    loss: str,
    learning_rate: float,
    num_epochs: int,
    batch_size: int,
    patience: int,
    steps_per_epoch: int,
    standardize: bool,
    copies_in_sequence: bool,
) -> ProbeFit:
    """Train one probe per item and copy: Adam, shuffled minibatches, early stopping that keeps each probe's best
    validation epoch. One function, longer than a screen: splitting it would scatter the loop's state."""
    # Shapes: features (devices, items, n, d_in), the layers (or denoising steps) of a sweep, one block per device,
    # centered over all samples (see train_linear_probes); sample_class (n,); per copy (see Copies): class_embeddings
    # (C, d), known_classes (C,), train and validation masks (n,), copy_identity (5,).
    model = LinearProbe(class_embeddings.shape[-1])
    optimizer = optax.adam(learning_rate)
    sample_count = features.shape[-2]

    def copy_key(identity):  # from who the copy is, not where it sits: adding copies changes no other copy's start
        return functools.reduce(jax.random.fold_in, identity, jax.random.PRNGKey(seed))

    keys = jax.vmap(copy_key)(copy_identity)  # the same per copy in every item

    def fit_one(item_features, classes, known, train, validation, key):
        train_weight = train.astype(jnp.float32)
        train_count = train_weight.sum()
        if standardize:  # training-set statistics only, as products with the mask (masked sums over a (copies,
            # samples, width) broadcast took ~0.5 s per layer at 500 samples). Measured from one training row, so a
            # feature constant on the training rows has exactly zero spread, wherever the other samples sit.
            sums = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
            reference = item_features[jnp.argmax(train)]
            shifted_mean = sums(train_weight, item_features - reference) / train_count
            deviation = item_features - reference - shifted_mean
            mean = reference + shifted_mean
            std = usable_std(jnp.sqrt(sums(train_weight, deviation * deviation) / train_count))
        else:
            mean, std = jnp.zeros(item_features.shape[1]), jnp.ones(item_features.shape[1])

        def predict(params, rows):
            return model.apply({"params": params}, (item_features[rows] - mean) / std)

        def predict_all(params):  # standardization folded into the weights: no per-probe copy of the (centered) data
            dense = params["Dense_0"]
            kernel = dense["kernel"] / std[:, None]
            return item_features @ kernel + (dense["bias"] - mean @ kernel)

        def mean_loss(predictions, rows, weight):
            per_sample = sample_losses(predictions, sample_class[rows], classes, known, loss)
            per_sample = jnp.where(weight > 0, per_sample, 0.0)  # a row outside the mask may be inf (inf x 0 is NaN)
            return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1.0)

        def step(carry, rows):
            params, optimizer_state = carry
            value, grads = jax.value_and_grad(lambda p: mean_loss(predict(p, rows), rows, jnp.ones(batch_size)))(params)
            updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
            return (optax.apply_updates(params, updates), optimizer_state), value

        init_key, shuffle_key = jax.random.split(key)
        params = model.init(init_key, item_features[:1])["params"]
        every_row = jnp.arange(sample_count)
        validation_weight = validation.astype(jnp.float32)
        has_validation = validation_weight.sum() > 0

        def run_epoch(state: TrainState) -> TrainState:
            epoch = state.epoch
            # A fresh random order of the training rows (the rest sort last), cut into minibatches.
            order = jnp.argsort(
                jnp.where(train, jax.random.uniform(jax.random.fold_in(shuffle_key, epoch), (sample_count,)), 2.0)
            )
            rows = order[jnp.arange(steps_per_epoch * batch_size) % train_count.astype(jnp.int32)].reshape(
                steps_per_epoch, batch_size
            )
            (params, optimizer_state), _ = jax.lax.scan(step, (state.params, state.optimizer_state), rows)
            predictions = predict_all(params)
            train_loss = mean_loss(predictions, every_row, train_weight)
            validation_loss = mean_loss(predictions, every_row, validation_weight)
            monitored = jnp.where(has_validation, validation_loss, train_loss)
            improved = monitored < state.best_loss
            return TrainState(
                epoch=epoch + 1,
                params=params,
                optimizer_state=optimizer_state,
                best_params=jax.tree_util.tree_map(
                    lambda new, old: jnp.where(improved, new, old), params, state.best_params
                ),
                best_loss=jnp.where(improved, monitored, state.best_loss),
                best_epoch=jnp.where(improved, epoch, state.best_epoch),
                train_loss=state.train_loss.at[epoch].set(train_loss),
                validation_loss=state.validation_loss.at[epoch].set(
                    jnp.where(has_validation, validation_loss, jnp.nan)
                ),
            )

        def keep_going(state: TrainState):
            patient = (state.epoch - 1 - state.best_epoch) < patience
            return (state.epoch < num_epochs) & (patient | ~has_validation)

        empty_history = jnp.full((num_epochs,), jnp.nan, dtype=jnp.float32)
        state = jax.lax.while_loop(
            keep_going,
            run_epoch,
            TrainState(
                epoch=jnp.array(0),
                params=params,
                optimizer_state=optimizer.init(params),
                best_params=params,
                best_loss=jnp.array(jnp.inf, dtype=jnp.float32),
                best_epoch=jnp.array(-1),
                train_loss=empty_history,
                validation_loss=empty_history,
            ),
        )
        dense = state.best_params["Dense_0"]
        history = {
            "epochs_run": state.epoch,
            "best_epoch": state.best_epoch + 1,  # 1-based, as people count epochs
            "train_loss": state.train_loss,
            "validation_loss": state.validation_loss,
        }
        return ProbeFit(dense["kernel"], dense["bias"], mean, std, state.best_epoch < 0, history)

    fit_copies = jax.vmap(fit_one, in_axes=(None, 0, 0, 0, 0, 0))
    if copies_in_sequence:  # a vmapped while_loop runs every copy until the last one stops: see train_linear_probes

        def fit_copies(item_features, *per_copy):
            return jax.lax.map(lambda one_copy: fit_one(item_features, *one_copy), per_copy)

    # Items one after another inside the program (lax.map), copies side by side (vmap): a layer's
    # numbers are then bit-identical whether it runs alone or in a sweep; batching the items with
    # vmap changed the weights in the 5th digit with the batch size, for about the same speed.
    # The leading axis holds one block of items per device.
    def fit_items_of_block(block):
        return jax.lax.map(
            lambda item: fit_copies(item, class_embeddings, known_classes, train_mask, validation_mask, keys), block
        )

    return jax.vmap(fit_items_of_block)(features)


ItemFeatures = Sequence[np.ndarray]  # one (samples, width) array per item (a sweep's layers or denoising steps)
PROGRAM_BLOCK_BYTES = 64 * 2**20  # features handed to the compiled program per call (each call holds a copy)


def item_sharding(devices: list) -> jax.sharding.NamedSharding | None:
    """With several local devices, the items axis spread over them; None with one."""
    if len(devices) == 1:
        return None
    log.info("training in blocks of items spread over %d devices", len(devices))
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("devices",)), jax.sharding.PartitionSpec("devices")
    )


def train_linear_probes(
    features: ItemFeatures, sample_class: np.ndarray, copies: Copies, config: TrainingConfig
) -> ProbeFit:
    """Fit every item's and copy's Dense probe; numpy results (items, copies, ...), with the batch and epoch sizes."""
    fold_train = copies.train[copies.fold >= 0]
    # MDL probes' small prefixes repeat rows within a batch rather than shrink every probe's batch.
    batch_size = min(config.batch_size, int(fold_train.sum(1).min()))
    # The guide's 100 epochs of batch 32 are only a few hundred updates on a few dozen
    # samples: too few to fit. An epoch is at least min_steps_per_epoch updates.
    most_training_rows = int(copies.train.sum(1).max())
    steps_per_epoch = max(math.ceil(most_training_rows / batch_size), config.min_steps_per_epoch)
    program = functools.partial(
        fit_probes,
        loss=config.loss,
        learning_rate=config.learning_rate,
        num_epochs=config.num_epochs,
        batch_size=batch_size,
        patience=config.patience,
        steps_per_epoch=steps_per_epoch,
        standardize=config.standardize,
        # Side by side (vmap), every copy runs until the last one stops early: 2.5x the updates of an 18-layer
        # sweep. A CPU does a copy's update no faster side by side than alone (0.15 vs 0.12 ms at width 2048), so
        # there each copy runs alone and stops at its own epoch; accelerators run copies side by side.
        copies_in_sequence=jax.default_backend() == "cpu",
    )
    per_copy = (copies.classes, copies.known, copies.train, copies.validation)
    shared = (np.asarray(sample_class, np.int32), *per_copy, np.int32(config.seed), copies.identity())
    # The items go to the program in calls of equal size (one compilation; the last call is padded with copies of its
    # last item), each holding at most PROGRAM_BLOCK_BYTES of features; with several local devices, each call's items
    # are spread over them (JAX sharding of the items axis).
    items, devices = len(features), jax.local_devices()
    most_per_call = max(PROGRAM_BLOCK_BYTES // max(features[0].nbytes, 1), 1)
    call_count = math.ceil(items / most_per_call)
    size = math.ceil(items / call_count)
    size = math.ceil(size / len(devices)) * len(devices)  # equal blocks per device
    sharding = item_sharding(devices)
    # Each item's features centered over all its samples (in float64): a shift that changes no probe, but keeps the
    # standardization folded into the weights exact when features sit far from zero (e.g. mean/std 1e6).
    shift = np.stack([item_features.mean(axis=0, keepdims=True, dtype=np.float64) for item_features in features])
    calls = []
    for start in range(0, items, size):
        block = [min(item, items - 1) for item in range(start, start + size)]
        centered = np.stack([(features[item] - shift[item]).astype(np.float32) for item in block])
        fitted = program(jax.device_put(centered.reshape(len(devices), -1, *features[0].shape), sharding), *shared)
        del centered
        calls.append(jax.tree_util.tree_map(lambda value: np.asarray(value).reshape(-1, *value.shape[2:]), fitted))
    fitted = jax.tree_util.tree_map(lambda *parts: np.concatenate(parts)[:items], *calls)  # the last call's padding off
    history = {
        **fitted.history,
        "batch_size": np.full(items, batch_size),
        "steps_per_epoch": np.full(items, steps_per_epoch),
    }
    # feature_mean back in the features' own coordinates
    return fitted._replace(feature_mean=fitted.feature_mean + shift.astype(np.float32), history=history)


RIDGE_PENALTIES = 10.0 ** np.arange(-3, 4)  # times the number of training samples
RIDGE_INNER_FOLDS = 3


def ridge_solution(
    x: np.ndarray, y: np.ndarray, penalties: np.ndarray, gram_eigen: tuple[np.ndarray, np.ndarray] | None = None
) -> list[np.ndarray]:
    """Exact ridge weights for each penalty, from one eigendecomposition: of the Gram matrix when there are fewer
    samples than features, else of the covariance. `gram_eigen`: the Gram matrix's, when known already; with x and y
    centered it may be of the Gram matrix lifted along the constant vector (see ridge_side), which acts alike on y."""
    if x.shape[0] < x.shape[1]:  # dual: W = X^T (X X^T + l I)^-1 Y
        values, vectors = gram_eigen or np.linalg.eigh(x @ x.T)
        projected = vectors.T @ y
        return [x.T @ (vectors @ (projected / (values + penalty)[:, None])) for penalty in penalties]
    values, vectors = np.linalg.eigh(x.T @ x)
    projected = vectors.T @ (x.T @ y)
    return [vectors @ (projected / (values + penalty)[:, None]) for penalty in penalties]


class RidgeSide(NamedTuple):
    """One training side: every sample standardized with its statistics, for ridge fits on subsets of its samples."""

    z: np.ndarray  # (n, width) every sample, standardized with the side's training statistics
    centered: np.ndarray  # (n_t, width) the side's training samples so standardized, less their mean `center`
    center: np.ndarray  # (width,): zero up to rounding when standardized
    # When the side has fewer samples than features: the eigenvalues and eigenvectors of the lifted centered Gram
    # matrix of its training samples (see ridge_side). Every fit on the side is then solved in the dual from it, the
    # inner folds' too (see held_predictions): no width-sized work per inner fold or penalty. None: the primal.
    gram_eigen: tuple[np.ndarray, np.ndarray] | None
    lift: float  # the eigenvalue the lifted Gram matrix gives the constant direction


def ridge_side(features: np.ndarray, train: np.ndarray, standardize: bool) -> tuple[RidgeSide, np.ndarray, np.ndarray]:
    """The side of the training samples `train` (bool), and its feature mean and std.

    A centered Gram matrix K has the constant vector 1 in its null space, where K + lI is as small as the penalty l:
    an eigenvector's rounding there reaches every leverage (I - H) held_predictions solves with. Lifted to
    K + c 11^T / n, with c the mean eigenvalue, that direction is as well conditioned as the rest, and (K + lI)^-1
    is unchanged on every centered vector (1 is an eigenvector of both)."""
    z = features.astype(
        np.float64
    )  # standardized in place: at these sizes a fresh array costs more than the arithmetic
    x_train = z[train]
    mean = x_train.mean(0) if standardize else np.zeros(features.shape[1])
    std = usable_std(x_train.std(0)) if standardize else np.ones(features.shape[1])
    z -= mean
    z /= std
    centered = z[train]
    center = centered.mean(0)
    centered -= center
    count = len(centered)
    if count >= z.shape[1]:
        return RidgeSide(z, centered, center, None, 0.0), mean, std
    gram = centered @ centered.T
    lift = np.trace(gram) / count
    return RidgeSide(z, centered, center, np.linalg.eigh(gram + lift / count), lift), mean, std


def side_fits(side: RidgeSide, targets: np.ndarray, penalties: np.ndarray) -> list[np.ndarray]:
    """Per penalty, the (width, C) weights of the ridge fit of `targets` on all the side's training samples, features
    and targets centered by their means."""
    return ridge_solution(side.centered, targets - targets.mean(0), penalties, side.gram_eigen)


def held_predictions(
    side: RidgeSide, fit: np.ndarray, held: np.ndarray, targets: np.ndarray, penalties: np.ndarray
) -> list[np.ndarray]:
    """Per penalty, the predictions of the side's training samples `held` by the ridge fit of their `targets` on its
    other training samples `fit` (bool over them, `held` its complement).

    In the dual no fit on `fit` is made. The fit on every training sample has the hat matrix H, with
    I - H = l (K + lI)^-1 - l / (c + l) 11^T / n in the lifted Gram matrix's terms (see ridge_side; the intercept is
    unpenalized), and leaving a group g out of a penalized least-squares fit changes its predictions there exactly
    to y_g - (I - H)_gg^-1 ((I - H) y)_g."""
    if side.gram_eigen is None:
        x = side.centered
        x_mean, target_mean = x[fit].mean(0), targets[fit].mean(0)
        weights = ridge_solution(x[fit] - x_mean, targets[fit] - target_mean, penalties)
        return [(x[held] - x_mean) @ w + target_mean for w in weights]
    values, vectors = side.gram_eigen
    residual_share = penalties[:, None] / (values[None] + penalties[:, None])  # (penalties, n_t): I - H per eigenvector
    basis = vectors[held] * residual_share[:, None]  # (penalties, held, n_t)
    constant = (penalties / (side.lift + penalties))[:, None, None] / len(vectors)  # the lifted constant vector's share
    complement = basis @ vectors[held].T - constant  # (I - H)_gg
    residuals = basis @ (vectors.T @ (targets - targets.mean(0)))  # ((I - H) y)_g, (penalties, held, C)
    return list(targets[held] - np.linalg.solve(complement, residuals))


def train_ridge_probes(
    features: np.ndarray, sample_class: np.ndarray, copies: Copies, units: np.ndarray, config: TrainingConfig
) -> ProbeFit:
    """Fit one item's copies in closed form; the penalty is chosen per copy by inner cross-validation over whole
    resampling units (episodes, or tasks under split "task"; mean cosine).

    A copy's targets are rows of its class table, so its fit is the table times the fit of the class indicators: one
    decomposition per training side (in the dual; in the primal, one per inner fold too) serves every penalty and
    every copy that trains on those samples (the probe, the control, each permuted assignment), and a copy's
    predictions are the indicators' times its table."""
    count, width, (classes, outputs) = len(copies.train), features.shape[1], copies.classes.shape[1:]
    weighted = np.flatnonzero((copies.assignment == 0) & (copies.fold >= 0))  # every repeat's fold probes
    kept = np.union1d(copies.kept(), weighted)  # and the control's, for the results file
    kernel, bias = np.zeros((len(kept), width, outputs), np.float32), np.zeros((len(kept), outputs), np.float32)
    mean, std = np.zeros((len(kept), width), np.float32), np.ones((len(kept), width), np.float32)
    indicator = np.eye(classes)[sample_class]  # (n, C): targets = indicator @ class table
    predictions, fit_of_copy, penalty, failed = [], np.zeros(count, np.int64), np.zeros(count), np.zeros(count, bool)
    sides: dict[bytes, list[int]] = {}
    for copy, train in enumerate(copies.train):  # validation samples fit the softmax temperature only
        sides.setdefault(train.tobytes(), []).append(copy)
    for members in map(np.array, sides.values()):
        train = copies.train[members[0]]
        side, side_mean, side_std = ridge_side(features, train, config.standardize)
        targets, penalties = indicator[train], RIDGE_PENALTIES * train.sum()
        # A class without training samples has an all-zero indicator, so zero predictions: the inner scores need only
        # the side's classes (a third to a half of the Gram matrices' products under the task split)
        present = targets.any(axis=0)
        tables = copies.classes[members][:, present]
        best = np.argmax(inner_scores(side, targets[:, present], tables, units[train], penalties), axis=1)
        used, x_mean = np.unique(best), side.center
        for chosen, weights in zip(used, side_fits(side, targets, penalties[used])):
            these, offset = members[best == chosen], targets.mean(0) - x_mean @ weights
            fit_of_copy[these], penalty[these] = len(predictions), penalties[chosen]
            failed[these] = not np.isfinite(weights).all()
            predictions.append((side.z @ weights + offset).astype(np.float32))
            for row in np.flatnonzero(np.isin(kept, these)):
                table = copies.classes[kept[row]].astype(np.float64)
                kernel[row], bias[row], mean[row], std[row] = weights @ table, offset @ table, side_mean, side_std
    fit_of_copy[weighted] = -1
    class_fit = ClassFit(np.stack(predictions), fit_of_copy, copies.classes)
    return ProbeFit(kernel, bias, mean, std, failed, {"penalty": penalty}, kept, class_fit)


def inner_scores(
    side: RidgeSide, classes: np.ndarray, tables: np.ndarray, units: np.ndarray, penalties: np.ndarray
) -> np.ndarray:
    """(copies, penalties) summed cosine of held-out inner-fold predictions to their targets, whole units per inner
    fold; a copy's prediction is its class table applied to the class indicators' fit."""
    inner = np.unique(units, return_inverse=True)[1] % RIDGE_INNER_FOLDS
    grams = table_grams(tables)
    flat = grams.reshape(len(grams), -1).T  # (C * C, copies)
    scores = np.zeros((len(tables), len(penalties)))
    for f in range(RIDGE_INNER_FOLDS):
        fit, held = inner != f, inner == f
        if fit.sum() == 0 or held.sum() == 0:
            continue
        own, indicators = np.argmax(classes[held], axis=1), classes[held]
        own_norm = np.sqrt(np.maximum(grams[:, own, own], 0.0))  # (copies, held)
        predictions = held_predictions(side, fit, held, classes, penalties)
        for index, predicted in enumerate(predictions):  # (held, C) each: in class space
            # With a copy's prediction p = predicted @ T and target T[own]: p . T[own] = (predicted (x) e_own) . vec(G)
            # and |p|^2 = (predicted (x) predicted) . vec(G), G = T T^T; every copy in one product.
            pairs = np.concatenate(
                [predicted[:, :, None] * indicators[:, None, :], predicted[:, :, None] * predicted[:, None, :]]
            )
            along, length = np.split(pairs.reshape(len(pairs), -1) @ flat, 2)  # (held, copies) each
            cosine = along / (np.sqrt(np.maximum(length, 0.0)) + EPSILON) / (own_norm.T + EPSILON)
            scores[:, index] += cosine.sum(axis=0)
    return scores


def table_grams(tables: np.ndarray) -> np.ndarray:
    """(m, C, C) inner products of every pair of a class table's targets, in float64."""
    tables = tables.astype(np.float64)
    return tables @ tables.transpose(0, 2, 1)


def table_cosines(predicted: np.ndarray, grams: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """(m, n, C) cosine of each prediction in class space ((n, C), or (m, n, C): one set per table), mapped through
    each of m class tables, to every
    class's target: from the tables' Gram matrices, never forming a d-wide prediction. `norms` (m, C): the targets'
    norms to divide by (default their norms in the table)."""
    products = predicted @ grams  # (m, n, C): prediction . target, as (indicators @ T) . T[k] = (indicators @ T T^T)_k
    length = np.sqrt(np.maximum((products * predicted).sum(axis=-1), 0.0))
    if norms is None:
        norms = np.sqrt(np.maximum(np.diagonal(grams, axis1=1, axis2=2), 0.0))
    return products / (length[:, :, None] + EPSILON) / (norms[:, None, :] + EPSILON)


def fit_items(features: ItemFeatures, design: Design, training: TrainingConfig) -> Iterator[ProbeFit]:
    """The fitted probes of every item in turn (all its copies each): trained ones in one program for every item,
    ridge one item at a time (its fits of the class indicators are kept per item for evaluation)."""
    if design.concepts is not None:  # softmax probes over each concept's values
        training = dataclasses.replace(training, loss="softmax")
    elif training.probe == "ridge":
        for item_features in features:
            yield train_ridge_probes(item_features, design.sample_class, design.copies, design.unit, training)
        return
    fitted = train_linear_probes(features, design.sample_class, design.copies, training)
    for position in range(len(features)):
        yield fitted.item(position)


# -----------------------------------------------------------------------------
# Evaluation: held-out predictions scored among the analyzed tasks; one HeldOut per item (probe_group)
# -----------------------------------------------------------------------------


def reported(column: str | None = None, interval: bool = False, default=dataclasses.MISSING):
    """A record field that is a sweep.csv column, named `column` (default: the field's name); with `interval`, its
    95% interval's ends follow it as {column}_ci_low and {column}_ci_high."""
    return dataclasses.field(default=default, metadata={"column": column, "interval": interval})


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Is a held-out prediction's nearest analyzed-task embedding its own task's? Averaged over repeats."""

    accuracy: float = reported(interval=True)
    balanced_accuracy: float = reported()  # the mean of the per-class accuracies
    majority_accuracy: float = reported()  # always answering the fold's most frequent training class
    chance_accuracy: float = reported()  # 1 / classes
    top_k_accuracy: dict[int, float]  # k -> share whose own task ranks in the top k (k = 1, 3, 5, up to classes)
    mean_reciprocal_rank: float = reported()
    cosine_margin: float  # own task's cosine minus the nearest other's
    training_accuracy: float  # the first repeat's fold probes on the samples they fitted
    per_class_accuracy: np.ndarray  # (classes,)
    per_task_accuracy: dict[int, dict]  # task id -> {"accuracy", "samples"}
    confusion_matrix: np.ndarray  # (true class, predicted class), every repeat's predictions
    fold_accuracy: np.ndarray  # (repeats, folds)
    fold_accuracy_mean: float
    fold_accuracy_std: float
    nonfinite_predictions: int  # predictions with no nearest class (a failed probe's)


@dataclasses.dataclass(frozen=True)
class Information:
    """What the probe's softmax over the analyzed tasks tells about the task: see INFORMATION_DEFINITION."""

    information_bits: float = reported(interval=True)
    cross_entropy_bits: float
    max_information_bits: float = reported()  # log2(classes)


@dataclasses.dataclass(frozen=True)
class Cosines:
    """Cosine of each held-out prediction to its own task's embedding, averaged."""

    cosine_similarity_label_space: float = reported()  # the probe's own label space
    cosine_similarity: float = reported()  # raw T5 space, the guide's (see RAW_PREDICTION)
    constant_predictor_cosine: float = reported()  # the training tasks' mean embedding as the prediction
    cosine_similarity_normalized: float = reported()  # (cosine - constant) / (1 - constant)


class AccuracyAndBits(NamedTuple):
    """Accuracy and information of each repeat, or of each permuted assignment."""

    accuracy: np.ndarray
    information_bits: np.ndarray


@dataclasses.dataclass(frozen=True)
class Control:
    """The probe trained on permuted task -> embedding assignments: see describe_control for what it tests."""

    control_accuracy: float = reported()  # the first permuted assignment
    control_information_bits: float = reported()
    # the first repeat's accuracy - the mean accuracy of the permuted assignments (the control's alone when it is the
    # only one): against one permutation, selectivity is as much about that draw as about the layer
    selectivity: float = reported(interval=True)
    # accuracy under every permuted assignment; information under the first NULL_INFORMATION_PERMUTATIONS
    permutation_null: AccuracyAndBits
    permutation_null_mean_accuracy: float = reported()
    permutation_null_mean_information_bits: float
    # None with one permuted assignment; NaN when a null probe failed
    permutation_p_value: float | None = reported(default=None)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What the numbers are over."""

    num_samples: int = reported()
    num_heldout_samples: int  # cross-validation: every sample is held out once per repeat
    num_tasks: int = reported()
    num_classes: int  # unique descriptions
    num_units: int  # resampled by the intervals: episodes, or tasks under split "task"
    num_episodes: int = reported()
    num_folds: int = reported()
    num_repeats: int = reported()


@dataclasses.dataclass(frozen=True)
class Failures:
    """Probes that never improved on validation: their samples count as wrong."""

    failed_probes: list[tuple[int, int]]  # the probe's (repeat, fold)
    failed_copies: dict[str, int]  # role (probe, null, mdl) -> count


class Codelength(NamedTuple):
    """Online (prequential) code of the samples' classes, in bits."""

    online_bits: float
    uniform_bits: float
    compression: float  # uniform / online


@dataclasses.dataclass(frozen=True)
class Conditional:
    """--baseline (conditional probing): the same probe on the baseline alone and on [baseline, layer]."""

    spec: str = reported(column="baseline")
    accuracy: float  # the baseline alone
    information_bits: float = reported(column="baseline_information_bits")
    joint_accuracy: float
    joint_information_bits: float = reported()
    gain_bits: float = reported()
    gain_accuracy: float = reported()


@dataclasses.dataclass(frozen=True)
class LabelComparison:
    """--labels task,prompt: the task's probe and the prompt's (the same features, folds and budget, one repeat, no
    control) over the samples whose prompt differs from their task's description. Accuracy intervals: 95% Wilson
    over those samples' episodes."""

    samples: int  # the samples compared: those whose prompt differs from their task's description
    task_accuracy: float = reported()
    task_accuracy_interval: tuple[float, float]
    task_balanced_accuracy: float = reported()
    task_information_bits: float = reported()
    prompt_accuracy: float = reported()
    prompt_accuracy_interval: tuple[float, float]
    prompt_balanced_accuracy: float = reported()
    prompt_information_bits: float = reported()
    prompt_minus_task_bits: float = reported()
    verdict: str = reported(column="label_verdict")  # LABEL_VERDICTS, by whether the accuracy intervals overlap


LABEL_VERDICTS = ("follows the prompt", "follows the task", "both/neither")
LABEL_SCORES = ("accuracy", "accuracy_interval", "balanced_accuracy", "information_bits")  # per labeling, as filed


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Every held-out number of one item (one layer's samples at one step): what evaluate_item returns."""

    counts: Counts
    retrieval: Retrieval
    information: Information
    cosines: Cosines
    repeats: AccuracyAndBits
    failures: Failures
    intervals: dict[str, tuple[float, float]]  # metric -> 95% interval; none with --bootstrap 0
    control: Control | None = None  # --no_control: None
    mdl: Codelength | None = None  # --mdl
    mdl_control: Codelength | None = None  # --mdl, of the control
    baseline: Conditional | None = None  # --baseline
    labels: LabelComparison | None = None  # --labels task,prompt


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float64 (no overflow on huge predictions; the guide's epsilon keeps zero rows
    finite)."""
    values = np.asarray(values, dtype=np.float64)
    return values / (np.linalg.norm(values, axis=-1, keepdims=True) + EPSILON)


def row_cosine(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cosine between matching rows."""
    return np.sum(unit_rows(predictions) * unit_rows(targets), axis=-1)


class Ranked(NamedTuple):
    """Per-sample retrieval among the analyzed tasks' embeddings."""

    rank: np.ndarray  # (n,) of the own class's target among all (1 = retrieved; ties count against it)
    correct: np.ndarray  # (n,) rank == 1
    predicted: np.ndarray  # (n,) nearest class (-1: non-finite prediction)
    margin: np.ndarray  # (n,) own cosine minus the nearest other's


def retrieval(similarities: np.ndarray, own_class: np.ndarray) -> Ranked:
    """Retrieval from (samples, classes) cosine similarities. A row holding a non-finite value (a failed probe) ranks
    last and counts as wrong: NaN compares False, so it would otherwise count as right."""
    finite = np.isfinite(similarities).all(axis=1)
    safe = np.where(finite[:, None], similarities, 0.0)
    own = safe[np.arange(len(own_class)), own_class]
    others = np.where(np.arange(safe.shape[1])[None, :] == own_class[:, None], -np.inf, safe)
    rank = np.where(finite, 1 + np.sum(others >= own[:, None], axis=1), safe.shape[1])
    return Ranked(
        rank,
        rank == 1,
        np.where(finite, np.argmax(safe, axis=1), -1),
        np.where(finite, own - others.max(axis=1), np.nan),
    )


def copy_predictions(features: np.ndarray, fitted: ProbeFit, copy_of_sample: np.ndarray) -> np.ndarray:
    """(n, d) label-space prediction of every sample by the copy named for it; NaN where none is (-1) or it failed."""
    prediction = np.full((len(features), fitted.kernel.shape[-1]), np.nan, dtype=np.float32)
    for copy in np.unique(copy_of_sample[copy_of_sample >= 0]):
        rows = copy_of_sample == copy
        if fitted.failed[copy]:
            continue
        class_fit = fitted.class_fit
        if class_fit is not None and class_fit.fit[copy] >= 0:  # ridge: the class indicators' fit times the table
            prediction[rows] = class_fit.predictions[class_fit.fit[copy]][rows] @ class_fit.tables[copy]
        else:
            kernel, bias, mean, std = (part[0] for part in fitted.weights(np.array([copy])))
            prediction[rows] = (features[rows].astype(np.float64) - mean) / std @ kernel + bias
    return prediction


def copy_similarities(prediction: np.ndarray, copies: Copies, copy_of_sample: np.ndarray) -> np.ndarray:
    """(n, C) cosine, in T5's axes, of every prediction (mapped back through its copy's basis) to every class's whole
    target embedding. A class outside the copy's span (a held-out task under --split task) is scored by its embedding,
    not by its projection, whose cosine would be inflated by 1 / cos(embedding, span)."""
    similarity = np.full((len(prediction), copies.classes.shape[1]), np.nan)
    for copy in np.unique(copy_of_sample[copy_of_sample >= 0]):
        rows = copy_of_sample == copy
        spanned = np.any(copies.label_basis[copy] != 0, axis=1)  # directions a narrower span padded out map to nothing
        # prediction @ basis . target = prediction . (basis @ target) = prediction . the target's coordinates
        targets = copies.classes[copy] / (copies.target_norm[copy][:, None] + EPSILON)
        similarity[rows] = unit_rows(prediction[rows] * spanned) @ targets.T
    return similarity


def rows_similarity(features: np.ndarray, fitted: ProbeFit, copies: Copies, copy: int, rows: np.ndarray) -> np.ndarray:
    """(rows, C) cosine of one copy's predictions of the given rows to every class's target."""
    chosen = np.where(rows, copy, -1)
    return copy_similarities(copy_predictions(features, fitted, chosen), copies, chosen)[rows]


TEMPERATURE_GRID = np.geomspace(0.01, 100.0, 161)  # softmax temperatures tried on each copy's own training side
# The permutation null's information: its first 20 permuted assignments. Fitting a copy's softmax temperature costs
# about as much as retrieving with 50 ridge copies; the permutation p-value rests on retrieval, under every one.
NULL_INFORMATION_PERMUTATIONS = 20


def uniform_share(calibration_count) -> np.ndarray:
    """Weight of the uniform code mixed into every prediction: calibration (validation) samples from n independent
    units cannot vouch for an error rate below about 1 / (n + 2), the rule of succession; so a confident held-out
    error costs at most log2(classes x (n + 2)) bits."""
    return 1.0 / (np.asarray(calibration_count, dtype=np.float64) + 2.0)


def code_bits(logits: np.ndarray, own: np.ndarray, share, allowed: np.ndarray | None = None) -> np.ndarray:
    """Per sample, -log2 of (1 - share) softmax(logits) + share / K at its own class (K = logits' width; `allowed`
    masks classes the softmax may not put mass on). A non-finite row carries no information: log2(K) bits."""
    import scipy.special  # here, not at the top: 0.1 s of start-up that --report and --help do not need

    finite = np.isfinite(logits).all(axis=1)
    logits = np.where(finite[:, None], logits, 0.0)
    if allowed is not None:
        logits = np.where(allowed | ~finite[:, None], logits, -np.inf)
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    share = np.where(finite, share, 1.0)
    mixed = np.logaddexp(
        np.log1p(-np.minimum(share, 1 - 1e-12))[:, None] + log_p, np.log(share / logits.shape[1])[:, None]
    )
    return -mixed[np.arange(len(own)), own] / np.log(2)


def log_loss_bits(similarities: np.ndarray, own_class: np.ndarray, temperature, share) -> np.ndarray:
    """Per sample, -log2 p(own class) with p = softmax over the analyzed tasks of similarity / temperature (one
    temperature, or one per sample), mixed with the uniform code (see uniform_share)."""
    temperature = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (len(own_class),))
    return code_bits(similarities / temperature[:, None], own_class, np.broadcast_to(share, (len(own_class),)))


def fit_temperature(logits: np.ndarray, own_class: np.ndarray, units: int, allowed: np.ndarray | None = None) -> float:
    """The grid temperature with the least cross-entropy (code_bits) on the given calibration samples, every grid
    point at once, the uniform code's share set by the number of resampling units they come from. A non-finite row
    costs log2(K) bits at every temperature: it cannot move the choice and is left out."""
    finite = np.isfinite(logits).all(axis=1)
    if not finite.any():  # every temperature codes as well: the first, as a search over equal values gives
        return float(TEMPERATURE_GRID[0])
    logits, own_class = logits[finite].astype(np.float64), own_class[finite]
    if allowed is not None:
        logits = np.where(allowed[finite], logits, -np.inf)
    shifted = logits - logits.max(axis=1, keepdims=True)  # as logsumexp does: exp never overflows
    scaled = shifted[None] / TEMPERATURE_GRID[:, None, None]  # (grid, n, K)
    log_p = scaled[:, np.arange(len(own_class)), own_class] - np.log(np.exp(scaled).sum(axis=2))
    share, width = uniform_share(units), logits.shape[1]
    mixed = np.logaddexp(np.log1p(-min(share, 1 - 1e-12)) + log_p, np.log(share / width))
    return float(TEMPERATURE_GRID[int(np.argmin(-mixed.mean(axis=1)))])


def copy_temperatures(features: np.ndarray, fitted: ProbeFit, design: Design) -> np.ndarray:
    """Every copy's softmax temperature, fitted on its validation samples; 1 for a copy without any; NaN for a
    permuted assignment past the first NULL_INFORMATION_PERMUTATIONS (scored by retrieval only)."""
    copies = design.copies
    temperatures = np.ones(len(copies.train))
    for copy in range(len(temperatures)):
        rows = copies.validation[copy]
        if copies.assignment[copy] > NULL_INFORMATION_PERMUTATIONS:
            temperatures[copy] = np.nan
            continue
        if not rows.any():
            continue
        if design.concepts is None:  # over the classes' targets, by cosine
            logits, own, allowed = (
                rows_similarity(features, fitted, copies, copy, rows),
                design.sample_class[rows],
                None,
            )
        else:  # over the concept's values the copy saw in training, by its logits
            value, present = concept_values(design, copy)
            logits = copy_predictions(features, fitted, np.where(rows, copy, -1))[rows, : len(present)]
            logits, own, allowed = (
                logits.astype(np.float64),
                value[rows],
                np.broadcast_to(present, (rows.sum(), len(present))),
            )
        temperatures[copy] = fit_temperature(logits, own, copies.validation_units[copy], allowed)
    return temperatures


@dataclasses.dataclass(frozen=True)
class Scores:
    """Every sample coded by one copy each (held-out: the fold probe that never saw it; MDL: its block's probe)."""

    copy: np.ndarray  # (n,) the copy that predicted each sample (-1: none, the uniform code)
    prediction: np.ndarray  # (n, d) in that copy's label space
    similarity: np.ndarray  # (n, C) cosine to every class's target
    rank: np.ndarray  # (n,) of the own class's target among all (1 = retrieved)
    correct: np.ndarray  # (n,) rank == 1
    predicted: np.ndarray  # (n,) nearest class (-1: non-finite prediction)
    margin: np.ndarray  # (n,) own cosine minus the nearest other's
    bits: np.ndarray  # (n,) -log2 p(own class) under the copy's fitted softmax
    cosine: np.ndarray  # (n,) label-space cosine to the own target


def scores_of(
    features: np.ndarray, fitted: ProbeFit, design: Design, temperatures: np.ndarray, copy: np.ndarray
) -> Scores:
    """Scores of every sample under the copies named per sample."""
    prediction = copy_predictions(features, fitted, copy)
    similarity = copy_similarities(prediction, design.copies, copy)
    ranked = retrieval(similarity, design.sample_class)
    temperature = np.where(copy >= 0, temperatures[np.maximum(copy, 0)], 1.0)
    share = uniform_share(design.copies.validation_units[np.maximum(copy, 0)])
    target = design.copies.classes[np.maximum(copy, 0), design.sample_class]
    cosine = np.nan_to_num(row_cosine(prediction, target))  # a failed probe's prediction aligns with nothing: 0
    return Scores(
        copy,
        prediction,
        similarity,
        *ranked,
        log_loss_bits(similarity, design.sample_class, temperature, share),
        cosine,
    )


class NullScores(NamedTuple):
    """Held-out scores under the permuted assignments (the first is the control), with the first repeat's folds."""

    correct: np.ndarray  # (A, n) retrieval under every permuted assignment
    bits: np.ndarray  # (min(A, NULL_INFORMATION_PERMUTATIONS), n) code lengths under the first ones
    control_predicted: np.ndarray  # (n,) the control's nearest class (-1: non-finite prediction)


NULL_BLOCK = 100  # permuted assignments scored at once by ridge: (block, fold's samples, classes) similarities


def null_similarity_blocks(features: np.ndarray, fitted: ProbeFit, design: Design) -> Iterator[tuple]:
    """(assignments - 1, rows, (assignments, rows, C) similarities) of the permutation null, block by block: a
    trained copy's from its predictions; ridge's from its class indicators' fit and each permuted table's Gram
    matrix (table_cosines), the same cosines to the whole targets as copy_similarities gives."""
    copies, assignments = design.copies, len(design.assignments) - 1
    if fitted.class_fit is None:
        for a in range(assignments):
            copy = heldout_copy(design, 0, a + 1)
            yield (
                np.array([a]),
                copy >= 0,
                copy_similarities(copy_predictions(features, fitted, copy), copies, copy)[None],
            )
        return
    null = (copies.repeat == 0) & (copies.assignment >= 1) & (copies.fold >= 0)
    fold_copy = np.full((assignments, design.folds), -1)
    fold_copy[copies.assignment[null] - 1, copies.fold[null]] = np.flatnonzero(null)
    assert (fold_copy >= 0).all(), "every permuted assignment has a probe per fold"
    class_fit = fitted.class_fit
    for fold in range(design.folds):
        rows = design.fold[0] == fold
        for start in range(0, assignments, NULL_BLOCK):
            chosen = fold_copy[start : start + NULL_BLOCK, fold]
            predicted = class_fit.predictions[class_fit.fit[chosen][:, None], np.flatnonzero(rows)].astype(np.float64)
            similarity = table_cosines(predicted, table_grams(class_fit.tables[chosen]), copies.target_norm[chosen])
            similarity[fitted.failed[chosen]] = np.nan
            yield np.arange(start, start + len(chosen)), rows, similarity


def null_scores(features: np.ndarray, fitted: ProbeFit, design: Design, temperatures: np.ndarray) -> NullScores:
    """Retrieval under every permuted assignment; code lengths under the first NULL_INFORMATION_PERMUTATIONS."""
    assignments, count = len(design.assignments) - 1, len(design.sample_class)
    correct = np.zeros((assignments, count), bool)
    bits = np.full((min(assignments, NULL_INFORMATION_PERMUTATIONS), count), np.nan)
    control_predicted = np.full(count, -1)
    for index, rows, similarity in null_similarity_blocks(features, fitted, design):
        own = design.sample_class[rows]
        ranked = retrieval(similarity.reshape(-1, similarity.shape[2]), np.tile(own, len(index)))
        correct[np.ix_(index, np.flatnonzero(rows))] = ranked.correct.reshape(len(index), -1)
        if index[0] == 0:
            control_predicted[rows] = ranked.predicted[: rows.sum()]
        for position in np.flatnonzero(index < len(bits)):
            copy = heldout_copy(design, 0, index[position] + 1)[rows]
            share = uniform_share(design.copies.validation_units[copy])
            bits[index[position], rows] = log_loss_bits(similarity[position], own, temperatures[copy], share)
    return NullScores(correct, bits, control_predicted)


def heldout_copy(design: Design, repeat: int, assignment: int) -> np.ndarray:
    """(n,) the fold probe of (repeat, assignment) that never saw each sample."""
    return design.copies.fold_copies(repeat, assignment)[design.fold[repeat]]


def raw_space_predictions(prediction: np.ndarray, design: Design, copy: np.ndarray, labels: LabelConfig) -> np.ndarray:
    """Predictions in raw T5 space, as the guide's cosine scores them. Centered, the probe fixes a direction only, so
    the raw prediction is label mean + unit(prediction) x the mean norm of its training targets, through the basis."""
    copies, raw_prediction = design.copies, np.zeros((len(copy), design.raw.shape[1]))
    for c in np.unique(copy):
        rows = copy == c
        if labels.center_labels:
            scale = np.linalg.norm(copies.classes[c][copies.known[c]], axis=1).mean()
            raw_prediction[rows] = unit_rows(prediction[rows]) * scale @ copies.label_basis[c] + copies.label_mean[c]
        else:
            raw_prediction[rows] = prediction[rows] @ copies.label_basis[c]
    return raw_prediction


def information(bits: np.ndarray, classes: int) -> np.ndarray:
    """Information in bits from a code length in bits: log2(classes) minus it."""
    return math.log2(classes) - bits


def training_accuracy(features: np.ndarray, fitted: ProbeFit, design: Design) -> float:
    """Retrieval accuracy of the first repeat's fold probes on the samples they were fitted on."""
    correct = []
    for copy in design.copies.fold_copies(0, 0):
        rows = design.copies.train[copy]
        similarity = rows_similarity(features, fitted, design.copies, copy, rows)
        correct.append(retrieval(similarity, design.sample_class[rows]).correct)
    return float(np.concatenate(correct).mean())


def majority_correct(design: Design) -> np.ndarray:
    """(n,) whether each sample's class is the most frequent one on its fold's training side (first repeat); under
    split "task" it never is, since the held-out tasks are not on the training side."""
    copies, majority = design.copies, {}
    for copy in copies.fold_copies(0, 0):
        side = copies.train[copy] | copies.validation[copy]
        majority[copies.fold[copy]] = np.bincount(
            design.sample_class[side], minlength=len(design.descriptions)
        ).argmax()
    return design.sample_class == np.array([majority[f] for f in design.fold[0]])


def online_codelength(
    features: np.ndarray, fitted: ProbeFit, design: Design, temperatures: np.ndarray, assignment: int
) -> Codelength:
    """Prequential code of the samples' classes (Voita & Titov 2020): the first block by the uniform code, each later
    block by the probe trained on the blocks before it."""
    copies, copy = design.copies, np.full(len(design.sample_class), -1)
    for c in np.flatnonzero((copies.block >= 0) & (copies.assignment == assignment)):
        copy[design.mdl_block == copies.block[c]] = c
    online = float(scores_of(features, fitted, design, temperatures, copy).bits.sum())  # block 0: log2(C) each
    uniform = len(copy) * math.log2(len(design.descriptions))
    return Codelength(online, uniform, uniform / online)


class SampleValues(NamedTuple):
    """Per-sample values averaged over the repeats; each headline metric is their mean over the samples."""

    accuracy: np.ndarray
    information_bits: np.ndarray
    cosine_similarity_label_space: np.ndarray
    cosine_similarity: np.ndarray
    reciprocal_rank: np.ndarray
    margin: np.ndarray


def sample_means(repeats: list[Scores], raw_cosines: list[np.ndarray], classes: int) -> SampleValues:
    """Every per-sample value, averaged over the repeats."""
    return SampleValues(
        accuracy=np.mean([scores.correct for scores in repeats], axis=0),
        information_bits=information(np.mean([scores.bits for scores in repeats], axis=0), classes),
        cosine_similarity_label_space=np.mean([scores.cosine for scores in repeats], axis=0),
        cosine_similarity=np.mean(raw_cosines, axis=0),
        reciprocal_rank=np.mean([1.0 / scores.rank for scores in repeats], axis=0),
        margin=np.mean([scores.margin for scores in repeats], axis=0),
    )


def control_of(null: NullScores | None, observed: Scores, classes: int, failed_null: int) -> Control | None:
    """The control (first permuted assignment) and, with more, the permutation null and its p-value; like for like,
    against the first repeat's probe, whose folds the permutations were trained with."""
    if null is None:
        return None
    accuracy = null.correct.mean(axis=1)
    null_information = information(null.bits.mean(axis=1), classes)
    p_value = None
    if len(accuracy) > 1:  # a failed null probe scores as wrong, which would make the p-value too small: none then
        p_value = (
            math.nan if failed_null else float((1 + np.sum(accuracy >= observed.correct.mean())) / (1 + len(accuracy)))
        )
    return Control(
        control_accuracy=float(accuracy[0]),
        control_information_bits=float(null_information[0]),
        selectivity=float(observed.correct.mean() - accuracy.mean()),
        permutation_null=AccuracyAndBits(accuracy, null_information),
        permutation_null_mean_accuracy=float(accuracy.mean()),
        permutation_null_mean_information_bits=float(null_information.mean()),
        permutation_p_value=p_value,
    )


def retrieval_of(
    features: np.ndarray, fitted: ProbeFit, design: Design, values: SampleValues, repeats: list[Scores], task_id
) -> Retrieval:
    """Retrieval numbers over every repeat."""
    classes = len(design.descriptions)
    per_class = np.array([values.accuracy[design.sample_class == c].mean() for c in range(classes)])
    fold_accuracy = np.array(
        [[scores.correct[design.fold[r] == f].mean() for f in range(design.folds)] for r, scores in enumerate(repeats)]
    )  # (repeats, folds)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for scores in repeats:  # a non-finite prediction has no predicted class
        finite = scores.predicted >= 0
        np.add.at(confusion, (design.sample_class[finite], scores.predicted[finite]), 1)
    has_margin = np.isfinite(values.margin).any()
    return Retrieval(
        accuracy=float(values.accuracy.mean()),
        balanced_accuracy=float(per_class.mean()),
        majority_accuracy=float(majority_correct(design).mean()),
        chance_accuracy=1.0 / classes,
        top_k_accuracy={k: float(np.mean([np.mean(s.rank <= k) for s in repeats])) for k in (1, 3, 5) if k <= classes},
        mean_reciprocal_rank=float(values.reciprocal_rank.mean()),
        cosine_margin=float(np.nanmean(values.margin)) if has_margin else math.nan,
        training_accuracy=training_accuracy(features, fitted, design),
        per_class_accuracy=per_class,
        per_task_accuracy={
            int(t): {"accuracy": float(values.accuracy[task_id == t].mean()), "samples": int((task_id == t).sum())}
            for t in design.task_ids
        },
        confusion_matrix=confusion,
        fold_accuracy=fold_accuracy,
        fold_accuracy_mean=float(fold_accuracy.mean()),  # over every repeat's folds
        fold_accuracy_std=float(fold_accuracy.std()),
        nonfinite_predictions=int(sum(np.sum(scores.predicted < 0) for scores in repeats)),
    )


class FailedCopies(NamedTuple):
    """Failed copies by role: the probe's folds as (repeat, fold); the null's and the MDL blocks' as copy indices."""

    probe: list[tuple[int, int]]
    null: list[int]
    mdl: list[int]


def fitted_failures(design: Design, failed: np.ndarray) -> FailedCopies:
    """The copies that never improved on validation, by role."""
    copies = design.copies
    return FailedCopies(
        [
            (int(copies.repeat[c]), int(copies.fold[c]))
            for c in np.flatnonzero(failed & (copies.fold >= 0) & (copies.assignment == 0))
        ],
        np.flatnonzero(failed & (copies.fold >= 0) & (copies.assignment > 0)).tolist(),
        np.flatnonzero(failed & (copies.block >= 0)).tolist(),
    )


Z_95 = 1.959963984540054
SHARE_METRICS = ("accuracy", "control_accuracy")  # per-sample values 0 or 1: a Wilson interval fits them


def wilson_interval(share: float, count: int) -> tuple[float, float]:
    """95% Wilson score interval of a share observed over `count` units."""
    scale = 1 + Z_95**2 / count
    center = (share + Z_95**2 / (2 * count)) / scale
    half = Z_95 / scale * math.sqrt(share * (1 - share) / count + Z_95**2 / (4 * count**2))
    return (float(max(0.0, center - half)), float(min(1.0, center + half)))


def unit_intervals(
    values: dict[str, np.ndarray], unit: np.ndarray, stratum: np.ndarray | None, resamples: int, seed: int
) -> dict[str, tuple[float, float]]:
    """95% BCa intervals (see bootstrap_interval) of per-sample means, resampling whole units, within their stratum;
    the statistic is the mean over the resampled units' samples, as the estimate is."""
    if resamples == 0:
        return {}
    unit_index = np.unique(unit, return_inverse=True)[1]
    counts = np.bincount(unit_index).astype(np.float64)
    stratum_of_unit = np.zeros(len(counts)) if stratum is None else np.bincount(unit_index, weights=stratum) / counts
    data = tuple(np.flatnonzero(stratum_of_unit == s).astype(np.float64) for s in np.unique(stratum_of_unit))
    intervals = {}
    for name, per_sample in values.items():
        sums = np.bincount(unit_index, weights=per_sample.astype(np.float64), minlength=len(counts))

        def mean_of_units(*chosen, axis=-1, sums=sums):
            picked = np.concatenate(chosen, axis=axis).astype(np.int64)
            return sums[picked].sum(axis=axis) / counts[picked].sum(axis=axis)

        # Units that all agree (all 50 episodes right) leave BCa undefined and a percentile interval zero-width: a share
        # gets the Wilson score interval over the units instead, any other value none (printed as n/a).
        unit_means = sums / counts
        tolerance = 1e-6 * max(1.0, float(np.abs(unit_means).max()))  # rounding-level differences are no variation
        if all(np.ptp(unit_means[group.astype(np.int64)]) <= tolerance for group in data):
            share = float(sums.sum() / counts.sum())
            intervals[name] = wilson_interval(share, len(counts)) if name in SHARE_METRICS else (math.nan, math.nan)
            continue
        for method in ("BCa", "percentile"):  # BCa's jackknife can still fail on a handful of units
            low, high = bootstrap_interval(data, mean_of_units, resamples, np.random.default_rng([seed, 3]), method)
            if np.isfinite(low) and np.isfinite(high):
                break
        intervals[name] = (float(low), float(high))
    return intervals


CONFIDENCE = 0.95


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic, resamples: int, rng, method: str) -> tuple:
    """scipy.stats.bootstrap's two-sided 95% interval of a vectorized statistic, drawn and computed as scipy 1.17 does
    (a test holds them equal), without importing scipy.stats: 0.45 s of every run's start-up, parsing docstrings."""
    resampled = [sample[rng.integers(0, len(sample), size=(resamples, len(sample)))] for sample in data]
    distribution = statistic(*resampled, axis=-1)  # each sample (stratum) resampled on its own
    alpha = (1 - CONFIDENCE) / 2
    if np.isnan(distribution).any():
        return math.nan, math.nan
    if method == "BCa":
        probabilities = np.stack(bca_probabilities(data, statistic, alpha, distribution))
    else:
        probabilities = np.stack([np.asarray(alpha), 1 - np.asarray(alpha)])
    if not np.isfinite(probabilities).all():  # BCa undefined (a degenerate jackknife)
        return math.nan, math.nan
    # Hyndman & Fan's type 7 ("linear") quantile, as scipy.stats.quantile computes it.
    ordered, count = np.sort(distribution), len(distribution)
    position = probabilities * count + (1 - probabilities)
    upper = position // 1
    lower, fraction = upper - 1, position % 1
    fraction = np.where(lower < 0, 0.0, fraction)
    lower, upper = np.clip(lower, 0.0, count - 1).astype(np.int64), np.clip(upper, 0.0, count - 1).astype(np.int64)
    low, high = (1 - fraction) * ordered[lower] + fraction * ordered[upper]
    return low, high


def bca_probabilities(data: tuple[np.ndarray, ...], statistic, alpha: float, distribution: np.ndarray) -> tuple:
    """The bias-corrected and accelerated interval's quantiles (Efron & Tibshirani 1993, 14.3 and 15.4), the
    acceleration from a jackknife of each sample in turn."""
    from scipy.special import ndtr, ndtri

    estimate = statistic(*data, axis=-1)
    below = np.count_nonzero(distribution < estimate) + np.count_nonzero(distribution <= estimate)
    bias = ndtri(np.float64(below) / (2 * len(distribution)))
    numerators, denominators = [], []
    for j, sample in enumerate(data):
        count = len(sample)
        samples = [np.broadcast_to(other, (count, len(other))) for other in data]
        samples[j] = np.broadcast_to(sample, (count, count))[~np.eye(count, dtype=bool)].reshape(count, count - 1)
        leave_one_out = statistic(*samples, axis=-1)
        influence = (count - 1) * (np.mean(leave_one_out, axis=-1, keepdims=True) - leave_one_out)
        numerators.append(np.sum(influence**3, axis=-1) / float(count) ** 3)
        denominators.append(np.sum(influence**2, axis=-1) / float(count) ** 2)
    acceleration = 1 / 6 * sum(numerators) / sum(denominators) ** (3 / 2)
    z_alpha = float(ndtri(alpha))
    low, high = bias + z_alpha, bias - z_alpha
    return ndtr(bias + low / (1 - acceleration * low)), ndtr(bias + high / (1 - acceleration * high))


def widened(
    interval: tuple[float, float], estimate: float, repeat_values: np.ndarray, is_share: bool
) -> tuple[float, float]:
    """An interval widened by the spread across repeats (folds and initialisation) of the mean it brackets."""
    if len(repeat_values) < 2 or not interval:
        return interval
    extra = Z_95 * np.std(repeat_values, ddof=1) / math.sqrt(len(repeat_values))
    low, high = (
        estimate - math.hypot(estimate - interval[0], extra),
        estimate + math.hypot(interval[1] - estimate, extra),
    )
    return (max(low, 0.0), min(high, 1.0)) if is_share else (float(low), float(high))


INTERVAL_METRICS = ("accuracy", "information_bits", "cosine_similarity_label_space", "cosine_similarity")


def interval_estimates(
    design: Design,
    values: SampleValues,
    repeats: list[Scores],
    null: NullScores | None,
    per_repeat: AccuracyAndBits,
    training: TrainingConfig,
) -> dict[str, tuple[float, float]]:
    """95% intervals over the units that vary (see unit_intervals); accuracy's and information's widened by their
    spread across repeats."""
    chosen = {name: getattr(values, name) for name in INTERVAL_METRICS}
    if null is not None:
        chosen["control_accuracy"] = null.correct[0].astype(np.float64)
        chosen["selectivity"] = repeats[0].correct - null.correct.mean(axis=0)
    intervals = unit_intervals(chosen, design.unit, design.stratum, training.bootstrap, training.seed)
    for name in ("accuracy", "information_bits"):
        if name in intervals:
            estimate = float(getattr(values, name).mean())
            intervals[name] = widened(intervals[name], estimate, getattr(per_repeat, name), name in SHARE_METRICS)
    return intervals


class Predictions(NamedTuple):
    """The per-sample side of an evaluation, kept in the results file."""

    first: Scores  # the first repeat's held-out scores
    raw_prediction: np.ndarray  # (n, D) the first repeat's predictions in raw T5 space
    control_predicted: np.ndarray | None  # (n,) the first permuted assignment's nearest class
    temperatures: np.ndarray  # (copies,) each copy's softmax temperature (NaN: not fitted, see copy_temperatures)


def evaluate_item(
    samples: Samples,
    fitted: ProbeFit,
    design: Design,
    labels: LabelConfig,
    training: TrainingConfig,
    baseline: Conditional | None = None,
) -> tuple[HeldOut, Predictions]:
    """Held-out numbers of one item (one layer's samples and its fitted copies), and its per-sample predictions;
    `baseline`, its conditional probing (see conditional_metrics)."""
    features = samples.features[0]
    temperatures = copy_temperatures(features, fitted, design)
    repeats = [
        scores_of(features, fitted, design, temperatures, heldout_copy(design, r, 0)) for r in range(training.repeats)
    ]
    null = null_scores(features, fitted, design, temperatures) if len(design.assignments) > 1 else None
    own, classes = design.raw[design.sample_class], len(design.descriptions)
    raw_predictions = [raw_space_predictions(scores.prediction, design, scores.copy, labels) for scores in repeats]
    raw_cosines = [np.nan_to_num(row_cosine(prediction, own)) for prediction in raw_predictions]
    constant = np.mean([row_cosine(design.copies.label_mean[scores.copy], own) for scores in repeats], axis=0)
    values = sample_means(repeats, raw_cosines, classes)
    raw, label_space = values.cosine_similarity.mean(), values.cosine_similarity_label_space.mean()
    failed = fitted_failures(design, fitted.failed)
    with_mdl = design.mdl_block is not None
    per_repeat = AccuracyAndBits(
        np.array([scores.correct.mean() for scores in repeats]),
        information(np.array([scores.bits.mean() for scores in repeats]), classes),
    )
    held_out = HeldOut(
        counts=Counts(
            num_samples=len(design.sample_class),
            num_heldout_samples=len(design.sample_class),
            num_tasks=len(design.task_ids),
            num_classes=classes,
            num_units=len(np.unique(design.unit)),
            num_episodes=len(set(zip(samples.task_id.tolist(), samples.episode.tolist()))),
            num_folds=design.folds,
            num_repeats=len(repeats),
        ),
        retrieval=retrieval_of(features, fitted, design, values, repeats, samples.task_id),
        information=Information(
            information_bits=float(values.information_bits.mean()),
            cross_entropy_bits=float(information(values.information_bits.mean(), classes)),
            max_information_bits=math.log2(classes),
        ),
        cosines=Cosines(
            cosine_similarity_label_space=float(label_space),
            cosine_similarity=float(raw),
            constant_predictor_cosine=float(constant.mean()),
            cosine_similarity_normalized=float((raw - constant.mean()) / (1 - constant.mean())),
        ),
        repeats=per_repeat,
        failures=Failures(failed.probe, {role: len(members) for role, members in failed._asdict().items()}),
        intervals=interval_estimates(design, values, repeats, null, per_repeat, training),
        control=control_of(null, repeats[0], classes, len(failed.null)),
        mdl=online_codelength(features, fitted, design, temperatures, 0) if with_mdl else None,
        mdl_control=online_codelength(features, fitted, design, temperatures, 1)
        if with_mdl and null is not None
        else None,
        baseline=baseline,
    )
    control_predicted = None if null is None else null.control_predicted
    return held_out, Predictions(repeats[0], raw_predictions[0], control_predicted, temperatures)


class Headline(NamedTuple):
    accuracy: float
    information_bits: float


def first_repeat_score(features: np.ndarray, fitted: ProbeFit, design: Design) -> Headline:
    """Held-out accuracy and information of the first repeat's fold probes."""
    scores = scores_of(
        features, fitted, design, copy_temperatures(features, fitted, design), heldout_copy(design, 0, 0)
    )
    classes = len(design.descriptions)
    return Headline(float(scores.correct.mean()), float(information(scores.bits.mean(), classes)))


def conditional_metrics(
    features: ItemFeatures,
    samples: Samples,
    descriptions: dict[int, str],
    labels: LabelConfig,
    training: TrainingConfig,
    spec: str,
) -> list[Conditional]:
    """Conditional probing (Hewitt et al. 2021), per item: the same probe (folds, budget, per-feature standardization)
    on the --baseline features alone and on [baseline, layer]; the gain is what the layer adds beyond the baseline."""
    plain = dataclasses.replace(training, control=False, mdl=False, repeats=1)
    design = design_for(samples, descriptions, labels, plain)
    baseline = first_repeat_score(samples.baseline, next(fit_items(samples.baseline[None], design, plain)), design)
    joint_features = [np.concatenate([item_features, samples.baseline], axis=1) for item_features in features]
    conditional = []
    for item_features, joint in zip(joint_features, fit_items(joint_features, design, plain)):
        both = first_repeat_score(item_features, joint, design)
        conditional.append(
            Conditional(
                spec=spec,
                accuracy=baseline.accuracy,
                information_bits=baseline.information_bits,
                joint_accuracy=both.accuracy,
                joint_information_bits=both.information_bits,
                gain_accuracy=both.accuracy - baseline.accuracy,
                gain_bits=both.information_bits - baseline.information_bits,
            )
        )
    return conditional


class LabelScore(NamedTuple):
    """One labeling's held-out numbers over the compared samples (see LabelComparison)."""

    accuracy: float
    accuracy_interval: tuple[float, float]
    balanced_accuracy: float
    information_bits: float


def label_score(features: np.ndarray, fitted: ProbeFit, design: Design, compared: np.ndarray, units: int) -> LabelScore:
    """The first repeat's held-out accuracy, balanced accuracy and information over the `compared` samples."""
    scores = scores_of(
        features, fitted, design, copy_temperatures(features, fitted, design), heldout_copy(design, 0, 0)
    )
    correct, classes = scores.correct[compared], design.sample_class[compared]
    accuracy = float(correct.mean())
    balanced = float(np.mean([correct[classes == c].mean() for c in np.unique(classes)]))
    bits = float(information(scores.bits[compared].mean(), len(design.descriptions)))
    return LabelScore(accuracy, wilson_interval(accuracy, units), balanced, bits)


def label_verdict(task: LabelScore, prompt: LabelScore) -> str:
    """Which labeling the layer follows on the compared samples: the one whose accuracy interval lies above."""
    if prompt.accuracy_interval[0] > task.accuracy_interval[1]:
        return LABEL_VERDICTS[0]
    if task.accuracy_interval[0] > prompt.accuracy_interval[1]:
        return LABEL_VERDICTS[1]
    return LABEL_VERDICTS[2]


def label_comparisons(
    features: ItemFeatures,
    samples: Samples,
    descriptions: dict[int, str],
    labels: LabelConfig,
    training: TrainingConfig,
) -> list[LabelComparison]:
    """--labels task,prompt, per item: a probe of the task's labels and one of the prompt's, trained alike (the same
    features, folds and budget; one repeat, no control), compared on the samples whose prompt differs from their
    task's description, where the two labelings disagree."""
    plain = dataclasses.replace(training, control=False, mdl=False, repeats=1)
    own = np.array([descriptions[task] for task in samples.task_id.tolist()], dtype=object)
    compared = samples.prompt != own
    units = len(set(zip(samples.task_id[compared].tolist(), samples.episode[compared].tolist())))
    scored = {}
    for name in ("task", "prompt"):
        design = design_for(samples, descriptions, dataclasses.replace(labels, label_by=name), plain)
        scored[name] = [
            label_score(one, fitted, design, compared, units)
            for one, fitted in zip(features, fit_items(features, design, plain))
        ]
    comparisons = []
    for task, prompt in zip(scored["task"], scored["prompt"]):
        comparisons.append(
            LabelComparison(
                samples=int(compared.sum()),
                prompt_minus_task_bits=prompt.information_bits - task.information_bits,
                verdict=label_verdict(task, prompt),
                **{f"task_{key}": value for key, value in task._asdict().items()},
                **{f"prompt_{key}": value for key, value in prompt._asdict().items()},
            )
        )
    return comparisons


def concept_bits(logits: np.ndarray, value: np.ndarray, present: np.ndarray, temperature, share) -> np.ndarray:
    """-log2 p(value) under softmax(logits / temperature) over the values the copy fitted, mixed with the uniform code
    over all the concept's values (see uniform_share): a value it never saw costs log2(values / share) bits."""
    temperature = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (len(value),))
    return code_bits(logits / temperature[:, None], value, np.broadcast_to(share, (len(value),)), present)


@dataclasses.dataclass(frozen=True)
class ConceptScore:
    """Held-out numbers of one concept's probes; see CONCEPT_DEFINITION."""

    balanced_accuracy: float = reported()  # mean over values of each value's accuracy
    accuracy: float = reported()
    majority_accuracy: float = reported()  # always answering the fold's most frequent training value
    information_bits: float = reported()  # cross-entropy of the training side's value frequencies minus the probe's
    tasks_with: int = reported()
    tasks_without: int = reported()
    values: list[str]
    folds_missing_values: list[int]  # folds whose held-out side has a value their training side lacks
    failed_probes: list[int]  # folds whose probe never improved on validation


def concept_metrics(
    features: np.ndarray, fitted: ProbeFit, design: Design, c: int, task_id: np.ndarray, temperatures: np.ndarray
) -> ConceptScore:
    """Held-out numbers of one concept, from its fold probes (each copy's softmax temperature given)."""
    concept, copies, fold = design.concepts[c], design.copies, design.fold[0]
    members = copies.fold_copies(0, 0, concept=c)
    logits = copy_predictions(features, fitted, members[fold])[:, : len(concept.values)].astype(np.float64)
    value = concept.value_of_class[design.sample_class]
    side = copies.train[members] | copies.validation[members]  # (folds, n) training side of each fold
    counts = np.stack([np.bincount(value[s], minlength=len(concept.values)) for s in side])  # (folds, V)
    present = np.stack([concept_values(design, m)[1] for m in members])
    shares = uniform_share(copies.validation_units[members])
    bits = concept_bits(logits, value, present[fold], temperatures[members][fold], shares[fold])
    prior = (counts[fold] + 1) / (counts[fold].sum(axis=1, keepdims=True) + len(concept.values))
    prior_bits = -np.log2(prior[np.arange(len(value)), value])
    predicted = np.where(
        np.isfinite(logits).all(axis=1), np.argmax(np.where(present[fold], logits, -np.inf), axis=1), -1
    )
    correct = predicted == value
    held_values = [set(value[fold == f]) - set(value[side[f]]) for f in range(design.folds)]
    absent = [
        concept.values[v] in ("without", NO_VALUE) for v in {int(t): int(v) for t, v in zip(task_id, value)}.values()
    ]
    return ConceptScore(
        balanced_accuracy=float(np.mean([correct[value == v].mean() for v in np.unique(value)])),
        accuracy=float(correct.mean()),
        majority_accuracy=float(np.mean(value == counts.argmax(axis=1)[fold])),
        information_bits=float(np.mean(prior_bits - bits)),
        tasks_with=absent.count(False),
        tasks_without=absent.count(True),
        values=concept.values,
        folds_missing_values=[f for f, missing in enumerate(held_values) if missing],
        failed_probes=[int(copies.fold[m]) for m in members if fitted.failed[m]],
    )


@dataclasses.dataclass(frozen=True)
class ConceptsHeldOut:
    """Every concept's held-out numbers for one item: what evaluate_concepts returns."""

    concepts: dict[str, ConceptScore]
    mean_balanced_accuracy: float
    num_concepts: int
    num_samples: int
    num_tasks: int
    num_episodes: int
    num_folds: int


def evaluate_concepts(samples: Samples, fitted: ProbeFit, design: Design) -> ConceptsHeldOut:
    """Every concept's held-out numbers for one item."""
    features = samples.features[0]
    temperatures = copy_temperatures(features, fitted, design)
    concepts = {
        concept.name: concept_metrics(features, fitted, design, c, samples.task_id, temperatures)
        for c, concept in enumerate(design.concepts)
    }
    return ConceptsHeldOut(
        concepts=concepts,
        mean_balanced_accuracy=float(np.mean([one.balanced_accuracy for one in concepts.values()])),
        num_concepts=len(concepts),
        num_samples=len(design.sample_class),
        num_tasks=len(design.task_ids),
        num_episodes=len(set(zip(samples.task_id.tolist(), samples.episode.tolist()))),
        num_folds=design.folds,
    )


class Probed(NamedTuple):
    """One item's fitted probes and what they show on the samples each never saw."""

    held_out: HeldOut | ConceptsHeldOut
    predictions: Predictions | None  # None for concept probes
    design: Design
    fitted: ProbeFit


def probe_group(
    members: list[Samples],
    design: Design,
    descriptions: dict[int, str],
    labels: LabelConfig,
    training: TrainingConfig,
    baseline_spec: str = "",
) -> Iterator[Probed]:
    """Fit the probes of items that share their samples (one Samples each, its features the item's) in one program,
    then evaluate each item; with a baseline in the samples, conditional probing too."""
    features = [samples.features[0] for samples in members]  # views where possible: no stacked copy
    fitted = fit_items(features, design, training)  # ridge fits an item when it is evaluated
    conditional = None
    if members[0].baseline is not None and design.concepts is None:
        conditional = conditional_metrics(features, members[0], descriptions, labels, training, baseline_spec)
    compared = None
    if labels.label_by == "task,prompt" and design.concepts is None:
        compared = label_comparisons(features, members[0], descriptions, labels, training)
    for position, samples in enumerate(members):
        fit = next(fitted)
        if design.concepts is not None:
            yield Probed(evaluate_concepts(samples, fit, design), None, design, fit)
            continue
        baseline = conditional[position] if conditional else None
        held_out, predictions = evaluate_item(samples, fit, design, labels, training, baseline)
        if compared:
            held_out = dataclasses.replace(held_out, labels=compared[position])
        yield Probed(held_out, predictions, design, fit)


def probe_features(
    features: np.ndarray,
    episode: Sequence[int],
    description: Sequence[str],
    labels: LabelConfig = LabelConfig(),
    training: TrainingConfig = TrainingConfig(),
    task: Sequence[int] | None = None,
) -> HeldOut | ConceptsHeldOut:
    """The pipeline on pooled features already in memory, from any collector or model: features (samples, width),
    each sample's episode within its task and its task's description; `task`, each sample's task id (default: tasks
    numbered by description, in the order they first appear). The command line runs the same probe_group."""
    check_configs(labels, training)
    if training.generalize:
        raise OptionError("probe_features: generalize applies to a command-line sweep over several steps")
    features, episode, description = np.asarray(features), np.asarray(episode), list(description)
    if task is None:
        first_seen = {text: number for number, text in enumerate(dict.fromkeys(description))}
        task = [first_seen[text] for text in description]
    task = np.asarray(task)
    if len(task) != len(description):
        raise ProbeError(f"probe_features: {len(task)} task ids for {len(description)} samples")
    if features.ndim != 2 or 0 in features.shape or not len(features) == len(episode) == len(description):
        raise ProbeError(
            f"probe_features: features must be (samples, width) with one episode and description per sample; got "
            f"features {features.shape}, {len(episode)} episodes, {len(description)} descriptions"
        )
    for name, ids in (("episode", episode), ("task", task)):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ProbeError(f"probe_features: {name} must be one integer per sample, got {ids.dtype} {ids.shape}")
    if not np.isfinite(features).all():
        raise ProbeError("probe_features: features hold non-finite values")
    descriptions = {}
    for one_task, text in zip(task.tolist(), description):
        if descriptions.setdefault(one_task, text) != text:
            raise ProbeError(
                f"probe_features: task {one_task} has two descriptions ({descriptions[one_task]!r}, {text!r})"
            )
    count = len(episode)
    samples = Samples(
        features.astype(np.float32)[None],
        task.astype(np.int64),
        episode.astype(np.int64),
        np.zeros(count, dtype=np.int64),
        np.full(count, np.nan),
        np.zeros(count, dtype=np.int64),
    )
    design = make_design(samples, descriptions, labels, training)
    held_out = next(probe_group([samples], design, descriptions, labels, training)).held_out
    if isinstance(held_out, HeldOut):
        warn_about_failures(held_out.failures, "probe_features")
    return held_out


def warn_about_failures(failures: Failures, stem: str) -> None:
    """One warning per kind of copy (probe, null, mdl) that has probes which never improved on validation."""
    for role, count in failures.failed_copies.items():
        if count:
            log.warning(
                "%s: %d %s probe(s) never improved on validation (a non-finite loss); their samples count as wrong%s",
                stem,
                count,
                role,
                "; no permutation p-value" if role == "null" else "",
            )


# -----------------------------------------------------------------------------
# Output: the results record, what made it, the summary, atomic writes (results_record, format_summary,
# write_results)
# -----------------------------------------------------------------------------

# Results files of earlier formats lack what the report reads, or mean something else by it. 4: unseen tasks scored by
# their whole embeddings, the code's uniform share by units, selectivity against the null's mean: a format-3 file
# under --split task would mix those definitions into one report and one family-wise correction.
RESULTS_FORMAT = 4


# The parts whose fields results['metrics'] holds side by side; repeats, the null, MDL and the baseline are nested.
FLAT_PARTS = ("retrieval", "information", "cosines", "counts", "failures", "control")
REPORTED_PARTS = {  # sweep.csv's metric columns, in this order (see `reported`)
    "retrieval": Retrieval,
    "information": Information,
    "control": Control,
    "cosines": Cosines,
    "counts": Counts,
    "baseline": Conditional,
    "labels": LabelComparison,
}


def record_fields(part) -> dict:
    """A record's fields by name, values as they are (dataclasses.asdict would copy every array)."""
    return {field.name: getattr(part, field.name) for field in dataclasses.fields(part)}


def metrics_record(held_out: HeldOut) -> dict:
    """results['metrics']: the layout of the record in a results file (read back by held_out_from)."""
    metrics = {}
    for name in FLAT_PARTS:
        part = getattr(held_out, name)
        if part is not None:
            metrics |= record_fields(part)
    metrics["repeats"] = held_out.repeats._asdict()
    if held_out.control is not None:
        metrics["permutation_null"] = held_out.control.permutation_null._asdict()
        if held_out.control.permutation_p_value is None:
            del metrics["permutation_p_value"]
    if held_out.mdl is not None:
        control = {} if held_out.mdl_control is None else {"control": held_out.mdl_control._asdict()}
        metrics["mdl"] = {**held_out.mdl._asdict(), **control}
    metrics["confidence_intervals"] = held_out.intervals
    if held_out.baseline is not None:
        metrics["baseline"] = record_fields(held_out.baseline)
    if held_out.labels is not None:
        metrics["labels"] = labels_record(held_out.labels)
    return metrics


def labels_record(comparison: LabelComparison) -> dict:
    """results['metrics']['labels']: {'task': {...}, 'prompt': {...}} (LABEL_SCORES each), the samples compared, the
    difference in bits and the verdict."""
    record = {name: {key: getattr(comparison, f"{name}_{key}") for key in LABEL_SCORES} for name in ("task", "prompt")}
    shared = ("samples", "prompt_minus_task_bits", "verdict")
    return {**record, **{name: getattr(comparison, name) for name in shared}}


def comparison_from(record: dict) -> LabelComparison:
    """The LabelComparison a results file's metrics['labels'] was written from."""
    scores = {f"{name}_{key}": record[name][key] for name in ("task", "prompt") for key in LABEL_SCORES}
    return LabelComparison(
        samples=record["samples"],
        prompt_minus_task_bits=record["prompt_minus_task_bits"],
        verdict=record["verdict"],
        **scores,
    )


def held_out_from(metrics: dict) -> HeldOut:
    """The record a results file's metrics were written from (see metrics_record)."""

    def part(kind, values: dict):  # a missing field is an error (KeyError), but for the p-value, absent as None
        return kind(**{field.name: values[field.name] for field in dataclasses.fields(kind) if field.name in values})

    control, mdl, baseline = None, metrics.get("mdl"), metrics.get("baseline")
    if "control_accuracy" in metrics:
        null = AccuracyAndBits(**metrics["permutation_null"])
        control = dataclasses.replace(part(Control, metrics), permutation_null=null)
    return HeldOut(
        counts=part(Counts, metrics),
        retrieval=part(Retrieval, metrics),
        information=part(Information, metrics),
        cosines=part(Cosines, metrics),
        repeats=AccuracyAndBits(**metrics["repeats"]),
        failures=part(Failures, metrics),
        intervals=metrics["confidence_intervals"],
        control=control,
        mdl=None if mdl is None else Codelength(*(mdl[name] for name in Codelength._fields)),
        mdl_control=None if mdl is None or "control" not in mdl else Codelength(**mdl["control"]),
        baseline=None if baseline is None else part(Conditional, baseline),
        labels=comparison_from(metrics["labels"]) if "labels" in metrics else None,
    )


def concepts_held_out_from(results: dict) -> ConceptsHeldOut:
    """The record a concept run's results file was written from (see concept_results_record)."""
    concepts = {name: ConceptScore(**one) for name, one in results["concepts"].items()}
    return ConceptsHeldOut(concepts=concepts, **results["metrics"])


class ResultConfig(NamedTuple):
    """A results file's configuration, typed again."""

    source: Source
    item: Item
    labels: LabelConfig
    training: TrainingConfig


def result_config(config: dict) -> ResultConfig:
    """The configs a results file's config records (see results_record)."""
    data = config["data"]
    return ResultConfig(  # a field a file lacks (written before the option existed) has its default
        Source(**{field.name: data[field.name] for field in dataclasses.fields(Source) if field.name in data}),
        Item(**{name: data[name] for name in Item._fields}),
        LabelConfig(**config["labels"]),
        TrainingConfig(**config["training"]),
    )


INFORMATION_DEFINITION = (
    "p(task | features) = softmax over the analyzed tasks' embeddings of cosine / temperature, the temperature fitted "
    "on each probe's own validation samples; information_bits = log2(classes) - held-out cross-entropy in bits "
    "(negative: "
    "worse than knowing nothing)"
)
CONCEPT_DEFINITION = (
    "one softmax (logistic) probe per concept on the same features; accuracy = share of held-out samples whose most "
    "probable value is their task's; balanced = mean over values; information_bits = cross-entropy of the training "
    "side's value frequencies minus the probe's (softmax temperature fitted on validation samples), per sample"
)


def describe_control(training: TrainingConfig) -> str:
    """What the permuted assignments test, in words, for this split."""
    if training.null_size == 0:
        return "off"
    what = (
        f"{training.null_size} seeded derangement(s) of the task -> embedding assignment, each trained and evaluated "
        "exactly like the probe (same folds, budget and program)"
    )
    if training.split == "task":
        return (
            f"{what}; on held-out tasks an assignment without language structure cannot transfer: a null for the probe"
        )
    return (
        f"{what}; with held-out episodes of seen tasks this measures how learnable an arbitrary assignment is, "
        "high whenever the layer separates the tasks, whatever its geometry: not evidence for or against language"
    )


def describe_intervals(training: TrainingConfig) -> str:
    """How the 95% intervals were made, in words."""
    if training.bootstrap == 0:
        return "none (--bootstrap 0)"
    unit = "whole tasks" if training.split == "task" else "whole episodes within their task"
    text = (
        f"BCa bootstrap ({training.bootstrap} resamples of {unit}); Wilson score interval over the units when all agree"
    )
    if training.repeats > 1:
        text += f"; accuracy and information widened by the spread over {training.repeats} repeats"
    return text


def describe_split(training: TrainingConfig, folds: int) -> str:
    """How samples were held out, in words."""
    unit = (
        "whole tasks, never seen in training"
        if training.split == "task"
        else "whole episodes, every task on every training side"
    )
    if training.probe == "ridge":
        return (
            f"{folds}-fold cross-validation over {unit}; ridge penalty chosen by inner cross-validation on each fold's "
            "training samples; its validation samples calibrate the softmax"
        )
    kind = "tasks" if training.split == "task" else "episodes"
    share = f"{training.validation_fraction:g}"
    return f"{folds}-fold cross-validation over {unit}; early stopping on {share} of each fold's training {kind}"


def describe_label_space(labels: LabelConfig) -> str:
    """What the probe's targets are, in words."""
    text = "T5 mean over real tokens" + (
        ", minus the mean training-task embedding" if labels.center_labels else " (raw)"
    )
    if labels.label_dim:
        return text + f", projected on the training tasks' top {labels.label_dim} principal directions"
    if labels.label_space == "span":
        return (
            text
            + "; the probe predicts coordinates in the span of the training tasks' embeddings, mapped back to T5's axes"
        )
    return text + "; the probe predicts all of T5's axes (--label_space full)"


def describe_token_positions(source: Source) -> str:
    """Human-readable token positions pooled for the expert."""
    if source.token_range is not None:
        where = f"tokens {source.token_range[0]}-{source.token_range[1] - 1} (--token_range)"
    elif source.expert in EXPERT_TOKENS:
        where = prefix_tokens_text(source.expert)
    elif source.expert == "action":
        where = f"action-expert tokens (positions {PREFIX_TOKEN_COUNT}+ when the entry holds the whole sequence)"
    else:
        where = f"SigLIP patches of camera {source.camera} (vision_latents)"
    if source.tokens == "prompt":
        where += ", less the prompt's padding (--tokens prompt: found from the layer-0 embeddings)"
    return f"{where}, {source.pooling}-pooled"


@functools.cache  # read once per run: 18 metadata reads per layer sweep were 0.2 s
def installed_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (read from metadata: imports nothing)."""
    versions = {"python": platform.python_version()}
    for name in ("numpy", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "sentencepiece", "ml_dtypes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class ItemContext(NamedTuple):
    """What the sweep knows of one item beyond its samples and probes, for its results file."""

    nonfinite: list[tuple]  # (task, episode, step, denoising time) of each sample skipped as non-finite
    made_with: MadeWith
    command: list[str]  # the run's command line
    wall_time_seconds: float  # the run's so far
    without_baseline: list[tuple] | None = None  # --baseline: (task, episode, step) lacking its entry


def config_head(context: ItemContext, dataset: Dataset, item: Item, labels: LabelConfig, training: dict) -> dict:
    """The start of a results file's config: first, so that its first DIGEST_BYTES hold the fingerprint (see
    stated_fingerprint)."""
    return {
        "fingerprint": context.made_with.fingerprint(),
        "made_with": dataclasses.asdict(context.made_with),
        "data": {**dataclasses.asdict(dataset.source), **item._asdict()},
        "labels": dataclasses.asdict(labels),
        "training": training,
    }


def samples_record(samples: Samples, design: Design) -> dict:
    """Who each sample is and the fold that held it out (the first repeat's)."""
    return {
        "task_id": samples.task_id,
        "episode": samples.episode,
        "step": samples.step,
        "inference_time": samples.inference_time,
        "fold": design.fold[0],
    }


def data_report_record(dataset: Dataset, item: Item, context: ItemContext) -> dict:
    """What was missing, skipped or unreadable for this item's rollout step."""
    report = dataset.report
    return {
        "files": report.files,
        "missing_tasks": report.missing_tasks,
        "missing_episodes": report.missing_episodes,
        "episodes_without_step": report.episodes_without_step.get(item.rollout_step, []),
        "skipped_files": report.skipped_at(item.rollout_step),
        "nonfinite_samples": context.nonfinite,
    }


def concept_results_record(
    probed: Probed,
    samples: Samples,
    dataset: Dataset,
    item: Item,
    labels: LabelConfig,
    training: TrainingConfig,
    context: ItemContext,
) -> dict:
    """The results file of a concept run: its one layout (see results_record for the T5 target's)."""
    held_out, _, design, fitted = probed
    training_record = {**dataclasses.asdict(training), "loss": "softmax"}
    numbers = record_fields(held_out)
    return {
        "format_version": RESULTS_FORMAT,
        "target": "concepts",
        "config": {
            **config_head(context, dataset, item, labels, training_record),
            "split": describe_split(training, design.folds),
            "token_positions": describe_token_positions(dataset.source),
            "concept_definition": CONCEPT_DEFINITION,
        },
        "concepts": {name: record_fields(one) for name, one in numbers.pop("concepts").items()},
        "metrics": numbers,
        "tasks": {
            "task_ids": np.array(design.task_ids),
            "descriptions": [dataset.descriptions[t] for t in design.task_ids],
        },
        "samples": samples_record(samples, design),
        "history": {key: fitted.history[key] for key in ("epochs_run", "best_epoch", "batch_size", "steps_per_epoch")},
        "probe": {key: value for key, value in fitted._asdict().items() if key != "history"},
        "copies": {"concept": design.copies.concept, "fold": design.copies.fold},
        "data_report": data_report_record(dataset, item, context),
        "versions": dict(installed_versions()),
        "wall_time_seconds": context.wall_time_seconds,
        "command": context.command,
    }


def class_of_tasks(design: Design, descriptions_of_tasks: list[str]) -> np.ndarray:
    """Each task's class: its description's (-1 under --labels prompt when no sample ran under its description)."""
    position = {text: number for number, text in enumerate(design.descriptions)}
    return np.array([position.get(text, -1) for text in descriptions_of_tasks], dtype=np.int64)


def prompt_lengths(samples: Samples) -> dict[int, dict[int, int]] | None:
    """--tokens prompt: the prompt lengths found (text positions before the padding), per task: length -> samples."""
    if samples.prompt_length is None:
        return None
    found = {}
    for task, length in zip(samples.task_id.tolist(), samples.prompt_length.tolist()):
        counts = found.setdefault(task, {})
        counts[length] = counts.get(length, 0) + 1
    return {task: dict(sorted(counts.items())) for task, counts in sorted(found.items())}


def results_record(
    probed: Probed,
    samples: Samples,
    dataset: Dataset,
    item: Item,
    labels: LabelConfig,
    training: TrainingConfig,
    context: ItemContext,
) -> dict:
    """The results file's contents: the one place its layout is defined (builtins and numpy only); a concept run's
    is concept_results_record's. One literal, longer than a screen on purpose: it reads as the file holds it."""
    if probed.design.concepts is not None:
        return concept_results_record(probed, samples, dataset, item, labels, training, context)
    held_out, predictions, design, fitted = probed
    copies, report, first = design.copies, dataset.report, predictions.first
    descriptions_of_tasks = [dataset.descriptions[t] for t in design.task_ids]
    probe_folds, kept = copies.fold_copies(0, 0), copies.kept()
    kernel, bias, feature_mean, feature_std = fitted.weights(kept)
    full_space = labels.label_space == "full" and not labels.label_dim  # T5's own axes: no basis to store
    return {
        "format_version": RESULTS_FORMAT,
        "config": {
            **config_head(
                context,
                dataset,
                item,
                labels,
                {**dataclasses.asdict(training), "permutations": training.null_size},
            ),
            "first_repeat_only": "heldout, probe, samples.fold and samples.validation hold the first repeat's",
            "split": describe_split(training, design.folds),
            "token_positions": describe_token_positions(dataset.source),
            "label_space": describe_label_space(labels),
            "accuracy_definition": "a held-out prediction's nearest (cosine) analyzed-task embedding is its own task's",
            "information_definition": INFORMATION_DEFINITION,
            "control_task": describe_control(training),
            "interval_definition": describe_intervals(training),
            "permuted_assignments": design.assignments[1:],  # row p-1: the class whose embedding class j's samples get
            "contrastive_temperature": CONTRASTIVE_TEMPERATURE,
        },
        "metrics": metrics_record(held_out),
        "tasks": {
            "task_ids": np.array(design.task_ids),
            "descriptions": descriptions_of_tasks,
            "class_of_task": class_of_tasks(design, descriptions_of_tasks),
            "class_descriptions": design.descriptions,
            "class_samples": np.bincount(design.sample_class, minlength=len(design.descriptions)),
            "t5_embeddings": design.raw,
            "label_mean": copies.label_mean[probe_folds],  # per fold; subtracted when centering
            "label_basis": None if full_space else copies.label_basis[probe_folds],  # per fold; None: T5's own axes
        },
        "samples": {
            **samples_record(samples, design),
            "repeat_folds": design.fold,  # (repeats, samples)
            "validation": copies.validation[probe_folds],  # (folds, samples): early-stopping samples
            "mdl_block": design.mdl_block,
            "prompt": None if samples.prompt is None else samples.prompt.tolist(),  # step['prompt'] (None: none)
            "prompt_length": samples.prompt_length,  # --tokens prompt: text positions kept (None: all 48)
        },
        "heldout": {  # the first repeat's
            "prediction": predictions.raw_prediction.astype(np.float32),  # in raw T5 space, as the raw cosine scores it
            "target": design.raw[design.sample_class],  # the own task's T5 embedding
            "prediction_label_space": first.prediction,
            "target_label_space": design.copies.classes[first.copy, design.sample_class],
            "true_class": design.sample_class,
            "predicted_class": first.predicted,
            "rank": first.rank,
            "cosine": first.cosine,
            "log_loss_bits": first.bits,
            "similarity": first.similarity,  # (samples, classes): cosine of each prediction to each class's target
            "control_predicted_class": predictions.control_predicted,
        },
        "history": fitted.history,
        "probe": {  # the first repeat's fold probes, then the control's: Dense kernel and bias on standardized features
            "kernel": kernel,
            "bias": bias,
            "feature_mean": feature_mean,
            "feature_std": feature_std,
            "copy": kept,
        },
        "copies": {  # every probe trained: who it is, whether it failed, its softmax temperature
            "repeat": copies.repeat,
            "assignment": copies.assignment,
            "fold": copies.fold,
            "block": copies.block,
            "failed": fitted.failed,
            "temperature": predictions.temperatures,
        },
        "data_report": {
            **data_report_record(dataset, item, context),
            "steps_seen": sorted(report.steps_seen),
            **({} if held_out.baseline is None else {"steps_without_baseline": context.without_baseline}),
            "prompt_differs": prompts_differing(samples, dataset.descriptions),  # prompt other than the description
            "prompt_lengths": prompt_lengths(samples),  # --tokens prompt: task -> {text positions kept: samples}
        },
        "versions": dict(installed_versions()),
        "wall_time_seconds": context.wall_time_seconds,
        "command": context.command,
    }


# Options that cannot change a number: where the data and caches live and whether a bad file stops the run; and the
# model and the concepts file, which MadeWith records by what they hold.
NOT_RESULT_OPTIONS = ("data_path", "strict", "index_dir", "cache_dir", "concepts_file", "t5_model")
MADE_WITH_PARTS = ("options", "data", "program")


def digest(data: bytes) -> str:
    """16 hex digits of the SHA-256 of some bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def file_identity(path: Path) -> str:
    """A data file as a result records it: name, size, modification time (to the second: copies may keep no finer) and
    the digest of both ends (see content_digest); or why it cannot be read."""
    try:
        with open_regular(path) as file:
            status = os.fstat(file.fileno())
            modified = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.st_mtime))
            return f"{path.name}: {status.st_size} bytes, modified {modified}, ends sha256 {content_digest(file)[:16]}"
    except BadFileError as error:
        return f"{path.name}: {str(error).removeprefix(f'{path}: ')}"
    except OSError as error:  # an I/O error: reading it for the run says so again, and skips it
        return f"{path.name}: cannot read it ({error.strerror})"


@dataclasses.dataclass(frozen=True)
class MadeWith:
    """What a result is made with, in three parts that a rerun treats differently (see left_to_run). Each part maps a
    name to a value as JSON holds it; the results file stores all three (config['made_with'])."""

    # Every option that can change a number, with the item's layer and steps; the model by its name (a hub name or a
    # local directory's), the concepts file by its contents. Results of other options are replaced only with
    # --overwrite: file names do not hold every option.
    options: dict
    # The task files and the model's files as they are now: name, size, modification time and a digest of both ends.
    # A copy elsewhere that keeps the times (cp -p, rsync -a) is the same. Results of other data are made again.
    data: dict
    # This program's own digest and the packages' versions: results of another version are kept, with a warning.
    program: dict

    def of_item(self, item: Item) -> MadeWith:
        """The record of one result: the run's, with the item's layer, rollout step and denoising step."""
        return dataclasses.replace(self, options={**self.options, **item._asdict()})

    def fingerprint(self) -> str:
        """A short digest of each part, "options-data-program": two results with one fingerprint were made alike."""
        return "-".join(digest(json.dumps(getattr(self, part), sort_keys=True).encode()) for part in MADE_WITH_PARTS)


def run_made_with(source: Source, labels: LabelConfig, training: TrainingConfig) -> MadeWith:
    """What every result of this run is made with, bar its own layer and steps."""
    every = {**dataclasses.asdict(source), **dataclasses.asdict(labels), **dataclasses.asdict(training)}
    options = {name: value for name, value in every.items() if name not in NOT_RESULT_OPTIONS}
    model = Path(labels.t5_model)
    options.update(
        results_format=RESULTS_FORMAT,
        permutations=training.null_size,
        t5_model=model.name if model.is_dir() else labels.t5_model,
        concepts=labels.concepts_file and digest(concepts_text(labels.concepts_file).encode()),
    )
    paths, _ = find_task_files(Path(source.data_path), source.task_range)
    data = {f"task_file_{task}": file_identity(path) for task, path in paths.items()}
    data["t5_model"] = model_identity(labels.t5_model)
    program = {"linear_probing_inference.py": digest(Path(__file__).read_bytes()), **installed_versions()}
    return MadeWith(*(json.loads(json.dumps(part)) for part in (options, data, program)))  # as a results file holds it


MADE_WITH_LINE = "Made With: fingerprint {} (options-data-program: config['made_with'] in the results file)"
STATED_FINGERPRINT = re.compile(r"Made With: fingerprint ([0-9a-f]{16}-[0-9a-f]{16}-[0-9a-f]{16}) .*")


def is_concept_result(results: dict) -> bool:
    """Whether a results file is a concept run's (concept_results_record) or a T5 target's (results_record)."""
    return results["config"]["labels"]["target"] == "concepts"


def with_interval(held_out: HeldOut, name: str, value: float, digits: int = 4) -> str:
    """A metric with its 95% interval, when there is one; an undefined interval says why instead of looking certain."""
    text = f"{value:.{digits}f}"
    interval = held_out.intervals.get(name)
    if not interval:
        return text
    if math.isnan(interval[0]):
        return f"{text} [95% CI n/a: resampling the units cannot vary it]"
    return f"{text} [95% CI {interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def item_lines(setup: ResultConfig) -> list[str]:
    """What was probed, in the guide's words."""
    return [
        f"Expert: {setup.source.expert}",
        f"Layer: {setup.item.layer}",
        f"Rollout Step: {setup.item.rollout_step}",
        f"Feature Type: {setup.source.feature_type}",
    ]


def guide_block(results: dict, setup: ResultConfig, held_out: HeldOut) -> list[str]:
    """The guide's block, its cosine now the probe's own (label space); the raw T5 one follows with its definition."""
    tasks = results["tasks"]
    return [
        "Linear Probing Results",
        "=====================",
        "",
        *item_lines(setup),
        "",
        f"Accuracy: {held_out.retrieval.accuracy:.4f}",
        f"Cosine Similarity: {held_out.cosines.cosine_similarity_label_space:.4f} (probe's label space; raw T5 below)",
        f"Number of Samples: {held_out.counts.num_samples}",
        f"Number of Tasks: {held_out.counts.num_tasks}",
        "",
        "Task Descriptions:",
        *(f"  {t}: {d}" for t, d in zip(tasks["task_ids"], tasks["descriptions"])),
    ]


def failure_lines(failures: Failures) -> list[str]:
    """Probes that never improved on validation, named: their samples count as wrong."""
    lines = []
    if failures.failed_probes:
        folds = ", ".join(f"repeat {r} fold {f}" for r, f in failures.failed_probes)
        lines.append(
            f"FAILED PROBES ({folds}): never improved on validation (non-finite loss); their samples count as wrong"
        )
    for role in ("null", "mdl"):
        if failures.failed_copies[role]:
            lines.append(f"FAILED {role.upper()} PROBES: {failures.failed_copies[role]} never improved on validation")
    return lines


RAW_PREDICTION = {  # how a prediction is placed in raw T5 space, by whether the labels were centered
    True: "reconstructed as label mean + unit(prediction) x mean target norm",
    False: "the prediction mapped back through the label basis",
}


# Under --split episode every task is on every training side: a permuted assignment is as learnable as the true one
# wherever the layer separates the tasks, so the control and the null say nothing about language there.
EPISODE_SPLIT_CONTROL = "not whether the layer is language-shaped: that question is answered by --split task"


def class_noun(labels: LabelConfig) -> str:
    """What a class is, in a summary's words: a task, or under --labels prompt the prompt a step ran under."""
    return "prompt class" if labels.label_by == "prompt" else "task"


def control_lines(held_out: HeldOut, setup: ResultConfig) -> list[str]:
    """The control and the permutation null, read as what they are under this split."""
    control, training = held_out.control, setup.training
    if control is None:
        return ["Control Task: off (--no_control)"]
    observed = "accuracy" if held_out.counts.num_repeats == 1 else "the first repeat's accuracy"
    count = len(control.permutation_null.accuracy)
    against = "control" if count == 1 else f"the {count} permuted assignments' mean accuracy"
    lines = [
        f"Control ({class_noun(setup.labels)} -> embedding assignment permuted): accuracy "
        f"{with_interval(held_out, 'control_accuracy', control.control_accuracy)}, information "
        f"{control.control_information_bits:.3f} bits; selectivity ({observed} - {against}) "
        f"{with_interval(held_out, 'selectivity', control.selectivity)}"
    ]
    if training.split == "episode":
        lines.append(
            "  With held-out episodes of seen tasks the control shows how learnable an arbitrary assignment is "
            f"(high whenever the layer separates the tasks), {EPISODE_SPLIT_CONTROL}"
        )
    if control.permutation_p_value is not None:
        if math.isnan(control.permutation_p_value):
            test = f"no p-value: {held_out.failures.failed_copies['null']} null probe(s) failed"
        else:
            test = (
                f"p = {control.permutation_p_value:.4f} (1 + #null >= observed) / (1 + N), the first repeat's "
                f"accuracy as observed; it cannot go below 1 / (1 + N) = {1 / (1 + count):.4f}"
            )
        informed = len(control.permutation_null.information_bits)
        over = "" if informed == count else f" (over the first {informed}: calibrating each costs 50 retrievals)"
        lines.append(
            f"Permutation Null ({count} permuted assignments, trained like the probe): mean accuracy "
            f"{control.permutation_null_mean_accuracy:.4f}, mean information "
            f"{control.permutation_null_mean_information_bits:.3f} bits{over}; {test}"
        )
        if training.split == "episode":
            lines.append(
                "  With held-out episodes this tests whether the true assignment is more learnable than arbitrary "
                f"ones, {EPISODE_SPLIT_CONTROL}"
            )
    return lines


def mdl_text(mdl: Codelength) -> str:
    """An online codelength, in words."""
    return f"{mdl.online_bits:.1f} bits vs uniform {mdl.uniform_bits:.1f} (compression {mdl.compression:.2f})"


def evidence_lines(results: dict, setup: ResultConfig, held_out: HeldOut) -> list[str]:
    """How well the probe does on what it never saw, each number labelled with what it measures."""
    config, counts, found, information = results["config"], held_out.counts, held_out.retrieval, held_out.information
    below_zero = " (information below 0: worse than knowing nothing)" if information.information_bits < 0 else ""
    noun = class_noun(setup.labels)
    lines = [
        "Held-out Evidence",
        "-----------------",
        f"Held out: {config['split']}; every one of the {counts.num_samples} samples "
        f"({counts.num_episodes} episodes) predicted by a probe that never saw it",
        f"Accuracy: {with_interval(held_out, 'accuracy', found.accuracy)}; per fold {found.fold_accuracy_mean:.4f} +/- "
        f"{found.fold_accuracy_std:.4f} ({counts.num_folds} folds x {counts.num_repeats} repeat(s))",
        f"Balanced Accuracy (mean of per-{noun} accuracies): {found.balanced_accuracy:.4f}; majority baseline "
        f"{found.majority_accuracy:.4f}; chance {found.chance_accuracy:.4f} (1 / {counts.num_classes})"
        + (
            " (accuracy below the majority baseline: worse than always answering the most frequent class)"
            if found.accuracy < found.majority_accuracy
            else ""
        ),
        f"Information: {with_interval(held_out, 'information_bits', information.information_bits, 3)} bits of "
        f"log2({counts.num_classes}) = {information.max_information_bits:.3f}; held-out cross-entropy "
        f"{information.cross_entropy_bits:.3f} bits{below_zero}",
    ]
    if counts.num_repeats > 1:
        repeats = held_out.repeats
        lines.append(
            f"Repeats ({counts.num_repeats} seeds of folds and initialisation): accuracy "
            f"{repeats.accuracy.mean():.4f} +/- {repeats.accuracy.std(ddof=1):.4f}, information "
            f"{repeats.information_bits.mean():.3f} +/- {repeats.information_bits.std(ddof=1):.3f} bits (sd)"
        )
    lines += control_lines(held_out, setup)
    if held_out.baseline is not None:
        base = held_out.baseline
        lines.append(
            f"Beyond --baseline {base.spec} (conditional probing): baseline alone accuracy {base.accuracy:.4f}, "
            f"{base.information_bits:.3f} bits; baseline + layer {base.joint_accuracy:.4f}, "
            f"{base.joint_information_bits:.3f} bits; the layer adds {base.gain_bits:.3f} bits "
            f"({base.gain_accuracy:+.4f} accuracy)"
        )
    if held_out.mdl is not None:
        control = "" if held_out.mdl_control is None else f"; control {mdl_text(held_out.mdl_control)}"
        lines.append(f"MDL (online code over {setup.training.split} blocks): {mdl_text(held_out.mdl)}{control}")
    cosines = held_out.cosines
    lines += [
        "Top-k Accuracy: " + ", ".join(f"top-{k} {v:.4f}" for k, v in found.top_k_accuracy.items()),
        f"Mean Reciprocal Rank: {found.mean_reciprocal_rank:.4f}",
        f"Cosine Margin (own {noun} - nearest other): {found.cosine_margin:.4f}",
        f"Training Accuracy: {found.training_accuracy:.4f}",
        f"Cosine Similarity (probe's label space: {config['label_space']}): "
        f"{with_interval(held_out, 'cosine_similarity_label_space', cosines.cosine_similarity_label_space)}",
        f"Cosine Similarity (raw T5, {RAW_PREDICTION[setup.labels.center_labels]}): "
        f"{with_interval(held_out, 'cosine_similarity', cosines.cosine_similarity)}; constant predictor (mean "
        f"embedding) {cosines.constant_predictor_cosine:.4f}; normalized (cos - constant) / (1 - constant) "
        f"{cosines.cosine_similarity_normalized:.4f}",
        f"Intervals: {config['interval_definition']}",
    ]
    if setup.source.expert == "text_only":
        lines.append("Positive control: text tokens are the prompt itself, so high accuracy is expected at every layer")
    lines += failure_lines(held_out.failures)
    by_file = " (of the prompt class, by the task file the samples came from; per class under Classes)"
    lines.append("Per-task Accuracy" + (by_file if setup.labels.label_by == "prompt" else "") + ":")
    lines += [f"  {t}: {v['accuracy']:.4f} ({v['samples']} samples)" for t, v in found.per_task_accuracy.items()]
    return lines


AXIS_NAMES = {"rollout_step": "rollout step", "inference_step": "denoising step"}  # results['generalization'] keys


def code_stability(diagonal: list[float], off_diagonal: list[float]) -> float:
    """Mean off-diagonal accuracy over the mean diagonal of a train x test matrix: 1 when a probe trained at one step
    reads every other as well as its own (one code, kept); near chance / diagonal when each step has its own code."""
    diagonal, off_diagonal = np.asarray(diagonal, dtype=float), np.asarray(off_diagonal, dtype=float)
    if not np.isfinite(off_diagonal).any() or not np.nansum(diagonal) > 0:  # no matrix, or nothing read anywhere
        return math.nan
    return float(np.nanmean(off_diagonal) / np.nanmean(diagonal))


def generalization_lines(results: dict, setup: ResultConfig) -> list[str]:
    """--generalize: this cell's probe at every step of the sweep on that axis, and its row's code stability."""
    found = results.get("generalization")
    if not found:
        return []
    lines = [
        "Generalization (this cell's probe tested at the sweep's other steps, on episodes it never saw)",
        "----------------------------------------------------------------------------------------------",
        "Folds: dealt over the episodes (tasks, under --split task) of all the sweep's rollout steps: one fold each in "
        "every cell",
    ]
    for axis, entries in found.items():
        own, texts, off_diagonal = getattr(setup.item, axis), [], []
        for key, entry in entries.items():
            where = f"{key} (t {entry['inference_time']:g})" if axis == "inference_step" else str(key)
            texts.append(f"{where} {entry['accuracy']:.4f}" + (" (own)" if key == own else ""))
            if key != own:
                off_diagonal.append(entry["accuracy"])
        stability = code_stability([entries[own]["accuracy"]], off_diagonal)
        lines.append(f"Accuracy by test {AXIS_NAMES[axis]}: {', '.join(texts)}; other steps / own {stability:.3f}")
    return [*lines, ""]


def measured_lines(results: dict, setup: ResultConfig, held_out: HeldOut) -> list[str]:
    """What was measured and how: positions, labels, probe, ranges, what was missing or skipped, the training run."""
    source, item, training = setup.source, setup.item, setup.training
    report, history = results["data_report"], results["history"]
    if source.expert != "action":
        inference = "n/a (VLM expert)"
    elif item.inference_step is None:
        inference = "all denoising entries, each its own sample"
    else:
        inference = str(item.inference_step)
    features = "standardized with each fold's training mean and std" if training.standardize else "raw"
    if training.probe == "linear":
        probe = f"linear, loss {training.loss}"
    else:
        probe = "ridge, closed form, penalty by inner cross-validation"
    without_step = report["episodes_without_step"]
    nonfinite = report["nonfinite_samples"]
    lines = [
        "What Was Measured",
        "-----------------",
        f"Token Positions: {results['config']['token_positions']}",
        f"Inference Step: {inference}",
        f"Labels: {results['config']['label_space']}; T5 model {setup.labels.t5_model}",
        f"Features: {features}",
        f"Probe: {probe}",
        f"Seed: {training.seed}; repeats {training.repeats}; bootstrap resamples: {training.bootstrap}",
        f"Task Range: {source.task_range[0]}-{source.task_range[1] - 1}; "
        f"Episode Range: {source.episode_range[0]}-{source.episode_range[1] - 1}",
        f"Missing Task Files: {id_runs(report['missing_tasks']) or 'none'}",
        f"Skipped Files: {len(report['skipped_files']) or 'none'}",
        *(f"  {reason}" for reason in report["skipped_files"].values()),
        f"Episodes Missing From Files: {len(report['missing_episodes'])}",
        f"Episodes Without step_{item.rollout_step}: {len(without_step)}"
        + (" (" + ", ".join(f"task {t} episode {e}" for t, e in without_step) + ")" if without_step else ""),
        f"Samples Skipped For Non-finite Features: {len(nonfinite)}"
        + (" (" + ", ".join(f"task {t} episode {e}" for t, e, *_ in nonfinite[:10]) + ")" if nonfinite else ""),
    ]
    if training.probe == "linear":
        epochs = history["epochs_run"][: held_out.counts.num_folds]
        lines.append(
            f"Training: Adam lr {training.learning_rate}, batch {history['batch_size']}, "
            f"{history['steps_per_epoch']} "
            f"updates/epoch, {epochs.min()}-{epochs.max()} of at most {training.num_epochs} epochs per fold "
            f"(early stopping, patience {training.patience})"
        )
    return lines


EMPTY_PROMPT = "(empty prompt)"  # how a summary names the class of an empty or masked prompt


def prompt_lines(results: dict, setup: ResultConfig, held_out: HeldOut) -> list[str]:
    """The prompts the model saw: each prompt class's accuracy (--labels prompt), how many samples ran under another
    task's prompt, and the prompt lengths --tokens prompt found."""
    report, tasks, lines = results["data_report"], results["tasks"], []
    if setup.labels.label_by == "prompt":
        lines.append("Classes (--labels prompt: the prompt each sample's step ran under):")
        for number, text in enumerate(tasks["class_descriptions"]):
            accuracy, count = held_out.retrieval.per_class_accuracy[number], tasks["class_samples"][number]
            lines.append(f"  {number}: {text or EMPTY_PROMPT} (accuracy {accuracy:.4f}, {count} samples)")
    differs = report.get("prompt_differs", 0)
    if differs or setup.labels.label_by == "prompt":
        labelled = "labelled by the prompt" if setup.labels.label_by == "prompt" else "labelled by the task"
        lines.append(
            f"Prompt Differs From Task Description: {differs} of {held_out.counts.num_samples} samples ({labelled})"
        )
    if report.get("prompt_lengths"):
        found = "; ".join(
            f"task {task}: " + ", ".join(f"{length} ({count})" for length, count in lengths.items())
            for task, lengths in report["prompt_lengths"].items()
        )
        lines.append(f"Prompt Lengths Found (text tokens kept, with their samples): {found}")
    if held_out.labels is not None:
        lines += comparison_lines(held_out.labels)
    return lines


def comparison_lines(comparison: LabelComparison) -> list[str]:
    """--labels task,prompt in the summary: both probes on the samples whose prompt differs, and the verdict."""
    lines = [
        f"Task vs Prompt Labels ({comparison.samples} samples whose prompt differs from their task's description; "
        "the same features, folds and budget, one repeat):"
    ]
    for name in ("task", "prompt"):
        low, high = getattr(comparison, f"{name}_accuracy_interval")
        lines.append(
            f"  {name + ':':7} accuracy {getattr(comparison, f'{name}_accuracy'):.4f} [95% CI {low:.4f}, {high:.4f}], "
            f"balanced {getattr(comparison, f'{name}_balanced_accuracy'):.4f}, information "
            f"{getattr(comparison, f'{name}_information_bits'):.3f} bits"
        )
    lines.append(
        f"  Verdict: {comparison.verdict} (prompt - task: {comparison.prompt_minus_task_bits:+.3f} bits; a side wins "
        "when its accuracy interval lies above the other's)"
    )
    return lines


def format_concept_summary(results: dict, setup: ResultConfig) -> str:
    """A concept run's summary: what was probed, then every concept sorted by balanced accuracy."""
    held_out = concepts_held_out_from(results)
    if setup.training.split == "task":
        reading = (
            "held-out tasks: a concept counts only if it is encoded in a way that transfers to unseen combinations"
        )
    else:
        reading = "held-out episodes of seen tasks: decodability, not transfer"
    lines = [
        "Concept Probing Results",
        "=======================",
        "",
        *item_lines(setup),
        f"Held out: {results['config']['split']} ({reading})",
        f"Number of Samples: {held_out.num_samples}; Number of Tasks: {held_out.num_tasks}",
        f"Token Positions: {results['config']['token_positions']}",
        "",
        f"{'concept':24} {'balanced':>8} {'accuracy':>8} {'majority':>8} {'bits':>7} {'tasks with/without':>18}  notes",
    ]
    for name, one in sorted(held_out.concepts.items(), key=lambda named: -named[1].balanced_accuracy):
        notes = []
        if one.folds_missing_values:
            notes.append(f"folds {one.folds_missing_values} never saw a value they hold out")
        if one.failed_probes:
            notes.append(f"FAILED folds {one.failed_probes}")
        lines.append(
            f"{name:24} {one.balanced_accuracy:8.4f} {one.accuracy:8.4f} {one.majority_accuracy:8.4f} "
            f"{one.information_bits:7.3f} {one.tasks_with:>9}/{one.tasks_without:<8}  {'; '.join(notes)}"
        )
    lines += ["", f"Definition: {CONCEPT_DEFINITION}", ""]
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    """The guide's summary block, then the evidence behind it, what was measured and how; last, what made it."""
    setup = result_config(results["config"])
    if is_concept_result(results):
        body = format_concept_summary(results, setup)
    else:
        held_out = held_out_from(results["metrics"])
        body = "\n".join(
            [
                *guide_block(results, setup, held_out),
                "",
                *evidence_lines(results, setup, held_out),
                "",
                *generalization_lines(results, setup),
                *measured_lines(results, setup, held_out),
                *prompt_lines(results, setup, held_out),
                "",
            ]
        )
    return f"{body}{MADE_WITH_LINE.format(results['config']['fingerprint'])}\n"


def result_stem(
    source: Source, item: Item, inference_times: dict[int, list[float]], target: str = "t5", label_by: str = "task"
) -> str:
    """The guide's file stem, {expert}_layer{L}_step{S}, plus _t{time} for one denoising step
    ({camera} in place of the layer for SigLIP's output), _prompt_tokens for --tokens prompt, _prompt_labels for
    --labels prompt and _concepts for concept probes."""
    where = f"_{source.camera}" if source.expert == "visual" else f"_layer{item.layer}"
    stem = f"{source.expert}{where}_step{item.rollout_step}"
    if item.inference_step is not None:
        times = inference_times.get(item.rollout_step, [])
        if item.inference_step >= len(times):
            raise OptionError(
                f"--inference_step {item.inference_step} is out of range: step_{item.rollout_step} has {len(times)} "
                f"denoising entries (0-{len(times) - 1})"
            )
        stem = f"{stem}_t{times[item.inference_step]:g}"
    if source.tokens == "prompt":
        stem = f"{stem}_prompt_tokens"
    if label_by != "task":
        stem = f"{stem}_{label_by.replace(',', '_and_')}_labels"
    return f"{stem}_concepts" if target == "concepts" else stem


RESULTS_NAME, SUMMARY_NAME = "results_{}.pkl", "summary_{}.txt"  # {} the result's stem (see result_stem)


class ResultPaths(NamedTuple):
    """The two files of one result."""

    results: Path
    summary: Path


def result_paths(output_dir: Path, stem: str) -> ResultPaths:
    """results_{stem}.pkl and summary_{stem}.txt: the one place their names are made (the writer and --skip_existing
    both ask here)."""
    return ResultPaths(output_dir / RESULTS_NAME.format(stem), output_dir / SUMMARY_NAME.format(stem))


def stated_fingerprint(paths: ResultPaths) -> list[str] | None:
    """The parts of the fingerprint a summary's last line states, if the results file beside it is whole as this
    program writes one (a protocol-4 pickle of a dict: PROTO 4 ... SETITEMS STOP) and records the same fingerprint in
    its first DIGEST_BYTES (the configuration comes first); None otherwise: a results file left by a run killed
    between the two renames, cut short, or copied in from elsewhere, is read whole instead."""
    try:
        with open_regular(paths.summary) as file:  # the last line, as bytes: a few hundred of them
            size = os.fstat(file.fileno()).st_size
            last = os.pread(file.fileno(), 4096, max(0, size - 4096)).decode(errors="replace").rstrip("\n")
        with open_regular(paths.results) as file:
            size = os.fstat(file.fileno()).st_size
            head, tail = os.pread(file.fileno(), DIGEST_BYTES, 0), os.pread(file.fileno(), 2, max(0, size - 2))
    except (OSError, BadFileError):
        return None
    stated = STATED_FINGERPRINT.fullmatch(last.rpartition("\n")[2])
    whole = head.startswith(pickle.PROTO + b"\x04") and tail == pickle.SETITEMS + pickle.STOP
    if stated is None or not whole or stated.group(1).encode() not in head:
        return None
    return stated.group(1).split("-")


class Existing(NamedTuple):
    """How an existing result stands against the one a run would write."""

    differs: str | None  # the first part that differs ("options", "data", "program"), or None
    whole: bool  # its summary was written with this results file (see stated_fingerprint)


class Difference(NamedTuple):
    """What differs between an existing result and the one a run would write, in words."""

    part: str  # "options" (also when it cannot be told what the result was made with), "data" or "program"
    text: str


def recorded_difference(path: Path, wanted: MadeWith) -> Difference | None:
    """None when the results file at `path` was made with `wanted`; otherwise the first part that differs and how (or
    why that cannot be told)."""
    try:
        with open_regular(path) as file:
            recorded = load_restricted(io.BufferedReader(file))["config"]["made_with"]
        parts = [(part, dict(recorded[part]), getattr(wanted, part)) for part in MADE_WITH_PARTS]
    except BadFileError as error:
        return Difference("options", str(error))
    except (KeyError, TypeError, AttributeError):
        return Difference("options", "it does not record what it was made with (another program, or an older version)")
    except UNREADABLE as error:
        return Difference("options", f"it cannot be read ({error or type(error).__name__})")
    for part, old, new in parts:
        differing = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        if differing:
            words = ", ".join(f"{key} {old.get(key)!r} (now {new.get(key)!r})" for key in differing)
            return Difference(part, f"made with {words}")
    return None


def existing_result(paths: ResultPaths, wanted: MadeWith) -> Existing:
    """Compare an existing result with `wanted`: from its summary's last line when the pair is whole (a line and 64 KB
    instead of megabytes of results per combination when a big sweep resumes), else from its results file."""
    stated = stated_fingerprint(paths)
    if stated is None:  # not a whole pair of this version: the results file says
        difference = recorded_difference(paths.results, wanted)
        return Existing(difference and difference.part, False)
    wanted_parts = wanted.fingerprint().split("-")
    differing = [part for part, one, other in zip(MADE_WITH_PARTS, stated, wanted_parts) if one != other]
    return Existing(differing[0] if differing else None, True)


@contextlib.contextmanager
def stop_signals_to(handler):
    """Ctrl-C (SIGINT) and SIGTERM go to `handler` for as long as the context lasts, then to what they went to before.
    Only in the main thread, the one Python runs handlers in (elsewhere nothing changes); an ignored signal stays
    ignored (`cmd &`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM noted, not acted on, for as long as the context lasts, then sent again. Handlers, not a
    signal mask: the kernel hands a signal to any thread that does not block it (XLA has a dozen), and Python runs
    the handler in the main thread at its next step. Outside the main thread nothing is raised anyway."""
    received = []
    try:
        with stop_signals_to(lambda signum, frame: received.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


@contextlib.contextmanager
def locked_temporary(path: Path, content: bytes):
    """`content` in a temporary beside `path`, with the mode open() would give; yields its name, locked until the
    context ends, so that a run starting meanwhile does not take it for one an interrupted run left (see
    remove_stale_temporaries); removed then unless renamed."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            with contextlib.suppress(OSError):  # without locks, remove_stale_temporaries cannot lock it either: kept
                fcntl.flock(file, fcntl.LOCK_EX)
            # mkstemp makes 0600, which hides results from colleagues: give the mode open() would (0666 less the umask).
            umask = os.umask(0o022)  # there is no getter: read the umask and put it back at once
            os.umask(umask)
            os.fchmod(file.fileno(), 0o666 & ~umask)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())  # a late write error (NFS, quotas) shows here, before the rename, not at close
            yield temporary
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_together(files: list[tuple[Path, bytes]], renamed: Callable[[], None] = lambda: None) -> None:
    """Write each file to a temporary beside it, then rename them all with Ctrl-C and SIGTERM held back: readers see
    the old files or all the new ones, never half a file nor a mix (kill -9 between two renames aside). If a rename
    fails, the files already renamed are removed: no new file stays beside an old one. An error names the file, not
    its temporary. `renamed` runs once all are renamed, the signals still held: a Ctrl-C then finds it done."""
    current = files[0][0]
    try:
        with contextlib.ExitStack() as stack:
            temporaries = []
            for current, content in files:
                temporaries.append(stack.enter_context(locked_temporary(current, content)))
            done = []
            with signals_held():
                try:
                    for temporary, (current, _) in zip(temporaries, files):
                        os.replace(temporary, current)
                        done.append(current)
                except BaseException:
                    for path in done:
                        path.unlink(missing_ok=True)
                    raise
                renamed()
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(current)) from None


def write_atomically(path: Path, content: bytes) -> None:
    """Write one file so that readers never see half of it (see write_together)."""
    write_together([(path, content)])


def write_results(results: dict, paths: ResultPaths, renamed: Callable[[], None] = lambda: None) -> None:
    """Write a result's pair of files together (see write_together): a results file is never left without its own
    summary."""
    # The summary may hold a path that is not UTF-8 (kept by Python as surrogates): written as \udcff escapes.
    contents = (pickle.dumps(results, protocol=4), format_summary(results).encode(errors="backslashreplace"))
    try:
        write_together(list(zip(paths, contents)), renamed)
    except OSError as error:
        raise ProbeError(
            f"{error.filename}: cannot write it ({error.strerror}); neither file of this result is left: free the "
            "space, then rerun with --skip_existing"
        ) from None


# write_atomically's temporaries: .{name}.{mkstemp's 8 characters}.tmp, for the kinds of file this program writes.
TEMPORARY_NAME = re.compile(r"^\..+\.(pkl|txt|png|csv|npz|json)\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def directory_locked(directory: Path):
    """An exclusive lock on a directory for as long as a pair is checked and written there, so that two runs never
    interleave their files of one result. Where the file system has no locks, nothing is held."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def remove_stale_temporaries(directory: Path, started: float) -> None:
    """Remove the temporaries of write_atomically that an interrupted run left in `directory`: those older than this
    run that no writer holds locked (a run in progress holds its own)."""
    try:
        candidates = [path for path in directory.iterdir() if TEMPORARY_NAME.match(path.name)]
    except OSError:  # no such directory yet
        return
    removed = 0
    for path in candidates:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            status = os.fstat(descriptor)
            if stat.S_ISREG(status.st_mode) and status.st_mtime < started:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while a writer holds it
                path.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(descriptor)
    if removed:
        log.warning("%s: removed %d temporary file(s) that an interrupted run left", directory, removed)


def unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be written in `directory`, or created there if it is missing; None when they can.
    Creates nothing."""
    existing = next(path for path in (directory, *directory.parents) if os.path.exists(path))
    if existing == directory and not os.path.isdir(existing):
        return "exists and is not a directory"
    if not os.path.isdir(existing):
        return f"cannot be created: {existing} is not a directory"
    return None if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


# -----------------------------------------------------------------------------
# Sweep: items, shards, resume, one rollout step at a time (run_sweep)
# -----------------------------------------------------------------------------


def sweep_items(source: Source, layers, steps, inference, report: ReadReport) -> list[Item]:
    """Every (rollout step, denoising step, layer) combination asked for, in a fixed order; "all" and "each" resolved
    from the data ("each": every denoising entry that step has, in each file)."""
    if source.expert == "visual":
        layers = [None]
    elif layers == "all":
        layers = list(range(report.layer_count))
    steps = steps_asked(steps, report.steps_seen)

    def denoising(step: int) -> list[int | None]:
        if inference == "each":
            return list(range(len(report.inference_times.get(step, []))))
        return [None] if inference == "all" else inference

    return [Item(step, layer, k) for step in steps for k in denoising(step) for layer in layers]


class Destination(NamedTuple):
    """Where a run's results go, and what each records about the run."""

    output_dir: Path
    plot: bool  # also each result's figures
    started: float  # time.perf_counter() at the start: each result records the wall time so far
    command: list[str]
    made_with: MadeWith  # the run's: each result's record of what made it
    overwrite: bool  # --overwrite: a result made meanwhile with other options may be replaced
    progress: Progress  # counts each results file as it is renamed into place: what an interrupted run reports


NONFINITE_WARNINGS_SHOWN = 20  # per combination; the rest are counted


def finite_rows(
    samples: Samples, rows: np.ndarray, layer_position: int, item: Item, dataset: Dataset
) -> tuple[np.ndarray, list[tuple]]:
    """The rows whose pooled feature is finite, and (task, episode, step, denoising time) of each skipped one.

    A NaN or inf (a bfloat16 overflow in the dump) is a data problem: named in a warning, skipped, counted."""
    finite = np.isfinite(samples.features[layer_position]).all(axis=1)
    if samples.baseline is not None:  # a sample missing from either side is dropped from both
        finite &= np.isfinite(samples.baseline).all(axis=1)
    skipped = []
    for row in np.flatnonzero(rows & ~finite):
        task, episode, time_value = (
            int(samples.task_id[row]),
            int(samples.episode[row]),
            float(samples.inference_time[row]),
        )
        skipped.append((task, episode, int(samples.step[row]), time_value))
        if len(skipped) <= NONFINITE_WARNINGS_SHOWN:
            denoising = "" if math.isnan(time_value) else f", denoising t {time_value:g}"
            log.warning(
                "%s: episode_%d, step_%d%s, %s: non-finite values in the pooled feature (or its --baseline); sample "
                "skipped "
                "(--strict makes this fatal)",
                dataset.report.files[task],
                episode,
                samples.step[row],
                denoising,
                "camera " + dataset.source.camera if item.layer is None else f"layer {item.layer}",
            )
    if len(skipped) > NONFINITE_WARNINGS_SHOWN:
        log.warning(
            "... and %d more non-finite sample(s) for %s",
            len(skipped) - NONFINITE_WARNINGS_SHOWN,
            result_stem(dataset.source, item, dataset.report.inference_times),
        )
    if rows.any() and not (rows & finite).any():
        stem = result_stem(dataset.source, item, dataset.report.inference_times)
        raise ProbeError(f"{stem}: every sample has non-finite features")
    return rows & finite, skipped


def sweep_groups(
    items: list[Item], dataset: Dataset, samples: Samples, layers: list
) -> tuple[list[list[tuple[Item, Samples]]], dict[Item, list[tuple]]]:
    """The items grouped by the samples they share (trained together), each with its finite samples; and the samples
    each item skipped as non-finite. --strict stops here, before any training, when any was skipped."""
    groups: dict[tuple, list] = {}
    nonfinite: dict[Item, list[tuple]] = {}
    for item in items:
        rows = np.ones(len(samples.task_id), bool)
        if item.inference_step is not None:
            rows = samples.inference_index == item.inference_step
        rows, nonfinite[item] = finite_rows(samples, rows, layers.index(item.layer), item, dataset)
        key = (samples.task_id[rows].tobytes(), samples.episode[rows].tobytes())
        groups.setdefault(key, []).append((item, samples.select(np.flatnonzero(rows), layers.index(item.layer))))
    skipped = sum(len(skips) for skips in nonfinite.values())
    if skipped and dataset.source.strict:
        raise ProbeError(f"{skipped} sample(s) have non-finite features (see the warnings above); --strict stops here")
    return list(groups.values()), nonfinite


def item_context(item: Item, dataset: Dataset, nonfinite: list[tuple], destination: Destination) -> ItemContext:
    """What one item's results file records about the run, as the file is made."""
    lacking = None
    if dataset.source.baseline:
        lacking = [ids for ids in dataset.report.without_baseline if ids[2] == item.rollout_step]
    wall_time = time.perf_counter() - destination.started
    return ItemContext(nonfinite, destination.made_with.of_item(item), destination.command, wall_time, lacking)


def first_difference(found: list[tuple[Path, MadeWith]]) -> str:
    """The first of these results files, and what differs in what it was made with (read from the file)."""
    path, wanted = found[0]
    difference = recorded_difference(path, wanted)
    what = difference.text if difference else "its summary states another fingerprint"
    return f"{path.name}: {what}"


def write_item(
    results: dict, item: Item, samples: Samples, dataset: Dataset, labels: LabelConfig, destination: Destination
) -> tuple[dict, Path, Path]:
    """Write one item's results, and with --plot its figures."""
    stem = result_stem(dataset.source, item, dataset.report.inference_times, labels.target, labels.label_by)
    paths = result_paths(destination.output_dir, stem)
    destination.output_dir.mkdir(parents=True, exist_ok=True)
    with directory_locked(destination.output_dir):  # another run's pair of this stem is checked, then replaced whole
        wanted = destination.made_with.of_item(item)
        if (
            paths.results.is_file()
            and not destination.overwrite
            and existing_result(paths, wanted).differs == "options"
        ):
            raise ProbeError(
                f"{first_difference([(paths.results, wanted)])}: written meanwhile by a run with other options; "
                "--overwrite replaces it"
            )
        write_results(results, paths, destination.progress.count)  # counted as the renames end (see Progress)
    if destination.plot and labels.target == "t5":
        write_run_plots(results, samples.features[0], destination.output_dir, stem)
    return (results, *paths)


class Cell(NamedTuple):
    """One item of a rollout step, trained and evaluated: its samples, probes and results record (not yet written)."""

    item: Item
    samples: Samples  # the item's own, one layer
    probed: Probed
    results: dict


def probed_cells(
    items: list[Item],
    dataset: Dataset,
    samples: Samples,
    layers: list,
    labels: LabelConfig,
    training: TrainingConfig,
    destination: Destination,
    folds_given: SweepFolds | None = None,
) -> Iterator[Cell]:
    """Train and evaluate every item of one rollout step (samples: its layers, in the order of `layers`), yielding each
    with its results record; items that share their samples are trained together in one program. `folds_given`: a
    --generalize sweep's folds."""
    groups, nonfinite = sweep_groups(items, dataset, samples, layers)
    # Every design before any training: a combination left without enough samples stops the run before a file is
    # written.
    designs = [make_design(members[0][1], dataset.descriptions, labels, training, folds_given) for members in groups]
    spec = baseline_spec_text(dataset.source.baseline) if dataset.source.baseline else ""
    with tqdm(total=len(items), desc="probes", unit="result", disable=progress_disabled(), leave=False) as progress:
        for design, members in zip(designs, groups):
            probed = probe_group(
                [selected for _, selected in members], design, dataset.descriptions, labels, training, spec
            )
            for (item, selected), one in zip(members, probed):
                if isinstance(one.held_out, HeldOut):
                    warn_about_failures(
                        one.held_out.failures, result_stem(dataset.source, item, dataset.report.inference_times)
                    )
                context = item_context(item, dataset, nonfinite[item], destination)
                yield Cell(item, selected, one, results_record(one, selected, dataset, item, labels, training, context))
                progress.update()


def run_sweep(
    items: list[Item],
    dataset: Dataset,
    samples: Samples,
    layers: list,
    labels: LabelConfig,
    training: TrainingConfig,
    destination: Destination,
) -> Iterator[tuple[dict, Path, Path]]:
    """Train, evaluate and write every item of one rollout step (see probed_cells), yielding each as it is written."""
    for cell in probed_cells(items, dataset, samples, layers, labels, training, destination):
        yield write_item(cell.results, cell.item, cell.samples, dataset, labels, destination)


class MadeOtherwise(NamedTuple):
    """Existing results made otherwise, by the part of MadeWith that differs first (see MADE_WITH_PARTS): each a
    results file and what it is compared with."""

    options: list[tuple[Path, MadeWith]]
    data: list[tuple[Path, MadeWith]]
    program: list[tuple[Path, MadeWith]]


class Resume(NamedTuple):
    """What a job finds in --output_dir: the combinations left to run, how many are done, and the existing results
    made otherwise, by the part of MadeWith that differs first (each a results file and what it is compared with)."""

    items: list[Item]
    done: int
    differing: MadeOtherwise


def left_to_run(
    args: argparse.Namespace, items: list[Item], source: Source, inference_times: dict, made_with: MadeWith
) -> Resume:
    """The combinations this job runs: its --shard, less those --skip_existing finds written whole and made the same
    way, or made by another version of this program only (see MadeWith)."""
    if args.shard:
        index, count = args.shard
        items = items[index::count]
    output_dir, left, done, differing = Path(args.output_dir), [], 0, MadeOtherwise([], [], [])
    for item in items:
        paths = result_paths(output_dir, result_stem(source, item, inference_times, args.target, args.label_by))
        for path in paths:
            if os.path.lexists(path) and not path.is_file():
                raise ProbeError(f"{path}: exists and is not a regular file; move it away")
        wanted = made_with.of_item(item)
        existing = existing_result(paths, wanted) if paths.results.is_file() else Existing(None, False)
        if existing.differs is not None:
            getattr(differing, existing.differs).append((paths.results, wanted))
        if existing.whole and existing.differs in (None, "program") and args.skip_existing:
            done += 1
            continue
        left.append(item)
    return Resume(left, done, differing)


def settle_existing(resume: Resume, args: argparse.Namespace, warn: bool) -> None:
    """Stop, naming what differs, when results in --output_dir were made with other options (unless --overwrite);
    with `warn`, say which results are made again (other data) and which are kept (another program version)."""
    output_dir, differing = args.output_dir, resume.differing
    if differing.options and not args.overwrite:
        raise ProbeError(
            f"{len(differing.options)} result(s) in {output_dir} were made with other options, e.g. "
            f"{first_difference(differing.options)}. --overwrite replaces them; another --output_dir keeps both"
        )
    if warn and differing.data:  # results of data that are no longer there: never reused, made again
        count, example = len(differing.data), first_difference(differing.data)
        log.warning("%d result(s) in %s were made from other data, e.g. %s; made again", count, output_dir, example)
    if warn and differing.program and args.skip_existing:
        log.warning(
            "%d result(s) in %s were made by another version of this program or its packages, e.g. %s; kept (rerun "
            "without --skip_existing to make them again)",
            len(differing.program),
            output_dir,
            first_difference(differing.program),
        )


def check_prompts(dataset: Dataset) -> None:
    """--labels prompt: every walked step must hold the prompt it ran under; the first that does not stops the run."""
    for step, prompts in sorted(dataset.report.prompts.items()):
        for (task, episode), prompt in prompts.items():
            if prompt is None:
                raise ProbeError(
                    f"{dataset.report.files[task]}: episode_{episode}/step_{step} has no 'prompt' string: --labels "
                    "prompt labels each sample by the prompt its step ran under (--labels task: by the task)"
                )


def prompts_differing(samples: Samples, descriptions_by_task: dict[int, str]) -> int:
    """How many samples ran under a prompt (step['prompt']) other than their task's description."""
    if samples.prompt is None:
        return 0
    own = [descriptions_by_task[task] for task in samples.task_id.tolist()]
    return sum(prompt is not None and prompt != text for prompt, text in zip(samples.prompt, own))


def check_step_prompts(samples: Samples, dataset: Dataset, step: int, labels: LabelConfig) -> None:
    """--labels task on samples whose step ran under another prompt: said once per step, counted in each result.
    --labels task,prompt with no such sample: nothing to compare."""
    differing = prompts_differing(samples, dataset.descriptions)
    if labels.label_by == "task,prompt" and not differing:
        raise ProbeError(
            f"--labels task,prompt: no sample at step_{step} ran under a prompt other than its task's description, so "
            "the two labelings agree everywhere: nothing to compare"
        )
    if differing and labels.label_by == "task":
        log.warning(
            "step_%d: %d of %d sample(s) ran under a prompt other than their task's description; --labels task labels "
            "them by the task (--labels prompt: by the prompt the model saw)",
            step,
            differing,
            len(samples.task_id),
        )


def check_steps(steps: list[int], dataset: Dataset, labels: LabelConfig, training: TrainingConfig) -> None:
    """Before a sweep trains anything: each step exists, and its episodes (with the --baseline's entry) make a design
    (folds, validation, label space), so that no late step stops the sweep halfway. No feature is read here."""
    report = dataset.report
    folds_given = generalize_folds(dataset, steps, training)
    for step in steps:
        lacking = {(task, episode) for task, episode, at in report.without_baseline if at == step}
        pairs = [pair for pair in report.step_episodes.get(step, []) if pair not in lacking]
        if not pairs:
            raise no_samples(step, report)
        pairs = np.array(pairs, dtype=np.int64)
        count = len(pairs)
        episodes = Samples(
            np.zeros((0, count, 0), np.float32),
            pairs[:, 0],
            pairs[:, 1],
            np.full(count, step),
            np.full(count, np.nan),
            np.zeros(count, np.int64),
            prompt=step_prompts(report, step, pairs.tolist()),
        )  # one sample per episode: no features
        try:
            make_design(episodes, dataset.descriptions, labels, training, folds_given)
        except ProbeError as error:
            raise type(error)(f"step_{step}: {error} (checked before anything was trained)") from None


def resolve_sweep(
    args: argparse.Namespace, dataset: Dataset, labels: LabelConfig, training: TrainingConfig, made_with: MadeWith
) -> list[Item]:
    """The combinations this run writes, resolved against the walked files ("all" layers or steps, "each" denoising
    step), less --shard and --skip_existing; with several steps, each is checked before the first is trained."""
    items = sweep_items(dataset.source, args.layer, args.rollout_step, args.inference_step, dataset.report)
    if training.generalize and not generalization_axes(items):
        raise OptionError(
            "--generalize needs a sweep over several rollout steps (e.g. --rollout_step all) or denoising steps "
            "(--inference_step each), or both: there is no other step to test a probe at"
        )
    steps = sorted({item.rollout_step for item in items})
    if len(steps) > 1:
        check_steps(steps, dataset, labels, training)
    resume = left_to_run(args, items, dataset.source, dataset.report.inference_times, made_with)
    settle_existing(resume, args, warn=True)
    if resume.done:
        log.info("skipping %d combination(s) already written in %s", resume.done, args.output_dir)
    return resume.items


def named_by_options(args: argparse.Namespace) -> bool:
    """Whether the options name every combination (steps and layers listed, every denoising entry pooled), so that
    which are left to run is known before any file is read."""
    listed_steps = args.rollout_step != "all" and all(isinstance(step, int) for step in args.rollout_step)
    return listed_steps and args.layer != "all" and args.inference_step == "all"


PER_SAMPLE_PARTS = ("samples", "heldout", "probe")  # of a written result: not kept once on disk (a sweep's memory)


def without_per_sample_parts(results: dict, items: int) -> dict:
    """What a run keeps of a written result: all of it for a single result (its summary is printed), else the small
    parts."""
    if items == 1:
        return results
    return {key: value for key, value in results.items() if key not in PER_SAMPLE_PARTS}


def release_freed_memory() -> None:
    """Hand freed memory back to the system: glibc keeps it for reuse, and each step of a sweep then adds to the peak.
    Without glibc: nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -----------------------------------------------------------------------------
# Generalization across steps (--generalize): each cell's probe tested at every other step of the sweep
# -----------------------------------------------------------------------------


def generalization_axes(cells: list[Item]) -> list[str]:
    """The axes a sweep's cells vary along (results['generalization'] keys): rollout steps, denoising steps."""
    axes = []
    if len({cell.rollout_step for cell in cells}) > 1:
        axes.append("rollout_step")
    if len({cell.inference_step for cell in cells} - {None}) > 1:
        axes.append("inference_step")
    return axes


def generalization_targets(item: Item, cells: list[Item]) -> dict[str, list[Item]]:
    """The sweep's cells a cell's probe is tested at, by axis: its layer and denoising step at every rollout step, and
    its layer and rollout step at every denoising step. Its own cell is on each axis (the diagonal)."""
    targets = {}
    for axis in generalization_axes(cells):
        fixed = "inference_step" if axis == "rollout_step" else "rollout_step"
        targets[axis] = [
            cell for cell in cells if cell.layer == item.layer and getattr(cell, fixed) == getattr(item, fixed)
        ]
    return targets


def generalize_folds(dataset: Dataset, steps: list[int], training: TrainingConfig) -> SweepFolds | None:
    """--generalize: folds dealt over the episodes of every rollout step of the sweep (see SweepFolds); else None."""
    if not training.generalize:
        return None
    pairs = [pair for step in steps for pair in dataset.report.step_episodes.get(step, [])]
    return sweep_folds(pairs, dataset.descriptions, training)


def warn_about_fold_gaps(folds_given: SweepFolds, dataset: Dataset, step: int, split: str) -> None:
    """Folds dealt over the whole sweep can leave a step, which lacks some episodes, with a fold that holds out nothing
    or whose training side lacks a task (that fold's probe then meets the task as an unseen one): say so."""
    pairs = dataset.report.step_episodes.get(step, [])
    task_id = np.array([task for task, _ in pairs], dtype=np.int64)
    folds = folds_given.of(task_id, np.array([episode for _, episode in pairs], dtype=np.int64))
    for repeat, fold in enumerate(folds):
        empty = sorted(set(range(folds_given.folds)) - set(fold.tolist()))
        if empty:
            log.warning("step_%d: fold(s) %s of repeat %d hold out no episode at this step", step, empty, repeat)
        for task in np.unique(task_id) if split == "episode" else []:
            held = np.unique(fold[task_id == task])
            if len(held) == 1:
                log.warning(
                    "step_%d: every episode of task %d at this step is in fold %d of repeat %d (--generalize deals "
                    "folds over the whole sweep's episodes): that fold's probe never trains on the task here",
                    step,
                    task,
                    held[0],
                    repeat,
                )


class KeptProbe(NamedTuple):
    """A cell's probe as --generalize applies it at other steps: the fold probes of the true assignment (every repeat;
    the permuted assignments' are not kept), their label spaces and their softmax temperatures, fitted at the cell's
    own step. Memory: repeats x folds x width x outputs floats (and the label bases) per cell."""

    item: Item
    design: Design  # the cell's classes, with only these copies (its per-sample arrays dropped)
    fitted: ProbeFit  # these copies
    temperatures: np.ndarray  # (copies,) fitted on each copy's validation samples at the cell's step
    fold_copy: np.ndarray  # (repeats, folds) which of these copies is each repeat's probe of each fold
    episodes: np.ndarray  # the cell's episodes, as episode_ids


def episode_ids(task_id: np.ndarray, episode: np.ndarray) -> np.ndarray:
    """Each distinct (task, episode) of some samples as one integer, sorted (episode indices are below MOST_IDS)."""
    return np.unique(task_id.astype(np.int64) * MOST_IDS + episode)


def copies_subset(copies: Copies, chosen: np.ndarray) -> Copies:
    """The chosen copies: those rows of every per-copy array."""
    fields = {field.name: getattr(copies, field.name) for field in dataclasses.fields(Copies)}
    return Copies(**{name: None if value is None else value[chosen] for name, value in fields.items()})


def kept_probe(cell: Cell, repeats: int) -> KeptProbe:
    """What of a trained cell --generalize keeps until every step has been tested (see KeptProbe)."""
    design, fitted = cell.probed.design, cell.probed.fitted
    chosen = np.concatenate([design.copies.fold_copies(repeat, 0) for repeat in range(repeats)])
    nothing = np.zeros(0, dtype=np.int64)
    slim = dataclasses.replace(
        design,
        sample_class=nothing,
        unit=nothing,
        stratum=None,
        fold=np.zeros((repeats, 0), dtype=np.int64),
        assignments=design.assignments[:1],
        mdl_block=None,
        copies=copies_subset(design.copies, chosen),
    )
    fit = ProbeFit(*fitted.weights(chosen), np.asarray(fitted.failed)[chosen], {})
    return KeptProbe(
        cell.item,
        slim,
        fit,
        cell.probed.predictions.temperatures[chosen],
        np.arange(len(chosen)).reshape(repeats, -1),
        episode_ids(cell.samples.task_id, cell.samples.episode),
    )


class Transfer(NamedTuple):
    """A cell's probe on the same layer's samples at one step of the sweep: results['generalization'][axis][step]. At
    the cell's own step (the diagonal) these are the cell's own numbers."""

    accuracy: float  # retrieval among the cell's analyzed tasks, mean over repeats
    accuracy_interval: tuple[float, float] | None  # 95%, over the test samples' resampling units; None: --bootstrap 0
    balanced_accuracy: float  # mean of the per-task accuracies of the tasks present
    information_bits: float  # log2(tasks) - cross-entropy, with the temperatures fitted at the cell's step
    samples: int
    episodes: int
    episodes_missing: int  # of the cell's episodes, those this step lacks (left out)
    episodes_left_out: int  # this step's episodes of tasks the cell did not analyze
    inference_time: float  # of the test samples; NaN: the VLM, or every denoising entry pooled


def cell_sample_rows(samples: Samples, layer_position: int, inference_step: int | None) -> np.ndarray:
    """The rows of a step's samples that a cell holds (as sweep_groups selects them, non-finite ones dropped)."""
    rows = np.ones(len(samples.task_id), bool)
    if inference_step is not None:
        rows = samples.inference_index == inference_step
    rows &= np.isfinite(samples.features[layer_position]).all(axis=1)
    if samples.baseline is not None:
        rows &= np.isfinite(samples.baseline).all(axis=1)
    return np.flatnonzero(rows)


def transfer(
    kept: KeptProbe, test: Samples, descriptions: dict[int, str], folds_given: SweepFolds, training: TrainingConfig
) -> Transfer:
    """A kept probe on one cell's samples: each sample predicted, in every repeat, by the fold probe that never saw its
    episode (its task, under --split task), and scored as evaluate_item scores the cell's own: retrieval among the
    cell's analyzed tasks, bits with the temperatures fitted at the cell's step, the interval over the same units."""
    design = kept.design
    class_of = {text: number for number, text in enumerate(design.descriptions)}
    own = np.array([class_of.get(descriptions[task], -1) for task in test.task_id.tolist()], dtype=np.int64)
    analyzed = own >= 0
    present = episode_ids(test.task_id[analyzed], test.episode[analyzed])
    times = np.unique(test.inference_time)
    counts = dict(
        samples=int(analyzed.sum()),
        episodes=len(present),
        episodes_missing=len(np.setdiff1d(kept.episodes, episode_ids(test.task_id, test.episode))),
        episodes_left_out=len(episode_ids(test.task_id[~analyzed], test.episode[~analyzed])),
        inference_time=float(times[0]) if len(times) == 1 else math.nan,
    )
    if not analyzed.any():
        return Transfer(math.nan, None, math.nan, math.nan, **counts)
    task_id, episode, own = test.task_id[analyzed], test.episode[analyzed], own[analyzed]
    features, scoring = test.features[0][analyzed], dataclasses.replace(design, sample_class=own)
    folds = folds_given.of(task_id, episode)
    repeats = [
        scores_of(features, kept.fitted, scoring, kept.temperatures, kept.fold_copy[repeat][folds[repeat]])
        for repeat in range(len(kept.fold_copy))
    ]
    correct = np.mean([scores.correct for scores in repeats], axis=0)
    bits = information(np.mean([scores.bits for scores in repeats], axis=0), len(design.descriptions))
    per_class = np.array([correct[own == c].mean() for c in np.unique(own)])
    interval = None
    if training.bootstrap:
        unit, stratum = resampling_units(task_id, episode, training.split)
        interval = unit_intervals({"accuracy": correct}, unit, stratum, training.bootstrap, training.seed)["accuracy"]
        per_repeat = np.array([scores.correct.mean() for scores in repeats])
        interval = widened(interval, float(correct.mean()), per_repeat, True)
    return Transfer(float(correct.mean()), interval, float(per_class.mean()), float(bits.mean()), **counts)


@dataclasses.dataclass
class Generalization:
    """The matrix being filled: each trained cell's Transfer at every cell of the sweep it is tested at, by axis."""

    cells: list[Item]  # the whole sweep's (before --shard and --skip_existing): where probes are tested
    dataset: Dataset
    folds_given: SweepFolds
    training: TrainingConfig
    found: dict[Item, dict[str, dict[int, Transfer]]] = dataclasses.field(default_factory=dict)
    targets_of: dict[Item, dict[str, list[Item]]] = dataclasses.field(default_factory=dict)  # generalization_targets

    def targets(self, item: Item) -> dict[str, list[Item]]:
        """generalization_targets of a cell, found once (a sweep asks for them at every step)."""
        if item not in self.targets_of:
            self.targets_of[item] = generalization_targets(item, self.cells)
        return self.targets_of[item]

    def test_at(self, probes: list[KeptProbe], samples: Samples, layers: list) -> None:
        """Test the given kept probes at every cell of this step's samples they are tested at."""
        step = int(samples.step[0])
        for probe in probes:
            done: dict[Item, Transfer] = {}  # the diagonal is on both axes: computed once
            for axis, targets in self.targets(probe.item).items():
                for target in (target for target in targets if target.rollout_step == step):
                    if target not in done:
                        position = layers.index(target.layer)
                        test = samples.select(cell_sample_rows(samples, position, target.inference_step), position)
                        done[target] = transfer(probe, test, self.dataset.descriptions, self.folds_given, self.training)
                    key = getattr(target, axis)
                    self.found.setdefault(probe.item, {}).setdefault(axis, {})[key] = done[target]

    def record(self, item: Item) -> dict:
        """results['generalization'] of one cell: {axis: {step: its Transfer's fields}}, steps in order."""
        found = self.found.get(item, {})
        return {axis: {key: found[axis][key]._asdict() for key in sorted(found[axis])} for axis in found}


def tested_later(probes: list[KeptProbe], step: int, matrix: Generalization) -> list[KeptProbe]:
    """The kept probes, trained after `step` was read, that are tested at it."""
    later = [probe for probe in probes if probe.item.rollout_step > step]
    return [probe for probe in later if any(t.rollout_step == step for t in matrix.targets(probe.item)["rollout_step"])]


def generalized_sweep(
    items: list[Item],
    cells: list[Item],
    dataset: Dataset,
    labels: LabelConfig,
    training: TrainingConfig,
    destination: Destination,
) -> Iterator[tuple[dict, Path, Path]]:
    """--generalize: train the items (of the sweep's `cells`) one rollout step at a time, keep their fold probes and
    test them at every step as it is read; then read each earlier step once more for the probes trained after it.
    Memory stays one step's features plus the kept probes: a written record waits in an unnamed temporary file (gone
    with the process) until its row of the matrix is whole, then its pair is written."""
    steps = sorted({cell.rollout_step for cell in cells})
    layers = sorted({cell.layer for cell in cells}, key=lambda layer: -1 if layer is None else layer)
    folds_given = generalize_folds(dataset, steps, training)
    matrix, kept, waiting = Generalization(cells, dataset, folds_given, training), {}, {}
    destination.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=destination.output_dir) as spill:
        for step in steps:  # each step read once: its items trained, every probe so far tested at it
            samples = step_samples(dataset, layers, step)
            warn_about_fold_gaps(folds_given, dataset, step, training.split)
            step_items = [item for item in items if item.rollout_step == step]
            for cell in probed_cells(step_items, dataset, samples, layers, labels, training, destination, folds_given):
                kept[cell.item] = kept_probe(cell, training.repeats)
                if destination.plot:
                    stem = result_stem(dataset.source, cell.item, dataset.report.inference_times)
                    write_run_plots(cell.results, cell.samples.features[0], destination.output_dir, stem)
                waiting[cell.item] = spill.tell()
                pickle.dump(cell.results, spill, protocol=4)
            cell = None  # its samples are views of the step's features
            matrix.test_at(list(kept.values()), samples, layers)
            del samples
            release_freed_memory()
        for step in steps:  # each earlier step read again, for the probes trained after it
            later = tested_later(list(kept.values()), step, matrix)
            if later:
                samples = step_samples(dataset, layers, step)
                matrix.test_at(later, samples, layers)
                del samples
                release_freed_memory()
            for file in dataset.files:  # the step's array views are not needed again
                file.steps.pop(step, None)
        for item in items:
            spill.seek(waiting[item])
            results = {**pickle.load(spill), "generalization": matrix.record(item)}  # this process's own bytes
            yield write_item(results, item, None, dataset, labels, destination._replace(plot=False))


# -----------------------------------------------------------------------------
# Report and figures: a results directory as tables, curves and heatmaps, PNG by Agg (write_report)
# -----------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when a plot is asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Write a figure as PNG atomically, then close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    write_atomically(path, buffer.getvalue())


class MetricColumn(NamedTuple):
    part: str  # a HeldOut part
    field: str  # a field of it
    name: str  # the sweep.csv column
    interval_end: int | None = None  # 0, 1: the low or high end of the field's 95% interval; None: the value


def metric_columns() -> list[MetricColumn]:
    """sweep.csv's metric columns, from the record's reported fields (see `reported`)."""
    columns = []
    for part, kind in REPORTED_PARTS.items():
        for field in dataclasses.fields(kind):
            if "column" in field.metadata:
                name = field.metadata["column"] or field.name
                columns.append(MetricColumn(part, field.name, name))
                if field.metadata["interval"]:
                    columns += [
                        MetricColumn(part, field.name, f"{name}_ci_{end}", i) for i, end in enumerate(("low", "high"))
                    ]
    return columns


METRIC_COLUMNS = metric_columns()
ITEM_COLUMNS = ["expert", "layer", "rollout_step", "inference_step", "inference_time", "feature_type"]
SETTING_COLUMNS = ["token_positions", "labels", "probe", "loss", "split"]
# Sweep-level: the cell's permutation p-value corrected over its family (see family_corrections), and the family.
FAMILY_COLUMNS = ["permutation_p_value_fwer", "permutation_q_value", "correction_family"]
# --generalize: the code_stability of the cell's layer across rollout steps and across denoising steps.
STABILITY_COLUMNS = ["code_stability_rollout_step", "code_stability_inference_step"]
REPORT_COLUMNS = [
    *ITEM_COLUMNS,
    *SETTING_COLUMNS,
    *(column.name for column in METRIC_COLUMNS),
    "top_3_accuracy",
    *FAMILY_COLUMNS,
    *STABILITY_COLUMNS,
    "file",
]


def report_row(results: dict, path: Path) -> dict:
    """One sweep.csv row: what was probed and how well (blank where a run has no such number)."""
    setup, held_out = result_config(results["config"]), held_out_from(results["metrics"])
    times = np.unique(results["samples"]["inference_time"])
    row = {
        "expert": setup.source.expert,
        "layer": setup.item.layer,
        "rollout_step": setup.item.rollout_step,
        "inference_step": "all" if setup.item.inference_step is None else setup.item.inference_step,
        "inference_time": float(times[0]) if len(times) == 1 and not np.isnan(times[0]) else "",
        "feature_type": setup.source.feature_type,
        "token_positions": results["config"]["token_positions"],
        "labels": setup.labels.label_by,
        "probe": setup.training.probe,
        "loss": setup.training.loss if setup.training.probe == "linear" else "",
        "split": setup.training.split,
        "top_3_accuracy": held_out.retrieval.top_k_accuracy.get(3, ""),
        **dict.fromkeys(FAMILY_COLUMNS, ""),  # filled by family_corrections
        **dict.fromkeys(STABILITY_COLUMNS, ""),  # filled by add_code_stability
        "file": path.name,
    }
    for column in METRIC_COLUMNS:
        part = getattr(held_out, column.part)
        if column.interval_end is None:
            value = None if part is None else getattr(part, column.field)
        else:
            value = held_out.intervals.get(column.field, (None, None))[column.interval_end]
        row[column.name] = "" if value is None else value
    if setup.training.split == "episode":  # how learnable an arbitrary assignment is, not language: not a column
        row.update(dict.fromkeys(["selectivity", "selectivity_ci_low", "selectivity_ci_high"], ""))
    return row


def has_value(value) -> bool:
    """Whether a report cell holds a number (blank when the run had none)."""
    return value is not None and value != ""


class NullCell(NamedTuple):
    """What the report needs of one cell to correct its permutation p-value over a family of cells."""

    family: tuple[str, ...]  # expert, feature type, token positions, labels, probe
    alike: tuple  # tasks, split and permuted assignments: a family's cells must share them
    observed: float  # the first repeat's accuracy, as the cell's own p-value takes it
    null: np.ndarray  # (N,) accuracy under each permuted assignment
    fitted: bool  # every null probe fitted (a failed one would score as wrong, making p too small)


def null_cell(results: dict) -> NullCell | None:
    """A cell's permutation null, or None for a cell with no p-value (fewer than 2 permuted assignments)."""
    held_out, setup = held_out_from(results["metrics"]), result_config(results["config"])
    control = held_out.control
    if control is None or control.permutation_p_value is None:
        return None
    tasks = tuple(np.asarray(results["tasks"]["task_ids"]).tolist())
    classes = tuple(results["tasks"]["class_descriptions"])  # permutation k moves these classes: in this order
    alike = (tasks, classes, setup.training.split, np.asarray(results["config"]["permuted_assignments"]).tobytes())
    source, labels = setup.source, setup.labels
    return NullCell(
        (
            source.expert,
            source.feature_type,
            f"{source.tokens} tokens",
            f"{labels.label_by} labels",
            setup.training.probe,
        ),
        alike,
        float(held_out.repeats.accuracy[0]),
        np.asarray(control.permutation_null.accuracy),
        not math.isnan(control.permutation_p_value),
    )


def family_corrections(rows: list[dict], cells: list[NullCell | None]) -> list[str]:
    """Correct each cell's permutation p-value over its family, the cells of one expert, feature type, token positions,
    labels and probe: the
    family-wise p by the max statistic (Westfall & Young 1993), (1 + #{k: max over the family's cells of permutation
    k's null accuracy >= the cell's}) / (1 + N), and Benjamini-Hochberg q-values. Into the rows; one line per family,
    saying why when it gets none. Permutation k is the same derangement in every cell (one seed, one index)."""
    families: dict[tuple, list[tuple[dict, NullCell]]] = {}
    for row, cell in zip(rows, cells):
        if cell is not None:
            families.setdefault(cell.family, []).append((row, cell))
    lines = []
    for family, members in sorted(families.items()):
        name, problem = "/".join(family), family_problem([cell for _, cell in members])
        if problem:
            lines.append(f"family {name}: no correction ({problem})")
            continue
        from scipy.stats import false_discovery_control  # here: the report only (0.45 s of start-up)

        null = np.stack([cell.null for _, cell in members])  # (cells, N)
        largest = null.max(axis=0)  # under each permutation, the family's largest null accuracy
        observed = np.array([cell.observed for _, cell in members])
        fwer = (1 + (largest[None, :] >= observed[:, None]).sum(axis=1)) / (1 + null.shape[1])
        q_values = false_discovery_control([row["permutation_p_value"] for row, _ in members])
        for (row, _), p_value, q_value in zip(members, fwer, q_values):
            row.update(
                permutation_p_value_fwer=float(p_value), permutation_q_value=float(q_value), correction_family=name
            )
        lines.append(
            f"family {name}: {len(members)} cells x {null.shape[1]} permutations; family-wise p by the max statistic "
            f"(at least {1 / (1 + null.shape[1]):.4f}), Benjamini-Hochberg q"
        )
    return lines


def family_problem(cells: list[NullCell]) -> str | None:
    """Why a family's p-values cannot be corrected together, or None."""
    if len(cells) < 2:
        return "one cell with a permutation p-value"
    if len({cell.alike for cell in cells}) > 1:
        return "its cells differ in tasks, split or permuted assignments: rerun them with one seed and --permutations"
    if not all(cell.fitted for cell in cells):
        return "a null probe failed in some cell"
    return None


def blank_or(value, width: int) -> str:
    """A number of the printed table, or blanks where a run has none."""
    return f"{value:{width}.4f}" if has_value(value) else " " * width


def series_label(row: dict, varying: list[str]) -> str:
    """Legend text: the expert plus whatever else varies between the report's lines."""
    parts = [row["expert"]] + [f"{name.replace('_', ' ')} {row[name]}" for name in varying]
    return ", ".join(parts)


def csv_bytes(columns: list[str], rows: list[dict]) -> bytes:
    """CSV text of rows (None as blank): sweep.csv and the pivots share it, so a value reads back the same in each."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue().encode()


CONCEPT_WHERE = ["expert", "layer", "rollout_step", "inference_step", "split"]
CONCEPT_NUMBERS = [field.name for field in dataclasses.fields(ConceptScore) if "column" in field.metadata]
CONCEPT_COLUMNS = [*CONCEPT_WHERE, "concept", *CONCEPT_NUMBERS, "file"]


def concept_report_rows(results: dict, path: Path) -> list[dict]:
    """One concepts.csv row per concept of a concept run."""
    setup, held_out = result_config(results["config"]), concepts_held_out_from(results)
    where = {
        "expert": setup.source.expert,
        "layer": setup.item.layer,
        "rollout_step": setup.item.rollout_step,
        "inference_step": "all" if setup.item.inference_step is None else setup.item.inference_step,
        "split": setup.training.split,
    }
    return [
        {**where, "concept": name, **{key: getattr(one, key) for key in CONCEPT_NUMBERS}, "file": path.name}
        for name, one in sorted(held_out.concepts.items())
    ]


def annotate_cells(axis, image, values: np.ndarray, labels: np.ndarray) -> None:
    """Write each cell's label, dark on light cells and light on dark ones; cells without a value stay blank (grey)."""
    size = 7 if values.shape[1] <= 12 else 6
    for (row, column), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        shade = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        axis.text(column, row, labels[row, column], ha="center", va="center", fontsize=size, color=shade)


def plot_concepts_by_layer(panels: dict[tuple, list[dict]], path: Path) -> None:
    """One heatmap per (expert, rollout step, denoising step, split): concepts (best first) against layers."""
    plt = pyplot()
    most_layers = max(len({row["layer"] for row in members}) for members in panels.values())
    most_concepts = max(len({row["concept"] for row in members}) for members in panels.values())
    size = (1.5 + 0.9 * most_layers * len(panels), 1.5 + 0.35 * most_concepts)
    figure, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for axis, ((expert, step, inference, split), members) in zip(axes[0], panels.items()):
        layers = sorted({row["layer"] for row in members})
        by_concept: dict[str, dict[int, float]] = {}
        for row in members:
            by_concept.setdefault(row["concept"], {})[row["layer"]] = row["balanced_accuracy"]
        names = sorted(by_concept, key=lambda name: -np.mean(list(by_concept[name].values())))
        grid = np.array([[by_concept[name].get(layer, np.nan) for layer in layers] for name in names])
        image = axis.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        annotate_cells(axis, image, grid, np.vectorize("{:.2f}".format, otypes=[object])(grid))
        held_out = "held-out tasks (transfer)" if split == "task" else "held-out episodes (decodability)"
        axis.set(
            xticks=range(len(layers)),
            xticklabels=layers,
            yticks=range(len(names)),
            yticklabels=names,
            xlabel="layer",
            title=f"{expert}, step {step}, denoising {inference}\nbalanced accuracy on {held_out}",
        )
    figure.colorbar(image, ax=axes[0].tolist(), label="balanced accuracy (chance 0.5 for a word)")
    save_figure(figure, path)


def write_concept_report(rows: list[dict], directory: Path) -> list[str]:
    """concepts.csv, and concepts_by_layer.png (concept x layer, balanced accuracy) where several layers were run."""
    write_atomically(directory / "concepts.csv", csv_bytes(CONCEPT_COLUMNS, rows))
    panels: dict[tuple, list[dict]] = {}
    for row in rows:
        panels.setdefault((row["expert"], row["rollout_step"], str(row["inference_step"]), row["split"]), []).append(
            row
        )
    panels = {key: members for key, members in panels.items() if len({row["layer"] for row in members}) > 1}
    if not panels:
        return [f"wrote {directory / 'concepts.csv'}"]
    plot_concepts_by_layer(panels, directory / "concepts_by_layer.png")
    return [f"wrote {directory / 'concepts.csv'} and {directory / 'concepts_by_layer.png'}"]


def plot_accuracy_by_layer(series: list[list[dict]], varying: list[str], rows: list[dict], layers: list, path: Path):
    """Held-out accuracy per layer, one line per series, interval shaded, chance dashed, control dotted, and where
    the tasks are imbalanced the majority baseline (always answering the most frequent training task) dash-dotted."""
    figure, axis = pyplot().subplots(figsize=(9, 5))
    for members in series:
        x, label = [row["layer"] for row in members], series_label(members[0], varying)
        (line,) = axis.plot(x, [row["accuracy"] for row in members], marker="o", label=label)
        if all(row["accuracy_ci_low"] != "" for row in members):
            low, high = [row["accuracy_ci_low"] for row in members], [row["accuracy_ci_high"] for row in members]
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        # the control is evidence about language only when whole tasks are held out (see SPLIT_NOTES)
        if members[0]["split"] == "task" and all(row["control_accuracy"] != "" for row in members):
            control = [row["control_accuracy"] for row in members]
            axis.plot(x, control, linestyle=":", color=line.get_color(), label=f"{label} (control)")
        majority = [row["majority_accuracy"] for row in members]
        if any(value > row["chance_accuracy"] + 1e-9 for value, row in zip(majority, members)):  # imbalanced tasks
            axis.plot(x, majority, linestyle="-.", linewidth=1, color=line.get_color(), label=f"{label} (majority)")
    for value in sorted({row["chance_accuracy"] for row in rows}):
        axis.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"chance {value:.3f}")
    title = "Task retrieval from each layer (95% bootstrap interval shaded)"
    axis.set(xlabel="layer", ylabel="held-out accuracy", ylim=(-0.02, 1.02), xticks=layers, title=title)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def plot_cosine_by_layer(series: list[list[dict]], varying: list[str], layers: list, path: Path) -> None:
    """Cosine to the own task's embedding per layer: in the probe's label space, and in raw T5 space with the
    constant predictor (the mean embedding) for scale."""
    figure, (centered, raw) = pyplot().subplots(1, 2, figsize=(13, 5))
    for number, members in enumerate(series):
        x, label = [row["layer"] for row in members], series_label(members[0], varying)
        (line,) = centered.plot(x, [row["cosine_similarity_label_space"] for row in members], marker="o", label=label)
        raw.plot(x, [row["cosine_similarity"] for row in members], marker="o", color=line.get_color(), label=label)
        constant = [row["constant_predictor_cosine"] for row in members]
        raw.plot(
            x, constant, linestyle="--", color="grey", label=None if number else "constant predictor (mean embedding)"
        )
    ylabel = "cosine to own task's embedding"
    centered.set(xlabel="layer", ylabel=ylabel, xticks=layers, title="Probe's label space")
    raw.set(
        xlabel="layer", ylabel=ylabel, xticks=layers, title="Raw T5 space (the guide's), with the constant predictor"
    )
    for axis in (centered, raw):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def plot_by_layer(rows: list[dict], directory: Path) -> None:
    """Accuracy (with interval, control and chance) and cosine against layer, one line per series."""
    keys = ("rollout_step", "inference_step", "feature_type", "token_positions", "probe", "loss", "split")
    # Token positions follow the expert: name them only when they vary within one.
    experts = {row["expert"] for row in rows}
    varying = [
        key for key in keys if any(len({row[key] for row in rows if row["expert"] == expert}) > 1 for expert in experts)
    ]
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["expert"], *(row[key] for key in varying)), []).append(row)
    layers = sorted({row["layer"] for row in rows})
    plot_accuracy_by_layer(list(series.values()), varying, rows, layers, directory / "accuracy_by_layer.png")
    plot_cosine_by_layer(list(series.values()), varying, layers, directory / "cosine_by_layer.png")


# Heatmaps: a sweep over layers and one more axis (denoising time, or rollout step) drawn as layer x column grids, one
# panel row per combination of everything else. A cell is one results file: file names are unique per expert, layer,
# rollout step and denoising time, so within a directory no two files compete for a cell.
class HeatmapKind(NamedTuple):
    stem: str  # {stem}.png and {stem}_pivot.csv
    column: str  # the report column along a panel's x axis ("" is read as "all": every denoising entry)
    panel_keys: tuple[str, ...]  # report columns that one panel holds fixed
    named_key: str  # the panel key always named in a panel's title, even when all panels share it
    descending: bool  # column order: denoising runs from t = 1.0 (pure noise) down to the action
    xlabel: str
    title: str


PANEL_SETTINGS = ("feature_type", "token_positions", "labels", "probe", "loss", "split")
HEATMAPS = (
    HeatmapKind(
        stem="accuracy_by_layer_and_inference_time",
        column="inference_time",
        panel_keys=("expert", "rollout_step", *PANEL_SETTINGS),
        named_key="rollout_step",
        descending=True,
        xlabel="denoising time t (1.0: pure noise; denoising runs left to right)",
        title="Task retrieval by layer and denoising time",
    ),
    HeatmapKind(
        stem="accuracy_by_layer_and_rollout_step",
        column="rollout_step",
        panel_keys=("expert", "inference_step", "inference_time", *PANEL_SETTINGS),
        named_key="inference_time",
        descending=False,
        xlabel="rollout step",
        title="Task retrieval by layer and rollout step",
    ),
)
SIGNIFICANT_P = 0.05  # under --split task, accuracy cells whose permutation p-value is at most this get a star
# Drawn side by side, in this order; prompt_minus_task_bits: --labels task,prompt.
HEATMAP_METRICS = ("accuracy", "information_bits", "control_accuracy", "prompt_minus_task_bits")


class HeatmapPanel(NamedTuple):
    identity: dict  # panel key -> the value all its cells share
    layers: list  # ascending
    columns: list  # denoising times (then "all") or rollout steps, in the kind's order
    cells: dict  # (layer, column) -> report row


def heatmap_column(row: dict, kind: HeatmapKind):
    """A row's place along the kind's x axis."""
    value = row[kind.column]
    return value if has_value(value) else "all"


def column_order(kind: HeatmapKind, column) -> tuple:
    """Sort key: numbers in the kind's direction, "all" last."""
    if column == "all":
        return (1, 0)
    return (0, -column if kind.descending else column)


def heatmap_panels(rows: list[dict], kind: HeatmapKind) -> list[HeatmapPanel]:
    """Rows grouped by everything but layer and the kind's column; only groups with 2+ layers and 2+ columns."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[key]) for key in kind.panel_keys), []).append(row)
    panels = []
    for members in groups.values():
        cells = {(row["layer"], heatmap_column(row, kind)): row for row in members}
        layers = sorted({layer for layer, _ in cells})
        columns = sorted({column for _, column in cells}, key=functools.partial(column_order, kind))
        if len(layers) > 1 and len(columns) > 1:
            panels.append(HeatmapPanel({key: members[0][key] for key in kind.panel_keys}, layers, columns, cells))
    return panels


def panel_metrics(panel: HeatmapPanel) -> list[str]:
    """The report columns a panel shows: accuracy, its interval and information where the files have them; and only
    under --split task the control and the permutation p-value, since under --split episode they measure how learnable
    an arbitrary task -> embedding assignment is, not language."""
    rows = list(panel.cells.values())
    metrics = ["accuracy"]
    optional = ["accuracy_ci_low", "accuracy_ci_high", "information_bits"]
    if panel.identity["split"] == "task":
        optional += ["control_accuracy", "permutation_p_value", "permutation_p_value_fwer", "permutation_q_value"]
    optional.append("prompt_minus_task_bits")  # --labels task,prompt
    metrics += [name for name in optional if any(has_value(row[name]) for row in rows)]
    return metrics


def panel_values(panel: HeatmapPanel, metric: str) -> np.ndarray:
    """(layers, columns) floats; NaN where a cell has no file or the file no value."""
    values = np.full((len(panel.layers), len(panel.columns)), np.nan)
    for (layer, column), row in panel.cells.items():
        if has_value(row[metric]):
            values[panel.layers.index(layer), panel.columns.index(column)] = float(row[metric])
    return values


SPLIT_NOTES = {
    "episode": "held out: whole episodes of the analyzed tasks. No control shown: under this split it only measures "
    "how learnable an arbitrary task \u2192 embedding assignment is.",
    "task": "held out: whole tasks (unseen instructions). Control: the same probe trained on permuted task \u2192 "
    "embedding assignments.",
}


def pivot_csv(panels: list[HeatmapPanel], kind: HeatmapKind) -> bytes:
    """One line per panel, metric and layer, one column per denoising time (or rollout step); cells are the report
    rows' own values, blank where a panel has no file."""
    every_column = {column for panel in panels for column in panel.columns}
    columns = sorted(every_column, key=functools.partial(column_order, kind))
    lines = []
    for panel in panels:
        for metric in panel_metrics(panel):
            for layer in panel.layers:
                line = {**panel.identity, "metric": metric, "layer": layer}
                for column in panel.columns:
                    cell = panel.cells.get((layer, column))
                    line[str(column)] = "" if cell is None else cell[metric]
                lines.append(line)
    return csv_bytes([*kind.panel_keys, "metric", "layer", *map(str, columns)], lines)


def panel_name(panel: HeatmapPanel, kind: HeatmapKind, varying: list[str]) -> str:
    """What a panel holds fixed: the expert, its rollout step or denoising time, and any setting that differs between
    panels."""
    parts = [panel.identity["expert"]]
    named = panel.identity[kind.named_key]
    if kind.named_key == "rollout_step":
        parts.append(f"rollout step {named}")
    elif has_value(named):
        parts.append(f"t = {named:g}")
    elif panel.identity["expert"] == "action":
        parts.append("every denoising entry")
    parts += [f"{key.replace('_', ' ')} {panel.identity[key]}" for key in varying]
    return ", ".join(parts)


def heatmap_scale(panel: HeatmapPanel, metric: str, values: np.ndarray) -> tuple[float, float, str, list[float], str]:
    """Colour range, map, reference values marked on the colour bar, and title of one metric: accuracy on [0, 1] with
    chance marked; bits from min(0, lowest) to log2(tasks) with 0 (no information) marked."""
    rows = list(panel.cells.values())
    chances = sorted({float(row["chance_accuracy"]) for row in rows})
    chance = f"{chances[0]:.3g}" if len(chances) == 1 else f"{chances[0]:.3g}\u2013{chances[-1]:.3g}"
    if metric == "information_bits":
        top = max(float(row["max_information_bits"]) for row in rows)
        title = f"information (bits); max log\u2082 {max(row['num_tasks'] for row in rows)} = {top:.2f}"
        return min(0.0, float(np.nanmin(values))), top, "magma", [0.0], title
    if metric == "control_accuracy":
        return 0.0, 1.0, "viridis", chances, f"control accuracy (permuted tasks); chance {chance}"
    if metric == "prompt_minus_task_bits":  # diverging around 0: which labeling the layer follows, and by how much
        reach = max(float(np.nanmax(np.abs(values))), 1e-3)
        title = "prompt \u2212 task information (bits), on samples whose prompt differs"
        return -reach, reach, "coolwarm", [0.0], title
    return 0.0, 1.0, "viridis", chances, f"held-out accuracy; chance {chance}"


def cell_labels(panel: HeatmapPanel, metric: str, values: np.ndarray) -> tuple[np.ndarray, str]:
    """Each cell's text, and the title's note on it: the value to 2 decimals; accuracy starred where it beats its null
    (under --split task a family-wise, else per-cell, permutation p-value at most SIGNIFICANT_P; otherwise a 95%
    interval whose lower end is above chance and the majority baseline); the control with its p-value under it."""
    metrics = panel_metrics(panel)
    p_values = panel_values(panel, "permutation_p_value") if "permutation_p_value" in metrics else None
    significant, note = np.zeros(values.shape, bool), ""
    if metric == "accuracy" and "permutation_p_value_fwer" in metrics:
        significant = panel_values(panel, "permutation_p_value_fwer") <= SIGNIFICANT_P
        note = f"\n* family-wise permutation p \u2264 {SIGNIFICANT_P} (max statistic over the family's cells)"
    elif metric == "accuracy" and p_values is not None:
        significant, note = p_values <= SIGNIFICANT_P, f"\n* permutation p \u2264 {SIGNIFICANT_P}, uncorrected"
    elif metric == "accuracy" and "accuracy_ci_low" in metrics:
        # Above chance and above the majority baseline: with imbalanced tasks, always answering the most frequent one
        # beats 1 / tasks with no information about the sample.
        baseline = np.fmax(panel_values(panel, "chance_accuracy"), panel_values(panel, "majority_accuracy"))
        significant = panel_values(panel, "accuracy_ci_low") > baseline
        note = "\n* 95% interval above chance and the majority baseline"
    elif metric == "control_accuracy" and p_values is not None:
        note = "\nbelow each: the probe's permutation p-value"
    labels = np.empty(values.shape, dtype=object)
    for index, value in np.ndenumerate(values):
        labels[index] = f"{value:.2f}*" if significant[index] else f"{value:.2f}"
        if metric == "control_accuracy" and p_values is not None:
            labels[index] += f"\np {p_values[index]:.2f}"
    return labels, note


def draw_heatmap(figure, axis, panel: HeatmapPanel, metric: str, kind: HeatmapKind, name: str) -> None:
    """One annotated layer x column heatmap with its colour bar; layer 0 at the bottom, like a network drawn upwards."""
    plt = pyplot()
    values = panel_values(panel, metric)
    low, high, colours, references, title = heatmap_scale(panel, metric, values)
    image = axis.imshow(
        np.ma.masked_invalid(values),
        origin="lower",
        aspect="auto",
        vmin=low,
        vmax=high,
        cmap=plt.get_cmap(colours).with_extremes(bad="0.85"),
        interpolation="nearest",
    )
    labels, note = cell_labels(panel, metric, values)
    annotate_cells(axis, image, values, labels)
    if "all" in panel.columns:  # the probe over every denoising entry is not a point in time: set it apart
        axis.axvline(panel.columns.index("all") - 0.5, color="white", linewidth=4)
    colour_bar = figure.colorbar(image, ax=axis, pad=0.02, aspect=max(20, 2 * len(panel.layers)))  # as tall as the map
    for value in references:
        colour_bar.ax.axhline(value, color="red", linewidth=2)
    colour_bar.ax.tick_params(labelsize=7)
    reference = {"information_bits": "no information", "prompt_minus_task_bits": "prompt = task"}.get(metric, "chance")
    colour_bar.set_label(f"red line: {reference}", fontsize=7)
    axis.set_xticks(range(len(panel.columns)), [str(column) for column in panel.columns])
    axis.set_yticks(range(len(panel.layers)), panel.layers)
    axis.tick_params(labelsize=7)
    axis.set_xlabel(kind.xlabel, fontsize=8)
    axis.set_ylabel("layer", fontsize=8)
    axis.set_title(f"{name}\n{title}{note}", fontsize=8)


def plot_heatmaps(panels: list[HeatmapPanel], kind: HeatmapKind, path: Path) -> None:
    """One row of heatmaps per panel: accuracy, information in bits beside it, and under --split task the control."""
    plt = pyplot()
    drawn = [[metric for metric in panel_metrics(panel) if metric in HEATMAP_METRICS] for panel in panels]
    width = max(len(metrics) for metrics in drawn)
    cell_columns = max(len(panel.columns) for panel in panels)
    cell_rows = max(len(panel.layers) for panel in panels)
    size = (width * (0.5 * cell_columns + 2.2), len(panels) * (0.3 * cell_rows + 1.4) + 1.0)
    figure, axes = plt.subplots(len(panels), width, figsize=size, squeeze=False, layout="constrained")
    varying = [key for key in PANEL_SETTINGS if len({str(panel.identity[key]) for panel in panels}) > 1]
    for panel, metrics, row_axes in zip(panels, drawn, axes):
        for position, axis in enumerate(row_axes):
            if position < len(metrics):
                draw_heatmap(figure, axis, panel, metrics[position], kind, panel_name(panel, kind, varying))
            else:
                axis.set_axis_off()
    splits = sorted({panel.identity["split"] for panel in panels})
    note = textwrap.fill(" ".join(SPLIT_NOTES[split] for split in splits if split in SPLIT_NOTES), int(size[0] * 13))
    figure.suptitle(f"{kind.title}\n{note}", fontsize=9)
    save_figure(figure, path)


def write_heatmaps(rows: list[dict], directory: Path) -> list[Path]:
    """Each heatmap figure whose axes the rows vary over, with its pivot CSV; return the paths written."""
    written = []
    for kind in HEATMAPS:
        panels = heatmap_panels(rows, kind)
        if panels:
            plot_heatmaps(panels, kind, directory / f"{kind.stem}.png")
            write_atomically(directory / f"{kind.stem}_pivot.csv", pivot_csv(panels, kind))
            written += [directory / f"{kind.stem}.png", directory / f"{kind.stem}_pivot.csv"]
    return written


# Generalization (--generalize): each cell's probe tested at the sweep's other steps, one row per (cell, test step).
GENERALIZATION_COLUMNS = [
    "expert",
    "layer",
    "feature_type",
    *SETTING_COLUMNS,
    "axis",
    "rollout_step",  # the training cell's
    "inference_step",
    "inference_time",
    "test_rollout_step",
    "test_inference_step",
    "test_inference_time",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "balanced_accuracy",
    "information_bits",
    "chance_accuracy",
    "samples",
    "episodes",
    "episodes_missing",
    "episodes_left_out",
    "file",
]
MATRIX_KEYS = ("expert", "feature_type", *SETTING_COLUMNS, "axis", "layer")  # one code_stability each


class GeneralizationFigure(NamedTuple):
    axis: str  # of results['generalization']
    stem: str  # {stem}.png
    fixed: str  # the report column a panel holds fixed, besides the layer
    train: str  # the column along a matrix's rows (train) ...
    test: str  # ... and columns (test)
    label: str


GENERALIZATION_FIGURES = (
    GeneralizationFigure(
        "rollout_step",
        "generalization_by_rollout_step",
        "inference_step",
        "rollout_step",
        "test_rollout_step",
        "rollout step",
    ),
    GeneralizationFigure(
        "inference_step",
        "generalization_by_inference_time",
        "rollout_step",
        "inference_step",
        "test_inference_step",
        "denoising time t (1.0: pure noise)",
    ),
)
MOST_GENERALIZATION_PANELS = 18  # one per layer of Pi0; more are in generalization.csv only


def generalization_report_rows(results: dict, row: dict) -> list[dict]:
    """generalization.csv's rows of one results file (none without --generalize); `row` is its sweep.csv row."""
    rows = []
    for axis, entries in results.get("generalization", {}).items():
        for key, entry in entries.items():
            interval = entry["accuracy_interval"] or ("", "")
            test = {"test_rollout_step": row["rollout_step"], "test_inference_step": row["inference_step"]}
            test[f"test_{axis}"] = key
            time = entry["inference_time"]
            rows.append(
                {
                    **{name: row[name] for name in GENERALIZATION_COLUMNS if name in row},
                    **test,
                    "axis": axis,
                    "test_inference_time": "" if math.isnan(time) else time,
                    "accuracy": entry["accuracy"],
                    "accuracy_ci_low": interval[0],
                    "accuracy_ci_high": interval[1],
                    **{name: entry[name] for name in ("balanced_accuracy", "information_bits", "samples", "episodes")},
                    **{name: entry[name] for name in ("episodes_missing", "episodes_left_out")},
                }
            )
    return rows


def on_diagonal(row: dict) -> bool:
    """Whether a generalization.csv row tests a cell's probe at its own step."""
    return str(row[f"test_{row['axis']}"]) == str(row[row["axis"]])


class Stability(NamedTuple):
    """One layer's train x test matrix (or matrices) in a number: see code_stability."""

    diagonal: float  # mean accuracy of each probe at its own step
    off_diagonal: float  # mean accuracy at the other steps
    chance: float
    code_stability: float
    untrained: list[str]  # steps tested with no --generalize probe trained there in the directory: rows missing


CELL_STEPS = ("rollout_step", "inference_step")  # a matrix row's cell, and (test_...) the cell it is tested at


def cell_name(rollout_step: str, inference_step: str) -> str:
    """A cell of a matrix by its steps (as report text: a VLM cell's inference step is "all"), in words."""
    denoising = "" if inference_step == "all" else f" denoising step {inference_step}"
    return f"rollout step {rollout_step}{denoising}"


def code_stabilities(rows: list[dict]) -> dict[tuple, Stability]:
    """The code stability of each layer's matrix (MATRIX_KEYS: per expert, settings, axis and layer; over every
    denoising step or rollout step that the axis holds fixed)."""
    matrices: dict[tuple, tuple[list, list, list, set, set]] = {}
    for row in rows:
        key = tuple(str(row[name]) for name in MATRIX_KEYS)
        diagonal, off, chance, trained, tested = matrices.setdefault(key, ([], [], [], set(), set()))
        (diagonal if on_diagonal(row) else off).append(row["accuracy"])
        chance.append(row["chance_accuracy"])
        trained.add(tuple(str(row[name]) for name in CELL_STEPS))
        tested.add(tuple(str(row[f"test_{name}"]) for name in CELL_STEPS))
    return {
        key: Stability(
            np.nanmean(diagonal),
            np.nanmean(off),
            np.mean(chance),
            code_stability(diagonal, off),
            [cell_name(*cell) for cell in sorted(tested - trained)],
        )
        for key, (diagonal, off, chance, trained, tested) in matrices.items()
    }


def stability_order(item: tuple[tuple, Stability]) -> tuple:
    """Printed order: by expert, settings and axis, then layer."""
    key = item[0]
    return key[:-1], -1 if key[-1] == "None" else int(key[-1])


def stability_lines(stabilities: dict[tuple, Stability]) -> list[str]:
    """The printed report's code stability, one line per layer and axis, with the means it divides. It is a code's
    stability only where the diagonal is well above chance: a layer that carries nothing divides noise by noise."""
    lines = ["code_stability (--generalize): mean off-diagonal accuracy / mean diagonal; 1: one code at every step"]
    for key, one in sorted(stabilities.items(), key=stability_order):
        named = dict(zip(MATRIX_KEYS, key))
        layer = "-" if named["layer"] == "None" else named["layer"]
        lines.append(
            f"  {named['expert']:9} layer {layer:>2} across {AXIS_NAMES[named['axis']]}s: {one.code_stability:.3f} "
            f"(off-diagonal {one.off_diagonal:.3f} / diagonal {one.diagonal:.3f}; chance {one.chance:.3f})"
        )
        if one.untrained:  # a cell made again without --generalize (or not at all): its row of the matrix is missing
            lines.append(
                f"    INCOMPLETE: no --generalize probe trained at {', '.join(one.untrained)} in this directory; "
                "its row of the matrix is missing and code_stability is over the rest (make the cell again with "
                "--generalize)"
            )
    return lines


def matrix_order(figure: GeneralizationFigure, value) -> tuple:
    """Rows and columns of a matrix: rollout steps ascending; denoising steps in Pi0's order (t 1.0 first)."""
    return (0, int(value)) if has_value(value) and value != "all" else (1, 0)


def generalization_panels(rows: list[dict], figure: GeneralizationFigure) -> list[list[dict]]:
    """The rows of each panel of a figure (one layer, one fixed step, one setting), in the order drawn."""
    panels: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["axis"] == figure.axis:
            key = (row["expert"], *(str(row[name]) for name in SETTING_COLUMNS), str(row[figure.fixed]))
            layer = -1 if row["layer"] is None else row["layer"]
            panels.setdefault((*key, layer), []).append(row)
    return [panels[key] for key in sorted(panels, key=lambda key: (key[:-2], matrix_order(figure, key[-2]), key[-1]))]


def draw_generalization(axis, members: list[dict], figure: GeneralizationFigure, stability: float):
    """One train x test matrix of accuracy: train on y, test on x, in the order the steps run."""
    order = functools.partial(matrix_order, figure)
    steps = sorted({row[figure.train] for row in members} | {row[figure.test] for row in members}, key=order)
    values = np.full((len(steps), len(steps)), np.nan)
    names = {}
    for row in members:
        values[steps.index(row[figure.train]), steps.index(row[figure.test])] = row["accuracy"]
        if figure.axis == "inference_step" and has_value(row["test_inference_time"]):
            names[row[figure.test]] = f"{row['test_inference_time']:g}"
    image = axis.imshow(
        np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap=pyplot().get_cmap("viridis").with_extremes(bad="0.85")
    )
    if len(steps) <= 6:
        annotate_cells(axis, image, values, np.vectorize("{:.2f}".format, otypes=[object])(values))
    ticks = [names.get(step, str(step)) for step in steps]
    axis.set_xticks(range(len(steps)), ticks, fontsize=6, rotation=90 if len(steps) > 6 else 0)
    axis.set_yticks(range(len(steps)), ticks, fontsize=6)
    first = members[0]
    layer = "-" if first["layer"] is None else first["layer"]
    fixed = f", {figure.fixed.replace('_', ' ')} {first[figure.fixed]}" if figure.axis == "inference_step" else ""
    if figure.axis == "rollout_step" and first["expert"] == "action":
        fixed = f", t {first['inference_time']:g}" if has_value(first["inference_time"]) else ", every entry"
    axis.set_title(f"{first['expert']} layer {layer}{fixed}\ncode_stability {stability:.2f}", fontsize=7)
    return image


def plot_generalization(rows: list[dict], figure: GeneralizationFigure, stabilities: dict, path: Path) -> int:
    """A grid of train x test accuracy matrices, one per layer (at most MOST_GENERALIZATION_PANELS), one colour scale
    with chance on its bar; return how many panels were left out."""
    plt = pyplot()
    panels = generalization_panels(rows, figure)
    shown = panels[:MOST_GENERALIZATION_PANELS]
    columns = min(6, len(shown))
    lines = math.ceil(len(shown) / columns)
    size = (2.3 * columns + 1.2, 2.4 * lines + 1.0)
    drawing, axes = plt.subplots(lines, columns, figsize=size, squeeze=False, layout="constrained")
    for position, axis in enumerate(axes.flat):
        if position >= len(shown):
            axis.set_axis_off()
            continue
        members = shown[position]
        stability = stabilities[tuple(str(members[0][key]) for key in MATRIX_KEYS)].code_stability
        image = draw_generalization(axis, members, figure, stability)
        if position % columns == 0:
            axis.set_ylabel(f"trained at {figure.label}", fontsize=7)
        if position >= len(shown) - columns:
            axis.set_xlabel(f"tested at {figure.label}", fontsize=7)
    bar = drawing.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    for chance in sorted({float(row["chance_accuracy"]) for row in rows}):
        bar.ax.axhline(chance, color="red", linewidth=2)
    bar.set_label("held-out accuracy (red line: chance)", fontsize=8)
    drawing.suptitle(
        f"Is it the same code? Trained at one {figure.label.split(' (')[0]}, tested at every other (held-out episodes)",
        fontsize=9,
    )
    save_figure(drawing, path)
    return len(panels) - len(shown)


def write_generalization(rows: list[dict], directory: Path) -> tuple[list[Path], list[str]]:
    """generalization.csv and each axis's figure; the paths written, and the printed report's lines."""
    rows.sort(key=lambda row: tuple(str(row[name]) for name in GENERALIZATION_COLUMNS))
    write_atomically(directory / "generalization.csv", csv_bytes(GENERALIZATION_COLUMNS, rows))
    written, stabilities = [directory / "generalization.csv"], code_stabilities(rows)
    lines = stability_lines(stabilities)
    for figure in GENERALIZATION_FIGURES:
        if any(row["axis"] == figure.axis for row in rows):
            left_out = plot_generalization(rows, figure, stabilities, directory / f"{figure.stem}.png")
            written.append(directory / f"{figure.stem}.png")
            if left_out:
                lines.append(f"  {figure.stem}.png: {left_out} more panel(s) in generalization.csv only")
    return written, lines


def add_code_stability(rows: list[dict], stabilities: dict[tuple, Stability]) -> None:
    """Each sweep.csv row's code_stability of its layer along each axis (blank where the sweep did not vary it)."""
    for row in rows:
        for axis in AXIS_NAMES:
            key = tuple(str(value) for value in (*(row[name] for name in MATRIX_KEYS[:-2]), axis, row["layer"]))
            if key in stabilities:
                row[f"code_stability_{axis}"] = stabilities[key].code_stability


def report_table(rows: list[dict]) -> list[str]:
    """The printed table of a report: one line per results file, and the settings that vary between the files (token
    positions, labels, probe, loss, split) at the end of each line, so that no two lines look alike."""
    varying = [name for name in ("feature_type", *SETTING_COLUMNS) if len({str(row[name]) for row in rows}) > 1]
    header = (
        f"{'expert':9} {'layer':>5} {'step':>5} {'infer':>5} {'accuracy':>8} {'95% CI':>15} {'bits':>6} {'control':>7} "
        f"{'p':>6} {'cosine':>7} {'chance':>6} {'samples':>7}{''.join(f'  {name}' for name in varying)}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        interval = (
            f"[{row['accuracy_ci_low']:.2f}, {row['accuracy_ci_high']:.2f}]" if row["accuracy_ci_low"] != "" else ""
        )
        layer = "-" if row["layer"] is None else row["layer"]
        lines.append(
            f"{row['expert']:9} {layer:>5} {row['rollout_step']:>5} {row['inference_step']!s:>5} "
            f"{row['accuracy']:8.4f} "
            f"{interval:>15} {row['information_bits']:6.3f} {blank_or(row['control_accuracy'], 7)} "
            f"{blank_or(row['permutation_p_value'], 6)} {row['cosine_similarity_label_space']:7.4f} "
            f"{row['chance_accuracy']:6.3f} {row['num_samples']:7d}{''.join(f'  {row[name]}' for name in varying)}"
        )
    return lines


def write_report(directory: Path, strict: bool = False) -> str:
    """sweep.csv and by-layer plots from every results file in `directory`; return the printed table. A file that is
    not a readable results file of this version is skipped with a warning (--strict: the report stops)."""
    paths = sorted(directory.glob(RESULTS_NAME.format("*"))) if directory.is_dir() else []
    if not paths:
        raise ProbeError(f"--report {directory}: no {RESULTS_NAME.format('*')} files there")
    rows, concept_rows, cells, generalization_rows = [], [], [], []
    for path in paths:
        try:
            with open_regular(path) as file:
                results = load_restricted(io.BufferedReader(file))
            if results.get("format_version", 0) < RESULTS_FORMAT:
                raise BadFileError(
                    f"{path}: written by an older version of this program (format {results.get('format_version')}); "
                    "rerun it"
                )
            if is_concept_result(results):
                concept_rows += concept_report_rows(results, path)
            else:
                rows.append(report_row(results, path))
                cells.append(null_cell(results))
                generalization_rows += generalization_report_rows(results, rows[-1])
        except (BadFileError, *UNREADABLE) as error:
            reason = str(error)
            if not isinstance(error, BadFileError):
                reason = f"{path}: not a results file of this program ({error or type(error).__name__})"
            if strict:
                raise BadFileError(f"--report: {reason}") from None
            log.warning("skipping %s (--strict makes this fatal)", reason)
    if not rows and not concept_rows:
        raise ProbeError(f"--report {directory}: no readable results files")
    concept_lines = write_concept_report(concept_rows, directory) if concept_rows else []
    if not rows:
        return "\n".join(concept_lines)

    def order(row: dict) -> tuple:
        layer = -1 if row["layer"] is None else row["layer"]
        return row["expert"], row["rollout_step"], str(row["inference_step"]), str(row["feature_type"]), layer

    family_lines = family_corrections(rows, cells)
    rows.sort(key=order)
    generalized, stability = [], []
    if generalization_rows:
        generalized, stability = write_generalization(generalization_rows, directory)
        add_code_stability(rows, code_stabilities(generalization_rows))
    write_atomically(directory / "sweep.csv", csv_bytes(REPORT_COLUMNS, rows))
    written = [directory / "sweep.csv", *generalized]
    layered = [row for row in rows if row["layer"] is not None]
    if layered:
        plot_by_layer(layered, directory)
        written += [directory / "accuracy_by_layer.png", directory / "cosine_by_layer.png"]
        written += write_heatmaps(layered, directory)
    lines = report_table(rows) + family_lines + stability + ["wrote " + ", ".join(str(path) for path in written)]
    return "\n".join(lines + concept_lines)


def plot_training_curves(results: dict, folds: int, path: Path, stem: str) -> None:
    """Each fold's training and validation loss per epoch, the kept epoch marked."""
    history = results["history"]
    figure, axis = pyplot().subplots(figsize=(8, 4.5))
    for fold in range(folds):
        epochs = range(1, int(history["epochs_run"][fold]) + 1)
        (line,) = axis.plot(epochs, history["train_loss"][fold][: len(epochs)], label=f"fold {fold} train")
        validation = history["validation_loss"][fold][: len(epochs)]
        axis.plot(epochs, validation, linestyle="--", color=line.get_color(), label=f"fold {fold} validation")
        axis.axvline(int(history["best_epoch"][fold]), color=line.get_color(), linewidth=0.5)
    loss = result_config(results["config"]).training.loss
    axis.set(xlabel="epoch", ylabel=f"{loss} loss", title=f"Training curves, {stem} (vertical: kept epoch)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def class_names(results: dict) -> tuple[list[str], str]:
    """The classes' tick labels and what they are: task ids; under --labels prompt, the prompt classes' numbers (the
    summary lists their prompts), which need not match the tasks one to one."""
    if results["config"]["labels"].get("label_by") == "prompt":
        return [str(number) for number in range(len(results["tasks"]["class_descriptions"]))], "prompt class"
    return [str(task) for task in results["tasks"]["task_ids"]], "task"


def plot_confusion(results: dict, found: Retrieval, path: Path, stem: str) -> None:
    """The held-out confusion matrix over the analyzed tasks (prompt classes under --labels prompt)."""
    labels, kind = class_names(results)
    figure, axis = pyplot().subplots(figsize=(6.5, 5.5))
    image = axis.imshow(found.confusion_matrix, cmap="Blues")
    title = f"Held-out confusion, {stem}\naccuracy {found.accuracy:.3f} (chance {found.chance_accuracy:.3f})"
    ticks = range(len(labels))
    axis.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=labels,
        yticklabels=labels,
        xlabel=f"predicted {kind}",
        ylabel=f"true {kind}",
        title=title,
    )
    figure.colorbar(image, ax=axis, label="samples")
    save_figure(figure, path)


def plot_similarity(results: dict, path: Path, stem: str) -> None:
    """Each held-out prediction's cosine to every task's embedding, samples grouped by their true task."""
    heldout, (labels, kind) = results["heldout"], class_names(results)
    order = np.argsort(heldout["true_class"], kind="stable")
    figure, axis = pyplot().subplots(figsize=(6.5, 6))
    similarity = heldout["similarity"][order]
    image = axis.imshow(similarity, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axis.set(
        xticks=range(len(labels)),
        xticklabels=labels,
        xlabel=f"{kind} embedding",
        ylabel=f"held-out sample (grouped by true {kind})",
        title=f"Prediction-to-task-embedding cosine, {stem}",
    )
    figure.colorbar(image, ax=axis, label="cosine")
    save_figure(figure, path)


def plot_feature_pca(results: dict, features: np.ndarray, path: Path, stem: str) -> None:
    """The standardized pooled features on their first two principal components, coloured by task."""
    spread = features.std(0)
    centered = (features - features.mean(0)) / np.where(spread > 1e-6, spread, 1.0)
    projected = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    colors = plt.get_cmap("tab20")
    for position, task in enumerate(results["tasks"]["task_ids"]):
        chosen = results["samples"]["task_id"] == task
        axis.scatter(projected[chosen, 0], projected[chosen, 1], s=14, color=colors(position % 20), label=str(task))
    axis.set(xlabel="PC 1", ylabel="PC 2", title=f"Pooled features (standardized), {stem}")
    axis.legend(title="task", fontsize=7, ncol=2)
    save_figure(figure, path)


def write_run_plots(results: dict, features: np.ndarray, output_dir: Path, stem: str) -> None:
    """Training curves, confusion matrix, held-out similarity heatmap and a PCA of the features."""
    held_out = held_out_from(results["metrics"])
    if "train_loss" in results["history"]:  # ridge has no training curves
        plot_training_curves(results, held_out.counts.num_folds, output_dir / f"curves_{stem}.png", stem)
    plot_confusion(results, held_out.retrieval, output_dir / f"confusion_{stem}.png", stem)
    plot_similarity(results, output_dir / f"similarity_{stem}.png", stem)
    plot_feature_pca(results, features, output_dir / f"pca_{stem}.png", stem)


# -----------------------------------------------------------------------------
# Command line and main (main)
# -----------------------------------------------------------------------------

DEMO_DEFAULTS = {
    "rollout_step": [10],
    "expert": "text_only",
    "layer": [5],
    "task_range": [0, 10],
    "episode_range": [0, 6],
}


def bounded(
    kind: type,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
):
    """argparse type: a finite number of the given kind, checked against its bounds."""

    def parse(text: str):
        value = kind(text)
        problem = bound_problem(value, Option("", kind, at_least, above, below, at_most))
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def index_list(words: tuple[str, ...], ranges_kept: bool = False):
    """argparse type factory: '5', '0,5,10', '0-17' (inclusive) or one of `words` ('all', 'each'). With `ranges_kept`
    a range stays a `range`, resolved later to the keys that exist in it (rollout steps are sparse: 10, 20, ...)."""

    def parse(text: str) -> list[int | range] | str:
        if text in words:
            return text
        values: list[int | range] = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
            if not match:
                raise argparse.ArgumentTypeError(f"expected N, N,M,..., N-M or {' or '.join(words)}; got {text!r}")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise argparse.ArgumentTypeError(f"range {part.strip()} runs backwards")
            if ranges_kept and last > first:
                values.append(range(first, last + 1))
                continue
            values += [v for v in range(first, last + 1) if v not in values]
        return values

    return parse


def shard_value(text: str) -> tuple[int, int]:
    """argparse type: INDEX/COUNT with 0 <= INDEX < COUNT."""
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected INDEX/COUNT with 0 <= INDEX < COUNT, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """The options that fill no configuration field: which items a sweep runs, and what is written and printed.
    Declared as fields, like the configurations' (see Option), so that the parser adds every option alike."""

    rollout_step: list[int | range] | str | None = option(
        "environment step N of the key 'step_N' (not a position); several: 10,20, 10-30 (the keys that exist in it) "
        "or all (every step present)",
        default=None,
        type=index_list(("all",), ranges_kept=True),
    )
    layer: list[int] | str | None = option(
        "layer index (0-17 for Pi0; 0 is the input embeddings), checked against the data; several: 0,5,10, 0-17 or all",
        default=None,
        type=index_list(("all",)),
    )
    inference_step: list[int] | str = option(
        "action expert: all = every denoising entry as its own sample, pooled in one result (default); each = one "
        "result per denoising step; K = the K-th (0 = t 1.0, 9 = t 0.1); several: 0,9 or 0-4",
        default="all",
        type=index_list(("all", "each")),
        metavar="{all,each,K,K-L,...}",
    )
    output_dir: str = option("created if missing (default: %(default)s)", default="results/linear_probing")
    skip_existing: bool = option(
        "leave combinations whose two result files exist and were made with the same options and data (resume a "
        "killed sweep)",
        default=False,
    )
    overwrite: bool = option(
        "replace results in --output_dir made with other options (without it, such a result stops the run before "
        "anything is trained, naming what differs; results of changed data are made again anyway)",
        default=False,
    )
    shard: tuple[int, int] | None = option(
        "run only every COUNT-th combination, starting at INDEX (0-based), e.g. from a job array",
        default=None,
        type=shard_value,
        metavar="INDEX/COUNT",
    )
    plot: bool = option(
        "also write each run's training curves, confusion matrix, similarity heatmap and feature PCA (PNG)",
        default=False,
    )
    report: str | None = option(
        "read every results_*.pkl in DIR, write DIR/sweep.csv and accuracy/cosine-by-layer plots, print the table; "
        "nothing else runs",
        default=None,
        metavar="DIR",
    )
    demo: bool = option(
        f"write demo data and a tiny T5 under {DEMO_DIR} (once), then probe it; other options override the demo's",
        default=False,
    )
    verbose: bool = option("log each stage", default=False, flags=("-v", "--verbose"))
    quiet: bool = option("print only warnings and errors: no summary, no progress bars", default=False)


# --help's groups and their options (by field name) in order; a tuple in a group holds options that exclude each other.
OPTION_GROUPS = {
    "what to probe (required unless --demo or --report)": (
        "rollout_step",
        "expert",
        "layer",
        "data_path",
        "task_range",
        "episode_range",
        "feature_type",
        "inference_step",
        "token_range",
        "pooling",
        "tokens",
        "camera",
        "baseline",
        "strict",
        "trust_pickle",
    ),
    "labels": (
        "target",
        "label_by",
        "concepts_file",
        "t5_model",
        "center_labels",
        "label_space",
        "label_dim",
        "cache_dir",
    ),
    "training": (
        "learning_rate",
        "num_epochs",
        "batch_size",
        "seed",
        "patience",
        "validation_fraction",
        "probe",
        "loss",
        "standardize",
    ),
    "evaluation": ("cv_folds", "split", "control", "permutations", "repeats", "mdl", "bootstrap", "generalize"),
    "output": ("output_dir", "skip_existing", "overwrite", "shard", "plot", "report", "demo", ("verbose", "quiet")),
}


def add_option(group, field: dataclasses.Field) -> None:
    """Add a field's option to a group of the parser (see Option)."""
    spec = field.metadata["option"]
    default = None if spec.derived or field.default is dataclasses.MISSING else field.default
    if isinstance(default, bool):  # a switch: --<field> turns the field on, --no_<field> off when on by default
        name = f"--no_{field.name}" if default else f"--{field.name}"
        action = "store_false" if default else "store_true"
        group.add_argument(*(spec.flags or (name,)), dest=field.name, action=action, help=spec.help)
        return
    parse = spec.type
    if parse in (int, float):
        parse = bounded(parse, spec.at_least, spec.above, spec.below, spec.at_most)
    needs = {"type": parse, "choices": spec.choices, "metavar": spec.metavar, "nargs": spec.nargs}
    given = {need: value for need, value in needs.items() if value is not None}
    flags = spec.flags or (f"--{field.name}",)
    group.add_argument(*flags, dest=field.name, default=default, help=spec.help, **given)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: the guide's options plus ours, each from its field (see Option)."""
    parser = argparse.ArgumentParser(
        description="Linear probe from one layer of a Pi0 expert to the T5 embedding of the task instruction, "
        "evaluated on held-out episodes. "
        "Several layers, rollout steps or denoising steps make a sweep: one result pair per combination, trained "
        "together.",
    )
    fields = {
        field.name: field
        for config in (Source, LabelConfig, TrainingConfig, CommandOptions)
        for field in dataclasses.fields(config)
        if "option" in field.metadata
    }
    for title, names in OPTION_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            if isinstance(name, tuple):
                exclusive = group.add_mutually_exclusive_group()
                for one in name:
                    add_option(exclusive, fields[one])
            else:
                add_option(group, fields[name])
    return parser


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check options; exit 2 with a one-line message on a bad combination."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        return args
    if args.expert == "visual" and args.layer is None:
        args.layer = [None]  # SigLIP's output has no layers
    if args.demo:
        for name, value in {**DEMO_DEFAULTS, **(DEMO_CODES_DEFAULTS if args.generalize else {})}.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.data_path = args.data_path or str(DEMO_CODES_DIR if args.generalize else DEMO_DIR)
        if args.t5_model == parser.get_default("t5_model"):
            args.t5_model = str(Path(args.data_path) / "t5_tiny")
    missing = [
        f"--{name}"
        for name in ("rollout_step", "expert", "layer", "data_path", "task_range", "episode_range")
        if getattr(args, name) is None
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    for name in ("task_range", "episode_range", "token_range"):
        if getattr(args, name) is not None and args.__dict__[name][0] >= args.__dict__[name][1]:
            start, end = getattr(args, name)
            parser.error(f"--{name} {start} {end}: END must be greater than START (the range is end-exclusive)")
    if args.baseline and args.target == "concepts":
        parser.error("--baseline applies to --target t5")
    if args.generalize and args.target == "concepts":
        parser.error(
            "--generalize applies to --target t5: it scores each cell's probe by task retrieval at other steps"
        )
    if args.generalize and args.label_by != "task":  # a step's prompt classes need not be another step's
        parser.error(
            f"--generalize scores every step's samples by their task: it does not apply to --labels {args.label_by}"
        )
    if args.generalize and args.baseline:  # conditional probing deals its folds per step, not over the sweep
        parser.error("--generalize and --baseline: run the conditional probe without --generalize")
    if args.baseline and args.baseline[0] == "action" and args.expert != "action":
        parser.error("--baseline action:L needs --expert action: its denoising entries pair with the probed ones")
    args.split = args.split or ("task" if args.target == "concepts" else "episode")
    try:
        check_configs(config_from(LabelConfig, args), config_from(TrainingConfig, args))
    except OptionError as error:
        parser.error(str(error))
    if args.inference_step != "all" and args.expert != "action":
        parser.error(f"--inference_step applies to --expert action only, not {args.expert}")
    if args.expert == "visual" and args.layer != [None]:
        parser.error("--layer does not apply to --expert visual: SigLIP's output (vision_latents) has no layer axis")
    if args.expert != "visual" and args.camera != parser.get_default("camera"):
        parser.error("--camera applies to --expert visual only")
    if args.tokens == "prompt" and (args.expert not in PROMPT_EXPERTS or args.token_range):
        parser.error(
            f"--tokens prompt applies to --expert {' or '.join(PROMPT_EXPERTS)} without --token_range: it drops "
            "the padding of the prompt's text positions"
        )
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Refuse path options that would fail only after the work is done (OptionError: one line, exit 2)."""
    if args.report:
        return
    if unwritable_reason(Path(args.output_dir)):
        raise OptionError(f"--output_dir {args.output_dir}: {unwritable_reason(Path(args.output_dir))}")
    if not args.demo and missing_model_directory(args.t5_model):  # --demo makes its own T5
        raise OptionError(missing_model_directory(args.t5_model))


def config_from(config: type, args: argparse.Namespace, **derived):
    """The configuration whose fields the parsed options of the same name fill; `derived` gives the others."""
    named = {one.name: getattr(args, one.name) for one in dataclasses.fields(config) if hasattr(args, one.name)}
    return config(**{**named, **derived})


def configs_from_arguments(args: argparse.Namespace) -> tuple[Source, LabelConfig, TrainingConfig]:
    """Turn parsed options into the three configurations; the items (layer, step, denoising step) come from the data
    (sweep_items)."""
    source = config_from(
        Source,
        args,
        task_range=tuple(args.task_range),
        episode_range=tuple(args.episode_range),
        feature_type=args.feature_type or ("pre_logits" if args.expert == "visual" else "hidden_states"),
        token_range=tuple(args.token_range) if args.token_range else None,
        index_dir=str(Path(args.cache_dir) / "file_index"),
    )
    return source, config_from(LabelConfig, args), config_from(TrainingConfig, args)


@dataclasses.dataclass
class Progress:
    """How far a run got: what an interrupted run says."""

    total: int | None = None  # the combinations this job writes, once they are known
    written: int = 0

    def count(self) -> None:
        """One more result written: called with Ctrl-C held, as its files are renamed into place, so that an
        interruption never reports one result fewer than it left (see write_together)."""
        self.written += 1

    def interrupted(self) -> str:
        """The line an interrupted run ends with."""
        if self.total is None:
            return "interrupted before any result was written; rerun to start again"
        return f"interrupted after {self.written} of {self.total} combination(s); rerun with --skip_existing to finish"


def run(args: argparse.Namespace, command: list[str], started: float, progress: Progress) -> list[tuple]:
    """Walk the task files once and resolve the sweep, then read, train, evaluate and write one rollout step at a
    time; return what was written (a sweep's results without their per-sample parts)."""
    if args.demo:
        prepare_demo(Path(args.data_path), codes=args.generalize)
    source, labels, training = configs_from_arguments(args)
    made_with = run_made_with(source, labels, training)  # checks --data_path, though nothing may be read
    named = sweep_items(source, args.layer, args.rollout_step, "all", ReadReport()) if named_by_options(args) else []
    finished = False  # every combination written: then no file is read
    if named:  # which are left is known before any file is read: results of other options stop the run here
        resume = left_to_run(args, named, source, {}, made_with)
        finished = not resume.items
        settle_existing(resume, args, warn=finished)
    highest_layer = None if args.layer in ("all", [None]) else max(args.layer)
    dataset = None if finished else read_dataset(source, args.rollout_step, highest_layer)
    if dataset and labels.label_by != "task":
        check_prompts(dataset)
    items = resolve_sweep(args, dataset, labels, training, made_with) if dataset else []
    progress.total = len(items)
    if not items:
        log.warning("nothing to do: no combination is left for this shard, or all are already written")
        return []
    destination = Destination(Path(args.output_dir), args.plot, started, command, made_with, args.overwrite, progress)
    written = []
    if training.generalize:  # every step read before a result is written: see generalized_sweep
        cells = sweep_items(source, args.layer, args.rollout_step, args.inference_step, dataset.report)
        for results, *paths in generalized_sweep(items, cells, dataset, labels, training, destination):
            written.append((without_per_sample_parts(results, len(items)), *paths))
        return written
    for step in sorted({item.rollout_step for item in items}):
        # One rollout step at a time: memory follows one step's features, not the sweep's. Its slices are cut from
        # the arrays the walk kept (a file that cannot be mapped is read again).
        step_items = [item for item in items if item.rollout_step == step]
        layers = sorted({item.layer for item in step_items}, key=lambda layer: -1 if layer is None else layer)
        samples = step_samples(dataset, layers, step)
        check_step_prompts(samples, dataset, step, labels)
        for file in dataset.files:  # the step's array views are not needed again
            file.steps.pop(step, None)
        tasks, width = len(np.unique(samples.task_id)), samples.features.shape[2]
        log.info("step %d: %d combination(s), %d tasks, width %d", step, len(step_items), tasks, width)
        for results, *paths in run_sweep(step_items, dataset, samples, layers, labels, training, destination):
            written.append((without_per_sample_parts(results, len(items)), *paths))
        del samples
        release_freed_memory()  # before the next step is read
    return written


def outcome_line(results: dict) -> str:
    """A result in one line: the headline numbers."""
    if is_concept_result(results):
        concepts = concepts_held_out_from(results)
        return f"{concepts.num_concepts} concepts, mean balanced accuracy {concepts.mean_balanced_accuracy:.4f}"
    held_out = held_out_from(results["metrics"])
    found, information = held_out.retrieval, held_out.information
    line = (
        f"accuracy {found.accuracy:.4f} (chance {found.chance_accuracy:.4f}), information "
        f"{information.information_bits:.3f} of {information.max_information_bits:.3f} bits"
    )
    if held_out.control is not None and held_out.control.permutation_p_value is not None:
        line += f", permutation p {held_out.control.permutation_p_value:.3f}"
    return line


def print_outcome(written: list[tuple[dict, Path, Path]], args: argparse.Namespace) -> None:
    """One result: its summary; several: one line each. The demo adds what it planted."""
    if len(written) == 1:
        print(format_summary(written[0][0]))
    else:
        for results, results_path, _ in written:
            print(f"{results_path.name}: {outcome_line(results)}")
    if args.demo and args.generalize:
        codes = ", ".join(f"layer {layer} {kind}" for layer, kind in DEMO_CODES.items())
        print(
            f"Demo: task directions planted {codes} over the rollout steps and denoising steps; one direction per task "
            f"in every other layer (none in layer {DEMO_SILENT_LAYER}). Then --report {args.output_dir}."
        )
    elif args.demo:
        print(
            f"Demo: planted task signal (in units of episode noise) text tokens {DEMO_SIGNAL['text']}, image tokens "
            f"{DEMO_SIGNAL['image']}, action expert {DEMO_SIGNAL['action']}; none in layer {DEMO_SILENT_LAYER}. "
            "Compare --expert vlm, --expert action, --layer 3."
        )


def tell(line: str, status: int) -> int:
    """Print one line for the user on stderr (nothing if stderr is gone); return the exit status."""
    with contextlib.suppress(OSError):
        print(f"{Path(sys.argv[0]).name}: {line}", file=sys.stderr)
    return status


class Stopped(KeyboardInterrupt):
    """Ctrl-C, or a scheduler's SIGTERM: the run stops where Python next runs, writing no half pair."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # as a shell reports a process the signal ended: 130, 143


@contextlib.contextmanager
def interruptible():
    """Ctrl-C and SIGTERM raise Stopped where Python next runs (after a compiled call): the pair being written is
    removed whole and the run ends in one line. The same signal again ends the process at once."""

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        raise Stopped(signum)

    with stop_signals_to(stop):
        yield


COMPILE_CACHE_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry for '([^']+)': (.*)")


def remove_unreadable_cache_entries(directory: Path, name: str, settled_seconds: float) -> int:
    """Remove the compile-cache entries of program `name` that JAX's own reader cannot decompress, last written at
    least `settled_seconds` ago; return how many (none without that reader, a private function that may move)."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return 0
    removed = 0
    for path in directory.glob(f"{glob.escape(name)}-*-cache"):
        try:
            if time.time() - path.stat().st_mtime < settled_seconds:
                continue
            decompress_executable(path.read_bytes())
            continue
        except OSError:  # gone meanwhile
            continue
        except Exception:  # a stream cut short: zlib.error, ZstdError...
            pass
        path.unlink(missing_ok=True)
        path.with_name(path.name.removesuffix("-cache") + "-atime").unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def compile_cache_repaired(args: argparse.Namespace):
    """JAX's warning about a compile-cache entry it cannot read or write, as one line of ours; the entries of that
    program that cannot be decompressed are removed, to be compiled and cached anew."""
    # JAX writes an entry in place and never rewrites one it finds: a write cut short (a full disk) leaves an entry it
    # refuses, with a warning, on every later run.
    directory = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path(args.cache_dir) / "jax")
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message="Error (reading|writing) persistent compilation cache entry")
        shown, said = warnings.showwarning, set()

        def show(message, category, filename, lineno, file=None, line=None):
            match = COMPILE_CACHE_ERROR.match(str(message))
            if match is None:
                return shown(message, category, filename, lineno, file, line)
            action, name, reason = match.groups()
            program = name.split("-")[0]  # a message names the program, or one entry's key
            # A write of ours just failed: its entry goes at once. One that fails to read may be another run's, still
            # being written: only entries left alone for a minute go.
            removed = remove_unreadable_cache_entries(directory, program, 0 if action == "writing" else 60)
            if (action, program) in said and not removed:  # one line per program and run, not one per compilation
                return
            said.add((action, program))
            outcome = "compiled and cached anew" if removed else "if this warning repeats, remove the directory"
            log.warning(
                "compile cache %s: JAX could not %s an entry of %s (%s); removed %d entr(ies) that cannot be "
                "decompressed: %s",
                directory,
                action.removesuffix("ing"),
                program,
                reason,
                removed,
                outcome,
            )

        warnings.showwarning = show
        yield


def run_command(args: argparse.Namespace, command: list[str], progress: Progress) -> int:
    """--report, or a run: its results written and their summary (or one line each) printed."""
    started, started_at = time.perf_counter(), time.time()
    check_paths(args)
    if args.report:
        remove_stale_temporaries(Path(args.report), started_at)
        table = write_report(Path(args.report), args.strict)
        if not args.quiet:
            print(table)
            sys.stdout.flush()  # a closed pipe is met here, not in Python's flush at exit
        return 0
    for directory in (Path(args.output_dir), Path(args.cache_dir) / "t5_labels", Path(args.cache_dir) / "file_index"):
        remove_stale_temporaries(directory, started_at)
    written = run(args, command, started, progress)
    if not args.quiet:
        print_outcome(written, args)
        sys.stdout.flush()  # a closed pipe is met here, not in Python's flush at exit
        print(
            f"done in {time.perf_counter() - started:.1f} s: {len(written)} result pair(s) in {args.output_dir}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the program; return the exit status. Every failure a user can meet ends in one line: a bad option (2), a
    data or writing problem (1), Ctrl-C (130) or SIGTERM (143); a closed pipe (`| head`) ends quietly (141)."""
    for name in ("stdout", "stderr"):  # started with it closed (`>&-`): written to nowhere, as if to /dev/null
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    args = parse_arguments(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", force=True)  # other libraries: warnings only
    log.setLevel(logging.INFO)
    if args.verbose:
        log.setLevel(logging.DEBUG)
    elif args.quiet:
        log.setLevel(logging.WARNING)
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 (held as surrogates) prints as \udcff escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    cache_problem = None if args.report else unwritable_reason(Path(args.cache_dir))
    if cache_problem:  # one line of ours, not JAX's multi-line warning nor one per file
        log.warning(
            "--cache_dir %s: %s; T5 labels, file indexes and compiled programs will not be cached",
            args.cache_dir,
            cache_problem,
        )
    elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # repeated runs in a bash loop reuse the compiled probe
        jax.config.update("jax_compilation_cache_dir", str(Path(args.cache_dir) / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    progress = Progress()
    try:
        with interruptible(), compile_cache_repaired(args):
            return run_command(args, list(sys.argv if argv is None else argv), progress)
    except ProbeError as error:
        return tell(f"error: {error}", error.exit_code)
    except KeyboardInterrupt as stopped:  # Stopped, or Ctrl-C before the handler was in place
        status = getattr(stopped, "exit_code", 130)
        return tell("interrupted; the report was not finished" if args.report else progress.interrupted(), status)
    except BrokenPipeError:  # the reader of our output went away: nothing to say, and no one to say it to
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit stays quiet
        return 141
    except OSError as error:  # a disk or file-system failure outside the result files (figures, --report's files)
        log.debug("where it failed:", exc_info=True)  # -v: the traceback, should it be ours
        where = f": {error.filename}" if error.filename else ""
        return tell(f"error: {error.strerror or error}{where}", 1)
    except MemoryError:
        return tell("error: out of memory; use fewer tasks, episodes, layers or rollout steps per run", 1)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return tell(
            "error: the accelerator ran out of memory; run fewer layers or denoising steps per command, or on the CPU "
            "(CUDA_VISIBLE_DEVICES=)",
            1,
        )


# -----------------------------------------------------------------------------
# Appendix A: the restricted, memory-mapped pickle reader (no code runs from a data file)
# -----------------------------------------------------------------------------

# Globals a latent pickle may name. Anything else (os.system, builtins.eval, ...) is
# refused before it can run: data files never execute code.
SAFE_GLOBALS = (
    {
        ("builtins", name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "complex", "slice")
    }
    | {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocols 0-2 write bytes as latin-1 text
    }
    | {
        ("ml_dtypes", name)
        for name in ("bfloat16", "float8_e4m3fn", "float8_e4m3b11fnuz", "float8_e5m2", "int4", "uint4")
    }
)

MAPPED_PAYLOAD_BYTES = 4096  # payloads from one page up are mapped, not read
# What reading a damaged or hostile pickle can raise (restricted, so nothing else runs).
UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    KeyError,
    IndexError,
    struct.error,
    RecursionError,
    OSError,
    MemoryError,
)


class BadFileError(ProbeError):
    """A task file that cannot be used: skipped with a warning, fatal under --strict."""


@dataclasses.dataclass(frozen=True)
class FileRegion:
    """A byte payload left in the file: where it starts and how long it is."""

    offset: int
    length: int


class PendingArray:
    """What numpy's `_reconstruct` returns while a file is read; the following BUILD fills in the array once its dtype
    and shape are checked against the payload (replace_arrays then puts the array in its place)."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        _version, shape, dtype, _fortran_order, data = state
        check_array_layout(dtype, shape, data)
        self.array = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
        self.array.__setstate__(state)


def check_array_layout(dtype, shape, payload) -> None:
    """Refuse an array that does not fit its payload (bytes, their FileRegion, or an object array's list): a shape
    declaring more than the file holds, or a zero-size dtype with a huge shape, would otherwise become gigabytes when
    the array is used."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 0 or (dtype.hasobject and dtype != np.dtype(object)):
        raise pickle.UnpicklingError(f"an array of dtype {dtype} holds no data of its own")
    if any(not isinstance(size, int) or size < 0 for size in shape):
        raise pickle.UnpicklingError(f"an array has a malformed shape {tuple(shape)}")
    if dtype.hasobject:  # its elements came through the allow-list, one list entry each
        fits = isinstance(payload, list) and len(payload) == math.prod(shape)
    elif isinstance(payload, FileRegion):
        fits = payload.length == math.prod(shape) * dtype.itemsize
    else:
        fits = isinstance(payload, bytes | bytearray) and len(payload) == math.prod(shape) * dtype.itemsize
    if not fits:
        raise pickle.UnpicklingError(f"an array of shape {tuple(shape)} and dtype {dtype} does not fit its payload")


def checked_frombuffer(unpickler, frombuffer):
    """numpy's `_frombuffer` (protocol 5's array reconstructor): a payload left in the file is mapped (see
    MappingUnpickler), one read is checked and handed to numpy."""

    def build(buffer, dtype, shape, order):
        if isinstance(buffer, FileRegion):
            return unpickler.mapped_array(buffer, dtype, shape, order)
        check_array_layout(dtype, shape, buffer)
        return frombuffer(buffer, dtype, shape, order)

    return build


COPYING_CONSTRUCTORS = {("builtins", name) for name in ("list", "tuple", "set", "frozenset", "dict")} | {
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
}


def counted(unpickler, constructor):
    """A container constructor for a pickle, whose copies count against the unpickler's budget (the file's size in
    elements): calling list() on one shared million-element list 300 times would otherwise fill memory from a file of
    megabytes. bytes and bytearray are made from data, never from a size (bytes(10**12) is 1 TB of zeros)."""

    def build(*args):
        if constructor in (bytes, bytearray) and args and isinstance(args[0], int):
            raise pickle.UnpicklingError(f"refused {constructor.__name__}({args[0]}): a size, not data")
        unpickler.copies_left -= sum(len(argument) for argument in args if hasattr(argument, "__len__"))
        if unpickler.copies_left < 0:
            raise pickle.UnpicklingError(f"its {constructor.__name__}() calls copy more elements than the file holds")
        return constructor(*args)

    return build


def not_called(name: str):
    """numpy.ndarray as a pickle may name it: the class _reconstruct is handed, never called to allocate by shape."""

    def refuse(*args):
        raise pickle.UnpicklingError(f"refused {name}{args}: arrays are made from their data, not allocated by shape")

    return refuse


def copy_budget(file) -> int:
    """The most container elements a pickle of this file's size can hold, with room for the small ones."""
    try:
        return os.fstat(file.fileno()).st_size + 2**20
    except (OSError, AttributeError, io.UnsupportedOperation):
        return 2**30


def refuse_or_import(unpickler: pickle.Unpickler, module: str, name: str, trust: bool):
    """Resolve an allow-listed global (or any, when trusted); refuse the rest before it runs."""
    # Protocols 0-2 name Python 2 modules (__builtin__.bytes); check what they map to.
    checked = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    if not trust and checked not in SAFE_GLOBALS:
        raise pickle.UnpicklingError(
            f"refused global {'.'.join(checked)}: not a data type (--trust_pickle lifts this, unsafely)"
        )
    found = super(type(unpickler), unpickler).find_class(module, name)
    if checked[1] == "_reconstruct" and checked[0].endswith("multiarray"):
        return lambda cls, shape, typecode: PendingArray()
    if checked[1] == "_frombuffer" and checked[0].endswith("numeric"):
        return checked_frombuffer(unpickler, found)
    if trust:  # the file's own code runs anyway
        return found
    if checked == ("numpy", "ndarray"):
        return not_called("numpy.ndarray")
    if checked in COPYING_CONSTRUCTORS:
        return counted(unpickler, found)
    return found


class RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler with the allow-list: reads every byte (used for protocols 0-2)."""

    def __init__(self, file, trust: bool = False):
        super().__init__(file)
        self.trust, self.copies_left = trust, copy_budget(file)

    def find_class(self, module: str, name: str):
        return refuse_or_import(self, module, name, self.trust)


class MappingUnpickler(pickle._Unpickler):
    """Walks the opcode stream, seeking past large byte payloads and mapping arrays onto them.

    The small object graph (dicts, lists, strings, numbers) is built as pickle.load would;
    every array whose bytes lie outside a protocol-4/5 frame becomes a read-only view of
    the file's memory map, so indexing it reads only the pages touched.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, mapped: mmap.mmap, trust: bool = False):
        super().__init__(file)
        self.file, self.mapped, self.trust = file, mapped, trust
        self.file_size, self.copies_left = len(mapped), copy_budget(file)
        self.mapped_specs: dict[int, tuple] = {}  # id(array) -> its index entry

    def find_class(self, module: str, name: str):
        return refuse_or_import(self, module, name, self.trust)

    def payload(self, length: int) -> bytes | FileRegion:
        """Read a byte payload, or note where it lies and seek past it."""
        frame = self._unframer.current_frame
        in_frame = frame is not None and frame.tell() < len(frame.getbuffer())
        if in_frame or length < MAPPED_PAYLOAD_BYTES:
            data = self.read(length)
            if len(data) < length:
                raise pickle.UnpicklingError(f"truncated: a {length}-byte payload ends early")
            return data
        offset = self.file.tell()
        if offset + length > self.file_size:
            raise pickle.UnpicklingError(
                f"truncated: a {length}-byte payload at byte {offset} runs past the end of the file ({self.file_size} "
                "bytes)"
            )
        self.file.seek(length, io.SEEK_CUR)
        return FileRegion(offset, length)

    def load_binbytes(self):
        (length,) = struct.unpack("<I", self.read_exactly(4))
        self.append(self.payload(length))

    def load_binbytes8(self):
        (length,) = struct.unpack("<Q", self.read_exactly(8))
        self.append(self.payload(length))

    def load_bytearray8(self):
        (length,) = struct.unpack("<Q", self.read_exactly(8))
        data = self.payload(length)
        self.append(bytearray(data) if isinstance(data, bytes) else data)

    def read_exactly(self, count: int) -> bytes:
        data = self.read(count)
        if len(data) < count:
            raise pickle.UnpicklingError("truncated: the file ends inside an opcode")
        return data

    def load_build(self):
        state, instance = self.stack[-1], self.stack[-2]
        if not isinstance(instance, PendingArray):
            return super().load_build()
        self.stack.pop()
        _version, shape, dtype, fortran_order, data = state
        if isinstance(data, FileRegion):
            instance.array = self.mapped_array(data, dtype, shape, "F" if fortran_order else "C")
        else:  # small payload: numpy's own reconstruction, as pickle.load does
            instance.__setstate__(state)
        self.stack[-1] = instance.array

    def mapped_array(self, region: FileRegion, dtype, shape, order: str) -> np.ndarray:
        """A read-only array over a payload's bytes in the memory map."""
        check_array_layout(dtype, shape, region)
        dtype = np.dtype(dtype)
        array = np.ndarray(shape, dtype=dtype, buffer=self.mapped, offset=region.offset, order=order)
        self.mapped_specs[id(array)] = (MAPPED_ARRAY, region.offset, dtype, tuple(shape), order)
        return array

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BUILD[0]] = load_build


MAPPED_ARRAY = "\x00mapped array"  # marks (MAPPED_ARRAY, offset, dtype, shape, order) in a file index
INDEX_FORMAT = 2  # 2: keyed by ctime and the content at both ends too


def is_mapped_spec(value) -> bool:
    """Whether an index entry stands for a mapped array."""
    return isinstance(value, tuple) and len(value) == 5 and isinstance(value[0], str) and value[0] == MAPPED_ARRAY


def replace_arrays(value, replace, memo: dict | None = None):
    """Copy of a small object graph with each leaf (array, placeholder, ...) passed through `replace`. An object reached
    twice is copied once, as pickle's memo shares it: a graph of shared references (a = [a, a], 40 times) stays the
    size of its file instead of growing to 2^40 nodes, and a container that holds itself is copied once."""
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, dict):
        copy = memo[id(value)] = type(value)()  # an OrderedDict stays one
        copy.update((key, replace_arrays(item, replace, memo)) for key, item in value.items())
        return copy
    if isinstance(value, list):
        copy = memo[id(value)] = []
        copy.extend(replace_arrays(item, replace, memo) for item in value)
        return copy
    if isinstance(value, tuple) and not is_mapped_spec(value):
        items = tuple(replace_arrays(item, replace, memo) for item in value)
        return memo.setdefault(id(value), items)  # a copy made on the way (the tuple reached through itself) wins
    copy = memo[id(value)] = replace(value)
    return copy


def resolve_pending(value, mapped: mmap.mmap | None = None):
    """A placeholder left in the graph (a shared array reference, a raw payload) replaced by its value."""
    if isinstance(value, PendingArray):
        if value.array is None:
            raise pickle.UnpicklingError("an array was never filled in")
        return value.array
    if isinstance(value, FileRegion):
        return bytes(mapped[value.offset : value.offset + value.length])
    return value


def load_restricted(file, trust: bool = False):
    """pickle.load through the allow-list, with numpy arrays checked (see check_array_layout)."""
    return replace_arrays(RestrictedUnpickler(file, trust).load(), resolve_pending)


def open_regular(path: Path) -> io.FileIO:
    """Open a file to read, if it is a regular file (a link to one is fine): a FIFO would block the run, a device such
    as /dev/zero never ends, a directory holds no pickle. Opened without blocking, then checked."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise BadFileError(f"{path}: cannot open it ({error.strerror})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO"}.get(stat.S_IFMT(mode), "a device or socket")
        raise BadFileError(f"{path}: not a regular file ({kind})")
    os.set_blocking(descriptor, True)
    return io.FileIO(descriptor, "rb")


DIGEST_BYTES = 64 * 1024  # hashed at each end of a file: a rewrite that keeps size and times still changes these


def content_digest(file: io.FileIO) -> str:
    """sha256 of a file's size and its first and last DIGEST_BYTES: two reads, whatever the file's size."""
    size = os.fstat(file.fileno()).st_size
    digest = hashlib.sha256(str(size).encode())
    for offset in (0, max(0, size - DIGEST_BYTES)):
        digest.update(os.pread(file.fileno(), DIGEST_BYTES, offset))
    return digest.hexdigest()


def index_file_for(path: Path, file: io.FileIO, index_dir: str) -> Path:
    """Where the index of this exact file version lives: keyed by path, size, modification and change times, inode,
    and the content at both ends. ctime cannot be set back by a writer, so a file rewritten in place with its size,
    inode and mtime restored gets a new index, as does one whose ends changed."""
    version = FileVersion.of(os.fstat(file.fileno()))
    key = json.dumps([str(path.resolve()), *version, content_digest(file), INDEX_FORMAT])
    return Path(index_dir) / f"{hashlib.sha256(key.encode()).hexdigest()}.pkl"


def read_task_file(path: Path, trust: bool = False, index_dir: str | None = None) -> dict:
    """Read a task pickle's structure; arrays are read-only views that load only what is indexed.

    Protocols 3-5 are mapped, and the structure (where each array lies) is saved in
    `index_dir`, so the next run reads none of the file but the slices it indexes.
    Protocols 0-2 store bytes as text, so such a file is read whole (still restricted).
    """
    try:
        with open_regular(path) as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise BadFileError(f"{path}: empty file")
            if not mappable(path):
                data = load_restricted(io.BufferedReader(file), trust)
            else:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead between headers
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
                if hasattr(mapped, "madvise"):  # fault in only the pages indexed: read-ahead read 20x more here
                    mapped.madvise(mmap.MADV_RANDOM)
                index_file = index_file_for(path, file, index_dir) if index_dir else None
                data = read_index(index_file, mapped, trust) if index_file else None
                if data is None:
                    unpickler = MappingUnpickler(file, mapped, trust)
                    data = replace_arrays(unpickler.load(), lambda value: resolve_pending(value, mapped))
                    if index_file:
                        write_index(index_file, replace_arrays(data, lambda v: unpickler.mapped_specs.get(id(v), v)))
    except BadFileError:
        raise
    except UNREADABLE as error:
        reason = str(error) or type(error).__name__
        if isinstance(error, KeyError | IndexError):  # a memo or stack index the stream never set: "0" says nothing
            reason = f"malformed ({type(error).__name__} {error})"
        if isinstance(error, EOFError):
            reason = "truncated: the file ends before the pickle's STOP"
        if isinstance(error, MemoryError):
            reason = "out of memory while reading it"
        raise BadFileError(f"{path}: not a readable latent pickle: {reason}") from None
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), dict):
        raise BadFileError(f"{path}: not a task file: expected a dict with an 'episodes' dict")
    return data


def mappable(path: Path) -> bool:
    """Whether a pickle's arrays can be mapped: protocols 3-5 (0-2 store bytes as text: such a file is read whole)."""
    with open_regular(path) as file:
        # No read-ahead: it would leave a marker that makes the index key's digest of the first pages read 1.5 MB.
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        header = file.read(2)
    return len(header) == 2 and header[:1] == pickle.PROTO and header[1] >= 3


def read_index(index_file: Path, mapped: mmap.mmap, trust: bool) -> dict | None:
    """The file's structure from its index, arrays mapped again; None when there is no usable index."""
    try:
        with open(index_file, "rb") as file:
            skeleton = load_restricted(file, trust)
    except FileNotFoundError:
        return None
    except Exception as error:  # a damaged index costs a re-read, never a wrong number
        log.debug("ignoring index %s: %s", index_file, error)
        return None

    def mapped_view(value):
        if is_mapped_spec(value):
            _, offset, dtype, shape, order = value
            return np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offset, order=order)
        return value

    return replace_arrays(skeleton, mapped_view)


def write_index(index_file: Path, skeleton: dict) -> None:
    """Save a file's structure; a cache that cannot be written costs time only."""
    if unwritable_reason(index_file.parent):  # main has warned once about --cache_dir
        return
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(index_file, pickle.dumps(skeleton, protocol=4))
    except OSError as error:
        log.warning("could not write the file index %s: %s", index_file, error)


def file_map(view: np.ndarray) -> mmap.mmap | None:
    """The memory map under a view of a task file (None for other arrays, or where madvise is missing)."""
    root = view
    while isinstance(root, np.ndarray):
        root = root.base
    return root if isinstance(root, mmap.mmap) and hasattr(root, "madvise") else None


def let_go_of_file(view: np.ndarray) -> None:
    """Let go of every page of the file mapped into this process: the kernel maps pages next to those touched
    (fault-around), which the per-batch MADV_DONTNEED does not cover. They stay in the page cache."""
    root = file_map(view)
    if root is not None:
        root.madvise(mmap.MADV_DONTNEED)


def advise(view: np.ndarray, advice: int) -> None:
    """madvise the pages under a mapped view: MADV_WILLNEED reads them in large requests (cold, page-by-page faults
    are slow); MADV_DONTNEED lets them go from this process (they stay in the page cache). Other arrays: nothing."""
    root = file_map(view)
    if root is None or view.size == 0:
        return
    start, end = np.lib.array_utils.byte_bounds(view)
    base = np.frombuffer(root, dtype=np.uint8).ctypes.data
    offset = start - base - (start - base) % mmap.PAGESIZE
    root.madvise(advice, offset, end - base - offset)


# -----------------------------------------------------------------------------
# Appendix B: demo data: the real layout at small widths, with a planted task signal
# -----------------------------------------------------------------------------

DEMO_DESCRIPTIONS = [
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the salad dressing and place it in the basket",
    "pick up the bbq sauce and place it in the basket",
    "pick up the ketchup and place it in the basket",
    "pick up the tomato sauce and place it in the basket",
    "pick up the butter and place it in the basket",
    "pick up the milk and place it in the basket",
    "pick up the chocolate pudding and place it in the basket",
    "pick up the orange juice and place it in the basket",
]
# Task signal added to every token of a region, in units of the per-episode noise
# (std 1, shared by all tokens of an episode, so pooling cannot average it away).
DEMO_SIGNAL = {"text": 3.0, "image": 1.0, "action": 0.5}
DEMO_SILENT_LAYER = 3  # no task signal anywhere in this layer
DEMO_CAMERA_SIGNAL = {
    "base_0_rgb": 1.0,
    "left_wrist_0_rgb": 0.5,
    "right_wrist_0_rgb": 0.0,
}  # SigLIP output (vision_latents)
DEMO_TIMES = [round(1.0 - 0.1 * k, 1) for k in range(10)]  # denoising order: 1.0 ... 0.1
DEMO_PAD_SEED = 7  # draws the pad token's embedding: one vector at every padded position of every sample's layer 0


class DemoPrompts(NamedTuple):
    """write_demo_dataset's counterfactual prompts and planted padding. A step's text tokens follow the prompt it ran
    under (a text direction of the prompt's task, not the scene's), its image tokens the scene (the task's own)."""

    swapped: bool = True  # odd episodes run under the next task's description as step['prompt']
    lengths: tuple[int, ...] | None = None  # text tokens of each task's description, of 48 (None: 48, no padding)
    # Scene signal at the padded positions of layers >= 1, in DEMO_SIGNAL's units: openpi's padded query has no valid
    # key, so its output averages every position, images included.
    padding_scene: float = 0.0
    scene: float = DEMO_SIGNAL["image"]  # scene signal of the image tokens


def demo_prompt_entry(
    rng: np.random.Generator, scene: np.ndarray, text: np.ndarray, length: int, prompts: DemoPrompts, num_layers: int
) -> dict:
    """A counterfactual-prompt step's VLM entry: image tokens carry the `scene` direction, the first `length` text
    tokens the `text` one; the padded text positions hold the pad token's embedding at layer 0 and, at later layers,
    one vector per layer (the episode's, plus prompts.padding_scene times the scene)."""
    width = scene.shape[0]
    layer_gain = np.ones(num_layers, dtype=np.float32)
    layer_gain[DEMO_SILENT_LAYER] = 0.0
    signal = np.zeros((PREFIX_TOKEN_COUNT, width), dtype=np.float32)
    signal[IMAGE_TOKENS] = prompts.scene * scene
    prompt_end = TEXT_TOKENS.start + length
    signal[TEXT_TOKENS.start : prompt_end] = DEMO_SIGNAL["text"] * text
    episode = rng.standard_normal((num_layers, 1, 1, width), dtype=np.float32)
    hidden = rng.standard_normal((num_layers, 1, PREFIX_TOKEN_COUNT, width), dtype=np.float32) + episode
    hidden += layer_gain[:, None, None, None] * signal[None, None]
    padded = episode[:, 0] + (prompts.padding_scene * layer_gain)[:, None, None] * scene  # (layers, 1, width)
    hidden[:, 0, prompt_end : TEXT_TOKENS.stop] = padded
    hidden[0, 0, prompt_end : TEXT_TOKENS.stop] = np.random.default_rng(DEMO_PAD_SEED).standard_normal(width)
    return {"hidden_states": hidden, "pre_attn_norm_scales": rng.standard_normal((num_layers, width), dtype=np.float32)}


# How a layer's task direction changes over rollout steps and denoising steps (write_demo_dataset's `codes`): "stable",
# one direction per task throughout; "redrawn", a new random one at every rollout step and denoising step; "turning",
# rotating by a quarter turn over the rollout steps and another over the denoising steps.
DEMO_CODE_KINDS = ("stable", "redrawn", "turning")
# --demo --generalize: three rollout steps, a strong action-expert signal, and two layers whose code changes (every
# other layer is stable; DEMO_SILENT_LAYER has none).
DEMO_CODES = {6: "redrawn", 7: "turning"}
DEMO_CODES_DIR = DEMO_DIR.parent / "demo_codes"
DEMO_CODES_STEPS = (10, 20, 30)
DEMO_CODES_ACTION_SIGNAL = 3.0
# --demo --generalize's options (see DEMO_DEFAULTS): every rollout step, a stable layer beside the two that change.
DEMO_CODES_DEFAULTS = {"rollout_step": "all", "layer": [5, *DEMO_CODES]}


def demo_code_directions(
    base: np.ndarray, codes: dict[int, str], num_layers: int, where: tuple[int, ...], turn: float
) -> np.ndarray:
    """(layers, width) a task's direction in each layer at one rollout step (and denoising step): `base` but in the
    layers `codes` names (see DEMO_CODE_KINDS). `where` seeds a re-drawn direction (seed, expert, task, step,
    denoising step) and, less its last two, a turning one's second axis; `turn`: the angle so far, in quarter turns."""
    directions = np.repeat(base[None], num_layers, axis=0)
    for layer, kind in codes.items():
        if kind == "redrawn":
            directions[layer] = np.random.default_rng([*where, layer, 7]).standard_normal(len(base), dtype=np.float32)
        elif kind == "turning":  # base rotated towards an orthogonal direction of the same length
            other = np.random.default_rng([*where[:-2], layer, 8]).standard_normal(len(base))
            other -= other @ base / (base @ base) * base
            other *= np.linalg.norm(base) / np.linalg.norm(other)
            angle = turn * np.pi / 2
            directions[layer] = np.cos(angle) * base + np.sin(angle) * other
    return directions


def demo_expert_entry(
    rng: np.random.Generator, signature: np.ndarray, signal_by_token: np.ndarray, num_layers: int
) -> dict:
    """One expert entry: (layer, 1, token, width) hidden states = episode noise + token noise + signal. `signature`:
    the task's direction, (width,) in every layer or (layers, width)."""
    width, token_count = signature.shape[-1], signal_by_token.shape[0]
    signature = np.broadcast_to(signature, (num_layers, width))
    layer_gain = np.ones(num_layers, dtype=np.float32)
    layer_gain[DEMO_SILENT_LAYER] = 0.0
    hidden = rng.standard_normal((num_layers, 1, token_count, width), dtype=np.float32)
    hidden += rng.standard_normal((num_layers, 1, 1, width), dtype=np.float32)
    hidden += layer_gain[:, None, None, None] * signal_by_token[None, None, :, None] * signature[:, None, None, :]
    return {
        "hidden_states": hidden,
        "pre_attn_norm_scales": rng.standard_normal((num_layers, width), dtype=np.float32),
    }


def demo_step(
    rng: np.random.Generator,
    step: int,
    description: str,
    vlm: tuple[np.ndarray, np.ndarray],
    action: tuple[np.ndarray, np.ndarray],
    num_layers: int,
    image_size: int,
    action_key_format: str,
) -> dict:
    """One rollout step's dict: the denoising entries of the action expert, the VLM's layers, SigLIP's output per
    camera and the observation. `vlm` and `action`: (the task's direction, the signal strength per token); the
    direction (width,), or per layer (layers, width), and the action expert's per denoising step too (times, layers,
    width)."""
    vlm_signature, vlm_width = vlm[0], vlm[0].shape[-1]
    step_data = {"timestep": step, "action": rng.standard_normal(7).tolist(), "prompt": description}
    for k, time_value in enumerate(DEMO_TIMES):
        signature = action[0][k] if action[0].ndim == 3 else action[0]
        step_data[action_key_format.format(time_value)] = demo_expert_entry(rng, signature, action[1], num_layers)
    step_data["vlm_layer_output"] = demo_expert_entry(rng, *vlm, num_layers)
    vlm_signature = vlm_signature if vlm_signature.ndim == 1 else vlm_signature[0]  # SigLIP: layer 0's direction
    step_data["vision_latents"] = {  # SigLIP output per camera; LIBERO's right wrist image is all zeros
        camera: {
            "pre_logits": (
                rng.standard_normal((PATCHES_PER_CAMERA, vlm_width), dtype=np.float32)
                + rng.standard_normal(vlm_width, dtype=np.float32)
                + strength * vlm_signature
            ).astype(np.float32)
        }
        for camera, strength in DEMO_CAMERA_SIGNAL.items()
    }
    step_data["observation"] = {
        "agentview_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "wrist_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
        "robot_state": rng.standard_normal(3).tolist(),
    }
    return step_data


def write_demo_dataset(
    directory: Path,
    *,
    num_tasks: int = 10,
    num_episodes: int = 6,
    steps: tuple[int, ...] = (10, 20),
    vlm_width: int = 16,
    action_width: int = 16,
    num_layers: int = 18,
    image_size: int = 32,
    action_key_format: str = "action_expert_state_time{:.1f}",
    protocol: int = pickle.DEFAULT_PROTOCOL,
    seed: int = 0,
    vlm_signatures: np.ndarray | None = None,
    descriptions: list[str] | None = None,
    prompts: DemoPrompts | None = None,
    codes: dict[int, str] | None = None,
    action_signal: float = DEMO_SIGNAL["action"],
) -> list[str]:
    """Write task_{id}_{name}.pkl files in the Pi0 layout; return the task descriptions.

    Planted: text tokens carry the task strongly, image tokens and the action expert
    weakly (DEMO_SIGNAL; `action_signal` sets the action expert's), layer DEMO_SILENT_LAYER not at all. Each task's
    signal is a random direction unless `vlm_signatures` (tasks x vlm_width) gives them, e.g. a linear image of the
    tasks' T5 embeddings; `descriptions` replaces the ten LIBERO-like ones. `codes` (layer -> a DEMO_CODE_KINDS kind)
    makes a layer's direction change over the rollout steps and the denoising steps, in both experts. The last episode
    of task 1 ends before the last step, as short episodes do. `prompts`: counterfactual prompts and planted padding
    (see DemoPrompts).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    descriptions = descriptions or [DEMO_DESCRIPTIONS[i % len(DEMO_DESCRIPTIONS)] for i in range(num_tasks)]
    vlm_signal = np.zeros(PREFIX_TOKEN_COUNT, dtype=np.float32)
    vlm_signal[EXPERT_TOKENS["image"]] = DEMO_SIGNAL["image"]
    vlm_signal[EXPERT_TOKENS["text_only"]] = DEMO_SIGNAL["text"]
    action_signal = np.full(51, action_signal, dtype=np.float32)
    text_signatures = None if prompts is None else rng.standard_normal((len(descriptions), vlm_width), np.float32)
    for task_id, description in enumerate(descriptions):
        vlm_signature = rng.standard_normal(vlm_width, dtype=np.float32)
        if vlm_signatures is not None:
            vlm_signature = np.asarray(vlm_signatures[task_id], dtype=np.float32)
        action_signature = rng.standard_normal(action_width, dtype=np.float32)
        directions = {}  # step -> the (vlm, action) directions of every layer (and denoising step), with `codes`
        for index, step in enumerate(steps if codes else []):
            turn = index / max(len(steps) - 1, 1)  # a quarter turn from the first step to the last
            vlm_directions = demo_code_directions(vlm_signature, codes, num_layers, (seed, 0, task_id, index, 0), turn)
            action_directions = [
                demo_code_directions(
                    action_signature, codes, num_layers, (seed, 1, task_id, index, k), turn + k / (len(DEMO_TIMES) - 1)
                )
                for k in range(len(DEMO_TIMES))
            ]
            directions[step] = (vlm_directions, np.stack(action_directions))
        episodes = {}
        for episode in range(num_episodes):
            episode_steps = steps[:-1] if (task_id == 1 and episode == num_episodes - 1 and len(steps) > 1) else steps
            rollout_steps = {}
            for step in episode_steps:
                vlm_direction, action_direction = directions.get(step, (vlm_signature, action_signature))
                vlm, action = (vlm_direction, vlm_signal), (action_direction, action_signal)
                rollout_steps[f"step_{step}"] = demo_step(
                    rng, step, description, vlm, action, num_layers, image_size, action_key_format
                )
            if prompts is not None:
                shown = (task_id + 1) % len(descriptions) if prompts.swapped and episode % 2 else task_id
                length = PROMPT_TOKENS if prompts.lengths is None else prompts.lengths[shown]
                for step_data in rollout_steps.values():
                    step_data["prompt"] = descriptions[shown]
                    step_data["vlm_layer_output"] = demo_prompt_entry(
                        rng, vlm_signature, text_signatures[shown], length, prompts, num_layers
                    )
            metadata = {"success": bool(episode % 2), "total_steps": episode_steps[-1] + 5, "episode_idx": episode}
            episodes[f"episode_{episode}"] = {"rollout_steps": rollout_steps, "metadata": metadata}
        name = description.replace(" ", "_")
        task_data = {"task_name": name, "task_id": task_id, "task_description": description, "episodes": episodes}
        path = directory / f"task_{task_id}_{name}.pkl"
        write_atomically(path, pickle.dumps(task_data, protocol=protocol))
    return descriptions


def build_tiny_t5(directory: Path, descriptions: list[str], seed: int = 0, d_model: int = 32) -> None:
    """Save a small random-weight T5 encoder with its own sentencepiece vocabulary (offline stand-in for t5-small;
    d_model=512 embeds in t5-small's width, for benchmarks)."""
    import sentencepiece
    import torch
    import transformers
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    transformers.utils.logging.disable_progress_bar()

    model_proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(descriptions),
        model_writer=model_proto,
        vocab_size=80,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto.getvalue())
    # transformers 5 ignores T5Tokenizer(vocab_file=...); the (piece, score) list is what it reads.
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    directory.mkdir(parents=True, exist_ok=True)
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prepare_demo(directory: Path, codes: bool = False) -> None:
    """Write the demo dataset and tiny T5 once; later runs reuse them. `codes` (--demo --generalize): three rollout
    steps, a strong action-expert signal and the layers of DEMO_CODES, whose task directions change over the steps."""
    marker = directory / "demo.json"
    settings = {"version": 5, "signal": DEMO_SIGNAL, "silent_layer": DEMO_SILENT_LAYER}
    planted = {"steps": DEMO_CODES_STEPS, "codes": DEMO_CODES, "action_signal": DEMO_CODES_ACTION_SIGNAL}
    if codes:
        settings["codes"] = json.loads(json.dumps(planted))
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    log.warning("writing the demo dataset and a tiny random-weight T5 to %s", directory)
    descriptions = write_demo_dataset(directory, **(planted if codes else {}))
    build_tiny_t5(directory / "t5_tiny", descriptions)
    write_atomically(marker, json.dumps(settings).encode())


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:  # loaded: main handles Ctrl-C, then it just ends
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
