#!/usr/bin/env python3
"""Linear probing of Pi0 inference latents.

Does this layer, of this expert, at this rollout step, still carry the language
instruction? A linear probe maps the layer's token-pooled hidden state onto the T5
embedding of the task description; we report how well it does on episodes it never saw.

Pipeline, in the order of this file:
  configuration -> reading task pickles -> expert/layer/token slicing -> T5 labels ->
  Flax Dense probe -> jitted training with early stopping -> held-out evaluation ->
  results pickle + text summary. `--demo` writes synthetic data in the real layout and
  runs the same pipeline on it.

Design notes: ../shared/spec/linear_probing_guide.md and ../shared/pi0-latents.md.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import mmap
import os
import pickle
import platform
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

# JAX grabs 75% of a GPU at start-up; a probe needs megabytes and GPUs are shared.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("linear_probing")

# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------

# Token positions in the Pi0 prefix (PaliGemma expert): 3 cameras x 256 SigLIP patches
# (base, left wrist, right wrist), then 48 prompt tokens. The action expert's own tokens come
# after the prefix; "visual" is SigLIP's own output per camera (vision_latents), 256 patches.
PREFIX_TOKEN_COUNT = 816
EXPERT_TOKENS = {"vlm": slice(0, PREFIX_TOKEN_COUNT), "text_only": slice(768, 816), "image": slice(0, 768)}
EXPERTS = ("vlm", "text_only", "image", "action", "visual")
EPSILON = 1e-8  # as in the guide's cosine

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linear_probing"
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What one result is about: which samples, and how each becomes one feature vector."""

    data_path: str
    task_range: tuple[int, int]  # end-exclusive, like range()
    episode_range: tuple[int, int]  # end-exclusive, like range()
    rollout_step: int  # the N of the key "step_N", never a position
    expert: str  # one of EXPERTS
    layer: int | None  # None for "visual" (SigLIP output has no layer axis)
    feature_type: str = "hidden_states"  # "pre_logits" for "visual"
    inference_step: int | None = None  # action expert: position in denoising order; None = every entry, pooled
    token_range: tuple[int, int] | None = None  # overrides the expert's token positions (end-exclusive)
    pooling: str = "mean"  # over the token positions: "mean", "max" or "last"
    camera: str = "base_0_rgb"  # "visual" only: which vision_latents camera
    trust_pickle: bool = False  # allow any global in the task files (unsafe)
    strict: bool = False  # an unreadable task file stops the run instead of being skipped
    index_dir: str | None = None  # where each task file's structure is cached (None: no cache)


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """How the T5 targets are made."""

    t5_model: str = "t5-small"
    center_labels: bool = True  # subtract the mean training-task embedding
    label_space: str = "span"  # "span": the training tasks' embeddings' span (exact, k <= tasks); "full": T5's axes
    label_dim: int | None = None  # keep only the training tasks' top principal directions
    cache_dir: str = str(DEFAULT_CACHE_DIR)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Probe optimisation and how samples are held out."""

    learning_rate: float = 0.001
    num_epochs: int = 100
    batch_size: int = 32
    seed: int = 42
    patience: int = 10  # epochs without validation improvement before stopping
    min_steps_per_epoch: int = 25  # small sample counts: an epoch is at least this many updates
    cv_folds: int = 5  # fewer when the tasks have fewer episodes (or, split "task", fewer tasks)
    split: str = "episode"  # "episode": held-out episodes of seen tasks; "task": held-out tasks
    validation_fraction: float = 0.2  # of each fold's training episodes (or tasks), for early stopping
    standardize: bool = True  # features, with each fold's training-set statistics
    control: bool = True  # also train on labels permuted across tasks (Hewitt & Liang)
    bootstrap: int = 1000  # resamples of episodes for 95% intervals (0: none)
    probe: str = "linear"  # "linear": trained Dense layer; "ridge": closed form
    loss: str = "cosine"  # "cosine" (the guide's), "mse" or "contrastive"


class ProbeError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""

    exit_code = 1


class OptionError(ProbeError):
    """An option that does not fit the data: printed as one line, exit status 2."""

    exit_code = 2


# -----------------------------------------------------------------------------
# Reading task files
# -----------------------------------------------------------------------------

TASK_FILE_PATTERN = re.compile(r"^task_(\d+)_.*\.pkl$")

# Globals a latent pickle may name. Anything else (os.system, builtins.eval, ...) is
# refused before it can run: data files never execute code.
SAFE_GLOBALS = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "complex", "slice")
} | {
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
} | {("ml_dtypes", name) for name in ("bfloat16", "float8_e4m3fn", "float8_e4m3b11fnuz", "float8_e5m2", "int4", "uint4")}

MAPPED_PAYLOAD_BYTES = 4096  # payloads from one page up are mapped, not read


class BadFileError(ProbeError):
    """A task file that cannot be used: skipped with a warning, fatal under --strict."""


@dataclasses.dataclass(frozen=True)
class FileRegion:
    """A byte payload left in the file: where it starts and how long it is."""

    offset: int
    length: int


class PendingArray:
    """What numpy's `_reconstruct` returns; the following BUILD turns it into an array."""

    array: np.ndarray | None = None


def refuse_or_import(unpickler: pickle.Unpickler, module: str, name: str, trust: bool):
    """Resolve an allow-listed global (or any, when trusted); refuse the rest before it runs."""
    # Protocols 0-2 name Python 2 modules (__builtin__.bytes); check what they map to.
    checked = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    if not trust and checked not in SAFE_GLOBALS:
        raise pickle.UnpicklingError(f"refused global {'.'.join(checked)}: not a data type (--trust_pickle lifts this, unsafely)")
    return super(type(unpickler), unpickler).find_class(module, name)


class RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler with the allow-list: reads every byte (used for protocols 0-2)."""

    def __init__(self, file, trust: bool = False):
        super().__init__(file)
        self.trust = trust

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
        self.file_size = len(mapped)
        self.mapped_specs: dict[int, tuple] = {}  # id(array) -> its index entry

    def find_class(self, module: str, name: str):
        found = refuse_or_import(self, module, name, self.trust)
        if name == "_reconstruct" and module.endswith("multiarray"):
            return lambda cls, shape, typecode: PendingArray()
        if name == "_frombuffer" and module.endswith("numeric"):
            return lambda buffer, dtype, shape, order: (
                self.mapped_array(buffer, dtype, shape, order) if isinstance(buffer, FileRegion) else found(buffer, dtype, shape, order)
            )
        return found

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
            raise pickle.UnpicklingError(f"truncated: a {length}-byte payload at byte {offset} runs past the end of the file ({self.file_size} bytes)")
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
        else:  # small payload or object array: numpy's own reconstruction, as pickle.load does
            instance.array = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
            instance.array.__setstate__(state)
        self.stack[-1] = instance.array

    def mapped_array(self, region: FileRegion, dtype, shape, order: str) -> np.ndarray:
        """A read-only array over a payload's bytes in the memory map."""
        dtype = np.dtype(dtype)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize != region.length:
            raise pickle.UnpicklingError(f"array of shape {tuple(shape)} and dtype {dtype} does not fit its {region.length}-byte payload")
        array = np.ndarray(shape, dtype=dtype, buffer=self.mapped, offset=region.offset, order=order)
        self.mapped_specs[id(array)] = (MAPPED_ARRAY, region.offset, dtype, tuple(shape), order)
        return array

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BUILD[0]] = load_build


MAPPED_ARRAY = "\x00mapped array"  # marks (MAPPED_ARRAY, offset, dtype, shape, order) in a file index
INDEX_FORMAT = 1


def is_mapped_spec(value) -> bool:
    """Whether an index entry stands for a mapped array."""
    return isinstance(value, tuple) and len(value) == 5 and isinstance(value[0], str) and value[0] == MAPPED_ARRAY


def replace_arrays(value, replace):
    """Copy of a small object graph with each leaf (array, placeholder, ...) passed through `replace`."""
    if isinstance(value, dict):
        return type(value)((key, replace_arrays(item, replace)) for key, item in value.items())  # OrderedDict stays one
    if isinstance(value, list):
        return [replace_arrays(item, replace) for item in value]
    if isinstance(value, tuple) and not is_mapped_spec(value):
        return tuple(replace_arrays(item, replace) for item in value)
    return replace(value)


def resolve_pending(value, mapped: mmap.mmap):
    """A placeholder left in the graph (a shared array reference, a raw payload) replaced by its value."""
    if isinstance(value, PendingArray):
        if value.array is None:
            raise pickle.UnpicklingError("an array was never filled in")
        return value.array
    if isinstance(value, FileRegion):
        return bytes(mapped[value.offset : value.offset + value.length])
    return value


def index_file_for(path: Path, index_dir: str) -> Path:
    """Where the index of this exact file version lives: keyed by path, size, mtime and inode."""
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, INDEX_FORMAT])
    return Path(index_dir) / f"{hashlib.sha256(key.encode()).hexdigest()}.pkl"


def read_task_file(path: Path, trust: bool = False, index_dir: str | None = None) -> dict:
    """Read a task pickle's structure; arrays are read-only views that load only what is indexed.

    Protocols 3-5 are mapped, and the structure (where each array lies) is saved in
    `index_dir`, so the next run reads none of the file but the slices it indexes.
    Protocols 0-2 store bytes as text, so such a file is read whole (still restricted).
    """
    try:
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise BadFileError(f"{path}: empty file")
            header = file.read(2)
            if header[:1] != pickle.PROTO or header[1] < 3:
                log.warning("%s: pickle protocol %s stores bytes as text and cannot be mapped; reading the whole file",
                            path, header[1] if header[:1] == pickle.PROTO else "0/1")
                with open(path, "rb") as whole:
                    data = RestrictedUnpickler(whole, trust).load()
            else:
                file.seek(0)
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead between headers
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
                if hasattr(mapped, "madvise"):  # fault in only the pages indexed: read-ahead read 20x more here
                    mapped.madvise(mmap.MADV_RANDOM)
                index_file = index_file_for(path, index_dir) if index_dir else None
                data = read_index(index_file, mapped, trust) if index_file else None
                if data is None:
                    unpickler = MappingUnpickler(file, mapped, trust)
                    data = replace_arrays(unpickler.load(), lambda value: resolve_pending(value, mapped))
                    if index_file:
                        write_index(index_file, replace_arrays(data, lambda v: unpickler.mapped_specs.get(id(v), v)))
    except BadFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, KeyError, IndexError,
            struct.error, RecursionError, OSError) as error:
        reason = str(error) or type(error).__name__
        if isinstance(error, EOFError):
            reason = "truncated: the file ends before the pickle's STOP"
        raise BadFileError(f"{path}: not a readable latent pickle: {reason}") from None
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), dict):
        raise BadFileError(f"{path}: not a task file: expected a dict with an 'episodes' dict")
    return data


def read_index(index_file: Path, mapped: mmap.mmap, trust: bool) -> dict | None:
    """The file's structure from its index, arrays mapped again; None when there is no usable index."""
    try:
        with open(index_file, "rb") as file:
            skeleton = RestrictedUnpickler(file, trust).load()
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
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(index_file, pickle.dumps(skeleton, protocol=4))
    except OSError as error:
        log.warning("could not write the file index %s: %s", index_file, error)


def advise_will_need(view: np.ndarray) -> None:
    """Ask the kernel to read a mapped view's bytes in large requests (cold, page-by-page faults are slow)."""
    root = view
    while isinstance(root, np.ndarray):
        root = root.base
    if not isinstance(root, mmap.mmap) or not hasattr(root, "madvise") or view.size == 0:
        return
    start, end = np.lib.array_utils.byte_bounds(view)
    base = np.frombuffer(root, dtype=np.uint8).ctypes.data
    offset = start - base - (start - base) % mmap.PAGESIZE
    root.madvise(mmap.MADV_WILLNEED, offset, end - base - offset)


