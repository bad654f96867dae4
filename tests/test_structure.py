"""fluxlab as a contributor reads it: imports that flow one way, and no module reaching back to the package."""
import ast

from conftest import ROOT

PACKAGE = ROOT / "fluxlab"


def imports() -> dict[str, set[str]]:
    """Module -> the fluxlab modules it imports (at any depth in its code)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxlab"):
                found.add(node.module.removeprefix("fluxlab.") or "__init__")
            elif isinstance(node, ast.Import):
                found.update(a.name.removeprefix("fluxlab.") for a in node.names if a.name.startswith("fluxlab"))
        graph[name] = {m.split(".")[0] for m in found}
    return graph


def test_no_module_imports_the_package_back():
    for module, deps in imports().items():
        if module not in ("__init__", "__main__"):
            assert "fluxlab" not in deps and "__init__" not in deps, f"{module} imports the package"


def test_imports_have_no_cycle():
    graph = {m: d - {"__init__", "fluxlab"} for m, d in imports().items() if m not in ("__init__", "__main__")}
    done, active = set(), []

    def visit(module):
        assert module not in active, "import cycle: " + " -> ".join(active + [module])
        if module in done:
            return
        active.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)
