"""Linux kernel files: the bzImage format, and the vmlinux inside it.

A bzImage (``vmlinuz``) is a real-mode setup part followed by a
self-decompressing protected-mode part whose payload is the compressed ELF
vmlinux.  Its header (``Documentation/arch/x86/boot.rst``) says where the
payload is (``payload_offset``, ``payload_length``, boot protocol 2.08+);
``extract_vmlinux`` decompresses it on the host, which here takes well under
a second where the kernel's own decompressor, emulated, would take a minute.

Payload formats, told by their magic: gzip, xz, lzma (the legacy
``lzma_alone`` header), zstd, bzip2, and LZ4 in its legacy frame format
(``lz4 -l``: magic 0x184C2102, then blocks of at most 8 MiB each preceded by
its compressed length).  LZO is not supported (no well-kept library).
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

from vmm.boot.elf import BootError

SETUP_HEADER = 0x1F1
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL_PAYLOAD = 0x208          # payload_offset/payload_length exist from 2.08
MIN_PROTOCOL_64BIT = 0x20C            # XLF_KERNEL_64 and the 64-bit entry from 2.12 (xloadflags)
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20


@dataclass(frozen=True, slots=True)
class SetupHeader:
    """The fields of a bzImage's setup header that rrstub uses (offsets from the file start)."""
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    kernel_alignment: int
    relocatable: bool

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode kernel: the boot sector and the setup sectors."""
        return (self.setup_sects or 4) * 512 + 512


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x268 and data[0x202:0x206] == HDRS_MAGIC and data[0x1FE:0x200] == b"\x55\xaa"


def setup_header(data: bytes, path: str) -> SetupHeader:
    if not is_bzimage(data):
        raise BootError(f"{path}: not a bzImage (no 'HdrS' boot header at 0x202)")
    version, = struct.unpack_from("<H", data, 0x206)
    if version < MIN_PROTOCOL_PAYLOAD:
        raise BootError(f"{path}: boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.08; "
                        "rrstub boots bzImages of Linux 2.6.26 or later")
    setup_sects = data[0x1F1]
    loadflags = data[0x211]
    pref_address, init_size = struct.unpack_from("<QI", data, 0x258)
    kernel_alignment, = struct.unpack_from("<I", data, 0x230)
    relocatable = bool(data[0x234])
    xloadflags, = struct.unpack_from("<H", data, 0x236)
    cmdline_size, = struct.unpack_from("<I", data, 0x238)
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    return SetupHeader(setup_sects, version, loadflags, xloadflags, cmdline_size, payload_offset,
                       payload_length, pref_address, init_size, kernel_alignment, relocatable)


def payload(data: bytes, path: str) -> bytes:
    hdr = setup_header(data, path)
    start = hdr.setup_size + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(data):
        raise BootError(f"{path}: the compressed kernel at file offset {start:#x}+{hdr.payload_length:#x} "
                        f"runs past the end of the file ({len(data):#x} bytes): truncated bzImage?")
    return data[start:end]


def compression_of(blob: bytes) -> Optional[str]:
    """The name of ``blob``'s compression format by its magic, or None."""
    if blob[:2] in (b"\x1f\x8b", b"\x1f\x9e"):
        return "gzip"
    if blob[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if blob[:3] == b"\x5d\x00\x00":
        return "lzma"
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if blob[:3] == b"BZh":
        return "bzip2"
    if len(blob) >= 4 and struct.unpack_from("<I", blob)[0] == LZ4_LEGACY_MAGIC:
        return "lz4"
    if blob[:3] == b"\x89LZ":
        return "lzo"
    return None


def _lz4_legacy(blob: bytes) -> bytes:
    import lz4.block
    out = bytearray()
    at = 4
    while at + 4 <= len(blob):
        n, = struct.unpack_from("<I", blob, at)
        at += 4
        if n == LZ4_LEGACY_MAGIC:      # concatenated frames repeat the magic
            continue
        if at + n > len(blob):
            break                      # the kernel's build appends the decompressed size here
        out += lz4.block.decompress(blob[at:at + n], uncompressed_size=LZ4_LEGACY_BLOCK)
        at += n
    return bytes(out)


def decompress(blob: bytes, what: str) -> tuple[bytes, str]:
    """(decompressed bytes, format name); BootError naming ``what`` if the format is unknown or damaged."""
    fmt = compression_of(blob)
    try:
        if fmt == "gzip":
            # The kernel's build appends the size after the gzip stream: read one member only.
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob), fmt
        if fmt == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob), fmt
        if fmt == "lzma":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob), fmt
        if fmt == "zstd":
            import zstandard
            return zstandard.ZstdDecompressor().decompressobj().decompress(blob), fmt
        if fmt == "bzip2":
            return bz2.BZ2Decompressor().decompress(blob), fmt
        if fmt == "lz4":
            return _lz4_legacy(blob), fmt
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, RuntimeError) as e:
        raise BootError(f"{what}: the {fmt} data is damaged ({e})") from None
    except ImportError as e:
        raise BootError(f"{what}: decompressing {fmt} needs the Python package {e.name!r} "
                        "(`make setup` installs it)") from None
    if fmt == "lzo":
        raise BootError(f"{what}: LZO-compressed, which rrstub cannot decompress; rebuild the kernel with "
                        "another compression (CONFIG_KERNEL_GZIP, _XZ, _ZSTD, _LZ4)")
    raise BootError(f"{what}: compressed in a format rrstub does not know (first bytes {blob[:6].hex(' ')})")


