"""A QEMU 7.2 q35 with a virtio-net failover pair, and the few guest-driver steps it needs, over qtest.

QEMU shows ``wait-unplug`` only with a failover primary in the guest, and
keeps the primary hidden until the guest's virtio-net driver negotiates
``VIRTIO_NET_F_STANDBY`` (hw/net/virtio-net.c failover_hide_primary_device);
it leaves ``wait-unplug`` only when the guest ejects the primary.  There is
no guest here: the ``-qtest`` protocol plays the driver the way QEMU's own
tests/qtest/virtio-net-failover.c does — bus numbers and windows for the two
PCIe root ports, the standby's modern BAR, VERSION_1 and STANDBY written as
driver features, then the ACPI PCI hotplug eject (port 0xcc8) for the unplug.
Debian's QEMU has no ``qtest`` accelerator, so the machine runs TCG, stopped
(``-S``): nothing but these accesses touches the devices.
"""

from __future__ import annotations

import socket
from pathlib import Path

from vmigrate.harness.launcher import QEMU, VMProcess

PRIMARY = "primary0"
STANDBY = "standby0"
VIRTIO_NET_F_STANDBY = 62
VIRTIO_F_VERSION_1 = 32
#: ACPI PCI hotplug (ICH9): the eject register (hw/acpi/pcihp.c, PCI_EJ_BASE).
ACPI_PCIHP_EJECT = 0x0CC0 + 0x0008
#: Where the root ports' prefetchable windows (and the standby's BAR 4) go.
WINDOW = 0xE0000000
VIRTIO_PCI_CAP_VENDOR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1


class QtestFailoverQemu(VMProcess):
    """QEMU with ``standby0`` (virtio-net, failover=on) on root0, ``primary0`` plugged on root1."""

    def __init__(self, directory: Path) -> None:
        qtest_path = directory / "qtest.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(qtest_path))
        listener.listen(1)
        listener.settimeout(30)
        sock = directory / "qemu-failover.sock"
        argv = [QEMU, "-M", "q35", "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "128M",
                "-device", "pcie-root-port,id=root0,addr=0x1,bus=pcie.0,chassis=1",
                "-device", "pcie-root-port,id=root1,addr=0x2,bus=pcie.0,chassis=2",
                "-netdev", "user,id=hs0", "-netdev", "user,id=hs1",
                "-device", f"virtio-net,bus=root0,id={STANDBY},failover=on,netdev=hs0,mac=52:54:00:22:22:22",
                "-qtest", f"unix:{qtest_path}", "-qmp", f"unix:{sock},server=on,wait=off"]
        try:
            super().__init__(argv, sock, directory / "qemu-failover.log")
            self._qtest, _ = listener.accept()
        finally:
            listener.close()
        self._qtest.settimeout(30)
        self._qtest_file = self._qtest.makefile("rw")
        self._negotiate()
        self.cmd("device_add", driver="virtio-net", id=PRIMARY, bus="root1", failover_pair_id=STANDBY,
                 netdev="hs1", rombar=0, romfile="", mac="52:54:00:11:11:11")

    def eject(self) -> None:
        """The guest's answer to the unplug request: eject slot 0 through ACPI."""
        self._q(f"outl {ACPI_PCIHP_EJECT:#x} 1")

    def close(self) -> None:
        qtest = getattr(self, "_qtest", None)
        if qtest is not None:
            qtest.close()
        super().close()

    # -- the qtest protocol --------------------------------------------------------

    def _q(self, line: str) -> int | None:
        self._qtest_file.write(line + "\n")
        self._qtest_file.flush()
        while True:
            reply = self._qtest_file.readline().split()
            if reply and reply[0] == "IRQ":
                continue
            if not reply or reply[0] != "OK":
                raise RuntimeError(f"qtest {line!r}: {reply}")
            return int(reply[1], 16) if len(reply) > 1 else None

    def _config_read(self, bus: int, dev: int, offset: int) -> int:
        self._q(f"outl 0xcf8 {0x80000000 | bus << 16 | dev << 11 | (offset & 0xFC):#x}")
        return self._q("inl 0xcfc") >> 8 * (offset & 3)

    def _config_write(self, bus: int, dev: int, offset: int, value: int) -> None:
        self._q(f"outl 0xcf8 {0x80000000 | bus << 16 | dev << 11 | offset:#x}")
        self._q(f"outl 0xcfc {value:#x}")

    def _negotiate(self) -> None:
        """Enumerate the root ports, map the standby's common configuration, set STANDBY."""
        for bus, slot in ((1, 1), (2, 2)):
            base = (WINDOW + (bus - 1) * 0x100000) >> 16
            self._config_write(0, slot, 0x18, bus << 16 | bus << 8)
            self._config_write(0, slot, 0x20, 0x0000FFF0)  # no non-prefetchable window
            self._config_write(0, slot, 0x24, base << 16 | base)
            self._config_write(0, slot, 0x28, 0)
            self._config_write(0, slot, 0x2C, 0)
            self._config_write(0, slot, 0x04, 0x6)  # memory space, bus master
        self._config_write(1, 0, 0x20, WINDOW)  # BAR 4, 64-bit
        self._config_write(1, 0, 0x24, 0)
        self._config_write(1, 0, 0x04, 0x6)
        common = None
        cap = self._config_read(1, 0, 0x34) & 0xFF
        while cap:
            if (self._config_read(1, 0, cap) & 0xFF == VIRTIO_PCI_CAP_VENDOR
                    and self._config_read(1, 0, cap + 3) & 0xFF == VIRTIO_PCI_CAP_COMMON_CFG):
                common = WINDOW + self._config_read(1, 0, cap + 8)
            cap = self._config_read(1, 0, cap + 1) & 0xFF
        assert common is not None, "virtio-net-pci without a common configuration capability"
        status = common + 0x14
        for value in (0, 1, 3):  # reset, ACKNOWLEDGE, DRIVER
            self._q(f"writeb {status:#x} {value}")
        high = (1 << VIRTIO_F_VERSION_1 - 32) | (1 << VIRTIO_NET_F_STANDBY - 32)
        for select, features in ((0, 0), (1, high)):
            self._q(f"writel {common + 0x08:#x} {select}")
            self._q(f"writel {common + 0x0C:#x} {features:#x}")
        self._q(f"writeb {status:#x} 0xb")  # FEATURES_OK: virtio_net_set_features
        self._q(f"writeb {status:#x} 0xf")  # DRIVER_OK
