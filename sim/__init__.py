"""Local networks of real node processes (devnet), adversaries, and network simulation."""
