"""Architectures and building blocks, reached through one registry."""

from cnnkit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
