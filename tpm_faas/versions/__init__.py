"""Model versions that are cheap to keep and exact to reproduce (issue 15).

:mod:`tpm_faas.versions.codec` is the lossless tensor codec the version store uses: a tensor's
raw words, optionally as a delta against its parent's, byte-grouped and zstd-compressed, with
the decoded words' sha256 checked on every decode. :mod:`tpm_faas.versions.store` keeps a
model's lineage of immutable versions in a content-addressed store (manifests of every file
and tensor, unchanged tensors free, changed ones delta-encoded, keyframes), exports a version
bit-identically and verifies it. :mod:`tpm_faas.versions.cache` materialises a version for a
shard group (verified, size-bounded) and resolves ``NAME@latest`` (see ``docs/versions.md``).
"""
