"""Kernel symbols without a symbol table (vmm/boot/symbols.py): kallsyms, System.map, the gdb symbol file."""
import glob
import io
import os
import random
import shutil
import struct
import subprocess
from collections import Counter

import pytest
from elftools.elf.elffile import ELFFile

from vmm.boot import BootError
from vmm.boot.linux import extract_vmlinux
from vmm.boot.symbols import Symbol, kallsyms, kernel_symbols, parse_system_map, symbol_elf

TEXT = 0xFFFF_FFFF_8100_0000
RODATA = 0xFFFF_FFFF_8200_0000
DATA = 0xFFFF_FFFF_82A0_0000
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHT_PROGBITS, SHT_NOBITS, SHT_STRTAB = 1, 8, 3
DEBIAN_PACKAGE = "linux-image-cloud-amd64"
XEN_ELFNOTE_PHYS32_ENTRY = 18


# -- a kallsyms encoder, after scripts/kallsyms.c ---------------------------------------------

def token_table(texts, extra=40):
    """Every used char is its own token; free slots (from 255 down) get frequent substrings."""
    tokens = [b""] * 256
    for c in {c for t in texts for c in t}:
        tokens[c] = bytes([c])
    counts = Counter(t[i:i + n] for t in texts for n in (2, 3, 5, 8) for i in range(len(t) - n + 1))
    best = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1] * (len(kv[0]) - 1), kv[0]))]
    free = [i for i in range(255, -1, -1) if not tokens[i]]
    for slot, s in zip(free[:extra], best):
        tokens[slot] = s
    return tokens


def compress(text, tokens):
    """Greedy longest-match encoding of one name with the token table."""
    by_string = {s: i for i, s in enumerate(tokens) if s}
    longest = max(len(s) for s in by_string)
    out, at = bytearray(), 0
    while at < len(text):
        for n in range(min(longest, len(text) - at), 0, -1):
            if text[at:at + n] in by_string:
                out.append(by_string[text[at:at + n]])
                at += n
                break
    return bytes(out)


def pad8(blob):
    blob += bytes(-len(blob) & 7)


def encode_kallsyms(syms, layout="6.1", mode="absolute-percpu"):
    """The kallsyms tables of ``syms`` (sorted, percpu ones first with kind 'A'), as a blob to be
    placed 8-aligned.  layout: '6.1' | '6.2' (u32 seqs_of_names) | '6.2-3byte' | '6.4';
    mode: 'absolute-percpu' | 'relative' | 'absolute' (no BASE_RELATIVE)."""
    texts = [(s.kind + s.name).encode() for s in syms]
    tokens = token_table(texts)
    entries, markers, off = bytearray(), [], 0
    long_entries = 0
    for i, t in enumerate(texts):
        if i % 256 == 0:
            markers.append(off)
        c = compress(t, tokens)
        head = bytes([len(c)]) if len(c) < 0x80 else bytes([(len(c) & 0x7F) | 0x80, len(c) >> 7])
        long_entries += len(head) == 2
        entries += head + c
        off += len(head) + len(c)
    names = bytes(entries)
    count = len(syms)

    if mode == "absolute":
        offsets, base = struct.pack(f"<{count}Q", *(s.address for s in syms)), None
    elif mode == "relative":
        base = syms[0].address
        offsets = struct.pack(f"<{count}I", *(s.address - base for s in syms))
    else:
        base = min(s.address for s in syms if s.kind != "A")
        offsets = struct.pack(f"<{count}i", *(s.address if s.kind == "A" else base - s.address - 1 for s in syms))
    order = sorted(range(count), key=lambda i: (syms[i].name, syms[i].address))
    seqs = {"6.2": struct.pack(f"<{count}I", *order),
            "6.2-3byte": b"".join(i.to_bytes(3, "big") for i in order),
            "6.4": b"".join(i.to_bytes(3, "big") for i in order)}.get(layout, b"")
    table = b"".join(t + b"\0" for t in tokens)
    index, at = [], 0
    for t in tokens:
        index.append(at)
        at += len(t) + 1

    parts = {
        "offsets": offsets,
        "base": struct.pack("<Q", base) if base is not None else b"",
        "num": struct.pack("<I", count),
        "names": names,
        "markers": struct.pack(f"<{len(markers)}I", *markers),
        "seqs": seqs,
        "table": table,
        "index": struct.pack("<256H", *index),
    }
    if layout == "6.4":
        order_of = ["num", "names", "markers", "table", "index", "offsets", "base", "seqs"]
    else:
        order_of = ["offsets", "base", "num", "names", "markers", "seqs", "table", "index"]
    blob = bytearray()
    for part in order_of:
        if parts[part]:
            pad8(blob)
            blob += parts[part]
    pad8(blob)
    return bytes(blob), long_entries


