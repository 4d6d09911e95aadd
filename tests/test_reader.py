"""The mapping reader: equal to pickle.load, executes nothing, survives bad files, reads only what it needs."""

import collections
import fractions
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import linear_probing_inference as lpi

REPO = Path(__file__).resolve().parents[1]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.uint8, np.int64]


def assert_same(expected, actual, where="root"):
    """Deep equality with exact dtypes, shapes, memory order and values."""
    assert type(expected) is type(actual), (where, type(expected), type(actual))
    if isinstance(expected, dict):
        assert list(expected) == list(actual), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, where
        if isinstance(expected, np.ndarray):
            assert expected.flags.f_contiguous == actual.flags.f_contiguous or expected.ndim < 2, where
        assert expected.tobytes() == actual.tobytes(), where
    else:
        assert expected == actual, where


def sample_object(dtype) -> dict:
    """Big (mapped) and small (read) arrays of one dtype in both orders, with scalars and nesting."""
    rng = np.random.default_rng(0)
    big = (rng.standard_normal((6, 1, 200, 64)) * 50).astype(dtype)  # > 64 KiB: outside protocol-4 frames
    small = (rng.standard_normal((3, 4)) * 50).astype(dtype)
    return {
        "task_description": "pick up the milk",
        "episodes": {
            "episode_0": {
                "big_c": big,
                "big_f": np.asfortranarray(big[:, 0]),
                "small_c": small,
                "small_f": np.asfortranarray(small),
                "strided": big[:, 0, ::2],  # not contiguous when dumped
                "zero_d": np.array(7, dtype=dtype),
                "empty": np.zeros((0, 5), dtype=dtype),
                "scalar": big.reshape(-1)[3],
                "nested": [(big[0], {"again": big}), collections.OrderedDict(a=1.5, b=[None, True, "x", b"bytes"])],
            }
        },
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_reader_equals_pickle_load(tmp_path, protocol, dtype):
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps(sample_object(dtype), protocol=protocol))
    expected = pickle.loads(path.read_bytes())
    actual = lpi.read_task_file(path)
    assert_same(expected, actual)
    if protocol >= 3:  # mapped, read-only views over the file
        big = actual["episodes"]["episode_0"]["big_c"]
        assert not big.flags.writeable
        assert big.base is not None and type(big.base).__name__ == "mmap"


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_index_gives_the_same_arrays_and_follows_file_changes(tmp_path, protocol):
    path, index = tmp_path / "task_0_x.pkl", tmp_path / "index"
    path.write_bytes(pickle.dumps(sample_object(np.float32), protocol=protocol))
    first = lpi.read_task_file(path, index_dir=str(index))
    assert len(list(index.iterdir())) == 1
    second = lpi.read_task_file(path, index_dir=str(index))
    assert_same(pickle.loads(path.read_bytes()), second)
    assert_same(first, second)
    changed = sample_object(np.float32)
    changed["episodes"]["episode_0"]["big_c"] += 1
    path.write_bytes(pickle.dumps(changed, protocol=protocol))
    os.utime(path, ns=(1, 1))  # a new version of the file, even within one clock tick
    assert_same(changed, lpi.read_task_file(path, index_dir=str(index)))


def test_a_damaged_index_costs_a_reread_not_a_wrong_number(tmp_path):
    path, index = tmp_path / "task_0_x.pkl", tmp_path / "index"
    path.write_bytes(pickle.dumps(sample_object(np.float32), protocol=4))
    lpi.read_task_file(path, index_dir=str(index))
    next(index.iterdir()).write_bytes(b"garbage")
    assert_same(pickle.loads(path.read_bytes()), lpi.read_task_file(path, index_dir=str(index)))


