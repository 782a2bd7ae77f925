"""A command's options from its stages' Params: the derivation castlib/options.py caches.

Each field of the stages a command runs (options.COMMANDS) becomes one Option: its type
gives the kind (bool, int, float, str, a list of str), a Literal or Enum the choices, `ge`,
`gt` and `le` the bounds, `Cli(...)` in its annotation the unit and placeholder, its
description the help. The fields that wire a pipeline (`id`, a `from`, a location) are
not options; a command's positional arguments are its stages' location parameters.
"""
from __future__ import annotations

import enum
import types
import typing

from ..options import COMMANDS, Cli, Option
from . import stage_class
from .base import StageParams


def derive(name: str) -> tuple[list[Option], list[Option]]:
    """(positional arguments, options) of a command, from its stages' Params."""
    spec = COMMANDS[name]
    positional: dict[str, Option] = {}
    options: dict[str, Option] = {o.name: Option(**{**o.as_dict(), "stages": []})
                                  for o in spec.own}
    for stage_name in spec.stages:
        cls = stage_class(stage_name)
        wiring = set(StageParams.model_fields) | set(cls.reads_results)
        for fname, info in cls.Params.model_fields.items():
            if fname in cls.location_params:
                if fname in spec.positional and fname not in positional:
                    positional[fname] = Option(fname, "str", help=info.description or "")
                continue
            if fname in wiring or fname in spec.sets:
                continue
            if fname in options:            # one option for every stage that has the field
                options[fname].stages.append(stage_name)
                continue
            options[fname] = _option(fname, info)
            options[fname].stages.append(stage_name)
    for fname, text in spec.wording.items():
        options[fname].help = text
    missing = [p for p in spec.positional if p not in positional]
    if missing:
        raise RuntimeError(f"command {name}: no stage has the location parameter {missing[0]}")
    return [positional[p] for p in spec.positional], list(options.values())


def stage_fields(name: str) -> list[dict] | None:
    """Every field of a stage's Params as plain data, for checking its parameters without
    pydantic (stages.base.lean_params); None when a field's type has no such form (the
    model then checks every value)."""
    out = []
    try:
        for fname, info in stage_class(name).Params.model_fields.items():
            annotation, optional, _ = _unwrap(info.annotation)
            kind, choices = _kind(annotation)
            bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le")
                      if getattr(m, k, None) is not None}
            if (set(bounds) and kind not in ("int", "float")) or any(
                    type(m).__name__ not in ("Ge", "Gt", "Le", "Cli") for m in info.metadata):
                return None   # a constraint lean_params does not know
            required = info.is_required()
            out.append({"name": fname, "alias": info.alias, "kind": kind, "choices": choices,
                        "optional": optional, "required": required,
                        "default": None if required else info.get_default(
                            call_default_factory=True),
                        "ge": bounds.get("ge"), "gt": bounds.get("gt"), "le": bounds.get("le")})
    except RuntimeError:
        return None
    return out


def _option(fname: str, info) -> Option:
    annotation, optional, hints = _unwrap(info.annotation)
    hints += [m for m in info.metadata if isinstance(m, Cli)]
    cli = hints[-1] if hints else Cli()
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le")
              if getattr(m, k, None) is not None}
    kind, choices = _kind(annotation)
    if info.is_required():
        raise RuntimeError(f"parameter {fname} is required: a command can only offer "
                           "parameters with a default (or a location, as an argument)")
    default = info.get_default(call_default_factory=True)
    return Option(fname, kind, default, info.description or "", choices, optional,
                  unit=cli.unit, metavar=cli.metavar, short=cli.short, **bounds)


def _unwrap(annotation):
    """(the type, whether None is allowed, the Cli hints found on the way)."""
    hints, optional = [], False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            hints += [m for m in annotation.__metadata__ if isinstance(m, Cli)]
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                raise RuntimeError(f"a union {annotation} has no command-line form")
            annotation = args[0]
        else:
            return annotation, optional, hints


def _kind(annotation) -> tuple[str, list | None]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "str", list(typing.get_args(annotation))
    if origin is list:
        item, _, _ = _unwrap(typing.get_args(annotation)[0])
        kind, choices = _kind(item)
        if kind != "str":
            raise RuntimeError(f"a list of {item} has no command-line form")
        return "list", choices
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "str", [m.value for m in annotation]
    for kind in (bool, int, float, str):   # bool first: a bool is an int
        if annotation is kind:
            return kind.__name__, None
    raise RuntimeError(f"a parameter of type {annotation} has no command-line form")
