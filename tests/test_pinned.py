"""Reviewer-grade pins: each test fails for a program that is wrong in the way its docstring names.

Nothing here takes a layout from the program: token positions, denoising order and labels are
written in the test (literal numbers) or computed independently (pickle.load, a T5 run by hand).
The task files of `pinned_data` make every pooled feature name what was pooled:

    hidden[layer, 0, token, 0] = 1000 * layer + token      (the same in every sample)
    hidden[layer, 0, token, 1] = -(1000 * layer + token)   (max and last differ from mean)
    hidden[layer, 0, token, 2] = rollout step N
    hidden[layer, 0, token, 3] = 100 * denoising time (action expert), 0 (VLM)
    hidden[..., 4:8]           = task signal (text tokens 768-815 and action tokens only) + noise

A channel that is the same in every sample has that value as its training mean whatever the
folds, so `probe["feature_mean"]` of every fold reads back exactly which layer, tokens, step and
denoising entries were pooled.
"""

import logging
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

import linear_probing_inference as lpi

TASKS = 4
EPISODES = 4
LAYERS = 3
WIDTH = 8
STEPS = (10, 20, 30)
TIMES = [0.3, 1.0, 0.1, 0.5, 0.9, 0.2, 0.7, 0.4, 0.8, 0.6]  # written out of denoising order
# Task id -> description, deliberately not in the demo's order (a label-order bug shows).
DESCRIPTIONS = {
    0: "pick up the milk and place it in the basket",
    1: "pick up the salad dressing and place it in the basket",
    2: "pick up the orange juice and place it in the basket",
    3: "pick up the alphabet soup and place it in the basket",
}


def position_entry(rng, tokens: int, step: int, time: float, signature: np.ndarray, signal_tokens: slice) -> dict:
    """(layer, 1, token, WIDTH) hidden states encoding layer, token, step and time; signal on `signal_tokens`."""
    position = 1000.0 * np.arange(LAYERS)[:, None] + np.arange(tokens)[None, :]
    hidden = np.zeros((LAYERS, 1, tokens, WIDTH), np.float32)
    hidden[:, 0, :, 0] = position
    hidden[:, 0, :, 1] = -position
    hidden[:, 0, :, 2] = step
    hidden[:, 0, :, 3] = 100.0 * time
    noise = rng.standard_normal((LAYERS, 1, tokens, 4)) + rng.standard_normal((LAYERS, 1, 1, 4))
    hidden[..., 4:] = noise
    hidden[:, 0, signal_tokens, 4:] += 3.0 * signature
    return {"hidden_states": hidden}


@pytest.fixture(scope="session")
def pinned_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pinned")
    rng = np.random.default_rng(11)
    for task, description in DESCRIPTIONS.items():
        signature = rng.standard_normal(4)
        episodes = {}
        for episode in range(EPISODES):
            steps = {}
            for step in STEPS:
                entry = {
                    "timestep": step,
                    "vlm_layer_output": position_entry(rng, 816, step, 0.0, signature, slice(768, 816)),
                }
                for time in TIMES:
                    entry[f"action_expert_state_time{time:.1f}"] = position_entry(
                        rng, 51, step, time, signature, slice(0, 51)
                    )
                steps[f"step_{step}"] = entry
            episodes[f"episode_{episode}"] = {"rollout_steps": steps}
        with open(directory / f"task_{task}_{description.replace(' ', '_')}.pkl", "wb") as file:
            pickle.dump({"task_description": description, "task_id": task, "episodes": episodes}, file)
    return directory


def run_pinned(data: Path, t5: Path, output: Path, *options: str, cache: Path | None = None) -> int:
    return lpi.main(
        [
            "--data_path",
            str(data),
            "--t5_model",
            str(t5),
            "--cache_dir",
            str(cache or data.parent / "pinned_cache"),
            "--output_dir",
            str(output),
            "--task_range",
            "0",
            str(TASKS),
            "--episode_range",
            "0",
            str(EPISODES),
            "--rollout_step",
            "10",
            "--bootstrap",
            "0",
            "--no_control",
            "--num_epochs",
            "2",
            "--quiet",
            *options,
        ]
    )


