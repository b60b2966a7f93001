"""Starling gateway."""
