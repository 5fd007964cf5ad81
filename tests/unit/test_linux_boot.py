"""Linux boot protocols (vmm/boot/pvh.py, linux.py, kernel.py) on synthetic images."""
import gzip
import lzma
import struct
from dataclasses import fields

import pytest
import zstandard

from vmm.boot import linux, memmap, pvh
from vmm.boot.elf import BootError, KernelImage, LoadSegment
from vmm.boot.kernel import LINUX_PLATFORM_OPTIONS, linux_cmdline, open_kernel
from vmm.kvm import Segment, Sregs


def _elf_with_pvh_note(entry: int) -> bytes:
    note = struct.pack("<III", 4, 8, pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<Q", entry)
    code = b"\xf4" * 16
    phoff, note_off = 64, 64 + 2 * 56
    code_off = note_off + len(note)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, 0x1000000,
                       phoff, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0xFFFFFFFF81000000, 0x1000000, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + note + code


def test_the_pvh_entry_is_read_from_the_xen_note():
    assert pvh.pvh_entry(_elf_with_pvh_note(0x1000850)) == 0x1000850
    assert pvh.pvh_entry(b"\x7fELF" + bytes(100)) is None
    assert pvh.pvh_entry(b"not an elf") is None


@pytest.mark.parametrize("fmt,pack", [
    ("gzip", lambda b: gzip.compress(b) + struct.pack("<I", len(b))),
    ("xz", lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)),
    ("lzma", lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_payloads_decompress_by_their_magic(fmt, pack):
    data = b"\x7fELF" + bytes(range(256)) * 40
    out, found = linux.decompress(pack(data), "k")
    assert (out, found) == (data, fmt)


def test_an_unknown_or_damaged_payload_is_a_clear_error():
    with pytest.raises(BootError, match="format rrstub does not know"):
        linux.decompress(b"\x00\x01\x02\x03\x04\x05", "vmlinuz")
    with pytest.raises(BootError, match="xz data is damaged"):
        linux.decompress(b"\xfd7zXZ\x00" + bytes(40), "vmlinuz")


def test_the_platform_options_come_first_and_the_users_own_replace_them():
    line = linux_cmdline("console=hvc0 quiet")
    words = line.split()
    assert words[-2:] == ["console=hvc0", "quiet"]
    assert "console=ttyS0" not in words and "nolapic" in words
    assert linux_cmdline("quiet", platform=False) == "quiet"
    assert linux_cmdline("").split() == list(LINUX_PLATFORM_OPTIONS)


def test_a_pvh_kernel_is_loaded_with_start_info_memory_map_and_initrd():
    class Mem:
        size = 64 << 20

        def __init__(self):
            self.buf = bytearray(self.size)

        def write(self, addr, data):
            self.buf[addr:addr + len(data)] = data

    mem = Mem()
    image = KernelImage("k", 0x1000850, (LoadSegment(0x1000000, 0xFFFFFFFF81000000, b"\x90" * 32, 64),))
    initial = Sregs(**{f.name: (Segment() if f.type in ("Segment", Segment) else
                                (0, 0, 0, 0) if f.name == "interrupt_bitmap" else 0) for f in fields(Sregs)})
    regs, sregs = pvh.load(mem, image, 0x1000850, initial, b"console=ttyS0", b"INITRD" * 100, 0xE0000)
    assert regs.rip == 0x1000850 and regs.rbx == memmap.START_INFO_PADDR
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31) and sregs.efer == 0 and sregs.cs.db == 1
    info = struct.unpack_from("<IIIIQQQQII", mem.buf, memmap.START_INFO_PADDR)
    assert info[0] == pvh.HVM_START_MAGIC and info[1] == 1 and info[3] == 1
    assert info[6] == 0xE0000 and info[8] == 3
    assert bytes(mem.buf[info[5]:info[5] + 14]) == b"console=ttyS0\0"
    mod_addr, mod_size = struct.unpack_from("<QQ", mem.buf, info[4])
    assert mod_size == 600 and bytes(mem.buf[mod_addr:mod_addr + 6]) == b"INITRD"
    assert mod_addr + mod_size <= mem.size and mod_addr % 4096 == 0
    regions = [struct.unpack_from("<QQII", mem.buf, info[7] + 24 * i) for i in range(info[8])]
    assert regions[-1][:3] == (0x100000, mem.size - 0x100000, memmap.E820_RAM)
    assert bytes(mem.buf[0x1000000:0x1000020]) == b"\x90" * 32


def test_open_kernel_picks_pvh_for_an_elf_with_the_note_and_refuses_bzimage_boot_of_it():
    data = _elf_with_pvh_note(0x1000000)
    k = open_kernel(data, "vmlinux")
    assert (k.protocol, k.entry, k.linux) == ("pvh", 0x1000000, True)
    with pytest.raises(BootError, match="needs a bzImage"):
        open_kernel(data, "vmlinux", boot="bzimage")
