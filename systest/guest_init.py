"""Guest-side test runner, started by the initramfs /init as root.

Loads the virtio disk driver, runs the cases from cases.py (each a list of
steps, see its docstring), prints one "SYSTEST-CASE <status> <name> <secs>"
line per case on the console, and writes /results as a tar onto /dev/vda for
systest/run.py to pick up.  A watchdog writes whatever exists and powers the
guest off if the run overshoots its deadline, so the host always gets an
answer before its own timeout.
"""

import array
import errno
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import tarfile
import threading
import time
import traceback

sys.path.insert(0, "/systest")
import cases  # noqa: E402  (path set just above)

RESULTS = "/results"
RESULTS_DISK = "/dev/vda"
COMMAND_LOG = RESULTS + "/tcmu-commands.jsonl"
WORKDIR = "/work"
STEP_TIMEOUT = 60        # seconds for one command; TCG is slow, hangs are not
CONFIGFS = "/sys/kernel/config"

# <sys/mtio.h>: MTIOCTOP = _IOW('m', 1, struct mtop {short; int;}),
# MTIOCPOS = _IOR('m', 3, struct mtpos {long;}).
MTIOCTOP = 0x40086D01
MTIOCPOS = 0x80086D03
MT_OPS = {"fsf": 1, "weof": 5, "rewind": 6, "setblk": 20}
READ_SIZE = 1 << 17      # larger than any block we write: variable-mode reads

# <scsi/sg.h> sg_io_hdr, native layout with the kernel's trailing padding.
SG_IO = 0x2285
SG_DXFER_FROM_DEV = -3
SG_IO_HDR = "@iiBBHIPPPIIiPBBBBHHiII0P"


class StepFailed(Exception):
    pass


class Context:
    """State shared by the steps: the case log and facts for the report."""

    def __init__(self):
        self.log_lines = []
        self.facts = {"model": None}
        self.handler = None
        self.marks = []          # (case, step label, command-log line count)

    def log(self, text):
        self.log_lines.extend(str(text).rstrip("\n").splitlines() or [""])


# ---- Small helpers -------------------------------------------------------------

def read_text(path):
    with open(path) as f:
        return f.read().strip()


def write_attr(path, value):
    """configfs/sysfs attributes want one write without a newline."""
    with open(path, "w") as f:
        f.write(value)


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise StepFailed("timed out after %ds waiting for %s" % (timeout, what))
        time.sleep(0.05)


def shell(cmd, ctx):
    ctx.log("$ " + cmd)
    p = subprocess.run(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=STEP_TIMEOUT)
    if p.stdout:
        ctx.log(p.stdout)
    if p.returncode != 0:
        raise StepFailed("exit status %d" % p.returncode)


def command_log_count():
    try:
        with open(COMMAND_LOG) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# ---- Step kinds -------------------------------------------------------------------

def step_sh(step, ctx):
    shell(step["sh"], ctx)


def step_run(step, ctx):
    argv = step["run"]
    ctx.log("$ " + " ".join(argv))
    if argv[:1] == ["python3"] and not os.path.exists(os.path.join(WORKDIR, argv[1])):
        raise StepFailed("%s is not in the payload (not in the repository?)" % argv[1])
    p = subprocess.run(argv, cwd=WORKDIR, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=STEP_TIMEOUT)
    ctx.log("[exit %d]" % p.returncode)
    if p.stdout:
        ctx.log("[stdout]\n" + p.stdout)
    if p.stderr:
        ctx.log("[stderr]\n" + p.stderr)
    check_output(step, p)


