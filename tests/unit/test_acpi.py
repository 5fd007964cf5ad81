"""Tests of the ACPI tables (vmm.boot.acpi) and the PM1a device (vmm.devices.acpi).

The tables are parsed back here from their bytes alone, the way a guest's
ACPICA reads them: RSDP -> XSDT/RSDT -> FADT -> DSDT and FACS, with a small
AML reader for the Name/Package forms the DSDT uses.  The iasl/acpiexec
tests are a development aid and skip when acpica-tools is not installed.
"""
import re
import shutil
import struct
import subprocess

import pytest

from vmm.boot import acpi
from vmm.bus import PortBus
from vmm.devices import rtc
from vmm.devices.acpi import (BM_RLD, EN_BITS, GBL_EN, PM1_CNT, PM1_EN, PM1_STS, PORT_COUNT,
                              PWRBTN_EN, PWRBTN_STS, RTC_STS, SCI_EN, SLP_EN, SLP_TYP_S5,
                              SLP_TYP_SHIFT, STS_BITS, TMR_STS, WAK_STS, AcpiPm, AcpiPmState)

BASE = 0xE0000
HEADER = struct.Struct("<4sIBB6s8sI4sI")
GAS = struct.Struct("<BBBBQ")


# ---- reading the tables back ----

class Tables:
    """The blob from build_tables, addressed by guest-physical address."""

    def __init__(self, base: int):
        self.base = base
        self.blob, self.rsdp_paddr = acpi.build_tables(base)

    def at(self, paddr: int, length: int) -> bytes:
        offset = paddr - self.base
        assert 0 <= offset and offset + length <= len(self.blob), \
            f"{paddr:#x}+{length} is outside the blob at {self.base:#x}+{len(self.blob)}"
        return self.blob[offset:offset + length]

    def table(self, paddr: int, signature: bytes) -> bytes:
        sig, length = struct.unpack("<4sI", self.at(paddr, 8))
        assert sig == signature
        return self.at(paddr, length)

    def rsdp(self) -> dict:
        raw = self.at(self.rsdp_paddr, acpi.RSDP_LEN)
        sig, csum, oem, rev, rsdt, length, xsdt, xcsum = struct.unpack("<8sB6sBIIQB3x", raw)
        return dict(raw=raw, sig=sig, oem=oem, rev=rev, rsdt=rsdt, length=length, xsdt=xsdt)

    def xsdt_entries(self) -> list[int]:
        xsdt = self.table(self.rsdp()["xsdt"], b"XSDT")
        return [v for (v,) in struct.iter_unpack("<Q", xsdt[HEADER.size:])]

    def rsdt_entries(self) -> list[int]:
        rsdt = self.table(self.rsdp()["rsdt"], b"RSDT")
        return [v for (v,) in struct.iter_unpack("<I", rsdt[HEADER.size:])]

    def fadt_paddr(self) -> int:
        (entry,) = self.xsdt_entries()
        return entry

    def fadt(self) -> bytes:
        return self.table(self.fadt_paddr(), b"FACP")

    def dsdt(self) -> bytes:
        return self.table(u64(self.fadt(), acpi.FADT_X_DSDT), b"DSDT")

    def facs(self) -> bytes:
        return self.table(u32(self.fadt(), acpi.FADT_FIRMWARE_CTRL), b"FACS")


def u8(data: bytes, offset: int) -> int:
    return data[offset]


def u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def gas(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """(space_id, bit_width, bit_offset, access_size, address)."""
    return GAS.unpack_from(data, offset)


def header(table: bytes) -> dict:
    sig, length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev = HEADER.unpack_from(table)
    return dict(sig=sig, length=length, rev=rev, oem=oem, oem_table=oem_table,
                creator=creator, creator_rev=creator_rev, oem_rev=oem_rev)


@pytest.fixture
def tables() -> Tables:
    return Tables(BASE)


# ---- a tiny AML reader: Name (NameSeg, Package () { integers }) ----

AML_NAME = 0x08
AML_PACKAGE = 0x12
AML_INTEGER_PREFIXES = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}   # Byte/Word/DWord/QWord
AML_CONSTANTS = {0x00: 0, 0x01: 1, 0xFF: (1 << 64) - 1}        # Zero, One, Ones (DSDT rev >= 2)
NAMESEG = re.compile(rb"[A-Z_][A-Z0-9_]{3}")


