"""A task-flip suite: answers must survive the modification, not only the perplexity.

Accuracy can hold while many answers flip between right and wrong (Dutta et al. 2024,
"Accuracy is Not All You Need"), so the budgets below bound both. Run with the bundled model
and its shipped cloze task, or your own multiple-choice files::

    pytest examples/flips --hemorrhage-model=hemorrhage-tiny
    pytest examples/flips --hemorrhage-model=DIR --hemorrhage-tasks=arc.jsonl,piqa.jsonl

Each task file is ``.jsonl`` with ``context``, ``choices`` and ``answer`` (index) per line; the
report (``--hemorrhage-report=r.json``) holds each task's flip matrix and McNemar p-value.
"""

from __future__ import annotations

import pytest


@pytest.mark.hemorrhage(accuracy_drop=0.02, flip_rate=0.05)
@pytest.mark.parametrize("bits", [8, 6])
def test_quantization_keeps_answers(hemorrhage, bits):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=bits))


# With confidence, a small task does not fail on sampling noise: only when the one-sided
# 95% upper bound of the flip rate exceeds the budget.
@pytest.mark.hemorrhage(flip_rate=0.10, kl_mean=0.05, confidence=0.95)
def test_light_pruning_keeps_answers(hemorrhage):
    hemorrhage.check(hemorrhage.measure("prune.magnitude", sparsity=0.2))


@pytest.mark.hemorrhage(flip_rate=1.0)  # naming a task metric makes measure() score the tasks
def test_flips_are_paired(hemorrhage):
    result = hemorrhage.measure("quant.rtn", bits=3)
    for name, task in result.details["tasks"].items():
        acc = task["acc"]
        # accuracy_drop is the net of flips in both directions; flip_rate counts them all
        net = (acc["correct_to_incorrect"] - acc["incorrect_to_correct"]) / task["items"]
        assert acc["drop"] == pytest.approx(net), name
        assert acc["flip_rate"] >= abs(acc["drop"]), name
        assert 0 <= acc["mcnemar_p"] <= 1, name
    hemorrhage.check(result)
