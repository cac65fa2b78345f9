"""The `streamssl` command: `streamssl --help` lists the commands; each lives in its own module."""

from __future__ import annotations

import typer

from cli import eval as eval_cmd
from cli import lineage, logs, report, run, status, submit, sweep, ui

app = typer.Typer(
    name="streamssl",
    help="Self-supervised pre-training on streaming data: shards -> stream chunks -> Ray Train -> evaluation -> MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run.run)
app.command("sweep")(sweep.sweep)
app.command("submit")(submit.submit)
app.command("status")(status.status)
app.command("logs")(logs.logs)
app.command("lineage")(lineage.lineage)
app.command("report")(report.report)
app.command("eval")(eval_cmd.eval_command)
app.command("ui")(ui.ui)


def _mount_data() -> None:
    from cli.data import app as data_app

    app.add_typer(data_app, name="data", help="Make, prepare and verify Parquet image shards.")


_mount_data()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
