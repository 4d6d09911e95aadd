"""Faults, interrupted runs and hostile inputs: nothing stale is reused, and every fault ends in one line."""

import errno
import fcntl
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

REPO = Path(__file__).resolve().parents[1]
PROGRAM = str(REPO / "linear_probing_inference.py")
FAST = ("--expert", "vlm", "--layer", "5", "--probe", "ridge", "--no_control", "--bootstrap", "100")
CREAM, TOMATO = (
    "cream cheese",
    "tomato sauce",
)  # the same length: a file rewritten with one for the other keeps its size


def linked_demo(demo_data: Path, directory: Path) -> Path:
    """A data directory of links to the demo's task files."""
    directory.mkdir()
    for path in demo_data.glob("task_*.pkl"):
        (directory / path.name).symlink_to(path)
    return directory


def rewrite_in_place(path: Path) -> None:
    """Rewrite a task file through the same inode, cream cheese turned into tomato sauce (one length), then put its
    modification time back as it was: size, inode and mtime are those of the file its index was made from."""
    before = path.stat()
    data = path.read_bytes()
    assert CREAM.encode() in data
    with open(path, "r+b") as file:
        file.write(data.replace(CREAM.encode(), TOMATO.encode()))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def copy_of_task(demo_data: Path, directory: Path, task: int) -> Path:
    """The demo's data as links, but task `task`'s file as a copy of its own (to be rewritten)."""
    linked_demo(demo_data, directory)
    link = next(directory.glob(f"task_{task}_*.pkl"))
    link.unlink()
    link.write_bytes(next(demo_data.glob(f"task_{task}_*.pkl")).read_bytes())
    return link


def program(*arguments: str, **options) -> subprocess.CompletedProcess:
    """The program as a user runs it, in its own process."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, PROGRAM, *arguments], capture_output=True, env=environment, **options)


def cli_arguments(demo_data: Path, tiny_t5: Path, cache: Path, output: Path, *options: str) -> list[str]:
    """The run_cli fixture's arguments, for a run in its own process."""
    return [
        *("--data_path", str(demo_data), "--t5_model", str(tiny_t5), "--cache_dir", str(cache)),
        *("--output_dir", str(output), "--task_range", "0", "10", "--episode_range", "0", "6"),
        *("--rollout_step", "10", "--quiet", *options),
    ]


# --- Nothing stale ----------------------------------------------------------------------------------------------------


def test_an_index_is_not_reused_after_a_rewrite_in_place_that_restores_size_inode_and_mtime(tmp_path, demo_data):
    path = copy_of_task(demo_data, tmp_path / "data", 1)
    index = str(tmp_path / "index")
    assert CREAM in lpi.read_task_file(path, index_dir=index)["task_description"]
    assert CREAM in lpi.read_task_file(path, index_dir=index)["task_description"]  # from the index
    rewrite_in_place(path)
    assert TOMATO in lpi.read_task_file(path, index_dir=index)["task_description"]


def test_any_write_makes_a_new_index_key_even_of_the_same_bytes(tmp_path, demo_data):
    path = copy_of_task(demo_data, tmp_path / "data", 1)
    with lpi.open_regular(path) as file:
        before = lpi.index_file_for(path, file, str(tmp_path))
    time.sleep(0.05)  # file times come from a clock that ticks every 1-10 ms
    modified = path.stat().st_mtime_ns
    path.write_bytes(path.read_bytes())  # the same bytes, size, inode...
    os.utime(path, ns=(modified, modified))  # ... and modification time: only the change time moved, as it always does
    with lpi.open_regular(path) as file:
        assert lpi.index_file_for(path, file, str(tmp_path)) != before


def test_a_rewritten_task_file_gives_its_new_description_in_a_run(run_cli, demo_data, tmp_path):
    data = tmp_path / "data"
    path = copy_of_task(demo_data, data, 1)
    assert run_cli(*FAST, data_path=data, output_dir=tmp_path / "before")[0] == 0
    rewrite_in_place(path)
    assert run_cli(*FAST, data_path=data, output_dir=tmp_path / "after")[0] == 0
    summary = (tmp_path / "after" / "summary_vlm_layer5_step10.txt").read_text()
    assert f"  1: pick up the {TOMATO} and place it in the basket" in summary


def load(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file)


