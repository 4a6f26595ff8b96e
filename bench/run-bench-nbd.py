#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""diskchain's NBD export against qemu-nbd and qemu-storage-daemon, run by hand as root.

The chain is the realistic one of ../shared/bench/make-chain.sh (see
bench/run-bench.py): base <- overlay1 <- overlay2, 4 GiB virtual, unique
random data.  Each side serves overlay2.qcow2 with its backing chain on a
unix socket, and the same clients run against each side in one run:

  read        nbdcopy URI null:  reads the whole export (read-only exports)
  write       nbdcopy --flush RANDOM URI  writes a whole 4 GiB image of unique
              random data (generated once with openssl into --random, never
              zeros or repeated blocks) into the top layer of a fresh copy
  randwrite   fio, nbd engine, 4 KiB random writes at queue depth 16 into the
              top layer of a fresh copy, every buffer refilled with new random
              data, a fixed number of writes, then a FLUSH (end_fsync)
  randread    fio, nbd engine, 4 KiB random reads at queue depth 16, a fixed
              number of reads (read-only exports)

nbdcopy runs with its defaults: four connections when the server advertises
multi-conn (every side here does: qemu-nbd is started with --shared=8), 64
requests of 256 KiB in flight on each.  A write row ends when the client got
the reply to its FLUSH: every side then has the data and metadata on disk.

The sides (each server in its two cache settings; the table shows the
faster of the two per server and which it was):

  diskchain           the daemon on a private bus (tests/integration/bustest.py),
                      the export made through the bus (diskchainctl export)
  diskchain none      the same export with --cache none (O_DIRECT data I/O)
  qemu-nbd            default cache (writeback), aio=threads, --shared=8, --persistent
  qemu-nbd none       --cache=none --aio=native
  qsd                 qemu-storage-daemon, the chain spelt out node by node,
                      --nbd-server on a unix socket, --export type=nbd, default cache
  qsd direct          the same with cache.direct=on and aio=native on every node

