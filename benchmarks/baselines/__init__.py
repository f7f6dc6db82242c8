"""Peer baselines for the safety testbed (issue 47), written here and not in the package.

* ``antidote``: Antidote (Huang et al. 2024, git-disl/Antidote), one-shot Wanda
  pruning of the fine-tune on harmful prompt/answer pairs.
* ``safedelta``: Safe Delta (Lu et al., ICML 2025, ColinLu50/SafeDelta), the
  fine-tune's weight changes kept under a safety budget with an Optimal Brain Surgeon
  correction, SparseGPT-style.
* ``activations``: what both share: the fused linear weights of a model (the
  package's ``fused.fuses`` with the layout transformers reports), their input Grams
  over rendered rows (the package's streamed forward and hooks), reading and writing
  model folders.

Import with ``benchmarks/`` on ``sys.path`` (as the testbed and its tests do):
``from baselines.antidote import antidote_states``.
"""
