#!/usr/bin/env python3
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
EXIT_OUTPUT = 14           # standard output not writable: closed, broken pipe, disk full, EIO
EXIT_INTERNAL = 70         # a bug: please report it with --debug output

EXIT_CODES = (
    (EXIT_OK, "success"),
    (EXIT_USAGE, "usage error (as Bareos bscrypto); selftest failure"),
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
    (EXIT_OUTPUT, "standard output could not be written (closed, broken pipe, disk full)"),
    (EXIT_INTERNAL, "internal error (a bug)"),
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


# Debug level set by -d/--debug; debug() never receives key material.
DEBUG_LEVEL = 0


def debug(level, message):
    if DEBUG_LEVEL >= level:
        sys.stderr.write("bscrypto: debug: %s\n" % message)


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


def b64decode(text):
    """Decode Bareos base64: stops at the first space, padding optional.

    Bareos decodes invalid characters as zero bits; we refuse them instead,
    because a mistyped key silently becomes a different key.  The message
    gives positions, never the characters: they are key material.
    """
    if isinstance(text, str):
        text = text.encode("ascii", "replace")      # any other character is refused below
    text = text.split(b" ", 1)[0].rstrip(b"=")
    bad = [i for i, c in enumerate(text, 1) if c not in _B64_ALPHABET]
    if bad:
        raise ValueError("not base64: %d of its %d characters %s outside the base64 alphabet "
                         "(the first at position %d)" % (len(bad), len(text),
                                                          "is" if len(bad) == 1 else "are",
                                                          bad[0]))
    if len(text) % 4 == 1:
        raise ValueError("not base64: %d characters cannot encode whole bytes" % len(text))
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
    wrapped = b64decode(wrapped_b64)
    if len(wrapped) % 8 or len(wrapped) < 24:
        raise ValueError("decodes to %d bytes, a wrapped key is %d" % (len(wrapped), WRAPPED_LENGTH))
    return aes_key_unwrap(kek_from_text(kek_text), wrapped)


# ---------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------


def strip_key_text(data):
    """Bareos's key-file rule: first 64 bytes, trailing \\n, \\r and spaces removed."""
    return bytes(data[:KEY_FILE_READ_LIMIT]).rstrip(KEY_FILE_STRIP)


def read_key_file(path, what="key file", prompt=True):
    """Read a key file (or stdin for '-') the way Bareos does."""
    if path == "-" and prompt:
        sys.stdout.write(KEY_PROMPT)
        sys.stdout.flush()
    text = strip_key_text(read_input(path, what, KEY_FILE_READ_LIMIT))
    if not text:
        raise KeyFileError("%s %s is empty" % (what, "on stdin" if path == "-" else path))
    return text


def _read_stdin_bytes(limit=None):
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    if stream is None:          # started with stdin closed
        return b""
    if limit is None:
        data = stream.read()
        return data.encode("latin-1") if isinstance(data, str) else data
    if stream is sys.stdin:
        return sys.stdin.read(limit).encode("latin-1")
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


def passphrase_from_key_text(text, source, kek_text=None, kek_source=None, base64=False):
    """Recover the passphrase from key-file text (the inverse of make_key_text)."""
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
        try:
            return b64decode(text)
        except ValueError as e:
            raise KeyFileError("%s is not base64: %s" % (source, str(e)[len("not base64: "):]))
    return text[:PASSPHRASE_LENGTH]


# -- key file operations: -g and -k --


def op_generate(dest, kek_path=None, base64=False, force=False, out=None):
    """-g: make a new passphrase (optionally base64 or wrapped) into dest."""
    check_path(dest, "key file")
    output = PrivateOutput(dest, force) if dest != "-" else None   # refuse before any work
    try:
        kek_text = read_key_file(kek_path, "KEK file") if kek_path is not None else None
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


def op_show_key(source, kek_path=None, base64=False, prompt=True, out=None):
    """-k: print the passphrase held in a key file."""
    kek_text = read_key_file(kek_path, "KEK file") if kek_path is not None else None
    text = read_key_file(source, prompt=prompt)
    name = "stdin" if source == "-" else source
    passphrase = passphrase_from_key_text(text, name, kek_text, kek_path, base64)
    out = out or _stdout_bytes()
    out.write(passphrase + b"\n")
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
CACHE_PROMPT = "Enter cache entrie(s) (close with ^D): "
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

    Real: a non-empty NUL-terminated name, a NUL-terminated key and a time
    after 1970 and before year 36812.  Read with the wrong layout, the time
    lands in the zero tail of a key and the name on pointer bytes.
    """
    st = _entry_struct(layout)
    score = 0
    for i in range(min(count, _PLAUSIBLE_CHECKED)):
        name, key, added = st.unpack_from(data, CACHE_HEADER_SIZE + i * layout.entry_size)
        if name[:1] not in (b"", b"\0") and b"\0" in name and b"\0" in key and 0 < added < 1 << 40:
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
            raise CacheError("%s: the %s of entry %d is not NUL-terminated: damaged; left "
                             "untouched" % (source, "volume name" if n < 0 else "key", i + 1))
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
    while True:
        line = stream.readline()
        if not line or not line.rstrip(b"\r\n "):
            return lines
        lines.append(line)


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

    def replace(self, data, backup=False):
        """Atomically replace the cache with data: temporary file, fsync, the
        old file's owner and mode (CACHE_NEW_FILE_MODE less the umask for a
        new one), rename, fsync the directory.  CacheError, old file kept,
        when it cannot, or when the file is no longer the one read."""
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


def write_cache(path, entries, layout=None, backup=False):
    """Atomically replace the cache (caller holds cache_lock): `path` is a
    path or the CacheFile read under the lock (then it must still be the
    file read).  `backup` first keeps a timestamped copy."""
    layout = cache_layout(layout)
    data = build_cache(entries, layout)      # refuse bad entries before touching anything
    cf = path if isinstance(path, CacheFile) else CacheFile(path)
    try:
        cf.replace(data, backup)
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
    "SecurityProtocolPages": "page_code page_codes",
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
        from collections import namedtuple
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
SG_INFO_OK_MASK = 0x1
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
            return BscryptoError("cannot open %s: device busy: another program has it open "
                                 "(bareos-sd? stop it or release the drive first)" % device,
                                 EXIT_DEVICE)
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
    return ("run as root, or grant CAP_SYS_RAWIO: `setcap cap_sys_rawio=ep` on the Python "
            "binary, or in a systemd unit `CapabilityBoundingSet=CAP_SYS_RAWIO` with "
            "`AmbientCapabilities=CAP_SYS_RAWIO`")


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


def _address(buf):
    return buf.buffer_info()[0] if buf is not None else 0


class LinuxSgTransport(_IoctlTransport):
    """Linux SG_IO: works on /dev/sgN and on the st nodes /dev/nstN."""

    STRUCT = ("sg_io_hdr", SG_IO_HDR_FIELDS)

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        cdb_buf, data_buf, sense_buf = self._buffers(cdb, data_out, data_in_len)
        if data_out:
            direction, length = SG_DXFER_TO_DEV, len(data_out)
        elif data_in_len:
            direction, length = SG_DXFER_FROM_DEV, data_in_len
        else:
            direction, length = SG_DXFER_NONE, 0
        seconds = self._seconds(timeout)
        header = bytearray(pack_c_struct(self.layout, {
            "interface_id": ord("S"), "dxfer_direction": direction, "cmd_len": len(cdb),
            "mx_sb_len": SENSE_BUFFER_LENGTH, "dxfer_len": length, "dxferp": _address(data_buf),
            "cmdp": _address(cdb_buf), "sbp": _address(sense_buf),
            "timeout": int(seconds * 1000)}))
        try:
            self._call(SG_IO, header)
        except OSError as e:
            raise _device_error(self.device, e, "ioctl")
        out = unpack_c_struct(self.layout, header)
        data_in = b""
        if direction == SG_DXFER_FROM_DEV:
            data_in = data_buf.tobytes()[:max(0, length - max(0, out["resid"]))]
        return _record("ScsiResult")(
            out["status"], data_in, sense_buf.tobytes()[:out["sb_len_wr"]], out["resid"],
            out["host_status"], out["driver_status"], out["info"], out["duration"])


class SolarisUscsiTransport(_IoctlTransport):
    """Solaris/illumos USCSICMD; needs root or PRIV_SYS_DEVICES."""

    STRUCT = ("uscsi_cmd", USCSI_CMD_FIELDS)

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        cdb_buf, data_buf, sense_buf = self._buffers(cdb, data_out, data_in_len)
        flags = USCSI_SILENT | USCSI_RQENABLE | (USCSI_READ if data_in_len and not data_out
                                                 else USCSI_WRITE)
        length = len(data_out) if data_out else data_in_len
        seconds = self._seconds(timeout)
        request = bytearray(pack_c_struct(self.layout, {
            "uscsi_flags": flags, "uscsi_timeout": min(int(seconds + 0.999), 32767),
            "uscsi_cdb": _address(cdb_buf), "uscsi_bufaddr": _address(data_buf),
            "uscsi_buflen": length, "uscsi_cdblen": len(cdb),
            "uscsi_rqlen": SENSE_BUFFER_LENGTH, "uscsi_rqbuf": _address(sense_buf)}))
        try:
            self._call(USCSICMD, request)
        except OSError as e:
            out = unpack_c_struct(self.layout, request)
            # CHECK CONDITION comes back as EIO with the status filled in.
            if e.errno != errno.EIO or not out["uscsi_status"]:
                raise _device_error(self.device, e, "ioctl")
        out = unpack_c_struct(self.layout, request)
        resid = out["uscsi_resid"]
        data_in = data_buf.tobytes()[:length - resid] if data_in_len and not data_out else b""
        sense = b""
        if out["uscsi_status"] == SCSI_STATUS_CHECK_CONDITION and out["uscsi_rqstatus"] == 0:
            sense = sense_buf.tobytes()[:SENSE_BUFFER_LENGTH - out["uscsi_rqresid"]]
        return _record("ScsiResult")(out["uscsi_status"], data_in, sense, resid, 0, 0, 0, 0)


class BsdScsireqTransport(_IoctlTransport):
    """NetBSD and OpenBSD SCIOCCOMMAND (OpenBSD: at most 64 KiB, read-write open)."""

    STRUCT = ("scsireq", SCSIREQ_FIELDS)

    def __init__(self, device, timeout=DEFAULT_SCSI_TIMEOUT, ioctl=None):
        _IoctlTransport.__init__(self, device, timeout, ioctl)
        self.request = bsd_iowr("Q", 1, self.layout.size)

    def execute(self, cdb, data_out=b"", data_in_len=0, timeout=None):
        _, data_buf, _ = self._buffers(cdb, data_out, data_in_len)
        length = len(data_out) if data_out else data_in_len
        flags = SCCMD_WRITE if data_out else (SCCMD_READ if data_in_len else 0)
        seconds = self._seconds(timeout)
        request = bytearray(pack_c_struct(self.layout, {
            "flags": flags, "timeout": int(seconds * 1000), "cmd": bytes(cdb),
            "cmdlen": len(cdb), "databuf": _address(data_buf), "datalen": length,
            "senselen": 48}))
        try:
            self._call(self.request, request)
        except OSError as e:
            raise _device_error(self.device, e, "ioctl")
        out = unpack_c_struct(self.layout, request)
        retsts = out["retsts"]
        if retsts in (1, 2, 4):
            raise _device_error(self.device, OSError(
                {1: errno.ETIMEDOUT, 2: errno.EBUSY}.get(retsts, errno.EIO),
                "SCIOCCOMMAND: %s" % SCCMD_RETSTS_NAMES[retsts]), "ioctl")
        used = out["datalen_used"]
        data_in = data_buf.tobytes()[:used] if flags == SCCMD_READ else b""
        sense = out["sense"][:out["senselen_used"]] if retsts == 3 else b""
        status = out["status"] or (SCSI_STATUS_CHECK_CONDITION if retsts == 3 else 0)
        return _record("ScsiResult")(status, data_in, sense, length - used, 0, 0, 0, 0)


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
# SSC-4 tape data encryption pages (security protocol specific field).
TDE_IN_SUPPORT_PAGE = 0x0000
TDE_OUT_SUPPORT_PAGE = 0x0001
DATA_ENCRYPTION_CAPABILITIES_PAGE = 0x0010
SUPPORTED_KEY_FORMATS_PAGE = 0x0011
DATA_ENCRYPTION_MANAGEMENT_CAPABILITIES_PAGE = 0x0012
DATA_ENCRYPTION_STATUS_PAGE = 0x0020
NEXT_BLOCK_ENCRYPTION_STATUS_PAGE = 0x0021
SET_DATA_ENCRYPTION_PAGE = 0x0010        # SPOUT

# Bareos's SPP_PAGE_BUFFER: 4-byte header + 8192; it asks SPIN for this much.
SPIN_ALLOCATION_LENGTH = 8196
INQUIRY_ALLOCATION_LENGTH = 96
VPD_UNIT_SERIAL_NUMBER = 0x80

SCOPE_PUBLIC = 0
SCOPE_LOCAL = 1
SCOPE_ALL_I_T_NEXUS = 2
ENCRYPTION_MODE_DISABLE = 0
ENCRYPTION_MODE_EXTERNAL = 1
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
KAD_FORMAT_BINARY = 1
KAD_FORMAT_ASCII = 2
KAD_TYPE_UKAD = 0                # unauthenticated key-associated data (key description)
KAD_TYPE_AKAD = 1
KAD_TYPE_NONCE = 2
KAD_TYPE_MKAD = 3
KAD_TYPE_NAMES = {0: "U-KAD", 1: "A-KAD", 2: "nonce", 3: "M-KAD"}
PARAMETERS_CONTROL_AME = 1
PARAMETERS_CONTROL_DRIVE = 2
PARAMETERS_CONTROL_LIBRARY = 3
ENCRYPT_C_SPOUT = 2              # ENCRYPT_C/DECRYPT_C: capable, controlled by SPOUT

# Security algorithm codes: 0001xxxxh with an IKEv2 transform id (SPC-4).
ALGORITHM_AES_256_GCM = 0x00010014
ALGORITHM_AES_256_CCM = 0x00010010
_ALGORITHM_NAMES = {0x00010014: "AES-GCM", 0x00010010: "AES-CCM", 0x0001000C: "AES-CBC",
                    0x0001000D: "AES-CTR", 0x00010013: "AES-GCM-12", 0x00010012: "AES-GCM-8",
                    0x0001000F: "AES-CCM-12", 0x0001000E: "AES-CCM-8"}
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
    return bytes(6)


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


def parse_security_protocol_pages(data):
    """SSC-4 tape data encryption in/out support pages (0000h, 0001h): page codes."""
    data, end = _page_body(data, None, 4, "support page")
    codes = tuple(int.from_bytes(data[i:i + 2], "big") for i in range(4, end - 1, 2))
    return _record("SecurityProtocolPages")(int.from_bytes(data[0:2], "big"), codes)


def parse_kads(data, start, end):
    """Key-associated data descriptors from start to end (type, flags, length, data)."""
    kads = []
    offset = start
    while offset + 4 <= end:
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if offset + 4 + length > end:
            raise ValueError("key-associated data descriptor at byte %d overruns the page"
                             % offset)
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


def parse_data_encryption_status(data):
    """SSC-4 Data Encryption Status page (0020h), with its key-associated data."""
    data, end = _page_body(data, DATA_ENCRYPTION_STATUS_PAGE, 16, "status page")
    return _record("DataEncryptionStatus")(
        i_t_nexus_scope=data[4] >> 5, key_scope=data[4] & 7, encryption_mode=data[5],
        decryption_mode=data[6], algorithm_index=data[7],
        key_instance_counter=int.from_bytes(data[8:12], "big"),
        parameters_control=data[12] >> 4 & 7, vcelb=data[12] >> 3 & 1,
        ceems=data[12] >> 1 & 3, rdmd=data[12] & 1, kad_format=data[13],
        asdk_count=int.from_bytes(data[14:16], "big"), kads=parse_kads(data, 24, end))


def parse_next_block_encryption_status(data):
    """SSC-4 Next Block Encryption Status page (0021h), with its key-associated data."""
    data, end = _page_body(data, NEXT_BLOCK_ENCRYPTION_STATUS_PAGE, 16, "next block page")
    return _record("NextBlockEncryptionStatus")(
        logical_object_number=int.from_bytes(data[4:12], "big"),
        compression_status=data[12] >> 4, encryption_status=data[12] & 0x0F,
        algorithm_index=data[13], emes=data[14] >> 1 & 1, rdmds=data[14] & 1,
        kad_format=data[15], kads=parse_kads(data, 16, end))


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


def _name(names, value):
    return names.get(value, "reserved (%d)" % value)


def _kad_text(kad):
    """A KAD descriptor as text: ASCII when printable, else hex."""
    data = kad.descriptor
    if data and all(32 <= b < 127 for b in bytearray(data.rstrip(b"\0"))):
        return '"%s"' % data.rstrip(b"\0").decode("ascii")
    return data.hex() or '""'


def _kad_dict(kad):
    d = {"type": _name(KAD_TYPE_NAMES, kad.descriptor_type),
         "authenticated": kad.authenticated, "hex": kad.descriptor.hex()}
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
        "rdmc_c": a.rdmc_c, "eemc_c": a.eemc_c}


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


def asc_text(asc, ascq):
    """The T10 text of an additional sense code and qualifier."""
    text = ASC_NAMES.get(asc << 8 | ascq)
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


def sense_text(sense):
    """One line: key, ASC/ASCQ text and code, and the field pointer if valid."""
    text = "%s, %s (%02X/%02X/%02X)" % (SENSE_KEY_NAMES[sense.sense_key],
                                        asc_text(sense.asc, sense.ascq),
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
                "and run `bscrypto label` on that file" % (kind, serial))
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
# Bits of struct mtget: mt_dsreg low 24 bits = block size; mt_gstat door open.
MT_ST_BLKSIZE_MASK = 0xFFFFFF
GMT_DR_OPEN = 0x00040000


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


def _tape_read_error(ops, fd, path, e):
    block_size = _tape_block_size(ops, fd)
    if block_size:
        return BscryptoError("cannot read the first block of %s (%s): the drive is in fixed-block "
                             "mode (%d bytes) and Bareos writes variable-length blocks; set "
                             "variable mode with `mt -f %s setblk 0` and retry"
                             % (path, e.strerror or e, block_size, path), EXIT_LABEL)
    if e.errno == errno.EIO:
        return BscryptoError(
            "I/O error reading the first block of %s. The label is never encrypted, but a drive "
            "holding a key in decrypt (not mixed) mode refuses unencrypted blocks: clear the "
            "drive key first (bscrypto clear-key %s) and retry; a blank or damaged tape fails "
            "the same way" % (path, path), EXIT_LABEL)
    # st: ENOMEM = block longer than the read (variable mode), EINVAL = read
    # size not a multiple of the fixed block size.
    if e.errno in (errno.EINVAL, errno.ENOMEM):
        return BscryptoError("cannot read the first block of %s: %s (a block larger than %d "
                             "bytes is not a Bareos label)" % (path, e.strerror or e,
                                                               LABEL_READ_SIZE), EXIT_LABEL)
    return BscryptoError("cannot read the first block of %s: %s" % (path, e.strerror or e),
                         EXIT_LABEL)


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
            "bs=256k count=1`), then run `bscrypto label label.block`" % (path, path), EXIT_DEVICE)
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


def scan_config(text, path="config"):
    """Bareos configuration text as tokens (kind, value, line).

    kinds: 'word' (keyword or unquoted value), 'quoted', 'include', '{',
    '}', '=', ',', 'eol' (newline or ';').
    """
    tokens = []
    n = len(text)
    i = 0
    line = 1
    if text.startswith("\ufeff"):
        i = 1                      # UTF-8 byte order mark, skipped as Bareos does
    while i < n:
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
    return tokens


def _config_statement(tokens):
    """(keyword in lower case, value token) of `keyword = value`, else None."""
    if (len(tokens) >= 3 and tokens[0][0] == "word" and tokens[1][0] == "="
            and tokens[2][0] in _CONFIG_WORDS):
        return tokens[0][1].lower(), tokens[2]
    return None


def parse_config_keks(text, path="config"):
    """Director resources with a Key Encryption Key in one configuration
    text: ([ConfigKek(director, kek bytes, path, line)], [(path, line, target)
    of each @include])."""
    ConfigKek = _record("ConfigKek", _CONFIG_KEK_FIELDS)
    keks = []
    includes = []
    depth = 0
    resource = None
    resource_type = ""
    opened = 0
    fields = {}
    statement = []

    def finish_statement():
        if depth == 1 and resource == "director":
            found = _config_statement(statement)
            if found and found[0] == "name":
                fields["name"] = found[1][1]
            elif found and found[0] == "keyencryptionkey":
                fields["kek"] = found[1]
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
            if depth == 0 and resource == "director" and "kek" in fields:
                name = fields.get("name")
                if name is None:
                    raise _config_error(path, opened, "Director resource with a Key Encryption "
                                        "Key but no Name")
                kek_token = fields["kek"]
                keks.append(ConfigKek(name, kek_token[1].encode("latin-1"), path, kek_token[2]))
        elif kind == "eol":
            finish_statement()
        elif depth == 0:
            # A resource type may stand on its own line before its '{'.
            resource_type = value.lower() if kind == "word" else ""
        else:
            statement.append((kind, value, line))
    if depth:
        raise _config_error(path, opened, "resource opened here is never closed (missing '}')")
    return keks, includes


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


def read_config_keks(path):
    """parse_config_keks over every file config_files(path) names."""
    keks = []
    includes = []
    for name in config_files(path):
        data = read_input(name, "configuration file")
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise KeyFileError("%s is UTF-16; Bareos reads UTF-8 configuration files" % name)
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]        # UTF-8 byte order mark, skipped as Bareos does
        # latin-1 maps every byte to one character, so the KEK's bytes survive.
        found, inc = parse_config_keks(data.decode("latin-1"), name)
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


def kek_from_arguments(ns, kek_option="kek"):
    """KEK text from --kek FILE (if the command has it) or --kek-from, else None."""
    kek_file = getattr(ns, kek_option, None) if kek_option else None
    if kek_file and ns.kek_from:
        raise UsageError("give the KEK either as a file (--%s) or with --kek-from, not both"
                         % kek_option.replace("_", "-"))
    if ns.director and not ns.kek_from:
        raise UsageError("--director only applies with --kek-from")
    if kek_file is not None:
        return read_key_file(kek_file, "KEK file")
    if ns.kek_from is not None:
        return kek_from_config(ns.kek_from, ns.director)
    return None


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


def _report_bad_lines(problems, path, skip):
    shown = problems if skip else problems[:20]
    for number, problem in shown:
        if skip:
            warn("line %d skipped: %s" % (number, problem))
        else:
            sys.stderr.write("bscrypto: line %d: %s\n" % (number, problem))
    if skip:
        return
    if len(problems) > len(shown):
        sys.stderr.write("bscrypto: ... and %d more bad lines\n" % (len(problems) - len(shown)))
    raise UsageError("nothing written to %s: %d bad input line%s; fix %s or add "
                     "--skip-bad-lines" % (path, len(problems), "s" if len(problems) > 1 else "",
                                            "them" if len(problems) > 1 else "it"))


def op_populate_cache(path, now=None, layout=None, backup=False, skip_bad_lines=False,
                      stream=None, interactive=None, summary=False):
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
    if summary:
        report_output(sys.stdout, text + "\n", "%s was %s" % (
            path, "written" if write else "not changed"))
    return EXIT_OK


def update_cache(path, updates, now, layout=None, backup=False):
    """Apply (name, key) updates with Bareos's rules under the lock, atomically;
    (stats, written).  Written when something changed or --layout converts."""
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
            write_cache(cf, entries, target, backup)
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


def _scsi_failure(device, what, result, context=""):
    """The ScsiError for a result that is not GOOD, with what to do about it.

    context: "spin" (a tape data encryption page), "spout" (the key page),
    or "" (anything else).
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
    text = sense_text(sense)
    key, asc = sense.sense_key, sense.asc
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
    if context == "spin" and key == SENSE_ILLEGAL_REQUEST and asc == 0x24:
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
        error = _scsi_failure(transport.device, what, result, context)
        if (error.sense is None or error.sense.sense_key != SENSE_UNIT_ATTENTION
                or attempt == UNIT_ATTENTION_RETRIES):
            raise error
        debug(1, "%s: %s: %s; sending again" % (transport.device, what,
                                                  sense_text(error.sense)))
    raise AssertionError("unreachable")


