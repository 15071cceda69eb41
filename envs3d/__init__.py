"""envs3d: procedural PyBullet scenes that know the truth (camera poses, depth, segmentation, objects).

    from posttrain.envs3d import TabletopEnv, SceneConfig, generate_episode
    env = gymnasium.make("envs3d/Tabletop-v0")          # or TabletopEnv(SceneConfig(image_size=64))

Camera convention everywhere: OpenCV (x right, y down, z forward); see `camera`.
"""

from .actions import ACTION_NAMES, NUM_ACTIONS, action_id, push_action
from .config import MAX_OBJECTS, SceneConfig
from .env import TabletopEnv
from .generate import generate_dataset, generate_episode, iter_episodes, parse_seeds

ENV_ID = "envs3d/Tabletop-v0"


def _register() -> None:
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="posttrain.envs3d.env:TabletopEnv")


_register()

__all__ = [
    "ACTION_NAMES", "ENV_ID", "MAX_OBJECTS", "NUM_ACTIONS", "SceneConfig", "TabletopEnv",
    "action_id", "generate_dataset", "generate_episode", "iter_episodes", "parse_seeds", "push_action",
]
