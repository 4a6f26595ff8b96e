#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""diskchain benchmark, run by hand as root (never part of the test suite).

The chain is the realistic one of ../shared/bench/make-chain.sh: a 4 GiB
base half filled with unique random data in scattered 1 MiB extents, and
two overlays each rewriting about a tenth of the clusters with unique data
(aligned runs and partial-cluster writes, as guests write).  Repeated blocks
or one-byte fills would flatter every copy path; this data does not.

For each job, in one run, diskchain (through the bus and diskchainctl, as a
user drives it) is timed against the fastest ways QEMU offers to do the same:

  qemu-img            its default cache, plus an fdatasync of what it wrote
                      (qemu-img leaves its output in the page cache; a
                      diskchain job ends with its result on disk)
  qemu-img -t none    around the page cache on both sides (-t none -T none)
  qsd                 qemu-storage-daemon running the same block job over
                      QMP, default cache (cache.direct=off), plus an
                      fdatasync of its output after it quit
  qsd direct          the same with cache.direct=on on every node

Every timed run starts from fresh copies, after sync and a drop of the page
cache (every input byte comes from the disk), and ends when the result is
durable.  The sides alternate and each row is the median of --repeat runs.
Each side's first result is checked with `qemu-img compare` against the
chain it copied (and diskchain's with `qemu-img check`).  The disk's own
write speed (fio, direct, 1 MiB sequential, in the same run) gives each
job's throughput as a fraction of what the disk can take.  The daemon's
peak memory (VmHWM, reset before each job) is printed per job.

    bench/run-bench.py [--chain-dir DIR] [--repeat 3] [--only JOB] [--build build]
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
M = "/org/diskchain/DiskChain1"
CHAIN = ("base.qcow2", "overlay1.qcow2", "overlay2.qcow2")
MiB = 1 << 20


def sh(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw)


def fdatasync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def cold():
    """Nothing dirty, nothing cached: the next run reads every byte from the disk."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(2)


def copy_chain(src, dst, names=CHAIN):
    for n in names:
        p = os.path.join(dst, n)
        if os.path.exists(p):
            os.unlink(p)
        shutil.copyfile(os.path.join(src, n), p)


def clear(d, keep=()):
    for n in os.listdir(d):
        if n not in keep:
            os.unlink(os.path.join(d, n))


def disk_write_speed(d):
    """MiB/s the disk takes for a large sequential direct write, made durable."""
    p = os.path.join(d, "fio.bin")
    out = sh("fio", "--name=write", f"--filename={p}", "--size=2G", "--bs=1M", "--rw=write", "--direct=1",
             "--ioengine=libaio", "--iodepth=8", "--end_fsync=1", "--output-format=json").stdout
    os.unlink(p)
    job = json.loads(out)["jobs"][0]["write"]
    return job["bw_bytes"] / MiB


class Qmp:
    """qemu-storage-daemon with a QMP monitor on a unix socket."""

    def __init__(self, d, blockdevs):
        self.sock_path = os.path.join(d, "qmp.sock")
        args = ["qemu-storage-daemon", "--chardev", f"socket,path={self.sock_path},server=on,wait=off,id=m",
                "--monitor", "chardev=m"]
        for b in blockdevs:
            args += ["--blockdev", json.dumps(b)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(500):
            if os.path.exists(self.sock_path):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon: " + self.proc.stderr.read().decode())
            time.sleep(0.01)
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(500):
            try:
                self.s.connect(self.sock_path)
                break
            except OSError:
                time.sleep(0.01)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']['desc']}")
            else:
                return msg["return"]

    def wait_event(self, *names):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    del self.events[i]
                    return e
            line = self.f.readline()
            if not line:
                raise RuntimeError("qemu-storage-daemon went away: " + self.proc.stderr.read().decode())
            self.events.append(json.loads(line))

    def quit(self):
        try:
            self.cmd("quit")
        except (RuntimeError, ValueError, OSError):
            pass
        self.proc.wait(60)
        self.s.close()


def qsd_node(name, path, direct, backing=None, read_only=False):
    node = {"driver": "qcow2", "node-name": name, "read-only": read_only, "cache": {"direct": direct},
            "file": {"driver": "file", "filename": path, "cache": {"direct": direct}}}
    node["backing"] = backing  # None: no backing (JSON null), as the chain is spelt out node by node
    return node


def qsd_job(d, job, direct, compress=False):
    """Run JOB in qemu-storage-daemon on the chain in D; returns when its result is durable."""
    nodes = [qsd_node("base", os.path.join(d, "base.qcow2"), direct),
             qsd_node("ov1", os.path.join(d, "overlay1.qcow2"), direct, "base"),
             qsd_node("top", os.path.join(d, "overlay2.qcow2"), direct, "ov1")]
    out = os.path.join(d, "copy.qcow2")
    if job in ("mirror", "backup"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", out, "4G")
        nodes.append(qsd_node("tgt", out, direct))
    q = Qmp(d, nodes)
    try:
        if job == "mirror":
            q.cmd("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})
            q.wait_event("BLOCK_JOB_READY")
            q.cmd("job-complete", id="j")
        elif job == "backup":
            q.cmd("blockdev-backup", **{"job-id": "j", "device": "top", "target": "tgt", "sync": "full",
                                        "compress": compress})
        elif job == "stream":
            q.cmd("block-stream", **{"job-id": "j", "device": "top"})
        elif job == "commit":
            q.cmd("block-commit", **{"job-id": "j", "device": "top", "base-node": "base"})
            q.wait_event("BLOCK_JOB_READY")
            q.cmd("job-complete", id="j")
        e = q.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e["data"]:
            raise RuntimeError(f"qemu-storage-daemon {job}: {e}")
    finally:
        q.quit()


def qemu_img_job(d, job, nocache, compress=False):
    t = ["-t", "none", "-T", "none"] if nocache else []
    top, base, out = (os.path.join(d, n) for n in ("overlay2.qcow2", "base.qcow2", "copy.qcow2"))
    if job in ("mirror", "backup"):
        # the fastest qemu-img copy: 16 parallel requests, out-of-order writes
        sh("qemu-img", "convert", *t, *(["-c"] if compress else ["-m", "16", "-W"]), "-O", "qcow2",
           "-o", "cluster_size=65536", top, out)
    elif job == "stream":
        sh("qemu-img", "rebase", *t, "-q", "-b", "", top)
    elif job == "commit":
        sh("qemu-img", "commit", *t[:2], "-q", "-b", base, top)  # commit has -t only: one cache mode for all


# What each job writes (made durable, then compared with the pristine chain's top), and whether
# its inputs change (then every run starts from a fresh copy).
JOBS = {
    "mirror": dict(out="copy.qcow2", changes_inputs=False, label="mirror full + complete",
                   ctl=("mirror", "overlay2.qcow2", "copy.qcow2", "--complete")),
    "backup": dict(out="copy.qcow2", changes_inputs=False, label="backup full",
                   ctl=("backup", "overlay2.qcow2", "copy.qcow2")),
    "stream": dict(out="overlay2.qcow2", changes_inputs=True, label="stream (flatten)",
                   ctl=("stream", "overlay2.qcow2")),
    "commit": dict(out="base.qcow2", changes_inputs=True, label="commit chain into base (active, complete)",
                   ctl=("commit", "overlay2.qcow2", "--base", "base.qcow2", "--complete")),
    "backup-compressed": dict(out="copy.qcow2", changes_inputs=False, label="backup, zlib compressed",
                              ctl=("backup", "overlay2.qcow2", "copy.qcow2", "--compress")),
}


def chain_args(ap):
    """The options both benchmarks take for the build and the pristine chain (what prepare() uses)."""
    ap.add_argument("--build", default=os.path.join(SRC, "build"))
    ap.add_argument("--chain-dir", default="/var/tmp/diskchain-bench-chain",
                    help="where the pristine chain is kept between runs (built when missing)")
    ap.add_argument("--make-chain", default=os.path.join(SRC, "..", "shared", "bench", "make-chain.sh"))
    ap.add_argument("--seed", default="seed1")


def prepare(a):
    """What both benchmarks need first: root, bustest pointed at the build in A.build, and the pristine
    chain in A.chain_dir (made with A.make_chain and A.seed when missing).  Returns the bustest module."""
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache and runs the daemon")
    build = os.path.abspath(a.build)
    os.environ["DISKCHAIN_BUILD"] = build
    import bustest
    bustest.DAEMON = os.path.join(build, "daemon", "diskchaind")
    bustest.CTL = os.path.join(build, "tools", "diskchainctl")
    if not all(os.path.exists(os.path.join(a.chain_dir, n)) for n in CHAIN):
        print(f"building the chain in {a.chain_dir} ({a.make_chain}) ...", flush=True)
        subprocess.run(["bash", a.make_chain, a.chain_dir, a.seed], check=True, stdout=subprocess.DEVNULL)
    return bustest


def main():
    ap = argparse.ArgumentParser()
    chain_args(ap)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the median counts")
    ap.add_argument("--only", action="append", choices=sorted(JOBS), help="run only this job (repeatable)")
    ap.add_argument("--sides", default="diskchain,qemu-img,qemu-img -t none,qsd,qsd direct",
                    help="comma-separated sides to run")
    ap.add_argument("--dc-arg", action="append", default=[],
                    help="one more argument for each diskchainctl job command (to try an option; repeatable)")
    a = ap.parse_args()
    bustest = prepare(a)
    pristine = a.chain_dir
    alloc = json.load(open(os.path.join(pristine, "alloc.json")))
    # bytes each job has to move, from qemu-img map of the chain
    moved = {"mirror": alloc["chain_union"], "backup": alloc["chain_union"],
             "backup-compressed": alloc["chain_union"], "stream": alloc["backing_into_top"],
             "commit": alloc["ov1_or_ov2"]}

    bus = bustest.Bus(idle_timeout=3600)
    work = tempfile.mkdtemp(prefix="diskchain-bench-", dir=os.path.dirname(pristine.rstrip("/")))
    qdir = os.path.join(work, "q")
    os.mkdir(qdir)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    results = {}
    peaks = {}
    try:
        cold()
        wspeed = disk_write_speed(work)
        print(f"disk: {wspeed:.0f} MiB/s sequential direct write (fio, 1 MiB, depth 8)", flush=True)
        for job, spec in JOBS.items():
            if a.only and job not in a.only:
                continue
            compress = job == "backup-compressed"
            kind = "backup" if compress else job
            times = {s: [] for s in sides}
            for rep in range(a.repeat):
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for side in order:
                    d = bus.root if side == "diskchain" else qdir
                    # inputs fresh where the job changes them; a diskchain mirror also retires its source chain
                    if spec["changes_inputs"] or side == "diskchain" or rep == 0:
                        clear(d)
                        copy_chain(pristine, d)
                    else:
                        clear(d, keep=CHAIN)
                    if side == "diskchain":
                        time.sleep(0.3)
                        bus.call(M, "Manager", "GetChain", "s", "overlay2.qcow2")
                        pid = bus.daemon_pid()
                        with open(f"/proc/{pid}/clear_refs", "w") as f:
                            f.write("5\n")  # resets VmHWM
                    cold()
                    t0 = time.monotonic()
                    if side == "diskchain":
                        bus.ctl(*spec["ctl"], *a.dc_arg)
                    elif side.startswith("qemu-img"):
                        qemu_img_job(d, kind, side.endswith("none"), compress)
                        fdatasync(os.path.join(d, spec["out"]))
                    else:
                        qsd_job(d, kind, side.endswith("direct"), compress)
                        fdatasync(os.path.join(d, spec["out"]))
                    t = time.monotonic() - t0
                    times[side].append(t)
                    if side == "diskchain":
                        st = open(f"/proc/{pid}/status").read()
                        hwm = int([l for l in st.splitlines() if l.startswith("VmHWM")][0].split()[1]) / 1024
                        peaks[job] = max(peaks.get(job, 0), hwm)
                    if rep == 0:
                        out = os.path.join(d, spec["out"])
                        r = subprocess.run(["qemu-img", "compare", "-q", out,
                                            os.path.join(pristine, "overlay2.qcow2")])
                        if r.returncode != 0:
                            sys.exit(f"{side} {job}: the result differs from the chain it copied")
                        if side == "diskchain":
                            sh("qemu-img", "check", "-q", out)
                    print(f"  {job:18s} {side:16s} {t:7.2f} s", flush=True)
            med = {s: sorted(v)[len(v) // 2] for s, v in times.items()}
            results[job] = (med, times)
        cold()
        w2 = disk_write_speed(work)
        print(f"disk after the jobs: {w2:.0f} MiB/s (the faster of the two counts: this disk drifts)", flush=True)
        wspeed = max(wspeed, w2)
        anchors = [s for s in sides if s != "diskchain"]
        print(f"\nMedians of {a.repeat} cold-cache runs, alternating, each until its result is durable; "
              f"disk write speed {wspeed:.0f} MiB/s.\n")
        head = "| job | " + " | ".join(f"{s} (s)" for s in anchors) + " | diskchain (s) | ratio to fastest anchor "
        head += "| diskchain MiB/s | of disk write speed | daemon peak (MiB) |"
        print(head)
        print("|---|" + "---:|" * (len(anchors) + 5))
        for job, (med, _) in results.items():
            fastest = min(med[s] for s in anchors) if anchors else float("nan")
            dc = med.get("diskchain")
            row = f"| {JOBS[job]['label']} | " + " | ".join(f"{med[s]:.2f}" for s in anchors)
            if dc:
                rate = moved[job] / MiB / dc
                row += f" | {dc:.2f} | {fastest / dc:.2f} | {rate:.0f} | {rate / wspeed:.0%} | {peaks.get(job, 0):.0f} |"
            else:
                row += " | - | - | - | - | - |"
            print(row)
        print(f"\n{time.strftime('%Y-%m-%d')}, {os.uname().nodename}, {os.cpu_count()} cores, "
              f"{sh('uname', '-r').stdout.strip()}")
    finally:
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
