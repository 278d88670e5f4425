"""Every number the README quotes from a study or benchmark equals the committed result file it
comes from, rounded as printed (issue 18, item 4).

Pure JSON and regular expressions: a README edit or a result change that disagrees fails here.
Tables are parsed cell by cell; prose claims are listed in explicit tables below (a regex over the
README with whitespace collapsed, and the value each captured number must round to). A number is
"as printed" when it lies within half a unit of its last printed digit of the file's value
(``2e-3``: of the mantissa's last digit).
"""
from __future__ import annotations

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")
FLAT = " ".join(README.split())  # prose with line breaks collapsed
N = r"([+\-−]?\d+(?:\.\d+)?(?:e-?\d+)?)"  # one printed number, captured


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def value_of(text: str) -> float:
    return float(text.replace("−", "-"))


def printed_as(text: str, value: float) -> bool:
    """Whether ``text`` is ``value`` rounded to ``text``'s last digit."""
    mantissa, _, exponent = text.replace("−", "-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (-decimals + (int(exponent) if exponent else 0))
    return abs(value_of(text) - value) <= 0.5 * unit * (1 + 1e-9) + 1e-15


def check(text: str, value: float, where: str) -> None:
    assert printed_as(text, value), f"README prints {text} for {where}, the file holds {value!r}"


def claim(pattern: str) -> tuple[str, ...]:
    """The numbers captured by ``pattern`` in the README (whitespace collapsed); exactly one match."""
    found = re.findall(pattern, FLAT)
    assert len(found) == 1, f"README: expected one match of {pattern!r}, found {len(found)}"
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def table_after(anchor: str) -> list[list[str]]:
    """Rows (header first, separator dropped) of the first markdown table after ``anchor``."""
    start = README.index(anchor)
    rows, started = [], False
    for line in README[start:].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif started:
            break
    assert rows, f"no table after {anchor!r}"
    return rows


def numbers(cell: str) -> list[str]:
    return re.findall(r"[+\-−]?\d+\.\d+", cell)


# --- the diagonal-network study ---------------------------------------------------------------

DIAGONAL_ROWS = {
    "adaptive": "adaptive", "Euclidean": "euclidean", "geodesic, inverse metric": "geodesic_inv",
    "geodesic, mixed metric (metric-norm ball)": "geodesic_mix",
    "geodesic, mixed metric, ball `√2‖b‖ ≤ ρ` (`mix_bnorm`)": "geodesic_mix_bnorm",
    "geodesic, inverse metric, RK4 geodesic": "geodesic_inv_ode",
}
DIAGONAL_PAPER = {"geodesic_mix_bnorm": "geodesic_mix", "geodesic_inv_ode": "geodesic_inv"}


def test_diagonal_study_table():
    summary = load("diagonal_study_summary.json")
    header, *rows = table_after("Kendall τ-a of sharpness against the test loss, full study")
    rhos = [re.match(r"ρ = ([\d.]+)", h).group(1) if h.startswith("ρ") else None for h in header]
    assert [r[0] for r in rows] == list(DIAGONAL_ROWS), "diagonal table rows changed"
    for row in rows:
        measure = DIAGONAL_ROWS[row[0]]
        for rho, cell in zip(rhos, row):
            if rho is None:
                continue
            block = summary["per_rho"][rho]
            if cell == "—":
                assert measure not in block["kendall_tau"], f"{measure} at ρ={rho} is in the file but not the README"
                continue
            nums = numbers(cell)
            check(nums[0], block["kendall_tau"][measure], f"diagonal τ {measure} ρ={rho}")
            if len(nums) == 3:
                for text, v in zip(nums[1:], block["ci95"][measure]):
                    check(text, v, f"diagonal CI {measure} ρ={rho}")
            if rho == str(summary["headline_rho"]):
                check(nums[0], summary["kendall_tau"][measure], f"headline τ {measure}")
        paper = numbers(row[-1])
        if paper:
            check(paper[0], summary["paper"][DIAGONAL_PAPER.get(measure, measure)], f"paper τ {measure}")


def test_diagonal_study_prose():
    s = load("diagonal_study_summary.json")
    lo, hi = claim(r"test losses span " + N + "–" + N)
    check(lo, s["population"]["test_loss_range"][0], "smallest test loss")
    check(hi, s["population"]["test_loss_range"][1], "largest test loss")
    first, last = claim(r"\(" + N + r" to " + N + r"·10⁵ GD steps, all converged")
    check(first, s["population"]["steps_range"][0], "fewest GD steps")
    check(last, s["population"]["steps_range"][1] / 1e5, "most GD steps / 1e5")
    assert s["population"]["all_converged"]
    wall, = claim(r"The full study took " + N + r" min wall time")
    check(wall, s["wall_seconds"] / 60, "diagonal wall minutes")
    closed = [v for k, v in s["measure_seconds"].items() if k != "geodesic_inv_ode"]
    lo, hi, rk4 = claim(r"the per-measure sums are " + N + "–" + N + r" min for each closed-form measure "
                        r"over all five radii and " + N + r" min for the RK4 variant")
    check(lo, min(closed) / 60, "fastest closed-form measure, min")
    check(hi, max(closed) / 60, "slowest closed-form measure, min")
    check(rk4, s["measure_seconds"]["geodesic_inv_ode"] / 60, "RK4 measure, min")
    train, = claim(r"training ~" + N + r" min")
    check(train, (s["wall_seconds"] - sum(s["measure_seconds"].values())) / 60, "wall − measuring, min")
    a, b = claim(r"\[1 − " + N + r"·10⁻¹², 1 − " + N + r"·10⁻¹³\]")
    check(a, (1 - s["rk4_over_closed_form"]["range"][0]) * 1e12, "1 − smallest RK4 ratio, ×1e12")
    check(b, (1 - s["rk4_over_closed_form"]["range"][1]) * 1e13, "1 − largest RK4 ratio, ×1e13")
    inv, paper_inv = claim(r"the inverse value matches the paper's \(" + N + " vs " + N + r"\)")
    check(inv, s["kendall_tau"]["geodesic_inv"], "headline inverse τ")
    check(paper_inv, s["paper"]["geodesic_inv"], "paper inverse τ")
    ada, paper_ada = claim(r"adaptive is " + N + ", not " + N)
    check(ada, s["kendall_tau"]["adaptive"], "headline adaptive τ")
    check(paper_ada, s["paper"]["adaptive"], "paper adaptive τ")
    bnorm, = claim(r"only with the ball `√2‖b‖ ≤ ρ` \(" + N + r", constant over ρ\)")
    for rho, block in s["per_rho"].items():
        check(bnorm, block["kendall_tau"]["geodesic_mix_bnorm"], f"b-norm τ at ρ={rho}")
    lo, hi = claim(r"its sign is opposite \(" + N + " to " + N + r", growing with ρ\)")
    mix = [s["per_rho"][r]["kendall_tau"]["geodesic_mix"] for r in sorted(s["per_rho"], key=float)]
    assert mix == sorted(mix), "mixed-metric τ does not grow with ρ"
    check(lo, mix[0], "mixed τ at the smallest ρ")
    check(hi, mix[-1], "mixed τ at the largest ρ")


# --- transformer studies ------------------------------------------------------------------------

def _tau_table_check(task: str, anchor: str):
    summary = load(f"{task}_study_summary.json")
    header, *rows = table_after(anchor)
    columns = []
    for h in header[1:]:
        gap = "error_gap" if "test error" in h else "loss_gap" if "test loss" in h else None
        if gap is None:
            columns.append(("paper", h))
            continue
        learned = re.search(r"(\d+) that learned", h)
        block = summary["learned"] if learned else summary
        if learned:
            assert int(learned.group(1)) == summary["learned"]["n_models"], h
        columns.append((block, gap))
    measures = [r[0] for r in rows if not r[0].startswith("Δτ")]
    assert measures == list(summary["kendall_tau"]["error_gap"]), f"{task}: table rows ≠ measures in the file"
    for row in rows:
        label = row[0]
        diff = re.match(r"Δτ (\S+) − (\S+) \(paired\)", label)
        for (block, key), cell in zip(columns, row[1:]):
            if block == "paper":
                paper = summary["paper"].get(key, {})
                if cell:
                    check(cell, paper[label], f"{task} paper column {key}, {label}")
                else:
                    assert label not in paper or diff, f"{task}: paper value of {label} in {key} not printed"
                continue
            nums = numbers(cell)
            if diff:
                expected = block["tau_difference"][key][f"{diff.group(1)} - {diff.group(2)}"]
            else:
                expected = [block["kendall_tau"][key][label], *block["ci95"][key][label]]
            assert len(nums) == 3, f"{task} {label}: cell {cell!r}"
            for text, v in zip(nums, expected):
                check(text, v, f"{task} {label} vs {key}")


def test_vit_tau_table():
    _tau_table_check("vit", "**ViT on Fashion-MNIST**")


def test_text_tau_table():
    _tau_table_check("text", "**Text transformer on tweets**")


def test_transformer_population_lines():
    for task, anchor in (("vit", r"\*\*ViT on Fashion-MNIST\*\*, "), ("text", r"\*\*Text transformer on tweets\*\*, ")):
        s = load(f"{task}_study_summary.json")
        n, acc_lo, acc_hi, gap_lo, gap_hi = claim(anchor + N + r" models(?: \(`--n-models 48`\))?, test accuracy "
                                                  + N + "–" + N + r"%, error gaps " + N + " to " + N + " points")
        assert int(n) == s["n_models"]
        check(acc_lo, 100 * s["population"]["test_acc"][0], f"{task} lowest test accuracy, %")
        check(acc_hi, 100 * s["population"]["test_acc"][1], f"{task} highest test accuracy, %")
        check(gap_lo, 100 * s["population"]["error_gap"][0], f"{task} smallest error gap, points")
        check(gap_hi, 100 * s["population"]["error_gap"][1], f"{task} largest error gap, points")
    text = load("text_study_summary.json")
    excluded = [m for m in text["models"] if m["id"] in text["learned"]["excluded"]]
    assert "(one SGD model, one epoch, stayed at the majority rate)" in FLAT
    assert [(m["optimizer"], m["epochs"]) for m in excluded] == [("sgd", 1)]


def test_transformer_timings():
    v24, t24 = load("vit_study_24_summary.json"), load("text_study_24_summary.json")
    v48, t48 = load("vit_study_summary.json"), load("text_study_summary.json")

    def measuring(s):
        return sum(s["seconds"]["measures"].values())

    vmin, vtrain, vmeas, tmin, ttrain, tmeas = claim(
        r"the default 24 models take " + N + r" min \(ViT: " + N + r" s training \+ " + N + r" s measuring\) and "
        + N + r" min \(text: " + N + r" s \+ " + N + r" s\)")
    for s, total, train, meas, task in ((v24, vmin, vtrain, vmeas, "vit"), (t24, tmin, ttrain, tmeas, "text")):
        assert s["n_models"] == 24
        check(train, s["seconds"]["train"], f"{task} 24-model training s")
        check(meas, measuring(s), f"{task} 24-model measuring s")
        check(total, (s["seconds"]["train"] + measuring(s)) / 60, f"{task} 24-model total min")
    share, = claim(r"SLQ and the quotient-Hessian Rényi run are " + N + r"% of the measuring")
    for s in (v24, t24):
        m = s["seconds"]["measures"]
        check(share, 100 * (m["hessian_slq"] + m["quotient_renyi"]) / measuring(s), "SLQ + quotient Rényi share")
    lo, hi, vi, vm, va, ti, tm, ta = claim(
        r"Worst-case geodesic sharpness costs " + N + "–" + N + r"× adaptive sharpness in the same run \(ViT "
        + N + " / " + N + r" s inv / mix against " + N + r" s over 48 models; text " + N + " / " + N
        + r" s against " + N + r" s\)")
    ratios = []
    for s, inv, mix, ada in ((v48, vi, vm, va), (t48, ti, tm, ta)):
        m = s["seconds"]["measures"]
        check(inv, m["geodesic_inv"], "geodesic inv s")
        check(mix, m["geodesic_mix"], "geodesic mix s")
        check(ada, m["adaptive"], "adaptive s")
        ratios += [m["geodesic_inv"] / m["adaptive"], m["geodesic_mix"] / m["adaptive"]]
    check(lo, min(ratios), "smallest geodesic/adaptive time ratio")
    check(hi, max(ratios), "largest geodesic/adaptive time ratio")
    def first_run(s):  # the study's own run, without the measures an extension added later
        return measuring(s) - sum(s["seconds"]["measures"][m] for m in s.get("extension", {}).get("measures", []))

    v_all, t_all = claim(r"reusing the first 24: " + N + r" min \(ViT\) and " + N + r" min \(text\) in all")
    check(v_all, (v48["seconds"]["train"] + first_run(v48)) / 60, "vit 48-model total min")
    check(t_all, (t48["seconds"]["train"] + first_run(t48)) / 60, "text 48-model total min")


def test_transformer_discussion():
    vit, text = load("vit_study_summary.json"), load("text_study_summary.json")

    def tau(s, gap, m):
        return [s["kendall_tau"][gap][m], *s["ci95"][gap][m]]

    got = claim(r"MNLI BERTs: " + N + r" \[" + N + ", " + N + r"\] against " + N + r" \[" + N + ", " + N
                + r"\] \(paper " + N + " vs " + N + r"\), paired difference " + N + r" \[" + N + ", " + N
                + r"\] against the error gap and " + N + r" \[" + N + ", " + N + r"\] against the loss gap; "
                r"the average case agrees \(" + N + r" \[" + N + ", " + N + r"\]\)")
    expected = [*tau(text, "error_gap", "geodesic_inv"), *tau(text, "error_gap", "adaptive"),
                text["paper"]["MNLI BERT"]["geodesic_inv"], text["paper"]["MNLI BERT"]["adaptive"],
                *text["tau_difference"]["error_gap"]["geodesic_inv - adaptive"],
                *text["tau_difference"]["loss_gap"]["geodesic_inv - adaptive"],
                *text["tau_difference"]["error_gap"]["geodesic_inv_avg - adaptive_avg"]]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "text discussion")
    lo, hi = claim(r"Tr H do not correlate \(" + N + " to " + N + r"\)")
    flat = [text["kendall_tau"]["error_gap"][m] for m in ("euclidean", "hessian_max_eigenvalue", "hessian_trace")]
    check(lo, min(flat), "text Euclidean/λ_max/Tr H, lowest")
    check(hi, max(flat), "text Euclidean/λ_max/Tr H, highest")
    got = claim(r"\(" + N + r"; paired " + N + r" \[" + N + ", " + N + r"\]\), unlike the paper's " + N)
    for t, v in zip(got, [text["kendall_tau"]["error_gap"]["geodesic_mix"],
                          *text["tau_difference"]["error_gap"]["geodesic_mix - adaptive"],
                          text["paper"]["MNLI BERT"]["geodesic_mix"]], strict=True):
        check(t, v, "text mixed metric")
    got = claim(r"\(geodesic inv " + N + r" \[" + N + ", " + N + r"\], adaptive " + N + r" \[" + N + ", " + N
                + r"\], Euclidean " + N + r"\), the opposite sign of the paper's ImageNet ViTs \(" + N + " / " + N
                + " / " + N + r"\); the paired geodesic-inv − adaptive difference is " + N + r" \[" + N + ", " + N
                + r"\] against the error gap \(" + N + r" \[" + N + ", " + N + r"\] against the loss gap\), "
                r"the mixed metric " + N)
    paper = vit["paper"]["ImageNet ViT"]
    for t, v in zip(got, [*tau(vit, "error_gap", "geodesic_inv"), *tau(vit, "error_gap", "adaptive"),
                          vit["kendall_tau"]["error_gap"]["euclidean"],
                          paper["geodesic_inv"], paper["geodesic_mix"], paper["adaptive"],
                          *vit["tau_difference"]["error_gap"]["geodesic_inv - adaptive"],
                          *vit["tau_difference"]["loss_gap"]["geodesic_inv - adaptive"],
                          vit["tau_difference"]["error_gap"]["geodesic_mix - adaptive"][0]], strict=True):
        check(t, v, "ViT discussion")
    most, = claim(r"The gaps are small \(at most " + N + r" points\)")
    check(most, 100 * vit["population"]["error_gap"][1], "largest ViT error gap, points")
    v24 = load("vit_study_24_summary.json")
    assert "the first 24 models alone gave no interval that excluded 0" in FLAT
    intervals = [ci for gap in v24["ci95"].values() for ci in gap.values()]
    intervals += [d[1:] for gap in v24["tau_difference"].values() for d in gap.values()]
    assert all(lo <= 0 <= hi for lo, hi in intervals)

    def span(summaries, names):
        return [s["kendall_tau"][g][m] for s in summaries for g in ("error_gap", "loss_gap") for m in names]

    hi, lo, paper_renyi = claim(r"Rényi sharpness is negative\*\* \(" + N + " to " + N + r"\) where the Rényi paper reports " + N)
    renyi = span((vit, text), ("renyi_0.5", "renyi_1.5"))
    check(hi, max(renyi), "highest Rényi τ")
    check(lo, min(renyi), "lowest Rényi τ")
    check(paper_renyi, vit["paper"]["Rényi paper (ResNet-18/CIFAR-10)"]["renyi_0.5"], "Rényi paper τ")
    vlo, vhi, thi, tlo = claim(r"null on the ViTs \(" + N + " to " + N + r"\) and negative on text \(" + N + " to " + N + r"\)")
    q = ("quotient_renyi_0.5", "quotient_renyi_1.5")
    check(vlo, min(span((vit,), q)), "ViT quotient Rényi, lowest")
    check(vhi, max(span((vit,), q)), "ViT quotient Rényi, highest")
    check(thi, max(span((text,), q)), "text quotient Rényi, highest")
    check(tlo, min(span((text,), q)), "text quotient Rényi, lowest")


