"""The FUSE kernel protocol as struct layouts and constants.

Mirrors /usr/include/linux/fuse.h (protocol 7.38), native byte order, only
what swapfs.fuse uses.  Every struct size is asserted against the header.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
ROOT_ID = 1
MIN_READ_BUFFER = 8192

# -- opcodes (enum fuse_opcode) ------------------------------------------------
_before = set(globals())
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51

OPCODE_NAMES: dict[int, str] = {
    v: k for k, v in dict(globals()).items() if k not in _before and k != "_before"
}
del _before

# -- INIT capability flags (fuse_init_in/out.flags, flags2 << 32) --------------
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_OVER_IO_URING = 1 << 41  # protocol 7.42: requests through io_uring (see uring.py)

# -- fuse_setattr_in.valid ------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# -- fuse_open_out.open_flags ---------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

FUSE_RELEASE_FLUSH = 1 << 0
FUSE_GETATTR_FH = 1 << 0
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0


def _s(fmt: str, size: int) -> struct.Struct:
    st = struct.Struct("=" + fmt)
    assert st.size == size, (fmt, st.size, size)
    return st


# -- headers ------------------------------------------------------------------
# len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
in_header = _s("IIQQIIIHH", 40)
# len, error, unique
out_header = _s("IiQ", 16)

# -- structs ------------------------------------------------------------------
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec
#            mode nlink uid gid rdev blksize flags
ATTR_FMT = "QQQqqqIIIIIIIIII"  # times signed, as the kernel reads them
attr = _s(ATTR_FMT, 88)
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec attr
entry_out = _s("QQQQII" + ATTR_FMT, 128)
# fuse_attr_out: attr_valid attr_valid_nsec dummy attr
attr_out = _s("QII" + ATTR_FMT, 104)
forget_in = _s("Q", 8)
forget_one = _s("QQ", 16)
batch_forget_in = _s("II", 8)
getattr_in = _s("IIQ", 16)
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec
# mode unused4 uid gid unused5
setattr_in = _s("IIQQQQQQIIIIIIII", 88)
open_in = _s("II", 8)
open_out = _s("QII", 16)
release_in = _s("QIIQ", 24)
flush_in = _s("QIIQ", 24)
# fh offset size read_flags lock_owner flags padding
read_in = _s("QQIIQII", 40)
write_in = _s("QQIIQII", 40)
write_out = _s("II", 8)
# fuse_kstatfs: blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
kstatfs = _s("QQQQQIIII24x", 80)
statfs_out = kstatfs
fsync_in = _s("QII", 16)
setxattr_in_compat = _s("II", 8)  # FUSE_COMPAT_SETXATTR_IN_SIZE: size, flags
setxattr_in = _s("IIII", 16)  # only with FUSE_SETXATTR_EXT, which is not requested
getxattr_in = _s("II", 8)
getxattr_out = _s("II", 8)
access_in = _s("II", 8)
# major minor max_readahead flags flags2 unused[11]
init_in = _s("IIIII44x", 64)
init_in_compat = _s("IIII", 16)  # before 7.36 (no flags2)
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 unused[7]
init_out = _s("IIIIHHIIHHI28x", 64)
interrupt_in = _s("Q", 8)
# fh offset length mode padding
fallocate_in = _s("QQQII", 32)
# ino off namelen type
dirent = _s("QQII", 24)
DIRENT_NAME_OFFSET = 24


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE: record length, 8-byte aligned."""
    return (DIRENT_NAME_OFFSET + namelen + 7) & ~7