def aml_pkg_length(aml: bytes, i: int) -> tuple[int, int]:
    """PkgLength at ``i``: (length, index after the PkgLength bytes)."""
    lead = aml[i]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, i + 1
    length = lead & 0x0F
    for k in range(follow):
        length |= aml[i + 1 + k] << (4 + 8 * k)
    return length, i + 1 + follow


def aml_integer(aml: bytes, i: int) -> tuple[int, int]:
    op = aml[i]
    if op in AML_CONSTANTS:
        return AML_CONSTANTS[op], i + 1
    if op in AML_INTEGER_PREFIXES:
        n = AML_INTEGER_PREFIXES[op]
        return int.from_bytes(aml[i + 1:i + 1 + n], "little"), i + 1 + n
    raise AssertionError(f"AML opcode {op:#04x} at {i} is not an integer")


def aml_package(aml: bytes, i: int) -> tuple[list[int], int]:
    assert aml[i] == AML_PACKAGE, f"expected PackageOp at {i}, found {aml[i]:#04x}"
    length, j = aml_pkg_length(aml, i + 1)
    end = i + 1 + length                      # PkgLength counts from its own first byte
    assert end <= len(aml)
    num_elements = aml[j]
    j += 1
    values = []
    while j < end:
        value, j = aml_integer(aml, j)
        values.append(value)
    assert j == end, "package contents overran its PkgLength"
    assert len(values) == num_elements
    return values, end


def aml_names(aml: bytes) -> dict[str, list[int]]:
    names = {}
    i = 0
    while i < len(aml):
        assert aml[i] == AML_NAME, f"expected NameOp at {i}, found {aml[i]:#04x}"
        seg = aml[i + 1:i + 5]
        assert NAMESEG.fullmatch(seg), seg
        names[seg.decode()], i = aml_package(aml, i + 5)
    assert i == len(aml)
    return names


def test_aml_reader_on_known_encodings():
    # iasl's encoding of Name (_S5, Package () { 5, 5, 0, 0 }), and a
    # two-byte PkgLength (0x41 | 0x03 << 4 = 0x71 = 113 bytes).
    assert aml_names(bytes.fromhex("085f53355f1208040a050a050000")) == {"_S5_": [5, 5, 0, 0]}
    assert aml_pkg_length(bytes([0x41, 0x07]), 0) == (0x71, 2)
    assert aml_integer(bytes([0x0B, 0x34, 0x12]), 0) == (0x1234, 3)
    with pytest.raises(AssertionError):
        aml_names(bytes.fromhex("145f53355f00"))          # a Method is not a Name


# ---- tables ----

def test_rsdp_is_at_base_with_both_checksums(tables):
    assert tables.rsdp_paddr == BASE
    rsdp = tables.rsdp()
    assert rsdp["sig"] == b"RSD PTR "
    assert rsdp["rev"] == 2
    assert rsdp["length"] == 36
    assert rsdp["oem"] == b"RRSTUB"
    assert sum(rsdp["raw"][:20]) % 256 == 0
    assert sum(rsdp["raw"]) % 256 == 0
    assert rsdp["raw"][33:36] == b"\0\0\0"
    assert tables.rsdp_paddr % 16 == 0      # where Linux's scan of 0xE0000..0xFFFFF looks


def test_every_table_checksums_to_zero(tables):
    fadt = tables.fadt()
    for table in (tables.table(tables.rsdp()["xsdt"], b"XSDT"),
                  tables.table(tables.rsdp()["rsdt"], b"RSDT"),
                  fadt, tables.dsdt()):
        assert sum(table) % 256 == 0, header(table)["sig"]
        h = header(table)
        assert h["oem"] == b"RRSTUB"
        assert h["oem_table"] == acpi.OEM_TABLE_ID
        assert h["creator"] == acpi.CREATOR_ID
        assert h["oem_rev"] == 1 and h["creator_rev"] == 1
    # A wrong byte anywhere breaks the sum: the checksum covers the whole table.
    broken = bytearray(fadt)
    broken[acpi.FADT_SCI_INT] ^= 1
    assert sum(broken) % 256 != 0