def check_output(step, p):
    """Apply the "run" checks listed in cases.py's docstring."""
    problems = []
    rc = step.get("rc")
    if rc == "nonzero" and p.returncode == 0:
        problems.append("expected a non-zero exit status")
    elif isinstance(rc, int) and p.returncode != rc:
        problems.append("expected exit status %d, got %d" % (rc, p.returncode))
    for stream in ("stdout", "stderr"):
        text = getattr(p, stream)
        for want in step.get(stream + "_has", []):
            if want.lower() not in text.lower():
                problems.append("%s lacks %r" % (stream, want))
        for unwanted in step.get(stream + "_lacks", []):
            if unwanted.lower() in text.lower():
                problems.append("%s contains %r" % (stream, unwanted))
        pattern = step.get(stream + "_re")
        if pattern and not re.search(pattern, text, re.I):
            problems.append("%s does not match /%s/" % (stream, pattern))
    max_lines = step.get("stderr_max_lines")
    if max_lines is not None and len(p.stderr.splitlines()) > max_lines:
        problems.append("stderr has more than %d line(s)" % max_lines)
    if step.get("no_traceback", True) and "Traceback" in p.stdout + p.stderr:
        problems.append("output contains a Python traceback")
    if problems:
        raise StepFailed("; ".join(problems))


def step_wait(step, ctx):
    wait_for(lambda: os.path.exists(step["wait"]), step.get("timeout", 30),
             step["wait"])


def step_gone(step, ctx):
    wait_for(lambda: not os.path.exists(step["gone"]), step.get("timeout", 30),
             "%s to disappear" % step["gone"])


def step_read(step, ctx):
    value = read_text(step["read"])
    ctx.log("%s = %r" % (step["read"], value))
    if value != step["equals"]:
        raise StepFailed("expected %r" % step["equals"])


def step_realpath(step, ctx):
    target = os.path.realpath(step["realpath"])
    ctx.log("%s -> %s" % (step["realpath"], target))
    if step["contains"] not in target:
        raise StepFailed("expected a path containing %r" % step["contains"])


def step_call(step, ctx):
    STEP_FUNCS[step["call"]](step, ctx)


def step_tape(step, ctx):
    TAPE_OPS[step["tape"]](step, ctx)


STEP_KINDS = {"sh": step_sh, "run": step_run, "wait": step_wait,
              "gone": step_gone, "read": step_read, "realpath": step_realpath,
              "call": step_call, "tape": step_tape}


def step_label(step):
    kind = next(iter(step))
    value = step[kind]
    if isinstance(value, list):
        value = " ".join(value)
    return "%s %s" % (kind, value)


# ---- Tape operations (open, act, close: st allows one opener at a time) -----------