class Evil:
    """Unpickling this would run `function(*arguments)`."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda marker: Evil(os.system, f"touch {marker}"), r"(posix|os)\.system"),
        (lambda marker: Evil(subprocess.call, ["touch", str(marker)]), r"subprocess\.call"),
        (lambda marker: Evil(eval, f"open({str(marker)!r}, 'w')"), r"builtins\.eval"),
        (lambda marker: Evil(getattr, "text", "upper"), r"builtins\.getattr"),
    ],
)
def test_code_in_a_data_file_is_refused_before_it_runs(tmp_path, protocol, make, refused):
    marker = tmp_path / "created"
    path = tmp_path / "task_0_evil.pkl"
    path.write_bytes(pickle.dumps({"episodes": {}, "payload": make(marker), "big": np.zeros(5000)}, protocol=protocol))
    with pytest.raises(lpi.BadFileError, match=f"task_0_evil.pkl.*refused global {refused}"):
        lpi.read_task_file(path)
    assert not marker.exists()


def test_trust_pickle_allows_custom_classes(tmp_path):
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(
        pickle.dumps({"episodes": {}, "ratio": fractions.Fraction(1, 3), "big": np.ones(5000)}, protocol=4)
    )
    with pytest.raises(lpi.BadFileError, match="refused global fractions.Fraction"):
        lpi.read_task_file(path)
    assert lpi.read_task_file(path, trust=True)["ratio"] == fractions.Fraction(1, 3)


def valid_task_bytes(protocol: int = 4) -> bytes:
    hidden = np.arange(3 * 816 * 4, dtype=np.float32).reshape(3, 1, 816, 4)
    step = {"vlm_layer_output": {"hidden_states": hidden}}
    episodes = {f"episode_{e}": {"rollout_steps": {"step_10": step}} for e in range(3)}
    return pickle.dumps({"task_description": "pick up the milk", "episodes": episodes}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_truncation_at_every_opcode_boundary_and_inside_payloads_is_a_clear_error(tmp_path, protocol):
    whole = valid_task_bytes(protocol)
    cuts = {position for _, _, position in pickletools.genops(whole)} | {0, 1, len(whole) // 2, len(whole) - 1}
    cuts |= {position + 5 for position in list(cuts)}  # inside opcodes' arguments and payloads
    path = tmp_path / "task_0_cut.pkl"
    for cut in sorted(c for c in cuts if c < len(whole)):
        path.write_bytes(whole[:cut])
        with pytest.raises(lpi.BadFileError) as error:
            lpi.read_task_file(path)
        message = str(error.value)
        assert message.startswith(str(path)) and "\n" not in message, (cut, message)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"episode,step\n0,10\n", "not a readable latent pickle"),
        (pickle.dumps([1, 2, 3], protocol=4), "expected a dict with an 'episodes' dict"),
        (pickle.dumps({"task_description": "x"}, protocol=4), "expected a dict with an 'episodes' dict"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "task_0_bad.pkl"
    path.write_bytes(content)
    with pytest.raises(lpi.BadFileError, match=message) as error:
        lpi.read_task_file(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_payload_past_the_end_of_the_file(tmp_path, protocol):
    whole = pickle.dumps({"episodes": {}, "hidden": np.ones((18, 1, 816, 8), np.float32)}, protocol=protocol)
    payload_start = max(
        position
        for op, arg, position in pickletools.genops(whole)
        if isinstance(arg, (bytes, bytearray)) and len(arg) > 65536
    )
    path = tmp_path / "task_0_short.pkl"
    path.write_bytes(whole[: payload_start + 1000])  # the array's bytes end early
    with pytest.raises(lpi.BadFileError, match="runs past the end of the file"):
        lpi.read_task_file(path)


def structure_cases() -> dict[str, dict]:
    hidden = np.zeros((3, 1, 816, 4), np.float32)
    return {
        "step_is_a_list": {"task_description": "x", "episodes": {"episode_0": {"rollout_steps": {"step_10": [1, 2]}}}},
        "array_for_a_dict": {
            "task_description": "x",
            "episodes": {"episode_0": {"rollout_steps": {"step_10": {"vlm_layer_output": hidden}}}},
        },
        "no_rollout_steps": {"task_description": "x", "episodes": {"episode_0": {"steps": {}}}},
        "no_description": {
            "episodes": {"episode_0": {"rollout_steps": {"step_10": {"vlm_layer_output": {"hidden_states": hidden}}}}}
        },
    }


@pytest.mark.parametrize("case", list(structure_cases()))
def test_wrong_structure_skips_the_file_by_default_and_stops_under_strict(tmp_path, case, caplog):
    good = {
        "task_description": "good",
        "episodes": {
            f"episode_{e}": {
                "rollout_steps": {
                    "step_10": {"vlm_layer_output": {"hidden_states": np.ones((3, 1, 816, 4), np.float32)}}
                }
            }
            for e in range(2)
        },
    }
    (tmp_path / "task_0_good.pkl").write_bytes(pickle.dumps(good, protocol=4))
    bad = tmp_path / "task_1_bad.pkl"
    bad.write_bytes(pickle.dumps(structure_cases()[case], protocol=4))
    config = lpi.Source(data_path=str(tmp_path), task_range=(0, 2), episode_range=(0, 2), expert="vlm")
    dataset = lpi.read_dataset(config, [10], 1)
    assert set(lpi.step_samples(dataset, [1], 10).task_id) == {0}
    report = dataset.report
    whole_file = case in ("no_rollout_steps", "no_description")  # a malformed step skips its file for that step only
    skipped = report.skipped_files if whole_file else report.skipped_steps[10]
    assert list(skipped) == [str(bad)] and str(bad) in skipped[str(bad)]
    assert (1 not in dataset.descriptions) == whole_file
    assert "skipping" in caplog.text and "task_1_bad.pkl" in caplog.text
    with pytest.raises(lpi.BadFileError, match="task_1_bad.pkl"):
        lpi.read_dataset(lpi.dataclasses.replace(config, strict=True), [10], 1)


def test_cli_skips_a_bad_file_lists_it_and_strict_exits_1(run_cli, demo_data, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for path in demo_data.glob("task_*.pkl"):
        (data / path.name).symlink_to(path)
    (data / "task_10_broken.pkl").write_bytes(b"\x80\x04garbage")
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--task_range", "0", "11", data_path=data)
    assert status == 0
    summary = (output / "summary_text_only_layer5_step10.txt").read_text()
    assert "Skipped Files: 1" in summary and "task_10_broken.pkl: not a readable latent pickle" in summary
    status, output = run_cli(
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--task_range",
        "0",
        "11",
        "--strict",
        data_path=data,
        output_dir=tmp_path / "strict",
    )
    assert status == 1 and not (tmp_path / "strict").exists()
    assert "task_10_broken.pkl: not a readable latent pickle" in capsys.readouterr().err


def snapshot(directory: Path) -> dict:
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64] + p.read_bytes()[-64:])
        for p in sorted(directory.iterdir())
    }


def test_a_run_changes_nothing_under_data_path(run_cli, demo_data):
    before = snapshot(demo_data)
    status, _ = run_cli("--expert", "action", "--layer", "2", "--inference_step", "3")
    assert status == 0
    assert snapshot(demo_data) == before


MEMORY_CHILD = r"""
import pickle, sys
import linear_probing_inference as lpi

