#!/usr/bin/env python3
# SPDX-License-Identifier: AGPL-3.0-or-later
"""bscrypto.py - Bareos tape encryption keys, crypto cache and LTO drive keys.

A drop-in, standard-library-only replacement for Bareos's ``bscrypto`` tool,
meant to be copied onto a bare rescue host.  Run ``bscrypto.py selftest``
first, then ``bscrypto.py --help``.

Sections, in the order data flows:
    constants and errors; AES and RFC 3394 key wrap; encodings and passphrases;
    key files; crypto cache; SCSI transport; SSC pages; volume label;
    operations; CLI.
"""

import binascii
import codecs
import errno
import fcntl
import gc
import io
import os
import stat
import struct
import sys
import time
from collections import namedtuple

# Run by Python 2 on an old rescue host: one line, not a traceback.  The file
# stays parseable by Python 2.7 so that this check can run at all.
if sys.version_info < (3, 6):
    sys.stderr.write("bscrypto.py needs Python 3.6 or later: run it with python3\n")
    sys.exit(1)

__version__ = "1.0.0"

__all__ = [
    "AES", "aes_key_wrap", "aes_key_unwrap", "b64encode", "b64decode",
    "generate_passphrase", "kek_from_text", "drive_key_bytes",
    "BscryptoError", "main",
]


# ---------------------------------------------------------------------------
# Constants, errors and exit codes
# ---------------------------------------------------------------------------

# Bareos DEFAULT_PASSPHRASE_LENGTH; the wrapped form is 8 bytes longer (RFC 3394).
PASSPHRASE_LENGTH = 32
WRAPPED_LENGTH = PASSPHRASE_LENGTH + 8
# Bareos's passphrase alphabet: no quote, backslash, backtick or space, so the
# passphrase survives config files and shells.
PASSPHRASE_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    "!@#$%^&*()-_=+|[]{};:,.<>?/~"
)
# Bareos reads at most this many bytes of any key file.
KEY_FILE_READ_LIMIT = 64
# Bareos strips exactly these from the end of a key file, nothing else.
KEY_FILE_STRIP = b"\n\r "
# Bareos uses the first 16 bytes of the KEK file (AES-128), zero padded.
KEK_LENGTH = 16
KEY_PROMPT = "Enter Encryption Key (close with ^D): "
# -b -k: Bareos decodes into 36 bytes and refuses longer text (prints nothing).
BASE64_KEY_LIMIT = 48

# Exit codes: one per class of failure so scripts can tell them apart.
# 1 is what Bareos's bscrypto uses for every usage error; keep it for those.
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_KEY_FILE = 2          # key file unreadable, malformed, or would be overwritten
EXIT_UNWRAP = 3            # integrity check failed: wrong KEK or corrupt key
EXIT_CACHE = 4             # crypto cache unreadable or not writable
EXIT_DEVICE = 5            # device cannot be opened (missing, busy)
EXIT_PERMISSION = 6        # not allowed to send SCSI commands
EXIT_NOT_SCSI = 7          # the node does not take SCSI pass-through
EXIT_NOT_READY = 8         # no medium / drive not ready
EXIT_NO_ENCRYPTION = 9     # drive has no encryption support
EXIT_KEY_REFUSED = 10      # drive refused the key page (index, AME)
EXIT_SCSI = 11             # any other SCSI or transport failure
EXIT_LABEL = 12            # not a Bareos volume / label unreadable
EXIT_NOT_FOUND = 13        # volume not in the cache or catalog
EXIT_WRONG_KEY = 14        # the drive cannot decrypt the tape with the loaded key
EXIT_SD_NOT_READY = 15     # prepare-sd: the storage daemon's setup misses requirements
EXIT_KIT_INCOMPLETE = 16   # dr-kit: kit incomplete (named ...-INCOMPLETE) or not written
EXIT_OUTPUT = 17           # standard output not writable: closed, broken pipe, disk full, EIO
EXIT_INTERNAL = 70         # a bug: please report it with --debug output
# The original flags' usage errors exit as Bareos's CLI11 parser does.
EXIT_CLI_CONVERSION = 104  # a value of the wrong kind (-d abc)
EXIT_CLI_EXCLUDES = 108    # options Bareos does not combine (-g F -k F)
EXIT_CLI_EXTRAS = 109      # an unknown option or a second device name
EXIT_CLI_NOT_FOUND = 113   # -dt (Bareos: use --dt)
EXIT_CLI_MISMATCH = 114    # an option without its value, or given twice

EXIT_CODES = (
    (EXIT_OK, "success"),
    (EXIT_USAGE, "usage error of a subcommand or Bareos's own checks; selftest failure"),
    (EXIT_KEY_FILE, "key file unreadable, malformed or already exists"),
    (EXIT_UNWRAP, "key unwrap failed: wrong KEK or corrupt key"),
    (EXIT_CACHE, "crypto cache unreadable or not writable (left untouched)"),
    (EXIT_DEVICE, "device cannot be opened (missing, busy)"),
    (EXIT_PERMISSION, "permission denied for SCSI pass-through"),
    (EXIT_NOT_SCSI, "device node does not accept SCSI pass-through"),
    (EXIT_NOT_READY, "no medium or drive not ready"),
    (EXIT_NO_ENCRYPTION, "drive has no encryption support"),
    (EXIT_KEY_REFUSED, "drive refused the key (algorithm index, not AME)"),
    (EXIT_SCSI, "other SCSI or transport error"),
    (EXIT_LABEL, "not a Bareos volume or label unreadable"),
    (EXIT_NOT_FOUND, "volume not found in cache or catalog"),
    (EXIT_WRONG_KEY, "the loaded key does not decrypt this tape (load cleared it)"),
    (EXIT_SD_NOT_READY, "prepare-sd: storage daemon requirements missing"),
    (EXIT_KIT_INCOMPLETE, "dr-kit: kit incomplete (named ...-INCOMPLETE) or not written"),
    (EXIT_OUTPUT, "standard output could not be written (closed, broken pipe, disk full)"),
    (EXIT_INTERNAL, "internal error (a bug)"),
    (EXIT_CLI_CONVERSION, "original flags: a value of the wrong kind (-d abc), as Bareos"),
    (EXIT_CLI_EXCLUDES, "original flags: options Bareos does not combine (-g F -k F)"),
    (EXIT_CLI_EXTRAS, "original flags: unknown option or a second device name"),
    (EXIT_CLI_NOT_FOUND, "original flags: -dt (use --dt)"),
    (EXIT_CLI_MISMATCH, "original flags: option without its value, or given twice"),
)


class BscryptoError(Exception):
    """A failure the user can act on: printed as one line, no traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message, exit_code=None):
        Exception.__init__(self, message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(BscryptoError):
    exit_code = EXIT_USAGE


class KeyFileError(BscryptoError):
    exit_code = EXIT_KEY_FILE


class UnwrapError(BscryptoError):
    exit_code = EXIT_UNWRAP


class OutputError(BscryptoError):
    exit_code = EXIT_OUTPUT


# What a failed write to stdout reports: the environment, not a bug.
OUTPUT_ERRNOS = frozenset((errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT,
                           errno.EFBIG, errno.ECONNRESET))


# SCSI command timeout for the drive operations (-s, -c, -e, -v and their
# subcommands): loading and threading a tape takes tens of seconds.
DEFAULT_SCSI_TIMEOUT = 60
# The crypto cache layouts (CACHE_LAYOUTS), named here for the -p/-r option.
CACHE_LAYOUT_NAMES = ("lp64-le", "ilp32-le", "lp64-be", "ilp32-be")


# Debug level set by -d/--debug-level; debug() never receives key material.
DEBUG_LEVEL = 0
DEBUG_TIMESTAMPS = False        # --dt/--debug-timestamps, as Bareos


def _program():
    """This program as the user invoked it, for hints: `python3 bscrypto.py`
    when a Python ran the file, its name when it ran from PATH (`bscrypto` on
    a Bareos host is the C tool, which has no subcommands)."""
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else "bscrypto.py"
    if arg0 in ("-c", "-m"):
        arg0 = "bscrypto.py"
    if os.sep in arg0 and os.access(arg0, os.X_OK):
        directory, name = os.path.split(arg0)
        path = os.environ.get("PATH", "").split(os.pathsep)
        return name if os.path.realpath(directory) in map(os.path.realpath, path) else arg0
    return "python3 " + arg0


def debug(level, message):
    if DEBUG_LEVEL >= level:
        stamp = ""
        if DEBUG_TIMESTAMPS:
            now = time.time()
            stamp = time.strftime("%d-%b-%Y %H:%M:%S", time.localtime(now)) + \
                ".%06d " % (now % 1 * 1e6)
        sys.stderr.write("%sbscrypto: debug: %s\n" % (stamp, message))


# --syslog: one line per key change or check result, as stenc logs every key
# change (device, volume, algorithm index, key instance counter; never keys).
SYSLOG = False
# --json: an error is also printed on stdout as {"error": ..., "exit_code": ...}.
JSON_ERRORS = False


def audit(message, error=False):
    """Log one line to syslog when --syslog was given; never pass key material."""
    if SYSLOG:
        _syslog_send(message, error)


def _syslog_send(message, error=False):
    import syslog
    syslog.openlog("bscrypto", syslog.LOG_PID, syslog.LOG_USER)
    syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_NOTICE, message)


def warn(message):
    try:
        sys.stderr.write("bscrypto: warning: %s\n" % message)
    except (OSError, ValueError, AttributeError):
        pass        # stderr closed or full: a warning must not turn success into failure


# ---------------------------------------------------------------------------
# AES (FIPS-197) and RFC 3394 key wrap
# ---------------------------------------------------------------------------
#
# Word-oriented: the whole 16-byte state is one int.  A round unpacks its 16
# bytes and XORs one table entry per byte (the entry already holds SubBytes,
# ShiftRows and MixColumns for that byte, placed in its output column); the
# round key is folded into byte 0's table per key, so a round is 16 look-ups
# and 15 XORs, no shifts or masks.  The 32 shared tables of each direction
# are built on first use of that direction (an unwrap never encrypts), so
# importing the module stays cheap.

_SBOX = bytes.fromhex(
    "637c777bf26b6fc53001672bfed7ab76ca82c97dfa5947f0add4a2af9ca472c0"
    "b7fd9326363ff7cc34a5e5f171d8311504c723c31896059a071280e2eb27b275"
    "09832c1a1b6e5aa0523bd6b329e32f8453d100ed20fcb15b6acbbe394a4c58cf"
    "d0efaafb434d338545f9027f503c9fa851a3408f929d38f5bcb6da2110fff3d2"
    "cd0c13ec5f974417c4a77e3d645d197360814fdc222a908846eeb814de5e0bdb"
    "e0323a0a4906245cc2d3ac629195e479e7c8376d8dd54ea96c56f4ea657aae08"
    "ba78252e1ca6b4c6e8dd741f4bbd8b8a703eb5664803f60e613557b986c11d9e"
    "e1f8981169d98e949b1e87e9ce5528df8ca1890dbfe6426841992d0fb054bb16"
)

# decrypt (False/True) -> (round tables, final-round tables, column words by row).
_TABLES = {}


def _aes_tables(decrypt):
    """The tables of one direction; the column words are InvMixColumns' when decrypting."""
    tables = _TABLES.get(decrypt)
    if tables is None:
        # GF(2^8) doubling as a translate table; composing it gives x4, x8.
        x2 = bytes((i << 1) ^ (0x11B if i & 0x80 else 0) for i in range(256))
        if decrypt:
            box = bytearray(256)
            for i, v in enumerate(_SBOX):
                box[v] = i
            box = bytes(box)
            x4 = x2.translate(x2)
            # InvMixColumns column for input row 0: (14, 9, 13, 11) times InvS.
            column = [(e ^ f ^ d) << 24 | (e ^ i) << 16 | (e ^ f ^ i) << 8 | (e ^ d ^ i)
                      for i, d, f, e in zip(box, box.translate(x2), box.translate(x4),
                                            box.translate(x4).translate(x2))]
        else:
            box = _SBOX
            # MixColumns column for input row 0: (2, 1, 1, 3) times S.
            column = [a << 24 | s << 16 | s << 8 | (a ^ s) for s, a in zip(box, box.translate(x2))]
        # Row r of a column is the row-0 column rotated right by 8*r bits.
        rows = [column] + [[(w >> n | w << (32 - n)) & 0xFFFFFFFF for w in column]
                           for n in (8, 16, 24)]
        # Input byte p = 4*col + row; ShiftRows moves it to column
        # (col - row) % 4, InvShiftRows to (col + row) % 4.
        direction = 1 if decrypt else -1
        shifts = [32 * (3 - (p // 4 + direction * (p % 4)) % 4) for p in range(16)]
        round_tables = tuple([w << shift for w in rows[p % 4]] for p, shift in enumerate(shifts))
        final_tables = tuple([b << (shift + 8 * (3 - p % 4)) for b in box]
                             for p, shift in enumerate(shifts))
        tables = _TABLES[decrypt] = (round_tables, final_tables, rows)
    return tables


def _aes_rounds(x, schedule):
    """All rounds of AES on a 128-bit int; the same code serves both directions.

    round_tables holds, per middle round, byte 0's table with that round's key
    already XORed in (final[0] likewise holds the last round key): one XOR
    fewer per round, the cost that dominates on Python 3.12+.
    """
    first, round_tables, tables, final = schedule
    _, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = tables
    x ^= first
    for t0 in round_tables:
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = x.to_bytes(16, "big")
        x = (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7] ^ t8[b8]
             ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15])
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = final
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = x.to_bytes(16, "big")
    return (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7] ^ t8[b8]
            ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15])


def _expand_key(key):
    """FIPS-197 key expansion: the list of 32-bit round-key words."""
    nk = len(key) // 4
    sbox = _SBOX
    w = [int.from_bytes(key[4 * i:4 * i + 4], "big") for i in range(nk)]
    rcon = 1
    for i in range(nk, 4 * (nk + 7)):
        t = w[i - 1]
        if i % nk == 0:
            t = (sbox[t >> 16 & 255] << 24 | sbox[t >> 8 & 255] << 16
                 | sbox[t & 255] << 8 | sbox[t >> 24]) ^ (rcon << 24)
            rcon = (rcon << 1) ^ (0x11B if rcon & 0x80 else 0)
        elif nk > 6 and i % nk == 4:
            t = (sbox[t >> 24] << 24 | sbox[t >> 16 & 255] << 16
                 | sbox[t >> 8 & 255] << 8 | sbox[t & 255])
        w.append(w[i - nk] ^ t)
    return w


def _keyed_rounds(round_keys, tables, final):
    """The schedule _aes_rounds takes: one key and direction (round keys in tables)."""
    t0 = tables[0]
    keyed = tuple([v ^ k for v in t0] for k in round_keys[1:-1])
    last = round_keys[-1]
    return (round_keys[0], keyed, tables, ([v ^ last for v in final[0]],) + tuple(final[1:]))


# Key schedules by (key, direction): a KEK unwraps many keys, so expand it once.
_SCHEDULES = {}


def _key_schedule(key, decrypt):
    """The _aes_rounds schedule for one key and direction, made once."""
    sched = _SCHEDULES.get((key, decrypt))
    if sched is None:
        round_tables, final_tables, columns = _aes_tables(decrypt)
        w = _expand_key(key)
        rounds = len(w) // 4
        keys = [w[4 * r] << 96 | w[4 * r + 1] << 64 | w[4 * r + 2] << 32 | w[4 * r + 3]
                for r in range(rounds)]
        if decrypt:
            # Equivalent inverse cipher: reversed round keys, the middle ones
            # through InvMixColumns (the column words hold InvS, so S goes first).
            sbox = _SBOX
            middle = []
            for r in range(rounds - 2, 0, -1):
                k = 0
                for word in w[4 * r:4 * r + 4]:
                    k = k << 32 | (columns[0][sbox[word >> 24]] ^ columns[1][sbox[word >> 16 & 255]]
                                   ^ columns[2][sbox[word >> 8 & 255]] ^ columns[3][sbox[word & 255]])
                middle.append(k)
            keys = [keys[-1]] + middle + [keys[0]]
        sched = _keyed_rounds(keys, round_tables, final_tables)
        if len(_SCHEDULES) >= 32:
            _SCHEDULES.clear()
        _SCHEDULES[key, decrypt] = sched
    return sched


class AES(object):
    """AES-128/192/256 on single 16-byte blocks (ECB); each direction's key
    schedule is made on its first use, once per key."""

    __slots__ = ("_key", "_enc", "_dec")

    def __init__(self, key):
        key = bytes(key)
        if len(key) not in (16, 24, 32):
            raise ValueError("AES key must be 16, 24 or 32 bytes")
        self._key, self._enc, self._dec = key, None, None

    def _schedule(self, decrypt):
        if decrypt:
            self._dec = _key_schedule(self._key, True)
            return self._dec
        self._enc = _key_schedule(self._key, False)
        return self._enc

    def encrypt_int(self, block):
        """Encrypt one block given and returned as a 128-bit big-endian int."""
        return _aes_rounds(block, self._enc or self._schedule(False))

    def decrypt_int(self, block):
        """Decrypt one block given and returned as a 128-bit big-endian int."""
        return _aes_rounds(block, self._dec or self._schedule(True))

    def encrypt_block(self, block):
        if len(block) != 16:
            raise ValueError("AES block must be 16 bytes")
        x = int.from_bytes(block, "big")
        return _aes_rounds(x, self._enc or self._schedule(False)).to_bytes(16, "big")

    def decrypt_block(self, block):
        if len(block) != 16:
            raise ValueError("AES block must be 16 bytes")
        x = int.from_bytes(block, "big")
        return _aes_rounds(x, self._dec or self._schedule(True)).to_bytes(16, "big")


# RFC 3394 section 2.2.3.1 default initial value.
KEY_WRAP_IV = 0xA6A6A6A6A6A6A6A6
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _check_wrap_args(kek, data, minimum):
    if len(kek) not in (16, 24, 32):
        raise ValueError("KEK must be 16, 24 or 32 bytes")
    if len(data) % 8 or len(data) < minimum:
        raise ValueError("key data must be a multiple of 8 bytes, at least %d" % minimum)


def _constant_time_equal(a, b):
    """Compare without an early exit, so timing does not say how much matched."""
    try:
        from _operator import _compare_digest  # what hmac.compare_digest is; hmac imports hashlib
    except ImportError:
        from hmac import compare_digest as _compare_digest
    return _compare_digest(a, b)


def aes_key_wrap(kek, plaintext):
    """RFC 3394 section 2.2.1 wrap with the default IV."""
    _check_wrap_args(kek, plaintext, 16)
    schedule = _key_schedule(bytes(kek), False)  # _aes_rounds directly: a call less per block
    n = len(plaintext) // 8
    r = [int.from_bytes(plaintext[8 * i:8 * i + 8], "big") for i in range(n)]
    a = KEY_WRAP_IV
    t = 1
    for _ in range(6):
        for i in range(n):
            b = _aes_rounds(a << 64 | r[i], schedule)
            a = (b >> 64) ^ t
            r[i] = b & _MASK64
            t += 1
    return b"".join(x.to_bytes(8, "big") for x in [a] + r)


def aes_key_unwrap(kek, wrapped):
    """RFC 3394 section 2.2.2 unwrap; UnwrapError when the check value differs."""
    _check_wrap_args(kek, wrapped, 24)
    schedule = _key_schedule(bytes(kek), True)  # _aes_rounds directly: a call less per block
    n = len(wrapped) // 8 - 1
    a = int.from_bytes(wrapped[:8], "big")
    r = [int.from_bytes(wrapped[8 * i + 8:8 * i + 16], "big") for i in range(n)]
    t = 6 * n
    for _ in range(6):
        for i in range(n - 1, -1, -1):
            b = _aes_rounds((a ^ t) << 64 | r[i], schedule)
            a = b >> 64
            r[i] = b & _MASK64
            t -= 1
    if not _constant_time_equal(a.to_bytes(8, "big"), KEY_WRAP_IV.to_bytes(8, "big")):
        raise UnwrapError("integrity check failed")
    return b"".join(x.to_bytes(8, "big") for x in r)


# ---------------------------------------------------------------------------
# Encodings and passphrases
# ---------------------------------------------------------------------------

_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def b64encode(data):
    """Standard base64 without '=' padding, as Bareos writes it (32 -> 43 chars)."""
    return binascii.b2a_base64(bytes(data)).rstrip(b"=\n").decode("ascii")


def b64decode(text, need=None):
    """Decode Bareos base64: stops at the first space, padding optional, a
    last lone character (length 1 mod 4) ignored, as Bareos's Base64ToBin.

    Bareos decodes invalid characters as zero bits; we refuse them when they
    change the key, because a mistyped key silently becomes a different key.
    When the caller uses only the first `need` bytes, characters after those
    bytes (a key file ending in a TAB) are ignored as Bareos ignores them.
    The message gives positions, never the characters: they are key material.
    """
    if isinstance(text, str):
        text = text.encode("ascii", "replace")      # any other character is refused below
    text = text.split(b" ", 1)[0].rstrip(b"=")
    bad = [i for i, c in enumerate(text, 1) if c not in _B64_ALPHABET]
    if bad and need is not None and (bad[0] - 1) * 6 // 8 >= need:
        text, bad = text[:bad[0] - 1], []           # the bad ones add no bit to those bytes
    if bad:
        raise ValueError("not base64: %d of its %d characters %s outside the base64 alphabet "
                         "(the first at position %d)" % (len(bad), len(text),
                                                          "is" if len(bad) == 1 else "are",
                                                          bad[0]))
    if len(text) % 4 == 1:
        text = text[:-1]        # its 6 bits make no whole byte: Bareos drops them
    return binascii.a2b_base64(text + b"=" * (-len(text) % 4))


def generate_passphrase(length=PASSPHRASE_LENGTH):
    """A random passphrase from Bareos's alphabet, without modulo bias.

    Bytes >= 180 (2 x 90) are rejected, so byte % 90 is uniform.
    """
    alphabet = PASSPHRASE_ALPHABET
    limit = 256 - 256 % len(alphabet)
    out = []
    while len(out) < length:
        out.extend(alphabet[b % len(alphabet)] for b in os.urandom(2 * length) if b < limit)
    return "".join(out[:length]).encode("ascii")


def kek_from_text(text):
    """The AES-128 KEK Bareos derives from a KEK file or config string."""
    return bytes(text[:KEK_LENGTH]).ljust(KEK_LENGTH, b"\0")


def drive_key_bytes(passphrase):
    """The 32 key bytes Bareos really loads into the drive for a passphrase.

    Bareos copies the passphrase with a bounded string copy: at most 31
    characters, then NUL, the rest zero; a NUL inside ends the copy.  Every
    tape Bareos wrote is encrypted with exactly these bytes.
    """
    text = bytes(passphrase).split(b"\0", 1)[0][:PASSPHRASE_LENGTH - 1]
    return text.ljust(PASSPHRASE_LENGTH, b"\0")


def wrap_passphrase(kek_text, passphrase):
    """Catalog form of a passphrase under a KEK: base64(wrap(passphrase))."""
    return b64encode(aes_key_wrap(kek_from_text(kek_text), passphrase))


def unwrap_passphrase(kek_text, wrapped_b64):
    """Inverse of wrap_passphrase; ValueError for bad base64, UnwrapError for a bad KEK."""
    wrapped = b64decode(wrapped_b64, WRAPPED_LENGTH)
    if len(wrapped) % 8 or len(wrapped) < 24:
        raise ValueError("decodes to %d bytes, a wrapped key is %d" % (len(wrapped), WRAPPED_LENGTH))
    return aes_key_unwrap(kek_from_text(kek_text), wrapped)


# ---------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------


def bareos_key_buffer(data):
    """What Bareos's zeroed 64-byte buffer holds after reading a key file.

    Bareos strips trailing \\n, \\r and spaces from the C string (up to the
    first NUL), turning them into NULs; bytes after a NUL stay in the buffer.
    A key is the C string; a KEK is the buffer's first 16 bytes.
    """
    data = bytes(data[:KEY_FILE_READ_LIMIT])
    end = data.find(b"\0")
    if end < 0:
        return data.rstrip(KEY_FILE_STRIP)
    text = data[:end].rstrip(KEY_FILE_STRIP)
    return text + bytes(end - len(text)) + data[end:]


def strip_key_text(data):
    """Bareos's key rule: the first 64 bytes up to the first NUL, trailing
    \\n, \\r and spaces removed."""
    return bareos_key_buffer(data).split(b"\0", 1)[0]


def read_key_file(path, what="key file", prompt=True, kek=False):
    """Read a key file (or stdin for '-') the way Bareos does: the key text,
    or with kek=True the buffer whose first 16 bytes are the KEK."""
    if path == "-" and prompt:
        sys.stdout.write(KEY_PROMPT)
        sys.stdout.flush()
    data = read_input(path, what, KEY_FILE_READ_LIMIT)
    source = "on stdin" if path == "-" else path
    if not data:
        raise KeyFileError("%s %s is empty" % (what, source))
    buffer = bareos_key_buffer(data)
    text = strip_key_text(data)
    nul = data.find(b"\0", 0, KEY_FILE_READ_LIMIT)
    if kek:
        if not kek_from_text(buffer).strip(b"\0"):
            raise KeyFileError("%s %s is blank: Bareos would have used an all-zero KEK; "
                               "refused (give the real KEK file)" % (what, source))
        if 0 <= nul < KEK_LENGTH:
            warn("%s %s has a NUL byte at offset %d: as Bareos, the KEK is its first %d "
                 "bytes as they are" % (what, source, nul, KEK_LENGTH))
        return buffer
    if not text:
        raise KeyFileError("%s %s is blank%s: Bareos would have used an empty key; refused"
                           % (what, source, " before its first NUL byte" if nul >= 0 else ""))
    if nul >= 0:
        warn("%s %s has a NUL byte at offset %d: as Bareos, the key ends there" % (what, source,
                                                                                   nul))
    return text


def _terminal_fd(stream):
    """The file descriptor of stream when it is a terminal, else None."""
    try:
        fd = stream.fileno()
        return fd if os.isatty(fd) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _read_stdin_bytes(limit=None):
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    if stream is None:          # started with stdin closed
        return b""
    if limit is None:
        data = stream.read()
        return data.encode("latin-1") if isinstance(data, str) else data
    if stream is sys.stdin:
        return sys.stdin.read(limit).encode("latin-1")
    fd = _terminal_fd(stream)
    if fd is not None:
        # As Bareos's one read(): a terminal returns the line at Enter or ^D.
        return os.read(fd, limit)
    data = b""
    while len(data) < limit:
        chunk = stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- safe file access, shared by key files, exports, configs and the cache --
#
# Root runs this tool in directories other users own (/var/lib/bareos belongs
# to the bareos user).  So inputs are checked before they are opened (a FIFO
# would block, a tape device rewinds on close), opened non-blocking and
# checked again by fstat; outputs are resolved once, then written through the
# one directory file descriptor by temporary file and rename (or link, which
# fails when the name was taken meanwhile), and root never follows a symlink
# another user owns.

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NODE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))
# The names under which a process reaches its own open descriptors.
_STDIO_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _not_regular(st):
    """The OSError for a node that is not a regular file."""
    kind = next((name for test, name in _NODE_KINDS if test(st.st_mode)), "a special file")
    return OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                   "%s, not a regular file" % kind)


def check_path(path, what):
    """UsageError for an empty path: an unset shell variable must not mean "none"."""
    if path is not None and not path:
        raise UsageError("the %s path is empty ('', an unset shell variable?)" % what)


def read_regular_file(path, limit=None, dir_fd=None, follow=True, keep_open=False):
    """(bytes, os.stat_result) of a regular file; OSError for anything else.

    Checked before it is opened, opened non-blocking and checked again by
    fstat, so a FIFO or device swapped in never blocks or is read.  With
    keep_open, (bytes, stat, the open file).
    """
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | _O_CLOEXEC
    f = os.fdopen(os.open(path, flags | (0 if follow else _O_NOFOLLOW), dir_fd=dir_fd), "rb")
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st)
        data = f.read() if limit is None else f.read(limit)
    except BaseException:
        f.close()
        raise
    if keep_open:
        return data, st, f
    f.close()
    return data, st


def read_input(path, what, limit=None):
    """The bytes of an input file, or of stdin for '-'; KeyFileError saying why not."""
    check_path(path, what)
    if path == "-":
        return _read_stdin_bytes(limit)
    try:
        return read_regular_file(path, limit)[0]
    except OSError as e:
        raise KeyFileError("cannot read %s %s: %s" % (what, path, e.strerror or e))


def _refused_link(path, st):
    return OSError(errno.EPERM, "%s is a symlink owned by uid %d; as root only root's symlinks "
                                "are followed (another user could point it anywhere): give "
                                "the path it points to" % (path, st.st_uid))


def resolve_path(path):
    """os.path.realpath, except that root refuses (OSError) a symlink another
    user owns: the owner of a directory like /var/lib/bareos could point it
    at any file on the host."""
    if os.geteuid() != 0:
        return os.path.realpath(path)
    # Not abspath: it would drop "link/.." before the link is read.
    done, todo, hops = "/", os.path.join(os.getcwd(), path).split("/")[::-1], 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        here = os.path.join(done, part)
        try:
            st = os.lstat(here)
        except OSError:
            st = None
        if st is None or not stat.S_ISLNK(st.st_mode):
            done = here
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, "too many levels of symbolic links")
        if st.st_uid != 0:
            raise _refused_link(here, st)
        target = os.readlink(here)
        todo.extend(target.split("/")[::-1])
        if target.startswith("/"):
            done = "/"
    return done


def open_directory(directory):
    return os.open(directory or ".", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)


def _lstat_at(name, dir_fd):
    """lstat of name in dir_fd, or None when there is nothing by that name."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def _same_file(a, b):
    return (a is None and b is None) or (a is not None and b is not None
                                         and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino))


def _fsync_directory(dir_fd):
    try:
        os.fsync(dir_fd)
    except OSError:
        pass    # some filesystems cannot sync a directory; the rename is still atomic


def _remove_stale_temps(dir_fd, base):
    """Temporary files of writers that died (killed mid-write) beside the file:
    each is a partial copy of every key."""
    prefix = "." + base + "."
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for name in names:
        parts = name[len(prefix):].split(".")
        if not (name.startswith(prefix) and name.endswith(".tmp") and len(parts) == 3
                and parts[0].isdigit()):
            continue
        try:
            os.kill(int(parts[0]), 0)
            continue                    # its writer still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue                    # alive under another user
        try:
            os.unlink(name, dir_fd=dir_fd)
            debug(1, "removed %s left by a writer that died" % name)
        except OSError:
            pass


class TempFile(object):
    """data in a new temporary file .BASE.PID.RANDOM.tmp in dir_fd (O_EXCL,
    never through a link), fsynced; publish() renames or links it to its name."""

    def __init__(self, dir_fd, base, data, mode=0o600):
        self.dir_fd = dir_fd
        self.name = ".%s.%d.%s.tmp" % (base, os.getpid(),
                                       binascii.hexlify(os.urandom(4)).decode("ascii"))
        self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW
                          | _O_CLOEXEC, mode, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError:
            self.discard()
            raise

    def publish(self, name, replace):
        """Rename over name (replace), or link to name only if it is free:
        False when it is taken.  Then the directory is fsynced."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if replace:
            os.rename(self.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            try:
                os.link(self.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    return False
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK):
                    raise
                if _lstat_at(name, self.dir_fd) is not None:    # no hard links here
                    return False
                os.rename(self.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                self.name = None
            self.discard()
        self.name = None
        _fsync_directory(self.dir_fd)
        return True

    def discard(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.name is not None:
            try:
                os.unlink(self.name, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.name = None


def keep_owner(fd, like, name):
    """Give fd's file the owner of stat result `like`; say so when it cannot."""
    mine = os.fstat(fd)
    if (like.st_uid, like.st_gid) == (mine.st_uid, mine.st_gid):
        return
    try:
        os.fchown(fd, like.st_uid, like.st_gid)
    except OSError as e:
        warn("%s: the new file belongs to uid %d gid %d, not uid %d gid %d as before (%s; only "
             "root can keep the owner): chown it if the storage daemon must read it"
             % (name, mine.st_uid, mine.st_gid, like.st_uid, like.st_gid, e.strerror or e))


def _stdio_alias(path):
    """The descriptor number when path names one of this process's own open
    descriptors (/dev/stdout, /dev/fd/N, /proc/self/fd/N), else None."""
    for _ in range(40):
        norm = os.path.normpath(path)
        if norm in _STDIO_NAMES:
            return _STDIO_NAMES[norm]
        head, number = os.path.split(norm)
        if number.isdigit() and head in ("/dev/fd", "/proc/self/fd", "/proc/thread-self/fd",
                                         "/proc/%d/fd" % os.getpid()):
            return int(number)
        try:
            path = os.path.join(os.path.dirname(norm), os.readlink(norm))
        except OSError:
            return None
    return None


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class PrivateOutput(object):
    """A key or SQL output (mode 0600) checked before anything is written.

    The destination is resolved once.  A new file is published by link, so
    of two writers exactly one gets the name; a regular file (also through
    a symlink) is replaced by rename, only if empty or with force; a FIFO,
    a character device or the process's own stdout (/dev/stdout, /dev/fd/N)
    receives what '-' would print; anything else is refused.  prepare()
    writes the temporary file, commit() publishes it, discard() drops it.
    """

    def __init__(self, path, force=False, what="key file", mode=0o600):
        check_path(path, what)
        self.path, self.force, self.what, self.mode = path, force, what, mode
        self.temp, self.dir_fd, self.stream = None, None, None
        self.fd_number = _stdio_alias(path)
        if self.fd_number is not None:
            return
        try:
            real = resolve_path(path)
            directory, self.base = os.path.split(real)
            self.dir_fd = open_directory(directory)
            self.st = self._check(_lstat_at(self.base, self.dir_fd))
        except OSError as e:
            self.close()
            raise KeyFileError("cannot write %s: %s" % (path, e.strerror or e))
        except BscryptoError:
            self.close()
            raise

    def _check(self, st):
        if st is None or stat.S_ISREG(st.st_mode) and (st.st_size == 0 or self.force):
            return st
        if stat.S_ISREG(st.st_mode):
            raise KeyFileError("%s already exists and is not empty%s: choose another name or "
                               "add --force" % (self.path, "; a lost key is lost data"
                                                if self.what == "key file" else ""))
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
            if os.geteuid() == 0 and st.st_uid != 0:
                raise KeyFileError("%s is %s owned by uid %d: as root a key is written only "
                                   "to root's own FIFOs and devices (its owner could read it)"
                                   % (self.path, _not_regular(st).strerror.split(",")[0],
                                      st.st_uid))
            self.stream = st
            return st
        raise KeyFileError("%s exists and is %s; write the key to a new file (or '-' for "
                           "stdout)" % (self.path, _not_regular(st).strerror))

    def prepare(self, data, stream_data=None):
        self.data = data if stream_data is None else stream_data
        if self.fd_number is not None or self.stream is not None:
            return self
        try:
            _remove_stale_temps(self.dir_fd, self.base)
            self.temp = TempFile(self.dir_fd, self.base, data)
            os.fchmod(self.temp.fd, self.mode)
        except OSError as e:
            self.close()
            raise KeyFileError("cannot write %s: %s" % (self.path, e.strerror or e))
        return self

    def commit(self):
        try:
            if self.fd_number is not None:
                sys.stdout.flush()
                _write_all(self.fd_number, self.data)
            elif self.stream is not None:
                fd = os.open(self.base, os.O_WRONLY | os.O_NOCTTY | _O_NOFOLLOW | _O_CLOEXEC,
                             dir_fd=self.dir_fd)
                try:
                    if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(self.stream.st_mode):
                        raise OSError(errno.EAGAIN, "it was replaced while this ran")
                    _write_all(fd, self.data)
                finally:
                    os.close(fd)
            else:
                now = self._check(_lstat_at(self.base, self.dir_fd))
                if self.st is not None and not _same_file(now, self.st):
                    raise OSError(errno.EAGAIN, "it was replaced while this ran")
                if not self.temp.publish(self.base, replace=self.st is not None):
                    raise KeyFileError("%s already exists (written meanwhile by another "
                                       "program?): choose another name or add --force"
                                       % self.path)
        except OSError as e:
            raise KeyFileError("cannot write %s: %s" % (self.path, e.strerror or e))
        finally:
            self.close()

    def close(self):
        if self.temp is not None:
            self.temp.discard()
            self.temp = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    discard = close


def replace_file_atomically(path, data, mode=0o600, like=None):
    """Write data to path (resolved once) by temporary file in its directory,
    fsync, rename, fsync of the directory: a crash leaves the old file or the
    new one.  Owner and mode come from the file `like` names, when given.
    OSError on failure, with the temporary file removed."""
    directory, base = os.path.split(resolve_path(path))
    dir_fd = open_directory(directory)
    try:
        _remove_stale_temps(dir_fd, base)
        temp = TempFile(dir_fd, base, data)
        try:
            if like is not None:
                st = os.stat(like)
                keep_owner(temp.fd, st, path)
                mode = stat.S_IMODE(st.st_mode)
            os.fchmod(temp.fd, mode)
            temp.publish(base, replace=True)
        finally:
            temp.discard()
    finally:
        os.close(dir_fd)


def write_private_file(path, data, force=False, mode=0o600, stream_data=None):
    """Write a key file: mode 0600, atomically, never clobbering a key silently
    (PrivateOutput says where what goes); stream_data is what '-' would print."""
    PrivateOutput(path, force, mode=mode).prepare(data, stream_data).commit()


def make_key_text(passphrase, kek_text=None, base64=False):
    """What -g writes: the passphrase, base64 of it, or base64 of it wrapped."""
    if kek_text is not None:
        return wrap_passphrase(kek_text, passphrase).encode("ascii")
    if base64:
        return b64encode(passphrase).encode("ascii")
    return passphrase


# A key file read without a KEK that holds Bareos's wrapped form (54 base64
# characters, 40 bytes): "refuse" (the subcommands), "warn" (-s: Bareos loads
# the text, scripts may rely on that) or "allow" (-k, --as-is).
WRAPPED_REFUSE, WRAPPED_WARN, WRAPPED_ALLOW = "refuse", "warn", "allow"


def holds_wrapped_key(text):
    """True if key-file text is exactly a wrapped key (54 characters, 40 bytes)."""
    if len(text) != WRAPPED_KEY_CHARS:
        return False
    try:
        return len(b64decode(text)) == WRAPPED_LENGTH
    except ValueError:
        return False


def _wrapped_without_kek(text, source, policy):
    if policy == WRAPPED_ALLOW or not holds_wrapped_key(text):
        return
    if policy == WRAPPED_REFUSE:
        raise UnwrapError("%s holds a wrapped key: give --kek KEKFILE (or --kek-from)"
                          % source)
    sys.stderr.write("bscrypto: warning: %s holds a wrapped key and no -w KEKFILE was given: "
                     "its text is loaded as the passphrase, as Bareos does, and will not "
                     "read the tape; give -w KEKFILE\n" % source)
    sys.stderr.flush()


def passphrase_from_key_text(text, source, kek_text=None, kek_source=None, base64=False,
                             wrapped=WRAPPED_ALLOW):
    """Recover the passphrase from key-file text (the inverse of make_key_text).
    wrapped: what to do with a wrapped key when there is no KEK (see above)."""
    if kek_text is None:
        _wrapped_without_kek(text, source, wrapped)
    if kek_text is not None:
        try:
            return unwrap_passphrase(kek_text, text)
        except ValueError as e:
            raise KeyFileError("%s is not a wrapped key: %s" % (source, e))
        except UnwrapError:
            raise UnwrapError("cannot unwrap %s with the KEK from %s: integrity check failed "
                              "(wrong KEK, or the key is corrupt or truncated)"
                              % (source, kek_source))
    if base64:
        if len(text) > BASE64_KEY_LIMIT:
            raise KeyFileError("%s holds %d characters of base64; Bareos decodes at most %d "
                               "and would print an empty key: refused"
                               % (source, len(text), BASE64_KEY_LIMIT))
        try:
            return b64decode(text, PASSPHRASE_LENGTH)
        except ValueError as e:
            raise KeyFileError("%s is not base64: %s" % (source, str(e)[len("not base64: "):]))
    return text[:PASSPHRASE_LENGTH]


# -- key file operations: -g and -k --


def op_generate(dest, kek_path=None, base64=False, force=False, out=None):
    """-g: make a new passphrase (optionally base64 or wrapped) into dest."""
    check_path(dest, "key file")
    output = PrivateOutput(dest, force) if dest != "-" else None   # refuse before any work
    try:
        kek_text = read_key_file(kek_path, "KEK file", kek=True) if kek_path is not None else None
        text = make_key_text(generate_passphrase(), kek_text, base64)
    except BaseException:
        if output is not None:
            output.discard()
        raise
    if output is None:
        out = out or _stdout_bytes()
        out.write(text + b"\n")
        out.flush()
    else:
        output.prepare(text, text + b"\n").commit()
        debug(1, "wrote %d-byte key file %s (mode 0600)" % (len(text), dest))
    return EXIT_OK


def op_show_key(source, kek_path=None, base64=False, prompt=True, out=None, kek_text=None,
                kek_source=None, wrapped=WRAPPED_ALLOW):
    """-k / show: print the passphrase held in a key file.  The KEK comes from
    kek_path, or as kek_text (described by kek_source) from --kek-from."""
    if kek_text is None and kek_path is not None:
        kek_text, kek_source = read_key_file(kek_path, "KEK file", kek=True), kek_path
    text = read_key_file(source, prompt=prompt)
    name = "stdin" if source == "-" else source
    passphrase = passphrase_from_key_text(text, name, kek_text, kek_source, base64, wrapped)
    out = out or _stdout_bytes()
    # Bareos prints "%.*s" of 32: at most 32 bytes, up to a NUL.
    out.write(passphrase.split(b"\0", 1)[0][:PASSPHRASE_LENGTH] + b"\n")
    out.flush()
    return EXIT_OK


def _stdout_bytes():
    return getattr(sys.stdout, "buffer", sys.stdout)


def write_bytes(out, data):
    """out.write(data) to the end: a buffered stdout can take part of a large
    write to a pipe closed meanwhile and say so only by its count."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        if n is None:       # a stream that does not count (test doubles)
            return
        view = view[n:]


def report_output(out, text, done=None):
    """Write and flush a command's report; when stdout fails, OutputError that
    says what was already done on disk."""
    try:
        out.write(text)
        out.flush()
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        raise OutputError("%scannot write to standard output: %s"
                          % ("%s; but " % done if done else "", e.strerror or e))


# ---------------------------------------------------------------------------
# Crypto cache
# ---------------------------------------------------------------------------
#
# The storage daemon's <WorkingDirectory>/bareos-sd.<port>.cryptoc (FORMATS.md
# section 5): a 32-byte header, then one raw C struct per entry in the
# writing host's byte order and pointer size.  Names and keys are C strings;
# they are held here as str decoded from UTF-8 with "surrogateescape", so any
# byte sequence Bareos stored survives read, dump and write unchanged.
#
# Bareos erases a cache it cannot read and rewrites in place without a lock.
# Here a cache that cannot be read is never changed; writers hold an flock on
# the cache's directory for the whole read-modify-write and replace the file
# by rename (CacheFile).

CACHE_ID = b"BAREOS Crypto Cache\n"     # char id[21]; Bareos ignores byte 20 (forces NUL)
CACHE_VERSION = 1
CACHE_HEADER_SIZE = 32                  # id[21], 3 padding bytes, int32 version, int32 count
CACHE_STRING_SIZE = 128                 # Bareos MAX_NAME_LENGTH: 127 bytes and a NUL
CACHE_EXPIRY_SECONDS = 60 * 24 * 3600   # Bareos CRYPTO_CACHE_MAX_AGE
CACHE_NEW_FILE_MODE = 0o640             # what Bareos creates (less the umask)
_BACKUP_SUFFIX = ".bak"
DEFAULT_CACHE_PATH = "/var/lib/bareos/bareos-sd.9103.cryptoc"
CACHE_PROMPT = "Enter cache entries (close with ^D): "
_CACHE_TEXT = ("utf-8", "surrogateescape")

# An entry is struct { dlink (2 pointers); char VolumeName[128];
# char EncryptionKey[128]; int64 added; }.  On 32-bit hosts the pointers take 8
# bytes and the int64 lands at 264, already 8-aligned, so the entry is 272
# bytes (gcc -m32 agrees; FORMATS.md's 268 does not add up).
CacheLayout = namedtuple("CacheLayout", "name byteorder pointer_size entry_size description")
CACHE_LAYOUTS = (
    CacheLayout("lp64-le", "<", 8, 280, "64-bit little-endian: x86_64, aarch64, ppc64le"),
    CacheLayout("ilp32-le", "<", 4, 272, "32-bit little-endian: i386, armhf"),
    CacheLayout("lp64-be", ">", 8, 280, "64-bit big-endian: s390x, ppc64, sparc64"),
    CacheLayout("ilp32-be", ">", 4, 272, "32-bit big-endian: powerpc, mips"),
)
CacheEntry = namedtuple("CacheEntry", "volume_name encryption_key added")
CryptoCache = namedtuple("CryptoCache", "entries layout")


class CacheError(BscryptoError):
    exit_code = EXIT_CACHE


class CacheMissingError(CacheError):
    """The cache file does not exist (populate then starts a new one)."""


def host_cache_layout():
    """The layout the storage daemon on this host writes."""
    order = "<" if sys.byteorder == "little" else ">"
    pointer = 4 if struct.calcsize("P") == 4 else 8
    for layout in CACHE_LAYOUTS:
        if layout.byteorder == order and layout.pointer_size == pointer:
            return layout
    raise AssertionError("no cache layout for this host")


def cache_layout(name):
    """A CacheLayout by name; None or a CacheLayout pass through."""
    if name is None or isinstance(name, CacheLayout):
        return name or host_cache_layout()
    for layout in CACHE_LAYOUTS:
        if layout.name == name:
            return layout
    raise UsageError("unknown cache layout %r: use one of %s"
                     % (name, ", ".join(layout.name for layout in CACHE_LAYOUTS)))


def _entry_struct(layout):
    return struct.Struct("%s%dx%ds%dsq" % (layout.byteorder, 2 * layout.pointer_size,
                                           CACHE_STRING_SIZE, CACHE_STRING_SIZE))


class _GcPaused:
    """Pause the cyclic GC while building many tuples (none of them in cycles).

    Otherwise each full collection rescans every entry already built, and
    100,000 entries take 1.5-2x as long as 10 x 10,000.
    """

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()
        return False


def _gc_paused(func):
    """Decorator: run func with the cyclic GC paused (see _GcPaused)."""
    def run(*args, **kw):
        with _GcPaused():
            return func(*args, **kw)
    run.__name__, run.__doc__ = func.__name__, func.__doc__
    return run


def _cache_bytes(text):
    return text if isinstance(text, bytes) else text.encode(*_CACHE_TEXT)


_PLAUSIBLE_CHECKED = 64


def _plausible_entries(data, layout, count):
    """How many of the first entries look real under this layout.

    Real: a non-empty name, a NUL in the name or the key (Bareos reads one
    without a NUL too) and a time after 1970 and before year 36812.  Read
    with the wrong layout, the time lands in the zero tail of a key and the
    name on pointer bytes.
    """
    st = _entry_struct(layout)
    score = 0
    for i in range(min(count, _PLAUSIBLE_CHECKED)):
        name, key, added = st.unpack_from(data, CACHE_HEADER_SIZE + i * layout.entry_size)
        if name[:1] not in (b"", b"\0") and (b"\0" in name or b"\0" in key) \
                and 0 < added < 1 << 40:
            score += 1
    return score


def _detect_layout(data, source):
    size = len(data)
    if size < CACHE_HEADER_SIZE:
        raise CacheError("%s is not a crypto cache: %d bytes, shorter than the %d-byte header; "
                         "left untouched" % (source, size, CACHE_HEADER_SIZE))
    if data[:len(CACHE_ID)] != CACHE_ID:
        raise CacheError("%s is not a Bareos crypto cache: its header id is not 'BAREOS Crypto "
                         "Cache'; left untouched" % source)
    orders = [o for o in "<>" if struct.unpack_from(o + "i", data, 24)[0] == CACHE_VERSION]
    if not orders:
        version = struct.unpack_from("=i", data, 24)[0]
        raise CacheError("%s: crypto cache version %d, only version %d is known; left untouched"
                         % (source, version, CACHE_VERSION))
    order = orders[0]
    count = struct.unpack_from(order + "i", data, 28)[0]
    if count < 0:
        raise CacheError("%s: header gives a negative entry count (%d): damaged; left untouched"
                         % (source, count))
    body = size - CACHE_HEADER_SIZE
    if count == 0:
        # No entry to tell the layouts apart; Bareos reads this as empty
        # whatever follows (bytes after the count are warned about).
        host = host_cache_layout()
        return [lay for lay in CACHE_LAYOUTS if lay.byteorder == order
                and lay.pointer_size == host.pointer_size][0], 0
    fits = [lay for lay in CACHE_LAYOUTS if lay.byteorder == order
            and body >= count * lay.entry_size]
    if not fits:
        smallest = min(lay.entry_size for lay in CACHE_LAYOUTS)
        raise CacheError("%s: header counts %d entries but only %d bytes follow it, at least %d "
                         "needed (truncated?); left untouched"
                         % (source, count, body, count * smallest))
    # A layout that leaves bytes over must show real-looking entries: a
    # truncated 64-bit file would otherwise pass for 32-bit plus garbage.
    checked = min(count, _PLAUSIBLE_CHECKED)
    scored = []
    for lay in fits:
        score = _plausible_entries(data, lay, count)
        exact = body == count * lay.entry_size
        if exact or 2 * score > checked:
            scored.append((score, exact, lay))
    if not scored:
        raise CacheError("%s: %d bytes after the header hold %d entries in no known layout "
                         "(truncated or damaged?); left untouched" % (source, body, count))
    # Both pointer sizes can fit (always so for a 64-bit file): real-looking
    # entries win, then an exact size, then this host's pointer size.
    host = host_cache_layout()
    ranked = sorted(scored, key=lambda t: (-t[0], not t[1],
                                           t[2].pointer_size != host.pointer_size))
    if len(ranked) > 1:
        debug(2, "%s: %s fit; chose %s" % (source, " and ".join(t[2].name for t in ranked),
                                           ranked[0][2].name))
    return ranked[0][2], count


@_gc_paused
def parse_cache(data, source="crypto cache", raw=False):
    """(CryptoCache, number of trailing bytes) from a cache file's bytes.

    CacheError for anything that is not a whole, readable cache; bytes after
    the counted entries are reported, not an error (the caller warns).
    raw=True keeps names and keys as bytes (for printing them as they are).
    """
    layout, count = _detect_layout(data, source)
    end = CACHE_HEADER_SIZE + count * layout.entry_size
    entries = []
    append = entries.append
    make = CacheEntry
    text = _CACHE_TEXT
    for i, (name, key, added) in enumerate(
            _entry_struct(layout).iter_unpack(memoryview(data)[CACHE_HEADER_SIZE:end])):
        n = name.find(b"\0")
        k = key.find(b"\0")
        if n < 0 or k < 0:
            # Bareos reads such an entry (its strings run on into the next
            # field); a copy keeps 127 bytes, as its bstrncpy would.
            for what, value in (("volume name", n), ("key", k)):
                if value < 0:
                    warn("%s: the %s of entry %d fills all %d bytes without a NUL; read as "
                         "its first %d bytes (truncated)" % (source, what, i + 1,
                                                             CACHE_STRING_SIZE,
                                                             CACHE_STRING_SIZE - 1))
            n = CACHE_STRING_SIZE - 1 if n < 0 else n
            k = CACHE_STRING_SIZE - 1 if k < 0 else k
        if raw:
            append(make(name[:n], key[:k], added))
        else:
            append(make(name[:n].decode(*text), key[:k].decode(*text), added))
    return CryptoCache(entries, layout), len(data) - end


def read_cache(path, raw=False):
    """Read a cache of any layout; CacheError when it cannot.  Never writes.

    Names and keys are str (UTF-8, surrogateescape), or bytes with raw=True.
    """
    if isinstance(path, CacheFile):
        data, path = path.read(), path.path
    else:
        data = _read_cache_bytes(path)
    cache, trailing = parse_cache(data, path, raw)
    debug(1, "%s: layout %s (%s), %d entries of %d bytes"
          % (path, cache.layout.name, cache.layout.description, len(cache.entries),
             cache.layout.entry_size))
    if trailing:
        warn("%s: %d bytes after the %d entries its header counts; ignored (a rewrite drops "
             "them)" % (path, trailing, len(cache.entries)))
    return cache


def cache_string_problem(value, what):
    """Why a volume name or key cannot be stored in a cache entry, or None."""
    try:
        raw = _cache_bytes(value)
    except (UnicodeError, AttributeError):
        return "%s is not text" % what
    if b"\0" in raw:
        return "%s contains a NUL byte" % what
    if len(raw) >= CACHE_STRING_SIZE:
        return "%s is %d bytes, at most %d fit" % (what, len(raw), CACHE_STRING_SIZE - 1)
    return None


def build_cache(entries, layout=None):
    """The bytes (a bytearray) of a cache file; pointer bytes are written as zeros."""
    layout = cache_layout(layout)
    if len(entries) > 0x7FFFFFFF:
        raise CacheError("%d entries do not fit a crypto cache" % len(entries))
    size = _entry_struct(layout).size
    buf = bytearray(CACHE_HEADER_SIZE + len(entries) * size)
    struct.pack_into(layout.byteorder + "21s3xii", buf, 0, CACHE_ID, CACHE_VERSION, len(entries))
    pack_into = _entry_struct(layout).pack_into
    limit = CACHE_STRING_SIZE
    offset = CACHE_HEADER_SIZE
    for i, e in enumerate(entries):
        try:
            name, key, added = e
            name = name if isinstance(name, bytes) else name.encode(*_CACHE_TEXT)
            key = key if isinstance(key, bytes) else key.encode(*_CACHE_TEXT)
            if len(name) < limit and len(key) < limit and b"\0" not in name and b"\0" not in key:
                pack_into(buf, offset, name, key, added)
                offset += size
                continue
        except (struct.error, UnicodeError, TypeError, ValueError, AttributeError):
            pass
        problem = (cache_string_problem(e[0], "volume name")
                   or cache_string_problem(e[1], "encryption key")
                   or "time added %r is not a 64-bit integer" % (e[2],))
        raise CacheError("cannot store entry %d: %s" % (i + 1, problem))
    return buf


def resolve_now(now=None):
    """"Now" in Unix seconds: the value given, else SOURCE_DATE_EPOCH, else the clock."""
    if now is None:
        env = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        try:
            now = int(env) if env else int(time.time())
        except ValueError:
            raise UsageError("SOURCE_DATE_EPOCH must be whole seconds since 1970, not %r" % env)
    now = int(now)
    # A cache entry holds a signed 64-bit time, and 60 days are added to it.
    if not -(1 << 63) <= now < (1 << 63) - CACHE_EXPIRY_SECONDS:
        raise UsageError("--now (or SOURCE_DATE_EPOCH) %d is beyond a 64-bit time" % now)
    return now


# -- Bareos's update rules, kept linear with a name index --


@_gc_paused
def apply_cache_updates(entries, updates, now):
    """Bareos's UpdateCryptoCache for each (volume_name, encryption_key), in order.

    A known name gets the new key (if different) and added = now; every
    *other* entry older than CACHE_EXPIRY_SECONDS is removed (strictly older:
    exactly 60 days is kept); a new name is appended.  Bareos scans the whole
    list on every update; with a fixed "now" only the first update can find
    expired entries, so one pass and a dict index give the same list.
    Returns (new list, stats); stats "added", "updated", "unchanged" count
    updates, "expired_removed" entries.  Something changed (Bareos writes
    the file) when added + updated + expired_removed > 0.
    """
    now = int(now)
    result = list(entries)
    added = updated = unchanged = expired = 0
    index = None        # name -> position of its first entry
    repeats = {}        # name -> later positions (only a damaged file repeats a name)
    oldest_kept = now - CACHE_EXPIRY_SECONDS    # Bareos: expired if added + max age < now
    make = CacheEntry
    for name, key in updates:
        name = _cache_text(name, "volume name")
        key = _cache_text(key, "encryption key")
        if index is None:
            kept = [e for e in result if e.added >= oldest_kept or e.volume_name == name]
            expired = len(result) - len(kept)
            result = kept
            index = {}
            for i, e in enumerate(result):
                if index.setdefault(e.volume_name, i) != i:
                    repeats.setdefault(e.volume_name, []).append(i)
        i = index.get(name)
        if i is None:
            index[name] = len(result)
            result.append(make(name, key, now))
            added += 1
            continue
        changed = result[i].encryption_key != key
        result[i] = make(name, key, now)
        for i in repeats.get(name, ()):     # Bareos updates every entry of the name
            changed = changed or result[i].encryption_key != key
            result[i] = make(name, key, now)
        if changed:
            updated += 1
        else:
            unchanged += 1
    return result, {"added": added, "updated": updated, "unchanged": unchanged,
                    "expired_removed": expired}


def _cache_text(value, what):
    """value (str or bytes) as str, or CacheError if a cache entry cannot hold it."""
    if isinstance(value, str):
        try:
            raw = value.encode(*_CACHE_TEXT)
        except UnicodeError:
            raw = None
    else:
        raw = bytes(value) if isinstance(value, (bytes, bytearray)) else None
    if raw is not None and len(raw) < CACHE_STRING_SIZE and b"\0" not in raw:
        return value if isinstance(value, str) else raw.decode(*_CACHE_TEXT)
    # Name the volume, never the key.
    raise CacheError("cannot add %s to the cache: %s" % (
        "volume %r" % (value,) if what == "volume name" else "an entry",
        cache_string_problem(value, what)))


@_gc_paused
def reset_cache_times(entries, now):
    """Bareos's ResetCryptoCache: every entry added = now."""
    now = int(now)
    make = CacheEntry
    return [e if e.added == now else make(e.volume_name, e.encryption_key, now)
            for e in entries]


def cache_changed(stats):
    return bool(stats["added"] or stats["updated"] or stats["expired_removed"])


# -- populate input: VolumeName<TAB>EncryptionKey lines --


_EARLY_BLANK = "empty line before more entries (Bareos would stop reading there)"


@_gc_paused
def parse_cache_input(lines):
    """(updates, problems) from populate input lines (bytes).

    Bareos strips trailing newline, CR and space characters and stops at the
    first line without a TAB.  Here an empty line or the end of input ends
    it; anything else without a TAB, an empty name or key, a NUL, or more
    than 127 bytes is a problem (line number, text), as is an empty line
    with entries after it (Bareos would silently drop them).
    """
    updates, problems = [], []
    blank = None
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n ")
        if not line:
            blank = blank or number
            continue
        if blank:
            problems.append((blank, _EARLY_BLANK))
            blank = None
        name, tab, key = line.partition(b"\t")
        if not tab:
            problem = "no TAB between volume name and encryption key"
        elif not name:
            problem = "empty volume name"
        elif not key:
            problem = "empty encryption key"
        elif len(name) < CACHE_STRING_SIZE and len(key) < CACHE_STRING_SIZE \
                and b"\0" not in line:
            updates.append((name.decode(*_CACHE_TEXT), key.decode(*_CACHE_TEXT)))
            continue
        else:
            problem = (cache_string_problem(name, "volume name")
                       or cache_string_problem(key, "encryption key"))
        problems.append((number, problem))
    return updates, problems


def _read_cache_input(stream, interactive):
    """Input lines: all of a pipe or file; on a terminal, up to an empty line or ^D."""
    if not interactive:
        lines = stream.read().split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        return lines
    lines = []
    fd = _terminal_fd(stream)
    while True:
        # A terminal returns each line at Enter; a line ended by ^D has no
        # newline and is the last one (no second ^D needed).
        line = os.read(fd, 4096) if fd is not None else stream.readline()
        if not line or not line.rstrip(b"\r\n "):
            return lines
        lines.append(line)
        if fd is not None and not line.endswith(b"\n"):
            return lines


# -- rendering: Bareos's table, JSON, the populate TSV --


def _time_text(t, fmt, convert, memo):
    """strftime of Unix time t as ASCII bytes, remembered in memo."""
    text = memo.get(t)
    if text is None:
        try:
            text = time.strftime(fmt, convert(t)).encode("ascii")
        except (OverflowError, OSError, ValueError):
            text = str(t).encode("ascii")     # beyond what the C library converts
        memo[t] = text
    return text


def format_cache_table(entries):
    """Bareos's -D output, as bytes: its own "%-*s %-*s %-20s %-20s" rows, local time."""
    names = [_cache_bytes(e[0]) for e in entries]
    keys = [_cache_bytes(e[1]) for e in entries]
    name_width = max([len(b"Volumename")] + [len(n) for n in names])
    key_width = max([len(b"EncryptionKey")] + [len(k) for k in keys])
    row = b"%-*s %-*s %-20s %-20s\n"
    memo = {}
    fmt, local = "%Y-%m-%d %H:%M:%S", time.localtime
    lines = [row % (name_width, b"Volumename", key_width, b"EncryptionKey", b"Added",
                    b"Expires")]
    for name, key, e in zip(names, keys, entries):
        added = e[2]
        lines.append(row % (name_width, name, key_width, key, _time_text(added, fmt, local, memo),
                            _time_text(added + CACHE_EXPIRY_SECONDS, fmt, local, memo)))
    return b"".join(lines)


def cache_to_json(cache, path, now):
    """The cache as a JSON document (text); names and keys are surrogate-escaped str."""
    import json
    memo = {}
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    rows = []
    for e in cache.entries:
        expires = e.added + CACHE_EXPIRY_SECONDS
        rows.append({"volume_name": e.volume_name, "encryption_key": e.encryption_key,
                     "added": e.added, "expires": expires,
                     "added_utc": _time_text(e.added, fmt, time.gmtime, memo).decode(),
                     "expires_utc": _time_text(expires, fmt, time.gmtime, memo).decode(),
                     "expired": expires < now})
    doc = {"cache": path, "layout": cache.layout.name, "entry_size": cache.layout.entry_size,
           "now": now, "count": len(rows), "entries": rows}
    return json.dumps(doc, indent=2) + "\n"


def format_cache_tsv(entries):
    """The populate input that gives back these names and keys, in order (bytes).

    CacheError for an entry a TSV line cannot carry unchanged (a TAB or
    newline in the name, a newline or trailing space/CR in the key, empty).
    """
    lines = []
    for i, e in enumerate(entries):
        name, key = _cache_bytes(e.volume_name), _cache_bytes(e.encryption_key)
        if not name or b"\t" in name or b"\n" in name:
            problem = "its volume name is empty or holds a TAB or newline"
        elif not key or b"\n" in key or key.rstrip(b"\r ") != key:
            problem = "its key is empty, holds a newline or ends in a space or CR"
        else:
            lines.append(b"%s\t%s\n" % (name, key))
            continue
        raise CacheError("cannot export entry %d (%r): %s, so populate would not read it back "
                         "the same" % (i + 1, e.volume_name, problem))
    return b"".join(lines)


# -- the cache file: resolved once, locked, replaced atomically --


def _cache_name(path):
    """How messages name a cache: the default path says it is the default."""
    if path == DEFAULT_CACHE_PATH:
        return "crypto cache %s (the default; give CACHE to use another)" % path
    return "crypto cache %s" % path


class CacheFile(object):
    """A crypto cache whose path is resolved once: every later read, lock,
    temporary file, backup, rename and fsync happens in its directory through
    one file descriptor, and the file renamed over must be the one read.

    As a context manager (cache_lock) it holds an exclusive flock on that
    directory for the whole read-modify-write: no lock file is left behind,
    and nothing placed beside the cache can redirect or block the lock.
    """

    _UNREAD = object()

    def __init__(self, path):
        check_path(path, "crypto cache")
        if path.endswith(os.sep):
            raise UsageError("crypto cache path %s ends in '%s': give the cache's file name"
                             % (path, os.sep))
        self.path = path
        self.read_st = self._UNREAD
        self.data = None
        self.dir_fd = None
        self.read_file = None       # held open: its inode number cannot be reused
        try:
            self.real = resolve_path(path)
            self.directory, self.base = os.path.split(self.real)
            self.dir_fd = open_directory(self.directory)
        except OSError as e:
            raise CacheError("cannot open the directory of %s: %s" % (_cache_name(path),
                                                                       e.strerror or e))

    def __enter__(self):
        try:
            try:
                fcntl.flock(self.dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                debug(1, "waiting for the lock on %s" % self.directory)
                fcntl.flock(self.dir_fd, fcntl.LOCK_EX)
        except OSError as e:
            self.close()
            raise CacheError("cannot lock the directory %s of %s: %s" % (
                self.directory, _cache_name(self.path), e.strerror or e))
        return self

    def __exit__(self, *exc):
        self.close()        # closing the descriptor releases the lock
        return False

    def close(self):
        if self.read_file is not None:
            self.read_file.close()
            self.read_file = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    def read(self):
        """The cache's bytes (never through a link swapped in since the path was
        resolved); remembers which file was read.  CacheMissingError if none."""
        if self.read_file is not None:
            self.read_file.close()
        try:
            self.data, self.read_st, self.read_file = read_regular_file(
                self.base, dir_fd=self.dir_fd, follow=False, keep_open=True)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise CacheError("cannot read %s: %s" % (_cache_name(self.path),
                                                         e.strerror or e))
            self.read_st = None
            raise _missing_cache(self.path)
        return self.data

    def replace(self, data, backup=False, new_owner_of_directory=False):
        """Atomically replace the cache with data: temporary file, fsync, the
        old file's owner and mode (CACHE_NEW_FILE_MODE less the umask for a
        new one, owned like the directory with new_owner_of_directory),
        rename, fsync the directory.  CacheError, old file kept, when it
        cannot, or when the file is no longer the one read."""
        try:
            _remove_stale_temps(self.dir_fd, self.base)
            like = self._unchanged()
            if like is not None and not stat.S_ISREG(like.st_mode):
                raise _not_regular(like)
            if backup and like is not None:
                old = self.data if self.data is not None else self.read()
                self.backup_name = write_backup(self.dir_fd, self.base, old, like, self.path)
                debug(1, "kept a copy of %s as %s" % (self.path, self.backup_name))
            # Created with Bareos's mode: the kernel applies the umask.
            temp = TempFile(self.dir_fd, self.base, data,
                            0o600 if like is not None else CACHE_NEW_FILE_MODE)
            try:
                if like is not None:
                    keep_owner(temp.fd, like, self.path)
                    os.fchmod(temp.fd, stat.S_IMODE(like.st_mode))
                elif new_owner_of_directory:
                    # Set on our own new file before the rename: no path is followed.
                    keep_owner(temp.fd, os.fstat(self.dir_fd), self.path)
                self._unchanged()
                temp.publish(self.base, replace=True)
            finally:
                temp.discard()
        except OSError as e:
            raise CacheError("cannot write %s: %s; the old file is unchanged"
                             % (self.path, e.strerror or e))
        self.data, self.read_st = None, self._UNREAD

    def _unchanged(self):
        """The cache's lstat now (None if missing); OSError if it is not the file read."""
        now = _lstat_at(self.base, self.dir_fd)
        if self.read_st is not self._UNREAD and not _same_file(now, self.read_st):
            raise OSError(errno.EAGAIN, "it was replaced, removed or created by another "
                                        "program (or a link swapped in) since it was read; run "
                                        "again")
        return now


def _missing_cache(path):
    return CacheMissingError("%s does not exist (the storage daemon's is "
                             "<WorkingDirectory>/bareos-sd.<port>.cryptoc)" % _cache_name(path))


def _read_cache_bytes(path):
    try:
        return read_regular_file(path)[0]
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise _missing_cache(path)
        raise CacheError("cannot read %s: %s" % (_cache_name(path), e.strerror or e))


def cache_lock(path):
    """Context manager: the CacheFile of path, its directory exclusively
    flocked, around a read-modify-write."""
    return CacheFile(path).__enter__()


def backup_stamp(t=None):
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def write_backup(dir_fd, base, data, like=None, source=None):
    """data as BASE.<UTC time>[.N].bak in dir_fd, never over an existing name
    (owner and mode of stat result `like`, else 0600); its name.  OSError."""
    stamp = backup_stamp()
    temp = TempFile(dir_fd, base, data)
    try:
        if like is not None:
            keep_owner(temp.fd, like, source or base)
        os.fchmod(temp.fd, stat.S_IMODE(like.st_mode) if like is not None else 0o600)
        for n in range(1000):
            name = "%s.%s%s%s" % (base, stamp, ".%d" % n if n else "", _BACKUP_SUFFIX)
            if temp.publish(name, replace=False):
                return name
        raise OSError(errno.EEXIST, "1000 backups named %s.%s" % (base, stamp))
    finally:
        temp.discard()


def backup_cache(path):
    """Copy the cache to CACHE.YYYYmmddTHHMMSSZ.bak (same mode, owner); its path or None."""
    cf = CacheFile(path)
    try:
        try:
            data = cf.read()
        except CacheMissingError:
            return None
        try:
            name = write_backup(cf.dir_fd, cf.base, data, cf.read_st, path)
        except OSError as e:
            raise CacheError("cannot back up %s: %s" % (path, e.strerror or e))
    finally:
        cf.close()
    return os.path.join(cf.directory, name)


def write_cache(path, entries, layout=None, backup=False, new_owner_of_directory=False):
    """Atomically replace the cache (caller holds cache_lock): `path` is a
    path or the CacheFile read under the lock (then it must still be the
    file read).  `backup` first keeps a timestamped copy."""
    layout = cache_layout(layout)
    data = build_cache(entries, layout)      # refuse bad entries before touching anything
    cf = path if isinstance(path, CacheFile) else CacheFile(path)
    try:
        cf.replace(data, backup, new_owner_of_directory)
    finally:
        if cf is not path:
            cf.close()
    debug(1, "wrote %d entries to %s (layout %s)" % (len(entries), cf.real, layout.name))


# ---------------------------------------------------------------------------
# SCSI transport
# ---------------------------------------------------------------------------
#
# One interface: ScsiTransport.execute(cdb, data_out, data_in_len, timeout)
# returns a ScsiResult; one implementation per OS.  Device nodes are never
# judged by name or major number (drives come through st, sg, lin_tape,
# IBMtape, sa, pass ...): the command is sent and the errno or the SCSI status
# is explained.  The request structures are laid out from their C field lists
# for a given pointer size, so a test can check the 32-bit layout on a 64-bit
# host and compare the native one with the C compiler.

SENSE_BUFFER_LENGTH = 96       # as much as Linux and TCMU carry; fixed format needs 18+
UNIT_ATTENTION_RETRIES = 3     # a load or reset is reported once per initiator, then clears

SCSI_STATUS_GOOD = 0x00
SCSI_STATUS_CHECK_CONDITION = 0x02
SCSI_STATUS_CONDITION_MET = 0x04
SCSI_STATUS_BUSY = 0x08
SCSI_STATUS_RESERVATION_CONFLICT = 0x18
SCSI_STATUS_NAMES = {0x00: "GOOD", 0x02: "CHECK CONDITION", 0x04: "CONDITION MET",
                     0x08: "BUSY", 0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL",
                     0x30: "ACA ACTIVE", 0x40: "TASK ABORTED"}

# Records: namedtuple classes made on first use (each costs ~0.1 ms to build,
# and `bscrypto.py -k` never needs them).  Field names follow SPC-4/SSC-4.
_RECORD_FIELDS = {
    "ScsiResult": "status data_in sense resid host_status driver_status info duration",
    "CStructLayout": "name pointer_size struct fields offsets size arrays",
    "SupportedSecurityProtocols": "protocols",
    "AlgorithmDescriptor": (
        "algorithm_index avfmv sdk_c mac_c delb_c decrypt_c encrypt_c avfcp nonce_c kadf_c "
        "vcelb_c ukadf akadf maximum_ukad_length maximum_akad_length key_length dkad_c "
        "eemc_c rdmc_c earem maximum_eedk_count msdk_count maximum_eedk_size "
        "security_algorithm_code"),
    "DataEncryptionCapabilities": "extdecc cfg_p algorithms",
    "KeyAssociatedData": "descriptor_type authenticated descriptor",
    "DataEncryptionStatus": (
        "i_t_nexus_scope key_scope encryption_mode decryption_mode algorithm_index "
        "key_instance_counter parameters_control vcelb ceems rdmd kad_format asdk_count kads"),
    "NextBlockEncryptionStatus": (
        "logical_object_number compression_status encryption_status algorithm_index "
        "emes rdmds kad_format kads"),
    "InquiryData": ("peripheral_qualifier peripheral_device_type rmb version "
                    "response_data_format vendor product revision"),
    "SenseData": ("response_code current valid sense_key asc ascq information "
                  "command_specific filemark eom ili field_pointer fru raw"),
    "FieldPointer": "command_data bit_pointer_valid bit_pointer field",
}
_RECORDS = {}


def _record(name, fields=None):
    """The namedtuple class `name`, built once on first use (building one costs
    about a millisecond on Python 3.6, and most runs never need most of them).
    fields defaults to _RECORD_FIELDS[name]."""
    cls = _RECORDS.get(name)
    if cls is None:
        cls = _RECORDS[name] = namedtuple(name, fields or _RECORD_FIELDS[name])
    return cls


# C request structures as (field, C type).  "ptr", "ulong" and "size_t" take
# the pointer size; everything is naturally aligned, as the C compilers of
# these systems lay these structs out.

# Linux <scsi/sg.h> struct sg_io_hdr.
SG_IO_HDR_FIELDS = (
    ("interface_id", "int"), ("dxfer_direction", "int"), ("cmd_len", "uchar"),
    ("mx_sb_len", "uchar"), ("iovec_count", "ushort"), ("dxfer_len", "uint"),
    ("dxferp", "ptr"), ("cmdp", "ptr"), ("sbp", "ptr"), ("timeout", "uint"),
    ("flags", "uint"), ("pack_id", "int"), ("usr_ptr", "ptr"), ("status", "uchar"),
    ("masked_status", "uchar"), ("msg_status", "uchar"), ("sb_len_wr", "uchar"),
    ("host_status", "ushort"), ("driver_status", "ushort"), ("resid", "int"),
    ("duration", "uint"), ("info", "uint"),
)
SG_IO = 0x2285                  # a legacy request number: no size encoded, same everywhere
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
# driver_status: DRIVER_SENSE (0x08) only says sense data is there.
SG_DRIVER_STATUS_NAMES = {1: "DRIVER_BUSY", 2: "DRIVER_SOFT", 3: "DRIVER_MEDIA",
                          4: "DRIVER_ERROR", 5: "DRIVER_INVALID", 6: "DRIVER_TIMEOUT",
                          7: "DRIVER_HARD"}
SG_HOST_STATUS_NAMES = {1: "DID_NO_CONNECT", 2: "DID_BUS_BUSY", 3: "DID_TIME_OUT",
                        4: "DID_BAD_TARGET", 5: "DID_ABORT", 6: "DID_PARITY",
                        7: "DID_ERROR", 8: "DID_RESET", 9: "DID_BAD_INTR",
                        10: "DID_PASSTHROUGH", 11: "DID_SOFT_ERROR", 12: "DID_IMM_RETRY",
                        13: "DID_REQUEUE", 14: "DID_TRANSPORT_DISRUPTED",
                        15: "DID_TRANSPORT_FAILFAST"}

# Solaris/illumos <sys/scsi/impl/uscsi.h> struct uscsi_cmd.
USCSI_CMD_FIELDS = (
    ("uscsi_flags", "int"), ("uscsi_status", "short"), ("uscsi_timeout", "short"),
    ("uscsi_cdb", "ptr"), ("uscsi_bufaddr", "ptr"), ("uscsi_buflen", "size_t"),
    ("uscsi_resid", "size_t"), ("uscsi_cdblen", "uchar"), ("uscsi_rqlen", "uchar"),
    ("uscsi_rqstatus", "uchar"), ("uscsi_rqresid", "uchar"), ("uscsi_rqbuf", "ptr"),
    ("uscsi_path_instance", "ulong"),
)
USCSICMD = 0x4C9                # ('L' << 8) | 201; the kernel picks the layout by data model
USCSI_WRITE = 0x0
USCSI_SILENT = 0x1
USCSI_READ = 0x8
USCSI_RQENABLE = 0x10000

# NetBSD/OpenBSD <sys/scsiio.h> scsireq_t.
SCSIREQ_FIELDS = (
    ("flags", "ulong"), ("timeout", "ulong"), ("cmd", "uchar[16]"), ("cmdlen", "uchar"),
    ("databuf", "ptr"), ("datalen", "ulong"), ("datalen_used", "ulong"),
    ("sense", "uchar[48]"), ("senselen", "uchar"), ("senselen_used", "uchar"),
    ("status", "uchar"), ("retsts", "uchar"), ("error", "int"),
)
SCCMD_READ = 0x1
SCCMD_WRITE = 0x2
SCCMD_RETSTS_NAMES = {0: "OK", 1: "timeout", 2: "busy", 3: "sense", 4: "unknown error"}

_C_SCALARS = {"int": ("i", 4), "uint": ("I", 4), "short": ("h", 2), "ushort": ("H", 2),
              "uchar": ("B", 1)}


def c_struct_layout(name, fields, pointer_size=None):
    """Lay a C struct out for a pointer size (default: this interpreter's).

    Returns a CStructLayout whose `struct` uses native byte order with every
    padding byte explicit, including the trailing padding the kernel copies
    (without it sg_io_hdr packs to 84 bytes instead of 88).
    """
    psize = pointer_size or struct.calcsize("P")
    fmt, offsets, offset, max_align, arrays = ["="], {}, 0, 1, []
    for field, ctype in fields:
        if ctype.startswith("uchar["):
            size = int(ctype[6:-1])
            code, align = "%ds" % size, 1
            arrays.append(field)
        elif ctype in ("ptr", "ulong", "size_t"):
            code, size = ("Q" if psize == 8 else "I"), psize
            align = size
        else:
            code, size = _C_SCALARS[ctype]
            align = size
        pad = -offset % align
        if pad:
            fmt.append("%dx" % pad)
            offset += pad
        offsets[field] = offset
        fmt.append(code)
        offset += size
        max_align = max(max_align, align)
    pad = -offset % max_align
    if pad:
        fmt.append("%dx" % pad)
        offset += pad
    return _record("CStructLayout")(name, psize, struct.Struct("".join(fmt)),
                                    tuple(f for f, _ in fields), offsets, offset,
                                    tuple(arrays))


def pack_c_struct(layout, values):
    """Bytes of a struct from a {field: value} dict; missing fields are zero."""
    return layout.struct.pack(*[values.get(f, b"" if f in layout.arrays else 0)
                                for f in layout.fields])


def unpack_c_struct(layout, data):
    return dict(zip(layout.fields, layout.struct.unpack(bytes(data[:layout.size]))))


def bsd_iowr(group, number, size):
    """BSD _IOWR(g, n, t): in/out direction bits, parameter size, group, number."""
    return 0xC0000000 | (size & 0x1FFF) << 16 | ord(group) << 8 | number


class ScsiTransport(object):
    """An open SCSI device.  execute() sends one CDB and returns a ScsiResult.

    A result with status CHECK CONDITION is a normal return (the sense is in
    it); errors of the operating system or the transport raise BscryptoError.
    """

    def __init__(self, device, timeout=DEFAULT_SCSI_TIMEOUT):
        self.device = device
        self.timeout = timeout

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        raise NotImplementedError

    def _seconds(self, timeout):
        """This command's timeout: its own, else the transport's."""
        return self.timeout if timeout is None else timeout

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _device_error(device, e, during="open"):
    """One-line BscryptoError for an OSError from open() or the pass-through ioctl."""
    code = e.errno
    why = os.strerror(code) if code else str(e)
    if during == "open":
        if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return BscryptoError("cannot open %s: %s (list the tape drives and their "
                                 "SCSI generic nodes with `lsscsi -g`)" % (device, why),
                                 EXIT_DEVICE)
        if code == errno.EBUSY:
            twin = ("; the drive's SCSI generic node /dev/sgN (`lsscsi -g`) still works while "
                    "another program holds the st node open" if sys.platform.startswith("linux")
                    else "")
            return BscryptoError("cannot open %s: device busy: another program has it open "
                                 "(bareos-sd? stop it or release the drive first)%s"
                                 % (device, twin), EXIT_DEVICE)
        if code in (errno.EACCES, errno.EPERM):
            return BscryptoError("cannot open %s: %s: run as root or as a user that may "
                                 "read and write the node (often group 'tape')"
                                 % (device, why), EXIT_PERMISSION)
        if code == getattr(errno, "ENOMEDIUM", -1):
            return BscryptoError("cannot open %s: no tape loaded: load a tape and retry"
                                 % device, EXIT_NOT_READY)
        return BscryptoError("cannot open %s: %s" % (device, why), EXIT_DEVICE)
    if code in (errno.EPERM, errno.EACCES):
        return BscryptoError("%s: SCSI pass-through refused (%s): %s" % (
            device, errno.errorcode.get(code, code), _permission_hint()), EXIT_PERMISSION)
    if code in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS,
                getattr(errno, "EOPNOTSUPP", -1)):
        return BscryptoError(
            "%s does not take SCSI pass-through (%s): it is not an st/sg node (an IBM "
            "lin_tape /dev/IBMtape node, for one): use the drive's SCSI generic node "
            "/dev/sgN (`lsscsi -g` shows it)" % (device, errno.errorcode.get(code, code)),
            EXIT_NOT_SCSI)
    if code in (errno.EBUSY, errno.EAGAIN):
        return BscryptoError("%s: device busy (%s): another program is using the drive; "
                             "retry when it is idle" % (device, why), EXIT_DEVICE)
    if code in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
        return BscryptoError("%s: device gone (%s): check cabling and `lsscsi -g`"
                             % (device, why), EXIT_DEVICE)
    if code == getattr(errno, "ENOMEDIUM", -1):
        return BscryptoError("%s: no tape loaded: load a tape and retry" % device,
                             EXIT_NOT_READY)
    return BscryptoError("%s: SCSI pass-through failed: %s" % (device, why), EXIT_SCSI)


def _permission_hint():
    """What grants SCSI pass-through on this system."""
    if sys.platform.startswith("sunos"):
        return ("run as root, or give the user the sys_devices privilege "
                "(`usermod -K defaultpriv=basic,sys_devices USER`)")
    if sys.platform.startswith("openbsd"):
        return ("run as root; OpenBSD allows SECURITY PROTOCOL IN/OUT only on a node "
                "opened read-write, so a write-protected tape must be made writable")
    if not sys.platform.startswith("linux"):
        return "run as root"
    return ("run it as root (sudo): SCSI pass-through needs CAP_SYS_RAWIO. Do not `setcap` "
            "the Python binary: that lets every Python script on this host send raw SCSI "
            "commands to every device; a systemd unit can grant it to this one command "
            "(`AmbientCapabilities=CAP_SYS_RAWIO`)")


def _open_device(device):
    """Open read-write and non-blocking, as Bareos does (no wait for a tape)."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(device, os.O_RDWR | nonblock)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise _device_error(device, e)
    # st refuses read-write on a write-protected tape; status commands need no write.
    debug(1, "%s: write-protected, opening read-only" % device)
    try:
        return os.open(device, os.O_RDONLY | nonblock)
    except OSError as e:
        raise _device_error(device, e)


class _IoctlTransport(ScsiTransport):
    """Common part of the ioctl transports: open, close, the ioctl call.

    A subclass names its request structure in STRUCT: (name, C fields).
    """

    STRUCT = None

    def __init__(self, device, timeout=DEFAULT_SCSI_TIMEOUT, ioctl=None):
        ScsiTransport.__init__(self, device, timeout)
        self._ioctl = ioctl
        self.layout = c_struct_layout(*self.STRUCT)
        self.fd = _open_device(device)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _call(self, request, buf):
        ioctl = self._ioctl
        if ioctl is None:
            ioctl = fcntl.ioctl
        return ioctl(self.fd, request, buf, True)

    @staticmethod
    def _buffers(cdb, data_out, data_in_len):
        """(CDB, data, sense) buffers whose addresses go into the request.

        array.array rather than ctypes: it is in every Python build, and the
        arrays stay alive (and unmoved) as long as the caller holds them.
        """
        import array
        cdb_buf = array.array("B", bytes(cdb))
        if data_out:
            data_buf = array.array("B", bytes(data_out))
        elif data_in_len:
            data_buf = array.array("B", bytes(data_in_len))
        else:
            data_buf = None
        sense_buf = array.array("B", bytes(SENSE_BUFFER_LENGTH))
        return cdb_buf, data_buf, sense_buf

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        """One body for every ioctl: the subclass lays out its request
        (_request) and reads status, data length, sense and resid back (_reply)."""
        buffers = self._buffers(cdb, data_out, data_in_len)
        reading = bool(data_in_len) and not data_out
        length = len(data_out) if data_out else data_in_len
        request = bytearray(pack_c_struct(self.layout, self._request(
            cdb, buffers, length, reading, self._seconds(timeout))))
        try:
            self._call(self.REQUEST, request)
        except OSError as e:
            if not self._status_in_error(e, unpack_c_struct(self.layout, request)):
                raise _device_error(self.device, e, "ioctl")
        status, used, sense, resid, transport = self._reply(
            unpack_c_struct(self.layout, request), buffers[2], length)
        data_in = buffers[1].tobytes()[:used] if reading else b""
        return _record("ScsiResult")(status, data_in, sense, resid, *transport)

    def _status_in_error(self, e, out):
        """True when the ioctl's error only carries a SCSI status (Solaris)."""
        return False


def _address(buf):
    return buf.buffer_info()[0] if buf is not None else 0


class LinuxSgTransport(_IoctlTransport):
    """Linux SG_IO: works on /dev/sgN and on the st nodes /dev/nstN."""

    STRUCT = ("sg_io_hdr", SG_IO_HDR_FIELDS)
    REQUEST = SG_IO

    def _request(self, cdb, buffers, length, reading, seconds):
        cdb_buf, data_buf, sense_buf = buffers
        direction = (SG_DXFER_FROM_DEV if reading else SG_DXFER_TO_DEV if length
                     else SG_DXFER_NONE)
        return {"interface_id": ord("S"), "dxfer_direction": direction, "cmd_len": len(cdb),
                "mx_sb_len": SENSE_BUFFER_LENGTH, "dxfer_len": length,
                "dxferp": _address(data_buf), "cmdp": _address(cdb_buf),
                "sbp": _address(sense_buf), "timeout": int(seconds * 1000)}

    def _reply(self, out, sense_buf, length):
        return (out["status"], max(0, length - max(0, out["resid"])),
                sense_buf.tobytes()[:out["sb_len_wr"]], out["resid"],
                (out["host_status"], out["driver_status"], out["info"], out["duration"]))


class SolarisUscsiTransport(_IoctlTransport):
    """Solaris/illumos USCSICMD; needs root or PRIV_SYS_DEVICES."""

    STRUCT = ("uscsi_cmd", USCSI_CMD_FIELDS)
    REQUEST = USCSICMD

    def _request(self, cdb, buffers, length, reading, seconds):
        cdb_buf, data_buf, sense_buf = buffers
        return {"uscsi_flags": USCSI_SILENT | USCSI_RQENABLE | (USCSI_READ if reading
                                                                else USCSI_WRITE),
                "uscsi_timeout": min(int(seconds + 0.999), 32767),
                "uscsi_cdb": _address(cdb_buf), "uscsi_bufaddr": _address(data_buf),
                "uscsi_buflen": length, "uscsi_cdblen": len(cdb),
                "uscsi_rqlen": SENSE_BUFFER_LENGTH, "uscsi_rqbuf": _address(sense_buf)}

    def _status_in_error(self, e, out):
        # CHECK CONDITION comes back as EIO with the status filled in.
        return e.errno == errno.EIO and out["uscsi_status"]

    def _reply(self, out, sense_buf, length):
        sense = b""
        if out["uscsi_status"] == SCSI_STATUS_CHECK_CONDITION and out["uscsi_rqstatus"] == 0:
            sense = sense_buf.tobytes()[:SENSE_BUFFER_LENGTH - out["uscsi_rqresid"]]
        resid = out["uscsi_resid"]
        return out["uscsi_status"], length - resid, sense, resid, (0, 0, 0, 0)


class BsdScsireqTransport(_IoctlTransport):
    """NetBSD and OpenBSD SCIOCCOMMAND (OpenBSD: at most 64 KiB, read-write open)."""

    STRUCT = ("scsireq", SCSIREQ_FIELDS)

    def __init__(self, device, timeout=DEFAULT_SCSI_TIMEOUT, ioctl=None):
        _IoctlTransport.__init__(self, device, timeout, ioctl)
        self.REQUEST = bsd_iowr("Q", 1, self.layout.size)   # the number encodes the size

    def _request(self, cdb, buffers, length, reading, seconds):
        return {"flags": SCCMD_READ if reading else SCCMD_WRITE if length else 0,
                "timeout": int(seconds * 1000), "cmd": bytes(cdb), "cmdlen": len(cdb),
                "databuf": _address(buffers[1]), "datalen": length, "senselen": 48}

    def _reply(self, out, sense_buf, length):
        retsts = out["retsts"]
        if retsts in (1, 2, 4):
            raise _device_error(self.device, OSError(
                {1: errno.ETIMEDOUT, 2: errno.EBUSY}.get(retsts, errno.EIO),
                "SCIOCCOMMAND: %s" % SCCMD_RETSTS_NAMES[retsts]), "ioctl")
        used = out["datalen_used"]
        sense = out["sense"][:out["senselen_used"]] if retsts == 3 else b""
        status = out["status"] or (SCSI_STATUS_CHECK_CONDITION if retsts == 3 else 0)
        return status, used, sense, length - used, (0, 0, 0, 0)


# FreeBSD's CAMIOCOMMAND number embeds sizeof(union ccb), which changes between
# releases and architectures: the base system's camcontrol(8) sends the CDB.
_CAM_SENSE_KEYS = {"NO SENSE": 0, "RECOVERED ERROR": 1, "NOT READY": 2, "MEDIUM ERROR": 3,
                   "HARDWARE FAILURE": 4, "ILLEGAL REQUEST": 5, "UNIT ATTENTION": 6,
                   "DATA PROTECT": 7, "BLANK CHECK": 8, "Vendor Specific": 9,
                   "COPY ABORTED": 10, "ABORTED COMMAND": 11, "EQUAL": 12,
                   "VOLUME OVERFLOW": 13, "MISCOMPARE": 14}


def _run_process(argv, stdin_data):
    import subprocess
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(stdin_data)
    return proc.returncode, out, err.decode("utf-8", "replace")


class CamcontrolTransport(ScsiTransport):
    """FreeBSD: `camcontrol cmd DEV -c HEX -i LEN -` (data in) or `-o LEN -` (data out)."""

    def __init__(self, device, timeout=DEFAULT_SCSI_TIMEOUT, runner=None, camcontrol=None):
        ScsiTransport.__init__(self, device, timeout)
        self._run = runner or _run_process
        if camcontrol is None:
            import shutil
            camcontrol = shutil.which("camcontrol") or (
                "/sbin/camcontrol" if os.path.exists("/sbin/camcontrol") else None)
        if camcontrol is None:
            raise BscryptoError("camcontrol(8) not found: on FreeBSD it is part of the base "
                                "system (/sbin/camcontrol) and is how this tool reaches CAM",
                                EXIT_NOT_SCSI)
        self.camcontrol = camcontrol

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        import re
        seconds = self._seconds(timeout)
        argv = [self.camcontrol, "cmd", self.device, "-v", "-t", str(int(seconds + 0.999)),
                "-c", " ".join("%02x" % b for b in bytearray(cdb))]
        if data_out:
            argv += ["-o", str(len(data_out)), "-"]
        elif data_in_len:
            argv += ["-i", str(data_in_len), "-"]
        rc, out, err = self._run(argv, bytes(data_out))
        if rc == 0:
            data_in = out[:data_in_len] if data_in_len and not data_out else b""
            return _record("ScsiResult")(0, data_in, b"", data_in_len - len(data_in),
                                         0, 0, 0, 0)
        m = re.search(r"SCSI sense: (.+?) asc:([0-9a-fA-F]+),([0-9a-fA-F]+)", err)
        if m and m.group(1).strip() in _CAM_SENSE_KEYS:
            key = _CAM_SENSE_KEYS[m.group(1).strip()]
            sense = bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0,
                           int(m.group(2), 16), int(m.group(3), 16), 0, 0, 0, 0])
            return _record("ScsiResult")(SCSI_STATUS_CHECK_CONDITION, b"", sense,
                                         data_in_len, 0, 0, 0, 0)
        m = re.search(r"SCSI status: (.+)", err)
        if m and "Busy" in m.group(1):
            return _record("ScsiResult")(SCSI_STATUS_BUSY, b"", b"", data_in_len, 0, 0, 0, 0)
        if "Reservation Conflict" in err:
            return _record("ScsiResult")(SCSI_STATUS_RESERVATION_CONFLICT, b"", b"",
                                         data_in_len, 0, 0, 0, 0)
        lines = [line for line in err.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "exit status %d" % rc
        if "Permission denied" in err or "Operation not permitted" in err:
            raise _device_error(self.device, OSError(errno.EACCES, last), "open")
        if "No such file" in err or "cam_lookup_pass" in err:
            raise _device_error(self.device, OSError(errno.ENOENT, last), "open")
        raise BscryptoError("%s: camcontrol failed: %s" % (self.device, last), EXIT_SCSI)


def open_transport(device, timeout=DEFAULT_SCSI_TIMEOUT):
    """The transport for this operating system, opened on `device`."""
    platform = sys.platform
    if platform.startswith("linux"):
        return LinuxSgTransport(device, timeout)
    if platform.startswith("sunos"):
        return SolarisUscsiTransport(device, timeout)
    if platform.startswith(("netbsd", "openbsd")):
        return BsdScsireqTransport(device, timeout)
    if platform.startswith(("freebsd", "dragonfly")):
        return CamcontrolTransport(device, timeout)
    raise BscryptoError("no SCSI pass-through for %s: supported are Linux, Solaris/illumos, "
                        "NetBSD, OpenBSD and FreeBSD" % platform, EXIT_NOT_SCSI)


# ---------------------------------------------------------------------------
# SSC pages: build and parse
# ---------------------------------------------------------------------------
#
# Pure functions from values to bytes and back.  Names and bit positions are
# those of SPC-4 (SECURITY PROTOCOL IN/OUT, INQUIRY, sense data) and SSC-4
# (tape data encryption pages), so each field can be checked against the
# standard's tables.

OP_TEST_UNIT_READY = 0x00
OP_INQUIRY = 0x12
OP_SECURITY_PROTOCOL_IN = 0xA2
OP_SECURITY_PROTOCOL_OUT = 0xB5

SECURITY_PROTOCOL_INFORMATION = 0x00     # SPC-4: supported security protocols
SECURITY_PROTOCOL_TAPE = 0x20            # SSC-4: tape data encryption
SPIN_SUPPORTED_PROTOCOLS = 0x0000        # protocol 00h page
# SSC-4 tape data encryption pages (security protocol specific field; 0000h
# and 0001h list the in/out pages, 0011h the key formats).
DATA_ENCRYPTION_CAPABILITIES_PAGE = 0x0010
DATA_ENCRYPTION_STATUS_PAGE = 0x0020
NEXT_BLOCK_ENCRYPTION_STATUS_PAGE = 0x0021
SET_DATA_ENCRYPTION_PAGE = 0x0010        # SPOUT

# Bareos's SPP_PAGE_BUFFER: 4-byte header + 8192; it asks SPIN for this much.
SPIN_ALLOCATION_LENGTH = 8196
# Some firmware refuses an ALLOCATION LENGTH above 8192 (05/24/00 pointing at CDB
# bytes 6-9); stenc 2.0 asks 8192.  Such a drive is asked once more with this.
SPIN_ALLOCATION_LIMIT = 8192
INQUIRY_ALLOCATION_LENGTH = 96
VPD_UNIT_SERIAL_NUMBER = 0x80

SCOPE_ALL_I_T_NEXUS = 2          # SCOPE: 0 public, 1 local, 2 all I_T nexus
ENCRYPTION_MODE_DISABLE = 0      # 1 is EXTERNAL (not used by AME)
ENCRYPTION_MODE_ENCRYPT = 2
DECRYPTION_MODE_DISABLE = 0
DECRYPTION_MODE_RAW = 1
DECRYPTION_MODE_DECRYPT = 2
DECRYPTION_MODE_MIXED = 3
RDMC_DEFAULT = 0                 # raw decryption marking per the algorithm's default
RDMC_ENABLED = 2                 # blocks written may be read raw (--allow-raw-read)
RDMC_DISABLED = 3                # blocks written may not be read raw (--no-raw-read)
KEY_FORMAT_PLAIN = 0
KAD_FORMAT_UNSPECIFIED = 0
KAD_FORMAT_ASCII = 2
KAD_TYPE_UKAD = 0                # unauthenticated key-associated data (key description)
KAD_TYPE_NAMES = {0: "U-KAD", 1: "A-KAD", 2: "nonce", 3: "M-KAD"}
PARAMETERS_CONTROL_DRIVE = 2
PARAMETERS_CONTROL_LIBRARY = 3
ENCRYPT_C_SPOUT = 2              # ENCRYPT_C/DECRYPT_C: capable, controlled by SPOUT

# Security algorithm codes: 0001xxxxh with an IKEv2 transform id (SPC-4).
ALGORITHM_AES_256_GCM = 0x00010014
_ALGORITHM_NAMES = {0x00010014: "AES-GCM", 0x00010010: "AES-CCM", 0x0001000C: "AES-CBC",
                    0x0001000D: "AES-CTR", 0x00010013: "AES-GCM-12", 0x00010012: "AES-GCM-8",
                    0x0001000F: "AES-CCM-12", 0x0001000E: "AES-CCM-8",
                    0x00010016: "XTS-AES"}
# Bareos, and this tool by default, loads a 32-byte key (AES-256).
DRIVE_KEY_LENGTH = 32
# Bareos's and stenc's U-KAD length when the drive's limit cannot be read.
DEFAULT_UKAD_LIMIT = 0x1E


def algorithm_name(code, key_length=None):
    """'AES-256-GCM' for 0x00010014 with a 32-byte key; the hex code if unknown."""
    name = _ALGORITHM_NAMES.get(code)
    if name is None:
        return "algorithm 0x%08X" % code
    if key_length:
        name = name.replace("AES-", "AES-%d-" % (8 * key_length), 1)
    return name


# -- CDB builders --

def cdb_security_protocol_in(protocol, specific, allocation_length, inc_512=False):
    """SPC-4 SECURITY PROTOCOL IN (A2h), 12 bytes."""
    return (bytes([OP_SECURITY_PROTOCOL_IN, protocol]) + specific.to_bytes(2, "big")
            + bytes([0x80 if inc_512 else 0, 0]) + allocation_length.to_bytes(4, "big")
            + b"\0\0")


def cdb_security_protocol_out(protocol, specific, transfer_length, inc_512=False):
    """SPC-4 SECURITY PROTOCOL OUT (B5h), 12 bytes."""
    return (bytes([OP_SECURITY_PROTOCOL_OUT, protocol]) + specific.to_bytes(2, "big")
            + bytes([0x80 if inc_512 else 0, 0]) + transfer_length.to_bytes(4, "big")
            + b"\0\0")


def cdb_inquiry(allocation_length=INQUIRY_ALLOCATION_LENGTH, vpd_page=None):
    """SPC-4 INQUIRY (12h): standard data, or the VPD page given (EVPD=1)."""
    evpd = 0 if vpd_page is None else 1
    return (bytes([OP_INQUIRY, evpd, vpd_page or 0]) + allocation_length.to_bytes(2, "big")
            + b"\0")


def cdb_test_unit_ready():
    return bytes([OP_TEST_UNIT_READY, 0, 0, 0, 0, 0])


# Tape motion (SSC-4), for `verify`: REWIND, SPACE(6) and READ(6) only; never
# a command that writes.
OP_REWIND = 0x01
OP_READ_6 = 0x08
OP_SPACE_6 = 0x11
SPACE_BLOCKS = 0
SPACE_FILEMARKS = 1


def cdb_rewind():
    return bytes([OP_REWIND, 0, 0, 0, 0, 0])


def cdb_space(code, count):
    """SPACE(6): code SPACE_BLOCKS or SPACE_FILEMARKS, count signed 24 bits."""
    return bytes([OP_SPACE_6, code]) + (count & 0xFFFFFF).to_bytes(3, "big") + b"\0"


def cdb_read6(length, sili=True):
    """READ(6) of one variable-length block; SILI: a shorter block is no error."""
    return bytes([OP_READ_6, 0x02 if sili else 0]) + length.to_bytes(3, "big") + b"\0"


# -- Parsers: bytes from the drive to records --

def _page_body(data, page_code, minimum, what):
    """(data, end) of a SPIN page after checking its code and length."""
    data = bytes(data)
    if len(data) < 4:
        raise ValueError("%s: %d bytes, too short for a page header" % (what, len(data)))
    code = int.from_bytes(data[0:2], "big")
    if page_code is not None and code != page_code:
        raise ValueError("%s: page code %04Xh, expected %04Xh" % (what, code, page_code))
    end = min(len(data), 4 + int.from_bytes(data[2:4], "big"))
    if end < minimum:
        raise ValueError("%s: %d bytes, needs at least %d" % (what, end, minimum))
    return data, end


def parse_supported_security_protocols(data):
    """SPIN protocol 00h page 0000h: the list of supported security protocols."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("supported security protocols: %d bytes, needs 8" % len(data))
    end = min(len(data), 8 + int.from_bytes(data[6:8], "big"))
    return _record("SupportedSecurityProtocols")(tuple(bytearray(data[8:end])))


def parse_kads(data, start, end, problems=None):
    """Key-associated data descriptors from start to end (type, flags, length, data).

    All-zero headers are padding (an HBA that reports no residual, a page
    length that overstates the data), not empty U-KADs.  A descriptor that
    overruns the page raises ValueError, or with a problems list is noted
    there and ends the list, so the fields before it can still be shown.
    """
    kads = []
    offset = start
    while offset + 4 <= end:
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if not any(bytearray(data[offset:offset + 4])):
            offset += 4
            continue
        if offset + 4 + length > end:
            problem = ("key-associated data descriptor at byte %d overruns the page (length "
                       "%d, %d bytes left)" % (offset, length, end - offset - 4))
            if problems is None:
                raise ValueError(problem)
            problems.append(problem)
            break
        kads.append(_record("KeyAssociatedData")(
            data[offset], data[offset + 1] & 0x07, bytes(data[offset + 4:offset + 4 + length])))
        offset += 4 + length
    return tuple(kads)


def parse_data_encryption_capabilities(data):
    """SSC-4 Data Encryption Capabilities page (0010h) with every algorithm descriptor."""
    data, end = _page_body(data, DATA_ENCRYPTION_CAPABILITIES_PAGE, 20, "capabilities page")
    descriptor = _record("AlgorithmDescriptor")
    algorithms = []
    offset = 20
    while offset + 4 <= end:
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        d = data[offset:offset + 4 + length]
        if length < 20 or len(d) < 24:
            raise ValueError("algorithm descriptor at byte %d: length %d, needs 20"
                             % (offset, length))
        f1, f2, f3 = d[4], d[5], d[12]
        algorithms.append(descriptor(
            algorithm_index=d[0], avfmv=f1 >> 7, sdk_c=f1 >> 6 & 1, mac_c=f1 >> 5 & 1,
            delb_c=f1 >> 4 & 1, decrypt_c=f1 >> 2 & 3, encrypt_c=f1 & 3,
            avfcp=f2 >> 6, nonce_c=f2 >> 4 & 3, kadf_c=f2 >> 3 & 1, vcelb_c=f2 >> 2 & 1,
            ukadf=f2 >> 1 & 1, akadf=f2 & 1,
            maximum_ukad_length=int.from_bytes(d[6:8], "big"),
            maximum_akad_length=int.from_bytes(d[8:10], "big"),
            key_length=int.from_bytes(d[10:12], "big"),
            dkad_c=f3 >> 6, eemc_c=f3 >> 4 & 3, rdmc_c=f3 >> 1 & 7, earem=f3 & 1,
            maximum_eedk_count=d[13] & 0x0F, msdk_count=int.from_bytes(d[14:16], "big"),
            maximum_eedk_size=int.from_bytes(d[16:18], "big"),
            security_algorithm_code=int.from_bytes(d[20:24], "big")))
        offset += 4 + length
    return _record("DataEncryptionCapabilities")(data[4] >> 2 & 3, data[4] & 3,
                                                 tuple(algorithms))


def parse_data_encryption_status(data, problems=None):
    """SSC-4 Data Encryption Status page (0020h), with its key-associated data
    (problems: see parse_kads)."""
    data, end = _page_body(data, DATA_ENCRYPTION_STATUS_PAGE, 16, "status page")
    return _record("DataEncryptionStatus")(
        i_t_nexus_scope=data[4] >> 5, key_scope=data[4] & 7, encryption_mode=data[5],
        decryption_mode=data[6], algorithm_index=data[7],
        key_instance_counter=int.from_bytes(data[8:12], "big"),
        parameters_control=data[12] >> 4 & 7, vcelb=data[12] >> 3 & 1,
        ceems=data[12] >> 1 & 3, rdmd=data[12] & 1, kad_format=data[13],
        asdk_count=int.from_bytes(data[14:16], "big"),
        kads=parse_kads(data, 24, end, problems))


def parse_next_block_encryption_status(data, problems=None):
    """SSC-4 Next Block Encryption Status page (0021h), with its key-associated data
    (problems: see parse_kads)."""
    data, end = _page_body(data, NEXT_BLOCK_ENCRYPTION_STATUS_PAGE, 16, "next block page")
    return _record("NextBlockEncryptionStatus")(
        logical_object_number=int.from_bytes(data[4:12], "big"),
        compression_status=data[12] >> 4, encryption_status=data[12] & 0x0F,
        algorithm_index=data[13], emes=data[14] >> 1 & 1, rdmds=data[14] & 1,
        kad_format=data[15], kads=parse_kads(data, 16, end, problems))


def _ascii_field(raw):
    return raw.decode("ascii", "replace").strip(" \0")


def parse_inquiry(data):
    """SPC-4 standard INQUIRY data: device type, vendor, product, revision."""
    data = bytes(data)
    if len(data) < 36:
        raise ValueError("INQUIRY data: %d bytes, needs 36" % len(data))
    return _record("InquiryData")(
        peripheral_qualifier=data[0] >> 5, peripheral_device_type=data[0] & 0x1F,
        rmb=data[1] >> 7, version=data[2], response_data_format=data[3] & 0x0F,
        vendor=_ascii_field(data[8:16]), product=_ascii_field(data[16:32]),
        revision=_ascii_field(data[32:36]))


def parse_unit_serial_number(data):
    """SPC-4 Unit Serial Number VPD page (80h): the serial number text."""
    data = bytes(data)
    if len(data) < 4 or data[1] != VPD_UNIT_SERIAL_NUMBER:
        raise ValueError("not a unit serial number page")
    return _ascii_field(data[4:4 + int.from_bytes(data[2:4], "big")])


# -- The Set Data Encryption page (SPOUT 0010h) --

def build_kad(descriptor_type, descriptor, authenticated=0):
    """One key-associated data descriptor: type, flags, 2-byte length, data."""
    descriptor = bytes(descriptor)
    return (bytes([descriptor_type, authenticated & 7]) + len(descriptor).to_bytes(2, "big")
            + descriptor)


def build_set_data_encryption_page(key=b"", encryption_mode=ENCRYPTION_MODE_ENCRYPT,
                                   decryption_mode=DECRYPTION_MODE_MIXED, algorithm_index=1,
                                   scope=SCOPE_ALL_I_T_NEXUS, lock=False, ceem=0,
                                   rdmc=RDMC_DEFAULT, sdk=False, ckod=False, ckorp=False,
                                   ckorl=False, key_format=KEY_FORMAT_PLAIN,
                                   kad_format=KAD_FORMAT_UNSPECIFIED, kads=()):
    """SSC-4 Set Data Encryption page; kads is a sequence of (type, bytes)."""
    key = bytes(key)
    body = (bytes([scope << 5 | int(lock),
                   ceem << 6 | rdmc << 4 | int(sdk) << 3 | int(ckod) << 2
                   | int(ckorp) << 1 | int(ckorl),
                   encryption_mode, decryption_mode, algorithm_index, key_format, kad_format])
            + bytes(7) + len(key).to_bytes(2, "big") + key
            + b"".join(build_kad(t, d) for t, d in kads))
    return SET_DATA_ENCRYPTION_PAGE.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def bareos_set_key_page(passphrase, algorithm_index=1):
    """Exactly the page Bareos sends to load a key: scope all I_T nexus, CEEM 0,
    encrypt, mixed decryption, Bareos's key bytes (passphrase[:31] + NUL)."""
    return build_set_data_encryption_page(
        drive_key_bytes(passphrase), ENCRYPTION_MODE_ENCRYPT, DECRYPTION_MODE_MIXED,
        algorithm_index)


def bareos_clear_key_page(algorithm_index=1):
    """Exactly the page Bareos sends to clear: modes 0/0 and a zero 32-byte key."""
    return build_set_data_encryption_page(
        bytes(DRIVE_KEY_LENGTH), ENCRYPTION_MODE_DISABLE, DECRYPTION_MODE_DISABLE,
        algorithm_index)


def parse_hex_key_file(data, source="key file"):
    """stenc's key file: 64 hex digits, then an optional description line.

    Returns (32 key bytes, description text or None).
    """
    text = bytes(data).decode("ascii", "replace")
    lines = text.splitlines()
    digits = lines[0].strip() if lines else ""
    if len(digits) != 2 * DRIVE_KEY_LENGTH:
        raise KeyFileError("%s: first line must be %d hex digits (a 256-bit key), found %d "
                           "characters" % (source, 2 * DRIVE_KEY_LENGTH, len(digits)))
    try:
        key = binascii.unhexlify(digits)
    except (binascii.Error, ValueError):
        raise KeyFileError("%s: first line is not hexadecimal" % source)
    description = lines[1].strip() if len(lines) > 1 and lines[1].strip() else None
    return key, description


# -- Bareos's status text (lib/scsi_crypto.cc), line for line --

_BAREOS_ENCRYPTION_MODE = {0: "Disabled", 1: "External", 2: "Encrypt"}
_BAREOS_DECRYPTION_MODE = {0: "Disabled", 1: "Raw", 2: "Decrypt", 3: "Mixed"}
_BAREOS_CEEMS = {1: "No", 2: "External", 3: "Encrypt"}
_BAREOS_PARAMETERS_CONTROL = {0: "No report", 1: "Application Managed", 2: "Drive Managed",
                              3: "Library/Key Management Appliance Managed", 4: "Unsupported"}
_BAREOS_KAD_FORMAT = {0: "Normal key", 1: "Vendor-specific reference",
                      2: "Wrapped public key", 3: "Key using ESP-SCSI"}
_BAREOS_COMPRESSION_STATUS = {0: "Unknown", 1: "Unavailable", 2: "Illegal logical block",
                              3: "Compression Disabled", 4: "Compression Enabled"}
_BAREOS_ENCRYPTION_STATUS = {
    0: "Unknown", 1: "Unavailable", 2: "Illegal logical block", 3: "Encryption Disabled",
    4: "Encryption Enabled but with non supported algorithm", 5: "Encryption Enabled",
    6: "Encryption Enabled but no valid key available for decryption"}
BAREOS_STATUS_INDENT = "   "


def _enabled(bit):
    return "Enabled" if bit else "Disabled"


def format_drive_status_bareos(status):
    """The text of Bareos `bscrypto -e` for a DataEncryptionStatus (lines end in \\n).

    A value Bareos has no text for prints no line, as in Bareos.
    """
    out = ["Drive encryption status:"]
    i = BAREOS_STATUS_INDENT
    if status.encryption_mode in _BAREOS_ENCRYPTION_MODE:
        out.append(i + "Encryption Mode: " + _BAREOS_ENCRYPTION_MODE[status.encryption_mode])
    if status.decryption_mode in _BAREOS_DECRYPTION_MODE:
        out.append(i + "Decryption Mode: " + _BAREOS_DECRYPTION_MODE[status.decryption_mode])
    out.append(i + "Raw Decryption Mode Disabled (RDMD): " + _enabled(status.rdmd))
    if status.ceems in _BAREOS_CEEMS:
        out.append(i + "Check External Encryption Mode Status (CEEMS) : "
                   + _BAREOS_CEEMS[status.ceems])
    out.append(i + "Volume Contains Encrypted Logical Blocks (VCELB): "
               + _enabled(status.vcelb))
    if status.parameters_control in _BAREOS_PARAMETERS_CONTROL:
        out.append(i + "Logical Block encryption parameters: "
                   + _BAREOS_PARAMETERS_CONTROL[status.parameters_control])
    # Bareos's condition: both modes enabled (its comment says "either").
    if (status.encryption_mode != ENCRYPTION_MODE_DISABLE
            and status.decryption_mode != DECRYPTION_MODE_DISABLE
            and status.kad_format in _BAREOS_KAD_FORMAT):
        out.append(i + "Key Associated Data (KAD) Descriptor: "
                   + _BAREOS_KAD_FORMAT[status.kad_format])
    return "\n".join(out) + "\n"


def format_volume_status_bareos(nbes):
    """The text of Bareos `bscrypto -v` for a NextBlockEncryptionStatus."""
    out = ["Volume encryption status:"]
    i = BAREOS_STATUS_INDENT
    if nbes.compression_status in _BAREOS_COMPRESSION_STATUS:
        out.append(i + "Compression Status: "
                   + _BAREOS_COMPRESSION_STATUS[nbes.compression_status])
    if nbes.encryption_status in _BAREOS_ENCRYPTION_STATUS:
        out.append(i + "Encryption Status: " + _BAREOS_ENCRYPTION_STATUS[nbes.encryption_status])
    out.append(i + "Raw Decryption Mode Disabled Status (RDMDS): " + _enabled(nbes.rdmds))
    out.append(i + "Encryption Mode External Status (EMES): " + _enabled(nbes.emes))
    if nbes.encryption_status == 5 and nbes.kad_format in _BAREOS_KAD_FORMAT:
        out.append(i + "Next Block Key Associated Data (KAD) Descriptor: "
                   + _BAREOS_KAD_FORMAT[nbes.kad_format])
    return "\n".join(out) + "\n"


# -- Readable names for --detail and --json (SSC-4 terms) --

SCOPE_NAMES = {0: "public", 1: "local", 2: "all I_T nexus"}
ENCRYPTION_MODE_NAMES = {0: "disable", 1: "external", 2: "encrypt"}
DECRYPTION_MODE_NAMES = {0: "disable", 1: "raw", 2: "decrypt", 3: "mixed"}
PARAMETERS_CONTROL_NAMES = {0: "not reported", 1: "application", 2: "drive",
                            3: "library or key manager", 4: "unsupported"}
KAD_FORMAT_NAMES = {0: "unspecified", 1: "binary", 2: "ascii"}
COMPRESSION_STATUS_NAMES = {0: "unknown", 1: "unavailable", 2: "not a logical block",
                            3: "not compressed", 4: "compressed"}
ENCRYPTION_STATUS_NAMES = {0: "unknown", 1: "unavailable", 2: "not a logical block",
                           3: "not encrypted", 4: "encrypted, unsupported algorithm",
                           5: "encrypted, decryptable", 6: "encrypted, no valid key"}
CAPABILITY_NAMES = {0: "no", 1: "external only", 2: "yes", 3: "reserved"}
DKAD_C_NAMES = {0: "not specified", 1: "key descriptor required", 2: "not required",
                3: "optional"}
RDMC_C_NAMES = {0: "not specified", 1: "raw decryption mode control not supported",
                4: "raw read off by default", 5: "raw read on by default",
                6: "raw read never allowed", 7: "raw read always allowed"}
KAD_AUTHENTICATED_NAMES = {0: "not reported", 1: "not authenticated", 2: "authenticated",
                           3: "authentication failed"}


def _name(names, value):
    return names.get(value, "reserved (%d)" % value)


def _kad_text(kad):
    """A KAD descriptor as text: ASCII when printable, else hex."""
    data = kad.descriptor
    if data and all(32 <= b < 127 for b in bytearray(data.rstrip(b"\0"))):
        return '"%s"' % data.rstrip(b"\0").decode("ascii")
    return data.hex() or '""'


def _kad_label(kad):
    """'U-KAD', or 'U-KAD, authenticated' when the drive reports the AUTHENTICATED field."""
    label = _name(KAD_TYPE_NAMES, kad.descriptor_type)
    if kad.authenticated:
        label += ", " + _name(KAD_AUTHENTICATED_NAMES, kad.authenticated)
    return label


def _kad_dict(kad):
    d = {"type": _name(KAD_TYPE_NAMES, kad.descriptor_type),
         "authenticated": _name(KAD_AUTHENTICATED_NAMES, kad.authenticated),
         "hex": kad.descriptor.hex()}
    text = kad.descriptor.rstrip(b"\0")
    if all(32 <= b < 127 for b in bytearray(text)):
        d["text"] = text.decode("ascii")
    return d


def drive_status_dict(status):
    """A DataEncryptionStatus for --json: SSC-4 field names, enumerations by name."""
    return {
        "i_t_nexus_scope": _name(SCOPE_NAMES, status.i_t_nexus_scope),
        "key_scope": _name(SCOPE_NAMES, status.key_scope),
        "encryption_mode": _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
        "decryption_mode": _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
        "algorithm_index": status.algorithm_index,
        "key_instance_counter": status.key_instance_counter,
        "parameters_control": _name(PARAMETERS_CONTROL_NAMES, status.parameters_control),
        "vcelb": bool(status.vcelb), "ceems": status.ceems, "rdmd": bool(status.rdmd),
        "kad_format": _name(KAD_FORMAT_NAMES, status.kad_format),
        "asdk_count": status.asdk_count, "kads": [_kad_dict(k) for k in status.kads]}


def next_block_status_dict(nbes):
    return {
        "logical_object_number": nbes.logical_object_number,
        "compression_status": _name(COMPRESSION_STATUS_NAMES, nbes.compression_status),
        "encryption_status": _name(ENCRYPTION_STATUS_NAMES, nbes.encryption_status),
        "algorithm_index": nbes.algorithm_index, "emes": bool(nbes.emes),
        "rdmds": bool(nbes.rdmds), "kad_format": _name(KAD_FORMAT_NAMES, nbes.kad_format),
        "kads": [_kad_dict(k) for k in nbes.kads]}


def algorithm_dict(a):
    return {
        "algorithm_index": a.algorithm_index,
        "security_algorithm_code": "0x%08X" % a.security_algorithm_code,
        "name": algorithm_name(a.security_algorithm_code, a.key_length),
        "key_length": a.key_length,
        "encrypt_c": _name(CAPABILITY_NAMES, a.encrypt_c),
        "decrypt_c": _name(CAPABILITY_NAMES, a.decrypt_c),
        "avfmv": bool(a.avfmv), "kadf_c": bool(a.kadf_c), "vcelb_c": bool(a.vcelb_c),
        "maximum_ukad_length": a.maximum_ukad_length, "ukadf": bool(a.ukadf),
        "maximum_akad_length": a.maximum_akad_length, "akadf": bool(a.akadf),
        "dkad_c": _name(DKAD_C_NAMES, a.dkad_c), "rdmc_c": _name(RDMC_C_NAMES, a.rdmc_c),
        "eemc_c": a.eemc_c}


def format_algorithm(a):
    """One line for --detail: what an algorithm descriptor allows."""
    parts = ["%s (0x%08X)" % (algorithm_name(a.security_algorithm_code, a.key_length),
                              a.security_algorithm_code),
             "key %d bytes" % a.key_length,
             "encrypt: %s" % _name(CAPABILITY_NAMES, a.encrypt_c),
             "decrypt: %s" % _name(CAPABILITY_NAMES, a.decrypt_c)]
    if a.kadf_c or a.maximum_ukad_length:
        parts.append("key descriptor (U-KAD) %s %d bytes"
                     % ("exactly" if a.ukadf else "up to", a.maximum_ukad_length))
    if a.maximum_akad_length:
        parts.append("A-KAD %s %d bytes" % ("exactly" if a.akadf else "up to",
                                            a.maximum_akad_length))
    if a.dkad_c:
        parts.append("DKAD_C: %s" % _name(DKAD_C_NAMES, a.dkad_c))
    if a.rdmc_c:
        parts.append("RDMC_C: %s" % _name(RDMC_C_NAMES, a.rdmc_c))
    if not a.avfmv:
        parts.append("not valid for the mounted volume")
    return "index %d: %s" % (a.algorithm_index, ", ".join(parts))


# -- Sense data (SPC-4 4.5) --

SENSE_KEY_NAMES = ("NO SENSE", "RECOVERED ERROR", "NOT READY", "MEDIUM ERROR",
                   "HARDWARE ERROR", "ILLEGAL REQUEST", "UNIT ATTENTION", "DATA PROTECT",
                   "BLANK CHECK", "VENDOR SPECIFIC", "COPY ABORTED", "ABORTED COMMAND",
                   "EQUAL", "VOLUME OVERFLOW", "MISCOMPARE", "COMPLETED")
SENSE_NO_SENSE = 0x0
SENSE_NOT_READY = 0x2
SENSE_ILLEGAL_REQUEST = 0x5
SENSE_UNIT_ATTENTION = 0x6
SENSE_DATA_PROTECT = 0x7
SENSE_BLANK_CHECK = 0x8            # end of data reached


def parse_sense(data):
    """Decode fixed (70h/71h) or descriptor (72h/73h) sense data into a SenseData.

    The field pointer (sense-key specific bytes, SKSV set, key ILLEGAL REQUEST)
    says which CDB or parameter byte the device server rejected.
    """
    data = bytes(data)
    if not data:
        raise ValueError("no sense data")
    response_code = data[0] & 0x7F
    information = command_specific = None
    filemark = eom = ili = False
    sks = fru = None
    if response_code in (0x70, 0x71):
        data = data.ljust(18, b"\0")
        valid = bool(data[0] & 0x80)
        key, asc, ascq = data[2] & 0x0F, data[12], data[13]
        filemark, eom, ili = bool(data[2] & 0x80), bool(data[2] & 0x40), bool(data[2] & 0x20)
        if valid:
            information = int.from_bytes(data[3:7], "big")
        command_specific = int.from_bytes(data[8:12], "big")
        fru = data[14]
        if data[7] >= 10 and data[15] & 0x80:
            sks = data[15:18]
    elif response_code in (0x72, 0x73):
        data = data.ljust(8, b"\0")
        valid = False
        key, asc, ascq = data[1] & 0x0F, data[2], data[3]
        end = min(len(data), 8 + data[7])
        offset = 8
        while offset + 2 <= end:
            dtype, dlen = data[offset], data[offset + 1]
            d = data[offset + 2:offset + 2 + dlen]
            if dtype == 0x00 and len(d) >= 10:          # information
                valid = bool(d[0] & 0x80)
                information = int.from_bytes(d[2:10], "big")
            elif dtype == 0x01 and len(d) >= 10:        # command-specific information
                command_specific = int.from_bytes(d[2:10], "big")
            elif dtype == 0x02 and len(d) >= 5 and d[2] & 0x80:   # sense-key specific
                sks = d[2:5]
            elif dtype == 0x03 and len(d) >= 2:         # field replaceable unit
                fru = d[1]
            elif dtype == 0x04 and len(d) >= 2:         # stream commands
                filemark, eom, ili = bool(d[1] & 0x80), bool(d[1] & 0x40), bool(d[1] & 0x20)
            offset += 2 + dlen
    else:
        raise ValueError("sense response code %02Xh is neither fixed nor descriptor format"
                         % response_code)
    field_pointer = None
    if sks is not None and key == SENSE_ILLEGAL_REQUEST:
        field_pointer = _record("FieldPointer")(
            command_data=bool(sks[0] & 0x40), bit_pointer_valid=bool(sks[0] & 0x08),
            bit_pointer=sks[0] & 0x07, field=int.from_bytes(sks[1:3], "big"))
    return _record("SenseData")(
        response_code=response_code, current=response_code in (0x70, 0x72), valid=valid,
        sense_key=key, asc=asc, ascq=ascq, information=information,
        command_specific=command_specific, filemark=filemark, eom=eom, ili=ili,
        field_pointer=field_pointer, fru=fru, raw=data)


def asc_text(asc, ascq, vendor=None):
    """The T10 text of an additional sense code and qualifier; with vendor
    "IBM" (INQUIRY), IBM's own encryption codes are named too."""
    text = ASC_NAMES.get(asc << 8 | ascq)
    if text is None and vendor == "IBM":
        text = IBM_ASC_NAMES.get(asc << 8 | ascq)
    if text is not None:
        return text
    if asc == 0x40 and ascq >= 0x80:
        return "Diagnostic failure on component [0x%02x]" % ascq
    if asc == 0x4D:
        return "Tagged overlapped commands [0x%x]" % ascq
    if asc == 0x70:
        return "Decompression exception short algorithm id of 0x%x" % ascq
    if asc >= 0x80 or ascq >= 0x80:
        return "Vendor specific ASC/ASCQ %02Xh/%02Xh" % (asc, ascq)
    return "ASC/ASCQ %02Xh/%02Xh (not in this tool's table)" % (asc, ascq)


def sense_text(sense, vendor=None):
    """One line: key, ASC/ASCQ text and code, and the field pointer if valid."""
    text = "%s, %s (%02X/%02X/%02X)" % (SENSE_KEY_NAMES[sense.sense_key],
                                        asc_text(sense.asc, sense.ascq, vendor),
                                        sense.sense_key, sense.asc, sense.ascq)
    fp = sense.field_pointer
    if fp is not None:
        text += ", rejected %s byte %d" % ("CDB" if fp.command_data else "parameter",
                                           fp.field)
        if fp.bit_pointer_valid:
            text += " bit %d" % fp.bit_pointer
    return text


# ---------------------------------------------------------------------------
# Bareos volume label
# ---------------------------------------------------------------------------

# The first block of every Bareos volume, tape or File, is never encrypted
# (FORMATS.md section 7).  Facts from Bareos stored/block.h, block.cc,
# record.h, label.cc and lib/serial.cc; all integers are big-endian:
#   block header  BB02: CheckSum, block_len, BlockNumber, "BB02",
#                 VolSessionId, VolSessionTime (24 bytes; what Bareos writes)
#                 BB01: CheckSum, block_len, BlockNumber, "BB01" (16 bytes;
#                 Bacula before 1.27, still read by Bareos and here)
#   CheckSum      CRC-32 (zlib's) of bytes 4..block_len; 0 when the device
#                 had "Block Checksum = no" (then Bareos does not check it)
#   record header BB02: FileIndex, Stream, data_len (12 bytes); BB01 adds
#                 VolSessionId, VolSessionTime in front (20 bytes)
#   label data    Id, VerNum, two times, two float64, nine strings; strings
#                 are NUL-terminated and fit Bareos's Volume_Label arrays

BLKHDR1_LENGTH = 16
BLKHDR2_LENGTH = 24
RECHDR1_LENGTH = 20
RECHDR2_LENGTH = 12
# Bareos's sanity limit for block_len (block.h MAX_BLOCK_LENGTH).
MAX_BLOCK_LENGTH = 20000000
# Bareos writes labels in a block of at most 64,512 bytes (DEFAULT_BLOCK_SIZE);
# the tape read buffer is larger so a padded or odd block still fits.
LABEL_READ_SIZE = 256 * 1024

# Negative FileIndex values mark label records (record.h).
PRE_LABEL = -1             # labelled, never written
VOL_LABEL = -2             # labelled and written to
LABEL_TYPE_NAMES = {
    -1: "PRE_LABEL", -2: "VOL_LABEL", -3: "EOM_LABEL", -4: "SOS_LABEL",
    -5: "EOS_LABEL", -6: "EOT_LABEL", -7: "SOB_LABEL", -8: "EOB_LABEL",
}
# Label Ids Bareos accepts (block.h BareosId, OldBaculaId, OlderBaculaId).
LABEL_IDS = (b"Bareos 2.0 immortal\n", b"Bacula 1.0 immortal\n", b"Bacula 0.9 mortal\n")
# Label versions Bareos accepts: BareosTapeVersion and the three old ones.
# VerNum >= 11 stores the times as int64 microseconds (btime), older ones as
# a Julian day number and fraction.
LABEL_VERSIONS = (20, 11, 10, 9)
# Sizes of the Volume_Label char arrays (MAX_NAME_LENGTH = 128 includes the
# NUL): a longer string is one Bareos never writes and cannot read back.
_LABEL_ID_SIZE = 32
_LABEL_STRINGS = (
    ("VolumeName", 128), ("PrevVolumeName", 128), ("PoolName", 128),
    ("PoolType", 128), ("MediaType", 128), ("HostName", 128),
    ("LabelProg", 50), ("ProgVersion", 50), ("ProgDate", 50),
)

# Field names are Bareos's (DeviceBlock, DeviceRecord, Volume_Label);
# BlockCheckSum is the CRC computed here, as in Bareos's unSerBlockHeader.
_BLOCK_HEADER_FIELDS = "Id CheckSum block_len BlockNumber VolSessionId VolSessionTime BlockCheckSum"
_RECORD_HEADER_FIELDS = "VolSessionId VolSessionTime FileIndex Stream data_len"
_VOLUME_LABEL_FIELDS = ("LabelType LabelSize Id VerNum label_btime write_btime "
                        "label_date label_time write_date write_time "
                        + " ".join(name for name, _ in _LABEL_STRINGS) + " block record")

class _LabelReader(object):
    """Bounds-checked reads over the label data (Bareos's unserialisers do
    not check bounds; a damaged block must not read past its record)."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def unpack(self, fmt, what):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise BscryptoError("label record ends inside %s (record is %d bytes)"
                                % (what, len(self.data)), EXIT_LABEL)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, name, size):
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise BscryptoError("label record ends inside %s (no terminating NUL)" % name,
                                EXIT_LABEL)
        raw = self.data[self.pos:end]
        if len(raw) >= size:
            raise BscryptoError("%s in the label is %d bytes; Bareos writes at most %d"
                                % (name, len(raw), size - 1), EXIT_LABEL)
        self.pos = end + 1
        return raw


def _label_text(raw):
    # Bareos names are ASCII; anything else stays visible instead of failing.
    return raw.decode("utf-8", "backslashreplace")


def _hex_preview(data, count=16):
    head = bytes(data[:count])
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in head)
    return "%s |%s|" % (" ".join("%02x" % b for b in head), text)


def describe_foreign_block(data):
    """A short guess at what a block that is not a Bareos label holds."""
    data = bytes(data)
    if not data:
        return "no data"
    if data[:4] == b"VOL1" or data[:4] == b"\xe5\xd6\xd3\xf1":  # ASCII / EBCDIC
        kind = "an ANSI" if data[:4] == b"VOL1" else "an IBM (EBCDIC)"
        serial = data[4:10].decode("cp500" if data[0] == 0xE5 else "latin-1").strip()
        if b"LTFS" in data[24:37]:
            return "an LTFS volume label (VOL1 volume serial %r)" % serial
        return ("%s tape label (VOL1, volume serial %r): Bareos puts its own label in the "
                "next tape file; read it with `mt fsf 1` and `dd bs=256k count=1` into a file "
                "and run `%s label` on that file" % (kind, serial, _program()))
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "a tar archive"
    if not data.strip(b"\0"):
        return "%d zero bytes" % len(data)
    return "data starting %s" % _hex_preview(data)


def _not_a_volume(detail, data):
    return BscryptoError("not a Bareos volume: %s; found %s" % (detail, describe_foreign_block(data)),
                         EXIT_LABEL)


def parse_label_block(data, check_crc=True):
    """Parse the first block of a Bareos volume into a VolumeLabel.

    data may be longer than the block (a tape block padded to the drive's
    minimum, or a chunk read from a file): only block_len bytes count.
    Anything else raises BscryptoError(EXIT_LABEL) saying what was found.
    """
    import zlib
    data = bytes(data)
    if len(data) < BLKHDR1_LENGTH:
        raise BscryptoError("block too short: %d bytes, a Bareos block header is at least %d "
                            "(found %s)" % (len(data), BLKHDR1_LENGTH, describe_foreign_block(data)),
                            EXIT_LABEL)
    block_id = data[12:16]
    if block_id not in (b"BB01", b"BB02"):
        raise _not_a_volume("no BB01/BB02 block header", data)
    bb01 = block_id == b"BB01"
    header_length = BLKHDR1_LENGTH if bb01 else BLKHDR2_LENGTH
    record_length = RECHDR1_LENGTH if bb01 else RECHDR2_LENGTH
    if len(data) < header_length + record_length:
        raise BscryptoError("label block truncated: %d bytes, the headers alone are %d"
                            % (len(data), header_length + record_length), EXIT_LABEL)
    checksum, block_len, block_number = struct.unpack_from(">III", data, 0)
    session_id = session_time = 0
    if not bb01:
        session_id, session_time = struct.unpack_from(">II", data, 16)
    if block_len < header_length + record_length or block_len > MAX_BLOCK_LENGTH:
        raise _not_a_volume("%s header with an impossible block length %d"
                            % (block_id.decode(), block_len), data)
    if block_len > len(data):
        raise BscryptoError("label block truncated: its header says %d bytes, only %d were read"
                            % (block_len, len(data)), EXIT_LABEL)
    block = data[:block_len]
    computed = zlib.crc32(block[4:]) & 0xFFFFFFFF
    block_header = _record("BlockHeader", _BLOCK_HEADER_FIELDS)(
        block_id.decode(), checksum, block_len, block_number, session_id, session_time, computed)
    # A stored 0 is what a device with "Block Checksum = no" writes; such a
    # reader does not check, so neither does this.
    if check_crc and checksum not in (0, computed):
        hint = ""
        try:
            hint = "; the damaged label names volume %r" % parse_label_block(data, False).VolumeName
        except BscryptoError:
            pass
        raise BscryptoError("label block CRC-32 mismatch (stored %08x, computed %08x): the "
                            "block is damaged%s" % (checksum, computed, hint), EXIT_LABEL)
    if bb01:
        rec = struct.unpack_from(">IIiiI", block, header_length)
    else:
        rec = (session_id, session_time) + struct.unpack_from(">iiI", block, header_length)
    record = _record("RecordHeader", _RECORD_HEADER_FIELDS)(*rec)
    if record.FileIndex not in (PRE_LABEL, VOL_LABEL):
        what = LABEL_TYPE_NAMES.get(record.FileIndex, "a data record")
        raise _not_a_volume("the first record is FileIndex %d (%s), not a volume label"
                            % (record.FileIndex, what), data)
    start = header_length + record_length
    if start + record.data_len > block_len:
        raise BscryptoError("label record of %d bytes does not fit in its %d-byte block"
                            % (record.data_len, block_len), EXIT_LABEL)
    reader = _LabelReader(block[start:start + record.data_len])
    label_id = reader.string("Id", _LABEL_ID_SIZE)
    if label_id not in LABEL_IDS:
        raise _not_a_volume("label Id is %r" % _label_text(label_id), data)
    (ver_num,) = reader.unpack(">I", "VerNum")
    label_btime = write_btime = label_date = label_time = None
    if ver_num >= 11:
        label_btime, write_btime = reader.unpack(">qq", "the label times")
    else:
        label_date, label_time = reader.unpack(">dd", "the label date")
    write_date, write_time = reader.unpack(">dd", "the write date")
    strings = [_label_text(reader.string(name, size)) for name, size in _LABEL_STRINGS]
    if ver_num not in LABEL_VERSIONS:
        raise BscryptoError("volume %r has label version %d; Bareos reads versions %s"
                            % (strings[0], ver_num, ", ".join(str(v) for v in LABEL_VERSIONS)),
                            EXIT_LABEL)
    return _record("VolumeLabel", _VOLUME_LABEL_FIELDS)(
        record.FileIndex, record.data_len, _label_text(label_id), ver_num,
        label_btime, write_btime, label_date, label_time, write_date, write_time,
        *(strings + [block_header, record]))


def _btime_text(btime, iso=False):
    """A btime (microseconds since 1970) as local time, or why it cannot be."""
    try:
        t = time.localtime(btime // 1000000)
    except (OverflowError, ValueError, OSError):
        t = None
    if t is None or not 1 <= t.tm_year <= 9999:
        return "(out of range)"
    return time.strftime("%Y-%m-%dT%H:%M:%S%z" if iso else "%Y-%m-%d %H:%M:%S %Z", t)


def _label_type_text(label_type):
    name = LABEL_TYPE_NAMES.get(label_type, str(label_type))
    return name + {PRE_LABEL: " (labelled, no data written yet)",
                   VOL_LABEL: " (in use: data written after the label)"}.get(label_type, "")


def format_volume_label(label, source=None):
    """The text `label` prints: one 'Name : value' line per field."""
    block, record = label.block, label.record
    rows = [(name, getattr(label, name)) for name, _ in _LABEL_STRINGS]
    rows[1:1] = [("LabelType", _label_type_text(label.LabelType))]
    rows += [("Id", label.Id.rstrip("\n")), ("VerNum", label.VerNum)]
    if label.label_btime is not None:
        rows += [("label_btime", "%s (%d us)" % (_btime_text(label.label_btime), label.label_btime)),
                 ("write_btime", "%s (%d us)" % (_btime_text(label.write_btime), label.write_btime))]
    else:
        rows += [("label_date", "%r (Julian day)" % label.label_date),
                 ("label_time", "%r (fraction of day)" % label.label_time)]
    if block.CheckSum == 0 and block.BlockCheckSum != 0:
        crc = "not written (Block Checksum = no)"
    elif block.CheckSum == block.BlockCheckSum:
        crc = "%08x, correct" % block.CheckSum
    else:
        crc = "%08x, DAMAGED (computed %08x)" % (block.CheckSum, block.BlockCheckSum)
    rows += [("Block", "%s number %d, %d bytes, VolSessionId %d, VolSessionTime %d"
              % (block.Id, block.BlockNumber, block.block_len, block.VolSessionId,
                 block.VolSessionTime)),
             ("CRC-32", crc),
             ("Record", "FileIndex %d, Stream %d, %d bytes"
              % (record.FileIndex, record.Stream, record.data_len))]
    lines = ["Volume label" + (" of %s:" % source if source else ":")]
    lines += ["   %-15s: %s" % (name, value) for name, value in rows]
    return "\n".join(lines) + "\n"


def volume_label_dict(label):
    """The label as plain JSON-ready values (bytes-free, finite numbers)."""
    import math

    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        return value

    result = {}
    for name in label._fields:
        value = getattr(label, name)
        if name in ("block", "record"):
            value = dict(zip(value._fields, value))
        result[name] = plain(value)
    result["LabelTypeName"] = LABEL_TYPE_NAMES.get(label.LabelType)
    for name in ("label_btime", "write_btime"):
        if getattr(label, name) is not None:
            result[name + "_local"] = _btime_text(getattr(label, name), iso=True)
    result["block"]["crc_ok"] = label.block.CheckSum == label.block.BlockCheckSum
    return result


# -- reading the first block of a file or a tape --
#
# Tapes are read through the Linux st driver: open read-only (never
# written), MTREW, one read() of a variable-length block, MTREW again.  The
# drive's block mode is NOT changed (MTSETBLK is drive state other programs
# rely on; Bareos already runs its drives in variable mode).  If a read fails
# in a way fixed-block mode explains, MTIOCGET (read-only) says so.

# Linux <linux/mtio.h> operation numbers; BSD and Solaris number these
# differently (their 5 is rewind, Linux's 5 writes a filemark), so the
# ioctls are only ever sent on Linux.
MTREW = 6
# Linux major device numbers of the st driver and of SCSI generic nodes.
ST_MAJOR = 9
SG_MAJOR = 21
# struct mtget: the low 24 bits of mt_dsreg are the block size.
MT_ST_BLKSIZE_MASK = 0xFFFFFF


def _linux_ioc(direction, group, number, size, machine=None):
    """Linux _IOR/_IOW: direction 'r' or 'w'.  powerpc, mips, sparc and alpha
    use 3 direction bits (write = 4) and 13 size bits; the rest 2 and 14."""
    machine = machine if machine is not None else os.uname()[4]
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        bits = {"r": 2, "w": 4}[direction] << 29
    else:
        bits = {"r": 2, "w": 1}[direction] << 30
    return bits | size << 16 | ord(group) << 8 | number


def mtioctop_request(machine=None):
    """MTIOCTOP = _IOW('m', 1, struct mtop{short mt_op; int mt_count;}), 8 bytes:
    0x40086d01 on x86, arm, riscv and s390."""
    return _linux_ioc("w", "m", 1, 8, machine)


def mtiocget_request(machine=None):
    """MTIOCGET = _IOR('m', 2, struct mtget): five longs, two ints
    (0x80306d02 on 64-bit x86)."""
    return _linux_ioc("r", "m", 2, struct.calcsize("@5l2i"), machine)


class TapeIO(object):
    """The system calls `label` makes; tests pass a fake that records them."""

    platform = sys.platform

    def stat(self, path):
        return os.stat(path)

    def open(self, path, flags):
        return os.open(path, flags)

    def ioctl(self, fd, request, arg):
        return fcntl.ioctl(fd, request, arg)

    def read(self, fd, size):
        return os.read(fd, size)

    def close(self, fd):
        os.close(fd)


def _read_up_to(read, size):
    """Read size bytes or to end of file (files and pipes return short reads)."""
    chunks = []
    got = 0
    while got < size:
        chunk = read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_file_block(read):
    """The first block of a File volume: the header says how long it is."""
    data = _read_up_to(read, 65536)
    if len(data) >= 16 and data[12:16] in (b"BB01", b"BB02"):
        (block_len,) = struct.unpack_from(">I", data, 4)
        if len(data) < block_len <= MAX_BLOCK_LENGTH:
            data += _read_up_to(read, block_len - len(data))
    return data


def _mt_rewind(ops, fd, path):
    try:
        ops.ioctl(fd, mtioctop_request(), struct.pack("@hi", MTREW, 1))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            raise BscryptoError("%s is not a tape device (it refused the rewind request)" % path,
                                EXIT_DEVICE)
        if e.errno == getattr(errno, "ENOMEDIUM", -1):
            raise BscryptoError("no tape in %s" % path, EXIT_NOT_READY)
        raise BscryptoError("cannot rewind %s: %s (no tape loaded, or the drive is not ready)"
                            % (path, e.strerror or e), EXIT_NOT_READY)


def _tape_block_size(ops, fd):
    """The st driver's block size (0 = variable), or None if it cannot say."""
    try:
        raw = ops.ioctl(fd, mtiocget_request(), bytes(struct.calcsize("@5l2i")))
        return struct.unpack("@5l2i", raw)[2] & MT_ST_BLKSIZE_MASK
    except (OSError, struct.error):
        return None


class TapeReadError(BscryptoError):
    """A failed read() of a tape block: errno is the system's (EIO, ENOMEM ...),
    kind what it means here ("io", "fixed_block" or "other")."""

    exit_code = EXIT_LABEL

    def __init__(self, message, error_number=None, kind="other"):
        BscryptoError.__init__(self, message)
        self.errno, self.kind = error_number, kind


def _tape_read_error(ops, fd, path, e):
    block_size = _tape_block_size(ops, fd)
    if block_size:
        return TapeReadError("cannot read the first block of %s (%s): the drive is in fixed-block "
                             "mode (%d bytes) and Bareos writes variable-length blocks; set "
                             "variable mode with `mt -f %s setblk 0` and retry"
                             % (path, e.strerror or e, block_size, path), e.errno,
                             "fixed_block")
    if e.errno == errno.EIO:
        return TapeReadError(
            "I/O error reading the first block of %s. The label is never encrypted, but a drive "
            "holding a key in decrypt (not mixed) mode refuses unencrypted blocks: clear the "
            "drive key first (%s clear-key %s) and retry; a blank or damaged tape fails "
            "the same way" % (path, _program(), path), e.errno, "io")
    # st: ENOMEM = block longer than the read (variable mode), EINVAL = read
    # size not a multiple of the fixed block size.
    if e.errno in (errno.EINVAL, errno.ENOMEM):
        return TapeReadError("cannot read the first block of %s: %s (a block larger than %d "
                             "bytes is not a Bareos label)" % (path, e.strerror or e,
                                                               LABEL_READ_SIZE), e.errno)
    return TapeReadError("cannot read the first block of %s: %s" % (path, e.strerror or e),
                         e.errno)


def _open_error(path, e):
    if e.errno == getattr(errno, "ENOMEDIUM", -1):
        return BscryptoError("no tape in %s" % path, EXIT_NOT_READY)
    if e.errno == errno.EBUSY:
        return BscryptoError("%s is busy: is bareos-sd using it? Release the drive (bconsole "
                             "'release') or stop the storage daemon" % path, EXIT_DEVICE)
    if e.errno == errno.EIO:
        return BscryptoError("cannot open %s: I/O error (drive not ready: load a tape and "
                             "retry)" % path, EXIT_NOT_READY)
    return BscryptoError("cannot open %s: %s" % (path, e.strerror or e), EXIT_DEVICE)


def _read_tape_block(ops, path, st):
    if not ops.platform.startswith("linux"):
        raise BscryptoError(
            "reading a tape device is done through the Linux st driver only; here, rewind the "
            "tape and copy its first block into a file (`mt -f %s rewind; dd if=%s of=label.block "
            "bs=256k count=1`), then run `%s label label.block`" % (path, path, _program()),
            EXIT_DEVICE)
    if os.major(st.st_rdev) == SG_MAJOR:
        raise BscryptoError("%s is a SCSI generic node; give the tape node of the same drive "
                            "(/dev/nstN)" % path, EXIT_DEVICE)
    try:
        fd = ops.open(path, os.O_RDONLY)
    except OSError as e:
        raise _open_error(path, e)
    try:
        _mt_rewind(ops, fd, path)
        try:
            data = ops.read(fd, LABEL_READ_SIZE)
        except OSError as e:
            error = _tape_read_error(ops, fd, path, e)
            data = None
        try:
            _mt_rewind(ops, fd, path)
        except BscryptoError as e:
            if data is not None:
                sys.stderr.write("bscrypto: warning: label read, but rewinding afterwards "
                                 "failed: %s\n" % e)
        if data is None:
            raise error
    finally:
        try:
            ops.close(fd)
        except OSError as e:
            if e.errno != errno.EINTR:
                debug(1, "closing %s: %s" % (path, e))
    if not data:
        raise BscryptoError("%s: the tape is blank or starts with a filemark (the first read "
                            "returned no data)" % path, EXIT_LABEL)
    debug(1, "read a %d-byte block from %s" % (len(data), path))
    return data


def read_first_block(path, ops=None):
    """The first block of a Bareos volume: a File volume, stdin ('-'), or a
    Linux tape device (rewound before and after, never written)."""
    ops = ops or TapeIO()
    if path == "-":
        data = _read_file_block(getattr(sys.stdin, "buffer", sys.stdin).read)
        if not data:
            raise BscryptoError("no data on stdin", EXIT_LABEL)
        return data
    try:
        st = ops.stat(path)
    except OSError as e:
        raise BscryptoError("cannot open %s: %s" % (path, e.strerror or e), EXIT_DEVICE)
    if stat.S_ISCHR(st.st_mode):
        return _read_tape_block(ops, path, st)
    if not stat.S_ISREG(st.st_mode):
        raise BscryptoError("%s is neither a regular file nor a tape device" % path, EXIT_DEVICE)
    try:
        fd = ops.open(path, os.O_RDONLY)
    except OSError as e:
        raise BscryptoError("cannot open %s: %s" % (path, e.strerror or e), EXIT_DEVICE)
    try:
        data = _read_file_block(lambda size: ops.read(fd, size))
    except OSError as e:
        raise BscryptoError("cannot read %s: %s" % (path, e.strerror or e), EXIT_LABEL)
    finally:
        ops.close(fd)
    if not data:
        raise BscryptoError("%s is empty" % path, EXIT_LABEL)
    return data


def read_volume_label(path, ops=None):
    """VolumeLabel of the volume in path (file, '-' or tape device)."""
    data = read_first_block(path, ops)
    try:
        return parse_label_block(data)
    except BscryptoError as e:
        raise BscryptoError("%s: %s" % ("stdin" if path == "-" else path, e), e.exit_code)


# -- Key Encryption Keys from Bareos configuration files --
#
# `Key Encryption Key = "..."` sits in a Director resource: the director's
# own one (bareos-dir.conf or bareos-dir.d/director/*.conf) and, in the
# storage daemon, the one describing that director (bareos-sd.conf or
# bareos-sd.d/director/*.conf).  The scanner follows Bareos's lexer
# (lib/lex.cc) where it matters for these values:
#   - `#` starts a comment to the end of the line (outside quotes); there
#     are no other comment forms;  `;` ends a directive like a newline
#   - a keyword is a run of letters in which spaces are dropped, matched
#     without regard to case: "Key Encryption Key" == "KeyEncryptionKey"
#   - quoted strings: `\` takes the next character literally; a newline
#     inside quotes is skipped; "a" "b" (same or next line) concatenate
#   - unquoted values end at whitespace, `=`, `{`, `}`, `;`, `,` or `#`;
#     one that starts with a letter drops inner spaces while still letters
#   - `@file` / `@"file"` / `@|command` include other files: not followed
#     here (never run a command), but reported with file and line

_CONFIG_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_CONFIG_SPACE = frozenset(" \t\r\f\v")
_CONFIG_WORDS = ("word", "quoted")
_CONFIG_KEK_FIELDS = "director kek path line"


def _config_error(path, line, message):
    return KeyFileError("%s line %d: %s" % (path, line, message))


def _scan_quoted(text, i, line, path, join=True):
    """A quoted string starting after its opening quote: (value, next index, line)."""
    n = len(text)
    start_line = line
    out = []
    while True:
        while True:
            if i >= n:
                raise _config_error(path, start_line, "quoted string is never closed")
            c = text[i]
            i += 1
            if c == "\n":
                line += 1
            elif c == "\\":
                if i < n and text[i] != "\n":
                    out.append(text[i])
                    i += 1
            elif c == '"':
                break
            else:
                out.append(c)
        # Bareos joins "a" "b", also when the next line starts with a quote.
        if not join:
            return "".join(out), i, line
        j = i
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == '"':
            i = j + 1
            continue
        if j < n and text[j] == "\r":
            j += 1
        if j < n and text[j] == "\n":
            k = j + 1
            while k < n and text[k] in " \t":
                k += 1
            if k < n and text[k] == '"':
                line += 1
                i = k + 1
                continue
        return "".join(out), i, line


def scan_config(text, path="config", spans=None):
    """Bareos configuration text as tokens (kind, value, line).

    kinds: 'word' (keyword or unquoted value), 'quoted', 'include', '{',
    '}', '=', ',', 'eol' (newline or ';').  A `spans` list gets each token's
    (start, end) index in text, for rewriting a value in place.
    """
    tokens = []
    n = len(text)
    i = 0
    line = 1
    if text.startswith("\ufeff"):
        i = 1                      # UTF-8 byte order mark, skipped as Bareos does
    while i < n:
        start = i
        c = text[i]
        if c == "\n":
            tokens.append(("eol", None, line))
            line += 1
            i += 1
        elif c in _CONFIG_SPACE:
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{}=,":
            tokens.append((c, c, line))
            i += 1
        elif c == ";":
            tokens.append(("eol", None, line))
            i += 1
        elif c == '"':
            value, i, end_line = _scan_quoted(text, i + 1, line, path)
            tokens.append(("quoted", value, line))
            line = end_line
        elif c == "@":
            i += 1
            if i < n and text[i] == '"':
                target, i, end_line = _scan_quoted(text, i + 1, line, path, False)
            else:
                j = i
                while j < n and text[j] not in _CONFIG_SPACE and text[j] not in '\n{};,"#':
                    j += 1
                target, i, end_line = text[i:j], j, line
                if i < n and text[i] == '"':          # @|"command with spaces"
                    rest, i, end_line = _scan_quoted(text, i + 1, line, path, False)
                    target += rest
            tokens.append(("include", target, line))
            line = end_line
        else:
            # Letters: an identifier whose spaces are dropped, until a
            # non-letter turns it into an unquoted string ending at space.
            out = []
            letters = c in _CONFIG_LETTERS
            while i < n:
                c = text[i]
                if c in '\n={};,#' or (c == '"' and letters):
                    break
                if c in _CONFIG_SPACE:
                    if not letters:
                        break
                elif letters and c not in _CONFIG_LETTERS:
                    letters = False
                    out.append(c)
                else:
                    out.append(c)
                i += 1
            tokens.append(("word", "".join(out), line))
        if spans is not None and len(spans) < len(tokens):
            spans.append((start, i))
    return tokens


def _config_statement(tokens):
    """(keyword in lower case, [value tokens]) of `keyword = value[, value...]`,
    else None."""
    if (len(tokens) >= 3 and tokens[0][0] == "word" and tokens[1][0] == "="
            and tokens[2][0] in _CONFIG_WORDS):
        return tokens[0][1].lower(), [t for t in tokens[2:] if t[0] in _CONFIG_WORDS]
    return None


def parse_config_resources(text, path="config"):
    """The resources of one configuration text: ([ConfigResource(type, name,
    directives, path, line)], [(path, line, target) of each @include]).

    type is lower case ("storage", "device", "director" ...); directives maps
    each keyword of the resource's own level (lower case, spaces dropped) to
    its last ([value strings], line of the first value); name is its Name.
    """
    ConfigResource = _record("ConfigResource", "type name directives path line")
    resources = []
    includes = []
    depth = 0
    resource = None
    resource_type = ""
    opened = 0
    fields = {}
    statement = []

    def finish_statement():
        found = _config_statement(statement) if depth == 1 else None
        if found:
            keyword, values = found
            fields[keyword] = ([v for _, v, _ in values], values[0][2])
        del statement[:]

    for kind, value, line in scan_config(text, path):
        if kind == "include":
            includes.append((path, line, value))
        elif kind == "{":
            if depth == 0:
                resource, resource_type = resource_type, ""
                opened = line
                fields = {}
            del statement[:]
            depth += 1
        elif kind == "}":
            finish_statement()
            if depth == 0:
                raise _config_error(path, line, "'}' without a matching '{'")
            depth -= 1
            if depth == 0:
                name = fields.get("name", ([None], 0))[0][0]
                resources.append(ConfigResource(resource, name, fields, path, opened))
        elif kind == "eol":
            finish_statement()
        elif depth == 0:
            # A resource type may stand on its own line before its '{'.
            resource_type = value.lower() if kind == "word" else ""
        else:
            statement.append((kind, value, line))
    if depth:
        raise _config_error(path, opened, "resource opened here is never closed (missing '}')")
    return resources, includes


def parse_config_keks(text, path="config"):
    """Director resources with a Key Encryption Key in one configuration
    text: ([ConfigKek(director, kek bytes, path, line)], [(path, line, target)
    of each @include])."""
    ConfigKek = _record("ConfigKek", _CONFIG_KEK_FIELDS)
    resources, includes = parse_config_resources(text, path)
    return [ConfigKek(r.name, r.directives["keyencryptionkey"][0][0].encode("latin-1"), path,
                      r.directives["keyencryptionkey"][1])
            for r in resources if _director_kek(r)], includes


def _director_kek(resource):
    """True for a Director resource with a Key Encryption Key (it must have a Name)."""
    if resource.type != "director" or "keyencryptionkey" not in resource.directives:
        return False
    if resource.name is None:
        raise _config_error(resource.path, resource.line, "Director resource with a Key "
                            "Encryption Key but no Name")
    return True


def config_files(path):
    """The files Bareos would read for a config path: the file itself; in a
    config root (/etc/bareos) bareos-sd.conf and bareos-dir.conf, or, where
    one is absent, its bareos-*.d/*/*.conf tree; in a *.d directory or one
    of its resource directories, the *.conf files below it."""
    import glob
    check_path(path, "configuration")
    if not os.path.isdir(path):
        return [path]
    files = []
    roots = (("bareos-sd.conf", "bareos-sd.d"), ("bareos-dir.conf", "bareos-dir.d"))
    if any(os.path.exists(os.path.join(path, f)) or os.path.isdir(os.path.join(path, d))
           for f, d in roots):
        for conf, tree in roots:
            if os.path.exists(os.path.join(path, conf)):
                files.append(os.path.join(path, conf))
            else:
                files.extend(sorted(glob.glob(os.path.join(path, tree, "*", "*.conf"))))
    else:
        files = (sorted(glob.glob(os.path.join(path, "*", "*.conf")))
                 + sorted(glob.glob(os.path.join(path, "*.conf"))))
    if not files:
        raise KeyFileError("no Bareos configuration files (*.conf) in %s" % path)
    return files


def _read_config_text(name):
    """A configuration file's text; latin-1 maps every byte to one character, so
    a KEK's bytes survive."""
    data = read_input(name, "configuration file")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise KeyFileError("%s is UTF-16; Bareos reads UTF-8 configuration files" % name)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]        # UTF-8 byte order mark, skipped as Bareos does
    return data.decode("latin-1")


def read_config_keks(path):
    """parse_config_keks over every file config_files(path) names."""
    keks = []
    includes = []
    for name in config_files(path):
        found, inc = parse_config_keks(_read_config_text(name), name)
        keks.extend(found)
        includes.extend(inc)
    return keks, includes


def find_config_kek(path, director=None, warn=warn):
    """The ConfigKek to use from a Bareos config file or directory.

    Several directors with different KEKs and no director given is an
    error listing them; so is one director with different KEKs in
    different files.  @include lines are not followed: a warning names
    them, or, when no KEK is found, the error does.
    """
    keks, includes = read_config_keks(path)
    unfollowed = "; ".join("%s line %d: @%s" % inc for inc in includes)
    if director is not None:
        matches = [k for k in keks if k.director == director]
        matches = matches or [k for k in keks if k.director.lower() == director.lower()]
    else:
        matches = keks
    if not matches:
        if director is not None and keks:
            message = ("no Director %r with a Key Encryption Key in %s (directors with one: %s)"
                       % (director, path, ", ".join(sorted({k.director for k in keks}))))
        else:
            message = "no Key Encryption Key in %s%s" % (
                path, "" if director is None else " for Director %r" % director)
        if includes:
            message += ("; these includes were not followed, give the included file instead: "
                        + unfollowed)
        raise KeyFileError(message)
    distinct = {}
    for k in matches:
        distinct.setdefault(k.kek, k)
    if len(distinct) > 1:
        names = sorted({k.director for k in matches})
        if len(names) > 1:
            raise UsageError("several directors have a Key Encryption Key: %s; choose one with "
                             "--director" % ", ".join(names))
        raise KeyFileError("Director %r has different Key Encryption Keys in %s; fix the "
                           "configuration or give one file" % (names[0], ", ".join(
                               "%s line %d" % (k.path, k.line) for k in distinct.values())))
    chosen = matches[0]
    if not chosen.kek:
        raise KeyFileError("the Key Encryption Key of Director %r is empty (%s line %d)"
                           % (chosen.director, chosen.path, chosen.line))
    if includes and warn:
        warn("using the Key Encryption Key of Director %r from %s line %d; not followed: %s"
             % (chosen.director, chosen.path, chosen.line, unfollowed))
    debug(1, "Key Encryption Key of Director %r from %s line %d"
          % (chosen.director, chosen.path, chosen.line))
    return chosen


def add_syslog_argument(parser):
    """--syslog for the commands that change keys or judge them (see audit())."""
    parser.add_argument("--syslog", action="store_true",
                        help="log one line per key change or result to syslog (never keys)")


def kek_from_config(path, director=None):
    """The KEK text (bytes) of a director in a Bareos config file or
    directory; kek_from_text() turns it into the AES key."""
    return find_config_kek(path, director).kek


def add_kek_from_arguments(parser):
    """--kek-from and --director, for every command that needs a KEK."""
    parser.add_argument("--kek-from", metavar="CONFIG",
                        help="read the Key Encryption Key from a Bareos config file or "
                             "directory (bareos-sd.conf, bareos-dir.d, /etc/bareos, ...)")
    parser.add_argument("--director", metavar="NAME",
                        help="with --kek-from: the Director resource to use when several "
                             "have a Key Encryption Key")


def kek_from_arguments(ns, which=None):
    """(KEK text, description) from --kek FILE or --kek-from CONFIG [--director
    NAME]; with which="old" or "new" from --old-kek, --old-kek-from, ...
    (rewrap).  (None, None) when none is given."""
    prefix, option, name = (which + "_", "--%s-" % which, which + " KEK") if which \
        else ("", "--", "KEK")
    path = getattr(ns, prefix + "kek", None)
    config = getattr(ns, prefix + "kek_from")
    director = getattr(ns, prefix + "director")
    if path is not None and config is not None:
        raise UsageError("give the %s either as a file (%skek) or with %skek-from, not both"
                         % (name, option, option))
    if director is not None and config is None:
        raise UsageError("%sdirector only applies with %skek-from" % (option, option))
    if path is not None:
        return read_key_file(path, name + " file", kek=True), _kek_description(path)
    if config is not None:
        return kek_from_config(config, director), _kek_description(None, config, director)
    return None, None


# -- catalog exports --
#
# What an admin can get out of the catalog on a rescue host (Bareos's
# Media table: VolumeName, EncryptionKey; the key is base64 of the
# passphrase, or of the passphrase wrapped with the KEK):
#   psql -A -t -F '|'     VolumeName|EncryptionKey, no header or footer
#   psql (aligned)        ` volumename | encryptionkey `, `---+---`, `(N rows)`
#   \copy ... CSV HEADER  CSV with a header row, columns in any order
#   mysql -B -N           tab-separated
# The separator is told from the first line (volume names and base64 keys
# never contain `|`, TAB or `,`).  A header row (VolumeName and
# EncryptionKey, any case and order, extra columns ignored) maps columns;
# without one the first two columns are VolumeName, EncryptionKey.

CATALOG_EXPORT_SQL = ("SELECT VolumeName, EncryptionKey FROM Media "
                      "WHERE EncryptionKey IS NOT NULL AND EncryptionKey <> ''")
_CATALOG_EXPORT_FIELDS = "entries read skipped bad format"
# How exports spell "no key": empty (psql, CSV), NULL (mysql -B), \N (COPY text).
_CATALOG_NULLS = ("", "NULL", "\\N")


def _catalog_rows(text, delimiter, source="catalog export"):
    """(line number, [cells]) of each non-blank line."""
    if delimiter == ",":
        import csv
        reader = csv.reader(io.StringIO(text, newline=""))
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # a NUL byte (before 3.11), a broken quote
                if "NUL" not in str(e):
                    raise KeyFileError("%s line %d is not valid CSV (%s): is it a catalog "
                                       "export?" % (source, reader.line_num, e))
                row = None          # a bad line like any other (3.11+ reads it)
            yield start, row
            start = reader.line_num + 1
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line.split(delimiter)


def _catalog_key_problem(key):
    try:
        size = len(b64decode(key))
    except ValueError as e:
        return "EncryptionKey is %s" % e
    if size not in (PASSPHRASE_LENGTH, WRAPPED_LENGTH):
        return ("EncryptionKey decodes to %d bytes; a Bareos key is %d (plain) or %d (wrapped)"
                % (size, PASSPHRASE_LENGTH, WRAPPED_LENGTH))
    return None


def parse_catalog_export(text, source="catalog export"):
    """CatalogExport(entries [(volume, key)], read, skipped, bad [(line, why)],
    format) from export text; see the comment above for the formats."""
    if text.startswith("\ufeff"):
        text = text[1:]
    first = next((line for line in text.split("\n") if line.strip()), None)
    if first is None:
        raise KeyFileError("%s is empty" % source)
    delimiter = next((d for d in "|\t," if d in first), None)
    if delimiter is None:
        raise KeyFileError("%s: cannot tell the columns of its first line; expected "
                           "VolumeName|EncryptionKey (psql -A), tab-separated or CSV" % source)
    volume_col, key_col, width = 0, 1, 2
    entries = []
    seen = {}
    read = skipped = 0
    bad = []
    header_done = False
    for number, cells in _catalog_rows(text, delimiter, source):
        if cells is None:
            bad.append((number, "VolumeName contains a NUL byte"))
            continue
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue
        names = [c.lower() for c in cells]
        if not header_done:
            header_done = True
            if "volumename" in names or "encryptionkey" in names:
                if "volumename" not in names or "encryptionkey" not in names:
                    raise KeyFileError("%s line %d: the header must name both VolumeName and "
                                       "EncryptionKey" % (source, number))
                volume_col, key_col = names.index("volumename"), names.index("encryptionkey")
                width = None
                continue
        if delimiter == "|" and (set("".join(cells)) <= set("-+") or (
                len(cells) == 1 and cells[0].startswith("(") and cells[0].endswith(")"))):
            continue               # psql's aligned-output rule line and "(N rows)" footer
        read += 1
        if width is not None and len(cells) != width:
            bad.append((number, "expected 2 fields (VolumeName, EncryptionKey), found %d"
                        % len(cells)))
            continue
        if len(cells) <= max(volume_col, key_col):
            bad.append((number, "expected at least %d fields, found %d"
                        % (max(volume_col, key_col) + 1, len(cells))))
            continue
        volume, key = cells[volume_col], cells[key_col]
        if not volume:
            bad.append((number, "empty VolumeName"))
            continue
        if key in _CATALOG_NULLS:
            skipped += 1
            continue
        problem = _catalog_key_problem(key)
        if problem and width is not None and _catalog_key_problem(volume) is None:
            # Never print the key that sits in the name's column.
            bad.append((number, "the first column holds a key, not a VolumeName (columns "
                                "swapped?): put VolumeName first or add a header line"))
            continue
        if problem:
            bad.append((number, "volume %s: %s" % (volume, problem)))
            continue
        problem = cache_string_problem(volume, "VolumeName")
        if problem:
            bad.append((number, "%s; a crypto cache cannot hold it" % problem))
            continue
        if volume in seen:
            if seen[volume][1] != key:
                bad.append((number, "volume %s is also on line %d, with a different key"
                            % (volume, seen[volume][0])))
            continue
        seen[volume] = (number, key)
        entries.append((volume, key))
    fmt = {"|": "psql", "\t": "tab-separated", ",": "csv"}[delimiter]
    return _record("CatalogExport", _CATALOG_EXPORT_FIELDS)(entries, read, skipped, bad, fmt)


def read_catalog_export(path):
    """parse_catalog_export of a file ('-' for stdin)."""
    data = read_input(path, "catalog export")
    source = "stdin" if path == "-" else path
    try:
        data = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KeyFileError("%s is not UTF-8 text (byte %d); export it again with psql or "
                           "\\copy" % (source, e.start))
    return parse_catalog_export(data, source)


def sql_quote(value):
    """A standard SQL string literal ('' doubles a quote).  NUL cannot be
    stored, and a backslash means different things to PostgreSQL (with
    standard_conforming_strings off) and MySQL, so both are refused;
    volume names and base64 keys never contain them."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if "\0" in value or "\\" in value:
        raise ValueError("refusing to quote a string holding %s for SQL"
                         % ("a NUL" if "\0" in value else "a backslash"))
    return "'" + value.replace("'", "''") + "'"


def sql_update_key(volume, key):
    """The catalog statement that stores a (re-wrapped) key for a volume."""
    return ("UPDATE Media SET EncryptionKey = %s WHERE VolumeName = %s;"
            % (sql_quote(key), sql_quote(volume)))


# ---------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------

# Known answers built into the file: FIPS-197 Appendix C and RFC 3394 section 4.
_FIPS197_PLAINTEXT = "00112233445566778899aabbccddeeff"
_FIPS197_VECTORS = (
    ("C.1 AES-128", "000102030405060708090a0b0c0d0e0f", "69c4e0d86a7b0430d8cdb78070b4c55a"),
    ("C.2 AES-192", "000102030405060708090a0b0c0d0e0f1011121314151617",
     "dda97ca4864cdfe06eaf70a0ec0d7191"),
    ("C.3 AES-256", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "8ea2b7ca516745bfeafc49904b496089"),
)
_RFC3394_VECTORS = (
    ("4.1 128-bit KEK, 128-bit key", "000102030405060708090A0B0C0D0E0F",
     "00112233445566778899AABBCCDDEEFF",
     "1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"),
    ("4.6 256-bit KEK, 256-bit key",
     "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
     "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F",
     "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"),
)
# A wrap made by Bareos's own bscrypto (shared reference fixture wrap_triples.tsv).
_BAREOS_WRAP = (b"RZrW?;%Ot2csX|#9c[]3G5iUV2e9qc.0",
                "+TzT2bajQbRzEJncUCIbdXQUJyrW5X0JDhdb+k2HWnN89rWFusCZ6g",
                b"lV6=X?uqky(roy{5LKa8@Iwi+Ij~kNaq")


def _selftest_checks():
    """(name, function) pairs; each function returns None or raises."""
    checks = []

    def aes_check(name, key, expected):
        def run():
            aes = AES(bytes.fromhex(key))
            pt = bytes.fromhex(_FIPS197_PLAINTEXT)
            assert aes.encrypt_block(pt).hex() == expected, "encrypt"
            assert aes.decrypt_block(bytes.fromhex(expected)) == pt, "decrypt"
        return ("FIPS-197 %s encrypt and decrypt" % name, run)

    def wrap_check(name, kek, key, wrapped):
        def run():
            k, p, w = bytes.fromhex(kek), bytes.fromhex(key), bytes.fromhex(wrapped)
            assert aes_key_wrap(k, p) == w, "wrap"
            assert aes_key_unwrap(k, w) == p, "unwrap"
            try:
                aes_key_unwrap(k, w[:-1] + bytes([w[-1] ^ 1]))
            except UnwrapError:
                return
            raise AssertionError("corrupt key not detected")
        return ("RFC 3394 %s wrap, unwrap, tamper" % name, run)

    def bareos_wrap():
        kek, wrapped, plain = _BAREOS_WRAP
        assert unwrap_passphrase(kek, wrapped) == plain, "unwrap"
        assert wrap_passphrase(kek, plain) == wrapped, "wrap"

    def base64_rules():
        assert b64encode(b"\xff" * 32) == "/" * 42 + "8"
        assert b64decode("/" * 42 + "8 trailing") == b"\xff" * 32
        try:
            b64decode("ab*d")
        except ValueError:
            return
        raise AssertionError("invalid character accepted")

    def passphrase_rules():
        p = generate_passphrase()
        assert len(p) == PASSPHRASE_LENGTH and set(p.decode()) <= set(PASSPHRASE_ALPHABET)
        assert drive_key_bytes(b"A" * 32) == b"A" * 31 + b"\0"

    for v in _FIPS197_VECTORS:
        checks.append(aes_check(*v))
    for v in _RFC3394_VECTORS:
        checks.append(wrap_check(*v))
    checks.append(("Bareos bscrypto wrapped key (reference fixture)", bareos_wrap))
    checks.append(("Bareos base64: no padding, stop at space, reject junk", base64_rules))
    checks.append(("passphrase alphabet and drive key bytes", passphrase_rules))

    def bareos_key_page():
        # FORMATS.md section 6: Bareos's CDB and page for loading a key.
        cdb = cdb_security_protocol_out(0x20, SET_DATA_ENCRYPTION_PAGE, 52)
        assert cdb.hex() == "b52000100000000000340000", "CDB"
        page = bareos_set_key_page(b"K" * 32)
        assert page == bytes.fromhex("0010003040000203010000" + "00" * 7 + "0020") \
            + b"K" * 31 + b"\0", "set page"
        assert bareos_clear_key_page()[6:8] == b"\0\0", "clear page modes"

    def cache_round_trip():
        entries = [CacheEntry("Vol0001", "xVaU{?{s4MwjmW*BAiA8bVsy6*0nJOwB", 1764092524),
                   CacheEntry("Full-0003", "simplekey", 1764092525)]
        for layout in CACHE_LAYOUTS:
            data = bytes(build_cache(entries, layout))
            assert data.startswith(CACHE_ID), layout.name
            cache, trailing = parse_cache(data)
            assert (list(cache.entries), cache.layout.name, trailing) == \
                (entries, layout.name, 0), layout.name

    checks.append(("Bareos Set Data Encryption page and CDB (FORMATS.md 6)", bareos_key_page))
    checks.append(("crypto cache write and read, every host layout", cache_round_trip))
    return checks


def op_selftest(out=None):
    """Run the built-in known-answer checks; one line each and a verdict."""
    out = out or sys.stdout
    failed = 0
    checks = _selftest_checks()
    for name, run in checks:
        try:
            run()
            out.write("ok      %s\n" % name)
        except Exception as e:  # any failure is a finding, report and go on
            failed += 1
            out.write("FAILED  %s: %s\n" % (name, str(e) or type(e).__name__))
    if failed:
        out.write("selftest: %d of %d checks FAILED - do not trust this host's Python\n"
                  % (failed, len(checks)))
        return EXIT_USAGE
    out.write("selftest: all %d checks passed (Python %s)\n"
              % (len(checks), sys.version.split()[0]))
    return EXIT_OK


# -- cache operations --


def _stdin_stream():
    stdin = sys.stdin
    if stdin is None:       # started with stdin closed: no input
        return io.BytesIO(), False
    return getattr(stdin, "buffer", stdin), stdin.isatty()


def op_dump_cache(path, as_json=False, now=None, out=None):
    """-D: Bareos's table of the cache (or JSON); never changes the file."""
    cache = read_cache(path, raw=not as_json)
    out = out or _stdout_bytes()
    if as_json:
        write_bytes(out, cache_to_json(cache, path, resolve_now(now)).encode("ascii"))
    else:
        write_bytes(out, format_cache_table(cache.entries))
    out.flush()
    return EXIT_OK


def _report_bad_lines(problems, path, skip, source="stdin"):
    """Each bad input line with its source (stdin or the export's file name)."""
    shown = problems if skip else problems[:20]
    for number, problem in shown:
        if skip:
            warn("%s line %d skipped: %s" % (source, number, problem))
        else:
            sys.stderr.write("bscrypto: %s line %d: %s\n" % (source, number, problem))
    if skip:
        return
    if len(problems) > len(shown):
        sys.stderr.write("bscrypto: ... and %d more bad lines\n" % (len(problems) - len(shown)))
    raise UsageError("nothing written to %s: %d bad input line%s; fix %s or add "
                     "--skip-bad-lines" % (path, len(problems), "s" if len(problems) > 1 else "",
                                            "them" if len(problems) > 1 else "it"))


def op_populate_cache(path, now=None, layout=None, backup=False, skip_bad_lines=False,
                      stream=None, interactive=None, summary=False, as_json=False):
    """-p: add VolumeName<TAB>EncryptionKey lines from stdin with Bareos's rules.

    Nothing is written when any line is bad (unless skip_bad_lines), when the
    cache cannot be read, or when nothing changed.
    """
    now = resolve_now(now)
    CacheFile(path).close()     # a usable path, before any input is read
    if stream is None:
        stream, tty = _stdin_stream()
        interactive = tty if interactive is None else interactive
    if interactive:
        if os.path.exists(path):
            read_cache(path)    # fail before the user types anything
        sys.stdout.write(CACHE_PROMPT)
        sys.stdout.flush()
    updates, problems = parse_cache_input(_read_cache_input(stream, interactive))
    if problems:
        _report_bad_lines(problems, path, skip_bad_lines)
    stats, write = update_cache(path, updates, now, layout, backup)
    text = ("%s: %d added, %d updated, %d unchanged, %d expired removed; %s"
            % (path, stats["added"], stats["updated"], stats["unchanged"],
               stats["expired_removed"], "written" if write else "nothing changed, not written"))
    debug(1, text)
    done = "%s was %s" % (path, "written" if write else "not changed")
    if as_json:
        report_output(sys.stdout, _json_text(dict(stats, cache=path, written=write,
                                                  bad_lines=len(problems))), done)
    elif summary:
        report_output(sys.stdout, text + "\n", done)
    return EXIT_OK


def update_cache(path, updates, now, layout=None, backup=False, new_owner_of_directory=False):
    """Apply (name, key) updates with Bareos's rules under the lock, atomically;
    (stats, written).  Written when something changed or --layout converts.
    A new cache gets the directory's owner with new_owner_of_directory."""
    target = cache_layout(layout)
    with cache_lock(path) as cf:
        try:
            cache = read_cache(cf)
        except CacheMissingError:
            cache = CryptoCache([], None)
        entries, stats = apply_cache_updates(cache.entries, updates, now)
        convert = layout is not None and cache.layout not in (None, target)
        write = cache_changed(stats) or convert
        if write:
            if convert:
                debug(1, "%s: rewriting layout %s as %s" % (path, cache.layout.name, target.name))
            write_cache(cf, entries, target, backup, new_owner_of_directory)
    return stats, write


def op_reset_cache(path, now=None, layout=None, backup=False):
    """-r: set every entry's time added to now (a missing cache is an error)."""
    now = resolve_now(now)
    target = cache_layout(layout)
    with cache_lock(path) as cf:
        cache = read_cache(cf, raw=True)
        entries = reset_cache_times(cache.entries, now)
        if entries != cache.entries or (layout is not None and target != cache.layout):
            write_cache(cf, entries, target, backup)
        else:
            debug(1, "%s: every entry already has time %d; not written" % (path, now))
    return EXIT_OK


def op_lookup(volume, path, out=None):
    """Print the key cached for one volume (exit EXIT_NOT_FOUND if absent)."""
    # Compare bytes: argv may have been decoded with another encoding (C locale).
    want = os.fsencode(volume) if isinstance(volume, str) else bytes(volume)
    for e in read_cache(path, raw=True).entries:
        if e.volume_name == want:
            out = out or _stdout_bytes()
            out.write(e.encryption_key + b"\n")
            out.flush()
            return EXIT_OK
    raise BscryptoError("volume %s is not in crypto cache %s" % (volume, path), EXIT_NOT_FOUND)


def op_export_cache(path, out=None):
    """The cache as the TSV that populate reads (keys included: keep it private)."""
    data = format_cache_tsv(read_cache(path).entries)
    out = out or _stdout_bytes()
    write_bytes(out, data)
    out.flush()
    return EXIT_OK


# -- drive operations --


class ScsiError(BscryptoError):
    """A SCSI command that did not end GOOD; sense is a SenseData or None."""

    def __init__(self, message, exit_code=EXIT_SCSI, sense=None, status=None):
        BscryptoError.__init__(self, message, exit_code)
        self.sense = sense
        self.status = status


def _scsi_failure(device, what, result, context="", vendor=None):
    """The ScsiError for a result that is not GOOD, with what to do about it.

    context: "spin" (a tape data encryption page), "spout" (the key page),
    or "" (anything else).  vendor: the INQUIRY vendor, for vendor sense codes.
    """
    where = "%s: %s" % (device, what)
    host, driver = result.host_status, result.driver_status & 0x07
    if host or driver:
        if host == 3 or driver == 6:
            return ScsiError("%s timed out: the drive did not answer in time (raise "
                             "--timeout, check the drive and its cabling)" % where)
        return ScsiError("%s failed in the transport: host status %s, driver status %s"
                         % (where, SG_HOST_STATUS_NAMES.get(host, "0x%02x" % host),
                            SG_DRIVER_STATUS_NAMES.get(driver, "0x%02x" % driver)))
    status = result.status
    if status == SCSI_STATUS_BUSY:
        return ScsiError("%s: drive busy (BUSY): retry when it is idle" % where, EXIT_DEVICE,
                         status=status)
    if status == SCSI_STATUS_RESERVATION_CONFLICT:
        return ScsiError("%s: RESERVATION CONFLICT: another host or program holds a "
                         "reservation on the drive (stop it or release the drive)" % where,
                         EXIT_DEVICE, status=status)
    if status != SCSI_STATUS_CHECK_CONDITION:
        return ScsiError("%s ended with SCSI status %s" % (
            where, SCSI_STATUS_NAMES.get(status, "0x%02x" % status)), status=status)
    try:
        sense = parse_sense(result.sense)
    except ValueError as e:
        return ScsiError("%s: CHECK CONDITION without usable sense data (%s)" % (where, e),
                         status=status)
    text = sense_text(sense, vendor)
    key, asc = sense.sense_key, sense.asc
    if key == SENSE_BLANK_CHECK:
        return ScsiError("%s: blank tape: nothing is written at this position (%s)"
                         % (where, text), EXIT_SCSI, sense, status)
    if key == SENSE_NOT_READY and asc == 0x3A:
        return ScsiError("%s: no tape loaded (%s): load a tape and retry" % (where, text),
                         EXIT_NOT_READY, sense, status)
    if key == SENSE_NOT_READY:
        return ScsiError("%s: drive not ready (%s): wait until it has finished loading or "
                         "rewinding and retry" % (where, text), EXIT_NOT_READY, sense, status)
    if context in ("spin", "spout") and key == SENSE_ILLEGAL_REQUEST and asc == 0x20:
        return ScsiError("%s: the drive has no encryption support (%s): SECURITY PROTOCOL "
                         "IN/OUT is not implemented (LTO-4 or later is needed)" % (where, text),
                         EXIT_NO_ENCRYPTION, sense, status)
    if context == "spout" and ((key == SENSE_ILLEGAL_REQUEST and asc == 0x26)
                               or (key == SENSE_DATA_PROTECT and asc == 0x74)):
        return ScsiError("%s: the drive refused the Set Data Encryption page (%s): either "
                         "the algorithm index is wrong for this drive (`bscrypto drive-status "
                         "--detail %s` lists its algorithms; choose one with --algorithm-index) "
                         "or the drive or its library is not set to Application Managed "
                         "Encryption (set the drive's encryption method to Application Managed "
                         "in the library)" % (where, text, device), EXIT_KEY_REFUSED, sense,
                         status)
    fp = sense.field_pointer
    if (context == "spin" and key == SENSE_ILLEGAL_REQUEST and asc == 0x24
            and not (fp is not None and fp.command_data and 6 <= fp.field <= 9)):
        return ScsiError("%s: the drive does not offer tape data encryption (%s): encryption "
                         "may be disabled or unlicensed on this drive" % (where, text),
                         EXIT_NO_ENCRYPTION, sense, status)
    return ScsiError("%s failed: %s" % (where, text), EXIT_SCSI, sense, status)


def scsi_command(transport, what, cdb, data_out=b"", data_in_len=0, context=""):
    """Send a CDB and return the data in; raise ScsiError unless it ends GOOD.

    A UNIT ATTENTION (tape loaded, reset) is reported once: the command is
    sent again, a few times at most.
    """
    debug(2, "%s: %s: CDB %s" % (transport.device, what, bytes(cdb).hex()))
    for attempt in range(UNIT_ATTENTION_RETRIES + 1):
        result = transport.execute(cdb, data_out, data_in_len)
        if result.status in (SCSI_STATUS_GOOD, SCSI_STATUS_CONDITION_MET) and not (
                result.host_status or result.driver_status & 0x07):
            debug(3, "%s: %s: %d bytes in" % (transport.device, what, len(result.data_in)))
            return result.data_in
        error = _scsi_failure(transport.device, what, result, context,
                              _sense_vendor(transport, result))
        if (error.sense is None or error.sense.sense_key != SENSE_UNIT_ATTENTION
                or attempt == UNIT_ATTENTION_RETRIES):
            raise error
        debug(1, "%s: %s: %s; sending again" % (transport.device, what,
                                                  sense_text(error.sense)))
    raise AssertionError("unreachable")


def _sense_vendor(transport, result):
    """The drive's INQUIRY vendor when the sense carries a vendor-specific code
    (ASC or ASCQ 80h and up), asked once per transport; else None."""
    sense = bytearray(result.sense)
    codes = sense[12:14] if sense[:1] and sense[0] & 0x7F in (0x70, 0x71) else sense[2:4]
    if result.status != SCSI_STATUS_CHECK_CONDITION or not any(c >= 0x80 for c in codes):
        return None
    vendor = getattr(transport, "inquiry_vendor", None)
    if vendor is None:
        reply = transport.execute(cdb_inquiry(), data_in_len=INQUIRY_ALLOCATION_LENGTH)
        vendor = _ascii_field(bytes(reply.data_in)[8:16]) if reply.status == 0 else ""
        transport.inquiry_vendor = vendor
    return vendor


def _parse_reply(parser, data, device, what):
    try:
        return parser(data)
    except ValueError as e:
        raise BscryptoError("%s: the drive's %s is malformed: %s" % (device, what, e),
                            EXIT_SCSI)


def _allocation_length_refused(error):
    """True when a SPIN refusal points at the ALLOCATION LENGTH (CDB bytes 6-9)."""
    fp = error.sense.field_pointer if error.sense is not None else None
    return (fp is not None and fp.command_data and 6 <= fp.field <= 9
            and error.sense.sense_key == SENSE_ILLEGAL_REQUEST and error.sense.asc == 0x24)


def read_tde_page(transport, page):
    """The raw bytes of a tape data encryption SPIN page.

    Asks Bareos's 8196 bytes; a drive that refuses that allocation length is
    asked again with 8192, and the transport remembers it for later pages.
    """
    what = "SECURITY PROTOCOL IN page %04Xh" % page
    length = getattr(transport, "spin_allocation_length", SPIN_ALLOCATION_LENGTH)
    try:
        return scsi_command(transport, what, cdb_security_protocol_in(
            SECURITY_PROTOCOL_TAPE, page, length), data_in_len=length, context="spin")
    except ScsiError as e:
        if not _allocation_length_refused(e):
            raise
        if length <= SPIN_ALLOCATION_LIMIT:
            raise ScsiError("%s: the drive refused the allocation length %d (%s): this is "
                            "not a missing encryption licence; report it with -d 3 output"
                            % (transport.device, length, sense_text(e.sense)),
                            EXIT_SCSI, e.sense, e.status)
        debug(1, "%s: %s: allocation length %d refused; asking %d" % (
            transport.device, what, length, SPIN_ALLOCATION_LIMIT))
        transport.spin_allocation_length = SPIN_ALLOCATION_LIMIT
        return read_tde_page(transport, page)


def check_encryption_support(transport):
    """Raise EXIT_NO_ENCRYPTION unless the drive lists protocol 20h.

    A drive that rejects the protocol list itself with 05/24 (allowed by older
    firmware) is given the benefit of the doubt; 05/20 means no SPIN at all.
    """
    try:
        data = scsi_command(transport, "SECURITY PROTOCOL IN (supported protocols)",
                            cdb_security_protocol_in(SECURITY_PROTOCOL_INFORMATION,
                                                     SPIN_SUPPORTED_PROTOCOLS, 512),
                            data_in_len=512, context="spin")
    except ScsiError as e:
        if e.exit_code == EXIT_NO_ENCRYPTION and e.sense is not None and e.sense.asc == 0x24:
            debug(1, "%s: protocol list refused; trying the tape encryption pages"
                  % transport.device)
            return
        raise
    protocols = _parse_reply(parse_supported_security_protocols, data, transport.device,
                             "security protocol list").protocols
    if SECURITY_PROTOCOL_TAPE not in protocols:
        raise BscryptoError("%s: the drive has no tape data encryption: its security "
                            "protocols are %s, not 20h" % (transport.device, ", ".join(
                                "%02Xh" % p for p in protocols) or "none"), EXIT_NO_ENCRYPTION)


def _read_status_page(transport, parser, page, what):
    """A status page; a key descriptor that overruns it is a warning, not a failure."""
    problems = []
    record = _parse_reply(lambda data: parser(data, problems), read_tde_page(transport, page),
                          transport.device, what)
    for problem in problems:
        warn("%s: the drive's %s: %s; the fields before it are shown"
             % (transport.device, what, problem))
    return record


def read_drive_status(transport):
    """The drive's Data Encryption Status page (0020h) as a DataEncryptionStatus."""
    return _read_status_page(transport, parse_data_encryption_status,
                             DATA_ENCRYPTION_STATUS_PAGE, "data encryption status page")


def read_next_block_status(transport):
    """The Next Block Encryption Status page (0021h) as a NextBlockEncryptionStatus."""
    return _read_status_page(transport, parse_next_block_encryption_status,
                             NEXT_BLOCK_ENCRYPTION_STATUS_PAGE,
                             "next block encryption status page")


def read_capabilities(transport):
    """The Data Encryption Capabilities page (0010h) as DataEncryptionCapabilities."""
    return _parse_reply(parse_data_encryption_capabilities,
                        read_tde_page(transport, DATA_ENCRYPTION_CAPABILITIES_PAGE),
                        transport.device, "data encryption capabilities page")


def read_capabilities_or_none(transport):
    """The capabilities page, or None when the drive refuses it or sends one this
    tool cannot read (a 16-byte algorithm descriptor, say): the callers then fall
    back as Bareos does.  A drive without SECURITY PROTOCOL IN still fails."""
    try:
        return read_capabilities(transport)
    except ScsiError as e:
        if e.exit_code == EXIT_NO_ENCRYPTION and e.sense is not None and e.sense.asc == 0x20:
            raise
        why = e
    except BscryptoError as e:          # malformed page
        why = e
    debug(1, "%s: capabilities page unreadable: %s" % (transport.device, why))
    return None


def read_inquiry(transport):
    """(InquiryData, serial number or None)."""
    inquiry = _parse_reply(parse_inquiry, scsi_command(
        transport, "INQUIRY", cdb_inquiry(), data_in_len=INQUIRY_ALLOCATION_LENGTH),
        transport.device, "INQUIRY data")
    transport.inquiry_vendor = inquiry.vendor
    try:
        serial = parse_unit_serial_number(scsi_command(
            transport, "INQUIRY (unit serial number)",
            cdb_inquiry(255, VPD_UNIT_SERIAL_NUMBER), data_in_len=255))
    except (ScsiError, ValueError) as e:
        debug(1, "%s: no serial number: %s" % (transport.device, e))
        serial = None
    return inquiry, serial


def get_drive_status(device, timeout=DEFAULT_SCSI_TIMEOUT, transport=None):
    """Open `device`, read and return its DataEncryptionStatus record."""
    with _drive(device, timeout, transport) as t:
        check_encryption_support(t)
        return read_drive_status(t)


class _drive(object):
    """Context manager: the given transport (left open) or a newly opened one."""

    def __init__(self, device, timeout, transport=None):
        self.device, self.timeout, self.given = device, timeout, transport
        self.transport = None

    def __enter__(self):
        self.transport = self.given or open_transport(self.device, self.timeout)
        return self.transport

    def __exit__(self, *exc):
        if self.given is None and self.transport is not None:
            self.transport.close()


def choose_algorithm(capabilities, algorithm_index=None, decrypt_only=False, device="drive"):
    """The AlgorithmDescriptor to use (None: the page was unreadable; use index 1).

    Without algorithm_index: the drive's AES-256-GCM that SPOUT can switch to
    encrypt (unless decrypt_only) and decrypt and that takes a 32-byte key.
    """
    if capabilities is None:
        return None
    algorithms = capabilities.algorithms
    if algorithm_index is not None:
        for a in algorithms:
            if a.algorithm_index == algorithm_index:
                return a
        raise BscryptoError("%s: the drive lists no algorithm index %d (it has %s)" % (
            device, algorithm_index, ", ".join(str(a.algorithm_index) for a in algorithms)
            or "none"), EXIT_KEY_REFUSED)
    for a in algorithms:
        if (a.security_algorithm_code == ALGORITHM_AES_256_GCM
                and a.key_length == DRIVE_KEY_LENGTH and a.decrypt_c == ENCRYPT_C_SPOUT
                and (decrypt_only or a.encrypt_c == ENCRYPT_C_SPOUT)):
            return a
    listed = "; ".join(format_algorithm(a) for a in algorithms) or "none"
    raise BscryptoError("%s: the drive lists no AES-256-GCM algorithm that can %s with a "
                        "32-byte key (it lists: %s); choose one with --algorithm-index N"
                        % (device, "decrypt" if decrypt_only else "encrypt and decrypt",
                           listed), EXIT_NO_ENCRYPTION)


def _key_descriptor(text, algorithm, device):
    """The U-KAD (type, bytes) for --key-desc within the drive's limits, and its KAD format."""
    if isinstance(text, str):
        # Checked before encoding: "caf\u00e9" must not become "caf?" and pass.
        bad = [c for c in text if not " " <= c <= "~"]
        if bad:
            raise UsageError("the key descriptor must be printable ASCII text (%r is not)"
                             % bad[0])
        text = text.encode("ascii")
    data = bytes(text)
    if not data or any(b < 32 or b > 126 for b in bytearray(data)):
        raise UsageError("the key descriptor must be printable ASCII text")
    limit = algorithm.maximum_ukad_length if algorithm is not None else DEFAULT_UKAD_LIMIT
    if algorithm is not None and not limit:
        raise UsageError("%s: algorithm index %d takes no key descriptor (U-KAD)"
                         % (device, algorithm.algorithm_index))
    if len(data) > limit:
        raise UsageError("the key descriptor is %d bytes; the drive takes at most %d"
                         % (len(data), limit))
    if algorithm is not None and algorithm.ukadf:
        data = data.ljust(limit)        # the drive wants exactly its maximum length
    ascii_format = algorithm is None or algorithm.kadf_c
    return (KAD_TYPE_UKAD, data), (KAD_FORMAT_ASCII if ascii_format else KAD_FORMAT_UNSPECIFIED)


# Algorithm descriptor capabilities (SSC-4) that decide what set-key may send.
RDMC_C_UNSUPPORTED = 1           # RDMC_C 001b: no raw decryption mode control; RDMC must be 0
DKAD_C_REQUIRED = 1              # DKAD_C 01b: a U-KAD must come with the key to decrypt


def _check_capabilities(algorithm, raw_read, kads, device):
    """Refuse locally what the capabilities page says the drive will refuse."""
    if algorithm is None:
        return
    index = algorithm.algorithm_index
    if raw_read is not None and algorithm.rdmc_c == RDMC_C_UNSUPPORTED:
        raise UsageError("%s: algorithm index %d marks raw-read protection itself (RDMC_C %d, "
                         "raw decryption mode control not supported): leave out %s" % (
                             device, index, algorithm.rdmc_c,
                             "--allow-raw-read" if raw_read else "--no-raw-read"))
    if algorithm.dkad_c == DKAD_C_REQUIRED and not kads:
        raise UsageError("%s: algorithm index %d needs a key descriptor (U-KAD) with the key "
                         "to decrypt (DKAD_C 1): give set-key --key-desc TEXT" % (device, index))


def _need_tape_for_ckod(transport):
    """TEST UNIT READY before a CKOD page, as stenc 2.0 does: some drives refuse
    CKOD with no cartridge, and then the page's refusal would not say why."""
    try:
        scsi_command(transport, "TEST UNIT READY", cdb_test_unit_ready())
    except ScsiError as e:
        if e.exit_code != EXIT_NOT_READY:
            raise
        raise ScsiError("%s: --ckod clears the key when the tape is unloaded, and no tape is "
                        "ready (%s): load the tape first, then set the key"
                        % (transport.device, sense_text(e.sense)), EXIT_NOT_READY, e.sense,
                        e.status)


# Set Data Encryption page (SSC-4): the field a parameter field pointer names,
# by first byte; bytes 4 and 5 hold several fields, told apart by the bit pointer.
_SDE_FIELDS = ((0, "PAGE CODE"), (2, "PAGE LENGTH"), (4, "SCOPE/LOCK"),
               (5, "CEEM/RDMC/SDK/CKOD/CKORP/CKORL"), (6, "ENCRYPTION MODE"),
               (7, "DECRYPTION MODE"), (8, "ALGORITHM INDEX"), (9, "KEY FORMAT"),
               (10, "KAD FORMAT"), (11, "a reserved byte"), (18, "KEY LENGTH"), (20, "KEY"))
_SDE_BITS = {(4, 0): "LOCK", (4, 5): "SCOPE", (4, 6): "SCOPE", (4, 7): "SCOPE",
             (5, 7): "CEEM", (5, 6): "CEEM", (5, 5): "RDMC", (5, 4): "RDMC", (5, 3): "SDK",
             (5, 2): "CKOD", (5, 1): "CKORP", (5, 0): "CKORL"}
_KEY_DESCRIPTOR_FIELD = "the key descriptor"
_SDE_ADVICE = {
    "CKOD": "is a tape loaded? some drives take CKOD only with a cartridge in the drive: "
            "load it and retry, or leave out --ckod",
    _KEY_DESCRIPTOR_FIELD: "this drive takes no key descriptor (U-KAD) here: retry without "
                           "--key-desc",
    "KAD FORMAT": "this drive takes no ASCII key descriptor: retry without --key-desc",
    "RDMC": "the drive fixes the raw-read marking itself: leave out --allow-raw-read and "
            "--no-raw-read",
    "ALGORITHM INDEX": "algorithm index %(index)s is not one this drive takes: `bscrypto.py "
                       "drive-status --detail %(device)s` lists its algorithms; choose one "
                       "with --algorithm-index",
    "ENCRYPTION MODE": "algorithm index %(index)s cannot encrypt under this host's control: "
                       "choose another with --algorithm-index (`bscrypto.py drive-status "
                       "--detail %(device)s` lists them)",
    "DECRYPTION MODE": "algorithm index %(index)s cannot decrypt under this host's control: "
                       "choose another with --algorithm-index (`bscrypto.py drive-status "
                       "--detail %(device)s` lists them)",
    "KEY LENGTH": "the %(key_length)d-byte key does not fit algorithm index %(index)s: choose "
                  "an AES-256 algorithm with --algorithm-index",
    "KEY FORMAT": "the drive takes no plain key for algorithm index %(index)s",
    "SCOPE": "the drive refused the scope Bareos sends (all I_T nexus): another host may "
             "hold the encryption parameters locked; release it or reset the drive",
}
_SDE_ADVICE["KEY"] = _SDE_ADVICE["KEY LENGTH"]
_SDE_ADVICE["LOCK"] = _SDE_ADVICE["SCOPE/LOCK"] = _SDE_ADVICE["SCOPE"]


def set_data_encryption_field(page, field_pointer):
    """The name of the Set Data Encryption page field a parameter field pointer
    points at (SSC-4 names), or None for a pointer into the CDB."""
    if field_pointer is None or field_pointer.command_data:
        return None
    byte = field_pointer.field
    key_end = 20 + (int.from_bytes(page[18:20], "big") if len(page) >= 20 else 0)
    if byte >= key_end:
        return _KEY_DESCRIPTOR_FIELD
    if field_pointer.bit_pointer_valid and (byte, field_pointer.bit_pointer) in _SDE_BITS:
        return _SDE_BITS[byte, field_pointer.bit_pointer]
    if byte == 5 and len(page) > 5:
        # No bit pointer: the one field of byte 5 this page sets is the one refused.
        sent = sorted(set(name for (b, bit), name in _SDE_BITS.items()
                          if b == 5 and page[5] >> bit & 1))
        if len(sent) == 1:
            return sent[0]
    return [name for start, name in _SDE_FIELDS if byte >= start][-1]


def _spout_refusal(device, what, error, page):
    """The ScsiError saying which field of the page the drive refused and what
    to do, or None when the sense names no field of the page."""
    sense = error.sense
    if sense is None or sense.sense_key != SENSE_ILLEGAL_REQUEST:
        return None
    page = bytes(page)
    if sense.asc == 0x26 and sense.ascq == 0x11:
        return ScsiError("%s: %s: this drive needs a key descriptor (U-KAD) with the key (%s): "
                         "give set-key --key-desc TEXT" % (device, what, sense_text(sense)),
                         EXIT_KEY_REFUSED, sense, error.status)
    field = set_data_encryption_field(page, sense.field_pointer)
    if field is None or sense.asc != 0x26:
        return None
    advice = _SDE_ADVICE.get(field, "this tool sends it as Bareos does: please report it "
                                    "with -d 3 output") % {
        "device": device, "index": page[8] if len(page) > 8 else "?",
        "key_length": int.from_bytes(page[18:20], "big") if len(page) >= 20 else 0}
    return ScsiError("%s: %s: the drive refused %s (%s): %s" % (
        device, what, field, sense_text(sense), advice), EXIT_KEY_REFUSED, sense, error.status)


def _warn_not_application_managed(device, status, err):
    if status.parameters_control in (PARAMETERS_CONTROL_DRIVE, PARAMETERS_CONTROL_LIBRARY):
        err.write("bscrypto: warning: %s: encryption is %s (parameters control %d): the drive "
                  "will refuse a key from this host; set its encryption method to "
                  "Application Managed (AME) in the library's management interface or "
                  "operator panel, then retry\n" % (
                      device, _BAREOS_PARAMETERS_CONTROL[status.parameters_control],
                      status.parameters_control))
        err.flush()


# What set-key may ask of the drive besides the key (DriveKeyOptions fields):
# algorithm_index (None: the drive's AES-256-GCM), ckod, raw_read (None: the
# algorithm's default, True or False), decrypt_only, key_desc (--key-desc),
# file_key_desc (a stenc key file's description: dropped with a warning when
# the drive cannot take it, where --key-desc is an error).
_DRIVE_KEY_DEFAULTS = {"algorithm_index": None, "ckod": False, "raw_read": None,
                       "decrypt_only": False, "key_desc": None, "file_key_desc": None}


def drive_key_options(**given):
    """A DriveKeyOptions record: the defaults above, overridden by `given`."""
    values = dict(_DRIVE_KEY_DEFAULTS)
    values.update(given)
    return _record("DriveKeyOptions", " ".join(sorted(_DRIVE_KEY_DEFAULTS)))(**values)


def _drive_encryption_state(transport):
    """(DataEncryptionStatus, DataEncryptionCapabilities or None) before a key page."""
    check_encryption_support(transport)
    return read_drive_status(transport), read_capabilities_or_none(transport)


def _send_key_page(transport, page, status, index, action):
    """SPOUT the Set Data Encryption page; a refusal says which field and what
    to do about it.  Returns the status page read back."""
    device = transport.device
    debug(1, "%s: set data encryption page: %s, algorithm index %s, %d bytes" % (
        device, action, index, len(page)))
    what = "SECURITY PROTOCOL OUT (set data encryption)"
    try:
        scsi_command(transport, what, cdb_security_protocol_out(
            SECURITY_PROTOCOL_TAPE, SET_DATA_ENCRYPTION_PAGE, len(page)),
            data_out=page, context="spout")
    except ScsiError as e:
        if (e.exit_code == EXIT_KEY_REFUSED and status.parameters_control
                in (PARAMETERS_CONTROL_DRIVE, PARAMETERS_CONTROL_LIBRARY)):
            raise ScsiError("%s: %s: the drive refused the page (%s) because its encryption "
                            "is %s: set the drive's encryption method to Application Managed "
                            "(AME) in the library and retry" % (
                                device, what, sense_text(e.sense),
                                _BAREOS_PARAMETERS_CONTROL[status.parameters_control]),
                            EXIT_KEY_REFUSED, e.sense, e.status)
        raise _spout_refusal(device, what, e, page) or e
    return read_drive_status(transport)


def load_drive_key(transport, key, options=None, err=None):
    """Load the drive key.

    Returns (DataEncryptionStatus read back, AlgorithmDescriptor used or None).
    key: the 32 bytes for the KEY field (drive_key_bytes(passphrase) for
    Bareos tapes).  options: a DriveKeyOptions record (drive_key_options()).
    """
    options = options or drive_key_options()
    device = transport.device
    err = err or sys.stderr
    status, capabilities = _drive_encryption_state(transport)
    _warn_not_application_managed(device, status, err)
    algorithm = choose_algorithm(capabilities, options.algorithm_index, options.decrypt_only,
                                 device)
    index = algorithm.algorithm_index if algorithm is not None else (
        1 if options.algorithm_index is None else options.algorithm_index)
    key_desc, file_key_desc = options.key_desc, options.file_key_desc
    if options.decrypt_only and (key_desc or file_key_desc) and not (
            algorithm is not None and algorithm.dkad_c == DKAD_C_REQUIRED):
        # Nothing is written encrypted, so no block could carry it; drives
        # refuse a descriptor with encryption off (stenc drops it too).
        err.write("bscrypto: warning: key descriptor not sent: with --decrypt-only "
                  "nothing is written encrypted\n")
        key_desc = file_key_desc = None
    kads, kad_format = (), KAD_FORMAT_UNSPECIFIED
    if key_desc:
        kad, kad_format = _key_descriptor(key_desc, algorithm, device)
        kads = (kad,)
    elif file_key_desc:
        try:
            kad, kad_format = _key_descriptor(file_key_desc, algorithm, device)
            kads = (kad,)
        except UsageError as e:
            err.write("bscrypto: warning: key file description not sent: %s\n" % e)
    raw_read = options.raw_read
    _check_capabilities(algorithm, raw_read, kads, device)
    if options.ckod:
        _need_tape_for_ckod(transport)
    rdmc = RDMC_DEFAULT if raw_read is None else (RDMC_ENABLED if raw_read else RDMC_DISABLED)

    def page_with(kads, kad_format):
        return build_set_data_encryption_page(
            key, ENCRYPTION_MODE_DISABLE if options.decrypt_only else ENCRYPTION_MODE_ENCRYPT,
            DECRYPTION_MODE_MIXED, index, ckod=options.ckod, rdmc=rdmc,
            kad_format=kad_format, kads=kads)
    page = page_with(kads, kad_format)
    try:
        return _send_key_page(transport, page, status, index, "load key"), algorithm
    except ScsiError as e:
        # A description taken from a stenc key file is optional: without it, once.
        if not (kads and file_key_desc and not key_desc and e.exit_code == EXIT_KEY_REFUSED
                and e.sense is not None and e.sense.field_pointer is not None
                and set_data_encryption_field(page, e.sense.field_pointer)
                in (_KEY_DESCRIPTOR_FIELD, "KAD FORMAT")):
            raise
        err.write("bscrypto: warning: the drive refused the key file's description as key "
                  "descriptor (%s); loading the key without it\n" % sense_text(e.sense))
    page = page_with((), KAD_FORMAT_UNSPECIFIED)
    return _send_key_page(transport, page, status, index, "load key"), algorithm


def clear_drive_key(transport, algorithm_index=None):
    """Clear the drive key (Bareos's page: encryption and decryption off, zero
    key); returns the DataEncryptionStatus read back."""
    status, capabilities = _drive_encryption_state(transport)
    index = algorithm_index
    if index is not None:
        choose_algorithm(capabilities, index, device=transport.device)  # listed by the drive?
    if index is None and capabilities is not None:
        gcm = [a for a in capabilities.algorithms
               if a.security_algorithm_code == ALGORITHM_AES_256_GCM]
        index = gcm[0].algorithm_index if gcm else None
    index = 1 if index is None else index
    return _send_key_page(transport, bareos_clear_key_page(index), status, index, "clear")


def _key_loaded_line(device, status, algorithm):
    name = (algorithm_name(algorithm.security_algorithm_code, algorithm.key_length)
            if algorithm is not None else "algorithm")
    return ("%s: key loaded: %s (index %d), encryption %s, decryption %s, key instance "
            "counter %d\n" % (device, name, status.algorithm_index,
                              _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                              _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
                              status.key_instance_counter))


def op_load_passphrase(device, passphrase, out=None, timeout=DEFAULT_SCSI_TIMEOUT,
                       transport=None, options=None):
    """Load a Bareos passphrase into the drive as Bareos does (key bytes
    passphrase[:31] + NUL), choosing the AES-256-GCM index from the drive.

    options: a DriveKeyOptions record.  Prints a confirmation line to `out`
    when given; returns EXIT_OK.
    """
    return op_load_key(device, drive_key_bytes(passphrase), out, timeout, transport, options)


def op_load_key(device, key, out=None, timeout=DEFAULT_SCSI_TIMEOUT, transport=None,
                options=None):
    """Load 32 raw key bytes (see op_load_passphrase for the options)."""
    if len(key) != DRIVE_KEY_LENGTH:
        raise KeyFileError("a drive key is %d bytes, got %d" % (DRIVE_KEY_LENGTH, len(key)))
    with _drive(device, timeout, transport) as t:
        status, algorithm = load_drive_key(t, key, options)
    audit("%s: key loaded: algorithm index %d, key instance counter %d"
          % (device, status.algorithm_index, status.key_instance_counter))
    if out is not None:
        out.write(_key_loaded_line(device, status, algorithm))
        out.flush()
    return EXIT_OK


def op_clear_key(device, out=None, timeout=DEFAULT_SCSI_TIMEOUT, transport=None,
                 algorithm_index=None):
    """-c / clear-key: encryption and decryption off, zero key (Bareos's page)."""
    with _drive(device, timeout, transport) as t:
        status = clear_drive_key(t, algorithm_index)
    audit("%s: key cleared: algorithm index %d, key instance counter %d"
          % (device, status.algorithm_index, status.key_instance_counter))
    if out is not None:
        out.write("%s: key cleared: encryption %s, decryption %s, key instance counter %d\n"
                  % (device, _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                     _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
                     status.key_instance_counter))
        out.flush()
    return EXIT_OK


def read_set_key_source(key_file=None, kek_file=None, base64=False, hex_key_file=None,
                        prompt=True, kek_text=None, kek_source=None, wrapped=WRAPPED_ALLOW):
    """(32 key bytes, description or None) from the set-key inputs.

    A Bareos key file gives drive_key_bytes(passphrase): with a KEK it is
    unwrapped, with -b base64-decoded (Bareos's -s ignores -b and would load
    the base64 text itself), otherwise its text is the passphrase.
    """
    if hex_key_file is not None:
        return parse_hex_key_file(read_input(hex_key_file, "hex key file", 4096), hex_key_file)
    if kek_text is None and kek_file is not None:
        kek_text, kek_source = read_key_file(kek_file, "KEK file", kek=True), kek_file
    text = read_key_file(key_file, prompt=prompt)
    name = "stdin" if key_file == "-" else key_file
    passphrase = passphrase_from_key_text(text, name, kek_text, kek_source, base64, wrapped)
    return drive_key_bytes(passphrase), None


def op_set_key(device, key_file=None, kek_file=None, base64=False, hex_key_file=None,
               timeout=DEFAULT_SCSI_TIMEOUT, out=None, options=None, prompt=True,
               kek_text=None, kek_source=None, wrapped=WRAPPED_ALLOW):
    """-s / set-key: load the key from a Bareos key file (or a stenc hex key file).

    A description line in a hex key file becomes the key descriptor when the
    drive takes one; --key-desc (options.key_desc) wins over it.
    """
    options = options or drive_key_options()
    key, description = read_set_key_source(key_file, kek_file, base64, hex_key_file, prompt,
                                           kek_text, kek_source, wrapped)
    if description is not None:
        options = options._replace(file_key_desc=description)
    return op_load_key(device, key, out, timeout, options=options)


def _json_text(obj):
    import json
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _json_dump(obj, out):
    out.write(_json_text(obj))
    out.flush()


def op_drive_status(device, detail=False, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT,
                    out=None, transport=None):
    """-e / drive-status: Bareos's text, or more with detail, or JSON."""
    out = out or sys.stdout
    with _drive(device, timeout, transport) as t:
        check_encryption_support(t)
        status = read_drive_status(t)
        extra = _read_detail(t) if detail else None
    if as_json:
        record = {"device": device, "drive_status": drive_status_dict(status)}
        if extra is not None:
            record.update(_detail_dict(extra))
        _json_dump(record, out)
        return EXIT_OK
    out.write(format_drive_status_bareos(status))
    if extra is not None:
        out.write(_format_detail(status, extra))
    out.flush()
    return EXIT_OK


def _read_detail(transport):
    """INQUIRY, capabilities and next block status; parts a drive refuses are None."""
    inquiry, serial = read_inquiry(transport)
    capabilities = read_capabilities_or_none(transport)
    try:
        next_block, why = read_next_block_status(transport), None
    except ScsiError as e:
        next_block = None
        if e.exit_code == EXIT_NOT_READY:
            why = "no tape loaded"
        elif e.sense is None:
            why = str(e)
        else:
            why = sense_text(e.sense, inquiry.vendor)
            if e.sense.sense_key == SENSE_BLANK_CHECK:
                why = "blank tape: " + why
    return inquiry, serial, capabilities, next_block, why


def _detail_dict(extra):
    inquiry, serial, capabilities, next_block, why = extra
    d = {"inquiry": {"vendor": inquiry.vendor, "product": inquiry.product,
                     "revision": inquiry.revision, "serial_number": serial,
                     "peripheral_device_type": inquiry.peripheral_device_type}}
    d["algorithms"] = ([algorithm_dict(a) for a in capabilities.algorithms]
                       if capabilities is not None else None)
    d["next_block_status"] = (next_block_status_dict(next_block)
                              if next_block is not None else None)
    if next_block is None:
        d["next_block_unavailable"] = why
    return d


def _format_detail(status, extra):
    inquiry, serial, capabilities, next_block, why = extra
    i = BAREOS_STATUS_INDENT
    lines = ["Drive:",
             i + "Vendor: %s" % inquiry.vendor,
             i + "Product: %s" % inquiry.product,
             i + "Revision: %s" % inquiry.revision,
             i + "Serial number: %s" % (serial or "not reported"),
             "Encryption parameters:"]
    name = ""
    if capabilities is not None:
        for a in capabilities.algorithms:
            if a.algorithm_index == status.algorithm_index:
                name = " (%s)" % algorithm_name(a.security_algorithm_code, a.key_length)
    lines += [i + "Algorithm index: %d%s" % (status.algorithm_index, name),
              i + "Key instance counter: %d" % status.key_instance_counter,
              i + "Scope: %s, key scope: %s" % (_name(SCOPE_NAMES, status.i_t_nexus_scope),
                                                _name(SCOPE_NAMES, status.key_scope)),
              i + "Parameters control: %s" % _name(PARAMETERS_CONTROL_NAMES,
                                                  status.parameters_control)]
    for kad in status.kads:
        lines.append(i + "Key descriptor (%s): %s" % (_kad_label(kad), _kad_text(kad)))
    if not status.kads:
        lines.append(i + "Key descriptor: none")
    lines.append("Supported algorithms:")
    if capabilities is None:
        lines.append(i + "not reported (capabilities page unreadable)")
    else:
        lines += [i + format_algorithm(a) for a in capabilities.algorithms]
    lines.append("Next block:")
    if next_block is None:
        lines.append(i + "unavailable: %s" % why)
    else:
        lines += [i + "Logical object number: %d" % next_block.logical_object_number,
                  i + "Encryption status: %s" % _name(ENCRYPTION_STATUS_NAMES,
                                                      next_block.encryption_status),
                  i + "Compression status: %s" % _name(COMPRESSION_STATUS_NAMES,
                                                       next_block.compression_status)]
        if next_block.encryption_status in (5, 6):      # not meaningful for 4
            lines.append(i + "Algorithm index: %d" % next_block.algorithm_index)
        lines += _next_block_kad_lines(next_block)
    return "\n".join(lines) + "\n"


def _next_block_kad_lines(next_block):
    """The next block's key descriptors: which key the tape asks for."""
    return [BAREOS_STATUS_INDENT + "Key descriptor (%s): %s" % (_kad_label(kad), _kad_text(kad))
            for kad in next_block.kads]


def op_volume_status(device, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT, out=None,
                     transport=None, readable=False):
    """-v / volume-status: the next block's encryption status (Bareos's text or JSON).

    readable (the subcommand, never -v): after Bareos's lines, an encrypted
    block's key descriptors (status 5 or 6: the tape's answer to "which
    key?") and, for status 6, what it means and what to do.
    """
    out = out or sys.stdout
    with _drive(device, timeout, transport) as t:
        check_encryption_support(t)
        nbes = read_next_block_status(t)
    if as_json:
        _json_dump({"device": device, "next_block_status": next_block_status_dict(nbes)}, out)
        return EXIT_OK
    out.write(format_volume_status_bareos(nbes))
    if readable:
        out.write(_block_key_lines(device, nbes))
    out.flush()
    return EXIT_OK


def _ukad_text(nbes):
    """The block's U-KAD as text, or None when it carries none."""
    for kad in nbes.kads:
        if kad.descriptor_type == KAD_TYPE_UKAD:
            return _kad_text(kad)
    return None


def _block_key_lines(device, nbes):
    lines = []
    if nbes.encryption_status in (NEXT_BLOCK_DECRYPTABLE, NEXT_BLOCK_NO_VALID_KEY):
        lines = _next_block_kad_lines(nbes)
    if nbes.encryption_status == NEXT_BLOCK_NO_VALID_KEY:
        lines.append("hint: the loaded key is not this block's key: load this volume's key "
                     "(`%s load %s --cache CACHE`) and check it with `%s verify %s`"
                     % (_program(), device, _program(), device))
    return "".join(line + "\n" for line in lines)


# -- verify: does the loaded key decrypt this tape? --
#
# SSC-4's Next Block Encryption Status page (0021h) tells, without reading
# the block, whether the block at the current position is encrypted and
# whether the key loaded decrypts it.  A Bareos tape starts with its label
# block (never encrypted) and a filemark; the first data block follows.  The
# tape is moved with SCSI REWIND / SPACE / READ through the same pass-through
# as the pages (so it works on sg nodes and every platform's transport), and
# left rewound, where st's own idea of the position (set by its last MTREW)
# agrees with the drive.

NEXT_BLOCK_NO_BLOCK = 1            # encryption status: no logical block there (end of data)
NEXT_BLOCK_NOT_A_BLOCK = 2         # a filemark
NEXT_BLOCK_PLAIN = 3
NEXT_BLOCK_DECRYPTABLE = 5
NEXT_BLOCK_NO_VALID_KEY = 6
VERIFY_READ_SIZE = 65536           # Bareos writes its label in at most 64,512 bytes
VERIFY_MAX_FILEMARKS = 3           # the label's, and an empty file's two at end of data


def _verification(outcome, text, nbes=None, label_type=None):
    return _record("TapeVerification", "outcome text next_block label_type")(
        outcome, text, nbes, label_type)


def _tape_motion(transport, what, cdb, data_in_len=0):
    """Data (bytes) of a READ or SPACE that ended GOOD, or "filemark" / "end"
    when it stopped at a filemark / end of data."""
    try:
        return scsi_command(transport, what, cdb, data_in_len=data_in_len)
    except ScsiError as e:
        sense = e.sense
        if sense is not None and (sense.sense_key == SENSE_BLANK_CHECK
                                  or (sense.sense_key == SENSE_NO_SENSE and sense.eom)):
            return "end"
        if sense is not None and sense.sense_key == SENSE_NO_SENSE and sense.filemark:
            return "filemark"
        raise


def _past_label(transport, read_label):
    """Move past the first block; (label type or None, a TapeVerification when
    there is nothing more to look at)."""
    got = None
    if read_label:
        try:
            got = _tape_motion(transport, "READ(6) of the label block",
                               cdb_read6(VERIFY_READ_SIZE), VERIFY_READ_SIZE)
        except ScsiError as e:
            # A key in decrypt (not mixed) mode refuses the plain label: skip it.
            if e.sense is None or e.sense.sense_key != SENSE_DATA_PROTECT:
                raise
            debug(1, "%s: label not readable (%s); spacing over it" % (transport.device, e))
            scsi_command(transport, "REWIND", cdb_rewind())
    if got is None:
        got = _tape_motion(transport, "SPACE over the label block", cdb_space(SPACE_BLOCKS, 1))
    if got in ("end", "filemark"):
        return None, _verification("nothing", "nothing to verify: the tape is blank or starts "
                                   "with a filemark (no Bareos label)")
    if not got:
        return None, None
    try:
        label_type = parse_label_block(got).LabelType
    except BscryptoError as e:
        debug(1, "%s: first block: %s" % (transport.device, e))
        return None, None
    if label_type == PRE_LABEL:
        return label_type, _verification("nothing", "nothing to verify: the label is a "
                                         "PRE_LABEL (labelled, never written to)",
                                         label_type=label_type)
    return label_type, None


def _next_data_block(transport):
    """(NextBlockEncryptionStatus of the first block after the filemarks at the
    position, None), or (None, a TapeVerification) when the tape ends first."""
    for _ in range(VERIFY_MAX_FILEMARKS + 1):
        try:
            nbes = read_next_block_status(transport)
        except ScsiError as e:
            refusal = _next_block_refusal(e)
            if refusal == "blank":
                break
            if refusal == "no_key":
                return None, _verification("wrong_key", "the block after the label is "
                                           "encrypted and the drive has no key that decrypts "
                                           "it (%s)" % sense_text(e.sense))
            raise
        if nbes.encryption_status != NEXT_BLOCK_NOT_A_BLOCK:
            return nbes, None
        if _tape_motion(transport, "SPACE over a filemark",
                        cdb_space(SPACE_FILEMARKS, 1)) == "end":
            break
    return None, _verification("nothing", "nothing to verify: the tape ends after the label "
                               "(no data block follows it)")


def _next_block_refusal(error):
    """How some drives answer page 0021h instead of with a status: "blank"
    (BLANK CHECK: nothing written there) or "no_key" (DATA PROTECT, e.g. 74h
    security or IBM's EFh "key required"), else None."""
    sense = error.sense
    if sense is None:
        return None
    if sense.sense_key == SENSE_BLANK_CHECK:
        return "blank"
    if sense.sense_key == SENSE_DATA_PROTECT and sense.asc in (0x74, 0xEE, 0xEF):
        return "no_key"
    return None


def _judge_block(nbes, label_type):
    block = nbes.logical_object_number
    status = nbes.encryption_status
    ukad = _ukad_text(nbes)
    if status == NEXT_BLOCK_DECRYPTABLE:
        return _verification("verified", "block %d is encrypted and the loaded key decrypts it"
                             % block, nbes, label_type)
    if status == NEXT_BLOCK_NO_VALID_KEY:
        return _verification("wrong_key", "block %d is encrypted and the drive cannot decrypt "
                             "it with the loaded key%s" % (block, "" if ukad is None else
                                                           " (its U-KAD: %s)" % ukad),
                             nbes, label_type)
    if status == NEXT_BLOCK_PLAIN:
        return _verification("not_encrypted", "block %d is not encrypted: this volume's data "
                             "is plain (a loaded key is harmless but not needed)" % block,
                             nbes, label_type)
    if status == NEXT_BLOCK_NO_BLOCK:
        return _verification("nothing", "nothing to verify: the tape ends after the label (no "
                             "data block follows it)", nbes, label_type)
    return _verification("undetermined", "cannot verify: the drive reports encryption status "
                         "%d (%s) for block %d" % (status, _name(ENCRYPTION_STATUS_NAMES, status),
                                                   block), nbes, label_type)


def verify_tape(transport, read_label=True, label_type=None):
    """Whether the drive's key decrypts the tape's first data block: past the
    label and its filemark(s), page 0021h, then rewound.  Only REWIND, SPACE
    and READ are sent.  read_label: read the first block (to tell a PRE_LABEL)
    rather than space over it; label_type: the caller read it already.
    Returns a TapeVerification record."""
    if label_type == PRE_LABEL:
        return _verification("nothing", "nothing to verify: the label is a PRE_LABEL "
                             "(labelled, never written to)", label_type=label_type)
    scsi_command(transport, "REWIND", cdb_rewind())
    try:
        found, result = _past_label(transport, read_label and label_type is None)
        label_type = found if label_type is None else label_type
        if result is None:
            nbes, result = _next_data_block(transport)
            result = result or _judge_block(nbes, label_type)
    except BscryptoError:
        try:
            scsi_command(transport, "REWIND", cdb_rewind())
        except BscryptoError as e:
            debug(1, "%s: rewind after a failed verify: %s" % (transport.device, e))
        raise
    scsi_command(transport, "REWIND", cdb_rewind())
    return result


def verification_dict(device, v):
    return {"device": device, "outcome": v.outcome, "text": v.text,
            "label_type": LABEL_TYPE_NAMES.get(v.label_type),
            "next_block_status": (next_block_status_dict(v.next_block)
                                  if v.next_block is not None else None)}


def op_verify(device, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT, out=None, transport=None):
    """verify: does the key in the drive (set-key, -s, the plugin) decrypt the
    tape in it?  The outcomes and exit codes of `load`'s check."""
    out = out or sys.stdout
    with _drive(device, timeout, transport) as t:
        check_encryption_support(t)
        status = read_drive_status(t)
        v = verify_tape(t)
    code = EXIT_WRONG_KEY if v.outcome == "wrong_key" else EXIT_OK
    if code:
        held = ("the drive holds no key" if status.decryption_mode == DECRYPTION_MODE_DISABLE
                else "the loaded key is not this volume's")
        sys.stderr.write("bscrypto: verify: %s: %s: %s; load this volume's key with `%s load "
                         "%s --cache CACHE` (or --catalog EXPORT)\n"
                         % (device, v.text, held, _program(), device))
    if as_json:
        # One document: the outcome carries the exit code, no second error object.
        _json_dump(dict(verification_dict(device, v), exit_code=code), out)
    elif not code:
        out.write("%s: %s\n" % (device, v.text))
        out.flush()
    return code


# -- recovery operations --


def op_label(source, as_json=False, name_only=False, ops=None, out=None):
    """label: print the Bareos volume label of a tape device or volume file."""
    label = read_volume_label(source, ops)
    out = out or sys.stdout
    if name_only:
        out.write(label.VolumeName + "\n")
    elif as_json:
        import json
        out.write(json.dumps(volume_label_dict(label), indent=2, sort_keys=True) + "\n")
    else:
        out.write(format_volume_label(label, "stdin" if source == "-" else source))
    out.flush()
    return EXIT_OK


def op_kek_from_config(path, director=None, dest=None, print_kek=False, force=False, out=None,
                       as_json=False):
    """kek-from-config: copy a director's KEK out of a Bareos config into a
    0600 key file usable with -w/--kek; printed only when asked to."""
    found = find_config_kek(path, director)
    where = "Director %r (%s line %d)" % (found.director, found.path, found.line)
    record = {"config": path, "director": found.director, "file": found.path,
              "line": found.line, "out": dest}
    if print_kek and as_json:
        record["kek"] = found.kek.decode(*_CACHE_TEXT)     # asked for with --print
        _json_dump(record, out or sys.stdout)
        return EXIT_OK
    if print_kek:
        out = out or _stdout_bytes()
        out.write(found.kek + b"\n")
        out.flush()
        return EXIT_OK
    # A key file loses trailing spaces and all after 64 bytes (Bareos's
    # rule); refuse if that would change the AES key Bareos derives.
    if kek_from_text(bareos_key_buffer(found.kek)) != kek_from_text(found.kek):
        raise KeyFileError("the Key Encryption Key of %s ends in spaces within its first %d "
                           "bytes, which a key file cannot keep; use --kek-from %s instead of "
                           "a file" % (where, KEK_LENGTH, path))
    write_private_file(dest, found.kek, force, stream_data=found.kek + b"\n")
    done = "%s was written" % dest
    if as_json:
        report_output(out or sys.stdout, _json_text(record), done)
        return EXIT_OK
    report_output(sys.stdout, "wrote the Key Encryption Key of %s to %s (mode 0600)\n"
                  % (where, dest), done)
    return EXIT_OK


# Disaster recovery: from a tape in the drive to a loaded key, KEK rotation,
# a readiness check for cron and verified cache backups.  Keys are catalog
# text (base64, FORMATS.md section 3): 43 characters for a plain passphrase,
# 54 for one wrapped with the KEK.

PLAIN_KEY_CHARS = 43               # base64 of 32 bytes, no padding
WRAPPED_KEY_CHARS = 54             # base64 of 40 bytes
CHECK_HEALTHY = 0                  # `check`'s own exit contract, for cron
CHECK_PROBLEMS = 1
CHECK_UNABLE = 2
DEFAULT_CHECK_DAYS = 7
DEFAULT_BACKUP_KEEP = 14
PROGRESS_MINIMUM = 300             # fewer keys finish before progress would help
PROGRESS_INTERVAL = 0.2            # seconds between progress updates


def key_form(text):
    """(wrapped, decoded bytes) of a catalog key; ValueError saying why it is none."""
    raw = b64decode(text)
    if len(raw) == WRAPPED_LENGTH:
        return True, raw
    if len(raw) == PASSPHRASE_LENGTH:
        return False, raw
    raise ValueError("decodes to %d bytes; a Bareos key is %d bytes (%d characters, not "
                     "wrapped) or %d bytes (%d characters, wrapped)"
                     % (len(raw), PASSPHRASE_LENGTH, PLAIN_KEY_CHARS, WRAPPED_LENGTH,
                        WRAPPED_KEY_CHARS))


def _looks_wrapped(key):
    try:
        return key_form(key)[0]
    except ValueError:
        return False


def _form_text(wrapped):
    return ("wrapped (%d characters)" % WRAPPED_KEY_CHARS if wrapped
            else "not wrapped (%d characters)" % PLAIN_KEY_CHARS)


def _shown(name):
    """A volume name (str or bytes) as printable text, whatever bytes it holds."""
    if isinstance(name, str):
        name = name.encode(*_CACHE_TEXT)
    return name.decode("utf-8", "backslashreplace")


def _local_time(t):
    return _time_text(t, "%Y-%m-%d %H:%M:%S", time.localtime, {}).decode("ascii")


class _Progress(object):
    """`label: done/total` on a terminal's stderr, rewritten in place; silent for
    fewer than PROGRESS_MINIMUM items or when stderr is not a terminal."""

    def __init__(self, label, total, stream=None, minimum=PROGRESS_MINIMUM,
                 interval=PROGRESS_INTERVAL):
        self.stream = sys.stderr if stream is None else stream
        self.label, self.total, self.interval = label, total, interval
        try:
            tty = self.stream is not None and self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.on = tty and total >= minimum
        self.shown = False
        self.last = None

    def update(self, done):
        if not self.on:
            return
        now = time.monotonic()
        if self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.stream.write("\r%s: %d/%d" % (self.label, done, self.total))
        self.stream.flush()
        self.shown = True

    def finish(self):
        if self.shown:
            self.stream.write("\r%s: %d/%d\n" % (self.label, self.total, self.total))
            self.stream.flush()


def _kek_description(kek_file=None, kek_from=None, director=None):
    if kek_file:
        return "KEK file %s" % ("stdin" if kek_file == "-" else kek_file)
    if kek_from:
        return "the Key Encryption Key in %s%s" % (
            kek_from, "" if director is None else " (Director %s)" % director)
    return None


# -- load: label -> key -> unwrap -> drive --

_CATALOG_HINT = ("export the catalog's keys (psql -A -t -F '|' -c \"%s\" bareos > media.txt) "
                 "and add them with `%%s populate-cache %%s --from-catalog media.txt`, "
                 "or pass --catalog media.txt" % CATALOG_EXPORT_SQL)


def _label_failure(device, error, timeout, transport):
    """The load error for a label that cannot be read, with the drive's key state
    when the drive can tell it (a key in decrypt mode refuses the plain label)."""
    # --volume helps only when the drive works but its label does not read.
    hint = "; or give --volume NAME to skip reading the label" \
        if error.exit_code == EXIT_LABEL else ""
    text = "load: reading the volume label failed: %s" % error
    if getattr(error, "kind", None) == "io":
        try:
            status = get_drive_status(device, timeout, transport)
        except BscryptoError as e:
            debug(1, "%s: no encryption status after the failed label read: %s" % (device, e))
            status = None
        if status is not None and status.decryption_mode in (DECRYPTION_MODE_RAW,
                                                             DECRYPTION_MODE_DECRYPT):
            text = ("load: reading the volume label failed: %s: %s reading the first block: "
                    "a key is loaded with decryption mode %s, which refuses the unencrypted "
                    "label: clear it with `%s clear-key %s` and retry"
                    % (device, os.strerror(errno.EIO),
                       _BAREOS_DECRYPTION_MODE[status.decryption_mode], _program(), device))
        elif status is not None:
            text = ("load: reading the volume label failed: %s: %s reading the first block, "
                    "and the drive holds no key that refuses the label: the tape is blank or "
                    "damaged, or not a Bareos volume" % (device, os.strerror(errno.EIO)))
    return BscryptoError(text + hint, error.exit_code)


def _find_key(want, cache, catalog):
    """(key text, where it was found) for volume; EXIT_NOT_FOUND if it is nowhere."""
    entries = export = None
    cache_key = catalog_key = None
    if cache:
        try:
            entries = read_cache(cache, raw=True).entries
        except CacheError as e:
            raise CacheError("load: reading the crypto cache failed: %s" % e)
        for e in entries:
            if e.volume_name == want:
                cache_key = e.encryption_key.decode(*_CACHE_TEXT)
                break
    if catalog:
        try:
            export = read_catalog_export(catalog)
        except BscryptoError as e:
            raise BscryptoError("load: reading the catalog export failed: %s" % e, e.exit_code)
        for name, key in export.entries:
            if name.encode(*_CACHE_TEXT) == want:
                catalog_key = key
                break
    if catalog_key is not None:
        if cache_key is not None and cache_key != catalog_key:
            warn("crypto cache %s holds a different key for volume %s than catalog export %s; "
                 "using the catalog's (what the director sends); if the tape stays unreadable, "
                 "retry without --catalog" % (cache, _shown(want), catalog))
        elif cache_key is not None:
            return catalog_key, "crypto cache %s and catalog export %s" % (cache, catalog)
        return catalog_key, "catalog export %s" % catalog
    if cache_key is not None:
        return cache_key, "crypto cache %s" % cache
    raise BscryptoError("load: looking up the key failed: %s" % _not_found_text(
        want, cache, entries, catalog, export), EXIT_NOT_FOUND)


def edit_distance(a, b, limit=None):
    """Levenshtein distance of two strings (or bytes); above limit once
    every path exceeds it (the exact value then does not matter)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        if limit is not None and min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


def near_names(want, names, distance=2, most=5):
    """Names other than want within `distance` edits of it, case ignored
    (Full-001 finds Full-0001 and full-001); closest first."""
    lower = want.lower()
    found = {}
    for name in names:
        if name != want and abs(len(name) - len(want)) <= distance and name not in found:
            d = edit_distance(lower, name.lower(), distance)
            if d <= distance:
                found[name] = d
    return sorted(found, key=lambda n: (found[n], n))[:most]


def _not_found_text(want, cache, entries, catalog, export):
    places = []
    names = []
    if entries is not None:
        names.extend(e.volume_name for e in entries)
        if entries:
            newest = max(entries, key=lambda e: e.added)
            places.append("crypto cache %s (%d entries, the newest added %s: %s)"
                          % (cache, len(entries), _local_time(newest.added),
                             _shown(newest.volume_name)))
        else:
            places.append("crypto cache %s (empty)" % cache)
    if export is not None:
        names.extend(name.encode(*_CACHE_TEXT) for name, _ in export.entries)
        places.append("catalog export %s (%d volumes with a key)" % (catalog, len(export.entries)))
    text = "volume %s is %s" % (_shown(want), "in neither %s nor %s" % tuple(places)
                                if len(places) == 2 else "not in " + places[0])
    close = near_names(want, names, 1)      # volumes are numbered: 2 edits match too many
    if close:
        text += "; near-miss names: %s" % ", ".join(_shown(n) for n in close)
    if cache and catalog is None:
        text += ": the cache only holds volumes mounted in the last 60 days; " + (
            _CATALOG_HINT % (_program(), cache))
    elif catalog is not None:
        text += (": export the catalog again (the volume may be newer than the export) or "
                 "check the name on the tape with `%s label`" % _program())
    return text


def op_load_volume(device, cache=None, catalog=None, kek_text=None, kek_source=None,
                   volume=None, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT,
                   algorithm_index=None, ops=None, transport=None, out=None, verify=True):
    """load: read the label, find the volume's key in the cache and/or a catalog
    export, unwrap it, load it as Bareos does, confirm Encrypt + Mixed and
    (verify) check on the tape's first data block that the key decrypts it.

    Each failure names its step and what to try.  Prints a summary (or JSON)
    that never contains the key.
    """
    if not cache and not catalog:
        raise UsageError("load needs where the keys are: --cache CACHE and/or --catalog EXPORT")
    out = out or sys.stdout
    label = None
    # 1. The volume name, from the label unless given.
    if volume is None:
        try:
            label = read_volume_label(device, ops)
        except BscryptoError as e:
            raise _label_failure(device, e, timeout, transport)
        volume = label.VolumeName
        want = volume.encode(*_CACHE_TEXT)
    else:
        want = os.fsencode(volume)
    shown = _shown(want)
    # 2. The key, from the cache and/or the catalog export.
    key_text, source = _find_key(want, cache, catalog)
    # 3. Base64 and which form.
    try:
        wrapped, raw = key_form(key_text)
    except ValueError as e:
        raise UnwrapError("load: decoding the key failed: the key of volume %s in %s is not "
                          "a Bareos key (%s): the entry is damaged; try the other source "
                          "(--cache or --catalog)" % (shown, source, e))
    debug(1, "volume %s: key from %s, %s" % (shown, source, _form_text(wrapped)))
    # 4. Unwrap.
    if wrapped:
        if kek_text is None:
            raise UnwrapError("load: the key of volume %s in %s is %s: a Key Encryption Key is "
                              "needed to unwrap it: give --kek KEKFILE or --kek-from "
                              "/etc/bareos (the director's Key Encryption Key)"
                              % (shown, source, _form_text(True)))
        try:
            passphrase = aes_key_unwrap(kek_from_text(kek_text), raw)
        except UnwrapError:
            raise UnwrapError("load: integrity check failed for volume %s: wrong KEK? The key "
                              "in %s is %s and does not unwrap with %s: use the KEK of the "
                              "director that wrote the tape (--kek-from CONFIG --director "
                              "NAME), or the entry is damaged (try the other source)"
                              % (shown, source, _form_text(True), kek_source or "the KEK"))
    else:
        passphrase = raw
        if kek_text is not None:
            sys.stderr.write("bscrypto: note: the key of volume %s in %s is %s: loaded as "
                             "it is; the KEK is not needed for it\n"
                             % (shown, source, _form_text(False)))
    # 5. Load it with Bareos's key bytes, 6. confirm, 7. verify on the tape.
    with _drive(device, timeout, transport) as t:
        try:
            status, algorithm = load_drive_key(t, drive_key_bytes(passphrase),
                                               drive_key_options(algorithm_index=algorithm_index))
        except BscryptoError as e:
            raise BscryptoError("load: loading the key of volume %s into the drive failed: %s"
                                % (shown, e), e.exit_code)
        if (status.encryption_mode, status.decryption_mode) != (ENCRYPTION_MODE_ENCRYPT,
                                                                 DECRYPTION_MODE_MIXED):
            raise BscryptoError(
                "load: the drive took the key of volume %s but reports encryption mode %s and "
                "decryption mode %s, not Encrypt and Mixed: check `%s drive-status --detail "
                "%s` (a library or key manager may control the drive)" % (
                    shown, _BAREOS_ENCRYPTION_MODE.get(status.encryption_mode, "?"),
                    _BAREOS_DECRYPTION_MODE.get(status.decryption_mode, "?"), _program(),
                    device), EXIT_KEY_REFUSED)
        # Logged before the check, which may clear the key again (and logs that).
        audit("%s: key of volume %s loaded (from %s): algorithm index %d, key instance counter "
              "%d" % (device, shown, source, status.algorithm_index,
                      status.key_instance_counter))
        check = _verify_loaded(t, shown, source, label, algorithm_index) if verify else None
    name = (algorithm_name(algorithm.security_algorithm_code, algorithm.key_length)
            if algorithm is not None else None)
    if as_json:
        record = {"device": device, "volume": shown,
                  "volume_from": "label" if label is not None else "--volume",
                  "key_source": source, "wrapped": wrapped, "kek_source": kek_source,
                  "algorithm": name, "algorithm_index": status.algorithm_index,
                  "key_instance_counter": status.key_instance_counter,
                  "encryption_mode": _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                  "decryption_mode": _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
                  "verify": verification_dict(device, check) if check is not None else None}
        if label is not None:
            record["label"] = {"PoolName": label.PoolName, "MediaType": label.MediaType,
                               "LabelType": LABEL_TYPE_NAMES.get(label.LabelType)}
        _json_dump(record, out)
        return EXIT_OK
    lines = ["volume %s (%s)" % (shown, "from the tape label: pool %s, media type %s"
                                 % (label.PoolName, label.MediaType) if label is not None
                                 else "given with --volume; label not read"),
             "key from %s: %s%s" % (source, _form_text(wrapped),
                                    ", unwrapped with %s" % (kek_source or "the KEK")
                                    if wrapped else ""),
             "%s: key loaded: %salgorithm index %d, key instance counter %d, encryption "
             "Encrypt, decryption Mixed" % (device, name + ", " if name else "",
                                            status.algorithm_index,
                                            status.key_instance_counter),
             "verify: %s" % (check.text if check is not None else "skipped (--no-verify)"),
             "the drive now reads this volume's encrypted blocks; clear the key with "
             "`%s clear-key %s` when done" % (_program(), device)]
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK


def _verify_loaded(transport, shown, source, label, algorithm_index):
    """load's step 7: verify_tape with the key just loaded; a key that does not
    decrypt the tape is cleared again and reported (EXIT_WRONG_KEY)."""
    device = transport.device
    try:
        check = verify_tape(transport, read_label=False,
                            label_type=label.LabelType if label is not None else None)
    except BscryptoError as e:
        raise BscryptoError("load: the key of volume %s is loaded, but verifying it on the "
                            "tape failed: %s (skip the check with --no-verify)" % (shown, e),
                            e.exit_code)
    if check.outcome != "wrong_key":
        return check
    try:
        status = clear_drive_key(transport, algorithm_index)
        audit("%s: key of volume %s cleared (it does not decrypt the tape): algorithm index %d, "
              "key instance counter %d" % (device, shown, status.algorithm_index,
                                           status.key_instance_counter))
        cleared = "the key was cleared from the drive"
    except BscryptoError as e:
        cleared = "clearing the key failed too (%s): run `%s clear-key %s`" % (
            e, _program(), device)
    raise BscryptoError(
        "load: the drive cannot decrypt volume %s's data with the key found in %s: %s; %s; "
        "try the other source (--cache or --catalog) or the KEK of another director "
        "(--kek-from CONFIG --director NAME)" % (shown, source, check.text, cleared),
        EXIT_WRONG_KEY)


# -- populate-cache --from-catalog --


def op_populate_from_catalog(path, export_path, now=None, layout=None, backup=False,
                             skip_bad_lines=False, out=None, as_json=False,
                             new_owner_of_directory=False):
    """Add a catalog export's volumes with keys to the cache with Bareos's rules
    (under the lock, atomic write); print the counts on stdout."""
    export = read_catalog_export(export_path)
    if export.bad:
        _report_bad_lines(export.bad, path, skip_bad_lines,
                          "stdin" if export_path == "-" else export_path)
    stats, write = update_cache(path, export.entries, resolve_now(now), layout, backup,
                                new_owner_of_directory)
    done = "%s was %s" % (path, "written" if write else "not changed")
    if as_json:
        report_output(out or sys.stdout, _json_text(dict(
            stats, cache=path, written=write, catalog=export_path, format=export.format,
            read=export.read, skipped_without_key=export.skipped, bad_lines=len(export.bad))),
            done)
        return EXIT_OK
    report_output(out or sys.stdout, "%s: from catalog export %s (%s): %d read, %d added, "
                  "%d updated, %d unchanged, %d skipped without a key, %d bad lines%s; %d "
                  "expired removed; %s\n" % (
                      path, "stdin" if export_path == "-" else export_path, export.format,
                      export.read, stats["added"], stats["updated"], stats["unchanged"],
                      export.skipped, len(export.bad), " skipped" if export.bad else "",
                      stats["expired_removed"],
                      "written" if write else "nothing changed, not written"), done)
    return EXIT_OK


# -- rewrap: KEK rotation --


def rewrap_keys(keys, old_kek_text, new_kek_text, wrap_unwrapped=False, progress=None):
    """Re-wrap each distinct key text under the new KEK, each result verified.

    Returns (new key by old key, failures {key: why}, plain [keys not wrapped
    that were left alone]).  A wrapped key must unwrap with the old KEK, or
    already with the new one (a run repeated after a complete or partial
    rotation): such a key maps to itself.  A plain one is wrapped only with
    wrap_unwrapped.  Deterministic: RFC 3394 with the default IV gives one
    wrapped form per passphrase and KEK.
    """
    old, new = kek_from_text(old_kek_text), kek_from_text(new_kek_text)
    result, failures, plain = {}, {}, []
    for done, key in enumerate(keys, 1):
        if progress is not None:
            progress.update(done)
        try:
            wrapped, raw = key_form(key)
        except ValueError as e:
            failures[key] = "not a Bareos key: %s" % e
            continue
        if wrapped:
            try:
                passphrase = aes_key_unwrap(old, raw)
            except UnwrapError:
                try:
                    aes_key_unwrap(new, raw)
                    result[key] = key           # already re-wrapped by an earlier run
                except UnwrapError:
                    failures[key] = "integrity check failed with the old KEK (and the new one)"
                continue
        elif wrap_unwrapped:
            passphrase = raw
        else:
            plain.append(key)
            continue
        rewrapped = aes_key_wrap(new, passphrase)
        # Verify before anything is written: the new form must give the same passphrase.
        if aes_key_unwrap(new, rewrapped) != passphrase:
            raise BscryptoError("rewrap: verification failed: a re-wrapped key does not unwrap "
                                "to its passphrase; nothing written (a bug: please report it)",
                                EXIT_INTERNAL)
        result[key] = b64encode(rewrapped)
    if progress is not None:
        progress.finish()
    return result, failures, plain


def _rewrap_refusal(failures, plain, uses):
    """Print one stderr line per volume in the way, then the error to raise."""
    lines = []
    for key, why in failures.items():
        for volume, where in uses[key]:
            lines.append("volume %s (%s): %s" % (_shown(volume), where, why))
    for key in plain:
        for volume, where in uses[key]:
            lines.append("volume %s (%s): %s" % (_shown(volume), where, _form_text(False)))
    for line in lines[:50]:
        sys.stderr.write("bscrypto: rewrap: %s\n" % line)
    if len(lines) > 50:
        sys.stderr.write("bscrypto: rewrap: ... and %d more\n" % (len(lines) - 50))
    if failures:
        return UnwrapError("rewrap: %d of the keys cannot be unwrapped with the old KEK (listed "
                           "above): nothing written; check --old-kek, and repair or remove "
                           "damaged entries first" % len(failures))
    return UsageError("rewrap: %d keys are not wrapped (listed above; Bareos stores them so "
                      "when no KEK is set): nothing written; add --wrap-unwrapped to wrap them "
                      "with the new KEK" % len(plain))


def _sql_script(updates, path):
    # A newline in the path must not start a live SQL line.
    path = "".join(c if " " <= c != "\x7f" else "?" for c in path)
    lines = ["-- bscrypto.py rewrap: EncryptionKey of %d volumes, wrapped with the new KEK."
             % len(updates),
             "-- One transaction: psql -v ON_ERROR_STOP=1 -f %s bareos  (or mysql bareos < %s)"
             % (path, path),
             "BEGIN;"]
    for volume, key in updates:
        try:
            lines.append(sql_update_key(volume, key))
        except ValueError as e:
            raise UsageError("rewrap: cannot write SQL for volume %s: %s; nothing written"
                             % (_shown(volume), e))
    lines.append("COMMIT;")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def op_rewrap(old_kek_text, new_kek_text, cache=None, catalog=None, sql_out=None, backup=False,
              force=False, wrap_unwrapped=False, kek_sources=("the old KEK", "the new KEK"),
              out=None, progress_stream=None, as_json=False):
    """rewrap: re-wrap every key of a cache and/or catalog export with a new KEK.

    All keys are unwrapped, re-wrapped and verified first; any failure writes
    nothing.  The SQL file (0600) is written to a temporary file, then the
    cache is replaced (atomic, `added` kept), then the SQL file is published:
    a cache that cannot be written leaves no SQL behind.
    """
    if not cache and not catalog:
        raise UsageError("rewrap needs --cache CACHE and/or --catalog EXPORT")
    if catalog and not sql_out:
        raise UsageError("rewrap --catalog writes UPDATE statements: give --sql-out FILE")
    if kek_from_text(old_kek_text) == kek_from_text(new_kek_text):
        raise UsageError("the new KEK is the same AES key as the old one (Bareos uses the first "
                         "%d bytes): nothing to do" % KEK_LENGTH)
    export = read_catalog_export(catalog) if catalog else None
    if export is not None and export.bad:
        for number, problem in export.bad[:20]:
            sys.stderr.write("bscrypto: %s line %d: %s\n" % (catalog, number, problem))
        raise KeyFileError("rewrap: %d bad lines in catalog export %s: nothing written; export "
                           "again or fix them" % (len(export.bad), catalog))
    import contextlib
    with contextlib.ExitStack() as stack:
        entries, layout, cf = [], None, None
        if sql_out:
            sql_file = PrivateOutput(sql_out, force, "--sql-out")
            stack.callback(sql_file.discard)
        if cache:
            cf = stack.enter_context(cache_lock(cache))
            found = read_cache(cf)
            entries, layout = found.entries, found.layout
        uses = {}          # key -> [(volume, where)]
        for e in entries:
            uses.setdefault(e.encryption_key, []).append((e.volume_name, "cache"))
        for name, key in (export.entries if export is not None else ()):
            uses.setdefault(key, []).append((name, "catalog"))
        progress = _Progress("rewrap", len(uses), progress_stream)
        new_keys, failures, plain = rewrap_keys(list(uses), old_kek_text, new_kek_text,
                                                wrap_unwrapped, progress)
        if failures or plain:
            raise _rewrap_refusal(failures, plain, uses)
        already = sum(1 for key, new_key in new_keys.items() if key == new_key)
        new_entries = [CacheEntry(e.volume_name, new_keys[e.encryption_key], e.added)
                       for e in entries]
        sql = None
        if sql_out:
            # Catalog volumes get their catalog key; cache-only volumes their cache key.
            updates = [(name, new_keys[key]) for name, key in
                       (export.entries if export is not None else ())]
            named = {name for name, _ in updates}
            for e in new_entries:
                if e.volume_name not in named:
                    named.add(e.volume_name)
                    updates.append((e.volume_name, e.encryption_key))
            sql = _sql_script(updates, sql_out)
        cache_changes = sum(1 for a, b in zip(entries, new_entries) if a != b)
        if cache:
            build_cache(new_entries, layout)        # refuse before writing anything
        if sql is not None:
            sql_file.prepare(sql)
        if cache and cache_changes:
            try:
                write_cache(cf, new_entries, layout, backup)
            except CacheError as e:
                raise CacheError("%s%s" % (e, "; %s was not written either" % sql_out
                                           if sql is not None else ""))
        if sql is not None:
            try:
                sql_file.commit()
            except KeyFileError as e:
                raise KeyFileError("%s; the crypto cache %s WAS re-wrapped and written: run "
                                   "rewrap again on the catalog export alone to get the SQL"
                                   % (e, cache) if cache and cache_changes else str(e))
    if export is None:
        warn("only the cache's volumes were re-wrapped: the catalog's other volumes keep keys "
             "wrapped with the old KEK; export the catalog and rewrap it too (--catalog EXPORT "
             "--sql-out FILE)")
    rewrapped = len(new_keys) - already
    audit("rewrap: %d distinct keys re-wrapped with %s, %d already were%s%s" % (
        rewrapped, kek_sources[1], already,
        "; crypto cache %s: %d entries written" % (cache, cache_changes) if cache else "",
        "; %s written" % sql_out if sql is not None else ""))
    files = [cache] * bool(cache and cache_changes) + [sql_out] * (sql is not None)
    written = "rewrap finished (%s written)" % " and ".join(files) if files else None
    if as_json:
        report_output(out or sys.stdout, _json_text({
            "old_kek": kek_sources[0], "new_kek": kek_sources[1],
            "rewrapped": rewrapped, "already_new_kek": already,
            "cache": cache and {"path": cache, "entries": len(entries),
                                "rewrapped": cache_changes, "written": bool(cache_changes),
                                "backup": backup},
            "sql_out": sql_out if sql is not None else None,
            "sql_updates": sql.count(b"\nUPDATE ") if sql is not None else 0}), written)
        return EXIT_OK
    done = []
    if already:
        done.append("%d distinct keys already unwrap with %s (an earlier rewrap): left as they "
                    "are" % (already, kek_sources[1]))
    if cache and cache_changes:
        done.append("crypto cache %s: %d entries re-wrapped, times added kept%s"
                    % (cache, cache_changes, " (old copy kept as .bak)" if backup else ""))
    elif cache:
        done.append("crypto cache %s: every entry already wrapped with the new KEK; not "
                    "written" % cache)
    if sql is not None:
        done.append("%s: %d UPDATE statements (mode 0600)" % (sql_out, sql.count(b"\nUPDATE ")))
    text = ["rewrap: %d distinct keys unwrapped with %s, wrapped with %s and verified\n"
            % (rewrapped, kek_sources[0], kek_sources[1])]
    text.extend("rewrap: %s\n" % line for line in done)
    text.append("rewrap: next: %sset Key Encryption Key to the new KEK in the Director "
                "resources of bareos-dir and bareos-sd, and restart both\n"
                % ("apply %s to the catalog, then " % sql_out if sql is not None else ""))
    report_output(out or sys.stdout, "".join(text), written)
    return EXIT_OK


# -- check: DR readiness for cron (exit 0 healthy, 1 problems, 2 could not check) --


_INTEGRITY_FAILED = "fails the integrity check"


def check_keys(entries, kek_text, now, days, export=None, progress=None, cache="CACHE",
               catalog=None):
    """Check cache entries (and an export) for DR readiness; a dict of counts
    with "problems", one text line each, ending with what to run.

    Every cache entry must decode and unwrap, none may expire within `days`,
    and every catalog volume with a key must be cached with the same key
    (the same passphrase in another form counts as the same key).  When no
    wrapped key unwraps, one line says "wrong KEK?" instead of one per key.
    """
    populate = "run `bscrypto.py populate-cache %s --from-catalog %s`" % (
        cache, catalog or "EXPORT")
    reset = "run `bscrypto.py reset-cache %s`" % cache
    other_kek = ("try the Director's KEK: --kek-from /etc/bareos (--director NAME when "
                 "there are several)")
    kek = kek_from_text(kek_text) if kek_text is not None else None
    passphrases = {}          # key text -> passphrase, or None (reason in why)
    why = {}
    forms = {}                # key text -> wrapped?

    def passphrase(key):
        if key not in passphrases:
            if progress is not None:
                progress.update(len(passphrases) + 1)
            try:
                forms[key], raw = key_form(key)
                if forms[key] and kek is None:
                    raise UnwrapError("no KEK")
                passphrases[key] = aes_key_unwrap(kek, raw) if forms[key] else raw
            except ValueError as e:
                passphrases[key], why[key] = None, "is not a Bareos key: %s" % e
            except UnwrapError:
                passphrases[key], why[key] = None, _INTEGRITY_FAILED
        return passphrases[key]

    problems = [] if entries else ["the cache holds no entries: nothing to recover with; "
                                   + populate]
    report = {"entries": len(entries), "wrapped": 0, "plain": 0, "next_expiry": None,
              "problems": problems}
    unwrap_failed = []        # indexes in problems of keys failing the integrity check

    def key_problem(key, text):
        if why[key] == _INTEGRITY_FAILED:
            unwrap_failed.append(len(problems))
            problems.append("%s %s: wrong KEK for it, or damaged; %s" % (text, why[key],
                                                                         populate))
        else:
            problems.append("%s %s; %s" % (text, why[key], populate))
    limit = now + days * 86400
    by_name = {}
    for e in entries:
        by_name.setdefault(e.volume_name, []).append(e)
        name = _shown(e.volume_name)
        if passphrase(e.encryption_key) is None:
            key_problem(e.encryption_key, "volume %s: cache key" % name)
        else:
            report["wrapped" if forms[e.encryption_key] else "plain"] += 1
        expires = e.added + CACHE_EXPIRY_SECONDS
        if report["next_expiry"] is None or expires < report["next_expiry"][0]:
            report["next_expiry"] = (expires, name)
        if expires < now:
            problems.append("volume %s: expired %s (Bareos drops it at its next cache update); "
                            "%s" % (name, _local_time(expires), reset))
        elif expires < limit:
            problems.append("volume %s: expires %s, within %d days; %s"
                            % (name, _local_time(expires), days, reset))
    for name, same in by_name.items():
        if len({e.encryption_key for e in same}) > 1:
            problems.append("volume %s: %d cache entries with different keys; %s"
                            % (_shown(name), len(same), populate))
    if export is not None:
        report.update(catalog=len(export.entries), catalog_same=0,
                      catalog_skipped=export.skipped)
        for number, problem in export.bad:
            problems.append("catalog export %s line %d: %s; run the export again"
                            % (catalog, number, problem))
        for name, key in export.entries:
            cached = by_name.get(name)
            mine = passphrase(key)
            if mine is None:
                key_problem(key, "volume %s: catalog key" % _shown(name))
            elif not cached:
                problems.append("volume %s: has a key in the catalog but is not in the cache; "
                                "%s" % (_shown(name), populate))
            elif any(e.encryption_key == key or passphrase(e.encryption_key) == mine
                     for e in cached):
                report["catalog_same"] += 1
            else:
                problems.append("volume %s: the cache holds a different key than the catalog; "
                                "%s" % (_shown(name), populate))
    unwrapped = sum(1 for key, wrapped in forms.items()
                    if wrapped and passphrases.get(key) is not None)
    if len(unwrap_failed) > 1 and not unwrapped:
        # The same cause N times: say it once.
        failed = set(unwrap_failed)
        problems[:] = ["none of the %d wrapped keys unwraps with the KEK: wrong KEK? %s"
                       % (len(unwrap_failed), other_kek)] + \
            [p for i, p in enumerate(problems) if i not in failed]
    if progress is not None:
        progress.finish()
    return report


def op_check(cache, kek_text=None, kek_source=None, days=DEFAULT_CHECK_DAYS, catalog=None,
             now=None, out=None, progress_stream=None, quiet=False, as_json=False):
    """check: a summary and one line per problem on stdout (nothing when healthy
    and quiet); returns CHECK_HEALTHY or CHECK_PROBLEMS, raises with
    CHECK_UNABLE when it cannot check."""
    try:
        if days < 0:
            raise UsageError("--max-age-days must be 0 or more")
        now = resolve_now(now)
        entries = read_cache(cache).entries
        export = read_catalog_export(catalog) if catalog else None
        keys = {e.encryption_key for e in entries}
        keys.update(key for _, key in (export.entries if export is not None else ()))
        if kek_text is None:
            wrapped = sum(1 for key in keys if _looks_wrapped(key))
            if wrapped:
                raise UsageError("%d distinct keys look wrapped: give the KEK (--kek FILE or "
                                 "--kek-from CONFIG) to check that they unwrap" % wrapped)
    except BscryptoError as e:
        raise BscryptoError("check: could not check: %s" % e, CHECK_UNABLE)
    report = check_keys(entries, kek_text, now, days, export,
                        _Progress("check", len(keys), progress_stream), cache, catalog)
    lines = ["crypto cache %s: %d entries, %d wrapped, %d not wrapped, %s" % (
        cache, report["entries"], report["wrapped"], report["plain"],
        "unwrapped with %s" % kek_source if kek_text is not None else "no KEK given")]
    if report["next_expiry"] is not None:
        expires, name = report["next_expiry"]
        lines.append("next expiry %s (volume %s); window %d days"
                     % (_local_time(expires), name, days))
    if export is not None:
        lines.append("catalog export %s: %d volumes with a key, %d of them in the cache with "
                     "the same key; %d without a key" % (
                         catalog, report["catalog"], report["catalog_same"],
                         report["catalog_skipped"]))
    problems = report["problems"]
    verdict = ("%d problem%s" % (len(problems), "" if len(problems) == 1 else "s")
               if problems else "healthy")
    audit("check: crypto cache %s: %d entries: %s" % (cache, report["entries"], verdict),
          error=bool(problems))
    out = out or sys.stdout
    code = CHECK_PROBLEMS if problems else CHECK_HEALTHY
    if as_json:
        expiry = report["next_expiry"]
        _json_dump({"cache": cache, "kek": kek_source if kek_text is not None else None,
                    "entries": report["entries"], "wrapped": report["wrapped"],
                    "not_wrapped": report["plain"], "window_days": days, "now": now,
                    "next_expiry": expiry and {"time": expiry[0], "volume": expiry[1]},
                    "catalog": catalog and {"export": catalog, "volumes": report["catalog"],
                                            "same_key": report["catalog_same"],
                                            "without_key": report["catalog_skipped"]},
                    "problems": problems, "healthy": not problems, "exit_code": code}, out)
        return code
    if quiet and not problems:
        return code
    out.write("".join("check: %s\n" % line for line in lines))
    out.write("".join("problem: %s\n" % line for line in problems))
    out.write("check: %s\n" % verdict)
    out.flush()
    return code


# -- backup-cache: verified, timestamped copies, pruned --


def _backup_names(names, base):
    """{name: sort key} of this cache's backups among names."""
    import re
    pattern = re.compile(re.escape(base) + r"\.(\d{8}T\d{6}Z)(?:\.(\d+))?"
                         + re.escape(_BACKUP_SUFFIX) + r"\Z")
    found = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found[name] = (m.group(1), int(m.group(2) or 0))
    return found


def op_backup_cache(path, directory, keep=DEFAULT_BACKUP_KEEP, out=None, as_json=False):
    """backup-cache: copy a readable cache to DIR/NAME.<UTC time>.bak (0600,
    atomic), read it back and compare, then keep only the newest `keep`."""
    if keep < 1:
        raise UsageError("--keep must be 1 or more (the new copy is one of them)")
    check_path(directory, "backup directory")
    try:
        dir_fd = open_directory(resolve_path(directory))
    except OSError as e:
        error = UsageError if e.errno in (errno.ENOENT, errno.ENOTDIR) else CacheError
        raise error("backup directory %s: %s; nothing copied" % (directory, e.strerror or e))
    try:
        data = _read_cache_bytes(path)
        # Refuse a cache that does not parse: pruning must never replace good copies by bad.
        count = len(parse_cache(data, path)[0].entries)
        base = os.path.basename(os.path.realpath(path))
        return _backup_into(path, directory, dir_fd, base, data, count, keep, out, as_json)
    finally:
        os.close(dir_fd)


def _backup_into(path, directory, dir_fd, base, data, count, keep, out, as_json=False):
    try:
        _remove_stale_temps(dir_fd, base)
        name = write_backup(dir_fd, base, data)
    except OSError as e:
        raise CacheError("cannot write a copy of %s in %s: %s; older copies kept"
                         % (path, directory, e.strerror or e))
    target = os.path.join(directory, name)
    try:
        copied = read_regular_file(name, dir_fd=dir_fd, follow=False)[0]
    except OSError as e:
        copied = e
    if copied != data:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        raise CacheError("backup of %s: the copy %s does not read back the same (%s); removed "
                         "it, older copies kept: check the disk" % (
                             path, target, copied.strerror if isinstance(copied, OSError)
                             else "%d bytes differ from %d" % (len(copied), len(data))))
    # The new copy is never pruned; copies dated in the future (a clock that
    # was ahead) are kept but not counted, so they cannot pin the rotation.
    stamp = backup_stamp(time.time() + 60)
    older, future = [], []
    try:
        for old, key in _backup_names(os.listdir(dir_fd), base).items():
            st = _lstat_at(old, dir_fd)
            if old != name and st is not None and stat.S_ISREG(st.st_mode):
                (future if key[0] > stamp else older).append((key, old))
    except OSError as e:
        warn("could not list %s to remove older copies: %s" % (directory, e.strerror or e))
        older, future = [], []
    if future:
        warn("%d cop%s of %s in %s dated in the future (clock skew?): kept, not counted in "
             "--keep; remove them by hand once checked: %s" % (
                 len(future), "y" if len(future) == 1 else "ies", base, directory,
                 ", ".join(sorted(n for _, n in future))))
    pruned = []
    for _, old in sorted(older)[:max(0, len(older) - (keep - 1))]:
        try:
            os.unlink(old, dir_fd=dir_fd)
            pruned.append(old)
        except OSError as e:
            warn("could not remove old backup %s: %s" % (old, e.strerror or e))
    done = "the copy %s was written and verified" % target
    if as_json:
        report_output(out or sys.stdout, _json_text({
            "cache": path, "copy": target, "entries": count, "bytes": len(data),
            "verified": True, "pruned": pruned, "keep": keep}), done)
        return EXIT_OK
    report_output(out or sys.stdout, "backup-cache: %s -> %s (%d entries, %d bytes, mode 0600, "
                  "read back and verified); %d older cop%s removed, keeping %d\n"
                  % (path, target, count, len(data), len(pruned),
                     "y" if len(pruned) == 1 else "ies", keep), done)
    return EXIT_OK


# -- prepare-sd: the storage daemon ready for restores that span volumes --
#
# bextract/bls with the scsicrypto-sd plugin load each volume's key from
# <Working Directory>/bareos-sd.<SD Port>.cryptoc on every mount.  prepare-sd
# checks what that needs in the bareos-sd configuration and puts the keys
# there (populate-cache's rules, lock and atomic write).

SD_DEFAULT_WORKING_DIRECTORY = "/var/lib/bareos"     # Bareos's compiled-in defaults
SD_DEFAULT_PORT = 9103
SD_PLUGIN = "scsicrypto"
SD_PLUGIN_FILE = "scsicrypto-sd.so"
SD_PLUGIN_DIRECTORIES = ("/usr/lib/bareos/plugins", "/usr/lib64/bareos/plugins")
_CONFIG_TRUE = ("yes", "true")


def sd_config_files(path):
    """config_files(path) without the director's: bareos-sd.conf or its .d tree."""
    director = (os.path.join(path, "bareos-dir.conf"), os.path.join(path, "bareos-dir.d", ""))
    files = [f for f in config_files(path) if f != director[0] and not f.startswith(director[1])]
    if not files:
        raise KeyFileError("no bareos-sd configuration in %s" % path)
    return files


def _config_for_tools(path):
    """What bextract/bls take as -c: a file, or the directory above bareos-sd.d."""
    path = path.rstrip(os.sep) or os.sep
    parent = os.path.dirname(path)
    if os.path.basename(path) == "bareos-sd.d":
        return parent or "."
    if os.path.basename(parent) == "bareos-sd.d":
        return os.path.dirname(parent) or "."
    return path


def _directive(resource, keyword):
    """([values], line) of a directive, or None."""
    return resource.directives.get(keyword)


def _directive_value(resource, keyword):
    """The first value of a directive, or None."""
    found = resource.directives.get(keyword)
    return found[0][0] if found else None


def _where(resource):
    return "%s %s in %s (resource at line %d)" % (
        resource.type.capitalize(), '"%s"' % resource.name if resource.name else "(no Name)",
        resource.path, resource.line)


def _is_tape_device(resource):
    kind = _directive(resource, "devicetype")
    if kind is not None:
        return kind[0][0].lower() == "tape"
    archive = _directive(resource, "archivedevice")
    return archive is not None and archive[0][0].startswith("/dev/")


def _storage_requirements(storage, report):
    """Plugin Directory with the plugin in it, and Plugin Names (when set)."""
    found = _directive(storage, "plugindirectory")
    if found is None:
        guess = next((d for d in SD_PLUGIN_DIRECTORIES
                      if os.path.exists(os.path.join(d, SD_PLUGIN_FILE))),
                     SD_PLUGIN_DIRECTORIES[0])
        report("missing", "Plugin Directory is not set: add the line `Plugin Directory = %s` "
               "to %s" % (guess, _where(storage)))
    else:
        directory = found[0][0]
        report("met", "Plugin Directory = %s (%s line %d)" % (directory, storage.path, found[1]))
        if os.path.exists(os.path.join(directory, SD_PLUGIN_FILE)):
            report("met", "%s is in %s" % (SD_PLUGIN_FILE, directory))
        else:
            report("missing", "%s is not in %s: install Bareos's tape storage package "
                   "(bareos-storage-tape) or copy the plugin there" % (SD_PLUGIN_FILE, directory))
    names = _directive(storage, "pluginnames")
    if names is not None:
        listed = [n for value in names[0] for n in value.split(":") if n]
        if SD_PLUGIN in listed:
            report("met", "Plugin Names includes %s (%s line %d)"
                   % (SD_PLUGIN, storage.path, names[1]))
        else:
            report("missing", "Plugin Names does not include %s: change line %d of %s to "
                   "`Plugin Names = \"%s\"`" % (SD_PLUGIN, names[1], storage.path,
                                                 ":".join(listed + [SD_PLUGIN])))


def _device_requirements(devices, config, report):
    tapes = [d for d in devices if _is_tape_device(d)]
    if not tapes:
        report("missing", "no tape Device resource (Device Type = tape) in %s" % config)
    for device in tapes:
        for keyword, line, state in (("drivecryptoenabled", "Drive Crypto Enabled = yes",
                                      "missing"),
                                     ("querycryptostatus", "Query Crypto Status = yes",
                                      "recommended")):
            found = _directive(device, keyword)
            if found is not None and found[0][0].lower() in _CONFIG_TRUE:
                report("met", "Device %s: %s (%s line %d)" % (device.name, line, device.path,
                                                              found[1]))
            else:
                report(state, "add the line `%s` to %s" % (line, _where(device)))
    return tapes


def _unwrapping(keys, kek_text):
    """How many of the distinct wrapped keys unwrap with kek_text."""
    kek = kek_from_text(kek_text)
    good = 0
    for raw in keys:
        try:
            aes_key_unwrap(kek, raw)
            good += 1
        except UnwrapError:
            pass
    return good


def _director_requirements(directors, keys, report):
    """The Director whose KEK unwraps the keys (its name, for -D), or None."""
    wrapped = set()
    for _, key in keys or ():
        try:
            is_wrapped, raw = key_form(key)
        except ValueError:
            continue
        if is_wrapped:
            wrapped.add(raw)
    with_kek = [d for d in directors if _director_kek(d)]
    if keys is not None and not wrapped:
        report("met", "the keys are not wrapped: no Key Encryption Key is needed")
        return None
    if not with_kek:
        where = _where(directors[0]) if directors else "a Director resource (none found)"
        report("missing" if wrapped else "note",
               "no Director resource has a Key Encryption Key%s: add the line `Key Encryption "
               "Key = \"<the director's KEK>\"` to %s" % (
                   " and the keys are wrapped" if wrapped else " (needed for wrapped keys)",
                   where))
        return None
    if not wrapped:
        report("met", "Director %s has a Key Encryption Key (%s line %d)" % (
            with_kek[0].name, with_kek[0].path, with_kek[0].directives["keyencryptionkey"][1]))
        return with_kek[0].name
    best, best_count = with_kek[0], -1
    for d in with_kek:
        count = _unwrapping(wrapped, d.directives["keyencryptionkey"][0][0].encode("latin-1"))
        if count > best_count:
            best, best_count = d, count
    line = best.directives["keyencryptionkey"][1]
    if best_count == len(wrapped):
        report("met", "all %d wrapped keys unwrap with the Key Encryption Key of Director %s "
               "(%s line %d)" % (len(wrapped), best.name, best.path, line))
    else:
        report("missing", "only %d of %d wrapped keys unwrap with the Key Encryption Key of "
               "Director %s (%s line %d): set it to the KEK of the director that wrote the "
               "tapes" % (best_count, len(wrapped), best.name, best.path, line))
    return best.name


def _install_keys(path, cache=None, catalog=None, now=None, out=None):
    """Merge the keys into the SD's cache with Bareos's rules, under the lock,
    atomically; a new cache gets the working directory's owner (the storage
    daemon runs as that user), set on the new file before it is renamed."""
    if catalog is not None:
        op_populate_from_catalog(path, catalog, now, out=out, new_owner_of_directory=True)
        return
    source = read_cache(cache)
    stats, write = update_cache(path, [(e.volume_name, e.encryption_key) for e in source.entries],
                                resolve_now(now), new_owner_of_directory=True)
    report_output(out or sys.stdout, "%s: from crypto cache %s: %d read, %d added, %d updated, "
                  "%d unchanged; %d expired removed; %s\n" % (
                      path, cache, len(source.entries), stats["added"], stats["updated"],
                      stats["unchanged"], stats["expired_removed"],
                      "written" if write else "nothing changed, not written"),
                  "%s was %s" % (path, "written" if write else "not changed"))


def op_prepare_sd(config, cache=None, catalog=None, check=False, now=None, out=None):
    """prepare-sd: report what the scsicrypto-sd plugin needs in a bareos-sd
    configuration (met / missing, with the line to add and where) and, without
    check, install the keys in the SD's crypto cache; print the bextract and
    bls command lines.  EXIT_SD_NOT_READY when something is missing."""
    if cache and catalog:
        raise UsageError("prepare-sd takes the keys from --cache or from --catalog, not both")
    if not check and not (cache or catalog):
        raise UsageError("prepare-sd installs the keys of --cache CACHE or --catalog EXPORT; "
                         "give one, or --check to only check the configuration")
    out = out or sys.stdout
    resources = []
    files = sd_config_files(config)
    for name in files:
        found, includes = parse_config_resources(_read_config_text(name), name)
        resources.extend(found)
        for inc in includes:
            warn("%s line %d: @%s is not followed; check the included file too" % inc)
    lines = ["prepare-sd: bareos-sd configuration %s (%d file%s)" % (
        config, len(files), "" if len(files) == 1 else "s")]
    missing = []

    def report(state, text):
        lines.append("%-12s %s" % (state + ":", text))
        if state == "missing":
            missing.append(text)

    keys = None
    if cache:
        keys = [(e.volume_name, e.encryption_key) for e in read_cache(cache).entries]
    elif catalog:
        keys = read_catalog_export(catalog).entries
    storages = [r for r in resources if r.type == "storage"]
    working, port = SD_DEFAULT_WORKING_DIRECTORY, SD_DEFAULT_PORT
    if not storages:
        report("missing", "no Storage resource in %s: is this a bareos-sd configuration?"
               % config)
    else:
        storage = storages[0]
        working = (_directive(storage, "workingdirectory") or ([working], 0))[0][0]
        port_text = (_directive(storage, "sdport") or ([str(port)], 0))[0][0]
        try:
            port = int(port_text)
        except ValueError:
            raise KeyFileError("%s: SD Port %r is not a number" % (storage.path, port_text))
        _storage_requirements(storage, report)
    tapes = _device_requirements([r for r in resources if r.type == "device"], config, report)
    director = _director_requirements([r for r in resources if r.type == "director"], keys,
                                      report)
    target = os.path.join(working, "bareos-sd.%d.cryptoc" % port)
    if not os.path.isdir(working):
        report("missing", "Working Directory %s does not exist: create it, owned by the user "
               "bareos-sd runs as" % working)
    lines.append("%-12s %s (Working Directory %s, SD Port %d)" % ("cache:", target, working,
                                                                   port))
    out.write("\n".join(lines) + "\n")
    out.flush()
    if not check and os.path.isdir(working):
        _install_keys(target, cache, catalog, now, out)
    tool_args = "%s-c %s" % ("-D %s " % _quoted_arg(director) if director else "",
                             _quoted_arg(_config_for_tools(config)))
    device = _quoted_arg(tapes[0].name if tapes else "DEVICE")
    out.write("list the jobs on a volume:  bls %s -j -V VOLUME %s\n"
              "restore (the job's volumes in order, from `bls -j` or the catalog):\n"
              "  bextract %s -V 'VOLUME1|VOLUME2' %s /tmp/restore\n"
              % (tool_args, device, tool_args, device))
    out.flush()
    if missing:
        raise BscryptoError("prepare-sd: %d requirement%s missing (the 'missing:' lines above)"
                            % (len(missing), "" if len(missing) == 1 else "s"),
                            EXIT_SD_NOT_READY)
    return EXIT_OK


def _quoted_arg(text):
    """text as one shell word."""
    import shlex
    return shlex.quote(text)


# ---------------------------------------------------------------------------
# Disaster-recovery kit
# ---------------------------------------------------------------------------
#
# `dr-kit` runs as the catalog backup job's RunAfterJob and writes one
# directory with all a bare host needs to restore the catalog from encrypted
# tapes: this tool, the crypto cache, the catalog key export, the job's
# bootstrap files, the bareos-sd configuration (Key Encryption Key removed),
# RECOVERY.txt and a MANIFEST.  It proves the kit before it finishes;
# `check --kit` proves it again, offline, on the day it is needed.

KIT_PREFIX = "dr-kit-"
KIT_INCOMPLETE = "-INCOMPLETE"
KIT_FACTS = "kit.json"             # what `check --kit` reads back
KIT_MANIFEST = "MANIFEST"
KIT_RECOVERY = "RECOVERY.txt"
KIT_TOOL = "bscrypto.py"
KIT_TAR = "kit.tar"
KIT_KEK = "kek.key"                # only with --include-kek
KIT_FORMAT = 1
KEK_PLACEHOLDER = "KEK-NOT-IN-THIS-KIT-see-RECOVERY.txt"
KIT_SELFTEST_TIMEOUT = 300
# How the kit names its KEK without holding it: 128 bits of key, so the hash
# cannot be searched back to the key.
KEK_FINGERPRINT_METHOD = "SHA-256 of the 16-byte AES-128 key Bareos takes from the KEK"

# -- bootstrap (BSR) files --
#
# Bareos's lib/parse_bsr.cc: one `Keyword=value` per line, keywords without
# regard to case, `#` comments; Bareos's lexer, so scan_config() reads it.
# `Volume=` opens a new section once the current one has a volume, and may
# name several volumes separated by `|`; MediaType and Device apply to the
# volumes of their section.  Numbers are N or N-M, lists joined by commas.

BSR_KEYWORDS = ("volume", "mediatype", "client", "job", "jobid", "count", "fileindex",
                "jobtype", "joblevel", "volsessionid", "volsessiontime", "include",
                "exclude", "volfile", "volblock", "voladdr", "stream", "slot", "device",
                "fileregex", "storage")
_BSR_NUMBER_LISTS = ("jobid", "fileindex", "volsessionid", "volsessiontime", "volfile",
                     "volblock", "voladdr", "stream", "slot")
_BSR_NAME_LISTS = ("client", "job")
_BSR_FIELDS = "volumes media_type device storage values line"


def parse_bsr(text, path="bootstrap"):
    """Bareos bootstrap text as [BsrSection(volumes, media_type, device,
    storage, values {keyword: [value text]}, line)]; ValueError naming the
    line for anything Bareos would refuse, or a file that names no volume."""
    import re
    number = re.compile(r"\d+(-\d+)?\Z")
    BsrSection = _record("BsrSection", _BSR_FIELDS)
    try:
        tokens = scan_config(text, path)
    except BscryptoError as e:
        raise ValueError(str(e))
    sections = [{"volumes": [], "values": {}, "line": 1}]
    statement = []
    for token in tokens + [("eol", None, 0)]:
        if token[0] != "eol":
            statement.append(token)
            continue
        if not statement:
            continue
        where = "%s line %d" % (path, statement[0][2])
        if len(statement) < 3 or statement[0][0] != "word" or statement[1][0] != "=":
            raise ValueError("%s: expected Keyword=value" % where)
        keyword = statement[0][1].lower()
        values, commas = statement[2::2], statement[3::2]
        if keyword not in BSR_KEYWORDS:
            raise ValueError("%s: unknown keyword %r" % (where, statement[0][1]))
        if (any(kind not in _CONFIG_WORDS for kind, _, _ in values)
                or any(kind != "," for kind, _, _ in commas) or len(statement) % 2 == 0
                or (len(values) > 1 and keyword not in _BSR_NUMBER_LISTS + _BSR_NAME_LISTS)):
            raise ValueError("%s: malformed value for %s" % (where, statement[0][1]))
        texts = [value for _, value, _ in values]
        if keyword in _BSR_NUMBER_LISTS + ("count",):
            bad = [t for t in texts if not number.match(t) or (keyword == "count" and "-" in t)]
            if bad:
                raise ValueError("%s: %s=%s is not a number%s" % (
                    where, statement[0][1], bad[0], "" if keyword == "count" else " or range"))
        section = sections[-1]
        if keyword == "volume":
            names = texts[0].split("|")
            if not all(names):
                raise ValueError("%s: empty volume name in Volume=%s" % (where, texts[0]))
            if section["volumes"]:
                section = {"volumes": [], "values": {}, "line": statement[0][2]}
                sections.append(section)
            section["volumes"].extend(names)
        elif keyword in ("mediatype", "device") and not section["volumes"]:
            raise ValueError("%s: %s before any Volume=" % (where, statement[0][1]))
        section["values"].setdefault(keyword, []).extend(texts)
        del statement[:]
    found = [s for s in sections if s["volumes"]]
    if not found:
        raise ValueError("%s names no volume (no Volume= line)" % path)
    return [BsrSection(tuple(s["volumes"]), s["values"].get("mediatype", [None])[-1],
                       s["values"].get("device", [None])[-1],
                       s["values"].get("storage", [None])[-1], s["values"], s["line"])
            for s in found]


def read_bsr(path):
    """parse_bsr() of a file; ValueError saying why it cannot be read."""
    try:
        data = read_regular_file(path)[0]
    except (OSError, IOError) as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror or e))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("%s is not UTF-8 text: not a Bareos bootstrap file" % path)
    return parse_bsr(text, path)


def bsr_volumes(sections):
    """[(volume, media type)] in the order the restore reads them, each once."""
    media = {}
    for s in sections:
        for name in s.volumes:
            if media.get(name) is None:
                media[name] = s.media_type
    return [(name, media[name]) for name in _unique(n for s in sections for n in s.volumes)]


def _unique(items):
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


# -- the bareos-sd configuration, without its KEK --


def redact_config_keks(text, path="config"):
    """(text with each `Key Encryption Key` value replaced by KEK_PLACEHOLDER,
    number replaced); the rest of the text, line numbers included, is kept."""
    spans = []
    tokens = scan_config(text, path, spans)
    pieces = []
    last = count = 0
    statement = []
    for index, token in enumerate(tokens + [("eol", None, 0)]):
        if token[0] not in ("eol", "{", "}"):
            statement.append(index)
            continue
        found = _config_statement([tokens[j] for j in statement])
        if found and found[0] == "keyencryptionkey":
            start, end = spans[statement[2]]
            pieces += [text[last:start], '"%s"' % KEK_PLACEHOLDER,
                       "\n" * text.count("\n", start, end)]
            last = end
            count += 1
        statement = []
    pieces.append(text[last:])
    return "".join(pieces), count


def sd_config_path(path):
    """The bareos-sd configuration in a config root (/etc/bareos): its
    bareos-sd.conf or bareos-sd.d; any other file or directory as it is."""
    if os.path.isdir(path):
        for name in ("bareos-sd.conf", "bareos-sd.d"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            if any(os.path.exists(os.path.join(path, name))
                   for name in ("bareos-dir.conf", "bareos-dir.d")):
                raise KeyFileError("no bareos-sd configuration (bareos-sd.conf or bareos-sd.d) "
                                   "in %s" % path)
    return path


def kek_fingerprint(kek_text):
    """A KEK's name that does not reveal it: see KEK_FINGERPRINT_METHOD."""
    import hashlib
    return "sha256:" + hashlib.sha256(kek_from_text(kek_text)).hexdigest()


# -- proofs shared by dr-kit and check --kit --


def _key_passphrase(key, kek):
    """(passphrase, None) of a catalog key, or (None, why not)."""
    try:
        wrapped, raw = key_form(key)
    except ValueError as e:
        return None, "is not a Bareos key: %s" % e
    if not wrapped:
        return raw, None
    if kek is None:
        return None, "is wrapped and no KEK was given to prove that it unwraps"
    try:
        return aes_key_unwrap(kek, raw), None
    except UnwrapError:
        return None, "does not unwrap with the KEK (wrong KEK or damaged key)"


def kit_key_problems(volumes, entries, export, kek_text, cache_name, export_name):
    """One line per problem of the keys a restore needs: every volume in
    `volumes` has a key in the cache (and the export), each key unwraps with
    the KEK, and cache and export agree on every volume they share."""
    kek = kek_from_text(kek_text) if kek_text is not None else None
    cached = {}
    for e in entries or ():
        cached.setdefault(e.volume_name, e.encryption_key)
    exported = dict(export.entries) if export is not None else None
    problems = []
    for name in volumes:
        if entries is not None and name not in cached:
            problems.append("volume %s: no key in the crypto cache %s" % (name, cache_name))
        if exported is not None and name not in exported:
            problems.append("volume %s: no key in the catalog export %s" % (name, export_name))
        for where, keys in (("cache", cached), ("catalog export", exported)):
            if keys and name in keys:
                why = _key_passphrase(keys[name], kek)[1]
                if why:
                    problems.append("volume %s: the %s key %s" % (name, where, why))
    for name in sorted(set(cached) & set(exported or ())):
        a, b = cached[name], exported[name]
        if a != b and (_key_passphrase(a, kek)[0] is None
                       or _key_passphrase(a, kek)[0] != _key_passphrase(b, kek)[0]):
            problems.append("volume %s: the crypto cache and the catalog export hold different "
                            "keys" % name)
    return problems


def _file_digest(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def format_manifest(files):
    """MANIFEST text: `SHA-256  size  name` per file, sorted by name."""
    return "".join("%s  %d  %s\n" % (_file_digest(data), len(data), name)
                   for name, data in sorted(files.items())).encode("utf-8")


def parse_manifest(text):
    """{name: (sha256 hex, size)} of MANIFEST text; ValueError on a bad line."""
    rows = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split(None, 2)
        if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
            raise ValueError("MANIFEST line %d is not `SHA-256  size  name`" % number)
        rows[parts[2]] = (parts[0].lower(), int(parts[1]))
    return rows


def _kit_files(kit):
    """Every file below the kit directory, as names relative to it."""
    names = []
    for root, _, files in os.walk(kit):
        names += [os.path.relpath(os.path.join(root, f), kit).replace(os.sep, "/") for f in files]
    return sorted(names)


def verify_manifest(kit, manifest):
    """Problems: a listed file missing or different, a file that is not listed."""
    problems = []
    for name, (digest, size) in sorted(manifest.items()):
        try:
            data = read_regular_file(os.path.join(kit, name))[0]
        except (OSError, IOError) as e:
            problems.append("%s: listed in the MANIFEST but cannot be read: %s"
                            % (name, e.strerror or e))
            continue
        if (len(data), _file_digest(data)) != (size, digest):
            problems.append("%s: differs from the MANIFEST (%d bytes, SHA-256 %s; listed %d "
                            "bytes, %s)" % (name, len(data), _file_digest(data)[:16], size,
                                            digest[:16]))
    for name in _kit_files(kit):
        if name not in manifest and name not in (KIT_MANIFEST, KIT_TAR):
            problems.append("%s: in the kit but not in the MANIFEST" % name)
    return problems


def verify_kit_tar(kit, manifest, name):
    """Problems of kit.tar: each member NAME/file holds the file the MANIFEST lists."""
    import tarfile
    problems = []
    try:
        with tarfile.open(os.path.join(kit, KIT_TAR)) as tar:
            found = {}
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(name + "/"):
                    found[member.name[len(name) + 1:]] = tar.extractfile(member).read()
    except (OSError, IOError, tarfile.TarError) as e:
        return ["%s: unreadable: %s" % (KIT_TAR, e)]
    for file_name, (digest, size) in sorted(manifest.items()):
        data = found.get(file_name)
        if data is None or (len(data), _file_digest(data)) != (size, digest):
            problems.append("%s: %s/%s is %s" % (KIT_TAR, name, file_name, "missing" if data
                                                  is None else "not the file the MANIFEST lists"))
    return problems


# -- writing a kit --


def running_tool():
    """(path, bytes) of the file this tool runs from; UsageError when there is none."""
    path = globals().get("__file__")
    if not path or not os.path.isfile(path):
        raise UsageError("dr-kit: this tool was not run from a file (python3 - < bscrypto.py?), "
                         "so it cannot copy itself into the kit: run "
                         "`python3 /path/to/bscrypto.py dr-kit ...`")
    return path, read_regular_file(path)[0]


class _KitFiles(object):
    """Files written into the kit's temporary directory, each 0600, fsynced."""

    def __init__(self, directory):
        self.directory = directory
        self.data = {}

    def unique(self, name):
        base, n = name, 0
        while name in self.data:
            n += 1
            name = "%s.%d" % (base, n)
        return name

    def relative(self, error):
        """An error's text with the kit's temporary directory left out of paths."""
        return str(error).replace(self.directory + os.sep, "")

    def write(self, name, data):
        path = self.directory
        for part in name.split("/")[:-1]:      # each level 0700 (makedirs: only the last)
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
        path = os.path.join(self.directory, name)
        replace_file_atomically(path, data, 0o600)
        self.data[name] = data
        return path


def _remove_dead_kit_temps(directory):
    """Temporary kits of runs that died (killed mid-write); the caller holds the lock."""
    import shutil
    for name in os.listdir(directory):
        if name.startswith("." + KIT_PREFIX) and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            debug(1, "removed %s left by a dr-kit run that died" % name)


def _kit_names(directory):
    """[(sort key, name, complete)] of this command's kits in directory, oldest first."""
    import re
    pattern = re.compile(re.escape(KIT_PREFIX) + r"(\d{8}T\d{6}Z)(?:\.(\d+))?("
                         + re.escape(KIT_INCOMPLETE) + r")?\Z")
    found = []
    for name in os.listdir(directory):
        m = pattern.match(name)
        path = os.path.join(directory, name)
        if (m and os.path.isdir(path) and not os.path.islink(path)
                and os.path.isfile(os.path.join(path, KIT_FACTS))):
            found.append(((m.group(1), int(m.group(2) or 0)), name, not m.group(3)))
    return sorted(found)


def _new_kit_name(directory, incomplete):
    """dr-kit-<UTC time>[.n][-INCOMPLETE], unused in directory (.n: a second kit that second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = KIT_PREFIX + stamp, 0
    while any(os.path.lexists(os.path.join(directory, name + x)) for x in ("", KIT_INCOMPLETE)):
        n += 1
        name = "%s%s.%d" % (KIT_PREFIX, stamp, n)
    return name + (KIT_INCOMPLETE if incomplete else "")


def prune_kits(directory, keep, new):
    """Remove this command's kits beyond the newest `keep`, never `new` and never
    the newest complete kit; the names removed."""
    import shutil
    kits = _kit_names(directory)
    complete = [name for _, name, ok in kits if ok]
    spare = {new} | set(complete[-1:]) | {name for _, name, _ in kits[-keep:]}
    pruned = []
    for _, name, _ in kits:
        if name not in spare:
            try:
                shutil.rmtree(os.path.join(directory, name))
                pruned.append(name)
            except OSError as e:
                warn("could not remove old kit %s: %s" % (name, e.strerror or e))
    return pruned


def format_recovery(facts):
    """RECOVERY.txt: this site's recovery, step by step, from the kit's facts."""
    kek = facts["kek"]
    director = facts["director"]
    volumes = facts["volumes"]
    lines = ["Bareos disaster-recovery kit %s" % facts["name"],
             "made %s on %s by bscrypto.py %s (dr-kit)" % (facts["created_utc"], facts["host"],
                                                           facts["tool_version"]), ""]
    if facts["problems"]:
        lines += ["*** INCOMPLETE: %d problem%s found when the kit was made; the steps below "
                  "may fail ***" % (len(facts["problems"]),
                                    "" if len(facts["problems"]) == 1 else "s")]
        lines += ["  problem: %s" % p for p in facts["problems"]] + [""]
    else:
        lines += ["Proved when made: every volume below has its key in the crypto cache%s%s."
                  % (" and the catalog export" if facts["catalog"] else "",
                     ", every key unwraps with the KEK" if kek["fingerprint"] else ""), ""]
    lines.append("Files (MANIFEST lists SHA-256 and size of each; without python: "
                 "awk '{print $1\"  \"$3}' MANIFEST | sha256sum -c):")
    described = [(KIT_TOOL, "this tool: needs only python3 (3.6 or newer)"),
                 (facts["cache"], "the storage daemon's crypto cache (volume keys)"),
                 (facts["catalog"], "the catalog's volume keys (catalog export)")]
    described += [(b, "bootstrap file of the catalog backup") for b in facts["bootstraps"]]
    described += [(c, "bareos-sd configuration%s" % ("" if kek["included"] else
                                                     ", Key Encryption Key removed"))
                  for c in facts["config"]]
    described += [(KIT_KEK if kek["included"] else None, "THE KEK: store this kit like it"),
                  (KIT_FACTS, "these facts for `bscrypto.py check --kit`")]
    described = [(name, text) for name, text in described if name]
    width = max(len(name) for name, _ in described)
    lines += ["  %-*s  %s" % (width, name, text) for name, text in described]
    lines += ["", "The catalog restore reads these volumes:"]
    lines += ["  %-20s media type %s" % (v["name"], v["media_type"] or "(not in the bootstrap)")
              for v in volumes] or ["  (none: no readable bootstrap file)"]
    lines += ["", "Director: %s (the Director resource with the Key Encryption Key in the "
              "bareos-sd configuration)" % (director or "none has a Key Encryption Key")]
    if kek["included"]:
        lines += ["KEK: IN THIS KIT (%s, and in the configuration copy): whoever holds this kit "
                  "can read every tape." % KIT_KEK]
        kek_option = "--kek %s" % KIT_KEK
    elif kek["fingerprint"]:
        lines += ["KEK: NOT in this kit.  It is the `Key Encryption Key` of Director %s (the "
                  "same value in bareos-dir and bareos-sd); copy it from where you keep it, "
                  "apart from this kit (password safe, sealed envelope), into /root/kek.key "
                  "(mode 0600)." % director,
                  "  its fingerprint: %s" % kek["fingerprint"],
                  "  (%s)" % KEK_FINGERPRINT_METHOD]
        kek_option = "--kek /root/kek.key"
    else:
        lines += ["KEK: none: the keys are not wrapped."]
        kek_option = ""
    placeholders = kek["placeholders"]
    restore = "/tmp/bareos-restore"
    steps = [
        ["Check the host and the kit (in this directory, as root):",
         "  python3 bscrypto.py selftest",
         "  python3 bscrypto.py check --kit . %s" % kek_option]]
    setup = ["Install the Bareos storage daemon and tools (bareos-storage, "
             "bareos-storage-tape, bareos-tools) and put this configuration in place:",
             "  mkdir -p /etc/bareos && cp -r config/. /etc/bareos/"]
    if placeholders:
        setup += ["then write the KEK over the placeholder \"%s\" in:" % KEK_PLACEHOLDER]
        setup += ["  /etc/bareos/%s" % p for p in placeholders]
    steps.append(setup)
    cache_option = "--cache %s" % facts["cache"] if facts["cache"] else ""
    steps.append(["Prepare the storage daemon with the volume keys:",
                  "  python3 bscrypto.py prepare-sd /etc/bareos %s" % cache_option])
    sources = " ".join(x for x in (cache_option, "--catalog %s" % facts["catalog"]
                                   if facts["catalog"] else "", kek_option) if x)
    for bsr in facts["bsr_volumes"]:
        device = _kit_device(facts["devices"], bsr["media_type"])
        load = ["Insert volume %s and load its key into the drive:" % bsr["volumes"][0]]
        load += ["  python3 bscrypto.py load %s %s" % (device, sources)]
        if len(bsr["volumes"]) > 1:
            load += ["(when bextract asks for the next volume, run load again with it)"]
        steps.append(load)
        steps.append(["Restore the catalog backup from %s:" % bsr["bootstrap"],
                      "  bextract -c /etc/bareos%s -V %s -b %s %s %s" % (
                          " -D %s" % _quoted_arg(director) if director else "",
                          _quoted_arg("|".join(bsr["volumes"])), _quoted_arg(bsr["bootstrap"]),
                          _quoted_arg(device), restore)])
    steps.append(["Clear the key and load the restored database dump (e.g. "
                  "%s/var/lib/bareos/bareos.sql into PostgreSQL), then start Bareos:" % restore,
                  "  python3 bscrypto.py clear-key %s" % _kit_device(facts["devices"], None)])
    lines += ["", "On a fresh host:"]
    for number, step in enumerate(steps, 1):
        lines += ["%2d. %s" % (number, step[0])] + ["    " + s for s in step[1:]]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _kit_device(devices, media_type):
    """The Archive Device of the configuration's Device for media_type (else the first)."""
    for d in devices:
        if d["archive_device"] and (media_type is None or d["media_type"] == media_type):
            return d["archive_device"]
    return "/dev/nst0"


def _kit_config(kit, config, include_kek, problems):
    """Copy the bareos-sd configuration (KEKs replaced unless include_kek);
    ([kit names], [Device facts], [placeholder places], [every config KEK])."""
    names, devices, places = [], [], []
    try:
        sd_path = sd_config_path(config)
        base = os.path.dirname(os.path.abspath(sd_path).rstrip(os.sep))
        keks = [k.kek for k in read_config_keks(sd_path)[0] if k.kek]
        files = config_files(sd_path)
    except BscryptoError as e:
        problems.append("configuration %s: %s" % (config, e))
        return names, devices, places, []
    for path in files:
        try:
            data = read_regular_file(path)[0]
        except (OSError, IOError) as e:
            problems.append("configuration %s: cannot read: %s" % (path, e.strerror or e))
            continue
        bom = b"\xef\xbb\xbf" if data.startswith(b"\xef\xbb\xbf") else b""
        text = data[len(bom):].decode("latin-1")
        name = "config/" + os.path.relpath(path, base).replace(os.sep, "/")
        if not include_kek:
            text = redact_config_keks(text, path)[0]
            places += ["%s line %d" % (name[len("config/"):], k.line)
                       for k in parse_config_keks(text, name)[0]]
        devices += [{"name": r.name, "archive_device": _directive_value(r, "archivedevice"),
                     "media_type": _directive_value(r, "mediatype")}
                    for r in parse_config_resources(text, path)[0] if r.type == "device"]
        kit.write(name, bom + text.encode("latin-1"))
        names.append(name)
    return names, devices, places, keks


def _kit_inputs(kit, cache, bsrs, catalog, problems):
    """Copy and read back the cache, the export and the bootstraps; their facts."""
    cache_name = entries = export_name = export = None
    try:
        data = _read_cache_bytes(cache)
        parse_cache(data, cache)        # a cache that does not read is not copied
        cache_name = os.path.basename(os.path.realpath(cache))
        entries = read_cache(kit.write(cache_name, data)).entries     # read back
    except BscryptoError as e:
        problems.append("crypto cache: %s" % kit.relative(e))
    if catalog:
        try:
            data = read_regular_file(catalog)[0]
            export_name = kit.unique("catalog/" + os.path.basename(catalog))
            export = read_catalog_export(kit.write(export_name, data))
            problems.extend("catalog export %s line %d: %s" % (catalog, n, why)
                            for n, why in export.bad)
        except (OSError, IOError) as e:
            problems.append("catalog export %s: cannot read: %s" % (catalog, e.strerror or e))
        except BscryptoError as e:
            problems.append("catalog export %s: %s" % (catalog, kit.relative(e)))
    bootstraps, bsr_volumes_facts = [], []
    for path in bsrs:
        try:
            data = read_regular_file(path)[0]
        except (OSError, IOError) as e:
            problems.append("bootstrap %s: cannot read: %s" % (path, e.strerror or e))
            continue
        name = kit.unique("bootstrap/" + os.path.basename(path))
        bootstraps.append(name)
        try:
            sections = read_bsr(kit.write(name, data))
        except ValueError as e:
            problems.append("bootstrap %s: unreadable: %s" % (path, kit.relative(e)))
            continue
        found = bsr_volumes(sections)
        bsr_volumes_facts.append({"bootstrap": name, "volumes": [v for v, _ in found],
                                  "media_type": found[0][1]})
    return cache_name, entries, export_name, export, bootstraps, bsr_volumes_facts


def _kit_kek(kek_text, kek_source, config, director, problems):
    """(KEK text or None, where from, director) for the kit's proofs: the one
    given, else the bareos-sd configuration's."""
    try:
        found = find_config_kek(sd_config_path(config), director, warn=None)
    except BscryptoError as e:
        if "no Key Encryption Key" not in str(e):
            problems.append("configuration %s: %s" % (config, e))
        found = None
    if found is not None and kek_text is not None and (
            kek_from_text(found.kek) != kek_from_text(kek_text)):
        problems.append("the KEK given (%s, %s) is not the Key Encryption Key of Director %s "
                        "in %s (%s)" % (kek_source, kek_fingerprint(kek_text), found.director,
                                        config, kek_fingerprint(found.kek)))
    if kek_text is None and found is not None:
        return found.kek, "the Key Encryption Key in %s" % config, found.director
    return kek_text, kek_source, found.director if found is not None else director


def op_dr_kit(outdir, cache, bsrs, config, catalog=None, kek_text=None, kek_source=None,
              director=None, keep=None, include_kek=False, tar=False, out=None):
    """dr-kit: write one verified disaster-recovery kit into outdir (see the
    section comment); EXIT_OK, or EXIT_KIT_INCOMPLETE with the kit written
    and named ...-INCOMPLETE."""
    import json
    import shutil
    import tempfile
    if keep is not None and keep < 1:
        raise UsageError("--keep must be 1 or more (the new kit is one of them)")
    if not os.path.isdir(outdir):
        raise UsageError("dr-kit: %s does not exist or is not a directory" % outdir)
    tool_path, tool = running_tool()
    out = out or sys.stdout
    # Runs take turns: the same flock on OUTDIR itself that cache writers use.
    with cache_lock(os.path.join(outdir, ".dr-kit")) as locked:
        _remove_dead_kit_temps(outdir)
        tmp = tempfile.mkdtemp(prefix="." + KIT_PREFIX, suffix=".tmp", dir=outdir)
        try:
            problems = []
            kit = _KitFiles(tmp)
            kit.write(KIT_TOOL, tool)
            cache_name, entries, export_name, export, bootstraps, by_bsr = _kit_inputs(
                kit, cache, bsrs, catalog, problems)
            kek_text, kek_source, director = _kit_kek(kek_text, kek_source, config, director,
                                                      problems)
            config_names, devices, places, config_keks = _kit_config(kit, config, include_kek,
                                                                     problems)
            volumes = _unique(v for b in by_bsr for v in b["volumes"])
            media = {}
            for b in by_bsr:
                for v in b["volumes"]:
                    media.setdefault(v, b["media_type"])
            problems += kit_key_problems(volumes, entries, export, kek_text, cache, catalog)
            if include_kek:
                if kek_text is None:
                    problems.append("--include-kek: no KEK to include (give --kek or --kek-from)")
                else:
                    kit.write(KIT_KEK, kek_text)
                    warn("dr-kit: the KEK is in the kit (%s and the configuration copy): store "
                         "the kit like the KEK itself" % KIT_KEK)
            else:
                secrets = [k for k in config_keks + [kek_text] if k]
                problems += ["%s: holds a Key Encryption Key; it was not removed" % name
                             for name, data in sorted(kit.data.items()) if name != KIT_TOOL
                             and any(k in data for k in secrets)]
            problems += verify_manifest(tmp, dict(
                (name, (_file_digest(data), len(data))) for name, data in kit.data.items()))
            problems = _unique(problems)      # one unreadable config is found by two readers
            name = _new_kit_name(outdir, bool(problems))
            facts = {
                "format": KIT_FORMAT, "name": name, "complete": not problems,
                "problems": problems, "created_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                   time.gmtime()),
                "host": os.uname()[1], "tool_version": __version__, "tool_source": tool_path,
                "cache": cache_name, "catalog": export_name, "bootstraps": bootstraps,
                "bsr_volumes": by_bsr, "config": config_names, "devices": devices,
                "volumes": [{"name": v, "media_type": media[v]} for v in volumes],
                "director": director,
                "kek": {"fingerprint": kek_fingerprint(kek_text) if kek_text else None,
                        "fingerprint_method": KEK_FINGERPRINT_METHOD, "source": kek_source,
                        "included": bool(include_kek and kek_text), "placeholders": places}}
            kit.write(KIT_FACTS, (json.dumps(facts, indent=2, sort_keys=True) + "\n").encode())
            kit.write(KIT_RECOVERY, format_recovery(facts))
            manifest = format_manifest(kit.data)
            kit.write(KIT_MANIFEST, manifest)
            listed = parse_manifest(manifest.decode("utf-8"))
            broken = verify_manifest(tmp, listed)
            if tar:
                _write_kit_tar(tmp, name, sorted(kit.data))
                broken += verify_kit_tar(tmp, listed, name)
            if broken:
                raise BscryptoError("dr-kit: the kit does not read back (%s); nothing kept: check "
                                    "the disk of %s" % ("; ".join(broken), outdir),
                                    EXIT_KIT_INCOMPLETE)
            os.rename(tmp, os.path.join(outdir, name))
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, IOError)):
                raise BscryptoError("dr-kit: cannot write the kit in %s: %s; nothing kept"
                                    % (outdir, e.strerror or e), EXIT_KIT_INCOMPLETE)
            raise
        _fsync_directory(locked.dir_fd)
        pruned = prune_kits(outdir, keep, name) if keep else []
    path = os.path.join(outdir, name)
    text = ["dr-kit: wrote %s (%d files, mode 0700/0600, MANIFEST read back%s)\n"
            % (path, len(kit.data), ", kit.tar" if tar else ""),
            "dr-kit: volumes for the catalog restore: %s\n" % (", ".join(
                "%s (%s)" % (v, media[v] or "media type unknown") for v in volumes) or "none")]
    if kek_text:
        text.append("dr-kit: KEK %s (%s), %s\n" % (
            "INCLUDED" if include_kek else "not in the kit", kek_fingerprint(kek_text),
            "keys checked with %s" % kek_source))
    if keep:
        text.append("dr-kit: %d older kit%s removed, keeping %d\n"
                    % (len(pruned), "" if len(pruned) == 1 else "s", keep))
    if problems:
        sys.stderr.write("".join("bscrypto: dr-kit: problem: %s\n" % p for p in problems))
        sys.stderr.write("bscrypto: dr-kit: %d problem%s: the kit is INCOMPLETE: %s\n"
                         % (len(problems), "" if len(problems) == 1 else "s", path))
    try:
        report_output(out, "".join(text), "the kit %s was written" % path)
    except OutputError as e:
        if not problems:
            raise
        warn(str(e))        # the incomplete kit is what the job must report
    return EXIT_KIT_INCOMPLETE if problems else EXIT_OK


def _write_kit_tar(directory, name, files):
    """kit.tar (stdlib tarfile): every file under NAME/, for off-site transfer."""
    import tarfile
    path = os.path.join(directory, KIT_TAR)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member in files:
                tar.add(os.path.join(directory, member), "%s/%s" % (name, member))
        f.flush()
        os.fsync(f.fileno())


# -- check --kit --


def op_check_kit(kit, kek_text=None, kek_source=None, out=None, quiet=False, as_json=False):
    """check --kit: verify a kit offline, as it will be used; CHECK_HEALTHY or
    CHECK_PROBLEMS, raises with CHECK_UNABLE when it cannot check.  quiet and
    as_json as for check."""
    import json
    import subprocess
    try:
        if not os.path.isdir(kit):
            raise UsageError("%s is not a directory" % kit)
        try:
            read = KIT_FACTS
            facts = json.loads(read_regular_file(os.path.join(kit, read))[0].decode("utf-8"))
            read = KIT_MANIFEST
            manifest = parse_manifest(read_regular_file(os.path.join(kit, read))[0]
                                      .decode("utf-8"))
        except (OSError, IOError) as e:
            raise UsageError("not a dr-kit: %s: %s" % (os.path.join(kit, read), e.strerror or e))
        except ValueError as e:
            raise UsageError("not a readable dr-kit: %s" % e)
        missing = [k for k in ("name", "complete", "problems", "cache", "catalog",
                               "bootstraps", "kek") if not isinstance(facts, dict) or k not in facts]
        if missing:
            raise UsageError("not a readable dr-kit: %s lacks %s" % (KIT_FACTS, ", ".join(missing)))
        if facts.get("format") != KIT_FORMAT:
            raise UsageError("kit format %r is not %d: check it with the bscrypto.py inside it"
                             % (facts.get("format"), KIT_FORMAT))
        kek = facts["kek"]
        if kek_text is None and kek["included"]:
            kek_text = read_key_file(os.path.join(kit, KIT_KEK), "the kit's KEK file", kek=True)
            kek_source = "the KEK in the kit"
    except BscryptoError as e:
        raise BscryptoError("check: could not check: %s" % e, CHECK_UNABLE)
    problems = verify_manifest(kit, manifest)
    if os.path.exists(os.path.join(kit, KIT_TAR)):
        problems += verify_kit_tar(kit, manifest, facts["name"])
    if not facts["complete"]:
        problems.append("the kit was made INCOMPLETE (%d problems, listed in %s)"
                        % (len(facts["problems"]), KIT_RECOVERY))
    entries = export = None
    if facts["cache"]:
        try:
            entries = read_cache(os.path.join(kit, facts["cache"])).entries
        except BscryptoError as e:
            problems.append("crypto cache: %s" % e)
    if facts["catalog"]:
        try:
            export = read_catalog_export(os.path.join(kit, facts["catalog"]))
        except BscryptoError as e:
            problems.append("catalog export: %s" % e)
    volumes = []
    for name in facts["bootstraps"]:
        try:
            volumes += [v for v, _ in bsr_volumes(read_bsr(os.path.join(kit, name)))]
        except ValueError as e:
            problems.append("bootstrap %s: unreadable: %s" % (name, e))
    volumes = _unique(volumes)
    if kek_text is not None and kek["fingerprint"] and (
            kek_fingerprint(kek_text) != kek["fingerprint"]):
        problems.append("KEK fingerprint mismatch: %s has %s, the kit was made with %s: not "
                        "this site's KEK" % (kek_source, kek_fingerprint(kek_text),
                                             kek["fingerprint"]))
    elif kek_text is None and kek["fingerprint"]:
        raise BscryptoError("check: could not check: the kit's keys are wrapped: give the KEK "
                            "(--kek FILE or --kek-from CONFIG) to check that they unwrap",
                            CHECK_UNABLE)
    problems += kit_key_problems(volumes, entries, export, kek_text, facts["cache"],
                                 facts["catalog"])
    try:
        # Run from the kit's own directory, as it will be on a fresh host.
        child = subprocess.Popen([sys.executable, "-I", KIT_TOOL, "selftest"], cwd=kit,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        report = child.communicate(timeout=KIT_SELFTEST_TIMEOUT)[0]
        if child.returncode != 0:
            last = report.decode("utf-8", "replace").strip().splitlines()[-1:]
            problems.append("%s selftest under %s exits %d%s" % (
                KIT_TOOL, sys.executable, child.returncode, "".join(": " + x for x in last)))
    except (OSError, subprocess.TimeoutExpired) as e:
        problems.append("%s selftest under %s could not run: %s" % (KIT_TOOL, sys.executable, e))
    out = out or sys.stdout
    lines = ["kit %s: %s, %d files in the MANIFEST" % (
        kit, facts["name"], len(manifest)),
        "volumes for the catalog restore: %s" % (", ".join(volumes) or "none"),
        "keys %s" % ("unwrapped with %s (%s)" % (kek_source, kek_fingerprint(kek_text))
                     if kek_text is not None else "not wrapped"),
        "%s selftest under %s" % (KIT_TOOL, sys.executable)]
    code = CHECK_PROBLEMS if problems else CHECK_HEALTHY
    if as_json:
        _json_dump({"kit": kit, "name": facts["name"], "files": len(manifest),
                    "volumes": volumes, "kek_source": kek_source,
                    "kek_fingerprint": kek_fingerprint(kek_text) if kek_text else None,
                    "problems": problems, "healthy": not problems, "exit_code": code}, out)
        return code
    if quiet and not problems:
        return code
    out.write("".join("check: %s\n" % line for line in lines))
    out.write("".join("problem: %s\n" % line for line in problems))
    out.write("check: %s\n" % ("%d problem%s" % (len(problems), "" if len(problems) == 1 else "s")
                               if problems else "healthy"))
    out.flush()
    return code


# ---------------------------------------------------------------------------
# Command line: the subcommands
# ---------------------------------------------------------------------------
#
# Each group adds its subcommands; _command_parser() builds them all.


AS_IS_HELP = ("use the file's text as the passphrase even when it is a wrapped key "
              "(54 base64 characters), as Bareos's -s/-k do")


# Subcommands: name -> (function adding its arguments, function running it, help).
def _add_key_commands(sub, common):
    p = sub.add_parser("generate", parents=[common], help="generate a new passphrase key file",
                       description="Generate a random 32-character passphrase (Bareos's "
                                   "alphabet, unbiased) into FILE, mode 0600; '-' prints it.")
    p.add_argument("file", help="key file to create, or '-' for stdout")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="wrap it with this KEK (base64 output)")
    p.add_argument("-b", "--base64", action="store_true", help="write base64 of the passphrase")
    p.add_argument("--force", action="store_true", help="replace a non-empty existing file")
    p.set_defaults(run=lambda ns: op_generate(ns.file, ns.kek, ns.base64, ns.force))

    p = sub.add_parser("show", parents=[common], help="print the passphrase in a key file",
                       description="Print the passphrase held in FILE ('-' reads stdin).")
    p.add_argument("file", help="key file, or '-' for stdin")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="unwrap with this KEK")
    add_kek_from_arguments(p)
    p.add_argument("-b", "--base64", action="store_true", help="the file holds base64")
    p.add_argument("--as-is", action="store_true", help=AS_IS_HELP)
    p.set_defaults(run=_run_show)

    p = sub.add_parser("selftest", parents=[common], help="run the built-in known-answer tests",
                       description="Run the known-answer tests built into this file: the "
                                   "first thing to run on an unknown rescue host.")
    p.set_defaults(run=lambda ns: op_selftest())


def _add_cache_commands(sub, common):
    """Crypto cache subcommands."""
    layouts = [layout.name for layout in CACHE_LAYOUTS]

    def cache_arg(p):
        p.add_argument("cache", nargs="?", default=DEFAULT_CACHE_PATH, metavar="CACHE",
                       help="crypto cache file (default %(default)s)")

    def writer_args(p):
        p.add_argument("--backup", action="store_true",
                       help="first keep a copy as CACHE.<UTC time>.bak")
        p.add_argument("--layout", choices=layouts,
                       help="write this layout (default: this host's, %s)"
                            % host_cache_layout().name)
        p.add_argument("--now", metavar="EPOCH", type=int, help=NOW_HELP)

    p = sub.add_parser("dump-cache", parents=[common], help="print the crypto cache (as -D)",
                       description="Print the cache as Bareos's bscrypto -D does (local "
                                   "time), or as JSON. Never changes the file.")
    cache_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--now", metavar="EPOCH", type=int, help="'now' for the JSON 'expired' flag")
    p.set_defaults(run=lambda ns: op_dump_cache(ns.cache, ns.json, ns.now))

    p = sub.add_parser("populate-cache", parents=[common],
                       help="add VolumeName<TAB>Key lines from stdin (as -p)",
                       description="Add VolumeName<TAB>EncryptionKey lines from stdin with Bareos's rules "
                                   "(nothing is written if a line is bad). Example: bscrypto.py "
                                   "populate-cache CACHE --from-catalog media.txt")
    cache_arg(p)
    writer_args(p)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="warn about bad input lines and apply the good ones")
    # recovery: --from-catalog reads a catalog export instead of stdin (op in recovery ops)
    p.add_argument("--from-catalog", metavar="EXPORT",
                   help="read the volumes and keys from a catalog export instead of stdin "
                        "(psql -A -t -F '|' output, or CSV with a VolumeName,EncryptionKey "
                        "header; '-' for stdin); prints the counts")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(run=lambda ns: op_populate_from_catalog(
        ns.cache, ns.from_catalog, ns.now, ns.layout, ns.backup, ns.skip_bad_lines,
        as_json=ns.json)
        if ns.from_catalog else op_populate_cache(ns.cache, ns.now, ns.layout, ns.backup,
                                                  ns.skip_bad_lines, summary=True,
                                                  as_json=ns.json))

    p = sub.add_parser("reset-cache", parents=[common],
                       help="set every entry's time to now (as -r)",
                       description="Set the time added of every entry to now, restarting "
                                   "its 60 days.")
    cache_arg(p)
    writer_args(p)
    p.set_defaults(run=lambda ns: op_reset_cache(ns.cache, ns.now, ns.layout, ns.backup))

    p = sub.add_parser("lookup", parents=[common], help="print the cached key of one volume",
                       description="Print the encryption key cached for VOLUME, as the "
                                   "director sent it. Exit %d if the volume is not cached."
                                   % EXIT_NOT_FOUND)
    p.add_argument("volume", metavar="VOLUME", help="volume name")
    cache_arg(p)
    p.set_defaults(run=lambda ns: op_lookup(ns.volume, ns.cache))

    p = sub.add_parser("export", parents=[common], help="print the cache as populate input",
                       description="Print VolumeName<TAB>EncryptionKey lines that "
                                   "populate-cache reads back to the same names and keys. "
                                   "The output holds keys: keep it private.")
    cache_arg(p)
    p.set_defaults(run=lambda ns: op_export_cache(ns.cache))


def _add_drive_commands(sub, common):
    """Drive subcommands."""
    drive = _parser_class()(add_help=False)
    drive.add_argument("--timeout", metavar="SECONDS", type=_timeout_arg,
                       default=DEFAULT_SCSI_TIMEOUT,
                       help="SCSI command timeout (default %d)" % DEFAULT_SCSI_TIMEOUT)
    parents = [common, drive]

    p = sub.add_parser(
        "set-key", parents=parents, help="load a key into a tape drive (as -s)",
        description="Load a Bareos key file's key into the drive as Bareos does (passphrase[:31] + NUL). "
                    "Example: bscrypto.py set-key /dev/nst0 vol.key -w kek.key")
    p.add_argument("device", nargs="?", help=DEVICE_HELP)
    p.add_argument("keyfile", nargs="?", help="Bareos key file ('-' reads stdin)")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="the key file is wrapped with this KEK")
    add_kek_from_arguments(p)
    p.add_argument("-b", "--base64", action="store_true", help="the key file holds base64")
    p.add_argument("--as-is", action="store_true", help=AS_IS_HELP)
    p.add_argument("--hex-key", metavar="FILE",
                   help="load a raw 256-bit key: 64 hex digits, optional description line "
                        "(stenc's key file) instead of a Bareos key file")
    p.add_argument("--algorithm-index", metavar="N", type=int,
                   help="use this algorithm index instead of the drive's AES-256-GCM")
    p.add_argument("--ckod", action="store_true", help="clear the key when the tape is unloaded")
    raw = p.add_mutually_exclusive_group()
    raw.add_argument("--allow-raw-read", dest="raw_read", action="store_const", const=True,
                     help="mark written blocks readable in raw (still encrypted) mode")
    raw.add_argument("--no-raw-read", dest="raw_read", action="store_const", const=False,
                     help="mark written blocks not readable in raw mode")
    p.add_argument("--decrypt-only", action="store_true",
                   help="read encrypted tapes but write unencrypted (encryption mode off)")
    p.add_argument("--key-desc", metavar="TEXT",
                   help="key descriptor (U-KAD) stored with each block, within the drive's "
                        "limit; never put secrets in it")
    add_syslog_argument(p)
    p.set_defaults(run=_run_set_key)

    p = sub.add_parser("clear-key", parents=parents, help="clear the drive key (as -c)",
                       description="Turn the drive's encryption and decryption off and "
                                   "replace its key with zeros (Bareos's clear page).")
    p.add_argument("device", nargs="?", help=DEVICE_HELP)
    p.add_argument("--algorithm-index", metavar="N", type=int,
                   help="algorithm index to send (default: the drive's AES-256-GCM, else 1)")
    add_syslog_argument(p)
    p.set_defaults(run=lambda ns: op_clear_key(ns.device, sys.stdout, ns.timeout,
                                               algorithm_index=ns.algorithm_index))

    p = sub.add_parser("drive-status", parents=parents,
                       help="show the drive's encryption status (as -e)",
                       description="Print the drive's data encryption status in Bareos's "
                                   "words; --detail adds the drive's identity, algorithms, "
                                   "key instance counter, key descriptor and next block.")
    p.add_argument("device", nargs="?", help=DEVICE_HELP)
    p.add_argument("--detail", action="store_true", help="more than Bareos prints")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=lambda ns: op_drive_status(ns.device, ns.detail, ns.json, ns.timeout))

    p = sub.add_parser("volume-status", parents=parents,
                       help="show the next block's encryption status (as -v)",
                       description="Print the encryption status of the block at the tape's "
                                   "current position, in Bareos's words.")
    p.add_argument("device", nargs="?", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=lambda ns: op_volume_status(ns.device, ns.json, ns.timeout,
                                                   readable=True))

    p = sub.add_parser(
        "verify", parents=parents, help="check that the drive's key decrypts the tape in it",
        description="Rewind, pass the label and its filemark(s), read the first data block's "
                    "encryption status (page 0021h, the block itself is not read) and rewind; "
                    "nothing is written or loaded. Use it after set-key, -s or the plugin. "
                    "Exit 0: verified, not encrypted, or nothing to verify (PRE_LABEL, no "
                    "data); exit %d: the drive cannot decrypt it with its key." % EXIT_WRONG_KEY)
    p.add_argument("device", nargs="?", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=lambda ns: op_verify(ns.device, ns.json, ns.timeout))


def _run_show(ns):
    kek_text, kek_source = kek_from_arguments(ns)
    return op_show_key(ns.file, None, ns.base64, prompt=sys.stdin.isatty(), kek_text=kek_text,
                       kek_source=kek_source,
                       wrapped=WRAPPED_ALLOW if ns.as_is else WRAPPED_REFUSE)


def _run_set_key(ns):
    if (ns.keyfile is None) == (ns.hex_key is None):
        raise UsageError("set-key needs a key file or --hex-key FILE (one of them)")
    if ns.hex_key is not None and (ns.kek or ns.kek_from or ns.base64 or ns.as_is):
        raise UsageError("--hex-key takes a raw key: -w, --kek-from, -b and --as-is do not apply")
    options = drive_key_options(algorithm_index=ns.algorithm_index, ckod=ns.ckod,
                                raw_read=ns.raw_read, decrypt_only=ns.decrypt_only,
                                key_desc=ns.key_desc)
    kek_text, kek_source = kek_from_arguments(ns)
    return op_set_key(ns.device, ns.keyfile, None, ns.base64, ns.hex_key, ns.timeout,
                      sys.stdout, options, prompt=sys.stdin.isatty(), kek_text=kek_text,
                      kek_source=kek_source,
                      wrapped=WRAPPED_ALLOW if ns.as_is else WRAPPED_REFUSE)


def _add_recovery_commands(sub, common):
    """Disaster-recovery subcommands."""
    p = sub.add_parser(
        "label", parents=[common], help="show the Bareos volume label of a tape or volume file",
        description="Print the Bareos volume label of a tape (rewound, one block read, never written) or a "
                    "volume file. Example: bscrypto.py label --name /dev/nst0")
    p.add_argument("source", metavar="DEVICE|FILE", help="tape device (/dev/nst0) or volume file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the label as JSON")
    fmt.add_argument("--name", action="store_true", help="print only the volume name")
    p.set_defaults(run=lambda ns: op_label(ns.source, ns.json, ns.name))

    p = sub.add_parser(
        "kek-from-config", parents=[common],
        help="copy the Key Encryption Key from a Bareos config into a key file",
        description="Copy the Key Encryption Key of a Bareos configuration into a 0600 key file. Example: "
                    "bscrypto.py kek-from-config /etc/bareos --out kek.key")
    p.add_argument("config", metavar="CONFIG", help="configuration file or directory")
    p.add_argument("--director", metavar="NAME",
                   help="the Director resource to use when several have a Key Encryption Key")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE", help="key file to create (mode 0600)")
    dest.add_argument("--print", action="store_true", dest="print_kek",
                      help="print the key on stdout instead")
    p.add_argument("--force", action="store_true", help="replace a non-empty existing --out file")
    p.add_argument("--json", action="store_true", help="print where the KEK was found as JSON")
    p.set_defaults(run=lambda ns: op_kek_from_config(ns.config, ns.director, ns.out,
                                                     ns.print_kek, ns.force, as_json=ns.json))

    p = sub.add_parser(
        "load", parents=[common],
        help="load the key of the tape in the drive: label, cache/catalog, KEK, drive",
        description="Load the key of the tape in the drive: label, cache and/or catalog, KEK, "
                    "drive, confirmed, then verified on the first data block (a wrong key is "
                    "cleared again, exit %d). Example: bscrypto.py load /dev/nst0 --cache CACHE "
                    "--kek-from /etc/bareos" % EXIT_WRONG_KEY)
    p.add_argument("device", metavar="DEVICE", nargs="?", help=DEVICE_HELP)
    p.add_argument("--cache", metavar="CACHE", help="crypto cache to look the volume up in")
    p.add_argument("--catalog", metavar="EXPORT",
                   help="catalog export (psql -A -t -F '|' or CSV) to look the volume up in; "
                        "with --cache too, its key wins when they differ")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="unwrap the key with this KEK file")
    add_kek_from_arguments(p)
    p.add_argument("--volume", metavar="NAME", help="the volume's name: skip reading the label")
    p.add_argument("--algorithm-index", metavar="N", type=int,
                   help="use this algorithm index instead of the drive's AES-256-GCM")
    p.add_argument("--timeout", metavar="SECONDS", type=_timeout_arg,
                   default=DEFAULT_SCSI_TIMEOUT,
                   help="SCSI command timeout (default %d)" % DEFAULT_SCSI_TIMEOUT)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check on the tape's first data block that the key decrypts it")
    add_syslog_argument(p)
    p.set_defaults(run=lambda ns: op_load_volume(
        ns.device, ns.cache, ns.catalog, *(kek_from_arguments(ns) + (
            ns.volume, ns.json, ns.timeout, ns.algorithm_index)), verify=ns.verify))

    p = sub.add_parser(
        "rewrap", parents=[common], help="re-wrap every key with a new KEK (KEK rotation)",
        description="Re-wrap every key with a new KEK, all verified before anything is written. Example: "
                    "bscrypto.py rewrap --old-kek old.key --new-kek new.key --cache CACHE")
    for which in ("old", "new"):
        p.add_argument("--%s-kek" % which, metavar="KEKFILE", help="the %s KEK file" % which)
        p.add_argument("--%s-kek-from" % which, metavar="CONFIG",
                       help="read the %s KEK from a Bareos config file or directory" % which)
        p.add_argument("--%s-director" % which, metavar="NAME",
                       help="with --%s-kek-from: the Director resource to use" % which)
    p.add_argument("--cache", metavar="CACHE", help="crypto cache to re-wrap in place")
    p.add_argument("--catalog", metavar="EXPORT", help="catalog export whose keys to re-wrap")
    p.add_argument("--sql-out", metavar="FILE",
                   help="write UPDATE Media statements for the catalog here (mode 0600)")
    p.add_argument("--backup", action="store_true",
                   help="first keep a copy of the cache as CACHE.<UTC time>.bak")
    p.add_argument("--force", action="store_true", help="replace a non-empty --sql-out file")
    p.add_argument("--wrap-unwrapped", action="store_true",
                   help="wrap keys that are not wrapped (43 characters) with the new KEK")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_syslog_argument(p)
    p.set_defaults(run=_run_rewrap)

    p = sub.add_parser(
        "check", parents=[common], help="prove DR readiness of a crypto cache (for cron)",
        description="Prove that every cached key unwraps and none expires soon; exit 0 healthy, 1 "
                    "problems, 2 could not check. With --kit DIR: verify a dr-kit offline "
                    "instead. Example: bscrypto.py check --quiet --cache CACHE "
                    "--kek-from /etc/bareos")
    p.add_argument("--cache", metavar="CACHE", help="crypto cache to check")
    p.add_argument("--kit", metavar="DIR", help="a kit made by dr-kit to verify (no --cache)")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="KEK file the keys are wrapped with")
    add_kek_from_arguments(p)
    p.add_argument("--max-age-days", metavar="N", type=int, default=DEFAULT_CHECK_DAYS,
                   help="report entries that expire within N days (default %d)"
                        % DEFAULT_CHECK_DAYS)
    p.add_argument("--catalog", metavar="EXPORT",
                   help="catalog export whose volumes must all be cached with the same key")
    p.add_argument("--now", metavar="EPOCH", type=int, help=NOW_HELP)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing when healthy (for cron: mail only problems)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_syslog_argument(p)
    p.usage_exit = CHECK_UNABLE  # cron: bad arguments are "could not check", not "problems"
    p.set_defaults(run=_run_check)

    p = sub.add_parser(
        "backup-cache", parents=[common], help="verified, timestamped copy of a crypto cache",
        description="Copy a readable crypto cache to DIR (timestamped, verified) and prune older copies. "
                    "Example: bscrypto.py backup-cache CACHE /srv/backup --keep 14")
    p.add_argument("cache", metavar="CACHE", help="crypto cache file")
    p.add_argument("directory", metavar="DIR", help="directory for the copies")
    p.add_argument("--keep", metavar="N", type=int, default=DEFAULT_BACKUP_KEEP,
                   help="copies of this cache to keep, the new one included (default %d)"
                        % DEFAULT_BACKUP_KEEP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=lambda ns: op_backup_cache(ns.cache, ns.directory, ns.keep,
                                                  as_json=ns.json))
def _add_prepare_sd_command(sub, common):
    p = sub.add_parser(
        "prepare-sd", parents=[common],
        help="make bareos-sd ready for restores that span volumes (scsicrypto-sd plugin)",
        description="Check a bareos-sd configuration (file, bareos-sd.d tree or /etc/bareos) "
                    "for what the scsicrypto-sd plugin needs to load each volume's key in "
                    "bextract/bls: Plugin Directory holding %s, Plugin Names with %s, "
                    "'Drive Crypto Enabled = yes' in each tape Device, a Director with a Key "
                    "Encryption Key that unwraps the keys. Each is reported met or missing "
                    "with the line to add and the file. Without --check, the keys of --cache "
                    "or --catalog are merged into <Working Directory>/bareos-sd.<SD Port>"
                    ".cryptoc (Bareos's rules, under the lock, atomically). Prints the "
                    "bextract and bls command lines. Exit %d when something is missing."
                    % (SD_PLUGIN_FILE, SD_PLUGIN, EXIT_SD_NOT_READY))
    p.add_argument("config", metavar="CONFIG", help="bareos-sd.conf, bareos-sd.d or /etc/bareos")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--cache", metavar="CACHE", help="crypto cache holding the keys")
    keys.add_argument("--catalog", metavar="EXPORT", help="catalog export holding the keys")
    p.add_argument("--check", action="store_true", help="only check; install nothing")
    p.add_argument("--now", metavar="EPOCH", type=int, help=NOW_HELP)
    p.set_defaults(run=lambda ns: op_prepare_sd(ns.config, ns.cache, ns.catalog, ns.check,
                                                ns.now))



def _run_rewrap(ns):
    (old, old_source), (new, new_source) = [kek_from_arguments(ns, w) for w in ("old", "new")]
    for which, kek in (("old", old), ("new", new)):
        if kek is None:
            raise UsageError("rewrap needs the %s KEK: --%s-kek FILE or --%s-kek-from CONFIG"
                             % (which, which, which))
    return op_rewrap(old, new, ns.cache, ns.catalog, ns.sql_out, ns.backup, ns.force,
                     ns.wrap_unwrapped, (old_source, new_source), as_json=ns.json)


def _run_check(ns):
    try:
        if (ns.kit is None) == (ns.cache is None):
            raise UsageError("give --cache CACHE or --kit DIR (one of them)")
        if ns.kit is not None and ns.catalog:
            raise UsageError("--catalog does not apply to --kit: the kit holds its export")
        kek_text, kek_source = kek_from_arguments(ns)
    except BscryptoError as e:
        raise BscryptoError("check: could not check: %s" % e, CHECK_UNABLE)
    try:
        if ns.kit is not None:
            return op_check_kit(ns.kit, kek_text, kek_source, quiet=ns.quiet, as_json=ns.json)
        return op_check(ns.cache, kek_text, kek_source,
                        ns.max_age_days, ns.catalog, ns.now, quiet=ns.quiet, as_json=ns.json)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        raise OutputError("check: could not check: cannot write the report to standard "
                          "output: %s" % (e.strerror or e), CHECK_UNABLE)


def _add_kit_commands(sub, common):
    """dr-kit (check --kit is an option of check)."""
    p = sub.add_parser(
        "dr-kit", parents=[common], help="write a verified disaster-recovery kit (RunAfterJob)",
        description="For the catalog backup job's RunAfterJob: write OUTDIR/dr-kit-<UTC time> "
                    "(atomically, mode 0700, files 0600) holding this tool, the crypto cache "
                    "(read back), the catalog export, the bootstrap files (parsed), the "
                    "bareos-sd configuration with each Key Encryption Key replaced by a "
                    "placeholder, RECOVERY.txt with this site's names and commands, and a "
                    "MANIFEST. Proves that every bootstrap volume has a key that unwraps and "
                    "that cache and export agree; a kit with problems is still written, named "
                    "...-INCOMPLETE, exit %d." % EXIT_KIT_INCOMPLETE)
    p.add_argument("outdir", metavar="OUTDIR", help="directory for the kits")
    p.add_argument("--cache", metavar="CACHE", required=True, help="the crypto cache")
    p.add_argument("--bsr", metavar="BSR", action="append", required=True,
                   help="bootstrap file of the catalog backup (Write Bootstrap); repeatable")
    p.add_argument("--config", metavar="CONFIG", required=True,
                   help="Bareos configuration: /etc/bareos, bareos-sd.d or bareos-sd.conf")
    p.add_argument("--catalog", metavar="EXPORT", help="catalog key export to include")
    p.add_argument("-w", "--kek", metavar="KEKFILE",
                   help="prove the keys unwrap with this KEK (default: the config's)")
    add_kek_from_arguments(p)
    p.add_argument("--keep", metavar="N", type=int,
                   help="keep the newest N kits of this command in OUTDIR (and the newest "
                        "complete one); default: remove none")
    p.add_argument("--include-kek", action="store_true",
                   help="put the KEK into the kit (then store the kit like the KEK)")
    p.add_argument("--tar", action="store_true", help="also write kit.tar inside the kit")
    p.set_defaults(run=lambda ns: op_dr_kit(
        ns.outdir, ns.cache, ns.bsr, ns.config, ns.catalog, *(kek_from_arguments(ns) + (
            ns.director, ns.keep, ns.include_kek, ns.tar))))


_COMMAND_GROUPS = (_add_key_commands, _add_cache_commands, _add_drive_commands,
                   _add_recovery_commands, _add_prepare_sd_command, _add_kit_commands)


def _command_parser():
    parser_class = _parser_class()
    common = parser_class(add_help=False)
    common.add_argument("-d", "--debug-level", "--debug", dest="debug", metavar="N", type=int,
                        default=0, help="debug level (never shows key material)")
    common.add_argument("--dt", "--debug-timestamps", action="store_true",
                        help="print timestamps in debug output")
    p = parser_class(prog="bscrypto", epilog=_exit_code_epilog(),
                     formatter_class=parser_class.raw_formatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for add in _COMMAND_GROUPS:
        add(sub, common)
    return p, sub


def _commands_epilog():
    _, sub = _command_parser()
    lines = ["commands (each has its own --help):"]
    for action in sub._choices_actions:
        lines.append("  %-18s %s" % (action.dest, action.help))
    return "\n".join(lines)


def _run_command(parser, sub, argv):
    ns, extras = parser.parse_known_args(argv)
    if extras:
        # Said by the command's own parser, so that check's usage errors
        # exit 2 ("could not check") for cron like its other ones.
        sub.choices[ns.command].error("unrecognized arguments: %s" % " ".join(extras))
    _set_debug(ns.debug, ns.dt)
    _refuse_empty_arguments(ns, CHECK_UNABLE if ns.command == "check" else EXIT_USAGE)
    _device_from_tape(ns)
    return ns.run(ns)


def _device_from_tape(ns):
    """A drive command without DEVICE takes $TAPE, as mt and stenc do, and says so."""
    if not hasattr(ns, "device"):
        return
    tape = os.environ.get("TAPE", "")
    # `set-key KEYFILE` with $TAPE set: the one argument is the key file.
    if ns.command == "set-key" and tape and ns.keyfile is None and ns.hex_key is None:
        ns.keyfile, ns.device = ns.device, None
    if ns.device is not None:
        return
    if not tape:
        raise UsageError("%s: give the DEVICE (e.g. /dev/nst0) or set $TAPE" % ns.command)
    ns.device = tape
    sys.stderr.write("bscrypto: %s: device %s (from $TAPE)\n" % (ns.command, tape))


# Options that may come before the subcommand (`bscrypto.py -d 1 load ...`).
_GLOBAL_VALUE_OPTIONS = ("-d", "--debug-level", "--debug")
_GLOBAL_FLAGS = ("--dt", "--debug-timestamps")


def _split_global_options(argv):
    """(leading debug options, the rest of argv)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_VALUE_OPTIONS and i + 1 < len(argv):
            i += 2
        elif arg in _GLOBAL_FLAGS or (arg[:2] == "-d" and arg[2:].isdigit()) \
                or arg.split("=", 1)[0] in _GLOBAL_VALUE_OPTIONS[1:]:
            i += 1
        else:
            break
    return argv[:i], argv[i:]


SHORT_USAGE = """usage: bscrypto.py COMMAND [ARGS]   e.g. bscrypto.py load /dev/nst0 --cache C --kek K
       bscrypto.py <options> [<device_name>]   (Bareos's bscrypto flags: -k, -s, -D, ...)
'bscrypto.py help' lists the commands, 'bscrypto.py help COMMAND' shows one;
on a new host run 'bscrypto.py selftest' first.
"""


def _help(parser, sub, args):
    """help [COMMAND]: the command's --help, or the overall help."""
    if not args:
        return _run_legacy(["--help"])
    if args[0] in sub.choices:
        return _run_command(parser, sub, [args[0], "--help"])
    raise UsageError(_unknown_command(args[0], sub.choices) or
                     "unknown command %r: 'bscrypto.py help' lists them" % args[0])


def _unknown_command(word, names, rest=()):
    """The message for a first word that is no command, or None when it may
    be a device name for the original flags (`bscrypto.py /dev/nst0 -e`)."""
    close = near_names(word, list(names) + ["help"])
    if close:
        return "unknown command %r: did you mean %s?" % (word, " or ".join(close))
    if "/" not in word and not os.path.exists(word) and \
            not any(arg.startswith("-") for arg in rest):
        return "unknown command %r: 'bscrypto.py help' lists the commands" % word
    return None


def _refuse_empty_arguments(ns, exit_code=EXIT_USAGE):
    """An empty argument ('', an unset shell variable) is never taken as "none":
    `-w ''` would silently drop the wrap."""
    for name, value in sorted(vars(ns).items()):
        if (value == "" or isinstance(value, list) and "" in value) and name != "key_desc":
            raise BscryptoError("the %s argument is empty ('', an unset shell variable?); "
                                "nothing done" % name.replace("_", "-"), exit_code)


def _run_legacy_ops(ns):
    """The original flags, once they have passed Bareos's argument rules."""
    # Bareos's order of precedence: cache, then key files, then the drive.
    for dispatch in (_legacy_cache_ops, _legacy_key_ops, _legacy_drive_ops):
        rc = dispatch(ns)
        if rc is not None:
            return rc
    return EXIT_OK


def _legacy_cache_ops(ns):
    """-D, -p, -r: the first in this order runs, on the last cache path given (as Bareos)."""
    if ns.dump_cache:
        return op_dump_cache(ns.cache_file, ns.json, ns.now)
    if ns.populate_cachefile:
        return op_populate_cache(ns.cache_file, ns.now, ns.layout, ns.backup,
                                 ns.skip_bad_lines)
    if ns.reset_expiry_time:
        return op_reset_cache(ns.cache_file, ns.now, ns.layout, ns.backup)
    return None


def _legacy_drive_ops(ns):
    """-c, -e, -s, -v in Bareos's order; -s and -c print nothing on success."""
    device, timeout = ns.device_name, ns.timeout
    if ns.clear_encryption:
        return op_clear_key(device, timeout=timeout)
    if ns.drive_encryption_status:
        op_drive_status(device, timeout=timeout)
    if ns.set_encryption_key:
        return op_set_key(device, ns.set_encryption_key, ns.wrap_unwrap_key, ns.base64,
                          timeout=timeout, wrapped=WRAPPED_WARN)
    if ns.volume_encryption_status:
        op_volume_status(device, timeout=timeout)
    if ns.drive_encryption_status or ns.volume_encryption_status:
        return EXIT_OK
    return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
#
# Two faces: Bareos's original flags (drop-in for scripts, same messages and
# exit codes) and subcommands with readable names.  A first argument that is a
# subcommand name selects the second face.


# --now on every command that writes or judges times (resolve_now() reads it).
NOW_HELP = "take this Unix time as now (default $SOURCE_DATE_EPOCH, else the clock)"
DEVICE_HELP = "tape device, e.g. /dev/nst0 or /dev/sg1 (default $TAPE, as for mt)"


def _exit_code_epilog():
    return "exit codes:\n" + "\n".join("  %-3d %s" % c for c in EXIT_CODES)


_PARSER_CLASS = None
_USAGE_ERROR = [None]       # the last usage error's text, for --json


def _parser_class():
    """ArgumentParser whose help formatter finds the terminal width itself.

    argparse's own formatter imports shutil for that on every add_argument,
    which on Python 3.12+ drags in bz2, lzma and zlib: ~5 ms of every run.
    """
    global _PARSER_CLASS
    if _PARSER_CLASS is None:
        import argparse

        class Formatter(argparse.HelpFormatter):
            def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
                if width is None:
                    try:
                        width = int(os.environ["COLUMNS"])
                    except (KeyError, ValueError):
                        try:
                            width = os.get_terminal_size(sys.stdout.fileno()).columns
                        except (AttributeError, OSError, ValueError):
                            width = 80
                    width -= 2
                argparse.HelpFormatter.__init__(
                    self, prog, indent_increment, max_help_position, width)

        class RawFormatter(Formatter):
            # Keeps the line breaks of descriptions and epilogs (the tables).
            def _fill_text(self, text, width, indent):
                return "".join(indent + line for line in text.splitlines(True))

        class Parser(argparse.ArgumentParser):
            raw_formatter = RawFormatter
            # Exit status for a usage error: Bareos's 1, not argparse's 2
            # (2 is ours for key-file errors); a command may promise another.
            usage_exit = EXIT_USAGE

            def __init__(self, *args, **kwargs):
                kwargs.setdefault("formatter_class", Formatter)
                argparse.ArgumentParser.__init__(self, *args, **kwargs)

            def error(self, message):
                self.error_exit(self.usage_exit, message)

            def error_exit(self, code, message):
                _USAGE_ERROR[0] = message
                self.print_usage(sys.stderr)
                self.exit(code, "%s: error: %s\n" % (self.prog, message))

            def _print_message(self, message, file=None):
                # argparse 3.11+ ignores a failed write: --help into a full
                # disk or a closed pipe must fail like any other output.
                if message:
                    (file or sys.stderr).write(message)

        _PARSER_CLASS = Parser
    return _PARSER_CLASS


# Bareos's CLI11 rules for the original flags.  Pairs of options that
# exclude each other (CLI11's excludes() works both ways): exit 108.
_LEGACY_EXCLUDES = ("cD ec eD gc ge kg kc ke pc pe rc re sk sc sr sD se sg "
                    "vc vs vg vk vD vp vr").split()
_LEGACY_CACHE_OPTIONS = ("dump_cache", "populate_cachefile", "reset_expiry_time")


def _debug_level_arg(text):
    import argparse
    if text == "t":
        raise argparse.ArgumentTypeError("the -dt option has changed: use --dt")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid debug level %r: a number" % text)


def _legacy_parser():
    import argparse

    class LegacyParser(_parser_class()):
        # The command list needs the full subcommand parser: build it only
        # when help is shown, not on every run.
        @property
        def epilog(self):
            return _commands_epilog() + "\n\n" + _exit_code_epilog()

        @epilog.setter
        def epilog(self, value):
            pass

        def error(self, message):
            # Bareos's (CLI11) exit codes; argparse's messages say which case.
            if "expected one argument" in message:
                code = EXIT_CLI_MISMATCH
            elif "--dt" in message:
                code = EXIT_CLI_NOT_FOUND
            elif "invalid" in message:
                code = EXIT_CLI_CONVERSION
            else:
                code = EXIT_CLI_EXTRAS
            self.error_exit(code, message)

    class Given(argparse.Action):
        # Stores the value and remembers the order options came in: a repeat
        # is an error and the last cache path wins, as in Bareos.
        def __call__(self, parser, ns, value, option_string=None):
            setattr(ns, self.dest, value)
            if ns.given is None:
                ns.given = []
            ns.given.append((self.dest, self.option_strings[-1], value))

    p = LegacyParser(
        prog="bscrypto",
        usage="%(prog)s <options> [<device_name>]\n"
              "       %(prog)s COMMAND ...   (see 'commands' below)",
        description="Bareos tape encryption keys, crypto cache and drive keys.",
        formatter_class=LegacyParser.raw_formatter)
    p.set_defaults(given=None)
    a = p.add_argument
    a("-?", action="help", help=argparse.SUPPRESS)
    a("-b", "--base64", action="store_true", help="perform base64 encoding of keydata")
    a("-c", "--clear-encryption", action="store_true", help="clear encryption key")
    a("-D", "--dump-cache", metavar="<cachefile>", action=Given,
      help="dump content of given cachefile")
    a("-d", "--debug-level", "--debug", dest="debug", metavar="<level>", type=_debug_level_arg,
      default=0, help="set debug level to <level>")
    a("--dt", "--debug-timestamps", action="store_true", help="print timestamps in debug output")
    a("-e", "--drive-encryption-status", action="store_true",
      help="show drive encryption status")
    a("-g", "--generate-passphrase", metavar="<keyfile>", action=Given,
      help="generate new encryption passphrase in keyfile ('-' for stdout)")
    a("-k", "--show-keyfile", metavar="<keyfile>", action=Given, help="show content of keyfile")
    a("-p", "--populate-cachefile", metavar="<cachefile>", action=Given,
      help="populate given cachefile with crypto keys read from stdin")
    a("-r", "--reset-expiry-time", metavar="<cachefile>", action=Given,
      help="reset expiry time for entries of given cachefile")
    a("-s", "--set-encryption-key", metavar="<keyfile>", action=Given,
      help="set encryption key loaded from keyfile")
    a("-v", "--volume-encryption-status", action="store_true",
      help="show volume encryption status")
    a("-w", "--wrap-unwrap-key", metavar="<keyfile>", action=Given,
      help="wrap/unwrap the key using RFC3394 aes-(un)wrap using the key in "
           "keyfile as a Key Encryption Key")
    # drive: SCSI command timeout (not in Bareos)
    a("--timeout", metavar="SECONDS", type=_timeout_arg, default=DEFAULT_SCSI_TIMEOUT,
      action=Given, help="SCSI command timeout for -s, -c, -e, -v (default %d)"
                         % DEFAULT_SCSI_TIMEOUT)
    # Crypto cache options (bscrypto.py additions, for -D, -p and -r).
    a("--json", action="store_true", help="-D: print the cache as JSON")
    a("--backup", action="store_true", help="-p, -r: first keep a timestamped copy of the cache")
    a("--now", metavar="EPOCH", type=int, action=Given, help=NOW_HELP)
    a("--layout", choices=CACHE_LAYOUT_NAMES, action=Given,
      help="-p, -r: write this cache layout (default: this host's)")
    a("--skip-bad-lines", action="store_true",
      help="-p: warn about bad input lines and apply the good ones")
    a("--force", action="store_true", help="allow -g to replace a non-empty key file")
    a("--syslog", action="store_true",
      help="-s, -c: log each key change to syslog (device, algorithm index, key instance "
           "counter; never the key)")
    a("--version", action="version", version="bscrypto.py " + __version__)
    a("device_name", nargs="?", help="name of device (e.g. /dev/nst0)")
    return p


def _legacy_checks(ns):
    """Bareos's own argument rules and messages, in its order."""
    file_ops = (ns.generate_passphrase or ns.show_keyfile or ns.dump_cache
                or ns.populate_cachefile or ns.reset_expiry_time)
    drive_ops = (ns.clear_encryption or ns.set_encryption_key
                 or ns.drive_encryption_status or ns.volume_encryption_status)
    if not file_ops and not ns.device_name:
        return "Missing device_name argument for this option"
    if ns.generate_passphrase and ns.show_keyfile:
        return "Either use -g or -k not both"
    if ns.clear_encryption and ns.set_encryption_key:
        return "Either use -c or -s not both"
    if ((ns.clear_encryption or ns.set_encryption_key)
            and (ns.drive_encryption_status or ns.volume_encryption_status)):
        return "Either set or clear the crypto key or ask for status not both"
    if drive_ops and file_ops:
        return ("Don't mix operations which are incompatible "
                "e.g. generate/show vs set/clear etc.")
    return None


def _cli11_errors(parser, ns, extras):
    """Bareos's parser errors in its order: repeats (114), excludes (108),
    extra arguments (109).  Also takes the last cache path, as Bareos."""
    given = ns.given or []
    dests = [d for d, _, _ in given]
    for dest, option, _ in given:
        if dests.count(dest) > 1:
            parser.error_exit(EXIT_CLI_MISMATCH, "%s given more than once (Bareos takes each "
                                                 "option once)" % option)
    ns.cache_file = ([v for d, _, v in given if d in _LEGACY_CACHE_OPTIONS] or [None])[-1]
    options = {a.option_strings[0][1:]: a for a in parser._actions
               if a.option_strings and len(a.option_strings[0]) == 2}
    for pair in _LEGACY_EXCLUDES:
        first, second = options[pair[0]], options[pair[1]]
        if getattr(ns, first.dest) and getattr(ns, second.dest):
            parser.error_exit(EXIT_CLI_EXCLUDES, "%s excludes %s" % (
                first.option_strings[-1], second.option_strings[-1]))
    if extras:
        parser.error_exit(EXIT_CLI_EXTRAS, "unexpected argument%s: %s"
                          % ("s" if len(extras) > 1 else "", " ".join(extras)))


def _run_legacy(argv):
    parser = _legacy_parser()
    ns, extras = parser.parse_known_args(argv)
    _cli11_errors(parser, ns, extras)
    _set_debug(ns.debug, ns.dt)
    _refuse_empty_arguments(ns)
    problem = _legacy_checks(ns)
    if problem:
        sys.stderr.write(problem + "\n")
        if problem.startswith("Missing"):
            parser.print_usage(sys.stderr)
        return EXIT_USAGE
    return _run_legacy_ops(ns)


def _flushed(rc):
    sys.stdout.flush()      # here, where a failure is reported, not at interpreter exit
    return rc


def _set_debug(level, timestamps=False):
    global DEBUG_LEVEL, DEBUG_TIMESTAMPS
    DEBUG_LEVEL = level or 0
    DEBUG_TIMESTAMPS = bool(timestamps)


def _legacy_key_ops(ns):
    if ns.generate_passphrase:
        return op_generate(ns.generate_passphrase, ns.wrap_unwrap_key, ns.base64, ns.force)
    if ns.show_keyfile:
        return op_show_key(ns.show_keyfile, ns.wrap_unwrap_key, ns.base64)
    return None


def _timeout_arg(text):
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("--timeout wants seconds, more than 0")
    return value


_ASCII_STDOUT = None


def _utf8_stdout():
    """In the C locale (cron, rescue shells) Python 3.6, or 3.7+ with locale
    coercion and UTF-8 mode off, writes stdout as ASCII: one non-ASCII volume
    name in `check` or `label` output ended in an internal error.  Write
    UTF-8 there, as Bareos writes the bytes it has."""
    global _ASCII_STDOUT
    out = sys.stdout
    try:
        if codecs.lookup(out.encoding).name != "ascii":
            return
        buffer = out.buffer
    except (AttributeError, LookupError, TypeError):
        return
    out.flush()
    _ASCII_STDOUT = out         # kept: collecting it would close the shared buffer
    sys.stdout = io.TextIOWrapper(buffer, "utf-8", "surrogateescape",
                                  line_buffering=out.line_buffering)


def _no_core_dumps():
    """A core dump of this process could hold a key or KEK: allow none."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):   # pragma: no cover - no resource module
        pass


class _ClosedStream(io.RawIOBase):
    """Standard output when the process started with it closed (`>&-`): the
    first write fails; later ones (the interpreter's last flush) go nowhere."""

    failed = False
    error = (errno.EBADF, "standard output is closed")

    def writable(self):
        return True

    def write(self, data):
        if self.failed:
            return len(data)
        self.failed = True
        raise OSError(*self.error)


def _output_failed():
    """After stdout failed: send the rest (and the interpreter's last flush) nowhere."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv=None):
    """Entry point: returns the exit status instead of exiting."""
    if argv is None:
        argv = sys.argv[1:]
    global SYSLOG, JSON_ERRORS
    # Set before parsing, so that even a usage error is reported in JSON or
    # logged; each command's parser still decides whether it takes them.
    SYSLOG, JSON_ERRORS = "--syslog" in argv, "--json" in argv
    _USAGE_ERROR[0] = None
    _no_core_dumps()
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(_ClosedStream()), "utf-8")
    _utf8_stdout()
    try:
        try:
            if not argv:
                sys.stderr.write(SHORT_USAGE)
                return EXIT_USAGE
            options, rest = _split_global_options(argv)
            if rest and not rest[0].startswith("-"):
                parser, sub = _command_parser()
                if rest[0] in sub.choices:
                    return _flushed(_run_command(parser, sub, rest[:1] + options + rest[1:]))
                if rest[0] == "help":
                    return _flushed(_help(parser, sub, rest[1:]))
                problem = _unknown_command(rest[0], sub.choices, rest[1:])
                if problem:
                    raise UsageError(problem)
            return _flushed(_run_legacy(argv))
        except OSError as e:
            if e.errno not in OUTPUT_ERRNOS:
                raise
            # Only stdout writes get here: file errors are caught where they happen.
            raise OutputError("cannot write to standard output: %s" % (e.strerror or e))
    except OutputError as e:
        _output_failed()
        return _failed(str(e), e.exit_code, stdout_works=False)
    except BscryptoError as e:
        return _failed(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _failed("interrupted", 130)
    except SystemExit as e:  # argparse: --help, --version, usage errors (Parser.error)
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
        if code:
            _failed(_USAGE_ERROR[0] or "usage error", code, printed=True)
            return code
        try:
            sys.stdout.flush()      # --help, --version: argparse ignores a failed write
        except OSError as error:
            if error.errno not in OUTPUT_ERRNOS:
                raise
            _output_failed()
            return _failed("cannot write to standard output: %s" % (error.strerror or error),
                           EXIT_OUTPUT, stdout_works=False)
        return code
    except Exception as e:
        if DEBUG_LEVEL:
            raise
        return _failed("internal error: %s: %s (rerun with -d 1 for a traceback and please "
                       "report it)" % (type(e).__name__, e), EXIT_INTERNAL)
    finally:
        # Called in-process (tests, scripts): leave no -d, --syslog or --json behind.
        _set_debug(0)
        SYSLOG = JSON_ERRORS = False


def _failed(message, code, printed=False, stdout_works=True):
    """The one error line on stderr; with --json also an object on stdout, with
    --syslog also a syslog line.  Returns the exit code."""
    if not printed:
        try:
            sys.stderr.write("bscrypto: %s\n" % message)
        except (OSError, ValueError, AttributeError):
            pass            # stderr closed too: the exit code still tells
    if JSON_ERRORS and stdout_works:
        try:
            _json_dump({"error": message, "exit_code": code}, sys.stdout)
        except (OSError, ValueError):
            _output_failed()    # the stderr line and the exit code still tell
    audit("failed (exit %d): %s" % (code, message), error=True)
    return code


# ---------------------------------------------------------------------------
# Appendix: additional sense code names
# ---------------------------------------------------------------------------
#
# The additional sense codes every SSC-4 (tape) device may report (the T column
# of T10's asc-num list) and the whole 74h security family, in T10's wording
# as sg3_utils prints it, keyed by ASC << 8 | ASCQ.  Ranged codes (40h/80h+,
# 4Dh/NN, 70h/NN) are rules in asc_text(), not rows.
ASC_NAMES = {
    0x0000: "No additional sense information",
    0x0001: "Filemark detected",
    0x0002: "End-of-partition/medium detected",
    0x0003: "Setmark detected",
    0x0004: "Beginning-of-partition/medium detected",
    0x0005: "End-of-data detected",
    0x0006: "I/O process terminated",
    0x0007: "Programmable early warning detected",
    0x0016: "operation in progress",
    0x0017: "Cleaning requested",
    0x0018: "Erase operation in progress",
    0x0019: "Locate operation in progress",
    0x001A: "Rewind operation in progress",
    0x001B: "Set capacity operation in progress",
    0x001C: "Verify operation in progress",
    0x001D: "ATA pass through information available",
    0x001E: "Conflicting SA creation request",
    0x001F: "Logical unit transitioning to another power condition",
    0x0020: "Extended copy information available",
    0x0300: "Peripheral device write fault",
    0x0301: "No write current",
    0x0302: "Excessive write errors",
    0x0400: "Logical unit not ready, cause not reportable",
    0x0401: "Logical unit is in process of becoming ready",
    0x0402: "Logical unit not ready, initializing command required",
    0x0403: "Logical unit not ready, manual intervention required",
    0x0404: "Logical unit not ready, format in progress",
    0x0405: "Logical unit not ready, rebuild in progress",
    0x0406: "Logical unit not ready, recalculation in progress",
    0x0407: "Logical unit not ready, operation in progress",
    0x0409: "Logical unit not ready, self-test in progress",
    0x040A: "Logical unit not accessible, asymmetric access state transition",
    0x040B: "Logical unit not accessible, target port in standby state",
    0x040C: "Logical unit not accessible, target port in unavailable state",
    0x040E: "Logical unit not ready, security session in progress",
    0x0410: "Logical unit not ready, auxiliary memory not accessible",
    0x0411: "Logical unit not ready, notify (enable spinup) required",
    0x0413: "Logical unit not ready, SA creation in progress",
    0x041C: "Logical unit not ready, additional power use not yet granted",
    0x041F: "Logical unit not ready, microcode download required",
    0x0420: "Logical unit not ready, logical unit reset required",
    0x0421: "Logical unit not ready, hard reset required",
    0x0422: "Logical unit not ready, power cycle required",
    0x0500: "Logical unit does not respond to selection",
    0x0700: "Multiple peripheral devices selected",
    0x0800: "Logical unit communication failure",
    0x0801: "Logical unit communication time-out",
    0x0802: "Logical unit communication parity error",
    0x0803: "Logical unit communication CRC error (Ultra-DMA/32)",
    0x0804: "Unreachable copy target",
    0x0900: "Track following error",
    0x0904: "Head select fault",
    0x0905: "Vibration induced tracking error",
    0x0A00: "Error log overflow",
    0x0B00: "Warning",
    0x0B01: "Warning - specified temperature exceeded",
    0x0B02: "Warning - enclosure degraded",
    0x0B03: "Warning - background self-test failed",
    0x0B04: "Warning - background pre-scan detected medium error",
    0x0B05: "Warning - background medium scan detected medium error",
    0x0B06: "Warning - non-volatile cache now volatile",
    0x0B07: "Warning - degraded power to non-volatile cache",
    0x0B08: "Warning - power loss expected",
    0x0B0A: "Warning - high critical temperature limit exceeded",
    0x0B0B: "Warning - low critical temperature limit exceeded",
    0x0B0C: "Warning - high operating temperature limit exceeded",
    0x0B0D: "Warning - low operating temperature limit exceeded",
    0x0B0E: "Warning - high critical humidity limit exceeded",
    0x0B0F: "Warning - low critical humidity limit exceeded",
    0x0B10: "Warning - high operating humidity limit exceeded",
    0x0B11: "Warning - low operating humidity limit exceeded",
    0x0B12: "Warning - microcode security at risk",
    0x0B13: "Warning - microcode digital signature validation failure",
    0x0C00: "Write error",
    0x0C04: "Compression check miscompare error",
    0x0C05: "Data expansion occurred during compression",
    0x0C06: "Block not compressible",
    0x0C0B: "Auxiliary memory write error",
    0x0C0C: "Write error - unexpected unsolicited data",
    0x0C0D: "Write error - not enough unsolicited data",
    0x0C0E: "Multiple write errors",
    0x0D00: "Error detected by third party temporary initiator",
    0x0D01: "Third party device failure",
    0x0D02: "Copy target device not reachable",
    0x0D03: "Incorrect copy target device type",
    0x0D04: "Copy target device data underrun",
    0x0D05: "Copy target device data overrun",
    0x0E00: "Invalid information unit",
    0x0E01: "Information unit too short",
    0x0E02: "Information unit too long",
    0x0E03: "Invalid field in command information unit",
    0x1001: "Logical block guard check failed",
    0x1002: "Logical block application tag check failed",
    0x1003: "Logical block reference tag check failed",
    0x1004: "Logical block protection error on recover buffered data",
    0x1005: "Logical block protection method error",
    0x1100: "Unrecovered read error",
    0x1101: "Read retries exhausted",
    0x1102: "Error too long to correct",
    0x1103: "Multiple read errors",
    0x1108: "Incomplete block read",
    0x1109: "No gap found",
    0x110A: "Miscorrected error",
    0x110D: "De-compression CRC error",
    0x110E: "Cannot decompress using declared algorithm",
    0x1112: "Auxiliary memory read error",
    0x1113: "Read error - failed retransmission request",
    0x1400: "Recorded entity not found",
    0x1401: "Record not found",
    0x1402: "Filemark or setmark not found",
    0x1403: "End-of-data not found",
    0x1404: "Block sequence error",
    0x1405: "Record not found - recommend reassignment",
    0x1406: "Record not found - data auto-reallocated",
    0x1407: "Locate operation failure",
    0x1500: "Random positioning error",
    0x1501: "Mechanical positioning error",
    0x1502: "Positioning error detected by read of medium",
    0x1700: "Recovered data with no error correction applied",
    0x1701: "Recovered data with retries",
    0x1702: "Recovered data with positive head offset",
    0x1703: "Recovered data with negative head offset",
    0x1800: "Recovered data with error correction applied",
    0x1A00: "Parameter list length error",
    0x1B00: "Synchronous data transfer error",
    0x1D00: "Miscompare during verify operation",
    0x2000: "Invalid command operation code",
    0x2001: "Access denied - initiator pending-enrolled",
    0x2002: "Access denied - no access rights",
    0x2003: "Access denied - invalid mgmt id key",
    0x2004: "Illegal command while in write capable state",
    0x2006: "Illegal command while in explicit address mode",
    0x2007: "Illegal command while in implicit address mode",
    0x2008: "Access denied - enrollment conflict",
    0x2009: "Access denied - invalid LU identifier",
    0x200A: "Access denied - invalid proxy token",
    0x200B: "Access denied - ACL LUN conflict",
    0x200C: "Illegal command when not in append-only mode",
    0x2100: "Logical block address out of range",
    0x2101: "Invalid element address",
    0x2300: "Invalid token operation, cause not reportable",
    0x2301: "Invalid token operation, unsupported token type",
    0x2302: "Invalid token operation, remote token usage not supported",
    0x2303: "invalid token operation, remote rod token creation not supported",
    0x2304: "Invalid token operation, token unknown",
    0x2305: "Invalid token operation, token corrupt",
    0x2306: "Invalid token operation, token revoked",
    0x2307: "Invalid token operation, token expired",
    0x2308: "Invalid token operation, token cancelled",
    0x2309: "Invalid token operation, token deleted",
    0x230A: "Invalid token operation, invalid token length",
    0x2400: "Invalid field in cdb",
    0x2401: "CDB decryption error",
    0x2408: "Invalid xcdb",
    0x2500: "Logical unit not supported",
    0x2600: "Invalid field in parameter list",
    0x2601: "Parameter not supported",
    0x2602: "Parameter value invalid",
    0x2603: "Threshold parameters not supported",
    0x2604: "Invalid release of persistent reservation",
    0x2605: "Data decryption error",
    0x2606: "Too many target descriptors",
    0x2607: "Unsupported target descriptor type code",
    0x2608: "Too many segment descriptors",
    0x2609: "Unsupported segment descriptor type code",
    0x260A: "Unexpected inexact segment",
    0x260B: "Inline data length exceeded",
    0x260C: "Invalid operation for copy source or destination",
    0x260D: "Copy segment granularity violation",
    0x260E: "Invalid parameter while port is enabled",
    0x2610: "Data decryption key fail limit reached",
    0x2611: "Incomplete key-associated data set",
    0x2612: "Vendor specific key reference not found",
    0x2614: "Tape stream mirroring prevented",
    0x2615: "Copy source or copy destination not authorized",
    0x2700: "Write protected",
    0x2701: "Hardware write protected",
    0x2702: "Logical unit software write protected",
    0x2703: "Associated write protect",
    0x2704: "Persistent write protect",
    0x2705: "Permanent write protect",
    0x2800: "Not ready to ready change, medium may have changed",
    0x2801: "Import or export element accessed",
    0x2900: "Power on, reset, or bus device reset occurred",
    0x2901: "Power on occurred",
    0x2902: "SCSI bus reset occurred",
    0x2903: "Bus device reset function occurred",
    0x2904: "Device internal reset",
    0x2905: "Transceiver mode changed to single-ended",
    0x2906: "Transceiver mode changed to lvd",
    0x2907: "I_T nexus loss occurred",
    0x2A00: "Parameters changed",
    0x2A01: "Mode parameters changed",
    0x2A02: "Log parameters changed",
    0x2A03: "Reservations preempted",
    0x2A04: "Reservations released",
    0x2A05: "Registrations preempted",
    0x2A06: "Asymmetric access state changed",
    0x2A07: "Implicit asymmetric access state transition failed",
    0x2A08: "Priority changed",
    0x2A0A: "Error history i_t nexus cleared",
    0x2A0B: "Error history snapshot released",
    0x2A0D: "Data encryption capabilities changed",
    0x2A10: "Timestamp changed",
    0x2A11: "Data encryption parameters changed by another i_t nexus",
    0x2A12: "Data encryption parameters changed by vendor specific event",
    0x2A13: "Data encryption key instance counter has changed",
    0x2A14: "SA creation capabilities data has changed",
    0x2A15: "Medium removal prevention preempted",
    0x2B00: "Copy cannot execute since host cannot disconnect",
    0x2C00: "Command sequence error",
    0x2C07: "Previous busy status",
    0x2C08: "Previous task set full status",
    0x2C09: "Previous reservation conflict status",
    0x2C0B: "Not reserved",
    0x2C13: "Well known logical unit access required",
    0x2D00: "Overwrite error on update in place",
    0x2F00: "Commands cleared by another initiator",
    0x2F02: "Commands cleared by device server",
    0x2F03: "Some commands cleared by queuing layer event",
    0x3000: "Incompatible medium installed",
    0x3001: "Cannot read medium - unknown format",
    0x3002: "Cannot read medium - incompatible format",
    0x3003: "Cleaning cartridge installed",
    0x3004: "Cannot write medium - unknown format",
    0x3005: "Cannot write medium - incompatible format",
    0x3006: "Cannot format medium - incompatible medium",
    0x3007: "Cleaning failure",
    0x300A: "Cleaning request rejected",
    0x300C: "WORM medium - overwrite attempted",
    0x300D: "WORM medium - integrity check",
    0x3100: "Medium format corrupted",
    0x3300: "Tape length error",
    0x3400: "Enclosure failure",
    0x3500: "Enclosure services failure",
    0x3501: "Unsupported enclosure function",
    0x3502: "Enclosure services unavailable",
    0x3503: "Enclosure services transfer failure",
    0x3504: "Enclosure services transfer refused",
    0x3505: "Enclosure services checksum error",
    0x3700: "Rounded parameter",
    0x3900: "Saving parameters not supported",
    0x3A00: "Medium not present",
    0x3A01: "Medium not present - tray closed",
    0x3A02: "Medium not present - tray open",
    0x3A03: "Medium not present - loadable",
    0x3A04: "Medium not present - medium auxiliary memory accessible",
    0x3B00: "Sequential positioning error",
    0x3B01: "Tape position error at beginning-of-medium",
    0x3B02: "Tape position error at end-of-medium",
    0x3B08: "Reposition error",
    0x3B0C: "Position past beginning of medium",
    0x3B0D: "Medium destination element full",
    0x3B0E: "Medium source element empty",
    0x3B11: "Medium magazine not accessible",
    0x3B12: "Medium magazine removed",
    0x3B13: "Medium magazine inserted",
    0x3B14: "Medium magazine locked",
    0x3B15: "Medium magazine unlocked",
    0x3B1C: "Too many logical objects on partition to support operation",
    0x3D00: "Invalid bits in identify message",
    0x3E00: "Logical unit has not self-configured yet",
    0x3E01: "Logical unit failure",
    0x3E02: "Timeout on logical unit",
    0x3E03: "Logical unit failed self-test",
    0x3E04: "Logical unit unable to update self-test log",
    0x3F00: "Target operating conditions have changed",
    0x3F01: "Microcode has been changed",
    0x3F02: "Changed operating definition",
    0x3F03: "Inquiry data has changed",
    0x3F04: "Component device attached",
    0x3F05: "Device identifier changed",
    0x3F06: "Redundancy group created or modified",
    0x3F07: "Redundancy group deleted",
    0x3F08: "Spare created or modified",
    0x3F09: "Spare deleted",
    0x3F0A: "Volume set created or modified",
    0x3F0B: "Volume set deleted",
    0x3F0C: "Volume set deassigned",
    0x3F0D: "Volume set reassigned",
    0x3F0E: "Reported luns data has changed",
    0x3F0F: "Echo buffer overwritten",
    0x3F10: "Medium loadable",
    0x3F11: "Medium auxiliary memory accessible",
    0x3F12: "iSCSI IP address added",
    0x3F13: "iSCSI IP address removed",
    0x3F14: "iSCSI IP address changed",
    0x3F15: "Inspect referrals sense descriptors",
    0x3F16: "Microcode has been changed without reset",
    0x4300: "Message error",
    0x4400: "Internal target failure",
    0x4401: "Persistent reservation information lost",
    0x4471: "ATA device failed Set Features",
    0x4500: "Select or reselect failure",
    0x4600: "Unsuccessful soft reset",
    0x4700: "SCSI parity error",
    0x4701: "Data phase CRC error detected",
    0x4702: "SCSI parity error detected during st data phase",
    0x4703: "Information unit iuCRC error detected",
    0x4704: "Asynchronous information protection error detected",
    0x4705: "Protocol service CRC error",
    0x4706: "Phy test function in progress",
    0x477F: "Some commands cleared by iSCSI protocol event",
    0x4800: "Initiator detected error message received",
    0x4900: "Invalid message error",
    0x4A00: "Command phase error",
    0x4B00: "Data phase error",
    0x4B01: "Invalid target port transfer tag received",
    0x4B02: "Too much write data",
    0x4B03: "Ack/nak timeout",
    0x4B04: "Nak received",
    0x4B05: "Data offset error",
    0x4B06: "Initiator response timeout",
    0x4B07: "Connection lost",
    0x4B08: "Data-in buffer overflow - data buffer size",
    0x4B09: "Data-in buffer overflow - data buffer descriptor area",
    0x4B0A: "Data-in buffer error",
    0x4B0B: "Data-out buffer overflow - data buffer size",
    0x4B0C: "Data-out buffer overflow - data buffer descriptor area",
    0x4B0D: "Data-out buffer error",
    0x4B0E: "PCIe fabric error",
    0x4B0F: "PCIe completion timeout",
    0x4B10: "PCIe completer abort",
    0x4B11: "PCIe poisoned tlp received",
    0x4B12: "PCIe ecrc check failed",
    0x4B13: "PCIe unsupported request",
    0x4B14: "PCIe acs violation",
    0x4B15: "PCIe tlp prefix blocked",
    0x4C00: "Logical unit failed self-configuration",
    0x4E00: "Overlapped commands attempted",
    0x5000: "Write append error",
    0x5001: "Write append position error",
    0x5002: "Position error related to timing",
    0x5100: "Erase failure",
    0x5200: "Cartridge fault",
    0x5300: "Media load or eject failed",
    0x5301: "Unload tape failure",
    0x5302: "Medium removal prevented",
    0x5304: "Medium thread or unthread failure",
    0x5502: "Insufficient reservation resources",
    0x5503: "Insufficient resources",
    0x5504: "Insufficient registration resources",
    0x5505: "Insufficient access control resources",
    0x5506: "Auxiliary memory out of space",
    0x5508: "Maximum number of supplemental decryption keys exceeded",
    0x550B: "Insufficient power for operation",
    0x550C: "Insufficient resources to create rod",
    0x550D: "Insufficient resources to create rod token",
    0x5A00: "Operator request or state change input",
    0x5A01: "Operator medium removal request",
    0x5A02: "Operator selected write protect",
    0x5A03: "Operator selected write permit",
    0x5B00: "Log exception",
    0x5B01: "Threshold condition met",
    0x5B02: "Log counter at maximum",
    0x5B03: "Log list codes exhausted",
    0x5D00: "Failure prediction threshold exceeded",
    0x5DFF: "Failure prediction threshold exceeded (false)",
    0x5E00: "Low power condition on",
    0x5E01: "Idle condition activated by timer",
    0x5E02: "Standby condition activated by timer",
    0x5E03: "Idle condition activated by command",
    0x5E04: "Standby condition activated by command",
    0x5E05: "Idle_b condition activated by timer",
    0x5E06: "Idle_b condition activated by command",
    0x5E07: "Idle_c condition activated by timer",
    0x5E08: "Idle_c condition activated by command",
    0x5E09: "Standby_y condition activated by timer",
    0x5E0A: "Standby_y condition activated by command",
    0x6500: "Voltage fault",
    0x670A: "Set target port groups command failed",
    0x670B: "ATA device feature not enabled",
    0x7100: "Decompression exception long algorithm id",
    0x7400: "Security error",
    0x7401: "Unable to decrypt data",
    0x7402: "Unencrypted data encountered while decrypting",
    0x7403: "Incorrect data encryption key",
    0x7404: "Cryptographic integrity validation failed",
    0x7405: "Error decrypting data",
    0x7406: "Unknown signature verification key",
    0x7407: "Encryption parameters not useable",
    0x7408: "Digital signature validation failure",
    0x7409: "Encryption mode mismatch on read",
    0x740A: "Encrypted block not raw read enabled",
    0x740B: "Incorrect Encryption parameters",
    0x740C: "Unable to decrypt parameter list",
    0x740D: "Encryption algorithm disabled",
    0x7410: "SA creation parameter value invalid",
    0x7411: "SA creation parameter value rejected",
    0x7412: "Invalid SA usage",
    0x7421: "Data encryption configuration prevented",
    0x7430: "SA creation parameter not supported",
    0x7440: "Authentication failed",
    0x7461: "External data encryption key manager access error",
    0x7462: "External data encryption key manager error",
    0x7463: "External data encryption key not found",
    0x7464: "External data encryption request not authorized",
    0x746E: "External data encryption control timeout",
    0x746F: "External data encryption control error",
    0x7471: "Logical unit access not authorized",
    0x7479: "Security conflict in translated device",
}


# IBM's vendor-specific encryption codes (EEh/EFh), named only when INQUIRY
# says IBM: other vendors use these numbers for other things.  Wording from
# the encryption sense data tables of IBM's LTO drive references (TS3310 and
# TS3400 library manuals, appendix "Sense data").
IBM_ASC_NAMES = {
    0xEE12: "Encryption - Key change detected",
    0xEE18: "Encryption - Changed (read)",
    0xEE19: "Encryption - Changed (write)",
    0xEE23: "Encryption - Key conflict",
    0xEE25: "Encryption - Key format not supported",
    0xEE40: "Encryption - EKM identifier changed",
    0xEE41: "Encryption - EKM challenge changed",
    0xEE50: "Encryption - Initiator identifier changed",
    0xEE51: "Encryption - Initiator response changed",
    0xEF10: "Encryption - Key required",
    0xEF11: "Encryption - Key generation",
    0xEF13: "Encryption - Key translate",
    0xEF1A: "Encryption - Key optional",
    0xEFC0: "Encryption - No operation",
}


if __name__ == "__main__":
    sys.exit(main())
