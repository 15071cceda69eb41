"""Load a world model by name (`default`, the embedded base) or by folder path, dispatching on the
folder's config.json "architecture" (posttrain.TokenWorldModel or posttrain.HFWorldModel)."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
"""The embedded base model, shipped with the package (see its README.md for how it was made)."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                "rebuild it with `posttrain run recipes/pretrain_tabletop.yaml`"
            )
        return DEFAULT_MODEL_DIR
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(name_or_path)!r} is neither 'default' nor an existing folder")
    return path


def model_architecture(folder: Path) -> str | None:
    """config.json's "architecture"; None without a config.json (the loader then names what is missing)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return config.get("architecture") if isinstance(config, dict) else None


def load_model(name_or_path: str | Path = "default", map_location: str = "cpu"):
    """A world model from 'default' or a `save_pretrained` folder of either built-in architecture."""
    from .hf_world_model import ARCHITECTURE as HF_ARCHITECTURE
    from .world_model import TokenWorldModel

    folder = resolve_model_path(name_or_path)
    if model_architecture(folder) == HF_ARCHITECTURE:
        from .hf_world_model import HFWorldModel

        return HFWorldModel.from_pretrained(folder, map_location)
    # TokenWorldModel's loader names a missing config, bad JSON or an unknown architecture.
    return TokenWorldModel.from_pretrained(folder, map_location)
