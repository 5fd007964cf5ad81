"""The ACPI tables a Linux guest needs to power off, and nothing more.

``build_tables(base)`` lays out, at guest-physical ``base``::

  RSDP  revision 2 (ACPI 2.0+): RSDT and XSDT addresses, both checksums
  FACS  64 bytes, 64-byte aligned (the global lock lives here)
  RSDT  -> FADT (32-bit entries; for ``acpi=rsdt`` and old parsers)
  XSDT  -> FADT (64-bit entries; what Linux uses with a revision-2 RSDP)
  FADT  revision 6 (276 bytes, the layout Linux 6.1's ACPICA knows in full)
  DSDT  AML: Name (_S0, Package {0, 0, 0, 0}), Name (_S5, Package {5, 5, 0, 0})

No MADT: Linux stays in PIC mode (ISA IRQs on the 8259s), one CPU.  No
HPET, no MCFG, no PM timer.  Hardware the FADT describes, all of it the
``vmm.devices.acpi.AcpiPm`` device at ``PM1A_EVT_PORT``:

* PM1a_EVT_BLK at 0x600 (4 bytes: PM1_STS, PM1_EN) and PM1a_CNT_BLK at
  0x604 (2 bytes), in both the 32-bit fields and the X_ generic addresses
  (equal addresses; X_ bit widths = 8 * the legacy lengths, as ACPICA checks).
* SCI_INT = 9, but no SCI is ever raised.  SMI_CMD = 0: always in ACPI
  mode, so the device's SCI_EN always reads 1.
* RESET_REG: I/O port 0x64, value 0xFE: the i8042 pulse-reset command the
  machine's ``I8042`` already obeys, so Linux's first reboot method (ACPI)
  resets the machine at once.

Flags and why:

* IAPC_BOOT_ARCH = LEGACY_DEVICES | VGA_NOT_PRESENT.  8042 is left clear:
  the machine's i8042 is only a reset line and never answers a command, so
  with the flag clear (and no PNP0303 in the DSDT) Linux's i8042 driver
  skips it ("PNP: No PS/2 controller found") instead of timing out on a
  self-test; rebooting does not depend on the flag.  CMOS_RTC_NOT_PRESENT
  is clear: the CMOS RTC is there (and CENTURY = 0x32 names its century
  register).
* Flags = WBINVD | PROC_C1 (HLT idles) | PWR_BUTTON | SLP_BUTTON (both
  mean "no fixed-feature button": Linux then adds no LNXPWRBN/LNXSLPBN)
  | FIX_RTC (no RTC_STS wake in PM1) | RESET_REG_SUP | HEADLESS.  Not
  HW_REDUCED: a hardware-reduced FADT would drop PM1 and the legacy SCI.
* P_LVL2_LAT = 101 and P_LVL3_LAT = 1001: no C2, no C3.

The FACS is not strictly required (ACPICA in Linux 6.1 installs it only if
FIRMWARE_CTRL or X_FIRMWARE_CTRL is non-zero), but without one a guest
that takes the ACPI global lock dereferences a null FACS: ACPICA enables
GBL_EN, reads it back as set, so believes the lock exists.  With it the
lock is just a dword in guest memory.  It is given in FIRMWARE_CTRL only
(the spec wants X_FIRMWARE_CTRL zero when FIRMWARE_CTRL is set).
"""
from __future__ import annotations

import struct

from vmm.devices import acpi as pm
from vmm.devices.acpi import SLP_TYP_S0, SLP_TYP_S5  # noqa: F401  (the values the DSDT reports)

PM1A_EVT_PORT = 0x600
PM1A_EVT_LEN = pm.PM1_EVT_LEN            # 4: PM1_STS (2) + PM1_EN (2)
PM1A_CNT_PORT = PM1A_EVT_PORT + pm.PM1_CNT   # 0x604
PM1A_CNT_LEN = pm.PM1_CNT_LEN            # 2
PM_PORT_COUNT = pm.PORT_COUNT            # the device's span, 0x600..0x605
SCI_IRQ = 9
RESET_PORT = 0x64                        # the i8042 command port
RESET_VALUE = 0xFE                       # pulse output bit 0 (CPU reset) low
RTC_CENTURY_INDEX = 0x32

