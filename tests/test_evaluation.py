"""Reviewer-grade numbers: cross-validation, control task, intervals, retrieval metrics, unseen tasks, ridge."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import linear_probing_inference as lpi

COLORS, OBJECTS = ["red", "blue", "green", "yellow"], ["bowl", "mug", "plate", "box", "cup"]
COMPOSED = [f"pick up the {c} {o} and place it in the basket" for c in COLORS for o in OBJECTS]


@pytest.fixture(scope="session")
def composed(tmp_path_factory) -> dict:
    """20 tasks whose descriptions share parts. 'aligned': the text-token signal is a linear image
    of each task's T5 embedding (language structure); 'random': a random direction per task."""
    root = tmp_path_factory.mktemp("composed")
    lpi.build_tiny_t5(root / "t5", COMPOSED)
    raw = lpi.t5_labels(COMPOSED, lpi.LabelConfig(t5_model=str(root / "t5"), cache_dir=str(root / "cache")))
    signatures = (raw - raw.mean(0)) @ np.random.default_rng(5).standard_normal((raw.shape[1], 48)).astype(np.float32)
    common = dict(steps=(10,), vlm_width=48, descriptions=COMPOSED, num_tasks=20, num_episodes=4, num_layers=6)
    lpi.write_demo_dataset(root / "aligned", vlm_signatures=signatures / signatures.std(), **common)
    lpi.write_demo_dataset(root / "random", **common)
    return {"root": root, "t5": root / "t5"}


