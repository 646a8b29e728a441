"""The relay benchmark: the app against a bare relay, side by side in one run (see run.py)."""
