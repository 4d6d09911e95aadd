"""The probe's label space: the span of each fold's training-task embeddings is exact for retrieval and agrees with
training in T5's full space."""

import pickle

import numpy as np

import linear_probing_inference as lpi


def test_predictions_in_the_span_rank_and_score_as_in_full_space():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((10, 32)).astype(np.float32) + 3.0  # a shared direction, as T5's mean-pooled labels have
    known = [np.arange(10)]
    span = lpi.label_spaces(raw, known, lpi.LabelConfig(label_space="span"))
    full = lpi.label_spaces(raw, known, lpi.LabelConfig(label_space="full"))
    assert span.basis.shape == (1, 9, 32)  # 10 centered tasks span 9 directions, not 32
    np.testing.assert_allclose(span.basis[0] @ span.basis[0].T, np.eye(9), atol=1e-5)  # orthonormal rows
    coordinates = rng.standard_normal((50, 9))  # any prediction the probe can make
    in_t5 = coordinates @ span.basis[0]
    similarity_span = lpi.unit_rows(coordinates) @ lpi.unit_rows(span.classes[0]).T
    similarity_full = lpi.unit_rows(in_t5) @ lpi.unit_rows(full.classes[0]).T
    np.testing.assert_allclose(similarity_span, similarity_full, atol=1e-5)
    own = rng.integers(0, 10, 50)
    np.testing.assert_array_equal(lpi.retrieval(similarity_span, own).rank, lpi.retrieval(similarity_full, own).rank)


def test_span_and_full_width_training_agree_on_planted_data(run_cli, tmp_path):
    results = {}
    for space in ("span", "full"):
        status, output = run_cli(
            "--expert",
            "text_only",
            "--layer",
            "5",
            "--label_space",
            space,
            "--no_control",
            "--bootstrap",
            "0",
            output_dir=tmp_path / space,
        )
        assert status == 0
        with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
            results[space] = pickle.load(file)
    span, full = results["span"], results["full"]
    assert span["probe"]["kernel"].shape[-1] == 9 and full["probe"]["kernel"].shape[-1] == 32
    assert abs(span["metrics"]["accuracy"] - full["metrics"]["accuracy"]) <= 0.03
    agreement = np.mean(span["heldout"]["predicted_class"] == full["heldout"]["predicted_class"])
    assert agreement >= 0.95
