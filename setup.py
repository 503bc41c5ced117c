from setuptools import setup

setup(
    name="kvstore",
    version="0.1.0",
    description="Shared-memory KV-cache store for LLM inference: per-host daemon, "
                "huge-page segment, LMDB index, zero-copy clients",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # The card's top-level folders daemon/ and client/ install inside the package, so
    # users write `from kvstore.client import Client` (a top-level `daemon` would clash).
    packages=["kvstore", "kvstore.store", "kvstore.cluster", "kvstore.transport", "kvstore.daemon",
              "kvstore.client", "kvstore.client.adapters"],
    package_dir={"kvstore": "kvstore", "kvstore.store": "kvstore/store", "kvstore.cluster": "kvstore/cluster",
                 "kvstore.transport": "kvstore/transport", "kvstore.daemon": "daemon",
                 "kvstore.client": "client", "kvstore.client.adapters": "client/adapters"},
    install_requires=[
        "lmdb>=1.4",        # the daemon's index: transactional, crash-safe, ~1 us reads
        "posix_ipc>=1.1",   # the /dev/shm segment when huge pages cannot be had
        "numpy>=1.24",      # zero-copy array views and fast copies
        "xxhash>=3",        # xxh3-64 checksums (~59 GB/s here, crc32c: 23 GB/s; releases the GIL,
                            # so two threads hash a large put), xxh3-128 digests of keys
        # the TOML config parser: tomllib is in the standard library only from 3.11, and
        # tomli is the same parser for 3.10 (kvstore.config imports whichever is there)
        "tomli>=2; python_version < '3.11'",
    ],
    extras_require={
        "torch": ["torch>=2.1"],        # tensor puts/gets; the CPU build is enough
        "arrow": ["pyarrow>=12"],       # Plasma-style get_buffers()
        "test": ["pytest>=7", "hypothesis>=6", "pyarrow>=12"],
    },
    entry_points={"console_scripts": ["kvstore-daemon=kvstore.daemon.__main__:main"]},
)
