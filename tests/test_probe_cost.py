"""Probe cost and memory: copies alone or side by side give the same probes; statistics are the training rows';
items go to the program in bounded calls; a sweep reads one rollout step at a time and warns once."""

import pickle
from pathlib import Path

import numpy as np

import linear_probing_inference as lpi


def planted_copies(seed: int = 0):
    """Three copies (two folds and a permuted assignment) over 6 classes of planted 12-dim features."""
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((6, 4)).astype(np.float32)
    sample_class = np.repeat(np.arange(6), 20)
    features = classes[sample_class] @ rng.standard_normal((4, 12)).astype(np.float32)
    features += 0.3 * rng.standard_normal(features.shape).astype(np.float32) + 5.0  # far from zero on purpose
    fold = np.arange(120) % 2
    train = np.stack([fold != 0, fold != 1, fold != 0]) & (np.arange(120) % 5 != 0)
    validation = np.stack([fold != 0, fold != 1, fold != 0]) & (np.arange(120) % 5 == 0)
    copies = lpi.Copies(
        repeat=np.zeros(3, int),
        assignment=np.array([0, 0, 1]),
        fold=np.array([0, 1, 0]),
        block=np.full(3, -1),
        classes=np.stack([classes, classes, classes[[1, 2, 3, 4, 5, 0]]]),
        known=np.ones((3, 6), bool),
        train=train,
        validation=validation,
        label_mean=np.zeros((3, 4)),
        label_basis=np.stack([np.eye(4)] * 3),
    )
    return features, sample_class, copies


def fit(features, sample_class, copies, in_sequence: bool) -> dict:
    centered = features - features.mean(0)
    fitted = lpi.fit_probes(
        centered[None, None],
        sample_class,
        copies.classes,
        copies.known,
        copies.train,
        copies.validation,
        np.int32(3),
        copies.identity(),
        loss="cosine",
        learning_rate=0.01,
        num_epochs=60,
        batch_size=16,
        patience=5,
        steps_per_epoch=25,
        standardize=True,
        copies_in_sequence=in_sequence,
    )
    return lpi.jax.tree_util.tree_map(lambda value: np.asarray(value)[0, 0], fitted)  # the one device's one item


def test_copies_one_after_another_train_the_same_probes_as_side_by_side():
    features, sample_class, copies = planted_copies()
    alone, together = fit(features, sample_class, copies, True), fit(features, sample_class, copies, False)
    assert len(set(alone.history["epochs_run"].tolist())) > 1  # the copies stop at different epochs: the case at issue
    np.testing.assert_array_equal(alone.history["epochs_run"], together.history["epochs_run"])
    np.testing.assert_array_equal(alone.history["best_epoch"], together.history["best_epoch"])
    np.testing.assert_allclose(alone.kernel, together.kernel, rtol=1e-4, atol=1e-5)


def test_standardization_uses_each_copys_training_rows_only():
    features, sample_class, copies = planted_copies()
    fitted = fit(features, sample_class, copies, True)
    centered = features - features.mean(0)
    for copy in range(3):
        rows = centered[copies.train[copy]]
        np.testing.assert_allclose(fitted.feature_mean[copy], rows.mean(0), atol=1e-5)
        np.testing.assert_allclose(fitted.feature_std[copy], rows.std(0), rtol=1e-4)


def test_items_in_several_calls_equal_items_in_one(monkeypatch):
    features, sample_class, copies = planted_copies()
    items = np.stack([features, features[:, ::-1].copy(), 2 * features])
    config = lpi.TrainingConfig(num_epochs=30, patience=5)
    one_call = lpi.train_linear_probes(items, sample_class, copies, config)
    calls = []
    program = lpi.fit_probes

    def counted(block, *args, **kwargs):
        calls.append(block.shape[1])
        return program(block, *args, **kwargs)

    monkeypatch.setattr(lpi, "fit_probes", counted)
    monkeypatch.setattr(lpi, "PROGRAM_BLOCK_BYTES", items[0].nbytes * 2)  # two items per call: 2 + 2 (padded)
    several = lpi.train_linear_probes(items, sample_class, copies, config)
    assert calls == [2, 2]
    for key in ("kernel", "bias", "feature_mean", "feature_std", "failed"):
        np.testing.assert_array_equal(getattr(several, key), getattr(one_call, key), err_msg=key)
    for key in ("epochs_run", "best_epoch", "validation_loss"):
        np.testing.assert_array_equal(several.history[key], one_call.history[key], err_msg=key)


