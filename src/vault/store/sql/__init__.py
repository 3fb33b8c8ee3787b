"""Statements both backends agree on, written once, and the transactions built of them.

:mod:`~vault.store.sql.dialect` renders a shared statement for each backend
(placeholders, casts, lock clauses, time encoding); :mod:`~vault.store.sql.executor`
holds the small interfaces both execution models offer: single statements
(``SqlExecutor``) and a transaction body's ``Tx`` (an asyncpg transaction; the
SQLite writer thread's connection, where the body runs in one hand-off). The
domain parts here are written against them and mixed into both stores
(:class:`~vault.store.sql.store.SqlVaultStore`). A backend module keeps only what
really differs.
"""
