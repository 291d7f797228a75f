"""Leaf helpers every layer may use (files, digests, durations); they import no other part of
pyhpc (tests/test_layers.py holds them to it)."""
