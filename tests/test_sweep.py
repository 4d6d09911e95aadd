"""Sweeps: one process for many layers, steps and denoising steps; shards, resuming, reports and plots."""

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict:
    with open(path, "rb") as file:
        results = pickle.load(file)
    results.pop("wall_time_seconds")
    results.pop("command")
    return results


def same_results(first: dict, second: dict) -> bool:
    return pickle.dumps(first) == pickle.dumps(second)


def test_a_sweep_writes_exactly_what_single_runs_write(run_cli, tmp_path):
    status, sweep = run_cli(
        "--expert", "vlm", "--layer", "2-5", "--rollout_step", "10,20", output_dir=tmp_path / "sweep"
    )
    assert status == 0
    names = sorted(p.name for p in sweep.iterdir())
    assert names == sorted(
        f"{kind}_vlm_layer{layer}_step{s}.{ext}"
        for layer in range(2, 6)
        for s in (10, 20)
        for kind, ext in (("results", "pkl"), ("summary", "txt"))
    )
    for layer, step in ((3, 20), (5, 10)):
        status, single = run_cli(
            "--expert",
            "vlm",
            "--layer",
            str(layer),
            "--rollout_step",
            str(step),
            output_dir=tmp_path / f"single{layer}",
        )
        assert status == 0
        stem = f"vlm_layer{layer}_step{step}"
        assert same_results(load(sweep / f"results_{stem}.pkl"), load(single / f"results_{stem}.pkl"))
        assert (sweep / f"summary_{stem}.txt").read_text() == (single / f"summary_{stem}.txt").read_text()


