"""GET /events: filters, time windows, pagination (offset and cursor), ordering, total."""

from __future__ import annotations

import random

import pytest
from _support import assert_problem, list_events, new_event, new_id, ts


@pytest.fixture
def seeded(api, cid):
    """Six events in this test's correlation id: 3 types, 2 actors, one minute apart."""
    specs = [
        ("user.login", "alice"),
        ("user.logout", "alice"),
        ("user.login", "bob"),
        ("order.created", "bob"),
        ("user.login", "alice"),
        ("order.created", "alice"),
    ]
    ids = []
    for minute, (event_type, actor) in enumerate(specs):
        body = new_event(cid, event_type=event_type, actor=actor, occurred_at=ts(minutes=minute))
        response = api.post("/events", json=body)
        assert response.status_code == 201
        ids.append(response.json()["id"])
    return ids


def test_filter_by_correlation_id_returns_only_that_correlation(api, cid, seeded):
    other = api.post("/events", json=new_event(cid + "-other")).json()
    page = list_events(api, correlation_id=cid)
    assert page["total"] == 6
    assert [item["id"] for item in page["items"]] == seeded
    assert other["id"] not in {item["id"] for item in page["items"]}


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [("user.login", [0, 2, 4]), ("order.created", [3, 5]), ("user.logout", [1]), ("nothing.here", [])],
)
def test_filter_by_event_type(api, cid, seeded, event_type, expected):
    page = list_events(api, correlation_id=cid, event_type=event_type)
    assert [item["id"] for item in page["items"]] == [seeded[i] for i in expected]
    assert page["total"] == len(expected)


@pytest.mark.parametrize(("actor", "expected"), [("alice", [0, 1, 4, 5]), ("bob", [2, 3]), ("carol", [])])
def test_filter_by_actor(api, cid, seeded, actor, expected):
    page = list_events(api, correlation_id=cid, actor=actor)
    assert [item["id"] for item in page["items"]] == [seeded[i] for i in expected]
    assert page["total"] == len(expected)


def test_filters_combine_with_and(api, cid, seeded):
    page = list_events(api, correlation_id=cid, event_type="user.login", actor="alice")
    assert [item["id"] for item in page["items"]] == [seeded[0], seeded[4]]


def test_since_is_inclusive(api, cid, seeded):
    page = list_events(api, correlation_id=cid, since=ts(minutes=2))
    assert [item["id"] for item in page["items"]] == seeded[2:]


def test_until_is_exclusive(api, cid, seeded):
    page = list_events(api, correlation_id=cid, until=ts(minutes=2))
    assert [item["id"] for item in page["items"]] == seeded[:2]


def test_since_and_until_window(api, cid, seeded):
    page = list_events(api, correlation_id=cid, since=ts(minutes=1), until=ts(minutes=4))
    assert [item["id"] for item in page["items"]] == seeded[1:4]
    assert page["total"] == 3


def test_empty_window_returns_no_items(api, cid, seeded):
    page = list_events(api, correlation_id=cid, since=ts(minutes=3), until=ts(minutes=3))
    assert page == {"items": [], "total": 0, "limit": 10, "offset": 0, "next_cursor": None}


def test_since_with_offset_timezone(api, cid, seeded):
    # 14:02+02:00 == 12:02Z
    page = list_events(api, correlation_id=cid, since="2024-05-01T14:02:00+02:00")
    assert [item["id"] for item in page["items"]] == seeded[2:]


def test_since_with_unencoded_plus_in_query_string(api, cid, seeded):
    # A raw '+' arrives as a space; the service accepts that form too.
    response = api.get(f"/events?correlation_id={cid}&since=2024-05-01T14:02:00+02:00")
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["items"]] == seeded[2:]


def test_unknown_correlation_returns_empty_page_with_zero_total(api, cid):
    page = list_events(api, correlation_id=cid)
    assert page["items"] == [] and page["total"] == 0 and page["next_cursor"] is None