def _parse_reply(parser, data, device, what):
    try:
        return parser(data)
    except ValueError as e:
        raise BscryptoError("%s: the drive's %s is malformed: %s" % (device, what, e),
                            EXIT_SCSI)


def read_tde_page(transport, page):
    """The raw bytes of a tape data encryption SPIN page."""
    return scsi_command(transport, "SECURITY PROTOCOL IN page %04Xh" % page,
                        cdb_security_protocol_in(SECURITY_PROTOCOL_TAPE, page,
                                                 SPIN_ALLOCATION_LENGTH),
                        data_in_len=SPIN_ALLOCATION_LENGTH, context="spin")


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


def read_drive_status(transport):
    """The drive's Data Encryption Status page (0020h) as a DataEncryptionStatus."""
    return _parse_reply(parse_data_encryption_status,
                        read_tde_page(transport, DATA_ENCRYPTION_STATUS_PAGE),
                        transport.device, "data encryption status page")


def read_next_block_status(transport):
    """The Next Block Encryption Status page (0021h) as a NextBlockEncryptionStatus."""
    return _parse_reply(parse_next_block_encryption_status,
                        read_tde_page(transport, NEXT_BLOCK_ENCRYPTION_STATUS_PAGE),
                        transport.device, "next block encryption status page")


