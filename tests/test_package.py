"""The package's shape (ARCHITECTURE.md): layers import only downwards, no import circles, a light ``import fastabsld``,
the public names at the root."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastabsld

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("fastabsld.loss", "fastabsld.methods", "fastabsld.temperature", "fastabsld.attack", "fastabsld.metrics",
           "fastabsld.evaluation", "fastabsld.sanity")


def _modules():
    """{module name: path} of every Python module of the package and of its Triton kernels."""
    found = {}
    for path in sorted((ROOT / "fastabsld").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "fastabsld.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        found[name] = path
    return found


def _imports(path, module, known):
    """The fastabsld modules that ``module`` imports anywhere in its file (module level or inside functions)."""
    targets = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # "fastabsld.recipe.train.train" -> the module it names
                name = name.rpartition(".")[0]
            if name and name not in (module, "fastabsld") and name.startswith("fastabsld"):
                targets.add(name)
    return targets


def _layer(name):
    if name == "fastabsld.reference":
        return "reference"
    if name.startswith("fastabsld.kernels") or name == "fastabsld._C":
        return "kernels"
    if name.startswith("fastabsld.ops"):
        return "ops"
    if name.startswith("fastabsld.study") or name == "fastabsld.__main__":
        return "study"
    if name.startswith("fastabsld.recipe"):
        return "recipe"
    if name == "fastabsld":
        return "root"
    assert name.startswith(LIBRARY), f"{name} is in no layer of ARCHITECTURE.md"
    return "library"


# What each layer may import (besides itself).
ALLOWED = {"reference": set(), "kernels": set(), "ops": {"kernels"}, "library": {"ops"},
           "recipe": {"ops", "library"}, "study": {"ops", "library", "recipe"}, "root": {"ops", "kernels"}}


def test_layers_import_only_downwards():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    wrong = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, targets in graph.items() for b in targets
             if _layer(b) != _layer(a) and _layer(b) not in ALLOWED[_layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The two tests above can fail: a module of the library importing the recipe is reported."""
    path = tmp_path / "metrics.py"
    path.write_text("from fastabsld.recipe.train import train\nimport fastabsld.loss\n")
    known = set(_modules())
    assert _imports(path, "fastabsld.metrics", known) == {"fastabsld.recipe.train", "fastabsld.loss"}
    assert _layer("fastabsld.recipe.train") not in ALLOWED[_layer("fastabsld.metrics")]
    assert _layer("fastabsld.study.compare") not in ALLOWED[_layer("fastabsld.recipe.cli")]


def test_import_fastabsld_loads_no_recipe_module():
    code = "import sys, json, fastabsld; print(json.dumps(sorted(m for m in sys.modules if m.startswith('fastabsld'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "fastabsld.ops" in loaded
    assert not [m for m in loaded if m.startswith(("fastabsld.recipe", "fastabsld.study", "fastabsld.reference"))], \
        loaded


@pytest.mark.parametrize("name", ["kd_kl_div", "KDLoss", "ABSLDLoss", "pgd_step", "pgd", "pgd_loop", "fgsm",
                                  "evaluate", "ClassAccuracy", "anti_bias_update"])
def test_public_names_at_the_root(name):
    assert name in fastabsld.__all__
    value = getattr(fastabsld, name)
    assert value is getattr(sys.modules[fastabsld._EXPORTS[name]], name)


def test_user_import_paths_are_kept():
    from fastabsld.attack import cw_loss, fgsm, kl_loss, pgd  # noqa: F401
    from fastabsld.loss import ABSLDLoss, KDLoss, kd_kl_div
    from fastabsld.metrics import nsd  # noqa: F401
    from fastabsld.ops import pgd_step

    assert (kd_kl_div, KDLoss, ABSLDLoss, pgd_step) == (fastabsld.kd_kl_div, fastabsld.KDLoss, fastabsld.ABSLDLoss,
                                                        fastabsld.pgd_step)
    assert fastabsld.metrics.nsd is nsd