def load(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file)


def constant_channels(results: dict) -> np.ndarray:
    """Channels 0-3 of every fold's training mean: (folds, 4)."""
    return results["probe"]["feature_mean"][:, :4]


# --- Token positions, pooling, layers, steps, denoising entries: literal numbers -------------------


@pytest.mark.parametrize(
    "expert, options, first, last, pooling",
    [
        ("vlm", [], 0, 815, "mean"),  # the 816-token prefix
        ("image", [], 0, 767, "mean"),  # 3 cameras x 256 SigLIP patches
        ("text_only", [], 768, 815, "mean"),  # 48 prompt tokens
        ("action", [], 0, 50, "mean"),  # the action expert's 51 tokens: state + 50 actions
        ("vlm", ["--token_range", "100", "200"], 100, 199, "mean"),
        ("text_only", [], 768, 815, "max"),
        ("action", [], 0, 50, "max"),
        ("image", [], 0, 767, "last"),
        ("text_only", [], 768, 815, "last"),
    ],
)
def test_pooled_tokens_are_the_literal_pi0_positions(
    pinned_data, tiny_t5, tmp_path, expert, options, first, last, pooling
):
    """Wrong token table, wrong layer axis, `--pooling` ignored or pooling over the wrong axis: all fail."""
    output = tmp_path / "out"
    assert (
        run_pinned(pinned_data, tiny_t5, output, "--expert", expert, "--layer", "2", "--pooling", pooling, *options)
        == 0
    )
    results = load(output / f"results_{expert}_layer2_step10.pkl")
    expected = {"mean": ((first + last) / 2, -(first + last) / 2), "max": (last, -first), "last": (last, -last)}[
        pooling
    ]
    time = 55.0 if expert == "action" else 0.0  # every denoising entry, 1.0 ... 0.1, one sample each
    channels = constant_channels(results)
    np.testing.assert_allclose(
        channels, np.tile([2000 + expected[0], -2000 + expected[1], 10.0, time], (len(channels), 1)), rtol=1e-6
    )
    assert results["metrics"]["num_samples"] == TASKS * EPISODES * (10 if expert == "action" else 1)


@pytest.mark.parametrize("chosen, times", [("0,9", (1.0, 0.1)), ("1-2", (0.9, 0.8))])
def test_inference_steps_are_chosen_in_denoising_order_0_is_t1_and_9_is_t01(
    pinned_data, tiny_t5, tmp_path, chosen, times
):
    """--inference_step K: the K-th entry in time-descending order, not in the order the keys were written
    (nor ascending: "1-2" must be t 0.9 and 0.8)."""
    output = tmp_path / "out"
    assert (
        run_pinned(pinned_data, tiny_t5, output, "--expert", "action", "--layer", "1", "--inference_step", chosen) == 0
    )
    paths = sorted(output.glob("results_action_layer1_step10_t*.pkl"))
    assert len(paths) == 2
    by_time = {}
    for path in paths:
        results = load(path)
        recorded = set(results["samples"]["inference_time"].tolist())
        assert len(recorded) == 1 and results["metrics"]["num_samples"] == TASKS * EPISODES
        (time,) = recorded
        assert float(path.stem.split("_t")[-1]) == pytest.approx(time)  # the file is named by its time
        by_time[round(time, 1)] = constant_channels(results)[0]
    assert sorted(by_time) == sorted(times)
    for time in times:  # channel 3 is 100 x the time written in the entry's key
        np.testing.assert_allclose(by_time[time], [1025.0, -1025.0, 10.0, 100.0 * time], rtol=1e-6)


def test_rollout_step_range_takes_the_steps_that_exist(pinned_data, tiny_t5, tmp_path):
    output = tmp_path / "out"
    assert (
        run_pinned(pinned_data, tiny_t5, output, "--expert", "text_only", "--layer", "1", "--rollout_step", "10-30")
        == 0
    )
    for step in (10, 20, 30):
        np.testing.assert_allclose(
            constant_channels(load(output / f"results_text_only_layer1_step{step}.pkl"))[:, 2], step
        )
    assert len(list(output.glob("results_*.pkl"))) == 3


