"""The guest's test cases, as data.

Each case is a dict: "name", optional "needs" (cases that must have passed
first) and "steps", a list of step dicts that systest/guest_init.py runs in
order until one fails.  Step kinds (the first key names the kind):

  {"sh": "cmd"}                     shell command, must exit 0
  {"run": [argv], <checks>}         command; checks below
  {"wait": path} / {"gone": path}   wait until a path appears / disappears
  {"read": path, "equals": text}    a sysfs attribute's value
  {"realpath": path, "contains": s} where a sysfs link points (which host)
  {"call": name, ...}               a helper in guest_init.STEP_FUNCS
  {"tape": op, ...}                 open TAPE, do op, close; op is one of
        "rewind", "fsf" (+"count"), "position" (+"equals": block number),
        "write" / "read" (+"blocks": sizes; read also expects the filemark
        that closing after a write leaves), "read_fails" (+"errno": name)

Checks for "run": "rc" (an int, or "nonzero"); "stdout_has", "stderr_has",
"stdout_lacks" (substrings, case-insensitive); "stdout_re" (regex,
case-insensitive); "stderr_max_lines"; "no_traceback" (true unless given).
"""

TAPE = "/dev/nst0"

# Variable-size blocks written and read back (sizes chosen to cover tiny,
# odd, a typical Bareos label size and the 64 KiB Bareos default).
BLOCKS = [1, 512, 1001, 64512, 65536]


# The load case: a Bareos tape as the storage daemon writes it.  The label
# block goes first, unencrypted (Bareos's scsicrypto plugin loads the key only
# after the label), made with the test suite's label builder.
LOAD_VOLUME = "LOADTEST01"


def write_label(volume):
    """Shell step: a Bareos label block for `volume` written through st (closing
    the node after a write leaves a filemark)."""
    return ("cd /work && python3 -c \"import fcntl, os, struct, test_bscrypto as t; "
            "fd = os.open('%s', os.O_RDWR); "
            "fcntl.ioctl(fd, 0x40086D01, struct.pack('hi', 20, 0)); "   # MTSETBLK 0
            "os.write(fd, t.build_label_block(VolumeName='%s')); os.close(fd)\""
            % (TAPE, volume))


WRITE_LABEL = write_label(LOAD_VOLUME)
# The verify case: a tape written with key A; load with A proves it, B is cleared.
VERIFY_VOLUME = "VERIFY01"


def bscrypto(*args, **checks):
    """A bscrypto.py command line run from the payload directory /work."""
    return dict(run=["python3", "bscrypto.py"] + list(args), **checks)


