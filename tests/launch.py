"""`accelerate launch` for the multi-process tests: a free port per launch, each rank's own log, and a
failure message that shows every rank's error, not only the tail of the interleaved stream.

Why a helper: a ZeRO-2 test once failed on a fresh machine with "rank 1 crashed" while the assertion
showed the last 3,000 characters of the launcher's stderr, which were rank 0's gloo error about the
lost peer; what killed rank 1 was cut off. Here torch's elastic agent writes each rank's stdout and
stderr to its own file (`--log_dir`, `--tee 3`) and a failure quotes the end of each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"


def free_port() -> int:
    """A port nothing listens on now, from the kernel's ephemeral range. The default 29500 is shared by
    every launch on the machine (a second test suite, a user's job). A window remains between this
    socket closing and the launcher binding the port; another process taking that very port in it would
    show as the agent's "address already in use", named in the failure message."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_logs(log_dir: Path, tail: int = 4000) -> str:
    """The end of each rank's stderr (and stdout where stderr is empty) under an elastic agent's log_dir."""
    parts = []
    for path in sorted(log_dir.rglob("stderr.log")) + sorted(log_dir.rglob("stdout.log")):
        text = path.read_text(errors="replace")
        if text.strip():
            parts.append(f"--- {path.relative_to(log_dir)} (last {tail} chars) ---\n{text[-tail:]}")
    return "\n".join(parts) or f"(no rank logs under {log_dir})"


def launch_command(config: str, entry: list[str], *, port: int, log_dir: Path, launch_args: list[str] = ()) -> list[str]:
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--main_process_port", str(port), "--log_dir", str(log_dir), "--tee", "3", *launch_args, *entry]


def posttrain_entry(recipe: Path, overrides: list[str], grad_dump: bool = False) -> list[str]:
    """`-m posttrain run RECIPE ...`, or tests/grad_dump_main.py (which saves each rank's first-step
    gradients to $POSTTRAIN_GRAD_DUMP) in its place."""
    head = [str(ROOT / "tests" / "grad_dump_main.py")] if grad_dump else ["-m", "posttrain"]
    return [*head, "run", str(recipe), *overrides]


def launch_env(grad_dump: Path | None = None) -> dict:
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_DEBUG": "1"}
    if grad_dump is not None:
        env["POSTTRAIN_GRAD_DUMP"] = str(grad_dump)
    return env


def run_launch(config: str, entry: list[str], log_dir: Path, env: dict | None = None, timeout: float = 900) -> None:
    """One `accelerate launch` that must exit 0; a failure shows each rank's own log."""
    command = launch_command(config, entry, port=free_port(), log_dir=log_dir)
    result = subprocess.run(command, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"accelerate launch exited {result.returncode}\n{rank_logs(log_dir)}\n"
                                    f"--- launcher stderr (last 2000 chars) ---\n{result.stderr[-2000:]}")


def run_nodes(config: str, entry: list[str], log_dir: Path, nodes: int, env: dict | None = None,
              timeout: float = 900) -> None:
    """`nodes` launches on this machine acting as `nodes` machines (127.0.0.1, one process each, gloo), as
    docs/methods.md's multi-node line runs them on real nodes: same command, `--machine_rank` differs."""
    port = free_port()
    processes = []
    for rank in range(nodes):
        launch_args = ["--num_machines", str(nodes), "--num_processes", str(nodes), "--machine_rank", str(rank),
                       "--main_process_ip", "127.0.0.1"]
        command = launch_command(config, entry, port=port, log_dir=log_dir / f"node{rank}", launch_args=launch_args)
        processes.append(subprocess.Popen(command, env=env or launch_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs, codes = [], []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            out, _ = process.communicate()
        outputs.append(out)
        codes.append(process.returncode)
    if any(codes):
        logs = "\n".join(f"=== node {rank}: exit {code} ===\n{rank_logs(log_dir / f'node{rank}')}\n"
                         f"--- launcher output (last 1500 chars) ---\n{out[-1500:]}"
                         for rank, (code, out) in enumerate(zip(codes, outputs)))
        raise AssertionError(f"a node's launch failed\n{logs}")
