"""gpt2forge: GPT-2 pretraining from scratch, end to end."""

__version__ = "0.1.0"
