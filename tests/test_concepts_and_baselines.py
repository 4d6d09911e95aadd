"""Concept probes (which words of the instruction a layer encodes in a way that transfers to unseen tasks) and
conditional probing (what a layer adds beyond a baseline)."""

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

OBJECTS, PLACES = ["bowl", "mug", "plate", "box"], ["stove", "table", "shelf", "tray", "sink"]
TASKS = [(o, p) for o in OBJECTS for p in PLACES]
DESCRIPTIONS = [f"put the {o} on the {p}" for o, p in TASKS]


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> Path:
    """Three datasets of the 20 tasks: the text tokens carry an object direction plus a place direction ('both'),
    the object direction only ('object'), or a random direction per task ('random')."""
    root = tmp_path_factory.mktemp("concepts")
    lpi.build_tiny_t5(root / "t5", DESCRIPTIONS)
    rng = np.random.default_rng(3)
    object_direction = {o: rng.standard_normal(48) for o in OBJECTS}
    place_direction = {p: rng.standard_normal(48) for p in PLACES}
    common = dict(steps=(10,), vlm_width=48, descriptions=DESCRIPTIONS, num_tasks=20, num_episodes=4, num_layers=6)
    both = np.array([object_direction[o] + place_direction[p] for o, p in TASKS])
    only_object = np.array([object_direction[o] for o, _ in TASKS])
    lpi.write_demo_dataset(root / "both", vlm_signatures=both / both.std(), **common)
    lpi.write_demo_dataset(root / "object", vlm_signatures=only_object / only_object.std(), **common)
    lpi.write_demo_dataset(root / "random", **common)
    return root


