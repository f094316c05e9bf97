"""labvm: persistent GPU desktops for a deep-learning lab, run from one admin host over SSH.

This module is the root command and the entry point, which maps errors to exit codes. The
command groups live in labvm/cli_*.py and share labvm/cli_kit.py; none of them imports this
module. They only parse, confirm and render: the work is done in modules a test can call
without click.
"""

from __future__ import annotations

import sys
import traceback

import click
from click.shell_completion import get_completion_class
from rich.console import Console

from . import __version__
from .admin import AdminHome
from .cli_kit import (
    COMPLETE_VAR,
    audited,
    say,
)
from .errors import LabvmError
from .text import safe


# -- the command tree --------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c",
    "--config",
    metavar="FILE",
    envvar="LABVM_CONFIG",
    help="The cluster file (default: $LABVM_CONFIG, else /etc/labvm/bkConfxml.xml). "
    "The admin state lives in the same directory.",
)
@click.option("--debug", is_flag=True, help="Show a traceback when a command fails.")
@click.version_option(__version__, prog_name="labvm")
@click.pass_context
def cli(ctx, config, debug):
    """Persistent GPU desktops for a lab, run from this admin host over SSH.

    \b
    Getting started:
      labvm init                      write a starter cluster file, state database and keys
      labvm node add gpu1 gpu1.lab    pin a node's host key and add it
      labvm node check                probe every node in parallel
      labvm user add alice            add a lab member (password asked twice)
    """
    ctx.obj = AdminHome.locate(config)


@cli.command()
@click.pass_obj
@audited()
def init(home: AdminHome):
    """Create the cluster file, state database, secret key and SSH identity where missing.

    Safe to run again: existing files are kept (an existing cluster file is
    validated), and a state database from an older labvm is migrated.
    """
    created = home.init()
    for line in created:
        say(f"created {line}")
    if not created:
        say(f"nothing to do: {home.home} is set up")


# -- shell completion --------------------------------------------------------
@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for SHELL.

    \b
    bash:  labvm completion bash > /etc/bash_completion.d/labvm
    zsh:   labvm completion zsh > "${fpath[1]}/_labvm"
    fish:  labvm completion fish > ~/.config/fish/completions/labvm.fish

    Node and user names are completed from the cluster file and state database.
    """
    cls = get_completion_class(shell)
    click.echo(cls(cli, {}, "labvm", COMPLETE_VAR).source())


def _register_commands() -> None:
    from .cli_ca import COMMANDS as ca_commands
    from .cli_desktops import COMMANDS as desktop_commands
    from .cli_images import COMMANDS as image_commands
    from .cli_member import COMMANDS as self_service_commands
    from .cli_members import COMMANDS as member_commands
    from .cli_monitor import COMMANDS as monitor_commands
    from .cli_nodes import node
    from .cli_ops import COMMANDS as ops_commands
    from .cli_ops import NODE_COMMANDS
    from .cli_storage import COMMANDS as storage_commands

    for command in (*member_commands, node, *image_commands, *desktop_commands, *monitor_commands, *storage_commands,
                    *ops_commands, *ca_commands, *self_service_commands):
        cli.add_command(command)
    for command in NODE_COMMANDS:
        node.add_command(command)


_register_commands()


# -- entry point: errors are mapped to exit codes here, and only here ---------
def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    try:
        # Not standalone: click returns a command's `raise click.exceptions.Exit(N)` as N.
        result = cli.main(args=args, prog_name="labvm", complete_var=COMPLETE_VAR, standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except click.exceptions.Abort:
        err.print("labvm: aborted", markup=False)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except LabvmError as exc:
        if debug:
            err.print(safe(traceback.format_exc(), keep_lines=True), markup=False)
        err.print(f"labvm: error: {safe(exc)}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("labvm: interrupted", markup=False)
        return 130
    except Exception as exc:
        if debug:
            err.print(safe(traceback.format_exc(), keep_lines=True), markup=False)
        err.print(f"labvm: internal error: {type(exc).__name__}: {safe(exc)} (run with --debug for details)", markup=False)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
