"""Heatmaps in --report: layer x denoising time and layer x rollout step, pivot CSVs holding sweep.csv's values."""

import csv
from pathlib import Path

import linear_probing_inference as lpi

TIME_MAP, STEP_MAP = lpi.HEATMAPS  # accuracy_by_layer_and_inference_time, accuracy_by_layer_and_rollout_step


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def drawn(path: Path) -> bool:
    """A PNG with something drawn on it, not a blank canvas."""
    image = lpi.pyplot().imread(path)
    return image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.05


def pivot_metrics_checked_against_sweep(output: Path, kind: lpi.HeatmapKind) -> set[str]:
    """Every filled pivot cell is the text of its sweep.csv row's value and every sweep value is in the pivot, for each
    metric the pivot holds; return those metrics."""
    sweep = read_csv(output / "sweep.csv")
    pivot = read_csv(output / f"{kind.stem}_pivot.csv")
    columns = list(pivot[0])[len(kind.panel_keys) + 2 :]
    found = {}
    for line in pivot:
        panel = tuple(line[key] for key in kind.panel_keys)
        for column in columns:
            if line[column] != "":
                found[(panel, line["metric"], line["layer"], column)] = line[column]
    metrics = {line["metric"] for line in pivot}
    expected = {}
    for row in sweep:
        panel = tuple(row[key] for key in kind.panel_keys)
        for metric in metrics:
            if row[metric] != "":
                expected[(panel, metric, row["layer"], row[kind.column] or "all")] = row[metric]
    assert found == expected
    return metrics


def test_action_expert_over_layers_and_denoising_time(run_cli):
    options = ["--expert", "action", "--layer", "0-5", "--inference_step", "each", "--bootstrap", "0", "--no_control"]
    status, output = run_cli(*options)
    assert status == 0 and lpi.main(["--report", str(output)]) == 0
    assert drawn(output / "accuracy_by_layer_and_inference_time.png")
    assert not (output / "accuracy_by_layer_and_rollout_step.png").exists()  # one rollout step: nothing to draw
    pivot = read_csv(output / "accuracy_by_layer_and_inference_time_pivot.csv")
    header = [
        "expert",
        "rollout_step",
        "feature_type",
        "token_positions",
        "labels",
        "probe",
        "loss",
        "split",
        "metric",
        "layer",
    ]
    assert list(pivot[0]) == header + [str(time) for time in lpi.DEMO_TIMES]  # denoising order: t = 1.0 first
    assert [line["layer"] for line in pivot if line["metric"] == "accuracy"] == [str(layer) for layer in range(6)]
    assert pivot_metrics_checked_against_sweep(output, TIME_MAP) == {"accuracy", "information_bits"}
    assert len(read_csv(output / "sweep.csv")) == 60


def test_text_tokens_over_layers_and_rollout_steps_show_no_control_under_the_episode_split(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "0-5", "--rollout_step", "all", "--bootstrap", "0")
    assert status == 0 and lpi.main(["--report", str(output)]) == 0
    assert drawn(output / "accuracy_by_layer_and_rollout_step.png")
    assert not (output / "accuracy_by_layer_and_inference_time.png").exists()  # no denoising axis for the VLM
    pivot = read_csv(output / "accuracy_by_layer_and_rollout_step_pivot.csv")
    assert list(pivot[0])[-2:] == ["10", "20"]
    # the control was measured, but under this split it says nothing about language: not shown
    assert all(row["control_accuracy"] != "" for row in read_csv(output / "sweep.csv"))
    assert pivot_metrics_checked_against_sweep(output, STEP_MAP) == {"accuracy", "information_bits"}


def test_the_task_split_shows_its_control_and_permutation_p_value(run_cli):
    options = ["--expert", "text_only", "--layer", "0-1", "--rollout_step", "all", "--split", "task"]
    status, output = run_cli(*options, "--permutations", "2", "--bootstrap", "50")
    assert status == 0 and lpi.main(["--report", str(output)]) == 0
    assert drawn(output / "accuracy_by_layer_and_rollout_step.png")
    metrics = pivot_metrics_checked_against_sweep(output, STEP_MAP)
    interval = {"accuracy_ci_low", "accuracy_ci_high"}
    corrected = {"permutation_p_value_fwer", "permutation_q_value"}  # the family: these 4 cells
    assert metrics == {"accuracy", "information_bits", "control_accuracy", "permutation_p_value"} | interval | corrected


def report_row(layer: int, time, accuracy: float) -> dict:
    """A sweep.csv row of an action-expert file, as report_row makes it ("" time: every denoising entry)."""
    row = dict.fromkeys(lpi.REPORT_COLUMNS, "")
    row.update(expert="action", layer=layer, rollout_step=10, inference_time=time, split="episode", accuracy=accuracy)
    row.update(inference_step="all" if time == "" else 0, chance_accuracy=0.25, num_tasks=4)
    row.update(information_bits=0.5, max_information_bits=2.0)
    return row


def test_the_probe_over_every_denoising_entry_comes_last_and_a_missing_file_leaves_a_blank(tmp_path):
    rows = [report_row(layer, time, 0.1 * layer + time) for layer in (0, 4) for time in (0.5, 1.0)]
    rows = [row for row in rows if (row["layer"], row["inference_time"]) != (4, 0.5)]
    rows += [report_row(layer, "", 0.123456789012345) for layer in (0, 4)]
    written = lpi.write_heatmaps(rows, tmp_path)
    assert written == [tmp_path / f"{TIME_MAP.stem}.png", tmp_path / f"{TIME_MAP.stem}_pivot.csv"]
    pivot = read_csv(tmp_path / f"{TIME_MAP.stem}_pivot.csv")
    accuracy = [list(line.items())[-3:] for line in pivot if line["metric"] == "accuracy"]
    assert accuracy == [
        [("1.0", "1.0"), ("0.5", "0.5"), ("all", "0.123456789012345")],
        [("1.0", "1.4"), ("0.5", ""), ("all", "0.123456789012345")],
    ]
    assert drawn(tmp_path / f"{TIME_MAP.stem}.png")


def test_an_imbalanced_noise_layer_gets_no_star():
    """With one task at 30 episodes and nine at 3, always answering it scores 0.5 against chance 0.1: an interval
    above chance but not above the majority baseline is no evidence, and gets no star."""
    rows = []
    for layer, (low, majority) in enumerate([(0.15, 0.5), (0.6, 0.5), (0.15, 0.1)]):
        row = report_row(layer, 0.5, low + 0.05)
        row.update(accuracy_ci_low=low, accuracy_ci_high=low + 0.1, chance_accuracy=0.1, majority_accuracy=majority)
        rows.append(row)
    panel = lpi.HeatmapPanel({"split": "episode"}, [0, 1, 2], [0.5], {(row["layer"], 0.5): row for row in rows})
    labels, note = lpi.cell_labels(panel, "accuracy", lpi.panel_values(panel, "accuracy"))
    assert [label.endswith("*") for label in labels[:, 0]] == [False, True, True]
    assert "majority baseline" in note
