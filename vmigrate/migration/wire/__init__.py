"""Sans-IO codecs of the QEMU 7.2 migration stream.

Pure functions and incremental decoders over bytes - no sockets, threads or
clocks - so every rule can be tested with byte vectors captured from a real
QEMU (tests/unit/vectors).  Modules:

* :mod:`.stream` - header, configuration, section framing, commands, EOF,
  vmdesc; :class:`~.stream.StreamDecoder` for a destination's main channel;
* :mod:`.ram` - RAM section records, vectorized page-run encoder/decoder;
* :mod:`.vmstate` - declarative device sections (timer, globalstate) and
  the vmdesc JSON;
* :mod:`.return_path` - destination -> source messages.
"""

from vmigrate.migration.wire.buffer import NEED_DATA
from vmigrate.migration.wire.errors import WireError

__all__ = ["NEED_DATA", "WireError"]
