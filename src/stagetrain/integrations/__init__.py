"""Thin adapters that run a stagetrain curriculum inside other training frameworks.

``stagetrain.integrations.hf`` (Hugging Face Trainer),
``stagetrain.integrations.lightning`` (PyTorch Lightning) and
``stagetrain.integrations.keras`` (Keras 3, any backend) import their framework
lazily: install ``stagetrain[hf]``, ``stagetrain[lightning]`` or ``stagetrain[keras]``.
"""
