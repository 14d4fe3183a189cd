"""torchrun entry of one rank (`llamafactory-cli train` with FORCE_TORCHRUN or several GPUs).

Kept alone in its folder: torchrun puts this folder first on sys.path, so nothing else here may
shadow a top-level module name.
"""

import sys

from ogpsa.pipelines.integration.entry import run_worker

if __name__ == "__main__":
    sys.exit(run_worker())
