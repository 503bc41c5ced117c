"""The daemon's LMDB index: what it records and how the daemon changes it.

Owns: schema.py (environment, tables, caveats), allocator.py (free extents),
policy.py (CLOCK eviction advice), objects.py (what clients ask for, in the order of
effects that keeps lock-free readers safe), maintenance.py (clients, reclaim, recovery,
the consistency check).
Must never: be opened by a client. Clients read kvstore.table and write kvstore.slots;
the only thing they take from here is allocator.extent_size, the rounding rule their
arena space must follow.
"""
