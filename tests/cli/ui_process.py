"""`streamssl ui` started for real in a subprocess (the CLI, as a person types it), on 127.0.0.1 and a free port;
stopped with Ctrl-C (SIGINT) as a person stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tests.orchestrator.s3_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class UiProcess:
    process: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)  # what it printed so far

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_line(self, text: str, timeout: float = 90) -> str:
        """The first printed line containing `text`, waiting for it (AssertionError with the output if it never
        comes, or the process exits first)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            if self.process.poll() is not None:
                time.sleep(0.5)  # the reader thread catches up with the last lines
                break
            time.sleep(0.5)
        found = [line for line in self.lines if text in line]
        assert found, f"`streamssl ui` never printed {text!r}:\n" + "".join(self.lines)
        return found[0]


@contextlib.contextmanager
def streamssl_ui(uri: str, experiment: str | None = None) -> Iterator[UiProcess]:
    port = free_port()
    command = [sys.executable, "-m", "cli.app", "ui", "--tracking-uri", uri, "--port", str(port), "--no-open"]
    if experiment:
        command += ["--experiment", experiment]
    # Its own process group, so the Ctrl-C below reaches it the way a terminal's does: every process of the
    # foreground group (streamssl, the mlflow server it started and that server's workers) gets SIGINT.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               start_new_session=True)
    ui = UiProcess(process, port)
    reader = threading.Thread(target=lambda: ui.lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        yield ui
    finally:
        # Ctrl-C stops the server; on a loaded machine its workers took over 30 s to wind down (the full suite
        # started beside other jobs), so it gets 90 s before it is killed and the test fails for it.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("`streamssl ui` did not stop within 90 s of Ctrl-C") from None
        finally:
            reader.join(timeout=5)
