"""Fail when a public name of quotientsharp has no docstring.

Public = every name in ``quotientsharp.__all__`` and in each documented subpackage's ``__all__``;
for the modules without ``__all__`` (``quotient``, ``geodesic``, ``studies.*``, ...), every name
not starting with ``_`` that the module itself defines. For each public class, also every public
method, property and classmethod defined in its body (a docstring inherited from the base class
counts: ``inspect.getdoc`` follows the method resolution order).

Run ``python docs/check_docstrings.py``; it prints the undocumented names and exits 1 if any.
The Sphinx build (``docs/conf.py``) runs the same check and fails on it.
"""
from __future__ import annotations

import importlib
import inspect
import sys

# module -> True if its public names come from __all__, False if from its own definitions
PUBLIC_MODULES = {
    "quotientsharp": True,
    "quotientsharp.groups": True,
    "quotientsharp.adapters": True,
    "quotientsharp.measures": True,
    "quotientsharp.curvature": True,
    "quotientsharp.optim": True,
    "quotientsharp.models": True,
    "quotientsharp.data": True,
    "quotientsharp.quotient": False,
    "quotientsharp.geodesic": False,
    "quotientsharp.manifold": False,
    "quotientsharp.tangent": False,
    "quotientsharp.distributed": False,
    "quotientsharp.studies.diagonal": False,
    "quotientsharp.studies.transformers": False,
    "quotientsharp.studies.transformer_population": False,
    "quotientsharp.studies.transformer_training": False,
    "quotientsharp.studies.transformer_measures": False,
    "quotientsharp.studies.transformer_run": False,
    "quotientsharp.studies.report": False,
    "quotientsharp.studies.finetune": False,
    "quotientsharp.studies.kendall": False,
    "quotientsharp.studies.runner": False,
    "quotientsharp.studies.parallel": False,
}


def public_names(module) -> list[str]:
    """The public names of ``module`` (see the module docstring)."""
    if PUBLIC_MODULES[module.__name__]:
        return list(module.__all__)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isclass(obj) or inspect.isfunction(obj))]


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isfunction(attr) or isinstance(attr, property):
            out.append((name, attr))
    return out


def _inherited_doc(cls, name: str) -> str | None:
    for base in cls.__mro__[1:]:
        attr = vars(base).get(name)
        if attr is not None:
            doc = inspect.getdoc(attr)
            if doc:
                return doc
    return None


def missing_docstrings() -> list[str]:
    """Dotted names of public functions, classes and class members without a docstring."""
    missing: list[str] = []
    seen: set[int] = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if not (module.__doc__ or "").strip():
            missing.append(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue  # constants and aliases are documented where they are defined
            seen.add(id(obj))
            where = f"{obj.__module__}.{obj.__qualname__}"
            if not (obj.__doc__ or "").strip():
                missing.append(where)
            if inspect.isclass(obj):
                for member_name, member in _members(obj):
                    if not (getattr(member, "__doc__", None) or "").strip() \
                            and not _inherited_doc(obj, member_name):
                        missing.append(f"{where}.{member_name}")
    return missing


if __name__ == "__main__":
    names = missing_docstrings()
    for name in names:
        print(f"missing docstring: {name}")
    print(f"{len(names)} public names without a docstring")
    sys.exit(1 if names else 0)
