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
        alone = np.stack(
            [
                model(**tokenizer(d, return_tensors="pt")).last_hidden_state.mean(dim=1).squeeze().numpy()
                for d in descriptions
            ]
        )
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
    similarities = lpi.unit_rows(predictions) @ lpi.unit_rows(tasks).T
    assert np.mean(lpi.retrieval(similarities, sample_class).correct) == 1.0
    # The guide's compute_accuracy (argmax over per-sample target rows) fails on the same input.
    similarities = lpi.unit_rows(predictions) @ lpi.unit_rows(tasks[sample_class]).T
    assert np.mean(np.argmax(similarities, axis=1) == np.arange(12)) < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_keep_episodes_whole_and_every_task_on_every_training_side(seed):
    rng = np.random.default_rng(seed)
    task_id = np.repeat(np.arange(7), 40)
    episode = rng.integers(0, 5 + seed, size=task_id.size)
    config = lpi.TrainingConfig(seed=seed)
    fold, folds = lpi.assign_folds(task_id, episode, config)
    assert folds == 5 and set(fold) == set(range(5))
    for key in set(zip(task_id, episode)):
        assert len(set(fold[(task_id == key[0]) & (episode == key[1])])) == 1, key
    validation = lpi.validation_masks(task_id, episode, fold, folds, config)
    for f in range(folds):
        train = (fold != f) & ~validation[f]
        assert not (validation[f] & (fold == f)).any()
        assert set(task_id[train]) == set(range(7))
        for key in set(zip(task_id[validation[f]], episode[validation[f]])):  # validation takes whole episodes
            assert not (train & (task_id == key[0]) & (episode == key[1])).any()


def test_fewer_folds_when_episodes_are_few_and_task_split_holds_out_whole_tasks():
    task_id, episode = np.repeat(np.arange(6), 3), np.tile(np.arange(3), 6)
    fold, folds = lpi.assign_folds(task_id, episode, lpi.TrainingConfig(cv_folds=5))
    assert folds == 3
    fold, folds = lpi.assign_folds(task_id, episode, lpi.TrainingConfig(cv_folds=4, split="task"))
    assert folds == 4
    for task in range(6):
        assert len(set(fold[task_id == task])) == 1


def test_folds_need_two_episodes_per_task():
    with pytest.raises(lpi.ProbeError, match="task 1 has 1 episode.*widen --episode_range"):
        lpi.assign_folds(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0]), lpi.TrainingConfig())


def test_fit_probes_recovers_a_linear_map_and_stops_early():
    rng = np.random.default_rng(0)
    classes = rng.standard_normal((6, 4)).astype(np.float32)
    sample_class = np.repeat(np.arange(6), 30)
    mixing = rng.standard_normal((4, 8)).astype(np.float32)
    features = classes[sample_class] @ mixing + 0.05 * rng.standard_normal((180, 8)).astype(np.float32)
    train = np.arange(180) % 3 != 0
    validation = np.arange(180) % 3 == 0
    config = lpi.TrainingConfig(num_epochs=400, learning_rate=0.01)
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
    fitted = lpi.train_linear_probes(features[None], sample_class, copies, config).item(0)  # the one item
    prediction = ((features - fitted.feature_mean[0]) / fitted.feature_std[0]) @ fitted.kernel[0] + fitted.bias[0]
    assert lpi.row_cosine(prediction, classes[sample_class]).mean() > 0.99
    epochs = int(fitted.history["epochs_run"][0])
    assert epochs < 400
    history = fitted.history["validation_loss"][0][:epochs]
    assert history[fitted.history["best_epoch"][0] - 1] == np.nanmin(history)