def read_capabilities(transport):
    """The Data Encryption Capabilities page (0010h) as DataEncryptionCapabilities."""
    return _parse_reply(parse_data_encryption_capabilities,
                        read_tde_page(transport, DATA_ENCRYPTION_CAPABILITIES_PAGE),
                        transport.device, "data encryption capabilities page")


def read_inquiry(transport):
    """(InquiryData, serial number or None)."""
    inquiry = _parse_reply(parse_inquiry, scsi_command(
        transport, "INQUIRY", cdb_inquiry(), data_in_len=INQUIRY_ALLOCATION_LENGTH),
        transport.device, "INQUIRY data")
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
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
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


def _warn_not_application_managed(device, status, err):
    if status.parameters_control in (PARAMETERS_CONTROL_DRIVE, PARAMETERS_CONTROL_LIBRARY):
        err.write("bscrypto: warning: %s: encryption is %s (parameters control %d): the drive "
                  "will refuse a key from this host; set its encryption method to "
                  "Application Managed (AME) in the library's management interface or "
                  "operator panel, then retry\n" % (
                      device, _BAREOS_PARAMETERS_CONTROL[status.parameters_control],
                      status.parameters_control))
        err.flush()


def load_drive_key(transport, key, algorithm_index=None, ckod=False, raw_read=None,
                   decrypt_only=False, key_desc=None, clear=False, err=None,
                   file_key_desc=None):
    """Load (or with clear=True, clear) the drive key.

    Returns (DataEncryptionStatus read back, AlgorithmDescriptor used or None).
    key: the 32 bytes for the KEY field (drive_key_bytes(passphrase) for
    Bareos tapes).  raw_read: None (algorithm default), True or False.
    file_key_desc: a key descriptor that is dropped, with a warning, when the
    drive cannot take it (stenc key files carry one).
    """
    device = transport.device
    err = err or sys.stderr
    check_encryption_support(transport)
    status = read_drive_status(transport)
    if not clear:
        _warn_not_application_managed(device, status, err)
    try:
        capabilities = read_capabilities(transport)
    except ScsiError as e:
        if e.exit_code == EXIT_NO_ENCRYPTION and e.sense is not None and e.sense.asc == 0x20:
            raise
        debug(1, "%s: capabilities page unreadable (%s); using algorithm index 1 as Bareos "
              "does" % (device, e))
        capabilities = None
    if clear:
        algorithm = None
        index = algorithm_index
        if index is None and capabilities is not None:
            gcm = [a for a in capabilities.algorithms
                   if a.security_algorithm_code == ALGORITHM_AES_256_GCM]
            index = gcm[0].algorithm_index if gcm else None
        page = bareos_clear_key_page(1 if index is None else index)
    else:
        algorithm = choose_algorithm(capabilities, algorithm_index, decrypt_only, device)
        index = algorithm.algorithm_index if algorithm is not None else (
            1 if algorithm_index is None else algorithm_index)
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
        rdmc = RDMC_DEFAULT if raw_read is None else (RDMC_ENABLED if raw_read
                                                      else RDMC_DISABLED)
        page = build_set_data_encryption_page(
            key, ENCRYPTION_MODE_DISABLE if decrypt_only else ENCRYPTION_MODE_ENCRYPT,
            DECRYPTION_MODE_MIXED, index, ckod=ckod, rdmc=rdmc, kad_format=kad_format,
            kads=kads)
    debug(1, "%s: set data encryption page: %s, algorithm index %s, %d bytes" % (
        device, "clear" if clear else "load key", index, len(page)))
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
        raise
    return read_drive_status(transport), algorithm