def test_a_sweep_walks_each_file_once_reads_one_step_at_a_time_and_equals_single_runs(
    run_cli, demo_data, tmp_path, monkeypatch
):
    read, parsed = [], []
    step_samples, read_task_file = lpi.step_samples, lpi.read_task_file

    def recorded_step(dataset, layers, step):
        read.append(step)
        return step_samples(dataset, layers, step)

    def recorded_parse(path, trust, index_dir):
        parsed.append(path.name)
        return read_task_file(path, trust, index_dir)

    monkeypatch.setattr(lpi, "step_samples", recorded_step)
    monkeypatch.setattr(lpi, "read_task_file", recorded_parse)
    unwritable = tmp_path / "cache_is_a_file"  # no index cache: a second walk would parse a file again
    unwritable.write_text("")
    status, sweep = run_cli(
        "--expert",
        "vlm",
        "--layer",
        "4,5",
        "--rollout_step",
        "all",
        "--cache_dir",
        str(unwritable),
        output_dir=tmp_path / "sweep",
    )
    assert status == 0 and read == [10, 20]
    assert sorted(parsed) == sorted(path.name for path in demo_data.glob("task_*.pkl"))  # each file once
    status, single = run_cli(
        "--expert",
        "vlm",
        "--layer",
        "5",
        "--rollout_step",
        "20",
        "--cache_dir",
        str(unwritable),
        output_dir=tmp_path / "single",
    )
    assert status == 0
    stem = "results_vlm_layer5_step20.pkl"
    first, second = (pickle.loads((directory / stem).read_bytes()) for directory in (sweep, single))
    for results in (first, second):
        results.pop("wall_time_seconds"), results.pop("command")
    assert pickle.dumps(first) == pickle.dumps(second)


def test_a_missing_step_stops_a_sweep_before_anything_is_written(run_cli, tmp_path, capsys):
    status, output = run_cli("--expert", "vlm", "--layer", "5", "--rollout_step", "10,30", output_dir=tmp_path / "out")
    assert status == 1
    assert "no episode in the ranges has step_30" in capsys.readouterr().err
    assert not output.exists() or not list(output.iterdir())


