"""A 16550A UART at 0x3f8 (COM1) and where its output goes (``--serial``).

Transmission is immediate: a byte written to THR goes straight to the sink,
so the transmitter is always empty (LSR.THRE|TEMT) and the guest's polling
loop costs one exit per byte.  Nothing is ever received; the receive side
(LSR.DR, RBR) reads as empty.  Interrupts are not wired: the guest programs
poll, and IIR still reports a THR-empty interrupt the way a real 16550
does when IER asks for it.
"""

from __future__ import annotations

import os
import socket
import threading

from vmigrate.migration.wire import vmstate

BASE = 0x3F8
PORTS = range(BASE, BASE + 8)

RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_THRE, LSR_TEMT = 0x20, 0x40
IER_THRI = 0x02
IIR_NO_INT, IIR_THRI, IIR_FIFO_ENABLED = 0x01, 0x02, 0xC0
FCR_FIFO_ENABLE = 0x01
#: Modem status with carrier, ring, DSR and CTS asserted in loopback-free operation.
MSR_DEFAULT = 0xB0

SERIAL = vmstate.Description("serial", 1, (
    vmstate.Field("divider", "uint16", 2),
    vmstate.Field("ier", "uint8", 1),
    vmstate.Field("lcr", "uint8", 1),
    vmstate.Field("mcr", "uint8", 1),
    vmstate.Field("lsr", "uint8", 1),
    vmstate.Field("msr", "uint8", 1),
    vmstate.Field("scr", "uint8", 1),
    vmstate.Field("fcr", "uint8", 1),
    vmstate.Field("thr_ipending", "uint8", 1),
), minimum_version_id=1)


class SerialSink:
    """Where UART output goes: nothing, a file, stdout, or the clients of a unix socket.

    ``unix:PATH`` listens at PATH (like QEMU's ``server=on,wait=off``):
    every connected client receives the output from then on; with no
    client it is dropped, so a guest never waits for a reader.
    """

    def __init__(self, spec: str | None) -> None:
        self.spec = spec or "none"
        self._fd: int | None = None
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        if self.spec == "none":
            return
        if self.spec == "stdio":
            self._fd = os.dup(1)
        elif self.spec.startswith("unix:"):
            path = self.spec[len("unix:"):]
            if os.path.exists(path):
                os.unlink(path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(path)
            self._listener.listen(4)
            threading.Thread(target=self._accept, name="serial accept", daemon=True).start()
        else:
            path = self.spec[len("file:"):] if self.spec.startswith("file:") else self.spec
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setblocking(False)
            with self._lock:
                self._clients.append(conn)

    def write(self, data: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, data)
        elif self._clients:
            with self._lock:
                for conn in list(self._clients):
                    try:
                        conn.send(data)
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._clients.remove(conn)
                        conn.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._clients:
                conn.close()
            self._clients.clear()


class Uart16550:
    """COM1's registers; a device model migrated as the ``serial`` section."""

    idstr = "serial"
    instance_id = 0
    description = SERIAL

    def __init__(self, sink: SerialSink, section_id: int) -> None:
        self.sink = sink
        self.section_id = section_id
        self.divider = 12  # 9600 baud
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DEFAULT
        self.thr_ipending = 0
        #: Bytes the guest wrote since start (tests and statistics).
        self.transmitted = 0

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_FIFO_ENABLE else 0
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI | fifo
        return IIR_NO_INT | fifo

    def read(self, port: int) -> int:
        reg = port - BASE
        if reg == LSR:  # the transmit loop's poll: the hot path
            return self.lsr
        if self.lcr & LCR_DLAB and reg in (RBR_THR_DLL, IER_DLM):
            return (self.divider >> (8 * reg)) & 0xFF
        if reg == RBR_THR_DLL:
            return 0
        if reg == IER_DLM:
            return self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self.thr_ipending = 0
            return iir
        return {LCR: self.lcr, MCR: self.mcr, MSR: self.msr, SCR: self.scr}[reg]

    def write(self, port: int, value: int) -> None:
        reg = port - BASE
        if self.lcr & LCR_DLAB and reg in (RBR_THR_DLL, IER_DLM):
            shift = 8 * reg
            self.divider = (self.divider & ~(0xFF << shift)) | (value << shift)
        elif reg == RBR_THR_DLL:
            self.sink.write(bytes((value,)))
            self.transmitted += 1
            self.thr_ipending = 1
        elif reg == IER_DLM:
            if value & IER_THRI and not self.ier & IER_THRI:
                self.thr_ipending = 1
            self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fcr = value & 0xC9
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value

    def save(self) -> dict:
        return {f.name: getattr(self, f.name) for f in SERIAL.fields}

    def load(self, values: dict) -> None:
        for f in SERIAL.fields:
            setattr(self, f.name, int(values[f.name]))
