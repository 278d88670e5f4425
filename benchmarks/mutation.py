"""Mutation score of the core (issue 18): run mutmut, triage the survivors, write
``benchmarks/results/mutation.json``.

The core and the tests that guard it are the ``[tool.mutmut]`` table of ``pyproject.toml``.
mutmut (``pip install -e ".[dev]"``) copies the package into ``./mutants``, plants one small
change at a time (an operator, a constant, an argument) and runs the tests that reach the changed
function; a mutant is *killed* when one of them fails (or it times out) and *survives* otherwise.

    score = killed / (total - equivalent)

where *equivalent* mutants are survivors that no test can kill because they compute the same
thing; each carries a one-line reason in ``benchmarks/mutation_triage/*.json`` (keyed by mutant
name and checked against its diff lines, so a stale entry after a code change is reported, not
trusted). A survivor that is not equivalent needs a test, not a triage line.

    python benchmarks/mutation.py                         # the whole core (hours on 2 cores)
    python benchmarks/mutation.py --modules measures/solver.py studies/kendall.py
    python benchmarks/mutation.py --report-only           # re-read ./mutants, rewrite the JSON
    python benchmarks/mutation.py --list --modules measures/solver.py   # print the survivors
    python benchmarks/mutation.py --check quotientsharp.measures.solver.x_f__mutmut_3 tests/test_x.py
                                                          # does this test kill that mutant?
    python benchmarks/mutation.py --modules measures/solver.py --recheck tests/test_new.py
                                                          # record the survivors that new tests kill
    python benchmarks/mutation.py --modules curvature/slq.py --forget   # drop a record (back to pending)

Each run merges its modules into the JSON, so the core can be covered a few modules at a time;
``modules_pending`` lists what has not been run at the current code. A survivor that a test
written after the run kills is recorded by ``--recheck`` (cheaper than rerunning mutmut, whose
survivors rerun every test that reaches them). A mutant a run did not reach, in a function
unchanged since the recorded run, keeps its recorded status (``carry_over``): after a code
change, a short run and a ``--recheck`` of what it left refresh a module. Not part of CI.
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation.json"
TRIAGE = ROOT / "benchmarks" / "mutation_triage"  # one JSON file per module group
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
# mutmut files exit code 255 under "timeout", but it is no CPU-limit signal (those are ±24, 152): a
# forked worker that died on its own. Such a mutant is checked again (--recheck), not counted.
WORKER_DIED = "worker died (exit 255)"


def core_modules() -> list[str]:
    """The module files that ``[tool.mutmut] only_mutate`` selects, relative to the root."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "quotientsharp").rglob("*.py"))
    return [f for f in files if any(fnmatch.fnmatch(f, g) for g in globs)]


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def run_mutmut(names: list[str], max_children: int, log: Path) -> None:
    """``mutmut run`` on the mutants matching ``names`` (globs; all of them are (re)run), output to
    ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names]
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"mutmut run failed (exit {rc}); see {log}")


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def read_results(modules: list[str]) -> dict[str, dict]:
    """Per module: mutmut's status of every mutant, with the diff lines of the survivors."""
    os.chdir(ROOT)  # mutmut's helpers resolve ./mutants
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    out = {}
    for mod in modules:
        meta = ROOT / "mutants" / (mod + ".meta")
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        mutants = {}
        for name, code in sorted(data["exit_code_by_key"].items()):
            status = WORKER_DIED if code == 255 else status_by_exit_code[code]
            entry = {"status": status}
            if status not in KILLED:
                entry["diff"] = changed_lines(get_diff_for_mutant(name, path=mod))
            mutants[name] = entry
        out[mod] = {"function_hashes": data.get("hash_by_function_name", {}), "mutants": mutants}
    return out


def function_of(name: str) -> str:
    """The mangled function a mutant belongs to: ``pkg.mod.xǁCǁf__mutmut_3`` -> ``xǁCǁf``."""
    return name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]


