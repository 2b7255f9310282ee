"""Where data lives and how it is written: local paths and fsspec URLs (`paths`), atomic publishing
(`publishing`), what a per-case output was made from (`incremental`), and the sizes refused
before anything is allocated (`limits`). The bottom layer: standard library, fsspec and
`medseg.errors` only.
"""