def test_skip_existing_counts_a_result_as_done_only_when_made_with_the_same_options(run_cli, tmp_path, capsys):
    output = tmp_path / "out"
    results = output / "results_vlm_layer5_step10.pkl"
    assert run_cli(*FAST, output_dir=output)[0] == 0
    written = results.stat().st_mtime_ns
    capsys.readouterr()
    for other in (("--seed", "7"), ("--probe", "linear"), ("--split", "task"), ("--bootstrap", "200")):
        for resume in (("--skip_existing",), ()):  # resuming or not, results of other options are not replaced
            status, _ = run_cli(*FAST, *other, *resume, output_dir=output)
            error = capsys.readouterr().err
            assert status == 1 and "nothing to do" not in error
            name = other[0].removeprefix("--")
            assert f"made with other options, e.g. results_vlm_layer5_step10.pkl: made with {name}" in error
            assert "--overwrite" in error and len(error.strip().splitlines()) == 1
            assert results.stat().st_mtime_ns == written
    assert run_cli(*FAST, "--seed", "7", "--overwrite", output_dir=output)[0] == 0
    made_with = load(results)["config"]["made_with"]
    assert made_with["options"]["seed"] == 7 and made_with["options"]["layer"] == 5
    assert load(results)["config"]["fingerprint"] == lpi.MadeWith(**made_with).fingerprint()
    capsys.readouterr()
    assert run_cli(*FAST, "--seed", "7", "--skip_existing", output_dir=output)[0] == 0
    assert "nothing to do" in capsys.readouterr().err
    assert run_cli(*FAST, "--seed", "7", output_dir=output)[0] == 0  # the same options: a rerun replaces freely


def test_results_record_every_option_that_can_change_a_number(demo_data):
    source = lpi.Source(data_path=str(demo_data), task_range=(0, 3), episode_range=(0, 6), expert="vlm")
    recorded = lpi.run_made_with(source, lpi.LabelConfig(), lpi.TrainingConfig()).of_item(lpi.Item(10, 5, None))
    fields = [
        field.name
        for config in (lpi.Source, lpi.LabelConfig, lpi.TrainingConfig)
        for field in config.__dataclass_fields__.values()
    ]
    expected = {name for name in fields if name not in lpi.NOT_RESULT_OPTIONS} | set(lpi.Item._fields)
    assert expected | {"t5_model", "concepts", "results_format"} == set(recorded.options)
    assert set(recorded.data) == {"task_file_0", "task_file_1", "task_file_2", "t5_model"}
    assert recorded.options["permutations"] == 1  # resolved: the control's one permuted assignment
    assert set(recorded.program) >= {"linear_probing_inference.py", "jax", "numpy"}


