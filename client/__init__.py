"""kvstore's Python client (installed as the package ``kvstore.client``)."""

from .client import Client

__all__ = ["Client"]
