"""`streamssl` with timestamps: the real CLI, with the driver's steps wrapped to record when they happen.

    python -m bench.instrumented_run EVENTS.jsonl run SPEC --set k=v ...

Used by bench/overheads.py as a subprocess. Nothing in orchestrator/ is edited: the wrappers replace module
attributes of `orchestrator.run.{base,experiment,launch}` in this process only (``train_group``, ``init_ray``, ``build_plan``,
``Tracker`` and the ``ChunkedDriver`` methods ``open_parent``, ``log_chunk``, ``log_eval``, ``_summarise``), each
call recorded as a JSON line ``{"what", "t" (time.time()), ...}``; the events the Ray Train worker sends the
driver (worker start, a step every ``log_every`` steps, chunk ends) are recorded as they arrive. A wrapper whose
target no longer exists is skipped and reported as ``{"what": "missing", "name": ...}``, so the benchmark degrades
to what MLflow alone shows rather than failing.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

STARTED = time.time()  # as early as this module runs: interpreter start-up is before it
_LOCK = threading.Lock()
_OUT: Any = None


def record(what: str, **fields: Any) -> None:
    line = json.dumps({"what": what, "t": time.time(), **fields}, default=str)
    with _LOCK:
        _OUT.write(line + "\n")
        _OUT.flush()


def _event_fields(event: dict[str, Any]) -> dict[str, Any]:
    kind = event.get("type")
    keep: dict[str, Any] = {"type": kind}
    if kind == "start":
        keep.update(worker_time=event.get("time"), restored_from=event.get("restored_from"))
    elif kind == "step":
        keep.update({k: event.get(k) for k in ("line", "chunk", "step", "steps_total", "samples_per_s")})
    elif kind == "chunk":
        report = event.get("report", {})
        keep.update({k: event.get(k) for k in ("line", "chunk", "started", "ended", "world_size")})
        keep.update({f"report_{k}": report.get(k) for k in ("steps", "samples", "seconds", "first_step")})
    return keep


def _timed(name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            record(name, start=start, seconds=time.time() - start)

    wrapper.__wrapped__ = fn
    return wrapper


def install() -> None:
    import orchestrator.run.base as base
    import orchestrator.run.experiment as ex
    import orchestrator.run.launch as launch

    if hasattr(ex, "train_group"):
        original = ex.train_group

        def train_group(plan, tasks, run_name, on_event, *args, **kwargs):
            record("train_group_call", run_name=run_name, lines=[t.line.id for t in tasks])

            def on_event_recorded(event):
                record("event", **_event_fields(event))
                return on_event(event)

            try:
                return original(plan, tasks, run_name, on_event_recorded, *args, **kwargs)
            finally:
                record("train_group_return", run_name=run_name)

        ex.train_group = train_group
    else:
        record("missing", name="orchestrator.run.experiment.train_group")
    for module, name in ((base, "init_ray"), (launch, "build_plan"), (launch, "Tracker")):
        if hasattr(module, name):
            setattr(module, name, _timed(name, getattr(module, name)))
        else:
            record("missing", name=f"{module.__name__}.{name}")
    driver = getattr(ex, "ChunkedDriver", None)
    for name in ("open_parent", "log_chunk", "log_eval", "_summarise"):
        if driver is not None and hasattr(driver, name):
            setattr(driver, name, _timed(f"driver.{name}", getattr(driver, name)))
        else:
            record("missing", name=f"orchestrator.run.experiment.ChunkedDriver.{name}")


def main() -> None:
    global _OUT
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.instrumented_run EVENTS.jsonl <streamssl arguments>")
    _OUT = open(Path(sys.argv[1]), "a", encoding="utf-8")
    record("process_start", t_module=STARTED)
    install()
    record("imports_done")
    from cli.app import main as cli_main

    sys.argv = ["streamssl", *sys.argv[2:]]
    try:
        cli_main()
    except SystemExit as exc:
        record("exit", code=exc.code)
        raise
    record("exit", code=0)


if __name__ == "__main__":
    main()
