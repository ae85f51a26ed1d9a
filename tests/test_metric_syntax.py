"""Tests for the `@key=value` metric syntax (cq_prefect.metric_syntax), following the DESIGN.md contract."""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cq_prefect.metric_syntax import (
    LOG_LINE_LIMIT_BYTES,
    MAX_KEY_LENGTH,
    PARSE_LIMIT_CHARS,
    BadToken,
    MetricParser,
    MetricPoint,
    iter_points,
    scan_tokens,
    split_lines,
    summarize,
)

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
MIB = 1024 * 1024


def make_parser() -> MetricParser:
    return MetricParser(clock=lambda: 1.5)


def points_of(line: str, parser: MetricParser | None = None) -> list[tuple[str, float, int]]:
    parser = parser or make_parser()
    return [(p.key, p.value, p.step) for p in parser.parse(line).points]


# --- basic tokens and values -------------------------------------------------------------------


def test_docstring_example():
    parser = make_parser()
    assert points_of("epoch 3 @step=3 @loss=0.25 @mpjpe=24.3mm", parser) == [("loss", 0.25, 3), ("mpjpe", 24.3, 3)]
    assert parser.units == {"mpjpe": "mm"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0.0),
        ("42", 42.0),
        ("-0.3", -0.3),
        (".5", 0.5),
        ("-.5", -0.5),
        ("+2", 2.0),
        ("1e-4", 1e-4),
        ("1E3", 1000.0),
        ("-1.5e+2", -150.0),
        ("2.5E-3", 2.5e-3),
    ],
)
def test_numeric_values(raw, expected):
    result = make_parser().parse(f"@loss={raw}")
    assert [(p.key, p.value, p.step) for p in result.points] == [("loss", pytest.approx(expected), 0)]
    assert isinstance(result.points[0].value, float)
    assert result.new_bad_tokens == []
    assert result.new_units == {}


@pytest.mark.parametrize("raw", ["nan", "NaN", "NAN", "nAn", "+nan", "-nan"])
def test_nan_any_case(raw):
    [point] = make_parser().parse(f"@loss={raw}").points
    assert math.isnan(point.value)


@pytest.mark.parametrize(
    ("raw", "sign"),
    [("inf", 1), ("Inf", 1), ("INF", 1), ("+inf", 1), ("+INF", 1), ("-inf", -1), ("-INF", -1), ("-Inf", -1)],
)
def test_inf_any_case(raw, sign):
    [point] = make_parser().parse(f"@loss={raw}").points
    assert math.isinf(point.value)
    assert math.copysign(1.0, point.value) == sign


def test_timestamp_from_clock_or_argument():
    parser = make_parser()
    assert parser.parse("@a=1").points[0].timestamp_ms == 1500
    assert parser.parse("@a=2", timestamp_ms=777).points[0].timestamp_ms == 777
    assert parser.parse_text("@a=3\n@b=4", timestamp_ms=9).points[1].timestamp_ms == 9


# --- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "value", "unit"),
    [
        ("@mpjpe=24.3mm", "mpjpe", 24.3, "mm"),
        ("@acc=95%", "acc", 95.0, "%"),
        ("@t=-1.5e2ms", "t", -150.0, "ms"),
        ("@size=3GB", "size", 3.0, "GB"),
    ],
)
def test_unit_dropped_from_value_and_reported(line, key, value, unit):
    parser = make_parser()
    result = parser.parse(line)
    assert [(p.key, p.value) for p in result.points] == [(key, pytest.approx(value))]
    assert result.new_units == {key: unit}
    assert parser.units == {key: unit}


def test_unit_reported_once_per_key_first_unit_kept():
    parser = make_parser()
    first = parser.parse("@mpjpe=24.3mm @acc=95%")
    assert first.new_units == {"mpjpe": "mm", "acc": "%"}
    second = parser.parse("@mpjpe=20.0mm")
    assert second.new_units == {}
    third = parser.parse("@mpjpe=2.1cm")  # a different unit later: the first one is kept
    assert third.new_units == {}
    assert [p.value for p in third.points] == [2.1]
    fourth = parser.parse("@mpjpe=1")  # no unit: nothing changes
    assert fourth.new_units == {}
    assert parser.units == {"mpjpe": "mm", "acc": "%"}


def test_key_without_unit_has_no_unit():
    parser = make_parser()
    assert parser.parse("@loss=0.5").new_units == {}
    assert parser.units == {}


# --- token boundaries --------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["", " ", "\t", "epoch 3 ", "(", "[", "{", ",", ";", "x (", "a,"])
def test_valid_token_start(before):
    assert points_of(f"{before}@loss=1.5") == [("loss", 1.5, 0)]