def find_task_files(data_path: Path, task_range: tuple[int, int]) -> tuple[dict[int, Path], list[int]]:
    """Map each task id in the range to its file; also return the ids with no file."""
    if not data_path.is_dir():
        raise ProbeError(f"--data_path {data_path}: not a directory")
    files_by_task: dict[int, list[Path]] = {}
    for path in sorted(data_path.iterdir()):
        match = TASK_FILE_PATTERN.match(path.name)
        if match and path.is_file():
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


def step_number(key: str) -> int | None:
    """The N of a rollout-step key "step_N", or None for other keys."""
    match = re.fullmatch(r"step_(\d+)", key)
    return int(match.group(1)) if match else None


# -----------------------------------------------------------------------------
# Features: expert entry -> layer -> token positions -> pooled vector
# -----------------------------------------------------------------------------


def denoising_time(key: str) -> float:
    """Flow-matching time written at the end of an action-expert key."""
    match = re.search(r"(\d+(?:\.\d+)?)$", key)
    if not match:
        raise ProbeError(f"action-expert key {key!r} does not end with its denoising time")
    return float(match.group(1))


def action_expert_keys(step_data: dict) -> list[str]:
    """Action-expert entries of a step, in denoising order (time descending: t=1.0 first)."""
    keys = [key for key, value in step_data.items() if key.startswith("action_expert") and isinstance(value, dict)]
    return sorted(keys, key=denoising_time, reverse=True)


def token_positions(config: DataConfig, token_count: int) -> slice:
    """Token positions pooled for the expert (or --token_range), given the length of the token axis."""
    if config.token_range is not None:
        start, end = config.token_range
        if end > token_count:
            raise OptionError(f"--token_range {start} {end} is past the {token_count} tokens of feature {config.feature_type!r}")
        return slice(start, end)
    if config.expert in EXPERT_TOKENS:
        positions = EXPERT_TOKENS[config.expert]
        if token_count < positions.stop:
            raise ProbeError(f"feature {config.feature_type!r} has {token_count} tokens; --expert {config.expert} needs the {PREFIX_TOKEN_COUNT}-token VLM prefix")
        return positions
    if config.expert == "action" and token_count > PREFIX_TOKEN_COUNT:  # an entry holding the whole sequence
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


def feature_array(entry: dict, config: DataConfig) -> np.ndarray:
    """The entry's array for --feature_type, checked to be an array."""
    if config.feature_type not in entry:
        available = ", ".join(sorted(entry)) or "none"
        raise OptionError(f"--feature_type {config.feature_type!r} is not in the expert entry (it has: {available})")
    array = entry[config.feature_type]
    if not hasattr(array, "ndim") or array.ndim < 1:
        raise ProbeError(f"feature {config.feature_type!r} is not an array")
    return array


def layer_count(entry: dict, config: DataConfig) -> int:
    """How many layers the entry's feature has (1 for SigLIP's per-camera arrays, which have no layer axis)."""
    array = feature_array(entry, config)
    return 1 if config.expert == "visual" else array.shape[0]


def token_view(entry: dict, config: DataConfig, layer: int) -> np.ndarray:
    """One layer of one expert entry, cut to the token positions: (tokens, width), or (width,) for
    per-layer vectors. Indexing only: on a mapped array nothing is read yet.
    """
    array = feature_array(entry, config)
    if config.expert == "visual":  # vision_latents[camera][feature]: ([batch,] patch, width), no layers
        layer_array = array
    else:
        if array.ndim < 2:
            raise ProbeError(f"feature {config.feature_type!r} is not a (layer, ...) array")
        if not 0 <= layer < array.shape[0]:
            raise OptionError(f"--layer {layer} is out of range: the data has {array.shape[0]} layers (0-{array.shape[0] - 1})")
        layer_array = array[layer]
    if layer_array.ndim == 3:  # (batch, token, width): the batch axis is optional in the files
        layer_array = layer_array[0]
    if layer_array.ndim == 1:  # a per-layer vector (e.g. norm scales): no tokens to choose
        if config.expert in ("text_only", "image") or config.token_range is not None:  # a part of the tokens was asked for
            raise OptionError(f"--expert {config.expert} needs a token axis; feature {config.feature_type!r} has none")
        return layer_array
    if layer_array.ndim != 2:
        raise ProbeError(f"feature {config.feature_type!r} has shape {array.shape}; expected ([layer,] [batch,] token, width)")
    return layer_array[token_positions(config, layer_array.shape[0])]


def expert_entries(step_data: dict, config: DataConfig) -> list[tuple[float, dict]]:
    """(denoising time, entry) pairs a step contributes, every denoising entry for the action
    expert (in denoising order); time is NaN for the others."""
    if config.expert == "visual":
        cameras = step_data.get("vision_latents")
        if not isinstance(cameras, dict):
            raise ProbeError("step has no 'vision_latents' dict (written by newer collectors only)")
        if not isinstance(cameras.get(config.camera), dict):
            raise OptionError(f"--camera {config.camera!r} is not in vision_latents (it has: {', '.join(sorted(cameras)) or 'none'})")
        return [(math.nan, cameras[config.camera])]
    if config.expert != "action":
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

    def select(self, rows: np.ndarray, layer_position: int) -> Samples:
        """The given rows of one layer, as a one-layer Samples."""
        return Samples(self.features[layer_position : layer_position + 1, rows], self.task_id[rows], self.episode[rows],
                       self.step[rows], self.inference_time[rows], self.inference_index[rows])


@dataclasses.dataclass
class ReadReport:
    """What the reader found, skipped and missed: written to the summary."""

    files: dict[int, str] = dataclasses.field(default_factory=dict)
    descriptions: dict[int, str] = dataclasses.field(default_factory=dict)
    missing_tasks: list[int] = dataclasses.field(default_factory=list)
    skipped_files: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why
    missing_episodes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (task, episode) not in the file
    episodes_without_step: dict[int, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)  # step -> (task, episode)
    steps_seen: set[int] = dataclasses.field(default_factory=set)  # rollout steps present in the episodes read
    layer_count: int = 0  # layers of the feature (from the first entry read)
    inference_count: int = 0  # denoising entries per step (action expert; fewest seen)
    inference_times: list[float] = dataclasses.field(default_factory=list)  # their times, in denoising order (first step read)


def episodes_of(task_data: dict, path: Path, config: DataConfig) -> list[tuple[int, dict | None]]:
    """(episode, rollout_steps or None when the episode is missing) for the episode range."""
    episodes = []
    for episode in range(*config.episode_range):
        episode_data = task_data["episodes"].get(f"episode_{episode}")
        if episode_data is None:
            episodes.append((episode, None))
            continue
        steps = episode_data.get("rollout_steps") if isinstance(episode_data, dict) else None
        if not isinstance(steps, dict):
            raise BadFileError(f"{path}: episode_{episode} has no 'rollout_steps' dict")
        episodes.append((episode, steps))
    return episodes


def samples_from_file(path: Path, task_id: int, config: DataConfig, layers: list[int] | None, steps: list[int] | None,
                      report: ReadReport) -> list[tuple[int, int, int, float, int, np.ndarray]]:
    """(step, task, episode, denoising time, denoising index, (layers, width) features) rows of one task
    file, for the given steps (None: every step) and layers (None: only record the structure)."""
    task_data = read_task_file(path, config.trust_pickle, config.index_dir)
    description = task_data.get("task_description")
    if not isinstance(description, str) or not description.strip():
        raise BadFileError(f"{path}: no 'task_description' string")
    views, missing, without_step, steps_seen, counts = [], [], {}, set(), {"layers": 0, "inference": math.inf}
    episodes = tqdm(episodes_of(task_data, path, config), desc=f"task {task_id} episodes", unit="episode", disable=progress_disabled(), leave=False)
    for episode, episode_steps in episodes:
        if episode_steps is None:
            missing.append((task_id, episode))
            continue
        present = {n: key for key, n in ((key, step_number(key)) for key in episode_steps) if n is not None}
        steps_seen |= set(present)
        for step in sorted(present) if steps is None else steps:
            if step not in present:
                without_step.setdefault(step, []).append((task_id, episode))
                continue
            step_data = episode_steps[present[step]]
            if not isinstance(step_data, dict):
                raise BadFileError(f"{path}: episode_{episode}/{present[step]} is a {type(step_data).__name__}, not a dict")
            try:
                entries = expert_entries(step_data, config)
                counts["layers"] = counts["layers"] or layer_count(entries[0][1], config)
                counts["inference"] = min(counts["inference"], len(entries))
                counts["times"] = counts.get("times") or [time for time, _ in entries]
                for index, (inference_time, entry) in enumerate(entries if layers is not None else []):
                    views.append((step, task_id, episode, inference_time, index, [token_view(entry, config, layer) for layer in layers]))
            except OptionError:
                raise
            except ProbeError as error:
                raise BadFileError(f"{path}: episode_{episode}/{present[step]}: {error}") from None
    for *_, layer_views in views:  # ask for every slice first, so cold reads overlap instead of queueing
        for view in layer_views:
            advise_will_need(view)
    rows = [(*ids, np.stack([pool_tokens(view, config.pooling) for view in layer_views])) for *ids, layer_views in views]
    # Recorded only once the whole file has been read: a skipped file leaves no trace but its skip.
    report.descriptions[task_id] = description
    report.missing_episodes += missing
    for step, pairs in without_step.items():
        report.episodes_without_step.setdefault(step, []).extend(pairs)
    report.steps_seen |= steps_seen
    report.layer_count = report.layer_count or counts["layers"]
    report.inference_times = report.inference_times or counts.get("times", [])
    if counts["inference"] != math.inf:
        report.inference_count = min(report.inference_count or counts["inference"], counts["inference"])
    return rows


def read_files(config: DataConfig, layers: list[int] | None, steps: list[int] | None) -> tuple[list[tuple], ReadReport]:
    """Rows of every task file of the range (see samples_from_file); unreadable files are skipped unless --strict."""
    files, missing_tasks = find_task_files(Path(config.data_path), config.task_range)
    for task_id in missing_tasks:
        log.warning("task %d: no file task_%d_*.pkl in %s", task_id, task_id, config.data_path)
    if not files:
        raise ProbeError(f"--data_path {config.data_path}: no task_*.pkl files for tasks {config.task_range[0]}-{config.task_range[1] - 1}")
    report = ReadReport(files={t: str(p) for t, p in files.items()}, missing_tasks=missing_tasks)
    rows: list[tuple] = []
    for task_id, path in tqdm(files.items(), desc="task files", unit="file", disable=progress_disabled(), leave=False):
        try:
            rows += samples_from_file(path, task_id, config, layers, steps, report)
        except BadFileError as error:
            if config.strict:
                raise
            log.warning("skipping %s (--strict makes this fatal)", error)
            report.skipped_files[str(path)] = str(error)
    if len(report.skipped_files) == len(files):
        raise ProbeError(f"no samples: all {len(files)} task file(s) were skipped as unreadable")
    return rows, report


