"""Load a world model by name (`default`, the embedded base) or by folder path."""

from __future__ import annotations

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


def load_model(name_or_path: str | Path = "default", map_location: str = "cpu"):
    """A `TokenWorldModel` from 'default' or a `save_pretrained` folder."""
    from .world_model import TokenWorldModel

    return TokenWorldModel.from_pretrained(resolve_model_path(name_or_path), map_location)
