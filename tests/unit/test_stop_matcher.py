"""StopMatcher: cutting streamed text at the first stop string, whatever the chunking."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from serving.engines.base import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit


def test_no_stops_passes_text_through_immediately():
    m = StopMatcher(())
    assert m.push("abc") == ("abc", False)
    assert m.push("") == ("", False)
    assert m.flush() == ""


def test_stop_inside_one_piece_cuts_before_it():
    assert run(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_split_across_pieces_is_held_back_then_cut():
    m = StopMatcher(["END"])
    assert m.push("hello E") == ("hello ", False)
    assert m.push("N") == ("", False)
    assert m.push("D tail") == ("", True)


def test_false_partial_match_is_released():
    m = StopMatcher(["END"])
    assert m.push("hello EN") == ("hello ", False)
    assert m.push("x") == ("ENx", False)
    assert m.flush() == ""


def test_flush_releases_held_partial_at_end():
    m = StopMatcher(["END"])
    assert m.push("abc EN") == ("abc ", False)
    assert m.flush() == "EN"
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    assert run(["zz", "b"], ["a b zz"]) == ("a ", True)
    assert run(["\n\n", "."], ["one. two\n\nthree"]) == ("one", True)


def test_stop_at_very_start_gives_empty_text():
    assert run(["x"], ["xyz"]) == ("", True)


def test_longest_possible_partial_is_held():
    # "xaa" ends with both "a" and "aa", prefixes of "aab": the longer one is held back
    m = StopMatcher(["aab"])
    assert m.push("xaa") == ("x", False)
    assert m.push("b") == ("", True)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_any_chunking_gives_same_result(size):
    text = "The quick brown fox. Jumps over<stop> the lazy dog"
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    assert run(["<stop>", "lazy"], pieces) == ("The quick brown fox. Jumps over", True)
    assert run(["absent"], pieces) == (text, False)
