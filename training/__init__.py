"""The model, its canonical weights and evaluation, the corpus and the miner."""
