"""Register ``lssf`` with mergekit and wrap ``run_merge``; both idempotent.

The start-up hook (``mergekit_lssf_startup``) calls the ``on_*`` functions here when
mergekit's modules load; ``mergekit_lssf/__init__.py`` calls ``install_loaded``.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

from mergekit import merge_methods
from mergekit.common import dtype_from_name

from mergekit_lssf.guards import check_output_folder
from mergekit_lssf.merge_method import LSSF_METHOD
from mergekit_lssf.model_card import append_card, summary_words
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.plan import plan_recipe
from mergekit_lssf.recipe import forget_loaders
from mergekit_lssf.stats import STATS

METHOD_NAME = LSSF_METHOD.spec.name


def register():
    """Register the lssf method unless a method of that name already is."""
    if not any(m.spec.name == METHOD_NAME for m in merge_methods.registered_methods()):
        merge_methods.register(LSSF_METHOD)
    return merge_methods.get(METHOD_NAME)


def on_merge_methods_loaded(_module: ModuleType) -> None:
    register()


def on_merge_loaded(module: ModuleType) -> None:
    """Wrap ``mergekit.merge.run_merge``: check lssf recipes first, summarize after."""
    original = module.run_merge
    if getattr(original, "lssf_wrapped", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != METHOD_NAME:
            return original(
                merge_config, out_path, options=options, config_source=config_source
            )
        return _run_lssf(original, merge_config, out_path, options, config_source)

    run_merge.lssf_wrapped = True
    module.run_merge = run_merge


def on_cli_loaded(module: ModuleType) -> None:
    """Wrap the click callback of ``mergekit-yaml`` / ``mergekit-multi``: a problem we
    detected (``LSSFConfigError``) is one line on stderr and exit status 1, the
    traceback only with ``-v``. Library callers of ``run_merge`` keep the exception."""
    command = getattr(module, "main", None)
    callback = getattr(command, "callback", None)
    if callback is None or getattr(callback, "lssf_wrapped", False):
        return

    @functools.wraps(callback)
    def wrapped(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except LSSFConfigError as error:
            # click passes the raw options (verbosity=...) or a built MergeOptions
            verbosity = kwargs.get("verbosity") or getattr(kwargs.get("merge_options"), "verbosity", 0)
            if (verbosity or 0) > 0:
                raise
            print(f"mergekit-lssf: error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    wrapped.lssf_wrapped = True
    command.callback = wrapped


def _run_lssf(original, merge_config, out_path, options, config_source):
    """One lssf merge: the one plan of the recipe (every check before anything is
    written), mergekit's own merge, then the summary and the model card. STATS only
    feeds the summary: the method's output does not depend on it."""
    check_output_folder(out_path)
    plan = plan_recipe(merge_config, trust_remote_code=options.trust_remote_code,
                       lora_merge_cache=options.lora_merge_cache, options=options)
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    forget_loaders(plan.config)
    STATS.reset(output_dtype=dtype_from_name(plan.written_dtype) if plan.written_dtype else None)
    result = original(plan.config, out_path, options=options, config_source=config_source)
    if options.write_model_card:
        append_card(out_path, plan.config, plan.refs, STATS)
    if not options.quiet:
        print(summary_words(plan.config, plan.refs, STATS), file=sys.stderr)
    for warning in STATS.warnings():  # printed even with --quiet
        print(warning, file=sys.stderr)
    return result


def install_loaded() -> None:
    """Register the method and wrap the mergekit modules already loaded (those loaded
    later are hooked by ``mergekit_lssf_startup``)."""
    register()
    merge_module = sys.modules.get("mergekit.merge")
    if merge_module is not None and hasattr(merge_module, "run_merge"):
        on_merge_loaded(merge_module)
    for name in ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge"):
        if name in sys.modules:
            on_cli_loaded(sys.modules[name])