def collect_samples(config: DataConfig, layers: list[int], steps: list[int]) -> tuple[dict[int, Samples], ReadReport]:
    """Read the task files once and extract, per rollout step, one feature vector per sample and layer."""
    rows, report = read_files(config, layers, steps)
    if report.missing_episodes:
        log.warning("%d episode(s) in --episode_range are not in their files", len(report.missing_episodes))
    for step, pairs in report.episodes_without_step.items():
        log.warning("%d episode(s) have no step_%d and were skipped for it", len(pairs), step)
    by_step = {}
    for step in steps:
        step_rows = [row for row in rows if row[0] == step]
        if not step_rows:
            existing = ", ".join(map(str, sorted(report.steps_seen))) or "none"
            raise ProbeError(f"no samples: no episode in the ranges has step_{step}; rollout steps present: {existing}")
        widths = {row[5].shape for row in step_rows}
        if len(widths) > 1:
            raise ProbeError(f"feature widths differ between files: {sorted(widths)}")
        by_step[step] = Samples(
            features=np.stack([row[5] for row in step_rows], axis=1),
            task_id=np.array([row[1] for row in step_rows], dtype=np.int64),
            episode=np.array([row[2] for row in step_rows], dtype=np.int64),
            step=np.full(len(step_rows), step, dtype=np.int64),
            inference_time=np.array([row[3] for row in step_rows], dtype=np.float64),
            inference_index=np.array([row[4] for row in step_rows], dtype=np.int64),
        )
    return by_step, report


def progress_disabled() -> bool | None:
    """tqdm's `disable`: off under --quiet; None lets tqdm switch itself off when stderr is not a terminal."""
    return None if log.isEnabledFor(logging.INFO) else True


# -----------------------------------------------------------------------------
# Labels: T5 encoder, mean over the real tokens, cached on disk
# -----------------------------------------------------------------------------


def model_identity(model_name: str) -> str:
    """A string that changes when the model changes: local files' sizes and times, or the hub name."""
    path = Path(model_name)
    if path.is_dir():
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
        return json.dumps({"directory": str(path.resolve()), "files": files})
    return json.dumps({"hub": model_name})


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


def t5_labels(descriptions: list[str], config: LabelConfig) -> np.ndarray:
    """T5 embedding per description, from the on-disk cache when this model and text were seen."""
    key_source = json.dumps({"model": model_identity(config.t5_model), "descriptions": descriptions, "pooling": "mean-real-tokens-v1"})
    cache_file = Path(config.cache_dir) / "t5_labels" / f"{hashlib.sha256(key_source.encode()).hexdigest()}.npz"
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as cached:
            if list(cached["descriptions"]) == descriptions:
                log.info("T5 labels from cache %s", cache_file)
                return cached["embeddings"]
    log.info("encoding %d task descriptions with T5 %s", len(descriptions), config.t5_model)
    embeddings = encode_descriptions(descriptions, config.t5_model)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, descriptions=np.array(descriptions))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, buffer.getvalue())
    except OSError as error:  # a read-only cache costs time, not correctness
        log.warning("could not write the label cache %s: %s", cache_file, error)
    return embeddings


# -----------------------------------------------------------------------------
# Probe
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


def sample_losses(predictions: jnp.ndarray, own_class: jnp.ndarray, classes: jnp.ndarray, known_classes: jnp.ndarray, loss: str) -> jnp.ndarray:
    """Per-sample loss: `cosine` 1 - cos (the guide's), `mse`, or `contrastive` (InfoNCE over the known tasks)."""
    targets = classes[own_class]
    if loss == "cosine":
        return 1.0 - cosine_similarity(predictions, targets)
    if loss == "mse":
        return jnp.mean((predictions - targets) ** 2, axis=-1)
    logits = cosine_similarity(predictions[:, None, :], classes[None, :, :]) / CONTRASTIVE_TEMPERATURE
    logits = jnp.where(known_classes[None, :], logits, -jnp.inf)  # a held-out task's embedding is never seen
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), own_class[:, None], axis=-1)[:, 0]


# -----------------------------------------------------------------------------
# Folds: whole episodes (or whole tasks) on one side
# -----------------------------------------------------------------------------


def assign_folds(task_id: np.ndarray, episode: np.ndarray, config: TrainingConfig) -> tuple[np.ndarray, int]:
    """Test fold of every sample, and the number of folds.

    split "episode": each task's episodes are dealt round the folds, so every fold trains on
    every task. split "task": whole tasks are dealt round the folds.
    """
    rng = np.random.default_rng(config.seed)
    tasks = np.unique(task_id)
    if config.split == "task":
        if len(tasks) < 3:
            raise ProbeError(f"--split task needs at least 3 tasks (it holds out whole tasks); the range has {len(tasks)}")
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


def validation_masks(task_id: np.ndarray, episode: np.ndarray, fold: np.ndarray, folds: int, config: TrainingConfig) -> np.ndarray:
    """(folds, samples) mask of the early-stopping samples, carved from each fold's training side only."""
    rng = np.random.default_rng([config.seed, 1])
    masks = np.zeros((folds, len(fold)), dtype=bool)
    for f in range(folds):
        training = fold != f
        if config.split == "task":  # validate on whole training tasks: early stopping then rewards transfer
            tasks = rng.permutation(np.unique(task_id[training]))
            count = max(1, round(len(tasks) * config.validation_fraction)) if len(tasks) >= 3 else 0
            masks[f] = training & np.isin(task_id, tasks[:count])
            continue
        for task in np.unique(task_id[training]):
            episodes = rng.permutation(np.unique(episode[training & (task_id == task)]))
            count = max(1, round(len(episodes) * config.validation_fraction)) if len(episodes) >= 2 else 0
            masks[f] |= training & (task_id == task) & np.isin(episode, episodes[:count])
    return masks


