"""Interpretability tooling around the layers: capturing MLP activations from real models, swapping
MLPs for replacement layers, training them, and the metrics (FVU, L0, dead fraction, Jacobian
faithfulness). Imports ``molt_kernels.layers`` (and so the ops), never the tools."""