def extract_vmlinux(data: bytes, path: str) -> tuple[bytes, str]:
    """The ELF vmlinux inside a bzImage, and its payload's compression format."""
    elf, fmt = decompress(payload(data, path), f"{path} (compressed kernel)")
    if elf[:4] != b"\x7fELF":
        raise BootError(f"{path}: the {fmt} payload is not an ELF vmlinux (first bytes {elf[:4].hex(' ')})")
    return elf, fmt



# -- the x86 64-bit boot protocol ----------------------------------------------------

BOOT_PARAMS_PADDR = 0x7000            # the "zero page" (memmap.START_INFO_PADDR: one protocol at a time)
_BP_ACPI_RSDP = 0x070
_BP_EXT_RAMDISK_IMAGE = 0x0C0
_BP_EXT_RAMDISK_SIZE = 0x0C4
_BP_EXT_CMD_LINE_PTR = 0x0C8
_BP_E820_ENTRIES = 0x1E8
_BP_HDR = 0x1F1
_BP_TYPE_OF_LOADER = 0x210
_BP_LOADFLAGS = 0x211
_BP_RAMDISK_IMAGE = 0x218
_BP_RAMDISK_SIZE = 0x21C
_BP_CMD_LINE_PTR = 0x228
_BP_E820_TABLE = 0x2D0
E820_MAX_IN_ZERO_PAGE = 128
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
LOADER_UNDEFINED = 0xFF
BOOT_CS, BOOT_DS = 0x10, 0x18         # the selectors the 64-bit entry expects


