"""Sphinx configuration of the quotientsharp documentation.

Build (warnings are errors, every gallery example is executed)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

The build fails on a broken cross-reference (``-n``: nitpicky), on any warning (``-W``), on an
example that raises, and on a public name without a docstring (``check_docstrings.py``).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # check_docstrings
sys.path.insert(0, str(HERE.parent))   # the package, when not installed

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

import quotientsharp  # noqa: E402

# Every build executes every example from scratch: a stale page of a renamed or removed example
# would otherwise be a warning (an error under -W), and CI always starts clean anyway.
shutil.rmtree(HERE / "auto_examples", ignore_errors=True)

project = "quotientsharp"
author = "quotientsharp authors"
copyright = "2026, quotientsharp authors"
release = version = quotientsharp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "examples/README.rst"]
templates_path: list[str] = []
html_theme = "furo"
html_title = f"quotientsharp {release}"
html_static_path: list[str] = []

# --- autodoc ----------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# --- broken references are errors (-n), except for names of other libraries -------------------
# No intersphinx (the build runs offline), so types from torch, numpy, the standard library and
# the other dependencies in signatures cannot resolve; every quotientsharp reference must.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|np|numpy|scipy|geoopt|transformers|ray|matplotlib|argparse|os|pathlib|"
               r"collections|typing|abc|dataclasses|enum|json|concurrent|types|re|io|contextlib)(\..*)?"),
    (r"py:.*", r"quotientsharp\..*\._[A-Za-z]\w*"),   # private base classes in "Bases:"
    (r"py:class", r"dict\[str"),   # a dataclass field's "dict[str, ~typing.Any]", split by Sphinx
    (r"py:.*", r"(Tensor|Module|Optimizer|Generator|Path|PathLike|Any|Callable|Mapping|Sequence|"
               r"Iterable|Iterator|MutableMapping|Literal|Optional|Union|Self|TypeAlias|"
               r"ProcessGroup|ndarray|dtype|device|Figure|Axes|Namespace|ArgumentParser|"
               r"DataLoader|Dataset|GradScaler|ExitStack|ContextManager|Hashable|TextIO)"),
    (r"py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|"
               r"callable|optional|iterable|sequence|mapping|array-like|function)"),
]

# --- sphinx-gallery: every example is executed on CPU at build time ---------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",          # execute every example, not only plot_*
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib", "seaborn"),
    "min_reported_time": 0,
    "write_computation_times": False,      # each example page states its own running time
}


def _check_docstrings(app) -> None:
    from check_docstrings import missing_docstrings
    from sphinx.errors import ExtensionError

    missing = missing_docstrings()
    if missing:
        raise ExtensionError(
            f"{len(missing)} public names have no docstring (python docs/check_docstrings.py): "
            + ", ".join(missing))


def _napoleon_except_attributes(app) -> None:
    """Napoleon reads the first line of a data/attribute docstring as ``type: description``;
    the library's ``#:`` comments are prose ("The one vocabulary: ..."), so napoleon is kept off
    them (and stays on for the Google-style ``Args:``/``Returns:`` sections of functions)."""
    from sphinx.ext import napoleon

    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)

    def process(app, what, name, obj, options, lines):
        if what not in ("data", "attribute", "property"):
            napoleon._process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def _import_dotted(path: str):
    """The object at a dotted path (module prefix, then attributes), or ``None``."""
    import importlib

    parts = path.split(".")
    # an attribute of the parent first: ``quotientsharp.curvature.slq`` is the function that the
    # package exports, not the submodule of the same name
    for cut in [*range(len(parts) - 1, 0, -1), len(parts)]:
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001  (not a module)
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_quotientsharp_reference(app, env, node, contnode):
    """Resolve a reference to a quotientsharp object that is documented under another path.

    The public API is re-exported (``quotientsharp.groups.AttentionGL`` is defined in
    ``quotientsharp.groups.attention``) and docstrings name objects by their defining module, by a
    short name or by a method inherited from a base class. Such a reference resolves when it
    names exactly one documented object: the same Python object under its documented path, the
    same member on a base class of the current class, or a unique documented name ending in
    ``.<target>``. Anything else stays unresolved and fails the build (``-n -W``).
    """
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    domain = env.get_domain("py")
    objects = domain.objects
    target = node["reftarget"].lstrip("~.")
    cache = env.__dict__.setdefault("_qs_object_ids", {})
    if len(cache) != len(objects):
        cache.clear()
        for name in objects:
            if name.startswith("quotientsharp"):
                obj = _import_dotted(name)
                if obj is not None and not isinstance(obj, (int, float, str, tuple, bool, type(None))):
                    cache.setdefault(id(obj), name)
        cache["__len__"] = len(objects)  # keep the sizes apart from ids
    found = None
    if target.startswith("quotientsharp."):
        obj = _import_dotted(target)
        if obj is not None:
            found = cache.get(id(obj))
    if found is None and node.get("py:class"):
        owner = _import_dotted(f"{node.get('py:module')}.{node.get('py:class')}")
        for base in getattr(owner, "__mro__", ())[1:]:
            base_name = cache.get(id(base))
            if base_name and f"{base_name}.{target}" in objects:
                found = f"{base_name}.{target}"
                break
    if found is None:
        matches = [name for name in objects if name.startswith("quotientsharp") and
                   (name.endswith("." + target)) and not objects[name].aliased]
        if len(matches) == 1:
            found = matches[0]
    if found is None:
        return None
    entry = objects[found]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, found)


def setup(app):
    app.connect("missing-reference", _resolve_quotientsharp_reference)
    _napoleon_except_attributes(app)
    app.connect("builder-inited", _check_docstrings)
