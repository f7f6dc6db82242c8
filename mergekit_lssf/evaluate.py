"""``mergekit-lssf eval``: refusal rate, over-refusal, perplexity (and task accuracy).

``measure_model`` measures a loaded model; ``eval`` (``evaluate``) and ``tune`` both
call it, so their figures are one computation.

Greedy generation with the model's chat template (one user turn). A response counts
as a refusal when ``is_refusal`` finds one of ``REFUSAL_MARKERS`` (case-insensitive)
in its first ``REFUSAL_WINDOW`` characters (see ``measure.py``, where the detector
and every measure live; they are importable from here too). The shipped prompt sets
and prose are read here (``harmbench_prompts``, ``benign_prompts``, ``benign_text``).
"""

from __future__ import annotations

import binascii
import json
import os
import re
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from mergekit_lssf.generation import generate, load_model
from mergekit_lssf.guards import check_model_folder

# the detector and the measures live in measure.py; importable from here under their old names too
from mergekit_lssf.measure import (  # noqa: F401
    REFUSAL_MARKERS,
    REFUSAL_WINDOW,
    bootstrap_interval,
    empty_rate,
    is_refusal,
    perplexity,
    pooled_nll,
    refusal_rate,
    row_nll,
)
from mergekit_lssf.parameters import LSSFConfigError


def _data(path: str) -> str:
    return resources.files("mergekit_lssf").joinpath(path).read_text("utf-8")


def harmbench_prompts(split: str = "test") -> List[str]:
    rows = [json.loads(line) for line in _data("data/harmbench/prompts.jsonl").splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] == split]


def benign_prompts(split: str = "test") -> List[str]:
    rows = [json.loads(line) for line in _data("data/benign/prompts.jsonl").splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] == split]


def benign_text() -> str:
    return _data("data/benign/text.txt")


def read_prompts(path: str) -> List[str]:
    """A file of prompts: JSONL with a "prompt" field, or plain text, one per line."""
    prompts = []
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            line = line.strip()
            if line:
                prompts.append(json.loads(line)["prompt"] if line.startswith("{") else line)
    return prompts


def measure_model(model, tokenizer, *, harmful: Mapping[str, Sequence[str]], benign: Sequence[str],
                  text: Optional[str] = None, rows: Optional[Sequence[Dict[str, str]]] = None, per_row=None,
                  max_new_tokens: int = 48, batch_size: int = 16, progress: bool = True) -> Dict:
    """Every measure of a loaded model, one implementation for ``eval`` (``evaluate``)
    and ``tune``: per harmful set (``{name: prompts}``) its greedy ``answers``,
    ``refused`` (0/1 per prompt, ``is_refusal``), ``refusal`` (``refusal_rate``),
    ``empty`` (``empty_rate``) and ``spread`` (``bootstrap_interval`` of the refusals);
    ``benign_answers`` and ``over_refusal`` on ``benign``; ``perplexity`` on ``text``
    (when given); ``task_nll`` and ``task_rows`` (``row_nll``, ``pooled_nll``) on
    ``rows`` (``{"prompt", "answer"}``, when given; ``per_row``: their ``row_nll``,
    when already computed). A set without prompts has rate 0 and no spread."""
    out: Dict = {"answers": {}, "refused": {}, "refusal": {}, "empty": {}, "spread": {}}
    for name, prompts in harmful.items():
        answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc=f"{name} prompts")
        out["answers"][name] = answers
        out["refused"][name] = [int(is_refusal(a)) for a in answers]
        out["refusal"][name] = refusal_rate(answers) if answers else 0.0
        out["empty"][name] = empty_rate(answers) if answers else 0.0  # neither refusal nor compliance
        if answers:
            out["spread"][name] = list(bootstrap_interval(out["refused"][name]))
    out["benign_answers"] = generate(model, tokenizer, benign, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     progress=progress, desc="benign prompts")
    out["over_refusal"] = refusal_rate(out["benign_answers"]) if benign else 0.0
    if text:
        out["perplexity"] = perplexity(model, tokenizer, text)
    if rows is not None:
        per_row = per_row if per_row is not None else row_nll(model, tokenizer, rows, batch=batch_size)
        out["task_nll"], out["task_rows"] = pooled_nll(per_row), [list(r) for r in per_row]
    return out