def test_default_limit_is_page_default(api, cid, service_config):
    page_default = int(service_config["PAGE_DEFAULT"])
    api.post("/events/batch", json={"events": [new_event(cid) for _ in range(page_default + 2)]})
    page = list_events(api, correlation_id=cid)
    assert page["limit"] == page_default
    assert len(page["items"]) == page_default
    assert page["total"] == page_default + 2
    assert page["next_cursor"]


def test_limit_is_honoured_and_total_ignores_it(api, cid, seeded):
    page = list_events(api, correlation_id=cid, limit=2)
    assert [item["id"] for item in page["items"]] == seeded[:2]
    assert page["total"] == 6
    assert page["limit"] == 2


def test_limit_equal_to_page_max_is_accepted(api, cid, service_config):
    page = list_events(api, correlation_id=cid, limit=service_config["PAGE_MAX"])
    assert page["limit"] == int(service_config["PAGE_MAX"])


def test_limit_above_page_max_is_rejected(api, cid, service_config):
    response = api.get(
        "/events", params={"correlation_id": cid, "limit": int(service_config["PAGE_MAX"]) + 1}
    )
    assert_problem(response, 400, "validation-error", fields=["limit"])


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5", "", "9999999999"])
def test_invalid_limit_is_rejected(api, cid, limit):
    assert_problem(api.get("/events", params={"correlation_id": cid, "limit": limit}), 400, fields=["limit"])


@pytest.mark.parametrize("offset", ["-1", "x", "2.0", ""])
def test_invalid_offset_is_rejected(api, cid, offset):
    assert_problem(
        api.get("/events", params={"correlation_id": cid, "offset": offset}), 400, fields=["offset"]
    )


def test_offset_pages_are_contiguous(api, cid, seeded):
    first = list_events(api, correlation_id=cid, limit=4, offset=0)
    second = list_events(api, correlation_id=cid, limit=4, offset=4)
    assert [i["id"] for i in first["items"] + second["items"]] == seeded
    assert second["offset"] == 4
    assert second["next_cursor"] is None
    assert first["next_cursor"] is not None


def test_offset_exactly_at_end_is_empty(api, cid, seeded):
    page = list_events(api, correlation_id=cid, offset=6)
    assert page["items"] == [] and page["total"] == 6 and page["next_cursor"] is None


def test_offset_past_end_is_empty_but_total_is_kept(api, cid, seeded):
    page = list_events(api, correlation_id=cid, offset=1000)
    assert page["items"] == [] and page["total"] == 6


def test_last_full_page_has_no_next_cursor(api, cid, seeded):
    page = list_events(api, correlation_id=cid, limit=6)
    assert len(page["items"]) == 6 and page["next_cursor"] is None


def test_cursor_pagination_walks_every_event_once(api, cid, seeded):
    seen, cursor, pages = [], None, 0
    while True:
        params = {"correlation_id": cid, "limit": 4 if cursor is None else 2}
        if cursor:
            params["cursor"] = cursor
        page = list_events(api, **params)
        assert page["total"] == 6  # total counts the filters, not the cursor position
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == seeded and pages == 2


def test_cursor_is_stable_when_earlier_events_are_added(api, cid, seeded):
    page = list_events(api, correlation_id=cid, limit=3)
    api.post("/events", json=new_event(cid, occurred_at=ts(minutes=-10)))
    rest = list_events(api, correlation_id=cid, limit=10, cursor=page["next_cursor"])
    assert [item["id"] for item in rest["items"]] == seeded[3:]


def test_cursor_combined_with_filters(api, cid, seeded):
    page = list_events(api, correlation_id=cid, actor="alice", limit=2)
    rest = list_events(api, correlation_id=cid, actor="alice", limit=2, cursor=page["next_cursor"])
    assert [i["id"] for i in page["items"] + rest["items"]] == [seeded[i] for i in (0, 1, 4, 5)]
    assert rest["next_cursor"] is None


