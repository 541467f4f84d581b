"""The import stack (docs/architecture.md): a lower layer loads without the layers above it.

Each check runs in a fresh interpreter. A package's ``__init__`` imports its whole package on purpose
(``unlearn_fast`` is the public face; ``unlearn_fast.evaluate`` imports every metric family so that
``METRICS`` is complete), and importing any submodule runs it first. So the checks stand in bare
packages for the faces named, and what loads is the module's own imports and theirs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


import unlearn_fast.evaluate

FAMILIES = ("lira", "mia", "distance", "relearn", "reconstruction")
BOTTOM = ("registry", "stats", "ssim", "evaluation")


def loaded_after(statement: str, faces: tuple[str, ...] = ()) -> set[str]:
    """The ``unlearn_fast`` modules that a fresh interpreter holds after running ``statement``, with the
    packages ``faces`` stood in for by bare packages (their ``__init__`` does not run)."""
    script = textwrap.dedent(f"""
        import importlib.util, os, sys, types
        locations = importlib.util.find_spec("unlearn_fast").submodule_search_locations
        for face in {faces!r}:
            package = types.ModuleType(face)
            package.__path__ = [os.path.join(location, *face.split(".")[1:]) for location in locations]
            sys.modules[face] = package
        {statement}
        print("\\n".join(name for name in sys.modules if name.startswith("unlearn_fast")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_influence_imports_nothing_from_methods() -> None:
    loaded = loaded_after("import unlearn_fast.influence", faces=("unlearn_fast",))
    assert "unlearn_fast.influence.unlearn" in loaded  # the check saw the whole package
    assert not any(name.startswith("unlearn_fast.methods") for name in loaded), sorted(loaded)


def test_importing_influence_through_the_public_face_leaves_methods_out() -> None:
    # The public face loads the method layer on first use (unlearn_fast.__getattr__).
    loaded = loaded_after("import unlearn_fast.influence")
    assert not any(name.startswith("unlearn_fast.methods") for name in loaded), sorted(loaded)


def test_evaluation_and_the_bottom_of_evaluate_import_no_metric_module() -> None:
    """registry, stats, ssim and evaluation (the Evaluation container) sit below every metric."""
    loaded = loaded_after("; ".join(f"import unlearn_fast.evaluate.{name}" for name in BOTTOM),
                          faces=("unlearn_fast", "unlearn_fast.evaluate"))
    assert "unlearn_fast.evaluate.evaluation" in loaded
    above = {f"unlearn_fast.evaluate.{name}" for name in ("metrics", *FAMILIES)}
    assert not loaded & above, sorted(loaded & above)


def test_the_basic_metrics_import_no_family() -> None:
    loaded = loaded_after("import unlearn_fast.evaluate.metrics", faces=("unlearn_fast", "unlearn_fast.evaluate"))
    families = {f"unlearn_fast.evaluate.{name}" for name in FAMILIES}
    assert not loaded & families, sorted(loaded & families)


def sibling_imports(package: Path) -> dict[str, set[str]]:
    """module → the modules of the same package it imports anywhere in its code: at the top, inside a
    function, or under ``if TYPE_CHECKING`` (the face, ``__init__``, is left out)."""
    modules = {path.stem: path for path in package.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[name] = found & set(modules) - {name}
    return graph


def test_evaluate_is_a_dag_even_counting_imports_inside_functions() -> None:
    graph = sibling_imports(Path(unlearn_fast.evaluate.__file__).parent)
    placed: list[str] = []
    while len(placed) < len(graph):
        ready = sorted(name for name, needs in graph.items() if name not in placed and needs <= set(placed))
        assert ready, f"a cycle among {sorted(set(graph) - set(placed))}: {graph}"
        placed += ready
    assert graph["evaluation"] <= {"registry", "stats", "ssim"}, graph["evaluation"]