def carry_over(old: dict, new: dict, rechecked: dict[str, dict]) -> int:
    """Merge a module's recorded run ``old`` into the fresh read ``new`` (in place); return how
    many mutants were carried.

    A mutant this run did not reach (``not checked``) in a function whose hash is the recorded
    one keeps its recorded status, as mutmut itself keeps results within ``./mutants``: the
    mutant is the same code, and tests only grow. In a function whose hash changed, every
    mutant is new (mutmut renumbers them), so its ``--recheck`` kills are dropped."""
    same = {f for f, h in new["function_hashes"].items() if old["function_hashes"].get(f) == h}
    for name in [n for n in rechecked if n in old["mutants"] and function_of(n) not in same]:
        del rechecked[name]
    carried = 0
    for name, m in new["mutants"].items():
        if m["status"] == "not checked" and function_of(name) in same and name in old["mutants"]:
            new["mutants"][name] = old["mutants"][name]
            carried += 1
    return carried


def is_equivalent(triage: dict[str, dict], name: str, diff: list[str]) -> bool:
    """Whether ``name`` is triaged equivalent by an entry whose diff is still the mutant's."""
    t = triage.get(name)
    return t is not None and t["diff"] == diff and t["verdict"] == "equivalent"


def score(c: dict) -> float | None:
    """``killed / (total − equivalent)``; None when nothing is left to kill."""
    return c["killed"] / (c["total"] - c["equivalent"]) if c["total"] > c["equivalent"] else None


def summarise(modules: dict[str, dict], triage: dict[str, dict], rechecked: dict[str, dict]) -> dict:
    """Counts per module and overall; survivors with their triage (or ``untriaged``)."""
    per_module, survivors = {}, []
    totals = dict.fromkeys(["total", "killed", "survived", "no_tests", "equivalent", "other"], 0)
    for mod, res in sorted(modules.items()):
        c = dict.fromkeys(totals, 0)
        for name, m in res["mutants"].items():
            c["total"] += 1
            if m["status"] in KILLED or rechecked.get(name, {}).get("diff") == m.get("diff"):
                c["killed"] += 1
                continue
            t = triage.get(name)
            fresh = t is not None and t.get("diff") == m["diff"]
            if is_equivalent(triage, name, m["diff"]):
                c["equivalent"] += 1
            key = {"survived": "survived", "survived (recheck)": "survived", "no tests": "no_tests"}.get(
                m["status"], "other")
            c[key] += 1
            survivors.append({"mutant": name, "status": m["status"], "diff": m["diff"],
                              "triage": (t["verdict"] + ": " + t["why"]) if fresh else "untriaged"})
        c["score"] = score(c)
        per_module[mod] = c
        for k in totals:
            totals[k] += c[k]
    return {"score": score(totals), "counts": totals, "per_module": per_module, "survivors": survivors}


def covering_tests(mutants: list[str]) -> dict:
    """mutmut's record (``mutants/mutmut-stats.json``) of the tests that reach each mutant's function,
    and every test it knows (a test it does not know was written since, and is run for every mutant)."""
    stats = json.loads((ROOT / "mutants" / "mutmut-stats.json").read_text())
    reach = stats["tests_by_mangled_function_name"]
    return {"known": sorted(stats["duration_by_test"]),
            "by_mutant": {m: sorted(reach.get(m.replace("__init__.", "").rsplit("__mutmut_", 1)[0], ()))
                          for m in mutants}}


PROGRESS = ROOT / "mutants" / "screen-progress.jsonl"  # the verdicts of a screen not yet recorded


def function_hashes(mutants: list[str]) -> dict[str, str]:
    """mutmut's hash of each mutant's function in ``./mutants`` (its number means another mutant
    once the function changes)."""
    out, metas = {}, {}
    for m in mutants:
        module = m.rsplit(".", 1)[0]
        path = ROOT / "mutants" / (module.replace(".", "/") + ".py.meta")
        if not path.exists():
            path = ROOT / "mutants" / (module.replace(".", "/") + "/__init__.py.meta")
        if path not in metas:
            metas[path] = json.loads(path.read_text()).get("hash_by_function_name", {}) if path.exists() else {}
        out[m] = metas[path].get(function_of(m), "")
    return out


