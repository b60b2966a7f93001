"""Starling ledger."""
