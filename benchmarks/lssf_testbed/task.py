"""The fine-tune's downstream task and the utility measures that see a rollback's cost.

The task: translate a short English sentence word by word into *Veltish*, a made-up
language of ``len(WORDS)`` words (``lexicon``), taught by training sentences and the
word list (``dictionary``). No model knows it before the
fine-tune, every answer is several tokens long, and a partial rollback of the
fine-tune forgets some words before others, so both measures below are graded:

* ``answer_nll`` (``mergekit_lssf.measure``): mean negative log-likelihood per answer token (nats), teacher-forced,
  of the reference answers to held-out sentences (word combinations the fine-tune never
  saw), each after its chat-templated prompt;
* ``word_accuracy``: the share of reference words the greedy answer has at the right
  position, averaged over sentences.

``mergekit_lssf.measure.utility_kept`` puts a repair's NLL on the scale aligned model
(0) .. fine-tune (1). The NLL measures (``row_nll``, ``pooled_nll``, ``answer_nll``)
and ``utility_kept`` are the package's (``mergekit_lssf.measure``); only
``word_accuracy``, specific to this task's word-by-word answers, is kept here.
"""

from __future__ import annotations

import random
from typing import Dict, List

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