def screen_key(pytest_args: list[str], every_test: bool) -> str:
    """What a screen's verdicts depend on besides the mutant: the arguments and the test files' text."""
    digest = hashlib.sha1(json.dumps([pytest_args, every_test]).encode())
    for a in pytest_args:
        path = ROOT / a.split("::")[0]
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def killed_by(mutants: list[str], pytest_args: list[str], workers: int, timeout: float = 600,
              every_test: bool = False) -> set[str]:
    """The ``mutants`` that ``pytest_args`` kill, run against the package in ``./mutants`` (the
    tests are the working tree's, so tests written after the mutmut run count; they must pass
    with no mutant switched on). Each run is forked from one warm process (mutation_screen.py) and,
    unless ``every_test``, runs only the given tests that reach the mutant's function (as mutmut
    does) plus those mutmut has not seen. Each verdict is appended to ``PROGRESS`` as it comes, and
    a screen with the same tests picks up there after an interruption."""
    key, hashes = screen_key(pytest_args, every_test), function_hashes(mutants)
    done = {}
    if PROGRESS.exists():
        for line in PROGRESS.read_text().splitlines():
            entry = json.loads(line)
            if entry["key"] == key and entry.get("function_hash") == hashes.get(entry["mutant"]):
                done[entry["mutant"]] = entry["code"]
    todo = [m for m in mutants if m not in done]
    codes = {m: done[m] for m in mutants if m in done}
    if not todo:  # every verdict saved (their screens ran the tests unmutated first)
        return {m for m in mutants if codes[m] not in ("0", "5")}
    args = [str(ROOT / a) if a.startswith("tests") else a for a in pytest_args]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as names, \
            tempfile.NamedTemporaryFile("w", suffix=".json") as cover, open(PROGRESS, "a") as log:
        names.write("\n".join(todo))
        names.flush()
        json.dump(covering_tests(todo), cover)
        cover.flush()
        cmd = [sys.executable, str(ROOT / "benchmarks" / "mutation_screen.py"), names.name, str(workers),
               str(timeout), *([] if every_test else [cover.name]), "--", *args]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "mutants"))  # for spawned processes too
        with subprocess.Popen(cmd, cwd=ROOT / "mutants", stdout=subprocess.PIPE, text=True, env=env) as proc, \
                tqdm(total=len(mutants) + 1, initial=len(codes), desc="screening mutants", unit="mutant") as bar:
            for line in proc.stdout:  # "<exit code> <mutant>", one per finished run; TQDM_DISABLE=1 hides the bar
                code, name = line.rstrip("\n").split(" ", 1)
                codes[name] = code
                if name != "-":
                    log.write(json.dumps({"key": key, "mutant": name, "function_hash": hashes[name],
                                          "code": code}) + "\n")
                    log.flush()
                bar.update()
    if codes.get("-") != "0":
        sys.exit(f"the tests fail without a mutant: python -m pytest {' '.join(pytest_args)}")
    return {m for m in mutants if codes.get(m, "0") not in ("0", "5")}  # 5: no test reached it


def forget_progress(mutants: set[str]) -> None:
    """Drop the saved screen verdicts of ``mutants`` (recorded in the JSON now)."""
    if PROGRESS.exists():
        keep = [line for line in PROGRESS.read_text().splitlines() if json.loads(line)["mutant"] not in mutants]
        PROGRESS.write_text("".join(line + "\n" for line in keep))


def merge_latest(chosen: list[str], modules: dict, rechecked: dict) -> tuple[dict, dict]:
    """This run's records of the ``chosen`` modules over the JSON as it is now on disk, so that
    runs on other modules that finished meanwhile (e.g. a long ``--recheck``) keep their records."""
    latest = json.loads(OUT.read_text()) if OUT.exists() else {}
    mine = tuple(module_name(m) + "." for m in chosen)
    merged = {m: r for m, r in latest.get("modules", {}).items() if m not in chosen}
    merged.update({m: modules[m] for m in chosen if m in modules})
    kills = {n: r for n, r in latest.get("rechecked", {}).items() if not n.startswith(mine)}
    kills.update({n: r for n, r in rechecked.items() if n.startswith(mine)})
    return dict(sorted(merged.items())), dict(sorted(kills.items()))


