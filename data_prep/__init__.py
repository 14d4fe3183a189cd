"""Data preparation for OGPSA: `ogpsa data saferlhf|refsets|tiny` (see `cli.py`).

Writes LLaMA-Factory-ready Alpaca-format JSON files plus `dataset_info.json` entries; imports
nothing from the training code (`ogpsa.plugin`, `ogpsa.pipelines`).
"""