def _confounders_module():
    spec = importlib.util.spec_from_file_location("study_confounders", ROOT / "experiments" / "study_confounders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["vit", "text"])
def test_confounder_files_match_the_summaries(task):
    """The committed confounder file is what the script computes from the committed summary."""
    committed = load(f"{task}_study_confounders.json")
    recomputed = _confounders_module().confounders(load(f"{task}_study_summary.json")["models"])
    assert committed == {"source": f"benchmarks/results/{task}_study_summary.json", **recomputed}


@pytest.mark.parametrize("name", ["vit", "text_random"])
def test_finetune_confounder_files_match_the_summaries(name):
    """finetune/<name>/confounders.json is what the script computes from the committed summary:
    every drawn hyperparameter and the training accuracy, whole-network measures, no optimizer ranks."""
    module = _confounders_module()
    source = f"finetune/{name}/summary.json"
    recomputed = module.confounders(load(source)["models"], hyperparameters=module.FINETUNE_HYPERPARAMETERS[name],
                                    per_layer=False)
    committed = load(f"finetune/{name}/confounders.json")
    assert committed == {"source": f"benchmarks/results/{source}", **recomputed}
    assert "median_rank_by_optimizer" not in committed and not any("@" in m for m in committed["tau_vs_hyperparameter"]["lr"])
    assert "train_acc" in committed["gap_tau_vs_hyperparameter"]


def test_confounders_match_independent_pair_count():
    """τ-a of Euclidean sharpness against lr counted pair by pair from the rows (no library code)."""
    rows = load("text_study_summary.json")["models"]
    x = [r["values"]["euclidean"] for r in rows]
    y = [r["lr"] for r in rows]
    def sign(a):
        return (a > 0) - (a < 0)
    m = len(rows)
    tau_a = sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i in range(m) for j in range(i + 1, m)) / (m * (m - 1) / 2)
    assert tau_a == pytest.approx(load("text_study_confounders.json")["tau_vs_hyperparameter"]["lr"]["euclidean"]["tau_a"],
                                  abs=1e-12)
    ranks = sorted(range(m), key=lambda i: x[i])
    sgd_ranks = [ranks.index(i) + 1 for i in range(m) if rows[i]["optimizer"] == "sgd"]
    assert statistics.median(sgd_ranks) == \
        load("text_study_confounders.json")["median_rank_by_optimizer"]["euclidean"]["sgd"]


