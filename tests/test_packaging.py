"""What a user sees of the package's optional parts when they are not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess with its own interpreter
def test_the_lightning_module_without_lightning_names_the_extra_to_install() -> None:
    # None in sys.modules makes any import of lightning fail as if it were not installed
    script = ("import sys\nsys.modules['lightning'] = None\n"
              "import decent_optim_wrapper\n"  # the core package never needs it
              "import decent_optim_wrapper.lightning\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last == ('ImportError: decent_optim_wrapper.lightning needs Lightning, an optional dependency: install '
                    'the "lightning" extra (pip install "decent-optim-wrapper[lightning]"; in a checkout: uv sync '
                    '--extra lightning) or lightning>=2.6 itself')


def test_core_package_does_not_import_lightning() -> None:
    # Every module of the core package is imported in this process (which never imports Lightning itself).
    import decent_optim_wrapper
    from decent_optim_wrapper import analysis, ddp, launch, optim, reinit  # noqa: F401

    assert decent_optim_wrapper.DecentOptimWrapper is not None
    lightning = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "finetuning_scheduler")
    assert not [m for m in sys.modules if m.split(".")[0] in lightning]
