"""The constraint methods (`ogpsa_method`), one package each, behind the one interface of
`plugin/constraint.py` and its `REGISTRY`:

    gradient_span/   method.py (the constraint), maths.py (the span basis and its projection, pure
                     torch), gradients.py (its data: the reference sets' gradients)
    null_space/      method.py (the constraint), maths.py (input covariances' null spaces and the
                     projections onto them, pure torch), activations.py (its data: the constrained
                     layers and their inputs on the reference sets)

What both share sits beside this folder: the reference sets (`reference.py`), the engines'
layouts (`sharding.py`), the data-parallel helpers (`dist.py`).
"""
