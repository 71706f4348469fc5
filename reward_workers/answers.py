"""Answer extraction and normalisation, shared by the rewards and the evaluation code.

The answer is the text inside the last <answer>...</answer> block. For multiple choice the evaluation may fall
back to the last standalone capital letter of the completion (AVATAR.md section 6)."""

from __future__ import annotations

import math
import re
import unicodedata

import math_verify

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_LEADING_LETTER = re.compile(r"^\(?([A-Za-z])(?:[).:\s]|$)")
_MAX_NUMBER_TEXT = 200  # math-verify runs without its signal timeout (we score in threads): bound its input


def extract_answer(
    completion: str, problem_type: str = "", options: list[str] | None = None, fallback: bool = False
) -> str | None:
    """The stripped text of the last <answer> block, or None. With `fallback` and a multiple-choice problem,
    a completion without an answer block yields its last standalone capital letter (restricted to the option
    letters when `options` is given)."""
    matches = _ANSWER.findall(completion or "")
    if matches:
        return matches[-1].strip()
    if fallback and problem_type == "multiple_choice":
        allowed = option_letters(options) if options else None
        letters = [
            m for m in _STANDALONE_CAPITAL.findall(completion or "") if allowed is None or m in allowed
        ]
        return letters[-1] if letters else None
    return None


def option_letters(options: list[str] | None) -> list[str]:
    """["A. red", "B. green"] -> ["A", "B"]: the leading letter of each option, else A, B, C... by position."""
    letters = []
    for i, opt in enumerate(options or []):
        m = _LEADING_LETTER.match(opt.strip())
        letters.append(m.group(1).upper() if m else chr(ord("A") + i))
    return letters


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, surrounding punctuation stripped."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(text.split()).strip(" .,;:!?\"'")


def choice_letter(answer: str | None, options: list[str] | None = None) -> str | None:
    """The option letter an answer names: "B", "b", "(B)", "B. green" -> "B"; "green" -> "B" when an option
    reads "B. green". None when the answer names no option."""
    if answer is None:
        return None
    text = answer.strip()
    m = _LEADING_LETTER.match(text)
    if m:
        return m.group(1).upper()
    if options:
        wanted = normalize_text(text)
        for letter, opt in zip(option_letters(options), options):
            body = _LEADING_LETTER.sub("", opt.strip(), count=1)
            if wanted and normalize_text(body) == wanted:
                return letter
    return None


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
