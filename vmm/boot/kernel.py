"""A kernel to boot, whatever its file format: the one object the machine loads.

``open_kernel`` looks at the bytes and picks the protocol:
* an ELF with a PVH note (an unstripped or extracted Linux vmlinux): PVH;
* another ELF64 executable: rrstub's own ELF contract (vmm.boot.elf);
* a bzImage: by default the vmlinux inside it is decompressed on the host
  and booted through PVH when it has a PVH note (``boot="auto"`` or
  ``"pvh"``), which skips minutes of emulated decompression on hosts that
  emulate guest kernel code; ``boot="bzimage"`` enters the bzImage's own
  64-bit entry and lets its decompressor run in the guest.
``Kernel.how`` says which path was taken, for the user to see.

Linux guests get the platform's command-line options (``linux_cmdline``)
and ACPI tables; the file bytes (``data``) and the initrd are what a
recording stores, so a replay rebuilds the same kernel.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Optional

from vmm.boot import elf, linux, memmap, pvh
from vmm.boot.elf import BootError, KernelImage

BOOT_CHOICES = ("auto", "pvh", "bzimage")

# What the rrstub platform needs a Linux kernel to be told (README, "Linux guests"):
# the console is the 16550 at 0x3f8; there is no local APIC or IOAPIC (the 8259 PIC
# delivers every interrupt); no kvmclock (its readings come from the host); no Spectre/Meltdown
# mitigations (page-table isolation doubles the cost of every kernel entry here);
# no PCI bus to probe. The CPU features hidden
# with clearcpuid are those this host's KVM would otherwise make us emulate on hot
# paths (SMAP's clac/stac on every user copy) or cannot run at all (XSAVE).
LINUX_PLATFORM_OPTIONS = (
    "console=ttyS0", "earlycon=uart8250,io,0x3f8", "nolapic", "noapic", "no-kvmclock", "mitigations=off",
    "pci=off", "clearcpuid=xsave,smap,pku,avx,avx2,avx512f,ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni",
    "cryptomgr.notests", "reboot=a", "panic=-1",
    "i8042.noaux", "i8042.nokbd",
)


def _key(option: str) -> str:
    return option.split("=", 1)[0]


def linux_cmdline(user: str, platform: bool = True) -> str:
    """``user``'s command line with the platform's options it does not set itself put first.

    An option the user gives with the same name (``console=hvc0``) replaces
    the platform's; ``platform=False`` passes ``user`` alone.
    """
    if not platform:
        return user
    try:
        given = shlex.split(user, posix=False)
    except ValueError:
        given = user.split()
    keys = {_key(o) for o in given}
    if "--" in given:
        keys |= {_key(o) for o in given[:given.index("--")]}
    kept = [o for o in LINUX_PLATFORM_OPTIONS if _key(o) not in keys]
    return " ".join(kept + ([user] if user.strip() else []))


@dataclass
class Kernel:
    name: str                         # the file's base name
    data: bytes                       # the file as given
    protocol: str                     # "elf" (rrstub's contract), "pvh", "bzimage"
    how: str                          # one line: which path was taken
    image: Optional[KernelImage] = None   # PT_LOAD segments (elf, pvh)
    entry: int = 0                    # the PVH entry (physical)
    vmlinux: Optional[bytes] = None   # the ELF vmlinux (pvh), for symbols
    initrd: Optional[bytes] = None
    initrd_name: Optional[str] = None
    _symbol_file: Optional[bytes] = field(default=None, repr=False)

    @property
    def linux(self) -> bool:
        return self.protocol in ("pvh", "bzimage")

    @classmethod
    def from_image(cls, image: KernelImage, data: bytes = b"") -> "Kernel":
        return cls(os.path.basename(image.path), data, "elf", "rrstub ELF boot contract", image)

    def load(self, mem, initial, cmdline: str):
        """Put the kernel and its boot structures in ``mem``: the entry (Regs, Sregs)."""
        if self.protocol == "elf":
            if self.initrd is not None:
                raise BootError(f"{self.name}: --initrd is for Linux kernels; this is an rrstub ELF kernel")
            return elf.load(mem, self.image, initial, cmdline)
        try:
            from vmm.boot import acpi
        except ImportError:         # no ACPI tables yet: Linux boots, but cannot power off
            rsdp = 0
        else:
            blob, rsdp = acpi.build_tables(memmap.ACPI_PADDR)
            mem.write(memmap.ACPI_PADDR, blob)
        encoded = cmdline.encode()
        if self.protocol == "pvh":
            return pvh.load(mem, self.image, self.entry, initial, encoded, self.initrd, rsdp)
        return linux.load_bzimage(mem, self.data, self.name, initial, encoded, self.initrd, rsdp)

    def symbol_file(self) -> Optional[bytes]:
        """An ELF gdb can load for this kernel's symbols (None: the file itself serves)."""
        if self.vmlinux is None:
            return None
        if self._symbol_file is None:
            from vmm.boot import symbols
            self._symbol_file = symbols.symbol_elf(self.vmlinux, symbols.kernel_symbols(self.vmlinux, self.name))
        return self._symbol_file

    def symbols(self):
        from vmm.boot import symbols
        if self.vmlinux is not None:
            return symbols.kernel_symbols(self.vmlinux, self.name)
        return symbols.kernel_symbols(self.data, self.name) if self.data[:4] == b"\x7fELF" else []


