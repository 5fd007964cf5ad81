"""Kernel symbols for a kernel that ships without a symbol table.

Owns finding the names of a Linux kernel's functions and data, and the small
ELF symbol file gdb loads for them (``symbol_elf``).  Sources, best first
(``kernel_symbols``):

* the vmlinux's own ``.symtab`` (a self-built or ``-dbg`` kernel);
* a real ``System.map`` (``nm -n`` output: ``ffffffff81000000 T startup_64``).
  Debian's ``/boot/System.map-*`` is an 83-byte placeholder pointing at the
  ``linux-image-*-dbg`` package; ``parse_system_map`` says so;
* kallsyms: the symbol table the kernel carries as data in its ``.rodata``
  for ``/proc/kallsyms`` and oopses (CONFIG_KALLSYMS; CONFIG_KALLSYMS_ALL
  adds data symbols).  ``kallsyms`` finds and decodes it without any symbol
  table, following ``scripts/kallsyms.c``, which writes these tables, each
  starting 8-aligned::

    kallsyms_offsets        s32 per symbol (or kallsyms_addresses, u64 each)
    kallsyms_relative_base  u64
    kallsyms_num_syms       u32
    kallsyms_names          per symbol: length (1 byte, or 2 if its high bit
                            is set: ULEB128, Linux 6.1+), then that many
                            token indexes; the first decoded char is the
                            nm type letter
    kallsyms_markers        u32 per 256 symbols: offset of its entry in names
    kallsyms_seqs_of_names  (6.2-6.3 only here: u32 or 3 bytes per symbol)
    kallsyms_token_table    256 NUL-terminated strings
    kallsyms_token_index    256 u16: offset of each string in the table

  Linux 6.4 moved offsets, relative_base and seqs_of_names after the token
  index.  The token table and its index identify each other (every index
  entry must be where a string starts), so they are the anchor; the rest is
  located from there and checked against itself (markers against the
  entries' lengths, the addresses sorted, the relative base the lowest
  address).  With CONFIG_KALLSYMS_BASE_RELATIVE and ABSOLUTE_PERCPU (x86-64
  before 6.15) a non-negative offset is an absolute value (a percpu symbol,
  type 'A') and a negative one is ``relative_base - 1 - offset``; without
  ABSOLUTE_PERCPU an offset is an unsigned distance from the base.

Every way this fails raises ``BootError`` naming the file and what to do.
"""
from __future__ import annotations

import bisect
import io
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

from vmm.boot.elf import BootError

SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHN_UNDEF, SHN_ABS = 0, 0xFFF1
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2

SYMBOL_SIZE_CAP = 1 << 20          # a symbol's size is the distance to the next one, at most this
KALLSYMS_MAX_SYMS = 1 << 24        # seqs_of_names holds 3-byte indexes: more cannot be
PLACEHOLDER_MIN_ENTRIES = 10

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")


@dataclass(frozen=True, slots=True)
class Symbol:
    address: int
    kind: str           # the nm type letter: 'T' global text, 't' local text, 'D', 'b', 'A', 'W', ...
    name: str


@dataclass(frozen=True, slots=True)
class _Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int

    @property
    def loaded(self) -> bool:
        return bool(self.flags & SHF_ALLOC)


@dataclass(frozen=True, slots=True)
class _Elf:
    header: tuple
    sections: tuple[_Section, ...]


def _read_elf(data: bytes, path: str) -> _Elf:
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise BootError(f"{path}: not an ELF file (first bytes {data[:4].hex(' ')}); "
                        "symbols are read from an ELF vmlinux")
    if data[4] != 2 or data[5] != 1:
        raise BootError(f"{path}: not a little-endian ELF64 file (class {data[4]}, data {data[5]}); "
                        "rrstub reads symbols of x86-64 kernels only")
    header = _EHDR.unpack_from(data)
    shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
    if shnum == 0:
        return _Elf(header, ())
    if shentsize != _SHDR.size or shoff + shnum * shentsize > len(data):
        raise BootError(f"{path}: its section headers ({shnum} at {shoff:#x}) lie outside the file "
                        f"({len(data):#x} bytes): truncated or damaged ELF file")
    raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    names = b""
    if shstrndx < shnum:
        s = raw[shstrndx]
        names = data[s[4]:s[4] + s[5]]

    def name_at(off: int) -> str:
        end = names.find(b"\0", off)
        return names[off:end if end >= 0 else len(names)].decode("latin-1")

    sections = tuple(_Section(i, name_at(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])
                     for i, r in enumerate(raw))
    return _Elf(header, sections)


