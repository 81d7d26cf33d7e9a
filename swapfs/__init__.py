"""swapfs: a userspace swap store.

Virtual swap devices are presented as files over FUSE; pages are kept
compressed in memory and, below that, in backing files.  See docs/ and
README.md.
"""

__version__ = "0.1.0"
