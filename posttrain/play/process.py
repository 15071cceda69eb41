"""`posttrain play` as a child process on a free port: what the tests and `benchmarks/bench_play.py` start.

    with PlayProcess("--model", "default") as play:
        connect(play.ws_url) ...
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

SERVING = re.compile(r"(http://\S+/) \(Ctrl-C to stop\)")


class PlayProcess:
    """Starts `python -m posttrain play --port 0 *args` and waits (up to `timeout` s) until it prints the
    address it serves; then `url` (the page) and `ws_url` (its WebSocket) are set. Everything it prints
    on stdout is kept in `stdout`. Raises RuntimeError with its stderr if it exits first."""

    def __init__(self, *args: str, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 600):
        self.timeout = timeout
        self.process = subprocess.Popen([sys.executable, "-m", "posttrain", "play", "--port", "0", *args],
                                        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise RuntimeError(f"posttrain play exited with {self.process.wait()}: {self.process.stderr.read()}")
            found = SERVING.search(line)
            if found:
                self.url = found.group(1)
                self.ws_url = self.url.replace("http://", "ws://") + "ws"
                return

    def _read(self) -> None:
        for line in self.process.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def interrupt(self) -> int:
        """Ctrl-C, then the exit code (once everything it printed has been read)."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=self.timeout)
        self.reader.join(timeout=self.timeout)
        return code

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far, all threads (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def __enter__(self) -> PlayProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.interrupt()
