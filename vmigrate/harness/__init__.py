"""Tooling that drives VM processes: used by ``vmigrate demo``/``bench``, benchmarks/ and the tests.

:mod:`.launcher` starts a vmigrate or QEMU 7.2 process with a connected
:class:`~vmigrate.qmp.client.QMPClient`, :mod:`.migrate` drives one
migration between two of them, :mod:`.waiting` bounds every wait.
"""