def _key_loaded_line(device, status, algorithm):
    name = (algorithm_name(algorithm.security_algorithm_code, algorithm.key_length)
            if algorithm is not None else "algorithm")
    return ("%s: key loaded: %s (index %d), encryption %s, decryption %s, key instance "
            "counter %d\n" % (device, name, status.algorithm_index,
                              _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                              _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
                              status.key_instance_counter))


def op_load_passphrase(device, passphrase, out=None, timeout=DEFAULT_SCSI_TIMEOUT,
                       transport=None, **options):
    """Load a Bareos passphrase into the drive as Bareos does (key bytes
    passphrase[:31] + NUL), choosing the AES-256-GCM index from the drive.

    options: algorithm_index, ckod, raw_read, decrypt_only, key_desc.  Prints
    a confirmation line to `out` when given; returns EXIT_OK.
    """
    return op_load_key(device, drive_key_bytes(passphrase), out, timeout, transport,
                       **options)


def op_load_key(device, key, out=None, timeout=DEFAULT_SCSI_TIMEOUT, transport=None,
                **options):
    """Load 32 raw key bytes (see op_load_passphrase for the options)."""
    if len(key) != DRIVE_KEY_LENGTH:
        raise KeyFileError("a drive key is %d bytes, got %d" % (DRIVE_KEY_LENGTH, len(key)))
    with _drive(device, timeout, transport) as t:
        status, algorithm = load_drive_key(t, key, **options)
    if out is not None:
        out.write(_key_loaded_line(device, status, algorithm))
        out.flush()
    return EXIT_OK


def op_clear_key(device, out=None, timeout=DEFAULT_SCSI_TIMEOUT, transport=None,
                 algorithm_index=None):
    """-c / clear-key: encryption and decryption off, zero key (Bareos's page)."""
    with _drive(device, timeout, transport) as t:
        status, _ = load_drive_key(t, bytes(DRIVE_KEY_LENGTH), clear=True,
                                   algorithm_index=algorithm_index)
    if out is not None:
        out.write("%s: key cleared: encryption %s, decryption %s, key instance counter %d\n"
                  % (device, _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                     _name(DECRYPTION_MODE_NAMES, status.decryption_mode),
                     status.key_instance_counter))
        out.flush()
    return EXIT_OK


def read_set_key_source(key_file=None, kek_file=None, base64=False, hex_key_file=None,
                        prompt=True):
    """(32 key bytes, description or None) from the set-key inputs.

    A Bareos key file gives drive_key_bytes(passphrase): with a KEK it is
    unwrapped, with -b base64-decoded (Bareos's -s ignores -b and would load
    the base64 text itself), otherwise its text is the passphrase.
    """
    if hex_key_file is not None:
        return parse_hex_key_file(read_input(hex_key_file, "hex key file", 4096), hex_key_file)
    kek_text = read_key_file(kek_file, "KEK file") if kek_file is not None else None
    text = read_key_file(key_file, prompt=prompt)
    name = "stdin" if key_file == "-" else key_file
    passphrase = passphrase_from_key_text(text, name, kek_text, kek_file, base64)
    return drive_key_bytes(passphrase), None


