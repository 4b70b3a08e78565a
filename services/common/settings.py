"""Settings read from the environment, each variable named once, in its field's declaration.

A settings class is a frozen dataclass deriving from `EnvSettings`, each field declared with `setting`:

    @dataclass(frozen=True)
    class WorkerSettings(EnvSettings):
        redis_url: str = setting("BAGEL_REDIS_URL", "redis://127.0.0.1:6379/0")
        lease_s: int = setting("BAGEL_JOB_LEASE_SECONDS", 30, low=1)

`from_env()` parses and `to_env()` exports from those same declarations, so what a process hands to
the processes it starts (`{**os.environ, **settings.to_env()}`) reads back there as the same settings,
every field included.

Field types: str, int, float, bool, and `T | None` of those (default None). Values are stripped of
surrounding whitespace; an unset or blank variable means the field's default (None for an optional
field). int and float take a lower bound (`low`); bool is 1/true/yes or 0/false/no, in any case. Any
other value is a ValueError that names the variable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Self

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_KINDS = (str, int, float, bool)


def setting(env: str, default: Any = dataclasses.MISSING, *, low: int | float | None = None) -> Any:
    """A dataclass field read from the environment variable `env`; `low` is a number's least value."""
    return dataclasses.field(default=default, metadata={"env": env, "low": low})


@dataclass(frozen=True)
class EnvField:
    """One field of a settings class, as the environment sees it."""
    name: str                # the dataclass field
    env: str                 # its variable
    kind: type               # str, int, float or bool
    optional: bool           # declared `kind | None`: a blank variable means None
    low: int | float | None
    default: Any             # dataclasses.MISSING when the field has none

    def parse(self, raw: str) -> Any:
        """The value of a non-blank variable, or ValueError naming it."""
        if self.kind is str:
            return raw
        if self.kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(f"{self.env} must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")
        try:
            value = self.kind(raw)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{self.env} must be {what}, got {raw!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"{self.env} must be a finite number, got {raw!r}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{self.env} must be at least {self.low}, got {value}")
        return value

    def format(self, value: Any) -> str:
        """The variable's text for `value`, which parse() reads back as `value`."""
        if value is None:
            return ""  # exported all the same, so that a value inherited from the parent is overridden
        if self.kind is bool:
            return "1" if value else "0"
        return str(value)  # str(float) is the shortest text that reads back as the same float


@functools.cache
def env_fields(cls: type) -> tuple[EnvField, ...]:
    """The fields of settings class `cls`; TypeError for one that names no variable or has a type
    the environment cannot carry."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        where = f"{cls.__name__}.{f.name}"
        if "env" not in f.metadata:
            raise TypeError(f"{where} names no environment variable: declare it with setting()")
        kind, optional = _kind(hints[f.name], where)
        if optional and f.default is not None:
            raise TypeError(f"{where} is optional, so its default must be None")
        if f.metadata["low"] is not None and kind not in (int, float):
            raise TypeError(f"{where} is not a number, so it takes no lower bound")
        out.append(EnvField(f.name, f.metadata["env"], kind, optional, f.metadata["low"], f.default))
    return tuple(out)


def _kind(hint: Any, where: str) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional and len(args) == 2 and type(None) in args:
        hint = next(a for a in args if a is not type(None))
    elif optional:
        raise TypeError(f"{where}: only `T | None` unions are supported, got {hint}")
    if hint not in _KINDS:
        raise TypeError(f"{where}: type {hint} is not one of str, int, float, bool")
    return hint, optional


class EnvSettings:
    """Base of the settings dataclasses whose fields are declared with `setting()`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **defaults: Any) -> Self:
        """Settings from `env` (default: os.environ). `defaults` replace the declared defaults of the
        named fields, for when their variables are unset or blank."""
        env = os.environ if env is None else env
        fields = env_fields(cls)
        unknown = set(defaults) - {f.name for f in fields}
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        values = {}
        for f in fields:
            raw = env.get(f.env, "").strip()
            if raw:
                values[f.name] = f.parse(raw)
            elif f.name in defaults:
                values[f.name] = defaults[f.name]
            elif f.default is dataclasses.MISSING:
                raise ValueError(f"{f.env} must be set")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """Every field's variable, as from_env() reads it back as these settings."""
        return {f.env: f.format(getattr(self, f.name)) for f in env_fields(type(self))}