@pytest.mark.parametrize("after", ["", " ", "\t", ",", ";", ")", "]", "}", " tail", ", next", "))"])
def test_valid_token_end(after):
    assert points_of(f"@loss=1.5{after}") == [("loss", 1.5, 0)]


@pytest.mark.parametrize(
    "line",
    ["(@acc=95%)", "[@acc=95%]", "{@acc=95%}", "x,@acc=95%,y", "x;@acc=95%;y", "metrics: (@acc=95%, @loss=1)"],
)
def test_token_inside_brackets_and_separators(line):
    assert points_of(line)[0] == ("acc", 95.0, 0)


@pytest.mark.parametrize("before", ["x", "user", "a.b", ":", "/", "=", ")", "]", "}", "-", "\ufffd"])
def test_not_a_token_start(before):
    result = make_parser().parse(f"{before}@loss=1")
    assert result.points == []
    assert result.new_bad_tokens == []  # not at a token boundary: not even a bad token


@pytest.mark.parametrize("after", [":", "(", "#", "/", "@b=2", "=", "!", "'"])
def test_not_a_token_end(after):
    parser = make_parser()
    result = parser.parse(f"@loss=1{after}")
    assert result.points == []
    assert [bad.key for bad in result.new_bad_tokens] == ["loss"]


# --- negatives and bad tokens ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "bad_key"),
    [
        ("user@host=5", None),
        ("a@b.com", None),
        ("http://x@y/", None),
        ("mail user@host=5 or a@b.com", None),
        ("@loss", None),
        ("an @ sign", None),
        ("@v=1.2.3", "v"),
        ("@lr=abc", "lr"),
        ("@=3", ""),
        ("@@x=1", "@x"),
        ("@lr=", "lr"),
        ("@9a=1", "9a"),
        ("@-a=1", "-a"),
        ("@a+b=1", "a+b"),
        ("@loss==1", "loss"),
    ],
)
def test_negatives_yield_no_point(line, bad_key):
    parser = make_parser()
    result = parser.parse(line)
    assert result.points == []
    if bad_key is None:
        assert result.new_bad_tokens == []
        assert parser.bad_token_counts == {}
    else:
        assert len(result.new_bad_tokens) == 1
        assert result.new_bad_tokens[0].key == bad_key
        assert result.new_bad_tokens[0].text == line.split()[0]
        assert parser.bad_token_counts == {bad_key: 1}


def test_bad_token_reported_once_per_key_but_counted_each_time():
    parser = make_parser()
    first = parser.parse("@lr=abc")
    assert first.new_bad_tokens == [BadToken("lr", "@lr=abc")]
    second = parser.parse("@lr=xyz @v=1.2.3")
    assert second.new_bad_tokens == [BadToken("v", "@v=1.2.3")]  # lr already reported
    third = parser.parse("@lr=abc @v=1.2.3 @lr=q")
    assert third.new_bad_tokens == []
    assert parser.bad_token_counts == {"lr": 4, "v": 2}


def test_bad_token_does_not_spoil_good_tokens_on_the_line():
    parser = make_parser()
    result = parser.parse("@lr=abc @loss=0.5 @v=1.2.3 @acc=95%")
    assert [(p.key, p.value) for p in result.points] == [("loss", 0.5), ("acc", 95.0)]
    assert [b.key for b in result.new_bad_tokens] == ["lr", "v"]


def test_bad_token_does_not_advance_step_counter():
    parser = make_parser()
    parser.parse("@loss=abc")
    assert points_of("@loss=1", parser) == [("loss", 1.0, 0)]


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["val/loss", "train.acc", "a-b", "_x", "A9", "x__y", "a.b/c-d_e", "L"])
def test_valid_keys(key):
    assert points_of(f"@{key}=1") == [(key, 1.0, 0)]


def test_key_length_limit():
    ok = "k" * MAX_KEY_LENGTH
    too_long = "k" * (MAX_KEY_LENGTH + 1)
    assert MAX_KEY_LENGTH == 250
    assert points_of(f"@{ok}=1") == [(ok, 1.0, 0)]
    parser = make_parser()
    result = parser.parse(f"@{too_long}=1")
    assert result.points == []
    assert [b.key for b in result.new_bad_tokens] == [too_long]
    assert parser.bad_token_counts == {too_long: 1}


# --- many tokens per line, repeated keys -------------------------------------------------------


