"""Training-stability benchmark suite for Transformer residual and normalization variants."""