OEM_ID = b"RRSTUB"
OEM_TABLE_ID = b"RRSTUBVM"
OEM_REVISION = 1
CREATOR_ID = b"RRST"
CREATOR_REVISION = 1

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_V1_LEN = 20
RSDP_LEN = 36
HEADER_LEN = 36
FACS_LEN = 64
FACS_VERSION = 2
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_LEN = 276
DSDT_REVISION = 2                        # 2+: AML integers are 64-bit

TABLE_ALIGN = 16
FACS_ALIGN = 64
BASE_ALIGN = 0x1000

# Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_LEN = 12

# IA-PC boot architecture flags
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH = BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT

# FADT feature flags
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4
FADT_SLP_BUTTON = 1 << 5
FADT_FIX_RTC = 1 << 6
FADT_RESET_REG_SUP = 1 << 10
FADT_HEADLESS = 1 << 12
FADT_HW_REDUCED = 1 << 20
FADT_FLAGS = (FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
              | FADT_FIX_RTC | FADT_RESET_REG_SUP | FADT_HEADLESS)
P_LVL2_LAT_NONE = 101
P_LVL3_LAT_NONE = 1001

# FADT field offsets (ACPI 6.x table 5.9; ACPICA's struct acpi_table_fadt)
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_SCI_INT = 46
FADT_SMI_CMD = 48
FADT_PM1A_EVT_BLK = 56
FADT_PM1A_CNT_BLK = 64
FADT_PM_TMR_BLK = 76
FADT_PM1_EVT_LEN = 88
FADT_PM1_CNT_LEN = 89
FADT_PM_TMR_LEN = 91
FADT_P_LVL2_LAT = 96
FADT_P_LVL3_LAT = 98
FADT_CENTURY = 108
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_X_PM1A_EVT_BLK = 148
FADT_X_PM1A_CNT_BLK = 172

# AML encodings used by the DSDT
AML_ZERO = 0x00
AML_ONE = 0x01
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_PACKAGE_OP = 0x12


def build_tables(base: int) -> tuple[bytes, int]:
    """The tables as one blob to be put at guest-physical ``base``; (blob, RSDP address).

    ``base`` must be 4 KiB aligned and the blob must end below 4 GiB (the
    RSDT and FADT hold 32-bit pointers).  The RSDP is at ``base`` itself, so
    with ``base`` in 0xE0000..0xFFFFF Linux also finds it by scanning.
    """
    if base % BASE_ALIGN or base < 0:
        raise ValueError(f"ACPI tables need a 4 KiB aligned base, not {base:#x}")
    facs_off = _align(RSDP_LEN, FACS_ALIGN)
    rsdt_off = _align(facs_off + FACS_LEN, TABLE_ALIGN)
    xsdt_off = _align(rsdt_off + HEADER_LEN + 4, TABLE_ALIGN)
    fadt_off = _align(xsdt_off + HEADER_LEN + 8, TABLE_ALIGN)
    dsdt_off = _align(fadt_off + FADT_LEN, TABLE_ALIGN)
    dsdt = _table(b"DSDT", DSDT_REVISION, dsdt_aml())
    end = dsdt_off + len(dsdt)
    if base + end > 1 << 32:
        raise ValueError(f"ACPI tables at {base:#x} would end above 4 GiB")

    blob = bytearray(end)
    blob[facs_off:facs_off + FACS_LEN] = _facs()
    fadt = _fadt(facs=base + facs_off, dsdt=base + dsdt_off)
    blob[rsdt_off:rsdt_off + HEADER_LEN + 4] = _table(b"RSDT", 1, struct.pack("<I", base + fadt_off))
    blob[xsdt_off:xsdt_off + HEADER_LEN + 8] = _table(b"XSDT", 1, struct.pack("<Q", base + fadt_off))
    blob[fadt_off:fadt_off + FADT_LEN] = fadt
    blob[dsdt_off:end] = dsdt
    blob[0:RSDP_LEN] = _rsdp(rsdt=base + rsdt_off, xsdt=base + xsdt_off)
    return bytes(blob), base


