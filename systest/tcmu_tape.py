"""Userspace TCMU handler: a tape drive model behind LIO's target_core_user.

Usage (in the guest): python3 tcmu_tape.py /dev/uioN --log FILE

mmaps the uio region of a target_core_user device, takes each SCSI command
off the command ring and hands it to a drive model object:

    model.execute(cdb, data_out, alloc_len) -> (status, data_in, sense)

The model is test_bscrypto.EmulatedTapeDrive(profile="ibm"), the one the
unit tests drive at the ioctl boundary.
Prints "READY model=<which>" on stdout once it serves the ring, and appends
one JSON line per command to the log (what st actually sends, for the model
authors).  Ring layout: include/uapi/linux/target_core_user.h.
"""

import argparse
import contextlib
import json
import mmap
import os
import struct
import sys
import time
import traceback

# Mailbox (offset 0 of the region): version, flags, cmdr_off, cmdr_size,
# cmd_head (written by the kernel); cmd_tail (ours) sits on its own
# cache line at 64.
MAILBOX = struct.Struct("<HHIII")
TAIL_OFFSET = 64
FLAG_CAP_READ_LEN = 1 << 1       # kernel accepts rsp.read_len

# Command entry: hdr {len_op u32, cmd_id u16, kflags u8, uflags u8}, then
# req {iov_cnt, iov_bidi_cnt, iov_dif_cnt u32, (pad), cdb_off u64, 2 pads}
# and iov[] {u64 offset, u64 length} at 48.  The response overlays req:
# scsi_status u8 at 8, read_len u32 at 12, sense at 16.
ENTRY_HDR = struct.Struct("<IHBB")
REQ = struct.Struct("<III4xQ")
IOV = struct.Struct("<QQ")
IOV_OFFSET = 48
OP_CMD = 1                       # other entry ops (PAD, TMR) are skipped
UFLAG_READ_LEN = 0x2
SENSE_MAX = 96

# The ring does not say which way data flows; these opcodes send data to
# the device, every other one may return data.
DATA_OUT_OPCODES = {0x0A, 0x15, 0x1D, 0x2A, 0x3B, 0x4C, 0x55, 0x5F, 0x8A,
                    0x8D, 0xAA, 0xB5}

OPCODE_NAMES = {
    0x00: "TEST UNIT READY", 0x01: "REWIND", 0x03: "REQUEST SENSE",
    0x04: "FORMAT MEDIUM", 0x05: "READ BLOCK LIMITS", 0x08: "READ(6)",
    0x0A: "WRITE(6)", 0x10: "WRITE FILEMARKS(6)", 0x11: "SPACE(6)",
    0x12: "INQUIRY", 0x13: "VERIFY(6)", 0x15: "MODE SELECT(6)",
    0x16: "RESERVE(6)", 0x17: "RELEASE(6)", 0x19: "ERASE(6)",
    0x1A: "MODE SENSE(6)", 0x1B: "LOAD UNLOAD", 0x1C: "RECEIVE DIAGNOSTIC",
    0x1D: "SEND DIAGNOSTIC", 0x1E: "PREVENT ALLOW MEDIUM REMOVAL",
    0x2B: "LOCATE(10)", 0x34: "READ POSITION", 0x3B: "WRITE BUFFER",
    0x3C: "READ BUFFER", 0x44: "REPORT DENSITY SUPPORT", 0x4C: "LOG SELECT",
    0x4D: "LOG SENSE", 0x55: "MODE SELECT(10)", 0x5A: "MODE SENSE(10)",
    0x5E: "PERSISTENT RESERVE IN", 0x5F: "PERSISTENT RESERVE OUT",
    0x8C: "READ ATTRIBUTE", 0x8D: "WRITE ATTRIBUTE", 0x92: "LOCATE(16)",
    0xA0: "REPORT LUNS", 0xA2: "SECURITY PROTOCOL IN", 0xA3: "MAINTENANCE IN",
    0xB5: "SECURITY PROTOCOL OUT",
}


def cdb_length(cdb0, byte7=0):
    """CDB length from the opcode's group code (SPC-4 4.2.5.1)."""
    group = cdb0 >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    if cdb0 == 0x7F:
        return 8 + byte7
    return 16


def internal_error_sense():
    """HARDWARE ERROR, INTERNAL TARGET FAILURE: the model raised."""
    s = bytearray(18)
    s[0], s[2], s[7], s[12] = 0x70, 0x04, 10, 0x44
    return bytes(s)


# ---- The model ---------------------------------------------------------------------

def load_model():
    """The test suite's drive emulation: the same model the unit tests use.

    There is deliberately no fallback: a kernel test against a different model
    would prove nothing about the one the suite checks.
    """
    sys.path.insert(0, os.getcwd())
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    # stdout carries the READY line: keep import-time prints off it.
    with contextlib.redirect_stdout(sys.stderr):
        from test_bscrypto import EmulatedTapeDrive
        model = EmulatedTapeDrive(profile="ibm")
    return model, 'test_bscrypto.EmulatedTapeDrive(profile="ibm")'


HEAD_BYTES = 24