# -- kallsyms ---------------------------------------------------------------------------------

# Every char used in a symbol name is its own token (best_table[c] = c), so a run of consecutive
# single-char tokens is in the table at the position of its first char; each anchor is one.
_ANCHORS = ((0x30, b"".join(bytes([c]) + b"\0" for c in b"0123456789")),
            (0x61, b"".join(bytes([c]) + b"\0" for c in b"abcdefghijklmnopqrstuvwxyz")),
            (0x41, b"".join(bytes([c]) + b"\0" for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")))


class _Region:
    """One loaded section: file offsets, and 8-alignment as the kernel's addresses have it."""

    def __init__(self, data: bytes, section: _Section):
        self.data = data
        self.section = section
        self.start = section.offset
        self.end = section.offset + section.size
        self._skew = (section.addr - section.offset) & 7

    def align8(self, off: int) -> int:
        return off + (-(off + self._skew) & 7)

    def aligned(self, off: int) -> bool:
        return (off + self._skew) & 7 == 0

    def within(self, off: int, size: int) -> bool:
        return self.start <= off and off + size <= self.end

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.data, off)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.data, off)[0]


@dataclass(frozen=True, slots=True)
class _Tokens:
    table: int          # file offset of kallsyms_token_table
    index: int          # file offset of kallsyms_token_index
    strings: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Names:
    num_syms: int       # file offset of kallsyms_num_syms
    count: int
    names: int          # file offset of kallsyms_names
    markers: tuple[int, ...]
    seq_width: int      # bytes per kallsyms_seqs_of_names entry between markers and tokens (0: none there)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _token_table_at(r: _Region, pos: int, first: int) -> Optional[_Tokens]:
    """The token table whose token ``first`` starts at ``pos``, if its index confirms it."""
    data = r.data
    cur = pos
    for _ in range(256 - first):
        nul = data.find(b"\0", cur, r.end)
        if nul < 0:
            return None
        cur = nul + 1
    index_at = r.align8(cur)
    if not r.within(index_at, 512):
        return None
    index = struct.unpack_from("<256H", data, index_at)
    table = pos - index[first]
    if index[0] != 0 or table < r.start or not r.aligned(table):
        return None
    strings = data[table:cur].split(b"\0")
    if len(strings) != 257 or strings[-1]:
        return None
    off = 0
    for want, s in zip(index, strings):
        if want != off:
            return None
        off += len(s) + 1
    if any(data[cur:index_at]):
        return None
    return _Tokens(table, index_at, tuple(strings[:256]))


def _token_tables(r: _Region) -> Iterator[_Tokens]:
    seen = set()
    for first, anchor in _ANCHORS:
        at = r.start
        while True:
            at = r.data.find(anchor, at, r.end)
            if at < 0:
                break
            if at > r.start and r.data[at - 1] == 0:
                found = _token_table_at(r, at, first)
                if found is not None and found.table not in seen:
                    seen.add(found.table)
                    yield found
            at += 1


def _entry_end(data: bytes, pos: int) -> int:
    n = data[pos]
    if n & 0x80:
        return pos + 2 + ((n & 0x7F) | (data[pos + 1] << 7))
    return pos + 1 + n


def _names_at(r: _Region, tokens: _Tokens, num_syms: int, count: int, seq_width: int) -> Optional[_Names]:
    """kallsyms_names after a num_syms at ``num_syms`` saying ``count``, if markers and lengths agree."""
    data = r.data
    nmarkers = (count + 255) >> 8
    markers_at = tokens.table - _pad8(seq_width * count) - _pad8(4 * nmarkers)
    names = num_syms + 8
    if markers_at - names < 2 * count:
        return None
    markers = struct.unpack_from(f"<{nmarkers}I", data, markers_at)
    if markers[0] != 0 or any(a >= b for a, b in zip(markers, markers[1:])):
        return None
    if nmarkers & 1 and r.u32(markers_at + 4 * nmarkers):
        return None                        # the alignment padding after an odd number of markers is zero
    pos = names + markers[-1]
    for _ in range(count - ((nmarkers - 1) << 8)):
        if pos >= markers_at:
            return None
        pos = _entry_end(data, pos)
    if pos > markers_at or r.align8(pos) != markers_at:
        return None
    return _Names(num_syms, count, names, markers, seq_width)


def _find_names(r: _Region, tokens: _Tokens) -> Optional[_Names]:
    """Search back from the token table for kallsyms_num_syms: a u32 at an 8-aligned address, the
    4 bytes after it zero (names start 8-aligned), whose count fits the markers before the tokens."""
    data = r.data
    lo = r.align8(r.start)
    hi = tokens.table - 16
    if hi < lo:
        return None
    hi -= (hi - lo) % 8
    chunk = 1 << 16
    while hi > lo:
        a = max(lo, hi - chunk)
        words = memoryview(data)[a:hi].cast("Q")
        for i in reversed([i for i, v in enumerate(words) if 0 < v < KALLSYMS_MAX_SYMS]):
            at = a + 8 * i
            count = words[i]
            if 2 * count > tokens.table - at:
                continue
            for width in (0, 4, 3):
                found = _names_at(r, tokens, at, count, width)
                if found is not None:
                    return found
        hi = a
    return None


def _decode_names(r: _Region, tokens: _Tokens, names: _Names, path: str) -> list[str]:
    data = r.data
    entries = []
    append = entries.append
    pos = names.names
    markers = names.markers
    for i in range(names.count):
        if not i & 0xFF and pos - names.names != markers[i >> 8]:
            raise BootError(f"{path}: kallsyms_names entry {i} is at offset {pos - names.names:#x}, but "
                            f"kallsyms_markers says {markers[i >> 8]:#x}: a kallsyms layout rrstub does "
                            "not know; give it the kernel's System.map (linux-image-*-dbg) instead")
        n = data[pos]
        if n & 0x80:
            n = (n & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            pos += 1
        append(data[pos:pos + n])
        pos += n
    expand = tokens.strings.__getitem__
    join = b"".join
    text = b"\n".join([join(map(expand, e)) for e in entries]).decode("latin-1")
    return text.split("\n")


def _nondecreasing(values: list[int]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:]))


