"""`posttrain play`: the page, the WebSocket session, exactness against envs3d and `model.rollout`, clean
shutdown, one-line errors, and the page itself in headless Chromium (skipped without Debian's `chromium`).

The server runs as the real command (`posttrain play --model <tiny> --port 0`) in a subprocess, with its
working folder, HOME and TMPDIR in empty temporary folders so the tests can see it writes nothing. Every
wait is on a message, a process exit or a page-side promise, with generous timeouts; nothing is timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_reference_model

from posttrain.envs3d import SceneConfig, action_id
from posttrain.play import process as play_process
from posttrain.play.browser import find_chromium
from posttrain.play.server import unpack

TIMEOUT = 180  # seconds for anything that waits: generous, this machine is shared and loaded
SEED = 3
CHROMIUM = find_chromium()


class PlayProcess(play_process.PlayProcess):
    """`posttrain play` in a subprocess, in empty folders (so a test can check it writes nothing)."""

    def __init__(self, root: Path, *args: str):
        self.cwd, self.home, self.tmp = root / "cwd", root / "home", root / "tmp"
        for folder in (self.cwd, self.home, self.tmp):
            folder.mkdir(parents=True)
        env = {**os.environ, "HOME": str(self.home), "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        super().__init__(*args, cwd=self.cwd, env=env, timeout=TIMEOUT)

    def written(self) -> list[str]:
        """Files left in the folders the process could write to."""
        return sorted(str(p) for folder in (self.cwd, self.home, self.tmp) for p in folder.rglob("*"))


def connect(url: str, **kwargs):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(url, max_size=None, open_timeout=TIMEOUT, **kwargs)


def receive_shot(ws) -> tuple[dict, list[np.ndarray]]:
    message = ws.recv(timeout=TIMEOUT)
    assert isinstance(message, bytes), f"expected a frame, got {message}"
    header, payload = unpack(message)
    size = header["size"]
    images = np.frombuffer(payload, np.uint8).reshape(3, size, size, 3)
    return header, list(images)


def request(ws, **message) -> tuple[dict, list[np.ndarray]]:
    ws.send(json.dumps(message))
    return receive_shot(ws)


def request_text(ws, **message) -> dict:
    ws.send(json.dumps(message))
    reply = ws.recv(timeout=TIMEOUT)
    assert isinstance(reply, str), "expected a JSON text reply"
    return json.loads(reply)


@contextlib.contextmanager
def torch_threads(count: int):
    """The server runs torch with one intra-op thread; compare under the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    play = PlayProcess(tmp_path_factory.mktemp("play"), "--model", str(tiny_model_dir), "--seed", str(SEED))
    yield play
    if play.process.poll() is None:
        play.interrupt()


def assert_panels_are_greedy_rollouts(model, context_frames: list, shots: list, sample_seeds: list) -> None:
    """Both model panels of `shots` (greedy, from the two true `context_frames`) are `model.rollout` with the
    actions the models were given and each panel's sample seed."""
    from posttrain.play import to_uint8

    with torch_threads(1):
        context = model.encode(torch.from_numpy(np.stack(context_frames))[None])
        actions = torch.tensor([[0, *[header["model_action"] for header, _ in shots]]])
        for panel in (1, 2):
            out = model.rollout(context, actions, len(shots), temperature=0.0, seeds=[sample_seeds[panel - 1]])
            expected = to_uint8(out.frames)[0]
            for t, (_, got) in enumerate(shots):
                assert np.array_equal(got[panel], expected[t]), f"panel {panel} differs at step {t + 1}"


# --- the page ---------------------------------------------------------------------------------------
def test_server_serves_the_page_and_nothing_else(server):
    with urllib.request.urlopen(server.url, timeout=TIMEOUT) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "posttrain play" in page and 'src="play.js"' in page and 'href="play.css"' in page
    served = {}
    for name in ("play.js", "play.css"):
        with urllib.request.urlopen(server.url + name, timeout=TIMEOUT) as response:
            served[name] = response.read().decode()
        # No build step and no CDN: nothing the page loads comes from elsewhere.
        assert not re.search(r"https?://", served[name]), name
    assert "image-rendering: pixelated" in served["play.css"]  # 64x64 frames upscaled nearest-neighbour
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server.url + "secrets.txt", timeout=TIMEOUT)
    assert missing.value.code == 404


def test_websocket_from_another_site_is_refused(server):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        connect(server.ws_url, origin="http://elsewhere.example")
    assert refused.value.response.status_code == 403


