"""Stop strings over streamed text: hand-written streams and the text each must release."""

from __future__ import annotations

import random

import pytest

from engine.text.stop_checker import StopChecker


def run(stops: list[str], pieces: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed `pieces`; return what each feed released (plus the flush) and the stop hit."""
    checker = StopChecker(stops, include)
    released = []
    for piece in pieces:
        text, matched = checker.feed(piece)
        released.append(text)
        if matched is not None:
            return released, matched
    return released + [checker.flush()], None


def test_no_stop_strings_release_everything_at_once() -> None:
    assert run([], ["Hello", " wor", "ld"]) == (["Hello", " wor", "ld", ""], None)


def test_stop_inside_one_piece_cuts_the_text_before_it() -> None:
    assert run(["STOP"], ["abcSTOPdef"]) == (["abc"], "STOP")


def test_stop_spanning_pieces_is_held_back_then_dropped() -> None:
    released, matched = run(["</end>"], ["answer </", "en", "d> tail"])
    assert released == ["answer ", "", ""] and matched == "</end>"


def test_held_back_prefix_is_released_once_it_cannot_be_a_stop() -> None:
    assert run(["</end>"], ["a </", "en", "x", "b"]) == (["a ", "", "</enx", "b", ""], None)


def test_held_back_tail_comes_out_of_flush_when_the_sequence_ends_otherwise() -> None:
    assert run(["STOP"], ["go ST"]) == (["go ", "ST"], None)


def test_include_stop_str_in_output_releases_the_stop_but_nothing_after() -> None:
    released, matched = run(["STOP"], ["abcST", "OPdef"], include=True)
    assert "".join(released) == "abcSTOP" and matched == "STOP"


def test_several_stops_the_first_completed_wins() -> None:
    # "b" is complete at the 2nd character, "abc" only at the 3rd.
    assert run(["abc", "b"], ["xabc"]) == (["xa"], "b")
    assert run(["abc", "b"], ["xa", "bc"]) == (["x", "a"], "b")


def test_stops_completed_at_the_same_character_prefer_the_longest() -> None:
    assert run(["c", "bc"], ["abc"]) == (["a"], "bc")


def test_overlapping_prefixes_hold_back_the_longest_possible_start() -> None:
    # "aab" could still become "aabX": all of it is held.
    assert run(["aabX", "abY"], ["xaab"]) == (["x", "aab"], None)
    assert run(["aabX", "abY"], ["xaab", "Y!"]) == (["x", "a"], "abY")
    assert run(["aabX", "abY"], ["xaab", "X!"]) == (["x", ""], "aabX")


def test_stop_that_repeats_its_own_prefix() -> None:
    assert run(["abab"], ["aba", "bab"]) == (["", ""], "abab")
    assert run(["abab"], ["xab", "aab"]) == (["x", "aba", "ab"], None)
    assert run(["abab"], ["xaba", "x", "abab"]) == (["x", "abax", ""], "abab")


def test_nothing_is_released_after_a_match() -> None:
    checker = StopChecker(["."])
    assert checker.feed("Hi. there") == ("Hi", ".")
    assert checker.feed("more") == ("", None)
    assert checker.flush() == ""


@pytest.mark.parametrize("include", [False, True])
def test_result_does_not_depend_on_how_the_text_is_cut(include: bool) -> None:
    text = "The plan: <tool>call</tool> and then ### END ### after"
    stops = ["### END", "</tool> and", "<tool>x"]
    expected = "The plan: <tool>call" + ("</tool> and" if include else "")
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 12)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        released, matched = run(stops, pieces, include)
        assert ("".join(released), matched) == (expected, "</tool> and")


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopChecker(["ok", ""])