def _relative_addresses(r: _Region, offsets_at: int, base_at: int, count: int) -> Optional[list[int]]:
    if not (r.within(offsets_at, 4 * count) and r.within(base_at, 8)):
        return None
    base = r.u64(base_at)
    raw = memoryview(r.data)[offsets_at:offsets_at + 4 * count].cast("I").tolist()
    if raw[0] == 0 and _nondecreasing(raw):
        addresses = [base + v for v in raw]            # unsigned offsets from the lowest address
    else:
        first_relative = next((i for i, v in enumerate(raw) if v & 0x8000_0000), None)
        if first_relative is None or raw[first_relative] != 0xFFFF_FFFF:
            return None                                 # the lowest relative symbol is the base: -1
        addresses = [v if v < 0x8000_0000 else base - 1 - (v - (1 << 32)) for v in raw]
        if any(not v & 0x8000_0000 for v in raw[first_relative:]):
            return None
    return addresses if _nondecreasing(addresses) else None


def _absolute_addresses(r: _Region, at: int, count: int) -> Optional[list[int]]:
    if not r.within(at, 8 * count) or not r.aligned(at):
        return None
    addresses = memoryview(r.data)[at:at + 8 * count].cast("Q").tolist()
    return addresses if _nondecreasing(addresses) and addresses[-1] != 0 else None