def op_set_key(device, key_file=None, kek_file=None, base64=False, hex_key_file=None,
               timeout=DEFAULT_SCSI_TIMEOUT, out=None, key_desc=None, prompt=True,
               **options):
    """-s / set-key: load the key from a Bareos key file (or a stenc hex key file).

    A description line in a hex key file becomes the key descriptor when the
    drive takes one; --key-desc wins over it.
    """
    key, description = read_set_key_source(key_file, kek_file, base64, hex_key_file, prompt)
    if key_desc is None and description is not None:
        options["file_key_desc"] = description
    return op_load_key(device, key, out, timeout, key_desc=key_desc, **options)


def _json_dump(obj, out):
    import json
    out.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
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
    try:
        capabilities = read_capabilities(transport)
    except ScsiError as e:
        debug(1, "%s: %s" % (transport.device, e))
        capabilities = None
    try:
        next_block, why = read_next_block_status(transport), None
    except ScsiError as e:
        next_block = None
        why = ("no tape loaded" if e.exit_code == EXIT_NOT_READY
               else sense_text(e.sense) if e.sense is not None else str(e))
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
        lines.append(i + "Key descriptor (%s): %s" % (_name(KAD_TYPE_NAMES, kad.descriptor_type),
                                                      _kad_text(kad)))
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
        if next_block.encryption_status in (4, 5, 6):
            lines.append(i + "Algorithm index: %d" % next_block.algorithm_index)
        for kad in next_block.kads:
            lines.append(i + "Key descriptor (%s): %s" % (
                _name(KAD_TYPE_NAMES, kad.descriptor_type), _kad_text(kad)))
    return "\n".join(lines) + "\n"


def op_volume_status(device, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT, out=None,
                     transport=None):
    """-v / volume-status: the next block's encryption status (Bareos's text or JSON)."""
    out = out or sys.stdout
    with _drive(device, timeout, transport) as t:
        check_encryption_support(t)
        nbes = read_next_block_status(t)
    if as_json:
        _json_dump({"device": device, "next_block_status": next_block_status_dict(nbes)}, out)
        return EXIT_OK
    out.write(format_volume_status_bareos(nbes))
    out.flush()
    return EXIT_OK


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


def op_kek_from_config(path, director=None, dest=None, print_kek=False, force=False, out=None):
    """kek-from-config: copy a director's KEK out of a Bareos config into a
    0600 key file usable with -w/--kek; printed only when asked to."""
    found = find_config_kek(path, director)
    where = "Director %r (%s line %d)" % (found.director, found.path, found.line)
    if print_kek:
        out = out or _stdout_bytes()
        out.write(found.kek + b"\n")
        out.flush()
        return EXIT_OK
    # A key file loses trailing spaces and all after 64 bytes (Bareos's
    # rule); refuse if that would change the AES key Bareos derives.
    if kek_from_text(strip_key_text(found.kek)) != kek_from_text(found.kek):
        raise KeyFileError("the Key Encryption Key of %s ends in spaces within its first %d "
                           "bytes, which a key file cannot keep; use --kek-from %s instead of "
                           "a file" % (where, KEK_LENGTH, path))
    write_private_file(dest, found.kek, force, stream_data=found.kek + b"\n")
    report_output(sys.stdout, "wrote the Key Encryption Key of %s to %s (mode 0600)\n"
                  % (where, dest), "%s was written" % dest)
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
                 "and add them with `bscrypto populate-cache %%s --from-catalog media.txt`, "
                 "or pass --catalog media.txt" % CATALOG_EXPORT_SQL)


def _label_failure(device, error, timeout, transport):
    """The load error for a label that cannot be read, with the drive's key state
    when the drive can tell it (a key in decrypt mode refuses the plain label)."""
    hint = "; or give --volume NAME to skip reading the label"
    text = "load: reading the volume label failed: %s" % error
    if error.exit_code == EXIT_LABEL and "I/O error" in str(error):
        try:
            status = get_drive_status(device, timeout, transport)
        except BscryptoError as e:
            debug(1, "%s: no encryption status after the failed label read: %s" % (device, e))
            status = None
        if status is not None and status.decryption_mode in (DECRYPTION_MODE_RAW,
                                                             DECRYPTION_MODE_DECRYPT):
            text = ("load: reading the volume label failed: %s: %s reading the first block: "
                    "a key is loaded with decryption mode %s, which refuses the unencrypted "
                    "label: clear it with `bscrypto clear-key %s` and retry"
                    % (device, os.strerror(errno.EIO),
                       _BAREOS_DECRYPTION_MODE[status.decryption_mode], device))
        elif status is not None:
            text += " (the drive holds no key that refuses the label)"
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
    lower = want.lower()
    close = sorted({_shown(n) for n in names if n.lower() == lower and n != want})
    if close:
        text += "; names differing only in case: %s" % ", ".join(close)
    if cache and catalog is None:
        text += ": the cache only holds volumes mounted in the last 60 days; " + (
            _CATALOG_HINT % cache)
    elif catalog is not None:
        text += ": export the catalog again (the volume may be newer than the export) or check " \
                "the name on the tape with `bscrypto label`"
    return text


