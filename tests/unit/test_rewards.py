"""Rule-based rewards and answer extraction, on crafted completions with hand-computed expected values."""

import pytest

from data.sample import PromptSample
from reward_workers.answers import canonical_answer, extract_answer, parse_localization, parse_number
from reward_workers.rewards import GroupContext, accuracy_reward, format_reward, self_consistency_reward

OPTIONS = ["A. red", "B. green", "C. blue"]


def sample(problem_type: str, answer: str, options=None) -> PromptSample:
    return PromptSample(
        id="s", question="q?", problem_type=problem_type, answer=answer, options=options or []
    )


def done(answer: str) -> str:
    return f"<think>1. look. 2. count.</think><answer>{answer}</answer>"


def acc(answer_text: str, s: PromptSample, numerical: str = "binary") -> float:
    c = done(answer_text)
    return accuracy_reward(c, s, GroupContext.of([c], s, numerical))


# --- format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>1. a</think><answer>B</answer>", 1.0),
        ("  \n<think>x</think>\n\n<answer>y</answer>\n ", 1.0),  # whitespace around and between
        ("<think>étape 1: 猫が三匹</think><answer>三 🐱</answer>", 1.0),  # unicode inside
        ("<think></think><answer></answer>", 1.0),  # empty blocks are still the structure
        ("Sure! <think>x</think><answer>y</answer>", 0.0),  # text before
        ("<think>x</think><answer>y</answer> Hope this helps.", 0.0),  # text after
        ("<think>x</think> so <answer>y</answer>", 0.0),  # text between
        ("<answer>y</answer>", 0.0),  # no think
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>y</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>y</answer><answer>z</answer>", 0.0),  # repeated answer
        ("<think>a <think>b</think></think><answer>y</answer>", 0.0),  # nested
        ("<think>x<answer>y</answer>", 0.0),  # unclosed think
        ("<THINK>x</THINK><ANSWER>y</ANSWER>", 0.0),  # tags are exact
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, sample("free_form", "y"), None) == expected


# --- extraction ---------------------------------------------------------------------------------------


def test_extract_answer_last_block_and_strip():
    assert extract_answer("<answer> A </answer> no wait <answer>\nC\n</answer>") == "C"
    assert extract_answer("<think>x</think><answer>B") is None  # unclosed
    assert extract_answer("") is None
    assert extract_answer(None) is None


def test_extract_answer_has_no_capital_letter_fallback():
    # docs/method.md section 6's evaluation fallback (last standalone capital letter) is not implemented: nothing
    # evaluates with it (cluster/job.py scores <answer> only) and it would read B out of these
    for text in ["I think A is wrong, so the answer is B.", "C is wrong, B", "A or B"]:
        assert extract_answer(text) is None
    assert extract_answer("<answer>C</answer> B") == "C"


def test_parse_number():
    assert parse_number("3.5") == 3.5
    assert parse_number("1,234") == 1234.0
    assert parse_number("１２") == 12.0  # full-width digits
    assert parse_number("about 7 apples") == 7.0  # math-verify reads numbers out of text
    assert parse_number("\\frac{1}{2}") == 0.5
    assert parse_number("$-3$") == -3.0
    assert parse_number("1e308") == 1e308
    for bad in ["1e400", "-1e999", "NaN", "nan", "inf", "Infinity", "", "   ", "seven", None]:
        assert parse_number(bad) is None, bad


def test_parse_localization():
    assert parse_localization("Left: Cyclist | Centre: girl  playing flute | junk") == {
        "left": "cyclist",
        "center": "girl playing flute",
    }
    assert parse_localization("no positions") == {}


# --- accuracy per problem type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("B", 1.0),
        ("b", 1.0),
        ("(B)", 1.0),
        ("B. green", 1.0),
        ("green", 1.0),
        (" B ", 1.0),
        ("C", 0.0),
        ("blue", 0.0),
        ("", 0.0),
        ("Bee", 0.0),
        ("ß", 0.0),
        # the strict rule (issue 15, item 4): the whole answer must be the letter or the option text
        ("B.", 1.0),
        ("B)", 1.0),
        ("b) green", 1.0),
        ("(B) Green.", 1.0),
        ("GREEN", 1.0),
        ("a green cube", 0.0),  # option text inside a longer phrase
        ("green cube", 0.0),
        ("the answer is B", 0.0),  # extra words around the letter
        ("B is right", 0.0),
        ("C is wrong, B", 0.0),  # other letters present
        ("A or B", 0.0),  # two letters
        ("B, C", 0.0),
        ("B. blue", 0.0),  # B's label with C's text contradicts itself
        ("B green", 0.0),  # no separator: "a green" would be the article
        ("B:", 0.0),
        ("B..", 0.0),
        ("D", 0.0),  # not an option's letter
    ],
)
def test_multiple_choice(pred, expected):
    assert acc(pred, sample("multiple_choice", "B", OPTIONS)) == expected


def test_multiple_choice_needs_answer_block():
    s = sample("multiple_choice", "B", OPTIONS)
    for c in ["The answer is B", "<answer>B", "", "<think>B</think>"]:
        assert accuracy_reward(c, s, GroupContext.of([c], s, "binary")) == 0.0
    # text outside the tags does not matter to R_acc (R_format takes care of it)
    assert accuracy_reward("blah <answer>B</answer> blah", s, None) == 1.0


