"""Layer 3: networks. The U-Net, DiT/SiT and EDM2 backbones, the parameterisation wrappers (EDM denoiser,
consistency function, flow velocity, MeanFlow average velocity), the factory that builds them from a
config, and weight I/O (exports, initialisation from another run, published state dicts).

Imports the formulas, the config and the kernels (attention goes through ``kernels.attention``).
"""
