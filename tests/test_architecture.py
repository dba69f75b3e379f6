"""The package layout: a shared core below every capability, no import cycles between packages, and
no capability reaching into `generate` or `edit` for shared helpers."""

import ast
from pathlib import Path

import atelier

PACKAGE_ROOT = Path(atelier.__file__).parent

# What each package may import from atelier (besides itself, `errors` and `_lazy`); the commands
# (`cli.py` of every package) sit on top and may import anything. Lower layers first;
# the core knows no capability; `prompts` (the A1111 prompt language) is below it because the
# Denoiser encodes prompts.
ALLOWED = {
    "prompts": set(),
    "core": {"prompts"},
    "samplers": {"core"},
    "runtime": {"core"},  # exported graphs behind torch modules; models loads exported folders with it
    "models": {"core", "runtime"},
    "toyworld": {"core"},
    "testing": {"core", "models"},
    "image_prompts": {"core", "models"},  # IP-Adapters through diffusers
    "generate": {"core", "models", "prompts", "samplers", "image_prompts"},
    "edit": {"core", "models", "prompts", "samplers", "image_prompts"},
    "stream": {"core", "models", "prompts", "image_prompts"},
    "evaluate": {"core", "models", "edit", "toyworld", "bench"},  # evaluates the editing methods
    "train": {"core", "models", "prompts", "toyworld", "edit", "evaluate", "image_prompts", "speed", "generate", "tryon"},  # edit's inverter, adapters; speed (compile, numerics); generate: DreamBooth's class images
    "server": {"core", "models", "prompts", "stream", "edit"},  # the app: serves the stream and its edit mode
    "bench": {"core", "generate"},
    "tryon": {"core", "models"},  # virtual try-on: methods over diffusers UNets, their model folder, sampling
    "speed": {"core", "models"},  # quantization, compilation, attention backends, CPU numerics  # runs generation itself, over prompt sets
}
# Packages built on top of generation: they call `generate` itself (not helpers that belong in core).
ON_GENERATE = {"bench", "train"}  # train: prior preservation's class images are `atelier generate` images
TOP_LEVEL = {"cli", "errors", "_lazy", "__init__", "__main__"}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "atelier" else None


def imports_by_package() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it (every import, also inside functions)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        rel = path.relative_to(PACKAGE_ROOT)
        # each package's cli.py belongs to the command layer on top, with atelier/cli.py
        pkg = rel.parts[0] if len(rel.parts) > 1 and rel.name != "cli.py" else "cli"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "atelier"]
            for name in names:
                # lazy-export tables name modules as strings; they are checked through the files they point to
                target = package_of(name)
                if target and target != pkg and target not in TOP_LEVEL:
                    graph.setdefault(pkg, {}).setdefault(target, set()).add(str(rel))
    return graph


def test_every_package_imports_only_what_its_layer_allows():
    wrong = []
    for pkg, targets in imports_by_package().items():
        if pkg in TOP_LEVEL:
            continue
        assert pkg in ALLOWED, f"new package {pkg!r}: add it to ALLOWED with the layer it belongs to"
        for target, files in targets.items():
            if target not in ALLOWED[pkg]:
                wrong.append(f"{pkg} -> {target} ({', '.join(sorted(files))})")
    assert not wrong, "imports across layers:\n" + "\n".join(wrong)


def test_no_import_cycles_between_packages():
    graph = {pkg: set(t) for pkg, t in imports_by_package().items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    cycles = sorted(pkg for pkg in graph if reaches(pkg, pkg))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_the_allowed_layers_themselves_have_no_cycle():
    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in ALLOWED.get(start, ()))

    assert not [pkg for pkg in ALLOWED if reaches(pkg, pkg)]


def test_no_capability_imports_generate_for_shared_helpers():
    graph = imports_by_package()
    offenders = {pkg: sorted(graph[pkg]["generate"]) for pkg in graph if "generate" in graph[pkg] and pkg not in TOP_LEVEL | ON_GENERATE}
    assert not offenders, offenders