@pytest.mark.parametrize(
    "gt, pred, binary, dense",
    [
        ("10", "10", 1.0, 1.0),
        ("10", "10.005", 1.0, 0.9995),  # relative error 5e-4 < 1e-3
        ("10", "10.02", 0.0, 0.998),  # 2e-3
        ("10", "12", 0.0, 0.8),
        ("10", "30", 0.0, 0.0),  # clipped at 0
        ("10", "-10", 0.0, 0.0),
        ("0", "0.000001", 1.0, 1.0),  # near zero: absolute tolerance 1e-5
        ("0", "0.001", 0.0, 0.0),
        ("7", "about 7 apples", 1.0, 1.0),
        ("1234", "1,234", 1.0, 1.0),
        ("12", "１２", 1.0, 1.0),
        ("0.5", "\\frac{1}{2}", 1.0, 1.0),
        ("1e308", "1e308", 1.0, 1.0),  # huge but finite
        ("1e308", "1e400", 0.0, 0.0),  # overflows to inf
        ("5", "NaN", 0.0, 0.0),
        ("5", "inf", 0.0, 0.0),
        ("5", "five", 0.0, 0.0),
        ("5", "", 0.0, 0.0),
        ("NaN", "NaN", 0.0, 0.0),  # a broken reference never rewards
    ],
)
def test_numerical(gt, pred, binary, dense):
    s = sample("numerical", gt)
    assert acc(pred, s, "binary") == binary
    assert acc(pred, s, "dense") == pytest.approx(dense, abs=1e-12)


def test_ocr_one_minus_wer():
    s = sample("ocr", "hello world foo")
    assert acc("hello world foo", s) == 1.0
    assert acc("hello  world\nfoo", s) == 1.0  # whitespace does not count
    assert acc("hello word foo", s) == pytest.approx(2 / 3)  # 1 substitution / 3 words
    assert acc("hello world", s) == pytest.approx(2 / 3)  # 1 deletion
    assert acc("a b c d e f g", s) == 0.0  # WER 7/3, clipped
    assert acc("", s) == 0.0
    assert acc("", sample("ocr", "")) == 1.0 and acc("x", sample("ocr", "")) == 0.0
    assert acc("東京 タワー", sample("ocr", "東京 タワー")) == 1.0


def test_free_form_rouge_mean():
    s = sample("free_form", "the cat sat on the mat")
    # R1 F = 10/11 (5/5 precision, 5/6 recall); R2 F = 2/3 (3/4, 3/5); RL F = 10/11 (LCS 5)
    assert acc("the cat on the mat", s) == pytest.approx((10 / 11 + 2 / 3 + 10 / 11) / 3)
    assert acc("The cat sat on the mat.", s) == pytest.approx(1.0)
    assert acc("dogs bark loudly", s) == 0.0
    assert acc("", s) == 0.0
    # unicode words count (rouge-score's default tokenizer would drop them): 2 of 3 words, one bigram of 2
    u = sample("free_form", "le café noir")
    assert acc("le café", u) == pytest.approx((0.8 + 2 / 3 + 0.8) / 3)


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("Left: cyclist | Center: girl playing flute", 1.0),
        ("center: Girl playing  flute | left: CYCLIST", 1.0),  # order, case, spaces
        ("Left: cyclist | Centre: girl playing flute", 1.0),
        ("Left: cyclist | Center: dog", 0.5),
        ("Left: cyclist", 0.5),
        ("Left: cyclist | Center: girl playing flute | Right: car", 2 / 3),  # an extra guess costs
        ("Right: cyclist", 0.0),
        ("cyclist, girl", 0.0),
        ("", 0.0),
    ],
)
def test_localization(pred, expected):
    assert acc(pred, sample("localization", "Left: cyclist | Center: girl playing flute")) == pytest.approx(
        expected
    )


def test_default_exact_match():
    s = sample("something_else", "Red Ball")
    assert acc("red  ball.", s) == 1.0
    assert acc("red balls", s) == 0.0
    assert acc("ｒｅｄ ｂａｌｌ", s) == 1.0  # NFKC


# --- self-consistency ---------------------------------------------------------------------------------


def self_rewards(answers, s):
    comps = [done(a) if a is not None else "no answer here" for a in answers]
    g = GroupContext.of(comps, s, "binary")
    return [self_consistency_reward(c, s, g) for c in comps], g.majority


def test_self_majority():
    s = sample("multiple_choice", "C", OPTIONS)
    assert self_rewards(["A", "a", "B", "(A)"], s) == ([1.0, 1.0, 0.0, 1.0], "A")


def test_self_tie_is_broken_by_order_independent_rule():
    s = sample("multiple_choice", "C", OPTIONS)
    assert self_rewards(["B", "A", "B", "A"], s) == ([0.0, 1.0, 0.0, 1.0], "A")
    assert self_rewards(["A", "B", "A", "B"], s) == ([1.0, 0.0, 1.0, 0.0], "A")
    assert self_rewards(["C", "B"], s) == ([0.0, 1.0], "B")


def test_self_missing_answers_never_win():
    s = sample("multiple_choice", "C", OPTIONS)
    assert self_rewards([None, None, "B"], s) == ([0.0, 0.0, 1.0], "B")
    assert self_rewards([None, None], s) == ([0.0, 0.0], None)
    assert self_rewards([], s) == ([], None)


def test_self_numerical_and_text_canonical():
    n = sample("numerical", "0")
    assert self_rewards(["3", "3.0", "1,000", "1000", "1000.0", "nan"], n) == ([0, 0, 1, 1, 1, 0], "1000")
    t = sample("free_form", "x")
    assert self_rewards(["Red ball", "red ball.", "blue"], t) == ([1, 1, 0], "red ball")
    assert canonical_answer("Center: a | Left: b", "localization") == canonical_answer(
        "left: B|center: A", "localization"
    )
