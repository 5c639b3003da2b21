#!/usr/bin/env python3
"""Run bscrypto.py against a real Linux SCSI stack inside QEMU.

The development kernel has no SCSI support, so this boots Debian's stock
cloud kernel (TCG, no KVM) with an initramfs that holds busybox, the host's
Debian Python, the needed kernel modules and the payload (bscrypto.py,
test_bscrypto.py, the guest scripts in this folder).  The guest runs the
cases from systest/cases.py, writes a tar of its results onto a raw virtio
disk and powers off; this script prints one PASS/FAIL line per case and
finally "N passed, N failed".

If the harness itself cannot start (no qemu, no kernel package, the guest
never boots) it prints SKIP and exits 0, unless CI=true, where that is a
loud failure.  Stdlib only; see systest/README.md.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")

KERNEL_META = "linux-image-cloud-amd64"   # depends on the current ABI package
APT_PACKAGES = ["qemu-system-x86", "busybox-static"]
QEMU = "qemu-system-x86_64"

# Modules the guest loads; their dependencies are added from modules.dep.
MODULES = ["sg", "st", "scsi_debug", "configfs", "target_core_user",
           "tcm_loop", "virtio_pci", "virtio_blk"]

GUEST_FILES = ["guest_init.py", "cases.py", "tcmu_tape.py"]
REPO_FILES = ["bscrypto.py", "test_bscrypto.py"]

# Parts of the stdlib nothing in the guest needs; leaving them out keeps the
# initramfs (which TCG has to unpack at every boot) small.
STDLIB_SKIP_DIRS = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                    "lib2to3", "pydoc_data", "distutils", "site-packages",
                    "dist-packages", "venv"}
DYNLOAD_SKIP = re.compile(r"^(_test|xx|_xx|_ctypes_test|_tkinter|_curses|"
                          r"readline|_dbm|_gdbm|nis|ossaudiodev|_sqlite3|"
                          r"_ssl|audioop)")

# Bump when the layout of the cached base image changes.
BASE_LAYOUT = 3

INIT_SCRIPT = """#!/bin/sh
# PID 1: mount the kernel filesystems, run the Python test runner, power off.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo SYSTEST-BOOTED $(cut -d' ' -f1 /proc/uptime)
cd /work
/usr/bin/python3 /systest/guest_init.py
echo SYSTEST-EXIT $?
sync
poweroff -f
"""


class CannotStart(Exception):
    """The environment cannot run the harness (not a test failure)."""


def log(msg):
    print(msg, flush=True)


def sh(argv, **kw):
    """Run a host command, returning CompletedProcess with text output."""
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, **kw)
    except FileNotFoundError:
        raise CannotStart("%s not found" % argv[0])


# ---- Host tools --------------------------------------------------------------

def guest_python():
    """Debian's /usr/bin/python3.X with its full stdlib in /usr/lib/python3.X
    (tarfile is in libpython3.X-stdlib, which python3-minimal lacks)."""
    found = [p for p in glob.glob("/usr/bin/python3.*")
             if re.fullmatch(r"/usr/bin/python3\.\d+", p)
             and os.path.exists("/usr/lib/%s/tarfile.py" % os.path.basename(p))]
    found.sort(key=lambda p: int(p.rsplit(".", 1)[1]))
    return found[-1] if found else None


def install_packages():
    """apt-get install what the harness needs (for `.ci/run`)."""
    pkgs = list(APT_PACKAGES)
    if not guest_python():
        pkgs += ["python3-minimal", "libpython3-stdlib"]
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + pkgs
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Refresh the package lists only when they are missing or stale: the
    # install fails, or they do not know the kernel metapackage.
    if subprocess.run(cmd, env=env).returncode != 0 or not kernel_package_name():
        subprocess.run(["apt-get", "update", "-q"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise CannotStart("apt-get install %s failed" % " ".join(pkgs))


def static_busybox():
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path):
            out = sh(["ldd", path])
            if "not a dynamic executable" in out.stdout + out.stderr:
                return path
    raise CannotStart("no static busybox (apt-get install busybox-static)")


def find_tools():
    for tool in ("timeout", "dpkg-deb", "ldd", "apt-get", "apt-cache"):
        if not shutil.which(tool):
            raise CannotStart("%s not found" % tool)
    tools = {"qemu": shutil.which(QEMU), "busybox": static_busybox(),
             "python": guest_python()}
    if not tools["qemu"]:
        raise CannotStart("%s not found (apt-get install qemu-system-x86)" % QEMU)
    if not tools["python"]:
        raise CannotStart("no Debian /usr/bin/python3.X with its stdlib "
                          "(apt-get install python3-minimal libpython3-stdlib)")
    return tools


# ---- Kernel package -----------------------------------------------------------

def kernel_package_name():
    """The ABI package the metapackage currently depends on, or None."""
    out = sh(["apt-cache", "depends", KERNEL_META])
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    return None


def download_kernel(cache):
    """Return the path of the kernel .deb, downloading it if not cached."""
    os.makedirs(cache, exist_ok=True)
    pkg = kernel_package_name()
    if pkg:
        debs = glob.glob(os.path.join(cache, pkg + "_*.deb"))
        if not debs:
            log("systest: downloading %s" % pkg)
            out = sh(["apt-get", "download", "-q", pkg], cwd=cache)
            debs = glob.glob(os.path.join(cache, pkg + "_*.deb"))
            if not debs:
                raise CannotStart("apt-get download %s failed: %s"
                                  % (pkg, out.stderr.strip()[-300:]))
            drop_old_kernels(cache, keep=pkg + "_")
        return debs[0]
    # No package lists (offline): fall back to a previously cached kernel.
    debs = sorted(glob.glob(os.path.join(cache, "linux-image-*-cloud-amd64_*.deb")),
                  key=os.path.getmtime)
    if debs:
        return debs[-1]
    raise CannotStart("apt-cache knows no %s (run apt-get update or --install)"
                      % KERNEL_META)


def drop_old_kernels(cache, keep):
    """A new ABI superseded what is cached: free the disk space."""
    for path in glob.glob(os.path.join(cache, "linux-image-*")):
        if os.path.basename(path).startswith(keep):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def extract_kernel(deb, busybox):
    """Unpack the .deb once; return (root dir, vmlinuz path, kernel version)."""
    root = deb[:-len(".deb")]
    if not os.path.isdir(root):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        kver = os.listdir(os.path.join(tmp, "lib", "modules"))[0]
        # Debian generates modules.dep in postinst; do it ourselves.
        subprocess.run([busybox, "depmod", "-b", tmp, kver], check=True)
        os.rename(tmp, root)
    kver = os.listdir(os.path.join(root, "lib", "modules"))[0]
    vmlinuz = os.path.join(root, "boot", "vmlinuz-" + kver)
    return root, vmlinuz, kver


def module_closure(moddir, names):
    """Relative paths of the named modules and everything they depend on."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            target, _, rest = line.partition(":")
            deps[target] = rest.split()
    by_name = {os.path.basename(p)[:-3].replace("-", "_"): p for p in deps}
    todo = []
    for name in names:
        if name not in by_name:
            raise CannotStart("kernel has no module %s" % name)
        todo.append(by_name[name])
    seen = set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(deps[p])
    return sorted(seen)


