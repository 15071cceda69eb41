"""World models: the `WorldModel` protocol, the FSQ tokenizer, the dynamics transformer and loading by name."""

from .dynamics import DynamicsConfig, DynamicsTransformer
from .registry import load_model
from .tokenizer import FrameTokenizer, TokenizerConfig
from .world_model import RolloutOutput, TokenWorldModel, WorldModel, weights_hash

__all__ = [
    "DynamicsConfig", "DynamicsTransformer", "FrameTokenizer", "RolloutOutput", "TokenWorldModel",
    "TokenizerConfig", "WorldModel", "load_model", "weights_hash",
]
