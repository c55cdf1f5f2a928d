"""One module per ecosystem. Each imports its framework itself, so ``import irdro_sampler`` never does."""
