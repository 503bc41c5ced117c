#!/usr/bin/env python3
"""The demo round: put and get a few values through a running daemon and show its stats.

Usage: demo.py [SOCKET]   (default: $KVSTORE_SOCKET, else /tmp/kvstore.sock). A store
that cannot be reached, or any other kvstore error, is one line and exit code 1."""

import sys

import numpy as np

from kvstore.client import Client
from kvstore.defaults import socket_path
from kvstore.errors import KVStoreError


def main(sock):
    with Client(sock) as c:
        block = np.random.default_rng(0).standard_normal((16, 1024), dtype=np.float32)
        key = b"kv-block-" + bytes(8)
        print("put  new key      ->", c.put(key, block))
        print("put  same key     ->", c.put(key, block), "(already there: not an error)")
        view = c.get_array(key, np.float32, block.shape)
        print("get  zero-copy    ->", view.shape, view.dtype, "read-only" if not view.flags.writeable else "writable",
              "equal" if np.array_equal(view, block) else "DIFFERENT")
        del view
        c.release(key)
        c.put("greeting", b"hello from kvstore")
        print("get  bytes        ->", bytes(c.get("greeting")))
        c.release("greeting")
        print("contains missing  ->", c.contains("missing"), "| get missing ->", c.get("missing"))
        st = c.stats()
        print(f"stats: {st['objects']} objects, {st['used']} of {st['size']} bytes used, "
              f"{st['backing']} segment {st['segment_path']}")


if __name__ == "__main__":
    sock = socket_path(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        main(sock)
    except (KVStoreError, OSError) as e:
        sys.exit(f"demo: {type(e).__name__}: {e}")
