"""``/dev/kvm`` itself: capabilities, host-wide lists, and the availability probe."""

from __future__ import annotations

import ctypes
import errno
import os
from functools import lru_cache

from vmigrate.machine.kvm import abi

DEVICE = "/dev/kvm"


class KvmUnavailable(RuntimeError):
    """KVM cannot run guests here; the message says why in one line."""


class KvmSystem:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmUnavailable(f"cannot open {path}: {err.strerror}") from None
        try:
            version = abi.ioctl(self.fd, abi.KVM_GET_API_VERSION)
        except OSError as err:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} does not answer KVM_GET_API_VERSION: {err.strerror}") from None
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, not {abi.KVM_API_VERSION}")

    def check_extension(self, cap: int, fd: int | None = None) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (or on a VM fd, where some answers differ)."""
        return abi.ioctl(self.fd if fd is None else fd, abi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return abi.ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until the kernel's list fits."""
        count = 64
        while True:
            buf = abi.flexible(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, count)()
            buf.h.nent = count
            try:
                abi.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
                return buf
            except OSError as err:
                if err.errno != errno.E2BIG or count >= 4096:
                    raise
                count *= 2

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM knows (not all are readable for a given vCPU)."""
        head = abi.kvm_msr_list(0)
        try:
            abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, head)
        except OSError as err:
            if err.errno != errno.E2BIG:
                raise
        full = abi.flexible(abi.kvm_msr_list, ctypes.c_uint32, head.nmsrs)()
        full.h.nmsrs = head.nmsrs
        abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, full)
        return list(full.entries[:full.h.nmsrs])

    def close(self) -> None:
        os.close(self.fd)


@lru_cache(maxsize=1)
def probe() -> str | None:
    """None when KVM can run a guest here, else the reason (one line).

    Opening the device is not enough (a container may expose a /dev/kvm
    that refuses VMs), so a VM with one vCPU is created and destroyed.
    """
    try:
        system = KvmSystem(DEVICE)
    except KvmUnavailable as err:
        return str(err)
    try:
        vm_fd = abi.ioctl(system.fd, abi.KVM_CREATE_VM, 0)
        try:
            os.close(abi.ioctl(vm_fd, abi.KVM_CREATE_VCPU, 0))
        finally:
            os.close(vm_fd)
    except OSError as err:
        return f"{DEVICE} cannot create a VM: {err.strerror}"
    finally:
        system.close()
    return None