def run_composed(composed, tmp_path, data: str, *options: str) -> dict:
    output = tmp_path / "out"
    status = lpi.main(
        [
            "--data_path",
            str(composed["root"] / data),
            "--t5_model",
            str(composed["t5"]),
            "--cache_dir",
            str(composed["root"] / "cache"),
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
            "300",
            "--quiet",
            *options,
        ]
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        return pickle.load(file)


def test_selectivity_is_high_only_where_language_structure_is_planted(composed, tmp_path):
    aligned = run_composed(composed, tmp_path, "aligned")["metrics"]
    assert aligned["accuracy"] >= 0.95
    assert aligned["control_accuracy"] <= 0.5
    assert aligned["selectivity"] >= 0.5 and aligned["confidence_intervals"]["selectivity"][0] > 0.3
    # Task identity without language structure: a linear map learns permuted labels just as
    # well, so the control matches the probe and selectivity says "nothing beyond identity".
    separable = run_composed(composed, tmp_path, "random")["metrics"]
    assert separable["accuracy"] >= 0.9 and abs(separable["selectivity"]) <= 0.1


@pytest.mark.parametrize("probe", ["linear", "ridge"])
def test_unseen_tasks_are_retrieved_only_when_the_layer_encodes_language(composed, tmp_path, probe):
    aligned = run_composed(composed, tmp_path, "aligned", "--split", "task", "--probe", probe)
    samples = aligned["samples"]
    for f in range(aligned["metrics"]["num_folds"]):  # no task on both sides of any fold
        assert not set(samples["task_id"][samples["fold"] == f]) & set(samples["task_id"][samples["fold"] != f])
    assert aligned["metrics"]["accuracy"] >= 0.8 and aligned["metrics"]["control_accuracy"] <= 0.2
    separable = run_composed(composed, tmp_path, "random", "--split", "task", "--probe", probe)["metrics"]
    assert separable["accuracy"] <= 0.25  # chance is 0.05: identity alone does not transfer


def test_silent_layer_has_chance_accuracy_and_no_selectivity(run_cli):
    status, output = run_cli("--expert", "vlm", "--layer", str(lpi.DEMO_SILENT_LAYER))
    assert status == 0
    with open(output / f"results_vlm_layer{lpi.DEMO_SILENT_LAYER}_step10.pkl", "rb") as file:
        metrics = pickle.load(file)["metrics"]
    assert metrics["accuracy"] <= 0.3 and metrics["control_accuracy"] <= 0.3 and abs(metrics["selectivity"]) <= 0.25


def test_ridge_and_trained_probe_agree_where_the_signal_is_strong(run_cli, tmp_path):
    results = {}
    for probe in ("linear", "ridge"):
        status, output = run_cli("--expert", "text_only", "--layer", "5", "--probe", probe, output_dir=tmp_path / probe)
        assert status == 0
        with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
            results[probe] = pickle.load(file)
    assert results["linear"]["metrics"]["accuracy"] >= 0.9 and results["ridge"]["metrics"]["accuracy"] >= 0.9
    agreement = np.mean(
        results["linear"]["heldout"]["predicted_class"] == results["ridge"]["heldout"]["predicted_class"]
    )
    assert agreement >= 0.9
    assert results["ridge"]["history"]["penalty"].shape == (10,)


def interval_width(run_cli, tmp_path, episodes: int) -> tuple[float, tuple[float, float], float]:
    status, output = run_cli(
        "--expert", "vlm", "--layer", "5", "--episode_range", "0", str(episodes), output_dir=tmp_path / str(episodes)
    )
    assert status == 0
    with open(output / "results_vlm_layer5_step10.pkl", "rb") as file:
        metrics = pickle.load(file)["metrics"]
    low, high = metrics["confidence_intervals"]["accuracy"]
    return metrics["accuracy"], (low, high), high - low


def test_confidence_intervals_contain_the_estimate_and_shrink_with_more_episodes(run_cli, tmp_path):
    few = interval_width(run_cli, tmp_path, 3)
    many = interval_width(run_cli, tmp_path, 6)
    for accuracy, (low, high), _ in (few, many):
        assert low <= accuracy <= high
    assert many[2] < few[2]


def test_retrieval_metrics_on_a_known_similarity_matrix():
    similarities = np.array([[0.9, 0.1, 0.0], [0.5, 0.4, 0.6], [0.2, 0.3, 0.1], [0.0, 0.0, 0.0]])
    result = lpi.retrieval(similarities, np.array([0, 1, 2, 1]))
    np.testing.assert_array_equal(result.rank, [1, 3, 3, 3])  # a tie ranks against the prediction
    np.testing.assert_array_equal(result.correct, [True, False, False, False])
    np.testing.assert_allclose(result.margin, [0.8, -0.2, -0.2, 0.0])


def test_intervals_resample_units_and_are_reproducible():
    units = np.repeat(np.arange(20), 3)
    values = {"mixed": (np.arange(60) % 2).astype(float), "graded": np.arange(60) / 60.0}
    intervals = lpi.unit_intervals(values, units, None, 500, seed=0)
    low, high = intervals["mixed"]
    assert low < 0.5 < high
    assert intervals == lpi.unit_intervals(values, units, None, 500, seed=0)
    assert lpi.unit_intervals(values, units, None, 0, seed=0) == {}


@pytest.mark.parametrize("count", [2, 3, 10])
def test_control_permutation_keeps_no_task_in_place(count):
    for seed in range(5):
        permutation = lpi.derangement(count, seed)
        assert sorted(permutation) == list(range(count)) and not np.any(permutation == np.arange(count))


def test_label_projection_and_loss_choice_are_applied_and_recorded(run_cli, tmp_path):
    status, output = run_cli(
        "--expert", "text_only", "--layer", "5", "--label_dim", "8", "--loss", "contrastive", "--no_control"
    )
    assert status == 0
    with open(output / "results_text_only_layer5_step10.pkl", "rb") as file:
        results = pickle.load(file)
    assert results["config"]["labels"]["label_dim"] == 8 and results["config"]["training"]["loss"] == "contrastive"
    assert results["probe"]["kernel"].shape == (5, 16, 8) and results["tasks"]["label_basis"].shape == (5, 8, 32)
    assert "control_accuracy" not in results["metrics"]
    assert results["metrics"]["accuracy"] >= 0.8
    summary = (output / "summary_text_only_layer5_step10.txt").read_text()
    assert "top 8 principal directions" in summary and "loss contrastive" in summary and "Control Task: off" in summary


@pytest.mark.parametrize(
    "options, status, message",
    [
        (["--cv_folds", "1"], 2, "--cv_folds 1: at least 2 folds"),
        (["--probe", "ridge", "--loss", "mse"], 2, "--loss applies to --probe linear"),
        (["--label_dim", "12"], 2, "--label_dim 12: only 10 training tasks"),
        (["--split", "task", "--task_range", "0", "2"], 1, "--split task needs at least 3 tasks"),
    ],
)
def test_evaluation_option_errors(run_cli, capsys, options, status, message):
    try:
        code, _ = run_cli("--expert", "vlm", "--layer", "5", *options)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == status
    assert message in capsys.readouterr().err


def test_the_bootstrap_interval_is_scipys_without_importing_scipy_stats():
    """bootstrap_interval draws and computes as scipy.stats.bootstrap does (multi-sample BCa, percentile fallback),
    bit for bit; the program imports neither scipy.stats nor its docstrings at start-up."""
    import warnings

    import scipy
    import scipy.stats

    if tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 17):
        pytest.skip("bootstrap_interval follows scipy 1.17's arithmetic (earlier versions interpolate otherwise)")
    rng = np.random.default_rng(1)
    for trial in range(60):
        sizes = rng.integers(2, 12, rng.integers(1, 5))
        counts = rng.integers(1, 6, sizes.sum()).astype(float)
        sums = counts * (rng.random(sizes.sum()) if trial % 2 else (rng.random(sizes.sum()) > 0.3))
        start = np.cumsum([0, *sizes])
        data = tuple(np.arange(start[k], start[k + 1]).astype(np.float64) for k in range(len(sizes)))

        def mean_of_units(*chosen, axis=-1, sums=sums, counts=counts):
            picked = np.concatenate(chosen, axis=axis).astype(np.int64)
            return sums[picked].sum(axis=axis) / counts[picked].sum(axis=axis)

        for method in ("BCa", "percentile"):
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                expected = scipy.stats.bootstrap(
                    data,
                    mean_of_units,
                    n_resamples=200,
                    method=method,
                    vectorized=True,
                    rng=np.random.default_rng(trial),
                ).confidence_interval
                found = lpi.bootstrap_interval(data, mean_of_units, 200, np.random.default_rng(trial), method)
            np.testing.assert_array_equal(found, [expected.low, expected.high])
    program = "import sys, linear_probing_inference; print('scipy.stats' in sys.modules)"
    imported = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=lpi.Path(lpi.__file__).parent
    )
    assert imported.stdout.strip() == "False", imported.stderr


