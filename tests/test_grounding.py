"""The grounded-output parser: claims, times, malformations, the batched layout, bad input."""

import contextlib
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visioncoach.grounding import (Claim, ClaimBatch, first_box, first_segment, normalize_name,
                                   option_letter, parse, parse_batch, parse_box, parse_number)


def wrap(think, answer="A"):
    return f"<think>{think}</think><answer>{answer}</answer>"


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging) if the body runs longer than ``seconds``."""
    def handler(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------
# Numbers, boxes, answers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, expected", [
    ("3", 3.0), (" 2.5 ", 2.5), ("-1", -1.0), ("+.5", 0.5), ("7.", 7.0), ("0012", 12.0),
    ("1e5", None), ("nan", None), ("inf", None), ("-inf", None), ("", None), (" ", None),
    ("1.2.3", None), ("0x10", None), ("1 2", None), (".", None), ("--1", None),
    ("\u0663", None),                     # a non-ASCII digit is not a digit here
    ("1" + "0" * 308, None),              # 1e308 written as digits: beyond float32
    ("1" + "0" * 400, None),              # beyond float64 too
    ("3" + "0" * 38, 3e38),               # fits float32
])
def test_number_grammar(s, expected):
    got = parse_number(s)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-7)


def test_numbers_are_float32_rounded():
    assert parse_number("0.1") == torch.tensor(0.1, dtype=torch.float32).item()


@pytest.mark.parametrize("s, expected", [
    ("[1, 2, 3, 4]", (1, 2, 3, 4)),
    (" [ 1 ,2,3 , 4 ] ", (1, 2, 3, 4)),
    ("[30, 40, 10, 20]", (10, 20, 30, 40)),   # reversed corners are swapped
    ("[1, 2, 3]", None), ("[1, 2, 3, 4, 5]", None), ("1, 2, 3, 4", None),
    ("[1, 2, 3, nan]", None), ("[1, 2, 3, 1e3]", None), ("[[1, 2, 3, 4]]", None), ("[]", None),
])
def test_box_grammar(s, expected):
    assert parse_box(s) == (None if expected is None else tuple(float(v) for v in expected))


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("[A]", "A"), ("a. text", "A"), (" B: the cat", "B"),
    ("C)", "C"), ("D\nbecause", "D"), ("(b) dog", "B"),
    ("Answer: A", None),     # the first letter is the A of "Answer", followed by 'n'
    ("AB", None), ("", None), ("123", None), ("é", None),
])
def test_option_letter(text, letter):
    assert option_letter(text) == letter


@pytest.mark.parametrize("text, seg", [
    ("[1.5, 3]", (1.5, 3.0)),
    ("from <t>2</t>s to <t>4.5</t>s", (2.0, 4.5)),
    ("<t>2</t> to <t>4</t>", (2.0, 4.0)),
    ("[5, 1]", (1.0, 5.0)),                              # reversed ends swapped
    ("B\n[12.0, 15.5]", (12.0, 15.5)),                   # temporal MCQ answers
    ("[1, 2, 3, 4] then [6, 7]", (6.0, 7.0)),            # a box is not a segment
    ("[1e3, 5] or [2, 3]", (2.0, 3.0)),
    ("no segment", None), ("<t>3</t>s", None),
])
def test_first_segment(text, seg):
    assert first_segment(text) == seg


def test_first_box():
    assert first_box("It is <box>[10, 20, 5, 40]</box>, or [1, 1, 2, 2]") == (5.0, 20.0, 10.0, 40.0)
    assert first_box("[1, 2, 3] [0, 0, 1, 1]") == (0.0, 0.0, 1.0, 1.0)
    assert first_box("nothing") is None


def test_normalize_name():
    assert normalize_name("  Red \t CAR\n") == "red car"
    assert normalize_name("ÄPFEL") == "äpfel"


# ---------------------------------------------------------------------------------------
# Blocks, claims, times
# ---------------------------------------------------------------------------------------

def test_well_formed_output():
    text = wrap("First <obj>red car</obj><box>[10, 20, 110, 120]</box><box>[0, 0, 5, 5]</box>"
                "at<t>2.5</t>s, then <obj>dog</obj> <box>[1,2,3,4]</box> at <t> 7 </t> and at <t>9</t>s.",
                " B ")
    p = parse(text)
    assert p.errors == []
    assert p.answer == " B "
    assert p.claims == [Claim("red car", [(10, 20, 110, 120), (0, 0, 5, 5)], 2.5),
                        Claim("dog", [(1, 2, 3, 4)], 7.0)]
    assert p.times == [2.5, 7.0, 9.0]


def test_claim_keeps_valid_boxes_and_needs_one():
    p = parse(wrap("<obj>a</obj><box>[1,2,3]</box><box>[0,0,4,4]</box>at<t>1</t>"
                   "<obj>b</obj><box>[1,2,3,4,5]</box>at<t>2</t>"))
    assert p.claims == [Claim("a", [(0, 0, 4, 4)], 1.0)]
    assert p.times == [1.0, 2.0]
    assert any("box" in e for e in p.errors)


def test_claim_needs_a_valid_time():
    p = parse(wrap("<obj>a</obj><box>[0,0,4,4]</box>at<t>nan</t> <obj>b</obj><box>[0,0,4,4]</box> near"))
    assert p.claims == [] and p.times == []


def test_claim_never_extends_past_the_next_obj():
    p = parse(wrap("<obj>a</obj> <obj>b</obj><box>[0,0,4,4]</box>at<t>1</t>"))
    assert p.claims == [Claim("b", [(0, 0, 4, 4)], 1.0)]
    p = parse(wrap("<obj>a</obj><box>[0,0,4,4]</box> <obj>b</obj> at<t>1</t>"))
    assert p.claims == []


def test_only_whitespace_and_at_between_claim_parts():
    assert parse(wrap("<obj>a</obj>\n<box>[0,0,4,4]</box>\n at\t<t>1</t>")).claims
    assert parse(wrap("<obj>a</obj><box>[0,0,4,4]</box><t>1</t>")).claims == []        # no "at"
    assert parse(wrap("<obj>a</obj>, <box>[0,0,4,4]</box>at<t>1</t>")).claims == []
    assert parse(wrap("<obj>a</obj><box>[0,0,4,4]</box> x <box>[0,0,2,2]</box>at<t>1</t>")).claims == []


def test_box_corners_swapped_not_clipped():
    p = parse(wrap("<obj>a</obj><box>[500, -20, 100, -60]</box>at<t>-1.5</t>"))
    assert p.claims == [Claim("a", [(100, -60, 500, -20)], -1.5)]


@pytest.mark.parametrize("think, needle", [
    ("<obj>a<box>[0,0,1,1]</box></obj>", "unclosed <obj>"),    # nested
    ("a </box> b", "stray </box>"),
    ("<t>3", "unclosed <t>"),
    ("<obj></obj>", "empty <obj>"),
    ("<t>1e3</t>", "<t> is not a number"),
    ("<box>[1,2,3]</box>", "<box> is not"),
    ("<obj>a</box>", "unclosed <obj>"),
])
def test_malformed_tags_reported(think, needle):
    p = parse(wrap(think))
    assert any(needle in e for e in p.errors), p.errors


@pytest.mark.parametrize("text", [
    "<think>x</think>",                                   # no answer
    "<answer>A</answer>",                                 # no think
    "<think>x</think><answer>A</answer><answer>B</answer>",
    "<answer>A</answer><think>x</think>",
    "hi <think>x</think><answer>A</answer>",
    "<think>x</think> hi <answer>A</answer>",
    "<think> </think><answer>A</answer>",
    "<think>x</think><answer>\n</answer>",
    "<think>x<think>y</think><answer>A</answer>",
])
def test_block_structure_errors(text):
    assert parse(text).errors


def test_blocks_are_the_first_ones_and_independent():
    p = parse("<think><t>1</t></think><answer>A</answer> <think><t>2</t></think><answer>B</answer>")
    assert p.think == "<t>1</t>" and p.answer == "A" and p.times == [1.0] and p.errors
    p = parse("<answer>A</answer>")
    assert p.think is None and p.answer == "A" and p.claims == [] and p.times == []
    p = parse("<think><t>1</t></think>")
    assert p.answer is None and p.times == [1.0]
    assert parse("<think><t>1</t>").think is None   # unclosed think: no think at all


def test_whitespace_around_blocks_is_fine():
    assert parse("\n <think>x</think>\n\n<answer>A</answer>\n").errors == []


# ---------------------------------------------------------------------------------------
# Batched layout
# ---------------------------------------------------------------------------------------

def test_parse_batch_layout():
    texts = [
        wrap("<obj>Red  Car</obj><box>[1,2,3,4]</box><box>[5,6,7,8]</box><box>[0,0,1,1]</box>at<t>1</t>"
             " <t>9</t>s <obj>dog</obj><box>[4,3,2,1]</box>at<t>2</t>"),
        "garbage",
        wrap("<obj>red car</obj><box>[0,0,10,10]</box>at<t>3.5</t>"),
    ]
    cb = parse_batch(texts)
    assert isinstance(cb, ClaimBatch) and cb.n_rollouts == 3
    assert cb.names == ["red car", "dog"]
    assert cb.claim_rollout.tolist() == [0, 0, 2]
    assert cb.claim_obj.tolist() == [0, 1, 0]
    assert cb.claim_t.tolist() == [1.0, 2.0, 3.5]
    assert cb.box_count.tolist() == [3, 1, 1]
    assert cb.boxes.shape == (3, 3, 4) and cb.boxes.dtype == torch.float32
    assert cb.boxes[0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 1, 1]]
    assert cb.boxes[1].tolist() == [[2, 1, 4, 3], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert cb.boxes[2, 0].tolist() == [0, 0, 10, 10] and not cb.boxes[2, 1:].any()
    assert cb.time_rollout.tolist() == [0, 0, 0, 2]
    assert cb.times.tolist() == [1.0, 9.0, 2.0, 3.5]
    for f in ("claim_rollout", "claim_obj", "box_count", "time_rollout"):
        assert getattr(cb, f).dtype == torch.int64
    assert cb.claim_t.dtype == torch.float32 and cb.times.dtype == torch.float32


def test_parse_batch_empty():
    cb = parse_batch(["", "no tags"])
    assert cb.n_rollouts == 2 and cb.boxes.shape == (0, 1, 4)
    assert cb.claim_t.shape == (0,) and cb.times.shape == (0,) and cb.names == []
    assert parse_batch([]).n_rollouts == 0


# ---------------------------------------------------------------------------------------
# Bad input: never raises, never hangs
# ---------------------------------------------------------------------------------------

_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<obj>", "</obj>", "<box>", "</box>",
           "<t>", "</t>", "[", "]", ",", " at ", "s", "1", "2.5", "-", ".", "nan", "1e9", "<", ">",
           "/", " ", "\n", "é", "猫", "\x00"]


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=4)), max_size=60).map("".join))
def test_parse_never_raises(text):
    p = parse(text)
    assert isinstance(p.errors, list)
    for c in p.claims:
        assert c.boxes and all(b[0] <= b[2] and b[1] <= b[3] for b in c.boxes)
    parse_batch([text, text])
    first_box(text), first_segment(text), option_letter(text)


def _adversarial_100k():
    n = 100_000
    yield "<think>" + "<obj>" * (n // 5) + "</think><answer>A</answer>"
    yield "<think><box>[" + "1" * n + "</think>"
    yield "<think><box>[" + "1," * (n // 2) + "]</box></think>"
    yield "<think><obj>a</obj>" + "<box>[0,0,1,1]</box>" * (n // 20) + "at<t>1</t></think>"
    yield "<think>" + "<obj>a</obj><box>[0,0,1,1]</box>at<t>1</t>" * (n // 42) + "</think>"
    yield "<think>" + "<t>" + "9" * n + "</t></think>"
    yield "<think>" + "<t> " + " " * n + "</think>"
    yield "<think>" + "<obj>a</obj>" + " " * n + "x</think>"
    yield "<think>" + "<obj>a</obj><box>[0,0,1,1]</box>" + " " * n + "a</think>"
    yield "<think>" * (n // 7) + "</think>" * (n // 8)
    yield "<answer>" * (n // 8)
    yield "[" * n
    yield "[1" * (n // 2)
    yield "[ " + " " * n + "1"
    yield "<t>1</t>s to " * (n // 13)
    yield "<t>" + " " * n
    yield "1" * n + "e"
    yield "a" * n
    yield "(" + "A" * n


@pytest.mark.parametrize("text", list(_adversarial_100k()), ids=lambda t: repr(t[:24]))
def test_adversarial_100k_is_linear(text):
    with time_limit(10):   # well under 1 s in practice; the alarm only turns a hang into a failure
        p = parse(text)
        first_box(text), first_segment(text), option_letter(text)
        if p.think:
            first_box(p.think), first_segment(p.think)