def test_a_resume_reads_the_summaries_made_with_line_not_megabytes_of_results(run_cli, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    assert run_cli(*FAST, "--layer", "4-6", output_dir=output)[0] == 0
    summary = (output / "summary_vlm_layer5_step10.txt").read_text()
    stated = load(output / "results_vlm_layer5_step10.pkl")["config"]["fingerprint"]
    assert summary.splitlines()[-1].startswith(f"Made With: fingerprint {stated} ")
    loaded = []
    load_restricted = lpi.load_restricted
    monkeypatch.setattr(lpi, "load_restricted", lambda *arguments: loaded.append(1) or load_restricted(*arguments))
    capsys.readouterr()
    assert run_cli(*FAST, "--layer", "4-6", "--skip_existing", output_dir=output)[0] == 0
    assert loaded == [] and "nothing to do" in capsys.readouterr().err


def test_a_results_file_that_is_not_its_summary_s_is_never_taken_as_done(run_cli, tmp_path, capsys):
    theirs, output = tmp_path / "theirs", tmp_path / "out"
    assert run_cli(*FAST, "--seed", "1", output_dir=theirs)[0] == 0
    assert run_cli(*FAST, output_dir=output)[0] == 0
    results = output / "results_vlm_layer5_step10.pkl"
    # Copied in from elsewhere, times kept (cp -p): older than the summary beside it, and made with other options.
    copied = theirs / results.name
    results.write_bytes(copied.read_bytes())
    os.utime(results, ns=(copied.stat().st_atime_ns, copied.stat().st_mtime_ns))
    capsys.readouterr()
    assert run_cli(*FAST, "--skip_existing", output_dir=output)[0] == 1
    assert "made with seed 1 (now 42)" in capsys.readouterr().err  # read from the results file, not its summary
    # Left by a run killed between its two renames: a new results file beside the older pair's summary. Its options
    # are this run's, but the pair is not whole: made again.
    assert run_cli(*FAST, "--overwrite", output_dir=output)[0] == 0
    summary = output / "summary_vlm_layer5_step10.txt"
    old_summary = summary.read_bytes()
    assert run_cli(*FAST, "--bootstrap", "200", "--overwrite", output_dir=output)[0] == 0
    summary.write_bytes(old_summary)  # the older pair's summary, with a newer results file of other options
    status, _ = run_cli(*FAST, "--bootstrap", "200", "--skip_existing", output_dir=output)
    assert status == 0 and "nothing to do" not in capsys.readouterr().err
    assert summary.read_bytes() != old_summary


def test_a_results_file_cut_short_is_never_taken_as_done(run_cli, tmp_path, capsys):
    output = tmp_path / "out"
    assert run_cli(*FAST, output_dir=output)[0] == 0
    results = output / "results_vlm_layer5_step10.pkl"
    results.write_bytes(results.read_bytes()[:2000])  # its configuration, fingerprint included, but not its numbers
    capsys.readouterr()
    assert run_cli(*FAST, "--skip_existing", output_dir=output)[0] == 1
    error = capsys.readouterr().err
    assert "nothing to do" not in error and "it cannot be read" in error
    assert run_cli(*FAST, "--skip_existing", "--overwrite", output_dir=output)[0] == 0
    assert lpi.stated_fingerprint(lpi.result_paths(output, "vlm_layer5_step10")) is not None


def test_a_signal_during_a_pair_s_renames_waits_for_both(run_cli, tmp_path, monkeypatch, capsys):
    replace = os.replace

    def interrupted_rename(source, target):
        replace(source, target)
        if Path(target).name.startswith("results_"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two renames: held back until both are done

    monkeypatch.setattr(lpi.os, "replace", interrupted_rename)
    status, output = run_cli(*FAST)
    monkeypatch.undo()
    assert status == 130 and "interrupted" in capsys.readouterr().err
    paths = lpi.result_paths(output, "vlm_layer5_step10")
    assert lpi.stated_fingerprint(paths) is not None  # a whole pair
    assert run_cli(*FAST, "--skip_existing", output_dir=output)[0] == 0
    assert "nothing to do" in capsys.readouterr().err


def test_skip_existing_tells_a_concept_result_from_a_t5_result(run_cli, tmp_path, capsys):
    output = tmp_path / "out"
    assert run_cli("--expert", "text_only", "--layer", "5", "--probe", "ridge", output_dir=output)[0] == 0
    capsys.readouterr()
    concepts = ("--expert", "text_only", "--layer", "5", "--target", "concepts", "--num_epochs", "5")
    assert run_cli(*concepts, "--skip_existing", output_dir=output)[0] == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert load(output / "results_text_only_layer5_step10_concepts.pkl")["target"] == "concepts"


def test_results_of_a_task_file_since_changed_are_made_again_not_reused(run_cli, demo_data, tmp_path, capsys):
    data, output = tmp_path / "data", tmp_path / "out"
    path = copy_of_task(demo_data, data, 1)
    assert run_cli(*FAST, data_path=data, output_dir=output)[0] == 0
    rewrite_in_place(path)
    capsys.readouterr()
    assert run_cli(*FAST, "--skip_existing", data_path=data, output_dir=output)[0] == 0
    error = capsys.readouterr().err
    assert error.count("made from other data") == 1 and "task_file_1" in error and "nothing to do" not in error
    assert TOMATO in (output / "summary_vlm_layer5_step10.txt").read_text()
    assert run_cli(*FAST, "--skip_existing", data_path=data, output_dir=output)[0] == 0
    assert "nothing to do" in capsys.readouterr().err


def test_a_change_in_the_middle_of_a_task_file_is_other_data(run_cli, demo_data, tmp_path, capsys):
    data, output = tmp_path / "data", tmp_path / "out"
    path = copy_of_task(demo_data, data, 2)
    assert run_cli(*FAST, data_path=data, output_dir=output)[0] == 0
    time.sleep(1.1)  # copies may keep modification times to the second only, and so does the record
    with open(path, "r+b") as file:  # one byte of an array far from both ends: size and ends unchanged
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 1]))
    capsys.readouterr()
    assert run_cli(*FAST, "--skip_existing", data_path=data, output_dir=output)[0] == 0
    error = capsys.readouterr().err
    assert "made from other data" in error and "task_file_2" in error