def reference_ridge(x_all, sample_class, copies, units, standardize):
    """The per-copy ridge solver the shared one replaced: every copy and inner fold solved from scratch."""
    kernels, penalties = [], []
    for classes, train in zip(copies.classes, copies.train):
        x_train = x_all[train].astype(np.float64)
        mean = x_train.mean(0) if standardize else np.zeros(x_train.shape[1])
        std = lpi.usable_std(x_train.std(0)) if standardize else np.ones(x_train.shape[1])
        x, y = (x_train - mean) / std, classes[sample_class[train]].astype(np.float64)
        grid = lpi.RIDGE_PENALTIES * len(x)
        inner = np.unique(units[train], return_inverse=True)[1] % lpi.RIDGE_INNER_FOLDS
        scores = np.zeros(len(grid))
        for f in range(lpi.RIDGE_INNER_FOLDS):
            fit, held = inner != f, inner == f
            x_mean, y_mean = x[fit].mean(0), y[fit].mean(0)
            for index, weights in enumerate(lpi.ridge_solution(x[fit] - x_mean, y[fit] - y_mean, grid)):
                scores[index] += lpi.row_cosine((x[held] - x_mean) @ weights + y_mean, y[held]).sum()
        best = grid[int(np.argmax(scores))]
        weights = lpi.ridge_solution(x - x.mean(0), y - y.mean(0), np.array([best]))[0]
        kernels.append(weights / std[:, None])  # in the features' own units, for comparing predictions
        penalties.append(best)
    return np.array(kernels), np.array(penalties)