def make_elf(sections, entry=0x100_0000):
    """An ELF64 x86-64 executable with ``sections``: (name, type, flags, addr, contents or size)."""
    shstrtab = bytearray(b"\0")
    body = bytearray()
    rows = [(0,) * 10]
    base = 64
    for name, typ, flags, addr, contents in sections:
        name_off = len(shstrtab)
        shstrtab += name.encode() + b"\0"
        body += bytes(-len(body) & 0xFFF)
        off = base + len(body)
        size = contents if isinstance(contents, int) else len(contents)
        if not isinstance(contents, int):
            body += contents
        rows.append((name_off, typ, flags, addr, off, size, 0, 0, 4096 if addr else 1, 0))
    name_off = len(shstrtab)
    shstrtab += b".shstrtab\0"
    rows.append((name_off, SHT_STRTAB, 0, 0, base + len(body), len(shstrtab), 0, 0, 1, 0))
    body += shstrtab
    body += bytes(-len(body) & 7)
    shoff = base + len(body)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 0, shoff, 0, 64, 56, 0, 64,
                       len(rows), len(rows) - 1)
    return ehdr + bytes(body) + b"".join(struct.pack("<IIQQQQIIQQ", *r) for r in rows)


def synthetic_symbols(n=700, seed=1):
    """Percpu symbols ('A', small addresses) first, then text and data, sorted as kallsyms sorts them."""
    rnd = random.Random(seed)
    words = ["start", "kernel", "init", "lock", "irq", "page", "cpu", "map", "read", "write", "0", "1",
             "2", "3", "4", "5", "6", "7", "8", "9", "x86", "do", "sys", "get"]
    out = [Symbol(0, "A", "__per_cpu_start"), Symbol(0x40, "A", "current_task"), Symbol(0x1000, "A", "cpu_tss_rw")]
    addr = TEXT
    for i in range(n):
        name = "_".join(rnd.choice(words) for _ in range(rnd.randint(1, 4))) + f"_{i}"
        out.append(Symbol(addr, rnd.choice("Tt"), name))
        addr += rnd.choice((0, 1, 16, 48, 300))
    out.append(Symbol(addr, "t", "zq" + "".join(rnd.choice("QWZXJKVYqwzxjkvy0123456789") for _ in range(300))))
    out += [Symbol(DATA + 8 * i, rnd.choice("DdbB"), f"data_{i}_var") for i in range(60)]
    return out