def test_the_model_s_files_and_name_are_recorded_apart(run_cli, tiny_t5, tmp_path, capsys):
    model, output = tmp_path / "t5_tiny", tmp_path / "out"
    model.mkdir()
    for file in tiny_t5.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    assert run_cli(*FAST, "--t5_model", str(model), output_dir=output)[0] == 0
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, (time.time() + 5, time.time() + 5))  # saved again
    capsys.readouterr()
    assert run_cli(*FAST, "--t5_model", str(model), "--skip_existing", output_dir=output)[0] == 0
    assert "made from other data" in capsys.readouterr().err  # the model's files: labels made again
    other = tmp_path / "t5_other"
    model.rename(other)
    assert run_cli(*FAST, "--t5_model", str(other), "--skip_existing", output_dir=output)[0] == 1
    assert "made with t5_model 't5_tiny' (now 't5_other')" in capsys.readouterr().err  # another model: an option


def test_results_of_another_program_version_are_kept_with_a_warning(run_cli, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    assert run_cli(*FAST, output_dir=output)[0] == 0
    versions = lpi.installed_versions()
    monkeypatch.setattr(lpi, "installed_versions", lambda: {**versions, "jax": "0.0.1"})
    capsys.readouterr()
    assert run_cli(*FAST, "--skip_existing", output_dir=output)[0] == 0
    error = capsys.readouterr().err
    assert "made by another version of this program or its packages" in error and "nothing to do" in error
    assert "jax '" + versions["jax"] + "' (now '0.0.1')" in error


def test_a_pair_written_meanwhile_with_other_options_is_not_replaced(run_cli, tmp_path, monkeypatch, capsys):
    theirs, output = tmp_path / "theirs", tmp_path / "out"
    assert run_cli(*FAST, "--seed", "1", output_dir=theirs)[0] == 0
    directory_locked = lpi.directory_locked

    def another_run_writes_first(directory):  # another run, started with ours, wrote this pair before we took the lock
        for path in theirs.iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
        return directory_locked(directory)

    monkeypatch.setattr(lpi, "directory_locked", another_run_writes_first)
    assert run_cli(*FAST, output_dir=output)[0] == 1
    assert "written meanwhile by a run with other options" in capsys.readouterr().err
    assert load(output / "results_vlm_layer5_step10.pkl")["config"]["made_with"]["options"]["seed"] == 1


def test_a_file_changed_while_a_run_reads_it_stops_the_run(demo_data, tmp_path):
    path = copy_of_task(demo_data, tmp_path / "data", 1)
    source = lpi.Source(data_path=str(tmp_path / "data"), task_range=(0, 10), episode_range=(0, 6), expert="vlm")
    dataset = lpi.read_dataset(source, [10, 20], 5)
    lpi.step_samples(dataset, [5], 10)
    rewrite_in_place(path)  # its change time moves
    with pytest.raises(lpi.ProbeError, match="changed while this run was reading it"):
        lpi.step_samples(dataset, [5], 20)


# --- One line for every fault -----------------------------------------------------------------------------------------


def test_ctrl_c_mid_sweep_ends_in_one_line_and_a_rerun_finishes(demo_data, tiny_t5, tmp_path):
    output = tmp_path / "out"
    arguments = cli_arguments(demo_data, tiny_t5, tmp_path / "cache", output, *FAST)
    arguments += ["--layer", "all", "--rollout_step", "all", "--bootstrap", "1000"]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, PROGRAM, *arguments], stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 240
    while not list(output.glob("results_*.pkl")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    error = child.communicate(timeout=120)[1]
    assert child.returncode == 130, error
    assert "Traceback" not in error
    last = error.strip().splitlines()[-1]
    assert "interrupted after" in last and "of 36 combination(s); rerun with --skip_existing to finish" in last
    written = int(last.split("interrupted after ")[1].split()[0])
    assert 1 <= written < 36
    results = len(list(output.glob("results_*.pkl")))
    assert results == len(list(output.glob("summary_*.txt"))) and results in (
        written,
        written + 1,
    )  # + the one in flight
    finished = program(*arguments, "--skip_existing", timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert len(list(output.glob("results_*.pkl"))) == 36 and not list(output.glob(".*.tmp"))


def test_an_interruption_counts_what_was_written(run_cli, monkeypatch, capsys):
    write_item = lpi.write_item
    calls = []

    def interrupted_second(*arguments):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_item(*arguments)

    monkeypatch.setattr(lpi, "write_item", interrupted_second)
    status, output = run_cli(*FAST, "--layer", "4-6")
    assert status == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("interrupted after 1 of 3 combination(s); rerun with --skip_existing to finish")
    )
    assert [path.name for path in output.glob("results_*.pkl")] == ["results_vlm_layer4_step10.pkl"]


def test_a_ctrl_c_while_a_result_is_renamed_counts_it(run_cli, monkeypatch, capsys):
    """Ctrl-C is held back while a pair is renamed into place; when it acts, the result it let finish is counted."""
    replace = os.replace

    def interrupted_rename(source, target):
        replace(source, target)
        if Path(target).name.startswith("summary_"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the pair's last rename ends: acted on once it is counted

    monkeypatch.setattr(lpi.os, "replace", interrupted_rename)
    status, output = run_cli(*FAST, "--layer", "4-6")
    monkeypatch.undo()
    assert status == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("interrupted after 1 of 3 combination(s); rerun with --skip_existing to finish"), last
    assert [path.name for path in output.glob("results_*.pkl")] == ["results_vlm_layer4_step10.pkl"]


@pytest.mark.parametrize(
    "fault, status, message",
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
            1,
            "summary_vlm_layer5_step10.txt: cannot write it (No space",
        ),
        (KeyboardInterrupt(), 130, "interrupted after 0 of 1 combination(s)"),
    ],
)
def test_a_fault_between_a_pair_s_two_files_leaves_neither(run_cli, monkeypatch, capsys, fault, status, message):
    locked_temporary = lpi.locked_temporary

    def fault_at_summaries(path, content):  # the results file's temporary is written, the summary's fails
        if path.name.startswith("summary_"):
            raise fault
        return locked_temporary(path, content)

    monkeypatch.setattr(lpi, "locked_temporary", fault_at_summaries)
    result, output = run_cli(*FAST)
    error = capsys.readouterr().err.strip()
    assert result == status and len(error.splitlines()) == 1 and message in error
    assert not list(output.glob("results_*")) and not list(output.glob(".*.tmp"))