def test_confounder_claims():
    vit, text = load("vit_study_confounders.json"), load("text_study_confounders.json")

    def lr(c, m):
        return c["tau_vs_hyperparameter"]["lr"][m]["tau_a"]

    for c in (vit, text):
        assert c["statistic"].startswith("Kendall tau-a")
    assert "Sharpness also tracks the training recipe (τ-a as in the tables" in FLAT
    got = claim(r"Euclidean sharpness falls with the learning rate \(τ " + N + r" ViT, " + N + r" text\), "
                r"worst-case geodesic sharpness with the inverse metric and adaptive sharpness barely \(" + N + " / "
                + N + " and " + N + " / " + N + r"\), but not every invariant measure: the mixed metric falls more \("
                + N + " / " + N + r"\), and so do the average-case inverse-metric geodesic and adaptive sharpness "
                r"on the ViTs \(" + N + " / " + N + r"\); the error gap grows with the "
                r"number of epochs \(τ " + N + r" ViT, " + N + r" text\) more than with the learning rate \("
                + N + " / " + N + r"\)")
    def gap(c, hp):
        return c["gap_tau_vs_hyperparameter"][hp]["error_gap"]["tau_a"]
    expected = [lr(vit, "euclidean"), lr(text, "euclidean"), lr(vit, "geodesic_inv"), lr(text, "geodesic_inv"),
                lr(vit, "adaptive"), lr(text, "adaptive"), lr(vit, "geodesic_mix"), lr(text, "geodesic_mix"),
                lr(vit, "geodesic_inv_avg"), lr(vit, "adaptive_avg"),
                gap(vit, "epochs"), gap(text, "epochs"), gap(vit, "lr"), gap(text, "lr")]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "confounder τ-a")
    both = ("geodesic_inv", "geodesic_inv_avg", "geodesic_mix", "adaptive", "adaptive_avg")
    for c in (vit, text):
        for m in both:
            assert set(c["flattest_two"][m]) == {"asam", "rsam"}, m
        assert c["flattest_two"]["geodesic_mix_avg"][1] == "sgd"
        assert len(c["n_by_optimizer"]) == 8
    assert set(vit["flattest_two"]["euclidean"]) == {"asam", "rsam"}
    assert text["flattest_two"]["euclidean"][0] == "sgd"
    rank, n = claim(r"lowest Euclidean sharpness \(median rank " + N + " of " + N + r"\)")
    check(rank, text["median_rank_by_optimizer"]["euclidean"]["sgd"], "SGD median Euclidean rank")
    assert int(n) == text["n_models"]


# --- sharpness-aware training --------------------------------------------------------------------

def test_train_compare_table():
    summary = load("train_compare_summary.json")
    _, *rows = table_after("Mean ± std over seeds; sharpness of the final")
    assert [r[0] for r in rows] == list(summary)
    for row in rows:
        s = summary[row[0]]
        acc, time, geo, renyi = (numbers(c) for c in row[1:5])
        for t, v in zip(acc, [100 * x for x in s["test_acc"]], strict=True):
            check(t, v, f"{row[0]} test accuracy")
        check(time[0], s["time_vs_sgd"], f"{row[0]} time/epoch vs SGD")
        for t, v in zip(geo, s["geodesic_sharpness"], strict=True):
            check(t, v, f"{row[0]} geodesic sharpness")
        for t, v in zip(renyi, s["renyi_sharpness"], strict=True):
            check(t, v, f"{row[0]} Rényi sharpness")
    seeds, runs = claim(N + r" seeds each \(all " + N + r" runs")
    assert {len(s["seeds"]) for s in summary.values()} == {int(seeds)}
    assert int(runs) == len(summary) * int(seeds)


# --- benchmarks ----------------------------------------------------------------------------------

def _benchmark_row(name: str) -> str:
    row = [r for r in table_after("Run by hand (`python benchmarks/<name>.py`") if r[0] == f"`{name}`"]
    assert len(row) == 1, name
    return " | ".join(row[0])


