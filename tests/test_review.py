"""Numbers that survive review: non-finite data named and skipped, information in bits, a permutation null that can
say no, intervals over the units that vary, and an independent recomputation of a results file."""

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

OBJECTS, PLACES = ["bowl", "mug", "plate", "box"], ["stove", "table", "shelf", "tray", "sink"]
COMPOSED = [f"put the {o} on the {p}" for o in OBJECTS for p in PLACES]  # 20 tasks sharing parts


def independent_t5(directory: Path, descriptions: list[str]) -> np.ndarray:
    """Mean over the real tokens of the encoder's last hidden state, computed here by hand (not by the program)."""
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer, model = AutoTokenizer.from_pretrained(directory), T5EncoderModel.from_pretrained(directory)
    with torch.no_grad():
        rows = [model(**tokenizer(d, return_tensors="pt")).last_hidden_state[0].mean(0).numpy() for d in descriptions]
    return np.stack(rows)


@pytest.fixture(scope="session")
def compositional(tmp_path_factory) -> dict:
    """'aligned': the text tokens carry a linear image of each task's T5 embedding (language-shaped);
    'random': a random direction per task (separable, not language-shaped)."""
    root = tmp_path_factory.mktemp("compositional")
    lpi.build_tiny_t5(root / "t5", COMPOSED)
    raw = independent_t5(root / "t5", COMPOSED)
    signatures = (raw - raw.mean(0)) @ np.random.default_rng(7).standard_normal((raw.shape[1], 48))
    common = dict(steps=(10,), vlm_width=48, descriptions=COMPOSED, num_tasks=20, num_episodes=4, num_layers=6)
    lpi.write_demo_dataset(root / "aligned", vlm_signatures=signatures / signatures.std(), **common)
    lpi.write_demo_dataset(root / "random", **common)
    return {"root": root, "t5": root / "t5"}


