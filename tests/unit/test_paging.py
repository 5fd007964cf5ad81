"""The guest page-table walker (vmm/paging.py) over hand-built 4-level tables in plain guest RAM."""
import pytest

from vmm.memory import GuestMemory
from vmm.paging import PageFault, read_virtual, translate, virt_to_phys

P, W, U, PS, NX = 1, 1 << 1, 1 << 2, 1 << 7, 1 << 63
PAT_HUGE = 1 << 12                 # PAT bit of a 2M/1G leaf: not an address bit
ADDR = 0x000F_FFFF_FFFF_F000
MEM_SIZE = 8 << 20
PML4 = 0x1000
KiB4, MiB2, GiB1 = 1 << 12, 1 << 21, 1 << 30
NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
# Long mode, paging on: the register values virt_to_phys/read_virtual need.
LM = dict(cr0=(1 << 31) | 1, cr3=PML4, cr4=1 << 5, efer=(1 << 10) | (1 << 8))


def index(vaddr, level):
    return (vaddr >> (12 + 9 * (level - 1))) & 0x1FF


class Tables:
    """4-level page tables rooted at PML4, built by hand; new tables come from a bump allocator."""

    def __init__(self):
        self.mem = GuestMemory(MEM_SIZE)
        self.next_table = PML4 + KiB4

    def u64(self, addr, value=None):
        if value is None:
            return self.mem.read_u64(addr)
        self.mem.write(addr, value.to_bytes(8, "little"))

    def entry_addr(self, vaddr, level):
        """Physical address of the entry used at ``level`` (walks existing tables)."""
        table = PML4
        for lvl in range(4, level, -1):
            table = self.u64(table + index(vaddr, lvl) * 8) & ADDR
        return table + index(vaddr, level) * 8

    def map(self, vaddr, paddr, leaf_level=1, flags=P | W | U, table_flags=P | W | U):
        table = PML4
        for lvl in range(4, leaf_level, -1):
            addr = table + index(vaddr, lvl) * 8
            if not self.u64(addr) & P:
                self.u64(addr, self.next_table | table_flags)
                self.next_table += KiB4
            table = self.u64(addr) & ADDR
        self.u64(table + index(vaddr, leaf_level) * 8, paddr | flags | (PS if leaf_level > 1 else 0))

    def edit(self, vaddr, level, set_bits=0, clear_bits=0):
        addr = self.entry_addr(vaddr, level)
        self.u64(addr, self.u64(addr) & ~clear_bits | set_bits)


@pytest.fixture
def pt():
    t = Tables()
    yield t
    t.mem.close()


# ---- page sizes ----

def test_4k_page(pt):
    pt.map(0x1234_5000, 0x34_5000)
    t = translate(pt.mem, PML4, 0x1234_5ABC)
    assert (t.paddr, t.page_size) == (0x34_5ABC, KiB4)
    # The neighbouring virtual page is not mapped (its PTE is empty).
    with pytest.raises(PageFault):
        translate(pt.mem, PML4, 0x1234_6000)


def test_2m_page_ignores_pat_bit_in_address(pt):
    pt.map(0x4060_0000, 0x60_0000, leaf_level=2, flags=P | W | PAT_HUGE)
    t = translate(pt.mem, PML4, 0x4060_0000 + 0x1_2345)
    assert (t.paddr, t.page_size) == (0x61_2345, MiB2)
    assert translate(pt.mem, PML4, 0x407F_FFFF).paddr == 0x7F_FFFF


def test_1g_page_from_pdpte_with_ps(pt):
    pt.map(0x8000_0000, 0x4000_0000, leaf_level=3)       # PML4 0, PDPT 2
    t = translate(pt.mem, PML4, 0x8012_3456)
    assert (t.paddr, t.page_size) == (0x4012_3456, GiB1)
    assert translate(pt.mem, PML4, 0xBFFF_FFFF).paddr == 0x7FFF_FFFF


def test_cr3_low_bits_are_ignored(pt):
    pt.map(0x5000, 0x7000)
    assert translate(pt.mem, PML4 | 0x18, 0x5010).paddr == 0x7010   # PWT|PCD in CR3


# ---- the upper half ----