def _row_claim(name: str, pattern: str) -> tuple[str, ...]:
    found = re.findall(pattern, _benchmark_row(name))
    assert len(found) == 1, f"{name}: {pattern!r} matched {len(found)} times"
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def test_sharpness_cost_row():
    b = load("sharpness_cost.json")
    params, bs, it, rep = _row_claim("sharpness_cost.py", r"TinyViT \(" + N + r"k params\), 2 batches × " + N
                                     + ", " + N + r" ascent iterations, median of " + N)
    check(params, b["config"]["n_parameters"] / 1e3, "TinyViT parameters, k")
    assert (int(bs), int(it), int(rep)) == (b["config"]["batch_size"], b["config"]["n_iter"], b["config"]["repeats"])
    mix, inv, tmix, tinv, exact, texact, eucl, mmix, minv, mexact = _row_claim(
        "sharpness_cost.py", r"geodesic mix \*\*" + N + r"×\*\*, inv \*\*" + N + r"×\*\* \(targets ≤ " + N + " / ≤ "
        + N + r"\), exact RK4 geodesic \(8 steps\) \*\*" + N + r"×\*\* \(target ≤ " + N + r"\), Euclidean " + N
        + r"×; peak memory mix/inv " + N + "×/" + N + r"×, exact " + N + "×")
    r, m = b["ratios_vs_adaptive"], b["memory_ratios_vs_adaptive"]
    for t, v in ((mix, r["geodesic_mix"]), (inv, r["geodesic_inv"]), (exact, r["geodesic_exact"]),
                 (texact, b["targets"]["geodesic_exact"]), (eucl, r["euclidean"]), (tmix, b["targets"]["geodesic_mix"]),
                 (tinv, b["targets"]["geodesic_inv"]), (mmix, m["geodesic_mix"]), (minv, m["geodesic_inv"]),
                 (mexact, m["geodesic_exact"])):
        check(t, v, "sharpness_cost")
    assert b["config"]["exact_rk4_steps"] == 8


def test_hessian_cost_row_and_notes():
    b = load("hessian_cost.json")
    params, batch = _row_claim("hessian_cost.py", r"transformer \(" + N + r"k params\), batch " + N)
    check(params, b["model"]["n_params"] / 1e3, "transformer parameters, k")
    assert int(batch) == b["model"]["batch"]
    got = _row_claim("hessian_cost.py",
                     r"HVP reverse-over-reverse \(default\) \*\*" + N + r"×\*\*, forward-over-reverse " + N
                     + r"×, curvlinops " + N + r"× → \*\*" + N + r"× curvlinops' time\*\*; 8-vector blocks " + N
                     + r"×; peak memory " + N + r"× a gradient vs " + N + r"× for curvlinops; top eigenvalue " + N
                     + r" s \(Lanczos, rel\. error " + N + r"\) vs " + N + r" s for curvlinops \+ `eigsh` \(" + N + r"\)")
    top = b["top_eigenvalue"]
    expected = [b["hvp_ratio_vs_grad"]["reverse_over_reverse"], b["hvp_ratio_vs_grad"]["forward_over_reverse"],
                b["curvlinops_hvp_ratio_vs_grad"], b["hvp_ratio_vs_curvlinops"], b["matmat8_ratio_vs_curvlinops"],
                b["peak_memory_ratio_vs_grad"]["reverse_over_reverse"], b["peak_memory_ratio_vs_grad"]["curvlinops"],
                top["quotientsharp_lanczos"]["seconds"], top["quotientsharp_lanczos"]["rel_error"],
                top["curvlinops_eigsh"]["seconds"], top["curvlinops_eigsh"]["rel_error"]]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "hessian_cost")
    assert b["default_mode"] == "reverse_over_reverse"
    ours, modes = claim(r"Hessian-vector products differ from ours by " + N + r" relative, while our two HVP modes agree to " + N)
    rel = b["relative_difference_vs_reverse_over_reverse_fp32"]
    check(ours, rel["curvlinops"], "curvlinops HVP relative difference")
    check(modes, rel["forward_over_reverse"], "HVP modes relative difference")


def test_optim_step_row():
    b = load("optim_step.json")
    batch, rounds, steps = _row_claim("optim_step.py", r"TinyViT, batch " + N + r", median of " + N + " rounds × " + N
                                      + " steps")
    assert (int(batch), int(rounds), int(steps)) == (b["setup"]["batch_size"], b["setup"]["rounds"],
                                                     b["setup"]["steps_per_round"])
    assert not b["setup"]["quick"] and "no trimming" in b["setup"]["malloc"]
    for rounds_of_one in b["step_seconds_rounds"].values():
        assert len(rounds_of_one) == b["setup"]["rounds"]
    got = _row_claim("optim_step.py", r"SAM " + N + r"×, ASAM " + N + r"×, RSAM " + N + r"×, SAF " + N + r"×, MESA \*\*"
                     + N + r"×\*\* \(floor " + N + r"×: its teacher's no-grad forward alone is " + N
                     + r"× an SGD step\), GeodesicSAM " + N + r"× \(" + N + r"× SAM\)")
    r = b["time_ratio_vs_sgd"]
    for t, v in zip(got, [r["SAM"], r["ASAM"], r["RSAM"], r["SAF"], r["MESA"], 1 + b["mesa_teacher_forward_vs_sgd"],
                          b["mesa_teacher_forward_vs_sgd"], r["GeodesicSAM"], b["time_ratio_vs_sam"]["GeodesicSAM"]],
                   strict=True):
        check(t, v, "optim_step")
    train = load("train_compare_summary.json")
    saf, mesa = _row_claim("optim_step.py", r"per training epoch in `train_compare`: SAF " + N + r"×, MESA " + N + "×")
    check(saf, train["SAF"]["time_vs_sgd"], "SAF epoch time vs SGD")
    check(mesa, train["MESA"]["time_vs_sgd"], "MESA epoch time vs SGD")
    teacher, floor, step = claim(r"its one extra \(teacher\) forward per step costs " + N + r"× an SGD step by itself"
                                 r"[^;]*?so " + N + r"× is the floor; MESA's step is " + N + "×")
    check(teacher, b["mesa_teacher_forward_vs_sgd"], "MESA teacher forward")
    check(floor, 1 + b["mesa_teacher_forward_vs_sgd"], "MESA floor")
    check(step, r["MESA"], "MESA step ratio")


def test_modern_attention_cost_row():
    b = load("modern_attention_cost.json")
    c = b["config"]
    params, nb, bs, seq, it, rep = _row_claim(
        "modern_attention_cost.py", r"\(" + N + r"k params, GQA 8/2 heads, rotary\), " + N + r" batches × " + N + " × "
        + N + r" tokens, " + N + r" ascent iterations, median of " + N)
    check(params, c["n_parameters"] / 1e3, "Llama parameters, k")
    assert tuple(int(x) for x in (nb, bs, seq, it, rep)) == (c["n_batches"], c["batch_size"], c["seq_len"],
                                                            c["n_iter"], c["repeats"])
    assert not c["quick"]
    mix, inv, tmix, tinv = _row_claim("modern_attention_cost.py", r"geodesic mix \*\*" + N + r"×\*\*, inv \*\*" + N
                                      + r"×\*\* \(targets ≤ " + N + " / ≤ " + N + r"\)")
    for t, v in ((mix, b["ratios_vs_adaptive"]["geodesic_mix"]), (inv, b["ratios_vs_adaptive"]["geodesic_inv"]),
                 (tmix, b["targets"]["geodesic_mix"]), (tinv, b["targets"]["geodesic_inv"])):
        check(t, v, "modern_attention_cost")


def test_scaling_paragraph():
    b = load("scaling.json")
    got = claim(r"\(" + N + " → " + N + r" CPU s, identical value\) while the wall time went " + N + " → " + N
                + r" s on the contended cores; a " + N + r"-model diagonal sweep took " + N + r" s on 1 Ray worker and "
                + N + r" s on 2 \(" + N + r" s sequential without Ray; Ray start-up " + N + r" s\)")
    sh, sw = b["sharpness"], b["sweep"]
    expected = [sh["cpu_seconds_busiest_rank_1"], sh["cpu_seconds_busiest_rank_2"], sh["seconds_1"], sh["seconds_2"],
                sw["n_models"], sw["ray_1"], sw["ray_2"], sw["sequential"]]
    for t, v in zip(got[:-1], expected, strict=True):
        check(t, v, "scaling")
    check(got[-1], sw["ray_start_1"], "Ray start-up, 1 worker")
    check(got[-1], sw["ray_start_2"], "Ray start-up, 2 workers")