def open_kernel(data: bytes, name: str, initrd: Optional[bytes] = None, initrd_name: Optional[str] = None,
                boot: str = "auto") -> Kernel:
    """The kernel in ``data`` (file name ``name``), booted as ``boot`` says (BOOT_CHOICES)."""
    if boot not in BOOT_CHOICES:
        raise BootError(f"--boot {boot}: choose one of {', '.join(BOOT_CHOICES)}")
    base = os.path.basename(name)
    if data[:4] == b"\x7fELF":
        entry = pvh.pvh_entry(data)
        if boot == "bzimage":
            raise BootError(f"{name}: --boot bzimage needs a bzImage (vmlinuz); this is an ELF file")
        if entry is not None:
            image = elf.parse_elf(data, name)
            return Kernel(base, data, "pvh", f"ELF vmlinux, PVH entry at {entry:#x}", image, entry, data,
                          initrd, initrd_name)
        if boot == "pvh":
            raise BootError(f"{name}: --boot pvh needs a kernel with a PVH note (Linux with CONFIG_PVH); "
                            "this ELF has none")
        k = Kernel.from_image(elf.parse_elf(data, name), data)
        k.initrd, k.initrd_name = initrd, initrd_name
        return k
    if linux.is_bzimage(data):
        if boot == "bzimage":
            return Kernel(base, data, "bzimage", "bzImage through its own 64-bit entry (the kernel "
                          "decompresses itself in the guest)", initrd=initrd, initrd_name=initrd_name)
        vmlinux, fmt = linux.extract_vmlinux(data, name)
        entry = pvh.pvh_entry(vmlinux)
        if entry is None:
            if boot == "pvh":
                raise BootError(f"{name}: the vmlinux inside has no PVH note (CONFIG_PVH is off); "
                                "boot it with --boot bzimage")
            return Kernel(base, data, "bzimage", f"bzImage through its own 64-bit entry (its {fmt} "
                          "vmlinux has no PVH note)", initrd=initrd, initrd_name=initrd_name)
        image = elf.parse_elf(vmlinux, f"{name} (vmlinux)")
        return Kernel(base, data, "pvh", f"bzImage: its {fmt} vmlinux decompressed on the host "
                      f"({len(vmlinux) >> 20} MiB), PVH entry at {entry:#x}", image, entry, vmlinux,
                      initrd, initrd_name)
    # Let the ELF parser explain what the file is not.
    elf.parse_elf(data, name)
    raise BootError(f"{name}: not a kernel rrstub can boot")


def open_kernel_file(path: str, initrd: Optional[str] = None, boot: str = "auto") -> Kernel:
    data = elf.read_boot_file(path, "kernel")
    blob = elf.read_boot_file(initrd, "initrd") if initrd is not None else None
    return open_kernel(data, str(path), blob, None if initrd is None else os.path.basename(initrd), boot)
