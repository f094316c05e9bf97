"""Admin-side transport: SSH connections with pinned host keys, helper calls, parallel pools."""