Before every timed run the server is up (the export made, the chain open),
then everything is synced and the page cache dropped, so every byte read
comes from the disk.  The sides alternate and each cell is the median of
--repeat runs.  Each side's first result is checked: the read export with
`qemu-img compare` of the export's URI against the pristine chain, the write
row's image against the random source, the randwrite row's image against
the first side's (fio's data and offsets are deterministic; diskchain's
images also with `qemu-img check`).  Peak memory: the daemon's VmHWM, reset
before each run (clear_refs 5), and the anchor process's VmHWM (a fresh
process each run).  Each run also prints the client's CPU time and page faults and the
server's (CPU seconds and minor page faults over the run).

    bench/run-bench-nbd.py [--repeat 3] [--only ROW] [--sides ...] [--build build]
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
_spec = importlib.util.spec_from_file_location("run_bench", os.path.join(HERE, "run-bench.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

M = "/org/diskchain/DiskChain1"
CHAIN = rb.CHAIN
MiB = rb.MiB
GiB = 1 << 30
NAME = "bench"

ROWS = {
    "read": dict(writable=False, label="nbdcopy export to null: (read 4 GiB)"),
    "write": dict(writable=True, label="nbdcopy 4 GiB random image into the export, flush"),
    "randwrite": dict(writable=True, label="fio 4 KiB randwrite QD16, then flush"),
    "randread": dict(writable=False, label="fio 4 KiB randread QD16"),
}


def proc_cost(pid):
    """CPU seconds (user + system) and minor page faults of PID so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tick, int(f[7])


def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


class Anchor:
    """qemu-nbd or qemu-storage-daemon serving overlay2.qcow2 in D."""

    def __init__(self, side, d, writable):
        self.sock = os.path.join(d, "nbd.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        top = os.path.join(d, "overlay2.qcow2")
        direct = side.endswith(" none") or side.endswith(" direct")
        if side.startswith("qemu-nbd"):
            args = ["qemu-nbd", "-f", "qcow2", "--socket", self.sock, "-x", NAME, "--shared=8", "--persistent"]
            if direct:
                args += ["--cache=none", "--aio=native"]
            if not writable:
                args.append("--read-only")
            args.append(top)
        else:
            args = ["qemu-storage-daemon"]
            backing = None
            for node, n in (("base", "base.qcow2"), ("ov1", "overlay1.qcow2"), ("top", "overlay2.qcow2")):
                f = {"driver": "file", "filename": os.path.join(d, n), "cache": {"direct": direct}}
                if direct:
                    f["aio"] = "native"
                b = {"driver": "qcow2", "node-name": node, "cache": {"direct": direct}, "file": f,
                     "backing": backing, "read-only": not (writable and node == "top")}
                args += ["--blockdev", json.dumps(b)]
                backing = node
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                     "--export", f"type=nbd,id=e,node-name=top,name={NAME},writable={'on' if writable else 'off'}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(1000):
            if os.path.exists(self.sock):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{side}: " + self.proc.stderr.read().decode())
            time.sleep(0.01)
        self.uri = f"nbd+unix:///{NAME}?socket={self.sock}"

    def pid(self):
        return self.proc.pid

    def peak(self):
        return vm_hwm(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


class Diskchain:
    """The daemon's export of overlay2.qcow2, made through the bus."""

    def __init__(self, side, bus, writable):
        self.bus = bus
        args = ["export", "overlay2.qcow2", "--name", NAME] + (["--writable"] if writable else [])
        if side.endswith(" none"):
            args += ["--cache", "none"]
        self.uri = bus.ctl(*args).stdout.strip().split()[-1]
        self._pid = bus.daemon_pid()
        with open(f"/proc/{self._pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM

    def pid(self):
        return self._pid

    def peak(self):
        return vm_hwm(self._pid)

    def stop(self):
        self.bus.ctl("unexport", NAME)


CLIENT_ENV = {}


def client(*args):
    return rb.sh(*args, env={**os.environ, **CLIENT_ENV})


def children_cost():
    """CPU seconds and page faults of the clients that ended so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt + ru.ru_majflt


def nbdcopy(*args):
    client("nbdcopy", *args)


def fio(uri, rw, ios):
    out = client("fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
                "--iodepth=16", f"--number_ios={ios}", f"--io_size={ios * 4096}", "--refill_buffers",
                "--randrepeat=1", *(["--end_fsync=1"] if rw == "randwrite" else []),
                "--output-format=json").stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]  # after the engine's "connected" line
    done = job["write" if rw == "randwrite" else "read"]["total_ios"]
    if done != ios:
        raise RuntimeError(f"fio {rw}: {done} requests done, {ios} asked")


def main():
    ap = argparse.ArgumentParser()
    rb.chain_args(ap)
    ap.add_argument("--random", default="/var/tmp/diskchain-bench-nbd-random.raw",
                    help="the 4 GiB image of unique random data the write row copies (made when missing)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the median counts")
    ap.add_argument("--only", action="append", choices=sorted(ROWS), help="run only this row (repeatable)")
    ap.add_argument("--sides", default="diskchain,diskchain none,qemu-nbd,qemu-nbd none,qsd,qsd direct",
                    help="comma-separated sides to run")
    ap.add_argument("--randwrite-ios", type=int, default=32768, help="4 KiB writes of the randwrite row")
    ap.add_argument("--randread-ios", type=int, default=65536, help="4 KiB reads of the randread row")
    ap.add_argument("--client-env", action="append", default=[], metavar="VAR=VALUE",
                    help="environment of the clients (nbdcopy, fio), to study them; repeatable")
    a = ap.parse_args()
    CLIENT_ENV.update(v.split("=", 1) for v in a.client_env)
    bustest = rb.prepare(a)
    pristine = a.chain_dir
    virtual = json.load(open(os.path.join(pristine, "alloc.json")))["virtual"]
    if not os.path.exists(a.random) or os.path.getsize(a.random) != virtual:
        print(f"writing {virtual >> 20} MiB of random data to {a.random} ...", flush=True)
        tmp = a.random + ".tmp"
        with open(tmp, "wb") as out:
            ssl = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-nosalt", "-pbkdf2", "-pass",
                                    "pass:nbd-bench-write"], stdin=open("/dev/zero", "rb"), stdout=subprocess.PIPE)
            left = virtual
            while left:
                b = ssl.stdout.read(min(left, 16 * MiB))
                out.write(b)
                left -= len(b)
            ssl.kill()
            ssl.wait()
        os.rename(tmp, a.random)

    bus = bustest.Bus(idle_timeout=3600)
    work = tempfile.mkdtemp(prefix="diskchain-bench-nbd-", dir=os.path.dirname(pristine.rstrip("/")))
    qdir = os.path.join(work, "q")
    refdir = os.path.join(work, "ref")
    os.mkdir(qdir)
    os.mkdir(refdir)
    for n in CHAIN[:2]:
        os.symlink(os.path.join(pristine, n), os.path.join(refdir, n))
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    results = {}
    server = None
    try:
        rb.cold()
        wspeed = rb.disk_write_speed(work)
        print(f"disk: {wspeed:.0f} MiB/s sequential direct write (fio, 1 MiB, depth 8)", flush=True)
        for row, spec in ROWS.items():
            if a.only and row not in a.only:
                continue
            times = {s: [] for s in sides}
            peaks = {s: 0.0 for s in sides}
            have_ref = False
            for rep in range(a.repeat):
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for side in order:
                    ours = side.startswith("diskchain")
                    d = bus.root if ours else qdir
                    if spec["writable"] or rep == 0 or not os.path.exists(os.path.join(d, CHAIN[-1])):
                        rb.clear(d)
                        rb.copy_chain(pristine, d)
                    if ours:
                        server = Diskchain(side, bus, spec["writable"])
                    else:
                        server = Anchor(side, d, spec["writable"])
                    uri = server.uri
                    rb.cold()
                    if ours:
                        with open(f"/proc/{server.pid()}/clear_refs", "w") as f:
                            f.write("5\n")
                    c0 = children_cost()
                    s0 = proc_cost(server.pid())
                    t0 = time.monotonic()
                    if row == "read":
                        nbdcopy(uri, "null:")
                    elif row == "write":
                        nbdcopy("--flush", a.random, uri)
                    elif row == "randwrite":
                        fio(uri, "randwrite", a.randwrite_ios)
                    else:
                        fio(uri, "randread", a.randread_ios)
                    t = time.monotonic() - t0
                    c1 = children_cost()
                    ccpu, cflt = c1[0] - c0[0], c1[1] - c0[1]
                    s1 = proc_cost(server.pid())
                    scpu, sflt = s1[0] - s0[0], s1[1] - s0[1]
                    times[side].append(t)
                    peaks[side] = max(peaks[side], server.peak())
                    if rep == 0 and row == "read":
                        r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", uri,
                                            os.path.join(pristine, "overlay2.qcow2")])
                        if r.returncode != 0:
                            sys.exit(f"{side} {row}: the export differs from the chain")
                    server.stop()
                    server = None
                    top = os.path.join(d, "overlay2.qcow2")
                    if rep == 0 and row in ("write", "randwrite"):
                        if row == "write":
                            r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                                                a.random, top])
                        elif not have_ref:
                            shutil.copyfile(top, os.path.join(refdir, "overlay2.qcow2"))
                            have_ref = True
                            r = subprocess.CompletedProcess([], 0)
                        else:
                            r = subprocess.run(["qemu-img", "compare", "-q", top,
                                                os.path.join(refdir, "overlay2.qcow2")])
                        if r.returncode != 0:
                            sys.exit(f"{side} {row}: the result differs from what the client wrote")
                        if ours:
                            rb.sh("qemu-img", "check", "-q", top)
                    print(f"  {row:10s} {side:14s} {t:7.2f} s  peak {peaks[side]:5.0f} MiB  client CPU {ccpu:5.2f} s, {cflt} faults"
                          f"  server CPU {scpu:5.2f} s, {sflt} faults", flush=True)
            med = {s: sorted(v)[len(v) // 2] for s, v in times.items()}
            results[row] = (med, peaks)
        rb.cold()
        w2 = rb.disk_write_speed(work)
        print(f"disk after the rows: {w2:.0f} MiB/s (the faster of the two counts)", flush=True)
        wspeed = max(wspeed, w2)

        def amount(row, t):
            if row in ("read", "write"):
                return f"{virtual / MiB / t:.0f} MiB/s"
            ios = a.randwrite_ios if row == "randwrite" else a.randread_ios
            return f"{ios / t:.0f} IOPS"

        groups = [g for g in ("qemu-nbd", "qsd") if any(s.startswith(g) for s in sides)]
        print(f"\nMedians of {a.repeat} cold-cache runs, alternating; disk write speed {wspeed:.0f} MiB/s.\n")
        print("| row | " + " | ".join(f"{g} (s, fastest variant)" for g in groups) +
              " | diskchain (s, fastest variant) | diskchain rate | ratio to fastest anchor | peak MiB: diskchain / "
              + " / ".join(groups) + " |")
        print("|---|" + "---:|" * (len(groups) + 4))
        for row, (med, peaks) in results.items():
            cells, best = [], None
            for g in groups:
                v = min((med[s], s) for s in sides if s.startswith(g))
                cells.append(f"{v[0]:.2f} ({v[1]})")
                best = v[0] if best is None else min(best, v[0])
            ours = [s for s in sides if s.startswith("diskchain")]
            dc, dcs = min((med[s], s) for s in ours) if ours else (None, None)
            gp = [max(peaks[s] for s in sides if s.startswith(g)) for g in groups]
            line = f"| {ROWS[row]['label']} | " + " | ".join(cells)
            if dc:
                line += (f" | {dc:.2f} ({dcs}) | {amount(row, dc)} | {best / dc:.2f} | "
                         f"{max(peaks[s] for s in ours):.0f} / ")
            else:
                line += " | - | - | - | - / "
            print(line + " / ".join(f"{p:.0f}" for p in gp) + " |")
        print(f"\n{time.strftime('%Y-%m-%d')}, {os.uname().nodename}, {os.cpu_count()} cores, "
              f"{rb.sh('uname', '-r').stdout.strip()}; randwrite {a.randwrite_ios} writes, "
              f"randread {a.randread_ios} reads" + "".join(f"; client {v}" for v in a.client_env))
    finally:
        if server:
            try:
                server.stop()
            except Exception:
                pass
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