def test_shards_in_separate_directories_are_disjoint_and_complete(pinned_data, tiny_t5, tmp_path):
    """Ignoring --shard writes every file in every directory; a shard taking one item leaves some out;
    a shard writing one combination's numbers under another's name fails the channel check."""
    sweep = ("--expert", "text_only", "--layer", "0-2", "--rollout_step", "10,20")
    written = {}
    for index in range(4):
        output = tmp_path / f"shard{index}"
        assert run_pinned(pinned_data, tiny_t5, output, *sweep, "--shard", f"{index}/4", cache=tmp_path / "cache") == 0
        written[index] = {p.name for p in output.iterdir()} if output.exists() else set()
    everything = {
        f"{kind}_text_only_layer{layer}_step{step}.{ext}"
        for layer in range(3)
        for step in (10, 20)
        for kind, ext in (("results", "pkl"), ("summary", "txt"))
    }
    assert set().union(*written.values()) == everything
    assert sum(len(names) for names in written.values()) == len(everything)  # disjoint
    assert sorted(len(names) for names in written.values()) == [2, 2, 4, 4]  # 6 combinations dealt round 4 shards
    for index, names in written.items():
        for name in names:
            if name.endswith(".pkl"):
                layer, step = (int(part) for part in name[len("results_text_only_layer") : -len(".pkl")].split("_step"))
                channels = constant_channels(load(tmp_path / f"shard{index}" / name))
                np.testing.assert_allclose(
                    channels[:, :3], np.tile([1000 * layer + 791.5, -1000 * layer - 791.5, step], (len(channels), 1))
                )


def demo_text_features(demo_data: Path, layer: int, pool) -> dict:
    """(task, episode) -> pooled text tokens of step_10, read with pickle.load (not the program's reader)."""
    features = {}
    for task in range(4):
        with open(next(demo_data.glob(f"task_{task}_*.pkl")), "rb") as file:
            episodes = pickle.load(file)["episodes"]
        for episode in range(6):
            hidden = episodes[f"episode_{episode}"]["rollout_steps"]["step_10"]["vlm_layer_output"]["hidden_states"]
            features[(task, episode)] = pool(np.asarray(hidden[layer, 0, 768:816], dtype=np.float64))
    return features


@pytest.mark.parametrize("pooling, pool", [("max", lambda tokens: tokens.max(0)), ("last", lambda tokens: tokens[-1])])
def test_max_and_last_pooling_recomputed_from_the_raw_arrays(run_cli, demo_data, pooling, pool):
    """The training mean of every fold equals the mean of features recomputed from the raw arrays with
    this pooling (over the training side, with or without its validation episodes), and not with mean."""
    status, output = run_cli(
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--pooling",
        pooling,
        "--task_range",
        "0",
        "4",
        "--no_control",
        "--bootstrap",
        "0",
        "--num_epochs",
        "2",
    )
    assert status == 0
    results = load(output / "results_text_only_layer5_step10.pkl")
    samples = results["samples"]
    ids = list(zip(samples["task_id"].tolist(), samples["episode"].tolist()))
    assert sorted(ids) == [(t, e) for t in range(4) for e in range(6)]
    wanted = np.stack([demo_text_features(demo_data, 5, pool)[key] for key in ids])
    averaged = np.stack([demo_text_features(demo_data, 5, lambda tokens: tokens.mean(0))[key] for key in ids])
    for fold, mean in enumerate(results["probe"]["feature_mean"]):
        training = samples["fold"] != fold
        candidates = [training & ~samples["validation"][fold], training]
        assert any(np.allclose(mean, wanted[rows].mean(0), rtol=1e-5, atol=1e-5) for rows in candidates), fold
        assert not any(np.allclose(mean, averaged[rows].mean(0), rtol=1e-3, atol=1e-3) for rows in candidates)


# --- Labels: an independent T5 encoding, in each task's own order ----------------------------------


