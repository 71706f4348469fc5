"""The rule-based rewards (docs/method.md section 5). Every reward has one signature:

    reward(completion: str, sample: PromptSample, group: GroupContext) -> float

and returns a value in [0, 1]. The LLM judge is not here: it is asynchronous and may fail (see judge.py)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import jiwer
from rouge_score import rouge_scorer

from data.sample import PromptSample

from .answers import (
    canonical_answer,
    choice_letter,
    extract_answer,
    normalize_text,
    parse_localization,
    parse_number,
)

_TAG = r"</?(?:think|answer)>"
_NO_TAG = rf"(?:(?!{_TAG}).)*"
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)

NUMERICAL_REL_TOL = 1e-3
NUMERICAL_ABS_TOL = 1e-5  # used near zero, where a relative error means nothing


@dataclass
class GroupContext:
    """The completions of one group, for rewards that look across the group (self-consistency)."""

    completions: list[str]
    problem_type: str
    options: list[str]
    numerical: str  # reward.numerical, "binary" or "dense": the R_acc variant for numerical problems

    @classmethod
    def of(cls, completions: list[str], sample: PromptSample, numerical: str) -> GroupContext:
        return cls(list(completions), sample.problem_type, list(sample.options), numerical)

    @cached_property
    def answers(self) -> list[str | None]:
        """The canonical answer of each completion (None where it has none)."""
        return [
            canonical_answer(extract_answer(c), self.problem_type, self.options) for c in self.completions
        ]

    @cached_property
    def majority(self) -> str | None:
        """The most frequent canonical answer; ties go to the smallest answer in string order, so the result
        does not depend on the order of the group. None when no completion has an answer."""
        counts = Counter(a for a in self.answers if a is not None)
        if not counts:
            return None
        top = max(counts.values())
        return min(a for a, n in counts.items() if n == top)


def format_reward(completion: str, sample: PromptSample, group: GroupContext | None = None) -> float:
    """1 if the completion is exactly <think>...</think><answer>...</answer> (whitespace allowed around and
    between the blocks, no nested or repeated tags), else 0."""
    return 1.0 if _FORMAT.fullmatch(completion or "") else 0.0


def accuracy_reward(completion: str, sample: PromptSample, group: GroupContext | None = None) -> float:
    """R_acc on the text inside <answer>, by the sample's problem type; 0 without an answer block."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    if sample.problem_type == "numerical" and group is not None and group.numerical == "dense":
        return numerical_dense(answer, sample)
    return _ACCURACY.get(sample.problem_type, exact_match)(answer, sample)


def self_consistency_reward(completion: str, sample: PromptSample, group: GroupContext) -> float:
    """R_self: 1 if the completion's answer equals its group's majority answer, else 0."""
    answer = canonical_answer(
        extract_answer(completion), group.problem_type or sample.problem_type, sample.options
    )
    return 1.0 if answer is not None and answer == group.majority else 0.0


# --- R_acc per problem type: (answer text, sample) -> float -------------------------------------------


def multiple_choice(answer: str, sample: PromptSample) -> float:
    """1 if the whole answer names the reference option (answers.choice_letter): "b", "B.", "(B)", "B)",
    "B) green", "B. green" or "green" when option B reads green; "a green cube", "A is wrong, B", "A or B" and a
    label with another option's text ("A. green") name nothing and score 0."""
    pred = choice_letter(answer, sample.options)
    gt = choice_letter(sample.answer, sample.options)
    return 1.0 if pred is not None and pred == gt else 0.0


def numerical_binary(answer: str, sample: PromptSample) -> float:
    """1 if the relative error is below 1e-3 (absolute below 1e-5 when the reference is near zero)."""
    pred, gt = parse_number(answer), parse_number(sample.answer)
    if pred is None or gt is None:
        return 0.0
    err = abs(pred - gt)
    if abs(gt) < NUMERICAL_ABS_TOL:
        return 1.0 if err < NUMERICAL_ABS_TOL else 0.0
    return 1.0 if err / abs(gt) < NUMERICAL_REL_TOL else 0.0


def numerical_dense(answer: str, sample: PromptSample) -> float:
    """max(0, 1 - |pred - gt| / |gt|); the binary rule when the reference is near zero."""
    pred, gt = parse_number(answer), parse_number(sample.answer)
    if pred is None or gt is None:
        return 0.0
    if abs(gt) < NUMERICAL_ABS_TOL:
        return numerical_binary(answer, sample)
    return max(0.0, 1.0 - abs(pred - gt) / abs(gt))


def ocr(answer: str, sample: PromptSample) -> float:
    """1 - word error rate (jiwer), clipped at 0. An empty reference matches only an empty answer."""
    ref, hyp = " ".join(sample.answer.split()), " ".join(answer.split())
    if not ref:
        return 1.0 if not hyp else 0.0
    return max(0.0, 1.0 - jiwer.wer(ref, hyp))


class _UnicodeTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9]; this keeps every Unicode word character."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", normalize_text(text))


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_UnicodeTokenizer())


def free_form(answer: str, sample: PromptSample) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F1 scores (rouge-score) against the reference."""
    scores = _ROUGE.score(sample.answer, answer)
    return sum(s.fmeasure for s in scores.values()) / len(scores)


def localization(answer: str, sample: PromptSample) -> float:
    """ "Left: a | Center: b" matched per position: positions whose labels agree, over all positions named by
    the reference or the answer (so extra guessed positions cost). Labels compare normalised."""
    gt, pred = parse_localization(sample.answer), parse_localization(answer)
    positions = set(gt) | set(pred)
    if not positions:
        return exact_match(answer, sample)
    return sum(1 for p in positions if p in gt and gt[p] == pred.get(p)) / len(positions)


def exact_match(answer: str, sample: PromptSample) -> float:
    """Exact string match after normalisation (case, Unicode form, whitespace, surrounding punctuation)."""
    return 1.0 if normalize_text(answer) == normalize_text(sample.answer) else 0.0


_ACCURACY = {
    "multiple_choice": multiple_choice,
    "numerical": numerical_binary,
    "ocr": ocr,
    "free_form": free_form,
    "localization": localization,
}
