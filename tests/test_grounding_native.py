"""The C++ grounding front-end (csrc/grounding.cpp) against the Python parser it must equal.

``parse_texts(backend="native")`` is compared with ``parse`` on every field (claims bit for
bit, names, block spans, error counts) over: every hand-written case of test_grounding.py
and test_rewards.py (recorded by running those tests with their parser entry points spied
on) and their garbage corpora; hypothesis fuzz (tag soup, mutated realistic outputs,
arbitrary Unicode, decimal strings at float32/float64 rounding boundaries, 100 kB garbage);
the whitespace set against ``str.isspace`` over all of Unicode. Then ``identity_match``
against ``reference.identity_match``, ``score`` with the native front-end against
``score_reference``, the fallbacks, and opcheck.
"""

import importlib.util
import inspect
import math
import random
import struct
import sys
from decimal import Context, Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visioncoach.grounding import native_available, normalize_name, parse, parse_texts
from visioncoach.rewards import RewardConfig, batched, score, score_reference
from visioncoach.rewards.reference import identity_match

ops = pytest.importorskip("visioncoach.ops")
pytestmark = pytest.mark.skipif(not native_available(), reason="visioncoach._C lacks the grounding ops")

CLAIM_FIELDS = ("claim_rollout", "claim_obj", "claim_t", "boxes", "box_count", "time_rollout", "times")
KEYS = ("accuracy", "format", "temporal", "spatial", "total")
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _load(name):
    """Import a sibling test module under a private name (pytest does not collect it twice)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_native_corpus_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


grounding_tests = _load("test_grounding")
reward_tests = _load("test_rewards")


def wrap(think, answer="A"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def _bits(t):
    # Floats compared by bit pattern: -0.0 vs 0.0 (or any rounding difference) must show.
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_as_python(texts):
    """The native front-end equals ``parse`` on every text, in every field."""
    native = parse_texts(texts, "native")
    python = parse_texts(texts, "python")
    parsed = [parse(t) for t in texts]
    assert native.backend == "native" and python.backend == "python"
    assert native.claims.n_rollouts == python.claims.n_rollouts == len(texts)
    assert native.claims.names == python.claims.names
    for f in CLAIM_FIELDS:
        a, b = getattr(native.claims, f), getattr(python.claims, f)
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), f
    assert native.raw_names == python.raw_names
    claim_names = [native.raw_names[k] for k in native.claim_name.tolist()]
    assert claim_names == [c.obj for p in parsed for c in p.claims]
    assert torch.equal(native.blocks, python.blocks)
    assert native.thinks() == [p.think for p in parsed]
    assert native.answers() == [p.answer for p in parsed]
    assert native.n_errors.tolist() == [len(p.errors) for p in parsed]


# ---------------------------------------------------------------------------------------
# (a) Hand-written cases of the other test files
# ---------------------------------------------------------------------------------------

def _param_sets(fn):
    """kwargs of every case of a (possibly multiply) parametrized test function."""
    sets = [{}]
    for mark in reversed(getattr(fn, "pytestmark", [])):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")]
        rows = [dict(zip(names, (v,) if len(names) == 1 else tuple(v))) for v in mark.args[1]]
        sets = [{**s, **r} for s in sets for r in rows]
    return sets


def _recorded_texts(mod, spied):
    """Run every example-based test of ``mod`` (no fixtures, no hypothesis) with the
    functions ``spied`` wrapped to record the strings they are given."""
    seen = []

    def spy(real):
        def wrapper(arg, *args, **kwargs):
            seen.extend([arg] if isinstance(arg, str) else [t for t in arg if isinstance(t, str)])
            return real(arg, *args, **kwargs)
        return wrapper

    saved = {name: getattr(mod, name) for name in spied}
    try:
        for name in spied:
            setattr(mod, name, spy(saved[name]))
        for name, fn in list(vars(mod).items()):
            if (not (name.startswith("test_") and inspect.isfunction(fn)) or hasattr(fn, "hypothesis")
                    or "@given" in inspect.getsource(fn)):
                continue
            needs = set(inspect.signature(fn).parameters)
            for kwargs in _param_sets(fn):
                if needs <= set(kwargs):
                    fn(**kwargs)
    finally:
        for name, real in saved.items():
            setattr(mod, name, real)
    return seen


@pytest.fixture(scope="module")
def handwritten():
    g = _recorded_texts(grounding_tests, ["parse", "parse_batch", "parse_number", "parse_box",
                                         "first_box", "first_segment", "option_letter"])
    r = _recorded_texts(reward_tests, ["score", "score_reference", "accuracy_reward", "format_reward",
                                       "temporal_reward", "spatial_reward"])
    assert len(g) > 100 and len(r) > 100   # the spies saw the cases
    texts = list(dict.fromkeys(g + r))
    # Fragments (numbers, boxes, answers) also in the places the grammar reads them.
    fragments = [t for t in texts if len(t) < 200]
    texts += [wrap(f"<t>{s}</t> <obj>a</obj><box>{s}</box> at <t>{s}</t>") for s in fragments]
    texts += [wrap(f"<obj>o</obj><box>[{s}, 1, 2, 3]</box>at<t>1</t>", s) for s in fragments]
    return texts


def test_handwritten_cases_as_one_batch(handwritten):
    assert_same_as_python(handwritten)


def test_handwritten_cases_one_by_one(handwritten):
    for text in handwritten:
        assert_same_as_python([text])


@pytest.mark.parametrize("corpus", ["adversarial_100k", "garbage"])
def test_pathological_corpora(corpus):
    texts = list(grounding_tests._adversarial_100k() if corpus == "adversarial_100k"
                 else reward_tests._garbage())
    assert_same_as_python(texts)


def test_parallel_chunks_keep_batch_order():
    # With several threads the op splits the batch into chunks; their concatenation must
    # give the one-thread order (claims, times, first-appearance name order).
    rng = random.Random(0)
    texts = [wrap(" ".join(f"<obj>{rng.choice(['Dog', 'dog ', 'cat', 'ÄPFEL'])}{i % 7}</obj>"
                           f"<box>[{i}, 1, {rng.randint(0, 99)}, 5]</box> at <t>{i / 8}</t>s"
                           for i in range(rng.randint(0, 6)))) for _ in range(300)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_same_as_python(texts)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# (b) Fuzz
# ---------------------------------------------------------------------------------------

SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_SPACES = "\u200b\ufeff\u180e\x00é猫🐈Ä"
PIECES = sorted(set(grounding_tests._PIECES + reward_tests.PIECES + reward_tests.SOUP + [
    "NaN", "nan", "inf", "-inf", "Infinity", "1e308", "1E5", "1" + "0" * 308, "0." + "0" * 400 + "1",
    "3.4028235e38", "340282356779733661637539395458142568448", "340282356779733661637539395458142568447",
    "-0", "+.5", "7.", "0012", "1_000", "١٢", "<obj>猫 🐈</obj>", "<obj>Red \u3000 Car</obj>",
    "<box>[1, 2, 3, 4]</box>", "<box>\u3000[0,0,9,9]\x85</box>", "</t>s", " at\u00a0", "<t>\u20031\u2003</t>",
])) + list(SPACES) + list(NOT_SPACES)

soup = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=80).map("".join)


@settings(FUZZ, max_examples=300)
@given(st.lists(st.one_of(soup, soup.map(wrap), st.tuples(soup, soup).map(lambda p: wrap(*p))),
                min_size=1, max_size=6))
def test_fuzz_tag_soup(texts):
    assert_same_as_python(texts)


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_fuzz_mutated_realistic_outputs(data):
    records = [data.draw(reward_tests.records()) for _ in range(data.draw(st.integers(1, 4)))]
    texts = [data.draw(reward_tests.outputs(r)) for r in records]
    assert_same_as_python(texts)


@settings(FUZZ, max_examples=150)
@given(st.lists(st.text(), min_size=1, max_size=4), st.text(max_size=20))
def test_fuzz_arbitrary_unicode(parts, name):
    # Any code point in prose, names, numbers and between claim parts.
    texts = parts + [wrap(p) for p in parts] + [
        wrap(f"<obj>{name}</obj>{parts[0]}<box>[{name}1, 2, 3, 4]</box>{name}at{name}<t>{name}2</t>")]
    assert_same_as_python(texts)


def _f32_neighbours(f):
    """The float32 values just below and above float32 ``f`` (None past the finite range)."""
    i = struct.unpack("<I", struct.pack("<f", f))[0]
    out = []
    for j in (i - 1, i + 1):
        g = struct.unpack("<f", struct.pack("<I", j & 0xFFFFFFFF))[0]
        out.append(g if abs(g) < float("inf") and (g >= 0) == (f >= 0) else None)
    return out


def _exact_decimal(q: Fraction) -> str:
    """``q`` (a binary fraction: finite decimal expansion) written out in full."""
    d = Context(prec=2000).divide(Decimal(q.numerator), Decimal(q.denominator))
    return format(d, "f")


@st.composite
def decimal_strings(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:   # digits of any length, signs, bare points
        sign = draw(st.sampled_from(["", "-", "+"]))
        whole = draw(st.text("0123456789", max_size=50))
        frac = draw(st.one_of(st.none(), st.text("0123456789", max_size=50)))
        return sign + whole + ("" if frac is None else "." + frac)
    if kind == 1:   # the midpoint between two float32s, exactly and a hair off: the
        # decimal -> double -> float32 double rounding must match Python's
        f = draw(st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                           st.floats(-1e7, 1e7, width=32)))
        up = _f32_neighbours(f)[1]
        mid = (Fraction(f) + Fraction(up if up is not None else math.copysign(2.0 ** 128, f))) / 2
        s = _exact_decimal(mid)
        tweak = draw(st.sampled_from(["", "1", "0" * 30 + "1", "-", "digits"]))
        if tweak == "digits":
            # Rounded to 15-19 significant digits, +-1 in the last: the fast path's range,
            # where (double)w / 10^k must still round like a correctly rounded strtod.
            ctx = Context(prec=draw(st.integers(15, 19)))
            d = ctx.plus(Decimal(s))
            return format(ctx.next_plus(d) if draw(st.booleans()) else ctx.next_minus(d), "f")
        if tweak == "-":
            return s[:-1] if "." in s and len(s.split(".")[1]) > 1 else s
        return s + ("" if "." in s or not tweak else ".") + tweak
    if kind == 2:   # repr of doubles, as float() reads them (exponents are not numbers here)
        return repr(draw(st.floats()))
    # Leading and trailing zeros around a short mantissa: from_chars vs the fast path.
    lead, trail = draw(st.integers(0, 400)), draw(st.integers(0, 400))
    digits = draw(st.text("0123456789", min_size=1, max_size=25))
    return draw(st.sampled_from([
        "0." + "0" * lead + digits, digits + "0" * trail, digits + "." + "0" * trail,
        "-0." + "0" * lead + digits + "0" * trail]))


@settings(FUZZ, max_examples=300)
@given(st.lists(decimal_strings(), min_size=1, max_size=8), st.sampled_from(["", " ", "\u3000", "\x1f"]))
def test_fuzz_numbers(numbers, pad):
    think = " ".join(f"<t>{pad}{s}{pad}</t>" for s in numbers)
    boxes = "".join(f"<box>[{s},{pad}{s}, {numbers[0]}, {s}]</box>" for s in numbers)
    texts = [wrap(think), wrap(f"<obj>n</obj>{boxes} at <t>{numbers[-1]}</t>")]
    assert_same_as_python(texts)
    # Each number alone too: where it is valid, the native value is Python's, bit for bit.
    native = parse_texts([wrap(f"<t>{s}</t>") for s in numbers], "native")
    for i, s in enumerate(numbers):
        got = native.claims.times[native.claims.time_rollout == i]
        want = parse(wrap(f"<t>{s}</t>")).times
        assert _bits(got).tolist() == _bits(torch.tensor(want, dtype=torch.float32)).tolist(), s


def test_numbers_near_float32_midpoints():
    # Double rounding, decimal -> double -> float32, decides these: every midpoint between
    # two float32s (which a double holds exactly) at 15-19 significant digits +-1 in the
    # last, the digit counts where the C++ fast path (integer mantissa / 10^k) applies, and
    # the exact expansion +- a hair (from_chars). A rounding slip of one double ulp flips
    # the float32 result of ~4% of the short ones.
    rng = random.Random(0)
    numbers = []
    for _ in range(3000):
        f = struct.unpack("<f", struct.pack("<f", rng.uniform(0, 1000) * 10.0 ** rng.randint(-3, 4)))[0]
        up = _f32_neighbours(f)[1]
        exact = _exact_decimal((Fraction(f) + Fraction(up)) / 2)
        ctx = Context(prec=rng.randint(15, 19))
        d = ctx.plus(Decimal(exact))
        numbers += [format(ctx.next_plus(d), "f"), format(ctx.next_minus(d), "f"), exact,
                    exact + "0" * 20 + "1", exact[:-1]]
    texts = [wrap(f"<t>{s}</t>") for s in numbers]
    assert_same_as_python(texts)


@settings(FUZZ, max_examples=5)
@given(st.integers(0, 2 ** 32 - 1))
def test_fuzz_100k_garbage(seed):
    rng = random.Random(seed)
    text = []
    while sum(map(len, text)) < 100_000:
        text.append(rng.choice(PIECES) if rng.random() < 0.8 else chr(rng.randint(1, 0x2FFF)))
    text = "".join(text)
    assert_same_as_python([text, wrap(text)])


def test_whitespace_is_pythons_over_all_of_unicode():
    # The set csrc hard-codes against str.isspace (= re's \s) over every code point, probed
    # where each use of it shows: an <obj> of one code point is empty exactly when that is
    # whitespace (one error, else none), and a lone "1" padded by it on both sides is a time
    # exactly when it is whitespace (bar the padding characters that make another number).
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and chr(c) != "<"]
    objs = parse_texts([f"<think><obj>{c}</obj></think><answer>A</answer>" for c in chars], "native")
    assert objs.n_errors.tolist() == [int(c.isspace()) for c in chars]
    padded = [c for c in chars if c not in "0123456789.+-"]
    times = parse_texts([f"<think><t>{c}1{c}</t></think>" for c in padded], "native")
    is_time = torch.bincount(times.claims.time_rollout, minlength=len(padded)).bool().tolist()
    assert is_time == [c.isspace() for c in padded]


# ---------------------------------------------------------------------------------------
# Front-end selection and fallbacks
# ---------------------------------------------------------------------------------------

def test_lone_surrogates_fall_back_to_python():
    texts = [wrap("<obj>a\ud800</obj><box>[1,2,3,4]</box> at <t>1</t>"), wrap("x")]
    with pytest.raises(RuntimeError):
        parse_texts(texts, "native")   # not valid Unicode: cannot cross into C++ as UTF-8
    auto = parse_texts(texts, "auto")
    assert auto.backend == "python" and auto.raw_names == ["a\ud800"]


def test_non_str_items():
    with pytest.raises(TypeError, match="text 1 must be a str"):
        parse_texts(["x", 3], "native")
    auto = parse_texts(["x", 3], "auto")
    assert auto.backend == "python" and auto.n_errors.tolist() == [len(parse("x").errors), 1]


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        parse_texts(["x"], "rust")
    with pytest.raises(ValueError, match="frontend"):
        score(["x"], [reward_tests.rec()], RewardConfig(), frontend="rust")


def test_score_follows_the_frontend_switch(monkeypatch):
    calls = []
    real = batched.parse_texts
    monkeypatch.setattr(batched, "parse_texts", lambda t, b: calls.append(b) or real(t, b))
    sample = reward_tests.scene({"dog": [reward_tests.DOG]})
    text = reward_tests.out(reward_tests.claim("Dog", [reward_tests.DOG], 2.0))
    monkeypatch.setattr(batched, "FRONTEND", "python")
    a = score([text], [sample], RewardConfig())
    b = score([text], [sample], RewardConfig(), frontend="native")
    assert calls == ["python", "native"]
    for k in KEYS:
        assert torch.equal(a[k], b[k])


# ---------------------------------------------------------------------------------------
# (c) identity_match
# ---------------------------------------------------------------------------------------

NAMES = ["dog", "Dog ", "red car", "car", "red  CAR door", "", " ", "\u3000", "猫", "猫 🐈", "ÉCLAIR",
         "éclair", "a", "the man", "man", "\x1cman\x1f"]
name = st.one_of(st.sampled_from(NAMES), st.text(alphabet="abcAB éÉ猫\u3000\t", max_size=6))


@settings(FUZZ, max_examples=200)
@given(st.lists(name, max_size=8), st.lists(name, max_size=8), st.sampled_from(["soft", "exact", "none"]))
def test_identity_match_native_equals_reference(pred, gt, mode):
    got = ops.identity_match([normalize_name(p) for p in pred], [normalize_name(g) for g in gt], mode)
    assert got.dtype == torch.bool and got.shape == (len(pred), len(gt))
    assert got.tolist() == [[identity_match(p, g, mode) for g in gt] for p in pred]


def test_identity_match_empty_names_and_modes():
    names = ["", "dog"]
    assert ops.identity_match(names, names, "none").tolist() == [[True, True], [True, True]]
    assert ops.identity_match(names, names, "soft").tolist() == [[False, False], [False, True]]
    assert ops.identity_match(names, names, "exact").tolist() == [[False, False], [False, True]]
    with pytest.raises(ValueError, match="identity mode"):
        ops.identity_match(names, names, "fuzzy")
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.visioncoach.identity_match(names, names, 7)


# ---------------------------------------------------------------------------------------
# (d) score with the native front-end
# ---------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=60)
@given(reward_tests.batches())
def test_score_native_equals_reference_and_python(batch):
    texts, samples, identity, sigma, tau, progress = batch
    for mode in ("object_aware", "max", "avg"):
        cfg = RewardConfig(sigma=sigma, tau=tau, spatial_mode=mode, identity=identity)
        native = score(texts, samples, cfg, progress, frontend="native")
        python = score(texts, samples, cfg, progress, frontend="python")
        ref = score_reference(texts, samples, cfg, progress)
        for k in KEYS:
            torch.testing.assert_close(native[k], ref[k], atol=1e-6, rtol=0, msg=k)
            assert torch.equal(native[k], python[k]), k


@pytest.mark.parametrize("task", reward_tests.TASKS)
def test_score_native_on_garbage(task):
    sample = reward_tests.scene({"dog": [reward_tests.DOG], "猫": [reward_tests.CAT]}, task=task,
                                answer="A\n[1, 2]", segments=[[1.0, 3.0]])
    texts = list(reward_tests._garbage())
    for mode in ("object_aware", "max", "avg"):
        cfg = RewardConfig(spatial_mode=mode)
        native = score(texts, [sample] * len(texts), cfg, frontend="native")
        python = score(texts, [sample] * len(texts), cfg, frontend="python")
        for k in KEYS:
            assert torch.equal(native[k], python[k]), (mode, k)


# ---------------------------------------------------------------------------------------
# Schema / fake kernels
# ---------------------------------------------------------------------------------------

def test_opcheck():
    # opcheck takes str[] arguments; all its default checks run: the schema (no mutation or
    # aliasing of inputs), autograd registration, the fake kernels (unbacked sizes for the
    # data-dependent outputs) and AOT dispatch.
    texts = [wrap("<obj>a</obj><box>[1,2,3,4]</box> at <t>1</t>s <t>2</t>"), "garbage",
             wrap("é <obj>猫</obj><box>[0,0,1,1]</box> at <t>3</t>")]
    torch.library.opcheck(torch.ops.visioncoach.parse_grounding.default, (texts,))
    torch.library.opcheck(torch.ops.visioncoach.identity_match.default, (["a", "b c", ""], ["b", "a"], 1))
