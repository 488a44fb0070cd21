"""The package surface: ``import attnseg`` stays light and every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import attnseg


def test_import_is_light():
    code = "import sys, attnseg; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_names_resolve():
    for name in attnseg.__all__:
        assert getattr(attnseg, name) is not None, name
