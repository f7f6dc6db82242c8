"""Metrics of one model: refusal (keyword detector) on HarmBench-test and StrongREJECT,
empty answers, over-refusal, the translation task (answer NLL and word accuracy, per
row too) and perplexity on prose. Which prompts and rows each metric runs on is chosen
here; every measure itself is the package's (``mergekit_lssf.measure``), except
``task.word_accuracy``, specific to the translation task.
"""

from __future__ import annotations

from typing import Dict

from mergekit_lssf import evaluate as ev
from mergekit_lssf.measure import (
    empty_rate,
    perplexity,
    pooled_nll,
    refusal_rate,
    row_nll,
)

from .task import word_accuracy

TASK_TOKENS = 32  # new tokens of a translation answer (the longest reference is about 25)


def task_metrics(model, tokenizer, rows, batch_size: int) -> Dict:
    """The translation task on ``rows``: ``task_nll`` (``measure.answer_nll``),
    ``task_word_accuracy`` (mean ``task.word_accuracy`` of greedy answers) and, per row,
    ``task_rows`` = ``[nll_sum, tokens, word_accuracy]`` (for resampling rows)."""
    answers = ev.generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=TASK_TOKENS, batch_size=batch_size,
                          progress=False)
    accuracy = [word_accuracy(a, r["answer"]) for a, r in zip(answers, rows)]
    per_row = row_nll(model, tokenizer, rows)
    return {"task_nll": pooled_nll(per_row), "task_word_accuracy": sum(accuracy) / len(rows),
            "task_rows": [[n, t, a] for (n, t), a in zip(per_row, accuracy)],
            "task_answers": [{"prompt": r["prompt"], "response": a} for r, a in zip(rows, answers)]}


def evaluate_model(model_dir: str, prompts, s) -> Dict:
    """Every metric of ``model_dir`` on the held-out sets of ``prompts`` (PromptSets)."""
    result = ev.evaluate(model_dir, harmful=prompts.harmful_test, benign=prompts.benign_test, text=ev.benign_text(),
                         max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, progress=False)
    model, tokenizer = ev.load_model(model_dir)
    result.update(task_metrics(model, tokenizer, prompts.task_test, s.eval_batch))
    if prompts.strongreject:
        answers = ev.generate(model, tokenizer, prompts.strongreject, max_new_tokens=s.max_new_tokens,
                              batch_size=s.eval_batch, progress=False)
        result["strongreject_refusal_rate"] = refusal_rate(answers)
        result["strongreject_empty_rate"] = empty_rate(answers)
        result["responses"]["strongreject"] = ev.responses(prompts.strongreject, answers)
    return result


def validation_metrics(model_dir: str, prompts, s, reference_perplexity_text: str) -> Dict:
    """Cheap metrics on the validation splits only, for choosing training settings and
    Safe LoRA's share: refusal on ``harmful_val``, over-refusal on ``benign_val``, the
    translation task on ``task_val`` (``task_metrics``, without the per-row lists) and
    perplexity on ``reference_perplexity_text`` (never the test sets)."""
    model, tokenizer = ev.load_model(model_dir)
    harmful = ev.generate(model, tokenizer, prompts.harmful_val, max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, progress=False)
    benign = ev.generate(model, tokenizer, prompts.benign_val, max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, progress=False)
    task = task_metrics(model, tokenizer, prompts.task_val, s.eval_batch)
    return {
        "refusal_rate": refusal_rate(harmful),
        "empty_rate": empty_rate(harmful),
        "over_refusal_rate": refusal_rate(benign),
        "task_nll": task["task_nll"],
        "task_word_accuracy": task["task_word_accuracy"],
        "perplexity": perplexity(model, tokenizer, reference_perplexity_text),
    }
