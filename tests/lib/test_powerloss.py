# SPDX-License-Identifier: LGPL-2.1-or-later
"""Power loss: what survives is what a completed fdatasync covered, plus any
part of what was not yet synced.

test_crash.py kills the process, but the page cache outlives a process, so
that test proves the order of the writes and would still pass with every
fdatasync removed.  Here dc-powerloss runs a workload once with the library's
I/O trace on (dc_trace_fd, lib/util.c): every write once it completed, every
fdatasync when it began and when it ended, and the workload's own marks
(requests starting and returning, flushes asked for and acknowledged).  Then,
for many cut points in that trace, the image file is rebuilt from its
initial copy plus every write that a sync made durable before the cut (one
that completed before a sync of the file began, that sync having ended before
the cut), plus a seeded random subset of the writes that were not durable
yet, some torn at 512-byte sectors, sometimes with the file grown to hold
writes whose data did not make it.  Each rebuild must pass `qemu-img check`
(exit 0 or 3: leaks are fine, corruption never), and read back through
qemu-img, every guest sector that the last acknowledged flush covered and
that no later request touched must hold what the model says; a sector that a
later request touched may hold any version that one of those requests or
the flushed state gives it.

Not modelled: ftruncate() and fallocate() (the workload's paths make none),
reordering inside one sector (a write of up to 512 aligned bytes is atomic),
and a lying disk (a completed fdatasync is trusted).
"""
import bisect
import mmap
import os
import random
import shutil
import struct
import subprocess

import pytest

from imgtest import BUILD, qemu_img, qemu_io, run

DC_POWERLOSS = os.path.join(BUILD, "tests", "dc-powerloss")
REC = struct.Struct("=IiQQQQ")
SECTOR = 512
BASE_ID = 0xBA5E
INIT_ID = 0x1417
# rebuilds per variant: cut points times subsets of the unsynced writes;
# more cuts and other seeds for a longer hunt
CUTS = int(os.environ.get("DC_POWERLOSS_CUTS", "75"))
SUBSETS = 3
MUST_ROUNDS = 6
SEED = int(os.environ.get("DC_POWERLOSS_SEED", "0"))


def sector_data(ident, s):
    return struct.pack("<QQ", ident, s) * 32


