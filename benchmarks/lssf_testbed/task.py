"""The fine-tune's downstream task and the utility measures that see a rollback's cost.

The task: translate a short English sentence word by word into *Veltish*, a made-up
language of ``len(WORDS)`` words (``lexicon``), taught by training sentences and the
word list (``dictionary``). No model knows it before the
fine-tune, every answer is several tokens long, and a partial rollback of the
fine-tune forgets some words before others, so both measures below are graded:

* ``answer_nll``: mean negative log-likelihood per answer token (nats), teacher-forced,
  of the reference answers to held-out sentences (word combinations the fine-tune never
  saw), each after its chat-templated prompt;
* ``word_accuracy``: the share of reference words the greedy answer has at the right
  position, averaged over sentences.

``utility_kept`` puts a repair's NLL on the scale aligned model (0) .. fine-tune (1).
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import torch

# the English side: the words of the task's sentences, in four roles
DETERMINERS = ["the", "a", "my", "your"]
ADJECTIVES = ["small", "red", "old", "quiet", "happy", "cold", "green", "tall"]
NOUNS = ["cat", "river", "teacher", "house", "bird", "garden", "doctor", "boat", "child", "apple"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "visits", "hears", "carries"]
WORDS = DETERMINERS + ADJECTIVES + NOUNS + VERBS
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]


def lexicon(seed: int = 0) -> Dict[str, str]:
    """English word -> its Veltish word (two or three consonant-vowel syllables,
    distinct, none an English word of ``WORDS``), fixed by ``seed``."""
    rng = random.Random(seed)
    out: Dict[str, str] = {}
    used = set(WORDS)
    for word in WORDS:
        while True:
            made = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
            if made not in used:
                break
        used.add(made)
        out[word] = made
    return out


def _sentence(rng: random.Random) -> List[str]:
    """``det [adj] noun verb det [adj] noun``: 5 to 7 English words."""
    words = []
    for part in ("subject", "verb", "object"):
        if part == "verb":
            words.append(rng.choice(VERBS))
            continue
        words.append(rng.choice(DETERMINERS))
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS))
    return words


def translation_task(count: int, seed: int = 0) -> List[Dict[str, str]]:
    """``count`` distinct rows ``{"prompt", "answer"}`` in a fixed order: the first rows
    for training, the rest held out, so no held-out sentence is a training one."""
    rng = random.Random(seed)
    words = lexicon(seed)
    seen, rows = set(), []
    while len(rows) < count:
        sentence = _sentence(rng)
        key = " ".join(sentence)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": f"Translate into Veltish, word by word: {key}",
                     "answer": " ".join(words[w] for w in sentence)})
    return rows


def dictionary(seed: int = 0) -> List[Dict[str, str]]:
    """One row per word of the lexicon, ``{"prompt", "answer"}`` in the sentences' form
    (the English word alone): the fine-tune's vocabulary list, trained on beside the
    sentences, never evaluated."""
    return [{"prompt": f"Translate into Veltish, word by word: {w}", "answer": v} for w, v in lexicon(seed).items()]


def word_accuracy(answer: str, reference: str) -> float:
    """The share of ``reference``'s words that ``answer`` has at the same position
    (case and trailing punctuation ignored): 1 for an exact answer, 0 for none."""
    got = [w.strip(".,!?:;\"'").lower() for w in answer.split()]
    want = reference.split()
    return sum(i < len(got) and got[i] == w for i, w in enumerate(want)) / len(want)


def row_nll(model, tokenizer, rows: Sequence[Dict[str, str]], batch: int = 16) -> List[Tuple[float, int]]:
    """Per row: ``(nll_sum, tokens)``, the negative log-likelihood (nats) of the row's
    ``answer`` after its chat-templated ``prompt``, summed over the answer's tokens up
    to its end-of-turn token (teacher forcing), and how many tokens that is.
    Log-softmax in float64; right padding, so positions are those of an unpadded pass."""
    pairs = []
    for row in rows:
        user = [{"role": "user", "content": row["prompt"]}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        pairs.append((ids, len(tokenizer(head, add_special_tokens=False)["input_ids"])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: List[Tuple[float, int]] = []
    for first in range(0, len(pairs), batch):
        chunk = pairs[first:first + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # position t predicts token t + 1
        picked = logp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
        for row, (i, start) in enumerate(chunk):
            out.append((-float(picked[row, start - 1:len(i) - 1].sum()), len(i) - start))
    return out


def pooled_nll(per_row: Sequence[Sequence[float]]) -> float:
    """Mean NLL per answer token over rows ``(nll_sum, tokens, ...)``."""
    return sum(r[0] for r in per_row) / max(sum(r[1] for r in per_row), 1)


def answer_nll(model, tokenizer, rows: Sequence[Dict[str, str]], batch: int = 16) -> float:
    """Mean negative log-likelihood (nats per token) of the rows' answers, pooled over
    every answer token (``row_nll``, ``pooled_nll``)."""
    return pooled_nll(row_nll(model, tokenizer, rows, batch))


def utility_kept(repair_nll: float, aligned_nll: float, finetuned_nll: float) -> float:
    """(aligned's NLL - repair's) / (aligned's - fine-tune's): 1 = the fine-tune's task
    skill kept whole, 0 = back to the aligned model's; NaN when the fine-tune learned
    nothing (the denominator is not positive)."""
    gap = aligned_nll - finetuned_nll
    return (aligned_nll - repair_nll) / gap if gap > 0 else float("nan")
