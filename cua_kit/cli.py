"""The `cua-kit` command line: thin entry points over the library, one function per subcommand.

Every subcommand has --help with examples. Config-taking commands accept a YAML file followed by
dotted overrides (`trainer.max_steps=5`, `--lora.r=8`) and the original system's flags (`--lora-r 8`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from cua_kit.config import ConfigError

@dataclass
class Command:
    help: str
    epilog: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, epilog: str = ""):
    """Register a subcommand: `@command(...)(add_args)` decorates the function that runs it."""

    def with_args(add_args: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace, list[str]], int]):
            COMMANDS[name] = Command(help, epilog, add_args, run)
            return run

        return register

    return with_args


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.max_steps=5")


def _config_and_overrides(args: argparse.Namespace, extra: list[str]) -> tuple[str | None, list[str]]:
    """The config file (None: the defaults) and the override tokens, as the command line gave them."""
    config = args.config
    overrides = list(args.overrides) + extra
    if config and "=" in config:  # `cua-kit config show trainer.max_steps=3` with no file
        overrides.insert(0, config)
        config = None
    if "--config" in overrides:
        i = overrides.index("--config")
        if i + 1 >= len(overrides) or "=" in overrides[i + 1]:
            raise ConfigError("--config needs a YAML file after it, e.g. --config configs/quickstart.yaml")
        config = overrides[i + 1]
        del overrides[i : i + 2]
    return config, overrides


def _load(args: argparse.Namespace, extra: list[str]):
    from cua_kit.config import load_config

    return load_config(*_config_and_overrides(args, extra))


# ----------------------------------------------------------------------------- make-tiny-model
def _add_make_tiny(p: argparse.ArgumentParser) -> None:
    from cua_kit.models.tiny import ARCHS, SIZES

    p.add_argument("out_dir", help="folder to write the model into (Hub layout)")
    p.add_argument("--arch", choices=list(ARCHS), default="qwen3_vl")
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)


@command("make-tiny-model", "build an offline Qwen-VL model with random weights",
         "examples:\n  cua-kit make-tiny-model models/tiny\n"
         "  cua-kit make-tiny-model models/small --arch qwen3_vl --size small")(_add_make_tiny)
def _make_tiny(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit.models.tiny import make_tiny_model

    out = make_tiny_model(args.out_dir, args.arch, args.size, args.seed)
    print(f"wrote {args.arch}-{args.size} to {out}")
    return 0


# ----------------------------------------------------------------------------- config
def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "keys"], help="show: print the resolved config; keys: list all keys")
    _config_args(p)


@command("config", "print the resolved config (defaults < YAML < env vars < overrides)",
         "examples:\n  cua-kit config show configs/quickstart.yaml\n"
         "  cua-kit config show configs/quickstart.yaml trainer.max_steps=5 --lora-r 8\n"
         "  cua-kit config keys")(_add_config)
def _config(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit.config import config_to_yaml, describe_fields

    if args.action == "keys":
        for key, default, doc in describe_fields():
            print(f"{key:34s} {default:28s} {doc}")
        return 0
    print(config_to_yaml(_load(args, extra)), end="")
    return 0


def print_json_line(obj: dict) -> None:
    """The machine-readable last line of --json commands."""
    print(json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cua-kit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train computer-use agents (Qwen3-VL + LoRA) with GRPO in real GUI environments.",
        epilog="run `cua-kit COMMAND --help` for a command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=cmd.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _register_feature_commands()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return COMMANDS[args.command].run(args, extra) or 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def _register_feature_commands() -> None:
    """Import the modules whose subcommands live next to their feature (env, train, dashboard, ...)."""
    import importlib

    for module in ("cua_kit.cli_env", "cua_kit.cli_train", "cua_kit.cli_app"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":
    # run as `python -m cua_kit.cli`: this module is __main__, but feature modules register their commands
    # on `cua_kit.cli`, so dispatch through that one
    from cua_kit import cli

    sys.exit(cli.main())
