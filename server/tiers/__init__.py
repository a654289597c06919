"""Prefix tiers above the device cache: the host-memory cache and the task registry that follows the store."""
