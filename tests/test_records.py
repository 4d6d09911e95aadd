"""Evaluation's typed records: the results file, the summary and the report are all read from one HeldOut, and the
pipeline runs from Python on pooled features already in memory."""

import csv
import dataclasses
import pickle

import numpy as np
import pytest

import linear_probing_inference as lpi


def load(path):
    with open(path, "rb") as file:
        return pickle.load(file)


def assert_same(left, right, where="metrics"):
    """Deep equality of a results file's values: dicts by key, arrays by value (NaN equal to NaN)."""
    if isinstance(left, dict):
        assert set(left) == set(right), where
        for key in left:
            assert_same(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, (np.ndarray, list, tuple)) and not isinstance(left, str):
        try:  # numbers: NaN equals NaN
            left, right = np.asarray(left, dtype=float), np.asarray(right, dtype=float)
        except (TypeError, ValueError):
            left, right = np.asarray(left, dtype=object), np.asarray(right, dtype=object)
        np.testing.assert_array_equal(left, right, err_msg=where)
    elif isinstance(left, float):
        assert left == right or (np.isnan(left) and np.isnan(right)), where
    else:
        assert left == right, where


@pytest.fixture(scope="module")
def task_split_result(demo_data, tiny_t5, tmp_path_factory):
    """A result with every optional part: control, permutation null and p-value, MDL, intervals."""
    output = tmp_path_factory.mktemp("records")
    argv = ["--data_path", str(demo_data), "--t5_model", str(tiny_t5), "--cache_dir", str(output / "cache")]
    argv += ["--output_dir", str(output), "--task_range", "0", "10", "--episode_range", "0", "6", "--quiet"]
    argv += ["--rollout_step", "10", "--expert", "text_only", "--layer", "5", "--split", "task"]
    assert lpi.main([*argv, "--permutations", "3", "--mdl", "--num_epochs", "20", "--bootstrap", "200"]) == 0
    return load(output / "results_text_only_layer5_step10.pkl"), output


def test_a_results_files_metrics_are_its_record_written_out(task_split_result):
    results, _ = task_split_result
    held_out = lpi.held_out_from(results["metrics"])
    assert held_out.control is not None and held_out.control.permutation_p_value is not None
    assert held_out.mdl is not None and held_out.mdl_control is not None
    assert len(held_out.control.permutation_null.accuracy) == 3
    assert_same(lpi.metrics_record(held_out), results["metrics"])


def test_the_report_row_holds_the_records_reported_fields(task_split_result):
    results, output = task_split_result
    held_out = lpi.held_out_from(results["metrics"])
    row = lpi.report_row(results, output / "results_text_only_layer5_step10.pkl")
    assert list(lpi.REPORT_COLUMNS) == list(dict.fromkeys(lpi.REPORT_COLUMNS))  # no column twice
    assert set(row) == set(lpi.REPORT_COLUMNS)
    for part, kind in lpi.REPORTED_PARTS.items():
        for field in dataclasses.fields(kind):
            if "column" in field.metadata and getattr(held_out, part) is not None:
                assert row[field.metadata["column"] or field.name] == getattr(getattr(held_out, part), field.name)
    low, high = held_out.intervals["accuracy"]
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == (low, high) and low <= row["accuracy"] <= high
    assert row["baseline"] == "" and row["gain_bits"] == ""  # no --baseline: blank, not absent


def test_the_summary_says_below_zero_only_when_it_is(task_split_result):
    results, _ = task_split_result
    information = results["metrics"]["information_bits"]
    assert information > 0
    assert "worse than knowing nothing" not in lpi.format_summary(results).split("Information: ")[1].split("\n")[0]
    results = {**results, "metrics": {**results["metrics"], "information_bits": -0.25}}
    assert "bits (information below 0: worse than knowing nothing)" in lpi.format_summary(results)


def test_a_concept_runs_record_reads_back(run_cli):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--target", "concepts", "--num_epochs", "20")
    assert status == 0
    results = load(output / "results_text_only_layer5_step10_concepts.pkl")
    held_out = lpi.concepts_held_out_from(results)
    assert held_out.num_concepts == len(held_out.concepts) == len(results["concepts"])
    for name, score in held_out.concepts.items():
        assert lpi.record_fields(score) == results["concepts"][name]
    rows = lpi.concept_report_rows(results, output / "x.pkl")
    assert [row["concept"] for row in rows] == sorted(held_out.concepts)
    assert set(rows[0]) == set(lpi.CONCEPT_COLUMNS)


