"""Option resolution: CLI > ini > env > default, and clear errors for bad values."""

from __future__ import annotations

import pytest

from isolate import OPTIONS, ConfigError, Settings, resolve_settings
from isolate._config import parse_pg_settings


def test_defaults_when_nothing_is_set() -> None:
    settings = resolve_settings({}, {}, {})
    assert settings == Settings()
    assert settings.backend == "native"
    assert settings.source_of("backend") == "default"


def test_precedence_cli_over_ini_over_env() -> None:
    env = {"ISOLATE_BACKEND": "auto", "ISOLATE_STOP_TIMEOUT": "3", "ISOLATE_RUN_AS": "daemon"}
    ini = {"backend": "docker", "stop_timeout": "4"}
    cli = {"backend": "native"}
    settings = resolve_settings(cli, ini, env)
    assert settings.backend == "native"
    assert settings.stop_timeout == 4.0
    assert settings.run_as == "daemon"
    assert settings.source_of("backend") == "command line --isolate-backend"
    assert settings.source_of("stop_timeout") == "ini isolate_stop_timeout"
    assert settings.source_of("run_as") == "env ISOLATE_RUN_AS"


def test_empty_values_fall_through() -> None:
    settings = resolve_settings({"backend": None}, {"backend": ""}, {"ISOLATE_BACKEND": "docker"})
    assert settings.backend == "docker"


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("backend", "kubernetes", "must be one of native, docker, auto"),
        ("stop_timeout", "soon", "must be a number of seconds"),
        ("stop_timeout", "-1", "greater than 0"),
        ("pg_conn_per_worker", "2.5", "whole number"),
        ("pg_settings", "fsync", "name=value"),
        ("redis_mode", "cluster", "per-worker, shared"),
        ("reap_stale", "maybe", "true or false"),
    ],
)
def test_bad_values_name_option_source_and_fix(name: str, raw: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_settings({}, {}, {f"ISOLATE_{name.upper()}": raw})
    text = str(info.value)
    assert expected in text
    assert f"env ISOLATE_{name.upper()}" in text
    assert f"--isolate-{name.replace('_', '-')}" in text


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown isolate option"):
        resolve_settings({"bakend": "native"})


def test_every_option_has_cli_ini_env_and_documented_default() -> None:
    names = {opt.name for opt in OPTIONS}
    fields = set(Settings.__dataclass_fields__) - {"sources"}
    assert names == fields
    for opt in OPTIONS:
        assert opt.cli.startswith("--isolate-")
        assert opt.ini.startswith("isolate_")
        assert opt.env.startswith("ISOLATE_")
        assert opt.help
        opt.parse(opt.default)  # the documented default parses


def test_pg_settings_parsing() -> None:
    assert parse_pg_settings("work_mem=8MB, log_statement = all;jit=on") == {
        "work_mem": "8MB",
        "log_statement": "all",
        "jit": "on",
    }
    assert parse_pg_settings("") == {}


def test_run_id_is_validated() -> None:
    assert resolve_settings({}, {}, {"ISOLATE_RUN_ID": "abc123"}).run_id == "abc123"
    assert resolve_settings({}, {}, {}).run_id is None
    with pytest.raises(ConfigError, match="lower-case letters or digits"):
        resolve_settings({"run_id": "../etc"})


def test_the_module_map_in_design_md_matches_the_tree() -> None:
    """docs/design.md opens with one line per module; keep it in step with isolate/."""
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    text = (root / "docs" / "design.md").read_text()
    table = text.split("## Architecture", 1)[1].split("### The path of a run", 1)[0]
    named = {m for row in table.splitlines() if row.startswith("| `")
             for m in re.findall(r"`([\w/.]+\.py)`", row.split("|")[1])}  # fmt: skip
    tree = {
        str(p.relative_to(root / "isolate"))
        for p in (root / "isolate").rglob("*.py")
        if not (p.name == "__init__.py" and p.parent.name != "isolate")
    }
    assert named == tree
