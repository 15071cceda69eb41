"""envs3d: procedural PyBullet scenes that know the truth (camera poses, depth, segmentation, objects).

    from posttrain.envs3d import TabletopEnv, SceneConfig, generate_episode
    env = gymnasium.make("envs3d/Tabletop-v0")          # or TabletopEnv(SceneConfig(image_size=64))

Camera convention everywhere: OpenCV (x right, y down, z forward); see `camera`.
"""

from .actions import ACTION_NAMES, NUM_ACTIONS, action_id, push_action
from .config import MAX_OBJECTS, SceneConfig

ENV_ID = "envs3d/Tabletop-v0"
_LAZY = {"TabletopEnv": ".env", "generate_dataset": ".generate", "generate_episode": ".generate",
         "iter_episodes": ".generate", "parse_seeds": ".generate"}


def __getattr__(name: str):
    # PyBullet loads only when the simulator is used (the CLI and footage only need the action ids).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register() -> None:
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="posttrain.envs3d.env:TabletopEnv")


_register()

__all__ = [
    "ACTION_NAMES", "ENV_ID", "MAX_OBJECTS", "NUM_ACTIONS", "SceneConfig", "TabletopEnv",
    "action_id", "generate_dataset", "generate_episode", "iter_episodes", "parse_seeds", "push_action",
]
