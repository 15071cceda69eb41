"""World models: the `WorldModel` protocol, the FSQ tokenizer, the dynamics transformer, the transformers
causal-LM world model and loading by name or folder."""

from .dynamics import DynamicsConfig, DynamicsTransformer
from .hf_world_model import HFWorldModel
from .registry import load_model, register_architecture
from .tokenizer import FrameTokenizer, TokenizerConfig
from .world_model import RolloutOutput, TokenWorldModel, WorldModel, weights_hash

__all__ = [
    "DynamicsConfig", "DynamicsTransformer", "FrameTokenizer", "HFWorldModel", "RolloutOutput", "TokenWorldModel",
    "TokenizerConfig", "WorldModel", "load_model", "register_architecture", "weights_hash",
]