@pytest.fixture(scope="session")
def hand_labels(tiny_t5) -> dict:
    """Description -> T5 encoder last hidden state averaged over its tokens, each description encoded alone
    (so no padding), with torch and transformers directly."""
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_t5), T5EncoderModel.from_pretrained(tiny_t5).eval()
    labels = {}
    with torch.no_grad():
        for description in DESCRIPTIONS.values():
            tokens = tokenizer(description, return_tensors="pt")
            assert int(tokens["attention_mask"].sum()) == tokens["input_ids"].shape[1]  # nothing padded
            labels[description] = model(**tokens).last_hidden_state[0].mean(0).numpy().astype(np.float64)
    return labels


def test_labels_equal_an_independent_t5_encoding_of_each_tasks_own_description(
    pinned_data, tiny_t5, tmp_path, hand_labels
):
    """Labels in another order than the task ids, padding averaged in, or the wrong pooling all fail."""
    output = tmp_path / "out"
    assert run_pinned(pinned_data, tiny_t5, output, "--expert", "text_only", "--layer", "1") == 0
    tasks = load(output / "results_text_only_layer1_step10.pkl")["tasks"]
    assert list(tasks["task_ids"]) == [0, 1, 2, 3]
    for position, task in enumerate(tasks["task_ids"]):
        assert tasks["descriptions"][position] == DESCRIPTIONS[task]
        np.testing.assert_allclose(
            tasks["t5_embeddings"][tasks["class_of_task"][position]],
            hand_labels[DESCRIPTIONS[task]],
            rtol=1e-4,
            atol=1e-5,
        )


def pinned_text_features(data: Path, layer: int) -> dict:
    """(task, episode) -> mean of text tokens 768-815 of step_10, read with pickle.load."""
    features = {}
    for task in range(TASKS):
        with open(next(data.glob(f"task_{task}_*.pkl")), "rb") as file:
            episodes = pickle.load(file)["episodes"]
        for episode in range(EPISODES):
            hidden = episodes[f"episode_{episode}"]["rollout_steps"]["step_10"]["vlm_layer_output"]["hidden_states"]
            features[(task, episode)] = np.asarray(hidden[layer, 0, 768:816], dtype=np.float64).mean(0)
    return features


def unit(values: np.ndarray) -> np.ndarray:
    return values / np.linalg.norm(values, axis=-1, keepdims=True)


def loss_values(prediction: np.ndarray, target: np.ndarray, classes: np.ndarray, own: np.ndarray) -> dict:
    """Mean validation loss of each kind, from the README's definitions (InfoNCE temperature 0.1)."""
    logits = unit(prediction) @ unit(classes).T / 0.1
    log_softmax = logits - logits.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    return {
        "cosine": float(np.mean(1 - np.sum(unit(prediction) * unit(target), axis=1))),
        "mse": float(np.mean((prediction - target) ** 2)),
        "contrastive": float(np.mean(-log_softmax[np.arange(len(own)), own])),
    }


def test_each_loss_is_the_one_trained_toward_each_tasks_own_t5_label(pinned_data, tiny_t5, tmp_path, hand_labels):
    """The recorded validation loss of every fold's kept probe equals, recomputed from raw features and
    hand-made labels, the chosen loss and neither other one. Fails if --loss is ignored (mse or
    contrastive trained as cosine), if a sample is trained toward another task's label, or if the
    validation mask is not what the results say."""
    features = pinned_text_features(pinned_data, 1)
    classes = np.stack([hand_labels[DESCRIPTIONS[t]] for t in range(TASKS)])
    accuracy = {}
    for loss in ("cosine", "mse", "contrastive"):
        output = tmp_path / loss
        assert (
            run_pinned(
                pinned_data,
                tiny_t5,
                output,
                "--expert",
                "text_only",
                "--layer",
                "1",
                "--loss",
                loss,
                "--no_center_labels",
                "--label_space",
                "full",  # the losses are recomputed in T5's own axes
                "--num_epochs",
                "30",
                "--patience",
                "5",
                "--learning_rate",
                "0.01",
            )
            == 0
        )
        results = load(output / "results_text_only_layer1_step10.pkl")
        assert results["config"]["training"]["loss"] == loss
        samples, probe, history = results["samples"], results["probe"], results["history"]
        matched = {name: 0 for name in ("cosine", "mse", "contrastive")}
        for fold in range(len(probe["kernel"])):
            rows = np.flatnonzero(samples["validation"][fold])
            assert len(rows) > 0
            task = samples["task_id"][rows]
            x = np.stack([features[(t, e)] for t, e in zip(task, samples["episode"][rows])])
            prediction = (x - probe["feature_mean"][fold]) / probe["feature_std"][fold] @ probe["kernel"][fold] + probe[
                "bias"
            ][fold]
            recorded = history["validation_loss"][fold][history["best_epoch"][fold] - 1]
            for name, value in loss_values(prediction, classes[task], classes, task).items():
                matched[name] += bool(np.isclose(recorded, value, rtol=2e-3, atol=1e-5))
        assert matched[loss] == len(probe["kernel"]), (loss, matched)
        assert all(count == 0 for name, count in matched.items() if name != loss), (loss, matched)
        accuracy[loss] = results["metrics"]["accuracy"]
    # Compared: all three losses learn the strongly planted text signal (chance 0.25).
    assert min(accuracy.values()) >= 0.75, accuracy


