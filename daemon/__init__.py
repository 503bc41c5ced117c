"""kvstore's per-host daemon (installed as the package ``kvstore.daemon``).

Run it with ``kvstore-daemon`` or ``python -m kvstore.daemon``; embed it with
``kvstore.daemon.server.Daemon``.
"""
