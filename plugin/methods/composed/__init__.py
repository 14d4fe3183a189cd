"""`ogpsa_method: gradient_span+null_space`: the two constraints composed; see `method.py`."""
