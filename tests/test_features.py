"""Reading and slicing: token positions, key discovery, step selection, lazy array views."""

import math
import pickle

import ml_dtypes
import numpy as np
import pytest

import linear_probing_inference as lpi


def token_index_array(layers: int, tokens: int, width: int, batch_axis: bool = True) -> np.ndarray:
    """hidden[layer, 0, token, :] = 1000 * layer + token: a pooled mean names the positions used."""
    values = 1000.0 * np.arange(layers)[:, None, None] + np.arange(tokens)[None, :, None] + np.zeros(width)
    values = values[:, None] if batch_axis else values
    return values.astype(np.float32)


def layer_feature(entry: dict, chosen: tuple[lpi.Source, int]) -> np.ndarray:
    """What the reader does per entry: cut the view, then pool it."""
    source, layer = chosen
    return lpi.pool_tokens(lpi.layer_tokens(lpi.feature_array(entry, source), source, layer), source.pooling)


def config(expert: str, layer: int = 2, **kwargs) -> tuple[lpi.Source, int]:
    """A source reading `expert`, and the layer asked."""
    return lpi.Source(data_path="", task_range=(0, 1), episode_range=(0, 1), expert=expert, **kwargs), layer


@pytest.mark.parametrize("batch_axis", [True, False])
@pytest.mark.parametrize(
    "expert, tokens, first, last",
    [("vlm", 816, 0, 815), ("text_only", 816, 768, 815), ("action", 51, 0, 50), ("action", 867, 816, 866)],
)
def test_token_slicing_pools_the_documented_positions(expert, tokens, first, last, batch_axis):
    entry = {"hidden_states": token_index_array(4, tokens, 3, batch_axis)}
    feature = layer_feature(entry, config(expert, layer=2))
    assert feature.dtype == np.float32 and feature.shape == (3,)
    np.testing.assert_allclose(feature, 2000 + (first + last) / 2)


@pytest.mark.parametrize(
    "expert, words",
    [
        ("vlm", "VLM prefix tokens 0-815 (images 0-767 and text 768-815), mean-pooled"),
        ("text_only", "VLM prefix tokens 768-815 (prompt text), mean-pooled"),
        ("image", "VLM prefix tokens 0-767 (3 cameras x 256 SigLIP patches), mean-pooled"),
        ("action", "action-expert tokens (positions 816+ when the entry holds the whole sequence), mean-pooled"),
        ("visual", "SigLIP patches of camera base_0_rgb (vision_latents), mean-pooled"),
    ],
)
def test_token_positions_are_described_in_the_words_results_files_compare(expert, words):
    """Written into every results file and summary: the words stay what earlier versions wrote."""
    assert lpi.describe_token_positions(config(expert)[0]) == words


def test_slicing_works_on_a_memmap_and_on_bfloat16(tmp_path):
    array = token_index_array(3, 816, 4)
    path = tmp_path / "array.bin"
    array.tofile(path)
    view = np.memmap(path, dtype=np.float32, mode="r", shape=array.shape)
    np.testing.assert_array_equal(
        layer_feature({"hidden_states": view}, config("text_only", 1)),
        layer_feature({"hidden_states": array}, config("text_only", 1)),
    )
    small = (np.arange(816, dtype=np.float32)[None, None, :, None] % 4 + np.zeros((2, 1, 816, 2), np.float32)).astype(
        ml_dtypes.bfloat16
    )
    np.testing.assert_allclose(layer_feature({"hidden_states": small}, config("vlm", 1)), 1.5)


def test_per_layer_vector_features_need_no_tokens_but_text_only_refuses_them():
    entry = {"pre_attn_norm_scales": np.arange(12, dtype=np.float32).reshape(3, 4)}
    np.testing.assert_array_equal(
        layer_feature(entry, config("vlm", 1, feature_type="pre_attn_norm_scales")), [4, 5, 6, 7]
    )
    with pytest.raises(lpi.OptionError, match="token axis"):
        layer_feature(entry, config("text_only", 1, feature_type="pre_attn_norm_scales"))


def test_bad_layer_and_feature_type_name_what_exists():
    entry = {"hidden_states": token_index_array(3, 816, 2)}
    with pytest.raises(lpi.OptionError, match=r"--layer 7 is out of range: the data has 3 layers \(0-2\)"):
        layer_feature(entry, config("vlm", 7))
    with pytest.raises(lpi.OptionError, match="it has: hidden_states"):
        layer_feature(entry, config("vlm", 0, feature_type="mlp_activation"))