def test_a_garbled_label_cache_is_encoded_again_with_one_warning(run_cli, tmp_path, capsys):
    cache = tmp_path / "own_cache"
    assert run_cli(*FAST, "--cache_dir", str(cache))[0] == 0
    (entry,) = (cache / "t5_labels").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as by a full disk
    capsys.readouterr()
    assert run_cli(*FAST, "--cache_dir", str(cache))[0] == 0
    assert capsys.readouterr().err.count("cannot be read") == 1
    with np.load(entry) as rebuilt:
        assert rebuilt["embeddings"].shape == (10, 32)
    assert run_cli(*FAST, "--cache_dir", str(cache))[0] == 0
    assert "label cache" not in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(run_cli, tmp_path):
    status, output = run_cli(*FAST)
    assert status == 0
    read_side, write_side = os.pipe()
    os.close(read_side)  # nobody reads: the first write fails with EPIPE, as after `| head -1` has exited
    result = subprocess.run(
        [sys.executable, PROGRAM, "--report", str(output)],
        stdout=write_side,
        stderr=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    os.close(write_side)
    assert result.returncode == 141 and result.stderr == b""


def test_a_summary_with_a_path_that_is_not_utf8_prints(demo_data, tiny_t5, tmp_path, capsys):
    odd = linked_demo(demo_data, tmp_path / os.fsdecode(b"latents \xff"))
    next(odd.glob("task_9_*.pkl")).unlink()
    (odd / "task_9_broken.pkl").write_bytes(b"not a pickle")  # listed under Skipped Files, by its path
    arguments = cli_arguments(odd, tiny_t5, tmp_path.parent / "cache", tmp_path / "out", *FAST)
    arguments.remove("--quiet")
    assert lpi.main(arguments) == 0
    assert "latents \\udcff/task_9_broken.pkl: not a readable latent pickle" in capsys.readouterr().out


def test_a_path_that_is_not_utf8_writes_both_files(run_cli, demo_data, tiny_t5, tmp_path):
    odd = tmp_path / os.fsdecode(b"latents \xff")
    linked_demo(demo_data, odd)
    (odd / "t5_tiny").symlink_to(tiny_t5)
    output = tmp_path / os.fsdecode(b"results \xfe")
    status, _ = run_cli(*FAST, "--t5_model", str(odd / "t5_tiny"), data_path=odd, output_dir=output)
    assert status == 0
    summary = (output / "summary_vlm_layer5_step10.txt").read_bytes().decode("utf-8")  # valid UTF-8
    assert "\\udcff" in summary  # the byte, escaped
    assert (output / "results_vlm_layer5_step10.pkl").is_file()


def test_a_conflicting_run_is_refused_before_anything_is_read(run_cli, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    assert run_cli(*FAST, output_dir=output)[0] == 0
    monkeypatch.setattr(lpi, "read_task_file", lambda *_: pytest.fail("a task file was read"))
    assert run_cli(*FAST, "--seed", "3", output_dir=output)[0] == 1
    assert "made with seed 42 (now 3)" in capsys.readouterr().err


# --- The reader stays bounded -----------------------------------------------------------------------------------------

SHARED_CHILD = r"""
import pickle, sys, time
import linear_probing_inference as lpi

def peak_rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

path, index = lpi.Path(sys.argv[1]), sys.argv[2]
before, start = peak_rss(), time.perf_counter()
for _ in range(2):  # the walk, then the index it wrote
    content = lpi.read_task_file(path, index_dir=index)
assert content["task_description"] == "x"
print(time.perf_counter() - start, peak_rss() - before)
"""


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_of_shared_references_is_read_in_bounded_time_and_memory(tmp_path, protocol):
    shared = []
    for _ in range(40):  # 2^40 paths through 40 lists: expanded, a copy would never end
        shared = [shared, shared]
    content = {"task_description": "x", "episodes": {"episode_0": {"rollout_steps": {}, "junk": shared}}}
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    assert path.stat().st_size < 1000
    environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", SHARED_CHILD, str(path), str(tmp_path / "index")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seconds, added = map(float, result.stdout.split())
    assert seconds < 10 and added < 500 * 2**20


def test_a_container_that_holds_itself_is_copied_once(tmp_path):
    loop = []
    loop.append(loop)
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps({"task_description": "x", "episodes": {}, "loop": loop, "pair": (loop, loop)}, 4))
    for _ in range(2):  # parsed, then from the index
        content = lpi.read_task_file(path, index_dir=str(tmp_path / "index"))
        assert content["loop"][0] is content["loop"] and content["pair"][0] is content["pair"][1] is content["loop"]


class ForgedArray:
    """Pickles as numpy's own array reconstruction with the state given: a dtype and shape the payload may not fit."""

    def __init__(self, shape, dtype, payload: bytes):
        self.state = (1, shape, np.dtype(dtype), False, payload)

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (0,), b"b"), self.state


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "forged, reason",
    [
        (ForgedArray((10**12,), "V0", b""), "holds no data of its own"),
        (ForgedArray((10**6,), "f4", b"\0" * 16), "does not fit its payload"),
        (ForgedArray((10**6,), "f4", b"\0" * 100_000), "does not fit its payload"),  # mapped, not read
        (ForgedArray((10**9,), "O", [1, 2]), "does not fit its payload"),
    ],
)
def test_an_array_that_does_not_fit_its_payload_is_a_bad_file(tmp_path, protocol, forged, reason):
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps({"task_description": "x", "episodes": {}, "array": forged}, protocol=protocol))
    with pytest.raises(lpi.BadFileError, match=reason):
        lpi.read_task_file(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_arrays_of_other_plain_dtypes_are_read_as_pickle_load_reads_them(tmp_path, protocol):
    arrays = {
        "times": np.arange(0, 6).astype("datetime64[s]"),
        "spans": np.arange(0, 6).astype("timedelta64[ms]"),
        "records": np.zeros(4000, dtype=[("x", "f4"), ("n", "i2")]),  # mapped: past one page
        "words": np.array(["agentview", "wrist"]),
        "ragged": np.array([[1, 2], [3]], dtype=object),
        "complex": np.ones(3, np.complex64),
    }
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps({"task_description": "x", "episodes": {}, **arrays}, protocol=protocol))
    content = lpi.read_task_file(path, index_dir=str(tmp_path / "index"))
    for name, array in arrays.items():
        assert content[name].dtype == array.dtype and content[name].tolist() == array.tolist(), name