def run_compositional(compositional, output: Path, data: str, *options: str) -> dict:
    status = lpi.main(
        [
            "--data_path",
            str(compositional["root"] / data),
            "--t5_model",
            str(compositional["t5"]),
            "--cache_dir",
            str(compositional["root"] / "cache"),
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
            "--bootstrap",
            "200",
            "--quiet",
            "--split",
            "task",
            *options,
        ]
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        return pickle.load(file)


def test_unseen_tasks_the_permutation_null_can_say_yes_and_no(compositional, tmp_path):
    aligned = run_compositional(compositional, tmp_path / "aligned", "aligned")["metrics"]
    assert aligned["accuracy"] >= 0.8 and aligned["chance_accuracy"] == pytest.approx(0.05)
    assert len(aligned["permutation_null"]["accuracy"]) == 20  # the default under --split task
    assert aligned["permutation_p_value"] <= 0.05
    assert aligned["permutation_null_mean_accuracy"] <= 0.2
    separable = run_compositional(compositional, tmp_path / "random", "random")["metrics"]
    assert separable["accuracy"] <= 0.25
    assert separable["permutation_p_value"] > 0.05


def test_mdl_compresses_the_true_assignment_better_than_the_control(compositional, tmp_path):
    results = run_compositional(compositional, tmp_path / "mdl", "aligned", "--mdl", "--permutations", "1")
    mdl = results["metrics"]["mdl"]
    assert mdl["uniform_bits"] == pytest.approx(80 * math.log2(20))
    assert mdl["compression"] > 1.0 and mdl["compression"] > mdl["control"]["compression"]
    blocks = results["samples"]["mdl_block"]
    for task in range(20):  # blocks hold whole tasks under --split task
        assert len(set(blocks[results["samples"]["task_id"] == task])) == 1


def test_information_in_bits_follows_the_planted_signal(run_cli, tmp_path):
    metrics = {}
    for layer in (5, lpi.DEMO_SILENT_LAYER):
        status, output = run_cli(
            "--expert",
            "text_only",
            "--layer",
            str(layer),
            "--no_control",
            "--bootstrap",
            "0",
            output_dir=tmp_path / str(layer),
        )
        assert status == 0
        with open(output / f"results_text_only_layer{layer}_step10.pkl", "rb") as file:
            metrics[layer] = pickle.load(file)["metrics"]
    strong, silent = metrics[5], metrics[lpi.DEMO_SILENT_LAYER]
    assert strong["max_information_bits"] == pytest.approx(math.log2(10))
    assert strong["information_bits"] >= 0.6 * math.log2(10)
    assert silent["information_bits"] <= 0.5
    for one in (strong, silent):
        assert one["information_bits"] == pytest.approx(one["max_information_bits"] - one["cross_entropy_bits"])


@pytest.fixture
def one_nan_sample(tmp_path) -> Path:
    """The demo layout with one NaN in one sample's hidden state: task 3, episode 2, step 10, layer 5."""
    directory = tmp_path / "nan"
    lpi.write_demo_dataset(directory, num_layers=6)
    path = next(directory.glob("task_3_*.pkl"))
    with open(path, "rb") as file:
        data = pickle.load(file)
    data["episodes"]["episode_2"]["rollout_steps"]["step_10"]["vlm_layer_output"]["hidden_states"][5, 0, 770, 3] = (
        np.nan
    )
    with open(path, "wb") as file:
        pickle.dump(data, file)
    return directory


def all_numbers(value):
    """Every float reachable in a metrics dict."""
    if isinstance(value, dict):
        for item in value.values():
            yield from all_numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from all_numbers(item)
    elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
        yield from value.ravel().tolist()
    elif isinstance(value, float):
        yield value


def test_a_non_finite_sample_is_named_skipped_and_counted(run_cli, one_nan_sample, capsys):
    status, output = run_cli("--expert", "text_only", "--layer", "4,5", "--bootstrap", "100", data_path=one_nan_sample)
    assert status == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "non-finite" in line]
    assert len(warnings) == 1 and "task_3_" in warnings[0] and "episode_2" in warnings[0] and "layer 5" in warnings[0]
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        results = pickle.load(file)
    assert results["metrics"]["num_samples"] == 59
    ((task, episode, step, time_value),) = results["data_report"]["nonfinite_samples"]
    assert (task, episode, step) == (3, 2, 10) and math.isnan(time_value)
    scored = {key: value for key, value in results["metrics"].items() if key != "confidence_intervals"}
    assert all(math.isfinite(number) for number in all_numbers(scored))
    for low, high in results["metrics"][
        "confidence_intervals"
    ].values():  # n/a (no variation) is (nan, nan), never half
        assert math.isnan(low) == math.isnan(high)
    assert results["metrics"]["accuracy"] >= 0.9  # the NaN is not scored, as right or as wrong
    summary = (output / "summary_text_only_layer5_step10.txt").read_text()
    assert "Samples Skipped For Non-finite Features: 1 (task 3 episode 2)" in summary
    with open(output / "results_text_only_layer4_step10.pkl", "rb") as file:  # another layer of the same samples
        assert pickle.load(file)["metrics"]["num_samples"] == 60


def test_a_non_finite_sample_is_fatal_under_strict_and_nothing_is_written(run_cli, one_nan_sample, capsys):
    status, output = run_cli("--expert", "text_only", "--layer", "4,5", "--strict", data_path=one_nan_sample)
    assert status == 1
    assert "non-finite features" in capsys.readouterr().err
    assert not output.exists() or not any(output.iterdir())


def test_retrieval_counts_a_non_finite_prediction_as_wrong():
    similarities = np.array([[0.9, 0.1, 0.0], [np.nan, np.nan, np.nan], [0.2, np.nan, 0.1]])
    result = lpi.retrieval(similarities, np.array([0, 1, 0]))
    np.testing.assert_array_equal(result.correct, [True, False, False])
    np.testing.assert_array_equal(result.rank, [1, 3, 3])
    np.testing.assert_array_equal(result.predicted, [0, -1, -1])
    bits = lpi.log_loss_bits(similarities, np.array([0, 1, 0]), 0.1, lpi.uniform_share(10))
    assert bits[1] == pytest.approx(math.log2(3)) and bits[2] == pytest.approx(math.log2(3))  # no information
    assert bits[0] < 0.3


