"""ELF64 parsing and the direct-boot contract (vmm/boot.py), checked against examples/include/rrstub_machine.h."""
import random
import re
import struct
from pathlib import Path

import pytest
from elfgen import make_elf

from vmm import boot, machine
from vmm.boot import BootError, KernelImage, LoadSegment, load, load_kernel_file, parse_elf
from vmm.devices import hypercall, misc, pit
from vmm.kvm import SEGMENT_NAMES, Regs, Segment, Sregs
from vmm.memory import GuestMemory
from vmm.paging import PageFault, read_virtual, translate

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "examples" / "include" / "rrstub_machine.h"
EXAMPLES = ROOT / "examples" / "build"
MEM_SIZE = 8 << 20
CODE = bytes(range(1, 33))
APIC_BASE = 0xFEE0_0D00
HIGH = 0xFFFF_FFFF_8000_0000
EHDR, PHDR = 64, 56                       # elfgen layout: ELF header, then one program header


def elf(**kw):
    return make_elf(kw.pop("code", CODE), **kw)


def patch(data, offset, fmt, value):
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def image(**kw):
    return parse_elf(elf(**kw), "k.elf")


def initial_sregs():
    """A vCPU reset state: default segments, an APIC base the loader must keep."""
    return Sregs(**{n: Segment() for n in SEGMENT_NAMES}, gdt_base=0, gdt_limit=0xFFFF, idt_base=0,
                 idt_limit=0xFFFF, cr0=0x6000_0010, cr2=0, cr3=0, cr4=0, cr8=0, efer=0,
                 apic_base=APIC_BASE, interrupt_bitmap=(1, 0, 0, 0))


def header_defines():
    return {m[1]: int(m[2], 0) for m in
            re.finditer(r"^#define\s+(RRSTUB_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", HEADER.read_text(), re.M)}


