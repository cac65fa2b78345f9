"""What every command shares: turning streamssl errors into a red message and a distinct exit code."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from orchestrator.errors import StreamsslError

F = TypeVar("F", bound=Callable)

# Piped output (CI logs, files) gets room for the result tables instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=120)
err_console = Console(stderr=True)


def exits_cleanly(fn: F) -> F:
    """Wrap a command so a StreamsslError prints its message (no traceback) and exits with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StreamsslError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