def test_printed_as_rejects_a_wrong_rounding():
    """The comparison itself can fail: one unit off in the last digit, or a sign flip, is caught."""
    assert printed_as("−0.33", -0.3262) and printed_as("2e-3", 0.0022) and printed_as("+0.00", 0.0004)
    assert not printed_as("−0.32", -0.3262)
    assert not printed_as("+0.33", -0.3262)
    assert not printed_as("3e-3", 0.0022)
    assert not printed_as("1180", 1180.745)


def test_real_size_row_and_section():
    b = load("real_size.json")
    q = b["quick"]["models"]["bert_quick"]
    assert b["ratios"] == q["ratios"] and all(q["meets_targets"].values())
    params, tokens, it, rep = _row_claim("real_size.py", r"4-layer BERT of width 768 \(" + N + r"M params\), batch 8 × "
                                         + N + r" tokens, " + N + r" ascent iterations, float32, median of " + N)
    check(params, q["n_params"] / 1e6, "4-layer BERT parameters, M")
    assert (int(tokens), int(it), int(rep)) == (128, b["quick"]["config"]["n_iter"], b["quick"]["config"]["repeats"])
    got = _row_claim("real_size.py", r"adaptive \*\*" + N + r"×\*\* its passes, geodesic mix \*\*" + N + r"×\*\*, inv \*\*"
                     + N + r"×\*\* adaptive \(targets ≤ " + N + " / ≤ " + N + " / ≤ " + N + r"\); peak memory mix/inv "
                     + N + "×/" + N + r"× adaptive \(≤ " + N + r"\), adaptive " + N + "× its budget")
    r, t = q["ratios"], b["quick"]["targets"]
    expected = [r["adaptive_vs_passes"], r["geodesic_mix_vs_adaptive"], r["geodesic_inv_vs_adaptive"],
                t["adaptive_vs_passes"], t["geodesic_mix_vs_adaptive"], t["geodesic_inv_vs_adaptive"],
                r["memory_geodesic_mix_vs_adaptive"], r["memory_geodesic_inv_vs_adaptive"],
                t["memory_geodesic_mix_vs_adaptive"], r["memory_adaptive_vs_budget"]]
    for text, value in zip(got, expected, strict=True):
        check(text, value, "real_size quick")
    # the full run's table: one row per model, every number from the file
    rows = {row[0]: row for row in table_after("### Cost at real size")[1:]}
    for name, label in (("bert_base", "BERT-base"), ("vit_b16", "ViT-B/16")):
        m, row = b["full"]["models"][name], rows[label]
        s, mem = m["seconds"], m["memory_bytes"]
        cells = [s["passes"], s["adaptive"], m["ratios"]["adaptive_vs_passes"], s["geodesic_mix"],
                 m["ratios"]["geodesic_mix_vs_adaptive"], s["geodesic_inv"], m["ratios"]["geodesic_inv_vs_adaptive"],
                 mem["train_step"] / 2**20, mem["adaptive"] / 2**20, mem["geodesic_mix"] / 2**20,
                 mem["geodesic_inv"] / 2**20, m["ratios"]["memory_adaptive_vs_budget"]]
        printed = re.findall(N, " | ".join(row[1:]))
        assert len(printed) == len(cells), (label, printed)
        for text, value in zip(printed, cells, strict=True):
            check(text, value, f"real_size {label}")
    slq = load("hessian_cost.json")["slq"]["ratio_lockstep_vs_sequential"]
    hess, quot = claim(r"8-probe SLQ costs " + N + r"× \(Hessian\) and " + N + r"× \(quotient Hessian\)")
    check(hess, slq["hessian"], "lockstep SLQ, Hessian")
    check(quot, slq["quotient_hessian"], "lockstep SLQ, quotient Hessian")


def test_real_size_profile_paragraph():
    """The numbers of 'What the profile showed' come from real_size_profile.json / hessian_cost.json."""
    p = load("real_size_profile.json")
    a = p["allocation_probe"]
    new, inplace = claim(r"page faults cost several times the multiplication itself \(" + N + " s vs " + N + " s in place")
    check(new, a["new_tensor_multiply_s"], "new tensor multiply")
    check(inplace, a["in_place_multiply_s"], "in-place multiply")
    ours, blas = claim(r"relative error " + N + r" in float32; a BLAS `dot` would be as fast but has " + N)
    check(ours, a["chunked_sum_relative_error_float32"], "chunked sum error")
    check(blas, a["blas_dot_relative_error_float32"], "BLAS dot error")
    steps = [s["ratio"] for s in p["adaptive_vs_passes_steps"]]
    got = claim(r"Adaptive sharpness cost " + N + r"× its passes.*?: " + N + r"× → " + N + r"×\. \(2\).*?→ " + N
                + r"×\. \(3\).*?→ " + N + r"×\. \(4\)")
    for text, value in zip(got, [steps[0], steps[0], steps[1], steps[2], steps[3]], strict=True):
        check(text, value, "adaptive vs passes steps")
    before, after = claim(r"adaptive's peak " + N + " → " + N + " MB")
    check(before, p["adaptive_peak_memory_mb"]["before"], "adaptive memory before")
    check(after, p["adaptive_peak_memory_mb"]["after"], "adaptive memory after")
    v0, v1 = claim(r"bit-identical \(" + N + " before and after")[0], p["adaptive_value"]
    assert float(v0) == v1["before"] == v1["after"]
    g = p["geodesic_vs_adaptive"]
    got = claim(r"mix " + N + "× → " + N + "×, inv " + N + "× → " + N + r"× adaptive on the same model; its own cost per "
                r"iteration cut " + N + "×")
    for text, value in zip(got, [g["mix"]["before"], g["mix"]["after"], g["inv"]["before"], g["inv"]["after"],
                                 p["gl_geometry_cost_per_iteration_reduction"]], strict=True):
        check(text, value, "GL geometry")
    m0, m1 = claim(r"mix sharpness " + N + " → " + N + r"\)")
    check(m0, p["geodesic_mix_value"]["before"], "mix value before")
    check(m1, p["geodesic_mix_value"]["after"], "mix value after")
    e0, e1 = claim(r"exact \(RK4\) geodesic on the TinyViT benchmark: " + N + "× → " + N + "×")
    check(e0, p["exact_rk4_vs_adaptive_tinyvit"]["before"], "exact before")
    check(e1, p["exact_rk4_vs_adaptive_tinyvit"]["after"], "exact after")
    check(e1, load("sharpness_cost.json")["ratios_vs_adaptive"]["geodesic_exact"], "exact vs sharpness_cost.json")
    slq = load("hessian_cost.json")["slq"]
    nodes, hvp, floor = claim(r"quadrature nodes to " + N + r" relative.*?products alone \(" + N
                              + r"× a gradient each, compute-bound\) are " + N + "×")
    check(nodes, max(v["max_node_difference_relative"] for v in slq["agreement"].values()), "SLQ agreement")
    check(hvp, slq["components"]["hvp_per_column_vs_gradient"], "HVP vs gradient")
    check(floor, slq["components"]["lockstep_floor_ratio_vs_sequential"], "lockstep floor")


# --- mutation testing (issue 18, item 1) ----------------------------------------------------------

