"""What a hostile newcomer tried (issue 11, item 6): bad paths are refused before any work, in one
line; written files are readable by colleagues as the umask says; an unwritable cache is one warning
of ours; a missing T5 directory is named first."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import linear_probing_inference as lpi

REPO = Path(__file__).resolve().parents[1]
QUICK = (
    "--expert",
    "text_only",
    "--layer",
    "5",
    "--task_range",
    "0",
    "4",
    "--no_control",
    "--bootstrap",
    "0",
    "--num_epochs",
    "2",
)


def only_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["the file", "below the file"])
def test_output_dir_that_cannot_be_a_directory_is_refused_before_any_work(run_cli, tmp_path, capsys, where):
    """Before: every probe was trained, then a FileExistsError traceback."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    output = existing if where == "the file" else existing / "results"
    cache = tmp_path / "fresh_cache"
    status, _ = run_cli(*QUICK, "--cache_dir", str(cache), output_dir=output)
    assert status == 2
    line = only_line(capsys.readouterr().err)
    reason = (
        "exists and is not a directory" if output == existing else f"cannot be created: {existing} is not a directory"
    )
    assert line.endswith(f"error: --output_dir {output}: {reason}")
    assert existing.read_text() == "keep me"
    assert not cache.exists()  # nothing was read, encoded or compiled


def test_missing_t5_directory_is_refused_before_any_work_and_named_first(run_cli, tmp_path, capsys):
    """Before: the data were read and the message led with the hub library's complaint about repo ids."""
    missing = tmp_path / "no" / "such" / "t5"
    cache = tmp_path / "fresh_cache"
    status, output = run_cli(*QUICK, "--cache_dir", str(cache), "--t5_model", str(missing))
    assert status == 2
    line = only_line(capsys.readouterr().err)
    assert line.split("error: ", 1)[1].startswith(f"--t5_model {missing}: no such directory")
    assert "Repo id" not in line and not cache.exists() and not output.exists()
    (tmp_path / "weights.bin").write_bytes(b"")
    status, _ = run_cli(*QUICK, "--t5_model", str(tmp_path / "weights.bin"))
    assert status == 2 and f"--t5_model {tmp_path / 'weights.bin'}: not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["/no/such/dir", "./no_such_dir", "models/t5/no_such"])
def test_loading_labels_from_a_missing_directory_says_so_first(name):
    with pytest.raises(lpi.ProbeError) as error:
        lpi.encode_descriptions(["pick up the milk"], name)
    message = str(error.value)
    assert message.startswith(f"--t5_model {name}: no such directory") and "Repo id" not in message
    assert "Point --t5_model at a local directory" in message


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(paths) -> dict:
    return {path.name: path.stat().st_mode & 0o777 for path in paths if path.is_file()}


def test_written_files_get_the_mode_the_umask_gives_a_normal_file(run_cli, tmp_path, umask):
    """Before: results, summaries, plots and caches were 0600 (mkstemp's mode), unreadable by colleagues."""
    umask(0o027)
    cache = tmp_path / "cache"
    status, output = run_cli(*QUICK, "--cache_dir", str(cache), "--plot")
    assert status == 0
    assert lpi.main(["--report", str(output), "--quiet"]) == 0
    written = modes(output.iterdir())
    assert {
        "results_text_only_layer5_step10.pkl",
        "summary_text_only_layer5_step10.txt",
        "curves_text_only_layer5_step10.png",
        "sweep.csv",
        "accuracy_by_layer.png",
    } <= set(written)
    assert set(written.values()) == {0o640}, written
    cached = modes([*(cache / "t5_labels").iterdir(), *(cache / "file_index").iterdir()])
    assert len(cached) == 5 and set(cached.values()) == {0o640}, cached
    umask(0o002)  # another umask, another mode: not a fixed 0644
    lpi.write_atomically(tmp_path / "shared.txt", b"x")
    assert modes([tmp_path / "shared.txt"]) == {"shared.txt": 0o664}


def test_unwritable_cache_dir_is_one_warning_line_of_ours(demo_data, tiny_t5, tmp_path):
    """Before: JAX's multi-line UserWarning about its compilation cache, and one warning per task file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory would go")
    cache = blocker / "cache"
    environment = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "linear_probing_inference.py"),
            "--data_path",
            str(demo_data),
            "--t5_model",
            str(tiny_t5),
            "--cache_dir",
            str(cache),
            "--output_dir",
            str(tmp_path / "out"),
            "--rollout_step",
            "10",
            "--episode_range",
            "0",
            "6",
            *QUICK,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    line = only_line(result.stderr)
    assert (
        line.startswith(f"WARNING: --cache_dir {cache}: ")
        and "not a directory" in line
        and "will not be cached" in line
    )
    with open(tmp_path / "out" / "results_text_only_layer5_step10.pkl", "rb") as file:
        assert pickle.load(file)["metrics"]["num_samples"] == 24


@pytest.mark.parametrize("option", [["--bootstrap", "-" + "9" * 400], ["--seed", "-1"], ["--learning_rate", "nan"]])
def test_out_of_range_numbers_are_one_line_errors(run_cli, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--expert", "vlm", "--layer", "5", *option)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{option[0]}: must be" in error and "Traceback" not in error
