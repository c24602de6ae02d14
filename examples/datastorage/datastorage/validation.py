"""Request validation: event bodies, batches and list-query parameters.

Validators collect every problem they find (not just the first one) so a
client can fix a request in one go. Field names are JSON paths relative to
the request body (``actor``, ``events[3].actor``) or query parameter names.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datastorage.events import Event, parse_timestamp, parse_uuid

MAX_PAYLOAD_BYTES = 64 * 1024
EVENT_TYPE_MAX = 100
ACTOR_MAX = 200
CORRELATION_ID_MAX = 100
_EVENT_TYPE = re.compile(r"[a-z0-9_.:-]+")
EVENT_FIELDS = ("id", "event_type", "actor", "correlation_id", "occurred_at", "payload")
QUERY_PARAMS = (
    "correlation_id",
    "event_type",
    "actor",
    "since",
    "until",
    "limit",
    "offset",
    "cursor",
)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ValidationFailed(Exception):
    """The request is invalid; ``errors`` names the offending fields."""

    def __init__(
        self,
        errors: list[FieldError],
        *,
        status: int = 400,
        kind: str = "validation-error",
        title: str = "Request validation failed",
    ) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors
        self.status = status
        self.kind = kind
        self.title = title


@dataclass(frozen=True, slots=True)
class ListQuery:
    correlation_id: str | None
    event_type: str | None
    actor: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    offset: int
    after: tuple[datetime, uuid.UUID] | None


# --------------------------------------------------------------------------- bodies


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """Strict JSON parsing (no NaN/Infinity); raises ValidationFailed."""
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_parse_float)
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        # JSONDecodeError is a ValueError; so are int-size and constant errors.
        message = (
            f"is not valid JSON: {exc}" if raw.strip() else "is empty, a JSON document is required"
        )
        raise ValidationFailed(
            [FieldError("body", message)], kind="malformed-json", title="Malformed JSON body"
        ) from None


def _text(value: Any, field: str, errors: list[FieldError], max_len: int) -> str | None:
    if not isinstance(value, str):
        errors.append(FieldError(field, "must be a string"))
        return None
    if not value:
        errors.append(FieldError(field, "must not be empty"))
        return None
    if len(value) > max_len:
        errors.append(FieldError(field, f"must be at most {max_len} characters (got {len(value)})"))
        return None
    if "\x00" in value:
        errors.append(FieldError(field, "must not contain NUL characters"))
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.append(FieldError(field, "must be valid Unicode (no lone surrogates)"))
        return None
    return value


def _contains_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return True
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _payload(value: Any, field: str, errors: list[FieldError]) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        errors.append(FieldError(field, "must be a JSON object"))
        return None
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        errors.append(FieldError(field, "must be valid Unicode (no lone surrogates)"))
        return None
    if len(encoded) > MAX_PAYLOAD_BYTES:
        errors.append(
            FieldError(
                field,
                f"must be at most {MAX_PAYLOAD_BYTES} bytes as compact JSON (got {len(encoded)})",
            )
        )
        return None
    if b"\\u0000" in encoded and _contains_nul(value):
        errors.append(FieldError(field, "must not contain NUL characters (\\u0000)"))
        return None
    return value


def validate_event(data: Any, prefix: str, now: datetime) -> tuple[Event | None, list[FieldError]]:
    """Validate one event object. ``prefix`` is prepended to field names."""
    errors: list[FieldError] = []
    if not isinstance(data, dict):
        errors.append(FieldError(prefix.rstrip(".") or "body", "must be a JSON object"))
        return None, errors

    for key in data:
        if key not in EVENT_FIELDS:
            errors.append(FieldError(prefix + key, "unknown field"))

    for name in ("event_type", "actor", "correlation_id"):
        if data.get(name) is None:
            errors.append(FieldError(prefix + name, "is required"))
    event_type = actor = correlation_id = None
    if data.get("event_type") is not None:
        event_type = _text(data["event_type"], prefix + "event_type", errors, EVENT_TYPE_MAX)
        if event_type is not None and not _EVENT_TYPE.fullmatch(event_type):
            errors.append(
                FieldError(
                    prefix + "event_type", "may only contain a-z, 0-9, '_', '.', ':' and '-'"
                )
            )
            event_type = None
    if data.get("actor") is not None:
        actor = _text(data["actor"], prefix + "actor", errors, ACTOR_MAX)
    if data.get("correlation_id") is not None:
        correlation_id = _text(
            data["correlation_id"], prefix + "correlation_id", errors, CORRELATION_ID_MAX
        )

    occurred_at: datetime | None = now
    raw_occurred = data.get("occurred_at")
    if raw_occurred is not None:
        if not isinstance(raw_occurred, str):
            errors.append(
                FieldError(prefix + "occurred_at", "must be a string (RFC 3339 timestamp)")
            )
        else:
            try:
                occurred_at = parse_timestamp(raw_occurred)
            except ValueError as exc:
                errors.append(FieldError(prefix + "occurred_at", str(exc)))

    payload: dict[str, Any] | None = {}
    if data.get("payload") is not None:
        payload = _payload(data["payload"], prefix + "payload", errors)

    event_id: uuid.UUID | None = None
    raw_id = data.get("id")
    if raw_id is None:
        event_id = uuid.uuid4()
    elif not isinstance(raw_id, str):
        errors.append(FieldError(prefix + "id", "must be a string (UUID)"))
    else:
        try:
            event_id = parse_uuid(raw_id)
        except ValueError as exc:
            errors.append(FieldError(prefix + "id", str(exc)))

    if errors:
        return None, errors
    assert (
        event_id and event_type and actor and correlation_id and occurred_at and payload is not None
    )
    return (
        Event(
            id=event_id,
            event_type=event_type,
            actor=actor,
            correlation_id=correlation_id,
            occurred_at=occurred_at,
            payload=payload,
            received_at=now,
        ),
        errors,
    )


def validate_single(data: Any, now: datetime) -> Event:
    event, errors = validate_event(data, "", now)
    if event is None:
        raise ValidationFailed(errors)
    return event


def validate_batch(data: Any, batch_max: int, now: datetime) -> list[Event]:
    """Validate ``{"events": [...]}``; all-or-nothing."""
    if not isinstance(data, dict):
        raise ValidationFailed([FieldError("body", 'must be a JSON object like {"events": [...]}')])
    errors = [FieldError(key, "unknown field") for key in data if key != "events"]
    items = data.get("events")
    if items is None:
        errors.append(FieldError("events", "is required"))
    elif not isinstance(items, list):
        errors.append(FieldError("events", "must be an array of events"))
    elif not items:
        errors.append(FieldError("events", "must contain at least one event"))
    elif len(items) > batch_max:
        raise ValidationFailed(
            [FieldError("events", f"must contain at most {batch_max} events (got {len(items)})")],
            status=413,
            kind="batch-too-large",
            title="Batch too large",
        )
    if errors:
        raise ValidationFailed(errors)
    assert isinstance(items, list)

    events: list[Event] = []
    seen: dict[uuid.UUID, int] = {}
    for index, item in enumerate(items):
        prefix = f"events[{index}]."
        event, item_errors = validate_event(item, prefix, now)
        errors.extend(item_errors)
        if event is not None:
            first = seen.setdefault(event.id, index)
            if first != index:
                errors.append(FieldError(prefix + "id", f"duplicates the id of events[{first}]"))
            events.append(event)
    if errors:
        raise ValidationFailed(errors)
    return events


# --------------------------------------------------------------------------- queries


def encode_cursor(occurred_at: datetime, event_id: uuid.UUID) -> str:
    raw = json.dumps([occurred_at.isoformat(), str(event_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        occurred, event_id = json.loads(raw)
        parsed = datetime.fromisoformat(occurred)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(event_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError("is not a valid cursor (use next_cursor from a previous page)") from exc


def _query_timestamp(value: str) -> datetime:
    # A "+" in an unencoded query string arrives as a space: "...T12:00:00 02:00".
    if re.fullmatch(r".*[0-9] [0-9]{2}:[0-9]{2}", value):
        value = value[:-6] + "+" + value[-5:]
    return parse_timestamp(value)


def _int_param(
    name: str, raw: str, low: int, high: int | None, errors: list[FieldError]
) -> int | None:
    if not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        errors.append(FieldError(name, f"must be an integer {bound}"))
        return None
    value = int(raw)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        errors.append(FieldError(name, f"must be {bound} (got {value})"))
        return None
    return value


def parse_list_query(
    items: Iterable[tuple[str, str]], page_default: int, page_max: int
) -> ListQuery:
    """Validate the query string of ``GET /events``."""
    errors: list[FieldError] = []
    values: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_PARAMS:
            errors.append(FieldError(key, "unknown query parameter"))
        elif key in values:
            errors.append(FieldError(key, "must be given at most once"))
        else:
            values[key] = value

    texts: dict[str, str | None] = {}
    for name, max_len in (
        ("correlation_id", CORRELATION_ID_MAX),
        ("event_type", EVENT_TYPE_MAX),
        ("actor", ACTOR_MAX),
    ):
        raw = values.get(name)
        texts[name] = None if raw is None else _text(raw, name, errors, max_len)

    stamps: dict[str, datetime | None] = {"since": None, "until": None}
    for name in stamps:
        raw = values.get(name)
        if raw is not None:
            try:
                stamps[name] = _query_timestamp(raw)
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))

    limit: int | None = page_default
    if "limit" in values:
        limit = _int_param("limit", values["limit"], 1, page_max, errors)
    offset: int | None = 0
    if "offset" in values:
        offset = _int_param("offset", values["offset"], 0, None, errors)

    after: tuple[datetime, uuid.UUID] | None = None
    if "cursor" in values:
        if "offset" in values:
            errors.append(FieldError("cursor", "cannot be combined with offset"))
        try:
            after = decode_cursor(values["cursor"])
        except ValueError as exc:
            errors.append(FieldError("cursor", str(exc)))

    if errors:
        raise ValidationFailed(errors, title="Invalid query parameters")
    assert limit is not None and offset is not None
    return ListQuery(
        correlation_id=texts["correlation_id"],
        event_type=texts["event_type"],
        actor=texts["actor"],
        since=stamps["since"],
        until=stamps["until"],
        limit=limit,
        offset=offset,
        after=after,
    )
