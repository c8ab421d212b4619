"""The KVM accelerator: real x86 guest code in vCPU threads, from plain Python.

``abi`` (ioctl numbers and structures), ``system`` (/dev/kvm and the
availability probe), ``vm`` (memory slots, dirty bitmaps, VM-wide devices),
``vcpu`` (one vCPU fd, its dirty ring and state ioctls), ``state`` (vCPU
and device state as migrated sections), ``uart`` (COM1 and ``--serial``),
``vcpus`` (the backend the VM drives: threads, pause handshake, throttle,
dirty logging).
"""

from vmigrate.machine.kvm.system import KvmUnavailable, probe
from vmigrate.machine.kvm.vcpus import KvmVcpus

__all__ = ["KvmUnavailable", "KvmVcpus", "probe"]
