"""Batched ROUGE (visioncoach.rewards.rouge) against rouge_score (``reference.rouge``), which
stays the specification: hand cases, a fuzz corpus, the bit-parallel LCS against the table,
and the batched ``score`` against ``score_reference`` on free-form batches.

Equality is exact (``==``), not approximate: both sides apply the same float64 operations in
the same order (``hits / max(count, 1)``, ``2 * p * r / (p + r)``, ``(f1 + f2 + fL) / 3``) to
the same integers, and IEEE division, product and sum are correctly rounded, so any
difference at all means a different count (a tokenizer or counting bug), never rounding.
"""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import tokenizers

from visioncoach.rewards import RewardConfig, score, score_reference
from visioncoach.rewards.reference import rouge
from visioncoach.rewards import rouge as rouge_module
from visioncoach.rewards.rouge import _lcs_length, _lcs_lengths, rouge_batch, tokenize

N_EXAMPLES = int(os.environ.get("VISIONCOACH_HYPOTHESIS_EXAMPLES", "150"))
FREE_FORM = ("General video QA Free-form", "temporal-spatial free-form QA")
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Words the stemmer treats specially (3 vs 4 characters: "has" would stem to "ha"; nltk's
# default mode stems dying, lying, skies, sensibly and news unlike its ORIGINAL_ALGORITHM),
# digits, case, pieces of unicode that lowercase into ASCII (Kelvin sign, dotted capital I)
# or do not.
WORDS = ["the", "a", "has", "was", "its", "cat", "cats", "run", "runs", "running", "ran",
         "runner", "dying", "die",
         "lying", "skies", "sky", "sensibly", "news", "new", "caresses", "ponies", "generously",
         "Hopefulness", "RED", "cup", "cups", "12", "3d", "x", "naïve", "über", "straße",
         "\u212aelvin", "\u0130stanbul", "café", "日本", "ǅ", "ﬁsh"]
SEPARATORS = [" ", "  ", "\n", "\t", ", ", ". ", "-", "_", "'", "!?", "\u00a0", "\u3000", "/", "..."]


def reference_batch(predictions, targets):
    return [rouge(p, t) for p, t in zip(predictions, targets)]


def assert_equal_to_reference(predictions, targets):
    want = reference_batch(predictions, targets)
    # Both counting paths: the C++ op (the default where the extension has it) and numpy.
    for native in (True, False):
        got = rouge_batch(predictions, targets, native=native)
        assert got.dtype == np.float64 and got.shape == (len(predictions),)
        bad = [(p, t, g, w) for p, t, g, w in zip(predictions, targets, got.tolist(), want) if g != w]
        assert not bad, (native, bad[:5])


@pytest.mark.parametrize("prediction, target", [
    ("the cat is running fast", "run cat"),
    ("running cats", "run cat"),                       # both stem to the same tokens: 1.0
    ("", ""), ("", "a cat"), ("a cat", ""),
    ("!!! ... ???", "a cat"),                          # nothing left after tokenization
    ("日本 café", "日本 café"),                          # non-ASCII letters are separators
    ("the the the", "the the"),                        # repeated tokens: clipped counts
    ("a b a b a b", "b a b a"),
    ("cat", "cat"),                                    # one token: no bigram, (1 + 0 + 1) / 3
    ("cat", "dog"),
    ("\u212aELVIN and \u0130stanbul", "kelvin istanbul"),   # lowercase into ASCII
    ("dying skies", "die sky"), ("news", "new"), ("sensibly", "sensibl"),
    ("runs ran", "run ran"),                           # "ran" (3 chars) is never stemmed
    ("x1 2y 3d", "X1 2Y 3D"),
    ("The man picks up the red cup.", "The man picks up the red cup."),
    ("b a c b a c", "a b c a b c a b"),
])
def test_hand_cases_equal_rouge_score(prediction, target):
    assert_equal_to_reference([prediction], [target])


def test_known_values():
    assert rouge_batch(["running cats"], ["run cat"]).tolist() == [1.0]
    assert rouge_batch(["cat"], ["cat"]).tolist() == [(1.0 + 0.0 + 1.0) / 3.0]
    assert rouge_batch(["", "..."], ["a", ""]).tolist() == [0.0, 0.0]


def test_tokenizer_equals_rouge_score():
    ref = tokenizers.DefaultTokenizer(use_stemmer=True)
    rng = random.Random(0)
    texts = [""] + ["".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(0, 40)))
                    for _ in range(300)]
    for text in texts:
        assert tokenize(text) == ref.tokenize(text), text