def test_pointer_chain_resolves_inside_the_blob(tables):
    assert tables.xsdt_entries() == tables.rsdt_entries() == [tables.fadt_paddr()]
    fadt = tables.fadt()
    assert u32(fadt, acpi.FADT_DSDT) == u64(fadt, acpi.FADT_X_DSDT)
    assert tables.dsdt()[:4] == b"DSDT"
    facs_paddr = u32(fadt, acpi.FADT_FIRMWARE_CTRL)
    assert facs_paddr % 64 == 0
    assert u64(fadt, acpi.FADT_X_FIRMWARE_CTRL) == 0   # the spec: zero when FIRMWARE_CTRL is set
    facs = tables.facs()
    assert len(facs) == 64
    assert u32(facs, 16) == 0                          # the global lock starts free
    assert facs[32] == acpi.FACS_VERSION
    every = [tables.rsdp_paddr, tables.rsdp()["rsdt"], tables.rsdp()["xsdt"], tables.fadt_paddr(),
             u64(fadt, acpi.FADT_X_DSDT), facs_paddr]
    assert len(set(every)) == len(every)
    assert all(p % 16 == 0 for p in every)


def test_tables_do_not_overlap():
    t = Tables(BASE)
    fadt = t.fadt()
    spans = sorted([(t.rsdp_paddr, 36), (t.rsdp()["rsdt"], len(t.table(t.rsdp()["rsdt"], b"RSDT"))),
                    (t.rsdp()["xsdt"], len(t.table(t.rsdp()["xsdt"], b"XSDT"))),
                    (t.fadt_paddr(), len(fadt)), (u64(fadt, acpi.FADT_X_DSDT), len(t.dsdt())),
                    (u32(fadt, acpi.FADT_FIRMWARE_CTRL), len(t.facs()))])
    for (a, alen), (b, _) in zip(spans, spans[1:]):
        assert a + alen <= b
    assert spans[-1][0] + spans[-1][1] == BASE + len(t.blob)


def test_fadt_fields(tables):
    fadt = tables.fadt()
    h = header(fadt)
    assert (h["rev"], h["length"]) == (6, 276)
    assert fadt[acpi.FADT_MINOR_VERSION] == 0
    assert u16(fadt, acpi.FADT_SCI_INT) == 9 == acpi.SCI_IRQ
    assert u32(fadt, acpi.FADT_SMI_CMD) == 0
    assert u32(fadt, acpi.FADT_PM1A_EVT_BLK) == 0x600 == acpi.PM1A_EVT_PORT
    assert u32(fadt, acpi.FADT_PM1A_CNT_BLK) == 0x604 == acpi.PM1A_CNT_PORT
    assert u32(fadt, 60) == u32(fadt, 68) == 0          # no PM1b blocks
    assert u32(fadt, 72) == 0                            # no PM2
    assert u32(fadt, acpi.FADT_PM_TMR_BLK) == 0
    assert u32(fadt, 80) == u32(fadt, 84) == 0           # no GPE blocks
    assert u8(fadt, acpi.FADT_PM1_EVT_LEN) == 4
    assert u8(fadt, acpi.FADT_PM1_CNT_LEN) == 2
    assert u8(fadt, acpi.FADT_PM_TMR_LEN) == 0
    assert fadt[92:94] == b"\0\0"                        # GPE0/GPE1 lengths
    assert u16(fadt, acpi.FADT_P_LVL2_LAT) > 100 and u16(fadt, acpi.FADT_P_LVL3_LAT) > 1000
    assert u8(fadt, acpi.FADT_CENTURY) == rtc.REG_CENTURY

    # X_ generic addresses match the 32-bit fields, with bit widths = 8 * length.
    assert gas(fadt, acpi.FADT_X_PM1A_EVT_BLK) == (1, 32, 0, 2, 0x600)
    assert gas(fadt, acpi.FADT_X_PM1A_CNT_BLK) == (1, 16, 0, 2, 0x604)
    for offset in (160, 184, 196, 208, 220, 232, 244, 256):   # PM1b, PM2, timer, GPEs, sleep regs
        assert gas(fadt, offset) == (0, 0, 0, 0, 0)

    flags = u32(fadt, acpi.FADT_FLAGS_OFFSET)
    assert not flags & acpi.FADT_HW_REDUCED
    assert flags & acpi.FADT_WBINVD and flags & acpi.FADT_PROC_C1
    assert flags & acpi.FADT_PWR_BUTTON and flags & acpi.FADT_SLP_BUTTON   # no fixed buttons
    assert flags & acpi.FADT_RESET_REG_SUP
    assert gas(fadt, acpi.FADT_RESET_REG) == (1, 8, 0, 1, 0x64)
    assert fadt[acpi.FADT_RESET_VALUE] == 0xFE

    boot = u16(fadt, acpi.FADT_IAPC_BOOT_ARCH)
    assert boot & acpi.BOOT_LEGACY_DEVICES
    assert not boot & acpi.BOOT_8042
    assert not boot & (1 << 5)                           # the CMOS RTC is present
    assert u64(fadt, 268) == 0                           # hypervisor vendor id


