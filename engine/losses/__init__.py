"""Layer 3: losses. Per-sample distances (mean squared, L2 norm, perceptual through the fused feature-distance
kernel), the feature networks behind them (ELatentLPIPS' GN-VGG, LPIPS' VGG16) and their augmentation.

Imports data (the digits feature net trains on the digits), files and the kernels.
"""