def test_short_prefix_is_an_error_for_vlm_experts():
    with pytest.raises(lpi.ProbeError, match="816-token VLM prefix"):
        layer_feature({"hidden_states": token_index_array(3, 700, 2)}, config("text_only", 0))


@pytest.mark.parametrize(
    "style",
    ["action_expert_state_time{:.1f}", "action_expert_hidden_state_t{:.1f}", "action_expert_hidden_states_t{:.1f}"],
)
def test_action_keys_are_found_in_both_namings_and_ordered_by_time(style):
    times = [0.3, 1.0, 0.1, 0.5, 0.9, 0.2, 0.7, 0.4, 0.8, 0.6]  # inserted out of order
    step = {style.format(t): {"hidden_states": np.zeros((1, 1, 51, 2))} for t in times}
    step.update({"vlm_layer_output": {}, "action": [0.0] * 7, "action_expert_note": "not a dict", "timestep": 10})
    keys = lpi.action_expert_keys(step)
    assert [lpi.denoising_time(k) for k in keys] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert [t for t, _ in lpi.expert_entries(step, config("action", 0)[0])] == sorted(times, reverse=True)
    assert math.isnan(lpi.expert_entries({"vlm_layer_output": {}}, config("vlm")[0])[0][0])


def write_task(path, episodes: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump({"task_name": "t", "task_id": 0, "task_description": "do the thing", "episodes": episodes}, file)


def vlm_step(value: float) -> dict:
    return {"vlm_layer_output": {"hidden_states": np.full((2, 1, 816, 3), value, dtype=np.float32)}}


def test_rollout_step_is_chosen_by_key_and_missing_steps_are_skipped(tmp_path):
    # Episode 0 has steps 10 and 30; episode 1 only 10. "step 30" is the second key of
    # episode 0: a positional reader would take step_30's place wrongly or fail on episode 1.
    write_task(
        tmp_path / "task_0_t.pkl",
        {
            "episode_0": {"rollout_steps": {"step_10": vlm_step(10.0), "step_30": vlm_step(30.0)}},
            "episode_1": {"rollout_steps": {"step_10": vlm_step(11.0)}},
        },
    )
    cfg = lpi.Source(data_path=str(tmp_path), task_range=(0, 2), episode_range=(0, 3), expert="vlm")
    dataset = lpi.read_dataset(cfg, [30], 1)
    samples, report = lpi.step_samples(dataset, [1], 30), dataset.report
    np.testing.assert_array_equal(samples.features, [[[30.0] * 3]])
    assert samples.episode.tolist() == [0] and samples.step.tolist() == [30]
    assert report.episodes_without_step == {30: [(0, 1)]}
    assert report.missing_episodes == [(0, 2)]
    assert report.missing_tasks == [1]
    assert report.steps_seen == {10, 30}
    with pytest.raises(lpi.ProbeError, match="no episode in the ranges has step_20; rollout steps present: 10, 30"):
        lpi.step_samples(lpi.read_dataset(cfg, [20], 1), [1], 20)


def test_task_files_are_matched_by_exact_id(tmp_path):
    for name in ("task_1_a.pkl", "task_10_b.pkl", "task_11_c.pkl", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found, missing = lpi.find_task_files(tmp_path, (0, 12))
    assert {k: v.name for k, v in found.items()} == {1: "task_1_a.pkl", 10: "task_10_b.pkl", 11: "task_11_c.pkl"}
    assert missing == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def test_two_files_for_one_task_are_refused(tmp_path):
    (tmp_path / "task_3_a.pkl").write_bytes(b"")
    (tmp_path / "task_3_b.pkl").write_bytes(b"")
    with pytest.raises(lpi.ProbeError, match="task 3 has 2 files"):
        lpi.find_task_files(tmp_path, (0, 5))


def test_reader_refuses_code_in_a_data_file(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "task_0_evil.pkl"
    path.write_bytes(pickle.dumps({"episodes": {}, "x": Exploit()}))
    with pytest.raises(lpi.ProbeError, match=r"task_0_evil.pkl.*refused global (posix|os)\.system"):
        lpi.read_task_file(path)
    assert not marker.exists()
