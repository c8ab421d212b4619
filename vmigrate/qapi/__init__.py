"""QAPI: the schema vmigrate serves and the code that walks it.

``schema.load()`` gives the resolved schema (``core.json`` including the
seed-derived ``migration.json``); ``input_visitor`` checks command arguments
like QEMU 7.2, ``reply_check`` checks replies and events, ``introspect``
renders ``query-qmp-schema``, ``keyorder`` reproduces QEMU's key orders.
"""
