#!/usr/bin/env python3
"""bscrypto.py - Bareos tape encryption keys, crypto cache and LTO drive keys.

A drop-in, standard-library-only replacement for Bareos's ``bscrypto`` tool,
meant to be copied onto a bare rescue host.  Run ``bscrypto.py selftest``
first, then ``bscrypto.py --help``.

Sections, in the order data flows:
    constants and errors; AES and RFC 3394 key wrap; encodings and passphrases;
    key files; crypto cache; SCSI transport; SSC pages; operations; CLI.
"""

import os
import sys

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


# Debug level set by -d/--debug; debug() never receives key material.
DEBUG_LEVEL = 0


def debug(level, message):
    if DEBUG_LEVEL >= level:
        sys.stderr.write("bscrypto: debug: %s\n" % message)


# ---------------------------------------------------------------------------
# AES (FIPS-197) and RFC 3394 key wrap
# ---------------------------------------------------------------------------
#
# Word-oriented: the whole 16-byte state is one int.  A round unpacks its 16
# bytes and XORs one table entry per byte (the entry already holds SubBytes,
# ShiftRows and MixColumns for that byte, placed in its output column) with
# the round key: 16 look-ups and 16 XORs, no shifts or masks.  The 64 small
# tables are built on first use, so importing the module stays cheap.

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

_TABLES = None


def _aes_tables():
    """(enc rounds, enc final, dec rounds, dec final, InvMixColumns words)."""
    global _TABLES
    if _TABLES is None:
        sbox = _SBOX
        inv = bytearray(256)
        for i, v in enumerate(sbox):
            inv[v] = i
        inv = bytes(inv)
        # GF(2^8) doubling as a translate table; composing it gives x4, x8.
        x2 = bytes((i << 1) ^ (0x11B if i & 0x80 else 0) for i in range(256))
        x4 = x2.translate(x2)
        x8 = x4.translate(x2)
        s2 = sbox.translate(x2)
        # MixColumns column for input row 0: (2s, s, s, 3s); InvMixColumns: (14, 9, 13, 11).
        te = [a << 24 | s << 16 | s << 8 | (a ^ s) for s, a in zip(sbox, s2)]
        td = [(e ^ f ^ d) << 24 | (e ^ i) << 16 | (e ^ f ^ i) << 8 | (e ^ d ^ i)
              for i, d, f, e in zip(inv, inv.translate(x2), inv.translate(x4),
                                    inv.translate(x8))]

        def rotated(words, row):
            # Row r of a column is the row-0 column rotated right by 8*r bits.
            n = 8 * row
            return [(w >> n | w << (32 - n)) & 0xFFFFFFFF for w in words] if n else words

        def place(words_by_row, direction):
            # Input byte p = 4*col + row; ShiftRows moves it to column
            # (col - row) % 4, InvShiftRows to (col + row) % 4.
            tables = []
            for p in range(16):
                col, row = divmod(p, 4)
                shift = 32 * (3 - (col + direction * row) % 4)
                tables.append([w << shift for w in words_by_row[row]])
            return tuple(tables)

        def final(box):
            return [[b << (8 * (3 - row)) for b in box] for row in range(4)]

        td_rows = [rotated(td, r) for r in range(4)]
        _TABLES = (place([rotated(te, r) for r in range(4)], -1), place(final(sbox), -1),
                   place(td_rows, 1), place(final(inv), 1), td_rows)
    return _TABLES


