"""Sizes written by people: "2GiB", "512MiB", "64k", "4GB", "1.5GiB", or a byte count.

Owns: the one size parser, ``parse_size``, used by the daemon's configuration (flags,
environment, TOML) and by the Mooncake facade (``global_segment_size`` and
``local_buffer_size`` in setup() and mooncake.json), so one string means one number
of bytes wherever it is written.

The rule: every unit is a power of 1024, whatever its spelling, and case does not
matter. K, KB and KiB are 1024 bytes; M, MB, MiB are 1024**2; G, GB, GiB are 1024**3;
T, TB, TiB are 1024**4; B or no unit is bytes. A fraction is allowed ("1.5GiB") and
the result is rounded down to whole bytes.

Why "4GB" is 4 GiB here and not 4 * 10**9: Mooncake's users write "4GB" in
mooncake.json, and Mooncake reads it as 4 GiB (its string_to_byte_size in
mooncake-store/include/utils.h multiplies K/KB, M/MB, G/GB, T/TB by powers of 1024;
SGLang's and vLLM's Mooncake configs do the same). The facade must mean what they
mean, and the daemon's --size must mean what the facade means, or the same "4GB"
would be two sizes in one deployment. Memory is sized in powers of two anyway (huge
pages, the allocator's extents), so no one is surprised by the binary reading.
Must never: guess at a string it cannot read (it raises ConfigError naming the field
and saying what to write), or accept a bool as a number.
"""

import re
from decimal import Decimal

from .errors import ConfigError

_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = _UNITS[_p + "ib"] = 1024 ** _i
del _i, _p

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

#: What an error message tells the user to write.
_HOWTO = ("write a byte count or a number with a unit, e.g. 4096, '2GiB', '512MiB', '64k' "
          "(K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB are all powers of 1024)")


def parse_size(value, field="size", minimum=1):
    """Bytes (an int >= minimum) from an int or a string such as '2GiB' or '4GB'.

    ``field`` names the setting in error messages (ConfigError, starting "field:").
    """
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{field}: {value!r} is not a size; {_HOWTO}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise ConfigError(f"{field}: {value!r} is not a size; {_HOWTO}")
        n = int(Decimal(m.group(1)) * _UNITS[unit])     # exact: no float rounding of big counts
    if n < minimum:
        raise ConfigError(f"{field}: {value!r} must be at least {minimum} bytes; {_HOWTO}")
    return n
