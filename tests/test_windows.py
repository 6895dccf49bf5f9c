"""Time windows: parsing, open/closed, next opening and closing, across midnight and DST."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from pacsfetch.config import ConfigError, parse_config
from pacsfetch.windows import Schedule, parse_window

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone)


def test_weeknights_and_weekends() -> None:
    schedule = Schedule(["Mon-Fri 19:00-07:00", "Sat-Sun 00:00-24:00"], "Europe/Berlin")
    # 2026-11-23 is a Monday.
    assert not schedule.is_open(at("2026-11-23T12:00"))
    assert schedule.is_open(at("2026-11-23T19:00"))
    assert schedule.is_open(at("2026-11-24T06:59"))  # Monday's window, Tuesday morning
    assert not schedule.is_open(at("2026-11-24T07:00"))
    assert schedule.is_open(at("2026-11-28T13:00"))  # Saturday
    assert not schedule.is_open(at("2026-11-30T06:00"))  # Sunday's ended at 24:00
    assert schedule.next_opening(at("2026-11-23T12:00")) == at("2026-11-23T19:00")
    assert schedule.next_opening(at("2026-11-23T20:00")) is None  # open now
    # Friday 19:00 runs into Saturday; Saturday and Sunday chain on until Monday 00:00.
    assert schedule.closes_at(at("2026-11-27T20:00")) == at("2026-11-30T00:00")


def test_answers_in_any_zone_for_the_sources_zone() -> None:
    schedule = Schedule(["daily 22:00-02:00"], "Europe/Berlin")
    utc_evening = datetime(2026, 11, 23, 21, 30, tzinfo=UTC)  # 22:30 in Berlin (CET)
    assert schedule.is_open(utc_evening)
    assert not schedule.is_open(datetime(2026, 11, 23, 20, 30, tzinfo=UTC))


def test_wall_clock_hours_hold_across_daylight_saving() -> None:
    schedule = Schedule(["daily 01:00-04:00"], "Europe/Berlin")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Berlin; the window still ends at 04:00.
    assert schedule.is_open(at("2026-03-29T03:30"))
    assert not schedule.is_open(at("2026-03-29T04:00"))
    assert schedule.next_opening(at("2026-03-29T12:00")) == at("2026-03-30T01:00")


def test_day_lists_and_week_wrap() -> None:
    assert parse_window("Mon,Wed,Fri 12:00-13:00").days == {0, 2, 4}
    assert parse_window("Fri-Mon 20:00-06:00").days == {4, 5, 6, 0}
    assert parse_window("saturday 00:00-24:00").days == {5}
    assert Schedule([]).always_open


@pytest.mark.parametrize(("line", "says"), [
    ("Mon-Fri 19:00", "expected DAYS HH:MM-HH:MM"),
    ("Moon 19:00-20:00", "unknown day 'Moon'"),
    ("Mon 25:00-26:00", "25:00 is not a time of day"),
    ("Mon 10:00-10:00", "start and end are the same"),
    ("Mon 24:00-10:00", "24:00 is not a time of day"),
])
def test_bad_windows_are_refused_naming_the_key(line: str, says: str) -> None:
    data = {"sources": {"pacs": {"ae_title": "PACS", "host": "pacs", "port": 104,
                                 "windows": ["Sat-Sun 00:00-24:00", line]}}}
    with pytest.raises(ConfigError, match=r"sources\.pacs\.windows\[1\]") as caught:
        parse_config(data)
    assert says in str(caught.value)


def test_unknown_timezone_is_refused_naming_the_key() -> None:
    data = {"sources": {"pacs": {"ae_title": "PACS", "host": "pacs", "port": 104,
                                 "timezone": "Europe/Atlantis"}}}
    with pytest.raises(ConfigError, match=r"sources\.pacs\.timezone: .*unknown time zone"):
        parse_config(data)