def test_reset_register_resets_through_the_i8042():
    from vmm.devices.misc import I8042
    resets = []
    bus = PortBus()
    bus.insert(I8042(lambda: resets.append(True)), 0x60, 5)
    fadt = Tables(BASE).fadt()
    _, _, _, _, port = gas(fadt, acpi.FADT_RESET_REG)
    bus.write(port, 1, fadt[acpi.FADT_RESET_VALUE])
    assert resets == [True]


def test_dsdt_defines_s5_with_the_devices_sleep_type(tables):
    dsdt = tables.dsdt()
    assert header(dsdt)["rev"] == 2
    names = aml_names(dsdt[HEADER.size:])
    assert names == {"_S0_": [0, 0, 0, 0], "_S5_": [5, 5, 0, 0]}
    assert names["_S5_"][0] == SLP_TYP_S5 == acpi.SLP_TYP_S5
    assert names["_S5_"][0] <= 7                         # fits SLP_TYP's three bits


@pytest.mark.parametrize("base", [0xE0000, 0xF0000, 0x9F000, 0x7FFF_F000])
def test_tables_move_with_base(base):
    t = Tables(base)
    assert t.rsdp_paddr == base
    assert t.at(t.fadt_paddr(), 4) == b"FACP"
    assert aml_names(t.dsdt()[HEADER.size:])["_S5_"][0] == SLP_TYP_S5
    assert len(t.blob) < 0x1000                          # one page is plenty


@pytest.mark.parametrize("base", [0xE0010, 0xE0800, 1 << 32, -0x1000])
def test_bad_base_is_refused(base):
    with pytest.raises(ValueError):
        acpi.build_tables(base)


# ---- the PM1a device ----

def pm_on_bus():
    offs = []
    bus = PortBus()
    dev = AcpiPm(lambda: offs.append(True))
    bus.insert(dev, acpi.PM1A_EVT_PORT, acpi.PM_PORT_COUNT)
    return bus, dev, offs


def test_device_spans_both_blocks():
    assert acpi.PM_PORT_COUNT == PORT_COUNT == acpi.PM1A_EVT_LEN + acpi.PM1A_CNT_LEN
    assert acpi.PM1A_CNT_PORT == acpi.PM1A_EVT_PORT + acpi.PM1A_EVT_LEN


def test_acpica_s5_sequence_powers_off_once_on_slp_en():
    """What Linux 6.1's acpi_hw_legacy_sleep(S5) does, port by port."""
    bus, dev, offs = pm_on_bus()
    bus.write(0x600, 2, WAK_STS)                      # clear WAK_STS
    bus.write(0x600, 2, STS_BITS)                     # acpi_hw_clear_acpi_status
    control = bus.read(0x604, 2)
    assert control == SCI_EN
    control &= ~(0x7 << SLP_TYP_SHIFT | SLP_EN)
    bus.write(0x604, 2, control | SLP_TYP_S5 << SLP_TYP_SHIFT)   # write 1: SLP_TYP alone
    assert offs == []
    assert bus.read(0x604, 2) == SCI_EN | SLP_TYP_S5 << SLP_TYP_SHIFT
    bus.write(0x604, 2, control | SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN)   # write 2: + SLP_EN
    assert offs == [True]
    assert bus.read(0x604, 2) & SLP_EN == 0           # write-only
    bus.write(0x604, 2, SLP_EN)                        # ACPICA's retry after S5 failed: type 0
    assert offs == [True]


