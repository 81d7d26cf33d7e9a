"""Tests of swapfs.fuse, the FUSE protocol layer (real mounts)."""