def _aes_rounds(x, first, middle, last, tables, final):
    """All rounds of AES on a 128-bit int; the same code serves both directions."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = tables
    x ^= first
    for k in middle:
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = x.to_bytes(16, "big")
        x = (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7] ^ t8[b8]
             ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15] ^ k)
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = final
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = x.to_bytes(16, "big")
    return (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7] ^ t8[b8]
            ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15] ^ last)


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


# Key schedules by key: a KEK unwraps many keys, so expand it once.
_SCHEDULES = {}


def _key_schedule(key):
    sched = _SCHEDULES.get(key)
    if sched is None:
        if len(key) not in (16, 24, 32):
            raise ValueError("AES key must be 16, 24 or 32 bytes")
        enc_tables, enc_final, dec_tables, dec_final, td = _aes_tables()
        w = _expand_key(key)
        rounds = len(w) // 4
        ek = [w[4 * r] << 96 | w[4 * r + 1] << 64 | w[4 * r + 2] << 32 | w[4 * r + 3]
              for r in range(rounds)]
        # Equivalent inverse cipher: reversed round keys, the middle ones
        # through InvMixColumns (td[0..3] hold InvS, so S is applied first).
        sbox = _SBOX
        dk = [ek[-1]]
        for r in range(rounds - 2, 0, -1):
            k = 0
            for word in w[4 * r:4 * r + 4]:
                k = k << 32 | (td[0][sbox[word >> 24]] ^ td[1][sbox[word >> 16 & 255]]
                               ^ td[2][sbox[word >> 8 & 255]] ^ td[3][sbox[word & 255]])
            dk.append(k)
        dk.append(ek[0])
        sched = ((ek[0], tuple(ek[1:-1]), ek[-1], enc_tables, enc_final),
                 (dk[0], tuple(dk[1:-1]), dk[-1], dec_tables, dec_final))
        if len(_SCHEDULES) >= 16:
            _SCHEDULES.clear()
        _SCHEDULES[key] = sched
    return sched


class AES(object):
    """AES-128/192/256 on single 16-byte blocks (ECB); key schedule made once."""

    __slots__ = ("_enc", "_dec")

    def __init__(self, key):
        self._enc, self._dec = _key_schedule(bytes(key))

    def encrypt_int(self, block):
        """Encrypt one block given and returned as a 128-bit big-endian int."""
        return _aes_rounds(block, *self._enc)

    def decrypt_int(self, block):
        """Decrypt one block given and returned as a 128-bit big-endian int."""
        return _aes_rounds(block, *self._dec)

    def encrypt_block(self, block):
        if len(block) != 16:
            raise ValueError("AES block must be 16 bytes")
        return _aes_rounds(int.from_bytes(block, "big"), *self._enc).to_bytes(16, "big")

    def decrypt_block(self, block):
        if len(block) != 16:
            raise ValueError("AES block must be 16 bytes")
        return _aes_rounds(int.from_bytes(block, "big"), *self._dec).to_bytes(16, "big")


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
    enc = AES(kek).encrypt_int
    n = len(plaintext) // 8
    r = [int.from_bytes(plaintext[8 * i:8 * i + 8], "big") for i in range(n)]
    a = KEY_WRAP_IV
    t = 1
    for _ in range(6):
        for i in range(n):
            b = enc(a << 64 | r[i])
            a = (b >> 64) ^ t
            r[i] = b & _MASK64
            t += 1
    return b"".join(x.to_bytes(8, "big") for x in [a] + r)


def aes_key_unwrap(kek, wrapped):
    """RFC 3394 section 2.2.2 unwrap; UnwrapError when the check value differs."""
    _check_wrap_args(kek, wrapped, 24)
    dec = AES(kek).decrypt_int
    n = len(wrapped) // 8 - 1
    a = int.from_bytes(wrapped[:8], "big")
    r = [int.from_bytes(wrapped[8 * i + 8:8 * i + 16], "big") for i in range(n)]
    t = 6 * n
    for _ in range(6):
        for i in range(n - 1, -1, -1):
            b = dec((a ^ t) << 64 | r[i])
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
    import binascii
    return binascii.b2a_base64(bytes(data)).rstrip(b"=\n").decode("ascii")


def b64decode(text):
    """Decode Bareos base64: stops at the first space, padding optional.

    Bareos decodes invalid characters as zero bits; we refuse them instead,
    because a mistyped key silently becomes a different key.
    """
    import binascii
    if isinstance(text, str):
        text = text.encode("latin-1")
    text = text.split(b" ", 1)[0].rstrip(b"=")
    bad = set(text) - _B64_ALPHABET
    if bad:
        raise ValueError("not base64: contains %s" % ", ".join(
            repr(chr(c)) for c in sorted(bad)[:3]))
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
    if path == "-":
        if prompt:
            sys.stdout.write(KEY_PROMPT)
            sys.stdout.flush()
        data = _read_stdin_bytes(KEY_FILE_READ_LIMIT)
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(KEY_FILE_READ_LIMIT)
        except OSError as e:
            raise KeyFileError("cannot read %s %s: %s" % (what, path, e.strerror or e))
    text = strip_key_text(data)
    if not text:
        raise KeyFileError("%s %s is empty" % (what, "on stdin" if path == "-" else path))
    return text


def _read_stdin_bytes(limit):
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return sys.stdin.read(limit).encode("latin-1")
    data = b""
    while len(data) < limit:
        chunk = stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def write_private_file(path, data, force=False, mode=0o600):
    """Write a key file atomically, mode 0600, never clobbering a key silently.

    A temporary file in the same directory is written, fsynced and renamed,
    so a crash leaves the old file or the new one, never a torn key.
    """
    try:
        if os.path.getsize(path) > 0 and not force:
            raise KeyFileError("%s already exists and is not empty; a lost key is lost "
                               "data: choose another name or add --force" % path)
    except OSError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise KeyFileError("cannot write %s: %s" % (path, e.strerror or e))


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


# ---------------------------------------------------------------------------
# Crypto cache
# ---------------------------------------------------------------------------

# (cache: layout, read, update rules, atomic locked write)


# ---------------------------------------------------------------------------
# SCSI transport
# ---------------------------------------------------------------------------

# (transport: Linux SG_IO, Solaris USCSI, NetBSD/OpenBSD SCIOCCOMMAND, FreeBSD camcontrol)


# ---------------------------------------------------------------------------
# SSC pages: build and parse
# ---------------------------------------------------------------------------

# (pages: CDBs, SPIN/SPOUT pages, INQUIRY, sense decoding)


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

_RECORD_TYPES = {}


def _record_type(name, fields):
    """A namedtuple class made on first use: making one costs about a
    millisecond on Python 3.6, and most runs never need these."""
    cls = _RECORD_TYPES.get(name)
    if cls is None:
        from collections import namedtuple
        cls = _RECORD_TYPES[name] = namedtuple(name, fields)
    return cls


class _LabelReader(object):
    """Bounds-checked reads over the label data (Bareos's unserialisers do
    not check bounds; a damaged block must not read past its record)."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def unpack(self, fmt, what):
        import struct
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
    import struct
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
    block_header = _record_type("BlockHeader", _BLOCK_HEADER_FIELDS)(
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
    record = _record_type("RecordHeader", _RECORD_HEADER_FIELDS)(*rec)
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
    return _record_type("VolumeLabel", _VOLUME_LABEL_FIELDS)(
        record.FileIndex, record.data_len, _label_text(label_id), ver_num,
        label_btime, write_btime, label_date, label_time, write_date, write_time,
        *(strings + [block_header, record]))


def _btime_text(btime, iso=False):
    """A btime (microseconds since 1970) as local time, or why it cannot be."""
    import time
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
    import struct
    return _linux_ioc("r", "m", 2, struct.calcsize("@5l2i"), machine)


class TapeIO(object):
    """The system calls `label` makes; tests pass a fake that records them."""

    platform = sys.platform

    def stat(self, path):
        return os.stat(path)

    def open(self, path, flags):
        return os.open(path, flags)

    def ioctl(self, fd, request, arg):
        import fcntl
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
    import struct
    data = _read_up_to(read, 65536)
    if len(data) >= 16 and data[12:16] in (b"BB01", b"BB02"):
        (block_len,) = struct.unpack_from(">I", data, 4)
        if len(data) < block_len <= MAX_BLOCK_LENGTH:
            data += _read_up_to(read, block_len - len(data))
    return data


def _mt_rewind(ops, fd, path):
    import errno
    import struct
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
    import struct
    try:
        raw = ops.ioctl(fd, mtiocget_request(), bytes(struct.calcsize("@5l2i")))
        return struct.unpack("@5l2i", raw)[2] & MT_ST_BLKSIZE_MASK
    except (OSError, struct.error):
        return None


def _tape_read_error(ops, fd, path, e):
    import errno
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
    import errno
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
    import errno
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
    import stat
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
    ConfigKek = _record_type("ConfigKek", _CONFIG_KEK_FIELDS)
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
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise KeyFileError("cannot read %s: %s" % (name, e.strerror or e))
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise KeyFileError("%s is UTF-16; Bareos reads UTF-8 configuration files" % name)
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]        # UTF-8 byte order mark, skipped as Bareos does
        # latin-1 maps every byte to one character, so the KEK's bytes survive.
        found, inc = parse_config_keks(data.decode("latin-1"), name)
        keks.extend(found)
        includes.extend(inc)
    return keks, includes


