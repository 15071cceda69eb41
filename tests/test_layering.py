"""Layering, checked on every module's import statements (relative imports resolved), so a violation
fails here before it becomes a circular import somewhere else.

DESIGN.md's dependency direction, from the bottom:
- kernels, envs3d: import nothing of ours outside themselves;
- rewards: itself and envs3d;
- posttrain/models (the WorldModel protocol and the models): itself, kernels, rewards, envs3d;
- library parts (every other posttrain module: training, rollouts, report, evaluate, adapters, data, ...):
  the layers below and each other, never a method file nor an entry point;
- method files (every module `posttrain run` dispatches to, runner.METHODS): everything but entry points;
- entry points (cli, runner, __main__): anything.
And the trainers see a world model only through its protocol: outside models/, only the modules that
build models (pretrain, pretrain_flow, cli) import more of posttrain.models than `PROTOCOL_SURFACE`. No two modules
import each other, directly or around a circle, even lazily inside a function (a package's `__init__`
re-exporting its modules is not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from posttrain.runner import METHODS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"posttrain": "posttrain", "envs3d": "posttrain.envs3d", "rewards": "posttrain.rewards",
            "kernels": "posttrain.kernels"}
"""Source folder -> installed package name (pyproject's package-dir mapping)."""
ENTRY_POINTS = ("posttrain.cli", "posttrain.runner", "posttrain.__main__")
METHOD_MODULES = tuple(sorted({module for module, _ in METHODS.values()}))
ALLOWED = {
    "kernels": {"kernels"},
    "envs3d": {"envs3d"},
    "rewards": {"rewards", "envs3d"},
    "models": {"models", "kernels", "rewards", "envs3d"},
    "library": {"library", "models", "kernels", "rewards", "envs3d"},
    "method": {"method", "library", "models", "kernels", "rewards", "envs3d"},
    "entry": {"entry", "method", "library", "models", "kernels", "rewards", "envs3d"},
}
PROTOCOL_SURFACE = {"posttrain.models", "posttrain.models.load_model", "posttrain.models.weights_hash",
                    "posttrain.models.RolloutOutput", "posttrain.models.WorldModel", "posttrain.models.registry",
                    "posttrain.models.registry.resolve_model_path", "posttrain.models.registry.BUILTIN_MODELS"}
"""What a module outside models/ may import from it: loading by name, the protocol, the rollout type."""
BUILDS_MODELS = ("posttrain.pretrain", "posttrain.pretrain_flow", "posttrain.adapt_tokenizer", "posttrain.cli")
"""Modules that build a model or retrain one of its parts (adapt_tokenizer: the frame decoder), so they know its classes."""


def _module_name(path: Path) -> str:
    """posttrain/grpo.py -> posttrain.grpo; rewards/verifiers.py -> posttrain.rewards.verifiers."""
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every dotted name `path` imports, relative imports resolved against its installed package;
    `from a import b` gives both `a` and `a.b` (b may be a submodule)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base != "posttrain":  # the package root holds nothing but its submodules
                names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _layer(name: str) -> str | None:
    """The layer of one of our dotted names (None for other packages)."""
    for layer in ("kernels", "envs3d", "rewards", "models"):
        if name == f"posttrain.{layer}" or name.startswith(f"posttrain.{layer}."):
            return layer
    if name == "posttrain":
        return "library"  # the package root: a docstring and __version__
    if not name.startswith("posttrain."):
        return None
    top = ".".join(name.split(".")[:2])
    return "entry" if top in ENTRY_POINTS else "method" if top in METHOD_MODULES else "library"


SOURCES = sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def test_every_module_is_checked():
    names = {_module_name(p) for p in SOURCES}
    for expected in ("posttrain.training", "posttrain.rollouts", "posttrain.grpo", "posttrain.models.world_model",
                     "posttrain.rewards.registry", "posttrain.envs3d.jobs", "posttrain.kernels.sampling"):
        assert expected in names
    assert {_layer(n) for n in names} == set(ALLOWED)  # every layer has modules, and every module a layer


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    layer = _layer(_module_name(path))
    bad = sorted(name for name in _imports(path) if _layer(name) not in (None, *ALLOWED[layer]))
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {bad}"


@pytest.mark.parametrize("path", [p for p in SOURCES if _layer(_module_name(p)) != "models"
                                  and _module_name(p) not in BUILDS_MODELS], ids=lambda p: str(p.relative_to(ROOT)))
def test_trainers_see_models_only_through_the_protocol(path):
    bad = sorted(name for name in _imports(path) if _layer(name) == "models" and name not in PROTOCOL_SURFACE)
    assert not bad, f"{path.relative_to(ROOT)} reaches past the WorldModel protocol: {bad}"


def test_no_import_circles():
    """Depth-first search over module -> imported module (function-level imports included)."""
    paths = {_module_name(p): p for p in SOURCES if p.name != "__init__.py"}
    graph = {name: sorted(n for n in _imports(path) if n in paths and n != name) for name, path in paths.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in graph[name]:
            assert state.get(imported) != "open", f"import circle: {' -> '.join(trail + [name, imported])}"
            if imported not in state:
                visit(imported, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_check_sees_imports():
    assert "posttrain.envs3d.actions" in _imports(ROOT / "posttrain" / "footage_frames.py")
    # Relative imports, resolved: `from .registry import ...` and `from . import metrics`.
    verifiers = _imports(ROOT / "rewards" / "verifiers.py")
    assert {"posttrain.rewards.registry", "posttrain.rewards.metrics"} <= verifiers
    assert "posttrain.models.dynamics" in _imports(ROOT / "posttrain" / "models" / "__init__.py")
    # `from posttrain import rollouts, training` names the submodules.
    assert {"posttrain.rollouts", "posttrain.training"} <= _imports(ROOT / "posttrain" / "grpo.py")
    assert _layer("posttrain.grpo") == "method" and _layer("posttrain.training") == "library"
