"""Thin adapters that run a stagetrain curriculum inside other training frameworks.

``stagetrain.integrations.hf`` (Hugging Face Trainer) and
``stagetrain.integrations.lightning`` (PyTorch Lightning) import their framework
lazily: install ``stagetrain[hf]`` or ``stagetrain[lightning]``.
"""
