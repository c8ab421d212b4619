"""QMP error classes as QEMU 7.2 reports them."""

from __future__ import annotations


class QMPError(Exception):
    """An error answered to a QMP client as ``{"error": {"class", "desc"}}``.

    Raised anywhere below the dispatcher (argument checks, command handlers,
    migration option rules); the dispatcher turns it into the reply.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def to_qmp(self) -> dict:
        return {"class": self.cls, "desc": self.desc}


def command_not_found(name: str) -> QMPError:
    return QMPError(f"The command {name} has not been found", "CommandNotFound")


class NotYetImplemented(QMPError):
    """A command or capability whose feature vmigrate has not built yet.

    Never a silent success: the client learns which feature is missing.
    """

    def __init__(self, feature: str) -> None:
        super().__init__(f"vmigrate does not implement {feature} yet")
