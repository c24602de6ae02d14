"""Configuration, read once from environment variables at startup."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T", int, float)

_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(Exception):
    """Raised when the environment does not describe a usable configuration."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Settings:
    port: int
    host: str = "127.0.0.1"
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    dlq_key: str = "datastorage:dlq"
    shutdown_propagation_delay: float = 0.5
    shutdown_timeout: float = 10.0
    batch_max: int = 100
    page_default: int = 50
    page_max: int = 500
    dlq_drain_interval: float = 0.2
    dlq_error_delay: float = 5.0
    db_timeout: float = 2.0
    db_pool_timeout: float = 0.5
    db_pool_min: int = 1
    db_pool_max: int = 10
    max_body_bytes: int = 16 * 1024 * 1024
    debug_endpoints: bool = True
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``env``; every problem is reported at once."""
        problems: list[str] = []

        def number(
            name: str, convert: Callable[[str], T], default: T | None, low: T, high: T | None = None
        ) -> T:
            raw = env.get(name, "").strip()
            if not raw:
                if default is None:
                    problems.append(f"{name} is required")
                    return low
                return default
            try:
                value = convert(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a valid {convert.__name__}")
                return low if default is None else default
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{name}={raw!r} must be finite")
                return low if default is None else default
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                problems.append(f"{name}={raw!r} must be {bound}")
                return low if default is None else default
            return value

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        port = number("PORT", int, None, 0, 65535)
        page_max = number("PAGE_MAX", int, 500, 1)
        page_default = number("PAGE_DEFAULT", int, 50, 1)
        if page_default > page_max:
            problems.append(f"PAGE_DEFAULT ({page_default}) must not exceed PAGE_MAX ({page_max})")
        pool_min = number("DB_POOL_MIN", int, 1, 0, 100)
        pool_max = number("DB_POOL_MAX", int, 10, 1, 100)
        if pool_min > pool_max:
            problems.append(f"DB_POOL_MIN ({pool_min}) must not exceed DB_POOL_MAX ({pool_max})")

        log_level = text("LOG_LEVEL", "INFO").upper()
        if log_level == "WARN":
            log_level = "WARNING"
        if log_level not in _LOG_LEVELS:
            problems.append(f"LOG_LEVEL={log_level!r} must be one of {', '.join(_LOG_LEVELS)}")
            log_level = "INFO"

        debug_raw = env.get("DEBUG_ENDPOINTS", "1").strip().lower()
        if debug_raw not in _TRUE | _FALSE:
            problems.append(
                f"DEBUG_ENDPOINTS={debug_raw!r} must be 1/0, true/false, yes/no or on/off"
            )

        settings = cls(
            port=port,
            host=text("HOST", "127.0.0.1"),
            database_url=env.get("DATABASE_URL", "").strip(),
            redis_url=text("REDIS_URL", "redis://127.0.0.1:6379/0"),
            dlq_key=text("DLQ_KEY", "datastorage:dlq"),
            shutdown_propagation_delay=number(
                "SHUTDOWN_PROPAGATION_DELAY", float, 0.5, 0.0, 3600.0
            ),
            shutdown_timeout=number("SHUTDOWN_TIMEOUT", float, 10.0, 0.0, 3600.0),
            batch_max=number("BATCH_MAX", int, 100, 1, 10_000),
            page_default=page_default,
            page_max=page_max,
            dlq_drain_interval=number("DLQ_DRAIN_INTERVAL", float, 0.2, 0.01, 3600.0),
            dlq_error_delay=number("DLQ_ERROR_DELAY", float, 5.0, 0.01, 3600.0),
            db_timeout=number("DB_TIMEOUT", float, 2.0, 0.1, 600.0),
            db_pool_timeout=number("DB_POOL_TIMEOUT", float, 0.5, 0.05, 600.0),
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            max_body_bytes=number("MAX_BODY_BYTES", int, 16 * 1024 * 1024, 1024),
            debug_endpoints=debug_raw in _TRUE,
            log_level=log_level,
        )
        if problems:
            raise ConfigError(problems)
        return settings

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]
