"""Where tasks live above the store: the device and host tiers and their one owner (tiers.py, on lru.py), and the
task registry that maps names to versions and follows the store (registry.py)."""
