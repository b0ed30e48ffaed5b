"""The command line read from the configs: one typer option per config field, its type, default and help
taken from the dataclass (:func:`taskvec_interp.config.opt`), so the CLI and the library cannot drift.

::

    @app.command()
    @config_command(SweepConfig)
    def td(config: SweepConfig, out: Path = typer.Option(...)) -> None:
        ...

``config_command`` replaces the ``config`` parameter by one option per field of the dataclass (nested
dataclasses flattened, their field name a prefix: ``DemoConfig.td.n_per_task`` is ``--td-n-per-task``),
and calls the command with the config built from them. The command's own parameters (``--out``,
``--model`` where it is not a field, ...) stay as they are. Types:

* ``bool``: ``--flag/--no-flag``; ``bool | None``: the same, ``None`` when neither is given;
* ``int``, ``float``, ``str`` (and ``| None``): as they are;
* tuples and lists of ints or strings: comma-separated (``--shots 1,4,10``);
* ``dict``: a JSON object (``--template '{"input_prefix": "Q: "}'``);
* a union of ``str`` with ints (``layers: str | list[int]``, ``patch_position: int | str``): the ints when
  the text is ints, else the text;
* ``Literal[...]`` and a field's ``choices`` (:func:`~taskvec_interp.config.opt`): listed in the help;
  the config checks the value itself, so a bad choice reads as every other config error.

A value the CLI cannot parse is a usage error naming the option (``--shots must be comma-separated ints,
got '1,x'``); a value the config refuses is its ``ValueError`` (``SweepConfig.k must be ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .config import resolve_choices

_INTS = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``(type without None, whether None was allowed)``."""
    args = _union_args(tp)
    if args is None or type(None) not in args:
        return tp, False
    rest = tuple(a for a in args if a is not type(None))
    return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007


def _sequence_item(tp: Any) -> Any | None:
    """The item type of ``tuple[X, ...]`` / ``list[X]`` / ``Sequence[X]``, else ``None``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin in (list, Sequence) and len(args) == 1:
        return args[0]
    return None


@dataclass(frozen=True)
class ConfigOption:
    """One leaf field of a config as a CLI option."""

    path: str
    """Dotted field path: ``n_per_task``, ``td.n_per_task``."""
    type: Any
    """The field's resolved annotation."""
    default: Any
    """The dataclass default (a factory's value)."""
    help: str
    choices: tuple | None
    panel: str
    """The help panel the option is listed in."""

    @property
    def param(self) -> str:
        return self.path.replace(".", "__")

    @property
    def flag(self) -> str:
        return "--" + self.path.replace(".", "-").replace("_", "-")

    # --- how the option looks to click ---------------------------------------------------------------------
    @property
    def _base(self) -> tuple[Any, bool]:
        return _strip_none(self.type)

    @property
    def scalar(self) -> bool:
        """Passed to click as its own type (int, float, str, bool), not as text this module parses."""
        base, _ = self._base
        return base in (bool, int, float, str)

    def cli_annotation(self) -> Any:
        base, optional = self._base
        if base in (bool, int, float, str):
            return typing.Optional[base] if optional else base  # noqa: UP045 - typer reads typing.Optional
        return typing.Optional[str]  # noqa: UP045

    def cli_default(self) -> Any:
        """The default as click holds it: the value for a scalar, the text :meth:`parse` reads back otherwise."""
        return self.default if self.scalar or self.default is None else self.format(self.default)

    def format(self, value: Any) -> str:
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    def option(self) -> Any:
        base, _ = self._base
        decls = (f"{self.flag}/--no-{self.flag[2:]}",) if base is bool else (self.flag,)
        text = self.help
        choices = self.choices
        if choices is None and typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
        item = _sequence_item(base)
        if item is not None and typing.get_origin(item) is typing.Literal:
            choices = typing.get_args(item)
        metavar = None
        if choices:
            listed = " | ".join(str(c) for c in choices)
            if item is not None and not all(str(c) in text for c in choices):
                text = f"{text}; one or more of: {listed}"
            else:
                metavar = "[" + "|".join(str(c) for c in choices) + "]"
        elif isinstance(base, type) and issubclass(base, dict):
            metavar = "JSON"
        elif item is not None:
            metavar = "A,B,..."
        return typer.Option(self.cli_default(), *decls, help=text, metavar=metavar, rich_help_panel=self.panel,
                            show_default=True)

    # --- from the CLI's value to the field's ---------------------------------------------------------------
    def parse(self, value: Any) -> Any:
        """The field value of what click passed (``BadParameter`` naming the option if it cannot be read)."""
        if value is None or self.scalar:
            return value
        base, _ = self._base
        return self._parse(str(value), base)

    def _bad(self, want: str, text: str) -> typer.BadParameter:
        return typer.BadParameter(f"{self.flag} must be {want}, got {text!r}")

    def _parse(self, text: str, tp: Any) -> Any:
        if tp in (int, float, str, bool):
            if tp is str:
                return text
            if tp is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
                raise self._bad("true or false", text)
            try:
                return tp(text)
            except ValueError:
                raise self._bad(f"{'an int' if tp is int else 'a number'}", text) from None
        if isinstance(tp, type) and issubclass(tp, dict):
            try:
                value = json.loads(text)
            except ValueError:
                raise self._bad("a JSON object", text) from None
            if not isinstance(value, dict):
                raise self._bad("a JSON object", text)
            return value
        item = _sequence_item(tp)
        if item is not None:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            if item is int:
                try:
                    values = [int(p) for p in parts]
                except ValueError:
                    raise self._bad("comma-separated ints", text) from None
            else:
                values = parts
            return tuple(values) if typing.get_origin(tp) is tuple else values
        args = _union_args(tp)
        if args is not None:  # e.g. str | list[int], int | str: the ints when the text is ints, else the text
            if _INTS.match(text):
                for a in args:
                    if _sequence_item(a) is int:
                        return self._parse(text, a)
                if int in args and "," not in text:
                    return int(text)
            if str in args:
                return text
            raise TypeError(f"option {self.flag}: no CLI form for the field type {tp!r}")
        if typing.get_origin(tp) is typing.Literal:
            return text
        raise TypeError(f"option {self.flag}: no CLI form for the field type {tp!r}")


