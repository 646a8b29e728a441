"""The outside world: one client per provider kind, behind the ProviderClient seam (base.py)."""
