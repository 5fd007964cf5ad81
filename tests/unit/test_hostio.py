"""Host I/O: the recorded kernel served to gdb as the target's only file (no gdb, no KVM)."""
from rrstub.gdbproto import codec as c
from rrstub.gdbproto.hostio import MAX_OPEN, HostFiles, exec_path

KERNEL = bytes(range(256)) * 40
PATH = exec_path("/tmp/x/race.rrr", "race.elf")


def files() -> HostFiles:
    return HostFiles(PATH, KERNEL, max_read=1000)


def test_the_path_names_the_recording_and_the_kernel_and_is_absolute():
    assert PATH == "/rrstub/race.rrr/race.elf"


def test_open_read_stat_close():
    f = files()
    assert f.handle(c.HostSetFs(0)) == c.HostResult(0)
    fd = f.handle(c.HostOpen(PATH, 0, 0)).result
    assert fd >= 3
    whole = b""
    while True:
        r = f.handle(c.HostPread(fd, 4096, len(whole)))
        assert r.result == len(r.attachment) <= 1000
        if not r.result:
            break
        whole += r.attachment
    assert whole == KERNEL
    stat = f.handle(c.HostFstat(fd))
    assert stat.result == 64 and stat.attachment == c.fileio_stat(len(KERNEL))
    assert f.handle(c.HostClose(fd)) == c.HostResult(0)
    assert f.handle(c.HostPread(fd, 10, 0)) == c.HostResult(-1, c.FILEIO_EBADF)


def test_no_other_file_and_nothing_writable():
    f = files()
    assert f.handle(c.HostOpen("/etc/passwd", 0, 0)) == c.HostResult(-1, c.FILEIO_ENOENT)
    assert f.handle(c.HostOpen(PATH, 2, 0)) == c.HostResult(-1, c.FILEIO_EROFS)     # O_RDWR
    assert f.handle(c.HostOther("unlink")) == c.HostResult(-1, c.FILEIO_EROFS)
    assert f.handle(c.HostClose(99)) == c.HostResult(-1, c.FILEIO_EBADF)


def test_descriptors_are_bounded_and_reused():
    f = files()
    fds = [f.handle(c.HostOpen(PATH, 0, 0)).result for _ in range(MAX_OPEN)]
    assert len(set(fds)) == MAX_OPEN
    assert f.handle(c.HostOpen(PATH, 0, 0)) == c.HostResult(-1, c.FILEIO_EMFILE)
    f.handle(c.HostClose(fds[3]))
    assert f.handle(c.HostOpen(PATH, 0, 0)).result == fds[3]


def test_exec_file_chunks():
    f = files()
    assert f.exec_file(0, 1000, 4096) == c.XferChunk(PATH.encode(), more=False)
    assert f.exec_file(0, 5, 4096) == c.XferChunk(PATH[:5].encode(), more=True)
    assert f.exec_file(5, 1000, 4096) == c.XferChunk(PATH[5:].encode(), more=False)