CASES = [
    {"name": "boot", "steps": [
        {"sh": "modprobe sg && modprobe st"},
        {"read": "/sys/module/st/initstate", "equals": "live"},
    ]},

    {"name": "scsi_debug-attach", "needs": ["boot"], "steps": [
        {"sh": "modprobe scsi_debug ptype=1 max_luns=1 num_tgts=1 dev_size_mb=8"},
        {"wait": TAPE},
        {"read": "/sys/class/scsi_tape/nst0/device/type", "equals": "1"},
        {"read": "/sys/class/scsi_tape/nst0/device/vendor", "equals": "Linux"},
        # Transport check, independent of bscrypto: SPIN protocol 0 must come
        # back as CHECK CONDITION, ILLEGAL REQUEST, invalid opcode.
        {"call": "spin_sense", "status": 2, "key": 5, "asc": 0x20},
    ]},

    {"name": "scsi_debug-bscrypto", "needs": ["scsi_debug-attach"], "steps": [
        bscrypto("-e", TAPE, rc="nonzero", stderr_has=["no encryption support"],
                 stderr_max_lines=1),
    ]},

    {"name": "tcmu-attach", "needs": ["boot"], "steps": [
        # The TCMU tape must become st0: drop the scsi_debug one first.
        {"sh": "if grep -q '^scsi_debug ' /proc/modules; then rmmod scsi_debug; fi"},
        {"gone": TAPE},
        {"call": "tcmu_start"},
        {"wait": TAPE},
        {"read": "/sys/class/scsi_tape/nst0/device/type", "equals": "1"},
        {"realpath": "/sys/class/scsi_tape/nst0/device", "contains": "tcm_loop"},
    ]},

    {"name": "tcmu-rw", "needs": ["tcmu-attach"], "steps": [
        {"tape": "rewind"},
        {"tape": "write", "blocks": BLOCKS},
        {"tape": "rewind"},
        {"tape": "position", "equals": 0},
        {"tape": "read", "blocks": BLOCKS},
        {"tape": "rewind"},
        {"tape": "fsf", "count": 1},     # SPACE over the filemark
        {"tape": "position", "equals": len(BLOCKS) + 1},
        {"tape": "rewind"},
    ]},

    {"name": "tcmu-bscrypto", "needs": ["tcmu-attach"], "steps": [
        bscrypto("-g", "/tmp/kek.key", rc=0),
        bscrypto("-g", "/tmp/vol.key", "-w", "/tmp/kek.key", rc=0),
        bscrypto("-s", "/tmp/vol.key", "-w", "/tmp/kek.key", TAPE, rc=0),
        bscrypto("-e", TAPE, rc=0,
                 stdout_has=["Encryption Mode: Encrypt", "Decryption Mode: Mixed"]),
        {"tape": "rewind"},
        {"tape": "write", "blocks": BLOCKS},
        {"tape": "rewind"},
        bscrypto("-v", TAPE, rc=0, stdout_re=r"Encryption Status: Encryption Enabled",
                 stdout_lacks=["no valid key"]),
        {"tape": "read", "blocks": BLOCKS},
        bscrypto("-c", TAPE, rc=0),
        {"tape": "rewind"},
        bscrypto("-v", TAPE, rc=0, stdout_re=r"no valid key"),
        {"tape": "read_fails", "errno": "EIO"},
        {"tape": "rewind"},
    ]},

    {"name": "tcmu-load", "needs": ["tcmu-attach"], "steps": [
        bscrypto("-g", "/tmp/load-kek.key", rc=0),
        bscrypto("-g", "/tmp/load-other.key", rc=0),
        bscrypto("-g", "/tmp/load-vol.key", "-w", "/tmp/load-kek.key", rc=0),
        bscrypto("clear-key", TAPE, rc=0),
        {"tape": "rewind"},
        {"sh": WRITE_LABEL},                       # label, then a filemark on close
        bscrypto("set-key", TAPE, "/tmp/load-vol.key", "-w", "/tmp/load-kek.key", rc=0),
        {"tape": "write", "blocks": BLOCKS},       # encrypted with Bareos's key bytes
        bscrypto("clear-key", TAPE, rc=0),
        # The catalog's row for the volume, as psql -A -t -F '|' prints it.
        {"sh": "printf '%s|%%s\\n' \"$(cat /tmp/load-vol.key)\" > /tmp/media.txt" % LOAD_VOLUME},
        bscrypto("populate-cache", "/tmp/load.cryptoc", "--from-catalog", "/tmp/media.txt",
                 rc=0, stdout_has=["1 read, 1 added"]),
        {"tape": "rewind"},
        {"tape": "fsf", "count": 1},
        {"tape": "read_fails", "errno": "EIO"},   # no key: unreadable
        bscrypto("load", TAPE, "--cache", "/tmp/load.cryptoc", "--kek", "/tmp/load-other.key",
                 rc=3, stderr_has=["integrity check failed for volume %s: wrong KEK?"
                                   % LOAD_VOLUME], stderr_max_lines=1),
        bscrypto("load", TAPE, "--cache", "/tmp/load.cryptoc", "--kek", "/tmp/load-kek.key",
                 rc=0, stdout_has=["volume %s (from the tape label" % LOAD_VOLUME,
                                   "wrapped (54 characters)",
                                   "encryption Encrypt, decryption Mixed",
                                   "verify: block 2 is encrypted and the loaded key decrypts it"]),
        {"tape": "rewind"},
        {"tape": "fsf", "count": 1},
        {"tape": "read", "blocks": BLOCKS},        # the key load put in makes them readable
        bscrypto("clear-key", TAPE, rc=0),
        {"tape": "rewind"},
    ]},

    {"name": "tcmu-verify", "needs": ["tcmu-attach"], "steps": [
        bscrypto("-g", "/tmp/verify-kek.key", rc=0),
        bscrypto("-g", "/tmp/verify-a.key", "-w", "/tmp/verify-kek.key", rc=0),
        bscrypto("-g", "/tmp/verify-b.key", "-w", "/tmp/verify-kek.key", rc=0),
        bscrypto("clear-key", TAPE, rc=0),
        {"tape": "rewind"},
        {"sh": write_label(VERIFY_VOLUME)},         # label, then a filemark on close
        bscrypto("set-key", TAPE, "/tmp/verify-a.key", "--kek", "/tmp/verify-kek.key", rc=0),
        {"tape": "write", "blocks": BLOCKS},         # encrypted with key A, then a filemark
        bscrypto("clear-key", TAPE, rc=0),
        {"sh": "printf '%s|%%s\\n' \"$(cat /tmp/verify-a.key)\" > /tmp/verify-a.txt"
               " && printf '%s|%%s\\n' \"$(cat /tmp/verify-b.key)\" > /tmp/verify-b.txt"
               % (VERIFY_VOLUME, VERIFY_VOLUME)},
        {"tape": "rewind"},
        bscrypto("load", TAPE, "--catalog", "/tmp/verify-a.txt", "--kek", "/tmp/verify-kek.key",
                 rc=0, stdout_has=["volume %s (from the tape label" % VERIFY_VOLUME,
                                   "verify: block 2 is encrypted and the loaded key decrypts it"]),
        {"tape": "position", "equals": 0},           # verify leaves the tape rewound
        bscrypto("verify", TAPE, rc=0, stdout_has=["block 2 is encrypted and the loaded key "
                                                   "decrypts it"]),
        {"tape": "position", "equals": 0},
        bscrypto("load", TAPE, "--catalog", "/tmp/verify-b.txt", "--kek", "/tmp/verify-kek.key",
                 rc=14, stderr_has=["cannot decrypt volume %s's data with the key found in "
                                    "catalog export /tmp/verify-b.txt" % VERIFY_VOLUME,
                                    "the key was cleared from the drive"],
                 stderr_max_lines=1),
        bscrypto("-e", TAPE, rc=0,
                 stdout_has=["Encryption Mode: Disabled", "Decryption Mode: Disabled"]),
        bscrypto("verify", TAPE, rc=14, stderr_has=["the drive holds no key"],
                 stderr_max_lines=1),
        {"tape": "position", "equals": 0},
    ]},
]