def op_load_volume(device, cache=None, catalog=None, kek_text=None, kek_source=None,
                   volume=None, as_json=False, timeout=DEFAULT_SCSI_TIMEOUT,
                   algorithm_index=None, ops=None, transport=None, out=None):
    """load: read the label, find the volume's key in the cache and/or a catalog
    export, unwrap it, load it as Bareos does and confirm Encrypt + Mixed.

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
    # 5. Load it with Bareos's key bytes and 6. confirm.
    try:
        with _drive(device, timeout, transport) as t:
            status, algorithm = load_drive_key(t, drive_key_bytes(passphrase),
                                               algorithm_index=algorithm_index)
    except BscryptoError as e:
        raise BscryptoError("load: loading the key of volume %s into the drive failed: %s"
                            % (shown, e), e.exit_code)
    if (status.encryption_mode, status.decryption_mode) != (ENCRYPTION_MODE_ENCRYPT,
                                                             DECRYPTION_MODE_MIXED):
        raise BscryptoError(
            "load: the drive took the key of volume %s but reports encryption mode %s and "
            "decryption mode %s, not Encrypt and Mixed: check `bscrypto drive-status --detail "
            "%s` (a library or key manager may control the drive)" % (
                shown, _BAREOS_ENCRYPTION_MODE.get(status.encryption_mode, "?"),
                _BAREOS_DECRYPTION_MODE.get(status.decryption_mode, "?"), device),
            EXIT_KEY_REFUSED)
    name = (algorithm_name(algorithm.security_algorithm_code, algorithm.key_length)
            if algorithm is not None else None)
    if as_json:
        record = {"device": device, "volume": shown,
                  "volume_from": "label" if label is not None else "--volume",
                  "key_source": source, "wrapped": wrapped, "kek_source": kek_source,
                  "algorithm": name, "algorithm_index": status.algorithm_index,
                  "key_instance_counter": status.key_instance_counter,
                  "encryption_mode": _name(ENCRYPTION_MODE_NAMES, status.encryption_mode),
                  "decryption_mode": _name(DECRYPTION_MODE_NAMES, status.decryption_mode)}
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
             "the drive now reads this volume's encrypted blocks; clear the key with "
             "`bscrypto clear-key %s` when done" % device]
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK


# -- populate-cache --from-catalog --


def op_populate_from_catalog(path, export_path, now=None, layout=None, backup=False,
                             skip_bad_lines=False, out=None):
    """Add a catalog export's volumes with keys to the cache with Bareos's rules
    (under the lock, atomic write); print the counts on stdout."""
    export = read_catalog_export(export_path)
    if export.bad:
        _report_bad_lines(export.bad, path, skip_bad_lines)
    stats, write = update_cache(path, export.entries, resolve_now(now), layout, backup)
    report_output(out or sys.stdout, "%s: from catalog export %s (%s): %d read, %d added, "
                  "%d updated, %d unchanged, %d skipped without a key, %d bad lines%s; %d "
                  "expired removed; %s\n" % (
                      path, "stdin" if export_path == "-" else export_path, export.format,
                      export.read, stats["added"], stats["updated"], stats["unchanged"],
                      export.skipped, len(export.bad), " skipped" if export.bad else "",
                      stats["expired_removed"],
                      "written" if write else "nothing changed, not written"),
                  "%s was %s" % (path, "written" if write else "not changed"))
    return EXIT_OK


# -- rewrap: KEK rotation --


def rewrap_keys(keys, old_kek_text, new_kek_text, wrap_unwrapped=False, progress=None):
    """Re-wrap each distinct key text under the new KEK, each result verified.

    Returns (new key by old key, failures {key: why}, plain [keys not wrapped
    that were left alone]).  A wrapped key must unwrap with the old KEK; a
    plain one is wrapped only with wrap_unwrapped.  Deterministic: RFC 3394
    with the default IV gives one wrapped form per passphrase and KEK.
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
                failures[key] = "integrity check failed with the old KEK"
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
              out=None, progress_stream=None):
    """rewrap: re-wrap every key of a cache and/or catalog export with a new KEK.

    All keys are unwrapped, re-wrapped and verified first; any failure writes
    nothing.  Then the SQL file (0600), then the cache (atomic, `added` kept).
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
            # Checked now, written to a temporary file before the cache and
            # published after it: a cache that cannot be written leaves no SQL.
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
        if cache:
            build_cache(new_entries, layout)        # refuse before writing anything
        if sql is not None:
            sql_file.prepare(sql)
        if cache:
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
                                   % (e, cache) if cache else str(e))
    if export is None:
        warn("only the cache's volumes were re-wrapped: the catalog's other volumes keep keys "
             "wrapped with the old KEK; export the catalog and rewrap it too (--catalog EXPORT "
             "--sql-out FILE)")
    done = []
    if cache:
        done.append("crypto cache %s: %d entries re-wrapped, times added kept%s"
                    % (cache, len(entries), " (old copy kept as .bak)" if backup else ""))
    if sql is not None:
        done.append("%s: %d UPDATE statements (mode 0600)" % (sql_out, sql.count(b"\nUPDATE ")))
    text = ["rewrap: %d distinct keys unwrapped with %s, wrapped with %s and verified\n"
            % (len(new_keys), kek_sources[0], kek_sources[1])]
    text.extend("rewrap: %s\n" % line for line in done)
    text.append("rewrap: next: %sset Key Encryption Key to the new KEK in the Director "
                "resources of bareos-dir and bareos-sd, and restart both\n"
                % ("apply %s to the catalog, then " % sql_out if sql is not None else ""))
    report_output(out or sys.stdout, "".join(text),
                  "rewrap finished (%s written)" % " and ".join(
                      [cache] * bool(cache) + [sql_out] * (sql is not None)))
    return EXIT_OK


# -- check: DR readiness for cron (exit 0 healthy, 1 problems, 2 could not check) --


def check_keys(entries, kek_text, now, days, export=None, progress=None):
    """Check cache entries (and an export) for DR readiness; a dict of counts
    with "problems", one text line each.

    Every cache entry must decode and unwrap, none may expire within `days`,
    and every catalog volume with a key must be cached with the same key
    (the same passphrase in another form counts as the same key).
    """
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
                passphrases[key], why[key] = None, ("fails the integrity check: does not "
                                                    "unwrap with the KEK")
        return passphrases[key]

    problems = [] if entries else ["the cache holds no entries: nothing to recover with"]
    report = {"entries": len(entries), "wrapped": 0, "plain": 0, "next_expiry": None,
              "problems": problems}
    limit = now + days * 86400
    by_name = {}
    for e in entries:
        by_name.setdefault(e.volume_name, []).append(e)
        name = _shown(e.volume_name)
        if passphrase(e.encryption_key) is None:
            problems.append("volume %s: cache key %s" % (name, why[e.encryption_key]))
        else:
            report["wrapped" if forms[e.encryption_key] else "plain"] += 1
        expires = e.added + CACHE_EXPIRY_SECONDS
        if report["next_expiry"] is None or expires < report["next_expiry"][0]:
            report["next_expiry"] = (expires, name)
        if expires < now:
            problems.append("volume %s: expired %s (Bareos drops it at its next cache update)"
                            % (name, _local_time(expires)))
        elif expires < limit:
            problems.append("volume %s: expires %s, within %d days"
                            % (name, _local_time(expires), days))
    for name, same in by_name.items():
        if len({e.encryption_key for e in same}) > 1:
            problems.append("volume %s: %d cache entries with different keys"
                            % (_shown(name), len(same)))
    if export is not None:
        report.update(catalog=len(export.entries), catalog_same=0,
                      catalog_skipped=export.skipped)
        for number, problem in export.bad:
            problems.append("catalog line %d: %s" % (number, problem))
        for name, key in export.entries:
            cached = by_name.get(name)
            mine = passphrase(key)
            if mine is None:
                problems.append("volume %s: catalog key %s" % (_shown(name), why[key]))
            elif not cached:
                problems.append("volume %s: has a key in the catalog but is not in the cache"
                                % _shown(name))
            elif any(e.encryption_key == key or passphrase(e.encryption_key) == mine
                     for e in cached):
                report["catalog_same"] += 1
            else:
                problems.append("volume %s: the cache holds a different key than the catalog"
                                % _shown(name))
    if progress is not None:
        progress.finish()
    return report


def op_check(cache, kek_text=None, kek_source=None, days=DEFAULT_CHECK_DAYS, catalog=None,
             now=None, out=None, progress_stream=None):
    """check: a summary and one line per problem on stdout; returns CHECK_HEALTHY
    or CHECK_PROBLEMS, raises with CHECK_UNABLE when it cannot check."""
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
                        _Progress("check", len(keys), progress_stream))
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
    out = out or sys.stdout
    out.write("".join("check: %s\n" % line for line in lines))
    out.write("".join("problem: %s\n" % line for line in problems))
    out.write("check: %s\n" % ("%d problem%s" % (len(problems), "" if len(problems) == 1 else "s")
                               if problems else "healthy"))
    out.flush()
    return CHECK_PROBLEMS if problems else CHECK_HEALTHY


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


def op_backup_cache(path, directory, keep=DEFAULT_BACKUP_KEEP, out=None):
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
        return _backup_into(path, directory, dir_fd, base, data, count, keep, out)
    finally:
        os.close(dir_fd)


def _backup_into(path, directory, dir_fd, base, data, count, keep, out):
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
    report_output(out or sys.stdout, "backup-cache: %s -> %s (%d entries, %d bytes, mode 0600, "
                  "read back and verified); %d older cop%s removed, keeping %d\n"
                  % (path, target, count, len(data), len(pruned),
                     "y" if len(pruned) == 1 else "ies", keep),
                  "the copy %s was written and verified" % target)
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line: the subcommands
# ---------------------------------------------------------------------------
#
# Each group adds its subcommands; _command_parser() builds them all.


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
    p.add_argument("-b", "--base64", action="store_true", help="the file holds base64")
    p.set_defaults(run=lambda ns: op_show_key(ns.file, ns.kek, ns.base64,
                                              prompt=sys.stdin.isatty()))

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
                       description="Read VolumeName<TAB>EncryptionKey lines from standard "
                                   "input and update the cache with Bareos's rules: a known "
                                   "name gets the new key and time now, expired entries go, "
                                   "new names are appended. Any bad line: nothing is written.")
    cache_arg(p)
    writer_args(p)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="warn about bad input lines and apply the good ones")
    # recovery: --from-catalog reads a catalog export instead of stdin (op in recovery ops)
    p.add_argument("--from-catalog", metavar="EXPORT",
                   help="read the volumes and keys from a catalog export instead of stdin "
                        "(psql -A -t -F '|' output, or CSV with a VolumeName,EncryptionKey "
                        "header; '-' for stdin); prints the counts")
    p.set_defaults(run=lambda ns: op_populate_from_catalog(
        ns.cache, ns.from_catalog, ns.now, ns.layout, ns.backup, ns.skip_bad_lines)
        if ns.from_catalog else op_populate_cache(ns.cache, ns.now, ns.layout, ns.backup,
                                                  ns.skip_bad_lines, summary=True))

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
        description="Load the key of a Bareos key file into the drive, as Bareos does "
                    "(key bytes: passphrase[:31] + NUL), with the drive's AES-256-GCM "
                    "algorithm index read from its capabilities page.")
    p.add_argument("device", help="tape device, e.g. /dev/nst0 or /dev/sg1")
    p.add_argument("keyfile", nargs="?", help="Bareos key file ('-' reads stdin)")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="the key file is wrapped with this KEK")
    p.add_argument("-b", "--base64", action="store_true", help="the key file holds base64")
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
    p.set_defaults(run=_run_set_key)

    p = sub.add_parser("clear-key", parents=parents, help="clear the drive key (as -c)",
                       description="Turn the drive's encryption and decryption off and "
                                   "replace its key with zeros (Bareos's clear page).")
    p.add_argument("device", help="tape device, e.g. /dev/nst0 or /dev/sg1")
    p.add_argument("--algorithm-index", metavar="N", type=int,
                   help="algorithm index to send (default: the drive's AES-256-GCM, else 1)")
    p.set_defaults(run=lambda ns: op_clear_key(ns.device, sys.stdout, ns.timeout,
                                               algorithm_index=ns.algorithm_index))

    p = sub.add_parser("drive-status", parents=parents,
                       help="show the drive's encryption status (as -e)",
                       description="Print the drive's data encryption status in Bareos's "
                                   "words; --detail adds the drive's identity, algorithms, "
                                   "key instance counter, key descriptor and next block.")
    p.add_argument("device", help="tape device, e.g. /dev/nst0 or /dev/sg1")
    p.add_argument("--detail", action="store_true", help="more than Bareos prints")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=lambda ns: op_drive_status(ns.device, ns.detail, ns.json, ns.timeout))

    p = sub.add_parser("volume-status", parents=parents,
                       help="show the next block's encryption status (as -v)",
                       description="Print the encryption status of the block at the tape's "
                                   "current position, in Bareos's words.")
    p.add_argument("device", help="tape device, e.g. /dev/nst0 or /dev/sg1")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=lambda ns: op_volume_status(ns.device, ns.json, ns.timeout))


def _run_set_key(ns):
    if (ns.keyfile is None) == (ns.hex_key is None):
        raise UsageError("set-key needs a key file or --hex-key FILE (one of them)")
    if ns.hex_key is not None and (ns.kek or ns.base64):
        raise UsageError("--hex-key takes a raw key: -w and -b do not apply")
    return op_set_key(ns.device, ns.keyfile, ns.kek, ns.base64, ns.hex_key, ns.timeout,
                      sys.stdout, key_desc=ns.key_desc, algorithm_index=ns.algorithm_index,
                      ckod=ns.ckod, raw_read=ns.raw_read, decrypt_only=ns.decrypt_only,
                      prompt=sys.stdin.isatty())


def _add_recovery_commands(sub, common):
    """Disaster-recovery subcommands."""
    p = sub.add_parser(
        "label", parents=[common], help="show the Bareos volume label of a tape or volume file",
        description="Read the first block of a Bareos volume and print its label (volume "
                    "name, pool, media type, label times). A tape device is rewound, one "
                    "block is read and it is rewound again; nothing is written and the "
                    "drive's block mode is not changed. The label is never encrypted: if the "
                    "read fails with an I/O error while a key is loaded, clear it first. A "
                    "file is read as a Bareos File volume; '-' reads a block from stdin.")
    p.add_argument("source", metavar="DEVICE|FILE", help="tape device (/dev/nst0) or volume file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the label as JSON")
    fmt.add_argument("--name", action="store_true", help="print only the volume name")
    p.set_defaults(run=lambda ns: op_label(ns.source, ns.json, ns.name))

    p = sub.add_parser(
        "kek-from-config", parents=[common],
        help="copy the Key Encryption Key from a Bareos config into a key file",
        description="Find 'Key Encryption Key' in the Director resources of a Bareos "
                    "configuration (bareos-sd.conf, bareos-dir.conf, a bareos-sd.d or "
                    "bareos-dir.d directory, or /etc/bareos) and write it to a new key file, "
                    "mode 0600, for use with -w/--kek. The key is printed only with --print. "
                    "@include lines are not followed; they are reported.")
    p.add_argument("config", metavar="CONFIG", help="configuration file or directory")
    p.add_argument("--director", metavar="NAME",
                   help="the Director resource to use when several have a Key Encryption Key")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE", help="key file to create (mode 0600)")
    dest.add_argument("--print", action="store_true", dest="print_kek",
                      help="print the key on stdout instead")
    p.add_argument("--force", action="store_true", help="replace a non-empty existing --out file")
    p.set_defaults(run=lambda ns: op_kek_from_config(ns.config, ns.director, ns.out,
                                                     ns.print_kek, ns.force))

    p = sub.add_parser(
        "load", parents=[common],
        help="load the key of the tape in the drive: label, cache/catalog, KEK, drive",
        description="One-step recovery: read the volume label from DEVICE (rewound before "
                    "and after, never written), find the volume's key in the crypto cache "
                    "and/or a catalog export, unwrap it with the KEK if it is wrapped (54 "
                    "characters; 43 characters is a key that is not wrapped), load it into "
                    "the drive as Bareos does and confirm encryption Encrypt and decryption "
                    "Mixed. Every failure names its step and what to try. The key is never "
                    "printed.")
    p.add_argument("device", metavar="DEVICE", help="tape device, e.g. /dev/nst0")
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
    p.set_defaults(run=lambda ns: op_load_volume(
        ns.device, ns.cache, ns.catalog, kek_from_arguments(ns),
        _kek_description(ns.kek, ns.kek_from, ns.director), ns.volume, ns.json, ns.timeout,
        ns.algorithm_index))

    p = sub.add_parser(
        "rewrap", parents=[common], help="re-wrap every key with a new KEK (KEK rotation)",
        description="Unwrap every key of the crypto cache and/or a catalog export with the "
                    "old KEK, wrap it with the new one and check that it unwraps to the same "
                    "passphrase, all before writing anything: one key that fails aborts with "
                    "the list of failing volumes. Then writes UPDATE statements for the "
                    "catalog to --sql-out (mode 0600) and the cache (atomically, times added "
                    "kept). Keys that are not wrapped stop it unless --wrap-unwrapped.")
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
    p.set_defaults(run=_run_rewrap)

    p = sub.add_parser(
        "check", parents=[common], help="prove DR readiness of a crypto cache (for cron)",
        description="Check that every cache entry decodes and unwraps with the KEK, that "
                    "none expires within --max-age-days, and (with --catalog) that every "
                    "catalog volume with a key is cached with the same key. Prints a summary "
                    "and one 'problem:' line per problem. Exit 0 healthy, 1 problems found, "
                    "2 could not check (cache, KEK or export unreadable, bad arguments).")
    p.add_argument("--cache", metavar="CACHE", required=True, help="crypto cache to check")
    p.add_argument("-w", "--kek", metavar="KEKFILE", help="KEK file the keys are wrapped with")
    add_kek_from_arguments(p)
    p.add_argument("--max-age-days", metavar="N", type=int, default=DEFAULT_CHECK_DAYS,
                   help="report entries that expire within N days (default %d)"
                        % DEFAULT_CHECK_DAYS)
    p.add_argument("--catalog", metavar="EXPORT",
                   help="catalog export whose volumes must all be cached with the same key")
    p.add_argument("--now", metavar="EPOCH", type=int, help=NOW_HELP)
    p.usage_exit = CHECK_UNABLE  # cron: bad arguments are "could not check", not "problems"
    p.set_defaults(run=_run_check)

    p = sub.add_parser(
        "backup-cache", parents=[common], help="verified, timestamped copy of a crypto cache",
        description="Copy a readable crypto cache to DIR/<name>.<UTC time>.bak (mode 0600, "
                    "written atomically), read the copy back and compare it, then remove "
                    "this cache's older copies in DIR beyond --keep. Other files in DIR are "
                    "never touched. A cache that does not read is not copied.")
    p.add_argument("cache", metavar="CACHE", help="crypto cache file")
    p.add_argument("directory", metavar="DIR", help="directory for the copies")
    p.add_argument("--keep", metavar="N", type=int, default=DEFAULT_BACKUP_KEEP,
                   help="copies of this cache to keep, the new one included (default %d)"
                        % DEFAULT_BACKUP_KEEP)
    p.set_defaults(run=lambda ns: op_backup_cache(ns.cache, ns.directory, ns.keep))


def _named_kek(ns, which):
    """(KEK text, description) from --WHICH-kek or --WHICH-kek-from."""
    path = getattr(ns, which + "_kek")
    config = getattr(ns, which + "_kek_from")
    director = getattr(ns, which + "_director")
    if path and config:
        raise UsageError("give the %s KEK either with --%s-kek or with --%s-kek-from, not both"
                         % (which, which, which))
    if director and not config:
        raise UsageError("--%s-director only applies with --%s-kek-from" % (which, which))
    if path is not None:
        return read_key_file(path, "%s KEK file" % which), _kek_description(path)
    if config is not None:
        return kek_from_config(config, director), _kek_description(None, config, director)
    raise UsageError("rewrap needs the %s KEK: --%s-kek FILE or --%s-kek-from CONFIG"
                     % (which, which, which))


def _run_rewrap(ns):
    old, old_source = _named_kek(ns, "old")
    new, new_source = _named_kek(ns, "new")
    return op_rewrap(old, new, ns.cache, ns.catalog, ns.sql_out, ns.backup, ns.force,
                     ns.wrap_unwrapped, (old_source, new_source))


def _run_check(ns):
    try:
        kek_text = kek_from_arguments(ns)
    except BscryptoError as e:
        raise BscryptoError("check: could not check: %s" % e, CHECK_UNABLE)
    try:
        return op_check(ns.cache, kek_text, _kek_description(ns.kek, ns.kek_from, ns.director),
                        ns.max_age_days, ns.catalog, ns.now)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        raise OutputError("check: could not check: cannot write the report to standard "
                          "output: %s" % (e.strerror or e), CHECK_UNABLE)


_COMMAND_GROUPS = (_add_key_commands, _add_cache_commands, _add_drive_commands,
                   _add_recovery_commands)


def _command_parser():
    parser_class = _parser_class()
    common = parser_class(add_help=False)
    common.add_argument("-d", "--debug", metavar="N", type=int, default=0,
                        help="debug level (never shows key material)")
    p = parser_class(prog="bscrypto", epilog=_exit_code_epilog(),
                     formatter_class=parser_class.raw_formatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for add in _COMMAND_GROUPS:
        add(sub, common)
    return p, sub


def _command_names():
    _, sub = _command_parser()
    return list(sub.choices)


def _commands_epilog():
    _, sub = _command_parser()
    lines = ["commands (each has its own --help):"]
    for action in sub._choices_actions:
        lines.append("  %-18s %s" % (action.dest, action.help))
    return "\n".join(lines)


def _run_command(parser, argv):
    ns = parser.parse_args(argv)
    _set_debug(ns.debug)
    _refuse_empty_arguments(ns, CHECK_UNABLE if ns.command == "check" else EXIT_USAGE)
    return ns.run(ns)


def _refuse_empty_arguments(ns, exit_code=EXIT_USAGE):
    """An empty argument ('', an unset shell variable) is never taken as "none":
    `-w ''` would silently drop the wrap."""
    for name, value in sorted(vars(ns).items()):
        if value == "" and name != "key_desc":
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
    """-D, -p, -r (Bareos's order: the first one given runs)."""
    if ns.dump_cache:
        return op_dump_cache(ns.dump_cache, ns.json, ns.now)
    if ns.populate_cachefile:
        return op_populate_cache(ns.populate_cachefile, ns.now, ns.layout, ns.backup,
                                 ns.skip_bad_lines)
    if ns.reset_expiry_time:
        return op_reset_cache(ns.reset_expiry_time, ns.now, ns.layout, ns.backup)
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
                          timeout=timeout)
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


