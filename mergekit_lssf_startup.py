"""Make ``merge_method: lssf`` known to every Python process that imports mergekit.

mergekit 0.1.5 has no plugin discovery. The wheel installs this file as the top-level
module ``mergekit_lssf_startup`` (this file is its only source: a regular install copies
it, an editable one imports it from the source tree) plus ``mergekit_lssf.pth``, whose
one line calls ``install()`` when the interpreter starts; ``import mergekit_lssf`` calls
it too. ``install()`` only puts a finder on
``sys.meta_path``: it imports nothing (no torch, no mergekit), so start-up stays
fast. When mergekit itself is imported later, the finder lets the real module load
and then calls ``mergekit_lssf.registration``:

* after ``mergekit.merge_methods``: register the ``lssf`` method;
* after ``mergekit.merge``: wrap ``run_merge`` with the lssf recipe check and summary;
* after ``mergekit.scripts.run_yaml`` / ``multimerge`` (the commands): print our
  errors as one line instead of a traceback.

Keep this file dependency-free: it is imported at every interpreter start.
"""

import sys

#: module loaded -> function of mergekit_lssf.registration to call with it
HOOKS = {
    "mergekit.merge_methods": "on_merge_methods_loaded",
    "mergekit.merge": "on_merge_loaded",
    "mergekit.scripts.run_yaml": "on_cli_loaded",
    "mergekit.scripts.multimerge": "on_cli_loaded",
}


class _HookedLoader:
    """Delegates to the real loader, then runs the hook on the loaded module."""

    def __init__(self, loader, hook_name):
        self._loader = loader
        self._hook_name = hook_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            import mergekit_lssf.registration as registration

            getattr(registration, self._hook_name)(module)
        except Exception as error:  # never break mergekit itself
            sys.stderr.write(
                f"mergekit-lssf: could not hook {module.__name__}: {error!r}; "
                "merge_method: lssf will be unavailable\n"
            )

    def __getattr__(self, name):
        return getattr(self._loader, name)


class LSSFFinder:
    """A meta path finder that only ever answers for the modules in HOOKS."""

    lssf_startup_finder = True

    def find_spec(self, fullname, path=None, target=None):
        hook_name = HOOKS.get(fullname)
        if hook_name is None:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "lssf_startup_finder", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, hook_name)
        return spec


def install():
    """Put the finder first on sys.meta_path, once per process."""
    if not any(getattr(f, "lssf_startup_finder", False) for f in sys.meta_path):
        sys.meta_path.insert(0, LSSFFinder())
