#!/bin/bash
# Make the Linux example guest available: Debian's cloud kernel and busybox-static,
# then the initramfs (examples/build/linux/initrd.cpio.gz). Installs with apt-get
# when run as root; otherwise prints the command to run. Nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
static_busybox() {   # an ELF without PT_INTERP (no dynamic loader)
    python3 - <<'PY'
import struct, sys
try:
    d = open("/bin/busybox", "rb").read(65536)
except OSError:
    sys.exit(1)
if d[:4] != b"\x7fELF":
    sys.exit(1)
phoff, = struct.unpack_from("<Q", d, 0x20)
phentsize, phnum = struct.unpack_from("<HH", d, 0x36)
sys.exit(any(struct.unpack_from("<I", d, phoff + i * phentsize)[0] == 3 for i in range(phnum)))
PY
}
if ! static_busybox; then
    need+=(busybox-static)
fi
if [ ${#need[@]} -gt 0 ]; then
    . tools/apt-install.sh
    apt_install "the Linux example guest" "${need[@]}" || exit 0
fi
mkdir -p examples/build/linux
out=examples/build/linux/initrd.cpio.gz
if ! [ -s "$out" ] || [ examples/linux/mkinitrd.py -nt "$out" ] || [ /bin/busybox -nt "$out" ]; then
    python3 examples/linux/mkinitrd.py "$out"
    echo "setup: built $out"
fi