# --- Early stopping: a real validation set, and it stops -------------------------------------------


def test_validation_masks_are_real_and_early_stopping_stops(run_cli):
    """An all-False mask (early stopping silently off), a mask on the test fold, or a loop that ignores
    patience all fail."""
    status, output = run_cli(
        "--expert",
        "text_only",
        "--layer",
        "5",
        "--no_control",
        "--bootstrap",
        "0",
        "--num_epochs",
        "300",
        "--patience",
        "3",
        "--learning_rate",
        "0.01",
    )
    assert status == 0
    results = load(output / "results_text_only_layer5_step10.pkl")
    samples, history = results["samples"], results["history"]
    folds = results["metrics"]["num_folds"]
    assert samples["validation"].shape == (folds, 60)
    for fold in range(folds):
        validation, training = samples["validation"][fold], samples["fold"] != fold
        assert validation.any() and not (validation & ~training).any()
        episodes = set(zip(samples["task_id"][validation], samples["episode"][validation]))
        assert 0.1 <= len(episodes) / len(set(zip(samples["task_id"][training], samples["episode"][training]))) <= 0.35
        epochs, best = int(history["epochs_run"][fold]), int(history["best_epoch"][fold])
        assert epochs < 300
        assert epochs == best + 3  # stopped after `patience` epochs without improvement
        curve = history["validation_loss"][fold]
        assert np.isfinite(curve[:epochs]).all() and np.isnan(curve[epochs:]).all()
        assert best == int(np.argmin(curve[:epochs])) + 1


# --- The file index: the second run parses nothing -------------------------------------------------


def refuse_to_parse(*_):
    raise RuntimeError("the task file was parsed again instead of read through its index")


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_a_second_read_uses_the_index_and_never_parses_the_file(tmp_path, monkeypatch, protocol):
    big = np.arange(3 * 816 * 8, dtype=np.float32).reshape(3, 1, 816, 8)  # > 64 KiB: outside protocol-4 frames, mapped
    content = {
        "task_description": "x",
        "episodes": {"episode_0": {"rollout_steps": {"step_10": {"vlm_layer_output": {"hidden_states": big}}}}},
    }
    path, index = tmp_path / "task_0_x.pkl", tmp_path / "index"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    lpi.read_task_file(path, index_dir=str(index))
    monkeypatch.setattr(lpi.MappingUnpickler, "load", refuse_to_parse)
    again = lpi.read_task_file(path, index_dir=str(index))
    hidden = again["episodes"]["episode_0"]["rollout_steps"]["step_10"]["vlm_layer_output"]["hidden_states"]
    np.testing.assert_array_equal(hidden, big)
    assert type(hidden.base).__name__ == "mmap"
    with pytest.raises(RuntimeError, match="parsed again"):  # the patch bites where there is no index
        lpi.read_task_file(path, index_dir=str(tmp_path / "other_index"))


