"""Starling's IMU CNN on Flower's own runtime, for bench/vs_flower.py."""
