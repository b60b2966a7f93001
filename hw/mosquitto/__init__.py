"""Mosquitto broker templates for a Starling gateway: TLS, per-device passwords and ACLs, safe queue limits."""
