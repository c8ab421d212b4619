"""Section order of a whole stream, source side (QEMU's savevm.c).

A vmigrate VM registers the same handlers as ``qemu-system-x86_64 -M none``
with the same section ids, so its stream is what a QEMU 7.2 destination of
that machine expects: ``timer`` (id 0), ``ram`` (id 2, live), ``globalstate``
(id 4).  Device sections come from the VM's device models
(:mod:`vmigrate.machine.devices`).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import TYPE_CHECKING

from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.ram import RamSaver
from vmigrate.migration.wire import WireError, stream, vmstate

if TYPE_CHECKING:
    from vmigrate.vm import VM

RAM_SECTION = (2, "ram", 0, 4)


class SaveVM:
    def __init__(self, vm: "VM", ram: RamSaver, f: QEMUFileOut, options: MigrationOptions) -> None:
        self.vm = vm
        self.ram = ram
        self.f = f
        self.options = options
        self._header_sent = False

    def _header(self) -> None:
        if self._header_sent:
            return
        self._header_sent = True
        caps = ["x-ignore-shared"] if self.options.cap("x-ignore-shared") else []
        uuid = self.vm.config.uuid
        send_uuid = uuidlib.UUID(uuid).bytes if uuid and self.options.cap("validate-uuid") else None
        self.f.put(stream.header())
        self.f.put(stream.configuration(self.vm.machine_type, caps=caps, uuid=send_uuid))

    def setup(self) -> None:
        """Header (unless already sent) and the START sections."""
        f = self.f
        self._header()
        f.put(stream.section_start(*RAM_SECTION))
        self.ram.setup(f)
        f.put(stream.footer(RAM_SECTION[0]))
        f.flush()

    def open_return_path(self) -> None:
        """Header, configuration, then OPEN_RETURN_PATH and PING(1), as QEMU orders them."""
        self._header()
        self.f.put(stream.open_return_path())
        self.f.put(stream.ping(1))
        self.f.flush()

    def iterate(self) -> bool:
        f = self.f
        f.put(stream.section_part(RAM_SECTION[0]))
        done = self.ram.iterate(f)
        f.put(stream.footer(RAM_SECTION[0]))
        f.flush()
        return done

    def complete(self) -> None:
        """END of ram, the device sections, EOF and the VM description."""
        f = self.f
        f.put(stream.section_end(RAM_SECTION[0]))
        self.ram.complete(f)
        f.put(stream.footer(RAM_SECTION[0]))
        devices = [vmstate.DeviceSection(d.section_id, d.idstr, d.instance_id, d.description, d.save())
                   for d in self.vm.devices]
        for device in devices:
            f.put(device.encode())
        f.put(stream.eof())
        f.put(stream.vmdesc(vmstate.vmdesc_json(devices)))
        f.flush()


def device_state_stream(vm: "VM") -> bytes:
    """The device-only stream of ``xen-save-devices-state``: header, FULL sections, EOF.

    No configuration section and no RAM: Xen's toolstack moves the memory.
    """
    out = [stream.header()]
    out += [vmstate.DeviceSection(d.section_id, d.idstr, d.instance_id, d.description, d.save()).encode()
            for d in vm.devices]
    out.append(stream.eof())
    return b"".join(out)


def load_device_state(vm: "VM", data: bytes) -> None:
    """Apply a device-only stream (``xen-load-devices-state``); raises WireError."""
    devices = {(d.idstr, d.instance_id): d for d in vm.devices}
    decoder = stream.StreamDecoder(device_bodies(devices), require_configuration=False)
    decoder.feed(data)
    decoder.close()
    while (event := decoder.next_event()) is not stream.NEED_DATA:
        if isinstance(event, vmstate.DeviceState):
            devices[(event.idstr, event.instance_id)].load(event.values)
        elif isinstance(event, stream.EOF):
            return
    raise WireError("device state stream ends before EOF")


def device_bodies(devices: dict) -> dict:
    """Body decoders for the device models, keyed by idstr, from ``{(idstr, instance): model}``."""
    return {
        idstr: vmstate.VMStateBodyDecoder(d.description, frozenset(i for s, i in devices if s == idstr))
        for (idstr, _), d in devices.items()
    }
