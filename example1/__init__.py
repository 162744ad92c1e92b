"""The talk's bare-bones producer and consumer, run with ``python -m example1``.

It declares the topology the daemon in ``svc`` also uses (a durable topic exchange ``events``),
binds its own durable queue ``my-queue`` to it with ``#``, publishes a ``new_order`` event every
few seconds and prints every event the queue delivers. It shows the moving parts and nothing
more: no de-duplication, no dead-lettering, no reconnect (see ``svc`` for those).
"""
