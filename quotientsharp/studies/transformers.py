"""Transformer studies (issue #7): does sharpness rank-correlate with generalization in small
ViTs and text transformers trained from scratch?

A deterministic population of models with varied hyperparameters (:func:`~quotientsharp.studies.transformer_population.population`) is trained
with :func:`quotientsharp.train.train_classifier`; every model is then measured on one fixed,
non-augmented training subset shared by the whole population (:func:`~quotientsharp.studies.transformer_training.sharpness_batches`), in eval
mode, through the library's public measures (:data:`~quotientsharp.studies.transformer_measures.MEASURES`). Kendall τ-a of each measure
against the generalization gap (test error − train error, and test loss − train loss) with a
bootstrap 95% CI summarises the study; scipy's τ-b is stored beside it (they differ only on ties).

This module gathers the study's public names (it defines none); each lives in the module of its
job: :mod:`~quotientsharp.studies.transformer_population` (search space, :func:`~quotientsharp.studies.transformer_population.population`),
:mod:`~quotientsharp.studies.transformer_training` (data, models, optimizer factory, training records, the
measurement subset :func:`~quotientsharp.studies.transformer_training.sharpness_batches`,
:class:`~quotientsharp.studies.transformer_training.Recipe`), :mod:`~quotientsharp.studies.transformer_measures` (the registry
:data:`~quotientsharp.studies.transformer_measures.MEASURES`, :func:`~quotientsharp.studies.transformer_measures.measure_unit`) and
:mod:`~quotientsharp.studies.transformer_run` (:func:`~quotientsharp.studies.transformer_run.study_config`,
:func:`~quotientsharp.studies.transformer_run.run_study`, :func:`~quotientsharp.studies.transformer_run.summarize`, the output
folder's layout). τ blocks, τ tables and file writing are the shared report layer,
:mod:`quotientsharp.studies.report` (its names are importable from here too). The command line is
``experiments/study_cli.py``, run as ``experiments/vit_study.py`` and ``experiments/text_study.py``.
To replace a function in a test, patch it in the module that calls it (e.g.
``transformer_run.measure_unit``, ``transformer_training.train_model``).
"""
from __future__ import annotations

from .report import not_learned_notice, tau_block, tau_cell, tau_table, write_models_csv  # noqa: F401 (documented in .report)
from .transformer_measures import (
    MEASURES,
    OPT_IN_MEASURES,
    SPECTRAL_MEASURES,
    STUDY_EPS_REL,
    default_measures,
    measure_unit,
)
from .transformer_population import DEFAULT_DATASET, OPTIMIZERS, SEARCH_SPACE, TASKS, population
from .transformer_run import (
    COMPARISONS,
    GAPS,
    PAPER_ANCHORS,
    TASK_ANCHORS,
    layer_renyi_selection,
    model_rows,
    read_summary,
    require_learned,
    run_study,
    study_config,
    summarize,
)
from .transformer_training import (
    FROM_SCRATCH,
    Recipe,
    build_model,
    load_data,
    load_trained,
    majority_rate,
    optimizer_factory,
    save_state_dict,
    sharpness_batches,
    train_model,
    trained_record,
    word_dropout,
)

__all__ = ["COMPARISONS", "DEFAULT_DATASET", "FROM_SCRATCH", "GAPS", "MEASURES", "OPTIMIZERS", "OPT_IN_MEASURES",
           "PAPER_ANCHORS", "Recipe", "SEARCH_SPACE", "SPECTRAL_MEASURES", "STUDY_EPS_REL", "TASKS", "TASK_ANCHORS",
           "build_model", "default_measures", "layer_renyi_selection", "load_data", "load_trained", "majority_rate",
           "measure_unit", "model_rows", "not_learned_notice", "optimizer_factory", "population", "read_summary",
           "require_learned", "run_study", "save_state_dict", "sharpness_batches", "study_config", "summarize",
           "train_model", "trained_record", "word_dropout"]
