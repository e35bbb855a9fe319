"""cosyjax: CosyVoice2 / CosyVoice3 text-to-speech in JAX/Flax."""
__version__ = "0.1.0"