def _addresses(r: _Region, tokens: _Tokens, names: _Names) -> Optional[list[int]]:
    count = names.count
    tries = []
    if names.seq_width == 0:                            # Linux 6.4+: after the token index
        after = tokens.index + 512
        tries.append(lambda: _relative_addresses(r, after, after + _pad8(4 * count), count))
    base_at = names.num_syms - 8                        # up to 6.3: before num_syms
    tries.append(lambda: _relative_addresses(r, base_at - _pad8(4 * count), base_at, count))
    tries.append(lambda: _absolute_addresses(r, names.num_syms - 8 * count, count))
    for attempt in tries:
        found = attempt()
        if found is not None:
            return found
    return None


def kallsyms(vmlinux: bytes, path: str) -> list[Symbol]:
    """The symbols of the kallsyms tables in ``vmlinux``'s loaded sections, sorted by address."""
    image = _read_elf(vmlinux, path)
    loaded = [s for s in image.sections
              if s.loaded and s.type != SHT_NOBITS and s.size and s.offset + s.size <= len(vmlinux)]
    loaded.sort(key=lambda s: s.name != ".rodata")
    unrecognised = []
    for section in loaded:
        r = _Region(vmlinux, section)
        for tokens in _token_tables(r):
            names = _find_names(r, tokens)
            if names is None:
                unrecognised.append(f"no kallsyms_names/markers before the token table at "
                                    f"{section.name}+{tokens.table - r.start:#x}")
                continue
            addresses = _addresses(r, tokens, names)
            if addresses is None:
                unrecognised.append(f"no kallsyms_offsets matching the {names.count} names at "
                                    f"{section.name}+{names.names - r.start:#x}")
                continue
            texts = _decode_names(r, tokens, names, path)
            symbols = [Symbol(a, t[:1], t[1:]) for a, t in zip(addresses, texts)]
            symbols.sort(key=lambda s: s.address)
            return symbols
    if unrecognised:
        raise BootError(f"{path}: found a kallsyms token table but not a table layout rrstub knows "
                        f"({'; '.join(unrecognised)}); give rrstub the kernel's System.map "
                        "(linux-image-*-dbg) or a vmlinux with its symbol table")
    raise BootError(f"{path}: no symbol table and no kallsyms tables in its loaded sections (a kernel "
                    "built without CONFIG_KALLSYMS?); give rrstub the kernel's System.map "
                    "(linux-image-*-dbg) or a vmlinux with its symbol table")


# -- System.map -------------------------------------------------------------------------------

def _is_placeholder(text: str) -> bool:
    return "real System.map is in" in text


def parse_system_map(text: str, path: str) -> list[Symbol]:
    """The symbols of a System.map (``nm -n`` lines; /proc/kallsyms' module column is ignored)."""
    symbols = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or (len(fields) == 2 and fields[0] in ("U", "u", "w", "v")):
            continue                       # blank, or nm's undefined symbols (no address)
        if len(fields) < 3 or len(fields[1]) != 1:
            raise BootError(f"{path}:{number}: not a System.map line (want 'ADDRESS TYPE NAME'): {line[:80]!r}")
        try:
            address = int(fields[0], 16)
        except ValueError:
            raise BootError(f"{path}:{number}: {fields[0][:40]!r} is not a hex address") from None
        if fields[1] in "Uu":
            continue
        symbols.append(Symbol(address, fields[1], fields[2]))
    if _is_placeholder(text) or len(symbols) < PLACEHOLDER_MIN_ENTRIES:
        raise BootError(f"{path}: a placeholder System.map with no symbols ({len(symbols)} entries; Debian "
                        "ships the real one in linux-image-<version>-dbg); rrstub reads the kernel's own "
                        "kallsyms instead, so leave this file out")
    symbols.sort(key=lambda s: s.address)
    return symbols


# -- an existing .symtab ----------------------------------------------------------------------

_STT_SECTION, _STT_FILE = 3, 4


