"""Settings from the environment: every settings class in services/ is found, and for every one of its
fields (values generated from the declarations, so a new field or class is covered without editing this
file) export and parsing agree, unset means the default, and bad values are refused by name."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.settings import EnvSettings, env_fields, setting

ROOT = Path(__file__).resolve().parents[2]


def settings_classes() -> list[tuple[str, str]]:
    """(module, class) of every class in services/ that derives from EnvSettings, found by reading the
    source, so that this file need not list them."""
    found = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "_generated" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)) == "EnvSettings" for b in node.bases):
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.append((module, node.name))
    return found


CLASSES = settings_classes()


@pytest.fixture(params=CLASSES, ids=[name for _, name in CLASSES])
def cls(request):
    module, name = request.param
    return getattr(importlib.import_module(module), name)


def other_value(f):
    """A valid value of field `f` other than its default, which the environment carries."""
    if f.kind is bool:
        return not f.default
    if f.kind is str:
        return f"{f.name}-set"
    base = f.default if f.default not in (None, dataclasses.MISSING) else (f.low or 0)
    return base + 7 if f.kind is int else base + 0.3  # 0.3: no exact binary float, so it tests the text


def required(cls) -> dict:
    """Values for the fields without a default (the constructor needs them)."""
    return {f.name: other_value(f) for f in env_fields(cls) if f.default is dataclasses.MISSING}


def required_env(cls) -> dict[str, str]:
    """The same, as variables."""
    return {f.env: f.format(other_value(f)) for f in env_fields(cls) if f.default is dataclasses.MISSING}


def test_the_settings_classes_are_found():
    names = {name for _, name in CLASSES}
    assert {"OrchestratorSettings", "StorageConfig", "LLMSettings"} <= names


def test_each_variable_is_declared_once_and_documented():
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    seen: dict[str, str] = {}
    for module, name in CLASSES:
        for f in env_fields(getattr(importlib.import_module(module), name)):
            assert f.env.startswith("BAGEL_"), f"{name}.{f.name}: {f.env}"
            assert f.env not in seen, f"{f.env} is declared by {seen[f.env]} and {name}.{f.name}"
            seen[f.env] = f"{name}.{f.name}"
            assert f"`{f.env}`" in docs, f"{f.env} ({name}.{f.name}) is not documented in README.md or docs/"


def test_round_trip_of_every_field(cls):
    values = {f.name: other_value(f) for f in env_fields(cls)}
    x = cls(**values)
    env = x.to_env()
    assert set(env) == {f.env for f in env_fields(cls)}
    assert all(isinstance(v, str) for v in env.values())
    back = cls.from_env(env)
    assert back == x
    for f in env_fields(cls):
        assert getattr(back, f.name) != f.default, f"{cls.__name__}.{f.name} kept its default"


def test_unset_and_blank_mean_the_defaults(cls):
    for unset in ({}, {f.env: "  " for f in env_fields(cls)}):
        env = {**unset, **required_env(cls)}
        s = cls.from_env(env)
        for f in env_fields(cls):
            if f.default is not dataclasses.MISSING:
                assert getattr(s, f.name) == f.default, f"{cls.__name__}.{f.name} from {env.get(f.env)!r}"


def test_exported_settings_override_the_inherited_environment(cls):
    """A child process gets {**os.environ, **settings.to_env()}: whatever the parent's environment
    says, the child reads the settings it was given, defaults and None included."""
    inherited = cls(**{f.name: other_value(f) for f in env_fields(cls)}).to_env()
    given = cls(**required(cls))
    assert cls.from_env({**inherited, **given.to_env()}) == given


def test_bad_values_are_refused_by_name(cls):
    base = required_env(cls)
    checked = 0
    for f in env_fields(cls):
        bad = []
        if f.kind in (int, float, bool):
            bad.append(("many", "must be"))
        if f.kind is float:
            bad.append(("inf", "must be a finite number"))
        if f.low is not None:
            bad.append((str(f.low - 1), f"must be at least {f.low}"))
        for value, message in bad:
            with pytest.raises(ValueError, match=f"^{f.env} {message}"):
                cls.from_env({**base, f.env: value})
            checked += 1
    assert checked or all(f.kind is str for f in env_fields(cls))


def test_a_worker_process_reads_back_what_it_was_given():
    """Through a real process boundary, as the local stack and the tests start workers."""
    from services.orchestrator.settings import OrchestratorSettings

    given = OrchestratorSettings(retry_backoff_s=0.2, lease_s=2, auth_token=None, max_retries=0)
    inherited = {"BAGEL_AUTH_TOKEN": "parent-token", "BAGEL_JOB_RETRY_BACKOFF_SECONDS": "9"}
    code = ("import dataclasses, json; from services.orchestrator.settings import OrchestratorSettings as S; "
            "print(json.dumps(dataclasses.asdict(S.from_env())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, **inherited, **given.to_env(), "PYTHONPATH": str(ROOT)})
    assert OrchestratorSettings(**json.loads(out.stdout)) == given


def test_storage_endpoint_scheme_sets_tls_unless_told_otherwise():
    from services.common.storage import StorageConfig

    def read(**env):
        return StorageConfig.from_env({f"BAGEL_S3_{k.upper()}": v for k, v in env.items()})

    assert read(endpoint="https://s3.local:9000/") == StorageConfig("s3.local:9000", secure=True)
    assert read(endpoint="https://s3.local:9000", secure="no").secure is False
    assert read(endpoint="http://s3.local:9000", secure="TRUE") == StorageConfig("s3.local:9000", secure=True)
    assert read(endpoint="  ", access_key="k") is None  # no endpoint: no storage


# ---- the declarations themselves ---------------------------------------------------------------------
def test_bool_accepts_the_usual_spellings():
    @dataclass(frozen=True)
    class Flags(EnvSettings):
        on: bool = setting("BAGEL_TEST_ON", False)

    assert [Flags.from_env({"BAGEL_TEST_ON": v}).on for v in ("1", "true", "Yes", "0", "FALSE", "no")] == \
        [True, True, True, False, False, False]


def test_a_required_field_must_be_set():
    @dataclass(frozen=True)
    class Needs(EnvSettings):
        url: str = setting("BAGEL_TEST_URL")

    with pytest.raises(ValueError, match="^BAGEL_TEST_URL must be set"):
        Needs.from_env({})
    assert Needs.from_env({}, url="fallback").url == "fallback"
    with pytest.raises(TypeError, match="no field"):
        Needs.from_env({}, other=1)


def test_declarations_the_environment_cannot_carry_are_refused():
    @dataclass(frozen=True)
    class Untagged(EnvSettings):
        n: int = 3

    @dataclass(frozen=True)
    class ListField(EnvSettings):
        names: list = setting("BAGEL_TEST_NAMES", None)

    @dataclass(frozen=True)
    class BoundedText(EnvSettings):
        name: str = setting("BAGEL_TEST_NAME", "x", low=1)

    @dataclass(frozen=True)
    class OptionalWithDefault(EnvSettings):
        name: str | None = setting("BAGEL_TEST_NAME", "x")

    for bad, message in ((Untagged, "names no environment variable"), (ListField, "is not one of"),
                         (BoundedText, "takes no lower bound"), (OptionalWithDefault, "default must be None")):
        with pytest.raises(TypeError, match=message):
            bad.from_env({})