class CommandLog:
    """One JSON line per command, flushed at once so nothing is lost."""

    def __init__(self, path):
        self.f = open(path, "a") if path else None

    def write(self, cdb, data_out, alloc_len, status, data_in, sense):
        if not self.f:
            return
        self.f.write(json.dumps({
            "t": round(time.monotonic(), 3), "op": "0x%02x" % cdb[0],
            "name": OPCODE_NAMES.get(cdb[0], "?"), "cdb": cdb.hex(" "),
            "out": len(data_out), "alloc": alloc_len, "status": status,
            "in": len(data_in), "sense": sense[:18].hex(" "),
            # The first bytes are enough to see pages and headers.
            "out_head": data_out[:HEAD_BYTES].hex(" "),
            "in_head": data_in[:HEAD_BYTES].hex(" ")}) + "\n")
        self.f.flush()


def call_model(model, cdb, data_out, alloc_len):
    """Run the model; a raising or malformed model still answers the kernel."""
    try:
        status, data_in, sense = model.execute(cdb, data_out, alloc_len)
        return int(status), bytes(data_in or b""), bytes(sense or b"")
    except Exception:
        traceback.print_exc()
        return 2, b"", internal_error_sense()


# ---- The ring ------------------------------------------------------------------------

class Ring:
    def __init__(self, uio_path):
        name = os.path.basename(uio_path)
        with open("/sys/class/uio/%s/maps/map0/size" % name) as f:
            size = int(f.read().strip(), 16)
        self.fd = os.open(uio_path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        (self.version, self.flags, self.cmdr_off, self.cmdr_size,
         _) = MAILBOX.unpack_from(self.mm, 0)

    def _u32(self, offset):
        return struct.unpack_from("<I", self.mm, offset)[0]

    def serve(self, handle):
        """Forever: answer what is on the ring, then wait for a kick."""
        while True:
            if self.drain(handle):
                os.write(self.fd, b"\0\0\0\0")     # tell the kernel
            os.read(self.fd, 4)                    # blocks until new commands

    def drain(self, handle):
        answered = False
        tail = self._u32(TAIL_OFFSET)
        while tail != self._u32(12):                # cmd_head
            entry = self.cmdr_off + tail
            len_op = ENTRY_HDR.unpack_from(self.mm, entry)[0]
            if len_op & 7 == OP_CMD:
                self.answer(entry, handle)
                answered = True
            tail = (tail + (len_op & ~7)) % self.cmdr_size
            struct.pack_into("<I", self.mm, TAIL_OFFSET, tail)
        return answered

    def answer(self, entry, handle):
        iov_cnt, _, _, cdb_off = REQ.unpack_from(self.mm, entry + 8)
        iovs = [IOV.unpack_from(self.mm, entry + IOV_OFFSET + IOV.size * i)
                for i in range(iov_cnt)]
        head = self.mm[cdb_off:cdb_off + 8]
        cdb = bytes(self.mm[cdb_off:cdb_off + cdb_length(head[0], head[7])])
        total = sum(length for _, length in iovs)
        if cdb[0] in DATA_OUT_OPCODES:
            data_out = b"".join(self.mm[o:o + n] for o, n in iovs)
            alloc_len = 0
        else:
            data_out, alloc_len = b"", total
        status, data_in, sense = handle(cdb, data_out, alloc_len)
        data_in = data_in[:alloc_len]
        self.scatter(iovs, data_in)
        # The response overlays the request, so it is written last.
        self.mm[entry + 8] = status & 0xFF
        sense = sense[:SENSE_MAX]
        self.mm[entry + 16:entry + 16 + len(sense)] = sense
        if alloc_len and self.flags & FLAG_CAP_READ_LEN:
            # Lets short reads and data with CHECK CONDITION (ILI) through.
            self.mm[entry + 7] |= UFLAG_READ_LEN
            struct.pack_into("<I", self.mm, entry + 12, len(data_in))

    def scatter(self, iovs, data):
        pos = 0
        for offset, length in iovs:
            chunk = data[pos:pos + length]
            if not chunk:
                break
            self.mm[offset:offset + len(chunk)] = chunk
            pos += len(chunk)


def main(argv=None):
    ap = argparse.ArgumentParser(description="TCMU tape drive handler")
    ap.add_argument("uio", help="/dev/uioN of the target_core_user device")
    ap.add_argument("--log", help="append one JSON line per command here")
    args = ap.parse_args(argv)
    model, which = load_model()
    ring = Ring(args.uio)
    log = CommandLog(args.log)

    def handle(cdb, data_out, alloc_len):
        status, data_in, sense = call_model(model, cdb, data_out, alloc_len)
        log.write(cdb, data_out, alloc_len, status, data_in, sense)
        return status, data_in, sense

    # The model's description goes last: guest_init takes all after "model=".
    print("READY ring=v%d flags=0x%x cmdr_size=%d model=%s"
          % (ring.version, ring.flags, ring.cmdr_size, which), flush=True)
    # Nobody reads stdout after READY: a chatty model must not fill the pipe
    # and block, so send anything printed later to the stderr log.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    ring.serve(handle)


if __name__ == "__main__":
    main()
