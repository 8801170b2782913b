"""Training: data pipeline, Muon + AdamW, the loop, checkpoints, generation, the `hyla` CLI."""
