"""``hf-attn-distill``: the task recipes behind one command.

    hf-attn-distill classification recipes/configs/sst2_student.yaml
    hf-attn-distill qa recipes/configs/squad_teacher.yaml --teacher_model_name_or_path <folder>
    hf-attn-distill translation --help
    hf-attn-distill lm --teacher_model_name_or_path <folder> --student_teacher_layers 0,2 --train_file train.txt ...

Everything after the subcommand goes to the recipe's ``main(argv)``: its flags, or one YAML/JSON file of the
same arguments, optionally followed by flags that override the file's values. The recipes are the modules of
``hf_attn_distill.recipes``; ``python -m hf_attn_distill.recipes.distill_qa`` and
``accelerate launch -m hf_attn_distill.recipes.distill_qa`` run the same code.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from hf_attn_distill import __version__

__all__ = ["PROG", "RECIPES", "build_parser", "config_to_flags", "main", "recipe_argv", "summary"]

PROG = "hf-attn-distill"

#: subcommand -> module whose ``main(argv)`` runs it
RECIPES = {
    "classification": "hf_attn_distill.recipes.distill_classification",
    "qa": "hf_attn_distill.recipes.distill_qa",
    "translation": "hf_attn_distill.recipes.distill_translation",
    "general": "hf_attn_distill.recipes.distill_general",
    "lm": "hf_attn_distill.recipes.distill_lm",
}

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def summary(module: str) -> str:
    """First line of ``module``'s docstring, read without importing the module."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help``, ``--version`` and the choice of subcommand (its flags are the recipe's)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Knowledge distillation with attention transfer: run a task recipe.",
        epilog=f"'{PROG} <command> --help' lists the recipe's flags. After the command: flags, or a YAML/JSON "
        "config file optionally followed by flags that override it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", title="commands", required=True)
    for name, module in RECIPES.items():
        commands.add_parser(name, help=summary(module), add_help=False)
    return parser


def config_to_flags(path: str | Path) -> list[str]:
    """The arguments of a YAML/JSON config file as command-line flags (``--key=value``; lists as several values)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise TypeError(f"{path} must hold a mapping of argument names to values, got {type(config).__name__}.")
    flags: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{key}={str(value).lower()}")
        elif isinstance(value, list):
            flags += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags.append(f"--{key}={json.dumps(value)}")
        else:
            flags.append(f"--{key}={value}")
    return flags


def recipe_argv(args: list[str]) -> list[str]:
    """What the recipe receives: ``args`` unchanged, except a config file followed by flags, which becomes the
    file's flags then those flags (the later value of a flag wins)."""
    if len(args) > 1 and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        return config_to_flags(args[0]) + args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-attn-distill <command> [args]``; argparse exits with 2 on a missing or unknown command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = build_parser().parse_args(argv[:1]).command
    recipe = importlib.import_module(RECIPES[command])
    recipe.main(recipe_argv(argv[1:]), prog=f"{PROG} {command}")  # the recipe's usage line names the subcommand
    return 0


if __name__ == "__main__":
    sys.exit(main())
