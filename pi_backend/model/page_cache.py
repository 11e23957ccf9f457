"""Make a mapped model file resident in huge pages (Linux; elsewhere every step is a no-op).

Why: decode streams every weight once per token, and with 4 KiB pages each 4 KiB of a matrix costs a
TLB miss (a two-level walk inside a VM). Measured on this project's 2-core VM, after a cache flush:
the same Q4_0 GEMVs ran 20-30% slower from a mapping of 4 KiB page-cache pages than from huge-page
memory, and as fast once the page cache held the file in 2 MiB folios mapped whole (FilePmdMapped).

The kernel gives a file mapping 2 MiB folios only when the faults that read it come from a
MADV_HUGEPAGE range (filesystems with large folios: ext4 since Linux 6.16, xfs, ...). Readahead from
MADV_WILLNEED, and pages cached by earlier writes or reads, stay small. So:
  1. advise the mapping MADV_HUGEPAGE;
  2. fault the file in with MADV_POPULATE_READ (synchronous: decode never waits on the disk);
  3. if the cache already held most of it in small pages, and this kernel demonstrably maps file
     huge pages (some are), drop the file's unmapped cached pages and fault them in again.
Step 3 reads the file from disk once more; it happens once per cache generation of the file.
A file larger than half the available memory is only advised (MADV_WILLNEED, as before): reading it
all in would evict what the model needs most.
"""
from __future__ import annotations

import mmap
import os

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python names it from 3.13
HUGE = 2 << 20
RESIDENT_HUGE_GOAL = 0.75  # below this share of the mappable 2 MiB pages, re-read the file (step 3)


def _advise(raw: mmap.mmap, option: int | None) -> bool:
    if option is None:
        return False
    try:
        raw.madvise(option)
        return True
    except (OSError, ValueError):
        return False


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def huge_mapped_bytes(address: int) -> int | None:
    """FilePmdMapped of the mapping that starts at `address` (/proc/self/smaps), or None if unknown."""
    start = f"{address:x}-"
    try:
        with open("/proc/self/smaps") as f:
            found = False
            for line in f:
                if not found:
                    found = line.startswith(start)
                elif line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) * 1024
                elif "-" in line.split(maxsplit=1)[0]:  # the next mapping's header: no such field
                    return None
    except (OSError, ValueError, IndexError):
        pass
    return None


def drop_file_cache(fd: int) -> None:
    """Drop the file's clean cached pages that no mapping holds (advice: a failure changes nothing)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def make_resident(raw: mmap.mmap, address: int, size: int, path: str) -> str:
    """Steps 1-3 above for the mapping `raw` of the file at `path` (mapped at `address`, `size`
    bytes). Returns what was done: 'huge' (resident, huge pages), 'resident' (resident, small pages),
    're-read' (step 3 ran) or 'advised' (only MADV_WILLNEED)."""
    _advise(raw, getattr(mmap, "MADV_HUGEPAGE", None))
    avail = available_bytes()
    if (avail is not None and size > avail // 2) or not _advise(raw, MADV_POPULATE_READ):
        _advise(raw, getattr(mmap, "MADV_WILLNEED", None))
        return "advised"
    mappable = (address + size) // HUGE * HUGE - (address + HUGE - 1) // HUGE * HUGE
    if mappable < 4 * HUGE:
        return "resident"
    huge = huge_mapped_bytes(address)
    if huge is None or huge >= RESIDENT_HUGE_GOAL * mappable:
        return "huge" if huge else "resident"
    if huge == 0 or not hasattr(os, "posix_fadvise"):
        return "resident"  # no file huge pages here at all (filesystem, kernel or THP setting)
    # first this mapping's pages go (MADV_DONTNEED unmaps them; the file is unchanged), then the
    # cache's unmapped pages (other processes' mapped pages stay)
    _advise(raw, getattr(mmap, "MADV_DONTNEED", None))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        drop_file_cache(fd)
        os.close(fd)
    _advise(raw, MADV_POPULATE_READ)
    return "re-read"
