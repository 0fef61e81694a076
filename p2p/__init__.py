"""The libp2p host, gossip and sync."""
