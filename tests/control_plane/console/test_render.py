"""Rendering: every value is escaped text, control characters are made visible, nothing is evaluated."""

from __future__ import annotations

import datetime as dt

import jinja2
import pytest
from markupsafe import escape

from onprem.control_plane.console.render import ago, environment, shown, span
from tests.support.hostile_strings import CORPUS


def render(source: str, **context: object) -> str:
    return environment().from_string(source).render(**context)


@pytest.mark.parametrize("text", CORPUS)
def test_a_value_in_text_or_an_attribute_is_escaped(text: str) -> None:
    out = render('<span title="{{ v }}">{{ v }}</span>', v=text)
    assert out == f'<span title="{escape(shown(text))}">{escape(shown(text))}</span>'


def test_a_template_in_a_value_is_never_evaluated() -> None:
    assert render("{{ v }}", v="{{7*7}} {% if 1 %}x{% endif %}") == "{{7*7}} {% if 1 %}x{% endif %}"


def test_control_characters_are_shown_as_control_pictures() -> None:
    assert shown("a\r\nb\x00c\x1b[31m\x7f\x85") == "a\u240d\u240ab\u2400c\u241b[31m\u2421\ufffd"
    assert shown("tab\there") == "tab\u2409here"
    assert shown("\u202eRTL \u00e9 \U0001f4a3") == "\u202eRTL \u00e9 \U0001f4a3"  # not controls: kept


def test_the_templates_refuse_an_unknown_name_rather_than_print_nothing() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render("{{ missing }}")


def test_times_read_at_a_glance() -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert ago(None) == "never"
    assert ago(now - dt.timedelta(seconds=12), now) == "12 s ago"
    assert ago(now - dt.timedelta(minutes=5), now) == "5 min ago"
    assert ago(now + dt.timedelta(days=20, hours=3), now) == "in 20 d 3 h"
    assert span(dt.timedelta(hours=2, minutes=5)) == "2 h 5 min"
