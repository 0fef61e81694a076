"""Blocks, canonical encoding, state and the LevelDB store."""
