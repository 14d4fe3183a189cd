"""OGPSA for LLaMA-Factory: the projection math, its trainer callback and the stage integration.

Layers (imports only go down): `projection` (pure torch) <- `reference`, `callback`, `settings`
<- `integration` (what patches LLaMA-Factory's tuner). Activation in a process is done by
`ogpsa.pipelines.activation`, armed at start-up by the installed `ogpsa_activate.pth`.
This file stays import-light: nothing here imports torch or llamafactory.
"""