def test_several_tokens_per_line_in_order():
    parser = make_parser()
    assert points_of("epoch 1: @loss=0.5 @acc=0.9, @lr=1e-3; @val/loss=0.7", parser) == [
        ("loss", 0.5, 0),
        ("acc", 0.9, 0),
        ("lr", 1e-3, 0),
        ("val/loss", 0.7, 0),
    ]
    assert points_of("@loss=0.4 @acc=0.95", parser) == [("loss", 0.4, 1), ("acc", 0.95, 1)]


def test_repeated_key_on_one_line_last_value_wins():
    parser = make_parser()
    result = parser.parse("@loss=1 @acc=0.5 @loss=2 @loss=3")
    assert sorted((p.key, p.value, p.step) for p in result.points) == [("acc", 0.5, 0), ("loss", 3.0, 0)]
    # the repeated key counted one step, not three
    assert points_of("@loss=4", parser) == [("loss", 4.0, 1)]


def test_repeated_key_with_units_last_value_wins():
    parser = make_parser()
    result = parser.parse("@d=1mm @d=2mm")
    assert [(p.key, p.value) for p in result.points] == [("d", 2.0)]
    assert result.new_units == {"d": "mm"}


# --- steps -------------------------------------------------------------------------------------


def test_auto_step_counts_per_key():
    parser = make_parser()
    assert points_of("@loss=1", parser) == [("loss", 1.0, 0)]
    assert points_of("@loss=2", parser) == [("loss", 2.0, 1)]
    assert points_of("@acc=0.1", parser) == [("acc", 0.1, 0)]
    assert points_of("@loss=3 @acc=0.2", parser) == [("loss", 3.0, 2), ("acc", 0.2, 1)]


@pytest.mark.parametrize(
    "line", ["@step=7 @loss=0.25 @acc=0.9", "@loss=0.25 @step=7 @acc=0.9", "@loss=0.25 @acc=0.9 @step=7"]
)
def test_step_sets_step_of_other_metrics_on_its_line(line):
    result = make_parser().parse(line)
    assert [(p.key, p.value, p.step) for p in result.points] == [("loss", 0.25, 7), ("acc", 0.9, 7)]
    assert all(p.key != "step" for p in result.points)


def test_step_alone_yields_nothing():
    parser = make_parser()
    result = parser.parse("@step=5")
    assert result.points == [] and result.new_bad_tokens == []
    assert points_of("@loss=1", parser) == [("loss", 1.0, 0)]  # did not touch loss's counter


def test_step_does_not_leak_to_next_line():
    parser = make_parser()
    assert points_of("@step=5 @loss=1", parser) == [("loss", 1.0, 5)]
    assert points_of("@acc=1", parser) == [("acc", 1.0, 0)]


@pytest.mark.parametrize(("raw", "step"), [("0", 0), ("12", 12), ("+3", 3), ("007", 7)])
def test_integer_steps(raw, step):
    assert points_of(f"@step={raw} @loss=1") == [("loss", 1.0, step)]


@pytest.mark.parametrize("raw", ["1.5", "abc", "", "1e3", "nan", "inf", "3mm"])
def test_non_integer_step_is_bad_token(raw):
    parser = make_parser()
    result = parser.parse(f"@step={raw} @loss=1")
    assert [b.key for b in result.new_bad_tokens] == ["step"]
    assert parser.bad_token_counts == {"step": 1}
    # the bad step is ignored: loss uses its own counter
    assert [(p.key, p.step) for p in result.points] == [("loss", 0)]


def test_auto_step_continues_after_explicit_step():
    parser = make_parser()
    assert points_of("@loss=1", parser) == [("loss", 1.0, 0)]
    assert points_of("@step=10 @loss=2", parser) == [("loss", 2.0, 10)]
    assert points_of("@loss=3", parser) == [("loss", 3.0, 11)]
    assert points_of("@loss=4", parser) == [("loss", 4.0, 12)]
    # a lower explicit step later does not move the counter back
    assert points_of("@step=2 @loss=5", parser) == [("loss", 5.0, 2)]
    assert points_of("@loss=6", parser) == [("loss", 6.0, 13)]


# --- lines, \r segments, streams ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("a\rb\r\nc\nd", ["a", "b", "c", "d"]),
        ("one", ["one"]),
        ("a\nb", ["a", "b"]),
        ("a\r\nb", ["a", "b"]),
        ("a\r\rb", ["a", "", "b"]),
        ("a\n", ["a", ""]),
    ],
)
def test_split_lines(text, lines):
    assert split_lines(text) == lines


def test_progress_bar_segments_are_lines():
    parser = make_parser()
    result = parser.parse_text("train 10% @p=1\rtrain 50% @p=2\r\ntrain 90% @p=3\n@p=4")
    assert [(p.key, p.value, p.step) for p in result.points] == [
        ("p", 1.0, 0),
        ("p", 2.0, 1),
        ("p", 3.0, 2),
        ("p", 4.0, 3),
    ]