def test_a_confident_error_costs_at_most_the_uniform_share():
    similarities = np.array([[1.0, -1.0, -1.0]] * 2)  # sure of class 0
    right, wrong = lpi.log_loss_bits(similarities, np.array([0, 1]), 0.01, lpi.uniform_share(8))
    assert right < 0.2
    assert wrong == pytest.approx(math.log2(3 * 10), rel=1e-6)  # p = share / classes, share = 1 / (8 + 2)


def test_a_failed_probe_is_reported_and_its_samples_count_as_wrong(run_cli, monkeypatch):
    train = lpi.train_linear_probes

    def first_fold_diverges(*args, **kwargs):
        fitted = lpi.jax.tree_util.tree_map(np.array, train(*args, **kwargs))  # writable copies
        fitted.history["best_epoch"][:, 0] = 0
        fitted.failed[:, 0] = True
        return fitted

    monkeypatch.setattr(lpi, "train_linear_probes", first_fold_diverges)
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--bootstrap", "0")
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        results = pickle.load(file)
    metrics, fold = results["metrics"], results["samples"]["fold"]
    assert metrics["failed_probes"] == [(0, 0)]
    assert not results["heldout"]["rank"][fold == 0].tolist().count(1)  # none of fold 0's samples is right
    assert metrics["accuracy"] <= 1 - np.mean(fold == 0) + 1e-9
    assert "FAILED PROBES (repeat 0 fold 0)" in (output / "summary_text_only_layer5_step10.txt").read_text()


def test_intervals_resample_whole_groups():
    units = np.repeat(np.arange(4), 5)  # two groups of episodes all right, two all wrong
    values = {"accuracy": (units < 2).astype(float)}
    low, high = lpi.unit_intervals(values, units, None, 2000, seed=0)["accuracy"]
    assert low <= 0.25 and high >= 0.75  # resampling the 20 samples would give about [0.37, 0.63]


def test_intervals_do_not_collapse_at_the_ceiling():
    units = np.arange(50)
    all_right = lpi.unit_intervals({"accuracy": np.ones(50)}, units, None, 1000, seed=0)["accuracy"]
    assert all_right[1] == 1.0 and 0.9 < all_right[0] < 0.95  # Wilson over 50 units, not [1, 1]
    one_wrong = lpi.unit_intervals({"accuracy": (units != 7).astype(float)}, units, None, 1000, seed=0)["accuracy"]
    assert one_wrong[0] < 0.98 and one_wrong[1] == 1.0


