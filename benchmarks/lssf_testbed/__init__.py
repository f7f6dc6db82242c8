"""Safety testbed v2: does LSSF give a fine-tune its refusals back, and why (not)?

Stages, one module each: ``settings`` (sizes, schedules, cells), ``data`` (prompt sets
and the downstream task), ``training`` (full and LoRA SFT), ``repairs`` (mergekit-yaml
recipes and the two controls), ``evaluation`` (metrics per model), ``diagnostics``
(spectra, drift overlap, refusal direction), ``report`` (tables and figures),
``pipeline`` (cells and seeds, cached stage by stage). Entry point:
``python benchmarks/safety_testbed.py --out DIR``.
"""
