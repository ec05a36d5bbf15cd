"""The longest wait between two firings of a cron expression: can a schedule hold an RPO?

Plain Python, cheap enough for spec load time: minutes of the day and days of
a two-month window are computed as sets, never minute by minute.
"""

from __future__ import annotations

from datetime import date, timedelta

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = {
    **{name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
    **{name: i + 1 for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])},
}


class CronError(ValueError):
    pass


def _field(text: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"bad step {step_text!r}")
            step = int(step_text)
        if part in ("*", ""):
            start, end = low, high
        elif "-" in part:
            first, last = part.split("-", 1)
            start, end = _value(first), _value(last)
        else:
            start = _value(part)
            end = high if step > 1 else start
        if not low <= start <= end <= high:
            raise CronError(f"{part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return values


def _value(text: str) -> int:
    if text.isdigit():
        return int(text)
    if text in _NAMES:
        return _NAMES[text]
    raise CronError(f"{text!r} is not a number")


def max_gap_minutes(expression: str) -> int:
    """The longest interval, in minutes, between consecutive firings of ``expression``."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(f"{expression!r} does not have 5 fields")
    minutes, hours, days, months, weekdays = (
        _field(text, low, high) for text, (low, high) in zip(fields, _RANGES, strict=True)
    )
    weekdays = {0 if day == 7 else day for day in weekdays}
    in_day = sorted(h * 60 + m for h in hours for m in minutes)
    any_day, any_weekday = fields[2] == "*", fields[4] == "*"
    start = date(2026, 1, 1)
    firing_days = []
    for offset in range(366 + 31):
        day = start + timedelta(days=offset)
        weekday = (day.weekday() + 1) % 7  # cron: 0 is Sunday
        dom_ok, dow_ok = day.day in days, weekday in weekdays
        matches = dom_ok and dow_ok if (any_day or any_weekday) else dom_ok or dow_ok
        if matches and day.month in months:
            firing_days.append(offset)
    if not firing_days or not in_day:
        raise CronError(f"{expression!r} never fires")
    gap = max((b - a for a, b in zip(in_day, in_day[1:])), default=0)
    first, last = in_day[0], in_day[-1]
    for previous, following in zip(firing_days, firing_days[1:]):
        gap = max(gap, (following - previous) * 1440 - last + first)
    return gap
