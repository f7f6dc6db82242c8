"""Reading an ``merge_method: lssf`` recipe and its pre-flight check, run before
mergekit plans.

mergekit silently ignores unknown parameters and per-model values of recipe-level
parameters, and only validates values tensor by tensor. This check reads the whole
``MergeConfiguration`` once and stops with a message that names the recipe field,
model or tensor at fault before anything is written.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.io.tasks import LoaderCache
from pydantic import ValidationError

from mergekit_lssf.fused import fuses, is_vocabulary
from mergekit_lssf.guards import check_model_folder, lora_lineage_error, model_index, role_swap_warning, sample_names
from mergekit_lssf.parameters import (
    BY_NAME,
    DEFAULTS,
    PARAMETERS,
    PER_MODEL_PARAMETERS,
    SHARED_PARAMETERS,
    LSSFConfigError,
    one_per_role,
    required_roles,
)
from mergekit_lssf.contrastive_file import open_contrastive
from mergekit_lssf.subspace_file import adapter_sha256, model_fingerprint, open_subspace

LOG = logging.getLogger("mergekit_lssf")

Settings = Optional[Dict[str, Any]]


def _shared_scopes(config: MergeConfiguration) -> Iterator[Tuple[str, Settings]]:
    yield "parameters", config.parameters
    for i, s in enumerate(config.slices or []):
        yield f"slices[{i}].parameters", s.parameters
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters
        for i, s in enumerate(module.slices or []):
            yield f"modules.{name}.slices[{i}].parameters", s.parameters


def _model_inputs(config: MergeConfiguration) -> Iterator[Tuple[str, Any, Settings]]:
    for i, m in enumerate(config.models or []):
        yield f"models[{i}]", m.model, m.parameters
    for i, s in enumerate(config.slices or []):
        for j, src in enumerate(s.sources):
            yield f"slices[{i}].sources[{j}]", src.model, src.parameters
    for name, module in (config.modules or {}).items():
        for i, m in enumerate(module.models or []):
            yield f"modules.{name}.models[{i}]", m.model, m.parameters
        for i, s in enumerate(module.slices or []):
            for j, src in enumerate(s.sources):
                yield f"modules.{name}.slices[{i}].sources[{j}]", src.model, src.parameters


def _leaves_at(setting: Any, where: str) -> Iterator[Tuple[str, Any]]:
    """``(path, value)`` of every literal in a setting: ``eta``, ``eta[0]`` (a filter
    entry or gradient point), ``eta[0].value[1]`` (a gradient inside a filter)."""
    if isinstance(setting, ConditionalParameter):
        inner = setting.value
        yield from _leaves_at(inner, f"{where}.value" if isinstance(inner, list) else where)
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            yield from _leaves_at(item, f"{where}[{i}]")
    else:
        yield where, setting


def _leaves(setting: Any) -> Iterator[Any]:
    """Every literal value in a parameter setting (scalars, gradients, filters)."""
    return (value for _path, value in _leaves_at(setting, ""))


def _validators() -> Dict[str, Any]:
    return {p.name: p.validate for p in PARAMETERS}


def _check_values(where: str, settings: Settings, validators: Dict[str, Any]) -> None:
    for name, setting in (settings or {}).items():
        for path, value in _leaves_at(setting, f"{where}.{name}"):
            if BY_NAME[name].kind == "integer" and isinstance(value, float) and not value.is_integer():
                raise LSSFConfigError(f"{path}: lssf parameter `{name}` must be an integer, got {value!r}")
            try:
                validators[name](value)
            except Exception as error:  # pydantic wraps our ValueError
                detail = getattr(error, "errors", None)
                message = detail()[0]["msg"] if callable(detail) else str(error)
                message = message.removeprefix("Value error, ")
                raise LSSFConfigError(f"{path}: {message}") from None


def check_lora_merge_cache(config: MergeConfiguration, cache: Optional[str]) -> None:
    """mergekit 0.1.5 merges a ``model+lora`` reference into a full model on disk, and only
    with ``--lora-merge-cache DIR``; without it the merge stops with a traceback after
    planning. Name the field and the flag before anything runs."""
    for where, model in [("base_model", config.base_model)] + [(w, m) for w, m, _ in _model_inputs(config)]:
        if model is not None and getattr(model, "lora", None) is not None and cache:
            check_cached_lora_merge(model, cache, where)
        elif model is not None and getattr(model, "lora", None) is not None:
            raise LSSFConfigError(
                f"{where}: {model} is a model+lora reference; mergekit merges the adapter into a full "
                "model first and needs a folder for it: pass --lora-merge-cache DIR (about the model's size on disk)"
            )


def _weight_files(folder: str) -> List[str]:
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))]


def check_cached_lora_merge(model: ModelReference, cache: str, where: str) -> None:
    """mergekit 0.1.5 reuses ``cache/{BASE id}_{LORA id}`` whenever the folder exists
    (``ModelReference.merged``), named by the paths, not the contents: an interrupted
    merge leaves an incomplete folder, and an adapter retrained in place keeps its old
    merge. Either would be used silently; refuse both, naming the folder to delete."""
    folder = os.path.join(cache, model.model._unique_id() + "_" + model.lora._unique_id())
    if not os.path.isdir(folder):
        return  # mergekit merges it afresh
    weights = _weight_files(folder)
    if not os.path.exists(os.path.join(folder, "config.json")) or not weights:
        raise LSSFConfigError(f"{where}: the LoRA merge cache folder {folder} of {model} is incomplete (an interrupted "
                              "merge?); mergekit would use it as it is: delete it and run again")
    adapter = model.lora.path
    if os.path.isdir(adapter):
        newest = max((os.path.getmtime(f) for f in _weight_files(adapter)), default=0.0)
        if newest > min(os.path.getmtime(f) for f in weights):
            raise LSSFConfigError(f"{where}: the adapter {adapter} is newer than its merge in the LoRA merge cache "
                                  f"({folder}); mergekit would reuse the old merge: delete that folder and run again")


def check_recipe(
    config: MergeConfiguration, *, trust_remote_code: bool = False
) -> Dict[str, Any]:
    """Validate an lssf recipe; returns ``{"aligned": ref, "unaligned": ref}``."""
    validators = _validators()
    if config.base_model is None:
        raise LSSFConfigError(
            "lssf requires the recipe field `base_model`: the fine-tuned model to repair"
        )
    for where, model in [("base_model", config.base_model)] + [(w, m) for w, m, _ in _model_inputs(config)]:
        check_model_folder(model.model.path, where)
        if getattr(model, "lora", None) is not None:
            check_model_folder(model.lora.path, f"{where} (LoRA)")
    for where, settings in _shared_scopes(config):
        for name in settings or {}:
            if name in PER_MODEL_PARAMETERS:
                raise LSSFConfigError(
                    f"{where}.{name}: `{name}` is a per-model parameter; set it under "
                    "each model's `parameters:`"
                )
            if name not in SHARED_PARAMETERS:
                raise LSSFConfigError(
                    f"{where}.{name}: unknown lssf parameter `{name}` (known: "
                    f"{', '.join(SHARED_PARAMETERS)}; per model: role)"
                )
        _check_values(where, settings, validators)
        _check_spectrum(where, settings or {})

    roles: Dict[Any, str] = {}
    for where, model, settings in _model_inputs(config):
        settings = settings or {}
        for name in settings:
            if name in SHARED_PARAMETERS:
                raise LSSFConfigError(
                    f"{where}.parameters.{name}: `{name}` is a recipe-level lssf "
                    "parameter; mergekit ignores per-model values of it. Set it under "
                    "the recipe's `parameters:` (filters and gradients work there)"
                )
            if name not in PER_MODEL_PARAMETERS:
                raise LSSFConfigError(
                    f"{where}.parameters.{name}: unknown lssf per-model parameter "
                    f"`{name}` (known: role)"
                )
        _check_values(f"{where}.parameters", settings, validators)
        if model == config.base_model:
            if "role" in settings:
                raise LSSFConfigError(
                    f"{where}: {model} is the `base_model` (the fine-tune to repair) "
                    "and must not carry a role"
                )
            continue
        role = settings.get("role")
        if not isinstance(role, str):
            raise LSSFConfigError(
                f"{where}: model {model} needs `parameters: {{role: aligned}}` or "
                f"`{{role: unaligned}}` (a single value, no filter), got {role!r}"
            )
        if roles.setdefault(model, role) != role:
            raise LSSFConfigError(
                f"{where}: model {model} has role {role!r} here and "
                f"{roles[model]!r} elsewhere in the recipe"
            )

    refs = one_per_role(roles, "the recipe has", required_roles(recipe_fusions(config)))
    if refs["unaligned"] is not None:
        lora_lineage_error(config.base_model, refs["aligned"], refs["unaligned"])  # issue 49 finding 1
    _check_shapes(config.base_model, {k: v for k, v in refs.items() if v is not None})
    for where, settings in _shared_scopes(config):
        for value in _leaves((settings or {}).get("subspace")):
            if value is not None:
                _check_subspace_layers(config, refs["aligned"], f"{where}.subspace", "aligned model")
                _check_subspace(f"{where}.subspace", value, refs["aligned"])
        for value in _leaves((settings or {}).get("calibration")):
            if value is not None:
                # a contrastive file is keyed by the fine-tune's names: its layers must stay in place
                _check_subspace_layers(config, config.base_model, f"{where}.calibration", "fine-tune (base_model)")
                _check_calibration(f"{where}.calibration", value, config.base_model, refs["aligned"])
                stored = open_contrastive(value).stored_rank()
                for path, rank in _leaves_at((settings or {}).get("rank"), f"{where}.rank"):
                    if rank is not None and rank > stored:
                        raise LSSFConfigError(f"{path}: rank {rank} is more than the {stored} vectors {value} stores "
                                              "for some weight (calibrate with a larger --max-rank, or `full`)")
    return refs


def recipe_fusions(config: MergeConfiguration) -> set:
    """Every ``fusion`` a tensor of the recipe can get (the default included when the
    top-level ``parameters`` leave it open)."""
    fusions = set() if "fusion" in (config.parameters or {}) else {DEFAULTS["fusion"]}
    for _where, settings in _shared_scopes(config):
        fusions |= {v for v in _leaves((settings or {}).get("fusion")) if v is not None}
    return fusions


def _check_calibration(where: str, path: str, finetuned: Any, aligned: Any) -> None:
    """The file is a contrastive calibration of this fine-tune against this aligned
    model (fingerprints), covering every weight the merge fuses."""
    try:
        calibration = open_contrastive(path)
    except LSSFConfigError as error:
        raise LSSFConfigError(f"{where}: {error}") from None
    expected = [("aligned model", aligned, "aligned_fingerprint", model_fingerprint)]
    if getattr(finetuned, "lora", None) is not None:
        expected += [("fine-tune's base", finetuned, "finetuned_base_fingerprint", model_fingerprint),
                     ("fine-tune's adapter", finetuned.lora, "finetuned_adapter_sha256", adapter_sha256)]
    else:
        expected += [("fine-tune (base_model)", finetuned, "finetuned_fingerprint", model_fingerprint)]
    if getattr(aligned, "lora", None) is not None:
        raise LSSFConfigError(f"{where}: a contrastive calibration needs a plain aligned model, not {aligned}")
    for label, model, key, measure in expected:
        folder = model.path if getattr(model, "path", None) and not hasattr(model, "model") else model.model.path
        if not os.path.isdir(folder):  # calibrate reads local folders only: so must the check
            raise LSSFConfigError(f"{where}: the recipe's {label} {model} is not a local folder; `fusion: contrastive` "
                                  "checks its calibration against the models' files (give the folder calibrate read)")
        actual = measure(folder)
        if calibration.metadata.get(key) != actual:
            source = calibration.metadata.get(key.split("_")[0], "another model")
            raise LSSFConfigError(
                f"{where}: {path} was calibrated on {source}, not on the recipe's {label} {model} "
                f"(fingerprint {str(calibration.metadata.get(key))[:12]} vs {actual[:12]}); run "
                "`mergekit-lssf calibrate RECIPE --task ...` for this recipe")
    headers = model_index(finetuned) or model_index(ModelReference(model=finetuned.model)) or {}
    for name, stored in sorted(headers.items()):
        if fuses(name, stored.shape, stored.floating) and not calibration.has(name):
            raise LSSFConfigError(f"{where}: weight {name} of the fine-tune ({finetuned}) is missing from "
                                  f"calibration file {path}")


def _check_subspace_layers(config: MergeConfiguration, model: Any, where: str, label: str) -> None:
    """A calibration file is looked up by the output tensor's name, which is the name in
    the model it was computed on (``label``: the aligned model for a subspace, the
    fine-tune for a contrastive file) only where the slices keep that model's layers in
    place: refuse a slice that takes its layers a..b to other output positions."""
    groups = [("slices", config.slices or [])] + [
        (f"modules.{name}.slices", module.slices or []) for name, module in (config.modules or {}).items()]
    for prefix, slices in groups:
        offset = 0
        for i, output_slice in enumerate(slices):
            length = 0
            for j, source in enumerate(output_slice.sources):
                start, end = source.layer_range
                length = end - start
                if source.model == model and start != offset:
                    raise LSSFConfigError(
                        f"{prefix}[{i}].sources[{j}].layer_range: the {label}'s layers {start}..{end} go to "
                        f"output layers {offset}..{offset + length}, but `{where}` is looked up by output "
                        f"tensor name; keep the {label}'s layers in place")
            offset += length


def _check_spectrum(where: str, settings: Dict[str, Any]) -> None:
    """``spectrum: signal`` changes the entropy rule only: refuse it beside a fixed
    ``rank`` or ``rank_rule: noise_floor`` in the same scope, where it would do nothing."""
    if "signal" not in set(_leaves(settings.get("spectrum"))):
        return
    if any(v is not None for v in _leaves(settings.get("rank"))) or "noise_floor" in set(_leaves(settings.get("rank_rule"))):
        raise LSSFConfigError(
            f"{where}.spectrum: `spectrum: signal` applies the entropy rule above the rounding edge; "
            "it does nothing with a fixed `rank` or `rank_rule: noise_floor` set here"
        )


def _check_subspace(where: str, path: str, aligned: Any) -> None:
    """The file is an lssf subspace file, of this aligned model, covering its weights."""
    try:
        subspace = open_subspace(path)
    except LSSFConfigError as error:
        raise LSSFConfigError(f"{where}: {error}") from None
    if getattr(aligned, "lora", None) is not None:
        raise LSSFConfigError(f"{where}: a calibrated subspace needs a plain aligned model, not {aligned}")
    model_dir = aligned.model.path if os.path.isdir(aligned.model.path) else aligned.local_path()
    try:
        subspace.check_fingerprint(model_dir, "aligned")
    except LSSFConfigError as error:
        raise LSSFConfigError(f"{where}: {error}") from None
    for name, stored in sorted((model_index(aligned) or {}).items()):
        if fuses(name, stored.shape, stored.floating) and not subspace.has(name):
            raise LSSFConfigError(
                f"{where}: weight {name} of the aligned model ({aligned}) is missing from "
                f"subspace file {path}"
            )


def _check_shapes(base: Any, refs: Dict[str, Any]) -> None:
    """Same shapes for every tensor of the three local models (vocabulary excepted)."""
    base_index = model_index(base)
    if base_index is None:
        return
    for role, model in refs.items():
        index = model_index(model)
        if index is None:
            continue
        for name, stored in base_index.items():
            shape, other = stored.shape, index[name].shape if name in index else None
            if other is None or other == shape:
                continue
            if is_vocabulary(name) and len(other) == len(shape) and other[1:] == shape[1:]:
                continue
            raise LSSFConfigError(
                f"lssf: tensor {name} has shape {list(shape)} in the fine-tuned "
                f"base_model ({base}) but {list(other)} in the {role} model "
                f"({model}); the three models must share one architecture"
            )


def with_tokenizer_source(config: MergeConfiguration, refs: Dict[str, Any]) -> Tuple[MergeConfiguration, Optional[str]]:
    """The recipe as mergekit runs it, and the warning that says what changed: LSSF
    keeps the fine-tune's embeddings and lm_head, so a fine-tune with added tokens
    needs mergekit's ``tokenizer_source: base``; it is set here when the recipe says
    nothing about tokenizers and the vocabularies differ (the recipe file itself is
    not changed)."""
    if config.tokenizer is None and config.tokenizer_source is None:
        differing = vocabulary_differs(config.base_model, refs)
        if differing:
            return config.model_copy(update={"tokenizer_source": "base"}), (
                f"lssf: warning: vocabulary tensors {', '.join(differing)} differ in size between the fine-tune "
                "and the aligned/unaligned models; using tokenizer_source: base")
    return config, None


def dtype_name(value: Any) -> Optional[str]:
    """A recipe's ``dtype`` / ``out_dtype`` as a plain name (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(value).removeprefix("torch.") if value else None