def demo_features(demo_data, layer: int, step: int = 10):
    source = lpi.Source(data_path=str(demo_data), task_range=(0, 10), episode_range=(0, 6), expert="text_only")
    dataset = lpi.read_dataset(source, [step], layer)
    return lpi.step_samples(dataset, [layer], step), dataset.descriptions


def test_probe_features_from_python_gives_the_clis_numbers(run_cli, demo_data, tiny_t5, tmp_path):
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--num_epochs", "20", "--bootstrap", "200")
    assert status == 0
    results = load(output / "results_text_only_layer5_step10.pkl")
    samples, descriptions = demo_features(demo_data, 5)
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    training = lpi.TrainingConfig(num_epochs=20, bootstrap=200)
    held_out = lpi.probe_features(
        samples.features[0], samples.episode, [descriptions[t] for t in samples.task_id], labels, training
    )
    assert isinstance(held_out, lpi.HeldOut)
    assert_same(lpi.metrics_record(held_out), results["metrics"])


def test_probe_features_finds_a_planted_signal_and_not_an_absent_one(tiny_t5, tmp_path):
    rng = np.random.default_rng(0)
    tasks, episodes, width = 6, 8, 24
    description = [lpi.DEMO_DESCRIPTIONS[t] for t in range(tasks) for _ in range(episodes)]
    episode = [e for _ in range(tasks) for e in range(episodes)]
    noise = rng.standard_normal((tasks * episodes, width)).astype(np.float32)
    direction = 3.0 * rng.standard_normal((tasks, width)).astype(np.float32)
    planted = noise + np.repeat(direction, episodes, axis=0)
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    training = lpi.TrainingConfig(num_epochs=30, bootstrap=0, control=False)
    found = lpi.probe_features(planted, episode, description, labels, training)
    assert found.retrieval.accuracy >= 0.9 and found.information.information_bits > 1.0
    absent = lpi.probe_features(noise, episode, description, labels, training)
    assert absent.retrieval.accuracy <= 0.5 and found.counts.num_tasks == absent.counts.num_tasks == tasks


def test_probe_features_names_what_does_not_fit():
    with pytest.raises(lpi.ProbeError, match="one episode and description per sample"):
        lpi.probe_features(np.zeros((4, 3)), [0, 1, 2], ["a"] * 4)
    with pytest.raises(lpi.ProbeError, match="non-finite"):
        lpi.probe_features(np.full((2, 3), np.nan), [0, 1], ["a", "b"])


def test_probe_features_gives_the_clis_numbers_under_split_task_and_for_concepts(run_cli, demo_data, tiny_t5, tmp_path):
    samples, descriptions = demo_features(demo_data, 5)
    description = [descriptions[t] for t in samples.task_id]
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    cases = [
        (["--split", "task", "--permutations", "3"], lpi.TrainingConfig(split="task", permutations=3), labels),
        (
            ["--target", "concepts"],
            lpi.TrainingConfig(split="task"),
            lpi.LabelConfig(**{**vars(labels), "target": "concepts"}),
        ),
    ]
    for options, training, case_labels in cases:
        common = ["--expert", "text_only", "--layer", "5", "--num_epochs", "20", "--bootstrap", "100"]
        status, output = run_cli(*common, *options, "--overwrite")
        assert status == 0
        training = lpi.dataclasses.replace(training, num_epochs=20, bootstrap=100)
        held_out = lpi.probe_features(samples.features[0], samples.episode, description, case_labels, training)
        if case_labels.target == "concepts":
            results = load(output / "results_text_only_layer5_step10_concepts.pkl")
            assert lpi.record_fields(held_out)["num_concepts"] == results["metrics"]["num_concepts"]
            assert {name: lpi.record_fields(one) for name, one in held_out.concepts.items()} == results["concepts"]
        else:
            results = load(output / "results_text_only_layer5_step10.pkl")
            assert_same(lpi.metrics_record(held_out), results["metrics"])


