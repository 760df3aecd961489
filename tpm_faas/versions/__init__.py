"""Model versions that are cheap to keep and exact to reproduce (issue 15).

:mod:`tpm_faas.versions.codec` is the lossless tensor codec the version store uses: a tensor's
raw words, optionally as a delta against its parent's, byte-grouped and zstd-compressed, with
the decoded words' sha256 checked on every decode. The store, the CLI, serving from the store
and replay are still to come (see ``docs/versions.md``).
"""
