"""The README's 'Adding a reward' example runs as written."""

import re
from pathlib import Path

import torch

from posttrain.rewards.synthetic import make_episodes, noise_frames, truth_rollouts

README = Path(__file__).resolve().parents[1] / "rewards" / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    section = text.split("## Adding a reward", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    episodes = make_episodes(range(3), num_steps=4, height=24, width=24)
    gt = truth_rollouts(episodes, num_context=1)
    out = namespace["reward"](gt, episodes)
    assert out.valid.all() and torch.equal(out.total, torch.zeros(3))
    darker = namespace["reward"](type(gt)(frames=gt.frames * 0.5, num_context=1), episodes)
    assert (darker.total < -1.0).all()
    noisy = noise_frames(gt.frames, 0.01)
    assert namespace["brightness_match"](type(gt)(frames=noisy, num_context=1), episodes, scale=1.0).shape == (3,)
