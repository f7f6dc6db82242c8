import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import mergekit_lssf  # noqa: E402,F401  registers lssf for in-process tests


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """Tiny toy models (unaligned, aligned, finetuned), built once per test session."""
    from mergekit_lssf.toy_models import ToySpec, build_toy_models

    root = tmp_path_factory.mktemp("toy")
    build_toy_models(str(root), ToySpec(size="tiny"))
    return root
