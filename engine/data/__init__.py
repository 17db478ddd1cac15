"""Layer 2: data. File readers (sources), the in-memory dataset and the DALI loader with the same batches,
the seeded sampler, and the SD-VAE latent encoder. Imports engine.errors and engine.files only.
"""
