"""The `leanvlm` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="Vision-language models that spend little decoder compute on vision tokens.")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        info()
        typer.echo("Run `leanvlm --help` for the commands.")


@app.command()
def info() -> None:
    """Print the version, the decoder policies and the supported language-model families."""
    import leanvlm
    from leanvlm.llm import SUPPORTED_FAMILIES

    typer.echo(f"leanvlm {leanvlm.__version__}")
    typer.echo(f"decoders: {', '.join(leanvlm.DECODERS)}")
    typer.echo(f"language model families: {', '.join(SUPPORTED_FAMILIES)}")


if __name__ == "__main__":
    app()
