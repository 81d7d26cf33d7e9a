"""The FUSE operations of swapfs (swapfs/fs.py) against a fake store, without a mount."""
