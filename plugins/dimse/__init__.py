"""pacsfetch's own DIMSE engine, one module per layer of the standard.

- :mod:`.pdu`: PS3.8 PDUs, encoded and decoded (no I/O);
- :mod:`.ul`: the PS3.8 upper-layer state machine (no I/O);
- :mod:`.messages`: PS3.7 command sets, coded directly;
- :mod:`.association`: the blocking-socket driver, one thread per association;
- :mod:`.services`: C-ECHO, C-FIND, C-GET, C-MOVE and C-STORE as the transports use them.

Every association pacsfetch opens or accepts runs here (the move receiver's server
included); pynetdicom is not used. This package imports nothing heavy at import time: the
per-instance paths need no pydicom.
"""
