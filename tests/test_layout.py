"""The package layout: stages import only downward, with no circles, and the heavy
dependencies stay in the stage that needs them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Each stage may import the ones before it, never one after it.
STAGES = ["config", "training", "results", "summary", "study", "__main__"]
# Third-party packages only one stage may import.
ONLY_IN = {"optuna": "study", "ray": "study"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth of the file: for `from package
    import module`, the module alone."""
    modules = _modules()
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in modules else node.module)
    return names


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__main__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        module: {name for name in _imports(path) if name in modules and name != module}
        for module, path in modules.items()
    }


def test_layout_has_every_stage_as_a_package_with_a_docstring():
    for stage in STAGES[:-1]:
        init = PACKAGE / stage / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{stage} says what it owns"


def test_layout_imports_run_only_downward():
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if target != "pipeline" and STAGES.index(_stage(target)) > STAGES.index(_stage(module))
    ]
    assert upward == []


def test_layout_has_no_import_circles():
    graph = _graph()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in graph[module]:
            if target in path:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in seen:
                seen.add(target)
                visit(target, [*path, target])

    seen: set[str] = set()
    for module in graph:
        if module not in seen:
            seen.add(module)
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("dependency", sorted(ONLY_IN))
def test_layout_keeps_a_dependency_in_its_stage(dependency):
    outside = [
        module
        for module, path in _modules().items()
        if _stage(module) != ONLY_IN[dependency]
        and any(name.split(".")[0] == dependency for name in _imports(path))
    ]
    assert outside == []


def test_layout_has_no_module_over_600_lines_but_the_kernels_numerics():
    long = [
        module
        for module, path in _modules().items()
        if len(path.read_text().splitlines()) > 600 and module != "pipeline.training.kernels"
    ]
    assert long == []