def test_step_applies_only_to_its_own_segment():
    parser = make_parser()
    result = parser.parse_text("@step=9 @a=1\r@a=2")
    assert [(p.value, p.step) for p in result.points] == [(1.0, 9), (2.0, 10)]


def test_token_does_not_span_line_break():
    # without the split the value would run into the next segment
    assert [p.value for p in make_parser().parse_text("@a=1\r@a=2").points] == [1.0, 2.0]


def test_parse_text_merges_units_and_bad_tokens():
    parser = make_parser()
    result = parser.parse_text("@d=1mm @lr=abc\n@d=2cm @lr=x\r@acc=95%")
    assert result.new_units == {"d": "mm", "acc": "%"}
    assert result.new_bad_tokens == [BadToken("lr", "@lr=abc")]
    assert parser.bad_token_counts == {"lr": 2}


def test_stdout_and_stderr_through_one_parser_share_steps():
    # the handler feeds both streams to one parser: the counters are per key, not per stream
    parser = make_parser()
    stdout_points = parser.parse_text("@loss=1\n").points
    stderr_points = parser.parse_text("warning: @loss=2\n").points
    assert [p.step for p in stdout_points + stderr_points] == [0, 1]


def test_iter_points():
    points = list(iter_points(["@a=1", "nothing", "@a=2 @b=3"]))
    assert [(p.key, p.value, p.step) for p in points] == [("a", 1.0, 0), ("a", 2.0, 1), ("b", 3.0, 0)]


# --- limits and encoding -----------------------------------------------------------------------


def test_limit_constants():
    assert PARSE_LIMIT_CHARS == 64 * 1024
    assert LOG_LINE_LIMIT_BYTES == MIB


def test_huge_line_only_first_64k_parsed_and_fast():
    early = " @early=1 "
    inside = " @inside=2 "
    after = " @after=3 "
    late = " @late=4 "
    head = early + "x" * (PARSE_LIMIT_CHARS - len(early) - len(inside)) + inside
    assert len(head) == PARSE_LIMIT_CHARS
    line = head + after + "y" * (4 * MIB) + late + "z" * MIB
    assert len(line) > 5 * MIB
    parser = make_parser()
    result = parser.parse(line)
    assert [(p.key, p.value) for p in result.points] == [("early", 1.0), ("inside", 2.0)]


def test_huge_line_full_of_at_signs_is_fast():
    parser = make_parser()
    results = [parser.parse(line) for line in (" @" * (3 * MIB), "(@=" * (2 * MIB), "x@" * (3 * MIB), " @a=1" * MIB)]
    # "(@=(@=…" is one token that runs past the parse limit: cut, so not read (not even as a bad token)
    assert parser.bad_token_counts == {}
    # " @a=1" repeated: one point (last wins)
    assert [(p.key, p.step) for p in results[-1].points] == [("a", 0)]


def test_line_just_under_limit_is_fully_parsed():
    line = "x" * (60 * 1024) + " @tail=5"
    assert points_of(line) == [("tail", 5.0, 0)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfe @loss=0.5 \xc3(", [("loss", 0.5)]),
        (b"\x80\x81\x82 (@acc=95%)\xe2\x28\xa1", [("acc", 95.0)]),
        (b"@loss=0.5,\xff\xff @lr=1e-3;\xc0", [("loss", 0.5), ("lr", 1e-3)]),
        (b"\xed\xa0\x80 @x=1", [("x", 1.0)]),  # encoded surrogate: replaced, not passed through
        (b"\xff@loss=0.5", []),  # garbage glued before the token: not a token boundary
    ],
)
def test_invalid_utf8_replaced_then_parsed(raw, expected):
    text = raw.decode("utf-8", errors="replace")
    assert "\ufffd" in text
    result = make_parser().parse_text(text)
    assert [(p.key, p.value) for p in result.points] == expected


def test_garbage_glued_after_value_is_bad_token():
    text = b"@loss=0.5\xff".decode("utf-8", errors="replace")
    result = make_parser().parse(text)
    assert result.points == []
    assert [b.key for b in result.new_bad_tokens] == ["loss"]


def test_scan_tokens_is_stateless():
    tokens, bad, step = scan_tokens("user@host=5 (@acc=95%) @v=1.2.3 @step=4")
    assert [(t.key, t.value, t.unit) for t in tokens] == [("acc", 95.0, "%")]
    assert bad == [BadToken("v", "@v=1.2.3")]
    assert step == 4
    assert scan_tokens("no metrics here") == ([], [], None)