def _warn(message):
    sys.stderr.write("bscrypto: warning: %s\n" % message)


def find_config_kek(path, director=None, warn=_warn):
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
    if kek_file:
        return read_key_file(kek_file, "KEK file")
    if ns.kek_from:
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


def _catalog_rows(text, delimiter):
    """(line number, [cells]) of each non-blank line."""
    if delimiter == ",":
        import csv
        import io
        reader = csv.reader(io.StringIO(text, newline=""))
        start = 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1
        return
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
    for number, cells in _catalog_rows(text, delimiter):
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
        if problem:
            bad.append((number, "volume %s: %s" % (volume, problem)))
            continue
        if volume in seen:
            if seen[volume][1] != key:
                bad.append((number, "volume %s is also on line %d, with a different key"
                            % (volume, seen[volume][0])))
            continue
        seen[volume] = (number, key)
        entries.append((volume, key))
    fmt = {"|": "psql", "\t": "tab-separated", ",": "csv"}[delimiter]
    return _record_type("CatalogExport", _CATALOG_EXPORT_FIELDS)(entries, read, skipped, bad, fmt)


def read_catalog_export(path):
    """parse_catalog_export of a file ('-' for stdin)."""
    if path == "-":
        data = getattr(sys.stdin, "buffer", sys.stdin).read()
        source = "stdin"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise KeyFileError("cannot read catalog export %s: %s" % (path, e.strerror or e))
        source = path
    if isinstance(data, bytes):
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

