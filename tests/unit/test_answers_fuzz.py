"""The strict multiple-choice matcher, fuzzed (hypothesis) in both directions (issue 15, item 4).

Accepted forms of option L with text t ("L", "l", "L.", "(L)", "L)", "L) t", "L. t", "(L) t", "t", any case,
whitespace around) must name L and score 1 against L, 0 against every other letter. Near misses (words
around the letter, other letters present, t inside a longer phrase, L's label on another text) must name no
option and score 0 against every letter."""

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data.sample import PromptSample
from reward_workers.answers import choice_letter
from reward_workers.rewards import GroupContext, accuracy_reward, self_consistency_reward

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every generated word has two letters or more, so no option text and no filler word is itself a letter
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=7)
phrases = st.lists(words, min_size=1, max_size=3).map(" ".join)
cases = st.sampled_from([str, str.lower, str.upper, str.title, str.swapcase])
spaces = st.sampled_from(["", " ", "\n", "  \t "])
seps = st.sampled_from([" ", "  ", "\t", "\n"])
LABELS = ["{L}. {t}", "{L}) {t}", "({L}) {t}", "{L}: {t}", "{t}"]  # how the dataset writes its options


@st.composite
def questions(draw):
    """(options as the dataset writes them, their bare texts, the index of one option)."""
    texts = draw(st.lists(phrases, min_size=2, max_size=5, unique=True))
    style = draw(st.sampled_from(LABELS))
    options = [style.format(L=chr(ord("A") + i), t=t) for i, t in enumerate(texts)]
    return options, texts, draw(st.integers(0, len(texts) - 1))


def letter_forms(letter: str) -> list[str]:
    return [f(x) for x in (letter, letter.lower()) for f in (str, "{}.".format, "({})".format, "{})".format)]


def score(answer: str, options: list[str], gt: str) -> float:
    s = PromptSample(id="q", question="q?", problem_type="multiple_choice", answer=gt, options=options)
    c = f"<think>1. look.</think><answer>{answer}</answer>"
    return accuracy_reward(c, s, GroupContext.of([c], s, "binary"))


def assert_names(answer: str, options: list[str], index: int) -> None:
    letters = [chr(ord("A") + i) for i in range(len(options))]
    assert choice_letter(answer, options) == letters[index], (answer, options)
    for i, gt in enumerate(letters):
        assert score(answer, options, gt) == (1.0 if i == index else 0.0), (answer, options, gt)


def assert_names_nothing(answer: str, options: list[str]) -> None:
    assert choice_letter(answer, options) is None, (answer, options)
    for i in range(len(options)):
        assert score(answer, options, chr(ord("A") + i)) == 0.0, (answer, options)


# --- accepted forms -------------------------------------------------------------------------------------


@FUZZ
@given(q=questions(), data=st.data(), left=spaces, right=spaces, sep=seps, case=cases)
def test_accepted_forms_name_their_option(q, data, left, right, sep, case):
    options, texts, i = q
    letter, text = chr(ord("A") + i), case(texts[i])
    lab = data.draw(st.sampled_from(["{}.", "{})", "({})"]))
    forms = [
        data.draw(st.sampled_from(letter_forms(letter))),
        lab.format(data.draw(st.sampled_from([letter, letter.lower()]))) + sep + text,
        text,
        text + ".",
    ]
    for form in forms:
        assert_names(left + form + right, options, i)


# --- near misses ----------------------------------------------------------------------------------------


@FUZZ
@given(q=questions(), data=st.data(), before=phrases, after=phrases, sep=seps)
def test_extra_words_around_the_letter(q, data, before, after, sep):
    options, _, i = q
    form = data.draw(st.sampled_from(letter_forms(chr(ord("A") + i))))
    bare = data.draw(st.sampled_from([chr(ord("A") + i), chr(ord("a") + i)]))
    # a label followed by words is "L) t" and counts when the words are L's text: those words are filler
    for answer in [before + sep + form, bare + sep + after, before + sep + form + sep + after,
                   f"the answer is {form}", f"{bare} is correct"]:
        assert_names_nothing(answer, options)


@FUZZ
@given(q=questions(), data=st.data(), join=st.sampled_from([" ", " or ", ", ", " and ", "/", " & ", "; ",
                                                             " is wrong, ", " not ", "-"]))
def test_two_letters(q, data, join):
    options, texts, i = q
    j = data.draw(st.integers(0, len(options) - 1))
    first = data.draw(st.sampled_from(letter_forms(chr(ord("A") + i))))
    second = data.draw(st.sampled_from(letter_forms(chr(ord("A") + j))))
    assert_names_nothing(first + join + second, options)
    glued = chr(ord("A") + i) + chr(ord("A") + j)  # "AB"
    assume(glued.casefold() not in texts)  # unless an option's text is "ab"
    assert_names_nothing(glued, options)


@FUZZ
@given(q=questions(), before=phrases, after=phrases, case=cases, article=st.sampled_from(["a", "A", "the"]))
def test_option_text_inside_a_longer_phrase(q, before, after, case, article):
    options, texts, i = q
    text = case(texts[i])
    for answer in [f"{before} {text}", f"{text} {after}", f"{before} {text} {after}", f"{article} {text}"]:
        assume(answer.casefold() not in texts)  # "dark red" is an option's whole text when one reads so
        assert_names_nothing(answer, options)
    both = f"{text} or {texts[(i + 1) % len(texts)]}"
    assume(both.casefold() not in texts)
    assert_names_nothing(both, options)


@FUZZ
@given(q=questions(), data=st.data(), other=phrases, sep=seps)
def test_label_with_text_that_is_not_its_own(q, data, other, sep):
    options, texts, i = q
    j = data.draw(st.integers(0, len(texts) - 1).filter(lambda k: k != i))
    label = data.draw(st.sampled_from(["{}.", "{})", "({})"])).format(chr(ord("A") + i))
    assert_names_nothing(label + sep + texts[j], options)  # "A. green" when green is B
    assume(other != texts[i])
    assert_names_nothing(label + sep + other, options)
    assert_names_nothing(f"{label}{sep}{texts[i]} {other}", options)  # its own text, then more


@FUZZ
@given(q=questions(), answer=st.text(max_size=30))
def test_any_text_names_one_option_or_none(q, answer):
    options, _, _ = q
    assert choice_letter(answer, options) in {None, *(chr(ord("A") + i) for i in range(len(options)))}


def test_self_consistency_counts_only_strict_answers():
    # the lax matcher read "A or B" and "a red cube" as A and "C is wrong, B" as C, so A would win 2 to 1
    options = ["A. red", "B. green", "C. blue"]
    s = PromptSample(id="q", question="q?", problem_type="multiple_choice", answer="B", options=options)
    comps = [f"<think>x</think><answer>{a}</answer>" for a in ["A or B", "C is wrong, B", "a red cube", "(b)"]]
    g = GroupContext.of(comps, s, "binary")
    assert g.answers == [None, None, None, "B"]
    assert g.majority == "B"
    assert [self_consistency_reward(c, s, g) for c in comps] == [0.0, 0.0, 0.0, 1.0]
