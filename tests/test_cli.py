"""End to end: the CLI on generated Pi0-layout data finds the planted signal and writes honest files."""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import linear_probing_inference as lpi

REPO = Path(__file__).resolve().parents[1]


class PlainDataUnpickler(pickle.Unpickler):
    """Loads only builtins and numpy: proves a results file needs nothing of ours."""

    def find_class(self, module, name):
        if module.split(".")[0] not in ("builtins", "numpy", "collections", "_codecs"):
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def load_results(output_dir: Path, stem: str) -> dict:
    with open(output_dir / f"results_{stem}.pkl", "rb") as file:
        return PlainDataUnpickler(file).load()


def test_strong_planted_signal_is_found_on_held_out_episodes(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "5")
    assert status == 0
    results = load_results(output, "text_only_layer5_step10")
    metrics = results["metrics"]
    assert metrics["accuracy"] >= 0.9
    assert metrics["num_samples"] == 60 and metrics["num_tasks"] == 10 and metrics["num_folds"] == 5
    # Held out really means held out: no (task, episode) lies in two folds, and each fold's
    # validation episodes come from its training side.
    samples = results["samples"]
    episodes = {}
    for t, e, f in zip(samples["task_id"], samples["episode"], samples["fold"]):
        episodes.setdefault((t, e), set()).add(f)
    assert all(len(f) == 1 for f in episodes.values())
    for f in range(5):
        assert not (samples["validation"][f] & (samples["fold"] == f)).any()
    assert results["metrics"]["cosine_similarity"] > results["metrics"]["constant_predictor_cosine"]


def test_silent_layer_stays_near_chance(run_cli):
    status, output = run_cli("--expert", "vlm", "--layer", str(lpi.DEMO_SILENT_LAYER))
    assert status == 0
    metrics = load_results(output, f"vlm_layer{lpi.DEMO_SILENT_LAYER}_step10")["metrics"]
    assert metrics["chance_accuracy"] == pytest.approx(0.1)
    assert metrics["accuracy"] <= 0.4
    assert metrics["cosine_similarity_label_space"] < 0.3


def test_action_expert_pools_every_denoising_entry_and_keeps_episodes_whole(run_cli):
    status, output = run_cli("--expert", "action", "--layer", "5", "--rollout_step", "20")
    assert status == 0
    results = load_results(output, "action_layer5_step20")
    # 10 tasks x 6 episodes, minus task 1's short episode, x 10 denoising entries.
    assert results["metrics"]["num_samples"] == 59 * 10
    assert results["data_report"]["episodes_without_step"] == [(1, 5)]
    assert sorted(set(results["samples"]["inference_time"].round(1))) == [round(0.1 * k, 1) for k in range(1, 11)]
    assert results["metrics"]["accuracy"] > 2 * results["metrics"]["chance_accuracy"]  # weak but present
    summary = (output / "summary_action_layer5_step20.txt").read_text()
    assert "Episodes Without step_20: 1 (task 1 episode 5)" in summary


def test_one_inference_step_gets_its_own_file_name(run_cli):
    status, output = run_cli("--expert", "action", "--layer", "5", "--inference_step", "1")
    assert status == 0
    results = load_results(output, "action_layer5_step10_t0.9")
    assert results["metrics"]["num_samples"] == 60
    assert set(results["samples"]["inference_time"]) == {0.9}


