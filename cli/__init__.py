"""The `streamssl` command line (Typer). Commands only parse and call `orchestrator`."""
