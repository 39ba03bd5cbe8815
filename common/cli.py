"""Command lines built from config dataclasses: one dataclass per program, help text per field.

    @dataclass
    class TrainConfig:
        lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
        def __post_init__(self):  # validate, raise ValueError naming the bad value
            ...

    cfg = parse_config(TrainConfig, description="Train the draft.")

Fields become ``--kebab-case`` flags; bools become ``--flag/--no-flag``; ``list[...]`` fields take
several values; ``Optional`` fields accept ``none``. A ValueError from ``__post_init__`` is shown as a
usage error (exit code 2), not a traceback. Flags must be spelled out (``allow_abbrev=False``: ``--epoch``
is not ``--epochs``), and ``--help`` shows each default once (:class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, optional: bool):
    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if tp is Path:
            return Path(text)
        if tp in (int, float, str):
            return tp(text)
        return text

    convert.__name__ = getattr(tp, "__name__", str(tp))
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: …)`` to a flag's help unless the help text already says what the default is
    (``(default: assets)``, ``(none: the suite's limit)``); ``None`` shows as ``none`` (what the flag
    accepts), lists as their values separated by spaces."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text.lower() or "(none" in text.lower():
            return text
        if action.default is argparse.SUPPRESS or action.option_strings == [] or action.nargs == 0:
            return super()._get_help_string(action)
        default = action.default
        if default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(str(x) for x in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def new_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """An ``argparse.ArgumentParser`` with the project's conventions: no abbreviated flags, one default each."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(allow_abbrev=False, **kwargs)


def build_parser(
    cls: type, description: str | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    parser = new_parser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().splitlines()[0]
        if cls.__doc__
        else description,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        kwargs: dict[str, Any] = {"help": help_text, "default": default, "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            kwargs["nargs"] = "+"
            kwargs["type"] = _converter(inner, False)
        else:
            kwargs["type"] = _converter(tp, optional)
        if default is dataclasses.MISSING or (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ):
            kwargs["required"] = True
            kwargs.pop("default")
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(
    cls: type[C], argv: list[str] | None = None, description: str | None = None, prog: str | None = None
) -> C:
    """Parse ``argv`` into an instance of the dataclass ``cls``; validation errors exit with code 2."""
    parser = build_parser(cls, description=description, prog=prog)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        tp = _unwrap_optional(hints[name])[0]
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (paths as strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {k: clean(v) for k, v in dataclasses.asdict(cfg).items()}