def test_task_split_intervals_resample_tasks_and_are_wider(compositional, tmp_path):
    results = run_compositional(compositional, tmp_path / "ci", "aligned", "--permutations", "1")
    samples, correct = results["samples"], (results["heldout"]["rank"] == 1).astype(float)
    recorded = results["metrics"]["confidence_intervals"]["accuracy"]
    by_task = lpi.unit_intervals({"accuracy": correct}, samples["task_id"], None, 200, seed=42)["accuracy"]
    episodes = samples["task_id"] * 1000 + samples["episode"]
    by_episode = lpi.unit_intervals({"accuracy": correct}, episodes, samples["task_id"], 200, seed=42)["accuracy"]
    assert recorded == pytest.approx(by_task)
    assert by_task[1] - by_task[0] > by_episode[1] - by_episode[0]
    # The same, by a bootstrap written here: resample the 20 tasks with replacement, the mean over their samples.
    tasks = np.unique(samples["task_id"])
    hits = np.array([correct[samples["task_id"] == t].sum() for t in tasks])
    sizes = np.array([(samples["task_id"] == t).sum() for t in tasks])
    draws = np.random.default_rng(0).integers(0, len(tasks), (20_000, len(tasks)))
    means = hits[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    percentile = np.percentile(means, [2.5, 97.5])
    estimate = correct.mean()
    assert recorded[0] <= estimate <= recorded[1]
    assert recorded == pytest.approx(percentile, abs=0.05)  # BCa against percentile: a shift, not another unit
    per_sample = np.random.default_rng(0).integers(0, len(correct), (20_000, len(correct)))
    assert np.ptp(np.percentile(correct[per_sample].mean(axis=1), [2.5, 97.5])) < 0.8 * np.ptp(percentile)


def test_repeats_average_several_seeds_and_widen_the_interval(run_cli, tmp_path):
    runs = {}
    for repeats in (1, 3):
        status, output = run_cli(
            "--expert",
            "vlm",
            "--layer",
            "5",
            "--repeats",
            str(repeats),
            "--no_control",
            "--bootstrap",
            "300",
            output_dir=tmp_path / str(repeats),
        )
        assert status == 0
        with open(output / "results_vlm_layer5_step10.pkl", "rb") as file:
            runs[repeats] = pickle.load(file)
    single, repeated = runs[1]["metrics"], runs[3]["metrics"]
    assert repeated["repeats"]["accuracy"][0] == pytest.approx(single["accuracy"])  # repeat 0 is the single run
    assert repeated["accuracy"] == pytest.approx(repeated["repeats"]["accuracy"].mean())
    assert len(set(repeated["repeats"]["accuracy"].round(6))) > 1  # other folds, other numbers
    assert runs[3]["samples"]["repeat_folds"].shape == (3, 60)
    low, high = repeated["confidence_intervals"]["accuracy"]
    assert low <= repeated["accuracy"] <= high


def test_results_file_recomputed_independently(run_cli, demo_data):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--bootstrap", "0")
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        results = pickle.load(file)
    samples, probe, tasks, metrics = results["samples"], results["probe"], results["tasks"], results["metrics"]
    features = []
    for task, episode in zip(samples["task_id"], samples["episode"]):  # raw arrays, literal text-token positions
        with open(next(demo_data.glob(f"task_{task}_*.pkl")), "rb") as file:
            step = pickle.load(file)["episodes"][f"episode_{episode}"]["rollout_steps"]["step_10"]
        features.append(step["vlm_layer_output"]["hidden_states"][5, 0, 768:816].astype(np.float64).mean(0))
    features = np.array(features)
    classes = tasks["class_of_task"][np.searchsorted(tasks["task_ids"], samples["task_id"])]
    count = len(tasks["class_descriptions"])
    similarity, bits = np.zeros((len(features), count)), np.zeros(len(features))
    temperature = results["copies"]["temperature"][probe["copy"]]
    grid = np.geomspace(0.01, 100.0, 161)  # the documented grid: each fold's temperature is refitted below
    for fold in range(metrics["num_folds"]):
        targets = tasks["t5_embeddings"] - tasks["label_mean"][fold]
        if tasks["label_basis"] is not None:
            targets = targets @ tasks["label_basis"][fold].T
        targets /= np.linalg.norm(targets, axis=1, keepdims=True)
        share = 1 / (samples["validation"][fold].sum() + 2)  # the uniform code's weight: rule of succession

        def cosines(rows, fold=fold, targets=targets):  # this fold's probe on the given samples
            x = (features[rows] - probe["feature_mean"][fold]) / probe["feature_std"][fold]
            prediction = x @ probe["kernel"][fold] + probe["bias"][fold]
            return prediction / np.linalg.norm(prediction, axis=1, keepdims=True) @ targets.T

        def code(cosine, own, tau, share=share):
            logits = cosine / tau
            softmax = np.exp(logits - logits.max(1, keepdims=True))
            softmax /= softmax.sum(1, keepdims=True)
            return -np.log2(((1 - share) * softmax + share / count)[np.arange(len(own)), own])

        calibration = samples["validation"][fold]  # the temperature is fitted on validation samples only
        fitted = grid[np.argmin([code(cosines(calibration), classes[calibration], tau).mean() for tau in grid])]
        assert temperature[fold] == pytest.approx(fitted)
        rows = samples["fold"] == fold
        similarity[rows] = cosines(rows)
        bits[rows] = code(similarity[rows], classes[rows], temperature[fold])
    own = similarity[np.arange(len(classes)), classes]
    rank = 1 + np.sum(similarity > own[:, None], axis=1)
    correct = rank == 1
    assert metrics["accuracy"] == pytest.approx(correct.mean())
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean([correct[classes == c].mean() for c in range(count)]))
    assert metrics["top_k_accuracy"][3] == pytest.approx(np.mean(rank <= 3))
    assert metrics["mean_reciprocal_rank"] == pytest.approx(np.mean(1 / rank))
    confusion = np.zeros((count, count), int)
    np.add.at(confusion, (classes, similarity.argmax(1)), 1)
    np.testing.assert_array_equal(metrics["confusion_matrix"], confusion)
    assert metrics["information_bits"] == pytest.approx(math.log2(count) - bits.mean(), rel=1e-5)
    assert metrics["cross_entropy_bits"] == pytest.approx(bits.mean(), rel=1e-5)


