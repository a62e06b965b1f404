"""The layers of the code: engine/ under data/ and models/, under the tasks qa/ and clm/, under
train.py and predict.py. No module imports from a layer above its own (at the top or inside a
function), there is no import cycle, and the tests import nothing from bench/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each top-level part may import from, itself included.
MAY_IMPORT = {
    "engine": {"engine"},
    "data": {"engine", "data"},
    "models": {"engine", "models"},
    "qa": {"engine", "data", "models", "qa"},
    "clm": {"engine", "data", "models", "clm"},
    "train": {"engine", "data", "models", "qa", "clm", "train"},
    "predict": {"engine", "data", "models", "qa", "clm", "predict"},
}


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def project_modules() -> dict[str, set[str]]:
    """{module: the project's modules it imports}."""
    files = [*ROOT.glob("*.py"), *(f for part in MAY_IMPORT for f in (ROOT / part).glob("*.py"))]
    modules = {}
    for file in files:
        name = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = {m for m in imported(file) if m.split(".")[0] in MAY_IMPORT}
    return modules


def test_no_module_imports_from_a_layer_above():
    modules = project_modules()
    assert {"train", "predict", "engine.settings", "qa.task", "clm.task", "models.build"} <= modules.keys()
    wrong = [f"{module} imports {target}" for module, targets in modules.items() for target in targets
             if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]]
    assert not wrong, wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    found, done, path = [], set(), []

    def visit(node):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_no_import_cycle():
    assert not cycles(project_modules())


def test_the_cycle_search_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_tests_import_nothing_from_bench():
    users = [f.name for f in (ROOT / "tests").glob("*.py") if any(m.split(".")[0] == "bench" for m in imported(f))]
    assert not users, users
