"""What an lssf merge did, for the end-of-merge summary and the model card."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from mergekit_lssf.provenance import effective_parameters, fusion_words, roles, versions


def summary_words(config, refs: Dict[str, Any], stats) -> str:
    """The end-of-merge summary: roles, the formula with effective parameters, ranks."""
    models = roles(config, refs)
    return "\n".join([
        f"lssf: repaired fine-tune {models['finetuned']} with aligned model {models['aligned']} "
        f"(role: aligned) and unaligned model {models['unaligned']} (role: unaligned)",
        "lssf: " + fusion_words(effective_parameters(config)),
        stats.summary(),
    ])


def append_card(out_path: str, config, refs: Dict[str, Any], stats) -> None:
    """Add an LSSF section to the README.md mergekit wrote in ``out_path``."""
    path = os.path.join(out_path, "README.md")
    models = roles(config, refs)
    parameters = effective_parameters(config)
    ranks = [r.rank for r in stats.records]
    rank_line = (f"{len(ranks)} weights fused; rank min {min(ranks)} / mean {sum(ranks) / len(ranks):.1f} / max {max(ranks)}; "
                 f"{sum(r.capped for r in stats.records if r.fusion != 'contrastive')} capped by max_rank; {sum(r == 0 for r in ranks)} at rank 0; "
                 f"{stats.passed_through} tensors kept from the fine-tune") if ranks else "no weights fused"
    v = versions()
    section = f"""

## LSSF safety repair (mergekit-lssf {v['mergekit-lssf']})

- fine-tune repaired (`base_model`): {models['finetuned']}
- aligned model (`role: aligned`): {models['aligned']}
- unaligned model (`role: unaligned`): {models['unaligned']}
- applied: {fusion_words(parameters)}
- effective parameters (defaults included): `{json.dumps(parameters, sort_keys=True)}`
- ranks: {rank_line}{_contrastive_line(stats)}
- 16-bit precision: {_precision_line(stats)}
- versions: {', '.join(f'{k} {x}' for k, x in v.items())}
"""
    for warning in stats.warnings():
        section += f"- {warning.removeprefix('lssf: ')}\n"
    mode = "a" if os.path.exists(path) else "w"
    with open(path, mode, encoding="utf-8") as fp:
        fp.write(section)


def _contrastive_line(stats) -> str:
    """The card's line on a contrastive term (k and its norm per weight); empty without one."""
    words = stats.contrastive_words()
    return f"\n- contrastive term: {words.removeprefix('lssf: contrastive: ')}" if words else ""


def _precision_line(stats) -> str:
    """The card's line on 16-bit inputs (signal ranks) and on the written term's survival."""
    parts = [w.removeprefix("lssf: ") for w in (stats.precision_words(), stats.kept_words()) if w]
    if stats.output_dtype is not None:
        parts.append(f"written as {str(stats.output_dtype).removeprefix('torch.')}")
    return "; ".join(parts) if parts else "inputs not stored in 16 bits, output not narrower than float32"
