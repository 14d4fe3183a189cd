"""OGPSA for LLaMA-Factory: the projection math, its trainer callback and the stage integration.

Layers (imports only go down): one package per method under `methods/` (`gradient_span`,
`null_space`: each its pure-torch `maths`, its data, its constraint `method`) behind the one
interface `constraint`, over the shared reference sets (`reference`) and engine layouts <-
`callback` (schedule, trainer slots, logging, checkpoints) and `preflight`. LLaMA-Factory is
patched from `ogpsa.pipelines.integration`, armed at start-up by the installed `ogpsa_activate.pth`.
This file stays import-light: nothing here imports torch or llamafactory.
"""