def test_a_second_cli_run_reads_every_task_file_through_its_index(pinned_data, tiny_t5, tmp_path, monkeypatch):
    options = ("--expert", "text_only", "--layer", "1")
    assert run_pinned(pinned_data, tiny_t5, tmp_path / "first", *options, cache=tmp_path / "cache") == 0
    assert len(list((tmp_path / "cache" / "file_index").iterdir())) == TASKS
    monkeypatch.setattr(lpi.MappingUnpickler, "load", refuse_to_parse)
    assert run_pinned(pinned_data, tiny_t5, tmp_path / "second", *options, cache=tmp_path / "cache") == 0
    first, second = (load(tmp_path / name / "results_text_only_layer1_step10.pkl") for name in ("first", "second"))
    for results in (first, second):
        results.pop("wall_time_seconds")
        results.pop("command")
    assert pickle.dumps(first) == pickle.dumps(second)


# --- Old pickles: protocols 0-1 and numpy 1.x global names -----------------------------------------


def old_pickle_content() -> dict:
    rng = np.random.default_rng(3)
    big = rng.standard_normal((2, 1, 50, 16)).astype(np.float32)  # 6400 bytes: mapped from protocol 3 up
    return {
        "task_description": "pick up the milk",
        "episodes": {
            "episode_0": {
                "rollout_steps": {
                    "step_10": {
                        "vlm_layer_output": {
                            "hidden_states": big,
                            "fortran": np.asfortranarray(big[:, 0]),
                            "small": big[0, 0, :2, :3].copy(),
                        },
                        "scalar": np.float32(1.5),
                    }
                }
            }
        },
    }


