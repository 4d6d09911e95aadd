"""Labels and tokens as the model saw them: --labels prompt, --tokens prompt, on counterfactual-prompt demo files.

Planted (DemoPrompts): odd episodes run under the next task's description; text tokens carry the prompt's direction,
image tokens the scene's; each task's description takes PLANTED_LENGTHS[task] of the 48 text positions, the rest hold
the pad embedding at layer 0 and, at later layers, one vector that carries the scene."""

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

TASKS, EPISODES, LAYER = 10, 6, 2
PLANTED_LENGTHS = tuple(10 + (3 * task) % 11 for task in range(TASKS))  # 10-20 tokens, as LIBERO's instructions


def counterfactual(directory: Path, lengths=PLANTED_LENGTHS, tasks: int = TASKS, steps=(10,)) -> Path:
    """Counterfactual-prompt files at width 32, 4 layers (3 silent); padding that carries the scene."""
    prompts = lpi.DemoPrompts(lengths=lengths, padding_scene=3.0, scene=3.0)
    lpi.write_demo_dataset(
        directory, num_tasks=tasks, num_episodes=EPISODES, steps=steps, vlm_width=32, num_layers=4, prompts=prompts
    )
    return directory


@pytest.fixture(scope="module")
def prompted(tmp_path_factory) -> Path:
    return counterfactual(tmp_path_factory.mktemp("counterfactual"), steps=(10, 20))


def probe(run_cli, data: Path, output: Path, *options: str) -> dict:
    """Run one probe of layer LAYER on `data`; its results file."""
    status, output = run_cli(
        "--layer", str(LAYER), "--bootstrap", "0", "--probe", "ridge", *options, data_path=data, output_dir=output
    )
    assert status == 0
    (path,) = output.glob("results_*.pkl")
    with open(path, "rb") as file:
        return pickle.load(file)


def shown_task(task: int, episode: int) -> int:
    """The task whose description an episode ran under: odd episodes the next task's."""
    return (task + 1) % TASKS if episode % 2 else task


def test_text_tokens_follow_the_prompt_and_image_tokens_the_scene(run_cli, prompted, tmp_path):
    by_prompt = probe(
        run_cli, prompted, tmp_path / "a", "--expert", "text_only", "--tokens", "prompt", "--labels", "prompt"
    )
    by_task = probe(run_cli, prompted, tmp_path / "b", "--expert", "text_only", "--tokens", "prompt")
    assert by_prompt["metrics"]["accuracy"] >= 0.9
    assert by_task["metrics"]["accuracy"] <= 0.65  # right on the episodes run under their own task's prompt only
    assert by_task["data_report"]["prompt_differs"] == by_prompt["data_report"]["prompt_differs"] == TASKS * 3
    image_by_task = probe(run_cli, prompted, tmp_path / "c", "--expert", "image")
    image_by_prompt = probe(run_cli, prompted, tmp_path / "d", "--expert", "image", "--labels", "prompt")
    assert image_by_task["metrics"]["accuracy"] >= 0.9
    assert image_by_prompt["metrics"]["accuracy"] <= 0.65
    # the prompt classes: every sample's class is the prompt its step ran under
    classes = by_prompt["tasks"]["class_descriptions"]
    samples = by_prompt["samples"]
    shown = [lpi.DEMO_DESCRIPTIONS[shown_task(t, e)] for t, e in zip(samples["task_id"], samples["episode"])]
    assert [classes[c] for c in by_prompt["heldout"]["true_class"]] == shown == samples["prompt"]


def test_padding_that_carries_the_scene_is_what_text_tokens_know_of_the_task(run_cli, prompted, tmp_path):
    """--tokens all pools the padded positions, which carry the scene: the task is read from "text tokens" on episodes
    whose prompt names another task. --tokens prompt drops them, and only the prompt is left."""
    every = probe(run_cli, prompted, tmp_path / "all", "--expert", "text_only")
    prompt_only = probe(run_cli, prompted, tmp_path / "prompt", "--expert", "text_only", "--tokens", "prompt")
    assert every["metrics"]["accuracy"] >= 0.9
    assert prompt_only["metrics"]["accuracy"] <= 0.65


def test_prompt_lengths_are_found_from_the_layer_0_embeddings(run_cli, prompted, tmp_path):
    results = probe(run_cli, prompted, tmp_path, "--expert", "vlm", "--tokens", "prompt", "--labels", "prompt")
    samples = results["samples"]
    planted = [PLANTED_LENGTHS[shown_task(t, e)] for t, e in zip(samples["task_id"], samples["episode"])]
    assert samples["prompt_length"].tolist() == planted
    assert results["data_report"]["prompt_lengths"] == {
        task: {PLANTED_LENGTHS[task]: 3, PLANTED_LENGTHS[(task + 1) % TASKS]: 3} for task in range(TASKS)
    }
    assert "less the prompt's padding" in results["config"]["token_positions"]