def _letter(bind: int, kind: int, section: Optional[_Section], shndx: int) -> str:
    """The nm type letter of an ELF symbol."""
    if bind == STB_WEAK:
        return "V" if kind == STT_OBJECT else "W"
    if shndx == SHN_ABS or section is None:
        letter = "A"
    elif section.flags & SHF_EXECINSTR:
        letter = "T"
    elif section.type == SHT_NOBITS:
        letter = "B"
    elif section.flags & SHF_WRITE:
        letter = "D"
    else:
        letter = "R"
    return letter.lower() if bind == STB_LOCAL else letter


def _elf_symtab(vmlinux: bytes, path: str, image: _Elf) -> list[Symbol]:
    """The defined symbols of loaded sections in the ELF's .symtab.  pyelftools finds and checks
    the table and its string table; the entries are unpacked here in bulk (pyelftools' per-symbol
    objects take seconds for a kernel's 100k+ symbols)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(vmlinux))
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None or symtab["sh_entsize"] != _SYM.size:
            return []
        strtab = elf.get_section(symtab["sh_link"]).data()
        start, size = symtab["sh_offset"], symtab["sh_size"]
        if start + size > len(vmlinux):
            raise ELFError(f"the table at {start:#x}+{size:#x} runs past the end of the file")
    except (ELFError, ValueError, struct.error) as e:
        raise BootError(f"{path}: its .symtab is damaged ({e}); strip it (objcopy --strip-all) "
                        "or rebuild the kernel") from None
    by_index = {s.index: s for s in image.sections}
    symbols = []
    entries = vmlinux[start:start + size - size % _SYM.size]
    for name_off, info, _other, shndx, value, _size in _SYM.iter_unpack(entries):
        kind, bind = info & 0xF, info >> 4
        if not name_off or shndx == SHN_UNDEF or kind in (_STT_SECTION, _STT_FILE):
            continue
        section = by_index.get(shndx)
        if section is not None and not section.loaded:
            continue
        end = strtab.find(b"\0", name_off)
        name = strtab[name_off:end if end >= 0 else len(strtab)].decode("latin-1")
        if name:
            symbols.append(Symbol(value, _letter(bind, kind, section, shndx), name))
    symbols.sort(key=lambda s: s.address)
    return symbols


def kernel_symbols(vmlinux: bytes, path: str, system_map: Optional[str] = None) -> list[Symbol]:
    """A kernel's symbols: its .symtab if it has one, else ``system_map`` (the text of a real
    System.map; a placeholder is passed over), else the kernel's own kallsyms."""
    image = _read_elf(vmlinux, path)
    if any(s.type == SHT_SYMTAB and s.size for s in image.sections):
        symbols = _elf_symtab(vmlinux, path, image)
        if symbols:
            return symbols
    if system_map is not None and not _is_placeholder(system_map):
        return parse_system_map(system_map, f"the System.map given for {path}")
    return kallsyms(vmlinux, path)


# -- the symbol file gdb loads ----------------------------------------------------------------

def _elf_symbol_fields(kind: str, section: Optional[_Section]) -> tuple[int, int]:
    """(binding, type) of an nm letter."""
    upper = kind.upper()
    if upper in "WV":
        bind = STB_WEAK
    elif kind.islower():
        bind = STB_LOCAL
    else:
        bind = STB_GLOBAL
    if upper == "T" or (upper == "W" and section is not None and section.flags & SHF_EXECINSTR):
        return bind, STT_FUNC
    if section is None:
        return bind, STT_NOTYPE
    return bind, STT_OBJECT


