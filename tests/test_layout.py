"""The package's shape: imports point one way, serving never loads the trainer, modules stay small, nothing is
pasted twice, and generator models logged by the previous layout still load."""

from __future__ import annotations

import ast
import collections
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gan_dist

PACKAGE = Path(gan_dist.__file__).parent
TESTS = Path(__file__).parent
MAX_LINES = 400
MAX_WORKER_FUNCTION_LINES = 60
COPY_WINDOW = 6


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk_running_code(node: ast.AST) -> list[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` (imports for type hints only)."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        found += [child, *_walk_running_code(child)]
    return found


def _imports(path: Path, lazy: bool = False) -> set[str]:
    """gan_dist modules imported at module level, and with ``lazy`` also inside functions."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in _walk_running_code(tree) if lazy else tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gan_dist"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gan_dist"))
    return found


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-imports-inside-functions"])
def test_no_import_cycles(lazy: bool) -> None:
    """Imports point one way, also those deferred into functions (a lazy cycle is a cycle that hides)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path, lazy) if m in modules and m != name} for name, path in modules.items()}
    # A package imports its own submodules when it is imported; a cycle through the package is a real cycle.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_serving_imports_nothing_from_the_trainer() -> None:
    code = (
        "import sys, mlflow.pyfunc\n"
        "import gan_dist.models, gan_dist.sample, gan_dist.evaluate, gan_dist.tracking, gan_dist.tracking.model\n"
        "bad = sorted(m for m in sys.modules if m.startswith('gan_dist.train') or m == 'gan_dist.tracking.tracker')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"serving code pulled in: {out.stdout.strip()}"


def test_modules_stay_small_and_the_worker_function_short() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    from gan_dist.train.loop import train_worker

    lines = len(inspect.getsource(train_worker).splitlines())
    assert lines <= MAX_WORKER_FUNCTION_LINES, f"train_worker has {lines} lines"


def _signature_lines(source: str) -> set[int]:
    """Lines of function signatures: implementations of one interface share them on purpose."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(range(node.lineno, node.body[0].lineno))
    return lines


def test_no_pasted_code() -> None:
    """No run of six code lines stands in two places (imports, signatures, blank and comment lines do not count)."""
    places = collections.defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        signatures = _signature_lines(source)
        code = [
            (number, line.strip())
            for number, line in enumerate(source.splitlines(), 1)
            if len(line.strip()) > 3 and not line.strip().startswith(("#", "import ", "from ")) and number not in signatures
        ]
        for i in range(len(code) - COPY_WINDOW + 1):
            run = "\n".join(text for _, text in code[i : i + COPY_WINDOW])
            places[run].append(f"{path.relative_to(PACKAGE)}:{code[i][0]}")
    repeated = {run: where for run, where in places.items() if len(where) > 1}
    assert not repeated, "\n".join(f"{where}:\n{run}" for run, where in repeated.items())


def test_generator_logged_by_the_previous_layout_still_loads() -> None:
    """tests/data/legacy_generator_model was logged by gan_dist 127041b, when tracking was a module and the model
    named ``gan_dist.tracking`` as its loader. MLflow must still load it, weights-only, to the same outputs."""
    import mlflow.pyfunc
    import torch

    model_dir = TESTS / "data" / "legacy_generator_model"
    assert "loader_module: gan_dist.tracking\n" in (model_dir / "MLmodel").read_text()
    model = mlflow.pyfunc.load_model(str(model_dir))
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).numpy()
    expected = np.load(TESTS / "data" / "legacy_generator_model_expected.npy")
    np.testing.assert_allclose(model.predict(z), expected, rtol=0, atol=1e-6)


# torch APIs gan_dist calls that are younger than torch itself, with the release that brought each.
TORCH_APIS_SINCE = {"torch.nn.utils.get_total_norm": (2, 6), "torch.amp.GradScaler": (2, 3)}


def test_the_declared_torch_floor_has_every_torch_api_the_package_calls():
    """pyproject's lowest torch must run the code: a user pinned to it must not meet an AttributeError mid-run."""
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (PACKAGE.parent / "pyproject.toml").read_text())
    assert floor, "pyproject.toml declares no torch floor"
    for api, since in TORCH_APIS_SINCE.items():
        assert api.removeprefix("torch.") in source or api in source
        assert (int(floor[1]), int(floor[2])) >= since, f"{api} needs torch >= {since[0]}.{since[1]}"