def assert_same_content(expected: dict, actual: dict) -> None:
    expected_step = expected["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    actual_step = actual["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    assert actual["task_description"] == expected["task_description"]
    for key, value in expected_step["vlm_layer_output"].items():
        got = actual_step["vlm_layer_output"][key]
        assert (
            got.dtype == value.dtype and got.shape == value.shape and got.flags.f_contiguous == value.flags.f_contiguous
        )
        np.testing.assert_array_equal(got, value)
    assert type(actual_step["scalar"]) is np.float32 and actual_step["scalar"] == expected_step["scalar"]


def as_numpy1(data: bytes) -> bytes:
    """The same pickle as numpy 1.x wrote it: its globals in numpy.core, not numpy._core (frames dropped,
    which every protocol allows)."""
    operations = list(pickletools.genops(data))
    ends = [position for _, _, position in operations[1:]] + [len(data)]
    rewritten = bytearray()
    for (operation, argument, start), end in zip(operations, ends):
        raw = data[start:end]
        if operation.name == "FRAME":
            continue
        if operation.name == "GLOBAL":
            raw = raw.replace(b"numpy._core.", b"numpy.core.")
        elif operation.name == "SHORT_BINUNICODE" and argument.startswith("numpy._core."):
            name = argument.replace("numpy._core.", "numpy.core.").encode()
            raw = pickle.SHORT_BINUNICODE + bytes([len(name)]) + name
        rewritten += raw
    return bytes(rewritten)


@pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_numpy_1x_global_names_are_read_in_every_protocol(tmp_path, protocol):
    """A reader that allows only numpy 2.x names (numpy._core.*) refuses every file numpy 1.x wrote."""
    content = old_pickle_content()
    data = as_numpy1(pickle.dumps(content, protocol=protocol))
    assert b"numpy._core" not in data and b"numpy.core.multiarray" in data
    assert (b"numpy.core.numeric" in data) == (protocol == 5)  # protocol 5 rebuilds arrays with _frombuffer
    path = tmp_path / "task_0_old.pkl"
    path.write_bytes(data)
    assert_same_content(pickle.loads(data), lpi.read_task_file(path))
    assert_same_content(content, lpi.read_task_file(path, index_dir=str(tmp_path / "index")))
    assert_same_content(content, lpi.read_task_file(path, index_dir=str(tmp_path / "index")))


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_protocols_0_to_2_are_read_whole_with_one_warning_and_held_only_while_their_step_is_pooled(
    tmp_path, caplog, protocol
):
    path = tmp_path / "task_0_old.pkl"
    path.write_bytes(pickle.dumps(old_pickle_content(), protocol=protocol))
    assert_same_content(old_pickle_content(), lpi.read_task_file(path))
    assert not lpi.mappable(path)
    source = lpi.Source(str(tmp_path), (0, 1), (0, 1), expert="vlm", token_range=(0, 50))
    with caplog.at_level(logging.WARNING, logger="linear_probing"):
        dataset = lpi.read_dataset(source, [10], 1)
        first, again = (lpi.step_samples(dataset, [0, 1], 10) for _ in range(2))  # the file is read for each
    assert caplog.text.count("cannot be mapped") == 1 and str(path) in caplog.text
    assert dataset.files[0].steps == {10: {0: None}}  # no array of the file is kept between steps
    hidden = old_pickle_content()["episodes"]["episode_0"]["rollout_steps"]["step_10"]["vlm_layer_output"]
    np.testing.assert_allclose(first.features[:, 0], hidden["hidden_states"][:, 0].mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(first.features, again.features)


# --- Options with no other test: --demo, -v, --quiet -----------------------------------------------


def test_demo_writes_its_data_once_and_finds_the_planted_signal(tmp_path, capsys):
    demo = tmp_path / "demo"
    common = [
        "--demo",
        "--data_path",
        str(demo),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert lpi.main([*common, "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "Expert: text_only" in printed and "Layer: 5" in printed and "Rollout Step: 10" in printed
    assert float(printed.split("\nAccuracy: ")[1].split()[0]) >= 0.9  # README: text tokens carry the task strongly
    assert "Demo: planted task signal" in printed
    results = load(tmp_path / "out" / "results_text_only_layer5_step10.pkl")
    assert results["metrics"]["num_samples"] == 60 and results["metrics"]["num_tasks"] == 10
    assert (demo / "t5_tiny").is_dir() and len(list(demo.glob("task_*.pkl"))) == 10
    written = {path: path.stat().st_mtime_ns for path in demo.rglob("*") if path.is_file()}
    # Other options override the demo's; the data are not written again.
    assert lpi.main([*common, "--expert", "vlm", "--layer", "3", "--bootstrap", "0", "--no_control", "--quiet"]) == 0
    assert load(tmp_path / "out" / "results_vlm_layer3_step10.pkl")["metrics"]["accuracy"] <= 0.4  # the silent layer
    assert {path: path.stat().st_mtime_ns for path in demo.rglob("*") if path.is_file()} == written


def test_quiet_default_and_verbose_say_what_they_promise(pinned_data, tiny_t5, tmp_path, capsys):
    """--quiet: no summary, no progress, warnings still shown; default: summary, stage lines and a last line;
    -v: debug lines too (here: a damaged index being ignored)."""
    cache = tmp_path / "cache"
    common = [
        "--data_path",
        str(pinned_data),
        "--t5_model",
        str(tiny_t5),
        "--cache_dir",
        str(cache),
        "--task_range",
        "0",
        "5",
        "--episode_range",
        "0",
        str(EPISODES),
        "--rollout_step",
        "10",
        "--expert",
        "text_only",
        "--layer",
        "1",
        "--bootstrap",
        "0",
        "--no_control",
        "--num_epochs",
        "2",
    ]

    def damage_index():
        for path in (cache / "file_index").iterdir():
            path.write_bytes(b"damaged")

    assert lpi.main([*common, "--output_dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == ""
    assert "WARNING: task 4: no file" in quiet.err  # a warning survives --quiet
    assert "INFO" not in quiet.err and "done in" not in quiet.err
    damage_index()
    assert lpi.main([*common, "--output_dir", str(tmp_path / "default")]) == 0
    default = capsys.readouterr()
    assert "Linear Probing Results" in default.out and "Expert: text_only" in default.out
    assert "INFO: " in default.err and default.err.strip().splitlines()[-1].startswith("done in ")
    assert "DEBUG" not in default.err
    damage_index()
    assert lpi.main([*common, "--output_dir", str(tmp_path / "verbose"), "-v"]) == 0
    verbose = capsys.readouterr()
    assert "DEBUG: " in verbose.err and "Linear Probing Results" in verbose.out
    with pytest.raises(SystemExit) as exit_info:
        lpi.main([*common, "--output_dir", str(tmp_path / "both"), "-v", "--quiet"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