def test_output_files_hold_the_guide_block_and_everything_needed(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--task_range", "0", "12")
    assert status == 0
    summary = (output / "summary_text_only_layer5_step10.txt").read_text().splitlines()
    assert summary[:4] == ["Linear Probing Results", "=====================", "", "Expert: text_only"]
    for line in (
        "Layer: 5",
        "Rollout Step: 10",
        "Feature Type: hidden_states",
        "Number of Samples: 60",
        "Number of Tasks: 10",
        "Task Descriptions:",
        "  0: pick up the alphabet soup and place it in the basket",
        "Missing Task Files: 10, 11",
    ):
        assert line in summary
    assert any(line.startswith("Accuracy: ") for line in summary)
    assert any(line.startswith("Control (task -> embedding assignment permuted): accuracy ") for line in summary)
    assert any("that question is answered by --split task" in line for line in summary)  # what the control is not
    assert any(line.startswith("Positive control: text tokens are the prompt itself") for line in summary)
    results = load_results(output, "text_only_layer5_step10")
    assert results["config"]["data"]["expert"] == "text_only" and results["config"]["labels"]["center_labels"] is True
    assert results["probe"]["kernel"].shape == (
        10,
        16,
        9,
    )  # 5 folds, then 5 controls; 9 = the span of 10 centered task embeddings
    heldout = results["heldout"]
    assert heldout["prediction"].shape == (60, 32) and heldout["target"].shape == (60, 32)
    assert len(results["samples"]["task_id"]) == len(results["samples"]["inference_time"]) == 60
    assert results["history"]["train_loss"].shape == (10, 100)
    assert results["versions"]["jax"] and results["data_report"]["missing_tasks"] == [10, 11]
    assert sorted(p.name for p in output.iterdir()) == [
        "results_text_only_layer5_step10.pkl",
        "summary_text_only_layer5_step10.txt",
    ]


def test_same_seed_same_results_file_other_seed_other_folds(run_cli, tmp_path):
    first = load_results(run_cli("--expert", "vlm", "--layer", "5", output_dir=tmp_path / "a")[1], "vlm_layer5_step10")
    again = load_results(run_cli("--expert", "vlm", "--layer", "5", output_dir=tmp_path / "b")[1], "vlm_layer5_step10")
    other = load_results(
        run_cli("--expert", "vlm", "--layer", "5", "--seed", "7", output_dir=tmp_path / "c")[1], "vlm_layer5_step10"
    )
    for results in (first, again, other):
        results.pop("wall_time_seconds")
        results["command"] = [
            a for a in results["command"] if "results" not in a and not a.endswith(("/a", "/b", "/c"))
        ]
    assert pickle.dumps(first) == pickle.dumps(again)
    assert list(first["samples"]["fold"]) != list(other["samples"]["fold"])


def test_raw_labels_are_available_and_recorded(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--no_center_labels")
    assert status == 0
    results = load_results(output, "text_only_layer5_step10")
    assert results["config"]["labels"]["center_labels"] is False
    assert results["metrics"]["cosine_similarity"] == pytest.approx(results["metrics"]["cosine_similarity_label_space"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task_range", "5", "5"], "--task_range 5 5: END must be greater than START"),
        (["--expert", "vlm", "--inference_step", "2"], "--inference_step applies to --expert action only"),
        (["--expert", "brain"], "invalid choice: 'brain'"),
        (["--layer", "-1"], "argument --layer: expected N, N,M,..., N-M or all"),
        (["--layer", "5-2"], "range 5-2 runs backwards"),
        (["--shard", "2/2"], "expected INDEX/COUNT with 0 <= INDEX < COUNT"),
        (["--learning_rate", "0"], "must be > 0, got 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(run_cli, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--expert", "vlm", "--layer", "5", *options)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def option_fields() -> list:
    """The fields that an option sets, of every configuration and of the command's own options."""
    configs = (lpi.Source, lpi.LabelConfig, lpi.TrainingConfig, lpi.CommandOptions)
    return [field for config in configs for field in dataclasses.fields(config) if "option" in field.metadata]


def test_every_option_field_is_in_one_help_group_once():
    placed = []
    for names in lpi.OPTION_GROUPS.values():
        for name in names:
            placed += list(name) if isinstance(name, tuple) else [name]
    assert sorted(placed) == sorted(field.name for field in option_fields())
    dests = [action.dest for action in lpi.build_parser()._actions if action.dest != "help"]
    assert sorted(dests) == sorted(placed)


def test_options_not_given_leave_the_configurations_at_their_field_defaults():
    args = lpi.parse_arguments(
        ["--rollout_step", "10", "--expert", "vlm", "--layer", "5", "--data_path", "d"]
        + ["--task_range", "0", "2", "--episode_range", "0", "2"]
    )
    source, labels, training = lpi.configs_from_arguments(args)
    assert labels == lpi.LabelConfig() and training == lpi.TrainingConfig()
    index_dir = str(Path(labels.cache_dir) / "file_index")
    assert source == lpi.Source("d", (0, 2), (0, 2), "vlm", index_dir=index_dir)


def test_expert_help_states_each_prefix_experts_token_positions():
    (expert,) = [action for action in lpi.build_parser()._actions if action.dest == "expert"]
    for words in ("vlm: VLM prefix tokens 0-815 (images 0-767", "text_only: VLM prefix tokens 768-815 (prompt text)"):
        assert words in expert.help
    assert "image: VLM prefix tokens 0-767 (3 cameras x 256 SigLIP patches)" in expert.help


@pytest.mark.parametrize(
    "options, status, message",
    [
        (["--layer", "18"], 2, "--layer 18 is out of range: the data has 18 layers (0-17)"),
        (["--feature_type", "nope"], 2, "--feature_type 'nope' is not in the expert entry"),
        (["--rollout_step", "15"], 1, "no episode in the ranges has step_15; rollout steps present: 10, 20"),
        (["--episode_range", "0", "1"], 1, "every task needs at least 2"),
        (["--task_range", "50", "60"], 1, "no task_*.pkl files for tasks 50-59"),
    ],
)
def test_data_dependent_errors_are_one_line_and_write_nothing(run_cli, capsys, options, status, message):
    code, output = run_cli("--expert", "vlm", "--layer", "5", *options)
    err = capsys.readouterr().err
    assert code == status
    assert message in err and "Traceback" not in err
    assert not output.exists() or not any(output.iterdir())


def test_cli_as_a_program_and_a_warm_label_cache_skips_torch(demo_data, tiny_t5, tmp_path):
    command = [
        sys.executable,
        "-c",
        "import sys, linear_probing_inference as l; code = l.main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)",
        "--data_path",
        str(demo_data),
        "--t5_model",
        str(tiny_t5),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "out"),
        "--rollout_step",
        "10",
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--task_range",
        "0",
        "10",
        "--episode_range",
        "0",
        "6",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    cold = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    warm = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert cold.returncode == 0, cold.stderr
    assert "torch imported" in cold.stdout and "torch not imported" in warm.stdout
    assert "Linear Probing Results" in warm.stdout
    assert cold.stdout.split("Accuracy: ")[1][:6] == warm.stdout.split("Accuracy: ")[1][:6]


def test_script_error_exit_status(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "linear_probing_inference.py"),
            "--data_path",
            str(tmp_path / "nowhere"),
            "--rollout_step",
            "10",
            "--expert",
            "vlm",
            "--layer",
            "5",
            "--task_range",
            "0",
            "10",
            "--episode_range",
            "0",
            "5",
            "--cache_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"linear_probing_inference.py: error: --data_path {tmp_path / 'nowhere'}: not a directory"
    )
