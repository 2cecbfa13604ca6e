"""A command's options from its config section: flags, a `--config FILE` section, one validated object.

Each command module types its own section (GenerateConfig in infer.py, MergeConfig in artifacts.py),
and its fields are the single source: each field becomes a flag (`max_new_tokens` ->
`--max-new-tokens`) whose help is the field's description and default, and `--config FILE` reads
the section named after the command (`merge:`) from a YAML file. A value is taken from the flag when
it is given, else from the file, else the field's default; then the section validates the whole.
"""

from __future__ import annotations

import argparse
import reprlib
import types
import typing
from typing import Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from tunesmith.config import Config, Section
from tunesmith.errors import UserError
from tunesmith.files import read_yaml


def add_section_options(parser: argparse.ArgumentParser, command: str, section: type[Section]) -> None:
    """One flag per field of `section`, plus --config FILE. The flags default to SUPPRESS, so that
    `resolve_options` sees only those given on the command line: they win over the file, absent ones do not."""
    for name, field in section.model_fields.items():
        parser.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, help=_help(field), **_kind(field))
    parser.add_argument("--config", dest="options_file", metavar="FILE",
                        help=f"YAML file whose `{command}:` section sets these options; flags given here win")
    parser.set_defaults(options_command=command, options_section=section)


def resolve_options(args: argparse.Namespace) -> Section:
    """The command's section: defaults < the file's section < the flags given, validated as one."""
    command, section = args.options_command, args.options_section
    given = {name: getattr(args, name) for name in section.model_fields if hasattr(args, name)}
    from_file = read_section(args.options_file, command) if args.options_file else {}
    try:
        return section.model_validate({**from_file, **given})
    except ValidationError as e:
        raise UserError(_describe(e, command, section, given, args.options_file)) from None


def read_section(path: str, command: str) -> dict[str, Any]:
    """The `command:` mapping of a YAML file. A file without one is an error rather than silently ignored."""
    tree = read_yaml(path)
    if command not in tree:
        sections = ", ".join(map(str, tree)) or "none"
        raise UserError(f"Config file {path!r} has no `{command}:` section (it has: {sections}); "
                        f"`tunesmith {command} --config` reads its options from that section.")
    values = tree[command] or {}
    if not isinstance(values, dict):
        raise UserError(f"The `{command}:` section of {path!r} must be a mapping of options (e.g. out: merged/), "
                        f"not {reprlib.repr(values)}.")
    return values


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(field: FieldInfo) -> dict[str, Any]:
    """argparse's type, choices or action for a field's annotation (str, int, X | None, Literal, bool, list[X])."""
    annotation = field.annotation
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}  # --double-quant / --no-double-quant
    if typing.get_origin(annotation) is list:  # a repeatable flag: --adapter a=x --adapter b=y
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return {"choices": list(choices), "type": type(choices[0])}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the flag gives an X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {"type": annotation}


def _help(field: FieldInfo) -> str:
    if field.is_required():
        text = f"{field.description} Required: here or in the --config file."
    elif field.default is None:
        text = field.description
    else:
        text = f"{field.description.rstrip('.')} (default {field.default})."
    return text.replace("%", "%%")  # argparse %-formats help strings


def _describe(error: ValidationError, command: str, section: type[Section], given: dict, file: str | None) -> str:
    """One line per problem, naming where the value came from: the flag, or the key in the file."""
    lines = [f"Invalid options for `tunesmith {command}`:"]
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key {key!r} in the `{command}:` section of {str(file)!r}; allowed here: "
                         f"{', '.join(section.model_fields)}")
        elif item["type"] == "missing":
            lines.append(f"  - {flag(key)} is required: give it on the command line or as `{key}:` in the "
                         f"`{command}:` section of a --config file")
        else:
            where = flag(key) if key in given else f"{key} in {str(file)!r}"
            lines.append(f"  - {where}: {item['msg']} (got {reprlib.repr(item.get('input'))})")
    return "\n".join(lines)


def describe_options(schema: type[Section] | None = None) -> str:
    """Every key of the run config (default Config; embed train passes its own) with its default and doc, for the
    `--help` of train, eval and demo."""
    out = []
    for section, field in (schema or Config).model_fields.items():
        model = field.annotation
        out.append(f"{section}:")
        for key, f in model.model_fields.items():
            default = f.default if f.default_factory is None else f.default_factory()
            out.append(f"  {section}.{key} (default {default!r}): {f.description}")
    return "\n".join(out)
