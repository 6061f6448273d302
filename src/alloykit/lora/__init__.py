"""LoRA outputs: low-rank adapters extracted from (or merged into) dense deltas."""
