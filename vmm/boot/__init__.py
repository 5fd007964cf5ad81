"""Boot protocols: how a kernel file becomes guest memory and an entry vCPU state.

One module per protocol: ``elf`` (rrstub's own ELF contract, see
examples/include/rrstub_machine.h), ``pvh`` (an ELF vmlinux with a PVH
note, entered in 32-bit protected mode with ``hvm_start_info``), ``linux``
(a bzImage through the x86 64-bit boot protocol, and host-side extraction
of the vmlinux inside it); ``acpi`` builds the tables a Linux guest powers
off with; ``symbols`` finds function names in a kernel without a symbol
table (kallsyms, System.map).

Every way a kernel file can be unusable raises ``BootError`` naming the
file and what to do about it.
"""
from vmm.boot.elf import *  # noqa: F401,F403  (the ELF contract's names, as vmm.boot always had them)
from vmm.boot.elf import BootError, KernelImage, LoadSegment, load, load_kernel_file, parse_elf  # noqa: F401
