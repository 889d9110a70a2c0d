"""Models: the target diffusion model (``target``) and the noise-aware classifier (``classifier``)."""