def test_standardization_is_exact_far_from_zero_and_for_tiny_features():
    rng = np.random.default_rng(0)
    classes = rng.standard_normal((6, 4)).astype(np.float32)
    sample_class = np.repeat(np.arange(6), 30)
    features = classes[sample_class] @ rng.standard_normal((4, 8)) + 0.3 * rng.standard_normal((180, 8))
    train, validation = np.arange(180) % 3 != 0, np.arange(180) % 3 == 0
    copies = lpi.Copies(
        repeat=np.zeros(1, int),
        assignment=np.zeros(1, int),
        fold=np.zeros(1, int),
        block=np.full(1, -1),
        classes=classes[None],
        known=np.ones((1, 6), bool),
        train=train[None],
        validation=validation[None],
        label_mean=np.zeros((1, 4)),
        label_basis=np.eye(4)[None],
    )
    config = lpi.TrainingConfig(num_epochs=100, learning_rate=0.01)
    cosines, stopped = {}, {}
    for name, scaled in (("plain", features), ("far from zero", features + 1e6), ("tiny", features * 1e-9)):
        scaled = scaled.astype(np.float32)
        fitted = lpi.train_linear_probes(scaled[None], sample_class, copies, config).item(0)
        x = (scaled.astype(np.float64) - fitted.feature_mean[0]) / fitted.feature_std[0]
        cosines[name] = lpi.row_cosine(x @ fitted.kernel[0] + fitted.bias[0], classes[sample_class])[validation].mean()
        stopped[name] = (int(fitted.history["epochs_run"][0]), int(fitted.history["best_epoch"][0]))
    assert cosines["plain"] > 0.9
    # The mean is subtracted before the weights see it: the same validation losses, so the same early stop.
    assert stopped["far from zero"] == stopped["plain"] and stopped["plain"][0] < 100
    assert cosines["far from zero"] >= cosines["plain"] - 0.01
    assert cosines["tiny"] >= cosines["plain"] - 0.01  # a relative floor on the std: tiny units are not "constant"


def test_contrastive_negatives_and_label_spaces_come_from_training_tasks_only(tiny_t5, tmp_path):
    task_id, episode = np.repeat(np.arange(10), 3), np.tile(np.arange(3), 10)
    samples = lpi.Samples(
        np.zeros((1, 30, 4), np.float32), task_id, episode, np.full(30, 10), np.full(30, np.nan), np.zeros(30, int)
    )
    descriptions = {t: d for t, d in enumerate(lpi.DEMO_DESCRIPTIONS)}
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path))
    design = lpi.design_for(samples, descriptions, labels, lpi.TrainingConfig(split="task", permutations=3))
    copies = design.copies
    assert len(copies.train) == 5 * 4  # 5 folds x (the probe + 3 permuted assignments)
    for copy in range(len(copies.train)):
        validation_classes = set(design.sample_class[copies.validation[copy]])
        trained = set(design.sample_class[copies.train[copy]])
        assert validation_classes and not validation_classes & trained
        assert set(np.flatnonzero(copies.known[copy])) == trained  # validation tasks are never negatives
        held_out = design.sample_class[design.fold[0] == copies.fold[copy]]
        permuted = design.assignments[copies.assignment[copy]]
        side = np.unique(design.sample_class[copies.train[copy] | copies.validation[copy]])
        np.testing.assert_allclose(copies.label_mean[copy], design.raw[permuted[side]].mean(0), rtol=1e-5, atol=1e-6)
        assert not set(held_out) & set(side)


def test_contrastive_loss_trains_on_unseen_tasks_without_failing(compositional, tmp_path):
    results = run_compositional(
        compositional, tmp_path / "contrastive", "aligned", "--loss", "contrastive", "--permutations", "2"
    )
    assert not results["copies"]["failed"].any()
    assert np.isfinite(results["history"]["validation_loss"][:, 0]).all()  # validation tasks are scored
    assert results["metrics"]["accuracy"] >= 0.6


