"""Autoencoders: on features, on pixels (and the denoiser built from it), their noise, pictures and summaries."""
