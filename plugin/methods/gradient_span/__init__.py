"""`ogpsa_method: gradient_span` (OGPSA): see `method.py`."""