def config_options(cls: type, prefix: str = "", panel: str | None = None) -> list[ConfigOption]:
    """One :class:`ConfigOption` per leaf field of dataclass ``cls`` (nested dataclasses flattened)."""
    from .config import PromptSetConfig

    hints = typing.get_type_hints(cls)
    prompt_fields = {f.name for f in dataclasses.fields(PromptSetConfig)} if issubclass(cls, PromptSetConfig) else set()
    out: list[ConfigOption] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_options(tp, f"{prefix}{f.name}.", panel=f"{f.name} part")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: a CLI option needs one")
        where = panel or ("Prompt set" if f.name in prompt_fields else cls.__name__)
        out.append(ConfigOption(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""),
                                resolve_choices(f.metadata.get("choices")), where))
    return out


def build_config(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from dotted-path ``values`` (nested dataclasses built from their prefixed paths)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_config(tp, values, f"{path}.")
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def _resolve(annotation: Any, fn: Callable) -> Any:
    """A string annotation (``from __future__ import annotations``) evaluated as ``typing.get_type_hints`` would."""
    return eval(annotation, fn.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


def config_command(cls: type, param: str = "config") -> Callable[[Callable], Callable]:
    """Decorator: the command's ``param`` parameter becomes one option per field of ``cls`` (see the module doc).

    The wrapped function keeps its other parameters; the options are listed after them. ``wrapper.options``
    holds the :class:`ConfigOption` list (the tests compare it with the dataclass).
    """
    options = config_options(cls)

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        if param not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {param!r} to build from {cls.__name__}")
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=_resolve(p.annotation, fn))
               for p in sig.parameters.values() if p.name != param]  # the config's own annotation is not read
        clash = sorted({o.param for o in options} & {p.name for p in own})
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {clash} are also fields of {cls.__name__}")
        generated = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.option(),
                                       annotation=o.cli_annotation()) for o in options]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {o.path: o.parse(kwargs.pop(o.param)) for o in options}
            kwargs[param] = build_config(cls, values)
            return fn(**kwargs)

        params = own + generated
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=sig.return_annotation)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the new signature, not the function's own
        wrapper.options = options  # type: ignore[attr-defined]
        wrapper.config_class = cls  # type: ignore[attr-defined]
        return wrapper

    return decorate


# ------------------------------------------------------------------------------------------------
# Output directories: every writing command's --out and --overwrite
# ------------------------------------------------------------------------------------------------
OVERWRITE_HELP = ("replace what --out holds (a taskvec result of any kind, removed before the run starts; a "
                  "directory without a taskvec marker is never removed)")


def overwrite_option() -> typer.models.OptionInfo:
    return typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


def _current_context() -> Any:
    """The running command's click context (typer >= 0.20 runs a copy of click as ``typer._click``), or None."""
    import importlib

    for name in ("typer._click.globals", "click.globals"):
        try:
            ctx = importlib.import_module(name).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            return ctx
    return None


def own_out(out: Path, kind: str, keep: tuple[str, ...] = (), overwrite: bool = False) -> Path:
    """Claim ``--out`` for this command, before any model work: it must be missing, empty or hold this command's
    result kind (:func:`taskvec_interp.io.check_result_owner`; ``ValueError`` naming the path and what is there
    otherwise); then its lock is taken (:func:`taskvec_interp.io.out_lock`: a second process writing the same
    ``--out`` is refused at once) and held until the command ends, on an error too; ``--overwrite`` removes a
    marked directory first."""
    import atexit
    import contextlib

    from .io import check_result_owner, out_lock, remove_result_dir

    check_result_owner(out, kind, keep, overwrite=overwrite, what="--out")
    stack = contextlib.ExitStack()
    stack.enter_context(out_lock(out))
    ctx = _current_context()
    if ctx is not None:
        ctx.call_on_close(stack.close)
    else:  # pragma: no cover - called outside a command
        atexit.register(stack.close)
    try:
        check_result_owner(out, kind, keep, overwrite=overwrite, what="--out")  # again, now that it is ours
        if overwrite and remove_result_dir(out, what="--out", kind=kind, keep=keep):
            typer.echo(f"--overwrite: removed the result that was in {out}", err=True)
    except BaseException:
        stack.close()
        raise
    return out


__all__ = ["ConfigOption", "build_config", "config_command", "config_options", "overwrite_option", "own_out"]
