"""The discrete action vocabulary shared by envs3d and world models, and scripted action sequences.

Discrete actions (ids are stable; world models embed them):

====  ===============  =====================================================
id    name             effect
====  ===============  =====================================================
0     noop             nothing moves (the scene is static between pushes)
1     forward          camera moves `move_step` along its horizontal heading
2     back             ... against its heading
3     left             camera strafes left (heading rotated +90 deg)
4     right            camera strafes right
5     up               camera rises `move_step`
6     down             camera sinks `move_step`
7     yaw_left         heading turns +`turn_step_deg` (counter-clockwise seen from above)
8     yaw_right        heading turns -`turn_step_deg`
9     pitch_up         camera tilts up `turn_step_deg`
10    pitch_down       camera tilts down
11+   push_<i>_<dir>   object i (0-based) gets a horizontal velocity in world
                       direction dir in (+x, -x, +y, -y): id = 11 + 4*i + dir
====  ===============  =====================================================

Every camera action has an exact inverse (forward/back, left/right, ...), and the
environment keeps the camera on an integer lattice of such moves, so a sequence
followed by its reversed inverse returns the camera to a bit-identical pose.
"""

from __future__ import annotations

import numpy as np

from .config import MAX_OBJECTS

CAMERA_ACTIONS = (
    "noop", "forward", "back", "left", "right", "up", "down",
    "yaw_left", "yaw_right", "pitch_up", "pitch_down",
)
PUSH_DIRECTIONS = ("+x", "-x", "+y", "-y")
NUM_CAMERA_ACTIONS = len(CAMERA_ACTIONS)
NUM_ACTIONS = NUM_CAMERA_ACTIONS + len(PUSH_DIRECTIONS) * MAX_OBJECTS
"""Size of the discrete vocabulary: 11 camera actions + 4 push directions x 6 object slots = 35."""

ACTION_NAMES = CAMERA_ACTIONS + tuple(
    f"push_{i}_{d}" for i in range(MAX_OBJECTS) for d in PUSH_DIRECTIONS
)
INVERSE = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7, 9: 10, 10: 9}
"""Camera action id -> the id that undoes it exactly."""


def action_id(name: str) -> int:
    """Id of an action name such as 'forward' or 'push_2_+x'."""
    try:
        return ACTION_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown action {name!r}; known: {', '.join(ACTION_NAMES[:12])}, ...") from None


def push_action(object_index: int, direction: int) -> int:
    """Id of the action pushing object `object_index` (0-based) along PUSH_DIRECTIONS[direction]."""
    if not 0 <= object_index < MAX_OBJECTS:
        raise ValueError(f"object index {object_index} out of range [0, {MAX_OBJECTS})")
    if not 0 <= direction < len(PUSH_DIRECTIONS):
        raise ValueError(f"push direction {direction} out of range [0, {len(PUSH_DIRECTIONS)})")
    return NUM_CAMERA_ACTIONS + 4 * object_index + direction


def decode_push(action: int) -> tuple[int, int] | None:
    """(object_index, direction) for a push action id, None for a camera action."""
    if action < NUM_CAMERA_ACTIONS:
        return None
    return divmod(action - NUM_CAMERA_ACTIONS, len(PUSH_DIRECTIONS))


# --- scripted sequences ------------------------------------------------------------------
# Each takes a numpy Generator and a length, returns int64 action ids. They are used to
# generate training/evaluation episodes; "loop" sequences return the camera to its start.

_MOVES = (1, 2, 3, 4, 7, 8)  # forward, back, strafe, yaw: keep the scene in view
_ALL_CAMERA = tuple(range(1, NUM_CAMERA_ACTIONS))


def random_walk(rng: np.random.Generator, length: int, persistence: float = 0.6) -> np.ndarray:
    """Camera random walk that repeats the previous move with probability `persistence`."""
    actions = np.empty(length, dtype=np.int64)
    current = int(rng.choice(_MOVES))
    for t in range(length):
        if rng.random() >= persistence:
            current = int(rng.choice(_MOVES + (0, 5, 6, 9, 10), p=_walk_probs()))
        actions[t] = current
    return actions


def _walk_probs() -> np.ndarray:
    weights = np.array([3, 3, 2, 2, 3, 3, 1, 0.5, 0.5, 0.5, 0.5])
    return weights / weights.sum()


def orbit(rng: np.random.Generator, length: int) -> np.ndarray:
    """Circle the scene: alternate a strafe with a yaw towards the centre (direction random)."""
    strafe, turn = (3, 8) if rng.random() < 0.5 else (4, 7)
    return np.array([strafe if t % 2 == 0 else turn for t in range(length)], dtype=np.int64)


def loop(rng: np.random.Generator, length: int) -> np.ndarray:
    """Out-and-back: a random walk, then its exact inverse in reverse order (noop pads odd lengths).

    Applied from any pose, the camera ends at exactly its start pose.
    """
    half = length // 2
    out = random_walk(rng, half)
    back = np.array([INVERSE[int(a)] for a in out[::-1]], dtype=np.int64)
    pad = np.zeros(length - 2 * half, dtype=np.int64)
    return np.concatenate([pad, out, back])


def push_sequence(rng: np.random.Generator, length: int, num_objects: int) -> np.ndarray:
    """Mostly a still or slowly moving camera with pushes of random objects in random directions."""
    actions = np.zeros(length, dtype=np.int64)
    for t in range(length):
        r = rng.random()
        if r < 0.3:
            actions[t] = push_action(int(rng.integers(num_objects)), int(rng.integers(4)))
        elif r < 0.6:
            actions[t] = int(rng.choice((1, 2, 3, 4, 7, 8)))
    return actions


def scripted_actions(policy: str, rng: np.random.Generator, length: int, num_objects: int) -> tuple[np.ndarray, str]:
    """Actions for one episode and the concrete policy used ('mixed' picks one per episode)."""
    if policy == "mixed":
        policy = str(rng.choice(("random_walk", "random_walk", "orbit", "loop", "push")))
    if policy == "random_walk":
        return random_walk(rng, length), policy
    if policy == "orbit":
        return orbit(rng, length), policy
    if policy == "loop":
        return loop(rng, length), policy
    if policy == "push":
        return push_sequence(rng, length, num_objects), policy
    raise ValueError(f"unknown policy {policy!r}")
