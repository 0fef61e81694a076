"""Consensus rules, fork choice and finality: pure and synchronous, no I/O."""