def load_bzimage(mem, data: bytes, path: str, initial, cmdline: bytes, initrd: Optional[bytes],
                 rsdp: int):
    """Load a bzImage for its 64-bit entry (``startup_64`` of the decompressor, at load + 0x200).

    The protected-mode part goes to ``pref_address``, where it runs without
    relocating itself; the zero page holds the setup header, the e820 map,
    the command line, the initrd and the RSDP.  The vCPU starts in long mode
    on identity-mapped boot page tables, as the protocol requires.
    """
    from dataclasses import replace as _replace

    from vmm.boot import elf as _elf
    from vmm.boot import memmap
    from vmm.kvm import Regs, Segment

    hdr = setup_header(data, path)
    if hdr.version < MIN_PROTOCOL_64BIT or not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{path}: this bzImage has no 64-bit entry point (boot protocol "
                        f"{hdr.version >> 8}.{hdr.version & 0xFF:02d}, xloadflags {hdr.xloadflags:#x})")
    kernel = data[hdr.setup_size:]
    load_at = hdr.pref_address if hdr.pref_address >= memmap.HIGH_RAM else 0x1000000
    end = load_at + max(hdr.init_size, len(kernel))
    if end > mem.size:
        raise BootError(f"{path}: the kernel needs guest RAM up to {end:#x} to decompress itself; use a "
                        f"larger --mem (e.g. --mem {((end >> 20) + 128) // 64 * 64 + 64}M)")
    mem.write(load_at, kernel)
    if len(cmdline) + 1 > min(memmap.CMDLINE_MAX, hdr.cmdline_size + 1 or memmap.CMDLINE_MAX):
        raise BootError(f"kernel command line is {len(cmdline)} bytes; this kernel takes at most "
                        f"{hdr.cmdline_size}")
    mem.write(memmap.CMDLINE_PADDR, cmdline + b"\0")

    zero = bytearray(4096)
    header_end = 0x202 + data[0x201]
    zero[_BP_HDR:header_end] = data[_BP_HDR:header_end]
    zero[_BP_TYPE_OF_LOADER] = LOADER_UNDEFINED
    zero[_BP_LOADFLAGS] |= LOADED_HIGH | KEEP_SEGMENTS
    struct.pack_into("<I", zero, _BP_CMD_LINE_PTR, memmap.CMDLINE_PADDR)
    struct.pack_into("<I", zero, _BP_EXT_CMD_LINE_PTR, 0)
    if initrd is not None:
        addr = memmap.initrd_address(mem.size, len(initrd), end)
        mem.write(addr, initrd)
        struct.pack_into("<II", zero, _BP_RAMDISK_IMAGE, addr & 0xFFFFFFFF, len(initrd) & 0xFFFFFFFF)
        struct.pack_into("<I", zero, _BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zero, _BP_EXT_RAMDISK_SIZE, len(initrd) >> 32)
    regions = memmap.memory_map(mem.size)
    zero[_BP_E820_ENTRIES] = len(regions)
    for i, r in enumerate(regions):
        struct.pack_into("<QQI", zero, _BP_E820_TABLE + 20 * i, r.addr, r.size, r.type)
    struct.pack_into("<Q", zero, _BP_ACPI_RSDP, rsdp)
    mem.write(BOOT_PARAMS_PADDR, bytes(zero))

    _elf._build_page_tables(mem)
    code64 = 0x00AF9A000000FFFF
    data32 = 0x00CF92000000FFFF
    mem.write(memmap.GDT_PADDR, struct.pack("<QQQQ", 0, 0, code64, data32))
    regs = Regs(rip=load_at + 0x200, rsi=BOOT_PARAMS_PADDR, rsp=0x80000 - 16, rflags=0x2)
    code = Segment(base=0, limit=0xFFFFFFFF, selector=BOOT_CS, type=0xB, present=1, dpl=0, db=0, s=1,
                   l=1, g=1)

    def ds() -> Segment:
        return Segment(base=0, limit=0xFFFFFFFF, selector=BOOT_DS, type=0x3, present=1, dpl=0, db=1,
                       s=1, l=0, g=1)
    tss = Segment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
    ldt = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0, unusable=0)
    sregs = _replace(initial, cs=code, ds=ds(), es=ds(), fs=ds(), gs=ds(), ss=ds(), tr=tss, ldt=ldt,
                     gdt_base=memmap.GDT_PADDR, gdt_limit=4 * 8 - 1, idt_base=0, idt_limit=0,
                     cr0=_elf.CR0_PE | _elf.CR0_MP | _elf.CR0_ET | _elf.CR0_NE | _elf.CR0_WP | _elf.CR0_PG,
                     cr2=0, cr3=_elf.BOOT_PML4, cr4=_elf.CR4_PAE, cr8=0,
                     efer=_elf.EFER_LME | _elf.EFER_LMA, interrupt_bitmap=(0, 0, 0, 0))
    return regs, sregs