def header_boot_info_fields():
    """(name, bytes) of struct rrstub_boot_info, in order, from the header."""
    body = re.search(r"struct rrstub_boot_info \{(.*?)\};", HEADER.read_text(), re.S)[1]
    return [(name, int(bits) // 8) for bits, name in re.findall(r"uint(\d+)_t\s+(\w+);", body)]


def boot_info(mem):
    fields = header_boot_info_fields()
    fmt = "<" + "".join({8: "Q", 4: "I"}[size] for _, size in fields)
    return dict(zip((n for n, _ in fields), struct.unpack_from(fmt, mem.read(boot.BOOT_INFO, 64))))


@pytest.fixture
def mem():
    m = GuestMemory(MEM_SIZE)
    m.write(0, b"\xAA" * MEM_SIZE)                # any byte load() leaves alone stays 0xAA
    yield m
    m.close()


# ---- parse_elf ----

def test_parse_valid_elf():
    img = image(paddr=0x20_0000, vaddr=HIGH + 0x20_0000, entry=HIGH + 0x20_0010, memsz=0x3000)
    assert img.path == "k.elf" and img.entry == HIGH + 0x20_0010
    assert img.segments == (LoadSegment(0x20_0000, HIGH + 0x20_0000, CODE, 0x3000),)
    assert (img.start, img.end) == (0x20_0000, 0x20_3000)


@pytest.mark.parametrize("data, problem", [
    (b"", "not an ELF file"),
    (random.Random(7).randbytes(300), "not an ELF file"),
    (b"MZ\x90\x00" + bytes(200), "not an ELF file"),
    (b"\x7fELF\x02\x01\x01" + bytes(20), "truncated ELF header"),
    (elf(elf_class=1), "32-bit"),
    (patch(elf(), 5, "B", 2), "big-endian"),
    (elf(machine=3), "machine type 3"),
    (elf(machine=183), "machine type 183"),
    (elf(e_type=3), "ELF type 3 is not an executable"),
    (elf(e_type=1), "ELF type 1 is not an executable"),
    (elf()[:EHDR + 20], "program headers run past the end"),
    (patch(elf(), 56, "<H", 0), "no usable program headers"),          # e_phnum = 0
    (patch(elf(), 54, "<H", 32), "no usable program headers"),         # e_phentsize wrong
    (elf()[:-1], "runs past the end of the file"),
    (patch(elf(), EHDR + 8, "<Q", 0x10_0000), "runs past the end of the file"),   # p_offset
    (elf(memsz=len(CODE) - 1), "exceeds memory size"),
    (patch(elf(), EHDR, "<I", 4), "no PT_LOAD segment"),               # p_type = PT_NOTE
])
def test_parse_errors_name_file_and_problem(data, problem):
    with pytest.raises(BootError) as e:
        parse_elf(data, "/k/vmlinux")
    assert str(e.value).startswith("/k/vmlinux: ")
    assert problem in str(e.value)


def test_non_load_and_empty_segments_are_skipped():
    base = elf()
    code_off = EHDR + 3 * PHDR
    phdrs = (struct.pack("<IIQQQQQQ", 4, 4, 0, 0, 0, 8, 8, 4) +                       # PT_NOTE
             struct.pack("<IIQQQQQQ", 1, 6, 0, 0x40_0000, 0x40_0000, 0, 0, 0x1000) +  # PT_LOAD, memsz 0
             patch(base[EHDR:EHDR + PHDR], 8, "<Q", code_off))                        # the real one
    img = parse_elf(patch(base[:EHDR], 56, "<H", 3) + phdrs + CODE)
    assert img.segments == (LoadSegment(0x10_0000, 0x10_0000, CODE, len(CODE)),)


def test_load_kernel_file_reads_and_parses(tmp_path):
    p = tmp_path / "k.elf"
    p.write_bytes(elf())
    img = load_kernel_file(p)
    assert img.path == str(p) and img.segments[0].data == CODE


@pytest.mark.parametrize("name, problem", [("missing.elf", "no such kernel file"), (".", "is a directory")])
def test_load_kernel_file_errors(tmp_path, name, problem):
    path = tmp_path / name
    with pytest.raises(BootError) as e:
        load_kernel_file(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_load_kernel_file_bad_content_names_the_file(tmp_path):
    p = tmp_path / "bzImage"
    p.write_bytes(b"\xEB\x3C" + bytes(510))
    with pytest.raises(BootError, match=re.escape(str(p)) + ": not an ELF file"):
        load_kernel_file(p)


def test_from_code_is_a_one_segment_image():
    img = KernelImage.from_code(CODE, "<probe>", 0x20_0000)
    assert (img.path, img.entry, img.start, img.end) == ("<probe>", 0x20_0000, 0x20_0000, 0x20_0000 + len(CODE))


# ---- load(): refusals ----

def test_segment_below_1mib_refused(mem):
    with pytest.raises(BootError, match=r"k\.elf: .*0xff000 is below 0x100000"):
        load(mem, image(paddr=0xFF000), initial_sregs())


def test_segment_beyond_memory_suggests_larger_mem(mem):
    with pytest.raises(BootError, match="does not fit in 8 MiB") as e:
        load(mem, image(memsz=100 << 20), initial_sregs())
    suggested = int(re.search(r"--mem (\d+)M\b", str(e.value))[1]) << 20
    assert suggested >= 0x10_0000 + (100 << 20)
    assert str(e.value).startswith("k.elf: ")


def test_segment_ending_exactly_at_end_of_ram_fits(mem):
    load(mem, image(paddr=MEM_SIZE - 0x1000, memsz=0x1000), initial_sregs())
    assert mem.read(MEM_SIZE - 0x1000, len(CODE)) == CODE


@pytest.mark.parametrize("entry", [4 << 30, 0x0000_7FFF_FFFF_F000, 0x0000_8000_0000_0000,
                                   0xFFFF_8000_0000_0000, HIGH - 1])
def test_entry_outside_boot_mappings_refused(mem, entry):
    with pytest.raises(BootError, match=f"entry point {entry:#x} is outside"):
        load(mem, image(entry=entry), initial_sregs())


def test_too_long_cmdline_refused(mem):
    limit = boot.BOOT_CMDLINE_MAX - 1
    load(mem, image(), initial_sregs(), "x" * limit)
    assert mem.read(boot.BOOT_CMDLINE + limit, 1) == b"\0"
    with pytest.raises(BootError, match="command line"):
        load(mem, image(), initial_sregs(), "x" * (limit + 1))
    with pytest.raises(BootError, match="command line"):         # counted in UTF-8 bytes
        load(mem, image(), initial_sregs(), "\u00e9" * (limit // 2 + 1))


def test_cmdline_of_documented_maximum_fits(mem):
    """rrstub_machine.h promises 3840 bytes, NUL included."""
    load(mem, image(), initial_sregs(), "x" * 3839)
    assert mem.read(boot.BOOT_CMDLINE + 3836, 4) == b"xxx\0"


# ---- load(): memory ----

def test_segments_placed_and_bss_zeroed(mem):
    regs, _ = load(mem, image(memsz=0x1801), initial_sregs())
    assert mem.read(0x10_0000, len(CODE)) == CODE
    assert mem.read(0x10_0000 + len(CODE), 0x1801 - len(CODE)) == bytes(0x1801 - len(CODE))
    assert mem.read(0x10_1801, 16) == b"\xAA" * 16          # nothing written past memsz
    assert mem.read(0x10_0000 - 16, 16) == b"\xAA" * 16


def test_boot_info_block(mem):
    load(mem, image(memsz=0x1801), initial_sregs(), "console=ttyS0 quiet")
    assert mem.read(boot.BOOT_INFO, 8) == b"RRSTBOOT"
    assert boot_info(mem) == dict(magic=boot.BOOT_MAGIC, version=1, size=56, mem_bytes=MEM_SIZE,
                                  kernel_start=0x10_0000, kernel_end=0x10_1801, free_start=0x10_2000,
                                  cmdline=boot.BOOT_CMDLINE)
    assert mem.read(boot.BOOT_CMDLINE, 20) == b"console=ttyS0 quiet\0"


def test_boot_info_spans_all_segments_and_aligned_end_stays(mem):
    segs = (LoadSegment(0x30_0000, 0x30_0000, b"\x22" * 8, 0x1000),   # out of order on purpose
            LoadSegment(0x20_0000, 0x20_0000, b"\x11" * 8, 0x10))
    load(mem, KernelImage("two", 0x20_0000, segs), initial_sregs())
    info = boot_info(mem)
    assert (info["kernel_start"], info["kernel_end"], info["free_start"]) == (0x20_0000, 0x30_1000, 0x30_1000)
    assert mem.read(0x20_0000, 9) == b"\x11" * 8 + b"\0"
    assert mem.read(0x30_0000, 9) == b"\x22" * 8 + b"\0"


def test_empty_cmdline_is_a_lone_nul(mem):
    load(mem, image(), initial_sregs())
    assert mem.read(boot.BOOT_CMDLINE, 2) == b"\0\xAA"
    assert boot_info(mem)["cmdline"] == boot.BOOT_CMDLINE


# ---- load(): page tables ----

@pytest.fixture
def booted(mem):
    regs, sregs = load(mem, image(), initial_sregs())
    return mem, sregs


@pytest.mark.parametrize("vaddr, paddr", [
    (0x10_0000, 0x10_0000), (0, 0), (0x3FFF_FFFF, 0x3FFF_FFFF), (0x4000_0000, 0x4000_0000),
    (0xC012_3456, 0xC012_3456), (0xFFFF_F000, 0xFFFF_F000), (0xFFFF_FFFF, 0xFFFF_FFFF),
    (HIGH + 0x10_0000, 0x10_0000), (0xFFFF_FFFF_BFFF_FFFF, 0x3FFF_FFFF),
    (0xFFFF_FFFF_C000_0000, 0x4000_0000), (0xFFFF_FFFF_FFFF_FFFF, 0x7FFF_FFFF),
])
def test_boot_page_tables_map(booted, vaddr, paddr):
    mem, sregs = booted
    t = translate(mem, sregs.cr3, vaddr)
    assert t.paddr == paddr and t.page_size == 2 << 20
    assert (t.writable, t.user, t.executable) == (True, False, True)   # RWX, supervisor only


@pytest.mark.parametrize("vaddr", [4 << 30, 0x7F_FFFF_F000, 0xFFFF_FFFF_7FFF_FFFF, 0xFFFF_8000_0000_0000])
def test_boot_page_tables_map_nothing_else(booted, vaddr):
    mem, sregs = booted
    with pytest.raises(PageFault):
        translate(mem, sregs.cr3, vaddr)


def test_high_half_kernel_boots_through_its_virtual_addresses(mem):
    img = image(paddr=0x20_0000, vaddr=HIGH + 0x20_0000)
    regs, s = load(mem, img, initial_sregs())
    assert regs.rip == HIGH + 0x20_0000
    assert read_virtual(mem, s.cr0, s.cr3, s.cr4, s.efer, regs.rip, len(CODE)) == CODE


# ---- load(): registers ----

def test_entry_registers(mem):
    regs, _ = load(mem, image(entry=0x10_0010), initial_sregs())
    assert regs == Regs(rip=0x10_0010, rsp=0x80000 - 8, rdi=0x7000, rflags=0x2)   # every other GPR 0


def test_long_mode_control_registers(mem):
    init = initial_sregs()
    _, s = load(mem, image(), init)
    assert s.cr0 == 0x8001_0033                   # PE|MP|ET|NE|WP|PG
    assert s.cr4 == 0x620                         # PAE|OSFXSR|OSXMMEXCPT
    assert s.efer == 0xD01                        # SCE|LME|LMA|NXE
    assert (s.cr3, s.cr2, s.cr8) == (boot.BOOT_PML4, 0, 0)
    assert (s.gdt_base, s.gdt_limit, s.idt_limit) == (0x1000, 23, 0)
    assert s.apic_base == APIC_BASE
    assert s.interrupt_bitmap == (0, 0, 0, 0)
    assert s.cpl == 0
    assert init == initial_sregs()               # the caller's reset state is not modified


def decode(desc):
    """The fields of a GDT code/data descriptor that KVM's Segment mirrors."""
    return dict(type=desc >> 40 & 0xF, s=desc >> 44 & 1, dpl=desc >> 45 & 3, present=desc >> 47 & 1,
                l=desc >> 53 & 1, db=desc >> 54 & 1, g=desc >> 55 & 1)


def test_segments_match_the_gdt_in_memory(mem):
    _, s = load(mem, image(), initial_sregs())
    null, code, data = struct.unpack("<QQQ", mem.read(0x1000, 24))
    assert null == 0
    assert s.cs.selector == 0x08 and (s.cs.l, s.cs.db, s.cs.dpl, s.cs.present, s.cs.s) == (1, 0, 0, 1, 1)
    assert s.cs.type & 0x8                        # code
    gdt_code, gdt_data = decode(code), decode(data)
    assert gdt_code["type"] & 0x8 and gdt_code["l"] == 1 and gdt_code["db"] == 0 and gdt_code["dpl"] == 0
    assert not gdt_data["type"] & 0x8 and gdt_data["type"] & 0x2          # data, writable
    for seg, desc in [(s.cs, gdt_code)] + [(getattr(s, n), gdt_data) for n in ("ds", "es", "fs", "gs", "ss")]:
        cached = dict(type=seg.type & ~1, s=seg.s, dpl=seg.dpl, present=seg.present, l=seg.l, db=seg.db, g=seg.g)
        assert cached == {**desc, "type": desc["type"] & ~1}                # the accessed bit may differ
    for n in ("ds", "es", "fs", "gs", "ss"):
        assert getattr(s, n).selector == 0x10 and getattr(s, n).unusable == 0
    assert len({id(getattr(s, n)) for n in SEGMENT_NAMES}) == len(SEGMENT_NAMES)   # no shared objects
    assert s.tr.present == 1 and s.tr.type == 0xB and s.tr.s == 0                  # busy 64-bit TSS


# ---- the guest-visible header ----

def test_header_matches_vmm_constants():
    expected = {
        "RRSTUB_BOOT_GDT": boot.BOOT_GDT, "RRSTUB_BOOT_INFO": boot.BOOT_INFO,
        "RRSTUB_BOOT_CMDLINE": boot.BOOT_CMDLINE, "RRSTUB_BOOT_PML4": boot.BOOT_PML4,
        "RRSTUB_BOOT_STACK_TOP": boot.BOOT_STACK_TOP, "RRSTUB_KERNEL_MIN_PADDR": boot.KERNEL_MIN_PADDR,
        "RRSTUB_BOOT_MAGIC": boot.BOOT_MAGIC,
        "RRSTUB_PIC_MASTER": machine.PIC_MASTER, "RRSTUB_PIC_SLAVE": machine.PIC_SLAVE,
        "RRSTUB_PIT": machine.PIT_BASE, "RRSTUB_PIT_HZ": pit.PIT_HZ,
        "RRSTUB_I8042_DATA": machine.I8042_BASE + misc.I8042_DATA,
        "RRSTUB_I8042_CMD": machine.I8042_BASE + misc.I8042_COMMAND,
        "RRSTUB_RTC_INDEX": machine.RTC_BASE, "RRSTUB_RTC_DATA": machine.RTC_BASE + 1,
        "RRSTUB_POST": machine.POST_PORT, "RRSTUB_DEBUG_EXIT": machine.DEBUG_EXIT_PORT,
        "RRSTUB_COM1": machine.COM1, "RRSTUB_HYPERCALL": hypercall.HYPERCALL_PORT,
        "RRSTUB_IRQ_PIT": machine.PIT_IRQ, "RRSTUB_IRQ_COM1": machine.COM1_IRQ, "RRSTUB_IRQ_RTC": machine.RTC_IRQ,
        "RRSTUB_HC_VERSION": hypercall.HC_VERSION, "RRSTUB_HC_VERSION_VALUE": hypercall.HC_VERSION_VALUE,
        "RRSTUB_HC_UNKNOWN": hypercall.HC_UNKNOWN, "RRSTUB_HC_DENIED": hypercall.HC_DENIED,
        "RRSTUB_HC_MARKER": hypercall.HC_MARKER, "RRSTUB_HC_RECORD_START": hypercall.HC_RECORD_START,
        "RRSTUB_HC_RECORD_STOP": hypercall.HC_RECORD_STOP, "RRSTUB_HC_VASSERT": hypercall.HC_VASSERT,
        "RRSTUB_HC_VASSERT_DONE": hypercall.HC_VASSERT_DONE,
        "RRSTUB_HC_VASSERT_CHECK": hypercall.HC_VASSERT_CHECK,
    }
    defines = header_defines()
    assert defines == expected                   # same names (none unchecked) and same values
    assert boot.BOOT_MAGIC.to_bytes(8, "little") == b"RRSTBOOT"


def test_header_boot_info_layout_matches_loader():
    fields = header_boot_info_fields()
    assert [n for n, _ in fields] == ["magic", "version", "size", "mem_bytes", "kernel_start",
                                      "kernel_end", "free_start", "cmdline"]
    assert sum(size for _, size in fields) == 56


# ---- the real example kernels ----

@pytest.mark.parametrize("name", ["hello", "race", "ticks", "echo"])
def test_example_kernel_parses_and_loads(mem, name):
    path = EXAMPLES / f"{name}.elf"
    if not path.exists():
        pytest.skip(f"{path} not built (make -C examples)")
    img = load_kernel_file(path)
    assert any(s.vaddr <= img.entry < s.vaddr + s.memsz for s in img.segments)
    assert all(s.paddr >= boot.KERNEL_MIN_PADDR for s in img.segments)
    regs, s = load(mem, img, initial_sregs())
    seg = next(s_ for s_ in img.segments if s_.vaddr <= img.entry < s_.vaddr + len(s_.data))
    expected = seg.data[img.entry - seg.vaddr:][:16]
    assert read_virtual(mem, s.cr0, s.cr3, s.cr4, s.efer, regs.rip, len(expected)) == expected


def test_load_segment_with_file_bytes_but_no_memory_is_refused(tmp_path):
    data = make_elf(CODE, memsz=0)
    with pytest.raises(BootError, match="exceeds memory size"):
        parse_elf(data, "k.elf")


def test_segment_whose_virtual_address_the_boot_tables_do_not_map_there_is_refused(mem):
    """Linked at 4 MiB but loaded at 1 MiB: the CPU would fetch other bytes than were loaded."""
    img = parse_elf(make_elf(CODE, paddr=0x10_0000, vaddr=0x40_0000, entry=0x40_0000), "k.elf")
    with pytest.raises(BootError, match="virtual 0x400000 is loaded at physical 0x100000"):
        load(mem, img, initial_sregs())


def test_high_half_segment_loads():
    mem = GuestMemory(8 << 20)
    img = parse_elf(make_elf(CODE, paddr=0x10_0000, vaddr=0xFFFF_FFFF_8010_0000), "k.elf")
    regs, _ = load(mem, img, initial_sregs())
    assert regs.rip == 0xFFFF_FFFF_8010_0000
    assert mem.read(0x10_0000, len(CODE)) == CODE
    mem.close()
    mem.close()  # closing twice is harmless
