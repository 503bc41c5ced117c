"""Peer transports (kvstore.transport.base explains the contract)."""