@pytest.mark.parametrize("vaddr, paddr", [
    (0xFFFF_FFFF_8020_1000, 0x20_1000),     # PML4 511, PDPT 510: a kernel linked at -2 GiB
    (0xFFFF_8000_0000_0000, 0x30_0000),     # lowest canonical upper-half address: PML4 256
])
def test_high_half(pt, vaddr, paddr):
    pt.map(vaddr, paddr)
    assert translate(pt.mem, PML4, vaddr + 0x123).paddr == paddr + 0x123
    assert pt.u64(PML4 + index(vaddr, 4) * 8) & P
    assert not pt.u64(PML4) & P              # nothing went through PML4 entry 0


def test_vaddr_beyond_64_bits_is_truncated(pt):
    pt.map(0xFFFF_FFFF_FFFF_F000, 0x40_0000)
    assert translate(pt.mem, PML4, (1 << 64) + 0xFFFF_FFFF_FFFF_F008).paddr == 0x40_0008


@pytest.mark.parametrize("vaddr", [
    0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x0001_0000_0000_1000, 0x8000_0000_0000_1000,
])
def test_non_canonical_faults_even_if_its_indexes_are_mapped(pt, vaddr):
    pt.map(vaddr & 0xFFFF_FFFF_F000, 0x20_0000)   # its PML4/PDPT/PD/PT indexes all lead somewhere
    with pytest.raises(PageFault, match="non-canonical") as e:
        translate(pt.mem, PML4, vaddr)
    assert e.value.vaddr == vaddr


# ---- faults ----

@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_names_the_level(pt, level):
    vaddr = 0x7F_C020_3000
    pt.map(vaddr, 0x40_0000)
    translate(pt.mem, PML4, vaddr)           # mapped before the edit
    pt.edit(vaddr, level, clear_bits=P)
    with pytest.raises(PageFault) as e:
        translate(pt.mem, PML4, vaddr)
    assert e.value.level == level
    assert NAMES[level] in str(e.value) and "not present" in str(e.value)
    assert hex(vaddr) in str(e.value)


def test_empty_tables_fault_at_pml4(pt):
    with pytest.raises(PageFault) as e:
        translate(pt.mem, PML4, 0x1000)
    assert e.value.level == 4


@pytest.mark.parametrize("level, table", [
    (4, 0x7FF_0000_0000),           # CR3 itself outside RAM
    (3, 0x1_0000_0000),
    (2, MEM_SIZE),                  # first byte past RAM: the PDE read would be exactly at the end
    (1, 0x000F_FFFF_FFFF_F000),     # highest encodable table address
])
def test_table_outside_ram_is_a_page_fault(pt, level, table):
    vaddr = 0                       # index 0 at every level
    pt.map(vaddr, 0x40_0000)
    if level == 4:
        cr3 = table
    else:
        cr3 = PML4
        pt.edit(vaddr, level + 1, clear_bits=ADDR, set_bits=table)
    with pytest.raises(PageFault, match="outside RAM") as e:
        translate(pt.mem, cr3, vaddr)
    assert e.value.level == level


def test_table_in_last_page_of_ram_is_readable(pt):
    vaddr = 0x5F_F000                                                # PTE index 511: the page's last entry
    pt.map(vaddr, 0x40_0000)
    pt.u64(MEM_SIZE - 8, pt.u64(pt.entry_addr(vaddr, 1)))            # copy the PTE to RAM's last 8 bytes
    pt.edit(vaddr, 2, clear_bits=ADDR, set_bits=MEM_SIZE - KiB4)     # PD now points at the last page
    assert index(vaddr, 1) == 511
    assert translate(pt.mem, PML4, vaddr).paddr == 0x40_0000


# ---- permissions ----

def test_all_permissions_when_every_level_allows(pt):
    pt.map(0x20_0000, 0x20_0000)
    t = translate(pt.mem, PML4, 0x20_0000)
    assert (t.writable, t.user, t.executable) == (True, True, True)


@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize("attr, edit", [
    ("writable", dict(clear_bits=W)),
    ("user", dict(clear_bits=U)),
    ("executable", dict(set_bits=NX)),
])
def test_permission_restricted_at_any_level(pt, level, attr, edit):
    pt.map(0x20_0000, 0x20_0000)
    pt.edit(0x20_0000, level, **edit)
    t = translate(pt.mem, PML4, 0x20_0000)
    perms = {"writable": t.writable, "user": t.user, "executable": t.executable}
    assert perms.pop(attr) is False
    assert perms == {k: True for k in perms}
    assert t.paddr == 0x20_0000              # NX (bit 63) must not leak into the address


