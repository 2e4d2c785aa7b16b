"""A real FUSE mount that drops like Colab's Drive mount: a passthrough of a backing folder whose
every call answers ENOTCONN ("Transport endpoint is not connected") while a switch file exists.

Run as a process: `python -m tests.fuse_drop BACKING MOUNTPOINT SWITCH`; it mounts in the
foreground until killed. Tests create SWITCH to drop the mount and delete it to bring it back;
SWITCH.refused appears once a call has been refused,
which is what a Drive mount does to every process that uses it (the kernel forwards each call
to this process, which refuses it). Needs /dev/fuse, libfuse2 and fusepy (.ci/run installs them).
"""

from __future__ import annotations

import errno
import os
import sys

from fuse import FUSE, FuseOSError, Operations


class DroppingPassthrough(Operations):
    def __init__(self, backing: str, switch: str) -> None:
        self.backing = os.path.realpath(backing)
        self.switch = switch

    def _path(self, path: str) -> str:
        if os.path.exists(self.switch):
            refused = self.switch + ".refused"  # tells the test a call met the drop
            if not os.path.exists(refused):
                open(refused, "w").close()
            raise FuseOSError(errno.ENOTCONN)
        return os.path.join(self.backing, path.lstrip("/"))

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def mkdir(self, path, mode):
        return os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        return os.rmdir(self._path(path))

    def unlink(self, path):
        return os.unlink(self._path(path))

    def rename(self, old, new):
        return os.rename(self._path(old), self._path(new))

    def chmod(self, path, mode):
        return os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        return os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        return os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, length, offset, fh):
        self._path(path)
        return os.pread(fh, length, offset)

    def write(self, path, buf, offset, fh):
        self._path(path)
        return os.pwrite(fh, buf, offset)

    def truncate(self, path, length, fh=None):
        with open(self._path(path), "r+b") as f:
            f.truncate(length)

    def flush(self, path, fh):
        self._path(path)
        return 0

    def release(self, path, fh):
        return os.close(fh)

    def fsync(self, path, datasync, fh):
        self._path(path)
        return os.fsync(fh)


def main() -> None:
    backing, mountpoint, switch = sys.argv[1:4]
    FUSE(DroppingPassthrough(backing, switch), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
