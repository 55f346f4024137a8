"""torchft's lighthouse, started without importing torch: ``python ft_lighthouse.py [torchft_lighthouse's args]``.

The ``torchft_lighthouse`` entry point imports the ``torchft`` package, which imports torch before the Rust server
starts: 4-10 s on the 2-core CI machine, so a lighthouse "restarted" after 2 s was really down for 6-12 s, longer
than the replicas' quorum timeout, and the restart test failed for a reason of its own. The server itself is the
``torchft._torchft`` extension, which links no torch: loaded on its own, it listens within 50 ms. It reads the
process's argv past the first entry (the interpreter), as it does under the entry point.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("torchft")
found = sorted(Path(spec.submodule_search_locations[0]).glob("_torchft.*.so")) if spec is not None and \
    spec.submodule_search_locations else []
if found:
    path = str(found[0])
    loader = importlib.machinery.ExtensionFileLoader("torchft._torchft", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("torchft._torchft", path,
                                                                                    loader=loader))
    loader.exec_module(module)
    lighthouse_main = module.lighthouse_main
else:  # another layout: the package's own import, slow but the same server
    from torchft._torchft import lighthouse_main
sys.exit(lighthouse_main())
