"""`GET /v1/jobs/{id}/result`'s conditional and partial answers (service/backend.py), against RFC
9110: a Range the server does not serve (several ranges, another unit, first past last) is
ignored and the whole file sent; only a range starting at or past the end is 416; If-None-Match
takes `*`, lists and weak tags."""
from __future__ import annotations

import pytest

from service.backend import byte_range, none_match


@pytest.mark.parametrize("header,expected", [
    ("bytes=100-199", (100, 200)),
    ("bytes=0-", (0, 1000)),
    ("bytes=-50", (950, 1000)),
    ("bytes=-5000", (0, 1000)),
    ("bytes=990-5000", (990, 1000)),
    ("bytes= 0-5", (0, 6)),       # optional whitespace of a list element
    ("Bytes=0-5", (0, 6)),        # the unit is case-insensitive
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=" + "9" * 4400 + "-", "unsatisfiable"),  # past int64 (and past Python's int() digit limit)
    ("bytes=-0", "unsatisfiable"),
    ("bytes=0-1,5-9", None),      # several ranges: answered whole (a server may)
    ("items=0-5", None),          # another unit: ignored
    ("bytes=5-2", None),          # not a valid range: ignored
    ("bytes=-", None),
    ("bytes=a-b", None),
    ("bytes=²-3", None),          # digits are ASCII digits
])
def test_a_range_is_served_ignored_or_unsatisfiable_as_rfc_9110_says(header, expected):
    assert byte_range(header, 1000) == expected


def test_if_none_match_takes_a_star_lists_and_weak_tags():
    etag = '"job-10-20"'
    assert none_match(etag, etag) and none_match("*", etag)
    assert none_match(f'"other", {etag}', etag) and none_match(f"W/{etag}", etag)
    assert not none_match('"other"', etag) and not none_match(None, etag) and not none_match("", etag)
