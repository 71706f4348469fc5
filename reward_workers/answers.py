"""Answer extraction and normalisation, shared by the rewards and the evaluation code.

The answer is the text inside the last <answer>...</answer> block. A multiple-choice answer names an option
only when it is, as a whole (trimmed, case-folded, NFKC), the option's letter ("A", "a", "A.", "(A)", "A)"),
the letter and the option's own text ("A) red", "A. red", "(A) red") or the option's text alone ("red"): "a red
cube", "C is wrong, B" and "A or B" name no option (issue 15, item 4).

docs/method.md section 6 describes an evaluation fallback (the last standalone capital letter of a completion
without <answer>). It is not implemented: evaluation (cluster/job.py `evaluate`) scores with
`rewards.accuracy_reward`, on the <answer> block only, and a last-capital-letter rule would name B in "C is
wrong, B" and in "A or B", the leaks the strict rule closes."""

from __future__ import annotations

import math
import re
import unicodedata

import math_verify

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# an option's own label: "A. red", "A) red", "A: red", "(A) red"; an option without one is lettered by position
_OPTION_LABEL = re.compile(r"(?:\(([a-z])\)|([a-z])[.):])(?:\s+|$)(.*)", re.DOTALL)
# what an answer may be, after folding (which drops one trailing full stop): a letter alone ("a", "(a)", "a)"),
# or a labelled text ("a) red", "a. red", "(a) red")
_LETTER_ONLY = re.compile(r"\(([a-z])\)|([a-z])\)?")
_LETTER_AND_TEXT = re.compile(r"(?:\(([a-z])\)|([a-z])[.)])\s+(.+)", re.DOTALL)
_MAX_NUMBER_TEXT = 200  # math-verify runs without its signal timeout (we score in threads): bound its input


def extract_answer(completion: str | None) -> str | None:
    """The stripped text of the last <answer> block, or None."""
    matches = _ANSWER.findall(completion or "")
    return matches[-1].strip() if matches else None


def _fold(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed and trimmed, one trailing full stop dropped ("Red ." -> "red")."""
    text = " ".join(unicodedata.normalize("NFKC", text or "").casefold().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _options(options: list[str] | None) -> list[tuple[str, str]]:
    """(letter, folded text) per option: its own label when it has one ("B. green" -> ("B", "green")), else
    A, B, C... by position with the whole option as its text."""
    out = []
    for i, opt in enumerate(options or []):
        folded = " ".join(unicodedata.normalize("NFKC", opt or "").casefold().split())
        m = _OPTION_LABEL.fullmatch(folded)
        if m:
            out.append(((m.group(1) or m.group(2)).upper(), _fold(m.group(3))))
        else:
            out.append((chr(ord("A") + i), _fold(folded)))
    return out


def option_letters(options: list[str] | None) -> list[str]:
    """["A. red", "B. green"] -> ["A", "B"]: the label of each option, else A, B, C... by position."""
    return [letter for letter, _ in _options(options)]


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, surrounding punctuation stripped."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(text.split()).strip(" .,;:!?\"'")


def choice_letter(answer: str | None, options: list[str] | None = None) -> str | None:
    """The option letter an answer names, or None. The whole answer must be the letter ("B", "b", "B.", "(B)",
    "B)"), the letter with its option's text ("B) green", "B. green", "(B) green") or the option's text alone
    ("green" when an option reads "B. green"); comparison is after trimming, case folding and NFKC, and a
    trailing full stop is ignored. With `options`, only their letters count ("D" of three options is None)
    and a label with another option's text ("A. green") is None; without them, a letter alone is all that
    can be checked."""
    if answer is None:
        return None
    text = _fold(answer)
    if not text:
        return None
    parsed = _options(options)
    letters = {letter for letter, _ in parsed}
    m = _LETTER_ONLY.fullmatch(text)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        return letter if not parsed or letter in letters else None
    m = _LETTER_AND_TEXT.fullmatch(text)
    if m:
        letter, body = (m.group(1) or m.group(2)).upper(), _fold(m.group(3))
        return letter if (letter, body) in parsed else None
    named = {letter for letter, body in parsed if body and body == text}
    return named.pop() if len(named) == 1 else None


def parse_number(text: str | None) -> float | None:
    """A finite float from an answer ("3.5", "1,234", "１２", "\\frac{1}{2}", "about 7 apples"), else None.
    Plain float syntax is tried first (math-verify reads "1e400" as 1); NaN and infinities give None."""
    if text is None:
        return None
    s = unicodedata.normalize("NFKC", text).strip().strip("$").strip()
    if not s:
        return None
    try:
        value = float(s.replace(",", ""))
    except ValueError:
        value = None
        for item in math_verify.parse(s[:_MAX_NUMBER_TEXT], parsing_timeout=None):
            try:
                value = float(item)
                break
            except (TypeError, ValueError, OverflowError):
                continue
    if value is None or not math.isfinite(value):
        return None
    return value


def parse_localization(text: str | None) -> dict[str, str]:
    """ "Left: cyclist | Center: girl playing flute" -> {"left": "cyclist", "center": "girl playing flute"}.
    Parts without a "position: label" shape are ignored; "centre" counts as "center"."""
    result: dict[str, str] = {}
    for part in (text or "").split("|"):
        if ":" not in part:
            continue
        key, label = part.split(":", 1)
        key = normalize_text(key)
        key = "center" if key == "centre" else key
        if key:
            result[key] = normalize_text(label)
    return result


def canonical_answer(answer: str | None, problem_type: str, options: list[str] | None = None) -> str | None:
    """A key under which equal answers compare equal (for the majority vote): the option letter, the number
    to 6 significant digits, the normalised localisation map, or the normalised text."""
    if answer is None:
        return None
    if problem_type == "multiple_choice":
        return choice_letter(answer, options)
    if problem_type == "numerical":
        value = parse_number(answer)
        return None if value is None else f"{value:.6g}"
    if problem_type == "localization":
        parts = parse_localization(answer)
        return " | ".join(f"{k}: {v}" for k, v in sorted(parts.items())) or None
    return normalize_text(answer) or None