def pattern(ident, off, length):
    return b"".join(sector_data(ident, s) for s in range(off // SECTOR, (off + length) // SECTOR))


def make_raw(path, size, ident, holes):
    """A raw disk whose sectors say where they are, with zeroed MiB HOLES."""
    with open(path, "wb") as f:
        for mib in range(size >> 20):
            f.write(bytes(1 << 20) if mib in holes else pattern(ident, mib << 20, 1 << 20))


def read_guest(img, out):
    """The guest's disk, read by qemu (the judge)."""
    if os.path.exists(out):
        os.unlink(out)
    qemu_img("dd", "-f", "qcow2", "-O", "raw", f"if={img}", f"of={out}", "bs=1M")
    with open(out, "rb") as f:
        return f.read()


class Trace:
    """The records of one run, in their one order."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        self.events = []  # (kind, file, offset, length, payload position, result)
        self.marks = {}  # event index -> text
        p = 0
        while p < len(self.mm):
            t, res, dev, ino, off, ln = REC.unpack_from(self.mm, p)
            p += REC.size
            kind = chr(t)
            assert kind in "WBEM", f"bad trace record {t:#x} at byte {p}"
            if kind == "M":
                self.marks[len(self.events)] = self.mm[p:p + ln].decode()
            self.events.append((kind, (dev, ino), off, ln, p, res))
            if kind in "WM":
                p += ln

    def describe(self, i):
        kind, fkey, off, ln, _, res = self.events[i]
        if kind == "M":
            return f"#{i} mark {self.marks[i]}"
        if kind == "W":
            return f"#{i} write {ln} bytes at {off} of {fkey}"
        return f"#{i} sync {off} {'begins' if kind == 'B' else 'ends (%d)' % res} on {fkey}"


class File:
    """The top layer's file: its durable state as the cut advances, in memory
    and in one copy per subset, each rebuilt in place and put back after."""

    def __init__(self, trace, initial, paths, key):
        self.trace = trace
        self.durable = bytearray(open(initial, "rb").read())
        self.fds = []
        for p in paths:
            shutil.copy(initial, p)
            self.fds.append(os.open(p, os.O_RDWR))
        self.writes = []  # event indices
        self.syncs = []  # (end index, begin index) of the syncs that succeeded
        begins = {}
        for i, (kind, fkey, off, _, _, res) in enumerate(trace.events):
            if kind == "M":
                continue
            assert fkey == key, f"{trace.describe(i)}: a file other than the top layer was written or synced"
            if kind == "W":
                self.writes.append(i)
            elif kind == "B":
                begins[off] = i
            elif res == 0:
                self.syncs.append((i, begins[off]))
        self.applied = 0  # writes[:applied] are in durable
        self.nsync = 0
        self.prefix = 0  # the writes before this event index are durable
        self.changed = [[] for _ in paths]

    def advance(self, cut):
        while self.nsync < len(self.syncs) and self.syncs[self.nsync][0] < cut:
            self.prefix = max(self.prefix, self.syncs[self.nsync][1])
            self.nsync += 1
        while self.applied < len(self.writes) and self.writes[self.applied] < self.prefix:
            _, _, off, ln, pos, _ = self.trace.events[self.writes[self.applied]]
            data = self.trace.mm[pos:pos + ln]
            if off + ln > len(self.durable):
                self.durable.extend(bytes(off + ln - len(self.durable)))
            self.durable[off:off + ln] = data
            for fd in self.fds:
                os.pwrite(fd, data, off)
            self.applied += 1

    def unsynced(self, cut):
        return [i for i in self.writes[self.applied:] if i < cut]

    def rebuild(self, k, cut, r, keep, torn):
        """Copy K: the durable state plus what R picks of the unsynced writes.
        Returns what it took, for a failure message."""
        fd = self.fds[k]
        took = []
        grow = 0
        for i in self.unsynced(cut):
            _, _, off, ln, pos, _ = self.trace.events[i]
            grow = max(grow, off + ln)
            if r.random() >= keep:
                continue
            if torn and ln > SECTOR:
                edges = sorted({off, off + ln} | set(range((off // SECTOR + 1) * SECTOR, off + ln, SECTOR)))
                pieces = [(a, b) for a, b in zip(edges, edges[1:]) if r.random() < 0.5]
            else:
                pieces = [(off, off + ln)]
            for a, b in pieces:
                os.pwrite(fd, self.trace.mm[pos + a - off:pos + b - off], a)
                self.changed[k].append((a, b))
                took.append(f"{self.trace.describe(i)}: [{a}, {b})")
        # the file's new size made it, its data did not
        if keep and grow > os.fstat(fd).st_size and r.random() < 0.25:
            os.ftruncate(fd, grow)
            took.append(f"the size {grow}")
        return took

    def restore(self, k):
        for a, b in self.changed[k]:
            if a < len(self.durable):
                os.pwrite(self.fds[k], self.durable[a:min(b, len(self.durable))], a)
        os.ftruncate(self.fds[k], len(self.durable))
        self.changed[k] = []


class Op:
    def __init__(self, ident, kind, off, length, start):
        self.ident, self.kind, self.off, self.length = ident, kind, off, length
        self.start, self.done = start, None

    def touches(self, s):
        return self.kind != "r" and self.off <= s * SECTOR < self.off + self.length

    def sector(self, s):
        return sector_data(self.ident, s) if self.kind == "w" else bytes(SECTOR)

    def __repr__(self):
        return f"request {self.ident} {self.kind} {self.off}+{self.length} (marks #{self.start}..#{self.done})"


class Guest:
    """The workload's requests and flushes, from its marks, and what a cut must keep."""

    def __init__(self, trace, initial):
        self.ops, self.flushes = {}, {}
        self.begin = self.end = None
        for i, text in trace.marks.items():
            w = text.split()
            if w[0] == "S":
                self.ops[int(w[1])] = Op(int(w[1]), w[2], int(w[3]), int(w[4]), i)
            elif w[0] == "C":
                self.ops[int(w[1])].done = i
            elif w[0] == "F":
                self.flushes[int(w[1])] = [i, None]
            elif w[0] == "A":
                self.flushes[int(w[1])][1] = i
            elif w[0] == "BEGIN":
                self.begin = i
            elif w[0] == "END":
                self.end = i
        assert self.begin is not None and self.end is not None, "the workload did not finish"
        self.size = len(initial)
        top = max([self.size] + [o.length for o in self.ops.values() if o.kind == "r"])
        self.expected = bytearray(initial) + bytearray(top - self.size)
        self.by_start = sorted(self.ops.values(), key=lambda o: o.start)
        self.by_done = sorted((o for o in self.ops.values() if o.done is not None), key=lambda o: o.done)
        self.acks = sorted((a, f) for f, a in self.flushes.values() if a is not None)
        self.nack = self.napplied = 0
        self.covered = -1  # requests done before this index are durable

    def advance(self, cut):
        while self.nack < len(self.acks) and self.acks[self.nack][0] < cut:
            self.covered = max(self.covered, self.acks[self.nack][1])
            self.nack += 1
        while self.napplied < len(self.by_done) and self.by_done[self.napplied].done < self.covered:
            o = self.by_done[self.napplied]
            if o.kind == "r":
                self.size = o.length
            elif o.kind == "w":
                self.expected[o.off:o.off + o.length] = pattern(o.ident, o.off, o.length)
            else:
                self.expected[o.off:o.off + o.length] = bytes(o.length)
            self.napplied += 1

    def pending(self, cut):
        return [o for o in self.by_start if o.start < cut and not (o.done is not None and o.done < self.covered)]

    def verify(self, got, base, size, cut):
        """None, or what is wrong with the guest disk at GOT[BASE:BASE+SIZE] at CUT."""
        pending = self.pending(cut)
        sizes = {self.size} | {o.length for o in pending if o.kind == "r"}
        if size not in sizes:
            return f"virtual size {size}, expected one of {sorted(sizes)}"
        step = 64 << 10
        for c in range(0, size, step):
            if got[base + c:base + min(c + step, size)] == self.expected[c:min(c + step, size)]:
                continue
            near = [o for o in pending if o.kind != "r" and o.off < c + step and c < o.off + o.length]
            for s in range(c // SECTOR, min(c + step, size) // SECTOR):
                g = got[base + s * SECTOR:base + (s + 1) * SECTOR]
                if g == self.expected[s * SECTOR:(s + 1) * SECTOR]:
                    continue
                cands = [o for o in near if o.touches(s)]
                if any(g == o.sector(s) for o in cands):
                    continue
                return (f"guest sector {s} holds {struct.unpack_from('<QQ', g)} (request, sector), "
                        f"the flushed state {struct.unpack_from('<QQ', self.expected, s * SECTOR)}, "
                        f"and no request in flight since gives it: {cands}")
        return None


def pick_cuts(trace, guest, name):
    """About CUTS points to lose power at (before that event), a seeded
    choice, each with how many rounds of SUBSETS rebuilds it gets.  Most lie
    inside syncs, where every write since the last one is still unsynced;
    then come points right after acknowledgements, right after syncs, and
    evenly spread.  A header write (the switch to a new refcount table or L1
    table: rare, and where a missing sync does the most harm) always has the
    sync after it cut, with MUST_ROUNDS rounds."""
    n = len(trace.events)
    rng = random.Random(f"{name}/{SEED}")
    ends = [i for i, e in enumerate(trace.events) if e[0] == "E"]
    must = set()
    for i, e in enumerate(trace.events):
        if e[0] == "W" and e[2] < SECTOR:
            must.update(j for j in ends[bisect.bisect(ends, i):][:1])
    acks = sorted({a + 1 for a, _ in guest.acks} - must)
    inside = sorted(set(ends) - must)
    rest = sorted(({j + 1 for j in ends} | set(range(0, n + 1, max(1, n // CUTS)))) - must - set(acks) - set(inside))
    picked = rng.sample(acks, min(len(acks), CUTS // 4))
    picked += rng.sample(inside, min(len(inside), CUTS // 2))
    picked += rng.sample(rest, max(0, min(len(rest), CUTS - len(picked))))
    return sorted([(c, 1) for c in picked] + [(c, MUST_ROUNDS) for c in must])


def run_variant(tmp, top, args, name):
    """Run the workload on TOP with ARGS, then lose power at many points."""
    initial = tmp / "initial.qcow2"
    shutil.copy(top, initial)
    guest0 = read_guest(top, tmp / "guest0.raw")
    trace_path = tmp / "trace"
    p = run(DC_POWERLOSS, trace_path, top, *args, check=False)
    assert p.returncode == 0, f"dc-powerloss {args} failed:\n{p.stdout}{p.stderr}"

    trace = Trace(trace_path)
    # the run as it ended: clean, and what the model replayed here says
    chk = qemu_img("check", "--output=json", top, check=False)
    assert chk.returncode == 0, f"the finished image is not clean:\n{chk.stdout}{chk.stderr}"
    guest = Guest(trace, guest0)
    guest.advance(len(trace.events) + 1)
    final = read_guest(top, tmp / "final.raw")
    assert final == bytes(guest.expected[:len(final)]), "the model replayed here differs from the image"

    st = os.stat(top)
    paths = [tmp / f"rebuilt{k}.qcow2" for k in range(SUBSETS)]
    f = File(trace, initial, paths, (st.st_dev, st.st_ino))
    guest = Guest(trace, guest0)

    n = len(trace.events)
    out = tmp / "guests.raw"

    def judge(cut, subset, took):
        """Check the rebuilt copies side by side, and read all their disks
        with one qemu-img, one after the other."""
        def failed(k, problem):
            kept = tmp / f"failed-{cut}-{subset + k}.qcow2"
            shutil.copy(paths[k], kept)
            recent = "\n".join(trace.describe(i) for i in range(max(0, cut - 15), cut))
            pytest.fail(f"{name}: power lost before trace event {cut} of {n}, subset {subset + k} "
                        f"(image kept as {kept}):\n{problem}\nunsynced writes that made it:\n" +
                        "\n".join(took[k][:40]) + f"\nthe last events:\n{recent}")

        if out.exists():
            out.unlink()
        procs = [subprocess.Popen(["qemu-img", "check", "--output=json", p], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for p in paths]
        procs.append(subprocess.Popen(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", *paths, out],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [c.communicate()[0] for c in procs]
        for k, c in enumerate(procs[:-1]):
            if c.returncode not in (0, 3):
                failed(k, f"qemu-img check exit {c.returncode}:\n{outputs[k]}")
        assert procs[-1].returncode == 0, f"qemu-img convert failed:\n{outputs[-1]}"
        with open(out, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as got:
            pos = 0
            for k in range(SUBSETS):
                size = struct.unpack(">Q", os.pread(f.fds[k], 8, 24))[0]
                problem = guest.verify(got, pos, size, cut)
                if problem:
                    failed(k, problem)
                pos += size
            assert pos == len(got)

    rebuilds = 0
    for cut, rounds in pick_cuts(trace, guest, name):
        f.advance(cut)
        guest.advance(cut)
        for subset in range(0, rounds * SUBSETS, SUBSETS):
            took = []
            for k in range(SUBSETS):
                # subset 0: nothing unsynced made it; the others: a seeded pick, torn or not
                r = random.Random(f"{name}/{SEED}/{cut}/{subset + k}")
                keep = 0.0 if subset + k == 0 else r.choice([0.3, 0.6, 0.9])
                took.append(f.rebuild(k, cut, r, keep, k % 2 == 0))
            rebuilds += SUBSETS
            judge(cut, subset, took)
            for k in range(SUBSETS):
                f.restore(k)
    return trace, guest, rebuilds


def test_eight_writers_over_a_backing_file(tmp):
    """The service's path (dc_disk) with eight writers: copy-on-write from a
    backing file, from two sides of one cluster at once, allocating writes
    sent without the image lock through the O_DIRECT descriptor, their L2
    entries deferred to the flushes that the writers send among them."""
    raw = tmp / "base.raw"
    make_raw(raw, 8 << 20, BASE_ID, holes={3, 6})
    base = tmp / "base.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, base)
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x5a 1M 192k", "write -z 5M 128k", "write -P 0x6b 7M 64k")
    trace, guest, rebuilds = run_variant(tmp, top, ["threads=8", "ops=40", f"seed={7 + SEED}", "api=disk",
                                                         "direct=on"], "backing")
    ops = guest.by_start
    assert any(a.start < b.start < a.done for a, b in zip(ops, ops[1:]) if a.done), "no two requests overlapped"
    assert len(guest.acks) > 10 and rebuilds >= 2 * CUTS


def test_eight_writers_small_clusters(tmp):
    """dc_image_* from eight threads on 2 KiB clusters: L2 tables allocated
    while other writers' data is in flight, rewrites, zeroes and discards."""
    raw = tmp / "init.raw"
    make_raw(raw, 8 << 20, INIT_ID, holes={0, 4, 6, 7})
    top = tmp / "top.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=2048", raw, top)
    with open(top, "rb") as fh:
        l1_size, l1_off = struct.unpack(">IQ", fh.read(48)[36:48])
    trace, guest, rebuilds = run_variant(tmp, top, ["threads=8", "ops=50", f"seed={11 + SEED}", "api=image",
                                                         "max-len=65536"], "small")
    l1_writes = [e for e in trace.events if e[0] == "W" and l1_off <= e[2] < l1_off + 8 * l1_size]
    assert len(l1_writes) > 3, "too few L2 tables were allocated"
    assert len(guest.acks) > 10 and rebuilds >= 2 * CUTS


def test_one_writer_growing_tables(tmp):
    """The tools' path: one writer, 512-byte clusters and 64-bit refcounts,
    so that L2 tables, refcount blocks and the refcount table itself are
    allocated again and again, and the disk is grown halfway (a new L1)."""
    raw = tmp / "init.raw"
    make_raw(raw, 4 << 20, INIT_ID, holes={1, 3})
    top = tmp / "top.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64", raw, top)
    args = ["threads=1", "ops=250", f"seed={3 + SEED}", "api=image", f"resize={8 << 20}", f"max-len={128 << 10}",
            f"hot={8 << 20}", "flush=6"]
    trace, guest, rebuilds = run_variant(tmp, top, args, "growth")
    header = [(e[2], e[3]) for e in trace.events if e[0] == "W" and e[2] < 512]
    assert (48, 12) in header, "the refcount table never moved"
    assert (24, 24) in header, "the L1 table never grew"
    assert rebuilds >= 2 * CUTS