def _exit_code_epilog():
    return "exit codes:\n" + "\n".join("  %-3d %s" % c for c in EXIT_CODES)


_PARSER_CLASS = None


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
                self.print_usage(sys.stderr)
                self.exit(self.usage_exit, "%s: error: %s\n" % (self.prog, message))

        _PARSER_CLASS = Parser
    return _PARSER_CLASS


def _legacy_parser():
    class LegacyParser(_parser_class()):
        # The command list needs the full subcommand parser: build it only
        # when help is shown, not on every run.
        @property
        def epilog(self):
            return _commands_epilog() + "\n\n" + _exit_code_epilog()

        @epilog.setter
        def epilog(self, value):
            pass

    p = LegacyParser(
        prog="bscrypto",
        usage="%(prog)s <options> [<device_name>]\n"
              "       %(prog)s COMMAND ...   (see 'commands' below)",
        description="Bareos tape encryption keys, crypto cache and drive keys.",
        formatter_class=LegacyParser.raw_formatter)
    a = p.add_argument
    a("-b", "--base64", action="store_true", help="perform base64 encoding of keydata")
    a("-c", "--clear-encryption", action="store_true", help="clear encryption key")
    a("-D", "--dump-cache", metavar="<cachefile>", help="dump content of given cachefile")
    a("-d", "--debug", metavar="<nn>", type=int, default=0, help="set debug level to <nn>")
    a("-e", "--drive-encryption-status", action="store_true",
      help="show drive encryption status")
    a("-g", "--generate-passphrase", metavar="<keyfile>",
      help="generate new encryption passphrase in keyfile ('-' for stdout)")
    a("-k", "--show-keyfile", metavar="<keyfile>", help="show content of keyfile")
    a("-p", "--populate-cachefile", metavar="<cachefile>",
      help="populate given cachefile with crypto keys read from stdin")
    a("-r", "--reset-expiry-time", metavar="<cachefile>",
      help="reset expiry time for entries of given cachefile")
    a("-s", "--set-encryption-key", metavar="<keyfile>",
      help="set encryption key loaded from keyfile")
    a("-v", "--volume-encryption-status", action="store_true",
      help="show volume encryption status")
    a("-w", "--wrap-unwrap-key", metavar="<keyfile>",
      help="wrap/unwrap the key using RFC3394 aes-(un)wrap using the key in "
           "keyfile as a Key Encryption Key")
    # drive: SCSI command timeout (not in Bareos)
    a("--timeout", metavar="SECONDS", type=_timeout_arg, default=DEFAULT_SCSI_TIMEOUT,
      help="SCSI command timeout for -s, -c, -e, -v (default %d)" % DEFAULT_SCSI_TIMEOUT)
    # Crypto cache options (bscrypto.py additions, for -D, -p and -r).
    a("--json", action="store_true", help="-D: print the cache as JSON")
    a("--backup", action="store_true", help="-p, -r: first keep a timestamped copy of the cache")
    a("--now", metavar="EPOCH", type=int, help=NOW_HELP)
    a("--layout", choices=CACHE_LAYOUT_NAMES,
      help="-p, -r: write this cache layout (default: this host's)")
    a("--skip-bad-lines", action="store_true",
      help="-p: warn about bad input lines and apply the good ones")
    a("--force", action="store_true", help="allow -g to replace a non-empty key file")
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