def test_websocket_for_a_rebound_hostname_is_refused(server):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends an Origin that
    matches its Host; the Host must also be a name this server is known by."""
    from websockets.exceptions import InvalidStatus

    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://evil.example:{port}/ws", origin=f"http://evil.example:{port}",
                sock=socket.create_connection(("127.0.0.1", port)))
    assert refused.value.response.status_code == 403
    with connect(f"ws://localhost:{port}/ws", origin=f"http://localhost:{port}",
                 sock=socket.create_connection(("127.0.0.1", port))) as ws:
        assert receive_shot(ws)[0]["kind"] == "scene"


@contextlib.contextmanager
def play_server_in_this_process(model_dir: Path, workdir: Path):
    """A PlayServer on a free port, its event loop in a thread: for tests that patch the server's code."""
    import asyncio
    import threading

    from posttrain.models import load_model
    from posttrain.play.server import PlayServer, scene_for

    model = load_model(model_dir).eval()
    server = PlayServer([model, model], ["base", "again"], scene_for(model, []), seed=SEED, workdir=workdir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(TIMEOUT)
        yield url.replace("http://", "ws://") + "ws"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def test_a_failing_recording_writer_answers_with_an_error(tiny_model_dir, tmp_path, monkeypatch, restore_threads):
    import errno

    import av

    def disk_full(*args, **kwargs):
        raise av.error.OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(av, "open", disk_full)
    torch.set_num_threads(1)
    with play_server_in_this_process(tiny_model_dir, tmp_path) as url, connect(url) as ws:
        receive_shot(ws)
        request(ws, type="action", action=action_id("forward"), seq=1)
        reply = request_text(ws, type="record", format="mp4", seq=2)
        assert reply["type"] == "error" and reply["seq"] == 2
        assert reply["message"] == ("recording posttrain-play-seed3-step1.mp4 failed: "
                                    "OSError: [Errno 28] No space left on device")
        assert request(ws, type="action", action=action_id("back"), seq=3)[0]["step"] == 2  # still usable
    assert list(tmp_path.iterdir()) == []  # no recording left behind


def test_a_full_server_refuses_another_session_with_an_error(tiny_model_dir, tmp_path, monkeypatch,
                                                             restore_threads):
    from websockets.exceptions import ConnectionClosed

    from posttrain.play import server as play_server

    monkeypatch.setattr(play_server, "MAX_SESSIONS", 1, raising=False)
    torch.set_num_threads(1)
    with play_server_in_this_process(tiny_model_dir, tmp_path) as url, connect(url) as ws:
        receive_shot(ws)
        with connect(url) as second:
            reply = json.loads(second.recv(timeout=TIMEOUT))
            assert reply["type"] == "error" and "the most sessions it runs at once (1)" in reply["message"]
            with pytest.raises(ConnectionClosed):
                second.recv(timeout=TIMEOUT)
            assert second.close_code == 1013
        assert request(ws, type="action", action=action_id("forward"), seq=1)[0]["step"] == 1  # unaffected


# --- exactness ------------------------------------------------------------------------------------
SCRIPT = ["forward", "yaw_left", "left", "up", "pitch_down", "push_0_+x", "noop", "noop", "right", "yaw_right",
          *["back"] * 14, "down", "pitch_up"]


def test_scripted_session_equals_envs3d_and_model_rollout(server, tiny_model_dir):
    """Truth frames are envs3d's for the same seed and actions, byte for byte; both model panels are
    `model.rollout` from the same true context, actions and seeds (greedy, then at temperature 1 after a
    re-sync); a camera move the room blocks reaches the models as a noop."""
    from posttrain.envs3d import TabletopEnv
    from posttrain.models import load_model
    from posttrain.play import to_uint8

    with connect(server.ws_url) as ws:
        first, images = receive_shot(ws)
        assert first["kind"] == "scene" and first["scene_seed"] == SEED and first["step"] == 0
        shots = [request(ws, type="action", action=action_id(name), seq=i) for i, name in enumerate(SCRIPT)]
        assert request_text(ws, type="temperature", value=1.0, seq=100)["value"] == 1.0
        synced, _ = request(ws, type="resync", seq=101)
        sampled = [request(ws, type="action", action=action_id(name), seq=200 + i)
                   for i, name in enumerate(["forward", "yaw_left", "noop", "back"])]

    assert [header["seq"] for header, _ in shots] == list(range(len(SCRIPT)))
    assert any(header["blocked"] for header, _ in shots), "the script should walk into the wall"
    for header, _ in shots:
        assert header["model_action"] == (0 if header["blocked"] else header["action"])

    # The truth: reset(seed), one noop for the second context frame, then the script.
    env = TabletopEnv(SceneConfig(image_size=32))
    try:
        obs, _ = env.reset(seed=SEED)
        context_frames = [obs["rgb"], env.step(0)[0]["rgb"]]
        truth = [env.step(action_id(name))[0]["rgb"] for name in SCRIPT]
        truth += [env.step(action_id(name))[0]["rgb"] for name in ["forward", "yaw_left", "noop", "back"]]
    finally:
        env.close()
    assert np.array_equal(images[0], context_frames[1])
    for (header, got), expected in zip(shots + sampled, truth):
        assert np.array_equal(got[0], expected), f"truth differs at step {header['step']}"

    # The models: rollout from the two true context frames with the actions the models were given.
    model = load_model(tiny_model_dir)
    assert_panels_are_greedy_rollouts(model, context_frames, shots, first["sample_seeds"])
    with torch_threads(1):
        # After the re-sync: context = the last two true frames, temperature 1, each panel its own seed.
        last = np.stack(truth[len(SCRIPT) - 2:len(SCRIPT)])
        context = model.encode(torch.from_numpy(last)[None])
        actions = torch.tensor([[shots[-1][0]["model_action"], *[h["model_action"] for h, _ in sampled]]])
        panels = []
        for panel in (1, 2):
            out = model.rollout(context, actions, len(sampled), temperature=1.0,
                                seeds=[synced["sample_seeds"][panel - 1]])
            panels.append(to_uint8(out.frames)[0])
            for t, (_, got) in enumerate(sampled):
                assert np.array_equal(got[panel], panels[-1][t]), f"panel {panel} differs at sampled step {t + 1}"
    assert not np.array_equal(panels[0], panels[1]), "the two panels sample with different seeds"
    assert synced["steps_since_sync"] == 0 and sampled[-1][0]["steps_since_sync"] == len(sampled)
    assert [round(v, 6) for v in sampled[0][0]["mean_psnr"]] == [round(v, 6) for v in sampled[0][0]["psnr"]]


def test_adapter_panel_equals_the_merged_model_rollout(tiny_model_dir, tmp_path):
    """With --adapter, the post-trained panel is the adapter merged into the base (its rollout), the
    base panel stays the plain base."""
    from posttrain.play import PlaySession
    from posttrain.play.server import load_play_models, scene_for
    from posttrain.play.session import to_uint8

    adapter = _adapter_for(tiny_model_dir, tmp_path / "adapter")
    (base, post), names = load_play_models(str(tiny_model_dir), str(adapter))
    assert names[1] == "post-trained (adapter)"
    session = PlaySession([base, post], names, scene_for(base, []), seed=SEED)
    try:
        context_frames = np.stack(session.frames)
        shots = [session.step(action_id(name)) for name in ("forward", "yaw_left", "forward")]
        actions = torch.tensor([[0, *[shot.model_action for shot in shots]]])
        for panel, model in enumerate((base, post)):
            context = model.encode(torch.from_numpy(context_frames)[None])
            out = model.rollout(context, actions, 3, temperature=0.0)
            for t, shot in enumerate(shots):
                assert np.array_equal(shot.predictions[panel], to_uint8(out.frames)[0, t])
        assert not all(np.array_equal(s.predictions[0], s.predictions[1]) for s in shots)
    finally:
        session.close()


def test_a_reference_decoder_panel_draws_as_eval_decodes_its_rollout():
    """A model whose decoder also sees the last true frame: each played frame is drawn beside the last synced
    true frame, k frames old at the k-th step, as `posttrain eval` decodes the same rollout (decode_frames with
    one reference per sequence), not with the plain path."""
    from posttrain.play.session import ModelPanel, to_uint8
    from posttrain.rollouts import decode_frames

    generator = torch.Generator().manual_seed(1)
    model = make_tiny_reference_model(5, generator)
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
    panel = ModelPanel(model, "reference")
    panel.sync(frames, np.array([0]), seed=SEED)
    moves = [action_id(name) for name in ("forward", "yaw_left", "forward")]
    played = np.stack([panel.step(move, temperature=0.0)[0] for move in moves])
    context = model.encode(torch.from_numpy(frames)[None])
    tokens = model.rollout(context, torch.tensor([[0, *moves]]), 3, temperature=0.0, decode=False).tokens
    with torch.no_grad():
        evaluated = to_uint8(decode_frames(model, tokens, torch.from_numpy(frames[-1])[None]))[0]
        plain = to_uint8(model.decode(tokens))[0]
    # Played frames are decoded one at a time, eval's three at once: float sums may round differently, which
    # moves a uint8 value by at most one level.
    assert np.abs(played.astype(int) - evaluated.astype(int)).max() <= 1
    assert np.abs(played.astype(int) - plain.astype(int)).max() > 1  # the test tells the two paths apart


def _adapter_for(model_dir: Path, out: Path) -> Path:
    from posttrain.adapters import LoraSettings, apply_lora, save_adapter
    from posttrain.models import load_model, weights_hash

    torch.manual_seed(1)
    peft_model = apply_lora(load_model(model_dir), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # LoRA starts as the identity; make this one change something
    return save_adapter(peft_model, out, str(model_dir), weights_hash(model_dir))


# --- controls and bad messages --------------------------------------------------------------------
def test_record_new_scene_and_bad_messages(server):
    import imageio.v3 as iio

    with connect(server.ws_url) as ws:
        receive_shot(ws)
        for i, name in enumerate(["forward", "yaw_left"]):
            request(ws, type="action", action=action_id(name), seq=i)
        ws.send(json.dumps({"type": "record", "format": "gif", "seq": 5}))
        header, gif = unpack(ws.recv(timeout=TIMEOUT))
        assert header["kind"] == "recording" and header["filename"].endswith(".gif") and header["frames"] == 3
        frames = iio.imread(gif, index=None, extension=".gif")
        assert frames.shape[0] == 3 and frames.shape[2] == 3 * 32 * 3 + 2 * 4  # three 3x panels, two gaps
        ws.send(json.dumps({"type": "record", "format": "mp4", "seq": 6}))
        header, mp4 = unpack(ws.recv(timeout=TIMEOUT))
        assert header["mime"] == "video/mp4" and mp4[4:8] == b"ftyp"

        for bad, says in [({"type": "action", "action": 99}, "unknown action"),
                          ({"type": "action", "action": 1.5}, "unknown action"),
                          ({"type": "push", "object": 5}, "no object 6"),
                          ({"type": "temperature", "value": -1}, "temperature"),
                          ({"type": "record", "format": "avi"}, "gif or mp4"),
                          ({"type": "new_scene", "seed": -5}, "outside"),
                          ({"type": "fly"}, "unknown message type")]:
            reply = request_text(ws, **bad, seq=7)
            assert reply["type"] == "error" and says in reply["message"] and reply["seq"] == 7
        # JSON reads 1e999 as inf and keeps a 400-digit integer exact: neither may end the session.
        for bad, says in [('"type": "action", "action": 1e999', "unknown action"),
                          ('"type": "push", "object": 1e999', "object inf is not an integer"),
                          ('"type": "push", "object": 1.5', "object 1.5 is not an integer"),
                          ('"type": "new_scene", "seed": 1e999', "seed inf is not an integer"),
                          ('"type": "new_scene", "seed": -1e999', "seed -inf is not an integer"),
                          (f'"type": "temperature", "value": 1{"0" * 400}', "temperature 1000"),
                          ('"type": "temperature", "value": NaN', "temperature nan is not a finite number"),
                          ('"type": "temperature", "value": "0.5"', "is not a number")]:
            ws.send(f'{{{bad}, "seq": 7}}')
            reply = json.loads(ws.recv(timeout=TIMEOUT))
            assert reply["type"] == "error" and says in reply["message"] and reply["seq"] == 7, (bad, reply)
        ws.send(b"\x00")
        assert "JSON" in json.loads(ws.recv(timeout=TIMEOUT))["message"]

        header, _ = request(ws, type="new_scene", seq=8)  # still usable after the errors
        assert header["kind"] == "scene" and header["scene_seed"] == SEED + 1 and header["step"] == 0
        header, _ = request(ws, type="push", object=0, toward=True, seq=9)
        assert header["action_name"].startswith("push_0_") and header["step"] == 1


def test_recordings_are_written_one_frame_at_a_time(tiny_model_dir, tmp_path, restore_threads):
    """Saving never holds all the upscaled frames (3000 of them at 64 px took ~1 GB, then ~2 GB for MP4)."""
    import tracemalloc

    import imageio.v3 as iio

    from posttrain.models import load_model
    from posttrain.play import PlaySession
    from posttrain.play.server import scene_for

    torch.set_num_threads(1)
    model = load_model(tiny_model_dir).eval()
    session = PlaySession([model, model], ["base", "again"], scene_for(model, []), seed=SEED)
    try:
        for fmt in ("gif", "mp4"):
            session.save_recording(tmp_path / f"warm-up.{fmt}")  # imports and first-use caches, not measured
        rng = np.random.default_rng(0)
        kept = [tuple(rng.integers(0, 5, (32, 32, 3), dtype=np.uint8) * 63 for _ in range(3)) for _ in range(400)]
        session.record.extend(kept)
        frame_bytes = (16 + 3 * 32) * (3 * 3 * 32 + 2 * 4) * 3  # label strip + three 3x panels and two gaps
        for fmt in ("gif", "mp4"):
            tracemalloc.start()
            try:
                path = session.save_recording(tmp_path / f"r.{fmt}")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 50 * frame_bytes, (fmt, peak / frame_bytes)  # stacking them all took 800 frames' worth
            frames = iio.imread(path, index=None, **({"plugin": "pyav"} if fmt == "mp4" else {}))
            assert frames.shape[:3] == (1 + 400, 16 + 3 * 32, 3 * 3 * 32 + 2 * 4)  # the scene's sync shot + 400
            if fmt == "gif":  # lossless here (under 256 colours a frame); H.264 blurs these noise blocks
                np.testing.assert_array_equal(frames[-1, 16:, :96, :3], np.repeat(np.repeat(kept[-1][0], 3, 0), 3, 1))
    finally:
        session.close()


# --- shutdown and bad command lines ----------------------------------------------------------------
def test_ctrl_c_stops_cleanly_and_nothing_is_written(tiny_model_dir, tmp_path):
    from websockets.exceptions import ConnectionClosed

    play = PlayProcess(tmp_path, "--model", str(tiny_model_dir))
    with connect(play.ws_url) as ws:
        receive_shot(ws)
        request(ws, type="action", action=action_id("forward"), seq=1)
        ws.send(json.dumps({"type": "record", "format": "mp4", "seq": 2}))
        assert unpack(ws.recv(timeout=TIMEOUT))[0]["kind"] == "recording"
        assert play.interrupt() == 0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=TIMEOUT)
    stderr = play.process.stderr.read()
    assert "Traceback" not in stderr, stderr
    assert play.stdout[-1].strip() == "posttrain play: stopped"
    assert play.written() == []  # no files in its working folder, HOME or TMPDIR (the temp folder is gone)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()  # `posttrain play` sets one intra-op thread for itself
    yield
    torch.set_num_threads(before)


def _one_line_error(capsys, argv) -> str:
    from posttrain.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("posttrain: error: "), err
    return err


def test_port_in_use_or_out_of_range_is_a_one_line_error(tiny_model_dir, capsys, restore_threads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _one_line_error(capsys, ["play", "--model", str(tiny_model_dir), "--port", str(port)])
    assert f"127.0.0.1:{port} is already in use" in err
    for bad in ("99999", "-1"):
        err = _one_line_error(capsys, ["play", "--model", str(tiny_model_dir), "--port", bad])
        assert f"--port {bad} is outside 1-65535" in err


def test_bad_adapters_and_scenes_are_one_line_errors(tiny_model_dir, tmp_path, capsys, restore_threads):
    model = str(tiny_model_dir)
    err = _one_line_error(capsys, ["play", "--model", model, "--adapter", str(tmp_path / "nope"), "--port", "0"])
    assert "adapter folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["play", "--model", model, "--adapter", str(tmp_path / "empty"), "--port", "0"])
    assert "adapter_config.json" in err
    other = tmp_path / "other-base"
    make_tiny_model(seed=1).save_pretrained(other)
    adapter = _adapter_for(other, tmp_path / "adapter")
    err = _one_line_error(capsys, ["play", "--model", model, "--adapter", str(adapter), "--port", "0"])
    assert "was made for base model" in err
    (adapter / "adapter_model.safetensors").unlink()  # PEFT would look for the folder on the Hub
    err = _one_line_error(capsys, ["play", "--model", model, "--adapter", str(adapter), "--port", "0"])
    assert f"{adapter} has no adapter_model.safetensors" in err
    err = _one_line_error(capsys, ["play", "--model", model, "--scene", "colour=red", "--port", "0"])
    assert "unknown scene key 'colour'" in err
    err = _one_line_error(capsys, ["play", "--model", model, "--scene", "image_size=64", "--port", "0"])
    assert "32x32" in err
    err = _one_line_error(capsys, ["play", "--model", model, "--seed", "-1", "--port", "0"])
    assert "--seed -1" in err
    err = _one_line_error(capsys, ["play", "--model", str(tmp_path / "missing"), "--port", "0"])
    assert "neither a built-in name (default, flow) nor an existing folder" in err


def test_a_flow_model_plays_and_its_panels_are_its_rollout(tmp_path, restore_threads):
    """`posttrain play --model FLOW`: the panels step the flow model one frame per key (start_rollout /
    rollout_step), and what they show is `model.rollout` from the same true context, actions and seeds."""
    from posttrain.envs3d import TabletopEnv
    from posttrain.models import load_model
    from posttrain.models.flow import FlowConfig, FlowWorldModel

    torch.manual_seed(0)
    folder = FlowWorldModel(FlowConfig(image_size=32, block_out_channels=(8, 16), norm_num_groups=4,
                                       context_frames=2)).save_pretrained(tmp_path / "flow")
    play = PlayProcess(tmp_path / "play", "--model", str(folder), "--seed", str(SEED))
    script = ["forward", "yaw_left", "noop", "back"]
    try:
        with connect(play.ws_url) as ws:
            first, _ = receive_shot(ws)
            shots = [request(ws, type="action", action=action_id(name), seq=i) for i, name in enumerate(script)]
    finally:
        play.interrupt()
    env = TabletopEnv(SceneConfig(image_size=32))
    try:
        obs, _ = env.reset(seed=SEED)
        context_frames = [obs["rgb"], env.step(0)[0]["rgb"]]
    finally:
        env.close()
    assert_panels_are_greedy_rollouts(load_model(folder), context_frames, shots, first["sample_seeds"])


def test_a_model_without_incremental_rollout_is_a_one_line_error(tmp_path, capsys, restore_threads):
    from posttrain.cli import main

    assert main(["models", "init", "--layers", "1", "--width", "64", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["play", "--model", str(tmp_path / "hf"), "--port", "0"])
    assert "HFWorldModel has no incremental rollout" in err


# --- the page in a browser --------------------------------------------------------------------------
PANEL_HASHES = """Array.from({length: 3}, (_, i) => {
  const canvas = document.getElementById('canvas-' + i);
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let hash = 0; for (let k = 0; k < data.length; k++) hash = (hash * 31 + data[k]) >>> 0; return hash; })"""
NUMBERS = """Object.fromEntries(['step', 'since-sync', 'fps', 'latency', 'latency-mean', 'server-ms', 'psnr-1',
  'ssim-1', 'mean-psnr-1', 'psnr-2', 'mean-ssim-2', 'last-action'].map(id => [id, document.getElementById(id).textContent]))"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium_steers_all_three_panels(server):
    from posttrain.play.browser import HeadlessChromium

    with HeadlessChromium(CHROMIUM, timeout=TIMEOUT) as browser:
        browser.open(server.url)
        assert browser.evaluate("play.waitFrames(1)") >= 1  # the scene, drawn
        before, numbers_before = browser.evaluate(PANEL_HASHES), browser.evaluate(NUMBERS)
        assert numbers_before["step"] == "0" and numbers_before["mean-psnr-1"] == "–"
        for count, key in enumerate(["w", "ArrowLeft", "d"], start=2):
            browser.press(key)
            browser.evaluate(f"play.waitFrames({count})")
        after, numbers = browser.evaluate(PANEL_HASHES), browser.evaluate(NUMBERS)
        assert all(a != b for a, b in zip(before, after)), (before, after)  # truth, base and post-trained
        assert numbers["step"] == "3" and numbers["since-sync"] == "3" and numbers["last-action"] == "right"
        for key in ("psnr-1", "ssim-1", "mean-psnr-1", "psnr-2", "mean-ssim-2", "latency", "latency-mean",
                    "server-ms", "fps"):
            float(numbers[key])  # a number, not the placeholder
        assert float(numbers["latency"]) > 0
        browser.press("Enter")  # re-sync
        browser.evaluate("play.waitFrames(5)")
        assert browser.evaluate(NUMBERS)["since-sync"] == "0"
