"""Dataset preparation and the small shared base (errors, atomic writes, config tree). Imports nothing of ours."""
