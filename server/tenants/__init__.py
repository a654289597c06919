"""Tenants: API keys, namespaces of prefixes, quotas and the audit log (docs/tenants.md)."""