# ---- newc cpio writer -----------------------------------------------------------

class Cpio:
    """Minimal SVR4 "newc" archive writer, the format the kernel unpacks."""

    def __init__(self, path):
        self.f = open(path, "wb")
        self.ino = 1
        self.dirs = set()

    def _entry(self, name, mode, data=b"", mtime=0, nlink=1, rdev=(0, 0)):
        name = name.lstrip("/")
        fields = (self.ino, mode, 0, 0, nlink, int(mtime), len(data),
                  0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(head + name.encode() + b"\0")
        self._pad()
        self.f.write(data)
        self._pad()

    def _pad(self):
        self.f.write(b"\0" * (-self.f.tell() % 4))

    def mkdir(self, path):
        """Create path and its parents (each once)."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, path, data, mode=0o644, mtime=0):
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFREG | mode, data, mtime)

    def copy(self, src, dst=None):
        """Copy a host file (following symlinks), keeping mode and mtime;
        mtimes matter because .pyc files are validated against them."""
        st = os.stat(src)
        with open(src, "rb") as f:
            self.file(dst or src, f.read(), stat.S_IMODE(st.st_mode), st.st_mtime)

    def symlink(self, path, target):
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path, major, minor):
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self):
        self._entry("TRAILER!!!", 0, nlink=1)
        self.f.write(b"\0" * (-self.f.tell() % 512))
        self.f.close()


# ---- Initramfs ------------------------------------------------------------------

def ldd_libs(binaries):
    """Shared libraries (by the path the loader uses) the binaries need."""
    libs = set()
    for b in binaries:
        for line in sh(["ldd", b]).stdout.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return sorted(libs)


def stdlib_files(libdir):
    """The stdlib sources, their cached bytecode and extension modules."""
    files, dynload = [], []
    for top, dirs, names in os.walk(libdir):
        rel = os.path.relpath(top, libdir)
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS
                       and not d.startswith("config-")]
        for n in names:
            path = os.path.join(top, n)
            if rel == "lib-dynload":
                if n.endswith(".so") and not DYNLOAD_SKIP.match(n):
                    dynload.append(path)
            elif n.endswith(".py") or (n.endswith(".pyc") and ".opt-" not in n):
                files.append(path)
    return files, dynload


def base_key(tools, kroot):
    """Cache key of the base image: changes when any input changes."""
    h = hashlib.sha256(str(BASE_LAYOUT).encode())
    for p in (tools["busybox"], tools["python"], kroot, __file__):
        st = os.stat(p)
        h.update(("%s %d %d\n" % (p, st.st_size, st.st_mtime)).encode())
    return h.hexdigest()[:16]


def build_base(path, tools, kroot, kver):
    """Everything except the payload: busybox, Python, kernel modules."""
    tmp = path + ".tmp"
    cpio = Cpio(tmp)
    for d in ("dev", "proc", "sys", "tmp", "run", "work", "results"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)   # the kernel opens it for /init
    cpio.copy(tools["busybox"], "/bin/busybox")
    applets = sh([tools["busybox"], "--list"]).stdout.split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink("/bin/" + applet, "busybox")
    cpio.symlink("/sbin", "bin")        # the kernel runs /sbin/modprobe
    cpio.symlink("/usr/sbin", "../bin")
    python = tools["python"]
    pyname = os.path.basename(python)
    cpio.copy(python, "/usr/bin/" + pyname)
    cpio.symlink("/usr/bin/python3", pyname)
    py_files, dynload = stdlib_files("/usr/lib/" + pyname)
    for p in py_files + dynload:
        cpio.copy(p)
    for lib in ldd_libs([python] + dynload):
        cpio.copy(os.path.realpath(lib), lib)
    moddir = os.path.join(kroot, "lib", "modules", kver)
    for rel in module_closure(moddir, MODULES):
        cpio.copy(os.path.join(moddir, rel), "/lib/modules/%s/%s" % (kver, rel))
    for n in os.listdir(moddir):
        if n.startswith("modules.") and os.path.isfile(os.path.join(moddir, n)):
            cpio.copy(os.path.join(moddir, n), "/lib/modules/%s/%s" % (kver, n))
    cpio.close()
    os.rename(tmp, path)


def build_payload(path, options, src):
    """The small, per-run part: /init, guest scripts, bscrypto files."""
    cpio = Cpio(path)
    cpio.file("/init", INIT_SCRIPT.encode(), 0o755)
    for n in GUEST_FILES:
        cpio.copy(os.path.join(HERE, n), "/systest/" + n)
    present = []
    for n in REPO_FILES:
        path_n = os.path.join(src, n)
        if os.path.exists(path_n):
            cpio.copy(path_n, "/work/" + n)
            present.append(n)
    options = dict(options, repo_files=present)
    cpio.file("/systest/options.json", json.dumps(options).encode())
    cpio.close()
    return present


def build_initrd(tools, kroot, kver, options, src):
    """Cached base image + fresh payload, concatenated (the kernel unpacks
    concatenated cpio archives in order)."""
    base = os.path.join(BUILD, "base-%s-%s.cpio" % (kver, base_key(tools, kroot)))
    if not os.path.exists(base):
        for old in glob.glob(os.path.join(BUILD, "base-*.cpio")):
            os.unlink(old)
        log("systest: building base initramfs")
        build_base(base, tools, kroot, kver)
    payload = os.path.join(BUILD, "payload.cpio")
    present = build_payload(payload, options, src)
    initrd = os.path.join(BUILD, "initrd.img")
    with open(initrd, "wb") as out:
        for part in (base, payload):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return initrd, present


# ---- Boot and collect ------------------------------------------------------------

def make_results_disk(path, size=64 << 20):
    """A zeroed raw disk the guest writes its result tar onto."""
    with open(path, "wb") as f:
        f.truncate(size)


def boot(tools, vmlinuz, initrd, disk, timeout, verbose):
    """Run the guest; return (console text, seconds, timed_out)."""
    cmd = ["timeout", "--kill-after=5", str(timeout), tools["qemu"],
           "-accel", "tcg,thread=multi", "-m", "1024", "-smp", "2",
           "-nodefaults", "-display", "none", "-no-reboot",
           "-serial", "stdio", "-monitor", "none",
           "-kernel", vmlinuz, "-initrd", initrd,
           "-append", "console=ttyS0 panic=-1 loglevel=4",
           "-drive", "file=%s,format=raw,if=virtio" % disk]
    start = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if verbose:
                log("  | " + line)
            elif line.startswith("SYSTEST-CASE "):
                log("  ... " + line[len("SYSTEST-CASE "):])
        rc = proc.wait()
    return "\n".join(lines), time.monotonic() - start, rc == 124


def read_results(disk, outdir):
    """Untar the guest's results; None if the guest wrote nothing."""
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    with open(disk, "rb") as f:
        if f.read(512).strip(b"\0") == b"":
            return None
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar.getmembers():
                # Plain files with plain names only: nothing the guest writes
                # can land outside outdir.
                name = member.name
                if member.isfile() and re.fullmatch(r"[\w.-]+", name) \
                        and not name.startswith("."):
                    with open(os.path.join(outdir, name), "wb") as out:
                        shutil.copyfileobj(tar.extractfile(member), out)
    with open(os.path.join(outdir, "results.json")) as f:
        return json.load(f)


# ---- Report ----------------------------------------------------------------------

def indent(text, prefix="    "):
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def report(results, seconds, outdir):
    """Print per-case lines and the summary; return the number of failures."""
    cases = results["cases"]
    for case in cases:
        log("%s %s (%.1fs)" % (case["status"], case["name"], case["seconds"]))
        if case["status"] != "PASS":
            log(indent(case["log"]))
    facts = results.get("facts", {})
    log("systest: TCMU drive model: %s" % (facts.get("model") or "not started"))
    if facts.get("handler_exit") is not None:
        log("systest: the TCMU handler died (exit %s); see tcmu-handler.log"
            % facts["handler_exit"])
    if facts.get("opcodes"):
        log("systest: opcodes seen by the drive model: %s"
            % " ".join(facts["opcodes"]))
    log("systest: boot %.1fs, guest tests %.1fs, total %.1fs (logs in %s)"
        % (results.get("boot_seconds", 0), results.get("test_seconds", 0),
           seconds, os.path.relpath(outdir, REPO)))
    failed = sum(1 for c in cases if c["status"] != "PASS")
    log("%d passed, %d failed" % (len(cases) - failed, failed))
    return failed


def unfinished(console, seconds, timeout):
    """The guest booted but wrote no results: report what the console shows."""
    done = [line.split()[1:3] for line in console.splitlines()
            if line.startswith("SYSTEST-CASE ")]
    for status, name in done:
        log("%s %s" % (status, name))
    log("FAIL guest (no results after %.0fs, timeout %ds); console tail:"
        % (seconds, timeout))
    log(indent("\n".join(console.splitlines()[-40:])))
    passed = sum(1 for s, _ in done if s == "PASS")
    log("%d passed, %d failed" % (passed, len(done) - passed + 1))
    return 1


# ---- Main -------------------------------------------------------------------------

def run(args):
    tools = find_tools()
    os.makedirs(BUILD, exist_ok=True)
    t0 = time.monotonic()
    deb = download_kernel(os.path.join(BUILD, "kernel"))
    kroot, vmlinuz, kver = extract_kernel(deb, tools["busybox"])
    options = {"deadline": args.timeout - 20, "only": args.case}
    initrd, present = build_initrd(tools, kroot, kver, options, args.src)
    missing = [n for n in REPO_FILES if n not in present]
    if missing:
        log("systest: note: %s not in %s" % (", ".join(missing), args.src))
    log("systest: kernel %s, initrd %.0f MB built in %.1fs"
        % (kver, os.path.getsize(initrd) / 1e6, time.monotonic() - t0))
    disk = os.path.join(BUILD, "results.img")
    make_results_disk(disk)
    console, seconds, timed_out = boot(tools, vmlinuz, initrd, disk,
                                       args.timeout, args.verbose)
    with open(os.path.join(BUILD, "console.log"), "w") as f:
        f.write(console)
    if "SYSTEST-BOOTED" not in console:
        why = "timed out" if timed_out else "exited"
        raise CannotStart("guest never reached /init (qemu %s after %.0fs); "
                          "see systest/build/console.log" % (why, seconds))
    outdir = os.path.join(BUILD, "results")
    try:
        results = read_results(disk, outdir)
    except (OSError, ValueError, tarfile.TarError) as e:
        log("systest: unreadable results disk: %s" % e)
        results = None
    if results is None:
        return unfinished(console, seconds, args.timeout)
    return 1 if report(results, seconds, outdir) else 0


def cannot_start(reason, ci):
    """SKIP locally; under CI a harness that cannot run is a failure."""
    if ci:
        log("FAIL: systest cannot run: %s (CI=true, so this is an error)" % reason)
        return 2
    log("SKIP: systest: %s" % reason)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install", action="store_true",
                    help="apt-get install qemu-system-x86 and busybox-static first")
    ap.add_argument("--timeout", type=int, default=180,
                    help="seconds before qemu is killed (default 180)")
    ap.add_argument("--case", action="append", default=[],
                    help="run only this case (and what it needs); repeatable")
    ap.add_argument("--src", default=REPO,
                    help="take %s from this folder (default: the repository)"
                    % " and ".join(REPO_FILES))
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="echo the guest console")
    args = ap.parse_args(argv)
    ci = os.environ.get("CI", "").lower() == "true"
    try:
        if args.install:
            install_packages()
        return run(args)
    except CannotStart as e:
        return cannot_start(e, ci)
    except subprocess.CalledProcessError as e:
        # dpkg-deb or depmod failing: a broken download or cache, not a test.
        return cannot_start("%s (remove systest/build/kernel to refetch)" % e, ci)


if __name__ == "__main__":
    sys.exit(main())
