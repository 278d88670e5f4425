"""Transformer studies, the population: the search space of the from-scratch ViT and text
populations and :func:`population`, a deterministic, prefix-stable draw of hyperparameter sets."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TASKS = ("vit", "text")
DEFAULT_DATASET = {"vit": "fashion_mnist", "text": "tweets"}


OPTIMIZERS = ["adamw", "adamw", "sgd", "sam", "asam", "rsam", "saf", "mesa", "geodesic_sam"]
"""Optimizers of the population (AdamW drawn twice as often); the SAM family has an AdamW base."""


SEARCH_SPACE = {
    "vit": {"lr_adamw": [3e-4, 1e-3, 3e-3], "lr_sgd": [0.03, 0.1], "weight_decay": [0.0, 0.01, 0.1, 0.5],
            "weight_decay_sgd": [0.0, 1e-4, 1e-3, 5e-3],
            "batch_size": [64, 128, 256], "epochs": [2, 4, 8, 16], "label_smoothing": [0.0, 0.1],
            "augment": [None, "shift"], "dropout": [0.0, 0.1]},
    "text": {"lr_adamw": [3e-4, 1e-3, 3e-3], "lr_sgd": [0.03, 0.1], "weight_decay": [0.0, 0.01, 0.1, 0.5],
             "weight_decay_sgd": [0.0, 1e-4, 1e-3, 5e-3],
             "batch_size": [64, 128, 256], "epochs": [1, 2, 4], "label_smoothing": [0.0, 0.1],
             "augment": [None, "word_dropout"], "dropout": [0.0, 0.1]},
}
"""Hyperparameter choices per task; every model draws each one independently. Weight decay is
AdamW's decoupled coefficient (per-step shrinkage lr·wd ≤ 1.5e-3); plain SGD couples it to the
gradient with a 30–300× larger lr, so it draws from ``weight_decay_sgd`` (lr·wd ≤ 5e-4): with
the AdamW grid, lr·wd = 0.05 decays every weight to ~1e-30 within a few hundred steps."""


def population(task: str, n_models: int, seed: int = 0, epochs: Sequence[int] | None = None) -> list[dict]:
    """``n_models`` hyperparameter sets drawn from :data:`SEARCH_SPACE` with ``seed``.

    Model i's draw depends only on ``(seed, i)``, so a larger population extends a smaller one.
    ``epochs`` overrides the task's epoch choices (quick runs).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    space = dict(SEARCH_SPACE[task], **({"epochs": list(epochs)} if epochs is not None else {}))
    optimizers = OPTIMIZERS
    models = []
    for i in range(n_models):
        rng = np.random.default_rng([seed, i])
        pick = lambda key: space[key][int(rng.integers(len(space[key])))]  # noqa: E731
        optimizer = optimizers[int(rng.integers(len(optimizers)))]
        sgd = optimizer == "sgd"
        lr = pick("lr_sgd") if sgd else pick("lr_adamw")
        models.append({"id": f"{task}{i:03d}", "index": i, "optimizer": optimizer, "lr": lr,
                       "weight_decay": pick("weight_decay_sgd" if sgd else "weight_decay"),
                       **{k: pick(k) for k in ("batch_size", "epochs", "label_smoothing", "augment", "dropout")},
                       "init_seed": seed * 100_003 + i})
    return models
