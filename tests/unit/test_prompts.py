"""The prompt order and the guard against a dataset whose media is mostly unreadable."""

import pytest

from cluster.prompts import PromptOrder, check_skipped
from data.sample import PromptSample


def test_a_few_unreadable_prompts_pass_most_stop_the_job():
    check_skipped(19, 20, "x")  # under 20 skips: never stops (a small dataset with a few bad files)
    check_skipped(30, 60, "x")  # exactly half: goes on
    with pytest.raises(ValueError, match=r"31 of the first 60 prompts have unreadable media; the last: a.mp4: empty"):
        check_skipped(31, 60, "a.mp4: empty")


def test_each_pass_visits_every_prompt_once_with_pass_numbered_keys():
    samples = [PromptSample(id=f"p{i}", question="q", problem_type="numerical", answer="1") for i in range(5)]
    order = PromptOrder(samples, seed=3)
    keys = [order.task(i)[0] for i in range(10)]
    assert sorted(keys[:5]) == [f"p{i}#0" for i in range(5)] and sorted(keys[5:]) == [f"p{i}#1" for i in range(5)]
    assert [order.task(i)[0] for i in range(10)] == keys  # deterministic
