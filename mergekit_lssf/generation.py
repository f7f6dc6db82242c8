"""Loading a causal LM for generation, and greedy chat answers in batches.

Shared by ``mergekit-lssf eval`` and ``mergekit-lssf calibrate`` (which answers its
anchor prompts with the aligned model itself).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model(model_dir: str, device: str = "cpu", tokenizer_dir: Optional[str] = None):
    """The model (float32, eval mode, on ``device``) and its tokenizer (from
    ``tokenizer_dir`` when given, else the model's folder), set to pad on the left for
    batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 16, progress: bool = True, desc: str = "generating") -> List[str]:
    """Greedy answers to ``prompts``, each rendered as one user turn, in the order given.

    Prompts are batched by rendered length (less left padding: about 15% faster on
    StrongREJECT's mixed lengths); the answers come back in the caller's order."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    answers: List[str] = [""] * len(texts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return answers
