"""Benchmark suite of vyra_base_ipc: IPC against its floor and its alternatives.

Run from the repository root::

    .venv/bin/python -m bench            # full run, a few minutes
    .venv/bin/python -m bench --quick    # one to two minutes

Every server and every measured client runs in a process of its own; the
parent only starts them, collects their JSON results, and writes the table
(``results.md``), ``results.json`` and ``latency.png`` (see :mod:`bench.run`).

Kept free of imports: child processes start with ``python -m bench.<module>``
and must not pay for anything they do not use.
"""