# -- key operations --


def op_generate(dest, kek_path=None, base64=False, force=False, out=None):
    """-g: make a new passphrase (optionally base64 or wrapped) into dest."""
    kek_text = read_key_file(kek_path, "KEK file") if kek_path else None
    text = make_key_text(generate_passphrase(), kek_text, base64)
    if dest == "-":
        out = out or _stdout_bytes()
        out.write(text + b"\n")
        out.flush()
    else:
        write_private_file(dest, text, force=force)
        debug(1, "wrote %d-byte key file %s (mode 0600)" % (len(text), dest))
    return EXIT_OK


def op_show_key(source, kek_path=None, base64=False, prompt=True, out=None):
    """-k: print the passphrase held in a key file."""
    kek_text = read_key_file(kek_path, "KEK file") if kek_path else None
    text = read_key_file(source, prompt=prompt)
    name = "stdin" if source == "-" else source
    passphrase = passphrase_from_key_text(text, name, kek_text, kek_path, base64)
    out = out or _stdout_bytes()
    out.write(passphrase + b"\n")
    out.flush()
    return EXIT_OK


def _stdout_bytes():
    return getattr(sys.stdout, "buffer", sys.stdout)


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


# -- drive operations --


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
    write_private_file(dest, found.kek, force=force)
    sys.stdout.write("wrote the Key Encryption Key of %s to %s (mode 0600)\n" % (where, dest))
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
#
# Two faces: Bareos's original flags (drop-in for scripts, same messages and
# exit codes) and subcommands with readable names.  A first argument that is a
# subcommand name selects the second face.


def _exit_code_epilog():
    return "exit codes:\n" + "\n".join("  %-3d %s" % c for c in EXIT_CODES)


def _legacy_parser():
    import argparse

    class LegacyParser(argparse.ArgumentParser):
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
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    problem = _legacy_checks(ns)
    if problem:
        sys.stderr.write(problem + "\n")
        if problem.startswith("Missing"):
            parser.print_usage(sys.stderr)
        return EXIT_USAGE
    # Bareos's order of precedence: cache, then key files, then the drive.
    for dispatch in (_legacy_cache_ops, _legacy_key_ops, _legacy_drive_ops):
        rc = dispatch(ns)
        if rc is not None:
            return rc
    return EXIT_OK


def _set_debug(level):
    global DEBUG_LEVEL
    DEBUG_LEVEL = level or 0


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


def _legacy_key_ops(ns):
    if ns.generate_passphrase:
        return op_generate(ns.generate_passphrase, ns.wrap_unwrap_key, ns.base64, ns.force)
    if ns.show_keyfile:
        return op_show_key(ns.show_keyfile, ns.wrap_unwrap_key, ns.base64)
    return None


def _add_cache_commands(sub, common):
    """Crypto cache subcommands."""


def _legacy_cache_ops(ns):
    """-D, -p, -r."""
    return None


def _add_drive_commands(sub, common):
    """Drive subcommands."""


def _legacy_drive_ops(ns):
    """-c, -e, -s, -v."""
    return None


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


_COMMAND_GROUPS = (_add_key_commands, _add_cache_commands, _add_drive_commands,
                   _add_recovery_commands)


def _command_parser():
    import argparse
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-d", "--debug", metavar="N", type=int, default=0,
                        help="debug level (never shows key material)")
    p = argparse.ArgumentParser(prog="bscrypto", epilog=_exit_code_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
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


def _run_command(argv):
    parser, _ = _command_parser()
    ns = parser.parse_args(argv)
    _set_debug(ns.debug)
    return ns.run(ns)


def main(argv=None):
    """Entry point: returns the exit status instead of exiting."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        if argv and not argv[0].startswith("-") and argv[0] in _command_names():
            return _run_command(argv)
        return _run_legacy(argv)
    except BscryptoError as e:
        sys.stderr.write("bscrypto: %s\n" % e)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bscrypto: interrupted\n")
        return 130
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:
        if DEBUG_LEVEL:
            raise
        sys.stderr.write("bscrypto: internal error: %s: %s (rerun with -d 1 for a "
                         "traceback and please report it)\n" % (type(e).__name__, e))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
