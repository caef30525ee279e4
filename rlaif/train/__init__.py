"""Diffusion-DPO training (Wallace et al., 2023)."""
