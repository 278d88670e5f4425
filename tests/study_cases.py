"""A tiny ViT study configuration shared by the study tests (no tests here)."""
from __future__ import annotations

from quotientsharp.studies import transformers as study

TINY_ARCH = {"d_model": 16, "depth": 1, "n_heads": 2, "mlp_dim": 32}


def tiny_vit_config(n_models: int, **study_kwargs) -> dict:
    """``study_config("vit", quick=True)`` shrunk to ``n_models`` one-epoch ViTs of width 16,
    2 measurement batches of 16 and 100 bootstrap resamples (``study_kwargs`` go to study_config)."""
    config = study.study_config("vit", quick=True, n_models=n_models, n_iter=3, n_samples=2, **study_kwargs)
    config["arch"] = dict(TINY_ARCH)
    config["models"] = study.population("vit", n_models, seed=0, epochs=[1])
    config["subset"] = {"n_batches": 2, "batch_size": 16, "seed": 0}
    config["n_boot"] = 100
    return config