def dsdt_aml() -> bytes:
    """The DSDT's AML body: ``Name (_S0, Package () {0, 0, 0, 0})`` and the same for ``_S5``."""
    return (_aml_name(b"_S0_", _aml_package([SLP_TYP_S0, SLP_TYP_S0, 0, 0]))
            + _aml_name(b"_S5_", _aml_package([SLP_TYP_S5, SLP_TYP_S5, 0, 0])))


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_LEN + len(body), revision, 0,
                         OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _rsdp(rsdt: int, xsdt: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION,
                                 rsdt, RSDP_LEN, xsdt, 0))
    rsdp[8] = checksum(rsdp[:RSDP_V1_LEN])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def _facs() -> bytes:
    # Signature, Length, HardwareSignature, FirmwareWakingVector, GlobalLock,
    # Flags, X_FirmwareWakingVector, Version, 3 reserved, OSPM flags, 24 reserved.
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LEN, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def _gas(address: int, bit_width: int, access: int) -> bytes:
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bit_width, 0, access, address)


def _fadt(facs: int, dsdt: int) -> bytes:
    body = bytearray(FADT_LEN - HEADER_LEN)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_LEN, *values)

    def put_bytes(offset: int, data: bytes) -> None:
        body[offset - HEADER_LEN:offset - HEADER_LEN + len(data)] = data

    put(FADT_FIRMWARE_CTRL, "<I", facs)
    put(FADT_DSDT, "<I", dsdt)
    put(FADT_SCI_INT, "<H", SCI_IRQ)
    put(FADT_SMI_CMD, "<I", 0)
    put(FADT_PM1A_EVT_BLK, "<I", PM1A_EVT_PORT)
    put(FADT_PM1A_CNT_BLK, "<I", PM1A_CNT_PORT)
    put(FADT_PM1_EVT_LEN, "<B", PM1A_EVT_LEN)
    put(FADT_PM1_CNT_LEN, "<B", PM1A_CNT_LEN)
    put(FADT_P_LVL2_LAT, "<H", P_LVL2_LAT_NONE)
    put(FADT_P_LVL3_LAT, "<H", P_LVL3_LAT_NONE)
    put(FADT_CENTURY, "<B", RTC_CENTURY_INDEX)
    put(FADT_IAPC_BOOT_ARCH, "<H", BOOT_ARCH)
    put(FADT_FLAGS_OFFSET, "<I", FADT_FLAGS)
    put_bytes(FADT_RESET_REG, _gas(RESET_PORT, 8, GAS_ACCESS_BYTE))
    put(FADT_RESET_VALUE, "<B", RESET_VALUE)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt)
    put_bytes(FADT_X_PM1A_EVT_BLK, _gas(PM1A_EVT_PORT, 8 * PM1A_EVT_LEN, GAS_ACCESS_WORD))
    put_bytes(FADT_X_PM1A_CNT_BLK, _gas(PM1A_CNT_PORT, 8 * PM1A_CNT_LEN, GAS_ACCESS_WORD))
    return _table(b"FACP", FADT_REVISION, bytes(body))


def _aml_name(name: bytes, data: bytes) -> bytes:
    assert len(name) == 4
    return bytes([AML_NAME_OP]) + name + data


def _aml_integer(value: int) -> bytes:
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    if value <= 0xFF:
        return bytes([AML_BYTE_PREFIX, value])
    raise ValueError(f"no AML encoding here for {value:#x}")


def _aml_package(values: list[int]) -> bytes:
    contents = bytes([len(values)]) + b"".join(_aml_integer(v) for v in values)
    length = len(contents) + 1           # the one-byte PkgLength counts itself
    if length > 0x3F:
        raise ValueError("package too long for a one-byte PkgLength")
    return bytes([AML_PACKAGE_OP, length]) + contents