@pytest.mark.parametrize("slp_typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_are_ignored(slp_typ):
    bus, dev, offs = pm_on_bus()
    bus.write(0x604, 2, slp_typ << SLP_TYP_SHIFT | SLP_EN)
    assert offs == []
    assert bus.read(0x604, 2) == SCI_EN | slp_typ << SLP_TYP_SHIFT


def test_no_power_off_without_slp_en_or_on_other_registers():
    bus, dev, offs = pm_on_bus()
    bus.write(0x604, 2, SLP_TYP_S5 << SLP_TYP_SHIFT)
    bus.write(0x604, 2, SLP_TYP_S5 << SLP_TYP_SHIFT)
    bus.write(0x600, 2, SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN)   # PM1_STS
    bus.write(0x602, 2, SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN)   # PM1_EN
    bus.write(0x604, 1, 0xFF)                                   # low byte: no SLP_EN there
    assert offs == []


def test_power_off_through_any_access_width():
    s5 = SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN
    # A byte write to the high byte of PM1_CNT alone.
    bus, dev, offs = pm_on_bus()
    bus.write(0x605, 1, s5 >> 8)
    assert offs == [True]
    # A dword write at PM1_EN that covers PM1_CNT too.
    bus, dev, offs = pm_on_bus()
    bus.write(0x602, 4, s5 << 16 | GBL_EN)
    assert offs == [True]
    assert dev.state().enable == GBL_EN
    # Byte by byte: the type in the high byte first, then SLP_EN with it.
    bus, dev, offs = pm_on_bus()
    bus.write(0x605, 1, (SLP_TYP_S5 << SLP_TYP_SHIFT) >> 8)
    assert offs == []
    bus.write(0x605, 1, s5 >> 8)
    assert offs == [True]


def test_sci_en_always_reads_one():
    bus, dev, offs = pm_on_bus()
    assert bus.read(0x604, 2) & SCI_EN
    bus.write(0x604, 2, 0)
    assert bus.read(0x604, 2) == SCI_EN
    assert bus.read(0x604, 1) == SCI_EN
    bus.write(0x604, 2, BM_RLD)
    assert bus.read(0x604, 2) == SCI_EN | BM_RLD
    dev.restore(AcpiPmState(status=0, enable=0, control=0))
    assert bus.read(0x604, 2) == SCI_EN


def test_pm1_sts_is_write_one_to_clear():
    bus, dev, offs = pm_on_bus()
    assert bus.read(0x600, 2) == 0                    # nothing ever sets a status bit
    dev.restore(AcpiPmState(status=WAK_STS | PWRBTN_STS | TMR_STS, enable=0, control=0))
    assert bus.read(0x600, 2) == WAK_STS | PWRBTN_STS | TMR_STS
    bus.write(0x600, 2, 0)                            # writing 0s changes nothing
    assert bus.read(0x600, 2) == WAK_STS | PWRBTN_STS | TMR_STS
    bus.write(0x600, 2, WAK_STS | RTC_STS)            # clears WAK_STS; RTC_STS was not set
    assert bus.read(0x600, 2) == PWRBTN_STS | TMR_STS
    bus.write(0x601, 1, PWRBTN_STS >> 8)              # the high byte alone
    assert bus.read(0x600, 2) == TMR_STS
    bus.write(0x600, 4, TMR_STS)                      # a dword write: STS and EN together
    assert bus.read(0x600, 2) == 0
    assert offs == []


def test_pm1_en_keeps_the_enable_bits():
    bus, dev, offs = pm_on_bus()
    bus.write(0x602, 2, 0xFFFF)
    assert bus.read(0x602, 2) == EN_BITS
    bus.write(0x602, 2, 0)
    bus.write(0x602, 2, bus.read(0x602, 2) | GBL_EN)  # ACPICA enables the global lock ...
    assert bus.read(0x602, 2) & GBL_EN                # ... and reads it back
    bus.write(0x603, 1, PWRBTN_EN >> 8)               # high byte only, low byte kept
    assert bus.read(0x602, 2) == GBL_EN | PWRBTN_EN
    assert bus.read(0x600, 2) == 0                    # enabling raises no status
    assert offs == []


def test_reads_of_every_width():
    bus, dev, offs = pm_on_bus()
    dev.restore(AcpiPmState(status=WAK_STS | TMR_STS, enable=GBL_EN | PWRBTN_EN,
                            control=SLP_TYP_S5 << SLP_TYP_SHIFT))
    assert bus.read(0x600, 4) == (GBL_EN | PWRBTN_EN) << 16 | WAK_STS | TMR_STS
    assert bus.read(0x601, 1) == WAK_STS >> 8
    assert bus.read(0x602, 1) == GBL_EN
    assert bus.read(0x605, 1) == (SLP_TYP_S5 << SLP_TYP_SHIFT) >> 8
    assert bus.read(0x604, 4) == 0xFFFF << 16 | SCI_EN | SLP_TYP_S5 << SLP_TYP_SHIFT  # 0x606.. float
    assert dev.read(PM1_STS, 2) == WAK_STS | TMR_STS
    assert dev.read(PM1_EN, 2) == GBL_EN | PWRBTN_EN
    assert dev.read(PM1_CNT, 2) == SCI_EN | SLP_TYP_S5 << SLP_TYP_SHIFT
    dev.write(4, 4, 0xFFFF_0000)                      # bytes past the device are dropped
    assert dev.read(PM1_CNT, 2) == SCI_EN
    assert offs == []


def test_state_restore_round_trip():
    bus, dev, offs = pm_on_bus()
    dev.restore(AcpiPmState(status=PWRBTN_STS, enable=0, control=0))
    bus.write(0x602, 2, GBL_EN | PWRBTN_EN)
    bus.write(0x604, 2, BM_RLD | 3 << SLP_TYP_SHIFT)
    saved = dev.state()
    assert saved == AcpiPmState(status=PWRBTN_STS, enable=GBL_EN | PWRBTN_EN,
                                control=BM_RLD | 3 << SLP_TYP_SHIFT)
    with pytest.raises(Exception):
        saved.status = 0                              # frozen

    other = AcpiPm(lambda: offs.append("other"))
    other.restore(saved)
    assert other.state() == saved
    for offset, size in ((0, 2), (2, 2), (4, 2), (0, 4), (5, 1)):
        assert other.read(offset, size) == dev.read(offset, size)

    bus.write(0x600, 2, STS_BITS)                     # the original changes; the copy does not
    assert dev.state() != saved and other.state() == saved
    dev.restore(saved)
    assert dev.state() == saved
    assert offs == []


# ---- development aid: acpica-tools' view of the same bytes ----

needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl (acpica-tools) not installed: a development aid only")
needs_acpiexec = pytest.mark.skipif(shutil.which("acpiexec") is None,
                                    reason="acpiexec (acpica-tools) not installed: a development aid only")
ACPICA_COMPLAINT = re.compile(r"(Firmware|ACPI|BIOS) (Warning|Error)|Incorrect checksum|Invalid")


def write_tables(tmp_path, tables):
    fadt, dsdt, facs = tables.fadt(), tables.dsdt(), tables.facs()
    (tmp_path / "facp.dat").write_bytes(fadt)
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    (tmp_path / "facs.dat").write_bytes(facs)
    return ["facp.dat", "dsdt.dat", "facs.dat"]


@needs_iasl
def test_iasl_disassembles_the_tables(tmp_path, tables):
    write_tables(tmp_path, tables)
    (tmp_path / "xsdt.dat").write_bytes(tables.table(tables.rsdp()["xsdt"], b"XSDT"))
    for name in ("dsdt", "facp", "facs", "xsdt"):
        run = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert not ACPICA_COMPLAINT.search(run.stdout + run.stderr), run.stdout + run.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert re.search(r"Name \(_S5, Package \(0x04\)[^{]*\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}", dsl), dsl
    facp = (tmp_path / "facp.dsl").read_text()
    for line in (r"Revision : 06", r"SCI Interrupt : 0009", r"PM1A Event Block Address : 00000600",
                 r"PM1A Control Block Address : 00000604", r"PM1 Event Block Length : 04",
                 r"PM1 Control Block Length : 02", r"Hardware Reduced \(V5\) : 0"):
        assert re.search(line, facp), line


@needs_acpiexec
def test_acpiexec_loads_the_tables_and_evaluates_s5(tmp_path, tables):
    # ("sleep 5" works too, but acpiexec then stalls 10 s: its fake
    # hardware does not power off, and ACPICA waits before retrying.)
    files = write_tables(tmp_path, tables)
    run = subprocess.run(["acpiexec", "-b", r"Evaluate \_S5", *files], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert not ACPICA_COMPLAINT.search(out), out
    assert "ACPI: FACP" in out and "ACPI: DSDT" in out, out
    assert re.search(r"\[Integer\] = 0+5\s+\[Integer\] = 0+5", out), out