class Called:
    """Pickles as a call of a global with the arguments given."""

    def __init__(self, function, *arguments):
        self.call = function, arguments

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize(
    "call, reason",
    [
        (Called(bytes, 10**12), r"refused bytes\(1000000000000\)"),
        (Called(bytearray, 10**12), r"refused bytearray\(1000000000000\)"),
        (Called(np.ndarray, (2**15, 2**15), "u1"), r"refused numpy.ndarray\(\(32768, 32768\), 'u1'\)"),
    ],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_allocations_by_size_are_refused(tmp_path, call, reason, protocol):
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps({"task_description": "x", "episodes": {}, "made": call}, protocol=protocol))
    with pytest.raises(lpi.BadFileError, match=reason):
        lpi.read_task_file(path, index_dir=str(tmp_path / "index"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_copies_of_one_shared_container_are_bounded_by_the_file(tmp_path, protocol):
    shared = list(range(100_000))
    copies = [Called(list, shared) for _ in range(300)]  # 30 million elements from a file of a few hundred KB
    path = tmp_path / "task_0_x.pkl"
    path.write_bytes(pickle.dumps({"task_description": "x", "episodes": {}, "copies": copies}, protocol=protocol))
    assert path.stat().st_size < 2**20
    with pytest.raises(lpi.BadFileError, match=r"list\(\) calls copy more elements than the file holds"):
        lpi.read_task_file(path)


def special_files(directory: Path) -> dict[int, str]:
    """Task files 2-4 as what is not a regular file: a link to /dev/zero, a directory, a FIFO."""
    for task in (2, 3, 4):
        next(directory.glob(f"task_{task}_*.pkl")).unlink()
    (directory / "task_2_zero.pkl").symlink_to("/dev/zero")
    (directory / "task_3_directory.pkl").mkdir()
    os.mkfifo(directory / "task_4_fifo.pkl")
    return {2: "a device or socket", 3: "a directory", 4: "a FIFO"}


def test_task_files_that_are_not_regular_files_are_skipped_by_name_and_fatal_under_strict(
    run_cli, demo_data, tmp_path, capsys
):
    data = linked_demo(demo_data, tmp_path / "data")  # links to regular files are read as they are
    kinds = special_files(data)
    status, output = run_cli(*FAST, data_path=data)
    assert status == 0
    error = capsys.readouterr().err
    for kind in kinds.values():
        assert f"not a regular file ({kind})" in error
    report = load(output / "results_vlm_layer5_step10.pkl")["data_report"]
    assert len(report["skipped_files"]) == 3 and report["missing_tasks"] == []
    assert run_cli(*FAST, "--strict", data_path=data, output_dir=tmp_path / "strict")[0] == 1
    assert "not a regular file" in capsys.readouterr().err


def test_report_skips_what_is_not_a_regular_file_and_does_not_hang_on_a_fifo(run_cli, tmp_path):
    status, output = run_cli(*FAST)
    assert status == 0
    os.mkfifo(output / "results_zzz.pkl")
    report = program("--report", str(output), timeout=120)
    assert report.returncode == 0 and b"results_zzz.pkl: not a regular file (a FIFO)" in report.stderr
    strict = program("--report", str(output), "--strict", timeout=120)
    assert strict.returncode == 1 and len(strict.stderr.strip().splitlines()) == 1


# --- Inputs -----------------------------------------------------------------------------------------------------------


def test_conflicting_concept_rows_are_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "concepts.tsv"
    path.write_text("task_id\tattribute\tvalue\n0\tcolor\tred\n0\tcolor\tred\n1\tcolor\tblue\n0\tcolor\tgreen\n")
    with pytest.raises(lpi.OptionError, match=r"lines 2 and 5 give task 0 two values of 'color' \('red' and 'green'\)"):
        lpi.read_concepts_file(str(path))


@pytest.mark.parametrize("task_id", ["\u00b2", "\u0663", "1.0"])
def test_a_concept_task_id_must_be_ascii_digits(tmp_path, task_id):
    path = tmp_path / "concepts.tsv"
    path.write_text(f"{task_id}\tcolor\tred\n")
    with pytest.raises(lpi.OptionError, match="ASCII digits"):
        lpi.read_concepts_file(str(path))


def test_a_task_file_named_with_other_digits_is_not_a_task_file(tmp_path):
    (tmp_path / "task_\u0663_x.pkl").write_bytes(b"")  # Arabic-Indic three: int() reads it as 3
    assert lpi.find_task_files(tmp_path, (0, 5)) == ({}, [0, 1, 2, 3, 4])


@pytest.mark.parametrize(
    "option, value",
    [
        ("--num_epochs", "1000000000"),
        ("--patience", "2147483648"),
        ("--permutations", "1000000"),
        ("--repeats", "1000000000"),
        ("--bootstrap", "1000000000"),
        ("--seed", "99999999999"),
        ("--task_range", "0 1000000000000"),
        ("--episode_range", "0 1000000000000000000000"),
    ],
)
def test_values_past_what_a_run_can_hold_are_refused_before_it_starts(run_cli, capsys, option, value):
    with pytest.raises(SystemExit) as exit:
        run_cli(*FAST, option, *value.split())
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2 and f"argument {option}: must be" in error and "<= " in error


def test_a_concepts_file_that_is_not_a_regular_file_is_refused_without_a_hang(demo_data, tiny_t5, tmp_path):
    fifo = tmp_path / "concepts.tsv"
    os.mkfifo(fifo)
    options = ("--expert", "text_only", "--layer", "5", "--target", "concepts", "--concepts", str(fifo))
    result = program(*cli_arguments(demo_data, tiny_t5, tmp_path / "cache", tmp_path / "out", *options), timeout=120)
    assert (
        result.returncode == 2
        and b"--concepts " + str(fifo).encode() + b": not a regular file (a FIFO)" in result.stderr
    )


@pytest.mark.parametrize("closed", [1, 2])
def test_a_run_with_stdout_or_stderr_closed_writes_its_results(demo_data, tiny_t5, tmp_path, closed):
    output = tmp_path / "out"
    arguments = cli_arguments(demo_data, tiny_t5, tmp_path.parent / "cache", output, *FAST)
    arguments.remove("--quiet")
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    shell = f'exec "$@" {closed}>&-'  # the program starts with that stream closed
    result = subprocess.run(
        ["bash", "-c", shell, "bash", sys.executable, PROGRAM, *arguments], env=environment, timeout=300
    )
    assert result.returncode == 0 and lpi.stated_fingerprint(lpi.result_paths(output, "vlm_layer5_step10"))


def test_a_file_that_cannot_be_replaced_is_named_not_its_temporary(run_cli, capsys):
    status, output = run_cli(*FAST)
    (output / "sweep.csv").mkdir()
    capsys.readouterr()
    assert lpi.main(["--report", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"{output / 'sweep.csv'}" in error and ".tmp" not in error


def test_a_baseline_camera_that_is_not_there_is_named_as_the_baseline(run_cli, capsys):
    status, _ = run_cli(*FAST, "--baseline", "visual:no_such_camera")
    assert status == 2 and "--baseline visual:no_such_camera: no such camera" in capsys.readouterr().err


def test_a_baseline_layer_out_of_range_is_named_as_the_baseline(run_cli, capsys):
    status, _ = run_cli(*FAST, "--baseline", "vlm:99")
    error = capsys.readouterr().err
    assert status == 2 and "--baseline vlm:99 is out of range: the data has 18 layers" in error
    assert "--layer" not in error


# --- Leftovers --------------------------------------------------------------------------------------------------------


def test_temporaries_of_an_interrupted_run_are_removed_and_a_running_writer_keeps_its_own(run_cli, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    left = output / ".results_vlm_layer5_step10.pkl.abcd1234.tmp"
    held = output / ".results_vlm_layer6_step10.pkl.wxyz5678.tmp"
    mine = output / ".notes.tmp"  # not a name write_atomically makes
    for path in (left, held, mine):
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 60, time.time() - 60))
    with open(held, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # another run, still writing it
        assert run_cli(*FAST, output_dir=output)[0] == 0
    assert not left.exists() and held.exists() and mine.exists()
    assert "removed 1 temporary file(s) that an interrupted run left" in capsys.readouterr().err


def test_a_compile_cache_entry_cut_short_is_removed_with_one_line(demo_data, tiny_t5, tmp_path):
    cache = tmp_path / "cache"
    options = ("--expert", "text_only", "--layer", "5", "--num_epochs", "3", "--no_control", "--bootstrap", "0")
    arguments = cli_arguments(demo_data, tiny_t5, cache, tmp_path / "out", *options)
    assert program(*arguments, timeout=300).returncode == 0
    entries = list((cache / "jax").glob("jit_fit_probes*-cache"))
    assert entries
    valid = entries[0].with_name("jit_fit_probes-" + "0" * 64 + "-cache")  # another program's entry, whole
    valid.write_bytes(entries[0].read_bytes())
    hour_ago = time.time() - 3600
    for entry in entries:  # as a full disk left them, an hour ago
        entry.write_bytes(entry.read_bytes()[:100])
        os.utime(entry, (hour_ago, hour_ago))
    repaired = program(*arguments, timeout=300)
    assert repaired.returncode == 0
    error = repaired.stderr.decode()
    assert error.count("JAX could not read an entry of jit_fit_probes") == 1 and valid.exists()
    assert f"removed {len(entries)} entr(ies) that cannot be decompressed: compiled and cached anew" in error
    assert "Error reading persistent compilation cache entry" not in error
    again = program(*arguments, timeout=300)
    assert again.returncode == 0 and b"compile cache" not in again.stderr