# --- non-ASCII lookalikes -----------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["ınf", "-ınf", "İnf", "ınfınıty", "٣"])
def test_non_ascii_inf_lookalike_is_bad_token_not_crash(raw):
    parser = make_parser()
    result = parser.parse(f"@x={raw}")
    assert result.points == []
    assert [b.key for b in result.new_bad_tokens] == ["x"]


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_final_is_value_at_highest_step():
    points = [
        MetricPoint("loss", 0.9, 0, 100),
        MetricPoint("loss", 0.2, 5, 200),
        MetricPoint("loss", 0.7, 2, 300),  # lower step, logged later: not final
        MetricPoint("acc", 0.5, 0, 100),
    ]
    summary = summarize(points, {"loss": "nats"})
    assert summary["loss"].final == 0.2
    assert summary["loss"].min == 0.2
    assert summary["loss"].max == 0.9
    assert summary["loss"].count == 3
    assert summary["loss"].unit == "nats"
    assert summary["acc"].final == 0.5 and summary["acc"].count == 1 and summary["acc"].unit is None


def test_summarize_tie_on_step_later_wins():
    points = [MetricPoint("a", 1.0, 3, 200), MetricPoint("a", 2.0, 3, 100), MetricPoint("a", 3.0, 3, 300)]
    assert summarize(points)["a"].final == 3.0


def test_summarize_min_max_ignore_nan():
    points = [
        MetricPoint("a", math.nan, 0, 0),
        MetricPoint("a", 4.0, 1, 0),
        MetricPoint("a", -1.0, 2, 0),
        MetricPoint("a", math.nan, 3, 0),
    ]
    summary = summarize(points)["a"]
    assert summary.min == -1.0
    assert summary.max == 4.0
    assert math.isnan(summary.final)  # the value at the highest step, even if NaN
    assert summary.count == 4


def test_summarize_all_nan():
    summary = summarize([MetricPoint("a", math.nan, 0, 0)])["a"]
    assert math.isnan(summary.min) and math.isnan(summary.max) and summary.count == 1


def test_summarize_end_to_end_from_parser():
    parser = make_parser()
    result = parser.parse_text("@step=3 @mpjpe=20mm\n@step=1 @mpjpe=30mm\n@mpjpe=nan @acc=95%\n")
    summary = summarize(result.points, parser.units)
    # mpjpe steps: 3, 1, then auto 4 (NaN) -> final is the NaN at step 4
    assert math.isnan(summary["mpjpe"].final)
    assert (summary["mpjpe"].min, summary["mpjpe"].max, summary["mpjpe"].count) == (20.0, 30.0, 3)
    assert summary["mpjpe"].unit == "mm"
    assert (summary["acc"].final, summary["acc"].unit) == (95.0, "%")


def test_summarize_empty():
    assert summarize([]) == {}


# --- properties --------------------------------------------------------------------------------


def check_invariants(text: str) -> None:
    parser = make_parser()
    result = parser.parse_text(text)
    for point in result.points:
        assert KEY_RE.fullmatch(point.key)
        assert len(point.key) <= MAX_KEY_LENGTH
        assert point.key != "step"
        assert type(point.value) is float
        assert type(point.step) is int
    bad_keys = [bad.key for bad in result.new_bad_tokens]
    assert len(bad_keys) == len(set(bad_keys))  # reported once per key
    assert set(bad_keys) == set(parser.bad_token_counts)
    assert all(count >= 1 for count in parser.bad_token_counts.values())
    assert set(result.new_units) == set(parser.units)
    assert all(unit and re.fullmatch(r"[A-Za-z%]+", unit, re.IGNORECASE) for unit in parser.units.values())


FRAGMENTS = st.sampled_from(
    ["@", "@", "=", " ", "\r", "\n", "\r\n", "(", "[", ",", ";", ")", "}", "step", "loss", "val/loss", "1",
     "-", "+", ".", "e", "E", "nan", "INF", "%", "mm", "x", "_", "\ufffd", "@step=", "@loss=", "2"]
)  # fmt: skip
TOKENISH = st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_property_arbitrary_text(text):
    check_invariants(text)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_property_arbitrary_bytes(raw):
    check_invariants(raw.decode("utf-8", errors="replace"))


@settings(max_examples=300, deadline=None)
@given(TOKENISH)
def test_property_tokenish_text(text):
    check_invariants(text)


def test_token_cut_by_parse_limit_is_not_read():
    line = "x" * (PARSE_LIMIT_CHARS - 10) + " @loss=0.123456789"
    assert MetricParser().parse(line).points == []