def rounding_problems(config: MergeConfiguration, written: Optional[str]) -> Tuple[List[str], List[str]]:
    """``(errors, warnings)`` of ``round_to`` against the dtype the recipe writes
    (``written``: ``out_dtype``, else ``dtype``). mergekit 0.1.5 does not tell a
    merge method the output dtype, so lssf rounds to the dtype the recipe names in
    ``round_to`` and the two must agree; a 16-bit output without it is written by
    mergekit's plain cast, which keeps only part of a small term (a recipe that also
    computes in that dtype, ``dtype: bfloat16``, is rounded by the kernel itself and
    draws the narrower ``dtype_warning`` instead)."""
    named = [(path, v) for where, settings in _shared_scopes(config)
             for path, v in _leaves_at((settings or {}).get("round_to"), f"{where}.round_to") if v is not None]
    how = [path for where, settings in _shared_scopes(config)
           for path, v in _leaves_at((settings or {}).get("rounding"), f"{where}.rounding") if v is not None]
    for path, value in named:
        if written != value:
            wrote = f"writes {written} (`out_dtype`, else `dtype`)" if written else "sets no `out_dtype`"
            return [f"{path}: `round_to: {value}` but the recipe {wrote}; set `out_dtype: {value}` or remove "
                    "`round_to`"], []
    if how and not named:
        return [], [f"lssf: warning: `{how[0]}` says how lssf rounds to `round_to`, which the recipe does not set: "
                    "it does nothing"]
    computed = dtype_name(config.dtype)
    if written in ("bfloat16", "float16") and written != computed and not named:
        return [], [f"lssf: warning: the recipe writes {written} without the lssf parameter `round_to: {written}`: "
                    "mergekit's writer then rounds each fused weight to nearest, which keeps only part of a small "
                    f"term; add `round_to: {written}` under `parameters:`"]
    return [], []


