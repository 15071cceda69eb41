"""DESIGN.md's dependency direction: trainers/models -> rewards -> envs3d; trainers/models -> kernels.

envs3d, rewards and kernels never import the trainers or models (checked on the source's import
statements, so a violation fails here before it becomes a circular import somewhere else).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINERS_AND_MODELS = ("posttrain.models", "posttrain.grpo", "posttrain.dpo", "posttrain.sft", "posttrain.pretrain",
                       "posttrain.trainer_utils", "posttrain.runner", "posttrain.evaluate", "posttrain.report",
                       "posttrain.adapters", "posttrain.data", "posttrain.cli", "posttrain.footage", "posttrain.publish")
FORBIDDEN = {
    "envs3d": TRAINERS_AND_MODELS + ("posttrain.rewards", "posttrain.kernels"),
    "rewards": TRAINERS_AND_MODELS + ("posttrain.kernels",),
    "kernels": TRAINERS_AND_MODELS + ("posttrain.rewards", "posttrain.envs3d"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_layers(folder):
    files = sorted((ROOT / folder).glob("*.py"))
    assert files
    for path in files:
        bad = [name for name in _imports(path) if name.startswith(FORBIDDEN[folder])]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_check_sees_imports():
    assert "posttrain.envs3d.actions" in _imports(ROOT / "posttrain" / "footage.py")
