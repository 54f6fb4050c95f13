"""Which ``traceparent`` headers reach the logs: W3C Trace Context, version 00 exactly, later ones by prefix."""

from __future__ import annotations

import pytest

from server.logs import parse_traceparent

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN)),
        (f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN)),  # not sampled: still the caller's trace
        (f"01-{TRACE}-{SPAN}-01-future-field", (TRACE, SPAN)),  # a later version may add fields
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is forbidden
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # lowercase hex only
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("", None),
        (f"00-{TRACE}-{SPAN}-01\nforged", None),
    ],
)
def test_traceparent(header, expected):
    assert parse_traceparent(header) == expected
