"""Review 3: get_into must never write into ANY mapping of the store's segment in this
process, including the read-write mapping of another Client of the same process.

The facade re-checks at each copy that the registered range does not overlap its own
client's mappings of the segment (a buffer freed after register_buffer may have been
reused by a mapping made later). A second Client in the process (an engine connector
next to the facade, or a second facade) was not checked: a registered buffer freed
and then reused by that client's read-write mapping of the segment let get_into
overwrite a sealed object in place (with the kernel-checked copy, since that mapping
is writable), and every reader saw the wrong bytes. Runs in a child process (it plays
with raw mappings)."""

from conftest import run_py

CHILD = r'''
import ctypes, sys
from kvstore.client import Client
from kvstore.client.mooncake import MooncakeDistributedStore
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
s = MooncakeDistributedStore()
assert s.setup({"master_server_address": sys.argv[1]}) == 0
VAL = b"A" * 16384
assert s.put("victim", VAL) == 0
assert s.put("src", b"Z" * 16384) == 0
probe = Client(sys.argv[1])
size, R = probe._conn.att.size, probe._conn.att.rw_range[0]
probe.close()                                   # R: where a new client maps its segment
p = libc.mmap(R, size, 3, 0x22, -1, 0)          # the caller's buffer, there
assert s.register_buffer(p, size) == 0
libc.munmap(p, size)                            # freed without unregister_buffer
other = Client(sys.argv[1])                     # another client of this process
att = other._conn.att
if att.rw_range[0] != p:
    print("SKIP the new mapping did not land on the freed buffer")
    sys.exit(0)
v = other.get("victim")
import numpy as np
off = np.frombuffer(v, dtype=np.uint8).ctypes.data - att.ro_range[0]
other.release("victim")
code = s.get_into("src", p + off, 16384)        # into other's read-write segment mapping
from kvstore.errors import ChecksumMismatch
try:
    got = bytes(other.read("victim"))
except ChecksumMismatch:                        # its bytes were overwritten
    got = None
print("CODE", code, "INTACT", got == VAL)
'''


def test_get_into_refuses_another_clients_segment_mapping(daemon):
    r = run_py(CHILD, daemon.socket)
    if "SKIP" in r.stdout:
        import pytest
        pytest.skip("the kernel placed the second client's mapping elsewhere: " + r.stdout)
    line = next(l for l in r.stdout.splitlines() if l.startswith("CODE"))
    code, intact = int(line.split()[1]), line.split()[3] == "True"
    assert intact, f"get_into overwrote a sealed object through another client's mapping ({line})"
    assert code < 0, line
