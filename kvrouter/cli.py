"""``kvrouter`` subcommands. Each command lives in its own module exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, importing a command's module when it is needed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from kvrouter import native as _native_build

__all__ = ["COMMANDS", "main", "version"]

# The compiled request path (kvrouter.native), enabled on import, before any command's module
# is: `serve --workers` spawns its workers by importing this module as their __main__, and
# they must load what the parent loads.
_NATIVE = _native_build.enable_from_env()

# name -> module; each module must keep its top-level imports light (argparse only).
COMMANDS: dict[str, str] = {
    "serve": "router.cli",
    "emulate": "simulator.emulator.cli",
    "simulate": "simulator.cli.simulate",
    "replay": "simulator.cli.replay",
    "tune": "simulator.cli.tune",
    "demo": "kvrouter.demo",
}


def version() -> str:
    """The installed distribution's version (pyproject.toml), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("kvrouter")
    except PackageNotFoundError:
        from kvrouter import __version__

        return __version__


def _parser(command: str | None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="kvrouter",
        description="KV-cache-aware request router for vLLM and SGLang inference fleets.",
        epilog="`kvrouter COMMAND --help` describes a command's flags and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    # Not required: a bare `kvrouter` prints the help rather than argparse's one-line error.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, Any] = {}
    for name, module_name in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        # Only the requested command's module is imported for its flags; the others are
        # listed by name so `kvrouter serve ...` does not import the simulator. With no
        # command (`kvrouter --help`) every module is imported for its one-line summary.
        if command in (None, name):
            module = importlib.import_module(module_name)
            sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
            subparsers[name] = sp
        else:
            sub.add_parser(name, help=f"see `kvrouter {name} --help`", add_help=False)
    return parser, subparsers


def _say_native() -> None:
    """One line on stderr when a native build exists but cannot be used (stale sources,
    another interpreter): the operator built it to have it. Nothing without a build, nothing
    when it is used (``serve`` says so in its start-up line)."""
    modules, why = _NATIVE
    if not modules and why and not why.startswith(("no native build", "native build off")):
        print(f"kvrouter: {why}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # kvrouter uses transformers for tokenizers and chat templates only; its "PyTorch was not
    # found" advice at import would greet every operator on every start, for nothing.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _say_native()
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser, subparsers = _parser(command)
    args, unknown = parser.parse_known_args(args_list)
    run = getattr(args, "_run", None)
    if run is None:
        # No command: the help, and argparse's status for a missing required argument.
        parser.print_help()
        return 2
    if unknown:
        # argparse would blame the top-level parser and print its usage; the flag belongs to
        # the command, so its usage is the useful one (exits 2 like any argparse error).
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