def test_mutation_table():
    """Every cell of the README's mutation table is the count in mutation.json, and the modules it
    lists are the ones measured (the rest are named as pending)."""
    m = load("mutation.json")
    rows = table_after("## Mutation testing")
    assert rows[0] == ["module", "mutants", "killed", "equivalent", "not killed", "score"]
    body = {row[0].strip("`*"): row[1:] for row in rows[1:]}
    pending = m["modules_pending"]
    total = body.pop("measured so far" if pending else "core")
    assert sorted("quotientsharp/" + name for name in body) == sorted(k for k, c in m["per_module"].items() if c["total"])
    for name, cells in list(body.items()) + [("", total)]:
        c = m["per_module"]["quotientsharp/" + name] if name else {**m["counts"], "score": m["score"]}
        expected = [c["total"], c["killed"], c["equivalent"], c["total"] - c["killed"] - c["equivalent"]]
        assert [int(x.strip("*")) for x in cells[:4]] == expected, name or "total"
        check(cells[4].strip("*"), c["score"], f"mutation score {name or 'overall'}")
    if pending:
        n_pending, n = claim(r"not yet run: " + N + " of " + N + " core modules")
        assert (int(n_pending), int(n)) == (len(pending), len(pending) + len(m["modules"]))
    else:
        n, = claim(r"all " + N + " core modules measured")
        assert int(n) == len(m["modules"])


# --- the relative mixed ball added to the from-scratch studies (issue 13, item 5) --------------------

def test_mix_rel_extension_claims():
    """The extension paragraph: reproduced counts, check differences, the unreproduced models'
    accuracies, and the mix_rel τ and paired Δτ quoted in the reading."""
    vit, text = load("vit_study_summary.json"), load("text_study_summary.json")
    for s in (vit, text):
        assert s["extension"]["measures"] == ["geodesic_mix_rel", "geodesic_mix_rel_avg"]
        assert len(s["extension"]["not_reproduced"]) == 1
    assert "47 of 48 were on each task" in FLAT
    v_diff, t_diff = claim(r"adaptive sharpness within " + N + r" on the ViTs, " + N + r" on text\)")
    check(v_diff, vit["extension"]["check_max_rel_diff"]["adaptive"], "vit check difference")
    check(t_diff, text["extension"]["check_max_rel_diff"]["adaptive"], "text check difference")
    v_new, v_old, t_new, t_old = claim(r"train accuracy " + N + " vs " + N + " and " + N + " vs " + N + r"\)")
    for s, new, old in ((vit, v_new, v_old), (text, t_new, t_old)):
        (model, why), = s["extension"]["not_reproduced"].items()
        row = next(r for r in s["models"] if r["id"] == model)
        assert f"retrained train_acc {new} differs from the summarised {old}" == why and float(old) == row["train_acc"]
        assert f"({model}, " in FLAT or f"; {model}, " in FLAT

    def tau(s, m):
        return [s["kendall_tau"]["error_gap"][m], *s["ci95"]["error_gap"][m]]

    def diff(s, pair):
        return s["tau_difference"]["error_gap"][pair]

    got = claim(r"`geodesic_mix_rel_avg` reaches " + N + r" \[" + N + ", " + N + r"\] \(the plain mixed metric's "
                r"average case " + N + r"\)")
    for text_, v in zip(got, [*tau(text, "geodesic_mix_rel_avg"), text["kendall_tau"]["error_gap"]["geodesic_mix_avg"]]):
        check(text_, v, "text mix_rel_avg")
    got = claim(r"paired comparison \(" + N + r" \[" + N + ", " + N + r"\]\); the worst case rises from " + N + " to "
                + N + r" \[" + N + ", " + N + r"\], level with adaptive sharpness \(paired " + N + r" \[" + N + ", " + N
                + r"\]\)")
    expected = [*diff(text, "geodesic_mix_rel_avg - adaptive_avg"), text["kendall_tau"]["error_gap"]["geodesic_mix"],
                *tau(text, "geodesic_mix_rel"), *diff(text, "geodesic_mix_rel - adaptive")]
    for text_, v in zip(got, expected, strict=True):
        check(text_, v, "text mix_rel claims")
    got = claim(r"\(" + N + r" worst, " + N + r" average; paired against adaptive " + N + r" \[" + N + ", " + N
                + r"\] and " + N + r" \[" + N + ", " + N + r"\]\)")
    expected = [vit["kendall_tau"]["error_gap"]["geodesic_mix_rel"], vit["kendall_tau"]["error_gap"]["geodesic_mix_rel_avg"],
                *diff(vit, "geodesic_mix_rel - adaptive"), *diff(vit, "geodesic_mix_rel_avg - adaptive_avg")]
    for text_, v in zip(got, expected, strict=True):
        check(text_, v, "vit mix_rel claims")


# --- the fine-tune populations and the two regimes (issue 13) ------------------------------------------

def _regimes_script():
    spec = importlib.util.spec_from_file_location("regimes_table", ROOT / "experiments" / "regimes_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regimes_table_is_the_committed_summaries():
    """The README's side-by-side table is regimes_table of the committed summaries, and the
    committed regimes_table.md is what the script writes."""
    from quotientsharp.studies.finetune import regimes_table

    script = _regimes_script()
    summaries = script.load_summaries()
    assert regimes_table(summaries, "error_gap") in README
    assert (RESULTS / "regimes_table.md").read_text() == script.markdown(summaries) + "\n"


def test_finetune_population_claims():
    vit, text = load("finetune/vit/summary.json"), load("finetune/text/summary.json")
    n_vit, n_text, planned = claim(r"ViT: all \*\*" + N + r"\*\* fine-tunes, measured with every unit\. Text: \*\*" + N
                                   + r"\*\* of the " + N + " planned")
    assert (int(n_vit), int(n_text)) == (vit["n_models"], text["n_models"]) and int(n_vit) >= 72 and int(n_text) >= 35
    assert int(planned) == 48
    lo, hi, n_low, lr_lo, lr_hi, g_lo, g_hi = claim(
        r"ViT fine-tunes: test accuracy " + N + "–" + N + r"% \(the " + N + r" below 70% all have learning rates at the low end, "
        + N + " to " + N + r", and underfit in 2–8 epochs; none is at chance\), error gaps " + N + " to " + N + " points")
    check(lo, 100 * vit["population"]["test_acc"][0], "vit ft lowest test acc")
    check(hi, 100 * vit["population"]["test_acc"][1], "vit ft highest test acc")
    low = [r for r in vit["models"] if r["test_acc"] < 0.7]
    assert int(n_low) == len(low) and not vit["learned"]["excluded"]
    check(lr_lo, min(r["lr"] for r in low), "smallest lr of the weak fine-tunes")
    check(lr_hi, max(r["lr"] for r in low), "largest lr of the weak fine-tunes")
    check(g_lo, 100 * vit["population"]["error_gap"][0], "vit ft smallest gap")
    check(g_hi, 100 * vit["population"]["error_gap"][1], "vit ft largest gap")
    a_lo, a_hi, e_lo, e_hi, l_lo, l_hi = claim(
        r"dev accuracy " + N + "–" + N + r"%, error gaps " + N + " to " + N + r" points, loss gaps " + N + "–" + N)
    for text_, v in zip((a_lo, a_hi, e_lo, e_hi), (*text["population"]["test_acc"], *text["population"]["error_gap"])):
        check(text_, 100 * v, "text ft population")
    check(l_lo, text["population"]["loss_gap"][0], "text ft smallest loss gap")
    check(l_hi, text["population"]["loss_gap"][1], "text ft largest loss gap")


def test_finetune_reading_claims():
    vit, text = load("finetune/vit/summary.json"), load("finetune/text/summary.json")

    def tau(s, m, gap="error_gap"):
        return [s["kendall_tau"][gap][m], *s["ci95"][gap][m]]

    got = claim(r"geodesic inv " + N + r" \[" + N + ", " + N + r"\], adaptive " + N + r" \[" + N + ", " + N
                + r"\] \(paper " + N + " and " + N + r"\)")
    for t, v in zip(got, [*tau(vit, "geodesic_inv"), *tau(vit, "adaptive"), -0.71, -0.41], strict=True):
        check(t, v, "vit ft geodesic/adaptive")
    got = claim(r"inverse metric " + N + r" \[" + N + ", " + N + r"\], mixed " + N + r" \[" + N + ", " + N
                + r"\], relative mixed ball " + N + r" \[" + N + ", " + N + r"\]")
    pairs = ("geodesic_inv - adaptive", "geodesic_mix - adaptive", "geodesic_mix_rel - adaptive")
    for t, v in zip(got, [x for p in pairs for x in vit["tau_difference"]["error_gap"][p]], strict=True):
        check(t, v, "vit ft paired differences")
    assert all(d[0] >= 0 for d in vit["tau_difference"]["error_gap"].values())
    got = claim(r"geodesic inv is " + N + r" \[" + N + ", " + N + r"\] against the error gap but " + N + r" \[" + N
                + ", " + N + r"\] against the loss gap")
    for t, v in zip(got, [*tau(text, "geodesic_inv"), *tau(text, "geodesic_inv", "loss_gap")], strict=True):
        check(t, v, "text ft geodesic inv")
    got = claim(r"Euclidean sharpness " + N + r" \[" + N + ", " + N + r"\] against the error gap\.")
    for t, v in zip(got, tau(text, "euclidean"), strict=True):
        check(t, v, "text ft euclidean")
    sel_v, sel_t = vit["layer_renyi_selection"]["error_gap"], text["layer_renyi_selection"]["error_gap"]
    got = claim(r"τ " + N + r" there\) give " + N + r" \[" + N + ", " + N + r"\] on the other half; on text " + N
                + " → " + N + r" \[" + N + ", " + N + r"\]")
    expected = [sel_v["tau_selection"], sel_v["tau_evaluation"], *sel_v["ci95_evaluation"], sel_t["tau_selection"],
                sel_t["tau_evaluation"], *sel_t["ci95_evaluation"]]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "per-layer Rényi selection")
    assert "α = 0.5 on `blocks.0.mlp.fc1`" in FLAT and sel_v["choice"] == {
        "layer": "blocks.0.mlp.fc1.weight", "alpha": "0.5", "name": "layer_renyi_0.5@blocks.0.mlp.fc1.weight"}
    lo, hi = claim(r"null in the ViT and seed-only text fine-tunes \(" + N + " to " + N + r"\)")
    renyi = [s["kendall_tau"][g][m] for s in (vit, text) for g in ("error_gap", "loss_gap") for m in ("renyi_0.5", "renyi_1.5")]
    check(lo, min(renyi), "smallest fine-tune Rényi τ")
    check(hi, max(renyi), "largest fine-tune Rényi τ")


