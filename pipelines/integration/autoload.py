"""Imported by `ogpsa_activate.pth` at interpreter start-up: arms the post-import hook.

Cheap and inert: it only registers a finder that waits for `llamafactory` to be imported.
`OGPSA_DISABLE=1` turns the integration off for one process (stock LLaMA-Factory behaviour).
"""

import os

if os.environ.get("OGPSA_DISABLE", "").lower() not in ("1", "true", "yes"):
    from .hook import arm

    arm()