@pytest.mark.parametrize(
    "split, permutations, standardize, width",
    [("episode", 3, True, 40), ("task", 8, True, 40), ("task", 4, False, 40), ("episode", 3, True, 12)],
)
def test_the_shared_ridge_solver_is_the_per_copy_one(tiny_t5, tmp_path, split, permutations, standardize, width):
    """One decomposition per training side, every copy a product with its class table: the same penalties, and the
    same predictions to float precision, as solving each copy (and permuted assignment) and inner fold alone; in the
    dual (fewer training samples than features) and the primal (width 12)."""
    rng = np.random.default_rng(3)
    tasks, episodes = 8, 5
    task_id, episode = np.repeat(np.arange(tasks), episodes), np.tile(np.arange(episodes), tasks)
    features = (rng.standard_normal((len(task_id), width)) + 2 * rng.standard_normal((tasks, width))[task_id]).astype(
        np.float32
    )
    samples = lpi.Samples(
        features[None],
        task_id,
        episode,
        np.zeros(len(task_id), int),
        np.full(len(task_id), np.nan),
        np.zeros(len(task_id), int),
    )
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    training = lpi.TrainingConfig(
        split=split, permutations=permutations, probe="ridge", standardize=standardize, mdl=split == "episode"
    )
    design = lpi.design_for(samples, dict(enumerate(lpi.DEMO_DESCRIPTIONS[:tasks])), labels, training)
    fitted = lpi.train_ridge_probes(features, design.sample_class, design.copies, design.unit, training)
    kernels, penalties = reference_ridge(features, design.sample_class, design.copies, design.unit, standardize)
    np.testing.assert_array_equal(fitted.history["penalty"], penalties)
    every = np.arange(len(design.copies.train))
    shared = np.stack([lpi.copy_predictions(features, fitted, np.full(len(features), copy)) for copy in every])
    kept = design.copies.kept()  # the weights a results file keeps predict what the class fit does
    kernel, bias, mean, std = fitted.weights(kept)
    weighted = (features[None] - mean[:, None]) / std[:, None] @ kernel + bias[:, None]
    np.testing.assert_allclose(weighted, shared[kept], atol=1e-5 * np.abs(shared).max())
    alone = features.astype(np.float64) @ kernels
    # Predictions up to each copy's constant (the bias and the feature mean): centered over the samples.
    shared, alone = shared - shared.mean(1, keepdims=True), alone - alone.mean(1, keepdims=True)
    np.testing.assert_allclose(shared, alone, atol=1e-5 * np.abs(alone).max())