def derangement(count: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(count) that keeps no element in place (the control task's labels)."""
    rng = np.random.default_rng([seed, 2])
    while True:
        permutation = rng.permutation(count)
        if count < 2 or not np.any(permutation == np.arange(count)):
            return permutation


# -----------------------------------------------------------------------------
# Training: every probe of a run (folds x probe/control) in one jitted program
# -----------------------------------------------------------------------------


@functools.partial(
    jax.jit, static_argnames=("loss", "learning_rate", "num_epochs", "batch_size", "patience", "steps_per_epoch", "standardize")
)
def fit_probes(
    features: jnp.ndarray,
    sample_class: jnp.ndarray,
    class_embeddings: jnp.ndarray,
    known_classes: jnp.ndarray,
    train_mask: jnp.ndarray,
    validation_mask: jnp.ndarray,
    seed: jnp.ndarray,
    *,
    loss: str,
    learning_rate: float,
    num_epochs: int,
    batch_size: int,
    patience: int,
    steps_per_epoch: int,
    standardize: bool,
) -> dict:
    """Train one probe per item and copy (vmapped twice): Adam, shuffled minibatches, early stopping.

    Shapes: features (devices, items, n, d_in) — the layers (or denoising steps) of a sweep, one block
    per device; sample_class (n,);
    per copy (folds, then controls): class_embeddings (C, d), known_classes (C,), train and
    validation masks (n,); the seed. The epoch loop is a `while_loop`; each probe keeps the
    parameters of its best validation epoch.
    """
    model = LinearProbe(class_embeddings.shape[-1])
    optimizer = optax.adam(learning_rate)
    sample_count = features.shape[-2]
    keys = jax.random.split(jax.random.PRNGKey(seed), train_mask.shape[0])  # the same per copy in every item

    def fit_one(item_features, classes, known, train, validation, key):
        train_weight = train.astype(jnp.float32)
        train_count = train_weight.sum()
        if standardize:  # training-set statistics only
            mean = (train_weight[:, None] * item_features).sum(0) / train_count
            std = jnp.sqrt((train_weight[:, None] * (item_features - mean) ** 2).sum(0) / train_count)
            std = jnp.where(std > 1e-6, std, 1.0)
        else:
            mean, std = jnp.zeros(item_features.shape[1]), jnp.ones(item_features.shape[1])

        def predict(params, rows):
            return model.apply({"params": params}, (item_features[rows] - mean) / std)

        def predict_all(params):  # the standardization folded into the weights: no per-probe copy of the data
            dense = params["Dense_0"]
            kernel = dense["kernel"] / std[:, None]
            return item_features @ kernel + (dense["bias"] - mean @ kernel)

        def mean_loss(predictions, rows, weight):
            per_sample = sample_losses(predictions, sample_class[rows], classes, known, loss)
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

        def run_epoch(state):
            epoch = state["epoch"]
            # A fresh random order of the training rows (the rest sort last), cut into minibatches.
            order = jnp.argsort(jnp.where(train, jax.random.uniform(jax.random.fold_in(shuffle_key, epoch), (sample_count,)), 2.0))
            rows = order[jnp.arange(steps_per_epoch * batch_size) % train_count.astype(jnp.int32)].reshape(steps_per_epoch, batch_size)
            (params, optimizer_state), _ = jax.lax.scan(step, (state["params"], state["optimizer_state"]), rows)
            predictions = predict_all(params)
            train_loss = mean_loss(predictions, every_row, train_weight)
            validation_loss = mean_loss(predictions, every_row, validation_weight)
            monitored = jnp.where(has_validation, validation_loss, train_loss)
            improved = monitored < state["best_loss"]
            return {
                "epoch": epoch + 1,
                "params": params,
                "optimizer_state": optimizer_state,
                "best_params": jax.tree_util.tree_map(lambda new, old: jnp.where(improved, new, old), params, state["best_params"]),
                "best_loss": jnp.where(improved, monitored, state["best_loss"]),
                "best_epoch": jnp.where(improved, epoch, state["best_epoch"]),
                "train_loss": state["train_loss"].at[epoch].set(train_loss),
                "validation_loss": state["validation_loss"].at[epoch].set(jnp.where(has_validation, validation_loss, jnp.nan)),
            }

        def keep_going(state):
            patient = (state["epoch"] - 1 - state["best_epoch"]) < patience
            return (state["epoch"] < num_epochs) & (patient | ~has_validation)

        empty_history = jnp.full((num_epochs,), jnp.nan, dtype=jnp.float32)
        state = jax.lax.while_loop(
            keep_going,
            run_epoch,
            {
                "epoch": jnp.array(0),
                "params": params,
                "optimizer_state": optimizer.init(params),
                "best_params": params,
                "best_loss": jnp.array(jnp.inf, dtype=jnp.float32),
                "best_epoch": jnp.array(-1),
                "train_loss": empty_history,
                "validation_loss": empty_history,
            },
        )
        dense = state["best_params"]["Dense_0"]
        return {
            "kernel": dense["kernel"],
            "bias": dense["bias"],
            "feature_mean": mean,
            "feature_std": std,
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"] + 1,  # 1-based, as people count epochs
            "train_loss": state["train_loss"],
            "validation_loss": state["validation_loss"],
        }

    fit_copies = jax.vmap(fit_one, in_axes=(None, 0, 0, 0, 0, 0))
    # Items one after another inside the program (lax.map), copies side by side (vmap): a layer's
    # numbers are then bit-identical whether it runs alone or in a sweep; batching the items with
    # vmap changed the weights in the 5th digit with the batch size, for about the same speed.
    # The leading axis holds one block of items per device.
    fit_items_of_block = lambda block: jax.lax.map(lambda item: fit_copies(item, class_embeddings, known_classes, train_mask, validation_mask, keys), block)
    return jax.vmap(fit_items_of_block)(features)


def train_linear_probes(features: np.ndarray, sample_class: np.ndarray, class_embeddings: np.ndarray, known_classes: np.ndarray,
                        train_mask: np.ndarray, validation_mask: np.ndarray, config: TrainingConfig) -> dict:
    """Fit every item's and copy's Dense probe; numpy results (items, copies, ...), with the batch and epoch sizes.

    With several local devices the items are spread over them (JAX sharding of the items axis).
    """
    smallest, largest = int(train_mask.sum(1).min()), int(train_mask.sum(1).max())
    batch_size = min(config.batch_size, smallest)
    # The guide's 100 epochs of batch 32 are only a few hundred updates on a few dozen
    # samples: too few to fit. An epoch is at least min_steps_per_epoch updates.
    steps_per_epoch = max(-(-largest // batch_size), config.min_steps_per_epoch)
    items, devices = len(features), jax.local_devices()
    padded = np.concatenate([features, np.repeat(features[-1:], -items % len(devices), axis=0)])  # equal blocks per device
    stacked = jnp.asarray(padded.reshape(len(devices), -1, *features.shape[1:]))
    if len(devices) > 1:
        log.info("training %d item(s) in blocks spread over %d devices", items, len(devices))
        mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
        stacked = jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices")))
    fitted = fit_probes(
        stacked, jnp.asarray(sample_class), jnp.asarray(class_embeddings), jnp.asarray(known_classes),
        jnp.asarray(train_mask), jnp.asarray(validation_mask), np.int32(config.seed),
        loss=config.loss, learning_rate=config.learning_rate, num_epochs=config.num_epochs, batch_size=batch_size,
        patience=config.patience, steps_per_epoch=steps_per_epoch, standardize=config.standardize,
    )
    fitted = {key: np.asarray(value).reshape(-1, *value.shape[2:])[:items] for key, value in fitted.items()}
    fitted.update(batch_size=np.full(items, batch_size), steps_per_epoch=np.full(items, steps_per_epoch))
    return fitted


RIDGE_PENALTIES = 10.0 ** np.arange(-3, 4)  # times the number of training samples
RIDGE_INNER_FOLDS = 3


def ridge_solution(x: np.ndarray, y: np.ndarray, penalties: np.ndarray) -> list[np.ndarray]:
    """Exact ridge weights for each penalty, from one eigendecomposition (of the Gram matrix when samples < features)."""
    if x.shape[0] < x.shape[1]:  # dual: W = X^T (X X^T + l I)^-1 Y
        values, vectors = np.linalg.eigh(x @ x.T)
        projected = vectors.T @ y
        return [x.T @ (vectors @ (projected / (values + penalty)[:, None])) for penalty in penalties]
    values, vectors = np.linalg.eigh(x.T @ x)
    projected = vectors.T @ (x.T @ y)
    return [vectors @ (projected / (values + penalty)[:, None]) for penalty in penalties]


def train_ridge_probes(features: np.ndarray, sample_class: np.ndarray, class_embeddings: np.ndarray, train_mask: np.ndarray,
                       validation_mask: np.ndarray, groups: np.ndarray, config: TrainingConfig) -> dict:
    """Fit every item's and copy's linear map in closed form; the penalty is chosen by inner
    cross-validation over whole episodes (mean cosine). Results (items, copies, ...)."""
    fitted = {name: [] for name in ("kernel", "bias", "feature_mean", "feature_std", "penalty")}
    for item_features in features:
        per_copy = {name: [] for name in fitted}
        for classes, train in zip(class_embeddings, train_mask | validation_mask):  # no early stopping: validation trains too
            x_train = item_features[train].astype(np.float64)
            mean = x_train.mean(0) if config.standardize else np.zeros(x_train.shape[1])
            std = np.where(x_train.std(0) > 1e-6, x_train.std(0), 1.0) if config.standardize else np.ones(x_train.shape[1])
            x, y = (x_train - mean) / std, classes[sample_class[train]].astype(np.float64)
            penalties = RIDGE_PENALTIES * len(x)
            inner = np.unique(groups[train], return_inverse=True)[1] % RIDGE_INNER_FOLDS  # whole episodes per inner fold
            scores = np.zeros(len(penalties))
            for f in range(RIDGE_INNER_FOLDS):
                fit, held = inner != f, inner == f
                if fit.sum() == 0 or held.sum() == 0:
                    continue
                x_mean, y_mean = x[fit].mean(0), y[fit].mean(0)
                for index, weights in enumerate(ridge_solution(x[fit] - x_mean, y[fit] - y_mean, penalties)):
                    scores[index] += row_cosine((x[held] - x_mean) @ weights + y_mean, y[held]).sum()
            best = penalties[int(np.argmax(scores))]
            x_mean, y_mean = x.mean(0), y.mean(0)
            weights = ridge_solution(x - x_mean, y - y_mean, np.array([best]))[0]
            for name, value in (("kernel", weights), ("bias", y_mean - x_mean @ weights), ("feature_mean", mean), ("feature_std", std), ("penalty", best)):
                per_copy[name].append(np.asarray(value, dtype=np.float32) if name != "penalty" else value)
        for name in fitted:
            fitted[name].append(np.asarray(per_copy[name]))
    return {key: np.asarray(value) for key, value in fitted.items()}


# -----------------------------------------------------------------------------
# Evaluation: held-out predictions, retrieval among the analyzed tasks' embeddings
# -----------------------------------------------------------------------------


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the guide's epsilon keeps zero rows finite)."""
    return values / (np.linalg.norm(values, axis=-1, keepdims=True) + EPSILON)


def row_cosine(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cosine between matching rows."""
    return np.sum(unit_rows(predictions) * unit_rows(targets), axis=-1)


def retrieval(similarities: np.ndarray, own_class: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample retrieval results from (samples, classes) cosine similarities."""
    own = similarities[np.arange(len(own_class)), own_class]
    others = np.where(np.arange(similarities.shape[1])[None, :] == own_class[:, None], -np.inf, similarities)
    rank = 1 + np.sum(others >= own[:, None], axis=1)  # ties count against the prediction
    return {"rank": rank, "correct": rank == 1, "predicted": np.argmax(similarities, axis=1), "margin": own - others.max(axis=1)}


def bootstrap_intervals(values: dict[str, np.ndarray], groups: np.ndarray, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of per-sample means, resampling whole episodes with replacement."""
    if resamples == 0:
        return {}
    group_index, group_count = np.unique(groups, return_inverse=True)[1], len(np.unique(groups))
    rng = np.random.default_rng([seed, 3])
    counts = np.stack([np.bincount(rng.integers(0, group_count, group_count), minlength=group_count) for _ in range(resamples)])
    weights = counts[:, group_index].astype(np.float64)  # (resamples, samples)
    totals = weights.sum(axis=1)
    intervals = {}
    for name, per_sample in values.items():
        estimates = weights @ per_sample.astype(np.float64) / totals
        low, high = np.percentile(estimates, [2.5, 97.5])
        intervals[name] = (float(low), float(high))
    return intervals


def label_spaces(raw: np.ndarray, train_classes: list[np.ndarray], labels: LabelConfig) -> dict[str, np.ndarray]:
    """Per fold: the label mean (folds, d), an orthonormal basis of the probe's label space as rows (folds, k, d) and
    every class's coordinates in it (folds, C, k).

    span (default): the exact span of the fold's training-task embeddings (centered, unless --no_center_labels), by SVD,
    numerically zero directions dropped: at most C - 1 directions (C uncentered) for C tasks, where T5 has 512. For the
    cosine, MSE and contrastive losses a prediction's component outside that span only hurts, and retrieval ranks by
    inner products that live in it, so the best map into T5 space is the best map into these coordinates followed by
    the basis, at k/512 of the cost. --label_dim K keeps the top K directions (uncentered: of the raw embeddings, so the
    mean direction stays). full: T5's own axes. Only training tasks shape the basis; a held-out task (--split task) is
    represented by its projection on it.
    """
    means, bases = [], []
    for known in train_classes:
        mean = raw[known].mean(axis=0)
        if labels.label_space == "full" and not labels.label_dim:
            basis = np.eye(raw.shape[1], dtype=raw.dtype)
        else:
            spanned = (raw[known] - mean if labels.center_labels else raw[known]).astype(np.float64)
            singular, components = np.linalg.svd(spanned, full_matrices=False)[1:]
            tolerance = singular.max(initial=0.0) * max(spanned.shape) * np.finfo(np.float32).eps
            basis = components[singular > tolerance]
            if labels.label_dim and len(basis) < labels.label_dim:
                raise OptionError(f"--label_dim {labels.label_dim}: only {len(known)} training tasks, so at most {len(basis)} directions")
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
    return {"mean": np.stack(means), "basis": np.stack(bases), "classes": np.stack(spaces).astype(np.float32)}


def spreading_rotation(size: int) -> np.ndarray:
    """An orthonormal (size, size) matrix (DCT-II) whose rows mix all principal directions.

    Adam scales each output coordinate's step by that coordinate's own gradients. In principal coordinates the last
    one carries the smallest differences between tasks, and Adam would fit it as fast as the first; T5's own axes each
    carry a share of every difference. Rotated like this, the span's coordinates behave like T5's axes (planted
    random-direction tasks, 6 seeds: held-out accuracy 0.89 in principal coordinates, 0.95 rotated, 0.96 full width).
    """
    row, column = np.arange(size)[:, None], np.arange(size)[None, :]
    rotation = np.sqrt(2.0 / max(size, 1)) * np.cos(np.pi * (2 * column + 1) * row / (2 * max(size, 1)))
    rotation[:1] /= np.sqrt(2.0)
    return rotation


def to_t5(coordinates: np.ndarray, fold: np.ndarray, space: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of label-space coordinates (n, k) back in T5's axes (n, d), each with its own fold's basis (centered
    like the labels: the fold's mean is not added). Fold by fold: gathering a basis per sample would take n x k x d."""
    mapped = np.zeros((len(coordinates), space["basis"].shape[2]), dtype=np.float32)
    for f in np.unique(fold):
        rows = fold == f
        mapped[rows] = coordinates[rows] @ space["basis"][f]
    return mapped


def prepare_folds(samples: Samples, report: ReadReport, labels: LabelConfig, training: TrainingConfig) -> dict:
    """Classes, folds, label spaces and probe copies for a set of samples (shared by every layer of a sweep)."""
    # Classes are unique descriptions: two task ids with one instruction share one target.
    task_ids = sorted(set(samples.task_id.tolist()))
    descriptions = list(dict.fromkeys(report.descriptions[t] for t in task_ids))
    class_of_task = {t: descriptions.index(report.descriptions[t]) for t in task_ids}
    sample_class = np.array([class_of_task[t] for t in samples.task_id], dtype=np.int64)
    fold, folds = assign_folds(samples.task_id, samples.episode, training)
    validation = validation_masks(samples.task_id, samples.episode, fold, folds, training)
    test = np.stack([fold == f for f in range(folds)])
    raw = t5_labels(descriptions, labels)
    known_classes = np.stack([np.isin(np.arange(len(descriptions)), sample_class[~test[f]]) for f in range(folds)])
    space = label_spaces(raw, [np.flatnonzero(k) for k in known_classes], labels)
    # Copies: the probe for each fold, then (control task) the same on permuted labels.
    control_permutation = derangement(len(descriptions), training.seed)
    copies = {"classes": [space["classes"]], "known": [known_classes]}
    if training.control:
        copies["classes"].append(space["classes"][:, control_permutation])
        copies["known"].append(known_classes)  # row j is still the target of class j's samples
    repeat = len(copies["classes"])
    return {
        "task_ids": task_ids, "descriptions": descriptions, "class_of_task": class_of_task, "sample_class": sample_class,
        "episode_group": samples.task_id * 1_000_000 + samples.episode,  # one id per (task, episode)
        "fold": fold, "folds": folds, "validation": validation, "train": ~test & ~validation, "raw": raw,
        "known_classes": known_classes, "space": space, "control_permutation": control_permutation,
        "copy_classes": np.concatenate(copies["classes"]), "copy_known": np.concatenate(copies["known"]),
        "copy_train": np.tile(~test & ~validation, (repeat, 1)), "copy_validation": np.tile(validation, (repeat, 1)),
    }


def fit_items(features: np.ndarray, prepared: dict, training: TrainingConfig) -> dict:
    """Fit the probes of every item (features (items, n, d)) and copy; results (items, copies, ...)."""
    args = (features, prepared["sample_class"], prepared["copy_classes"])
    if training.probe == "ridge":
        return train_ridge_probes(*args, prepared["copy_train"], prepared["copy_validation"], prepared["episode_group"], training)
    return train_linear_probes(*args, prepared["copy_known"], prepared["copy_train"], prepared["copy_validation"], training)


def evaluate_item(samples: Samples, fitted: dict, prepared: dict, report: ReadReport, data: DataConfig, labels: LabelConfig,
                  training: TrainingConfig) -> dict:
    """Held-out metrics of one item (one layer's samples, its fitted copies); everything the results file holds."""
    task_ids, descriptions, class_of_task = prepared["task_ids"], prepared["descriptions"], prepared["class_of_task"]
    sample_class, episode_group, fold, folds = prepared["sample_class"], prepared["episode_group"], prepared["fold"], prepared["folds"]
    validation, train, raw, known_classes = prepared["validation"], prepared["train"], prepared["raw"], prepared["known_classes"]
    space, control_permutation = prepared["space"], prepared["control_permutation"]
    features = samples.features[0]

    def predict(copy: np.ndarray) -> np.ndarray:
        """Each sample's prediction by the given copy (per sample)."""
        x = (features - fitted["feature_mean"][copy]) / fitted["feature_std"][copy]
        return (np.einsum("nd,nde->ne", x, fitted["kernel"][copy]) + fitted["bias"][copy]).astype(np.float32)

    prediction = predict(fold)  # every sample predicted by the probe that never saw its fold
    fold_classes = space["classes"][fold]  # (n, C, d): each sample's fold's label space
    unit_fold_classes = unit_rows(fold_classes)
    similarity = np.einsum("nd,ncd->nc", unit_rows(prediction), unit_fold_classes)
    heldout = retrieval(similarity, sample_class)
    target = fold_classes[np.arange(len(fold)), sample_class]
    cosine = row_cosine(prediction, target)
    # The guide's cosine lives in the raw T5 space: mean + unit(prediction) x typical norm, back-projected.
    scale = np.array([np.linalg.norm(space["classes"][f][known_classes[f]], axis=1).mean() for f in range(folds)])
    back = to_t5(unit_rows(prediction) * scale[fold][:, None], fold, space)
    raw_prediction = back + space["mean"][fold] if labels.center_labels else back
    raw_cosine = row_cosine(raw_prediction, raw[sample_class])
    constant_cosine = row_cosine(space["mean"][fold], raw[sample_class])

    if training.control:
        control_prediction = predict(fold + folds)
        control_similarity = np.einsum("nd,ncd->nc", unit_rows(control_prediction), unit_fold_classes)
        control = retrieval(control_similarity, control_permutation[sample_class])
    training_correct = np.concatenate([
        retrieval(np.einsum("nd,cd->nc", unit_rows(predict(np.full(len(fold), f))[train[f]]), unit_rows(space["classes"][f])), sample_class[train[f]])["correct"]
        for f in range(folds)
    ])

    per_sample = {"accuracy": heldout["correct"], "cosine_similarity": raw_cosine, "cosine_similarity_centered": cosine}
    if training.control:
        per_sample["control_accuracy"] = control["correct"]
        per_sample["selectivity"] = heldout["correct"].astype(float) - control["correct"]
    intervals = bootstrap_intervals(per_sample, episode_group, training.bootstrap, training.seed)
    fold_accuracy = np.array([heldout["correct"][fold == f].mean() for f in range(folds)])
    top_k = {k: float(np.mean(heldout["rank"] <= k)) for k in (1, 3, 5) if k <= len(descriptions)}
    confusion = np.zeros((len(descriptions), len(descriptions)), dtype=np.int64)
    np.add.at(confusion, (sample_class, heldout["predicted"]), 1)
    per_task = {int(t): {"accuracy": float(heldout["correct"][samples.task_id == t].mean()), "samples": int((samples.task_id == t).sum())} for t in task_ids}
    metrics = {
        "accuracy": float(heldout["correct"].mean()),
        "cosine_similarity": float(raw_cosine.mean()),
        "cosine_similarity_centered": float(cosine.mean()),
        "constant_predictor_cosine": float(constant_cosine.mean()),
        "chance_accuracy": 1.0 / len(descriptions),
        "training_accuracy": float(training_correct.mean()),
        "top_k_accuracy": top_k,
        "mean_reciprocal_rank": float(np.mean(1.0 / heldout["rank"])),
        "cosine_margin": float(heldout["margin"].mean()),
        "fold_accuracy": fold_accuracy,
        "fold_accuracy_mean": float(fold_accuracy.mean()),
        "fold_accuracy_std": float(fold_accuracy.std()),
        "confidence_intervals": intervals,
        "per_task_accuracy": per_task,
        "confusion_matrix": confusion,
        "num_samples": int(len(fold)),
        "num_heldout_samples": int(len(fold)),  # cross-validation: every sample is held out once
        "num_tasks": len(task_ids),
        "num_classes": len(descriptions),
        "num_episodes": len(np.unique(episode_group)),
        "num_folds": folds,
    }
    if training.control:
        metrics["control_accuracy"] = float(control["correct"].mean())
        metrics["selectivity"] = metrics["accuracy"] - metrics["control_accuracy"]
    history = {key: fitted[key] for key in ("epochs_run", "best_epoch", "train_loss", "validation_loss", "batch_size", "steps_per_epoch", "penalty") if key in fitted}
    return {
        "format_version": 2,
        "config": {
            "data": dataclasses.asdict(data),
            "labels": dataclasses.asdict(labels),
            "training": dataclasses.asdict(training),
            "split": describe_split(training, folds),
            "token_positions": describe_token_positions(data),
            "label_space": describe_label_space(labels),
            "accuracy_definition": "a held-out prediction's nearest (cosine) analyzed-task embedding is its own task's",
            "control_task": "same probe, data and budget, labels permuted across tasks with no task kept in place",
            "control_permutation": control_permutation,
            "contrastive_temperature": CONTRASTIVE_TEMPERATURE,
        },
        "metrics": metrics,
        "tasks": {
            "task_ids": np.array(task_ids),
            "descriptions": [report.descriptions[t] for t in task_ids],
            "class_of_task": np.array([class_of_task[t] for t in task_ids]),
            "class_descriptions": descriptions,
            "t5_embeddings": raw,
            "label_mean": space["mean"],
            "label_basis": None if labels.label_space == "full" and not labels.label_dim else space["basis"],  # None: T5's axes
        },
        "samples": {
            "task_id": samples.task_id,
            "episode": samples.episode,
            "step": samples.step,
            "inference_time": samples.inference_time,
            "fold": fold,
            "validation": validation,  # (folds, samples): early-stopping samples of each fold
        },
        "heldout": {
            "prediction": to_t5(prediction, fold, space),  # in T5's axes (centered like the labels)
            "target": to_t5(target, fold, space),
            "true_class": sample_class,
            "predicted_class": heldout["predicted"],
            "rank": heldout["rank"],
            "cosine": cosine,
            "similarity": similarity,  # (samples, tasks): cosine of each prediction to each task's embedding
            "control_predicted_class": control["predicted"] if training.control else None,
        },
        "history": history,
        "probe": {key: fitted[key] for key in ("kernel", "bias", "feature_mean", "feature_std")},  # (copies, ...): folds, then controls
        "data_report": {
            "files": report.files,
            "missing_tasks": report.missing_tasks,
            "missing_episodes": report.missing_episodes,
            "episodes_without_step": report.episodes_without_step.get(data.rollout_step, []),
            "steps_seen": sorted(report.steps_seen),
            "skipped_files": report.skipped_files,
        },
        "versions": package_versions(),
    }


def describe_split(training: TrainingConfig, folds: int) -> str:
    """How samples were held out, in words."""
    unit = "whole tasks (retrieval of unseen tasks' embeddings)" if training.split == "task" else "whole episodes, every task on every training side"
    if training.probe == "ridge":
        return f"{folds}-fold cross-validation over {unit}; ridge penalty chosen by inner cross-validation on each fold's training side"
    kind = "tasks" if training.split == "task" else "episodes"
    return f"{folds}-fold cross-validation over {unit}; early stopping on {training.validation_fraction:g} of each fold's training {kind}"


def describe_label_space(labels: LabelConfig) -> str:
    """What the probe's targets are, in words."""
    text = "T5 mean over real tokens" + (", minus the mean training-task embedding" if labels.center_labels else " (raw)")
    if labels.label_dim:
        return text + f", projected on the training tasks' top {labels.label_dim} principal directions"
    if labels.label_space == "span":
        return text + "; the probe predicts coordinates in the span of the training tasks' embeddings, mapped back to T5's axes"
    return text + "; the probe predicts all of T5's axes (--label_space full)"


def describe_token_positions(config: DataConfig) -> str:
    """Human-readable token positions pooled for the expert."""
    if config.token_range is not None:
        where = f"tokens {config.token_range[0]}-{config.token_range[1] - 1} (--token_range)"
    elif config.expert in EXPERT_TOKENS:
        positions = EXPERT_TOKENS[config.expert]
        part = {"vlm": "images 0-767 and text 768-815", "text_only": "prompt text", "image": "3 cameras x 256 SigLIP patches"}[config.expert]
        where = f"VLM prefix tokens {positions.start}-{positions.stop - 1} ({part})"
    elif config.expert == "action":
        where = f"action-expert tokens (positions {PREFIX_TOKEN_COUNT}+ when the entry holds the whole sequence)"
    else:
        where = f"SigLIP patches of camera {config.camera} (vision_latents)"
    return f"{where}, {config.pooling}-pooled"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (read from metadata: imports nothing)."""
    versions = {"python": platform.python_version()}
    for name in ("numpy", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "sentencepiece", "ml_dtypes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# -----------------------------------------------------------------------------
# Output: results pickle and text summary, each written atomically
# -----------------------------------------------------------------------------


def result_stem(data: DataConfig, inference_times: list[float]) -> str:
    """The guide's file stem, {expert}_layer{L}_step{S}, plus _t{time} for one denoising step
    ({camera} in place of the layer for SigLIP's output)."""
    where = f"_{data.camera}" if data.expert == "visual" else f"_layer{data.layer}"
    stem = f"{data.expert}{where}_step{data.rollout_step}"
    if data.inference_step is None:
        return stem
    if data.inference_step >= len(inference_times):
        raise OptionError(f"--inference_step {data.inference_step} is out of range: the steps have {len(inference_times)} denoising entries (0-{len(inference_times) - 1})")
    return f"{stem}_t{inference_times[data.inference_step]:g}"


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def with_interval(metrics: dict, name: str) -> str:
    """A metric with its bootstrap interval, when there is one."""
    interval = metrics["confidence_intervals"].get(name)
    value = f"{metrics[name]:.4f}"
    return f"{value} [95% CI {interval[0]:.4f}, {interval[1]:.4f}]" if interval else value


def format_summary(results: dict) -> str:
    """The guide's summary block, then the evidence behind it, what was measured and how."""
    data, labels, training = (results["config"][k] for k in ("data", "labels", "training"))
    metrics, tasks, report, history = results["metrics"], results["tasks"], results["data_report"], results["history"]
    inference = data["inference_step"]
    lines = [
        "Linear Probing Results",
        "=====================",
        "",
        f"Expert: {data['expert']}",
        f"Layer: {data['layer']}",
        f"Rollout Step: {data['rollout_step']}",
        f"Feature Type: {data['feature_type']}",
        "",
        f"Accuracy: {metrics['accuracy']:.4f}",
        f"Cosine Similarity: {metrics['cosine_similarity']:.4f}",
        f"Number of Samples: {metrics['num_samples']}",
        f"Number of Tasks: {metrics['num_tasks']}",
        "",
        "Task Descriptions:",
        *(f"  {t}: {d}" for t, d in zip(tasks["task_ids"], tasks["descriptions"])),
        "",
        "Held-out Evidence",
        "-----------------",
        f"Held out: {results['config']['split']}; every one of the {metrics['num_samples']} samples "
        f"({metrics['num_episodes']} episodes) predicted by a probe that never saw it",
        f"Accuracy: {with_interval(metrics, 'accuracy')}; per fold {metrics['fold_accuracy_mean']:.4f} +/- {metrics['fold_accuracy_std']:.4f}",
        f"Chance Accuracy: {metrics['chance_accuracy']:.4f} (1 / {metrics['num_classes']} task embeddings)",
    ]
    if "control_accuracy" in metrics:
        lines += [
            f"Control Accuracy (labels permuted across tasks): {with_interval(metrics, 'control_accuracy')}",
            f"Selectivity (accuracy - control): {with_interval(metrics, 'selectivity')}",
        ]
    else:
        lines.append("Control Task: off (--no_control)")
    lines += [
        "Top-k Accuracy: " + ", ".join(f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items()),
        f"Mean Reciprocal Rank: {metrics['mean_reciprocal_rank']:.4f}",
        f"Cosine Margin (own task - nearest other): {metrics['cosine_margin']:.4f}",
        f"Training Accuracy: {metrics['training_accuracy']:.4f}",
        f"Cosine Similarity (probe's label space): {with_interval(metrics, 'cosine_similarity_centered')}",
        f"Cosine Similarity (raw T5, the guide's): {with_interval(metrics, 'cosine_similarity')}; "
        f"constant predictor (mean embedding): {metrics['constant_predictor_cosine']:.4f}",
        "Accuracy: share of held-out samples whose prediction is closer (cosine) to its own task's embedding than to any other analyzed task's",
        "Per-task Accuracy:",
        *(f"  {t}: {v['accuracy']:.4f} ({v['samples']} samples)" for t, v in metrics["per_task_accuracy"].items()),
        "",
        "What Was Measured",
        "-----------------",
        f"Token Positions: {results['config']['token_positions']}",
        f"Inference Step: {'all denoising entries, each its own sample' if inference is None else inference}"
        if data["expert"] == "action"
        else "Inference Step: n/a (VLM expert)",
        f"Labels: {results['config']['label_space']}; T5 model {labels['t5_model']}",
        f"Features: {'standardized with each fold' + chr(39) + 's training mean and std' if training['standardize'] else 'raw'}",
        f"Probe: {training['probe']}"
        + (f", loss {training['loss']}" if training["probe"] == "linear" else ", closed-form ridge, penalty by inner cross-validation"),
        f"Seed: {training['seed']}; bootstrap resamples of episodes: {training['bootstrap']}",
        f"Task Range: {data['task_range'][0]}-{data['task_range'][1] - 1}; Episode Range: {data['episode_range'][0]}-{data['episode_range'][1] - 1}",
        f"Missing Task Files: {', '.join(map(str, report['missing_tasks'])) or 'none'}",
        f"Skipped Files: {len(report['skipped_files']) or 'none'}",
        *(f"  {reason}" for reason in report["skipped_files"].values()),
        f"Episodes Missing From Files: {len(report['missing_episodes'])}",
        f"Episodes Without step_{data['rollout_step']}: {len(report['episodes_without_step'])}"
        + (f" ({', '.join(f'task {t} episode {e}' for t, e in report['episodes_without_step'])})" if report["episodes_without_step"] else ""),
    ]
    if training["probe"] == "linear":
        epochs = history["epochs_run"][: metrics["num_folds"]]
        lines.append(
            f"Training: Adam lr {training['learning_rate']}, batch {history['batch_size']}, {history['steps_per_epoch']} updates/epoch, "
            f"{epochs.min()}-{epochs.max()} of at most {training['num_epochs']} epochs per fold (early stopping, patience {training['patience']})"
        )
    lines.append("")
    return "\n".join(lines)


def write_results(results: dict, output_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write results_{stem}.pkl and summary_{stem}.txt; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path, summary_path = output_dir / f"results_{stem}.pkl", output_dir / f"summary_{stem}.txt"
    write_atomically(results_path, pickle.dumps(results, protocol=4))
    write_atomically(summary_path, format_summary(results).encode())
    return results_path, summary_path


def sweep_items(base: DataConfig, layers, steps, inference, report: ReadReport) -> list[DataConfig]:
    """Every (rollout step, denoising step, layer) combination asked for, in a fixed order; "all"/"each" resolved from the data."""
    layers = [None] if base.expert == "visual" else list(range(report.layer_count)) if layers == "all" else layers
    steps = sorted(report.steps_seen) if steps == "all" else steps
    inference = [None] if inference == "all" else list(range(report.inference_count)) if inference == "each" else inference
    return [dataclasses.replace(base, rollout_step=s, inference_step=k, layer=layer) for s in steps for k in inference for layer in layers]


def run_sweep(items: list[DataConfig], report: ReadReport, samples_by_step: dict[int, Samples], layers: list, labels: LabelConfig,
              training: TrainingConfig, output_dir: Path, plot: bool, started: float, command: list[str]) -> list[tuple[dict, Path, Path]]:
    """Train and evaluate every item; items that share their samples are trained together in one program."""
    groups: dict[tuple, list] = {}
    for item in items:
        samples = samples_by_step[item.rollout_step]
        rows = np.ones(len(samples.task_id), bool) if item.inference_step is None else samples.inference_index == item.inference_step
        key = (item.rollout_step, samples.task_id[rows].tobytes(), samples.episode[rows].tobytes())
        groups.setdefault(key, []).append((item, samples.select(np.flatnonzero(rows), layers.index(item.layer))))
    written = []
    with tqdm(total=len(items), desc="probes", unit="result", disable=progress_disabled(), leave=False) as progress:
        for members in groups.values():
            prepared = prepare_folds(members[0][1], report, labels, training)
            fitted = fit_items(np.stack([selected.features[0] for _, selected in members]), prepared, training)
            for position, (item, selected) in enumerate(members):
                results = evaluate_item(selected, {k: v[position] for k, v in fitted.items()}, prepared, report, item, labels, training)
                results["wall_time_seconds"] = time.perf_counter() - started
                results["command"] = command
                stem = result_stem(item, report.inference_times)
                paths = write_results(results, output_dir, stem)
                if plot:
                    write_run_plots(results, selected.features[0], output_dir, stem)
                written.append((results, *paths))
                progress.update()
    return written


# -----------------------------------------------------------------------------
# Report and plots: a results directory as a table, curves and heatmaps (PNG, Agg)
# -----------------------------------------------------------------------------

REPORT_COLUMNS = [
    "expert", "layer", "rollout_step", "inference_step", "inference_time", "feature_type", "token_positions", "probe", "loss",
    "split", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "control_accuracy", "selectivity", "selectivity_ci_low",
    "selectivity_ci_high", "cosine_similarity", "cosine_similarity_centered", "constant_predictor_cosine", "chance_accuracy",
    "top_3_accuracy", "mean_reciprocal_rank", "num_samples", "num_tasks", "num_episodes", "num_folds", "file",
]


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


def report_row(results: dict, path: Path) -> dict:
    """One CSV row: what was probed and how well."""
    data, training, metrics = results["config"]["data"], results["config"]["training"], results["metrics"]
    intervals = metrics["confidence_intervals"]
    times = np.unique(results["samples"]["inference_time"])
    return {
        "expert": data["expert"], "layer": data["layer"], "rollout_step": data["rollout_step"],
        "inference_step": "all" if data["inference_step"] is None else data["inference_step"],
        "inference_time": float(times[0]) if len(times) == 1 and not np.isnan(times[0]) else "",
        "feature_type": data["feature_type"], "token_positions": results["config"]["token_positions"], "probe": training["probe"],
        "loss": training["loss"] if training["probe"] == "linear" else "", "split": training["split"],
        "accuracy": metrics["accuracy"], "accuracy_ci_low": intervals.get("accuracy", ("", ""))[0], "accuracy_ci_high": intervals.get("accuracy", ("", ""))[1],
        "control_accuracy": metrics.get("control_accuracy", ""), "selectivity": metrics.get("selectivity", ""),
        "selectivity_ci_low": intervals.get("selectivity", ("", ""))[0], "selectivity_ci_high": intervals.get("selectivity", ("", ""))[1],
        "cosine_similarity": metrics["cosine_similarity"], "cosine_similarity_centered": metrics["cosine_similarity_centered"],
        "constant_predictor_cosine": metrics["constant_predictor_cosine"], "chance_accuracy": metrics["chance_accuracy"],
        "top_3_accuracy": metrics["top_k_accuracy"].get(3, ""), "mean_reciprocal_rank": metrics["mean_reciprocal_rank"],
        "num_samples": metrics["num_samples"], "num_tasks": metrics["num_tasks"], "num_episodes": metrics["num_episodes"],
        "num_folds": metrics["num_folds"], "file": path.name,
    }


def series_label(row: dict, varying: list[str]) -> str:
    """Legend text: the expert plus whatever else varies between the report's lines."""
    parts = [row["expert"]] + [f"{name.replace('_', ' ')} {row[name]}" for name in varying]
    return ", ".join(parts)


def write_report(directory: Path) -> str:
    """sweep.csv and by-layer plots from every results file in `directory`; return the printed table."""
    paths = sorted(directory.glob("results_*.pkl")) if directory.is_dir() else []
    if not paths:
        raise ProbeError(f"--report {directory}: no results_*.pkl files there")
    rows = []
    for path in paths:
        with open(path, "rb") as file:
            try:
                rows.append(report_row(RestrictedUnpickler(file).load(), path))
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
                log.warning("skipping %s: not a results file of this program (%s)", path, error)
    if not rows:
        raise ProbeError(f"--report {directory}: no readable results files")
    order = lambda row: (row["expert"], row["rollout_step"], str(row["inference_step"]), str(row["feature_type"]), -1 if row["layer"] is None else row["layer"])
    rows.sort(key=order)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS)
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    write_atomically(directory / "sweep.csv", buffer.getvalue().encode())
    layered = [row for row in rows if row["layer"] is not None]
    if layered:
        plot_by_layer(layered, directory)
    header = f"{'expert':9} {'layer':>5} {'step':>5} {'infer':>5} {'accuracy':>8} {'95% CI':>15} {'control':>7} {'select.':>7} {'cosine':>7} {'centered':>8} {'chance':>6} {'samples':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        interval = f"[{row['accuracy_ci_low']:.2f}, {row['accuracy_ci_high']:.2f}]" if row["accuracy_ci_low"] != "" else ""
        number = lambda value, width: f"{value:{width}.4f}" if value != "" else " " * width
        lines.append(
            f"{row['expert']:9} {'-' if row['layer'] is None else row['layer']:>5} {row['rollout_step']:>5} {row['inference_step']!s:>5} "
            f"{row['accuracy']:8.4f} {interval:>15} {number(row['control_accuracy'], 7)} {number(row['selectivity'], 7)} "
            f"{row['cosine_similarity']:7.4f} {row['cosine_similarity_centered']:8.4f} {row['chance_accuracy']:6.3f} {row['num_samples']:7d}"
        )
    lines.append(f"wrote {directory / 'sweep.csv'} and {directory / 'accuracy_by_layer.png'}, {directory / 'cosine_by_layer.png'}" if layered else f"wrote {directory / 'sweep.csv'}")
    return "\n".join(lines)


def plot_by_layer(rows: list[dict], directory: Path) -> None:
    """Accuracy (with interval, control and chance) and cosine against layer, one line per series."""
    plt = pyplot()
    keys = ("rollout_step", "inference_step", "feature_type", "token_positions", "probe", "loss", "split")
    experts = {row["expert"] for row in rows}  # token positions follow the expert: name them only when they vary within one
    varying = [key for key in keys if any(len({row[key] for row in rows if row["expert"] == expert}) > 1 for expert in experts)]
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["expert"], *(row[key] for key in varying)), []).append(row)
    layers = sorted({row["layer"] for row in rows})
    figure, axis = plt.subplots(figsize=(9, 5))
    for members in series.values():
        x = [row["layer"] for row in members]
        line = axis.plot(x, [row["accuracy"] for row in members], marker="o", label=series_label(members[0], varying))[0]
        if all(row["accuracy_ci_low"] != "" for row in members):
            axis.fill_between(x, [row["accuracy_ci_low"] for row in members], [row["accuracy_ci_high"] for row in members], color=line.get_color(), alpha=0.15)
        if all(row["control_accuracy"] != "" for row in members):
            axis.plot(x, [row["control_accuracy"] for row in members], linestyle=":", color=line.get_color(), label=f"{series_label(members[0], varying)} (control)")
    chance = sorted({row["chance_accuracy"] for row in rows})
    for value in chance:
        axis.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"chance {value:.3f}")
    axis.set(xlabel="layer", ylabel="held-out accuracy", ylim=(-0.02, 1.02), xticks=layers, title="Task retrieval from each layer (95% bootstrap interval shaded)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(alpha=0.3)
    save_figure(figure, directory / "accuracy_by_layer.png")
    figure, (centered, raw) = plt.subplots(1, 2, figsize=(13, 5))
    for number, members in enumerate(series.values()):
        x = [row["layer"] for row in members]
        line = centered.plot(x, [row["cosine_similarity_centered"] for row in members], marker="o", label=series_label(members[0], varying))[0]
        raw.plot(x, [row["cosine_similarity"] for row in members], marker="o", color=line.get_color(), label=series_label(members[0], varying))
        raw.plot(x, [row["constant_predictor_cosine"] for row in members], linestyle="--", color="grey", label=None if number else "constant predictor (mean embedding)")
    centered.set(xlabel="layer", ylabel="cosine to own task's embedding", xticks=layers, title="Probe's label space (centered T5)")
    raw.set(xlabel="layer", ylabel="cosine to own task's embedding", xticks=layers, title="Raw T5 space (the guide's), with the constant predictor")
    for axis in (centered, raw):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    save_figure(figure, directory / "cosine_by_layer.png")


def write_run_plots(results: dict, features: np.ndarray, output_dir: Path, stem: str) -> None:
    """Training curves, confusion matrix, held-out similarity heatmap and a PCA of the features."""
    plt = pyplot()
    history, metrics, heldout = results["history"], results["metrics"], results["heldout"]
    folds, task_ids = metrics["num_folds"], results["tasks"]["task_ids"]
    if "train_loss" in history:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for f in range(folds):
            epochs = int(history["epochs_run"][f])
            line = axis.plot(range(1, epochs + 1), history["train_loss"][f][:epochs], label=f"fold {f} train")[0]
            axis.plot(range(1, epochs + 1), history["validation_loss"][f][:epochs], linestyle="--", color=line.get_color(), label=f"fold {f} validation")
            axis.axvline(int(history["best_epoch"][f]), color=line.get_color(), linewidth=0.5)
        axis.set(xlabel="epoch", ylabel=f"{results['config']['training']['loss']} loss", title=f"Training curves, {stem} (vertical: kept epoch)")
        axis.legend(fontsize=7, ncol=2)
        axis.grid(alpha=0.3)
        save_figure(figure, output_dir / f"curves_{stem}.png")
    labels = [str(t) for t in task_ids]
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(metrics["confusion_matrix"], cmap="Blues")
    axis.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels, xlabel="predicted task", ylabel="true task",
             title=f"Held-out confusion, {stem}\naccuracy {metrics['accuracy']:.3f} (chance {metrics['chance_accuracy']:.3f})")
    figure.colorbar(image, ax=axis, label="samples")
    save_figure(figure, output_dir / f"confusion_{stem}.png")
    order = np.argsort(heldout["true_class"], kind="stable")
    figure, axis = plt.subplots(figsize=(6.5, 6))
    image = axis.imshow(heldout["similarity"][order], aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axis.set(xticks=range(len(labels)), xticklabels=labels, xlabel="task embedding", ylabel="held-out sample (grouped by true task)",
             title=f"Prediction-to-task-embedding cosine, {stem}")
    figure.colorbar(image, ax=axis, label="cosine")
    save_figure(figure, output_dir / f"similarity_{stem}.png")
    centered = (features - features.mean(0)) / np.where(features.std(0) > 1e-6, features.std(0), 1.0)
    projected = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    colors = plt.get_cmap("tab20")
    for position, task in enumerate(task_ids):
        chosen = results["samples"]["task_id"] == task
        axis.scatter(projected[chosen, 0], projected[chosen, 1], s=14, color=colors(position % 20), label=str(task))
    axis.set(xlabel="PC 1", ylabel="PC 2", title=f"Pooled features (standardized), {stem}")
    axis.legend(title="task", fontsize=7, ncol=2)
    save_figure(figure, output_dir / f"pca_{stem}.png")


# -----------------------------------------------------------------------------
# Demo data: the real layout at small widths, with a planted task signal
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
DEMO_CAMERA_SIGNAL = {"base_0_rgb": 1.0, "left_wrist_0_rgb": 0.5, "right_wrist_0_rgb": 0.0}  # SigLIP output (vision_latents)
DEMO_TIMES = [round(1.0 - 0.1 * k, 1) for k in range(10)]  # denoising order: 1.0 ... 0.1


def demo_expert_entry(rng: np.random.Generator, signature: np.ndarray, signal_by_token: np.ndarray, num_layers: int) -> dict:
    """One expert entry: (layer, 1, token, width) hidden states = episode noise + token noise + signal."""
    width, token_count = signature.shape[0], signal_by_token.shape[0]
    layer_gain = np.ones(num_layers, dtype=np.float32)
    layer_gain[DEMO_SILENT_LAYER] = 0.0
    hidden = rng.standard_normal((num_layers, 1, token_count, width), dtype=np.float32)
    hidden += rng.standard_normal((num_layers, 1, 1, width), dtype=np.float32)
    hidden += layer_gain[:, None, None, None] * signal_by_token[None, None, :, None] * signature[None, None, None, :]
    return {
        "hidden_states": hidden,
        "pre_attn_norm_scales": rng.standard_normal((num_layers, width), dtype=np.float32),
    }


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
) -> list[str]:
    """Write task_{id}_{name}.pkl files in the Pi0 layout; return the task descriptions.

    Planted: text tokens carry the task strongly, image tokens and the action expert
    weakly (DEMO_SIGNAL), layer DEMO_SILENT_LAYER not at all. Each task's signal is a random
    direction unless `vlm_signatures` (tasks x vlm_width) gives them, e.g. a linear image of the
    tasks' T5 embeddings; `descriptions` replaces the ten LIBERO-like ones. The last episode of task 1 ends before the last step, as short episodes do.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    descriptions = descriptions or [DEMO_DESCRIPTIONS[i % len(DEMO_DESCRIPTIONS)] for i in range(num_tasks)]
    vlm_signal = np.zeros(PREFIX_TOKEN_COUNT, dtype=np.float32)
    vlm_signal[EXPERT_TOKENS["image"]] = DEMO_SIGNAL["image"]
    vlm_signal[EXPERT_TOKENS["text_only"]] = DEMO_SIGNAL["text"]
    action_signal = np.full(51, DEMO_SIGNAL["action"], dtype=np.float32)
    for task_id, description in enumerate(descriptions):
        vlm_signature = rng.standard_normal(vlm_width, dtype=np.float32)
        if vlm_signatures is not None:
            vlm_signature = np.asarray(vlm_signatures[task_id], dtype=np.float32)
        action_signature = rng.standard_normal(action_width, dtype=np.float32)
        episodes = {}
        for episode in range(num_episodes):
            episode_steps = steps[:-1] if (task_id == 1 and episode == num_episodes - 1 and len(steps) > 1) else steps
            rollout_steps = {}
            for step in episode_steps:
                step_data = {"timestep": step, "action": rng.standard_normal(7).tolist(), "prompt": description}
                for time_value in DEMO_TIMES:
                    step_data[action_key_format.format(time_value)] = demo_expert_entry(rng, action_signature, action_signal, num_layers)
                step_data["vlm_layer_output"] = demo_expert_entry(rng, vlm_signature, vlm_signal, num_layers)
                step_data["vision_latents"] = {  # SigLIP output per camera; LIBERO's right wrist image is all zeros
                    camera: {"pre_logits": (rng.standard_normal((256, vlm_width), dtype=np.float32) + rng.standard_normal(vlm_width, dtype=np.float32)
                                            + strength * vlm_signature).astype(np.float32)}
                    for camera, strength in DEMO_CAMERA_SIGNAL.items()
                }
                step_data["observation"] = {
                    "agentview_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                    "wrist_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                    "robot_state": rng.standard_normal(3).tolist(),
                }
                rollout_steps[f"step_{step}"] = step_data
            episodes[f"episode_{episode}"] = {
                "rollout_steps": rollout_steps,
                "metadata": {"success": bool(episode % 2), "total_steps": episode_steps[-1] + 5, "episode_idx": episode},
            }
        task_data = {"task_name": description.replace(" ", "_"), "task_id": task_id, "task_description": description, "episodes": episodes}
        path = directory / f"task_{task_id}_{task_data['task_name']}.pkl"
        write_atomically(path, pickle.dumps(task_data, protocol=protocol))
    return descriptions


def build_tiny_t5(directory: Path, descriptions: list[str], seed: int = 0) -> None:
    """Save a small random-weight T5 encoder with its own sentencepiece vocabulary (offline stand-in for t5-small)."""
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
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    directory.mkdir(parents=True, exist_ok=True)
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prepare_demo(directory: Path) -> None:
    """Write the demo dataset and tiny T5 once; later runs reuse them."""
    marker = directory / "demo.json"
    settings = {"version": 5, "signal": DEMO_SIGNAL, "silent_layer": DEMO_SILENT_LAYER}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    log.warning("writing the demo dataset and a tiny random-weight T5 to %s", directory)
    descriptions = write_demo_dataset(directory)
    build_tiny_t5(directory / "t5_tiny", descriptions)
    write_atomically(marker, json.dumps(settings).encode())


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

DEMO_DEFAULTS = {"rollout_step": [10], "expert": "text_only", "layer": [5], "task_range": [0, 10], "episode_range": [0, 6]}


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def index_list(words: tuple[str, ...]):
    """argparse type factory: '5', '0,5,10', '0-17' (inclusive) or one of `words` ('all', 'each')."""

    def parse(text: str) -> list[int] | str:
        if text in words:
            return text
        values: list[int] = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise argparse.ArgumentTypeError(f"expected N, N,M,..., N-M or {' or '.join(words)}; got {text!r}")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise argparse.ArgumentTypeError(f"range {part.strip()} runs backwards")
            values += [v for v in range(first, last + 1) if v not in values]
        return values

    return parse


def shard_value(text: str) -> tuple[int, int]:
    """argparse type: INDEX/COUNT with 0 <= INDEX < COUNT."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected INDEX/COUNT with 0 <= INDEX < COUNT, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: the guide's options plus ours."""
    parser = argparse.ArgumentParser(
        description="Linear probe from one layer of a Pi0 expert to the T5 embedding of the task instruction, evaluated on held-out episodes. "
        "Several layers, rollout steps or denoising steps make a sweep: one result pair per combination, trained together.",
    )
    what = parser.add_argument_group("what to probe (required unless --demo or --report)")
    what.add_argument("--rollout_step", type=index_list(("all",)), help="environment step N of the key 'step_N' (not a position); several: 10,20 or all (every step present)")
    what.add_argument("--expert", choices=EXPERTS, help="vlm: VLM tokens 0-815; text_only: 768-815; image: 0-767; action: the action expert's own tokens; visual: SigLIP output of --camera")
    what.add_argument("--layer", type=index_list(("all",)), help="layer index (0-17 for Pi0; 0 is the input embeddings), checked against the data; several: 0,5,10, 0-17 or all")
    what.add_argument("--data_path", help="directory of task_{id}_{name}.pkl files")
    what.add_argument("--task_range", nargs=2, type=non_negative_int, metavar=("START", "END"), help="task ids START..END-1 (end-exclusive: '0 10' is ten tasks)")
    what.add_argument("--episode_range", nargs=2, type=non_negative_int, metavar=("START", "END"), help="episodes START..END-1 of each task (end-exclusive)")
    what.add_argument("--feature_type", default=None, help="key of the expert entry to probe: hidden_states, post_attn_embedding, ... (default: hidden_states; pre_logits for visual)")
    what.add_argument("--inference_step", type=index_list(("all", "each")), default="all", metavar="{all,each,K,K-L,...}",
                      help="action expert: all = every denoising entry as its own sample, pooled in one result (default); each = one result per denoising step; K = the K-th (0 = t 1.0, 9 = t 0.1); several: 0,9 or 0-4")
    what.add_argument("--token_range", nargs=2, type=non_negative_int, metavar=("START", "END"), help="pool token positions START..END-1 instead of the expert's")
    what.add_argument("--pooling", choices=("mean", "max", "last"), default="mean", help="over the token positions (default: %(default)s)")
    what.add_argument("--camera", default="base_0_rgb", help="--expert visual: which vision_latents camera (default: %(default)s)")
    what.add_argument("--strict", action="store_true", help="stop at the first unreadable or malformed task file instead of skipping it with a warning")
    what.add_argument("--trust_pickle", action="store_true", help="UNSAFE: let task files name any Python global, which runs code from the file; only for files you made, with custom classes")
    labels = parser.add_argument_group("labels")
    labels.add_argument("--t5_model", default="t5-small", help="T5 hub name or local directory with config, weights and tokenizer (default: %(default)s)")
    labels.add_argument("--no_center_labels", action="store_true", help="train on raw T5 embeddings (the guide's exact recipe) instead of subtracting the mean training-task embedding")
    labels.add_argument("--label_space", choices=("span", "full"), default="span",
                        help="span: the probe predicts coordinates in the span of the training tasks' embeddings (at most tasks - 1 "
                        "directions; exact for the loss and retrieval, and as many times cheaper as T5 is wider); full: all of T5's axes, "
                        "the guide's recipe literally (512 outputs for t5-small: about 15x the training time) (default: %(default)s)")
    labels.add_argument("--label_dim", type=positive_int, default=None, help="project the T5 embeddings on the training tasks' top K principal directions (default: off)")
    labels.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="where T5 labels, task-file indexes and compiled JAX programs are cached (default: %(default)s)")
    training = parser.add_argument_group("training")
    training.add_argument("--learning_rate", type=positive_float, default=0.001, help="Adam learning rate (default: %(default)s)")
    training.add_argument("--num_epochs", type=positive_int, default=100, help="at most this many epochs; early stopping usually ends sooner (default: %(default)s)")
    training.add_argument("--batch_size", type=positive_int, default=32, help="minibatch size (default: %(default)s)")
    training.add_argument("--seed", type=int, default=42, help="seeds the folds, initialisation, shuffling, control labels and bootstrap (default: %(default)s)")
    training.add_argument("--patience", type=positive_int, default=10, help="epochs without validation improvement before stopping (default: %(default)s)")
    training.add_argument("--validation_fraction", type=fraction, default=0.2, help="share of each fold's training episodes (tasks, with --split task) used for early stopping (default: %(default)s)")
    training.add_argument("--probe", choices=("linear", "ridge"), default="linear", help="linear: trained Dense layer; ridge: the same map in closed form, penalty by inner cross-validation (default: %(default)s)")
    training.add_argument("--loss", choices=("cosine", "mse", "contrastive"), default="cosine", help="cosine: 1 - cos (the guide's); contrastive: InfoNCE over the analyzed tasks' embeddings (default: %(default)s)")
    training.add_argument("--no_standardize", action="store_true", help="do not standardize features with training-set statistics")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--cv_folds", type=positive_int, default=5, help="cross-validation folds, grouped by episode (or task); fewer when there are fewer episodes (default: %(default)s)")
    evaluation.add_argument("--split", choices=("episode", "task"), default="episode", help="episode: hold out episodes of every task; task: hold out whole tasks, whose embeddings the probe never sees (default: %(default)s)")
    evaluation.add_argument("--no_control", action="store_true", help="skip the control task (the same probe on labels permuted across tasks)")
    evaluation.add_argument("--bootstrap", type=non_negative_int, default=1000, help="resamples of episodes for 95%% confidence intervals; 0 for none (default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="results/linear_probing", help="created if missing (default: %(default)s)")
    output.add_argument("--skip_existing", action="store_true", help="leave combinations whose two result files exist (resume a killed sweep)")
    output.add_argument("--shard", type=shard_value, default=None, metavar="INDEX/COUNT", help="run only every COUNT-th combination, starting at INDEX (0-based), e.g. from a job array")
    output.add_argument("--plot", action="store_true", help="also write each run's training curves, confusion matrix, similarity heatmap and feature PCA (PNG)")
    output.add_argument("--report", metavar="DIR", help="read every results_*.pkl in DIR, write DIR/sweep.csv and accuracy/cosine-by-layer plots, print the table; nothing else runs")
    output.add_argument("--demo", action="store_true", help=f"write demo data and a tiny T5 under {DEMO_DIR} (once), then probe it; other options override the demo's")
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    verbosity.add_argument("--quiet", action="store_true", help="print only warnings and errors: no summary, no progress bars")
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
        for name, value in DEMO_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.data_path = args.data_path or str(DEMO_DIR)
        if args.t5_model == parser.get_default("t5_model"):
            args.t5_model = str(Path(args.data_path) / "t5_tiny")
    missing = [f"--{name}" for name in ("rollout_step", "expert", "layer", "data_path", "task_range", "episode_range") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    for name in ("task_range", "episode_range", "token_range"):
        if getattr(args, name) is not None and args.__dict__[name][0] >= args.__dict__[name][1]:
            start, end = getattr(args, name)
            parser.error(f"--{name} {start} {end}: END must be greater than START (the range is end-exclusive)")
    if args.cv_folds < 2:
        parser.error(f"--cv_folds {args.cv_folds}: at least 2 folds are needed to hold anything out")
    if args.probe == "ridge" and args.loss != "cosine":
        parser.error("--loss applies to --probe linear; ridge fits squared error in closed form")
    if args.inference_step != "all" and args.expert != "action":
        parser.error(f"--inference_step applies to --expert action only, not {args.expert}")
    if args.expert == "visual" and args.layer != [None]:
        parser.error("--layer does not apply to --expert visual: SigLIP's output (vision_latents) has no layer axis")
    if args.expert != "visual" and args.camera != parser.get_default("camera"):
        parser.error("--camera applies to --expert visual only")
    return args


def configs_from_arguments(args: argparse.Namespace) -> tuple[DataConfig, LabelConfig, TrainingConfig]:
    """Turn parsed options into the three configurations (the data one for the first combination)."""
    data = DataConfig(
        data_path=args.data_path,
        task_range=tuple(args.task_range),
        episode_range=tuple(args.episode_range),
        rollout_step=args.rollout_step[0] if isinstance(args.rollout_step, list) else 0,
        expert=args.expert,
        layer=args.layer[0] if isinstance(args.layer, list) else 0,
        feature_type=args.feature_type or ("pre_logits" if args.expert == "visual" else "hidden_states"),
        inference_step=None,
        token_range=tuple(args.token_range) if args.token_range else None,
        pooling=args.pooling,
        camera=args.camera,
        trust_pickle=args.trust_pickle,
        strict=args.strict,
        index_dir=str(Path(args.cache_dir) / "file_index"),
    )
    labels = LabelConfig(t5_model=args.t5_model, center_labels=not args.no_center_labels, label_space=args.label_space, label_dim=args.label_dim,
                         cache_dir=args.cache_dir)
    training = TrainingConfig(
        learning_rate=args.learning_rate,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        patience=args.patience,
        cv_folds=args.cv_folds,
        split=args.split,
        validation_fraction=args.validation_fraction,
        standardize=not args.no_standardize,
        control=not args.no_control,
        bootstrap=args.bootstrap,
        probe=args.probe,
        loss=args.loss,
    )
    return data, labels, training


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def run(args: argparse.Namespace, command: list[str], started: float) -> list[tuple[dict, Path, Path]]:
    """Resolve the sweep, read what it needs once, train, evaluate and write; return what was written."""
    if args.demo:
        prepare_demo(Path(args.data_path))
    base, labels, training = configs_from_arguments(args)
    # "all" layers or steps and "each" denoising step come from the data; so do the denoising times in file names.
    if "all" in (args.layer, args.rollout_step) or args.inference_step != "all":
        structure = read_files(base, None, None if args.rollout_step == "all" else args.rollout_step)[1]
    else:
        structure = ReadReport()
    items = sweep_items(base, args.layer, args.rollout_step, args.inference_step, structure)
    output_dir = Path(args.output_dir)
    stems = {item: result_stem(item, structure.inference_times) for item in items}
    if args.shard:
        index, count = args.shard
        items = items[index::count]
    if args.skip_existing:
        done = [item for item in items if all((output_dir / f"{kind}_{stems[item]}{ext}").is_file() for kind, ext in (("results", ".pkl"), ("summary", ".txt")))]
        if done:
            log.info("skipping %d combination(s) already written in %s", len(done), output_dir)
        items = [item for item in items if item not in done]
    if not items:
        log.warning("nothing to do: no combination is left for this shard, or all are already written")
        return []
    layers = sorted({item.layer for item in items}, key=lambda layer: -1 if layer is None else layer)
    samples_by_step, report = collect_samples(base, layers, sorted({item.rollout_step for item in items}))
    report.inference_times = report.inference_times or structure.inference_times
    log.info("%d combination(s), %d task files, feature width %d", len(items), len(report.files), next(iter(samples_by_step.values())).features.shape[2])
    return run_sweep(items, report, samples_by_step, layers, labels, training, output_dir, args.plot, started, command)


def main(argv: list[str] | None = None) -> int:
    """Run the program; return the exit status."""
    args = parse_arguments(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", force=True)  # other libraries: warnings only
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # repeated runs in a bash loop reuse the compiled probe
        jax.config.update("jax_compilation_cache_dir", str(Path(args.cache_dir) / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    started = time.perf_counter()
    try:
        if args.report:
            table = write_report(Path(args.report))
            if not args.quiet:
                print(table)
            return 0
        written = run(args, list(sys.argv if argv is None else argv), started)
    except ProbeError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return error.exit_code
    if not args.quiet:
        if len(written) == 1:
            print(format_summary(written[0][0]))
        for results, results_path, _ in written if len(written) > 1 else []:
            data, metrics = results["config"]["data"], results["metrics"]
            print(f"{results_path.name}: accuracy {metrics['accuracy']:.4f}, selectivity {metrics.get('selectivity', math.nan):.4f}, chance {metrics['chance_accuracy']:.4f}")
        if args.demo:
            print(
                f"Demo: planted task signal (in units of episode noise) text tokens {DEMO_SIGNAL['text']}, image tokens "
                f"{DEMO_SIGNAL['image']}, action expert {DEMO_SIGNAL['action']}; none in layer {DEMO_SILENT_LAYER}. "
                "Compare --expert vlm, --expert action, --layer 3."
            )
        print(f"done in {time.perf_counter() - started:.1f} s: {len(written)} result pair(s) in {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
