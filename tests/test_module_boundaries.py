"""The package's modules import each other without a circle, and none imports a name another keeps private
(`_name`): each module's public names are its surface. Checked on the source, imports inside functions included."""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "vamba_hf"
PACKAGE = PACKAGE_DIR.name


def module_names() -> list:
    return sorted(path.stem for path in PACKAGE_DIR.glob("*.py"))


def imports_of(source: str) -> list:
    """(sibling module, names taken from it) for each import of a sibling module in `source`: names are empty for
    `import` or `from . import module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            package_relative = node.level == 1 or (node.level == 0 and (node.module or "").startswith(PACKAGE))
            if not package_relative:
                continue
            module = (node.module or "").removeprefix(PACKAGE).lstrip(".") if node.level == 0 else node.module
            if module:
                found.append((module, [alias.name for alias in node.names]))
            else:
                found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], []) for alias in node.names
                      if alias.name.startswith(PACKAGE + ".")]
    return found


def import_graph(sources: dict) -> dict:
    """Module name -> {sibling module: names taken from it} for the modules of `sources` (name -> source)."""
    graph = {}
    for name, source in sources.items():
        edges = graph.setdefault(name, {})
        for module, names in imports_of(source):
            if module in sources and module != name:
                edges.setdefault(module, []).extend(names)
    return graph


def cycles(graph: dict) -> list:
    """Each import circle of `graph`, as the list of its modules (the first repeated at the end)."""
    found, state = [], {}

    def visit(module: str, path: list) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def closure(graph: dict, module: str) -> set:
    """The modules `module` imports, directly or through others."""
    found, waiting = set(), [module]
    while waiting:
        for target in graph.get(waiting.pop(), {}):
            if target not in found:
                found.add(target)
                waiting.append(target)
    return found - {module}


def private_imports(graph: dict) -> list:
    return [f"{module} imports {name} from {target}" for module, edges in sorted(graph.items())
            for target, names in sorted(edges.items()) for name in names if name.startswith("_")]


@pytest.fixture(scope="module")
def package_graph() -> dict:
    return import_graph({name: (PACKAGE_DIR / f"{name}.py").read_text() for name in module_names()})


def test_the_package_has_no_import_circle(package_graph):
    assert cycles(package_graph) == []


def test_no_module_imports_another_modules_private_names(package_graph):
    assert private_imports(package_graph) == []


def test_each_auto_class_module_imports_every_module_it_needs_itself(package_graph):
    """transformers 4.x copies into its module cache only the modules that the file an `auto_map` entry names
    imports itself, not those they import: a local folder's remote code would miss them."""
    from vamba_hf.configuration_vamba import AUTO_MAP

    from vamba_hf.video_processing_vamba import VIDEO_PROCESSOR_AUTO_MAP

    references = [*AUTO_MAP.values(), *VIDEO_PROCESSOR_AUTO_MAP.values()]
    for module in sorted({reference.split(".")[0] for reference in references}):
        assert sorted(closure(package_graph, module) - set(package_graph[module])) == [], module


def test_the_checks_find_a_circle_and_a_private_import():
    graph = import_graph({"a": "from .b import _hidden, shown\n", "b": "def f():\n    from . import c\n",
                          "c": "import vamba_hf.a\n", "d": "from vamba_hf.a import x\nfrom .. import y\n"})
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert private_imports(graph) == ["a imports _hidden from b"]
    assert graph["d"] == {"a": ["x"]}
    assert closure(graph, "a") == {"b", "c"} and set(graph["a"]) == {"b"}


def test_the_video_modules_stay_small():
    """The remote-code video modules, read by Hub users: no module over ~700 lines, no function over ~60."""
    sources = {path.name: path.read_text() for path in PACKAGE_DIR.glob("video*_vamba.py")}
    sizes = {name: len(source.splitlines()) for name, source in sources.items()}
    assert len(sizes) >= 7 and max(sizes.values()) <= 700, sizes
    long_functions = [f"{name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for name, source in sources.items() for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long_functions == []
