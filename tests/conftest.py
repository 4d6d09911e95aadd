"""Shared fixtures: the demo generator's data and a tiny random-weight T5, built once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import linear_probing_inference as lpi  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Ten tasks, six episodes, steps 10 and 20, the real token layout at width 16."""
    directory = tmp_path_factory.mktemp("latents")
    lpi.write_demo_dataset(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A local T5 directory (random weights, own sentencepiece vocabulary)."""
    directory = tmp_path_factory.mktemp("t5") / "t5_tiny"
    lpi.build_tiny_t5(directory, lpi.DEMO_DESCRIPTIONS)
    return directory


@pytest.fixture
def run_cli(demo_data, tiny_t5, tmp_path):
    """Run main() on the demo data; return (exit status, output dir)."""

    def run(*options: str, data_path: Path | None = None, output_dir: Path | None = None) -> tuple[int, Path]:
        output_dir = output_dir or tmp_path / "results"
        argv = [
            "--data_path",
            str(data_path or demo_data),
            "--t5_model",
            str(tiny_t5),
            "--cache_dir",
            str(tmp_path.parent / "cache"),
            "--output_dir",
            str(output_dir),
            "--task_range",
            "0",
            "10",
            "--episode_range",
            "0",
            "6",
            "--rollout_step",
            "10",
            "--quiet",
            *options,
        ]
        return lpi.main(argv), output_dir

    return run
