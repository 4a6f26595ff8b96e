#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""diskchain benchmark, run by hand (never part of the test suite).

Builds a chain like real VM disks: a base about half allocated with a mix of
random, compressible and zero data in scattered extents, and two overlays each
rewriting about a tenth.  Then runs, in one run, each diskchain job through
the bus against the qemu-img command a user would otherwise run, on fresh
copies, and prints the ratio qemu-img time / diskchain time (>= 1.0 means we
are at least as fast) and the daemon's peak memory.  qemu-img's default
cache mode is 'unsafe' (its output may still be only in the page cache when
it exits), while a diskchain job ends with its data on disk; so a second
ratio adds an fsync of qemu-img's output file to its time.  Our jobs write
their data around the page cache (O_DIRECT); one more row compares the full
backup with qemu-img doing the same (-t none), which no goal names but which
says where the speed comes from.

    sudo bench/run-bench.py [--size 4G] [--build build] [--repeat 3] [--settle 15] [--only NAME]

Each side runs --repeat times, alternating, and the median counts: the
disk of a small VM is noisy.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))


def sh(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw)


def build_chain(d, size, seed=7):
    rng = random.Random(seed)
    ext = 4 << 20
    n = size // ext
    base = os.path.join(d, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, size)
    rnd = os.path.join(d, "rnd.bin")
    with open(rnd, "wb") as f:
        f.write(os.urandom(ext))
    cmds = []
    for i in rng.sample(range(n), n // 2):               # about half allocated
        kind = rng.choice(["random", "compressible", "zero"])
        off = i * ext
        if kind == "compressible":
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {ext}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {ext}")
        else:
            cmds.append(("rnd", off))
    # random extents: write the random file at those offsets with qemu-io's file-less way: convert pieces
    plain = [c for c in cmds if isinstance(c, str)]
    for i in range(0, len(plain), 200):
        args = ["qemu-io", "-f", "qcow2"]
        for c in plain[i:i + 200]:
            args += ["-c", c]
        sh(*args, base)
    raws = [c[1] for c in cmds if not isinstance(c, str)]
    if raws:
        # qemu-io cannot write a file's bytes; use qemu-img dd-free path: nbd-less raw splice via dc-tool
        tool = os.path.join(BUILD, "tests", "dc-tool")
        args = [tool, "io", base]
        for off in raws:
            args += ["writefile", rnd, str(off)]
        sh(*args)
    prev = "base.qcow2"
    for name in ("mid.qcow2", "top.qcow2"):
        p = os.path.join(d, name)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", p)
        cmds = [f"write -P {rng.randrange(1, 255)} {i * ext} {ext}" for i in rng.sample(range(n), n // 10)]
        for i in range(0, len(cmds), 200):
            args = ["qemu-io", "-f", "qcow2"]
            for c in cmds[i:i + 200]:
                args += ["-c", c]
            sh(*args, p)
        prev = name
    os.unlink(rnd)


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main():
    global BUILD
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="4G")
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build"))
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the median counts")
    ap.add_argument("--settle", type=float, default=15, help="seconds of quiet disk before each timed run")
    ap.add_argument("--only", action="append", help="run only this operation (repeatable)")
    a = ap.parse_args()
    BUILD = os.path.abspath(a.build)
    os.environ["DISKCHAIN_BUILD"] = BUILD
    import bustest
    bustest.DAEMON = os.path.join(BUILD, "daemon", "diskchaind")
    size = int(a.size[:-1]) << {"G": 30, "M": 20}[a.size[-1]]

    bus = bustest.Bus(idle_timeout=600)
    work = tempfile.mkdtemp(prefix="diskchain-bench-", dir="/var/tmp")
    pristine = os.path.join(work, "pristine")
    os.mkdir(pristine)
    try:
        print(f"building a {a.size} chain ...", flush=True)
        build_chain(pristine, size)
        M = "/org/diskchain/DiskChain1"

        def settle():
            # deleting and copying gigabytes leaves the disk busy (discards,
            # writeback) for a while: start each timed run on a quiet disk
            subprocess.run(["sync"])
            time.sleep(a.settle)

        def fresh(where):
            for n in ("base", "mid", "top"):
                shutil.copy(os.path.join(pristine, f"{n}.qcow2"), os.path.join(where, f"{n}.qcow2"))
            subprocess.run(["sync"])

        def dc_chain():
            time.sleep(0.5)  # let the daemon see the fresh files
            return json.loads(bus.call(M, "Manager", "GetChain", "s", "top.qcow2").stdout)["data"][0]

        def dc_job(args):
            # diskchainctl waits on the job's signals (a mirror: until ready, then
            # completes it): no polling competes with the job for the two cores
            bus.ctl(*args)

        def daemon_peak_kib():
            st = open(f"/proc/{bus.daemon_pid()}/status").read()
            return int([l for l in st.splitlines() if l.startswith("VmHWM")][0].split()[1])

        qdir = os.path.join(work, "q")
        os.mkdir(qdir)
        rows = []
        peak = 0
        def fsync(path):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        cases = [
            ("commit", lambda: sh("qemu-img", "commit", "-q", "-b", os.path.join(qdir, "base.qcow2"),
                                  os.path.join(qdir, "mid.qcow2")),
             ("commit", "top.qcow2", "--top", "mid.qcow2", "--base", "base.qcow2"), "base.qcow2"),
            ("stream/flatten", lambda: sh("qemu-img", "rebase", "-q", "-b", "", os.path.join(qdir, "top.qcow2")),
             ("stream", "top.qcow2"), "top.qcow2"),
            ("backup full", lambda: sh("qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2",
                                       os.path.join(qdir, "top.qcow2"), os.path.join(qdir, "copy.qcow2")),
             ("backup", "top.qcow2", "copy.qcow2"), "copy.qcow2"),
            ("mirror full", lambda: sh("qemu-img", "convert", "-m", "8", "-W", "-O", "qcow2",
                                       os.path.join(qdir, "top.qcow2"), os.path.join(qdir, "copy.qcow2")),
             ("mirror", "top.qcow2", "copy.qcow2", "--complete"), "copy.qcow2"),
            # not the default a user runs, but the fair comparison: qemu-img
            # with its output around the page cache too, as ours is
            ("backup full vs -t none", lambda: sh("qemu-img", "convert", "-t", "none", "-m", "8", "-W", "-O",
                                                  "qcow2", os.path.join(qdir, "top.qcow2"),
                                                  os.path.join(qdir, "copy.qcow2")),
             ("backup", "top.qcow2", "copy.qcow2"), "copy.qcow2"),
            ("backup compressed", lambda: sh("qemu-img", "convert", "-c", "-O", "qcow2",
                                             os.path.join(qdir, "top.qcow2"), os.path.join(qdir, "copy.qcow2")),
             ("backup", "top.qcow2", "copy.qcow2", "--compress"), "copy.qcow2"),
        ]
        for name, qemu, dc, out in cases:
            if a.only and name not in a.only:
                continue
            # this machine's disk is noisy: alternate the two sides and keep medians
            tqs_, tqss_, tds_ = [], [], []
            for _ in range(a.repeat):
                fresh(qdir)
                settle()
                tq = timed(qemu)
                # qemu-img's default cache mode is 'unsafe': nothing reaches the
                # disk.  Our jobs end durable; this is the cost of making it so.
                tqs = tq + timed(lambda: fsync(os.path.join(qdir, out)))
                for f in os.listdir(bus.root):
                    os.unlink(os.path.join(bus.root, f))
                fresh(bus.root)
                dc_chain()
                settle()
                td = timed(lambda: dc_job(dc))
                peak = max(peak, daemon_peak_kib())
                tqs_.append(tq)
                tqss_.append(tqs)
                tds_.append(td)
                for f in ("copy.qcow2",):
                    for d in (qdir, bus.root):
                        if os.path.exists(os.path.join(d, f)):
                            os.unlink(os.path.join(d, f))
            tq, tqs, td = (sorted(x)[len(x) // 2] for x in (tqs_, tqss_, tds_))
            rows.append((name, tq, tqs, td))
            print(f"{name:20s} qemu-img {tq:7.2f}s (+fsync {tqs:7.2f}s)  diskchain {td:7.2f}s  "
                  f"ratio {tq / td:5.2f} ({tqs / td:5.2f} durable)   runs: qemu-img+fsync "
                  f"{' '.join(f'{x:.2f}' for x in tqss_)}, diskchain {' '.join(f'{x:.2f}' for x in tds_)}",
                  flush=True)
        print("\n| operation | qemu-img (s) | qemu-img + fsync (s) | diskchain (s) | ratio | ratio, durable |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, tq, tqs, td in rows:
            print(f"| {name} | {tq:.2f} | {tqs:.2f} | {td:.2f} | {tq / td:.2f} | {tqs / td:.2f} |")
        print(f"\ndaemon peak memory (VmHWM): {peak / 1024:.1f} MiB")
    finally:
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