def concept_run(root: Path, data: str, output: Path, *options: str) -> dict:
    """Run the concept probes of layer 5 (unless options say otherwise); return layer 5's results."""
    status = lpi.main(
        [
            "--data_path",
            str(root / data),
            "--t5_model",
            str(root / "t5"),
            "--cache_dir",
            str(root / "cache"),
            "--output_dir",
            str(output),
            "--rollout_step",
            "10",
            "--expert",
            "text_only",
            "--layer",
            "5",
            "--task_range",
            "0",
            "20",
            "--episode_range",
            "0",
            "4",
            "--target",
            "concepts",
            "--quiet",
            *options,
        ]
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10_concepts.pkl", "rb") as file:
        return pickle.load(file)


def mean_balanced(concepts: dict, words: list[str]) -> float:
    return float(np.mean([concepts[word]["balanced_accuracy"] for word in words]))


def test_words_that_vary_are_the_concepts_and_transfer_only_where_planted(planted, tmp_path):
    both = concept_run(planted, "both", tmp_path / "both")
    assert sorted(both["concepts"]) == sorted(OBJECTS + PLACES)  # "put", "the", "on": in every task
    assert both["config"]["training"]["split"] == "task"  # held-out tasks by default
    assert both["concepts"]["stove"]["tasks_with"] == 4 and both["concepts"]["stove"]["tasks_without"] == 16
    assert mean_balanced(both["concepts"], OBJECTS) >= 0.75 and mean_balanced(both["concepts"], PLACES) >= 0.75
    only_object = concept_run(planted, "object", tmp_path / "object")["concepts"]
    assert mean_balanced(only_object, OBJECTS) >= 0.75 and mean_balanced(only_object, PLACES) <= 0.65
    random = concept_run(planted, "random", tmp_path / "random")["concepts"]
    assert mean_balanced(random, OBJECTS) <= 0.65 and mean_balanced(random, PLACES) <= 0.65
    assert both["concepts"]["bowl"]["information_bits"] > random["bowl"]["information_bits"]
    summary = (tmp_path / "both" / "summary_text_only_layer5_step10_concepts.txt").read_text()
    assert summary.startswith("Concept Probing Results") and "transfers to unseen combinations" in summary


def test_concepts_from_a_file_are_multi_valued_attributes(planted, tmp_path):
    table = tmp_path / "concepts.tsv"
    rows = ["task_id\tattribute\tvalue"] + [f"{t}\tobject\t{o}" for t, (o, _) in enumerate(TASKS)]
    rows += [f"{t}\tplace\t{p}" for t, (_, p) in enumerate(TASKS) if p != "sink"]  # sink tasks lack the attribute
    table.write_text("\n".join(rows) + "\n")
    results = concept_run(planted, "both", tmp_path / "file", "--concepts", str(table))
    assert sorted(results["concepts"]) == ["object", "place"]
    assert results["concepts"]["object"]["values"] == sorted(OBJECTS)
    assert results["concepts"]["place"]["values"] == sorted(["(none)", "shelf", "stove", "table", "tray"])
    assert results["concepts"]["place"]["tasks_without"] == 4
    assert results["concepts"]["object"]["balanced_accuracy"] >= 0.6  # chance is 0.25 for 4 values


def test_decodability_split_and_bad_concept_files(planted, tmp_path, capsys):
    decodable = concept_run(planted, "random", tmp_path / "episode", "--split", "episode")
    assert (
        "decodability, not transfer"
        in (tmp_path / "episode" / "summary_text_only_layer5_step10_concepts.txt").read_text()
    )
    assert decodable["config"]["training"]["split"] == "episode"
    bad = tmp_path / "bad.tsv"
    bad.write_text("0\tobject\n")
    status = lpi.main(
        [
            "--data_path",
            str(planted / "both"),
            "--t5_model",
            str(planted / "t5"),
            "--output_dir",
            str(tmp_path / "none"),
            "--rollout_step",
            "10",
            "--expert",
            "text_only",
            "--layer",
            "5",
            "--task_range",
            "0",
            "20",
            "--episode_range",
            "0",
            "4",
            "--target",
            "concepts",
            "--concepts",
            str(bad),
            "--cache_dir",
            str(planted / "cache"),
            "--quiet",
        ]
    )
    assert status == 2 and "line 1: expected task_id<TAB>attribute<TAB>value" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_report_draws_concepts_against_layers(planted, tmp_path, capsys):
    output = tmp_path / "sweep"
    concept_run(planted, "object", output, "--layer", "4,5")
    assert lpi.main(["--report", str(output)]) == 0
    assert "concepts_by_layer.png" in capsys.readouterr().out
    with open(output / "concepts.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 9 and {row["layer"] for row in rows} == {"4", "5"}
    for row in rows:
        with open(output / row["file"], "rb") as file:
            recorded = pickle.load(file)["concepts"][row["concept"]]["balanced_accuracy"]
        assert float(row["balanced_accuracy"]) == recorded
    image = lpi.pyplot().imread(output / "concepts_by_layer.png")
    assert image.shape[0] > 300 and image.std() > 0.05


def baseline_run(run_cli, output: Path, baseline: str, **where) -> dict:
    status, output = run_cli(
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--baseline",
        baseline,
        "--no_control",
        "--bootstrap",
        "0",
        output_dir=output,
        **where,
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        return pickle.load(file)


def test_conditional_probing_measures_what_a_layer_adds_beyond_a_baseline(run_cli, tmp_path):
    # The demo's right-wrist camera carries no task signal; layers 5 and 6 of the text tokens carry the same one.
    silent = baseline_run(run_cli, tmp_path / "silent", "visual:right_wrist_0_rgb")["metrics"]["baseline"]
    assert silent["spec"] == "visual:right_wrist_0_rgb" and silent["information_bits"] <= 0.5
    assert silent["gain_bits"] >= 1.5 and silent["joint_information_bits"] >= 2.0
    same = baseline_run(run_cli, tmp_path / "same", "text_only:6")["metrics"]["baseline"]
    assert same["information_bits"] >= 2.0 and same["gain_bits"] <= 0.5
    assert same["gain_bits"] == pytest.approx(same["joint_information_bits"] - same["information_bits"])
    summary = (tmp_path / "same" / "summary_text_only_layer5_step10.txt").read_text()
    assert "Beyond --baseline text_only:6 (conditional probing)" in summary


def test_samples_without_the_baseline_are_dropped_from_both_sides_and_counted(run_cli, tmp_path):
    directory = tmp_path / "partial"
    lpi.write_demo_dataset(directory, num_layers=6)
    path = next(directory.glob("task_2_*.pkl"))
    with open(path, "rb") as file:
        data = pickle.load(file)
    del data["episodes"]["episode_4"]["rollout_steps"]["step_10"]["vision_latents"]
    del data["episodes"]["episode_3"]["rollout_steps"]["step_20"]["vision_latents"]
    with open(path, "wb") as file:
        pickle.dump(data, file)
    results = baseline_run(run_cli, tmp_path / "out", "visual", data_path=directory)
    assert results["metrics"]["num_samples"] == 59
    assert results["data_report"]["steps_without_baseline"] == [(2, 4, 10)]
    assert not ((results["samples"]["task_id"] == 2) & (results["samples"]["episode"] == 4)).any()
    options = ("--expert", "text_only", "--layer", "5", "--baseline", "visual", "--no_control", "--bootstrap", "0")
    status, sweep = run_cli(*options, "--rollout_step", "10,20", data_path=directory, output_dir=tmp_path / "sweep")
    assert status == 0
    for step, lacking in ((10, [(2, 4, 10)]), (20, [(2, 3, 20)])):  # each result lists its own step's only
        stepped = pickle.loads((sweep / f"results_text_only_layer5_step{step}.pkl").read_bytes())
        assert stepped["data_report"]["steps_without_baseline"] == lacking


def test_a_step_whose_episodes_all_lack_the_baseline_stops_a_sweep_before_any_file(run_cli, tmp_path, capsys):
    directory = tmp_path / "no_baseline_at_20"
    lpi.write_demo_dataset(directory, num_layers=6)
    for path in directory.glob("task_*.pkl"):
        data = pickle.loads(path.read_bytes())
        for episode in data["episodes"].values():
            episode["rollout_steps"].get("step_20", {}).pop("vision_latents", None)
        path.write_bytes(pickle.dumps(data, protocol=4))
    options = ("--expert", "text_only", "--layer", "5", "--baseline", "visual", "--no_control", "--bootstrap", "0")
    output = tmp_path / "out"
    status, _ = run_cli(*options, "--rollout_step", "10,20", data_path=directory, output_dir=output)
    assert status == 1 and "no samples at step_20" in capsys.readouterr().err
    assert not output.exists() or not list(output.iterdir())
