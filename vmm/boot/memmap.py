"""The guest-physical memory map every Linux boot protocol hands the kernel.

Owns the layout of low memory for Linux guests: where the boot structures,
the ACPI tables and the initrd go, and the e820-style map that describes
RAM around them.  Both protocols (``pvh``, ``linux``) describe the same
machine, so they take their map from here.

Layout (guest physical):
  0x0000_1000  boot GDT                      (RAM; Linux reuses it)
  0x0000_6000  memory map / modules list     (RAM, copied by Linux early)
  0x0000_7000  hvm_start_info or boot_params (RAM, copied by Linux early)
  0x0000_9000  boot page tables (bzImage)    (RAM)
  0x0002_0000  kernel command line           (RAM, copied by Linux early)
  0x000E_0000  ACPI tables                   (reserved: Linux keeps them)
  0x0010_0000  RAM to the end, the kernel at its own physical address and
               the initrd at the top
"""
from __future__ import annotations

from dataclasses import dataclass

E820_RAM = 1
E820_RESERVED = 2

LOW_RAM_END = 0xA0000          # conventional memory ends where the VGA hole starts
BIOS_AREA = 0xE0000            # 0xE0000..0xFFFFF: ACPI tables here, reserved
HIGH_RAM = 0x100000

GDT_PADDR = 0x1000
MEMMAP_PADDR = 0x6000
MODLIST_PADDR = 0x6C00
START_INFO_PADDR = 0x7000
CMDLINE_PADDR = 0x20000
CMDLINE_MAX = 0x10000
ACPI_PADDR = BIOS_AREA


@dataclass(frozen=True, slots=True)
class Region:
    addr: int
    size: int
    type: int


def memory_map(mem_size: int) -> list[Region]:
    """RAM below the VGA hole, the reserved BIOS area with the ACPI tables, RAM above 1 MiB."""
    return [Region(0, LOW_RAM_END, E820_RAM),
            Region(BIOS_AREA, HIGH_RAM - BIOS_AREA, E820_RESERVED),
            Region(HIGH_RAM, mem_size - HIGH_RAM, E820_RAM)]


def initrd_address(mem_size: int, size: int, kernel_end: int) -> int:
    """Where the initrd goes: page-aligned at the top of RAM, above the kernel."""
    addr = (mem_size - size) & ~0xFFF
    if addr < kernel_end:
        from vmm.boot.elf import BootError
        need = ((kernel_end + size) >> 20) + 64
        raise BootError(f"the initrd ({size >> 20} MiB) does not fit in guest RAM above the kernel "
                        f"(which ends at {kernel_end:#x}); use a larger --mem (e.g. --mem {need}M)")
    return addr