#: Bits of the dtypes a recipe's ``dtype`` may name, and of safetensors' names for them.
_BITS = {"float64": 64, "float32": 32, "bfloat16": 16, "float16": 16,
         "F64": 64, "F32": 32, "BF16": 16, "F16": 16}


def dtype_warning(config: MergeConfiguration, refs: Dict[str, Any]) -> Optional[str]:
    """The warning for a recipe ``dtype`` narrower than float32 or than what the three
    models store (mergekit casts every input to it before lssf sees it), with the
    lines to write instead; None when the recipe computes in float32 or wider."""
    if not config.dtype or _BITS.get(dtype_name(config.dtype), 32) >= 32:
        return None
    stored = set()
    for model in [config.base_model, *(m for m in refs.values() if m is not None)]:
        stored |= {t.dtype for t in (model_index(model) or {}).values() if t.dtype in _BITS}
    wider = sorted(d for d in stored if _BITS[d] > _BITS[dtype_name(config.dtype)])
    also = f" and than the {'/'.join(wider)} the models store" if wider else ""
    out = config.out_dtype or config.dtype
    return (f"lssf: warning: recipe `dtype: {config.dtype}` is narrower than float32{also}: mergekit "
            "casts every input to it before lssf computes W_aligned - W_unaligned and the term. "
            f"Compute in float32 and write {out}: `dtype: float32` with `out_dtype: {out}`")