def test_cursor_with_offset_is_rejected(api, cid, seeded):
    cursor = list_events(api, correlation_id=cid, limit=2)["next_cursor"]
    response = api.get("/events", params={"correlation_id": cid, "cursor": cursor, "offset": 1})
    assert_problem(response, 400, fields=["cursor"])


@pytest.mark.parametrize("cursor", ["garbage", "!!!", "W10", "WyJub3QtYS1kYXRlIiwieCJd"])
def test_invalid_cursor_is_rejected(api, cid, cursor):
    assert_problem(
        api.get("/events", params={"correlation_id": cid, "cursor": cursor}), 400, fields=["cursor"]
    )


def test_ordering_is_by_occurred_at_not_insertion(api, cid):
    minutes = [5, 1, 4, 2, 3]
    ids = {}
    for minute in minutes:
        ids[minute] = api.post("/events", json=new_event(cid, occurred_at=ts(minutes=minute))).json()["id"]
    page = list_events(api, correlation_id=cid)
    assert [item["id"] for item in page["items"]] == [ids[m] for m in sorted(minutes)]


def test_ties_on_occurred_at_are_ordered_by_id(api, cid):
    ids = [new_id() for _ in range(8)]
    shuffled = random.sample(ids, len(ids))
    api.post("/events/batch", json={"events": [new_event(cid, id=i, occurred_at=ts()) for i in shuffled]})
    page = list_events(api, correlation_id=cid)
    assert [item["id"] for item in page["items"]] == sorted(ids)


def test_cursor_pagination_across_ties_is_stable(api, cid):
    ids = sorted(new_id() for _ in range(7))
    api.post("/events/batch", json={"events": [new_event(cid, id=i, occurred_at=ts()) for i in ids]})
    seen, cursor = [], None
    while True:
        params = {"correlation_id": cid, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = list_events(api, **params)
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids


def test_repeated_listing_is_deterministic(api, cid, seeded):
    pages = [list_events(api, correlation_id=cid, limit=3, offset=2) for _ in range(3)]
    assert pages[0] == pages[1] == pages[2]


def test_listing_without_filters_uses_time_window(api):
    # No correlation filter: bound it by a window only this test writes into.
    year = random.randint(1901, 1989)
    cid = f"unfiltered-{new_id()}"
    stamps = [f"{year}-0{m}-01T00:00:00Z" for m in (1, 2, 3)]
    ids = [api.post("/events", json=new_event(cid, occurred_at=s)).json()["id"] for s in stamps]
    page = list_events(api, since=f"{year}-01-01T00:00:00Z", until=f"{year + 1}-01-01T00:00:00Z")
    assert [item["id"] for item in page["items"]] == ids


@pytest.mark.parametrize("param", ["foo", "sort", "page"])
def test_unknown_query_parameter_is_rejected(api, cid, param):
    assert_problem(api.get("/events", params={"correlation_id": cid, param: "1"}), 400, fields=[param])


def test_repeated_query_parameter_is_rejected(api, cid):
    response = api.get("/events", params=[("correlation_id", cid), ("correlation_id", cid)])
    assert_problem(response, 400, fields=["correlation_id"])


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("value", ["yesterday", "2024-05-01", "2024-05-01T12:00:00", "2024-13-01T00:00:00Z"])
def test_invalid_time_bound_is_rejected(api, cid, name, value):
    assert_problem(api.get("/events", params={"correlation_id": cid, name: value}), 400, fields=[name])


@pytest.mark.parametrize(("name", "max_len"), [("correlation_id", 100), ("event_type", 100), ("actor", 200)])
def test_overlong_text_filter_is_rejected(api, name, max_len):
    assert_problem(api.get("/events", params={name: "x" * (max_len + 1)}), 400, fields=[name])


def test_empty_text_filter_is_rejected(api):
    assert_problem(api.get("/events", params={"actor": ""}), 400, fields=["actor"])


def test_all_query_problems_are_reported_at_once(api):
    response = api.get("/events", params={"limit": "0", "offset": "-1", "since": "x", "bogus": "1"})
    assert_problem(response, 400, fields=["limit", "offset", "since", "bogus"])