def _run_legacy(argv):
    parser = _legacy_parser()
    ns = parser.parse_args(argv)
    _set_debug(ns.debug)
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


def _set_debug(level):
    global DEBUG_LEVEL
    DEBUG_LEVEL = level or 0


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

    def writable(self):
        return True

    def write(self, data):
        if self.failed:
            return len(data)
        self.failed = True
        raise OSError(errno.EBADF, "standard output is closed")


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
    _no_core_dumps()
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(_ClosedStream()), "utf-8")
    _utf8_stdout()
    try:
        try:
            if argv and not argv[0].startswith("-"):
                parser, sub = _command_parser()
                if argv[0] in sub.choices:
                    return _flushed(_run_command(parser, argv))
            return _flushed(_run_legacy(argv))
        except OSError as e:
            if e.errno not in OUTPUT_ERRNOS:
                raise
            # Only stdout writes get here: file errors are caught where they happen.
            raise OutputError("cannot write to standard output: %s" % (e.strerror or e))
    except BscryptoError as e:
        if isinstance(e, OutputError):
            _output_failed()
        try:
            sys.stderr.write("bscrypto: %s\n" % e)
        except (OSError, ValueError, AttributeError):
            pass
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bscrypto: interrupted\n")
        return 130
    except SystemExit as e:  # argparse: --help, --version, usage errors (Parser.error)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:
        if DEBUG_LEVEL:
            raise
        sys.stderr.write("bscrypto: internal error: %s: %s (rerun with -d 1 for a "
                         "traceback and please report it)\n" % (type(e).__name__, e))
        return EXIT_INTERNAL


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


if __name__ == "__main__":
    sys.exit(main())
