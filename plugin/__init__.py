"""OGPSA for LLaMA-Factory: the projection math, its trainer callback and the stage integration.

Layers (imports only go down): the pure-torch maths (`projection`, `nullspace`) <- their inputs
(`reference`, `activations`) and the constraints (`gradient_span`, `null_space`, `constraint`) <-
`callback` (schedule, trainer slots, logging, checkpoints) and `preflight`. LLaMA-Factory is
patched from `ogpsa.pipelines.integration`, armed at start-up by the installed `ogpsa_activate.pth`.
This file stays import-light: nothing here imports torch or llamafactory.
"""
