"""``mergekit-lssf check`` on a multi-document recipe (``mergekit-multi``).

mergekit 0.1.5's ``mergekit-multi`` (mergekit/scripts/multimerge.py) reads every YAML
document as a ``MergeConfiguration`` plus an optional ``name``; a model reference whose
path is another document's ``name`` is that document's output (patched to
``INTERMEDIATE_DIR/NAME``); the unnamed document, at most one, is the final merge
written to ``--out-path``. Here every document is checked, and named when it fails by
its index and ``name``:

* lssf documents get the lssf check (the caller's ``full_check``); one whose inputs are
  outputs of earlier documents gets the recipe-level check only (fields, parameters,
  roles): its inputs do not exist before ``mergekit-multi`` has run, so their headers,
  shapes and weights cannot be read, and the result says so;
* other documents are parsed with mergekit's ``MergeConfiguration``;
* a reference to another document must name one that exists and comes earlier in the
  file; a reference that is neither a document, a local folder nor an ``owner/name``
  hub id, and is close to a document's name, is refused as a typo.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Optional

import yaml
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from mergekit_lssf.guards import looks_local
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe


def read_documents(path: str) -> List[Any]:
    """The YAML documents of ``path`` (empty ones dropped); a YAML error is one line."""
    with open(path, encoding="utf-8") as fp:
        try:
            return [doc for doc in yaml.safe_load_all(fp) if doc is not None]
        except yaml.YAMLError as error:
            raise LSSFConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def is_multi_document(path: str) -> bool:
    """True for a recipe file holding more than one YAML document."""
    return len(read_documents(path)) > 1


def label(index: int, name: Optional[str]) -> str:
    """How a document is named in messages: ``document 1 (name: ties-finetunes)``."""
    return f"document {index} (name: {name})" if name is not None else f"document {index} (unnamed: the final merge)"


def _parse(path: str, index: int, doc: Any) -> MergeConfiguration:
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(doc, dict):
        raise LSSFConfigError(f"{path}: {label(index, None)}: not a mapping of recipe fields")
    try:
        return MergeConfiguration.model_validate({k: v for k, v in doc.items() if k != "name"})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise LSSFConfigError(f"{path}: {label(index, name)}: not a valid mergekit recipe: {where}: {first['msg']}") from None


def check_documents(path: str, full_check: Callable[[MergeConfiguration], Dict[str, Any]]) -> Dict[str, Any]:
    """``{"documents": [...]}``, one entry per document of the multi-document recipe
    at ``path`` (see the module's docstring); ``full_check(config)`` is the
    single-recipe check (``mergekit-lssf check``'s), run on lssf documents whose inputs
    all exist. Raises ``LSSFConfigError`` naming the first document at fault."""
    docs = read_documents(path)
    names: List[Optional[str]] = []
    for index, doc in enumerate(docs):
        name = doc.get("name") if isinstance(doc, dict) else None
        if name is not None and not isinstance(name, str):
            raise LSSFConfigError(f"{path}: document {index}: `name` must be a string, got {name!r}")
        if name in names:
            first = names.index(name)
            what = f"the name {name!r}" if name is not None else "no name (two final merges)"
            raise LSSFConfigError(f"{path}: {label(index, name)} has {what}, as {label(first, name)}; "
                                  "mergekit-multi needs one name per document and at most one unnamed document")
        names.append(name)
    configs = [_parse(path, index, doc) for index, doc in enumerate(docs)]
    results = []
    for index, (name, config) in enumerate(zip(names, configs)):
        where = f"{path}: {label(index, name)}"
        inputs = _earlier_outputs(where, index, config, names)
        entry: Dict[str, Any] = {"index": index, "name": name, "merge_method": config.merge_method,
                                 "inputs_from": [{"index": names.index(n), "name": n} for n in inputs]}
        if config.merge_method != "lssf":
            entry["checked"] = "parsed"
            entry["note"] = (f"parsed as a mergekit recipe (merge_method {config.merge_method}); "
                             "only lssf documents get the lssf check")
        elif inputs:
            _checked(where, lambda: plan_recipe(config, needs_weights=False, tensors=False))
            entry["checked"] = "recipe"
            shown = ", ".join(label(names.index(n), n) for n in inputs)
            entry["note"] = (f"its input(s) {', '.join(inputs)} are the output of {shown}, which exists only once "
                             "mergekit-multi has run it: fields, parameters, roles and round_to checked; shapes, tensors, "
                             "the rules between parameters per tensor "
                             "and the role-swap check not (run `mergekit-lssf check` on this document alone "
                             "once the earlier output exists)")
        else:
            entry["checked"] = "full"
            entry.update(_checked(where, lambda: full_check(config)))
        results.append(entry)
    return {"documents": results}


def _checked(where: str, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except LSSFConfigError as error:
        raise LSSFConfigError(f"{where}: {error}") from None


def _earlier_outputs(where: str, index: int, config: MergeConfiguration, names: List[Optional[str]]) -> List[str]:
    """The names of earlier documents that ``config`` takes as inputs; refuses a
    reference to a later document (or itself) and a likely misspelt document name."""
    known = [n for n in names if n is not None]
    used: List[str] = []
    for ref in sorted(config.referenced_models(), key=str):
        path = ref.model.path
        if path in known:
            source = names.index(path)
            if source >= index:
                whose = "this document's own output" if source == index else f"the output of {label(source, path)}, which comes later"
                raise LSSFConfigError(
                    f"{where}: model {ref} is {whose}; a document can only take the output of an earlier one: "
                    "put the documents in the order they run")
            if path not in used:
                used.append(path)
            continue
        close = difflib.get_close_matches(path, known, n=1, cutoff=0.75)
        if close and "/" not in path and not looks_local(path):
            raise LSSFConfigError(
                f"{where}: model {ref} is neither a document of this file ({', '.join(known)}) nor a local "
                f"folder, and {path!r} is no hub id (owner/name); did you mean {close[0]!r}?")
    return used


def documents_table(result: Dict[str, Any], table: Callable[[Dict[str, Any]], str]) -> str:
    """The multi-document check as text: one block per document, the single-recipe
    ``table`` for the ones fully checked."""
    blocks = []
    for doc in result["documents"]:
        head = f"== {label(doc['index'], doc['name'])}: merge_method {doc['merge_method']}"
        if doc["inputs_from"]:
            head += "; input(s) from " + ", ".join(label(d["index"], d["name"]) for d in doc["inputs_from"])
        body = table(doc) if doc["checked"] == "full" else doc["note"]
        blocks.append(f"{head}\n{body}")
    return "\n\n".join(blocks)
