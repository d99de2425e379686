"""The package's shape: imports point one way (no cycle, counting imports inside functions), and importing
it changes nothing in the process."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import reformer

PACKAGE = Path(reformer.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports, at the top or inside a function.
    ``from X import name`` counts as importing X.name where that is a module, else X."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_finds_a_cycle_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "reformer.ops.native.kernels" in graph["reformer.ops.hashing"]
    assert find_cycle(graph) is None


def test_the_layers_import_downwards_only():
    """The tensor functions know nothing of the modules, the modules nothing of training, the CLI or
    interop; the leaf helpers import nothing of the package."""
    graph = import_graph()
    above = {"reformer.ops": ("reformer.nn", "reformer.training", "reformer.generate", "reformer.interop",
                              "reformer.experiments", "reformer.cli"),
             "reformer.nn": ("reformer.training", "reformer.generate", "reformer.interop", "reformer.experiments",
                             "reformer.cli")}
    for name, imports in graph.items():
        for layer, forbidden in above.items():
            if name.startswith(layer):
                assert not [t for t in imports if t.startswith(forbidden)], (name, imports)
    for leaf in ("reformer.files", "reformer.version", "reformer.plotting"):
        assert graph[leaf] == set(), leaf


_SNAPSHOT = """
import json, os, random, sys
import numpy, torch
def state():
    return {"environ": dict(os.environ), "threads": torch.get_num_threads(),
            "default_dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "torch_rng": torch.get_rng_state().tolist(), "python_rng": repr(random.getstate()),
            "numpy_rng": repr(numpy.random.get_state())}
before = state()
import reformer, reformer.cli, reformer.generate, reformer.interop.hf, reformer.training.loop
import reformer.experiments
print(json.dumps([before, state()]))
"""


def test_importing_reformer_changes_nothing_in_the_process():
    """Environment variables, torch's global settings and every random generator are as they were."""
    result = subprocess.run([sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, check=True, timeout=300)
    before, after = json.loads(result.stdout)
    for key in before:
        assert after[key] == before[key], key
