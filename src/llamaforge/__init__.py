"""llamaforge: write, pretrain, extend, fine-tune, evaluate and publish LLaMA-style models."""

__version__ = "0.1.0"
