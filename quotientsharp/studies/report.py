"""The studies' one report layer: τ blocks, paired τ differences, markdown τ tables and the
atomic writing of every report file (JSON, CSV, markdown).

Both study families write through it: the diagonal-network study
(:mod:`quotientsharp.studies.diagonal`, τ against the test loss at every radius ρ) and the
transformer studies (:mod:`quotientsharp.studies.transformers`, from scratch, and
:mod:`quotientsharp.studies.finetune`: τ against the error and loss gaps). The statistics
themselves (τ-a, bootstrap CIs) are :mod:`quotientsharp.studies.kendall`'s. Every file goes through one
atomic writer (:func:`write_atomic`: temporary file beside the target, fsync, ``os.replace``),
which the unit store of :mod:`quotientsharp.studies.runner` uses too.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

from .kendall import bootstrap_ci, bootstrap_difference_ci, has_ties, kendall_tau

__all__ = ["measured_rows", "tau_block", "paired_differences", "tau_ci_text", "difference_text", "tau_cell",
           "tau_table", "not_learned_notice", "rho_tau_table", "write_json_atomic", "write_csv_atomic",
           "write_atomic", "write_text_atomic", "write_models_csv"]


# --------------------------------------------------------------------------- statistics blocks
def measured_rows(rows: Sequence[Mapping[str, Any]], *names: str) -> list:
    """The rows with a finite value of every measure in ``names`` (``row["values"][name]``)."""
    return [row for row in rows
            if all(row["values"].get(n) is not None and math.isfinite(row["values"][n]) for n in names)]


def paired_differences(rows: Sequence[Mapping[str, Any]], gaps: Iterable[str],
                       comparisons: Iterable[tuple[str, str]], n_boot: int, seed: int) -> dict[str, dict]:
    """``{gap: {"a - b": [τ_a − τ_b, lo, hi]}}`` for each measure pair ``(a, b)`` of ``comparisons``
    measured (finite) on at least two models: paired bootstrap, both measures on the same resampled
    models (:func:`~quotientsharp.studies.kendall.bootstrap_difference_ci`)."""
    gaps = list(gaps)
    differences: dict[str, dict] = {gap: {} for gap in gaps}
    for a, b in comparisons:
        both = measured_rows(rows, a, b)
        if len(both) > 1:
            for gap in gaps:
                differences[gap][f"{a} - {b}"] = list(bootstrap_difference_ci(
                    [r["values"][a] for r in both], [r["values"][b] for r in both], [r[gap] for r in both],
                    n_boot, seed=seed))
    return differences


def tau_block(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int, gaps: Iterable[str],
              comparisons: Iterable[tuple[str, str]] = ()) -> dict:
    """Kendall τ-a, scipy's τ-b and the 95% bootstrap CI of τ-a of every measure in ``rows``
    (each row: ``"id"``, the ``gaps`` and ``"values"`` ``{measure: value}``) against every gap,
    with which measures have tied values (τ-a ≠ τ-b there) and, under ``"missing"``, the models
    left out of a measure's τ for want of a finite value, and under ``"tau_difference"`` the
    :func:`paired_differences` of ``comparisons``."""
    gaps = list(gaps)
    names = list(dict.fromkeys(n for row in rows for n in row["values"]))
    tau: dict[str, dict] = {gap: {} for gap in gaps}
    tau_b: dict[str, dict] = {gap: {} for gap in gaps}
    ci: dict[str, dict] = {gap: {} for gap in gaps}
    ties, missing = {}, {}
    for name in names:
        have = measured_rows(rows, name)
        s = [row["values"][name] for row in have]
        ties[name] = has_ties(s)
        if len(have) < len(rows):
            missing[name] = [row["id"] for row in rows if row not in have]
        for gap in gaps:
            g = [row[gap] for row in have]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # ties are reported in "ties"
                tau[gap][name] = kendall_tau(s, g) if len(s) > 1 else None
            b = float(kendalltau(s, g).statistic) if len(s) > 1 else math.nan  # nan: a constant input
            tau_b[gap][name] = b if math.isfinite(b) else None
            ci[gap][name] = list(bootstrap_ci(s, g, n_boot, seed=seed)) if len(s) > 1 else None
    return {"n_models": len(rows), "kendall_tau": tau, "kendall_tau_b": tau_b, "ci95": ci, "ties": ties,
            "gap_has_ties": {gap: has_ties([row[gap] for row in rows]) for gap in gaps}, "missing": missing,
            "tau_difference": paired_differences(rows, gaps, comparisons, n_boot, seed)}


# --------------------------------------------------------------------------- markdown
def tau_ci_text(tau: float, ci: Sequence[float]) -> str:
    """``τ [lo, hi]`` with signs and two decimals, e.g. ``-0.50 [-0.71, -0.27]``."""
    return f"{tau:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def difference_text(d: Sequence[float] | None) -> str:
    """A paired difference ``[Δτ, lo, hi]`` as ``Δτ [lo, hi]``; ``—`` where it was not computed."""
    return "—" if d is None else tau_ci_text(d[0], d[1:])


def tau_cell(block: Mapping[str, Any], gap: str, name: str) -> str:
    """``τ-a [CI]`` of one measure in a τ block, with ``(τ-b …)`` where ties make them differ."""
    t, c = block["kendall_tau"][gap].get(name), block["ci95"][gap].get(name)
    if t is None:
        return "—"
    b = block.get("kendall_tau_b", {}).get(gap, {}).get(name)
    tau_b = f" (τ-b {b:+.2f})" if b is not None and abs(b - t) >= 0.005 else ""
    missing = block.get("missing", {}).get(name, [])
    n = f" (n={block['n_models'] - len(missing)})" if missing else ""
    return f"{tau_ci_text(t, c)}{tau_b}{n}"


def tau_table(summary: Mapping[str, Any]) -> str:
    """Markdown of a transformer-study summary: τ-a [95% CI] against every gap of
    ``summary["gaps"]`` for every measure (τ-b beside it where ties make them differ), the same
    over the models that learned where some did not, paper anchors beside; last, the paired τ
    differences geodesic − adaptive."""
    anchors = summary["paper"]
    blocks = [(summary, "")]
    if summary.get("learned", {}).get("excluded"):
        blocks.append((summary["learned"], f", {summary['learned']['n_models']} that learned"))
    header = (["measure"] + [f"τ vs {text}{suffix}" for _, suffix in blocks for text in summary["gaps"].values()]
              + list(anchors))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in summary["kendall_tau"]["error_gap"]:
        cells = [name] + [tau_cell(block, gap, name) for block, _ in blocks for gap in summary["gaps"]]
        cells += [f"{a[name]:+.2f}" if name in a else "" for a in anchors.values()]
        lines.append("| " + " | ".join(cells) + " |")
    for pair in summary.get("tau_difference", {}).get("error_gap", {}):
        cells = [f"Δτ {pair.replace(' - ', ' − ')} (paired)"]
        for block, _ in blocks:
            for gap in summary["gaps"]:
                cells.append(difference_text(block.get("tau_difference", {}).get(gap, {}).get(pair)))
        cells += ["" for _ in anchors]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(not_learned_notice(summary) + lines)


def not_learned_notice(summary: Mapping[str, Any]) -> list[str]:
    """Lines that say plainly how many models never learned (training accuracy within one point
    of the majority-class rate), and that τ means nothing when fewer than two learned; [] if all did."""
    learned = summary.get("learned")
    if not learned or not learned["excluded"]:
        return []
    n, bad = summary["n_models"], len(learned["excluded"])
    if n - bad < 2:
        return [f"**NOT LEARNED: {bad} of {n} models never rose above the majority-class training accuracy "
                f"({learned['chance_acc']:.3f}); the τ values below are meaningless.**", ""]
    return [f"**{bad} of {n} models did not learn** (training accuracy ≤ majority rate "
            f"{learned['chance_acc']:.3f} + 0.01: {', '.join(learned['excluded'])}); the columns "
            f"\"that learned\" leave them out.", ""]


def rho_tau_table(summary: Mapping[str, Any]) -> str:
    """Markdown of a diagonal-study summary: τ [95% CI] of every measure at every ρ of
    ``summary["per_rho"]`` (the headline radius marked), and the paper's value."""
    rhos = list(summary["per_rho"])
    head = str(summary["headline_rho"])
    names = list(dict.fromkeys(n for r in rhos for n in summary["per_rho"][r]["kendall_tau"]))
    header = ["measure"] + [f"ρ={r}" + (" (headline)" if r == head else "") for r in rhos] + ["paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = []
        for r in rhos:
            entry = summary["per_rho"][r]
            cells.append(tau_ci_text(entry["kendall_tau"][name], entry["ci95"][name])
                         if name in entry["kendall_tau"] else "—")
        paper = summary["paper"].get(name)
        lines.append("| " + " | ".join([name] + cells + ["—" if paper is None else f"{paper:+.2f}"]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- files
def write_atomic(path: str | os.PathLike, write: Callable[[Any], Any], newline: str | None = None) -> None:
    """Call ``write(f)`` on a temporary text file beside ``path`` (mode 0644), fsync it, then
    ``os.replace`` it onto ``path``: readers see the old file or the whole new one, never a part;
    a failed ``write`` leaves no temporary file. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 1, NaN allowed) to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=1, allow_nan=True))


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (``header``, then one line per row; None as an empty cell) atomically."""
    def write(f):
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    write_atomic(path, write, newline="")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (a markdown table, …) to ``path`` atomically."""
    write_atomic(path, lambda f: f.write(text))


def write_models_csv(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """``models.csv`` of a transformer-study summary: one row per model (hyperparameters,
    metrics, gaps, then every measure's value)."""
    rows = summary["models"]
    names = list(dict.fromkeys(n for row in rows for n in row["values"]))
    fixed = [k for k in rows[0] if k != "values"]
    write_csv_atomic(path, fixed + names,
                     ([row[k] for k in fixed] + [row["values"].get(n) for n in names] for row in rows))
