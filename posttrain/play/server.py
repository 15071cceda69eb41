"""`posttrain play`: a local web page to steer the simulator and two world models live, side by side.

    posttrain play                                        # the embedded base model, greedy, http://127.0.0.1:8000/
    posttrain play --adapter runs/grpo/adapter --seed 7   # base vs post-trained
    posttrain play --model models/my-wm --scene min_objects=4 --port 8080

One process serves the page (posttrain/play/static: HTML + JS, no build step, nothing fetched from
elsewhere) and a WebSocket at /ws, both with `websockets` (pure Python, no dependencies; see docs/play.md).
Each WebSocket connection is one `PlaySession` (at most MAX_SESSIONS at once). The WebSocket only takes
pages of this server opened by a name it is known by (an IP address, localhost or --host), which keeps other
sites out, DNS rebinding included. The page sends JSON (an action, a push, re-sync, new
scene, the temperature, record); the server answers each action with one binary message:

    uint32 little-endian header length | header JSON | truth RGB | base RGB | post-trained RGB  (H*W*3 bytes each)

and "record" with the same framing around a GIF or MP4 file. Errors go back as JSON text
{"type": "error", "message": ...}. Bad command-line input (a port in use, an unknown adapter, an
adapter made for another base, a scene key the simulator does not know) is a one-line error, exit 2.
Nothing is written outside a temporary folder (removed on exit) unless the user records, and then only
by the browser's download.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import errno
import ipaddress
import json
import logging
import math
import shutil
import signal
import struct
import sys
import tempfile
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/index.html": ("index.html", "text/html; charset=utf-8"),
                "/play.js": ("play.js", "text/javascript; charset=utf-8"),
                "/play.css": ("play.css", "text/css; charset=utf-8")}
WEBSOCKET_PATH = "/ws"
MAX_MESSAGE_BYTES = 64 * 1024
"""Largest message the server accepts: the page only ever sends small JSON."""
MAX_SESSIONS = 8
"""Connections served at once: each one is a simulator, two model rollouts and up to RECORD_LIMIT frames."""
LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}


def static_file(name: str) -> bytes:
    from importlib.resources import files

    return (files("posttrain.play") / "static" / name).read_bytes()


def pack(header: dict, *payloads: bytes) -> bytes:
    """One binary message: header length (uint32 LE), header JSON, then the payloads back to back."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(encoded)), encoded, *payloads])


def unpack(message: bytes) -> tuple[dict, bytes]:
    """Inverse of `pack`: (header, the payload bytes)."""
    (length,) = struct.unpack_from("<I", message)
    return json.loads(message[4:4 + length]), message[4 + length:]


