"""Supervised fine-tuning on (prompt, response) pairs: full-parameter or LoRA.

Each pair is rendered with the model's chat template as one user and one assistant
turn; the loss is on the response tokens only. Optional plain-text replay examples
(``(context, continuation)``, no chat template) add language-model loss on the
continuation tokens. A LoRA run saves its adapter (for the ``patch-reapplied``
control) and the model with the adapter merged into the weights.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_lssf.evaluate import load_model

from .settings import ATTENTION_AND_MLP

MAX_TOKENS = 192  # every training example is cut to this many tokens


def is_done(path: str) -> bool:
    """A complete model folder (written atomically by ``save``)."""
    return os.path.exists(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path))


def save(model, tokenizer, path: str, dtype: str = "float32") -> None:
    """``model`` (cast to ``dtype`` first) and ``tokenizer`` written to ``path`` at once."""
    model = model.to(getattr(torch, dtype))
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def store(source: str, path: str, dtype: str) -> None:
    """A copy of model folder ``source`` at ``path`` with its weights cast to ``dtype``
    (round to nearest), as a released checkpoint would be stored; nothing when
    ``path`` is complete."""
    if not is_done(path):
        save(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), AutoTokenizer.from_pretrained(source), path,
             dtype)


def _examples(tokenizer, pairs: List[Tuple[str, str]]):
    examples = []
    for prompt, response in pairs:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        examples.append((ids, [-100] * min(start, len(ids)) + ids[start:]))
    return examples


def _text_examples(tokenizer, texts: Sequence[Tuple[str, str]]):
    """Plain-text examples: loss on the continuation's tokens only (the context's are -100)."""
    examples = []
    for context, continuation in texts:
        head = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = (head + tokenizer(continuation, add_special_tokens=False)["input_ids"])[:MAX_TOKENS]
        examples.append((ids, [-100] * min(len(head), len(ids)) + ids[len(head):]))
    return examples


def sample_continuations(model_dir: str, contexts: Sequence[str], *, samples: int, tokens: int, seed: int,
                         batch_size: int = 24) -> List[Tuple[str, str]]:
    """``samples`` continuations of each plain-text context (no chat template), drawn
    from ``model_dir`` at temperature 1 with no top-k or top-p cut, ``tokens`` new tokens
    each, seeded (the draws also depend on ``batch_size``): ``len(contexts) * samples`` pairs ``(context, continuation)``, the
    continuation starting with its own leading space. Training on them with
    language-model loss pulls a model towards ``model_dir``'s distribution on such text
    (the expected loss is the cross-entropy to it)."""
    model, tokenizer = load_model(model_dir)  # left padding, float32, eval mode
    torch.manual_seed(seed)
    queue = [c for c in contexts for _ in range(samples)]
    pairs = []
    for start in range(0, len(queue), batch_size):
        batch = queue[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                 min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        pairs += [(c, tokenizer.decode(n, skip_special_tokens=True)) for c, n in zip(batch, new)]
    return pairs


def train(model_dir: str, pairs: List[Tuple[str, str]], out: str, *, epochs: int, lr: float, batch_size: int,
          seed: int, lora: Optional[Dict] = None, texts: Sequence[Tuple[str, str]] = (), log=print,
          dtype: str = "float32") -> None:
    """Fine-tune ``model_dir`` on ``pairs`` (and the plain-text replay ``texts``, see
    ``_text_examples``; shuffled in with them) with AdamW and save it to ``out``.

    ``lora``: None for a full fine-tune, or ``{"rank": r}`` for a peft LoRA (lora_alpha
    = 2r, no dropout) on every attention and MLP projection; its adapter goes to
    ``out + ".adapter"`` and the merged model to ``out``. Training runs in float32; the
    model is saved in ``dtype``.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora is not None:
        config = LoraConfig(r=lora["rank"], lora_alpha=2 * lora["rank"], target_modules=ATTENTION_AND_MLP,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    examples = _examples(tokenizer, pairs) + _text_examples(tokenizer, texts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    step = 0
    for epoch in range(epochs):
        rng.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                log(f"    epoch {epoch + 1} step {step}: loss {loss.item():.3f}")
    model.eval()
    if lora is not None:
        adapter = out + ".adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(adapter)
        model = model.merge_and_unload()
    save(model, tokenizer, out, dtype)
