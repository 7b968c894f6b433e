"""Typed dataclass configs that map one-to-one onto argparse groups.

Each field is declared with ``option(default, help=..., ...)``; ``add_arguments`` turns a dataclass
into an argument group (flag ``--field-name`` unless ``flag=`` says otherwise) and ``from_args``
builds the dataclass back, so ``__post_init__`` validates command-line and programmatic use alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Type, TypeVar

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
           choices=None, metavar: Optional[str] = None, nargs: Optional[str] = None):
    """A dataclass field with its command-line help."""
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "nargs": nargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(hint: Any):
    """(python type, is_list) of a field's annotation, Optional stripped."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, typing.List):
        return typing.get_args(hint)[0], True
    return hint, False


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """For a dataclass's ``__post_init__``: raise ``ValueError("name: 'value' is not one of
    a, b, c")`` unless ``value`` is in ``choices`` (argparse checks the command line; this checks
    configs built in code)."""
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one argument group holding every field of ``cls``."""
    group = parser.add_argument_group(title, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        kind, is_list = _base_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        kwargs: Dict[str, Any] = {"dest": field.name, "help": meta["help"], "required": required}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        else:
            kwargs.update(type=kind, default=default, choices=meta.get("choices"))
            kwargs["metavar"] = meta.get("metavar")
            if is_list:
                kwargs["nargs"] = meta.get("nargs") or "+"
        if not required and kind is not bool and kwargs["help"] and default not in (None, []):
            kwargs["help"] += f" (default: {default})"
        group.add_argument(flag, **kwargs)


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit code 2, never the usage
    dump: ``error: MESSAGE; see PROG --help``. Flags are never abbreviated (as in Megatron-LM).
    ``unknown_flag_answer(flag)`` may answer a flag the parser does not know with a sentence
    (where the feature lives); other unknown flags are named, with the closest known flag."""

    def __init__(self, *args, unknown_flag_answer: Optional[Callable[[str], Optional[str]]] = None,
                 **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.unknown_flag_answer = unknown_flag_answer

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):  # noqa: D102 (argparse's signature)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._refuse(extras)
        return parsed

    def _refuse(self, extras: List[str]) -> NoReturn:
        flags = [word.split("=", 1)[0] for word in extras if word.startswith("-")]
        if not flags:
            self.error(f"unexpected value {extras[0]!r}: no flag before it takes a value")
        rest = flags[1:6] + ([f"{len(flags) - 6} more"] if len(flags) > 6 else [])
        more = f" (also not accepted: {', '.join(rest)})" if rest else ""
        answer = self.unknown_flag_answer(flags[0]) if self.unknown_flag_answer else None
        if answer:
            self.exit(2, f"error: {flags[0]}: {answer}{more}\n")
        close = difflib.get_close_matches(flags[0], list(self._option_string_actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        self.error(f"unrecognized argument {flags[0]}{hint}{more}")


def from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed arguments of ``add_arguments``."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def to_dict(config: Any) -> Dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
