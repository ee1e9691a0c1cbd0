"""The activity charts: requests and errors per minute over the last hour, one small bar chart per group.

Drawn on the server as inline SVG (the template places the bars computed here), so that they need no
script, no inline style and no library, and print as they look.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from onprem.control_plane.store import ActivityMinute

#: Minutes shown, the last one being the current (still filling) minute.
MINUTES = 60
WIDTH, HEIGHT = 360, 80
#: Room at the bottom for the time axis.
AXIS = 14


@dataclass(frozen=True)
class Bar:
    minute: dt.datetime
    requests: int
    errors: int
    x: float
    width: float
    #: The requests bar, from `y` down to the axis; the errors bar, on top of it from the axis up.
    y: float
    height: float
    error_y: float
    error_height: float


@dataclass(frozen=True)
class Chart:
    group: str
    bars: list[Bar]
    #: The largest number of requests in one minute (the chart's scale), at least 1.
    peak: int
    requests: int
    errors: int
    first_minute: dt.datetime
    last_minute: dt.datetime
    width: int = WIDTH
    height: int = HEIGHT
    plot_height: int = HEIGHT - AXIS


def window_start(now: dt.datetime) -> dt.datetime:
    """The first minute the charts show."""
    return now.astimezone(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=MINUTES - 1)


def charts(activity: Iterable[ActivityMinute], groups: Iterable[str], now: dt.datetime) -> list[Chart]:
    """One chart per group (in the order given), a bar for each of the last `MINUTES` minutes."""
    first = window_start(now)
    minutes = [first + dt.timedelta(minutes=i) for i in range(MINUTES)]
    counts: dict[tuple[str, dt.datetime], ActivityMinute] = {(a.group_name, a.minute): a for a in activity}
    result = []
    for group in groups:
        cells = [counts.get((group, m)) for m in minutes]
        requests = [c.requests if c else 0 for c in cells]
        errors = [c.errors if c else 0 for c in cells]
        peak = max([1, *requests])
        plot = HEIGHT - AXIS
        slot = WIDTH / MINUTES
        bars = []
        for i, minute in enumerate(minutes):
            height = plot * requests[i] / peak
            error_height = plot * errors[i] / peak
            bars.append(Bar(minute=minute, requests=requests[i], errors=errors[i], x=round(i * slot + 0.5, 2),
                            width=round(slot - 1, 2), y=round(plot - height, 2), height=round(height, 2),
                            error_y=round(plot - error_height, 2), error_height=round(error_height, 2)))
        result.append(Chart(group=group, bars=bars, peak=peak, requests=sum(requests), errors=sum(errors),
                            first_minute=minutes[0], last_minute=minutes[-1]))
    return result
