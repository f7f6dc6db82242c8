"""What an lssf recipe does, in words and as plain data: the roles with their models,
the effective parameters (defaults filled in), the package versions.

Shared by the end-of-merge summary, the model card, ``extract-patch`` and ``check``,
so that all of them describe a merge the same way. No torch import.
"""

from __future__ import annotations

from typing import Any, Dict

from mergekit.config import MergeConfiguration

from mergekit_lssf.parameters import DEFAULTS, effective_rank_rule


def effective_parameters(config: MergeConfiguration) -> Dict[str, Any]:
    """The recipe's ``parameters:`` with every default filled in (an unset
    ``rank_rule`` as the one fusion of the recipe applies: ``entropy`` for ``restore``
    and ``add``, null for ``contrastive``'s every stored vector). Filters and
    gradients are kept as written (their per-tensor values are in ``check``)."""
    given = dict(config.parameters or {})
    out: Dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        value = given.get(name, default)
        out[name] = value.model_dump() if hasattr(value, "model_dump") else _plain(value)
    if out["rank_rule"] is None and isinstance(out["fusion"], str):
        out["rank_rule"] = effective_rank_rule(out["fusion"], None)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value


def roles(config: MergeConfiguration, refs: Dict[str, Any]) -> Dict[str, str]:
    """``{"finetuned": ..., "aligned": ..., "unaligned": ...}`` as model paths."""
    return {"finetuned": str(config.base_model), "aligned": str(refs["aligned"]),
            "unaligned": str(refs["unaligned"]) if refs.get("unaligned") is not None else "none"}


def fusion_words(parameters: Dict[str, Any]) -> str:
    """One sentence: the formula applied, with the effective parameters."""
    fusion = parameters["fusion"]
    rounding = (f"16-bit output: lssf rounds to {parameters['round_to']} ({parameters.get('rounding', 'subspace')})"
                if parameters.get("round_to") else "16-bit output: not rounded by lssf (mergekit's plain cast)")
    if fusion == "contrastive":
        if parameters.get("rank") is not None:
            k = f"the leading {parameters['rank']} vectors"
        elif parameters.get("rank_rule") == "entropy":
            k = f"k by the entropy rule over mu (eta {parameters['eta']}), at most the stored vectors"
        else:
            k = "every stored vector"
        return (f"W' = W_finetuned + alpha * (W_aligned - W_finetuned) (B V_k) diag(mu/(mu+lam)) V_k^T  [contrastive]; "
                f"alpha {parameters['alpha']}, lam {parameters.get('lam')}, {k}; calibration: "
                f"{parameters.get('calibration')}; {rounding}")
    term = ("alpha * P' (W_aligned - W_unaligned)  [add, paper Eq. 13]" if fusion == "add"
            else "alpha * P' (W_aligned - W_finetuned)  [restore]")
    rule = parameters["rank_rule"]
    if parameters["rank"] is not None:
        rank = f"fixed rank {parameters['rank']}"
    elif rule == "noise_floor":
        rank = f"rank by the noise floor (Gavish-Donoho), max_rank {parameters['max_rank']}"
    else:
        above = " over the singular values above the rounding edge" if parameters.get("spectrum") == "signal" else ""
        rank = f"rank by the entropy rule{above}, eta {parameters['eta']}, max_rank {parameters['max_rank']}"
    subspace = parameters["subspace"] or "data-free (SVD of W_aligned - W_unaligned)"
    return (f"W' = W_finetuned + {term}; alpha {parameters['alpha']}, {rank}, "
            f"weight_max {parameters['weight_max']}; subspace: {subspace}; {rounding}")


def versions() -> Dict[str, str]:
    """Versions of mergekit-lssf and the libraries a merge's result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("mergekit-lssf", "mergekit", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
