"""The longest wait between two firings of a cron expression (can a schedule hold an RPO?)."""

import pytest

from ops_platform.cron import CronError, max_gap_minutes


@pytest.mark.parametrize(("expression", "gap"), [
    ("* * * * *", 1),
    ("*/15 * * * *", 15),
    ("10,40 * * * *", 30),
    ("0 * * * *", 60),
    ("0 */6 * * *", 360),
    ("0 2 * * *", 1440),
    ("0 4 * * 0", 7 * 1440),
    ("0 4 * * 7", 7 * 1440),  # 7 is Sunday too
    ("0 9 * * mon-fri", 3 * 1440),  # Friday 09:00 to Monday 09:00
    ("30 9-17 * * 1-5", 3 * 1440 - 8 * 60),  # Friday 17:30 to Monday 09:30
    ("0 0 1 * *", 31 * 1440),
])
def test_max_gap(expression, gap):
    assert max_gap_minutes(expression) == gap


@pytest.mark.parametrize(("expression", "message"), [
    ("0 2 * *", "5 fields"),
    ("61 * * * *", "outside 0-59"),
    ("*/0 * * * *", "bad step"),
    ("0 0 30 2 *", "never fires"),
    ("x * * * *", "not a number"),
])
def test_bad_expressions_are_named(expression, message):
    with pytest.raises(CronError, match=message):
        max_gap_minutes(expression)
