"""Labels, split, metrics and training on planted signals."""

import numpy as np
import pytest

import linear_probing_inference as lpi


def test_tiny_tokenizer_gives_distinct_ids_to_distinct_descriptions(tiny_t5):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    ids = [tuple(tokenizer(d)["input_ids"]) for d in lpi.DEMO_DESCRIPTIONS]
    assert len(set(ids)) == len(ids)
    assert all(i[-1] == tokenizer.eos_token_id for i in ids)
    assert tokenizer.unk_token_id not in {t for i in ids for t in i}


def test_batched_label_pooling_equals_encoding_each_description_alone(tiny_t5):
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    descriptions = ["pick up the milk and place it in the basket", "pick up the ketchup", "butter"]
    batched = lpi.encode_descriptions(descriptions, str(tiny_t5))
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_t5), T5EncoderModel.from_pretrained(tiny_t5)
    with torch.no_grad():  # the guide's recipe: one description at a time, mean over every token
        alone = np.stack([model(**tokenizer(d, return_tensors="pt")).last_hidden_state.mean(dim=1).squeeze().numpy() for d in descriptions])
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)


def test_label_cache_is_keyed_by_descriptions(tiny_t5, tmp_path):
    config = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path))
    first = lpi.t5_labels(["pick up the milk", "butter"], config)
    again = lpi.t5_labels(["pick up the milk", "butter"], config)
    other = lpi.t5_labels(["butter", "pick up the milk"], config)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(other, first[::-1], rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "t5_labels").glob("*.npz"))) == 2


def test_unloadable_t5_stops_with_a_pointer_to_a_local_copy(tmp_path):
    with pytest.raises(lpi.ProbeError, match="Point --t5_model at a local directory"):
        lpi.encode_descriptions(["x"], str(tmp_path / "no_such_model"))


def test_accuracy_compares_against_unique_task_embeddings():
    # Three tasks, four samples each, every prediction exactly its task's embedding.
    tasks = np.eye(3, 5)
    sample_class = np.repeat(np.arange(3), 4)
    predictions = tasks[sample_class]
    assert np.mean(lpi.nearest_class(predictions, tasks) == sample_class) == 1.0
    # The guide's compute_accuracy (argmax over per-sample target rows) fails on the same input.
    similarities = lpi.unit_rows(predictions) @ lpi.unit_rows(tasks[sample_class]).T
    assert np.mean(np.argmax(similarities, axis=1) == np.arange(12)) < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_keeps_episodes_whole_and_every_task_on_both_sides(seed):
    rng = np.random.default_rng(seed)
    task_id = np.repeat(np.arange(7), 40)
    episode = rng.integers(0, 5 + seed, size=task_id.size)
    split = lpi.split_episodes(task_id, episode, lpi.TrainingConfig(seed=seed))
    for key in set(zip(task_id, episode)):
        sides = set(split[(task_id == key[0]) & (episode == key[1])])
        assert len(sides) == 1, key
    for task in range(7):
        assert {"train", "test"} <= set(split[task_id == task])


def test_split_needs_two_episodes_per_task():
    with pytest.raises(lpi.ProbeError, match="task 1 has 1 episode.*widen --episode_range"):
        lpi.split_episodes(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0]), lpi.TrainingConfig())


def test_fit_probe_recovers_a_linear_map_and_stops_early():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    y = x @ weights
    params, history = lpi.train_probe(x[:150], y[:150], x[150:], y[150:], lpi.TrainingConfig(num_epochs=400, learning_rate=0.01))
    cosine = lpi.row_cosine(lpi.apply_probe(params, x[150:]), y[150:])
    assert cosine.mean() > 0.99
    assert len(history["train_loss"]) == history["epochs_run"] <= 400
    assert history["validation_loss"][history["best_epoch"] - 1] == np.nanmin(history["validation_loss"])