@pytest.mark.parametrize("penalty_scale", [1e-3, 1.0, 1e3])
def test_a_dual_inner_fold_prediction_is_the_fit_without_its_samples(penalty_scale):
    """The leave-group-out identity the dual's inner cross-validation uses, against refitting without the group: to
    1e-10 even at a penalty 1e-5 of the Gram matrix's eigenvalues, and with a sample repeated (a null direction)."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((30, 50)) + 3 * rng.standard_normal((3, 50))[np.arange(30) % 3]
    features[1] = features[0]
    train = np.arange(30) < 24
    side = lpi.ridge_side(features, train, standardize=True)[0]
    assert side.gram_eigen is not None  # 24 training samples, 50 features: the dual
    targets, penalties = rng.standard_normal((24, 4)), np.array([0.5, 5.0, 50.0]) * penalty_scale
    held = np.arange(24) % 3 == 1
    x, fit = side.z[train], ~held
    for penalty, found in zip(penalties, lpi.held_predictions(side, fit, held, targets, penalties)):
        x_mean, y_mean = x[fit].mean(0), targets[fit].mean(0)
        centered = x[fit] - x_mean
        dual = np.linalg.solve(centered @ centered.T + penalty * np.eye(len(centered)), targets[fit] - y_mean)
        np.testing.assert_allclose(found, (x[held] - x_mean) @ (centered.T @ dual) + y_mean, rtol=0, atol=1e-10)


def ridge_case(tiny_t5, tmp_path, training: lpi.TrainingConfig):
    """8 tasks x 5 episodes at width 40 with a task signal: samples, design and ridge fit."""
    rng = np.random.default_rng(3)
    tasks, episodes, width = 8, 5, 40
    task_id, episode = np.repeat(np.arange(tasks), episodes), np.tile(np.arange(episodes), tasks)
    features = (rng.standard_normal((len(task_id), width)) + rng.standard_normal((tasks, width))[task_id]).astype(
        np.float32
    )
    count = len(task_id)
    samples = lpi.Samples(
        features[None], task_id, episode, np.zeros(count, int), np.full(count, np.nan), np.zeros(count, int)
    )
    labels = lpi.LabelConfig(t5_model=str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    design = lpi.design_for(samples, dict(enumerate(lpi.DEMO_DESCRIPTIONS[:tasks])), labels, training)
    return features, design, lpi.train_ridge_probes(features, design.sample_class, design.copies, design.unit, training)


def test_ridge_scores_its_permutation_null_as_each_copy_would_be_scored(tiny_t5, tmp_path):
    """Ridge's null from Gram matrices of the permuted tables equals each copy's own predictions scored against the
    whole targets (copy_similarities); information under the first 20 only, retrieval under all 30."""
    training = lpi.TrainingConfig(split="task", permutations=30, probe="ridge", repeats=1)
    features, design, fitted = ridge_case(tiny_t5, tmp_path, training)
    temperatures = lpi.copy_temperatures(features, fitted, design)
    null = lpi.null_scores(features, fitted, design, temperatures)
    assert null.correct.shape == (30, len(features)) and null.bits.shape == (20, len(features))
    assert np.isnan(temperatures[design.copies.assignment > 20]).all()
    assert np.isfinite(temperatures[design.copies.assignment <= 20]).all()
    for a in range(1, 31):
        copy = lpi.heldout_copy(design, 0, a)
        reference = lpi.scores_of(features, fitted, design, temperatures, copy)
        np.testing.assert_array_equal(null.correct[a - 1], reference.correct)
        if a <= 20:
            np.testing.assert_allclose(null.bits[a - 1], reference.bits, rtol=1e-6)
        if a == 1:
            np.testing.assert_array_equal(null.control_predicted, reference.predicted)
    control = lpi.control_of(
        null,
        lpi.scores_of(features, fitted, design, temperatures, lpi.heldout_copy(design, 0, 0)),
        len(design.descriptions),
        0,
    )
    assert len(control.permutation_null.accuracy) == 30 and len(control.permutation_null.information_bits) == 20


def reference_temperature(logits, own, units, allowed=None):
    """The grid search as code_bits states it: every grid point's mean code length, the least one's temperature."""
    bits = [
        lpi.code_bits(logits / t, own, np.full(len(own), lpi.uniform_share(units)), allowed).mean()
        for t in lpi.TEMPERATURE_GRID
    ]
    return lpi.TEMPERATURE_GRID[int(np.argmin(bits))]


@pytest.mark.parametrize("seed", range(6))
def test_the_temperature_fit_is_the_grid_search_of_code_bits(seed):
    rng = np.random.default_rng(seed)
    rows, width = 40, 7
    logits = rng.uniform(-1, 1, (rows, width)) * rng.uniform(0.1, 20)
    own = rng.integers(0, width, rows)
    logits[own == 0, 0] += 0.5  # a class the scores favour: an interior temperature
    allowed = None
    if seed % 2:
        allowed = np.broadcast_to(rng.random(width) < 0.8, (rows, width)).copy()
        allowed[np.arange(rows), own] = True
    if seed % 3 == 0:
        logits[:3] = np.nan  # failed rows cost log2(K) at every temperature
    assert lpi.fit_temperature(logits, own, 5, allowed) == reference_temperature(logits, own, 5, allowed)


def test_ridge_under_the_task_split_defaults_to_a_null_for_a_sweep():
    assert lpi.TrainingConfig(split="task", probe="ridge").null_size == lpi.RIDGE_TASK_SPLIT_PERMUTATIONS == 1000
    assert lpi.TrainingConfig(split="task").null_size == 20 and lpi.TrainingConfig(probe="ridge").null_size == 1
    assert lpi.TrainingConfig(split="task", probe="ridge", permutations=7).null_size == 7