def test_each_denoising_step_gets_its_own_result_named_by_its_time(run_cli, demo_data, tmp_path):
    status, output = run_cli("--expert", "action", "--layer", "5", "--inference_step", "each")
    assert status == 0
    results = sorted(output.glob("results_*.pkl"))
    with open(next(demo_data.glob("task_0_*.pkl")), "rb") as file:
        step = pickle.load(file)["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    times = [lpi.denoising_time(key) for key in lpi.action_expert_keys(step)]
    assert len(results) == 10
    assert sorted(p.name for p in results) == sorted(f"results_action_layer5_step10_t{t:g}.pkl" for t in times)
    for path in results:
        data = load(path)
        wanted = float(path.stem.split("_t")[-1])
        assert set(data["samples"]["inference_time"]) == {wanted} and data["metrics"]["num_samples"] == 60
    # the same as asking for one denoising step alone
    status, single = run_cli(
        "--expert", "action", "--layer", "5", "--inference_step", "3", output_dir=tmp_path / "single"
    )
    stem = f"action_layer5_step10_t{times[3]:g}"
    assert same_results(load(output / f"results_{stem}.pkl"), load(single / f"results_{stem}.pkl"))


def test_all_layers_and_all_steps_come_from_the_data(run_cli):
    status, output = run_cli(
        "--expert", "text_only", "--layer", "all", "--rollout_step", "all", "--bootstrap", "0", "--no_control"
    )
    assert status == 0
    assert len(list(output.glob("results_*.pkl"))) == 18 * 2


@pytest.mark.parametrize(
    "expert, options, first, last",
    [
        ("image", [], 0, 767),
        ("vlm", ["--token_range", "100", "200"], 100, 199),
        ("action", ["--token_range", "0", "1"], 0, 0),
    ],
)
def test_experts_and_token_range_pick_the_documented_positions(tmp_path, expert, options, first, last):
    hidden = (
        (np.arange(816, dtype=np.float32)[None, None, :, None] + np.zeros((2, 1, 816, 2), np.float32))
        if expert != "action"
        else (np.arange(51, dtype=np.float32)[None, None, :, None] + np.zeros((2, 1, 51, 2), np.float32))
    )
    step = {"vlm_layer_output": {"hidden_states": hidden}, "action_expert_state_time1.0": {"hidden_states": hidden}}
    with open(tmp_path / "task_0_x.pkl", "wb") as file:
        pickle.dump({"task_description": "x", "episodes": {"episode_0": {"rollout_steps": {"step_10": step}}}}, file)
    parsed = lpi.parse_arguments(
        [
            "--data_path",
            str(tmp_path),
            "--rollout_step",
            "10",
            "--expert",
            expert,
            "--layer",
            "1",
            "--task_range",
            "0",
            "1",
            "--episode_range",
            "0",
            "1",
            *options,
        ]
    )
    config = lpi.configs_from_arguments(parsed)[0]
    samples = lpi.step_samples(lpi.read_dataset(config, [10], 1), [1], 10)
    np.testing.assert_allclose(samples.features[0, 0], (first + last) / 2)
    assert f"{first}-{last}" in lpi.describe_token_positions(config) or expert == "action"


def test_visual_expert_reads_siglip_output_per_camera(run_cli):
    status, output = run_cli("--expert", "visual", "--camera", "base_0_rgb")
    assert status == 0
    base = load(output / "results_visual_base_0_rgb_step10.pkl")
    assert base["config"]["data"]["feature_type"] == "pre_logits" and base["metrics"]["accuracy"] >= 0.45
    status, output = run_cli("--expert", "visual", "--camera", "right_wrist_0_rgb")  # LIBERO: an all-zero camera
    assert load(output / "results_visual_right_wrist_0_rgb_step10.pkl")["metrics"]["accuracy"] <= 0.35


def test_pooling_choice_changes_the_features(run_cli, tmp_path):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--pooling", "max", output_dir=tmp_path / "max")
    assert status == 0
    results = load(output / "results_text_only_layer5_step10.pkl")
    assert results["config"]["data"]["pooling"] == "max" and "max-pooled" in results["config"]["token_positions"]


def test_shards_together_give_exactly_the_full_sweep(run_cli, tmp_path):
    options = ("--expert", "vlm", "--layer", "0-4", "--rollout_step", "10,20", "--bootstrap", "100")
    run_cli(*options, output_dir=tmp_path / "full")
    for index in range(3):
        status, _ = run_cli(*options, "--shard", f"{index}/3", output_dir=tmp_path / "shards")
        assert status == 0
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == full and len(full) == 20
    for name in full:
        if name.endswith(".pkl"):
            assert same_results(load(tmp_path / "full" / name), load(tmp_path / "shards" / name))


def test_skip_existing_writes_only_what_is_missing(run_cli, tmp_path, caplog):
    options = ("--expert", "vlm", "--layer", "0-3", "--bootstrap", "100")
    output = tmp_path / "resumed"
    run_cli(*options, "--layer", "0-1", output_dir=output)  # an interrupted sweep: layers 0-1 done
    (output / "summary_vlm_layer1_step10.txt").unlink()  # killed between the two files of layer 1
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    status, _ = run_cli(*options, "--skip_existing", output_dir=output)
    assert status == 0
    after = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    assert after["results_vlm_layer0_step10.pkl"] == before["results_vlm_layer0_step10.pkl"]
    assert after["results_vlm_layer1_step10.pkl"] != before["results_vlm_layer1_step10.pkl"]
    assert {"results_vlm_layer2_step10.pkl", "results_vlm_layer3_step10.pkl", "summary_vlm_layer1_step10.txt"} <= set(
        after
    )


def test_a_finished_job_reads_no_file_and_a_job_left_with_work_reads_them(run_cli, tmp_path, monkeypatch, capsys):
    options = ("--expert", "vlm", "--layer", "4,5", "--probe", "ridge", "--no_control", "--skip_existing")
    output = tmp_path / "done"
    assert run_cli(*options, output_dir=output)[0] == 0
    parsed = []
    read_task_file = lpi.read_task_file

    def recorded(path, trust, index_dir):
        parsed.append(path)
        return read_task_file(path, trust, index_dir)

    monkeypatch.setattr(lpi, "read_task_file", recorded)
    assert run_cli(*options, output_dir=output)[0] == 0
    assert parsed == [] and "nothing to do" in capsys.readouterr().err
    assert (
        run_cli(*options, data_path=tmp_path / "no_such_directory", output_dir=output)[0] == 1
    )  # checked all the same
    (output / "summary_vlm_layer5_step10.txt").unlink()
    assert run_cli(*options, output_dir=output)[0] == 0
    assert len(parsed) == 10 and (output / "summary_vlm_layer5_step10.txt").is_file()


def test_report_makes_a_table_and_plots_covering_every_layer(run_cli, tmp_path, capsys):
    status, output = run_cli("--expert", "vlm", "--layer", "0-17", "--bootstrap", "200")
    assert status == 0
    run_cli("--expert", "text_only", "--layer", "0,5,17", "--bootstrap", "200", output_dir=output)
    capsys.readouterr()
    assert lpi.main(["--report", str(output)]) == 0
    printed = capsys.readouterr().out
    with open(output / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 21 and set(rows[0]) >= {
        "expert",
        "layer",
        "rollout_step",
        "inference_step",
        "feature_type",
        "accuracy",
        "cosine_similarity",
        "chance_accuracy",
        "num_samples",
        "num_tasks",
        "selectivity",
        "probe",
        "loss",
    }
    assert sorted(int(r["layer"]) for r in rows if r["expert"] == "vlm") == list(range(18))
    silent = next(r for r in rows if r["expert"] == "vlm" and r["layer"] == str(lpi.DEMO_SILENT_LAYER))
    assert float(silent["accuracy"]) < float(
        next(r for r in rows if r["expert"] == "vlm" and r["layer"] == "5")["accuracy"]
    )
    assert "vlm" in printed and "text_only" in printed and printed.count("\n") >= 22
    plt = lpi.pyplot()
    for name in ("accuracy_by_layer.png", "cosine_by_layer.png"):
        image = plt.imread(output / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05  # a drawn figure, not a blank one
    assert lpi.main(["--report", str(tmp_path / "empty")]) == 1


def test_plot_writes_the_run_figures(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--plot")
    assert status == 0
    plt = lpi.pyplot()
    for kind in ("curves", "confusion", "similarity", "pca"):
        image = plt.imread(output / f"{kind}_text_only_layer5_step10.png")
        assert image.std() > 0.05
    assert not list(output.glob(".*tmp"))


def test_two_devices_give_the_same_results_as_one(demo_data, tiny_t5, tmp_path):
    command = [
        sys.executable,
        str(REPO / "linear_probing_inference.py"),
        "--data_path",
        str(demo_data),
        "--t5_model",
        str(tiny_t5),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--rollout_step",
        "10",
        "--expert",
        "vlm",
        "--layer",
        "0-2",
        "--task_range",
        "0",
        "10",
        "--episode_range",
        "0",
        "6",
        "--bootstrap",
        "100",
    ]
    outputs = {}
    for devices in (1, 2):
        environment = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        output = tmp_path / f"devices{devices}"
        result = subprocess.run(
            [*command, "--output_dir", str(output)], capture_output=True, text=True, env=environment, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert ("spread over 2 devices" in result.stderr) == (devices == 2)
        outputs[devices] = output
    # A sharded program rounds differently, and training amplifies rounding, so the same science
    # rather than the same bits: the same held-out predictions nearly everywhere.
    for layer in range(3):
        one, two = (load(outputs[d] / f"results_vlm_layer{layer}_step10.pkl") for d in (1, 2))
        assert abs(one["metrics"]["accuracy"] - two["metrics"]["accuracy"]) <= 0.05
        assert np.mean(one["heldout"]["predicted_class"] == two["heldout"]["predicted_class"]) >= 0.9
        assert np.array_equal(one["samples"]["fold"], two["samples"]["fold"])


def test_progress_bars_stay_out_of_logs_and_a_final_line_says_where(demo_data, tiny_t5, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "linear_probing_inference.py"),
            "--data_path",
            str(demo_data),
            "--t5_model",
            str(tiny_t5),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--rollout_step",
            "10",
            "--expert",
            "vlm",
            "--layer",
            "0-1",
            "--task_range",
            "0",
            "10",
            "--episode_range",
            "0",
            "6",
            "--output_dir",
            str(tmp_path / "out"),
            "--bootstrap",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # stderr is not a terminal: no bars
    assert result.stderr.strip().splitlines()[-1].startswith("done in ") and str(tmp_path / "out") in result.stderr