def block_data(index, size):
    """Deterministic, block-specific content so misordered reads show up."""
    pattern = ("<block %d of %d bytes>" % (index, size)).encode()
    return (pattern * (size // len(pattern) + 1))[:size]


def mtop(fd, op, count=1):
    fcntl.ioctl(fd, MTIOCTOP, struct.pack("hi", MT_OPS[op], count))


def tape_mtop(step, ctx):
    """rewind / fsf: one MTIOCTOP on a fresh descriptor."""
    fd = os.open(cases.TAPE, os.O_RDONLY)
    try:
        mtop(fd, step["tape"], step.get("count", 1))
    finally:
        os.close(fd)
    ctx.log("%s %s done" % (cases.TAPE, step["tape"]))


def tape_position(step, ctx):
    fd = os.open(cases.TAPE, os.O_RDONLY)
    try:
        buf = bytearray(struct.calcsize("l"))
        fcntl.ioctl(fd, MTIOCPOS, buf)
    finally:
        os.close(fd)
    block = struct.unpack("l", buf)[0]
    ctx.log("position: block %d" % block)
    if block != step["equals"]:
        raise StepFailed("expected block %d" % step["equals"])


def tape_write(step, ctx):
    fd = os.open(cases.TAPE, os.O_RDWR)
    try:
        mtop(fd, "setblk", 0)            # variable-block mode
        for i, size in enumerate(step["blocks"]):
            n = os.write(fd, block_data(i, size))
            if n != size:
                raise StepFailed("block %d: wrote %d of %d bytes" % (i, n, size))
    finally:
        os.close(fd)                     # st writes a filemark on close
    ctx.log("wrote %d blocks: %s" % (len(step["blocks"]), step["blocks"]))


def tape_read(step, ctx):
    fd = os.open(cases.TAPE, os.O_RDONLY)
    try:
        for i, size in enumerate(step["blocks"]):
            got = os.read(fd, READ_SIZE)
            if got != block_data(i, size):
                raise StepFailed("block %d: read %d bytes, expected %d (%s)"
                                 % (i, len(got), size,
                                    "same length, other content"
                                    if len(got) == size else "length differs"))
        tail = os.read(fd, READ_SIZE)
        if tail:
            raise StepFailed("expected a filemark after the blocks, read %d bytes"
                             % len(tail))
    finally:
        os.close(fd)
    ctx.log("read back %d blocks and the filemark" % len(step["blocks"]))


def tape_read_fails(step, ctx):
    want = getattr(errno, step["errno"])
    fd = os.open(cases.TAPE, os.O_RDONLY)
    try:
        try:
            got = os.read(fd, READ_SIZE)
        except OSError as e:
            ctx.log("read failed as expected: %s" % e)
            if e.errno != want:
                raise StepFailed("expected %s, got %s" % (step["errno"], e))
            return
        raise StepFailed("read succeeded (%d bytes), expected %s"
                         % (len(got), step["errno"]))
    finally:
        os.close(fd)


TAPE_OPS = {"rewind": tape_mtop, "fsf": tape_mtop, "position": tape_position,
            "write": tape_write, "read": tape_read, "read_fails": tape_read_fails}


# ---- SG_IO transport check ----------------------------------------------------------

def sg_io_in(path, cdb, alloc_len):
    """Send a data-in CDB via SG_IO; return (status, sense bytes, data)."""
    data = array.array("B", bytes(max(alloc_len, 1)))
    sense = array.array("B", bytes(64))
    cdb_buf = array.array("B", cdb)
    hdr = bytearray(struct.pack(
        SG_IO_HDR, ord("S"), SG_DXFER_FROM_DEV, len(cdb), len(sense), 0,
        alloc_len, data.buffer_info()[0], cdb_buf.buffer_info()[0],
        sense.buffer_info()[0], 20000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, SG_IO, hdr)
    finally:
        os.close(fd)
    fields = struct.unpack(SG_IO_HDR, hdr)
    status, sb_len, resid = fields[13], fields[16], fields[19]
    return status, sense.tobytes()[:sb_len], data.tobytes()[:alloc_len - resid]


def spin_sense(step, ctx):
    """SECURITY PROTOCOL IN, protocol 0 page 0: check status and sense."""
    cdb = bytes([0xA2, 0x00, 0x00, 0x00, 0, 0, 0x00, 0x00, 0x20, 0x00, 0, 0])
    status, sense, data = sg_io_in(cases.TAPE, cdb, 0x2000)
    ctx.log("SPIN 00/0000: status 0x%02x sense %s data %d bytes"
            % (status, sense.hex(" ") if sense else "-", len(data)))
    key = sense[2] & 0x0F if len(sense) > 2 else None
    asc = sense[12] if len(sense) > 12 else None
    if (status, key, asc) != (step["status"], step["key"], step["asc"]):
        raise StepFailed("expected status %d, sense key %d, ASC 0x%02x"
                         % (step["status"], step["key"], step["asc"]))


# ---- TCMU device (REAL-KERNEL-TEST.md, "TCMU facts") -----------------------------------

TCMU_NAME = "tape0"
TCMU_DEV = CONFIGFS + "/target/core/user_1/" + TCMU_NAME
LOOP_WWN = "naa.5001405000000001"
LOOP_INITIATOR = "naa.5001405000000002"


def find_uio(name):
    for entry in sorted(os.listdir("/sys/class/uio")):
        uname = read_text("/sys/class/uio/%s/name" % entry)
        if uname.startswith("tcm-user") and ("/%s/" % name) in uname:
            return entry
    return None


def start_handler(uio, ctx):
    """Start tcmu_tape.py on /dev/uioN and wait for its READY line."""
    errlog = open(RESULTS + "/tcmu-handler.log", "w")
    proc = subprocess.Popen(
        ["/usr/bin/python3", "/systest/tcmu_tape.py", "/dev/" + uio,
         "--log", COMMAND_LOG],
        cwd=WORKDIR, stdout=subprocess.PIPE, stderr=errlog,
        universal_newlines=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("READY"):
        raise StepFailed("TCMU handler did not start (got %r); see tcmu-handler.log"
                         % line)
    ctx.handler = proc
    ctx.facts["model"] = line.partition("model=")[2]
    ctx.log("handler: " + line)


def tcmu_start(step, ctx):
    for mod in ("configfs", "target_core_user", "tcm_loop"):
        shell("modprobe " + mod, ctx)
    if not os.path.ismount(CONFIGFS):
        shell("mount -t configfs none " + CONFIGFS, ctx)
    os.makedirs(TCMU_DEV)
    write_attr(TCMU_DEV + "/control", "dev_size=%d" % (64 << 20))
    write_attr(TCMU_DEV + "/control", "dev_config=tape/" + TCMU_NAME)
    # A dead handler would otherwise stall every command for 30 s.
    write_attr(TCMU_DEV + "/attrib/cmd_time_out", "10")
    write_attr(TCMU_DEV + "/enable", "1")
    wait_for(lambda: find_uio(TCMU_NAME), 10, "the TCMU uio device")
    uio = find_uio(TCMU_NAME)
    ctx.log("%s: %s" % (uio, read_text("/sys/class/uio/%s/name" % uio)))
    wait_for(lambda: os.path.exists("/dev/" + uio), 10, "/dev/" + uio)
    start_handler(uio, ctx)
    # The I_T nexus must exist before the LUN is linked, or linking fails
    # silently.
    tpg = "%s/target/loopback/%s/tpgt_1" % (CONFIGFS, LOOP_WWN)
    os.makedirs(tpg)
    write_attr(tpg + "/nexus", LOOP_INITIATOR)
    os.makedirs(tpg + "/lun/lun_0")
    os.symlink(TCMU_DEV, tpg + "/lun/lun_0/" + TCMU_NAME)
    ctx.log("loopback %s lun 0 -> user_1/%s" % (LOOP_WWN, TCMU_NAME))


STEP_FUNCS = {"spin_sense": spin_sense, "tcmu_start": tcmu_start}


# ---- Running cases --------------------------------------------------------------------

def select_cases(only):
    """All cases, or the named ones plus the cases they need."""
    if not only:
        return cases.CASES
    by_name = {c["name"]: c for c in cases.CASES}
    wanted, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name in by_name and name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].get("needs", []))
    return [c for c in cases.CASES if c["name"] in wanted]


def run_case(case, passed, ctx):
    ctx.log_lines = []
    missing = [n for n in case.get("needs", []) if n not in passed]
    if missing:
        ctx.log("not run: needs %s, which did not pass" % ", ".join(missing))
        return "FAIL"
    for step in case["steps"]:
        label = step_label(step)
        ctx.marks.append((case["name"], label, command_log_count()))
        ctx.log("-- " + label)
        try:
            STEP_KINDS[next(iter(step))](step, ctx)
        except StepFailed as e:
            ctx.log("FAILED: %s" % e)
            return "FAIL"
        except subprocess.TimeoutExpired as e:
            ctx.log("FAILED: timed out: %s" % e)
            return "FAIL"
        except Exception:
            ctx.log("FAILED with an exception:\n" + traceback.format_exc())
            return "FAIL"
    return "PASS"


def opcode_summary(ctx):
    """Which CDBs the drive model saw, overall and per step (README material)."""
    try:
        with open(COMMAND_LOG) as f:
            commands = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []
    first = {}
    for c in commands:
        first.setdefault(c["op"], c)
    lines = ["Commands the TCMU drive model (%s) received" % ctx.facts["model"],
             "", "== distinct opcodes (first CDB seen, count) =="]
    for op in sorted(first):
        c = first[op]
        n = sum(1 for x in commands if x["op"] == op)
        lines.append("%s %-32s %s  x%d" % (op, c["name"], c["cdb"], n))
    lines += ["", "== by step =="]
    marks = ctx.marks + [("", "", len(commands))]
    for (case, label, start), (_, _, end) in zip(marks, marks[1:]):
        seen = commands[start:end]
        if seen:
            lines.append("%s / %s:" % (case, label))
            lines += ["    %s %-30s %s -> status %d%s"
                      % (c["op"], c["name"], c["cdb"], c["status"],
                         " sense " + c["sense"] if c["sense"] else "")
                      for c in seen]
    with open(RESULTS + "/opcodes.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    return sorted(first)


class Run:
    """One guest run: the case results and the single, final write-out."""

    def __init__(self, options):
        self.options = options
        self.ctx = Context()
        self.results = []
        self.current = None
        self.lock = threading.Lock()
        self.finished = False
        self.start = time.monotonic()

    def execute(self):
        passed = set()
        for case in select_cases(self.options.get("only")):
            self.current = (case["name"], time.monotonic())
            status = run_case(case, passed, self.ctx)
            self.record(case["name"], status)
            if status == "PASS":
                passed.add(case["name"])
        self.current = None

    def record(self, name, status):
        seconds = time.monotonic() - self.current[1]
        self.results.append({"name": name, "status": status, "seconds": seconds,
                             "log": "\n".join(self.ctx.log_lines)})
        with open("%s/case-%s.log" % (RESULTS, name), "w") as f:
            f.write("\n".join(self.ctx.log_lines) + "\n")
        print("SYSTEST-CASE %s %s %.1f" % (status, name, seconds), flush=True)

    def finish(self, boot_seconds, timed_out=False):
        """Write results.json and the tar; only the first caller does it."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            if timed_out and self.current:
                self.ctx.log("FAILED: guest deadline reached during this case")
                self.record(self.current[0], "FAIL")
            self.ctx.facts["opcodes"] = opcode_summary(self.ctx)
            if self.ctx.handler is not None:
                # None while it serves; an exit status means it died.
                self.ctx.facts["handler_exit"] = self.ctx.handler.poll()
            with open(RESULTS + "/dmesg.txt", "w") as f:
                subprocess.run(["dmesg"], stdout=f)
            summary = {"cases": self.results, "facts": self.ctx.facts,
                       "boot_seconds": boot_seconds,
                       "test_seconds": time.monotonic() - self.start,
                       "timed_out": timed_out}
            with open(RESULTS + "/results.json", "w") as f:
                json.dump(summary, f, indent=1)
            write_tar(RESULTS, RESULTS_DISK)


def write_tar(folder, disk):
    with open(disk, "r+b") as dev:
        with tarfile.open(fileobj=dev, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(os.listdir(folder)):
                tar.add(os.path.join(folder, name), arcname=name)
        dev.flush()
        os.fsync(dev.fileno())


def attach_results_disk():
    for mod in ("virtio_pci", "virtio_blk"):
        subprocess.run(["modprobe", mod], check=True)
    wait_for(lambda: os.path.exists(RESULTS_DISK), 20, RESULTS_DISK)


def main():
    boot_seconds = float(read_text("/proc/uptime").split()[0])
    with open("/systest/options.json") as f:
        options = json.load(f)
    os.makedirs(RESULTS, exist_ok=True)
    attach_results_disk()
    run = Run(options)

    def deadline():
        run.finish(boot_seconds, timed_out=True)
        subprocess.run(["poweroff", "-f"])

    timer = threading.Timer(max(10, options.get("deadline", 150) - boot_seconds),
                            deadline)
    timer.daemon = True
    timer.start()
    run.execute()
    timer.cancel()
    run.finish(boot_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