def evaluate(model_dir: str, *, harmful: Sequence[str], benign: Sequence[str], text: Optional[str] = None,
             task: Optional[Sequence[Dict[str, str]]] = None, max_new_tokens: int = 48, batch_size: int = 16,
             device: str = "cpu", progress: bool = True, keep_responses: bool = True,
             tokenizer_source: Optional[str] = None, rows: Optional[Sequence[Dict[str, str]]] = None) -> Dict:
    """Refusal rate on ``harmful``, over-refusal on ``benign``, perplexity on ``text``,
    task NLL on ``rows`` (``{"prompt", "answer"}``: ``task_nll``, ``task_rows``) and
    accuracy on ``task`` (``{"prompt", "label"}``: the answer's first word), measured
    by ``measure_model``. ``tokenizer_source``: where the tokenizer comes from when
    ``model_dir`` has none (see ``find_tokenizer``); default: ``model_dir`` itself."""
    model, tokenizer = _load(model_dir, tokenizer_source or model_dir, device)
    measured = measure_model(model, tokenizer, harmful={"harmful": harmful}, benign=benign, text=text, rows=rows,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    harmful_answers, benign_answers = measured["answers"]["harmful"], measured["benign_answers"]
    result = {
        "model": model_dir,
        # no prompts in a set: 0, not an error (measure's rates refuse an empty set)
        "refusal_rate": measured["refusal"]["harmful"],
        "over_refusal_rate": measured["over_refusal"],
        "empty_rate": measured["empty"]["harmful"],
        "harmful_prompts": len(harmful),
        "benign_prompts": len(benign),
        "max_new_tokens": max_new_tokens,
    }
    if text:
        result["perplexity"] = measured["perplexity"]
    if rows is not None:
        result["task_nll"], result["task_rows"] = measured["task_nll"], measured["task_rows"]
    if task:
        answers = generate(model, tokenizer, [t["prompt"] for t in task], max_new_tokens=4, batch_size=batch_size, progress=progress, desc="task")
        first = [a.strip().split()[0].strip(".,!").lower() if a.strip() else "" for a in answers]
        result["task_accuracy"] = sum(f == t["label"] for f, t in zip(first, task)) / len(task)
    if keep_responses:
        result["responses"] = {"harmful": responses(harmful, harmful_answers), "benign": responses(benign, benign_answers)}
    return result


def responses(prompts: Sequence[str], answers: Sequence[str]) -> List[Dict]:
    """``[{"prompt", "response", "refused"}, ...]``: each answer with its own verdict."""
    return [{"prompt": p, "response": a, "refused": is_refusal(a)} for p, a in zip(prompts, answers)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# mergekit 0.1.5 names a merged ``BASE+LORA`` in --lora-merge-cache
# ``{basename(BASE)}_{crc32(BASE)}_{basename(LORA)}_{crc32(LORA)}`` (ModelReference.merged)
# and writes only config.json and weights there: no tokenizer, and transformers >= 5
# no longer records BASE in config.json's ``_name_or_path``.


def has_tokenizer(folder: str) -> bool:
    return os.path.isdir(folder) and bool(set(os.listdir(folder)) & set(TOKENIZER_FILES))


def _load(model_dir: str, tokenizer_source: str, device: str):
    """``load_model``, with the tokenizer from ``tokenizer_source`` when it is not
    ``model_dir`` (a folder or a hub id)."""
    if tokenizer_source == model_dir:
        return load_model(model_dir, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LSSFConfigError(f"model: {model_dir} holds no tokenizer and the one of {tokenizer_source} could not be "
                              f"loaded ({reason}); pass --tokenizer PATH") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def _usable(source: str) -> bool:
    """A local folder with a tokenizer, or what can only be a hub id."""
    if os.path.exists(source):
        return has_tokenizer(source)
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source))


def _crc(path: str) -> str:
    return str(binascii.crc32(path.encode()))


def _cache_name_parts(folder: str):
    """Every ``(BASE name, crc, LORA name, crc)`` reading of a --lora-merge-cache folder
    name ``{BASE}_{crc}_{LORA}_{crc}`` (either name may itself hold ``_digits_``)."""
    end = re.match(r"^(?P<rest>.+)_(?P<lcrc>\d+)$", folder)
    if not end:
        return
    rest = end.group("rest")
    for m in re.finditer(r"_(\d+)_", rest):
        if m.start() > 0 and m.end() < len(rest):
            yield rest[:m.start()], m.group(1), rest[m.end():], end.group("lcrc")


def _hub_match(name: str, crc: str) -> Optional[str]:
    """A hub id in the Hugging Face cache whose name and crc32 match (nothing downloaded)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        for entry in sorted(os.listdir(HF_HUB_CACHE)):
            if entry.startswith("models--") and entry.endswith("--" + name):
                hub_id = entry[len("models--"):].replace("--", "/")
                if _crc(hub_id) == crc:
                    return hub_id
    except (ImportError, OSError):
        pass
    return None


def _local_match(name: str, crc: str, model_dir: str) -> Optional[str]:
    """A local folder named ``name`` whose path, spelled as a recipe would spell it
    relative to where mergekit-yaml ran (here, or the folder holding the cache), has
    crc32 ``crc``; up to 4 levels deep."""
    cache_parent = os.path.dirname(os.path.dirname(os.path.abspath(model_dir)))
    for root in dict.fromkeys([os.getcwd(), cache_parent]):
        for here, dirs, _ in os.walk(root):
            depth = os.path.relpath(here, root).count(os.sep) + (here != root)
            dirs[:] = [] if depth >= 4 else sorted(d for d in dirs if not d.startswith("."))
            if os.path.basename(here) != name or here == root:
                continue
            rel = os.path.relpath(here, root)
            spellings = [rel, "./" + rel, here, os.path.relpath(here)]
            spellings += [s + "/" for s in spellings]
            if any(_crc(spelling) == crc for spelling in spellings):
                return here
    return None


def _lora_cache_sources(model_dir: str) -> List[str]:
    """Where the tokenizer of a ``BASE+LORA`` that mergekit merged into ``model_dir`` (a
    folder in --lora-merge-cache) may come from, in order: the adapter folder (PEFT
    saves one there when the fine-tune added tokens), then ``BASE`` (the path recorded
    in config.json's ``_name_or_path``, transformers < 5, else the hub id or local
    folder whose name and crc32 match the folder's name)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fp:
            recorded = json.load(fp).get("_name_or_path") or ""
    except (OSError, ValueError):
        recorded = ""
    recorded = [recorded] if recorded and os.path.abspath(recorded) != os.path.abspath(model_dir) else []
    for name, crc, lora_name, lora_crc in _cache_name_parts(os.path.basename(os.path.normpath(model_dir))):
        lora = _local_match(lora_name, lora_crc, model_dir)
        base = recorded or [_hub_match(name, crc) or _local_match(name, crc, model_dir)]
        if lora or base[0]:
            sources = ([lora] if lora else []) + [b for b in base if b]
            break
    else:
        sources = recorded
    return [s for s in sources if _usable(s)]


def find_tokenizer(model_dir: str, tokenizer: Optional[str] = None) -> str:
    """Where ``model_dir``'s tokenizer comes from: the folder itself when it holds one,
    else ``tokenizer`` (--tokenizer) when given, else, for a ``BASE+LORA`` that mergekit
    merged in --lora-merge-cache (which holds no tokenizer), the adapter's own tokenizer
    when it saved one, else ``BASE``. A one-line error
    naming the folder and --tokenizer when none is found."""
    if has_tokenizer(model_dir):
        return model_dir
    if tokenizer:
        if os.path.isdir(tokenizer) and not has_tokenizer(tokenizer):
            raise LSSFConfigError(f"--tokenizer: {tokenizer} holds no tokenizer (tokenizer.json or tokenizer_config.json)")
        return tokenizer
    sources = _lora_cache_sources(model_dir)
    if sources:
        return sources[0]
    raise LSSFConfigError(f"model: {model_dir} holds no tokenizer (tokenizer.json or tokenizer_config.json) and is not "
                          "a mergekit --lora-merge-cache folder whose base model was found; pass --tokenizer PATH "
                          "(the fine-tune's base model folder or hub id)")


def check_model_dir(model_dir: str, tokenizer: Optional[str] = None) -> str:
    """A model folder to evaluate: config and weights, named in the error when missing;
    returns where its tokenizer comes from (``find_tokenizer``)."""
    check_model_folder(model_dir, "model", local=True)
    return find_tokenizer(model_dir, tokenizer)


def side_by_side(results: Sequence[Dict]) -> str:
    """One table, a row per model: refusal, over-refusal, empty answers, perplexity."""
    width = max(len("model"), *(len(r["model"]) for r in results))
    lines = [f"{'model':{width}s}  refusal  over-refusal  empty  perplexity"]
    for r in results:
        lines.append(f"{r['model']:{width}s}  {r['refusal_rate']:7.3f}  {r['over_refusal_rate']:12.3f}  "
                     f"{r['empty_rate']:5.3f}  {r.get('perplexity', float('nan')):10.2f}")
    n = results[0]
    lines.append(f"({n['harmful_prompts']} harmful and {n['benign_prompts']} benign prompts, the same for every model)")
    return "\n".join(lines)