def test_random_text_finetune_claims():
    """The random-hyperparameter text population: its ranges, τ, paired Δτ, confounders and cost."""
    s, c = load("finetune/text_random/summary.json"), load("finetune/text_random/confounders.json")
    assert s["config"]["hparams"] == "random" and s["n_models"] == 48
    assert int(claim(r"random hyperparameters: all \*\*" + N + r"\*\*")[0]) == s["n_models"]
    learned = [r for r in s["models"] if r["id"] not in s["learned"]["excluded"]]
    stuck = [r for r in s["models"] if r["id"] in s["learned"]["excluded"]]
    a_lo, a_hi, n_l, n_s, lr_lo, lr_hi, ep_lo, ep_hi, e_lo, e_hi, l_lo, l_hi = claim(
        r"Dev accuracy " + N + "–" + N + r"% for the " + N + r" that learned; " + N + r" \(lr " + N + " to " + N + ", "
        + N + "–" + N + r" epochs\) stayed at the majority rate and are reported apart\. Error gaps " + N + " to " + N
        + r" points, loss gaps " + N + "–" + N)
    check(a_lo, 100 * min(r["test_acc"] for r in learned), "lowest dev accuracy that learned")
    check(a_hi, 100 * max(r["test_acc"] for r in learned), "highest dev accuracy")
    assert (int(n_l), int(n_s)) == (len(learned), len(stuck)) == (s["learned"]["n_models"], 3)
    check(lr_lo, min(r["lr"] for r in stuck), "smallest lr of the stuck")
    check(lr_hi, max(r["lr"] for r in stuck), "largest lr of the stuck")
    assert (int(ep_lo), int(ep_hi)) == (min(r["epochs"] for r in stuck), max(r["epochs"] for r in stuck))
    for t, v in zip((e_lo, e_hi), s["population"]["error_gap"], strict=True):
        check(t, 100 * v, "random text error gaps")
    for t, v in zip((l_lo, l_hi), s["population"]["loss_gap"], strict=True):
        check(t, v, "random text loss gaps")

    def tau(m, gap="error_gap"):
        return [s["kendall_tau"][gap][m], *s["ci95"][gap][m]]

    def diff(pair):
        return s["tau_difference"]["error_gap"][pair]

    got = claim(r"mixed metric ranks the error gaps at " + N + r" \[" + N + ", " + N + r"\] \(paper " + N
                + r"\) and adaptive sharpness at " + N + r" \[" + N + ", " + N + r"\] \(paper " + N + r"\); the paired "
                r"difference geodesic mix − adaptive is " + N + r" \[" + N + ", " + N + r"\], relative mixed ball "
                + N + r" \[" + N + ", " + N + r"\]; the inverse metric does not beat adaptive \(" + N + r" \[" + N + ", "
                + N + r"\]\)\. Against the loss gap the mixed metric gives " + N + r" \[" + N + ", " + N + r"\]\. "
                r"Leaving out the 3 that never learned changes little \(mixed " + N + ", adaptive " + N + r"\)")
    expected = [*tau("geodesic_mix"), s["paper"]["MNLI BERT"]["geodesic_mix"], *tau("adaptive"),
                s["paper"]["MNLI BERT"]["adaptive"], *diff("geodesic_mix - adaptive"),
                *diff("geodesic_mix_rel - adaptive"), *diff("geodesic_inv - adaptive"),
                *tau("geodesic_mix", "loss_gap"), s["learned"]["kendall_tau"]["error_gap"]["geodesic_mix"],
                s["learned"]["kendall_tau"]["error_gap"]["adaptive"]]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "random text τ")
    assert diff("geodesic_mix - adaptive")[1] > 0 and diff("geodesic_inv - adaptive")[1] < 0

    def gap_vs(hp, source=c):
        e = source["gap_tau_vs_hyperparameter"][hp]["error_gap"]
        return [e["tau_a"], *e["ci95"]]

    def vs(hp, m, source=c):
        return source["tau_vs_hyperparameter"][hp][m]["tau_a"]

    vit = load("finetune/vit/confounders.json")
    got = claim(r"Training accuracy alone ranks the error gaps at " + N + r" \[" + N + ", " + N + r"\] and the "
                r"learning rate at " + N + r" \[" + N + ", " + N + r"\]")
    for t, v in zip(got, [*gap_vs("train_acc"), *gap_vs("lr")], strict=True):
        check(t, v, "random text confounders")
    got = claim(r"the relative mixed ball, average case, " + N + r" against the error gap, follows training accuracy at "
                + N + r"; Euclidean sharpness " + N + r" and λ_max " + N + " rank the gaps too")
    expected = [s["kendall_tau"]["error_gap"]["geodesic_mix_rel_avg"], vs("train_acc", "geodesic_mix_rel_avg"),
                s["kendall_tau"]["error_gap"]["euclidean"], s["kendall_tau"]["error_gap"]["hessian_max_eigenvalue"]]
    for t, v in zip(got, expected, strict=True):
        check(t, v, "random text: the fit")
    best = max(s["kendall_tau"]["error_gap"][m] for m in c["tau_vs_hyperparameter"]["lr"])
    assert best == s["kendall_tau"]["error_gap"]["geodesic_mix_rel_avg"] < gap_vs("train_acc")[0]
    fit, lo, hi, inv, ada, gap_lr = claim(
        r"the fit ranks the gaps at only " + N + r", every first-order measure, λ_max and Tr H fall with the learning "
        r"rate \(τ " + N + " to " + N + r"; geodesic inv " + N + ", adaptive " + N + r"\) while the gap rises with it \("
        + N + r"\)")
    first_order = [m for m in vit["tau_vs_hyperparameter"]["lr"]
                   if m.startswith(("geodesic", "adaptive", "euclidean", "hessian"))]
    lr_taus = [vs("lr", m, vit) for m in first_order]
    assert len(first_order) == 11 and max(lr_taus) < 0
    for t, v in zip((fit, hi, lo, inv, ada, gap_lr), (gap_vs("train_acc", vit)[0], min(lr_taus), max(lr_taus),
                                                      vs("lr", "geodesic_inv", vit), vs("lr", "adaptive", vit),
                                                      gap_vs("lr", vit)[0]), strict=True):
        check(t, v, "vit fine-tune confounders")
    sel = s["layer_renyi_selection"]["error_gap"]
    got = claim(r"\(random hyperparameters: " + N + " → " + N + r" \[" + N + ", " + N + r"\]\)")
    for t, v in zip(got, [sel["tau_selection"], sel["tau_evaluation"], *sel["ci95_evaluation"]], strict=True):
        check(t, v, "random text per-layer Rényi selection")
    got = claim(r"in the random-hyperparameter text fine-tunes it is negative \(α = 0\.5: " + N + r" \[" + N + ", " + N
                + r"\]\)")
    for t, v in zip(got, tau("renyi_0.5"), strict=True):
        check(t, v, "random text Rényi")


