"""The extras of pyproject.toml install into the README's environment (CPU torch 2.13).

PyPI has no CPU build of torchvision for torch 2.13: its wheel is CUDA-built and fails at import
beside the CPU torch, and with it ``transformers.BertModel``. So no extra may pull torchvision,
directly or through a dependency (timm and curvlinops-for-pytorch do, and are installed with
``--no-deps``; README "Extras")."""
from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# torchvision, and packages whose own metadata requires it (caught even where not installed)
FORBIDDEN = {"torchvision", "timm", "backpack-for-pytorch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def runtime_requirements(dist: str) -> list[str]:
    """The requirements of an installed distribution that apply without extras."""
    reqs = md.requires(dist) or []
    return [requirement_name(r) for r in reqs if "extra" not in r.partition(";")[2]]


def closure(name: str) -> dict[str, list[str]]:
    """``{package: path from the extra's requirement}`` over the installed dependency graph; a
    package that is not installed is a leaf (CI installs every extra, so there it is complete)."""
    seen, stack = {name: [name]}, [name]
    while stack:
        current = stack.pop()
        try:
            deps = runtime_requirements(current)
        except md.PackageNotFoundError:
            continue
        for dep in deps:
            if dep not in seen:
                seen[dep] = seen[current] + [dep]
                stack.append(dep)
    return seen


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_no_extra_pulls_torchvision(extra):
    for req in EXTRAS[extra]:
        reached = closure(requirement_name(req))
        bad = {pkg: path for pkg, path in reached.items() if pkg in FORBIDDEN}
        assert not bad, f"extra [{extra}] pulls {' -> '.join(next(iter(bad.values())))}"


def test_no_deps_packages_are_documented_and_installed_by_ci():
    """timm and curvlinops-for-pytorch need torchvision in their metadata: README and CI install
    them with --no-deps, beside the extras that carry their other dependencies."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    for text in (readme, ci):
        assert "pip install --no-deps timm curvlinops-for-pytorch" in text
    installed = {e for group in re.findall(r'pip install -e "\.\[([\w,]+)\]"', ci) for e in group.split(",")}
    assert installed == set(EXTRAS), f"CI must install every documented extra: {sorted(set(EXTRAS) - installed)}"
    assert 'pip install -e ".[hf,bench,data,ray,dev]"' in readme


def test_bert_model_imports():
    """The import that a CUDA torchvision broke (transformers' lazy BertModel)."""
    from transformers import BertModel  # noqa: F401
