"""Typed dataclass configs that map one-to-one onto argparse groups.

Each field is declared with ``option(default, help=..., ...)``; ``add_arguments`` turns a dataclass
into an argument group (flag ``--field-name`` unless ``flag=`` says otherwise) and ``from_args``
builds the dataclass back, so ``__post_init__`` validates command-line and programmatic use alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Dict, Optional, Type, TypeVar

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


def from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed arguments of ``add_arguments``."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def to_dict(config: Any) -> Dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
