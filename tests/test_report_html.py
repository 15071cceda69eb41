"""The run report's index.html in headless Chromium: every <img> (plots, rollout GIF) loads from relative paths.

Needs Debian's `chromium` (`apt-get install -y chromium`; .ci/run installs it); skipped without it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from posttrain.report import write_index_html

CHROMIUM = shutil.which("chromium")
# Written into a copy of the page: after `load`, the size each image decoded to (0 x 0 when it failed).
PROBE = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre"); out.id = "probe";
  out.textContent = JSON.stringify(Array.from(document.images, i => [i.getAttribute("src"), i.naturalWidth, i.naturalHeight]));
  document.body.appendChild(out);
});</script>"""
CONTROL = '<img src="missing.png" alt="control: this file does not exist">'


def _results() -> dict:
    run = {"mse_mean": 0.01, "psnr_mean": 20.0, "ssim_mean": 0.5, "consistency_3d_mean": 0.1,
           "loop_closure_error_mean": None}
    return {"eval_seeds": "500:504", "horizon": 4,
            "temperatures": {"0.0": {"base": run, "post": {**run, "mse_mean": 0.008}}}}


def _report(folder):
    import imageio.v2 as imageio

    folder.mkdir()
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(folder / "reward_curve.png")
    Image.fromarray(np.full((20, 40, 3), 100, np.uint8)).save(folder / "per_step_mse.png")
    frames = [np.full((16, 24, 3), level, np.uint8) for level in (0, 128, 255)]
    imageio.mimsave(folder / "rollout.gif", frames, duration=250, loop=0)
    return write_index_html(folder, _results())


def _loaded_images(page, tmp_path) -> dict[str, tuple[int, int]]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
               page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; chromium printed: {dom[:500]}"
    return {src: (width, height) for src, width, height in json.loads(html.unescape(found.group(1)))}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install -y chromium)")
def test_every_report_image_loads_in_chromium(tmp_path):
    folder = tmp_path / "report"
    page = _report(folder)
    text = page.read_text()
    assert "http" not in text.lower().replace("http-equiv", "")  # self-contained: no network links
    # Probe a copy beside the page (same relative paths), with one broken image as a control.
    probe = folder / "_probe.html"
    probe.write_text(text.replace("</body>", CONTROL + PROBE + "</body>"))
    sizes = _loaded_images(probe, tmp_path)
    assert sizes.pop("missing.png") == (0, 0)  # the probe does report a failed image
    assert sizes == {"reward_curve.png": (50, 30), "per_step_mse.png": (40, 20), "rollout.gif": (24, 16)}


def test_unmeasured_values_are_not_called_better_and_json_stays_strict():
    import json
    import math

    from posttrain.logging_utils import json_safe
    from posttrain.report import change_phrase

    assert change_phrase("MSE", 0.0123, 0.0111, lower_is_better=True) == "MSE 0.0123 -> 0.0111 (-9.8%, better)"
    phrase = change_phrase("objects", math.nan, 0.5, lower_is_better=False)
    assert "n/a" in phrase and "better" not in phrase and "worse" not in phrase
    text = json.dumps(json_safe({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "x"}))
    assert json.loads(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x"}
    assert "NaN" not in text and "Infinity" not in text
