"""The GDB remote serial protocol: a sans-IO codec (``codec``) and the x86-64
target description with its register packing (``target``).  Packet syntax
stays inside this package."""
