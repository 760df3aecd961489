"""The gateway every mode request passes: :mod:`.pipeline` (parse → auth → policy → admit →
rate → hold → shard → post), :mod:`.auth` (token introspection), :mod:`.ratelimit`,
:mod:`.ledger` (two-phase SU ledger) and :mod:`.results` (large results by reference).

Importing this package loads nothing heavy; each module imports what it uses.
"""