def peak_rss():  # VmHWM belongs to this process image; ru_maxrss would inherit the parent's peak
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

path, mode = lpi.Path(sys.argv[1]), sys.argv[2]
before = peak_rss()
if mode == "full":
    lpi.read_task_file = lambda path, trust, index_dir: pickle.load(open(path, "rb"))
config = lpi.Source(data_path=str(path.parent), task_range=(0, 1), episode_range=(0, 3), expert="text_only")
samples = lpi.step_samples(lpi.read_dataset(config, [10], 5), [5], 10)
assert samples.features.shape == (1, 3, 2048)
print(peak_rss() - before)
"""


def test_extracting_one_layer_needs_a_few_mb_where_full_loading_needs_the_file(tmp_path):
    hidden = np.ones((18, 1, 816, 2048), np.float32)  # 120 MB, as in the real files
    episodes = {
        f"episode_{e}": {"rollout_steps": {"step_10": {"vlm_layer_output": {"hidden_states": hidden + e}}}}
        for e in range(3)
    }
    path = tmp_path / "task_0_big.pkl"
    with open(path, "wb") as file:
        pickle.dump({"task_description": "x", "episodes": episodes}, file, protocol=4)
    del hidden, episodes
    environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    added = {}
    for mode in ("mapped", "full"):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(path), mode],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        added[mode] = int(result.stdout.split()[-1])
    bound = 60 * 2**20
    assert added["mapped"] < bound
    assert added["full"] > 5 * bound  # a bound that full loading breaks: the file is 360 MB