def synthetic_kernel(syms, layout="6.1", mode="absolute-percpu", decoy=True):
    blob, long_entries = encode_kallsyms(syms, layout, mode)
    junk = bytes(random.Random(2).randrange(256) for _ in range(3000))
    if decoy:   # a run of digit tokens that is not a token table: must be passed over
        junk += b"".join(bytes([c]) + b"\0" for c in b"\x01/0123456789:;")
    junk += bytes(-len(junk) & 7)
    rodata = junk + blob + b"trailing rodata\0"
    elf = make_elf([(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, TEXT, b"\xcc" * 0x10000),
                    (".rodata", SHT_PROGBITS, SHF_ALLOC, RODATA, rodata),
                    (".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, DATA, bytes(0x1000)),
                    (".data..percpu", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, 0, bytes(0x2000))])
    return elf, long_entries


@pytest.mark.parametrize("layout,mode", [("6.1", "absolute-percpu"), ("6.2", "absolute-percpu"),
                                         ("6.2-3byte", "absolute-percpu"), ("6.4", "absolute-percpu"),
                                         ("6.4", "relative"), ("6.1", "absolute")])
def test_synthetic_kallsyms_decodes_to_exactly_the_symbols_put_in(layout, mode):
    syms = synthetic_symbols()
    if mode == "relative":
        syms = [s for s in syms if s.kind != "A"]
    elf, long_entries = synthetic_kernel(syms, layout, mode)
    assert long_entries >= 1          # the 2-byte (ULEB128) length is exercised
    assert len(syms) > 2 * 256        # several markers
    assert kallsyms(elf, "synthetic.elf") == sorted(syms, key=lambda s: s.address)


def test_synthetic_kallsyms_with_a_count_that_is_a_multiple_of_256():
    syms = synthetic_symbols(n=512 - 64)
    assert len(syms) == 512
    elf, _ = synthetic_kernel(syms)
    assert kallsyms(elf, "k.elf") == syms


def test_kallsyms_of_a_kernel_without_tables_names_the_file_and_the_fix():
    elf = make_elf([(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, TEXT, b"\x90" * 4096),
                    (".rodata", SHT_PROGBITS, SHF_ALLOC, RODATA, b"0\x001\x002\x00" * 100)])
    with pytest.raises(BootError, match=r"nokallsyms\.elf: .*CONFIG_KALLSYMS.*System\.map"):
        kallsyms(elf, "nokallsyms.elf")


def test_kallsyms_with_a_damaged_names_table_says_the_layout_is_not_recognised():
    syms = synthetic_symbols()
    elf, _ = synthetic_kernel(syms, decoy=False)
    num = struct.pack("<II", len(syms), 0)
    at = elf.index(num)
    damaged = elf[:at] + struct.pack("<II", len(syms) + 1000, 0) + elf[at + 8:]
    with pytest.raises(BootError, match=r"broken\.elf: found a kallsyms token table but not a table layout"):
        kallsyms(damaged, "broken.elf")


def test_kallsyms_of_a_file_that_is_not_elf():
    with pytest.raises(BootError, match=r"vmlinuz: not an ELF file"):
        kallsyms(b"MZ\x00\x00" + bytes(100), "vmlinuz")


# -- System.map -------------------------------------------------------------------------------

DEBIAN_PLACEHOLDER = "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"


def test_parse_system_map_reads_nm_lines_sorted_by_address():
    lines = [f"ffffffff8100{i:04x} {'T' if i % 2 else 't'} func_{i}" for i in range(20, 0, -1)]
    lines += ["0000000000000000 A __per_cpu_start", "                 U undefined_thing",
              "ffffffff82a00000 D init_task\t[vmlinux]", ""]
    syms = parse_system_map("\n".join(lines), "System.map")
    assert syms[0] == Symbol(0, "A", "__per_cpu_start")
    assert Symbol(0xFFFF_FFFF_8100_0013, "T", "func_19") in syms
    assert syms[-1] == Symbol(0xFFFF_FFFF_82A0_0000, "D", "init_task")
    assert len(syms) == 22
    assert [s.address for s in syms] == sorted(s.address for s in syms)


def test_debian_placeholder_system_map_is_refused_with_the_reason():
    with pytest.raises(BootError, match=r"System\.map-6\.1: a placeholder System\.map with no symbols.*kallsyms"):
        parse_system_map(DEBIAN_PLACEHOLDER, "/boot/System.map-6.1")
    with pytest.raises(BootError, match="placeholder"):
        parse_system_map("ffffffff81000000 T startup_64\n", "tiny.map")


def test_malformed_system_map_line_names_the_line():
    with pytest.raises(BootError, match=r"bad\.map:2: not a System\.map line"):
        parse_system_map("ffffffff81000000 T startup_64\nhello\n", "bad.map")
    with pytest.raises(BootError, match=r"bad\.map:1: 'zzzz' is not a hex address"):
        parse_system_map("zzzz T startup_64\n", "bad.map")


# -- kernel_symbols: which source -------------------------------------------------------------

def test_kernel_symbols_prefers_symtab_then_system_map_then_kallsyms():
    syms = synthetic_symbols()
    elf, _ = synthetic_kernel(syms)
    assert kernel_symbols(elf, "k.elf") == syms                                   # kallsyms
    assert kernel_symbols(elf, "k.elf", DEBIAN_PLACEHOLDER) == syms               # placeholder passed over
    real_map = "\n".join(f"{TEXT + 16 * i:016x} T mapped_{i}" for i in range(12))
    from_map = kernel_symbols(elf, "k.elf", real_map)
    assert [s.name for s in from_map] == [f"mapped_{i}" for i in range(12)]
    with_symtab = symbol_elf(elf, from_map)
    assert kernel_symbols(with_symtab, "k.sym", None) == from_map                 # its own .symtab wins


# -- symbol_elf -------------------------------------------------------------------------------

def test_symbol_elf_has_nobits_sections_and_a_symtab_with_locals_first():
    elf, _ = synthetic_kernel(synthetic_symbols(n=50))
    syms = [Symbol(TEXT + 0x100, "t", "local_fn"), Symbol(TEXT, "T", "startup_64"),
            Symbol(TEXT + 0x180, "W", "weak_fn"), Symbol(DATA + 0x10, "D", "init_task"),
            Symbol(DATA, "b", "local_bss"), Symbol(0x40, "A", "current_task"),
            Symbol(0xFFFF_FFFF_9000_0000, "A", "outside_everything")]
    out = symbol_elf(elf, syms)
    f = ELFFile(io.BytesIO(out))
    assert f["e_machine"] == "EM_X86_64" and f["e_type"] == "ET_EXEC" and f["e_entry"] == 0x100_0000
    sections = {s.name: s for s in f.iter_sections()}
    for name in (".text", ".rodata", ".data", ".data..percpu"):
        assert sections[name]["sh_type"] == "SHT_NOBITS"
    assert sections[".text"]["sh_addr"] == TEXT and sections[".text"]["sh_size"] == 0x10000
    symtab = sections[".symtab"]
    entries = list(symtab.iter_symbols())[1:]
    binds = [e["st_info"]["bind"] for e in entries]
    first_global = binds.index("STB_GLOBAL")
    assert set(binds[:first_global]) == {"STB_LOCAL"} and "STB_LOCAL" not in binds[first_global:]
    assert symtab["sh_info"] == first_global + 1
    by = {e.name: e for e in entries}
    index_of = {s.name: i for i, s in enumerate(f.iter_sections())}
    start = by["startup_64"]
    assert (start["st_value"], start["st_info"]["type"], start["st_info"]["bind"]) == (TEXT, "STT_FUNC", "STB_GLOBAL")
    assert start["st_shndx"] == index_of[".text"] and start["st_size"] == 0x100
    assert by["local_fn"]["st_info"]["type"] == "STT_FUNC" and by["local_fn"]["st_size"] == 0x80
    assert by["weak_fn"]["st_info"]["bind"] == "STB_WEAK" and by["weak_fn"]["st_info"]["type"] == "STT_FUNC"
    assert by["weak_fn"]["st_size"] == 0x10000 - 0x180                   # bounded by the section's end
    assert by["init_task"]["st_info"]["type"] == "STT_OBJECT" and by["init_task"]["st_shndx"] == index_of[".data"]
    assert by["local_bss"]["st_info"]["bind"] == "STB_LOCAL" and by["local_bss"]["st_size"] == 0x10
    assert by["current_task"]["st_shndx"] == index_of[".data..percpu"]
    assert by["outside_everything"]["st_shndx"] == "SHN_ABS"
    assert len(out) < 8192


# -- the real Debian kernel -------------------------------------------------------------------

def need(what, reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def debian_kernel():
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        need("the Debian kernel test", f"no /boot/vmlinuz-*-cloud-amd64: install the package {DEBIAN_PACKAGE}")
    path = found[-1]
    with open(path, "rb") as f:
        vmlinux, _ = extract_vmlinux(f.read(), path)
    return path, vmlinux, kallsyms(vmlinux, path)


def load_segments(vmlinux):
    f = ELFFile(io.BytesIO(vmlinux))
    return f, [s for s in f.iter_segments() if s["p_type"] == "PT_LOAD"]


def test_debian_kernel_kallsyms_agree_with_its_elf_headers(debian_kernel):
    path, vmlinux, syms = debian_kernel
    f, loads = load_segments(vmlinux)
    by = {s.name: s for s in syms}
    sections = {s.name: s for s in f.iter_sections()}
    assert f.get_section_by_name(".symtab") is None             # really no symbol table
    assert len(syms) > 50_000
    assert [s.address for s in syms] == sorted(s.address for s in syms)

    def virtual(paddr):
        seg = next(s for s in loads if s["p_paddr"] <= paddr < s["p_paddr"] + s["p_memsz"])
        return paddr - seg["p_paddr"] + seg["p_vaddr"]

    text = sections[".text"]
    assert by["startup_64"].address == text["sh_addr"] == virtual(f["e_entry"])
    pvh = [n for n in sections[".notes"].iter_notes()
           if n["n_name"] == "Xen" and n["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY]
    pvh_paddr = struct.unpack("<Q", pvh[0]["n_descdata"][:8].ljust(8, b"\0"))[0]
    assert by["pvh_start_xen"].address == virtual(pvh_paddr) == 0xFFFF_FFFF_8000_0000 + pvh_paddr
    init_text = sections[".init.text"]
    start_kernel = by["start_kernel"]
    assert start_kernel.kind == "T"
    assert init_text["sh_addr"] <= start_kernel.address < init_text["sh_addr"] + init_text["sh_size"]
    assert by["_sinittext"].address == init_text["sh_addr"]
    percpu = sections[".data..percpu"]
    assert by["current_task"].kind == "A" and by["current_task"].address < percpu["sh_size"]
    assert text["sh_addr"] <= by["schedule"].address < text["sh_addr"] + text["sh_size"]


def test_debian_kernel_kallsyms_is_fast(debian_kernel):
    import time
    path, vmlinux, _ = debian_kernel
    t = time.perf_counter()
    kallsyms(vmlinux, path)
    assert time.perf_counter() - t < 3.0


@pytest.mark.timeout(120)
def test_gdb_finds_start_kernel_in_the_symbol_file_of_the_debian_kernel(debian_kernel, tmp_path):
    path, vmlinux, syms = debian_kernel
    gdb = shutil.which("gdb") or ("/usr/bin/gdb" if os.path.exists("/usr/bin/gdb") else None)
    if gdb is None:
        need("the gdb symbol-file test", "gdb is not installed (apt-get install gdb)")
    out = symbol_elf(vmlinux, syms)
    assert len(out) < len(vmlinux) // 5
    sym_file = tmp_path / "vmlinux.sym"
    sym_file.write_bytes(out)
    by = {s.name: s for s in syms}
    start_kernel = by["start_kernel"].address
    run = subprocess.run([gdb, "-batch", "-nx", "-ex", "info address start_kernel",
                          "-ex", f"info symbol {by['startup_64'].address:#x}",
                          "-ex", f"info symbol {start_kernel + 4:#x}",
                          "-ex", "break start_kernel", str(sym_file)],
                         capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert f'Symbol "start_kernel" is at {start_kernel:#x}' in run.stdout
    assert "startup_64 in section .text" in run.stdout
    assert "start_kernel + 4 in section .init.text" in run.stdout
    assert f"Breakpoint 1 at {start_kernel:#x}" in run.stdout