def role_check(config: MergeConfiguration, refs: Dict[str, Any]) -> Optional[str]:
    """The role-swap warning for this recipe, or None (see ``guards.role_swap_warning``)."""
    shapes = {name: t.shape for name, t in (model_index(config.base_model) or {}).items()}
    names = sample_names(shapes, lambda name: fuses(name, shapes[name]))
    if refs["unaligned"] is None:
        return None
    return role_swap_warning(config.base_model, refs["aligned"], refs["unaligned"], names)


def vocabulary_differs(base: Any, refs: Dict[str, Any]) -> List[str]:
    """Names of vocabulary tensors whose row count differs from the base model's."""
    base_index = model_index(base) or {}
    differing = []
    for model in (m for m in refs.values() if m is not None):
        for name, stored in (model_index(model) or {}).items():
            if is_vocabulary(name) and name in base_index and base_index[name].shape != stored.shape:
                differing.append(name)
    return sorted(set(differing))


def load_recipe(path: str) -> MergeConfiguration:
    """The lssf recipe at ``path``, parsed by mergekit; YAML and schema errors, and a
    recipe of another merge method, are one-line ``LSSFConfigError``s."""
    with open(path, encoding="utf-8") as fp:
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(fp))
        except yaml.YAMLError as error:
            raise LSSFConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise LSSFConfigError(f"{path}: not a valid mergekit recipe: {where}: {first['msg']}") from None
    if config.merge_method != "lssf":
        raise LSSFConfigError(f"{path}: merge_method is {config.merge_method!r}, not 'lssf'")
    return config


def forget_loaders(config: MergeConfiguration) -> None:
    """Drop mergekit's cached loaders of the recipe's models before a merge or a walk.

    mergekit 0.1.5 keeps one process-wide ``LoaderCache`` keyed by the model reference
    as written: a relative path (``./aligned``) used again from another working
    directory, or a model rewritten in this process, would otherwise be read through
    the stale loader, i.e. from the wrong files."""
    loaders = LoaderCache().loaders
    for ref in [config.base_model] + [model for _where, model, _settings in _model_inputs(config)]:
        loaders.pop(ref, None)