class PlayServer:
    """Serves the page and one `PlaySession` per WebSocket connection; the models are shared."""

    def __init__(self, models: list, names: list[str], scene, seed: int = 0, num_context: int = 2,
                 workdir: str | Path | None = None):
        self.models, self.names, self.scene = models, names, scene
        self.seed, self.num_context = seed, num_context
        self.workdir = Path(workdir) if workdir else None
        self.sessions: set = set()
        self.connections = 0
        self.host = "127.0.0.1"
        self.server = None
        self.url = ""
        self.logger = logging.getLogger("posttrain.play")

    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> str:
        """Listen on host:port (0: any free port); returns the page's URL. A port in use is a ValueError."""
        from websockets.asyncio.server import serve

        self.host = host
        try:
            self.server = await serve(self._handle_connection, host, port, process_request=self._process_request,
                                      compression=None, max_size=MAX_MESSAGE_BYTES, logger=self.logger)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: {host}:{port} is already in use; stop what is listening "
                                 "there or pick another port (--port 0 picks a free one)") from None
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = self.server.sockets[0].getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{bound}/"
        return self.url

    async def close(self) -> None:
        """Close every connection (the page shows it), then the sessions and their simulators."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for session in list(self.sessions):
            await asyncio.to_thread(session.close)
        self.sessions.clear()

    # --- HTTP: the page ---------------------------------------------------------------------------
    def _process_request(self, connection, request):
        path = urlsplit(request.path).path
        if path == WEBSOCKET_PATH:
            # A page from another site open in the same browser must not drive (or record) the session.
            origin, host = request.headers.get("Origin"), request.headers.get("Host")
            if origin and urlsplit(origin).netloc != host:
                return connection.respond(HTTPStatus.FORBIDDEN, "cross-origin WebSocket refused\n")
            # Origin equals Host on a page whose name was rebound to this address (DNS rebinding), so the
            # name must also be one this server is known by.
            if not self._known_host(host):
                return connection.respond(HTTPStatus.FORBIDDEN, f"WebSocket for host {host!r} refused: open the "
                                          "page by this machine's address, localhost or the --host name\n")
            return None
        if path not in STATIC_FILES:
            return connection.respond(HTTPStatus.NOT_FOUND, f"{path} not found\n")
        name, mime = STATIC_FILES[path]
        response = connection.respond(HTTPStatus.OK, static_file(name).decode())
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = mime
        response.headers["Cache-Control"] = "no-store"
        return response

    def _known_host(self, host: str | None) -> bool:
        """Whether a Host header names this server: an IP address (a rebinding attack needs a DNS name),
        localhost, or the --host name."""
        try:
            hostname = urlsplit(f"//{host}").hostname if host else None
        except ValueError:  # e.g. a malformed IPv6 literal
            hostname = None
        if hostname is None:
            return False
        try:
            ipaddress.ip_address(hostname)
            return True
        except ValueError:
            return hostname in LOCAL_HOSTNAMES or hostname == self.host.lower()

    # --- WebSocket: one session per connection ----------------------------------------------------
    async def _handle_connection(self, connection) -> None:
        if self.connections >= MAX_SESSIONS:
            message = (f"this server is already running the most sessions it runs at once ({MAX_SESSIONS}): "
                       "close another play tab, then reload this one")
            await connection.send(json.dumps({"type": "error", "message": message, "seq": None}))
            await connection.close(1013, "too many sessions")
            return
        self.connections += 1
        try:
            await self._serve_session(connection)
        finally:
            self.connections -= 1

    async def _serve_session(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        from .session import PlaySession, RecordingError

        session = await asyncio.to_thread(PlaySession, self.models, self.names, self.scene, self.seed,
                                          self.num_context)
        self.sessions.add(session)
        try:
            await connection.send(self._shot_message(session, session.shot, None))
            async for message in connection:
                seq = None
                try:
                    if not isinstance(message, str):
                        raise ValueError("send JSON text messages")
                    request = json.loads(message)
                    if not isinstance(request, dict):
                        raise ValueError("a message is a JSON object with a 'type'")
                    seq = request.get("seq")
                    reply = await asyncio.to_thread(self._answer, session, request)
                except (ValueError, KeyError, TypeError, OverflowError, RecordingError) as exc:
                    reply = json.dumps({"type": "error", "message": str(exc).strip("'\""), "seq": seq})
                if reply is not None:
                    await connection.send(reply)
        except ConnectionClosed:
            pass
        finally:
            self.sessions.discard(session)
            await asyncio.to_thread(session.close)

    def _answer(self, session, request: dict):
        """Runs in a worker thread: one request in, one message (or None) out."""
        import time

        received = time.perf_counter()
        kind, seq = request.get("type"), request.get("seq")
        if kind == "action":
            shot = session.step(request["action"])
        elif kind == "push":
            shot = session.step(session.push(_integer(request, "object"), bool(request.get("toward", False))))
        elif kind == "resync":
            shot = session.resync()
        elif kind == "new_scene":
            seed = request.get("seed")
            shot = session.new_scene(None if seed is None else _integer(request, "seed"))
        elif kind == "temperature":
            session.set_temperature(_number(request, "value", "temperature"))
            return json.dumps({"type": "temperature", "value": session.temperature, "seq": seq})
        elif kind == "record":
            return self._recording(session, str(request.get("format", "gif")), seq)
        else:
            raise ValueError(f"unknown message type {kind!r}")
        return self._shot_message(session, shot, seq, received)

    def _shot_message(self, session, shot, seq, received: float | None = None) -> bytes:
        import time

        from posttrain.envs3d import ACTION_NAMES

        header = {
            "kind": shot.kind, "seq": seq, "step": shot.step, "size": int(shot.truth.shape[0]),
            "names": ["simulator", *self.names], "scene_seed": session.seed, "num_objects": session.num_objects,
            "temperature": session.temperature, "steps_since_sync": shot.steps_since_sync,
            "action": shot.action, "action_name": None if shot.action is None else ACTION_NAMES[shot.action],
            "model_action": shot.model_action, "blocked": shot.blocked, "sample_seeds": shot.seeds,
            "psnr": shot.psnr, "ssim": shot.ssim, "mean_psnr": shot.mean_psnr, "mean_ssim": shot.mean_ssim,
            "timings_ms": {key: round(value, 2) for key, value in shot.timings_ms.items()},
        }
        if received is not None:
            header["server_ms"] = round(1000 * (time.perf_counter() - received), 2)
        return pack(header, shot.truth.tobytes(), *(frame.tobytes() for frame in shot.predictions))

    def _recording(self, session, fmt: str, seq) -> bytes:
        if fmt not in ("gif", "mp4"):
            raise ValueError(f"record format {fmt!r}: choose gif or mp4")
        folder = Path(tempfile.mkdtemp(prefix="recording-", dir=self.workdir))
        try:
            name = f"posttrain-play-seed{session.seed}-step{session.step_count}.{fmt}"
            path = session.save_recording(folder / name, ["simulator", *self.names])
            data = path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        header = {"kind": "recording", "seq": seq, "filename": name, "frames": len(session.record),
                  "mime": "image/gif" if fmt == "gif" else "video/mp4"}
        return pack(header, data)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def _integer(request: dict, key: str) -> int:
    """request[key] as an int: a JSON integer (or a float with an integral value), never a bool or inf."""
    value = request[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} {_shown(value)} is not an integer")
    return int(value)


def _number(request: dict, key: str, name: str) -> float:
    """request[key] as a finite float: JSON reads 1e999 as inf, and a huge integer overflows a float."""
    value = request[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} {_shown(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} {_shown(value)} is not a finite number")
    return number


# --- command line ---------------------------------------------------------------------------------
def add_play_parser(sub) -> None:
    parser = sub.add_parser("play", help="steer the simulator, the base and the post-trained model live in a browser")
    parser.add_argument("--model", default="default", help="'default' (the embedded token model), 'flow' (the embedded flow model) "
                                                          "or a model folder")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter folder for the post-trained panel (default: the base again)")
    parser.add_argument("--force-adapter", action="store_true",
                        help="apply an adapter that lacks posttrain_adapter.json (its base model cannot be checked)")
    parser.add_argument("--scene", action="append", metavar="KEY=VALUE", help="SceneConfig override (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="the first scene's seed ('new scene' takes the next)")
    parser.add_argument("--context", type=int, default=2, help="true context frames the models start from (default 2)")
    parser.add_argument("--sample-steps", type=int, default=None, metavar="K",
                        help="a flow model: Euler steps per frame (default: the model's own; 2 is faster, "
                             "see docs/play.md#speed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.set_defaults(func=run_play_cli)


def load_play_models(model_name: str, adapter: str | None, force: bool = False) -> tuple[list, list[str]]:
    """[base, post-trained] and their panel names; the post-trained panel is the base again without an
    adapter. Errors name the folder and what is wrong."""
    from posttrain.models import load_model

    base = load_model(model_name).eval()
    if not adapter:
        return [base, base], [f"base ({model_name})", "base again (no --adapter)"]
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist")
    from posttrain.adapters import load_adapter

    # Merged into a copy: the base panel keeps the plain weights, the other runs at the base's speed.
    post = load_adapter(copy.deepcopy(base), adapter, base_name=model_name, merge=True, force=force).eval()
    return [base, post], [f"base ({model_name})", f"post-trained ({Path(adapter).name})"]


def scene_for(model, overrides: list[str] | None):
    """The scene config: the model's frame size, then the user's overrides (which must keep that size)."""
    from posttrain.envs3d import SceneConfig

    size = getattr(model, "image_size", 64)
    scene = SceneConfig(image_size=size).override(overrides or [])
    if scene.image_size != size:
        raise ValueError(f"--scene image_size={scene.image_size}: the model predicts {size}x{size} frames")
    return scene


def run_play_cli(args: argparse.Namespace) -> int:
    import torch

    from .session import MAX_SEED

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is outside 1-65535 (0 picks a free one)")
    if args.context < 1:
        raise ValueError(f"--context {args.context}: need at least 1 true context frame")
    if not 0 <= args.seed < MAX_SEED:
        raise ValueError(f"--seed {args.seed} is outside [0, {MAX_SEED})")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise ValueError(f"--sample-steps {args.sample_steps} must be at least 1")
    # One intra-op thread: the two model panels run in parallel threads instead. With torch's default
    # (2 threads per op on 2 cores) the op threads spin against every other job on the machine:
    # benchmarks/bench_play.py measured 935 ms of CPU per frame that way on the loaded 2-core machine,
    # 42 ms this way.
    torch.set_num_threads(1)
    models, names = load_play_models(args.model, args.adapter, args.force_adapter)
    if args.sample_steps is not None:
        from posttrain.evaluate import apply_sample_steps

        for model in {id(m): m for m in models}.values():
            apply_sample_steps(model, args.sample_steps, args.model)
    if not hasattr(models[0], "start_rollout"):
        raise ValueError(f"--model {args.model}: {type(models[0]).__name__} has no incremental rollout "
                         "(start_rollout / rollout_step), which posttrain play steps once per key press")
    scene = scene_for(models[0], args.scene)
    workdir = tempfile.mkdtemp(prefix="posttrain-play-")
    try:
        return asyncio.run(_serve_until_stopped(PlayServer(models, names, scene, args.seed, args.context, workdir),
                                                args.host, args.port))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _serve_until_stopped(server: PlayServer, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    url = await server.start(host, port)
    print(f"posttrain play: {url} (Ctrl-C to stop)", flush=True)
    if host in ("0.0.0.0", "::", ""):
        print("posttrain play: listening on every interface: anyone who can reach this machine can connect",
              file=sys.stderr, flush=True)
    try:
        await stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await server.close()
    print("posttrain play: stopped", flush=True)
    return 0