def symbol_elf(vmlinux: bytes, symbols: list[Symbol]) -> bytes:
    """A small ELF64 symbol file for ``vmlinux`` that gdb can load (``symbol-file``/``file``).

    The vmlinux's header and its loaded sections, all made SHT_NOBITS (as
    ``objcopy --only-keep-debug`` does: addresses without contents), its
    program headers with no file bytes, and a .symtab of ``symbols``: text
    as STT_FUNC, the rest STT_OBJECT, uppercase letters global, lowercase
    local, W/V weak, each in the section holding its address (SHN_ABS if
    none) and as large as the distance to the next symbol within its section
    (capped at SYMBOL_SIZE_CAP), so that "info symbol" and backtraces work.
    """
    image = _read_elf(vmlinux, "the vmlinux given for the symbol file")
    h = image.header
    kept = [s for s in image.sections if s.loaded]
    new_index = {s.index: i for i, s in enumerate(kept, 1)}
    nsec = len(kept)
    strtab_ix, shstrtab_ix = nsec + 2, nsec + 3

    by_start = sorted((s for s in kept if s.size), key=lambda s: s.addr)
    starts = [s.addr for s in by_start]

    def section_of(address: int) -> Optional[_Section]:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < by_start[i].addr + by_start[i].size:
            return by_start[i]
        return None

    distinct = sorted({s.address for s in symbols})
    strtab = bytearray(b"\0")
    name_at: dict[str, int] = {}
    local_rows, global_rows = [], []
    for sym in sorted(symbols, key=lambda s: s.address):
        section = section_of(sym.address)
        bind, typ = _elf_symbol_fields(sym.kind, section)
        if section is not None:
            shndx = new_index[section.index]
            j = bisect.bisect_right(distinct, sym.address)
            limit = min(section.addr + section.size, distinct[j] if j < len(distinct) else 1 << 64)
            size = min(limit - sym.address, SYMBOL_SIZE_CAP)
        else:
            shndx, size = SHN_ABS, 0
        off = name_at.get(sym.name)
        if off is None:
            off = name_at[sym.name] = len(strtab)
            strtab += sym.name.encode("latin-1", "replace") + b"\0"
        row = (off, (bind << 4) | typ, 0, shndx, sym.address & ((1 << 64) - 1), size)
        (local_rows if bind == STB_LOCAL else global_rows).append(row)
    symtab = bytearray(_SYM.size)                                   # symbol 0: the undefined symbol
    for row in local_rows + global_rows:
        symtab += _SYM.pack(*row)
    first_global = 1 + len(local_rows)

    shstrtab = bytearray(b"\0")

    def shname(name: str) -> int:
        at = len(shstrtab)
        shstrtab.extend(name.encode("latin-1") + b"\0")
        return at

    phnum = h[10] if h[9] == _PHDR.size else 0
    phoff = _EHDR.size if phnum else 0
    out = bytearray(_EHDR.size + phnum * _PHDR.size)
    for i in range(phnum):
        p = list(_PHDR.unpack_from(vmlinux, h[5] + i * _PHDR.size))
        p[2], p[5] = 0, 0                                           # p_offset, p_filesz: no bytes here
        _PHDR.pack_into(out, _EHDR.size + i * _PHDR.size, *p)
    contents_at = _pad8(len(out))

    headers = [(0,) * 10]
    for s in kept:
        headers.append((shname(s.name), SHT_NOBITS, s.flags, s.addr, contents_at, s.size,
                        new_index.get(s.link, 0), s.info if s.type != SHT_SYMTAB else 0, s.align, s.entsize))
    out += bytes(contents_at - len(out))
    symtab_at = len(out)
    out += symtab
    strtab_at = len(out)
    out += strtab
    sym_name, str_name, shstr_name = shname(".symtab"), shname(".strtab"), shname(".shstrtab")
    shstrtab_at = len(out)
    out += shstrtab
    headers.append((sym_name, SHT_SYMTAB, 0, 0, symtab_at, len(symtab), strtab_ix, first_global, 8, _SYM.size))
    headers.append((str_name, SHT_STRTAB, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0))
    headers.append((shstr_name, SHT_STRTAB, 0, 0, shstrtab_at, len(shstrtab), 0, 0, 1, 0))
    out += bytes(_pad8(len(out)) - len(out))
    shoff = len(out)
    for row in headers:
        out += _SHDR.pack(*row)
    _EHDR.pack_into(out, 0, h[0], h[1], h[2], h[3], h[4], phoff, shoff, h[7], _EHDR.size,
                    _PHDR.size if phnum else 0, phnum, _SHDR.size, len(headers), shstrtab_ix)
    return bytes(out)
