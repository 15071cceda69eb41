"""posttrain: post-train world models with SFT, DPO and verifiable RL from simulator rewards.

Subpackages: `posttrain.envs3d` (PyBullet scenes), `posttrain.rewards` (verifiers and
reward models), `posttrain.kernels` (Triton kernels with torch references).
"""

__version__ = "0.1.0"