@pytest.mark.parametrize("leaf_level", [3, 2])
def test_permissions_of_huge_pages_combine_with_upper_levels(pt, leaf_level):
    pt.map(0x4000_0000, 0, leaf_level=leaf_level, flags=P | U | NX, table_flags=P | W)
    t = translate(pt.mem, PML4, 0x4000_0000)
    assert (t.writable, t.user, t.executable, t.paddr) == (False, False, False, 0)


# ---- virt_to_phys / read_virtual ----

def test_read_virtual_crosses_to_non_adjacent_physical_page(pt):
    pt.map(0x20_0000, 0x50_0000)
    pt.map(0x20_1000, 0x30_0000)
    pt.mem.write(0x50_0FF8, b"ABCDEFGH")
    pt.mem.write(0x50_1000, b"wrongwro")     # physically adjacent: must not be read
    pt.mem.write(0x30_0000, b"IJKLMNOP")
    assert read_virtual(pt.mem, vaddr=0x20_0FF8, length=16, **LM) == b"ABCDEFGHIJKLMNOP"
    assert read_virtual(pt.mem, vaddr=0x20_0FFF, length=2, **LM) == b"HI"
    assert read_virtual(pt.mem, vaddr=0x20_1000, length=0, **LM) == b""


def test_read_virtual_spanning_three_pages(pt):
    for i, phys in enumerate((0x60_0000, 0x40_0000, 0x50_0000)):
        pt.map(0x20_0000 + i * KiB4, phys)
        pt.mem.write(phys, bytes([0x10 + i]) * KiB4)
    data = read_virtual(pt.mem, vaddr=0x20_0800, length=2 * KiB4, **LM)
    assert data == b"\x10" * 0x800 + b"\x11" * KiB4 + b"\x12" * 0x800


def test_read_virtual_faults_on_the_unmapped_second_page(pt):
    pt.map(0x20_0000, 0x50_0000)
    with pytest.raises(PageFault) as e:
        read_virtual(pt.mem, vaddr=0x20_0FFC, length=8, **LM)
    assert e.value.vaddr == 0x20_1000


def test_read_virtual_of_page_mapped_outside_ram_is_a_page_fault(pt):
    pt.map(0x4000_0000, 0x4000_0000, leaf_level=3)   # 1 GiB page, but RAM is 8 MiB
    with pytest.raises(PageFault, match="outside RAM"):
        read_virtual(pt.mem, vaddr=0x4000_0000, length=4, **LM)


def test_virt_to_phys_with_paging_on_walks_the_tables(pt):
    pt.map(0x20_0000, 0x50_0000)
    assert virt_to_phys(pt.mem, vaddr=0x20_0123, **LM) == 0x50_0123


@pytest.mark.parametrize("cr0", [0, 1, 0x6000_0011])   # real mode, protected mode, CD|NW set: PG clear
def test_paging_off_is_identity_masked_to_32_bits(pt, cr0):
    garbage_cr3 = 0xDEAD_B000                            # must not be walked
    assert virt_to_phys(pt.mem, cr0, garbage_cr3, 0, 0, 0x12_3456) == 0x12_3456
    assert virt_to_phys(pt.mem, cr0, garbage_cr3, 0, 0, 0xFFFF_FFFF_0000_1234) == 0x1234
    assert virt_to_phys(pt.mem, cr0, garbage_cr3, 0, 0, 0x1_FFFF_FFFF) == 0xFFFF_FFFF
    pt.mem.write(0x2FFE, b"wxyz")
    assert read_virtual(pt.mem, cr0, garbage_cr3, 0, 0, 0x1_0000_2FFE, 4) == b"wxyz"


@pytest.mark.parametrize("cr4, efer", [
    (0, 1 << 10),                    # no PAE: 32-bit paging
    (1 << 5, 0),                     # PAE but not long mode
    ((1 << 5) | (1 << 12), 1 << 10),  # LA57: 5-level paging
])
def test_unsupported_paging_modes_fault(pt, cr4, efer):
    pt.map(0x20_0000, 0x20_0000)
    with pytest.raises(PageFault, match="4-level"):
        virt_to_phys(pt.mem, 1 << 31 | 1, PML4, cr4, efer, 0x20_0000)