def test_a_sweep_over_several_steps_gives_each_warning_once(run_cli, demo_data, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in demo_data.glob("task_*.pkl"):
        if not path.name.startswith("task_9_"):
            (partial / path.name).symlink_to(path)
    status, _ = run_cli("--expert", "vlm", "--layer", "5", "--rollout_step", "10,20", data_path=partial)
    assert status == 0  # one walk of the files for both steps
    assert capsys.readouterr().err.count("task 9: no file") == 1


def test_a_feature_constant_on_a_copys_training_rows_counts_as_constant_even_far_from_the_overall_mean():
    features, sample_class, copies = planted_copies()
    features = features.copy()
    train = copies.train[0]
    features[train, 0] = 1000.0  # constant where copy 0 trains, far from where the other samples sit
    features[~train, 0] = -1000.0 + 5.0 * np.random.default_rng(1).standard_normal((~train).sum())
    fitted = fit(features, sample_class, copies, True)
    assert fitted.feature_std[0][0] == 1.0  # the floor's stand-in: no division by rounding noise
    assert 3 < fitted.feature_std[1][0] < 7  # copy 1 trains where the feature varies: its real spread


def test_a_late_step_that_cannot_make_folds_stops_a_sweep_before_any_file(run_cli, tmp_path, capsys):
    # The demo's task 1 lacks step 20 in its last episode (5): episodes 4-5 give it one episode at step 20.
    output = tmp_path / "out"
    status, _ = run_cli(
        "--expert", "vlm", "--layer", "5", "--rollout_step", "10,20", "--episode_range", "4", "6", output_dir=output
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "step_20: task 1 has 1 episode(s)" in error and "checked before anything was trained" in error
    assert not output.exists() or not list(output.iterdir())


def demo_with_one_task_changed(demo_data, directory, task: int, change) -> Path:
    """The demo's task files in `directory` (links), but task `task`'s, which is written with change(content) applied;
    returns that file's path."""
    directory.mkdir()
    for path in demo_data.glob("task_*.pkl"):
        if not path.name.startswith(f"task_{task}_"):
            (directory / path.name).symlink_to(path)
            continue
        changed = directory / path.name
        content = pickle.loads(path.read_bytes())
        change(content)
        changed.write_bytes(pickle.dumps(content, protocol=4))
    return changed


def results_without_run_details(path) -> dict:
    results = pickle.loads(path.read_bytes())
    results.pop("wall_time_seconds"), results.pop("command")
    return results


def test_a_malformed_step_skips_its_file_for_that_step_only_as_a_single_run_would(run_cli, demo_data, tmp_path, capsys):
    def break_step_20(content):
        content["episodes"]["episode_0"]["rollout_steps"]["step_20"] = ["not", "a", "step"]

    data = tmp_path / "data"
    bad = demo_with_one_task_changed(demo_data, data, 3, break_step_20)
    options = ("--expert", "vlm", "--layer", "5", "--probe", "ridge", "--no_control")
    status, sweep = run_cli(*options, "--rollout_step", "10,20", data_path=data, output_dir=tmp_path / "sweep")
    assert status == 0 and "skipping" in capsys.readouterr().err
    status, single = run_cli(*options, data_path=data, output_dir=tmp_path / "single")
    assert status == 0
    alone = results_without_run_details(single / "results_vlm_layer5_step10.pkl")
    step10 = results_without_run_details(sweep / "results_vlm_layer5_step10.pkl")
    step20 = results_without_run_details(sweep / "results_vlm_layer5_step20.pkl")
    assert pickle.dumps(step10) == pickle.dumps(alone)
    status, single20 = run_cli(*options, "--rollout_step", "20", data_path=data, output_dir=tmp_path / "single20")
    assert status == 0
    assert pickle.dumps(step20) == pickle.dumps(results_without_run_details(single20 / "results_vlm_layer5_step20.pkl"))
    assert 3 in step10["tasks"]["task_ids"] and not step10["data_report"]["skipped_files"]
    assert 3 not in step20["tasks"]["task_ids"]
    assert list(step20["data_report"]["skipped_files"]) == [str(bad)]
    assert "episode_0/step_20 is a list" in step20["data_report"]["skipped_files"][str(bad)]
    capsys.readouterr()
    status, ranged = run_cli(*options, "--rollout_step", "5-15", data_path=data, output_dir=tmp_path / "ranged")
    assert status == 0 and "step_20" not in capsys.readouterr().err  # a step outside the range is not looked at
    assert pickle.dumps(results_without_run_details(ranged / "results_vlm_layer5_step10.pkl")) == pickle.dumps(alone)


def test_a_probe_that_never_improves_is_marked_failed_inside_the_program():
    features, sample_class, copies = planted_copies()
    features = features.copy()
    features[:, 0] = np.nan  # every loss is NaN: no epoch improves on the first
    fitted = lpi.train_linear_probes(features[None], sample_class, copies, lpi.TrainingConfig(num_epochs=5))
    assert fitted.failed.all() and (fitted.history["best_epoch"] == 0).all()


def test_each_denoising_step_is_counted_per_rollout_step_as_single_runs_count_it(run_cli, demo_data, tmp_path, capsys):
    def drop_last_entry_at_step_20(content):  # step_20 of task 0 lacks its last denoising entry (t 0.1)
        for episode in content["episodes"].values():
            step = episode["rollout_steps"].get("step_20", {})
            step.pop(min((key for key in step if key.startswith("action_expert")), key=lpi.denoising_time), None)

    data = tmp_path / "data"
    demo_with_one_task_changed(demo_data, data, 0, drop_last_entry_at_step_20)
    options = ("--expert", "action", "--layer", "2", "--inference_step", "each", "--probe", "ridge", "--no_control")
    status, sweep = run_cli(*options, "--rollout_step", "10,20", data_path=data, output_dir=tmp_path / "sweep")
    warnings = capsys.readouterr().err
    assert status == 0 and "step_20: the episodes' denoising entries differ" in warnings and "step_10:" not in warnings
    status, single = run_cli(*options, data_path=data, output_dir=tmp_path / "single")
    assert status == 0
    written = sorted(path.name for path in sweep.glob("results_*.pkl"))
    assert len([name for name in written if "_step10_" in name]) == 10  # step 10 keeps all its entries
    assert len([name for name in written if "_step20_" in name]) == 9
    assert {name for name in written if "_step10_" in name} == {path.name for path in single.glob("results_*.pkl")}
