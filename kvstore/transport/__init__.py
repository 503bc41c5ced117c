"""Peer transports (kvstore.transport.base explains the contract)."""


def open_transport(name, **kw):
    """The reader's side of transport ``name`` ("tcp", "loopback"), built with kw."""
    if name == "tcp":
        from .tcp import TcpTransport
        return TcpTransport(**kw)
    if name == "loopback":
        from .loopback import LoopbackTransport
        return LoopbackTransport(**kw)
    from kvstore.errors import ConfigError
    raise ConfigError(f"unknown peer transport {name!r}: use 'tcp' (or 'loopback' in tests)")


def open_server(name, resolver, **kw):
    """The holder's side of transport ``name``, serving through resolver."""
    if name == "tcp":
        from .tcp import TcpServer
        return TcpServer(resolver, **kw)
    if name == "loopback":
        from .loopback import LoopbackServer
        return LoopbackServer(resolver, **kw)
    from kvstore.errors import ConfigError
    raise ConfigError(f"unknown peer transport {name!r}: use 'tcp' (or 'loopback' in tests)")
