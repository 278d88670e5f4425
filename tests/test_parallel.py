"""Population sweeps on local Ray: same files and summary as the sequential run, retried worker deaths."""
import argparse
import os

import pytest
from test_diagonal_study import small_config, without_timing

from quotientsharp.studies import diagonal as D
from quotientsharp.studies import parallel
from quotientsharp.studies.runner import sequential


class DieOnce:
    """An executor that wraps ``inner``: the first attempt at ``key`` kills its worker process."""

    def __init__(self, inner, key, marker):
        self.inner, self.key, self.marker = inner, key, str(marker)

    def __call__(self, fn, calls, on_done):
        key, marker = self.key, self.marker

        def flaky(k, unit):
            if k == key and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return fn(k, unit)

        self.inner(flaky, calls, on_done)


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason=f"Ray is not installed: {parallel.INSTALL}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_sequential_and_survives_a_dead_worker(ray, tmp_path):
    config = small_config(n_models=4)
    expected = D.run_study(tmp_path / "seq", config, progress=False)
    first = config["models"][0]["id"]
    executor = DieOnce(parallel.RayExecutor(max_retries=2), first, tmp_path / "died")
    summary = D.run_study(tmp_path / "ray", config, progress=False, executor=executor)
    assert (tmp_path / "died").exists()  # the worker of the first model did die once
    assert without_timing(summary) == without_timing(expected)
    assert sorted(p.name for p in (tmp_path / "ray" / "models").glob("*")) == \
        sorted(p.name for p in (tmp_path / "seq" / "models").glob("*"))
    assert D.run_study(tmp_path / "ray", config, progress=False, executor=executor) == summary  # nothing left


def test_ray_transformer_study_equals_sequential(ray, tmp_path):
    pytest.importorskip("sklearn")
    from test_transformer_study import tiny_config

    from quotientsharp.studies import transformers as study

    config = tiny_config()
    config["models"] = config["models"][:2]
    expected = study.run_study(tmp_path / "seq", config, progress=False)
    summary = study.run_study(tmp_path / "ray", config, progress=False, executor=parallel.RayExecutor())
    assert summary["kendall_tau"] == expected["kendall_tau"]
    assert [row["values"] for row in summary["models"]] == [row["values"] for row in expected["models"]]


def test_cli_flags_and_missing_ray(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    parallel.add_arguments(parser)
    assert parallel.executor_from_args(parser, parser.parse_args([])) is sequential

    def no_ray():
        raise ImportError(f"Ray is not installed; --ray/--ray-address need it: {parallel.INSTALL}")

    monkeypatch.setattr(parallel, "import_ray", no_ray)
    with pytest.raises(SystemExit):
        parallel.executor_from_args(parser, parser.parse_args(["--ray"]))
    assert "pip install ray" in capsys.readouterr().err


def test_run_arguments_set_threads_and_progress():
    import torch

    parser = argparse.ArgumentParser()
    parallel.add_run_arguments(parser)
    args = parser.parse_args(["--threads", "3", "--no-progress"])
    before = torch.get_num_threads()
    try:
        assert parallel.run_setup(parser, args) is sequential
        assert torch.get_num_threads() == 3 and args.no_progress
    finally:
        torch.set_num_threads(before)
    bare = argparse.ArgumentParser()
    parallel.add_run_arguments(bare, threads=False)
    assert not hasattr(bare.parse_args([]), "threads")
    assert parallel.run_setup(bare, bare.parse_args([])) is sequential and torch.get_num_threads() == before