def test_batch_order_duplicates_and_empty():
    rng = random.Random(1)
    preds = [" ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for _ in range(40)]
    tgts = [" ".join(rng.choices(WORDS, k=rng.randint(0, 12))) for _ in range(40)]
    preds += preds[:5]                                 # the same pairs again, and swapped
    tgts += tgts[:5]
    preds, tgts = preds + tgts[:5], tgts + preds[:5]
    assert_equal_to_reference(preds, tgts)
    got = rouge_batch(preds, tgts)
    assert got[40:45].tolist() == got[:5].tolist()
    assert rouge_batch([], []).shape == (0,)


@pytest.mark.parametrize("dense_per_gram, key_limit", [(0, 1 << 62), (1 << 40, 1 << 62), (8, 0)])
def test_every_counting_layout_equals_rouge_score(monkeypatch, dense_per_gram, key_limit):
    """Sorted keys only, dense tables only, and bigrams renumbered (as when vocab**2 x pairs
    would overflow int64): the same counts whichever layout a batch's sizes pick."""
    from visioncoach.rewards import rouge as rouge_module

    monkeypatch.setattr(rouge_module, "_DENSE_PER_GRAM", dense_per_gram)
    monkeypatch.setattr(rouge_module, "_KEY_LIMIT", key_limit)
    rng = random.Random(4)
    preds = [" ".join(rng.choices(WORDS, k=rng.randint(0, 25))) for _ in range(60)] + ["", "a"]
    tgts = [" ".join(rng.choices(WORDS, k=rng.randint(0, 25))) for _ in range(60)] + ["a", ""]
    assert_equal_to_reference(preds, tgts)


@pytest.mark.skipif(rouge_module._native_op is None, reason="visioncoach._C lacks rouge_from_ids")
def test_native_counting_is_the_default_and_equals_numpy_on_long_texts(monkeypatch):
    """Long sides (the op's LCS runs on many 64-bit words, carries crossing them) against the
    numpy path, which the tests above hold to rouge_score; and the op is what runs."""
    rng = random.Random(5)
    preds, tgts = [], []
    for _ in range(40):
        words = WORDS[:rng.choice([1, 3, 20])]
        preds.append(" ".join(rng.choices(words, k=rng.choice([0, 1, 63, 64, 65, 128, 200, 1500]))))
        tgts.append(" ".join(rng.choices(words, k=rng.choice([0, 2, 64, 129, 700, 2100]))))
    assert rouge_batch(preds, tgts).tolist() == rouge_batch(preds, tgts, native=False).tolist()
    calls = []
    real = rouge_module._native_op
    monkeypatch.setattr(rouge_module, "_native_op", lambda *a: calls.append(1) or real(*a))
    rouge_batch(["a cat"], ["the cat"])
    assert calls == [1]


def test_native_counting_checks_its_input():
    if rouge_module._native_op is None:
        pytest.skip("visioncoach._C lacks rouge_from_ids")
    ids = torch.tensor([1, 2], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="the lengths sum to 3 and 2"):
        rouge_module._native_op(ids, torch.tensor([3]), ids, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="pred_ids must be Long"):
        rouge_module._native_op(ids.int(), torch.tensor([2]), ids, torch.tensor([2]))


# In a child process: without the check the op walks its reads far past the id lists (a
# crash, not a failure).
_WRAPPING_LENGTHS = """
import torch, visioncoach.ops
ids = torch.tensor([1, 2])
big = 1 << 62
try:
    torch.ops.visioncoach.rouge_from_ids(ids, torch.tensor([big, big, big, big, 2]), ids,
                                         torch.tensor([0, 0, 0, 0, 2]))
except RuntimeError as exc:
    print(str(exc).splitlines()[0])
"""


def test_native_counting_rejects_lengths_whose_sum_wraps():
    if rouge_module._native_op is None:
        pytest.skip("visioncoach._C lacks rouge_from_ids")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WRAPPING_LENGTHS], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the lengths overflow int64 at pair 1" in done.stdout


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        rouge_batch(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="target 1 must be a str, got NoneType"):
        rouge_batch(["a", "b"], ["a", None])
    with pytest.raises(TypeError, match="prediction 0 must be a str, got bytes"):
        rouge_batch([b"a"], ["a"])