def pooled_text(data: Path, tokens: str, expert: str = "text_only") -> lpi.Samples:
    """Layer LAYER's pooled features of step 10, as the reader makes them."""
    source = lpi.Source(str(data), (0, TASKS), (0, EPISODES), expert, tokens=tokens)
    return lpi.step_samples(lpi.read_dataset(source, [10], LAYER), [LAYER], 10)


def test_text_pooled_without_padding_is_the_mean_of_the_prompt_positions(prompted):
    samples = pooled_text(prompted, "prompt")
    with open(next(prompted.glob("task_3_*.pkl")), "rb") as file:
        hidden = pickle.load(file)["episodes"]["episode_1"]["rollout_steps"]["step_10"]["vlm_layer_output"]
    length = PLANTED_LENGTHS[4]  # episode 1 of task 3 ran under task 4's prompt
    row = np.flatnonzero((samples.task_id == 3) & (samples.episode == 1))[0]
    text = hidden["hidden_states"][LAYER, 0, lpi.TEXT_TOKENS.start : lpi.TEXT_TOKENS.start + length]
    np.testing.assert_allclose(samples.features[0, row], text.mean(axis=0), rtol=1e-6)


def test_without_padding_every_text_position_is_kept(tmp_path):
    data = counterfactual(tmp_path, lengths=None, tasks=3)  # every prompt fills the 48 positions
    source = lpi.Source(str(data), (0, 3), (0, EPISODES), "text_only", tokens="prompt")
    samples = lpi.step_samples(lpi.read_dataset(source, [10], LAYER), [LAYER], 10)
    every = lpi.step_samples(
        lpi.read_dataset(lpi.Source(str(data), (0, 3), (0, EPISODES), "text_only"), [10], 2), [2], 10
    )
    assert samples.prompt_length.tolist() == [lpi.PROMPT_TOKENS] * len(samples.task_id)
    np.testing.assert_array_equal(samples.features, every.features)


def rewrite_steps(path: Path, change) -> None:
    """Apply change(step dict, episode) to every rollout step of a task file."""
    with open(path, "rb") as file:
        task_data = pickle.load(file)
    for episode, episode_data in task_data["episodes"].items():
        for step_data in episode_data["rollout_steps"].values():
            change(step_data, int(episode.removeprefix("episode_")))
    path.write_bytes(pickle.dumps(task_data))


def one_error_line(run_cli, data: Path, tmp_path: Path, capsys, *options: str) -> str:
    """Run a probe expected to stop with exit 1; its one line, with no result written."""
    capsys.readouterr()
    status, output = run_cli(
        "--task_range", "0", "3", "--layer", "2", *options, data_path=data, output_dir=tmp_path / "o"
    )
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1 and "Traceback" not in error
    assert not list(output.glob("results_*"))
    return error


def test_prompt_labels_need_every_step_to_hold_its_prompt(run_cli, tmp_path, capsys):
    data = counterfactual(tmp_path / "data", tasks=3)
    rewrite_steps(next(data.glob("task_2_*.pkl")), lambda step, episode: episode == 4 and step.pop("prompt"))
    error = one_error_line(run_cli, data, tmp_path, capsys, "--expert", "image", "--labels", "prompt")
    assert "task_2_" in error and "episode_4/step_10" in error and "'prompt'" in error
    status, _ = run_cli(
        "--task_range",
        "0",
        "3",
        "--layer",
        "2",
        "--expert",
        "image",
        "--bootstrap",
        "0",
        "--probe",
        "ridge",
        data_path=data,
    )
    assert status == 0  # --labels task needs no prompt


def test_an_empty_prompt_is_a_class_of_its_own(run_cli, tmp_path):
    data = counterfactual(tmp_path / "data", tasks=3)
    for task in (0, 1):  # two masked episodes in each of two tasks: 4 classes over 3 tasks
        rewrite_steps(
            next(data.glob(f"task_{task}_*.pkl")), lambda step, episode: episode < 2 and step.update(prompt="")
        )
    options = ("--task_range", "0", "3", "--layer", "2", "--expert", "text_only", "--labels", "prompt", "--plot")
    status, output = run_cli(
        *options, "--bootstrap", "0", "--probe", "ridge", data_path=data, output_dir=tmp_path / "out"
    )
    assert status == 0
    (path,) = output.glob("results_*_prompt_labels.pkl")
    with open(path, "rb") as file:
        results = pickle.load(file)
    classes = results["tasks"]["class_descriptions"]
    assert "" in classes and len(classes) == 4 and results["tasks"]["class_samples"][classes.index("")] == 4
    summary = next(output.glob("summary_*.txt")).read_text()
    assert f"  {classes.index('')}: (empty prompt) (accuracy" in summary
    # the classes are prompts: the summary does not call them tasks, and names what the per-task lines are
    assert "mean of per-prompt class accuracies" in summary and "Control (prompt class -> embedding" in summary
    assert "Per-task Accuracy (of the prompt class, by the task file" in summary
    assert "below the majority baseline" not in summary
    results["metrics"]["majority_accuracy"] = results["metrics"]["accuracy"] + 0.01  # as one frequent class would
    assert "(accuracy below the majority baseline: worse than always answering" in lpi.format_summary(results)
    assert (output / path.name.replace("results_", "confusion_").replace(".pkl", ".png")).is_file()


