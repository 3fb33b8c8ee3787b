"""Statements both backends agree on, written once.

:mod:`~vault.store.sql.dialect` renders a shared statement for each backend
(placeholders, casts, lock clauses, time encoding); :class:`~vault.store.sql.executor.SqlExecutor`
is the one small interface both execution models (an asyncpg transaction, a
closure on the SQLite writer thread) offer; the domain parts here (lease, outbox,
...) are written against the two and mixed into both stores. A backend module
keeps only what really differs.
"""
