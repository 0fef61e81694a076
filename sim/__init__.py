"""Multi-node network simulation."""
