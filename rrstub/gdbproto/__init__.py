"""The GDB remote serial protocol: a sans-IO codec (``codec``), the x86-64
target description with its register packing (``target``), host I/O that
serves the recorded kernel as the target's executable (``hostio``) and the
TCP server that maps requests to the replay timeline (``server``).  Packet
syntax stays inside this package."""
