"""atelier: text-guided generation and editing with diffusion models, built on diffusers."""

__version__ = "0.1.0"