def markdown_table(result: dict) -> str:
    """The README's table of ``result`` (mutation.json): one row per measured module and the total."""
    def row(name: str, c: dict, score: float, bold: bool = False) -> str:
        cells = [c["total"], c["killed"], c["equivalent"], c["total"] - c["killed"] - c["equivalent"]]
        b = "**" if bold else ""
        return f"| {name} | " + " | ".join(f"{b}{x}{b}" for x in cells) + f" | {b}{score:.3f}{b} |"

    lines = ["| module | mutants | killed | equivalent | not killed | score |", "|---|---|---|---|---|---|"]
    lines += [row(f"`{mod.removeprefix('quotientsharp/')}`", c, c["score"]) for mod, c in result["per_module"].items()
              if c["total"]]  # a module without mutants (an __init__) has no score
    pending = [m.removeprefix("quotientsharp/") for m in result["modules_pending"]]
    lines.append(row("**measured so far**" if pending else "**core**", result["counts"], result["score"], bold=True))
    n = len(pending) + len(result["modules"])
    return "\n".join(lines) + (f"\n\nnot yet run: {len(pending)} of {n} core modules ({', '.join(pending)})."
                               if pending else f"\n\nall {n} core modules measured.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", help="paths under quotientsharp/ (default: the whole core)")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--survivors", action="store_true",
                    help="rerun only the survivors recorded in the JSON for these modules (after adding tests)")
    ap.add_argument("--report-only", action="store_true", help="skip mutmut, re-read ./mutants")
    ap.add_argument("--list", action="store_true", help="print the survivors in ./mutants (writes nothing)")
    ap.add_argument("--json", action="store_true", help="with --list: as a triage-file template")
    ap.add_argument("--check", nargs="+", metavar=("MUTANT", "PYTEST_ARG"),
                    help="whether the given tests kill MUTANT (writes nothing)")
    ap.add_argument("--recheck", nargs="+", metavar="TEST",
                    help="run these tests against every untriaged survivor of the JSON in these modules "
                         "(tests written after the mutmut run) and record the kills")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds per mutant in --check / --recheck before it is killed (and counts as killed)")
    ap.add_argument("--every-test", action="store_true",
                    help="in --check / --recheck, run every given test on each mutant, not only those that "
                         "reach its function")
    ap.add_argument("--table", action="store_true", help="print the README's table of the JSON")
    ap.add_argument("--forget", action="store_true",
                    help="drop these modules' records from the JSON (back to pending), e.g. a partial run")
    args, extra = ap.parse_known_args()  # extra: pytest options of --check / --recheck (e.g. -k)
    if args.table:
        print(markdown_table(json.loads(OUT.read_text())))
        return
    if extra and not (args.check or args.recheck):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.check:
        killed = killed_by([args.check[0]], (args.check[1:] + extra) or ["tests"], 1, args.timeout, args.every_test)
        print("killed" if killed else "survived", args.check[0])
        return

    core = core_modules()
    chosen = core if not args.modules else ["quotientsharp/" + m.removeprefix("quotientsharp/") for m in args.modules]
    unknown = sorted(set(chosen) - set(core))
    if unknown:
        sys.exit(f"not in the core ([tool.mutmut] only_mutate): {unknown}")

    if args.list:
        survivors = {name: m for res in read_results(chosen).values() for name, m in res["mutants"].items()
                     if m["status"] not in KILLED}
        if args.json:  # a template for a triage file: fill "verdict" and "why"
            print(json.dumps({n: {"verdict": "equivalent", "why": "", "diff": m["diff"]}
                              for n, m in survivors.items()}, indent=1, ensure_ascii=False))
        for name, m in survivors.items() if not args.json else ():
            print(f"{name} [{m['status']}]\n    " + "\n    ".join(m["diff"]))
        return

    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    screened: set[str] = set()  # the mutants a --recheck screened
    modules = {m: r for m, r in previous.get("modules", {}).items() if m in core}
    rechecked = previous.get("rechecked", {})
    triage = {k: v for f in sorted(TRIAGE.glob("*.json")) for k, v in json.loads(f.read_text()).items()}
    if args.forget:
        if not args.modules:
            ap.error("--forget needs --modules")
        for mod in chosen:
            for name in [n for n in rechecked if n in modules.get(mod, {}).get("mutants", {})]:
                del rechecked[name]
            modules.pop(mod, None)
    elif args.recheck:
        fresh = read_results(chosen)
        stale = [m for m in chosen if m not in modules or m not in fresh
                 or fresh[m]["function_hashes"] != modules[m]["function_hashes"]]
        if stale:
            sys.exit(f"./mutants is not the recorded mutmut run of {stale}: run mutmut on them first")
        todo = {name: m["diff"] for mod in chosen for name, m in modules[mod]["mutants"].items()
                if m["status"] not in KILLED and name not in rechecked
                and not is_equivalent(triage, name, m["diff"])}
        tests = args.recheck + extra
        kills = killed_by(sorted(todo), tests, args.max_children, args.timeout, args.every_test)
        for mod in chosen:
            for name, m in modules[mod]["mutants"].items():
                if name in kills:
                    rechecked[name] = {"tests": tests, "diff": todo[name]}
                elif name in todo and m["status"] in ("not checked", WORKER_DIED):  # no mutmut verdict on it
                    m["status"] = "survived (recheck)"
        screened = set(todo)
    else:
        if args.survivors:
            names = [s["mutant"] for s in previous.get("survivors", [])
                     if any(s["mutant"].startswith(module_name(m) + ".") for m in chosen)]
            if not names:
                sys.exit("no recorded survivors in these modules")
        else:
            names = [module_name(m) + ".*" for m in chosen]
        if not args.report_only:
            run_mutmut(names, args.max_children, ROOT / "mutants" / "run.log")
        fresh = read_results(chosen)
        if not fresh:
            sys.exit("no mutmut results under ./mutants for these modules; run without --report-only")
        stamp = {"date": time.strftime("%Y-%m-%d"),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True).stdout.strip()}
        for mod, res in fresh.items():  # a re-read keeps the stamp of the run it reads
            keep = args.report_only and mod in modules and res["function_hashes"] == modules[mod]["function_hashes"]
            run = modules[mod]["run"] if keep else stamp
            carried = carry_over(modules[mod], res, rechecked) if mod in modules else 0
            if carried and not keep:
                run = {**stamp, "carried": carried, "carried_from": modules[mod]["run"]}
            modules[mod] = {**res, "run": run}

    with open(Path(tempfile.gettempdir()) / "quotientsharp-mutation.lock", "w") as lock:  # other runs may write
        fcntl.flock(lock, fcntl.LOCK_EX)
        modules, rechecked = merge_latest(chosen, modules, rechecked)
        summary = summarise(modules, triage, rechecked)
        result = {"tool": "mutmut 3.8.1",
                  "formula": "killed / (total - equivalent); timeouts count as killed; a survivor of the mutmut "
                             "run that tests written after it kill (--recheck) counts as killed",
                  "target": 0.90, **summary,
                  "modules_pending": [m for m in core if m not in modules],
                  "rechecked": rechecked, "modules": modules}
        OUT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        forget_progress(screened)  # recorded now
    untriaged = sum(s["triage"] == "untriaged" for s in summary["survivors"])
    print(f"score {summary['score']:.3f} over {len(modules)}/{len(core)} core modules "
          f"({summary['counts']['killed']}/{summary['counts']['total']} killed, "
          f"{summary['counts']['equivalent']} equivalent, {untriaged} survivors untriaged) -> {OUT}")


if __name__ == "__main__":
    main()
