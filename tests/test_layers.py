"""The package is layered: a module imports only from its own layer or below, sibling folders of one layer do not
import each other, and module-level imports form no circle. Read from the source, function-level imports included."""

import ast
from pathlib import Path

import leanvlm

PACKAGE = Path(leanvlm.__file__).parent
# Bottom to top, by the first component under leanvlm/ (a module file or a folder).
LAYERS = [
    {"decoders"},  # policies, attention, cache, the LLM adapter: never the config
    {"config", "vision", "encoder", "tome", "crops", "processing", "hub", "generation", "modeling", "reports",
     "stats", "precision"},  # the HF-style core
    {"data"},
    {"eval"},  # metrics and answering, which training, measuring and serving report with
    {"train", "measure", "inference", "interop"},  # workflows, each its own folder
    {"serve"},  # HTTP over the inference engine
    {"demo", "compare", "cli", "__main__", "__init__"},  # faces and apps
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
FOLDER_LAYER = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    """(imported leanvlm module, whether the import is at module level) for each import in the file."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: use absolute imports"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "leanvlm":
            for alias in node.names:  # `from leanvlm import generation` imports a module, not the package
                submodule = f"{node.module}.{alias.name}"
                path = PACKAGE.parent / submodule.replace(".", "/")
                is_module = path.with_suffix(".py").exists() or path.is_dir()
                yield (submodule if is_module else node.module), id(node) in module_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "leanvlm":
                    yield alias.name, id(node) in module_level


def graph():
    return {module_name(path): list(imports(path)) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted({top(module) for module in graph()} - set(RANK))
    assert not unplaced, f"place {unplaced} in a layer of LAYERS"


def test_no_module_imports_upward_or_across_folders():
    wrong = []
    for module, targets in graph().items():
        for target, _ in targets:
            source_part, target_part = top(module), top(target)
            if RANK[target_part] > RANK[source_part]:
                wrong.append(f"{module} imports {target} (a layer above)")
            elif RANK[source_part] == RANK[target_part] == FOLDER_LAYER and source_part != target_part:
                wrong.append(f"{module} imports {target} (a sibling folder)")
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_form_no_circle():
    edges = {module: {target for target, at_top in targets if at_top} for module, targets in graph().items()}
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError("import circle: " + " -> ".join([*on_path[on_path.index(module):], module]))
        if module in done or module not in edges:
            return
        on_path.append(module)
        for target in edges[module]:
            visit(target)
        on_path.pop()
        done.add(module)

    for module in edges:
        visit(module)
