"""`ogpsa_method: null_space` (NSPO): see `method.py`."""
