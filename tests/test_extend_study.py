"""Extending a finished transformer study with new measures (quotientsharp.studies.extend): the
merged summary equals a study run with every measure from the start, and a retrained population
that is not the summarised one is refused."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from study_cases import tiny_vit_config

from quotientsharp.studies import extend
from quotientsharp.studies import transformers as study

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(measures):
    return tiny_vit_config(4, measures=measures)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A base study (adaptive, geodesic_inv), its extension by the mixed relative ball, and the
    same population measured with all three from the start."""
    root = tmp_path_factory.mktemp("extend")
    base = study.run_study(root / "base", tiny_config(["adaptive", "geodesic_inv"]), progress=False)
    (root / "base.json").write_text(json.dumps(base))
    merged = extend.extend_study(root / "base.json", root / "ext", ["geodesic_mix_rel", "geodesic_mix_rel_avg"],
                                 progress=False)
    direct = study.run_study(root / "direct", tiny_config(
        ["adaptive", "geodesic_inv", "geodesic_mix_rel", "geodesic_mix_rel_avg"]), progress=False)
    return root, base, merged, direct


def test_merged_summary_equals_the_study_run_with_every_measure(studies):
    _, _, merged, direct = studies
    assert merged["config"]["plan"]["measures"] == direct["config"]["plan"]["measures"]
    assert [r["values"] for r in merged["models"]] == [r["values"] for r in direct["models"]]
    for key in ("kendall_tau", "kendall_tau_b", "ci95", "ties", "missing", "tau_difference", "population"):
        assert merged[key] == direct[key], key
    assert set(merged["tau_difference"]["error_gap"]) == {"geodesic_inv - adaptive", "geodesic_mix_rel - adaptive"}
    assert merged["extension"]["measures"] == ["geodesic_mix_rel", "geodesic_mix_rel_avg"]
    assert merged["extension"]["check_max_rel_diff"] == {"adaptive": 0.0}  # same machine: bit for bit
    assert merged["extension"]["not_reproduced"] == {}


def test_merged_outputs_are_written(studies):
    root, _, merged, _ = studies
    assert json.loads((root / "ext" / "merged" / "summary.json").read_text())["kendall_tau"] == merged["kendall_tau"]
    table = (root / "ext" / "merged" / "tau_table.md").read_text()
    assert "| geodesic_mix_rel |" in table and "Δτ geodesic_mix_rel − adaptive (paired)" in table
    assert (root / "ext" / "merged" / "models.csv").read_text().count("\n") == 5


def _merge_error(base, extra):
    with pytest.raises(ValueError) as err:
        extend.merge_summaries(base, extra)
    return str(err.value)


def test_a_model_that_is_not_reproduced_gets_no_new_values_and_is_named(studies):
    """One model of four whose check value or accuracy differs: its new measures are left out
    (listed as missing, τ over the other three); the others merge as usual."""
    root, base, merged, _ = studies
    extra = json.loads((root / "ext" / "summary.json").read_text())
    for change in ("value", "accuracy"):
        changed = copy.deepcopy(base)
        if change == "value":
            changed["models"][2]["values"]["adaptive"] *= 1 + 1e-3
        else:
            changed["models"][2]["test_acc"] += 0.001
        out = extend.merge_summaries(changed, extra, max_unreproduced=0.25)
        model = base["models"][2]["id"]
        assert list(out["extension"]["not_reproduced"]) == [model]
        assert ("adaptive" if change == "value" else "test_acc") in out["extension"]["not_reproduced"][model]
        assert out["missing"] == {"geodesic_mix_rel": [model], "geodesic_mix_rel_avg": [model]}
        assert "geodesic_mix_rel" not in out["models"][2]["values"]
        assert out["models"][1]["values"] == merged["models"][1]["values"]
        assert out["kendall_tau"]["error_gap"]["geodesic_inv"] == merged["kendall_tau"]["error_gap"]["geodesic_inv"]
        assert "(n=3)" in study.tau_table(out)
    within = copy.deepcopy(base)
    within["models"][2]["values"]["adaptive"] *= 1 + 1e-6
    assert extend.merge_summaries(within, extra)["extension"]["check_max_rel_diff"]["adaptive"] == pytest.approx(
        1e-6, rel=1e-3)


def test_too_many_unreproduced_models_or_another_structure_are_refused(studies):
    root, base, _, _ = studies
    extra = json.loads((root / "ext" / "summary.json").read_text())
    accuracy = copy.deepcopy(base)
    accuracy["models"][1]["test_acc"] += 0.001
    message = _merge_error(accuracy, extra)  # 1 of 4 > the default 10%
    assert "1 of 4 models were not reproduced" in message and base["models"][1]["id"] in message
    assert "test_acc" in message
    fewer = copy.deepcopy(base)
    fewer["models"] = fewer["models"][:3]
    assert "other models" in _merge_error(fewer, extra)
    seed = copy.deepcopy(base)
    seed["config"]["subset"] = {**seed["config"]["subset"], "seed": 1}
    assert "subset" in _merge_error(seed, extra)
    radius = copy.deepcopy(base)
    radius["config"]["plan"]["rho"] = 0.2
    assert "plan" in _merge_error(radius, extra)
    lost = copy.deepcopy(base)
    del lost["models"][0]["values"]["adaptive"]
    assert "adaptive" in _merge_error(lost, extra)


def test_extension_config_names_bad_requests(studies):
    _, base, _, _ = studies
    config = extend.extension_config(base, ["geodesic_mix_rel"])
    assert config["plan"]["measures"] == ["adaptive", "geodesic_mix_rel"]
    assert config["models"] == base["config"]["models"] and config["subset"] == base["config"]["subset"]
    with pytest.raises(ValueError, match="already holds"):
        extend.extension_config(base, ["geodesic_inv"])
    with pytest.raises(ValueError, match="not in the base summary"):
        extend.extension_config(base, ["geodesic_mix_rel"], check=["euclidean"])
    with pytest.raises(ValueError, match="unknown measures"):
        extend.extension_config(base, ["geodesic_banana"])
    with pytest.raises(ValueError, match="no measures"):
        extend.extension_config(base, [])
    with pytest.raises(ValueError, match="at least one"):
        extend.extension_config(base, ["geodesic_mix_rel"], check=[])


def test_multi_valued_units_are_recognised_as_checks():
    assert extend._belongs("hessian_trace", ["hessian_slq"]) and extend._belongs("renyi_0.5", ["hessian_slq"])
    assert extend._belongs("quotient_renyi_1.5", ["quotient_renyi"])
    assert not extend._belongs("quotient_renyi_1.5", ["hessian_slq"])
    assert not extend._belongs("geodesic_mix_rel", ["geodesic_mix"])


def test_command_line_reports_a_refused_extension(studies, tmp_path):
    """The script exits with the merge's message (not a traceback) when the base is not this population."""
    root, base, _, _ = studies
    changed = copy.deepcopy(base)
    changed["models"][0]["train_acc"] = 0.0
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "extend_study.py"), str(path), "--out",
                           str(root / "ext"), "--measures", "geodesic_mix_rel", "geodesic_mix_rel_avg",
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 4 models were not reproduced") and "model vit000: retrained train_acc" in last