def test_padding_that_cannot_be_found_stops_the_run(run_cli, tmp_path, capsys):
    data = counterfactual(tmp_path / "data", tasks=3)
    path = next(data.glob("task_1_*.pkl"))
    text = lpi.TEXT_TOKENS

    def other_padding(step, episode):  # episode 0 pads with another vector than every other sample
        if episode == 0:
            step["vlm_layer_output"]["hidden_states"][0, 0, text.stop - 30 :] = 5.0

    rewrite_steps(path, other_padding)
    error = one_error_line(run_cli, data, tmp_path, capsys, "--expert", "text_only", "--tokens", "prompt")
    assert "no common padding vector" in error

    def all_padding(step, episode):  # episode 0 is all padding: the pad vector of every other sample
        hidden = step["vlm_layer_output"]["hidden_states"]
        if episode == 0:
            hidden[0, 0, text] = np.random.default_rng(lpi.DEMO_PAD_SEED).standard_normal(hidden.shape[-1])

    rewrite_steps(path, all_padding)
    error = one_error_line(run_cli, data, tmp_path, capsys, "--expert", "text_only", "--tokens", "prompt")
    assert "task_1_" in error and "episode_0/step_10" in error and "no text token" in error

    def no_embeddings(step, episode):  # a collector that stored another feature only
        entry = step["vlm_layer_output"]
        entry["post_attn_embedding"] = entry.pop("hidden_states")

    for one in data.glob("task_*.pkl"):
        rewrite_steps(one, no_embeddings)
    options = ("--expert", "text_only", "--tokens", "prompt", "--feature_type", "post_attn_embedding")
    assert "no layer-0 token embeddings" in one_error_line(run_cli, data, tmp_path, capsys, *options)


@pytest.mark.parametrize(
    "options",
    [
        ("--expert", "image", "--tokens", "prompt"),
        ("--expert", "text_only", "--tokens", "prompt", "--token_range", "768", "790"),
        ("--expert", "text_only", "--target", "concepts", "--labels", "prompt"),
        ("--expert", "text_only", "--split", "task", "--labels", "task,prompt"),
    ],
)
def test_prompt_options_that_do_not_fit_are_refused(run_cli, options):
    with pytest.raises(SystemExit) as stopped:
        run_cli("--layer", "2", *options)
    assert stopped.value.code == 2


def test_the_two_labelings_can_be_named_in_either_order():
    for given in ("task,prompt", "prompt,task"):
        assert lpi.parse_arguments(["--demo", "--labels", given]).label_by == "task,prompt"
    with pytest.raises(SystemExit):
        lpi.parse_arguments(["--demo", "--labels", "prompt,prompt"])


def test_one_command_compares_task_and_prompt_labels(run_cli, prompted, tmp_path):
    """--labels task,prompt: both probes in one results file, compared where the prompt names another task; text
    tokens follow the prompt, the silent layer neither, image tokens the task. --report adds the difference in bits."""
    options = ("--labels", "task,prompt", "--bootstrap", "0", "--no_control", "--probe", "ridge")
    text = ("--expert", "text_only", "--tokens", "prompt", "--layer", "2-3", "--rollout_step", "10,20", *options)
    status, output = run_cli(*text, data_path=prompted, output_dir=tmp_path / "text")
    assert status == 0 and lpi.main(["--report", str(output)]) == 0
    verdicts = {}
    for path in sorted(output.glob("results_*_prompt_tokens_task_and_prompt_labels.pkl")):
        with open(path, "rb") as file:
            results = pickle.load(file)
        labels, item = results["metrics"]["labels"], results["config"]["data"]
        verdicts[item["layer"], item["rollout_step"]] = labels["verdict"]
        assert labels["samples"] == results["data_report"]["prompt_differs"] >= 29  # task 1 episode 5 ends early
        if item["layer"] == LAYER:
            assert labels["prompt"]["accuracy"] >= 0.9 and labels["task"]["accuracy"] <= 0.5
            assert labels["prompt_minus_task_bits"] > 1.5
    assert verdicts == {(2, 10): "follows the prompt", (2, 20): "follows the prompt"} | {
        (3, 10): "both/neither",
        (3, 20): "both/neither",
    }
    with open(output / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert {(row["layer"], row["rollout_step"], row["label_verdict"]) for row in rows} == {
        (str(layer), str(step), verdict) for (layer, step), verdict in verdicts.items()
    }
    with open(output / "accuracy_by_layer_and_rollout_step_pivot.csv") as file:
        pivot = [line for line in csv.DictReader(file) if line["metric"] == "prompt_minus_task_bits"]
    assert [line["layer"] for line in pivot] == ["2", "3"] and float(pivot[0]["10"]) > 1.5
    status, output = run_cli("--expert", "image", "--layer", str(LAYER), *options, data_path=prompted)
    assert status == 0
    (path,) = output.glob("results_*.pkl")
    with open(path, "rb") as file:
        assert pickle.load(file)["metrics"]["labels"]["verdict"] == "follows the task"