def test_tasks_that_share_a_description_are_held_out_together(tiny_t5, tmp_path):
    """Under --split task a fold holds out classes (descriptions), not task ids: a task held out while another with
    its instruction is trained on would not be an unseen instruction."""
    tasks, episodes = 10, 4
    task_id = np.repeat(np.arange(tasks), episodes)
    shared = {t: lpi.DEMO_DESCRIPTIONS[t // 2] for t in range(tasks)}  # tasks 0 and 1, 2 and 3, ... share one
    samples = lpi.Samples(
        np.random.default_rng(0).standard_normal((1, len(task_id), 8)).astype(np.float32),
        task_id,
        np.tile(np.arange(episodes), tasks),
        np.zeros(len(task_id), int),
        np.full(len(task_id), np.nan),
        np.zeros(len(task_id), int),
    )
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    for split in ("task", "episode"):
        design = lpi.design_for(samples, shared, labels, lpi.TrainingConfig(split=split, repeats=3))
        fold_of_task = [{int(f) for f in fold[task_id == t]} for fold in design.fold for t in range(tasks)]
        if split == "task":
            assert all(len(folds) == 1 for folds in fold_of_task)
            assert all(
                fold_of_task[r * tasks + t] == fold_of_task[r * tasks + t + 1]
                for r in range(3)
                for t in (0, 2, 4, 6, 8)
            )
            validation = design.copies.validation
            for t in (0, 2, 4, 6, 8):  # early stopping never validates on one of a pair while fitting the other
                both = [validation[:, task_id == t].any(axis=1), validation[:, task_id == t + 1].any(axis=1)]
                np.testing.assert_array_equal(both[0], both[1])
        else:
            assert all(len(folds) > 1 for folds in fold_of_task)  # every task's episodes on every side


def test_probe_features_keeps_task_ids_and_checks_its_configs(tiny_t5, tmp_path):
    rng = np.random.default_rng(1)
    task = np.repeat(np.arange(6), 4)
    description = [lpi.DEMO_DESCRIPTIONS[t % 3] for t in task]  # tasks 0 and 3 share a description, and so on
    features = rng.standard_normal((len(task), 8)) + 3 * rng.standard_normal((3, 8))[task % 3]
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    training = lpi.TrainingConfig(num_epochs=10, bootstrap=0, control=False)
    held_out = lpi.probe_features(features, np.tile(np.arange(4), 6), description, labels, training, task=task)
    assert (held_out.counts.num_tasks, held_out.counts.num_classes, held_out.counts.num_episodes) == (6, 3, 24)
    bad = [
        (lpi.TrainingConfig(cv_folds=1), labels, "--cv_folds 1"),
        (lpi.TrainingConfig(repeats=0), labels, "--repeats 0"),
        (lpi.TrainingConfig(probe="ridge"), lpi.LabelConfig(target="concepts"), "--target concepts"),
        (lpi.TrainingConfig(loss="hinge"), labels, "--loss 'hinge'"),
    ]
    for bad_training, bad_labels, message in bad:
        with pytest.raises(lpi.OptionError, match=message):
            lpi.probe_features(features, np.tile(np.arange(4), 6), description, bad_labels, bad_training, task=task)
    with pytest.raises(lpi.ProbeError, match="two descriptions"):
        lpi.probe_features(features, np.tile(np.arange(4), 6), description, labels, training, task=task % 2)
    with pytest.raises(lpi.ProbeError, match="one description"):
        lpi.probe_features(features, np.tile(np.arange(4), 6), ["same"] * len(task), labels, training)
    with pytest.raises(lpi.ProbeError, match="episode must be one integer"):
        lpi.probe_features(features, np.tile(np.arange(4), 6) + 0.5, description, labels, training)


def scores_with(correct: list[bool]) -> "lpi.Scores":
    """Scores that matter for a p-value: which samples were right (and zero-bit codes)."""
    correct = np.array(correct)
    blank = np.zeros(len(correct))
    return lpi.Scores(blank, blank, blank[:, None], blank, correct, blank, blank, blank, blank)


def null_with(rows: list[list[bool]]) -> "lpi.NullScores":
    """A permutation null: which samples each permuted assignment got right (and zero-bit codes)."""
    correct = np.array(rows)
    return lpi.NullScores(correct, np.zeros(correct.shape), np.zeros(correct.shape[1], int))


def test_the_permutation_p_value_is_one_plus_the_count_over_one_plus_n():
    observed = scores_with([True, True, False, False])  # accuracy 0.5
    lower = [[True, False, False, False]] * 4  # 0.25 each: none reaches the observed
    control = lpi.control_of(null_with(lower), observed, classes=4, failed_null=0)
    assert control.permutation_p_value == pytest.approx(1 / 5)  # never 0
    assert control.selectivity == pytest.approx(0.5 - 0.25)
    tie = null_with([[False, True, True, False]] + lower[:3])  # one null ties the observed: it counts
    assert lpi.control_of(tie, observed, classes=4, failed_null=0).permutation_p_value == pytest.approx(2 / 5)
    # Selectivity is against every permuted assignment's mean, not the first (here the one at 0.5) alone.
    assert lpi.control_of(tie, observed, classes=4, failed_null=0).selectivity == pytest.approx(0.5 - 0.3125)
    assert np.isnan(lpi.control_of(null_with(lower), observed, classes=4, failed_null=1).permutation_p_value)
    assert lpi.control_of(null_with(lower[:1]), observed, classes=4, failed_null=0).permutation_p_value is None


def test_family_wise_p_values_take_the_largest_null_over_the_family():
    alike = ((0, 1, 2), "task", b"same")
    nulls = [np.array([0.1, 0.5, 0.2, 0.3]), np.array([0.2, 0.1, 0.6, 0.1]), np.array([0.0, 0.2, 0.1, 0.4])]
    observed = [0.55, 0.3, 0.7]
    cells = [lpi.NullCell(("vlm", "hidden_states"), alike, o, n, True) for o, n in zip(observed, nulls)]
    per_cell = [(1 + (n >= o).sum()) / 5 for n, o in zip(nulls, observed)]
    rows = [{"permutation_p_value": p} for p in per_cell]
    lines = lpi.family_corrections(rows, cells)
    # Per permutation, the family's largest null: 0.2, 0.5, 0.6, 0.4
    assert [row["permutation_p_value_fwer"] for row in rows] == pytest.approx([2 / 5, 4 / 5, 1 / 5])
    assert all(row["permutation_p_value_fwer"] >= row["permutation_p_value"] for row in rows)
    assert all(row["permutation_q_value"] >= row["permutation_p_value"] for row in rows)
    assert rows[0]["correction_family"] == "vlm/hidden_states" and "3 cells x 4 permutations" in lines[0]
    other = [{"permutation_p_value": p} for p in per_cell]
    mixed = cells[:2] + [cells[2]._replace(alike=((0, 1, 3), "task", b"same"))]
    assert "differ in tasks" in lpi.family_corrections(other, mixed)[0] and "permutation_p_value_fwer" not in other[0]
    assert "one cell" in lpi.family_corrections(other[:1], cells[:1])[0]
    # cells of another probe (or labels, token positions) form their own family, never one pooled correction
    apart = [{"permutation_p_value": p} for p in per_cell]
    split = cells[:2] + [cells[2]._replace(family=("vlm", "hidden_states", "ridge"))]
    assert len(lpi.family_corrections(apart, split)) == 2 and "permutation_p_value_fwer" not in apart[2]


def test_a_sweep_report_corrects_over_its_cells_with_aligned_permutations(run_cli):
    options = ("--expert", "vlm", "--layer", "2-5", "--split", "task", "--probe", "ridge", "--permutations", "9")
    status, output = run_cli(*options, "--bootstrap", "0")
    assert status == 0
    results = [load(path) for path in sorted(output.glob("results_*.pkl"))]
    assignments = [r["config"]["permuted_assignments"] for r in results]
    assert all(np.array_equal(one, assignments[0]) for one in assignments)  # permutation k: one derangement everywhere
    assert lpi.main(["--report", str(output), "--quiet"]) == 0
    with open(output / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["correction_family"] for row in rows} == {"vlm/hidden_states/all tokens/task labels/ridge"}
    for row in rows:
        assert float(row["permutation_p_value"]) <= float(row["permutation_p_value_fwer"])
        assert float(row["permutation_p_value"]) <= float(row["permutation_q_value"]) <= 1


def test_unseen_tasks_are_retrieved_against_their_whole_embeddings(task_split_result):
    """Under --split task a held-out task is not in the training tasks' span: its candidate is its whole centered
    embedding, not the projection (whose cosine 1 / cos(embedding, span) inflates). Recomputed from the results file
    with numpy alone: the prediction in T5's axes against every task's centered embedding, per fold."""
    results, _ = task_split_result
    tasks, heldout, fold = results["tasks"], results["heldout"], results["samples"]["fold"]
    mean = tasks["label_mean"][fold]  # (samples, D) the training tasks' mean embedding of each sample's fold
    predicted = heldout["prediction"] - mean  # in T5's axes, as the raw cosine scores it
    targets = tasks["t5_embeddings"][None] - mean[:, None]  # (samples, C, D) every task, whole
    cosine = np.einsum("nd,ncd->nc", predicted, targets) / (
        np.linalg.norm(predicted, axis=1)[:, None] * np.linalg.norm(targets, axis=2)
    )
    own = heldout["true_class"]
    others = np.where(np.arange(cosine.shape[1]) == own[:, None], -np.inf, cosine)
    recomputed = cosine[np.arange(len(own)), own] > others.max(axis=1)
    assert results["metrics"]["repeats"]["accuracy"][0] == pytest.approx(recomputed.mean())
    np.testing.assert_array_equal(heldout["rank"] == 1, recomputed)


def test_selectivity_is_no_column_under_the_episode_split(run_cli):
    """Under --split episode the control measures how learnable an arbitrary assignment is: the summary says so, and
    sweep.csv leaves selectivity blank rather than carry it without the caveat."""
    status, output = run_cli("--expert", "text_only", "--layer", "5", "--num_epochs", "10", "--bootstrap", "50")
    assert status == 0
    path = output / "results_text_only_layer5_step10.pkl"
    results = load(path)
    assert results["metrics"]["selectivity"] is not None  # still in the results file and the summary
    row = lpi.report_row(results, path)
    assert row["selectivity"] == row["selectivity_ci_low"] == row["selectivity_ci_high"] == ""
    assert row["control_accuracy"] != ""


def test_the_softmax_code_counts_units_not_samples(tiny_t5, tmp_path):
    """The uniform share of the code is set by the validation units (episodes; tasks under --split task), not their
    samples: ten denoising entries of one episode are not ten independent checks. So a cell whose samples come ten to
    an episode codes like one with one sample per episode and the same held-out predictions."""
    rng = np.random.default_rng(2)
    logits, own = 3 * rng.standard_normal((12, 5)), rng.integers(0, 5, 12)
    once = lpi.fit_temperature(logits, own, 12)
    tenfold = lpi.fit_temperature(np.repeat(logits, 10, axis=0), np.repeat(own, 10), 12)
    assert once == tenfold
    np.testing.assert_allclose(
        lpi.log_loss_bits(logits, own, once, lpi.uniform_share(12)),
        lpi.log_loss_bits(logits, own, tenfold, lpi.uniform_share(12)),
    )
    tasks, episodes, entries = 6, 5, 10
    task_id = np.repeat(np.arange(tasks), episodes * entries)
    episode = np.tile(np.repeat(np.arange(episodes), entries), tasks)
    samples = lpi.Samples(
        np.zeros((1, len(task_id), 4), np.float32),
        task_id,
        episode,
        np.zeros(len(task_id), int),
        np.tile(np.linspace(1.0, 0.1, entries), tasks * episodes),
        np.tile(np.arange(entries), tasks * episodes),
    )
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    for split in ("episode", "task"):
        design = lpi.design_for(
            samples, dict(enumerate(lpi.DEMO_DESCRIPTIONS[:tasks])), labels, lpi.TrainingConfig(split=split)
        )
        for rows, units in zip(design.copies.validation, design.copies.validation_units):
            assert units == len(np.unique(design.unit[rows])) and rows.sum() >= entries * units


def test_the_printed_report_names_the_settings_that_tell_its_lines_apart():
    row = dict(
        expert="text_only",
        layer=2,
        rollout_step=10,
        inference_step="all",
        accuracy=0.5,
        accuracy_ci_low="",
        accuracy_ci_high="",
        information_bits=1.0,
        control_accuracy="",
        permutation_p_value="",
        cosine_similarity_label_space=0.5,
        chance_accuracy=0.1,
        num_samples=60,
        feature_type="hidden_states",
        token_positions="768-815",
        labels="task",
        probe="ridge",
        loss="cosine",
        split="episode",
    )
    lines = lpi.report_table([row, {**row, "probe": "linear"}, {**row, "labels": "prompt"}])
    assert lines[0].endswith("labels  probe") and lines[2].endswith("task  ridge") and lines[3].endswith("task  linear")
    assert lpi.report_table([row])[0].endswith("samples")  # nothing varies: nothing added