def _median_seconds(name: str) -> tuple[float, float]:
    """Per-model medians of the fine-tune's training seconds and of its measuring seconds (the sum
    over its committed measure units), over the models of the summary."""
    s = load(f"finetune/{name}/summary.json")
    measure = {}
    for r in s["models"]:
        for unit in (RESULTS / "finetune" / name / "measures" / r["id"]).glob("*.json"):
            t = json.loads(unit.read_text())["result"]["seconds"]
            measure[r["id"]] = measure.get(r["id"], 0.0) + (sum(t.values()) if isinstance(t, dict) else t)
    assert len(measure) == s["n_models"]
    return statistics.median(r["train_seconds"] for r in s["models"]), statistics.median(measure.values())


def test_finetune_cost_paragraph():
    (vit_ft, vit_m), (text_ft, text_m), (rand_ft, rand_m) = (_median_seconds(n) for n in ("vit", "text", "text_random"))
    got = claim(r"fine-tuning " + N + r" s per ViT \(2–8 epochs on 4k images\) and " + N + r" s per BERT \(3 epochs on "
                r"20k tweets; " + N + r" s with random hyperparameters, 1–4 epochs\); measuring " + N + r" s per ViT and "
                + N + r" s per BERT \(" + N + r" s with random hyperparameters\)")
    for t, v in zip(got, (vit_ft, text_ft, rand_ft, vit_m, text_m, rand_m), strict=True):
        check(t, v, "fine-tune cost (per-model median)")
    pre_vit, pre_text = claim(r"pretraining ViT " + N + r" s \(6 epochs.*?BERT " + N.replace(r"\d+(?:", r"[\d,]+(?:")
                              + r" s \(one MLM epoch")
    check(pre_vit, load("finetune/vit/summary.json")["timing"]["pretrain_s"], "ViT pretraining")
    check(pre_text.replace(",", ""), load("finetune/text/summary.json")["timing"]["pretrain_s"], "BERT pretraining")


def test_finetune_reading_without_the_underfit_models():
    """The robustness line: τ recomputed (same bootstrap as the studies) over the fine-tunes with
    test accuracy ≥ 70%."""
    from quotientsharp.studies.report import tau_block
    from quotientsharp.studies.transformer_run import COMPARISONS, GAPS

    vit = load("finetune/vit/summary.json")
    rows = [r for r in vit["models"] if r["test_acc"] >= 0.7]
    block = tau_block(rows, vit["config"]["n_boot"], vit["config"]["seed"], GAPS, COMPARISONS)
    n, *got = claim(r"Over the " + N + r" with test accuracy ≥ 70%, geodesic inv is " + N + r" \[" + N + ", " + N
                    + r"\] and adaptive " + N + r" \[" + N + ", " + N + r"\]; their paired difference is " + N + r" \["
                    + N + ", " + N + r"\]")
    assert int(n) == len(rows) == vit["n_models"] - 13
    expected = [block["kendall_tau"]["error_gap"]["geodesic_inv"], *block["ci95"]["error_gap"]["geodesic_inv"],
                block["kendall_tau"]["error_gap"]["adaptive"], *block["ci95"]["error_gap"]["adaptive"],
                *block["tau_difference"]["error_gap"]["geodesic_inv - adaptive"]]
    for text, v in zip(got, expected, strict=True):
        check(text, v, "fine-tuned ViT without the underfit models")


def test_gpu_section():
    """'On a GPU': every H200 number from benchmarks/results/gpu/, every CPU number from its CPU file."""
    gpu = RESULTS / "gpu"
    g = {name: json.loads((gpu / f"{name}_cuda.json").read_text())
         for name in ("sharpness_cost", "modern_attention_cost", "optim_step", "real_size")}
    c = {name: load(f"{name}.json") for name in g}
    rs_cpu, rs_gpu = c["real_size"]["full"]["models"], g["real_size"]["full"]["models"]
    assert all(g[n]["config"]["device"] == "cuda" for n in ("sharpness_cost", "modern_attention_cost"))
    assert g["optim_step"]["setup"]["device"] == "cuda" and g["real_size"]["full"]["config"]["device"] == "cuda"

    def sharp(d, names):
        return [d["ratios_vs_adaptive"][n] for n in names]

    def real(m):
        r = m["ratios"]
        return [r["adaptive_vs_passes"], r["geodesic_mix_vs_adaptive"], r["geodesic_inv_vs_adaptive"]]

    steps = ("SAM", "SAF", "MESA", "GeodesicSAM")
    expected = {
        "`sharpness_cost.py`": (sharp(c["sharpness_cost"], ("geodesic_mix", "geodesic_inv", "geodesic_exact")),
                                sharp(g["sharpness_cost"], ("geodesic_mix", "geodesic_inv", "geodesic_exact"))
                                + [g["sharpness_cost"]["median_seconds"]["adaptive"]]),
        "`modern_attention_cost.py`": (sharp(c["modern_attention_cost"], ("geodesic_mix", "geodesic_inv")),
                                       sharp(g["modern_attention_cost"], ("geodesic_mix", "geodesic_inv"))
                                       + [g["modern_attention_cost"]["median_seconds"]["adaptive"]]),
        "`optim_step.py`": ([c["optim_step"]["time_ratio_vs_sgd"][m] for m in steps],
                            [g["optim_step"]["time_ratio_vs_sgd"][m] for m in steps]
                            + [1e3 * g["optim_step"]["step_seconds_median"]["SGD"]]),
        "`real_size.py` BERT-base": (real(rs_cpu["bert_base"]),
                                     real(rs_gpu["bert_base"]) + [rs_gpu["bert_base"]["seconds"]["passes"]]),
        "`real_size.py` ViT-B/16": (real(rs_cpu["vit_b16"]),
                                    real(rs_gpu["vit_b16"]) + [rs_gpu["vit_b16"]["seconds"]["passes"]]),
    }
    rows = table_after("### On a GPU")[1:]
    assert len(rows) == len(expected)
    for row in rows:
        key = next(k for k in expected if row[0].startswith(k))
        for cell, values in zip(row[1:], expected[key], strict=True):
            printed = [t for t in re.findall(N, cell) if t not in ("10",)]  # "10 passes"
            assert len(printed) == len(values), (key, cell)
            for text, value in zip(printed, values, strict=True):
                check(text, value, f"GPU table {key}")
    log = (gpu / "gpu_tests.log").read_text()
    (n_passed,) = claim(r"\*\*the " + N + r" CUDA tests passed\*\*")
    assert re.search(rf"\b{n_passed} passed\b", log) and "failed" not in log and "error" not in log.lower()
    b = rs_gpu["bert_base"]["ratios"]
    got = claim(r"BERT-base: mix/inv " + N + "×/" + N + r"× adaptive, adaptive " + N + r"× its budget\)")
    for text, value in zip(got, [b["memory_geodesic_mix_vs_adaptive"], b["memory_geodesic_inv_vs_adaptive"],
                                 b["memory_adaptive_vs_budget"]], strict=True):
        check(text, value, "GPU memory")
    ms, s = claim(r"pass takes " + N + r" ms there, against " + N + r" s on one CPU thread")
    check(ms, 1e3 * rs_gpu["bert_base"]["seconds"]["passes"] / 10, "GPU pass")
    check(s, rs_cpu["bert_base"]["seconds"]["passes"] / 10, "CPU pass")
