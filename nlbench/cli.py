"""`nlbench` command line. Each sub-command lives in its own module under nlbench/commands/
and is imported only when used, so `nlbench --help` stays fast."""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "run": "nlbench.commands.run:run",
    "submit": "nlbench.commands.submit:submit",
    "jobs": "nlbench.commands.submit:jobs",
    "tune": "nlbench.commands.tune:tune",
    "leaderboard": "nlbench.commands.leaderboard:leaderboard",
    "report": "nlbench.commands.report:report",
    "bench": "nlbench.commands.bench:bench",
    "pretrain": "nlbench.commands.pretrain:pretrain",
    "routing": "nlbench.commands.routing:routing",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        """Every user error of every sub-command: one paragraph on stderr, exit 2, no traceback."""
        from nlbench.errors import one_paragraph, user_errors

        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
            if isinstance(e, click.ClickException) or not isinstance(e, user_errors()):
                raise
            click.echo(f"error: {one_paragraph(e)}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nlbench")
def main():
    """nlbench: does Hope forget less than Transformer and Titans?"""


if __name__ == "__main__":
    main()
