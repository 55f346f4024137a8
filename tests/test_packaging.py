"""What a user sees of the package's optional parts when they are not installed."""

from __future__ import annotations

import subprocess
import sys


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
