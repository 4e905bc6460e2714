"""The command-line options of :class:`~fastabsld.recipe.config.TrainConfig`, generated from its fields.

One source of truth: every field of TrainConfig becomes a flag ``--field-name`` with the field's type
(numbers accept fractions such as ``8/255``; booleans get ``--x`` / ``--no-x``; tuples take several
values), its default, the choices TrainConfig validates with and the field's description from the
TrainConfig docstring as help. ``--config FILE`` (JSON or TOML, keys are field names) sets fields
too; flags given on the command line override the file, which overrides the defaults.
"""

import argparse
import dataclasses
import fractions
import functools
import json
import os
import re
import typing

from fastabsld.recipe.config import TrainConfig, field_type

_ENTRY = re.compile(r"^ {8}(\w+): (.*)$")
_MORE = re.compile(r"^ {12,}(\S.*)$")


def parse_number(text):
    """A float from a decimal or a fraction ``a/b`` (``"0.1"``, ``"8/255"``, ``"1e-3"``, ``"1.5/255"``).

    Args:
        text: the text (a number passes through as a float).

    Returns:
        float: the value.

    Raises:
        ValueError: not a number, or a fraction with other than one slash between two numbers (``"1/3/4"``).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"expected a number, got {type(text).__name__} {text!r}")
    value = text.strip()
    try:
        if "/" in value:
            # Exactly one slash with a plain number on each side: "1/3/4" is refused, never read as 1/(3/4).
            numerator, denominator = (part.strip() for part in value.split("/", 1))
            if "/" in denominator or not numerator or not denominator:
                raise ValueError(value)
            return float(fractions.Fraction(numerator) / fractions.Fraction(denominator))
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction a/b such as 8/255 (one slash, a number on each side), "
                         f"got {text!r}") from None


def _number(text):
    try:
        return parse_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@functools.cache
def field_docs():
    """The description of every TrainConfig field, from the Attributes section of its docstring.

    Returns:
        dict: field name -> one-paragraph description.
    """
    docs, current = {}, None
    lines = TrainConfig.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    for line in lines[start + 1:]:
        entry, more = _ENTRY.match(line), _MORE.match(line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2)
        elif more and current:
            docs[current] += " " + more.group(1)
        elif line.strip():
            current = None
    return {name: text.replace("``", "") for name, text in docs.items()}


def flag(name):
    """The command-line flag of a field (``teacher_epochs`` -> ``--teacher-epochs``).

    Args:
        name: field name.

    Returns:
        str: the flag.
    """
    return "--" + name.replace("_", "-")


def _show(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    return str(value)


def _help(f):
    text = field_docs().get(f.name, "")
    if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
        text += f" (default: {_show(f.default)})"
    elif isinstance(f.default, bool):
        text += f" (default: {'on' if f.default else 'off'})"
    return text.replace("%", "%%")


def add_config_arguments(parser, names=None):
    """Adds a flag per TrainConfig field (or per field of ``names``); flags not given stay out of the namespace.

    Args:
        parser: an ``argparse.ArgumentParser`` (or argument group).
        names: the fields to add (default: all).

    Returns:
        the parser.
    """
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(TrainConfig):
        if wanted is not None and f.name not in wanted:
            continue
        kind = field_type(f)
        options = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            options.update(nargs="+", type=_number if inner is float else inner,
                           metavar=f.name.split("_")[-1].rstrip("s").upper() or "VALUE")
        else:
            options["type"] = {float: _number, int: int, str: str}[kind]
            if f.metadata.get("choices"):
                options["choices"] = f.metadata["choices"]
            else:
                options["metavar"] = f.name.upper()
        parser.add_argument(flag(f.name), **options)
    return parser


def given_settings(args):
    """The TrainConfig fields set on the command line (flags left out are absent, not defaulted).

    Args:
        args: the parsed namespace.

    Returns:
        dict: field name -> value.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(args).items() if name in names}


def _coerce(name, value, source):
    """A config-file value as the field's type (fractions for numbers, lists for tuples)."""
    kind = field_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    try:
        if value is None:
            return None
        if kind is float and isinstance(value, str):
            return parse_number(value)
        if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            inner = typing.get_args(kind)[0]
            return tuple(parse_number(v) if inner is float and isinstance(v, str) else v for v in value)
    except ValueError as error:
        raise ValueError(f"{source}: {name}: {error}") from None
    return value


def read_config_file(path):
    """The settings of a JSON or TOML config file (keys are TrainConfig field names, ``-`` or ``_``).

    Args:
        path: the file (``.toml`` is read as TOML, anything else as JSON).

    Returns:
        dict: field name -> value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable syntax, an unknown key, or a value that is not a number where one is expected,
            naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path}: no such file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                values = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise ValueError(f"config file {path} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got {type(values).__name__}")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} (the settings are the flags of 'fastabsld train --help', "
                         "with _ for -)")
    return {key: _coerce(key, value, f"config file {path}") for key, value in values.items()}


def requested_settings(args):
    """What the user asked for: ``--config FILE``'s settings overridden by the flags given.

    Args:
        args: the parsed namespace (``config`` may name a file).

    Returns:
        dict: field name -> value.
    """
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    return {**values, **given_settings(args)}


def describe_change(name, old, new):
    """``name old -> new`` for messages (floats shortened).

    Args:
        name: field name.
        old: previous value.
        new: new value.

    Returns:
        str: the description.
    """
    return f"{name} {_show(old)} -> {_show(new)}"

