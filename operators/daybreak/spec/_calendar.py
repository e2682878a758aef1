"""When a source's drop is expected: every day, weekdays, or an exchange's sessions, less holidays.

A feed that publishes nothing on weekends is not broken on Saturday: a day its calendar does not
expect runs nothing and is recorded as such, while a missing *expected* drop stays an error. The
calendar also says which days count when days are counted: look-back days before the data's first
day (``start``) are not "missing", and a row-count check compares expected days with expected days.

Exchange calendars come from ``exchange_calendars`` (the ``calendars`` extra), imported only when a
spec names an exchange; the name is checked when the spec is parsed.
"""

from __future__ import annotations

import functools
from datetime import date, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# How far back a search for expected days goes: ten years of days (as the spec's MAX_DAYS).
MAX_DAYS = 3660
_INSTALL = "pip install 'daybreak[calendars]'"


def _xcals() -> Any:
    try:
        import exchange_calendars
    except ImportError:
        raise ValueError(f"exchange calendars need the exchange_calendars package: {_INSTALL}") from None
    return exchange_calendars


@functools.lru_cache(maxsize=64)
def _sessions(code: str, year: int) -> frozenset[date]:
    """The sessions of exchange `code` in `year` (a year at a time: building a calendar costs about
    0.1 s, and exchange_calendars refuses dates outside the bounds it was built for)."""
    xcals = _xcals()
    try:
        cal = xcals.get_calendar(code, start=f"{year}-01-01", end=f"{year}-12-31")
    except Exception as e:  # out of the calendar's range, and similar
        raise ValueError(f"exchange calendar {code}: no sessions for {year} ({type(e).__name__}: {e})") from None
    return frozenset(ts.date() for ts in cal.sessions)


class CalendarSpec(BaseModel):
    """The days a source's drop is expected. YAML: a mapping, or the short forms ``daily``,
    ``weekdays`` and ``exchange:XNYS``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: Literal["daily", "weekdays"] = Field(
        "daily", description="daily: every day; weekdays: Monday to Friday (ignored with an exchange)")
    exchange: str | None = Field(
        None, description="an exchange_calendars code (XNYS, XLON, ...): the expected days are its sessions "
                          f"(needs {_INSTALL})")
    holidays: list[date] = Field(default_factory=list,
                                 description="days with no drop, although `days` or the exchange would expect one")
    start: date | None = Field(None, description="the first day the data has: no drop is expected before it, so "
                                                 "look-back days before it are not missing")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        text = v.strip()
        if text in ("daily", "weekdays"):
            return {"days": text}
        kind, sep, code = text.partition(":")
        if kind.strip() == "exchange" and sep:
            return {"exchange": code.strip()}
        raise ValueError(f"{v!r} is not a calendar: use daily, weekdays, exchange:<code> (e.g. exchange:XNYS) "
                         "or a mapping with days, exchange, holidays, start")

    @field_validator("exchange")
    @classmethod
    def _exchange_known(cls, v: str | None) -> str | None:
        if v is None:
            return v
        names = _xcals().get_calendar_names(include_aliases=True)
        if v not in names:
            close = sorted(n for n in names if n.upper().startswith(v[:2].upper()))[:8]
            raise ValueError(f"unknown exchange {v!r}" + (f" (did you mean one of {', '.join(close)}?)" if close
                                                          else "; exchange_calendars.get_calendar_names() lists them"))
        return v

    def describe(self) -> str:
        """The calendar in its short form (for messages)."""
        return f"exchange:{self.exchange}" if self.exchange else self.days

    def why_not(self, day: date) -> str | None:
        """Why no drop is expected on `day` (None when one is)."""
        if self.start is not None and day < self.start:
            return f"before the data's first day {self.start} (calendar.start)"
        if day in self.holidays:
            return f"a holiday in calendar.holidays; calendar: {self.describe()}"
        if self.exchange:
            if day not in _sessions(self.exchange, day.year):
                return f"not a {self.exchange} session; calendar: {self.describe()}"
        elif self.days == "weekdays" and day.weekday() >= 5:
            return f"calendar: {self.days}"
        return None

    def expects(self, day: date) -> bool:
        """Whether a drop is expected on `day`."""
        return self.why_not(day) is None

    def reason(self, day: date) -> str:
        """One line saying why `day` runs nothing: 'no drop expected on 2024-03-09 (Saturday;
        calendar: weekdays)'."""
        return f"no drop expected on {day} ({day:%A}; {self.why_not(day) or 'expected'})"

    def expected_days(self, first: date, last: date) -> list[date]:
        """The expected days from `first` to `last`, both included, oldest first."""
        if (last - first).days > MAX_DAYS:
            raise ValueError(f"{first}..{last} is longer than {MAX_DAYS} days")
        return [d for d in (first + timedelta(days=k) for k in range((last - first).days + 1)) if self.expects(d)]

    def expected_before(self, day: date, n: int) -> list[date]:
        """The `n` expected days strictly before `day`, oldest first; fewer when ``start`` is
        reached or no more are found within MAX_DAYS calendar days."""
        out: list[date] = []
        d = day
        for _ in range(MAX_DAYS):
            if len(out) >= n:
                break
            d -= timedelta(days=1)
            if self.start is not None and d < self.start:
                break
            if self.expects(d):
                out.append(d)
        return out[::-1]
