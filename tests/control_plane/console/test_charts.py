"""The activity charts: the last hour, one bar a minute, scaled to the busiest minute."""

from __future__ import annotations

import datetime as dt

from onprem.control_plane.console.charts import HEIGHT, MINUTES, charts, window_start
from onprem.control_plane.store import ActivityMinute

NOW = dt.datetime(2030, 1, 2, 12, 30, 40, tzinfo=dt.UTC)


def test_the_window_is_the_last_sixty_minutes_the_current_one_included() -> None:
    assert window_start(NOW) == dt.datetime(2030, 1, 2, 11, 31, tzinfo=dt.UTC)


def test_each_group_gets_sixty_bars_scaled_to_its_busiest_minute() -> None:
    this_minute = dt.datetime(2030, 1, 2, 12, 30, tzinfo=dt.UTC)
    activity = [ActivityMinute("plant", this_minute, 10, 5),
                ActivityMinute("plant", this_minute - dt.timedelta(minutes=59), 5, 0),
                ActivityMinute("plant", this_minute - dt.timedelta(minutes=60), 99, 99),  # before the window
                ActivityMinute("office", this_minute, 1, 0)]
    [plant, quiet] = charts(activity, ["plant", "quiet"], NOW)
    assert (plant.group, plant.requests, plant.errors, plant.peak) == ("plant", 15, 5, 10)
    assert len(plant.bars) == MINUTES
    first, last = plant.bars[0], plant.bars[-1]
    plot = HEIGHT - 14
    assert (first.minute, first.requests, first.height, first.y) == (this_minute - dt.timedelta(minutes=59), 5,
                                                                      plot / 2, plot / 2)
    assert (last.minute, last.requests, last.errors, last.height, last.error_height) == (this_minute, 10, 5, plot,
                                                                                         plot / 2)
    assert (quiet.requests, quiet.peak, {b.height for b in quiet.bars}) == (0, 1, {0.0})