def _lcs_table(a, b):
    """The textbook O(len(a) x len(b)) table (rouge_score's ``_lcs_table``)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(2)
    # lengths around the 64-bit word size and beyond (Python ints have no word limit)
    for _ in range(400):
        na, nb = rng.choice([0, 1, 2, 7, 63, 64, 65, 130]), rng.randint(0, 140)
        alphabet = rng.choice([1, 2, 5, 40])
        a = [rng.randrange(alphabet) for _ in range(na)]
        b = [rng.randrange(alphabet) for _ in range(nb)]
        assert _lcs_length(a, b) == _lcs_table(a, b) == _lcs_length(b, a), (a, b)


@pytest.mark.parametrize("max_long", [1024, 70])
def test_batched_lcs_equals_the_table(monkeypatch, max_long):
    """The uint64 path (shorter side <= 64 tokens), the big-int fallback (longer shorter side,
    or a longer side past the word path's bound) and empty sides, mixed in one batch in
    random order."""
    from visioncoach.rewards import rouge as rouge_module

    monkeypatch.setattr(rouge_module, "_WORD_PATH_MAX_LONG", max_long)
    rng = random.Random(3)
    pairs = []
    for _ in range(300):
        na = rng.choice([0, 1, 2, 5, 31, 63, 64, 65, 90])
        nb = rng.choice([0, 1, 3, 20, 64, 65, 150])
        alphabet = rng.choice([1, 3, 8, 50])
        pairs.append(([rng.randrange(alphabet) for _ in range(na)],
                      [rng.randrange(alphabet) for _ in range(nb)]))
    got = _lcs_lengths([a for a, _ in pairs], [b for _, b in pairs], 50)
    assert got.tolist() == [_lcs_table(a, b) for a, b in pairs]
    assert _lcs_lengths([], [], 1).shape == (0,)


pieces = st.one_of(st.sampled_from(WORDS), st.sampled_from(SEPARATORS),
                   st.text(max_size=6), st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True))
texts = st.lists(pieces, max_size=40).map(" ".join)
long_texts = st.lists(st.sampled_from(WORDS[:20]), min_size=60, max_size=300).map(" ".join)


@FUZZ
@given(st.lists(st.tuples(st.one_of(texts, long_texts, st.text()), st.one_of(texts, long_texts, st.text())),
                max_size=12))
def test_fuzz_corpus_equals_rouge_score(pairs):
    assert_equal_to_reference([p for p, _ in pairs], [t for _, t in pairs])


# ---------------------------------------------------------------------------------- score()

def _free_form_batch(rng: random.Random, n: int, group: int):
    """``n`` rollouts, ``group`` per record, free-form tasks: answers drawn from the same
    words as the ground truth (so ROUGE spans 0..1), some without an answer block."""
    texts, samples = [], []
    for i in range(0, n, group):
        record = {"task": FREE_FORM[(i // group) % 2], "frame_size": [64, 48],
                  "answer": " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))}
        for _ in range(min(group, n - i)):
            words = record["answer"].split() + rng.choices(WORDS, k=rng.randint(0, 4))
            rng.shuffle(words)
            answer = (record["answer"].upper() if rng.random() < 0.15
                      else " ".join(words[:rng.randint(0, len(words))]))
            texts.append(f"<think>looking</think><answer>{answer}</answer>" if rng.random() < 0.9
                         else "no answer block")
            samples.append(record)
    return texts, samples


@pytest.mark.parametrize("n, group", [(0, 1), (1, 1), (7, 3), (64, 4)])
def test_score_equals_reference_on_free_form_batches(n, group):
    texts, samples = _free_form_batch(random.Random(n), n, group)
    cfg = RewardConfig()
    fast, ref = score(texts, samples, cfg), score_reference(texts, samples, cfg)
    # accuracy: both sides round the same float64 ROUGE to float32
    assert torch.equal(fast["accuracy"], ref["accuracy"])
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=0, msg=k)
    if n >= 64:
        assert 0 < fast["accuracy"].mean() < 1 and (fast["accuracy"] == 1).any()
