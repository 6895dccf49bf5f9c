"""Time windows in which bulk work (a migration) may open associations to a PACS.

A production archive serves people by day; a migration should run at night and at
weekends. A source's ``windows`` list such lines, read in the source's ``timezone``::

    "Mon-Fri 19:00-07:00"     # starts Monday to Friday at 19:00, ends the next day at 07:00
    "Sat-Sun 00:00-24:00"     # the whole of Saturday and Sunday
    "daily 22:00-05:30"
    "Mon,Wed,Fri 12:00-13:00"

A window whose end is not after its start runs past midnight into the next day. An empty
list means always open. Times are wall-clock times of the zone, so a window keeps its hours
across daylight-saving changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_LINE = re.compile(r"(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})")
_MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class Window:
    """One line: the weekdays it starts on (0 = Monday) and its start and end minute."""

    days: frozenset[int]
    start: int
    end: int
    """Minutes after midnight; ``end <= start`` means the window ends the next day."""

    @property
    def overnight(self) -> bool:
        return self.end <= self.start


def _day(name: str, text: str) -> int:
    key = name.lower()
    for names in (DAYS, _FULL_DAYS):
        if key in names:
            return names.index(key)
    raise ValueError(f"{text!r}: unknown day {name!r} (use Mon, Tue, ... Sun)")


def _days(spec: str, text: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        first, sep, last = part.partition("-")
        a = _day(first, text)
        if not sep:
            days.add(a)
            continue
        b = _day(last, text)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps the week
    return frozenset(days)


def _minute(value: str, text: str, *, end: bool) -> int:
    hours, minutes = (int(v) for v in value.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"{text!r}: {value} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def parse_window(text: str) -> Window:
    """Parse one line such as ``"Mon-Fri 19:00-07:00"``; ``ValueError`` says what is wrong."""
    match = _LINE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: expected DAYS HH:MM-HH:MM, e.g. 'Mon-Fri 19:00-07:00'")
    start = _minute(match["start"], text, end=False)
    end = _minute(match["end"], text, end=True)
    if start == end % _MINUTES_PER_DAY and end != _MINUTES_PER_DAY:
        raise ValueError(f"{text!r}: start and end are the same time (use 00:00-24:00 "
                         "for a whole day)")
    return Window(_days(match["days"], text), start, end)


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as "
                         "'Europe/Berlin' or 'UTC')") from None
    return name


class Schedule:
    """The windows of one source; :meth:`is_open` and :meth:`next_opening` answer in UTC."""

    def __init__(self, lines: Iterable[str], timezone: str = "UTC") -> None:
        self.windows = tuple(parse_window(line) for line in lines)
        self.zone = ZoneInfo(timezone)

    @property
    def always_open(self) -> bool:
        return not self.windows

    def _intervals(self, day: date) -> Iterable[tuple[datetime, datetime]]:
        """Every window interval that starts on *day* (local), as aware datetimes."""
        midnight = datetime.combine(day, time(), self.zone)
        for window in self.windows:
            if day.weekday() in window.days:
                end_day = 1 if window.overnight else 0
                start = _local(midnight, 0, window.start, self.zone)
                end = _local(midnight, end_day, window.end, self.zone)
                yield start, end

    def is_open(self, at: datetime) -> bool:
        if self.always_open:
            return True
        local_day = at.astimezone(self.zone).date()
        for day in (local_day - timedelta(days=1), local_day):
            for start, end in self._intervals(day):
                if start <= at < end:
                    return True
        return False

    def next_opening(self, at: datetime) -> datetime | None:
        """When a closed schedule opens next (None when it is open now or always open)."""
        if self.is_open(at):
            return None
        local_day = at.astimezone(self.zone).date()
        starts = [start for offset in range(8)
                  for start, _ in self._intervals(local_day + timedelta(days=offset))
                  if start > at]
        return min(starts) if starts else None

    def closes_at(self, at: datetime) -> datetime | None:
        """When an open schedule closes next (None when closed, or never closes)."""
        if self.always_open or not self.is_open(at):
            return None
        probe = at
        for _ in range(16):  # adjacent windows chain; a week of them at most
            local_day = probe.astimezone(self.zone).date()
            ends = [end for offset in (-1, 0)
                    for start, end in self._intervals(local_day + timedelta(days=offset))
                    if start <= probe < end]
            if not ends:
                return probe
            probe = max(ends)
        return None  # open around the clock


def _local(midnight: datetime, days: int, minutes: int, zone: ZoneInfo) -> datetime:
    """Wall-clock *minutes* after local midnight, *days* later, in *zone* (24:00 allowed)."""
    day = midnight.date() + timedelta(days=days + minutes // _MINUTES_PER_DAY)
    minutes %= _MINUTES_PER_DAY
    return datetime.combine(day, time(minutes // 60, minutes % 60), zone)
