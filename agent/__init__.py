"""Starling agent."""