def test_stratified_intervals_do_not_collapse_when_each_task_is_constant():
    task = np.repeat(np.arange(10), 5)
    units = task * 100 + np.tile(np.arange(5), 10)
    correct = (task != 3).astype(float)  # nine tasks always right, one always wrong
    intervals = lpi.unit_intervals(
        {"accuracy": correct, "information_bits": np.full(50, 2.0)}, units, task, 500, seed=0
    )
    low, high = intervals["accuracy"]
    assert low < 0.9 < high  # Wilson over the 50 episodes, not the zero-width (0.9, 0.9)
    assert all(math.isnan(bound) for bound in intervals["information_bits"])  # n/a, not (2, 2)


def test_every_sample_non_finite_in_one_layer_stops_before_any_file(run_cli, tmp_path, capsys):
    directory = tmp_path / "inf"
    lpi.write_demo_dataset(directory, num_layers=6)
    for path in directory.glob("task_*.pkl"):
        with open(path, "rb") as file:
            data = pickle.load(file)
        for episode in data["episodes"].values():
            for step in episode["rollout_steps"].values():
                step["vlm_layer_output"]["hidden_states"][5, 0, 800, 0] = np.inf
        with open(path, "wb") as file:
            pickle.dump(data, file)
    status, output = run_cli("--expert", "text_only", "--layer", "4,5", "--bootstrap", "0", data_path=directory)
    err = capsys.readouterr().err
    assert status == 1 and "text_only_layer5_step10: every sample has non-finite features" in err
    assert "Traceback" not in err and (not output.exists() or not any(output.iterdir()))


def test_report_skips_results_of_an_older_format(run_cli, tmp_path, capsys):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--bootstrap", "0", "--no_control")
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        old = pickle.load(file)
    old["format_version"] = 3  # before unseen tasks were scored by their whole embeddings: another definition
    with open(output / "results_text_only_layer4_step10.pkl", "wb") as file:
        pickle.dump(old, file)
    assert lpi.main(["--report", str(output)]) == 0
    assert "older version of this program (format 3)" in capsys.readouterr().err
    assert (output / "sweep.csv").read_text().count("\n") == 2  # header and the current file


def test_uncentered_projected_labels_keep_the_mean_direction(run_cli):
    status, output = run_cli(
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--no_center_labels",
        "--label_dim",
        "5",
        "--bootstrap",
        "0",
        "--no_control",
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        metrics = pickle.load(file)["metrics"]
    assert metrics["accuracy"] >= 0.85
    assert metrics["cosine_similarity"] >= 0.95  # was 0.44: the projection dropped the shared direction
    assert metrics["cosine_similarity"] > metrics["constant_predictor_cosine"]
    assert metrics["cosine_similarity_normalized"] > 0
    summary = (output / "summary_text_only_layer5_step10.txt").read_text()
    assert "raw T5, the prediction mapped back through the label basis" in summary


def test_a_sweep_level_claim_holds_where_language_is_planted_and_only_there(compositional, tmp_path):
    """Every layer of 'aligned' but the silent one carries a linear image of each task's T5 embedding; 'random' a
    random direction per task. Held-out tasks, ridge, 99 aligned permutations, corrected over the 6 layers."""
    corrected = {}
    for data in ("aligned", "random"):
        output = tmp_path / data
        options = ("--layer", "all", "--probe", "ridge", "--permutations", "99", "--bootstrap", "0")
        run_compositional(compositional, output, data, *options)
        assert lpi.main(["--report", str(output), "--quiet"]) == 0
        with open(output / "sweep.csv") as file:
            corrected[data] = {
                int(row["layer"]): float(row["permutation_p_value_fwer"]) for row in csv.DictReader(file)
            }
    silent = lpi.DEMO_SILENT_LAYER
    assert all(p <= 0.05 for layer, p in corrected["aligned"].items() if layer != silent), corrected["aligned"]
    assert corrected["aligned"][silent] > 0.05
    assert all(p > 0.05 for p in corrected["random"].values()), corrected["random"]
