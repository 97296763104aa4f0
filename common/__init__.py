"""The base every layer stands on: user errors, atomic writes, the config-tree framework, image helpers, model
limits, the trigger-word rule and the metadata format. Imports nothing of ours (tests/test_layers.py checks)."""
