"""ray-qlora: fine-tune a language model on your own data with QLoRA, on Ray."""

__version__ = "0.1.0"
